//! The second heartbeat path (issue 3/4): UDP beacons keep a backup from
//! suspecting a primary whose replication link went quiet while the
//! primary itself is alive and still protecting; without them the backup
//! suspects first.

mod common;

use std::net::UdpSocket;
use std::process::Stdio;
use std::time::Duration;

use common::lines::Lines;
use common::proxy::Proxy;
use common::*;

const SPEC: &str = "sim:mem=4MiB,workload=edits,rate=5000,seed=9";
const WAIT: Duration = Duration::from_secs(60);

/// A free UDP port on loopback (the backup binds it right after).
fn free_udp() -> String {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

/// Backup behind a cuttable proxy, primary through the proxy, optionally
/// with beacons straight to the backup. Cuts the link once checkpoints
/// flow; returns (primary's lines, backup's lines) and both processes.
fn cut_link(beacons: bool) -> (Lines, Lines, Reaped, Backup, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let beacon_addr = free_udp();
    let mut extra = vec!["--heartbeat-timeout", "500ms"];
    if beacons {
        extra.extend(["--beacon-listen", &beacon_addr]);
    }
    let mut b = Backup::start_with(&dir.path().join("r"), &extra, KEY);
    let b_out = Lines::watch(b.child.stderr.take().unwrap());
    if beacons {
        b_out.wait_for("beacons (second heartbeat path) on udp", WAIT);
    }
    let proxy = Proxy::start(&b.addr);
    let lock = format!("local:{}", dir.path().join("pair.lock").display());
    let mut cmd = castor();
    cmd.args([
        "protect",
        "--domain",
        SPEC,
        "--backup",
        &proxy.addr,
        "--epoch",
        "25ms",
    ])
    .args([
        "--arbiter",
        &lock,
        "--backup-timeout",
        "1500ms",
        "--redial-every",
        "0",
    ]);
    if beacons {
        cmd.args(["--beacon", &beacon_addr]);
    }
    let mut p = Reaped::spawn(cmd.stderr(Stdio::piped()));
    let p_out = Lines::watch(p.0.stderr.take().unwrap());
    p_out.wait_for("acked", WAIT);
    proxy.cut();
    // The proxy must outlive the cut connection: leak it into the test's end.
    std::mem::forget(proxy);
    (p_out, b_out, p, b, dir)
}

#[test]
fn beacons_keep_the_backup_from_suspecting_before_the_primary_gives_up() {
    if sim_unavailable() {
        return;
    }
    let (p_out, b_out, _p, _b, _dir) = cut_link(true);
    // The primary gives its silent backup up after 1.5 s and stops
    // beaconing; only then may the backup suspect it.
    p_out.wait_for("backup lost", WAIT);
    assert!(
        !b_out.text().contains("silent for"),
        "the backup suspected a primary that was still beaconing:\n{}",
        b_out.text()
    );
    let l = b_out.wait_for("silent for", WAIT);
    assert!(l.contains("on both the stream and the beacon path"), "{l}");
    let heard: u64 = l
        .split("; ")
        .find(|t| t.ends_with("beacons heard)"))
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(heard >= 5, "too few beacons counted: {l}");
}

#[test]
fn without_beacons_the_backup_suspects_a_quiet_link_first() {
    if sim_unavailable() {
        return;
    }
    let (p_out, b_out, _p, _b, _dir) = cut_link(false);
    b_out.wait_for("silent for", WAIT);
    assert!(
        !p_out.text().contains("backup lost"),
        "the primary gave up first although the backup's timeout is shorter:\n{}",
        p_out.text()
    );
}
