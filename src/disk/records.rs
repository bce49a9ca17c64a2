//! One epoch's disk writes, laid out as the `DiskWrites` records that
//! carry them.
//!
//! The primary's write log appends each write here, under its lock, in
//! the order the writes reached the image: a record header, the payload
//! header, then per op its header and (for a write under
//! [`pool::MIN_POOLED`] bytes) its data, straight into the record's buffer
//! in wire order. There is no allocation per write, no ordered map, and
//! the sender sends the buffers as they are ([`EpochOps::slices`]): the
//! data of a small write is copied once, from the NBD receive buffer into
//! the record. Larger writes keep their own buffer (the NBD payload buffer
//! the log took, or a [`pool`] buffer), sent as a piece of its own between
//! the record's bytes. Record buffers come from [`pool`] and go back to it
//! when the epoch's ops are dropped (after the send).
//!
//! A write that covers exactly the range of an earlier write of the epoch,
//! when no op since touched any 4 KiB block of that range, replaces the
//! earlier write's data in place (a range rewritten within an epoch
//! travels once, as with the coalescing map this replaces). Any other
//! overlap is appended: the backup applies an epoch's ops in order
//! (`disk::stage`), so the last write wins there as it did here.
//!
//! Invariants:
//! - The records ([`EpochOps::slices`], after [`EpochOps::close`]) are
//!   exactly the bytes of `DiskWrites` records with the CRC field 0 (they
//!   only travel sealed), each payload at most [`MAX_RECORD_PAYLOAD`]
//!   bytes and holding at least one op, valid for `wire::parse`.
//! - Applying the ops in order gives, on every range the epoch touched,
//!   the bytes the image held at the epoch's end: ops are in arrival
//!   order, and an in-place rewrite only moves a write earlier past ops
//!   that touched none of its blocks.
//! - A `Flush` op, when the epoch carried one, is its last op (ops of
//!   epochs merged by [`EpochOps::absorb`] end each with their own).
//! - [`EpochOps::bytes`] is the sum of the ops' wire lengths (the log's
//!   bound counts it).

use std::collections::HashMap;

use super::pool;
use super::wire::{
    DiskOp, KIND_FLUSH, KIND_TRIM, KIND_WRITE, KIND_ZERO, MAX_OP_DATA, OP_HEADER, PAYLOAD_HEADER,
};
use crate::transport::record::{begin_record, RecordKind, HEADER_LEN};

/// Largest payload of one `DiskWrites` record of a checkpoint.
pub const MAX_RECORD_PAYLOAD: usize = MAX_OP_DATA + 4096;
/// A record buffer holding small writes' data: room for the largest record.
const RECORD_BUF: usize = HEADER_LEN + MAX_RECORD_PAYLOAD;
/// Granularity of the overlap check of in-place rewrites.
const BLOCK: u64 = 4096;

/// One `DiskWrites` record being built or built.
#[derive(Debug, Default)]
struct Record {
    /// Record header, payload header, op headers and small writes' data.
    buf: Vec<u8>,
    /// Large writes' data: each goes on the wire after `buf[..at]`
    /// (ascending `at`).
    large: Vec<(usize, Vec<u8>)>,
    ops: u32,
    /// Payload bytes so far (payload header and ops).
    payload: usize,
}

/// Where an op's data lies.
#[derive(Debug, Clone, Copy)]
enum Place {
    /// In `records[rec].buf[at..]`.
    Inline(usize),
    /// `records[rec].large[i]`.
    Large(usize),
}

/// The latest write at an offset.
#[derive(Debug, Clone, Copy)]
struct Slot {
    rec: usize,
    place: Place,
    len: usize,
    seq: u64,
}

/// One epoch's ops for one disk, as records (see the module documentation).
#[derive(Debug, Default)]
pub struct EpochOps {
    /// The epoch the records are tagged with.
    pub epoch: u64,
    disk: u16,
    records: Vec<Record>,
    bytes: usize,
    ops: u64,
    data_bytes: u64,
    flush: bool,
    closed: bool,
    /// Latest write per offset (candidates for an in-place rewrite).
    slots: HashMap<u64, Slot>,
    /// Per 4 KiB block, the sequence number of the last op touching it.
    blocks: HashMap<u64, u64>,
    seq: u64,
}

