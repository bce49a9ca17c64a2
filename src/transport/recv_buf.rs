//! The record reader's receive buffers, which a consumer may keep.
//!
//! A record the [`crate::transport::record::RecordReader`] hands out lies
//! in its current buffer. A consumer that must keep a payload past the
//! next record (the backup's disk staging keeps an epoch's writes until
//! commit) takes a [`Held`] — a counted reference to the buffer and the
//! payload's range — instead of copying the payload out. The reader then
//! never writes into that buffer again: before it reads or verifies the
//! next record it moves to another buffer (a spare no one holds any more,
//! or a new one), copying only the bytes it has read past the held record
//! (at most one read's overshoot, which the reader bounds).
//!
//! Invariant: the bytes of a buffer someone else holds never change. The
//! reader writes only through [`Arc::get_mut`], which fails while a
//! [`Held`] of the buffer lives; there is no other path to a `&mut`.

use std::ops::Range;
use std::sync::Arc;

/// Size of a buffer the reader moves to when its own is held: a 1 MiB
/// record plus the reader's bounded overshoot fit, so a held record pins
/// about twice its size.
const SWITCH_SIZE: usize = 2 << 20;
/// Spares no one holds kept for reuse; more are freed. A fresh buffer
/// costs a page fault per 4 KiB on first use (in a profile of 1 MiB
/// writes, a pool of 16 left an epoch's worth to be faulted in every
/// epoch, costing more than the copy saved), so the pool keeps what an
/// epoch at the disk staging's memory bound (256 MiB) can hold, which is
/// what the staging's own buffer kept before.
const IDLE_SPARES: usize = 128;

/// A payload kept in the reader's buffer (see the module documentation).
#[derive(Debug, Clone)]
pub struct Held {
    buf: Arc<Vec<u8>>,
    range: Range<usize>,
}

impl Held {
    /// The payload's bytes, as handed out (verified, decrypted).
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.range.clone()]
    }

    /// Bytes the whole buffer pins while this lives.
    pub fn buffer_len(&self) -> usize {
        self.buf.len()
    }

    /// Whether `other` keeps the same buffer alive.
    pub fn same_buffer(&self, other: &Held) -> bool {
        Arc::ptr_eq(&self.buf, &other.buf)
    }
}

/// The reader's current buffer and its spares.
#[derive(Debug)]
pub struct Bufs {
    cur: Arc<Vec<u8>>,
    spare: Vec<Arc<Vec<u8>>>,
}

impl Bufs {
    pub fn new(size: usize) -> Bufs {
        Bufs {
            cur: Arc::new(vec![0; size]),
            spare: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.cur.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cur.is_empty()
    }

    pub fn bytes(&self) -> &[u8] {
        &self.cur
    }

    /// The current buffer, for a record handed out of it to offer
    /// [`Held`]s of its payload ([`held`]).
    pub fn current(&self) -> &Arc<Vec<u8>> {
        &self.cur
    }

    /// The current buffer, writable: call [`Bufs::unshare`] first.
    pub fn writable(&mut self) -> &mut Vec<u8> {
        Arc::get_mut(&mut self.cur).expect("unshare() before writing")
    }

    /// Makes sure nobody else holds the current buffer, moving the
    /// unconsumed bytes `[start, end)` to the front of another one if
    /// somebody does (then `start` becomes 0).
    pub fn unshare(&mut self, start: &mut usize, end: &mut usize) {
        if Arc::get_mut(&mut self.cur).is_some() {
            return;
        }
        let (s, e) = (*start, *end);
        let mut next = self.take_spare(SWITCH_SIZE.max(e - s));
        Arc::get_mut(&mut next).expect("a spare no one holds")[..e - s]
            .copy_from_slice(&self.cur[s..e]);
        let old = std::mem::replace(&mut self.cur, next);
        self.spare.push(old);
        self.prune();
        (*start, *end) = (0, e - s);
    }

    /// A spare of at least `size` bytes no one holds, or a new one.
    fn take_spare(&mut self, size: usize) -> Arc<Vec<u8>> {
        let free = self
            .spare
            .iter_mut()
            .position(|b| b.len() >= size && Arc::get_mut(b).is_some());
        match free {
            Some(i) => self.spare.swap_remove(i),
            None => Arc::new(vec![0; size]),
        }
    }

    /// Frees idle spares beyond [`IDLE_SPARES`] (held ones are freed by
    /// their last holder once this drops its reference).
    fn prune(&mut self) {
        let mut idle = 0;
        self.spare.retain_mut(|b| {
            if Arc::get_mut(b).is_none() {
                return true;
            }
            idle += 1;
            idle <= IDLE_SPARES
        });
        // Held ones: keep a bounded number to reuse after their commit.
        while self.spare.len() > 2 * IDLE_SPARES {
            self.spare.remove(0);
        }
    }

    /// Grows the current buffer (which nobody holds) to `size` bytes.
    pub fn grow(&mut self, size: usize) {
        let v = self.writable();
        if v.len() < size {
            v.resize(size, 0);
        }
    }
}

/// A [`Held`] of `payload`, which lies inside `buf`.
pub fn held(buf: &Arc<Vec<u8>>, payload: &[u8]) -> Held {
    let base = buf.as_ptr() as usize;
    let at = payload.as_ptr() as usize - base;
    assert!(
        at + payload.len() <= buf.len(),
        "payload outside its buffer"
    );
    Held {
        buf: buf.clone(),
        range: at..at + payload.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_buffer_is_never_written_and_the_reader_moves_on() {
        let mut b = Bufs::new(64);
        b.writable()[..10].copy_from_slice(b"0123456789");
        let h = held(b.current(), &b.bytes()[2..5]);
        assert_eq!(h.bytes(), b"234");
        // Bytes 5..10 were read but not consumed: they move.
        let (mut s, mut e) = (5, 10);
        b.unshare(&mut s, &mut e);
        assert_eq!((s, e), (0, 5));
        assert_eq!(&b.bytes()[..5], b"56789");
        b.writable().fill(0xee);
        assert_eq!(h.bytes(), b"234", "a held payload changed");
        drop(h);
        // A buffer of the reader's switch size, held and then let go, is
        // reused rather than a new one made.
        let h1 = held(b.current(), &b.bytes()[..1]);
        let first = b.bytes().as_ptr();
        let (mut s, mut e) = (0, 0);
        b.unshare(&mut s, &mut e);
        assert_ne!(b.bytes().as_ptr(), first);
        drop(h1);
        let h2 = held(b.current(), &b.bytes()[..1]);
        b.unshare(&mut s, &mut e);
        assert_eq!(b.bytes().as_ptr(), first, "the free spare was not reused");
        drop(h2);
    }

    #[test]
    fn unshared_buffers_stay_put() {
        let mut b = Bufs::new(64);
        let p = b.bytes().as_ptr();
        let (mut s, mut e) = (3, 9);
        b.unshare(&mut s, &mut e);
        assert_eq!((s, e, b.bytes().as_ptr()), (3, 9, p));
    }
}
