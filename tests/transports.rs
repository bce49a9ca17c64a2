//! The `uring` and `rdma` transports through the real binary: replicas
//! equal the primary over uring, mismatched transports are refused with a
//! reason on both ends, hostile ring traffic is rejected, and a build
//! without rdma says so (the rdma build runs in the lab: tests/lab_rdma.rs).

mod common;
use common::*;

use std::io::{BufRead, BufReader, Write};

use castor::transport::record::{write_record, RecordKind};
use castor::transport::slots::Announce;

/// True (reason printed) when castor reported that this kernel has no
/// usable io_uring; any other failure is left to the caller's asserts.
fn uring_missing(stderr: &str) -> bool {
    let missing =
        stderr.contains("io_uring is unavailable") || stderr.contains("does not support io_uring");
    if missing {
        eprintln!("SKIP: io_uring unavailable here: {}", stderr.trim());
    }
    missing
}

#[test]
fn uring_bench_replica_matches_primary() {
    if sim_unavailable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("run.json");
    let out = output_within(
        castor()
            .args([
                "bench",
                "--domain",
                "sim:mem=64MiB,workload=mixed,rate=50000,threads=2",
                "--duration",
                "2s",
                "--transport",
                "uring",
                "--json",
            ])
            .arg(&json),
        EXIT_PATIENCE,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && uring_missing(&err) {
        return;
    }
    assert!(out.status.success(), "bench over uring failed:\n{err}");
    let run: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(run["transport"], "uring");
    assert!(run["epochs"].as_u64().unwrap() > 5, "{run}");
    assert_eq!(run["digest_match"], true, "{run}");
    assert_eq!(run["replica_digest"], run["primary_digest"]);
    assert_eq!(run["replica_epoch"], run["acked_epoch"]);
}

/// Separate processes, deterministic domain: the replica equals a
/// from-scratch recomputation, and the stream (seed of 32 MiB, five times
/// the 6 MiB ring, plus 15 checkpoints) went round the ring many times.
#[test]
fn uring_protect_replica_equals_recomputation() {
    if sim_unavailable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = "sim:mem=32MiB,workload=incompressible,writes=500,seed=5,fill=1";
    let b = Backup::start_with(&dir.path().join("replica"), &["--transport", "uring"], KEY);
    let bdir = b.dir.clone();
    let out = output_within(
        castor().args([
            "protect",
            "--quiet",
            "--domain",
            spec,
            "--backup",
            &b.addr,
            "--arbiter",
            "none",
            "--epoch",
            "5ms",
            "--epochs",
            "15",
            "--transport",
            "uring",
        ]),
        EXIT_PATIENCE,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let (bst, berr) = b.wait();
    if !out.status.success() && (uring_missing(&err) || uring_missing(&berr)) {
        return;
    }
    assert!(
        out.status.success(),
        "protect over uring failed:\n{err}\nbackup:\n{berr}"
    );
    assert!(bst.success(), "backup: {berr}");
    let m = meta(&bdir).expect("replica saved");
    assert_eq!(m.epoch, 15);
    assert_eq!(m.digest, replica_digest(&bdir));
    assert_eq!(m.digest, expected_digest(spec, 15));
}

fn mismatch(backup_transport: &str, primary_transport: &str) {
    let dir = tempfile::tempdir().unwrap();
    let b = Backup::start_with(
        &dir.path().join("replica"),
        &["--transport", backup_transport],
        KEY,
    );
    let out = output_within(
        castor().args([
            "protect",
            "--quiet",
            "--domain",
            "sim:mem=4MiB,workload=uniform,writes=10",
            "--backup",
            &b.addr,
            "--arbiter",
            "none",
            "--epochs",
            "3",
            "--transport",
            primary_transport,
        ]),
        EXIT_PATIENCE,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let (bst, berr) = b.wait();
    if uring_missing(&err) || uring_missing(&berr) {
        return;
    }
    assert!(!out.status.success(), "primary accepted a mismatch:\n{err}");
    assert!(!bst.success(), "backup accepted a mismatch:\n{berr}");
    let want = format!("this backup runs --transport {backup_transport} but the primary");
    for (who, text) in [("primary", err.to_string()), ("backup", berr)] {
        assert!(
            text.contains(&want) && text.contains("start both with the same --transport"),
            "{who} did not explain the mismatch:\n{text}"
        );
    }
}

#[test]
fn tcp_primary_refused_by_uring_backup() {
    if sim_unavailable() {
        return;
    }
    mismatch("uring", "tcp");
}

#[test]
fn uring_primary_refused_by_tcp_backup() {
    if sim_unavailable() {
        return;
    }
    mismatch("tcp", "uring");
}

/// A fake primary sets up a uring session, then sends the records and
/// bytes `stream` makes from the backup's announcement: the first part
/// sealed with the session's keys, the second as it is; returns the
/// backup's stderr (None: io_uring unavailable here).
fn hostile_stream(stream: impl FnOnce(&Announce) -> (Vec<u8>, Vec<u8>)) -> Option<String> {
    let dir = tempfile::tempdir().unwrap();
    let b = Backup::start_with(&dir.path().join("replica"), &["--transport", "uring"], KEY);
    let mut s = common::fake::session(&b.addr, KEY).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut v = Vec::new();
    write_record(&mut v, RecordKind::Transport, 0, &[1]);
    s.write_all(&v).unwrap();
    let mut r = s.reader();
    let rec = r.next().unwrap();
    if rec.kind == RecordKind::Error {
        let msg = String::from_utf8_lossy(rec.payload).into_owned();
        drop(r);
        let (_, err) = b.wait();
        if uring_missing(&msg) || uring_missing(&err) {
            return None;
        }
        panic!("backup refused the uring session: {msg}");
    }
    assert_eq!(rec.kind, RecordKind::Slots);
    let ann = Announce::decode(rec.payload).expect("backup's announcement is valid");
    let (sealed, raw) = stream(&ann);
    // The backup may close before reading everything: ignore write errors.
    let _ = s.write_all(&sealed).and_then(|()| w.write_all(&raw));
    let (st, err) = b.wait();
    assert_eq!(
        st.code(),
        Some(2),
        "backup must report a broken stream:\n{err}"
    );
    assert!(meta(&dir.path().join("replica")).is_none());
    Some(err)
}

/// Bytes that are no record, landed in the ring: the backup's ring reader
/// refuses them in place (the session is authenticated, so any damage
/// reads as a forged record) and the session ends with no replica.
#[test]
fn garbage_in_the_uring_ring_is_refused() {
    let Some(err) = hostile_stream(|_| (Vec::new(), vec![0xAA; 4096])) else {
        return;
    };
    assert!(err.contains("failed authentication"), "{err}");
}

/// Genuine heartbeats up to a few KiB before the ring's end, then a
/// well-framed 1 MiB record whose tag is not the session's: the heartbeats
/// pass, the record lands across the ring's end (read through the mirror)
/// and is refused once whole, and the session ends with no replica.
#[test]
fn a_forged_record_across_the_uring_ring_is_refused() {
    let Some(err) = hostile_stream(|a| {
        let ring = a.slots as usize * a.slot_size as usize;
        let mut sealed = Vec::new();
        // 24 header + 16 tag bytes on the wire each.
        for _ in 0..(ring - 4096) / 40 {
            write_record(&mut sealed, RecordKind::Heartbeat, 0, &[]);
        }
        let mut raw = Vec::new();
        write_record(&mut raw, RecordKind::Pages, 1, &vec![0x33; 1 << 20]);
        raw.extend_from_slice(&[0; 16]);
        (sealed, raw)
    }) else {
        return;
    };
    // The heartbeats passed: the refused record is the one after them.
    let seq: u64 = err
        .split("record ")
        .find_map(|t| t.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no record number in: {err}"));
    assert!(
        seq > 157_000,
        "refused record {seq}, not the forged one: {err}"
    );
    assert!(err.contains("failed authentication"), "{err}");
}

/// `--transport rdma` from a build without the `rdma` feature fails at
/// start-up and says why. The rdma build itself (that it runs, and that it
/// names a missing device) is checked in the lab, where Soft-RoCE gives it
/// a device: tests/lab_rdma.rs.
#[test]
fn rdma_says_why_it_cannot_run() {
    let out = output_within(
        castor().args([
            "protect",
            "--domain",
            "sim:mem=4MiB,writes=1",
            "--backup",
            "127.0.0.1:1",
            "--arbiter",
            "none",
            "--epochs",
            "1",
            "--transport",
            "rdma",
        ]),
        EXIT_PATIENCE,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "rdma to 127.0.0.1:1 succeeded:\n{err}"
    );
    let want = if cfg!(feature = "rdma") {
        // No device, or 127.0.0.1 is not on one: either way it says so.
        "rdma"
    } else {
        "built without the `rdma` cargo feature"
    };
    assert!(err.contains(want), "{err}");
}

/// Failure detection works over uring too: a SIGSTOPped primary sends
/// nothing (not even credits' data), the backup's watchdog shuts the socket
/// under the pending io_uring read, and the backup ends "primary silent",
/// keeping the last complete checkpoint (a recomputable epoch).
#[test]
fn uring_backup_detects_a_stopped_primary() {
    if sim_unavailable() {
        return;
    }
    let spec = "sim:mem=16MiB,workload=mixed,writes=300,seed=21,threads=2";
    let dir = tempfile::tempdir().unwrap();
    let b = Backup::start_with(&dir.path().join("replica"), &["--transport", "uring"], KEY);
    let bdir = b.dir.clone();
    let mut p = Reaped::spawn(
        castor()
            .args([
                "protect",
                "--domain",
                spec,
                "--backup",
                &b.addr,
                "--epoch",
                "5ms",
                "--arbiter",
                "none",
                "--transport",
                "uring",
            ])
            .stderr(std::process::Stdio::piped()),
    );
    // The first progress line is the event that checkpoints flow; a
    // primary that fails first (no io_uring) ends its stderr instead.
    // Read on a thread (draining to the end) so neither can hang the test.
    let err = p.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = String::new();
        let mut lines = BufReader::new(err).lines();
        for line in lines.by_ref().map_while(Result::ok) {
            if line.contains("acked") {
                let _ = tx.send((true, seen));
                lines.for_each(drop);
                return;
            }
            seen.push_str(&line);
            seen.push('\n');
        }
        let _ = tx.send((false, seen));
    });
    let (flowing, seen) = rx
        .recv_timeout(START_PATIENCE)
        .unwrap_or_else(|_| panic!("protect neither acked nor ended within {START_PATIENCE:?}"));
    if !flowing && uring_missing(&seen) {
        return;
    }
    assert!(flowing, "protect ended without a progress line:\n{seen}");
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(
        unsafe { libc::kill(p.0.id() as libc::pid_t, libc::SIGSTOP) },
        0
    );
    let (st, berr) = b.wait();
    drop(p);
    assert_eq!(st.code(), Some(2), "{berr}");
    assert!(berr.contains("primary silent for"), "{berr}");
    let m = meta(&bdir).expect("replica saved");
    assert_eq!(m.digest, expected_digest(spec, m.epoch));
}
