//! Partitions of the replication link, from outside the process: a primary
//! and a backup in network namespaces of their own, joined by a veth pair;
//! a sim guest rewrites whole pages of random bytes at full speed, so the
//! link is busy (the primary's socket buffers fill); then iptables DROPs
//! the replication port's packets in the primary's namespace: both ways,
//! or one way each direction.
//!
//! Two cuts of an idle link (a quiet guest) as well: nothing blocks
//! there, the silence or the missing acks decide.
//!
//! What must happen: the primary declares the backup lost within
//! `--backup-timeout` + 1 s of the cut, whatever it was blocked on, and
//! (arbiter held: `--arbiter local:PATH`) keeps its guest running
//! unprotected; with an etcd arbiter that the partition also cuts off it
//! self-fences within the lease's TTL + 1 s. For tcp and uring.
//!
//! Every wait is on an event (a line of the primary's stderr, read from a
//! pipe, or its exit), bounded. The tests run one at a time (a busy guest
//! each; the timing claims need the cores).

mod common;

use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::lines::Lines;
use common::{castor_in, pair_lock, sim_unavailable, Backup, Netns, Reaped, KEY, START_PATIENCE};

/// The primary's `--backup-timeout`.
const BACKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// What the claim allows on top of the timeout.
const SLACK: Duration = Duration::from_secs(1);
const PORT: &str = "7010";
const P_ADDR: &str = "10.210.0.1";
const B_ADDR: &str = "10.210.0.2";
/// A busy guest: whole pages of random bytes, as fast as one thread goes.
const BUSY: &str = "sim:mem=64MiB,workload=incompressible,threads=1,seed=13";
/// A quiet guest: 50 page writes a second.
const IDLE: &str = "sim:mem=16MiB,workload=uniform,rate=50,seed=5";

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Which packets of the replication port the primary's namespace drops.
#[derive(Clone, Copy, Debug)]
enum Cut {
    Both,
    /// Primary to backup only (the backup's heartbeats still arrive).
    ToBackup,
    /// Backup to primary only (its acks and heartbeats).
    FromBackup,
}