impl EpochOps {
    /// No ops yet, for `epoch`.
    pub fn new(epoch: u64) -> EpochOps {
        let mut e = EpochOps::default();
        e.epoch = epoch;
        e
    }

    /// Neither an op nor a flush.
    pub fn is_empty(&self) -> bool {
        self.ops == 0 && !self.flush
    }

    /// Wire bytes of the ops (headers and data; a pending flush counts).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Ops carried (a flush counts once closed).
    pub fn op_count(&self) -> u64 {
        self.ops
    }

    /// Bytes of write data carried.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Records framed (after [`Self::close`]).
    pub fn records(&self) -> u32 {
        self.records.len() as u32
    }

    /// Bytes of the records on the wire, headers included.
    pub fn wire_bytes(&self) -> u64 {
        self.records
            .iter()
            .map(|r| (HEADER_LEN + r.payload) as u64)
            .sum()
    }

    /// Records that `data` now sits at `offset` (`1..=MAX_OP_DATA` bytes),
    /// copying it.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        debug_assert!(!data.is_empty() && data.len() <= MAX_OP_DATA);
        if let Some(s) = self.rewritable(offset, data.len()) {
            match s.place {
                Place::Inline(at) => {
                    self.records[s.rec].buf[at..at + data.len()].copy_from_slice(data)
                }
                Place::Large(i) => self.records[s.rec].large[i].1.copy_from_slice(data),
            }
            return;
        }
        if data.len() >= pool::MIN_POOLED {
            let mut b = pool::take(data.len());
            b.copy_from_slice(data);
            self.push_write(offset, Data::Large(b));
        } else {
            self.push_write(offset, Data::Inline(data));
        }
    }

    /// Records that `data` now sits at `offset`, keeping `data` itself
    /// (at least [`pool::MIN_POOLED`], at most `MAX_OP_DATA` bytes). A
    /// buffer it replaces goes back to [`pool`].
    pub fn write_owned(&mut self, offset: u64, data: Vec<u8>) {
        debug_assert!(data.len() >= pool::MIN_POOLED && data.len() <= MAX_OP_DATA);
        if let Some(s) = self.rewritable(offset, data.len()) {
            match s.place {
                Place::Large(i) => {
                    pool::give(std::mem::replace(&mut self.records[s.rec].large[i].1, data))
                }
                // Same length, so not inline (small writes are); kept exact anyway.
                Place::Inline(at) => {
                    self.records[s.rec].buf[at..at + data.len()].copy_from_slice(&data);
                    pool::give(data);
                }
            }
            return;
        }
        self.push_write(offset, Data::Large(data));
    }

    /// Records that `len` bytes at `offset` now read as zeros (`len >= 1`).
    pub fn zero(&mut self, offset: u64, len: u32, trim: bool) {
        let kind = if trim { KIND_TRIM } else { KIND_ZERO };
        // Earlier writes overlapping the range must not move past it; all
        // are dropped as rewrite candidates (zeroing is rare).
        self.slots.clear();
        self.seq += 1;
        self.push(kind, offset, len, Data::None);
    }

    /// Records that the epoch must be durable on the backup at its commit
    /// (a `Flush` op, appended last by [`Self::close`]).
    pub fn flush(&mut self) {
        if !self.flush {
            self.flush = true;
            self.bytes += OP_HEADER;
        }
    }

    /// Ends the epoch: appends the `Flush` op if it carried one and
    /// completes the last record's header. Idempotent; nothing may be
    /// added after it.
    pub fn close(&mut self) {
        if self.closed {
            return;
        }
        if self.flush {
            self.push(KIND_FLUSH, 0, 0, Data::None);
            self.bytes -= OP_HEADER; // counted when flagged
        }
        if let Some(r) = self.records.last_mut() {
            finish(r);
        }
        self.closed = true;
    }

    /// Appends `other`'s records after these (both closed first: the ops
    /// of two epochs merged keep their order, each part ending with its
    /// flush if it had one).
    pub fn absorb(&mut self, mut other: EpochOps) {
        self.close();
        other.close();
        self.records.append(&mut other.records);
        self.bytes += other.bytes;
        self.ops += other.ops;
        self.data_bytes += other.data_bytes;
        self.flush |= other.flush;
    }

    /// Tags the records with `epoch` and disk index `disk` (the log builds
    /// them for the epoch it was running and disk 0).
    pub fn retag(&mut self, epoch: u64, disk: u16) {
        for r in &mut self.records {
            r.buf[8..16].copy_from_slice(&epoch.to_le_bytes());
            r.buf[HEADER_LEN..HEADER_LEN + 2].copy_from_slice(&disk.to_le_bytes());
        }
        (self.epoch, self.disk) = (epoch, disk);
    }

    /// The records' bytes in order (after [`Self::close`]).
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> + '_ {
        debug_assert!(self.closed || self.records.is_empty());
        self.records.iter().flat_map(|r| {
            let mut from = 0;
            let mut out = Vec::with_capacity(2 * r.large.len() + 1);
            for (at, data) in &r.large {
                out.push(&r.buf[from..*at]);
                out.push(&data[..]);
                from = *at;
            }
            out.push(&r.buf[from..]);
            out
        })
    }

    /// The ops, decoded from the records (tests and diagnostics).
    pub fn ops(&self) -> Vec<DiskOp> {
        let mut out = Vec::new();
        for p in self.payloads() {
            let mut at = PAYLOAD_HEADER;
            while at < p.len() {
                let h = &p[at..at + OP_HEADER];
                let offset = u64::from_le_bytes(h[2..10].try_into().expect("8 bytes"));
                let len = u32::from_le_bytes(h[10..14].try_into().expect("4 bytes"));
                at += OP_HEADER;
                out.push(match h[0] {
                    KIND_WRITE => {
                        at += len as usize;
                        DiskOp::Write {
                            offset,
                            data: p[at - len as usize..at].to_vec(),
                        }
                    }
                    KIND_ZERO => DiskOp::Zero { offset, len },
                    KIND_TRIM => DiskOp::Trim { offset, len },
                    _ => DiskOp::Flush,
                });
            }
        }
        out
    }

    /// Each record's payload, contiguous (tests and diagnostics).
    pub fn payloads(&self) -> Vec<Vec<u8>> {
        let mut closed = EpochOps::default();
        let recs = if self.closed {
            &self.records
        } else {
            // A view with the last record's header completed.
            closed.records = self
                .records
                .iter()
                .map(|r| Record {
                    buf: r.buf.clone(),
                    large: r.large.clone(),
                    ops: r.ops,
                    payload: r.payload,
                })
                .collect();
            if let Some(r) = closed.records.last_mut() {
                finish(r);
            }
            &closed.records
        };
        recs.iter()
            .map(|r| {
                let mut p = Vec::with_capacity(r.payload);
                let mut from = HEADER_LEN;
                for (at, data) in &r.large {
                    p.extend_from_slice(&r.buf[from..*at]);
                    p.extend_from_slice(data);
                    from = *at;
                }
                p.extend_from_slice(&r.buf[from..]);
                p
            })
            .collect()
    }

    /// The slot at `offset` if a write of `len` bytes there may replace its
    /// data in place: same length, and no op since touched its blocks.
    fn rewritable(&self, offset: u64, len: usize) -> Option<Slot> {
        let s = *self.slots.get(&offset)?;
        if s.len != len {
            return None;
        }
        let (first, last) = block_span(offset, len as u64);
        (first..=last)
            .all(|b| self.blocks.get(&b) == Some(&s.seq))
            .then_some(s)
    }

    /// Appends a write op and makes it the rewrite candidate at `offset`.
    fn push_write(&mut self, offset: u64, data: Data) {
        let len = data.len();
        self.seq += 1;
        let (first, last) = block_span(offset, len as u64);
        for b in first..=last {
            self.blocks.insert(b, self.seq);
        }
        let (rec, place) = self.push(KIND_WRITE, offset, len as u32, data);
        self.slots.insert(
            offset,
            Slot {
                rec,
                place,
                len,
                seq: self.seq,
            },
        );
        self.data_bytes += len as u64;
    }

    /// Appends one op, opening a record when the current one is full.
    /// Returns where its data went.
    fn push(&mut self, kind: u8, offset: u64, len: u32, data: Data) -> (usize, Place) {
        debug_assert!(!self.closed, "op after close");
        let wire = OP_HEADER + data.len();
        let full = self
            .records
            .last()
            .map_or(true, |r| r.payload + wire > MAX_RECORD_PAYLOAD);
        if full {
            if let Some(r) = self.records.last_mut() {
                finish(r);
            }
            self.records.push(open(self.epoch, self.disk));
        }
        let rec = self.records.len() - 1;
        let r = &mut self.records[rec];
        let inline = match &data {
            Data::Inline(d) => d.len(),
            _ => 0,
        };
        if r.buf.capacity() - r.buf.len() < OP_HEADER + inline {
            grow(&mut r.buf, OP_HEADER + inline);
        }
        r.buf.push(kind);
        r.buf.push(0);
        r.buf.extend_from_slice(&offset.to_le_bytes());
        r.buf.extend_from_slice(&len.to_le_bytes());
        let place = match data {
            Data::None => Place::Inline(r.buf.len()),
            Data::Inline(d) => {
                let at = r.buf.len();
                r.buf.extend_from_slice(d);
                Place::Inline(at)
            }
            Data::Large(d) => {
                r.large.push((r.buf.len(), d));
                Place::Large(r.large.len() - 1)
            }
        };
        r.ops += 1;
        r.payload += wire;
        self.ops += 1;
        self.bytes += wire;
        (rec, place)
    }
}

