//! The rdma transport for real: castor built with `--features rdma` runs in
//! the emulated lab (tools/lab, QEMU with Debian's kernel), over a Soft-RoCE
//! device (rdma_rxe on a dummy netdev). Primary and backup are separate
//! processes inside the guest (tests/lab/rdma-pair.sh); the guest saves
//! what each trial produced into a shared directory and the checks are
//! made here. Skips only when qemu-system-x86_64 is missing.

mod common;
use common::lab::{lab_run, lab_unavailable, out_file, rdma_castor, rdma_unit_tests};
use common::trials::Trials;
use common::{Backup, Meta, KEY};

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use castor::transport::record::{write_record, RecordKind};

/// One trial's results: (primary exit, backup exit, backup stderr).
fn trial(dir: &Path) -> (String, String, String) {
    (
        out_file(dir, "primary.rc"),
        out_file(dir, "backup.rc"),
        out_file(dir, "backup.err"),
    )
}

/// The saved replica is whole and equals the recomputed state at its epoch.
fn assert_replica_recomputed(dir: &Path, what: &str) -> u64 {
    let err = out_file(dir, "backup.err");
    let meta: Meta = serde_json::from_str(&out_file(dir, "meta.json"))
        .unwrap_or_else(|e| panic!("{what}: no replica saved ({e}):\n{err}"));
    let first = |f: &str| {
        out_file(dir, f)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        first("replica.digest"),
        meta.digest,
        "{what}: files disagree with meta.json"
    );
    assert_eq!(
        first("expected.digest"),
        meta.digest,
        "{what}: replica is not the state after epoch {}",
        meta.epoch
    );
    meta.epoch
}

/// Separate processes over rdma: 15 epochs of a domain whose seed (32 MiB,
/// incompressible) is twice the 16 MiB receive ring, so the stream needed
/// rounds of credits; the replica equals a from-scratch recomputation.
#[test]
fn rdma_protect_replica_equals_recomputation() {
    if lab_unavailable() {
        return;
    }
    let castor = rdma_castor().to_str().unwrap().to_string();
    let out = tempfile::tempdir().unwrap();
    let spec = "sim:mem=32MiB,workload=incompressible,writes=500,seed=5,fill=1";
    let res = lab_run(
        &["--rdma", "--castor", &castor, "--timeout", "600"],
        out.path(),
        &["tests/lab/rdma-pair.sh", "rdma", "rdma", spec, "15"],
    );
    let d = out.path().join("0");
    let (prc, brc, berr) = trial(&d);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_eq!(prc, "0", "primary failed:\n{}", out_file(&d, "primary.err"));
    assert_eq!(brc, "0", "backup failed:\n{berr}");
    assert_eq!(assert_replica_recomputed(&d, "rdma protect"), 15);
}

/// `castor bench --transport rdma` in the lab: the bench picks the RDMA
/// device's address from CASTOR_BENCH_ADDR (set by the lab), and its
/// replica equals the primary at the last acknowledged epoch.
#[test]
fn rdma_bench_replica_matches_primary() {
    if lab_unavailable() {
        return;
    }
    let castor = rdma_castor().to_str().unwrap().to_string();
    let out = tempfile::tempdir().unwrap();
    let res = lab_run(
        &["--rdma", "--castor", &castor, "--timeout", "600"],
        out.path(),
        &[
            "sh",
            "-c",
            "castor bench --transport rdma --domain sim:mem=32MiB,workload=edits,rate=20000 \
             --duration 3s --backup-timeout 10s --json $LAB_OUT/run.json",
        ],
    );
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    let run: serde_json::Value =
        serde_json::from_str(&out_file(out.path(), "run.json")).expect("bench wrote its JSON");
    assert_eq!(run["transport"], "rdma");
    // Emulated and shared: a few seconds may hold only one or two epochs.
    assert!(run["epochs"].as_u64().unwrap() >= 1, "{run}");
    assert_eq!(run["digest_match"], true, "{run}");
    assert_eq!(run["replica_digest"], run["primary_digest"]);
    assert_eq!(run["replica_epoch"], run["acked_epoch"]);
}

