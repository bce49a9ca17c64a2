//! Transports: how records reach the backup and acknowledgements come back.
//!
//! [`record`] frames and verifies records, [`messages`] lays out their
//! payloads, [`handshake`] opens an authenticated session, and [`tcp`] is
//! the portable baseline transport. [`uring`] (io_uring, zero-copy send into
//! the backup's registered slot ring) and [`rdma`] (feature `rdma`) share the
//! slot/credit protocol of [`slots`]. The engine sends through [`RecordSink`]
//! and the backup reads through a [`RecordSource`].

pub mod handshake;
pub mod messages;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod record;
pub mod select;
pub mod slots;
pub mod tcp;
pub mod uring;

use std::io;
use std::net::TcpStream;

use record::{Record, RecordError, RecordReader};

/// The sending half of a replication link: moves complete records to the
/// backup in order. Buffers are borrowed only for the call.
pub trait RecordSink: Send {
    fn send(&mut self, bufs: &[&[u8]]) -> io::Result<()>;
}

/// The backup's receiving half: verified records, in order. A record stays
/// valid until the next call (transports with a receive ring credit its
/// bytes back to the primary only then).
pub trait RecordSource {
    fn next_record(&mut self) -> Result<Record<'_>, RecordError>;
    /// The session's TCP connection (control channel).
    fn stream(&self) -> &TcpStream;
    /// Bytes of records handed out so far.
    fn bytes_read(&self) -> u64;
}

impl RecordSource for RecordReader<TcpStream> {
    fn next_record(&mut self) -> Result<Record<'_>, RecordError> {
        self.next()
    }
    fn stream(&self) -> &TcpStream {
        self.get_ref()
    }
    fn bytes_read(&self) -> u64 {
        self.bytes_read
    }
}

/// Which transport carries the records. Both ends must use the same one:
/// the primary names it in a `Transport` record after the handshake (none
/// for tcp) and the backup refuses a mismatch with a reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TransportKind {
    #[default]
    Tcp,
    Uring,
    Rdma,
}

impl TransportKind {
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Uring => "uring",
            TransportKind::Rdma => "rdma",
        }
    }

    pub fn to_u8(self) -> u8 {
        self as u8
    }

    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => TransportKind::Tcp,
            1 => TransportKind::Uring,
            2 => TransportKind::Rdma,
            _ => return None,
        })
    }

    /// Fails at start-up when this binary or machine cannot run the
    /// transport (io_uring or SEND_ZC missing; no `rdma` feature or device).
    pub fn check_available(self) -> Result<(), String> {
        match self {
            TransportKind::Tcp => Ok(()),
            TransportKind::Uring => uring::probe().map_err(|e| e.to_string()),
            TransportKind::Rdma => {
                #[cfg(feature = "rdma")]
                {
                    rdma::probe().map_err(|e| e.to_string())
                }
                #[cfg(not(feature = "rdma"))]
                {
                    Err(
                        "--transport rdma: this castor was built without the `rdma` cargo feature \
                         (rebuild with `cargo build --release --features rdma`)"
                            .into(),
                    )
                }
            }
        }
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