impl Drop for EpochOps {
    fn drop(&mut self) {
        for mut r in self.records.drain(..) {
            if r.buf.capacity() >= RECORD_BUF {
                // An epoch's last record is often mostly empty: kept whole
                // (a memset) rather than freed and faulted in again.
                r.buf.resize(r.buf.capacity(), 0);
            }
            pool::give(r.buf);
            for (_, d) in r.large {
                pool::give(d);
            }
        }
    }
}

/// An op's data.
enum Data<'a> {
    None,
    /// Copied into the record's buffer.
    Inline(&'a [u8]),
    /// Sent from its own buffer.
    Large(Vec<u8>),
}

impl Data<'_> {
    fn len(&self) -> usize {
        match self {
            Data::None => 0,
            Data::Inline(d) => d.len(),
            Data::Large(d) => d.len(),
        }
    }
}

/// The 4 KiB blocks `[offset, offset + len)` touches (`len >= 1`).
fn block_span(offset: u64, len: u64) -> (u64, u64) {
    (offset / BLOCK, (offset + len.max(1) - 1) / BLOCK)
}

/// A new record: its header (length and CRC 0 until [`finish`]) and its
/// payload header (op count 0 until then).
fn open(epoch: u64, disk: u16) -> Record {
    let mut buf = Vec::with_capacity(256);
    begin_record(&mut buf, RecordKind::DiskWrites, epoch);
    buf.extend_from_slice(&disk.to_le_bytes());
    buf.extend_from_slice(&0u32.to_le_bytes());
    Record {
        buf,
        large: Vec::new(),
        ops: 0,
        payload: PAYLOAD_HEADER,
    }
}

/// Writes a record's payload length and op count into its headers.
fn finish(r: &mut Record) {
    r.buf[16..20].copy_from_slice(&(r.payload as u32).to_le_bytes());
    r.buf[HEADER_LEN + 2..HEADER_LEN + 6].copy_from_slice(&r.ops.to_le_bytes());
}

/// Moves `buf` into a buffer with room for a whole record (from [`pool`],
/// so its pages are already there), when `more` bytes do not fit.
fn grow(buf: &mut Vec<u8>, more: usize) {
    let want = (buf.len() + more).max(RECORD_BUF);
    let mut b = pool::take(want);
    b.clear();
    b.extend_from_slice(buf);
    pool::give(std::mem::replace(buf, b));
}

#[cfg(test)]
mod tests;
