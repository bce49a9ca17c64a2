//! One NBD client connection (TCP or Unix) with deadline-bounded reads.
//!
//! Invariants:
//! - Every read is bounded by an absolute deadline: before each `read` the
//!   socket's read timeout is at most what is left of it (plus
//!   [`SLACK`]), so a client that trickles bytes cannot stretch a request
//!   past its deadline. The timeout is set only when it must change (a
//!   `setsockopt` per read cost a syscall each): a read blocks at most
//!   [`MAX_BLOCK`] and loops until its deadline.
//! - Small reads go through a read-ahead buffer, so a request header and
//!   a small write's payload that arrived together cost one `read`; a read
//!   of [`READ_AHEAD`] bytes or more goes straight into the caller's buffer
//!   after what was read ahead.
//! - Replies may be queued ([`Conn::reply`]) while more requests wait in
//!   the read-ahead buffer, and go out in one `write`; queued replies are
//!   sent before any read from the socket (so a client waiting for them
//!   is never left waiting while the server waits for it) and before any
//!   other send, in order.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::NbdError;

/// Bytes read ahead of a small read.
pub const READ_AHEAD: usize = 64 << 10;
/// Longest one `read` blocks before the deadline is looked at again.
pub const MAX_BLOCK: Duration = Duration::from_millis(200);
/// Replies up to this size are queued behind the read-ahead (a simple
/// reply, or one with a small read's data); larger ones go out at once.
pub const QUEUED_REPLY: usize = 8 << 10;
/// How far the socket's timeout may differ from the ideal one before it
/// is set again: a read may overrun its deadline by at most this.
pub const SLACK: Duration = Duration::from_millis(5);

#[derive(Debug)]
enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

#[derive(Debug)]
pub struct Conn {
    sock: Sock,
    /// Bytes read ahead and not consumed yet: `ahead[pos..end]`.
    ahead: Vec<u8>,
    pos: usize,
    end: usize,
    /// The read timeout the socket has (`None`: never set).
    timeout: Option<Duration>,
    /// Replies queued and not sent yet.
    out: Vec<u8>,
}

impl Conn {
    fn new(sock: Sock) -> Conn {
        Conn {
            sock,
            ahead: Vec::new(),
            pos: 0,
            end: 0,
            timeout: None,
            out: Vec::new(),
        }
    }

    pub fn tcp(s: TcpStream) -> Conn {
        Conn::new(Sock::Tcp(s))
    }

    pub fn unix(s: UnixStream) -> Conn {
        Conn::new(Sock::Unix(s))
    }

    /// A second handle on the socket (to shut it down from elsewhere); it
    /// shares no read-ahead with this one.
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(Conn::new(match &self.sock {
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
        }))
    }

    pub fn shutdown(&self) {
        // Ending a connection that may already be gone: nothing to report.
        let _ = match &self.sock {
            Sock::Tcp(s) => s.shutdown(Shutdown::Both),
            Sock::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Makes the socket's read timeout fit `left` (see the module
    /// documentation): at most `left + SLACK`, and not much shorter than
    /// `min(left, MAX_BLOCK)`.
    fn fit_read_timeout(&mut self, left: Duration) -> io::Result<()> {
        let want = left.min(MAX_BLOCK).max(Duration::from_millis(1));
        if let Some(t) = self.timeout {
            if t <= left + SLACK && t + SLACK >= want {
                return Ok(());
            }
        }
        match &self.sock {
            Sock::Tcp(s) => s.set_read_timeout(Some(want)),
            Sock::Unix(s) => s.set_read_timeout(Some(want)),
        }?;
        self.timeout = Some(want);
        Ok(())
    }

    pub fn set_write_timeout(&self, t: Duration) -> io::Result<()> {
        match &self.sock {
            Sock::Tcp(s) => s.set_write_timeout(Some(t)),
            Sock::Unix(s) => s.set_write_timeout(Some(t)),
        }
    }

    pub fn set_nodelay(&self) {
        if let Sock::Tcp(s) = &self.sock {
            // Latency only; a failure leaves Nagle on, still correct.
            let _ = s.set_nodelay(true);
        }
    }

    /// Reads up to `buf.len()` bytes, waiting at most until `deadline`.
    /// `Ok(0)` is end of stream; a passed deadline is `TimedOut`.
    pub fn read_until(&mut self, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
        if self.pos < self.end {
            let n = buf.len().min(self.end - self.pos);
            buf[..n].copy_from_slice(&self.ahead[self.pos..self.pos + n]);
            self.pos += n;
            return Ok(n);
        }
        if buf.len() >= READ_AHEAD {
            return self.read_sock(buf, deadline);
        }
        let mut ahead = std::mem::take(&mut self.ahead);
        ahead.resize(READ_AHEAD, 0);
        let r = self.read_sock(&mut ahead, deadline);
        self.ahead = ahead;
        let got = r?;
        let n = buf.len().min(got);
        buf[..n].copy_from_slice(&self.ahead[..n]);
        (self.pos, self.end) = (n, got);
        Ok(n)
    }

    /// One `read` from the socket (retried on EINTR and on the socket's
    /// timeout until `deadline`), after sending the queued replies.
    fn read_sock(&mut self, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
        self.write_out()?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.fit_read_timeout(left)?;
            let r = match &mut self.sock {
                Sock::Tcp(s) => s.read(buf),
                Sock::Unix(s) => s.read(buf),
            };
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }
    /// Fills `buf` completely before `deadline`; `what` names the field for
    /// the error.
    pub fn read_exact_until(
        &mut self,
        buf: &mut [u8],
        deadline: Instant,
        what: &'static str,
    ) -> Result<(), NbdError> {
        let mut got = 0;
        while got < buf.len() {
            match self.read_until(&mut buf[got..], deadline) {
                Ok(0) => {
                    return Err(NbdError::Vanished {
                        what,
                        got,
                        want: buf.len(),
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return Err(NbdError::Deadline {
                        what,
                        got,
                        want: buf.len(),
                    })
                }
                Err(source) => return Err(NbdError::Io { op: what, source }),
            }
        }
        Ok(())
    }

    /// Whether read-ahead bytes are waiting (the start of a request the
    /// client sent without waiting for earlier replies).
    pub fn has_ahead(&self) -> bool {
        self.pos < self.end
    }

    /// Sends `bytes` after the queued replies.
    pub fn send(&mut self, bytes: &[u8]) -> Result<(), NbdError> {
        self.write_out()
            .and_then(|()| self.write_sock(bytes))
            .map_err(|source| NbdError::Io {
                op: "sending a reply",
                source,
            })
    }

    /// Sends a reply: queued while more requests wait in the read-ahead
    /// buffer and the reply is small ([`QUEUED_REPLY`]), so a burst of
    /// pipelined requests is answered with one `write`; else at once.
    pub fn reply(&mut self, bytes: &[u8]) -> Result<(), NbdError> {
        if self.has_ahead() && bytes.len() <= QUEUED_REPLY {
            self.out.extend_from_slice(bytes);
            return Ok(());
        }
        self.send(bytes)
    }

    /// Sends the queued replies, if any.
    pub fn flush(&mut self) -> Result<(), NbdError> {
        self.write_out().map_err(|source| NbdError::Io {
            op: "sending queued replies",
            source,
        })
    }

    fn write_out(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        let r = self.write_sock(&out);
        self.out = out;
        self.out.clear();
        r
    }

    fn write_sock(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.sock {
            Sock::Tcp(s) => s.write_all(bytes),
            Sock::Unix(s) => s.write_all(bytes),
        }
    }
}
