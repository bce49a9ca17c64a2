//! The two halves of a replication link, as the engine sees them: the
//! primary sends through a [`RecordSink`], the backup reads a
//! [`RecordSource`]. Every transport implements both.

use std::io;
use std::net::TcpStream;

use crate::transport::record::{Record, RecordError, RecordReader};

/// The sending half of a replication link: moves complete records to the
/// backup in order. Buffers are borrowed only for the call, unless
/// [`RecordSink::kernel_kept_buffers`] says otherwise after a failure.
pub trait RecordSink: Send {
    fn send(&mut self, bufs: &[&[u8]]) -> io::Result<()>;

    /// A clone of the session's TCP connection, through which the
    /// session's backup-loss decision shuts the link down so that every
    /// blocked write and read of the session returns at once. None: the
    /// transport has no such socket.
    fn connection(&self) -> Option<TcpStream> {
        None
    }

    /// After a failed `send`: true when the kernel may still read the
    /// caller's buffers of that call (a zero-copy send whose notification
    /// never came, even after the socket was torn down). The caller must
    /// then never free or reuse them: it leaks them.
    fn kernel_kept_buffers(&self) -> bool {
        false
    }

    /// Has the sink report its first fatal error through `report` the
    /// moment it happens, before it tears the connection down (which the
    /// session's reader would otherwise report first, as a broken pipe).
    fn on_failure(&mut self, report: FailureReport) {
        let _ = report;
    }
}

/// Where a sink reports its first fatal error ([`RecordSink::on_failure`]).
pub type FailureReport = Box<dyn Fn(&str) + Send>;

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
