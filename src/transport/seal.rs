//! Sealing the records an end sends, whatever carries them: the
//! primary's data path ([`SealSink`], over any [`RecordSink`]) and the
//! small control records written on a stream ([`SealedWriter`]: acks,
//! heartbeats, credits, errors, the transport agreement).
//!
//! Each end has exactly one [`Sealer`] per session, so one counter numbers
//! everything it sends after the handshake, on whichever path. Handing the
//! sealer from a [`SealedWriter`] to a [`SealSink`]
//! ([`SealedWriter::into_parts`]) keeps the count.

use std::io::{self, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};

use std::sync::mpsc;

use crate::transport::auth::{Role, SealOutput, Sealer, SessionKeys};
use crate::transport::link::{FailureReport, Lent, RecordSink};
use crate::transport::record::RecordReader;
use crate::transport::tcp::TcpSink;
use crate::transport::wire::HEADER_LEN;

/// The backup's writer of control records (heartbeats, acks, credits,
/// errors), shared by the threads that send them.
pub type ControlWriter = Arc<Mutex<SealedWriter<TcpStream>>>;

fn to_io(e: crate::transport::auth::AuthError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

/// A [`RecordSink`] that seals every record before `inner` carries it
/// (tcp, uring and rdma alike: the tag travels inside the byte stream).
pub struct SealSink {
    inner: Box<dyn RecordSink>,
    sealer: Sealer,
    /// Output buffers of lent sends, handed back by the inner sink.
    back_tx: mpsc::Sender<SealOutput>,
    back_rx: mpsc::Receiver<SealOutput>,
}

impl SealSink {
    pub fn new(inner: Box<dyn RecordSink>, sealer: Sealer) -> Self {
        let (back_tx, back_rx) = mpsc::channel();
        SealSink {
            inner,
            sealer,
            back_tx,
            back_rx,
        }
    }
}

/// A lent send, sealed: the caller's memory plus the sealer's output (tags
/// or ciphertext), lent on to the inner sink as one.
struct SealedLent {
    inner: Box<dyn Lent>,
    out: SealOutput,
    /// The sealed pieces: slices of `inner`'s pieces and of `out`.
    pieces: Vec<(*const u8, usize)>,
    back: mpsc::Sender<SealOutput>,
}

// SAFETY: the raw pieces point into `inner` (Send) and `out` (plain
// vectors), which this value owns; nothing else holds them.
unsafe impl Send for SealedLent {}

impl Lent for SealedLent {
    fn pieces(&self) -> Vec<&[u8]> {
        self.pieces
            .iter()
            // SAFETY: each piece lies in memory `self` owns and never
            // changes: the pieces of `inner` (a boxed Lent, whose pieces
            // stay valid while it lives unmoved in its box) or the heap
            // buffers of `out` (moved out of the sealer after sealing,
            // which leaves the contents in place).
            .map(|&(p, n)| unsafe { std::slice::from_raw_parts(p, n) })
            .collect()
    }

    fn give_back(self: Box<Self>) {
        let SealedLent {
            inner, out, back, ..
        } = *self;
        let _ = back.send(out);
        inner.give_back();
    }
}

impl RecordSink for SealSink {
    /// `bufs` must hold whole records (as every caller sends them).
    fn send(&mut self, bufs: &[&[u8]]) -> io::Result<()> {
        let pieces = self.sealer.seal(bufs).map_err(to_io)?;
        let r = self.inner.send(&pieces);
        if r.is_err() && self.inner.kernel_kept_buffers() {
            // The kernel may still read the tags (or ciphertext) this call
            // handed it: they must outlive this sink.
            self.sealer.leak_buffers();
        }
        r
    }

    fn send_lent(&mut self, lent: Box<dyn Lent>) -> io::Result<()> {
        while let Ok(out) = self.back_rx.try_recv() {
            self.sealer.reuse_output(out);
        }
        let pieces: Result<Vec<(*const u8, usize)>, _> = {
            let bufs = lent.pieces();
            let sealed = self.sealer.seal(&bufs);
            sealed.map(|s| s.iter().map(|p| (p.as_ptr(), p.len())).collect())
        };
        let pieces = match pieces {
            Ok(p) => p,
            Err(e) => {
                // Nothing reached the kernel.
                lent.give_back();
                return Err(to_io(e));
            }
        };
        let sealed = SealedLent {
            inner: lent,
            out: self.sealer.take_output(),
            pieces,
            back: self.back_tx.clone(),
        };
        self.inner.send_lent(Box::new(sealed))
    }

    fn reclaim(&mut self) {
        self.inner.reclaim()
    }

    fn connection(&self) -> Option<TcpStream> {
        self.inner.connection()
    }

    fn kernel_kept_buffers(&self) -> bool {
        self.inner.kernel_kept_buffers()
    }

    fn on_failure(&mut self, report: FailureReport) {
        self.inner.on_failure(report)
    }
}

/// A writer of records that seals them once the session is authenticated
/// ([`SealedWriter::authenticate`]) and passes bytes through before.
///
/// Callers write whole records (`send_record` does, in one `write_all`);
/// bytes are collected until a record is complete, then it is sealed and
/// written to `inner` in one `write_all`.
pub struct SealedWriter<W> {
    inner: W,
    sealer: Option<Sealer>,
    /// Bytes of a record not yet complete.
    partial: Vec<u8>,
}

impl<W: Write> SealedWriter<W> {
    pub fn new(inner: W) -> Self {
        SealedWriter {
            inner,
            sealer: None,
            partial: Vec::new(),
        }
    }

    /// Seals every record written from now on with `sealer`.
    pub fn authenticate(&mut self, sealer: Sealer) {
        self.sealer = Some(sealer);
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The stream and the sealer (to go on sealing elsewhere).
    pub fn into_parts(self) -> (W, Option<Sealer>) {
        debug_assert!(self.partial.is_empty(), "record half written");
        (self.inner, self.sealer)
    }

    /// Seals and writes every complete record in `partial`.
    fn flush_records(&mut self, sealer: &mut Sealer) -> io::Result<()> {
        while self.partial.len() >= HEADER_LEN {
            let len = u32::from_le_bytes(self.partial[16..20].try_into().unwrap()) as usize;
            let whole = HEADER_LEN + len;
            if self.partial.len() < whole {
                break;
            }
            // Taken out first: a failed write must not leave the record to
            // be sealed again (under the next number) by a later call.
            let rec: Vec<u8> = self.partial.drain(..whole).collect();
            let out = sealer.seal(&[&rec[..]]).map_err(to_io)?.concat();
            self.inner.write_all(&out)?;
        }
        Ok(())
    }
}

impl<W: Write> Write for SealedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(mut sealer) = self.sealer.take() else {
            return self.inner.write(buf);
        };
        self.partial.extend_from_slice(buf);
        let r = self.flush_records(&mut sealer);
        self.sealer = Some(sealer);
        r.map(|()| buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A tcp primary's halves after [`crate::transport::handshake::client`]
/// returned `keys`: the sink seals everything it sends to `stream` and
/// `reader` opens everything from now on.
pub fn tcp_primary<R: io::Read>(
    keys: &SessionKeys,
    stream: TcpStream,
    reader: &mut RecordReader<R>,
) -> Box<dyn RecordSink> {
    let (sealer, opener) = keys.split(Role::Primary);
    reader.authenticate(opener);
    Box::new(SealSink::new(Box::new(TcpSink(stream)), sealer))
}
