//! SIGKILL of the primary at random moments: the backup must save exactly
//! the last complete checkpoint, never a torn one. In deterministic mode the
//! memory after epoch E is a pure function of (spec, E), so the saved
//! replica is checked against an independent recomputation.

mod common;
use common::trials::Trials;
use common::*;

use std::time::Duration;

#[test]
fn sigkill_of_primary_leaves_last_complete_epoch() {
    if sim_unavailable() {
        return;
    }
    let mut trials = Trials::seeded("kill trials");
    // Large epochs (many incompressible pages) make "during sending" likely;
    // small ones make "between epochs" likely. Alternate.
    let specs = [
        "sim:mem=32MiB,workload=incompressible,writes=3000,seed=5",
        "sim:mem=16MiB,workload=mixed,writes=400,seed=9,threads=2",
    ];
    let mut committed = Vec::new();
    for trial in 0..6 {
        let spec = specs[trial % specs.len()];
        let dir = tempfile::tempdir().unwrap();
        let b = Backup::start(&dir.path().join("replica"));
        let bdir = b.dir.clone();
        // The primary's progress line is the event that tells us epochs are
        // flowing; we then kill after a random extra delay (the random
        // moment is the point of the test, not a synchronisation).
        let p = protect_flowing_with(spec, &b.addr, "5ms", &["--arbiter", &pair_lock(dir.path())]);
        let extra = trials.below(400);
        std::thread::sleep(Duration::from_millis(extra));
        drop(p); // SIGKILL
        let (st, err) = b.wait();
        assert_eq!(
            st.code(),
            Some(2),
            "backup should report a broken stream:\n{err}"
        );
        let m = meta(&bdir).unwrap_or_else(|| panic!("trial {trial}: nothing saved:\n{err}"));
        let torn = err.contains("was incomplete and has been discarded");
        eprintln!(
            "trial {trial}: killed {extra} ms after first progress line; replica at epoch {}{}",
            m.epoch,
            if torn {
                " (a torn epoch was discarded)"
            } else {
                ""
            }
        );
        assert_eq!(
            m.digest,
            replica_digest(&bdir),
            "trial {trial}: files disagree with meta"
        );
        assert_eq!(
            m.digest,
            expected_digest(spec, m.epoch),
            "trial {trial}: replica is not the state after epoch {}",
            m.epoch
        );
        committed.push(m.epoch);
    }
    assert!(committed.iter().all(|&e| e >= 1));
}

/// The seed's last round is read from live memory by the encoders. Unless it
/// is read before epoch 1 ends, pages that epoch 2 rewrites reach the backup
/// with their epoch-2 content inside the seed, and checkpoint 1 (which only
/// carries epoch 1's dirty pages) does not correct them: the replica of
/// epoch 1 would not be the state after epoch 1. Slow encoding (one worker,
/// zstd at a high level, incompressible pages) keeps the last round in the
/// encoder past epoch 1's resume, and the first progress line acknowledging
/// an epoch comes while epoch 2 is still being encoded.
#[test]
fn sigkill_right_after_epoch_one_leaves_epoch_one() {
    if sim_unavailable() {
        return;
    }
    let spec = "sim:mem=16MiB,workload=incompressible,writes=3000,seed=5";
    let slow = ["--workers", "1", "--compress", "zstd:12"];
    // The kill lands on epoch 1 in about half the trials (else on 2).
    for trial in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let b = Backup::start(&dir.path().join("replica"));
        let bdir = b.dir.clone();
        let p = protect_flowing_with(spec, &b.addr, "5ms", &slow);
        drop(p); // SIGKILL
        let (st, err) = b.wait();
        assert_eq!(
            st.code(),
            Some(2),
            "backup should report a broken stream:\n{err}"
        );
        let m = meta(&bdir).unwrap_or_else(|| panic!("trial {trial}: nothing saved:\n{err}"));
        eprintln!("trial {trial}: replica at epoch {}", m.epoch);
        assert_eq!(
            m.digest,
            expected_digest(spec, m.epoch),
            "trial {trial}: replica is not the state after epoch {}",
            m.epoch
        );
    }
}
