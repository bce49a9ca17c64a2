//! Transports: how records reach the backup and acknowledgements come back.
//!
//! [`record`] frames and verifies records, [`messages`] lays out their
//! payloads, [`handshake`] opens an authenticated session, and [`tcp`] is
//! the portable baseline transport. The engine sends through [`RecordSink`]
//! and reads replies through a [`record::RecordReader`] over any `Read`.

pub mod handshake;
pub mod messages;
pub mod record;
pub mod tcp;

use std::io;

/// The sending half of a replication link: moves complete records to the
/// backup in order. Buffers are borrowed only for the call.
pub trait RecordSink: Send {
    fn send(&mut self, bufs: &[&[u8]]) -> io::Result<()>;
}
