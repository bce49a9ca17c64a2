//! A checkpoint's `DiskWrites` records, framed for the wire without
//! copying the write data.
//!
//! An epoch can carry hundreds of MiB of disk writes. Copying them into
//! one send buffer cost the tx thread a pass over every byte plus a fresh
//! allocation per epoch (page faults on each of its pages). Instead,
//! [`frame`] writes only the record headers, payload headers and op
//! headers (and the data of small writes) into one small buffer and
//! [`Framed::slices`] lists the pieces — headers from that buffer, large
//! data straight from the logged ops — for a vectored send. The records
//! carry no CRC (field 0, as `record::finish_record` leaves it): they only
//! travel sealed, and the session's tag covers every byte. Apart from that
//! field the bytes are exactly those of `record::write_record(wire::encode(..))`
//! (tested below).

use std::ops::Range;

use super::session::EpochDisks;
use super::wire::{self, DiskOp, OP_HEADER, PAYLOAD_HEADER};
use crate::transport::record::{begin_record, RecordKind, HEADER_LEN};

/// Largest payload of one `DiskWrites` record of a checkpoint.
pub const MAX_RECORD_PAYLOAD: usize = wire::MAX_OP_DATA + 4096;
/// Write data shorter than this is copied next to its header (one slice
/// per op would cost more than the copy).
const INLINE_DATA: usize = 16 << 10;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    /// A range of [`Framed::heads`].
    Heads(Range<usize>),
    /// The data of op `op` of entry `entry` of the epoch's disks.
    Data { entry: usize, op: usize },
}

/// An epoch's `DiskWrites` records as pieces (see the module documentation).
#[derive(Debug, Default)]
pub struct Framed {
    heads: Vec<u8>,
    pieces: Vec<Piece>,
    /// Records framed (the epoch's End counts them).
    pub records: u32,
    /// Bytes on the wire, headers included.
    pub wire_bytes: u64,
}

/// Frames `disks` (the writes cut for `epoch`) as `DiskWrites` records of
/// at most [`MAX_RECORD_PAYLOAD`] payload bytes.
pub fn frame(disks: &EpochDisks, epoch: u64) -> Framed {
    let mut f = Framed::default();
    for (entry, (disk, e)) in disks.iter().enumerate() {
        let mut first = 0;
        for batch in wire::batches(&e.ops, MAX_RECORD_PAYLOAD) {
            f.record(epoch, *disk, entry, first, batch);
            first += batch.len();
        }
    }
    f
}

impl Framed {
    /// Appends one record holding `ops` (ops `first..` of entry `entry`).
    fn record(&mut self, epoch: u64, disk: u16, entry: usize, first: usize, ops: &[DiskOp]) {
        let len = PAYLOAD_HEADER + ops.iter().map(DiskOp::wire_len).sum::<usize>();
        let rec = begin_record(&mut self.heads, RecordKind::DiskWrites, epoch);
        // Header layout (transport::record): len at 16..20, crc (left 0)
        // at 20..24.
        self.heads[rec + 16..rec + 20].copy_from_slice(&(len as u32).to_le_bytes());
        // The piece being built starts at `run`.
        let mut run = rec;
        self.heads.extend_from_slice(&disk.to_le_bytes());
        self.heads
            .extend_from_slice(&(ops.len() as u32).to_le_bytes());
        for (i, op) in ops.iter().enumerate() {
            let at = self.heads.len();
            wire::encode_op_header(&mut self.heads, op);
            debug_assert_eq!(self.heads.len() - at, OP_HEADER);
            match op {
                DiskOp::Write { data, .. } if data.len() >= INLINE_DATA => {
                    self.pieces.push(Piece::Heads(run..self.heads.len()));
                    self.pieces.push(Piece::Data {
                        entry,
                        op: first + i,
                    });
                    run = self.heads.len();
                }
                DiskOp::Write { data, .. } => self.heads.extend_from_slice(data),
                _ => {}
            }
        }
        self.pieces.push(Piece::Heads(run..self.heads.len()));
        self.records += 1;
        self.wire_bytes += (HEADER_LEN + len) as u64;
    }

    /// The records' bytes in order, borrowing large data from `disks`
    /// (the same value given to [`frame`]).
    pub fn slices<'a>(&'a self, disks: &'a EpochDisks) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.pieces.iter().map(move |p| match p {
            Piece::Heads(r) => &self.heads[r.clone()],
            Piece::Data { entry, op } => match &disks[*entry].1.ops[*op] {
                DiskOp::Write { data, .. } => &data[..],
                other => unreachable!("a data piece names a {other:?}"),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::log::EpochOps;
    use crate::transport::record::{add_checksums, write_record, RecordReader};

    fn ops(sizes: &[usize]) -> Vec<DiskOp> {
        let mut at = 0u64;
        let mut v: Vec<DiskOp> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let op = DiskOp::Write {
                    offset: at,
                    data: (0..n).map(|k| (k * 31 + i) as u8).collect(),
                };
                at += n as u64;
                op
            })
            .collect();
        v.push(DiskOp::Zero {
            offset: 1 << 30,
            len: 7,
        });
        v.push(DiskOp::Flush);
        v
    }

    #[test]
    fn pieces_are_the_bytes_of_the_copied_records() {
        let disks: EpochDisks = vec![
            (
                0,
                EpochOps {
                    epoch: 9,
                    ops: ops(&[512, 1 << 20, 4096, 1 << 20, 20_000, 1]),
                    bytes: 0,
                },
            ),
            (
                3,
                EpochOps {
                    epoch: 9,
                    ops: ops(&[100_000]),
                    bytes: 0,
                },
            ),
        ];
        let f = frame(&disks, 9);
        let mut want = Vec::new();
        let mut n = 0;
        for (disk, e) in &disks {
            for b in wire::batches(&e.ops, MAX_RECORD_PAYLOAD) {
                let mut p = Vec::new();
                wire::encode(&mut p, *disk, b);
                write_record(&mut want, RecordKind::DiskWrites, 9, &p);
                n += 1;
            }
        }
        let mut got: Vec<u8> = f.slices(&disks).flatten().copied().collect();
        assert_eq!(f.records, n);
        assert!(n >= 3, "several records ({n})");
        assert_eq!(f.wire_bytes, want.len() as u64);
        // No CRC is computed: every record's field is 0, and with it
        // filled in the bytes are those of the copied records.
        let mut at = 0;
        while at < got.len() {
            assert_eq!(&got[at + 20..at + 24], &[0; 4], "a CRC at {at}");
            at +=
                HEADER_LEN + u32::from_le_bytes(got[at + 16..at + 20].try_into().unwrap()) as usize;
        }
        add_checksums(&mut got);
        assert!(got == want, "framed bytes differ from the copied records");
        // And a reader accepts them.
        let mut r = RecordReader::new(&got[..]);
        for _ in 0..n {
            let rec = r.next().unwrap();
            assert_eq!(rec.kind, RecordKind::DiskWrites);
        }
        // Large writes are borrowed, not copied.
        assert!(f.heads.len() < 200_000, "{} bytes copied", f.heads.len());
    }
}
