//! The net effect of one epoch's disk writes.
//!
//! The backup applies an epoch whole at its commit (never a part of it), so
//! what it needs of epoch N is the disk's content at N's end on the ranges
//! N touched, not every write that got it there. A [`WriteSet`] keeps
//! exactly that: non-overlapping extents, each holding the bytes the last
//! write put there (or "zeros" for a zero/trim), and whether the epoch
//! carried a flush. A range written ten times in an epoch travels once.
//! Xen's Remus disk buffer (blktap's `block-remus`) does the same with a
//! per-epoch sector map.
//!
//! Invariants:
//! - Extents never overlap and none is empty; a data extent's buffer is
//!   exactly its length, at most [`MAX_OP_DATA`]; a zero extent's length
//!   fits the wire's `u32`.
//! - Applying [`WriteSet::into_ops`] to a disk in any order gives the same
//!   bytes as applying the epoch's writes in the order they reached the
//!   primary's image (the extents are disjoint and each holds the last
//!   write's bytes).
//! - `bytes` is the wire length of the ops [`WriteSet::into_ops`] returns.

use std::collections::BTreeMap;

use super::pool;
use super::wire::{DiskOp, MAX_OP_DATA, OP_HEADER};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Fill {
    Data(Vec<u8>),
    Zero,
    Trim,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Extent {
    len: u64,
    fill: Fill,
}

impl Extent {
    fn wire_len(&self) -> usize {
        OP_HEADER
            + match &self.fill {
                Fill::Data(d) => d.len(),
                _ => 0,
            }
    }

    /// Cuts the extent at `at` bytes from its start: `self` keeps the
    /// head, the tail is returned.
    fn split(&mut self, at: u64) -> Extent {
        debug_assert!(at > 0 && at < self.len);
        let fill = match &mut self.fill {
            Fill::Data(d) => Fill::Data(d.split_off(at as usize)),
            Fill::Zero => Fill::Zero,
            Fill::Trim => Fill::Trim,
        };
        let tail = Extent {
            len: self.len - at,
            fill,
        };
        self.len = at;
        tail
    }
}

/// One epoch's writes, coalesced (see the module documentation).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriteSet {
    extents: BTreeMap<u64, Extent>,
    flush: bool,
    bytes: usize,
}

