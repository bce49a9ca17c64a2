//! The `uring` transport: io_uring over the session's TCP connection, the
//! backup reading the stream straight into a registered receive ring.
//!
//! Primary ([`UringSink`]): the record stream goes out as it is, in sends
//! of at most [`SEND_MAX`] bytes, each one `IORING_OP_SENDMSG_ZC` (or plain
//! `SENDMSG` where zero copy does not pay; [`SendMode::Auto`], the default)
//! whose iovecs are the pieces of the caller's buffers, so the sink copies
//! no byte. Buffers lent with [`RecordSink::send_lent`](crate::transport::RecordSink::send_lent)
//! stay with the sink until every one of their sends has both its
//! completion and its zero-copy notification (`IORING_CQE_F_NOTIF`), i.e.
//! until the kernel no longer reads them, and go back to the caller then,
//! after `send_lent` returned; borrowed buffers (`send`) make `send` wait
//! for that. The staged modes copy each send into the sink's registered
//! staging buffers instead and send it with `IORING_OP_SEND_ZC` (or plain
//! `SEND`) from there; a staging buffer is reused only after its
//! completion and notification arrived. One batch of sends is submitted as
//! one linked chain (links keep them in order on the socket).
//!
//! Backup ([`UringSource`]): the receive ring is one memfd mapped twice back
//! to back ([`MirrorRing`]), the first mapping registered as a fixed buffer.
//! The stream is read with `IORING_OP_READ_FIXED` straight into the ring at
//! its position (stream offset `p` at ring offset `p mod len`), as much as
//! has arrived and the ring has room for; records are verified and handed
//! to the receiver as slices of the ring (a record running past the ring's
//! end reads on into the mirror), so no byte is copied between the socket
//! and the decoder beyond the kernel's own copy.
//!
//! Flow control is TCP's: the backup reads only into ring space its parser
//! is done with, so when the ring is full the socket's receive window
//! closes and the primary's sends wait in the kernel. Unlike rdma (whose
//! one-sided writes need slots agreed in advance), uring sends no chunk
//! headers and no `Credit` records: on loopback each credit cost a record,
//! a wakeup of the primary's return-path thread and one of its sender, and
//! the sender idled waiting for them (docs/throughput.md, "uring without
//! credits"). The backup still announces its ring (`Slots`), which fixes
//! the largest record it can hold; a `Credit` record from a backup is a
//! protocol error on the primary's return path.
//!
//! Files: `sink.rs` (the primary's half), `source.rs` (the backup's half,
//! under the shared [`crate::transport::ring::RingReader`]), `loans.rs`
//! (lent memory while the kernel may read it); this file holds the ring
//! setup and memory both share.

mod loans;
mod sink;
mod source;
#[cfg(test)]
mod tests;

use std::io;

use io_uring::{opcode, IoUring, Probe};

use crate::transport::ring::MirrorError;
pub use crate::transport::ring::{CreditFilter, MirrorRing};
pub use sink::{SendMode, UringSink, COPIED_SWITCH, SEND_MAX, ZC_MIN};
pub use source::{UringLink, UringSource};

const RING_ENTRIES: u32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum UringError {
    #[error("io_uring is unavailable on this kernel ({kernel}): {source} (is io_uring disabled by the kernel.io_uring_disabled sysctl or a seccomp policy?); use --transport tcp")]
    Setup { kernel: String, source: io::Error },
    #[error(
        "kernel {kernel} does not support io_uring {op} (needs Linux {needs}); use --transport tcp"
    )]
    Unsupported {
        kernel: String,
        op: &'static str,
        needs: &'static str,
    },
    #[error("registering {what} with io_uring: {source}")]
    Register {
        what: &'static str,
        source: io::Error,
    },
    #[error("mapping {what} of {len} bytes: {source}")]
    Map {
        what: &'static str,
        len: usize,
        source: io::Error,
    },
    #[error(transparent)]
    Ring(#[from] MirrorError),
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn new_ring() -> Result<IoUring, UringError> {
    let ring = IoUring::new(RING_ENTRIES).map_err(|source| UringError::Setup {
        kernel: kernel(),
        source,
    })?;
    let mut p = Probe::new();
    ring.submitter()
        .register_probe(&mut p)
        .map_err(|source| UringError::Setup {
            kernel: kernel(),
            source,
        })?;
    for (code, op, needs) in [
        (opcode::SendZc::CODE, "IORING_OP_SEND_ZC", "6.0"),
        (opcode::ReadFixed::CODE, "IORING_OP_READ_FIXED", "5.1"),
    ] {
        if !p.is_supported(code) {
            return Err(UringError::Unsupported {
                kernel: kernel(),
                op,
                needs,
            });
        }
    }
    Ok(ring)
}

/// Checks that this machine can run the transport (ring setup and the ops
/// it needs), for a clear error at start-up.
pub fn probe() -> Result<(), UringError> {
    new_ring().map(drop)
}

/// Page-aligned anonymous memory, unmapped on drop.
struct Region {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain memory; access is coordinated by its owner.
unsafe impl Send for Region {}

impl Region {
    fn new(len: usize, what: &'static str) -> Result<Self, UringError> {
        // SAFETY: anonymous private mapping, no address hint.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(UringError::Map {
                what,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Region { ptr: p.cast(), len })
    }

    fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr.cast(),
            iov_len: self.len,
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: mapped by `new` with this length; pages the kernel still
        // pins (registered buffers) stay alive in the kernel until released.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
