//! Dialing a backup: connect, authenticate (the handshake naming the
//! domain's layout), switch to the session's transport and, with a beacon
//! address, beacon to the backup's second heartbeat path for as long as
//! the session's sending half lives.

use std::net::TcpStream;
use std::time::Duration;

use crate::domain::{Domain, Layout};
use crate::engine::live::{Link, Session};
use crate::ha::beacon;
use crate::ha::heir::Heir;
use crate::transport::auth::Role;
use crate::transport::handshake::{self, random_nonce, HandshakeError, Psk};
use crate::transport::messages::{Hello, NONCE_LEN};
use crate::transport::record::RecordReader;
use crate::transport::seal::{SealSink, SealedWriter};
use crate::transport::tcp::{self, TcpSink};
use crate::transport::{select, RecordSink, TransportKind};

/// An authenticated tcp session before its transport is chosen: a writer
/// sealing every record and a reader opening every record.
pub type Opened = (SealedWriter<TcpStream>, RecordReader<TcpStream>);

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connecting to backup {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("handshake with backup {addr}: {source}")]
    Handshake {
        addr: String,
        #[source]
        source: HandshakeError,
    },
    #[error("transport with backup {addr}: {source}")]
    Transport {
        addr: String,
        #[source]
        source: select::SetupError,
    },
}

/// Connects and authenticates to a backup for `domain`.
pub fn open_session(
    addr: &str,
    psk: &Psk,
    domain: &dyn Domain,
    patience: Duration,
) -> Result<Opened, DialError> {
    open_session_for(addr, psk, domain.layout(), &domain.describe(), patience)
}

/// Connects and authenticates to a backup for a domain of `layout` named
/// `desc`.
pub fn open_session_for(
    addr: &str,
    psk: &Psk,
    layout: Layout,
    desc: &str,
    patience: Duration,
) -> Result<Opened, DialError> {
    open_session_nonce(addr, psk, layout, desc, patience, random_nonce())
}

/// Switches an authenticated tcp session to `transport`; the sink seals
/// every record it sends.
pub fn select_transport(
    addr: &str,
    (writer, reader): Opened,
    transport: TransportKind,
) -> Result<Link<Box<dyn std::io::Read + Send>>, DialError> {
    Ok(match transport {
        TransportKind::Tcp => {
            let (s, sealer) = writer.into_parts();
            let sink: Box<dyn RecordSink> = match sealer {
                Some(sealer) => Box::new(SealSink::new(Box::new(TcpSink(s)), sealer)),
                None => Box::new(TcpSink(s)),
            };
            (
                sink,
                reader.map_inner(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            )
        }
        kind => select::primary(kind, reader, writer).map_err(|source| DialError::Transport {
            addr: addr.to_string(),
            source,
        })?,
    })
}

/// [`open_session_for`] as a live copy's session: beaconing to `beacon`
/// (the backup's second heartbeat path) for as long as the session's
/// sending half lives.
pub fn open_protection(
    addr: &str,
    psk: &Psk,
    layout: Layout,
    desc: &str,
    patience: Duration,
    beacon: Option<(std::net::SocketAddr, Duration)>,
    transport: TransportKind,
) -> Result<Session<Box<dyn std::io::Read + Send>>, DialError> {
    let nonce = random_nonce();
    let tcp = open_session_nonce(addr, psk, layout, desc, patience, nonce)?;
    let (sink, reader) = select_transport(addr, tcp, transport)?;
    let sink: Box<dyn RecordSink> = match beacon {
        Some((to, every)) => {
            let b = beacon::Sender::start(to, psk.clone(), nonce, every).map_err(|source| {
                DialError::Connect {
                    addr: format!("beacon path {to}"),
                    source,
                }
            })?;
            Box::new(beacon::BeaconSink::new(sink, b))
        }
        None => sink,
    };
    Ok(Session {
        sink,
        reader,
        heir: Heir::session(&nonce),
    })
}

fn open_session_nonce(
    addr: &str,
    psk: &Psk,
    layout: Layout,
    desc: &str,
    patience: Duration,
    nonce: [u8; NONCE_LEN],
) -> Result<Opened, DialError> {
    let conn_err = |source| DialError::Connect {
        addr: addr.to_string(),
        source,
    };
    let s = tcp::connect(addr, patience).map_err(conn_err)?;
    let hs_err = |source| DialError::Handshake {
        addr: addr.to_string(),
        source,
    };
    let (local, far) = (s.local_addr(), s.peer_addr());
    let (local, far) = (local.map_err(conn_err)?, far.map_err(conn_err)?);
    psk.check_link(local.ip(), far.ip()).map_err(hs_err)?;
    let mut w = s.try_clone().map_err(conn_err)?;
    let mut r = RecordReader::new(s);
    let hello = Hello {
        page_size: layout.page_size,
        pages: layout.pages,
        nonce,
        protection: psk.protection,
        desc: desc.to_string(),
    };
    let keys = handshake::client(&mut r, &mut w, psk, &hello).map_err(hs_err)?;
    let (sealer, opener) = keys.split(Role::Primary);
    r.authenticate(opener);
    let mut w = SealedWriter::new(w);
    w.authenticate(sealer);
    Ok((w, r))
}
