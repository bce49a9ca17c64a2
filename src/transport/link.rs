//! The two halves of a replication link, as the engine sees them: the
//! primary sends through a [`RecordSink`], the backup reads a
//! [`RecordSource`]. Every transport implements both.

use std::io;
use std::net::TcpStream;

use crate::transport::record::{Record, RecordError, RecordReader};

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
