use super::*;
use crate::disk::wire::{self, OpRef};
use crate::transport::record::{add_checksums, write_record, RecordReader};
use proptest::prelude::*;

/// Applies ops, in order, to an in-memory disk.
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

/// The records' bytes, with the CRCs filled in.
fn wire_bytes(e: &EpochOps) -> Vec<u8> {
    let mut got: Vec<u8> = e.slices().flatten().copied().collect();
    let mut at = 0;
    while at < got.len() {
        assert_eq!(&got[at + 20..at + 24], &[0; 4], "a CRC at {at}");
        at += HEADER_LEN + u32::from_le_bytes(got[at + 16..at + 20].try_into().unwrap()) as usize;
    }
    add_checksums(&mut got);
    got
}

#[derive(Debug, Clone)]
enum In {
    W(u64, usize, u8),
    Z(u64, u32, bool),
    F,
}

const DISK: u64 = 1 << 19;

fn input() -> impl Strategy<Value = In> {
    prop_oneof![
        // Block-aligned 4 KiB writes (rewrites in place happen), any
        // small writes, large ones (their own buffers).
        4 => (0..DISK / 4096, 1u8..=255).prop_map(|(b, v)| In::W(b * 4096, 4096, v)),
        3 => (0..DISK - 1, 1usize..9000, 1u8..=255)
            .prop_map(|(o, n, b)| In::W(o, n.min((DISK - o) as usize), b)),
        1 => (0..4u64, 1u8..=255).prop_map(|(k, b)| In::W(k * 65536, 65536 + (k as usize) * 512, b)),
        1 => (0..DISK - 1, 1u32..20_000, any::<bool>())
            .prop_map(|(o, n, t)| In::Z(o, n.min((DISK - o) as u32), t)),
        1 => Just(In::F),
    ]
}

proptest! {
    #[test]
    fn the_records_have_the_net_effect_of_the_writes_in_order(
        ins in proptest::collection::vec(input(), 1..400),
    ) {
        let base: Vec<u8> = (0..DISK as usize).map(|i| (i % 251) as u8 + 1).collect();
        let (mut direct, mut via) = (base.clone(), base);
        let mut e = EpochOps::new(7);
        let mut flushed = false;
        for (n, i) in ins.iter().enumerate() {
            // Each write gets its own byte pattern so a stale copy shows.
            let op = match *i {
                In::W(o, len, b) => {
                    let data: Vec<u8> = (0..len).map(|k| b ^ (k as u8) ^ (n as u8)).collect();
                    // Copied or handed over: the same net effect.
                    if len >= pool::MIN_POOLED && n % 2 == 1 {
                        e.write_owned(o, data.clone());
                    } else {
                        e.write(o, &data);
                    }
                    DiskOp::Write { offset: o, data }
                }
                In::Z(o, len, t) => {
                    e.zero(o, len, t);
                    DiskOp::Zero { offset: o, len }
                }
                In::F => {
                    e.flush();
                    flushed = true;
                    DiskOp::Flush
                }
            };
            apply(&mut direct, std::slice::from_ref(&op));
        }
        let bytes = e.bytes();
        e.close();
        e.retag(9, 2);
        let ops = e.ops();
        prop_assert_eq!(bytes, ops.iter().map(|o| o.wire_len()).sum::<usize>());
        prop_assert_eq!(e.op_count(), ops.len() as u64);
        prop_assert_eq!(flushed, ops.last() == Some(&DiskOp::Flush));
        prop_assert_eq!(ops.iter().filter(|o| **o == DiskOp::Flush).count(), flushed as usize);
        apply(&mut via, &ops);
        prop_assert!(direct == via, "the records' ops differ from the writes in order");
        // Every payload is valid for the backup, within the bound, and the
        // bytes are exactly those of the encoded records.
        let sizes = [0, 0, DISK];
        let mut want = Vec::new();
        for p in e.payloads() {
            prop_assert!(p.len() <= MAX_RECORD_PAYLOAD);
            let (disk, parsed) = wire::parse(&p, &sizes).unwrap();
            prop_assert_eq!(disk, 2);
            prop_assert!(!parsed.is_empty());
            write_record(&mut want, RecordKind::DiskWrites, 9, &p);
        }
        let got = wire_bytes(&e);
        prop_assert_eq!(e.wire_bytes(), got.len() as u64);
        prop_assert!(got == want, "record bytes differ from the encoded payloads");
        let mut r = RecordReader::new(&got[..]);
        for _ in 0..e.records() {
            let rec = r.next().unwrap();
            prop_assert_eq!((rec.kind, rec.epoch), (RecordKind::DiskWrites, 9));
        }
    }
}

#[test]
fn a_range_rewritten_whole_travels_once_unless_something_overlapped_it_since() {
    let mut e = EpochOps::new(1);
    for b in 1..=10u8 {
        e.write(4096, &[b; 4096]);
    }
    assert_eq!(e.bytes(), OP_HEADER + 4096, "rewritten in place");
    // A later write inside the range: the next rewrite may not move
    // before it, so it is appended.
    e.write(4096 + 100, &[11; 10]);
    e.write(4096, &[12; 4096]);
    // A write elsewhere does not stop a rewrite in place.
    e.write(1 << 20, &[13; 4096]);
    e.write(4096, &[14; 4096]);
    e.close();
    assert_eq!(
        e.ops(),
        vec![
            DiskOp::Write {
                offset: 4096,
                data: vec![10; 4096]
            },
            DiskOp::Write {
                offset: 4196,
                data: vec![11; 10]
            },
            DiskOp::Write {
                offset: 4096,
                data: vec![14; 4096]
            },
            DiskOp::Write {
                offset: 1 << 20,
                data: vec![13; 4096]
            },
        ]
    );
    // A zero in between: appended, never moved before it.
    let mut e = EpochOps::new(1);
    e.write(0, &[1; 4096]);
    e.zero(0, 4096, false);
    e.write(0, &[2; 4096]);
    e.close();
    assert_eq!(e.op_count(), 3);
    let mut disk = vec![9u8; 8192];
    apply(&mut disk, &e.ops());
    assert_eq!(&disk[..4096], &[2; 4096]);
}

#[test]
fn large_writes_are_sent_from_their_own_buffers() {
    let mut e = EpochOps::new(3);
    let big = vec![5u8; 1 << 20];
    let ptr = big.as_ptr();
    e.write(0, &[1; 4096]);
    e.write_owned(8192, big);
    e.write(4096, &[2; 4096]);
    e.flush();
    e.close();
    let pieces: Vec<&[u8]> = e.slices().collect();
    assert!(
        pieces
            .iter()
            .any(|p| p.as_ptr() == ptr && p.len() == 1 << 20),
        "the 1 MiB write is a piece of its own, not copied"
    );
    // A record holds at most 1 MiB + 4 KiB of payload: the 1 MiB write
    // has one of its own between the two 4 KiB ones.
    assert_eq!(e.records(), 3);
    let ops = e.ops();
    assert_eq!(ops.len(), 4);
    assert_eq!(ops.last(), Some(&DiskOp::Flush), "the flush goes last");
    let sizes = [1 << 21];
    for p in e.payloads() {
        let (_, parsed) = wire::parse(&p, &sizes).unwrap();
        assert!(parsed.iter().all(|o| !matches!(o, OpRef::Zero { .. })));
    }
}