/// SIGKILL of the primary at random moments (after checkpoints flow): the
/// backup reports a broken stream and saves exactly the last complete
/// checkpoint, never a torn one (tests/kill.rs does the same over tcp).
#[test]
fn rdma_sigkill_of_primary_leaves_last_complete_epoch() {
    if lab_unavailable() {
        return;
    }
    let castor = rdma_castor().to_str().unwrap().to_string();
    let mut trials = Trials::seeded("kill trials");
    let delays: Vec<String> = (0..3).map(|_| trials.below(400).to_string()).collect();
    let out = tempfile::tempdir().unwrap();
    let spec = "sim:mem=32MiB,workload=incompressible,writes=3000,seed=5";
    // Kill from the first acknowledged checkpoint on: the window right
    // after the seed (the backup holds epoch 1) is the widest here, as the
    // lab's seed is slow.
    let mut cmd = vec![
        "env",
        "KILL_AFTER_ACKED=1",
        "tests/lab/rdma-pair.sh",
        "rdma",
        "rdma",
        spec,
        "0",
    ];
    cmd.extend(delays.iter().map(String::as_str));
    let res = lab_run(
        &["--rdma", "--castor", &castor, "--timeout", "600"],
        out.path(),
        &cmd,
    );
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    for (n, ms) in delays.iter().enumerate() {
        let d = out.path().join(n.to_string());
        let (_, brc, berr) = trial(&d);
        let perr = out_file(&d, "primary.err");
        assert!(
            !perr.contains("no progress line"),
            "trial {n}: primary never flowed:\n{perr}"
        );
        assert_eq!(
            brc, "2",
            "trial {n}: backup should report a broken stream:\n{berr}"
        );
        let epoch = assert_replica_recomputed(&d, &format!("trial {n}"));
        eprintln!(
            "trial {n}: killed {ms} ms after the first progress line; replica at epoch {epoch}"
        );
        assert!(epoch >= 1, "trial {n}");
    }
}

/// A tcp backup refuses an rdma primary and an rdma backup a tcp primary,
/// each end saying why; and with no RDMA device (rxe0 deleted) the rdma
/// build says so at start-up (on a plain host tests/transports.rs checks
/// the message of a build without the feature).
#[test]
fn rdma_mismatch_refused_and_missing_device_explained() {
    if lab_unavailable() {
        return;
    }
    let castor = rdma_castor().to_str().unwrap().to_string();
    let out = tempfile::tempdir().unwrap();
    let spec = "sim:mem=4MiB,workload=uniform,writes=10";
    let script = format!(
        "LAB_OUT=$LAB_OUT/a tests/lab/rdma-pair.sh tcp rdma {spec} 3 && \
         LAB_OUT=$LAB_OUT/b tests/lab/rdma-pair.sh rdma tcp {spec} 3 && \
         rdma link delete rxe0 && \
         {{ CASTOR_PSK=lab-integration-key-0123456789 castor protect --domain {spec} \
            --backup 10.9.0.1:1 --arbiter none --epochs 1 \
            --transport rdma 2>$LAB_OUT/nodev.err; echo $? >$LAB_OUT/nodev.rc; }}"
    );
    let res = lab_run(
        &["--rdma", "--castor", &castor, "--timeout", "600"],
        out.path(),
        &["sh", "-c", &script],
    );
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    for (sub, backup_t) in [("a/0", "tcp"), ("b/0", "rdma")] {
        let d = out.path().join(sub);
        let (prc, brc, berr) = trial(&d);
        let perr = out_file(&d, "primary.err");
        assert_ne!(prc, "0", "primary accepted a mismatch:\n{perr}");
        assert_ne!(brc, "0", "backup accepted a mismatch:\n{berr}");
        let want = format!("this backup runs --transport {backup_t} but the primary");
        for (who, text) in [("primary", &perr), ("backup", &berr)] {
            assert!(
                text.contains(&want) && text.contains("start both with the same --transport"),
                "{who} did not explain the mismatch:\n{text}"
            );
        }
    }
    assert_ne!(out_file(out.path(), "nodev.rc"), "0");
    let err = out_file(out.path(), "nodev.err");
    assert!(
        err.contains("no RDMA device found (ibv_get_device_list returned 0 devices); use --transport uring or tcp"),
        "{err}"
    );
}

