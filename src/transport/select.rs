//! Agreeing on a transport right after the handshake, and building its
//! halves.
//!
//! ```text
//! primary                                   backup
//!   (tcp: nothing; data records follow)
//!   Transport{kind u8}                     ──►
//!                                           ◄── Slots{Announce}   (or Error: mismatch, setup failure)
//! ```
//!
//! A backup running tcp that receives a `Transport` record, or a backup
//! running uring/rdma whose first record is not one, refuses with an Error
//! record naming both transports, so both ends print the same reason.

use std::io::{self, Read};
use std::net::TcpStream;

use crate::transport::kind::TransportKind;
use crate::transport::link::{RecordSink, RecordSource};
use crate::transport::record::{send_record, RecordError, RecordKind, RecordReader};
use crate::transport::ring::{CreditFilter, ReturnPath};
use crate::transport::seal::{ControlWriter, SealSink, SealedWriter};
use crate::transport::slots::{Announce, SlotError, DEFAULT_SLOTS, DEFAULT_SLOT_SIZE, URING_SLOTS};
use crate::transport::uring::{UringError, UringSink, UringSource};

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("transport mismatch: {0}")]
    Mismatch(String),
    #[error("backup refused the transport: {0}")]
    Refused(String),
    #[error("unexpected {got:?} record while setting up the {transport} transport")]
    Unexpected {
        transport: TransportKind,
        got: RecordKind,
    },
    #[error("malformed Transport record ({len} bytes, value {value:?})")]
    BadRequest { len: usize, value: Option<u8> },
    #[error("the primary sent {0} bytes of data before the receive ring was announced")]
    EarlyData(usize),
    #[error("receive ring announcement: {0}")]
    Slot(#[from] SlotError),
    #[error(transparent)]
    Uring(#[from] UringError),
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("i/o error setting up the transport: {0}")]
    Io(#[from] io::Error),
}

/// Primary side, after the handshake, for a non-tcp transport. The sink
/// returned seals with `writer`'s sealer, which sealed the Transport record.
pub fn primary(
    kind: TransportKind,
    mut reader: RecordReader<TcpStream>,
    mut writer: SealedWriter<TcpStream>,
) -> Result<(Box<dyn RecordSink>, ReturnPath), SetupError> {
    debug_assert_ne!(kind, TransportKind::Tcp);
    send_record(&mut writer, RecordKind::Transport, 0, &[kind.to_u8()])?;
    let (writer, sealer) = writer.into_parts();
    let seal = |sink: Box<dyn RecordSink>| -> Box<dyn RecordSink> {
        match sealer {
            Some(s) => Box::new(SealSink::new(sink, s)),
            None => sink,
        }
    };
    // A backup that runs tcp beats from the moment it accepted us, so its
    // heartbeats may come before the Error record refusing the mismatch.
    let ann = loop {
        let rec = reader.next()?;
        match rec.kind {
            RecordKind::Slots => break Announce::decode(rec.payload)?,
            RecordKind::Heartbeat => continue,
            RecordKind::Error => {
                return Err(SetupError::Refused(
                    String::from_utf8_lossy(rec.payload).into_owned(),
                ))
            }
            got => {
                return Err(SetupError::Unexpected {
                    transport: kind,
                    got,
                })
            }
        }
    };
    match kind {
        TransportKind::Uring => {
            // The ring's geometry only bounds the backup's records: uring
            // is paced by TCP's window, with no credits.
            let _ = ann;
            let sink = UringSink::new(writer)?;
            let back: Box<dyn Read + Send> = Box::new(CreditFilter::passthrough(reader));
            Ok((seal(Box::new(sink)), RecordReader::new(back)))
        }
        #[cfg(feature = "rdma")]
        TransportKind::Rdma => {
            let (sink, back) = crate::transport::rdma::primary(reader, writer, &ann)
                .map_err(|e| SetupError::Unavailable(e.to_string()))?;
            Ok((seal(sink), back))
        }
        other => Err(SetupError::Unavailable(format!(
            "transport {other} is not available in this build"
        ))),
    }
}

/// Backup side, after the handshake, for a non-tcp transport: checks the
/// primary asked for the same one, announces the ring, returns the source.
pub fn backup(
    kind: TransportKind,
    mut reader: RecordReader<TcpStream>,
    writer: ControlWriter,
) -> Result<Box<dyn RecordSource>, SetupError> {
    debug_assert_ne!(kind, TransportKind::Tcp);
    let refuse = |msg: String| {
        let _ = send_record(
            &mut *writer.lock().unwrap(),
            RecordKind::Error,
            0,
            msg.as_bytes(),
        );
        msg
    };
    let rec = reader.next()?;
    if rec.kind != RecordKind::Transport {
        return Err(SetupError::Mismatch(refuse(format!(
            "this backup runs --transport {kind} but the primary uses tcp (its first record was {:?}); \
             start both with the same --transport",
            rec.kind
        ))));
    }
    let asked = match rec.payload {
        [v] => TransportKind::from_u8(*v).ok_or(SetupError::BadRequest {
            len: 1,
            value: Some(*v),
        })?,
        p => {
            return Err(SetupError::BadRequest {
                len: p.len(),
                value: None,
            })
        }
    };
    if asked != kind {
        return Err(SetupError::Mismatch(refuse(format!(
            "this backup runs --transport {kind} but the primary asked for --transport {asked}; \
             start both with the same --transport"
        ))));
    }
    if reader.buffered() != 0 {
        return Err(SetupError::EarlyData(reader.buffered()));
    }
    let open = reader.take_opener();
    let sock = reader.into_inner();
    let slots = match kind {
        TransportKind::Uring => URING_SLOTS,
        _ => DEFAULT_SLOTS,
    };
    let ann = Announce::new(slots, DEFAULT_SLOT_SIZE)?;
    let announce = |a: &Announce| -> Result<(), SetupError> {
        send_record(
            &mut *writer.lock().unwrap(),
            RecordKind::Slots,
            0,
            &a.encode(),
        )?;
        Ok(())
    };
    match kind {
        TransportKind::Uring => {
            let src = match UringSource::new(sock, &ann) {
                Ok(s) => s.authenticate(open),
                Err(e) => {
                    refuse(format!("the backup cannot run uring: {e}"));
                    return Err(e.into());
                }
            };
            announce(&ann)?;
            Ok(Box::new(src))
        }
        #[cfg(feature = "rdma")]
        TransportKind::Rdma => crate::transport::rdma::backup(sock, ann, open, announce)
            .map_err(|e| SetupError::Unavailable(refuse(format!("rdma setup failed: {e}")))),
        other => Err(SetupError::Unavailable(refuse(format!(
            "transport {other} is not available in this backup's build"
        )))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A tcp backup beats from the moment it accepted the primary: its
    /// heartbeats before the Error record refusing a uring/rdma primary
    /// must not hide the refusal (lab_rdma saw "unexpected Heartbeat").
    #[test]
    fn heartbeats_before_a_refusal_still_read_as_the_refusal() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let backup = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            for _ in 0..3 {
                send_record(&mut s, RecordKind::Heartbeat, 0, &[]).unwrap();
            }
            send_record(
                &mut s,
                RecordKind::Error,
                0,
                b"this backup runs --transport tcp",
            )
            .unwrap();
            // Hold the connection until the primary has read it all.
            let mut sink = [0u8; 64];
            let _ = std::io::Read::read(&mut s, &mut sink);
        });
        let s = TcpStream::connect(addr).unwrap();
        let reader = RecordReader::new(s.try_clone().unwrap());
        let writer = SealedWriter::new(s);
        match primary(TransportKind::Uring, reader, writer) {
            Err(SetupError::Refused(why)) => assert!(why.contains("--transport tcp"), "{why}"),
            Err(e) => panic!("expected the refusal, got {e}"),
            Ok(_) => panic!("expected the refusal, got a sink"),
        }
        backup.join().unwrap();
    }
}