fn have(tool: &str) -> bool {
    std::process::Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The two namespaces, joined by a veth pair; None (reason printed) when
/// this machine cannot make them.
fn pair(tag: &str) -> Option<(Netns, Netns)> {
    if !have("iptables") {
        eprintln!("SKIP: needs iptables");
        return None;
    }
    let p = Netns::create(&format!("{tag}p"))?;
    let b = Netns::create(&format!("{tag}b"))?;
    p.ip(&[
        "link", "add", "p0", "type", "veth", "peer", "name", "b0", "netns", &b.name,
    ]);
    p.ip(&["addr", "add", &format!("{P_ADDR}/24"), "dev", "p0"]);
    b.ip(&["addr", "add", &format!("{B_ADDR}/24"), "dev", "b0"]);
    p.ip(&["link", "set", "p0", "up"]);
    b.ip(&["link", "set", "b0", "up"]);
    Some((p, b))
}

/// `iptables ARGS` in `ns`; panics with its message on failure.
fn iptables(ns: &Netns, args: &[&str]) {
    let o = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "iptables"])
        .args(args)
        .output()
        .expect("running iptables");
    assert!(
        o.status.success(),
        "iptables {args:?} in {}: {}",
        ns.name,
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Drops the replication port's packets in the primary's namespace.
fn cut(p: &Netns, how: Cut) {
    let out = ["-I", "OUTPUT", "-p", "tcp", "--dport", PORT, "-j", "DROP"];
    let inp = ["-I", "INPUT", "-p", "tcp", "--sport", PORT, "-j", "DROP"];
    match how {
        Cut::Both => {
            iptables(p, &out);
            iptables(p, &inp);
        }
        Cut::ToBackup => iptables(p, &out),
        Cut::FromBackup => iptables(p, &inp),
    }
}

/// A backup in `b` on the fixed port that never gives up on its primary
/// during a test (the primary's own detection is what is measured).
fn backup(b: &Netns, dir: &std::path::Path, transport: &str) -> Backup {
    Backup::start_at(
        castor_in(&b.name),
        &format!("{B_ADDR}:{PORT}"),
        &dir.join("replica"),
        &["--transport", transport, "--heartbeat-timeout", "60s"],
        KEY,
    )
}

/// `castor protect` of `guest` in `p`, its stderr watched.
fn primary(p: &Netns, guest: &str, transport: &str, arbiter: &str) -> (Reaped, Lines) {
    let timeout = format!("{}ms", BACKUP_TIMEOUT.as_millis());
    let mut c = Reaped::spawn(
        castor_in(&p.name)
            .args(["protect", "--domain", guest])
            .args(["--backup", &format!("{B_ADDR}:{PORT}")])
            .args(["--epoch", "20ms", "--transport", transport])
            .args(["--backup-timeout", &timeout, "--arbiter", arbiter])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let lines = Lines::watch(c.0.stderr.take().unwrap());
    (c, lines)
}

/// The acknowledged epoch a progress line reports (`… acked N | …`).
fn acked_in(line: &str) -> Option<u64> {
    line.split_once("acked")?
        .1
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Waits until checkpoints flow: a progress line acknowledging epoch 2 or
/// later (the seed is done and the busy guest's epochs stream).
fn wait_flowing(lines: &Lines) {
    let t0 = Instant::now();
    loop {
        let left = START_PATIENCE.saturating_sub(t0.elapsed());
        let l = lines.wait_for("acked", left);
        if acked_in(&l).is_some_and(|n| n >= 2) {
            return;
        }
    }
}

/// Asserts no line with `pat` comes within `window` (the stream may end).
fn none_within(lines: &Lines, pat: &str, window: Duration) {
    if let Some(l) = lines.next_within(pat, window) {
        panic!("unexpected line {l:?}:\n{}", lines.text());
    }
}

/// One partition with the arbiter held, the link busy (`guest` is
/// [`BUSY`]) or idle: returns how long the primary took to declare the
/// backup lost.
fn held_arbiter_run(transport: &str, how: Cut, guest: &str) -> Option<Duration> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if sim_unavailable() {
        return None;
    }
    let (p, b) = pair(&format!("pt{}", transport.chars().next().unwrap()))?;
    let dir = tempfile::tempdir().unwrap();
    let _backup = backup(&b, dir.path(), transport);
    let (mut prim, lines) = primary(&p, guest, transport, &pair_lock(dir.path()));
    wait_flowing(&lines);
    cut(&p, how);
    let at = Instant::now();
    let lost = lines.wait_for("continues UNPROTECTED", BACKUP_TIMEOUT + SLACK * 10);
    let took = at.elapsed();
    let link = if guest == BUSY { "busy" } else { "idle" };
    eprintln!(
        "{transport} {link} {how:?}: backup declared lost {} ms after the cut: {lost}",
        took.as_millis()
    );
    assert!(
        took <= BACKUP_TIMEOUT + SLACK,
        "{transport} {how:?}: lost after {took:?} (> --backup-timeout {BACKUP_TIMEOUT:?} + {SLACK:?}):\n{}",
        lines.text()
    );
    assert!(lost.contains("backup connection lost"), "{lost}");
    // Arbiter held: the guest runs on, unprotected; it does not fence.
    none_within(&lines, "SELF-FENCED", Duration::from_secs(1));
    assert!(
        prim.0.try_wait().unwrap().is_none(),
        "the primary ended:\n{}",
        lines.text()
    );
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(prim.0.id() as i32, libc::SIGTERM) };
    let st = prim.wait_within(Duration::from_secs(30));
    let end = lines.wait_for("stopped after", Duration::from_secs(5));
    assert!(st.success(), "exit {st:?}:\n{}", lines.text());
    let unprotected: u64 = end
        .split_once('(')
        .and_then(|(_, r)| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no unprotected count in {end:?}"));
    assert!(unprotected >= 1, "{end}");
    Some(took)
}

#[test]
fn tcp_busy_link_cut_both_ways_is_detected_and_the_guest_runs_on() {
    held_arbiter_run("tcp", Cut::Both, BUSY);
}

#[test]
fn tcp_busy_link_cut_toward_the_backup_is_detected() {
    held_arbiter_run("tcp", Cut::ToBackup, BUSY);
}

#[test]
fn tcp_busy_link_cut_from_the_backup_is_detected() {
    held_arbiter_run("tcp", Cut::FromBackup, BUSY);
}

#[test]
fn uring_busy_link_cut_both_ways_is_detected_and_the_guest_runs_on() {
    held_arbiter_run("uring", Cut::Both, BUSY);
}

#[test]
fn uring_busy_link_cut_toward_the_backup_is_detected() {
    held_arbiter_run("uring", Cut::ToBackup, BUSY);
}

#[test]
fn uring_busy_link_cut_from_the_backup_is_detected() {
    held_arbiter_run("uring", Cut::FromBackup, BUSY);
}

#[test]
fn tcp_idle_link_cut_toward_the_backup_is_detected() {
    held_arbiter_run("tcp", Cut::ToBackup, IDLE);
}

#[test]
fn uring_idle_link_cut_both_ways_is_detected() {
    held_arbiter_run("uring", Cut::Both, IDLE);
}

/// The partition also cuts the primary off its etcd arbiter (etcd in the
/// primary's namespace, on loopback; its port dropped too): the lease
/// lapses and the primary self-fences, guest paused, within the TTL + 1 s.
fn lost_arbiter_run(transport: &str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if sim_unavailable() {
        return;
    }
    let Some((p, b)) = pair(&format!("pf{}", transport.chars().next().unwrap())) else {
        return;
    };
    let Some(etcd) = Etcd::start(Some(&p)) else {
        return;
    };
    let ttl = castor::ha::etcd::DEFAULT_TTL;
    let dir = tempfile::tempdir().unwrap();
    let _backup = backup(&b, dir.path(), transport);
    let arb = format!("etcd:{}/castor/partition", etcd.url);
    let (mut prim, lines) = primary(&p, BUSY, transport, &arb);
    lines.wait_for("fencing token", START_PATIENCE);
    wait_flowing(&lines);
    let etcd_port = etcd.port.to_string();
    iptables(
        &p,
        &[
            "-I", "OUTPUT", "-o", "lo", "-p", "tcp", "--dport", &etcd_port, "-j", "DROP",
        ],
    );
    cut(&p, Cut::Both);
    let at = Instant::now();
    let fenced = lines.wait_for("SELF-FENCED", ttl + SLACK * 10);
    let took = at.elapsed();
    eprintln!(
        "{transport}: self-fenced {} ms after the cut (TTL {} ms): {fenced}",
        took.as_millis(),
        ttl.as_millis()
    );
    assert!(
        took <= ttl + SLACK,
        "self-fenced after {took:?} (> TTL {ttl:?} + {SLACK:?}):\n{}",
        lines.text()
    );
    let st = prim.wait_within(Duration::from_secs(30));
    assert_ne!(
        st.code(),
        Some(0),
        "a self-fenced primary fails:\n{}",
        lines.text()
    );
    lines.wait_for("castor protect: self-fenced", Duration::from_secs(5));
}

#[test]
fn tcp_busy_link_and_arbiter_cut_self_fences() {
    lost_arbiter_run("tcp");
}

#[test]
fn uring_busy_link_and_arbiter_cut_self_fences() {
    lost_arbiter_run("uring");
}
