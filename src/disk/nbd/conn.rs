//! One NBD client connection (TCP or Unix) with deadline-bounded reads.
//!
//! Invariant: every read is bounded by an absolute deadline; the socket's
//! read timeout is set to what is left of it before each `read`, so a
//! client that trickles bytes cannot stretch a request past its deadline.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::NbdError;

#[derive(Debug)]
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    pub fn shutdown(&self) {
        // Ending a connection that may already be gone: nothing to report.
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn set_read_timeout(&self, t: Duration) -> io::Result<()> {
        let t = Some(t.max(Duration::from_millis(1)));
        match self {
            Conn::Tcp(s) => s.set_read_timeout(t),
            Conn::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_write_timeout(Some(t)),
            Conn::Unix(s) => s.set_write_timeout(Some(t)),
        }
    }

    pub fn set_nodelay(&self) {
        if let Conn::Tcp(s) = self {
            // Latency only; a failure leaves Nagle on, still correct.
            let _ = s.set_nodelay(true);
        }
    }

    /// Reads up to `buf.len()` bytes, waiting at most until `deadline`.
    /// `Ok(0)` is end of stream; a passed deadline is `TimedOut`.
    pub fn read_until(&mut self, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.set_read_timeout(left)?;
            let r = match self {
                Conn::Tcp(s) => s.read(buf),
                Conn::Unix(s) => s.read(buf),
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

    pub fn send(&mut self, bytes: &[u8]) -> Result<(), NbdError> {
        let r = match self {
            Conn::Tcp(s) => s.write_all(bytes),
            Conn::Unix(s) => s.write_all(bytes),
        };
        r.map_err(|source| NbdError::Io {
            op: "sending a reply",
            source,
        })
    }
}
