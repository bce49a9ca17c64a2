//! The `tcp` transport: plain kernel sockets, the portable baseline.

use std::io::{self, IoSlice, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::transport::link::RecordSink;

/// Connects to a backup, retrying until `patience` runs out so a primary
/// started just before its backup still finds it.
pub fn connect(addr: &str, patience: Duration) -> io::Result<TcpStream> {
    let deadline = std::time::Instant::now() + patience;
    let addrs: Vec<_> = addr.to_socket_addrs()?.collect();
    loop {
        let mut last = None;
        for a in &addrs {
            match TcpStream::connect_timeout(a, Duration::from_secs(2)) {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    return Ok(s);
                }
                Err(e) => last = Some(e),
            }
        }
        let e = last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"));
        if std::time::Instant::now() >= deadline {
            return Err(e);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn listen(addr: &str) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
        .map_err(|e| io::Error::new(e.kind(), format!("listening on {addr}: {e}")))
}

/// Sending half of a TCP link. Its deadline is the socket's write timeout
/// (SO_SNDTIMEO; a protection session sets it to `--backup-timeout`): a
/// write that moves no byte for that long fails the send.
pub struct TcpSink(pub TcpStream);

impl RecordSink for TcpSink {
    fn send(&mut self, bufs: &[&[u8]]) -> io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = bufs
            .iter()
            .filter(|b| !b.is_empty())
            .map(|b| IoSlice::new(b))
            .collect();
        let mut s = &mut slices[..];
        while !s.is_empty() {
            match self.0.write_vectored(s) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut s, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(self.stalled(e)),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn connection(&self) -> Option<TcpStream> {
        self.0.try_clone().ok()
    }
}

impl TcpSink {
    /// The error of a write that hit the socket's write timeout.
    fn stalled(&self, e: io::Error) -> io::Error {
        let after = self.0.write_timeout().ok().flatten().unwrap_or_default();
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no byte went out for {} ms (the write deadline, --backup-timeout): \
                 the link is partitioned or the backup stopped reading ({e})",
                after.as_millis()
            ),
        )
    }
}

/// SO_SNDTIMEO/SO_RCVTIMEO expiry: Linux reports EAGAIN (WouldBlock).
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
