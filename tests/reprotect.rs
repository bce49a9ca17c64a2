//! Re-protection (issue 3/4): the live copy keeps running when its backup
//! is lost (it holds the arbiter) and a fresh backup protects it again,
//! seeded while the guest runs, without stopping it.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::lines::Lines;
use common::*;

const SPEC: &str = "sim:mem=8MiB,workload=edits,rate=20000,seed=3";
const WAIT: Duration = Duration::from_secs(60);

fn term(pid: u32) {
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) }, 0);
}

/// `castor protect` of [`SPEC`] against `addr` with the pair's `lock` and
/// `extra` arguments, once checkpoints are acknowledged; its stderr lines.
fn protect_watched(addr: &str, lock: &str, extra: &[&str]) -> (Reaped, Lines) {
    let mut p = Reaped::spawn(
        castor()
            .args([
                "protect", "--domain", SPEC, "--backup", addr, "--epoch", "25ms",
            ])
            .args(["--arbiter", lock])
            .args(extra)
            .stderr(Stdio::piped()),
    );
    let out = Lines::watch(p.0.stderr.take().unwrap());
    out.wait_for("acked", WAIT);
    (p, out)
}

/// The digest a stopped `castor protect` reports for its final state.
fn final_digest(lines: &Lines) -> String {
    let l = lines.wait_for("castor protect: stopped after", WAIT);
    l.rsplit("digest ")
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// SIGKILL the backup: the primary says it runs unprotected and keeps
/// running; a fresh backup on the same address is dialed, seeded and fed
/// checkpoints; at a clean stop its replica equals the primary's final
/// state.
#[test]
fn primary_runs_unprotected_then_a_fresh_backup_protects_it() {
    if sim_unavailable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lock = format!("local:{}", dir.path().join("pair.lock").display());
    let b1 = Backup::start(&dir.path().join("r1"));
    let addr = b1.addr.clone();
    let (mut p, out) = protect_watched(&addr, &lock, &["--redial-every", "100ms"]);
    drop(b1); // SIGKILL + reap
    out.wait_for("UNPROTECTED", WAIT);
    assert!(
        p.0.try_wait().unwrap().is_none(),
        "the primary stopped when its backup died:\n{}",
        out.text()
    );
    // A fresh backup where the old one was.
    let r2 = dir.path().join("r2");
    let b2 = Backup::start_at(castor(), &addr, &r2, &[], KEY);
    out.wait_for("re-protecting", WAIT);
    // Checkpoints of the new session are acknowledged.
    out.wait_for("acked", WAIT);
    term(p.0.id());
    let digest = final_digest(&out);
    let st = p.wait_within(EXIT_PATIENCE);
    assert!(st.success(), "{}", out.text());
    let (bst, err) = b2.wait();
    assert!(bst.success(), "{err}");
    assert_eq!(
        replica_digest(&r2),
        digest,
        "the fresh backup's replica differs from the primary's final state"
    );
    let text = out.text();
    assert!(text.contains("protection sessions: 2"), "{text}");
}

/// SIGKILL the primary: the backup activates, then protects the activated
/// guest with a fresh backup (`--reprotect`, beaconing to it); at a clean
/// stop the fresh backup's replica equals the activated copy's final image.
#[test]
fn activated_backup_is_reprotected_by_a_fresh_backup() {
    if sim_unavailable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lock = format!("local:{}", dir.path().join("pair.lock").display());
    let r2 = dir.path().join("r2");
    // The fresh backup also takes beacons (second heartbeat path).
    let beacon = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut b2 = Backup::start_with(&r2, &["--beacon-listen", &beacon], KEY);
    let b2_out = Lines::watch(b2.child.stderr.take().unwrap());
    let r1 = dir.path().join("r1");
    let mut b1 = Backup::start_with(
        &r1,
        &[
            "--activate",
            "--heartbeat-timeout",
            "300ms",
            "--arbiter",
            &lock,
            "--reprotect",
            &b2.addr,
            "--reprotect-every",
            "100ms",
            "--reprotect-beacon",
            &beacon,
        ],
        KEY,
    );
    let b1_out = Lines::watch(b1.child.stderr.take().unwrap());
    let p = protect_flowing_with(SPEC, &b1.addr, "25ms", &["--arbiter", &lock]);
    drop(p); // SIGKILL + reap
    b1_out.wait_for("ACTIVATED", WAIT);
    b1_out.wait_for("re-protecting", WAIT);
    b2_out.wait_for("replicating", WAIT);
    // The re-protected guest's checkpoints are acknowledged.
    b1_out.wait_for("acked", WAIT);
    term(b1.child.id());
    let st = wait_deadline(&mut b1.child, EXIT_PATIENCE).expect("b1 exits after SIGTERM");
    assert_eq!(st.code(), Some(2), "{}", b1_out.text());
    let st2 =
        wait_deadline(&mut b2.child, EXIT_PATIENCE).expect("b2 exits once its primary stopped");
    assert!(st2.success(), "{}", b2_out.text());
    // The re-protecting copy beaconed to the fresh backup.
    let end = b2_out.wait_for("beacons heard", WAIT);
    let heard: u64 = end
        .split("; ")
        .find(|t| t.ends_with("beacons heard)"))
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(heard > 0, "no beacons from the re-protecting copy: {end}");
    assert_eq!(
        replica_digest(&r2),
        replica_digest(&r1.join("activated")),
        "the fresh backup's replica differs from the activated copy's final image:\n{}",
        b1_out.text()
    );
}

/// A backup that stops answering while its connection stays open
/// (SIGSTOP): the primary declares it lost after `--backup-timeout`, drops
/// the output it held for it, and carries on unprotected.
#[test]
fn silent_backup_is_declared_lost_and_the_guest_runs_on() {
    if sim_unavailable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lock = format!("local:{}", dir.path().join("pair.lock").display());
    let b = Backup::start(&dir.path().join("r1"));
    let (mut p, out) = protect_watched(
        &b.addr,
        &lock,
        &["--backup-timeout", "300ms", "--redial-every", "0"],
    );
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    assert_eq!(
        unsafe { libc::kill(b.child.id() as libc::pid_t, libc::SIGSTOP) },
        0
    );
    let l = out.wait_for("backup lost", WAIT);
    assert!(l.contains("backup silent for"), "{l}");
    assert!(l.contains("UNPROTECTED"), "{l}");
    // Still running, unprotected, until told to stop; then a clean exit.
    assert!(p.0.try_wait().unwrap().is_none(), "{}", out.text());
    term(p.0.id());
    let st = p.wait_within(EXIT_PATIENCE);
    assert!(st.success(), "{}", out.text());
    let last = out.wait_for("stopped after", WAIT);
    assert!(last.contains("protection sessions: 1"), "{last}");
    // SAFETY: as above.
    unsafe { libc::kill(b.child.id() as libc::pid_t, libc::SIGCONT) };
}