impl WriteSet {
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty() && !self.flush
    }

    /// Wire bytes of the ops this set turns into.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Records that `data` now sits at `offset` (`data.len() <=
    /// MAX_OP_DATA`, not empty).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        debug_assert!(!data.is_empty() && data.len() <= MAX_OP_DATA);
        // A range rewritten whole reuses its buffer.
        if let Some(Extent {
            len,
            fill: Fill::Data(d),
        }) = self.extents.get_mut(&offset)
        {
            if *len == data.len() as u64 {
                d.copy_from_slice(data);
                return;
            }
        }
        let buf = if data.len() >= pool::MIN_POOLED {
            let mut b = pool::take(data.len());
            b.copy_from_slice(data);
            b
        } else {
            data.to_vec()
        };
        self.put(offset, data.len() as u64, Fill::Data(buf));
    }

    /// Records that `data` now sits at `offset`, keeping `data` itself as
    /// the range's bytes (no copy; `data.len() <= MAX_OP_DATA`, not empty).
    /// A buffer it replaces goes back to [`pool`].
    pub fn write_owned(&mut self, offset: u64, data: Vec<u8>) {
        debug_assert!(!data.is_empty() && data.len() <= MAX_OP_DATA);
        if let Some(Extent {
            len,
            fill: Fill::Data(d),
        }) = self.extents.get_mut(&offset)
        {
            if *len == data.len() as u64 {
                pool::give(std::mem::replace(d, data));
                return;
            }
        }
        self.put(offset, data.len() as u64, Fill::Data(data));
    }

    /// Records that `len` bytes at `offset` now read as zeros (`len >= 1`).
    pub fn zero(&mut self, offset: u64, len: u32, trim: bool) {
        let fill = if trim { Fill::Trim } else { Fill::Zero };
        self.put(offset, len as u64, fill);
    }

    /// Records that the epoch must be durable on the backup at its commit.
    pub fn flush(&mut self) {
        if !self.flush {
            self.flush = true;
            self.bytes += OP_HEADER;
        }
    }

    fn put(&mut self, offset: u64, len: u64, fill: Fill) {
        let end = offset + len;
        self.clear(offset, end);
        let x = Extent { len, fill };
        self.bytes += x.wire_len();
        self.extents.insert(offset, x);
    }

    /// Removes every byte of `[start, end)` from the set, cutting the
    /// extents that straddle either edge.
    fn clear(&mut self, start: u64, end: u64) {
        if let Some((&k, x)) = self.extents.range_mut(..start).next_back() {
            if k + x.len > start {
                let tail = x.split(start - k);
                self.bytes += OP_HEADER;
                self.extents.insert(start, tail);
            }
        }
        if let Some((&k, x)) = self.extents.range_mut(start..end).next_back() {
            if k + x.len > end {
                let tail = x.split(end - k);
                self.bytes += OP_HEADER;
                self.extents.insert(end, tail);
            }
        }
        let inside: Vec<u64> = self.extents.range(start..end).map(|(&k, _)| k).collect();
        for k in inside {
            let x = self.extents.remove(&k).expect("key just listed");
            self.bytes -= x.wire_len();
            if let Fill::Data(d) = x.fill {
                pool::give(d);
            }
        }
    }

    /// The set as wire ops: extents in offset order, then a flush if the
    /// epoch carried one.
    pub fn into_ops(self) -> Vec<DiskOp> {
        let mut ops: Vec<DiskOp> = self
            .extents
            .into_iter()
            .map(|(offset, x)| match x.fill {
                Fill::Data(data) => DiskOp::Write { offset, data },
                Fill::Zero => DiskOp::Zero {
                    offset,
                    len: x.len as u32,
                },
                Fill::Trim => DiskOp::Trim {
                    offset,
                    len: x.len as u32,
                },
            })
            .collect();
        if self.flush {
            ops.push(DiskOp::Flush);
        }
        ops
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Applies ops to an in-memory disk.
    fn apply(disk: &mut [u8], ops: &[DiskOp]) {
        for op in ops {
            match op {
                DiskOp::Write { offset, data } => {
                    disk[*offset as usize..*offset as usize + data.len()].copy_from_slice(data)
                }
                DiskOp::Zero { offset, len } | DiskOp::Trim { offset, len } => {
                    disk[*offset as usize..(*offset + *len as u64) as usize].fill(0)
                }
                DiskOp::Flush => {}
            }
        }
    }

    #[derive(Debug, Clone)]
    enum In {
        W(u64, usize, u8),
        Z(u64, u32, bool),
        F,
    }

    const DISK: u64 = 1 << 14;

    fn input() -> impl Strategy<Value = In> {
        prop_oneof![
            6 => (0..DISK - 1, 1usize..4096, 1u8..=255)
                .prop_map(|(o, n, b)| In::W(o, n.min((DISK - o) as usize), b)),
            2 => (0..DISK - 1, 1u32..4096, any::<bool>())
                .prop_map(|(o, n, t)| In::Z(o, n.min((DISK - o) as u32), t)),
            1 => Just(In::F),
        ]
    }

    proptest! {
        #[test]
        fn the_set_has_the_net_effect_of_the_writes_in_order(
            ins in proptest::collection::vec(input(), 1..60),
        ) {
            let mut base = vec![0u8; DISK as usize];
            for (i, b) in base.iter_mut().enumerate() {
                *b = (i % 251) as u8 + 1;
            }
            let (mut direct, mut via) = (base.clone(), base);
            let mut set = WriteSet::default();
            let mut flushed = false;
            for (n, i) in ins.iter().enumerate() {
                // Each write gets its own byte pattern so a stale copy shows.
                let op = match *i {
                    In::W(o, len, b) => {
                        let data: Vec<u8> = (0..len).map(|k| b ^ (k as u8) ^ (n as u8)).collect();
                        // Copied or handed over: the same net effect.
                        if n % 2 == 0 {
                            set.write(o, &data);
                        } else {
                            set.write_owned(o, data.clone());
                        }
                        DiskOp::Write { offset: o, data }
                    }
                    In::Z(o, len, t) => {
                        set.zero(o, len, t);
                        DiskOp::Zero { offset: o, len }
                    }
                    In::F => {
                        set.flush();
                        flushed = true;
                        DiskOp::Flush
                    }
                };
                apply(&mut direct, std::slice::from_ref(&op));
            }
            let bytes = set.bytes();
            let ops = set.into_ops();
            prop_assert_eq!(bytes, ops.iter().map(|o| o.wire_len()).sum::<usize>());
            prop_assert_eq!(flushed, ops.last() == Some(&DiskOp::Flush));
            // Disjoint and sorted: any order of application gives the same disk.
            let mut last_end = 0;
            for op in &ops {
                let (o, len) = match op {
                    DiskOp::Write { offset, data } => (*offset, data.len() as u64),
                    DiskOp::Zero { offset, len } | DiskOp::Trim { offset, len } => (*offset, *len as u64),
                    DiskOp::Flush => continue,
                };
                prop_assert!(len > 0 && o >= last_end, "{ops:?}");
                last_end = o + len;
            }
            let mut rev = ops.clone();
            rev.reverse();
            apply(&mut via, &rev);
            prop_assert!(direct == via, "coalesced ops differ from the writes in order");
        }
    }

    #[test]
    fn a_range_rewritten_travels_once() {
        let mut s = WriteSet::default();
        for b in 1..=10u8 {
            s.write(4096, &[b; 4096]);
        }
        s.write(4096 + 100, &[11; 10]);
        assert_eq!(s.bytes(), 3 * OP_HEADER + 4096);
        assert_eq!(
            s.into_ops(),
            vec![
                DiskOp::Write {
                    offset: 4096,
                    data: vec![10; 100]
                },
                DiskOp::Write {
                    offset: 4196,
                    data: vec![11; 10]
                },
                DiskOp::Write {
                    offset: 4206,
                    data: vec![10; 4096 - 110]
                },
            ]
        );
    }
}
