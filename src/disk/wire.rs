//! Disk writes on the wire: the payload of a `DiskWrites` record.
//!
//! ```text
//! disk u16 · count u32 · count × op
//! op:  kind u8 · flags u8 (0) · offset u64 · len u32 · data [len] (Write only)
//! ```
//!
//! All integers little-endian. `disk` indexes the session's disk list;
//! kinds: 1 Write (`len` data bytes follow, `1..=MAX_OP_DATA`), 2 Zero and
//! 3 Trim (the range reads as zeros afterwards, `len >= 1`, no data), 4 Flush
//! (`offset = len = 0`: the epoch must be durable on the backup before it
//! is acknowledged). Every op's range must lie inside the disk.
//!
//! Invariant: [`parse`] accepts a payload only when every op in it is valid
//! and the payload ends exactly after the last op, so a receiver stages a
//! record whole or not at all.

use crate::transport::record::{Cursor, PayloadError};

pub const KIND_WRITE: u8 = 1;
pub const KIND_ZERO: u8 = 2;
pub const KIND_TRIM: u8 = 3;
pub const KIND_FLUSH: u8 = 4;

/// Bytes of an op before its data.
pub const OP_HEADER: usize = 14;
/// Bytes of a payload before its first op.
pub const PAYLOAD_HEADER: usize = 6;
/// Largest data of one Write op; longer guest writes are split.
pub const MAX_OP_DATA: usize = 1 << 20;

/// One guest disk operation, as logged on the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskOp {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u32 },
    Trim { offset: u64, len: u32 },
    Flush,
}

impl DiskOp {
    /// Bytes this op takes in a payload.
    pub fn wire_len(&self) -> usize {
        OP_HEADER
            + match self {
                DiskOp::Write { data, .. } => data.len(),
                _ => 0,
            }
    }
}

/// A validated op borrowed from a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpRef<'a> {
    Write { offset: u64, data: &'a [u8] },
    Zero { offset: u64, len: u64 },
    Flush,
}

