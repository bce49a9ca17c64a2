//! The UDP `counter` guest under protection, reached by a client through a
//! bridge in a network namespace of the test's own. The primary is
//! SIGKILLed; the backup activates the guest on its own TAP on the same
//! bridge, and the client's requests are answered again.
//!
//! With output commit (the default) a reply leaves the primary only after
//! the backup acknowledged the epoch that produced it, so the client never
//! sees a counter the activated guest will hand out again. Without it
//! (`--no-output-commit`) such a step back is possible, and recorded.

mod common;
use common::*;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

const GUEST: &str = "10.201.0.2";
/// The kvm NIC's default MAC (guests/README.md).
const GUEST_MAC: &str = "52:54:00:ca:57:01";

/// Whether bridge br0 in namespace `ns` has learned `mac` on port `dev`.
fn fdb_has(ns: &str, mac: &str, dev: &str) -> bool {
    let out = std::process::Command::new("bridge")
        .args(["-n", ns, "fdb", "show", "br", "br0"])
        .output()
        .expect("running bridge (iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with(mac) && l.contains(&format!("dev {dev} ")))
}

fn ask(sock: &UdpSocket, id: u64, patience: Duration) -> Option<u64> {
    let mut msg = [0u8; 16];
    msg[..8].copy_from_slice(&id.to_le_bytes());
    let mut buf = [0u8; 64];
    let t0 = Instant::now();
    while t0.elapsed() < patience {
        let _ = sock.send(&msg);
        let sent = Instant::now();
        while sent.elapsed() < Duration::from_millis(200) {
            match sock.recv(&mut buf) {
                Ok(16) if buf[..8] == id.to_le_bytes() => {
                    return Some(u64::from_le_bytes(buf[8..16].try_into().unwrap()))
                }
                Ok(_) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    break
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    None
}

/// One failover: 30 requests answered by the primary, SIGKILL, 20 more
/// answered by the activated guest. Returns the counters seen before and
/// after, or None when the machine cannot run it (reason printed).
fn failover(extra_primary_args: &[&str]) -> Option<(Vec<u64>, Vec<u64>)> {
    if std::fs::File::open("/dev/kvm").is_err() {
        eprintln!("SKIP: /dev/kvm is not available");
        return None;
    }
    let ns = Netns::create("cf")?;
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["addr", "add", "10.201.0.1/24", "dev", "br0"]);
    ns.ip(&["link", "set", "br0", "up"]);
    for tap in ["cp0", "cb0"] {
        ns.ip(&["tuntap", "add", "dev", tap, "mode", "tap"]);
        ns.ip(&["link", "set", tap, "master", "br0"]);
        ns.ip(&["link", "set", tap, "up"]);
    }
    let dir = tempfile::tempdir().unwrap();
    let lock = pair_lock(dir.path());
    let mut b = Backup::start_cmd(
        castor_in(&ns.name),
        &dir.path().join("replica"),
        &[
            "--activate",
            "--override",
            "tap=cb0",
            "--run-for",
            "20s",
            "--arbiter",
            &lock,
            // Detection is the stream's end at the SIGKILL; no stall under
            // load may be suspected before it.
            "--heartbeat-timeout",
            "5s",
        ],
        KEY,
    );
    let spec = format!("kvm:guest=counter,tap=cp0,ip={GUEST}");
    let primary = Reaped::spawn(
        castor_in(&ns.name)
            .args(["protect", "--quiet", "--domain", &spec, "--backup", &b.addr])
            .args(["--arbiter", &lock, "--backup-timeout", "10s"])
            .args(extra_primary_args),
    );
    let ns_name = ns.name.clone();
    let result = ns.run(|| {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        sock.connect((GUEST, 7777)).unwrap();
        let mut before = Vec::new();
        for id in 1..=30u64 {
            let c = ask(&sock, id, Duration::from_secs(30))
                .unwrap_or_else(|| panic!("no reply to {id} from the primary"));
            before.push(c);
        }
        drop(primary); // SIGKILL the primary mid-conversation
                       // Before the client speaks again, the activated side must have
                       // announced the guest (gratuitous ARP): the bridge learns the
                       // guest's MAC on the backup's TAP without any guest traffic.
        let t0 = Instant::now();
        while !fdb_has(&ns_name, GUEST_MAC, "cb0") {
            if t0.elapsed() > Duration::from_secs(15) {
                let fdb = std::process::Command::new("bridge")
                    .args(["-n", &ns_name, "fdb", "show", "br", "br0"])
                    .output()
                    .unwrap();
                return Err(String::from_utf8_lossy(&fdb.stdout).into_owned());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!(
            "guest MAC learned on cb0 {} ms after the kill",
            t0.elapsed().as_millis()
        );
        let mut after = Vec::new();
        for id in 31..=50u64 {
            let c = ask(&sock, id, Duration::from_secs(15))
                .unwrap_or_else(|| panic!("the activated guest did not answer request {id}"));
            after.push(c);
        }
        Ok((before, after))
    });
    let _ = b.child.kill();
    let (_, err) = b.wait();
    let (before, after) = match result {
        Ok(v) => v,
        Err(fdb) => panic!(
            "the guest's MAC never appeared on the backup's TAP:\n{fdb}\nbackup said:\n{err}"
        ),
    };
    assert!(err.contains("ACTIVATED"), "{err}");
    assert!(before.windows(2).all(|w| w[1] > w[0]), "{before:?}");
    assert!(after.windows(2).all(|w| w[1] > w[0]), "{after:?}");
    Some((before, after))
}

/// Guarantee 4 with output commit on (the default): across the failover
/// the client never sees the counter step back — every reply it got came
/// from an epoch the backup had acknowledged.
#[test]
fn counter_never_steps_back_across_failover() {
    for trial in 0..3 {
        let Some((before, after)) = failover(&[]) else {
            return;
        };
        let (seen, first) = (*before.last().unwrap(), after[0]);
        eprintln!("trial {trial}: last counter from the primary {seen}, first from the activated guest {first}");
        assert!(
            first > seen,
            "step back across failover: saw {seen}, then {first}"
        );
    }
}

/// The same with `--no-output-commit`: replies from epochs the backup never
/// received reach the client, so the activated guest may repeat counters.
/// Recorded, not asserted (it depends on where the kill lands).
#[test]
fn without_output_commit_a_step_back_is_possible() {
    let Some((before, after)) = failover(&["--no-output-commit"]) else {
        return;
    };
    let (seen, first) = (*before.last().unwrap(), after[0]);
    eprintln!(
        "without output commit: last counter seen from the primary {seen}, first from the activated guest {first} ({})",
        if first > seen { "no step back this run" } else { "STEP BACK: replies from unacknowledged epochs were released" }
    );
}
