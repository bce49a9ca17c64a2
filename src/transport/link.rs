//! The two halves of a replication link, as the engine sees them: the
//! primary sends through a [`RecordSink`], the backup reads a
//! [`RecordSource`]. Every transport implements both.

use std::io;
use std::net::TcpStream;

use crate::transport::record::{Record, RecordError, RecordReader};

/// Memory lent to a sink for one send ([`RecordSink::send_lent`]): the
/// sink owns it from the call on and may keep it after the call returns,
/// while the kernel still reads it (a zero-copy send before its
/// notification), then gives it back ([`Lent::give_back`]).
///
/// Invariant for implementors: every slice [`Lent::pieces`] returns points
/// into memory `self` owns (its fields, or heap memory it owns or shares,
/// such as a `Vec`'s contents) or into `'static` memory. The sink keeps the
/// value boxed and never mutates or moves it out of its box, so those
/// slices stay valid for as long as it holds the box.
pub trait Lent: Send {
    /// The bytes to send, in order (whole records).
    fn pieces(&self) -> Vec<&[u8]>;

    /// Called once, when nothing reads the memory any more: hands the
    /// buffers back to whoever reuses them (an encoder's pool). Never
    /// called for memory the kernel may still read after a failure: the
    /// sink leaks that value instead.
    fn give_back(self: Box<Self>) {}
}

/// The sending half of a replication link: moves complete records to the
/// backup in order. Buffers passed to [`RecordSink::send`] are borrowed
/// only for the call, unless [`RecordSink::kernel_kept_buffers`] says
/// otherwise after a failure; buffers passed to [`RecordSink::send_lent`]
/// belong to the sink until it gives them back.
pub trait RecordSink: Send {
    fn send(&mut self, bufs: &[&[u8]]) -> io::Result<()>;

    /// Sends `lent`'s pieces like [`RecordSink::send`], in order with
    /// every other send. The sink may return before the kernel is done
    /// with the memory; it then keeps `lent` and gives it back later (from
    /// a later call, [`RecordSink::reclaim`] or its drop). On a failure it
    /// gives back what the kernel no longer reads and leaks the rest.
    /// Default: a borrowed send, then the buffers go back at once.
    fn send_lent(&mut self, lent: Box<dyn Lent>) -> io::Result<()> {
        let r = self.send(&lent.pieces());
        if r.is_err() && self.kernel_kept_buffers() {
            tracing::warn!("leaking a failed send's buffers: the kernel may still read them");
            std::mem::forget(lent);
        } else {
            lent.give_back();
        }
        r
    }

    /// Gives back, without blocking, lent memory the kernel has finished
    /// with (called by the sender between sends, so that buffers flow back
    /// while it waits for work).
    fn reclaim(&mut self) {}

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