#[derive(Debug, thiserror::Error)]
pub enum DiskWireError {
    #[error("disk record: {0}")]
    Payload(#[from] PayloadError),
    #[error("disk record names disk {disk}, but the session has {disks} disk(s)")]
    Disk { disk: u16, disks: usize },
    #[error("disk {disk} op {index}: {reason}")]
    Op {
        disk: u16,
        index: u32,
        reason: String,
    },
}

/// Appends one payload holding `ops` for disk `disk` to `out`.
pub fn encode(out: &mut Vec<u8>, disk: u16, ops: &[DiskOp]) {
    out.extend_from_slice(&disk.to_le_bytes());
    out.extend_from_slice(&(ops.len() as u32).to_le_bytes());
    for op in ops {
        encode_op_header(out, op);
        if let DiskOp::Write { data, .. } = op {
            out.extend_from_slice(data);
        }
    }
}

/// Appends the [`OP_HEADER`] bytes of `op` (a write's data follows them).
pub fn encode_op_header(out: &mut Vec<u8>, op: &DiskOp) {
    let (kind, offset, len) = match op {
        DiskOp::Write { offset, data } => (KIND_WRITE, *offset, data.len() as u32),
        DiskOp::Zero { offset, len } => (KIND_ZERO, *offset, *len),
        DiskOp::Trim { offset, len } => (KIND_TRIM, *offset, *len),
        DiskOp::Flush => (KIND_FLUSH, 0, 0),
    };
    out.push(kind);
    out.push(0);
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
}

/// Splits `ops` into runs whose payloads fit in `max_payload` bytes (an op
/// alone always forms a run; callers keep ops at most `MAX_OP_DATA`).
pub fn batches(ops: &[DiskOp], max_payload: usize) -> Vec<&[DiskOp]> {
    let mut out = Vec::new();
    let (mut start, mut size) = (0, PAYLOAD_HEADER);
    for (i, op) in ops.iter().enumerate() {
        if i > start && size + op.wire_len() > max_payload {
            out.push(&ops[start..i]);
            (start, size) = (i, PAYLOAD_HEADER);
        }
        size += op.wire_len();
    }
    if start < ops.len() {
        out.push(&ops[start..]);
    }
    out
}

/// Parses and validates a whole payload against the session's disk sizes.
pub fn parse<'a>(payload: &'a [u8], sizes: &[u64]) -> Result<(u16, Vec<OpRef<'a>>), DiskWireError> {
    let mut c = Cursor::new(payload, "disk writes");
    let disk = c.u16()?;
    let size = *sizes.get(disk as usize).ok_or(DiskWireError::Disk {
        disk,
        disks: sizes.len(),
    })?;
    let count = c.u32()?;
    if count as usize > c.remaining() / OP_HEADER {
        return Err(c
            .err(format!("{count} ops cannot fit in {} bytes", c.remaining()))
            .into());
    }
    let mut ops = Vec::with_capacity(count as usize);
    for index in 0..count {
        let bad = |reason: String| DiskWireError::Op {
            disk,
            index,
            reason,
        };
        let kind = c.u8()?;
        let flags = c.u8()?;
        let offset = c.u64()?;
        let len = c.u32()? as u64;
        if flags != 0 {
            return Err(bad(format!("flags {flags:#x}, must be 0")));
        }
        let in_disk = offset.checked_add(len).is_some_and(|end| end <= size);
        let op = match kind {
            KIND_FLUSH if offset == 0 && len == 0 => OpRef::Flush,
            KIND_FLUSH => return Err(bad(format!("flush with range {offset}+{len}"))),
            _ if len == 0 => return Err(bad(format!("kind {kind} with length 0"))),
            KIND_WRITE | KIND_ZERO | KIND_TRIM if !in_disk => {
                return Err(bad(format!(
                    "range {offset}+{len} runs past the disk's {size} bytes"
                )))
            }
            KIND_WRITE if len as usize > MAX_OP_DATA => {
                return Err(bad(format!("write of {len} bytes, limit {MAX_OP_DATA}")))
            }
            KIND_WRITE => OpRef::Write {
                offset,
                data: c.bytes(len as usize)?,
            },
            KIND_ZERO | KIND_TRIM => OpRef::Zero { offset, len },
            other => return Err(bad(format!("unknown kind {other}"))),
        };
        ops.push(op);
    }
    c.finish()?;
    Ok((disk, ops))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<DiskOp> {
        vec![
            DiskOp::Write {
                offset: 512,
                data: vec![5; 1000],
            },
            DiskOp::Zero {
                offset: 0,
                len: 4096,
            },
            DiskOp::Trim {
                offset: 8192,
                len: 100,
            },
            DiskOp::Flush,
        ]
    }

    #[test]
    fn round_trip() {
        let mut p = Vec::new();
        encode(&mut p, 1, &sample());
        assert_eq!(p.len(), PAYLOAD_HEADER + 4 * OP_HEADER + 1000);
        let (disk, ops) = parse(&p, &[10, 1 << 20]).unwrap();
        assert_eq!(disk, 1);
        assert_eq!(
            ops,
            vec![
                OpRef::Write {
                    offset: 512,
                    data: &[5; 1000]
                },
                OpRef::Zero {
                    offset: 0,
                    len: 4096
                },
                OpRef::Zero {
                    offset: 8192,
                    len: 100
                },
                OpRef::Flush
            ]
        );
    }

    #[test]
    fn hostile_payloads_are_rejected_whole() {
        let sizes = [1u64 << 20];
        let enc = |ops: &[DiskOp]| {
            let mut p = Vec::new();
            encode(&mut p, 0, ops);
            p
        };
        let w = |offset, n| DiskOp::Write {
            offset,
            data: vec![1; n],
        };
        // Past the end, overflowing, empty, unknown disk.
        for (p, what) in [
            (enc(&[w((1 << 20) - 10, 11)]), "past the disk"),
            (
                enc(&[DiskOp::Zero {
                    offset: u64::MAX,
                    len: 2,
                }]),
                "past the disk",
            ),
            (enc(&[DiskOp::Trim { offset: 0, len: 0 }]), "length 0"),
        ] {
            let e = parse(&p, &sizes).unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        }
        let mut p = enc(&[w(0, 8)]);
        assert!(matches!(
            parse(&p, &[]),
            Err(DiskWireError::Disk { disk: 0, .. })
        ));
        // Flags, kind, flush with a range.
        p[PAYLOAD_HEADER + 1] = 1;
        assert!(parse(&p, &sizes).unwrap_err().to_string().contains("flags"));
        p[PAYLOAD_HEADER + 1] = 0;
        p[PAYLOAD_HEADER] = 9;
        assert!(parse(&p, &sizes)
            .unwrap_err()
            .to_string()
            .contains("unknown kind 9"));
        p[PAYLOAD_HEADER] = KIND_FLUSH;
        assert!(parse(&p, &sizes)
            .unwrap_err()
            .to_string()
            .contains("flush with range"));
        // Truncated data, trailing bytes, an absurd count.
        let good = enc(&[w(0, 8)]);
        assert!(parse(&good[..good.len() - 1], &sizes).is_err());
        let mut long = good.clone();
        long.push(0);
        assert!(parse(&long, &sizes).is_err());
        let mut many = good.clone();
        many[2..6].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse(&many, &sizes)
            .unwrap_err()
            .to_string()
            .contains("cannot fit"));
        // A write over the op limit, even inside the disk.
        let big = enc(&[w(0, MAX_OP_DATA + 1)]);
        assert!(parse(&big, &[1 << 30])
            .unwrap_err()
            .to_string()
            .contains("limit"));
    }

    #[test]
    fn batches_respect_the_payload_bound() {
        let ops: Vec<DiskOp> = (0..10)
            .map(|i| DiskOp::Write {
                offset: i * 4096,
                data: vec![0; 4096],
            })
            .collect();
        let max = PAYLOAD_HEADER + 3 * (OP_HEADER + 4096);
        let b = batches(&ops, max);
        assert_eq!(
            b.iter().map(|b| b.len()).collect::<Vec<_>>(),
            vec![3, 3, 3, 1]
        );
        assert_eq!(batches(&[], max).len(), 0);
    }
}

/// Builders shared by the tests of the records' readers (staging, redo log).
#[cfg(test)]
pub(crate) mod testing {
    use super::{encode, DiskOp};

    /// One `DiskWrites` payload of `ops` on disk `disk`.
    pub fn payload(disk: u16, ops: &[DiskOp]) -> Vec<u8> {
        let mut p = Vec::new();
        encode(&mut p, disk, ops);
        p
    }

    /// A write of `n` bytes `b` at `offset`.
    pub fn w(offset: u64, b: u8, n: usize) -> DiskOp {
        DiskOp::Write {
            offset,
            data: vec![b; n],
        }
    }
}
