//! A real KVM guest under protection; the primary is SIGKILLed at random
//! moments; the backup activates the last committed checkpoint. The guest
//! (`memtouch`) verifies checksums of its own memory continuously and
//! prints `seq N ok`: on the backup it must keep passing its self-check and
//! continue its sequence from the checkpoint (no restart, no gap; at most the
//! uncommitted tail the primary printed after the last checkpoint repeats).

mod common;
use common::trials::Trials;
use common::*;

use std::path::Path;
use std::time::{Duration, Instant};

fn kvm_unavailable() -> bool {
    if std::fs::File::open("/dev/kvm").is_err() {
        eprintln!("SKIP: /dev/kvm is not available");
        return true;
    }
    false
}

/// `seq N` numbers of a console log, and whether any line reported a failure.
fn seqs(path: &Path) -> (Vec<u64>, bool) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut v = Vec::new();
    let mut fail = false;
    for line in text.lines() {
        fail |= line.contains("FAIL");
        let mut w = line.split_whitespace();
        if let (Some("seq"), Some(n), Some("ok")) = (w.next(), w.next(), w.next()) {
            if let Ok(n) = n.parse() {
                v.push(n);
            }
        }
    }
    (v, fail)
}

#[test]
fn memtouch_survives_sigkill_of_the_primary() {
    if kvm_unavailable() {
        return;
    }
    let mut trials = Trials::seeded("kvm failover trials");
    for trial in 0..4 {
        let dir = tempfile::tempdir().unwrap();
        let plog = dir.path().join("primary.log");
        let blog = dir.path().join("backup.log");
        let lock = pair_lock(dir.path());
        let b = Backup::start_with(
            &dir.path().join("replica"),
            &[
                "--activate",
                "--override",
                &format!("console={}", blog.display()),
                "--run-for",
                "2s",
                "--arbiter",
                &lock,
                // Detection is the stream's end at the SIGKILL; no stall
                // under load may be suspected before it.
                "--heartbeat-timeout",
                "5s",
            ],
            KEY,
        );
        let spec = format!("kvm:guest=memtouch,mem=8MiB,console={}", plog.display());
        let p = Reaped::spawn(
            castor()
                .args(["protect", "--quiet", "--domain", &spec, "--backup", &b.addr])
                .args(["--arbiter", &lock, "--backup-timeout", "10s"]),
        );
        // The guest's own output is the event: wait until it has run a while.
        let want = 5 + trials.below(40);
        let t0 = Instant::now();
        while seqs(&plog).0.last().is_none_or(|&s| s < want) {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "guest never reached seq {want}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(trials.below(50)));
        drop(p); // SIGKILL
        let (st, err) = b.wait();
        assert_eq!(st.code(), Some(2), "{err}");
        assert!(err.contains("ACTIVATED"), "{err}");
        let (pseq, pfail) = seqs(&plog);
        let (bseq, bfail) = seqs(&blog);
        assert!(!pfail && !bfail, "self-check failed:\n{err}");
        let last_primary = *pseq.last().unwrap();
        let first_backup = *bseq
            .first()
            .unwrap_or_else(|| panic!("backup guest printed nothing:\n{err}"));
        eprintln!(
            "trial {trial}: primary printed up to seq {last_primary}; activated guest continued at seq {first_backup} and reached {}",
            bseq.last().unwrap()
        );
        assert!(
            first_backup > 1,
            "the activated guest restarted from the beginning"
        );
        assert!(
            first_backup <= last_primary + 1,
            "a gap: the backup skipped output"
        );
        assert!(
            last_primary + 1 - first_backup <= 10,
            "the backup resumed from a stale checkpoint ({first_backup} vs {last_primary})"
        );
        assert!(
            bseq.windows(2).all(|w| w[1] == w[0] + 1),
            "sequence not continuous on the backup"
        );
        assert!(bseq.len() > 5, "the activated guest did not keep running");
    }
}
