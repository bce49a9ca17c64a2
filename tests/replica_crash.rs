//! SIGKILL of the backup at random moments while it saves its replica: the
//! state directory must hold the old or the new complete replica, never
//! neither and never a mix (see `engine::replica`). The save starts when
//! the backup reports the stream ended; each trial kills it a random time
//! into the save window measured on an uninterrupted save.

mod common;
use common::lines::Lines;
use common::trials::Trials;
use common::*;

use std::path::Path;
use std::time::{Duration, Instant};

const SPEC: &str = "sim:mem=32MiB,workload=incompressible,writes=2000,seed=3";

/// Runs one session of `epochs` epochs into `dir`; returns the backup
/// (still running, now saving) and its stderr, once "stream ended" is seen.
fn session(dir: &Path, epochs: u64) -> (Backup, Lines) {
    // Generous liveness timeouts (the test is about saving) and an
    // arbiter of its own (the default lock is machine-wide).
    let mut b = Backup::start_with(dir, &["--heartbeat-timeout", "10s"], KEY);
    let lines = Lines::watch(b.child.stderr.take().unwrap());
    let lock = pair_lock(dir.parent().unwrap());
    let st = Reaped::spawn(
        castor()
            .args(["protect", "--quiet", "--domain", SPEC, "--backup", &b.addr])
            .args(["--epoch", "5ms", "--epochs", &epochs.to_string()])
            .args(["--arbiter", &lock, "--backup-timeout", "10s"]),
    )
    .wait_within(EXIT_PATIENCE);
    assert!(st.success(), "protect failed:\n{}", lines.text());
    lines.wait_for("stream ended", Duration::from_secs(30));
    (b, lines)
}

/// Names in `dir` other than `current` and the version it points to:
/// what interrupted saves left (a kill inside a save adds one).
fn leftovers(dir: &Path) -> usize {
    let cur = std::fs::read_link(dir.join("current")).ok();
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            let n = e.as_ref().unwrap().file_name();
            n != "current" && Some(Path::new(&n)) != cur.as_deref()
        })
        .count()
}

#[test]
fn sigkill_of_backup_while_saving_leaves_old_or_new_replica() {
    if sim_unavailable() {
        return;
    }
    let mut rng = Trials::seeded("backup kill trials");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("replica");

    // Trial 0: an uninterrupted save, timed from "stream ended" to its end.
    let (mut b, lines) = session(&dir, 3);
    let t0 = Instant::now();
    lines.wait_for("replica holds epoch 3", Duration::from_secs(60));
    let window = t0.elapsed();
    assert!(
        wait_deadline(&mut b.child, EXIT_PATIENCE)
            .unwrap_or_else(|| panic!("backup never exited:\n{}", lines.text()))
            .success(),
        "{}",
        lines.text()
    );
    let mut prev = meta(&dir).expect("first replica saved").epoch;
    assert_eq!(prev, 3);
    eprintln!("uninterrupted save took {} ms", window.as_millis());

    let (mut mid_save, trials) = (0, 6);
    for trial in 1..=trials {
        let epochs = 3 + trial;
        let before = leftovers(&dir);
        let (mut b, lines) = session(&dir, epochs);
        let wait = Duration::from_micros(rng.below(window.as_micros().max(1) as u64));
        std::thread::sleep(wait); // the random moment is the point of the test
        b.child.kill().unwrap();
        b.child.wait().unwrap();
        let saved = lines.text().contains("replica holds epoch");
        let left = leftovers(&dir);
        let m = meta(&dir).unwrap_or_else(|| panic!("trial {trial}: no replica at all"));
        assert!(
            m.epoch == prev || m.epoch == epochs,
            "trial {trial}: replica at epoch {}, expected {prev} or {epochs}",
            m.epoch
        );
        assert_eq!(
            m.digest,
            replica_digest(&dir),
            "trial {trial}: files disagree with meta"
        );
        assert_eq!(
            m.digest,
            expected_digest(SPEC, m.epoch),
            "trial {trial}: not epoch {}",
            m.epoch
        );
        if !saved && (left > before || m.epoch == prev) {
            mid_save += 1;
        }
        eprintln!(
            "trial {trial}: killed {} ms into the save; replica at epoch {} ({}), {left} leftovers",
            wait.as_millis(),
            m.epoch,
            if m.epoch == prev { "old" } else { "new" }
        );
        prev = m.epoch;
    }
    eprintln!("{mid_save} of {trials} kills landed before the save finished");
    assert!(
        mid_save > 0,
        "no kill landed inside a save; the test proved nothing"
    );
}