/// Runs this test binary's ignored test `name` inside the rdma lab (the
/// binary is under target/, which the lab shares at the same path), with
/// the rdma build as `castor` on PATH; asserts it passed.
fn run_inside(name: &str) {
    let castor = rdma_castor().to_str().unwrap().to_string();
    let exe = std::env::current_exe().unwrap();
    let out = tempfile::tempdir().unwrap();
    let res = lab_run(
        &["--rdma", "--castor", &castor, "--timeout", "600"],
        out.path(),
        &[
            exe.to_str().unwrap(),
            "--ignored",
            "--exact",
            name,
            "--nocapture",
        ],
    );
    assert!(
        res.status.success(),
        "{name} failed in the lab:\n{}\n{}",
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(stdout.contains("1 passed"), "{name} did not run:\n{stdout}");
}

/// A faulty peer on each side of a real rdma connection, over Soft-RoCE:
/// a chunk whose immediate names another slot, a chunk shorter than its
/// tag, and credits that skip slots, release a slot not yet sent or return
/// chunks never written each end the session with the error that names
/// them; a backup that takes nothing fails the primary's send at the
/// session's deadline (src/transport/rdma/tests.rs; they need the crate's
/// internals, so they are the library's unit tests built with `rdma`, run
/// in the lab).
#[test]
fn rdma_hostile_chunks_and_credits_are_refused() {
    if lab_unavailable() {
        return;
    }
    let castor = rdma_castor().to_str().unwrap().to_string();
    let unit = rdma_unit_tests().to_str().unwrap().to_string();
    let out = tempfile::tempdir().unwrap();
    let res = lab_run(
        &["--rdma", "--castor", &castor, "--timeout", "600"],
        out.path(),
        &[
            &unit,
            "--ignored",
            "--test-threads=1",
            "transport::rdma::tests::inside_lab_",
        ],
    );
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(
        stdout.contains("4 passed"),
        "the faulty peers did not all run:\n{stdout}"
    );
}

/// A backup whose primary agreed on rdma, read the ring's announcement and
/// then never connects over rdma_cm gives up with a clear error instead of
/// waiting for CONNECT_REQUEST forever.
#[test]
fn rdma_backup_gives_up_on_a_primary_that_never_connects() {
    if lab_unavailable() {
        return;
    }
    run_inside("inside_lab_backup_gives_up_on_a_primary_that_never_connects");
}

/// The inside half of the test above: runs in the lab only (ignored
/// elsewhere; `run_inside` starts it with --ignored).
#[test]
#[ignore = "runs inside the rdma lab, started by rdma_backup_gives_up_on_a_primary_that_never_connects"]
fn inside_lab_backup_gives_up_on_a_primary_that_never_connects() {
    let ip = std::env::var("CASTOR_LAB_RDMA_ADDR").expect("inside the rdma lab");
    let dir = tempfile::tempdir().unwrap();
    let b = Backup::start_at(
        Command::new("castor"),
        &format!("{ip}:0"),
        &dir.path().join("replica"),
        &["--transport", "rdma", "--heartbeat-timeout", "120s"],
        KEY,
    );
    let mut s = common::fake::session(&b.addr, KEY).unwrap();
    let w = s.try_clone().unwrap();
    let mut v = Vec::new();
    write_record(&mut v, RecordKind::Transport, 0, &[2]); // rdma
    s.write_all(&v).unwrap();
    let mut r = s.reader();
    let rec = r.next().unwrap();
    assert_eq!(
        rec.kind,
        RecordKind::Slots,
        "backup did not announce its ring"
    );
    // The TCP session stays open (r and w live); no rdma_connect follows.
    let t0 = Instant::now();
    let (st, err) = b.wait();
    eprintln!("backup ended after {:?}", t0.elapsed());
    assert!(!st.success(), "{err}");
    assert!(
        err.contains("rdma_cm: no CONNECT_REQUEST event within"),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(100), "{err}");
    drop((r, w));
}
