//! The UDP `counter` guest under protection, reached by a client through a
//! bridge in a network namespace of the test's own. The primary is
//! SIGKILLed; the backup activates the guest on its own TAP on the same
//! bridge, and the client's requests are answered again.
//!
//! Output commit (issue 3/4) is not in place yet, so replies the primary
//! sent from epochs the backup never received can be "undone": the
//! activated guest may hand out a counter the client has already seen. This
//! test asserts what holds today (the guest answers again, ids match,
//! counters increase strictly after failover) and prints what it observed
//! about the gap across the failover.

mod common;
use common::*;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

const GUEST: &str = "10.201.0.2";

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

#[test]
fn counter_guest_answers_after_failover() {
    if std::fs::File::open("/dev/kvm").is_err() {
        eprintln!("SKIP: /dev/kvm is not available");
        return;
    }
    let Some(ns) = Netns::create("cf") else {
        return;
    };
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["addr", "add", "10.201.0.1/24", "dev", "br0"]);
    ns.ip(&["link", "set", "br0", "up"]);
    for tap in ["cp0", "cb0"] {
        ns.ip(&["tuntap", "add", "dev", tap, "mode", "tap"]);
        ns.ip(&["link", "set", tap, "master", "br0"]);
        ns.ip(&["link", "set", tap, "up"]);
    }
    let dir = tempfile::tempdir().unwrap();
    let b = Backup::start_cmd(
        castor_in(&ns.name),
        &dir.path().join("replica"),
        &["--activate", "--override", "tap=cb0", "--run-for", "20s"],
        KEY,
    );
    let spec = format!("kvm:guest=counter,tap=cp0,ip={GUEST}");
    let primary = Reaped(
        castor_in(&ns.name)
            .args(["protect", "--quiet", "--domain", &spec, "--backup", &b.addr])
            .spawn()
            .unwrap(),
    );
    let (before, after) = ns.run(|| {
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
        let mut after = Vec::new();
        for id in 31..=50u64 {
            let c = ask(&sock, id, Duration::from_secs(15))
                .unwrap_or_else(|| panic!("the activated guest did not answer request {id}"));
            after.push(c);
        }
        (before, after)
    });
    let mut b = b;
    let _ = b.child.kill();
    let (_, err) = b.wait();
    eprintln!("{err}");
    assert!(before.windows(2).all(|w| w[1] > w[0]), "{before:?}");
    assert!(after.windows(2).all(|w| w[1] > w[0]), "{after:?}");
    let seen = *before.last().unwrap();
    let first = after[0];
    eprintln!(
        "counter failover without output commit: last counter seen from the primary {seen}, \
         first from the activated guest {first} ({})",
        if first > seen {
            "no step back observed this run"
        } else {
            "STEP BACK: replies from uncommitted epochs were released"
        }
    );
}
