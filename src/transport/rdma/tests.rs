//! A faulty peer on each side of a real rdma connection: chunks whose
//! immediate or length lie, and credits that repeat, skip or overflow.
//! They need an RDMA device, so they are ignored everywhere and run inside
//! the emulated lab (Soft-RoCE), started by tests/lab_rdma.rs
//! (`rdma_hostile_chunks_and_credits_are_refused`) with `--ignored`.

use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use super::sink::{primary_sink, RdmaSink};
use super::source::{backup_source, RdmaSource};
use crate::transport::link::{RecordSink, RecordSource};
use crate::transport::record::{write_record, RecordError, RecordKind, RecordReader};
use crate::transport::slots::{
    Announce, ChunkTag, Credit, SlotError, DEFAULT_SLOTS, DEFAULT_SLOT_SIZE,
};

/// A connected pair over the lab's RDMA address: the primary's sink (its
/// TCP return path kept alive alongside) and the backup's source.
fn pair() -> (RdmaSink, RdmaSource, TcpStream) {
    let ip = std::env::var("CASTOR_LAB_RDMA_ADDR").expect("inside the rdma lab");
    let l = TcpListener::bind((ip.as_str(), 0)).unwrap();
    let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (server, _) = l.accept().unwrap();
    let (tx, rx) = mpsc::channel();
    let backup = std::thread::spawn(move || {
        let ann = Announce::new(DEFAULT_SLOTS, DEFAULT_SLOT_SIZE).unwrap();
        backup_source(server, ann, None, |a: &Announce| tx.send(*a))
    });
    let full = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("backup announced its ring");
    let keep = client.try_clone().unwrap();
    let reader = RecordReader::new(client.try_clone().unwrap());
    let sink = primary_sink(reader, client, &full)
        .expect("primary connects")
        .0;
    let source = backup.join().unwrap().expect("backup accepts");
    (sink, source, keep)
}

fn heartbeat() -> Vec<u8> {
    let mut v = Vec::new();
    write_record(&mut v, RecordKind::Heartbeat, 0, &[]);
    v
}

#[test]
#[ignore = "needs an RDMA device: runs inside the rdma lab (tests/lab_rdma.rs)"]
fn inside_lab_a_chunk_into_another_slot_ends_the_session() {
    let (mut sink, mut source, _keep) = pair();
    // The stream is at slot 0; this chunk claims slot 3.
    let tag = ChunkTag { slot: 3, len: 64 };
    let at = 3 * DEFAULT_SLOT_SIZE as u64;
    sink.write_raw(tag.encode(), at, &[0xAB; 64]).unwrap();
    match source.next_record() {
        Err(RecordError::Slot(SlotError::WrongSlot { got: 3, want: 0 })) => {}
        other => panic!(
            "want WrongSlot {{ got: 3, want: 0 }}, got {:?}",
            other.map(|r| r.kind)
        ),
    }
}

#[test]
#[ignore = "needs an RDMA device: runs inside the rdma lab (tests/lab_rdma.rs)"]
fn inside_lab_a_chunk_shorter_than_its_tag_ends_the_session() {
    let (mut sink, mut source, _keep) = pair();
    let tag = ChunkTag { slot: 0, len: 64 };
    sink.write_raw(tag.encode(), 0, &[0xCD; 32]).unwrap();
    match source.next_record() {
        Err(e) => assert!(e.to_string().contains("carried 32 bytes"), "{e}"),
        Ok(r) => panic!("accepted a lying chunk as a {:?} record", r.kind),
    }
}

/// Sends `credit` from the backup, then keeps the primary writing small
/// records (each one chunk; the backup parses none, so no genuine credit
/// follows) until the hostile credit is read; returns the primary's error.
fn primary_error_after(credit: Credit) -> String {
    let (mut sink, mut source, _keep) = pair();
    source.link_mut().send_raw_credit(credit).unwrap();
    let rec = heartbeat();
    for _ in 0..1000 {
        if let Err(e) = sink.send(&[&rec]) {
            return e.to_string();
        }
    }
    panic!("the primary never noticed the credit {credit:?}");
}

#[test]
#[ignore = "needs an RDMA device: runs inside the rdma lab (tests/lab_rdma.rs)"]
fn inside_lab_hostile_credits_end_the_primary_session() {
    let gap = primary_error_after(Credit {
        first: 5,
        count: 1,
        chunks: 0,
    });
    assert!(gap.contains("skips slots"), "{gap}");
    let early = primary_error_after(Credit {
        first: 0,
        count: 1,
        chunks: 0,
    });
    assert!(early.contains("not yet completely sent"), "{early}");
    let chunks = primary_error_after(Credit {
        first: 0,
        count: 0,
        chunks: 1_000_000,
    });
    assert!(chunks.contains("1000000 chunks, but only"), "{chunks}");
}

/// A backup that stops taking records (it grants no credit and reads
/// nothing) fails the primary's send after the control connection's write
/// timeout (what a protection session sets to `--backup-timeout`), not
/// after the 30 s fallback.
#[test]
#[ignore = "needs an RDMA device: runs inside the rdma lab (tests/lab_rdma.rs)"]
fn inside_lab_a_stalled_backup_fails_the_send_at_the_sessions_deadline() {
    let (mut sink, _source, _keep) = pair();
    let deadline = Duration::from_secs(1);
    sink.connection()
        .expect("the rdma sink exposes its control connection")
        .set_write_timeout(Some(deadline))
        .unwrap();
    let rec = vec![0u8; 64 << 10];
    let t0 = std::time::Instant::now();
    let err = loop {
        if let Err(e) = sink.send(&[&rec]) {
            break e.to_string();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the primary kept sending into a backup that takes nothing"
        );
    };
    let waited = t0.elapsed();
    assert!(err.contains("stalled") && err.contains("1s"), "{err}");
    assert!(
        waited < Duration::from_secs(10),
        "failed only after {waited:?}"
    );
}
