//! Recycled buffers for large disk writes on the primary.
//!
//! A large NBD WRITE is received into a buffer that the epoch log then
//! keeps as the write's data (no copy into the log); once the checkpoint
//! carrying it has been sent, dropping its [`super::log::EpochOps`] hands
//! the buffer back here. Fresh buffers of a MiB cost 256 page faults each
//! (and the allocator returns freed ones to the kernel), more than the copy
//! they replace; recycled ones cost nothing.
//!
//! Invariants:
//! - Only buffers of at least [`MIN_POOLED`] bytes of capacity are kept,
//!   and at most [`MAX_POOLED_BYTES`] of capacity in all; the rest are
//!   freed. A pooled buffer's length equals its capacity (every byte
//!   initialised), so [`take`] hands one out by truncating it, without
//!   zeroing.
//! - The pool is process-wide and holds no data anyone reads: a buffer's
//!   old contents are overwritten by whoever takes it before use.

use std::sync::{Mutex, MutexGuard};

/// Smaller buffers are left to the allocator (cheap at that size).
pub const MIN_POOLED: usize = 64 << 10;
/// Capacity kept in the pool at most (a few epochs of writes at 1 GiB/s).
pub const MAX_POOLED_BYTES: usize = 64 << 20;

/// A set of recycled buffers (the process uses one, [`take`] / [`give`]).
#[derive(Debug, Default)]
pub struct Pool {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
}

impl Pool {
    pub const fn new() -> Pool {
        Pool {
            bufs: Vec::new(),
            bytes: 0,
        }
    }

    /// A pooled buffer for `len` bytes, truncated to it, if one fits.
    fn take(&mut self, len: usize) -> Option<Vec<u8>> {
        // Most writes have one size (the client's request size): a buffer
        // that fits is near the end; do not hand out one far too large.
        let i = self
            .bufs
            .iter()
            .rposition(|b| b.len() >= len && b.len() <= 2 * len)?;
        let mut b = self.bufs.swap_remove(i);
        self.bytes -= b.len();
        b.truncate(len);
        Some(b)
    }

    /// Keeps `buf` (whole, `len == capacity`) if there is room.
    fn keep(&mut self, buf: Vec<u8>) {
        if self.bytes + buf.len() <= MAX_POOLED_BYTES {
            self.bytes += buf.len();
            self.bufs.push(buf);
        }
    }
}

static POOL: Mutex<Pool> = Mutex::new(Pool::new());

fn lock() -> MutexGuard<'static, Pool> {
    // The pool's state is consistent after every call; a panic elsewhere
    // while holding it cannot leave it half updated.
    POOL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A buffer of exactly `len` bytes (contents unspecified: old data or
/// zeros), recycled when one large enough is pooled.
pub fn take(len: usize) -> Vec<u8> {
    if len >= MIN_POOLED {
        if let Some(b) = lock().take(len) {
            return b;
        }
    }
    vec![0; len]
}

/// Gives a buffer back (freed instead when the pool is full or it is small).
pub fn give(buf: Vec<u8>) {
    if let Some(b) = whole(buf) {
        lock().keep(b);
    }
}

/// `buf` extended to its capacity, if worth pooling. Re-extending costs a
/// memset of the part cut off (only after a write was split within its
/// epoch); most buffers come back whole.
fn whole(mut buf: Vec<u8>) -> Option<Vec<u8>> {
    if buf.capacity() < MIN_POOLED || buf.len() < buf.capacity() / 2 {
        return None;
    }
    buf.resize(buf.capacity(), 0);
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_recycled_within_bounds() {
        let mut p = Pool::new();
        let n = 1 << 20;
        let mut b = vec![0u8; n];
        b[0] = 7;
        let ptr = b.as_ptr();
        p.keep(whole(b).unwrap());
        let again = p.take(n - 4096).expect("pooled");
        assert_eq!(again.len(), n - 4096);
        assert_eq!(again.as_ptr(), ptr, "the same allocation comes back");
        p.keep(whole(again).expect("long enough to keep"));
        assert!(p.take(n / 4).is_none(), "not one over twice the size");
        let b = p.take(n).expect("whole again after the short use");
        assert_eq!((b.len(), b.as_ptr()), (n, ptr));
        assert!(
            whole(vec![0; 4096]).is_none(),
            "small buffers are not pooled"
        );
        let mut short = vec![0u8; n];
        short.truncate(n / 4);
        assert!(whole(short).is_none(), "nor mostly cut ones");
        for _ in 0..(MAX_POOLED_BYTES / n + 8) {
            p.keep(vec![1; n]);
        }
        assert!(p.bytes <= MAX_POOLED_BYTES, "bounded: {}", p.bytes);
        assert_eq!(p.bytes, p.bufs.iter().map(Vec::len).sum::<usize>());
        assert_eq!(
            take(100).len(),
            100,
            "the process pool hands out exact lengths"
        );
    }
}
