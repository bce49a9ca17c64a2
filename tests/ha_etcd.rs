//! The etcd arbiter against a private etcd started by each test, and
//! partitions (issue 4). What must hold in every case: at most one copy of
//! the guest releases output at any time, and the guest continues on
//! exactly one copy.
//!
//! - (a) two contenders: one wins; the token grows with every winner, after
//!   a release and after the holder is SIGKILLed and its lease expires;
//! - (b) the primary↔backup link is cut while both live: the backup must
//!   not activate (the primary holds the lease), the primary runs on;
//! - (c) the primary is cut off from etcd: it self-fences (exit 5) within
//!   the TTL, then the backup wins and activates;
//! - (d) the primary is SIGSTOPped past the timeout, the backup activates
//!   after the lease expired, the primary is SIGCONTed: it must release
//!   nothing more and self-fence;
//! - (f) the link is cut, the primary runs on unprotected and then dies:
//!   the backup wins the arbiter but must not activate its stale replica.
//!
//! (c) and (d) run the UDP counter guest (kvm) behind TAPs on one bridge in
//! a network namespace; "which copy releases output" is observed as the
//! packets each copy's TAP received from its VMM (every frame a copy
//! releases), sampled every few ms, together with the counters a client
//! gets back, which must never step back.

mod common;
use common::etcd::Etcd;
use common::proxy::Proxy;
use common::*;

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use castor::ha::arbiter::{from_spec, Arbiter};
use castor::ha::etcd::{EtcdArbiter, EtcdSpec};

/// The etcd arbiter's default TTL (the tests use it).
const TTL: Duration = castor::ha::etcd::DEFAULT_TTL;

/// Lines of a child's stderr, collected in the background.
#[derive(Clone)]
struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn collect(stream: impl std::io::Read + Send + 'static) -> Lines {
        let lines = Lines(Arc::new(Mutex::new(Vec::new())));
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                l.0.lock().unwrap().push(line);
            }
        });
        lines
    }

    /// The first line containing `pat`, polling up to `patience`.
    fn wait_for(&self, pat: &str, patience: Duration) -> Option<String> {
        let t0 = Instant::now();
        loop {
            if let Some(l) = self.0.lock().unwrap().iter().find(|l| l.contains(pat)) {
                return Some(l.clone());
            }
            if t0.elapsed() > patience {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn text(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }
}

/// A child (SIGKILLed on drop) with its stderr collected.
struct Logged {
    p: Reaped,
    log: Lines,
}

impl Logged {
    fn spawn(mut cmd: std::process::Command) -> Logged {
        let mut p = Reaped::spawn(cmd.stderr(Stdio::piped()));
        let log = Lines::collect(p.0.stderr.take().unwrap());
        Logged { p, log }
    }

    fn wait_for(&self, pat: &str, patience: Duration) -> Option<String> {
        self.log.wait_for(pat, patience)
    }

    fn text(&self) -> String {
        self.log.text()
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        assert_eq!(unsafe { libc::kill(self.p.0.id() as libc::pid_t, sig) }, 0);
    }

    /// Exit code, waiting up to `patience`.
    fn exit_code(&mut self, patience: Duration) -> Option<i32> {
        let t0 = Instant::now();
        while t0.elapsed() < patience {
            if let Some(st) = self.p.0.try_wait().unwrap() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

/// The token in a "won (fencing token N)" line.
fn token_of(line: &str) -> u64 {
    let s = line.split("fencing token ").nth(1).expect("token in line");
    s[..s.find(')').unwrap()].parse().unwrap()
}

fn protect_cmd(
    mut c: std::process::Command,
    domain: &str,
    backup: &str,
    arb: &str,
) -> std::process::Command {
    c.args([
        "protect",
        "--domain",
        domain,
        "--backup",
        backup,
        "--arbiter",
        arb,
    ]);
    c
}

#[test]
fn a_one_winner_and_tokens_grow_after_release_and_death() {
    let Some(e) = Etcd::start(None) else { return };
    let spec = format!("etcd:{}/castor/test-a", e.url);
    let mut a = from_spec(&spec).unwrap();
    // The second contender lists a dead endpoint first: it fails over.
    let mut b = from_spec(&format!("etcd:http://127.0.0.1:9,{}/castor/test-a", e.url)).unwrap();
    let ta = a.try_acquire().unwrap().expect("the first contender wins");
    assert_eq!(b.try_acquire().unwrap(), None, "the second loses");
    assert!(b.lease().is_none());
    // Held across several renewal periods, and exclusive all along.
    let watch = a.lease().expect("etcd publishes a lease watch");
    let t0 = Instant::now();
    while t0.elapsed() < TTL * 2 {
        assert!(
            watch.held_for(Duration::from_millis(500)),
            "lease lapsed while renewed"
        );
        assert_eq!(b.try_acquire().unwrap(), None);
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(a); // revokes the lease: the key goes at once
    let t = Instant::now();
    let tb = b
        .acquire_within(TTL, Duration::from_millis(20))
        .unwrap()
        .expect("wins after the release");
    eprintln!(
        "(a) release: token {ta} → {tb} in {} ms",
        t.elapsed().as_millis()
    );
    assert!(tb > ta, "{tb} after {ta}");
    assert!(
        t.elapsed() < TTL / 2,
        "a revoked lease frees the key at once"
    );
    assert!(
        !watch.held_for(Duration::ZERO),
        "the released watch is revoked"
    );
    drop(b);

    // A holder that dies (SIGKILL) cannot revoke: the successor waits for
    // its lease to expire, then wins with a larger token.
    if sim_unavailable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backup = Backup::start(&dir.path().join("replica"));
    let mut p = Logged::spawn(protect_cmd(
        castor(),
        "sim:mem=4MiB,writes=50,seed=3",
        &backup.addr,
        &spec,
    ));
    let won = p
        .wait_for("fencing token", Duration::from_secs(20))
        .unwrap_or_else(|| p.text());
    let tp = token_of(&won);
    assert!(tp > tb.0, "{tp} after {tb}");
    p.wait_for("acked", Duration::from_secs(20))
        .expect("checkpoints flow");
    let mut c = from_spec(&spec).unwrap();
    assert_eq!(c.try_acquire().unwrap(), None, "the live primary holds it");
    let _ = p.p.0.kill();
    let killed = Instant::now();
    let tc = c
        .acquire_within(TTL * 3, Duration::from_millis(20))
        .unwrap()
        .expect("wins once the dead holder's lease expired");
    let took = killed.elapsed();
    eprintln!(
        "(a) SIGKILL: token {tp} → {tc}, won {} ms after the kill (TTL {} s)",
        took.as_millis(),
        TTL.as_secs()
    );
    assert!(tc.0 > tp);
    // The lease was renewed at most TTL/4 before the kill.
    assert!(
        took >= TTL * 3 / 4 - Duration::from_millis(100),
        "won before the lease could expire: {took:?}"
    );
    let _ = p.exit_code(Duration::from_secs(5));
}

/// An activating backup with the etcd arbiter `arb`, 500 ms heartbeat timeout.
fn etcd_backup(
    cmd: std::process::Command,
    dir: &std::path::Path,
    arb: &str,
    extra: &[&str],
) -> Backup {
    let mut args = vec![
        "--activate",
        "--heartbeat-timeout",
        "500ms",
        "--arbiter",
        arb,
    ];
    args.extend_from_slice(extra);
    Backup::start_cmd(cmd, &dir.join("replica"), &args, KEY)
}

#[test]
fn b_cut_link_between_live_primary_and_backup_no_activation() {
    if sim_unavailable() {
        return;
    }
    let Some(e) = Etcd::start(None) else { return };
    let arb = format!("etcd:{}/castor/test-b", e.url);
    let dir = tempfile::tempdir().unwrap();
    let b = etcd_backup(castor(), dir.path(), &arb, &[]);
    let bdir = b.dir.clone();
    let link = Proxy::start(&b.addr);
    let mut p = Logged::spawn(protect_cmd(
        castor(),
        "sim:mem=16MiB,workload=mixed,writes=300,seed=21,threads=2",
        &link.addr,
        &arb,
    ));
    let tp = token_of(
        &p.wait_for("fencing token", Duration::from_secs(20))
            .unwrap_or_else(|| p.text()),
    );
    p.wait_for("acked", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("{}", p.text()));
    link.cut();
    let cut = Instant::now();
    let (st, err) = b.wait();
    let took = cut.elapsed();
    eprintln!(
        "(b) backup gave up {} ms after the cut (exit {:?})",
        took.as_millis(),
        st.code()
    );
    assert_eq!(st.code(), Some(3), "{err}");
    assert!(err.contains("NOT ACTIVATING"), "{err}");
    assert!(!err.contains("ACTIVATED"), "{err}");
    assert!(!bdir.join("activated").exists());
    // It campaigned for the heartbeat timeout plus a whole TTL.
    assert!(took >= TTL + Duration::from_millis(500), "{took:?}");
    // The primary runs on, holding the key it created.
    assert_eq!(
        p.exit_code(Duration::from_millis(200)),
        None,
        "primary ended:\n{}",
        p.text()
    );
    let mut probe =
        EtcdArbiter::new(EtcdSpec::parse(arb.strip_prefix("etcd:").unwrap(), None).unwrap());
    assert_eq!(probe.try_acquire().unwrap(), None);
    assert_eq!(
        probe.last_holder().map(|h| h.0 as u64),
        Some(tp),
        "the key is still the primary's"
    );
    assert!(!p.text().contains("SELF-FENCED"), "{}", p.text());
}

// ---- kvm counter guest: who releases output ----

const GUEST: &str = "10.202.0.2";

fn ask(sock: &UdpSocket, id: u64) -> Option<u64> {
    let mut msg = [0u8; 16];
    msg[..8].copy_from_slice(&id.to_le_bytes());
    let mut buf = [0u8; 64];
    let _ = sock.send(&msg);
    let sent = Instant::now();
    while sent.elapsed() < Duration::from_millis(150) {
        match sock.recv(&mut buf) {
            Ok(16) if buf[..8] == id.to_le_bytes() => {
                return Some(u64::from_le_bytes(buf[8..16].try_into().unwrap()))
            }
            Ok(_) => {}
            Err(_) => {}
        }
    }
    None
}

/// Packets each TAP received from its VMM: (primary's cp0, backup's cb0).
fn tap_rx(ns: &str) -> (u64, u64) {
    let o = std::process::Command::new("ip")
        .args(["-n", ns, "-s", "-j", "link", "show"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("ip -j output");
    let rx = |name: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|l| l["ifname"] == name)
            .and_then(|l| l["stats64"]["rx"]["packets"].as_u64())
            .unwrap_or_else(|| panic!("no rx count for {name}"))
    };
    (rx("cp0"), rx("cb0"))
}

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// (c) cut the primary off from etcd.
    EtcdCut,
    /// (d) SIGSTOP the primary until the backup activated, then SIGCONT.
    Stop,
}

/// One partition trial with the counter guest; panics on a violation.
/// Returns a line of timings, or None when the machine cannot run it.
/// `output_commit: false` runs the primary with `--no-output-commit`: then
/// only the lease gate stands between a resumed primary and the wire (and
/// the client's counters may step back, which is not checked).
fn kvm_trial(fault: Fault, trial: u32, output_commit: bool) -> Option<String> {
    if std::fs::File::open("/dev/kvm").is_err() {
        eprintln!("SKIP: /dev/kvm is not available");
        return None;
    }
    let ns = Netns::create("etcd")?;
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["addr", "add", "10.202.0.1/24", "dev", "br0"]);
    ns.ip(&["link", "set", "br0", "up"]);
    for tap in ["cp0", "cb0"] {
        ns.ip(&["tuntap", "add", "dev", tap, "mode", "tap"]);
        ns.ip(&["link", "set", tap, "master", "br0"]);
        ns.ip(&["link", "set", tap, "up"]);
    }
    let e = Etcd::start(Some(&ns))?;
    let key = format!("castor/test-{trial}");
    let arb_b = format!("etcd:{}/{key}", e.url);
    let etcd_link = ns.run(|| Proxy::start(&format!("127.0.0.1:{}", e.port)));
    let arb_p = match fault {
        Fault::EtcdCut => format!("etcd:http://{}/{key}", etcd_link.addr),
        Fault::Stop => arb_b.clone(),
    };
    let dir = tempfile::tempdir().unwrap();
    let b = etcd_backup(
        castor_in(&ns.name),
        dir.path(),
        &arb_b,
        &["--override", "tap=cb0", "--run-for", "6s"],
    );
    let baddr = b.addr.clone();
    let mut b = b;
    let blog = Lines::collect(b.child.stderr.take().unwrap());
    let spec = format!("kvm:guest=counter,tap=cp0,ip={GUEST}");
    let mut pcmd = protect_cmd(castor_in(&ns.name), &spec, &baddr, &arb_p);
    if !output_commit {
        pcmd.arg("--no-output-commit");
    }
    let mut p = Logged::spawn(pcmd);
    p.wait_for("acked", Duration::from_secs(60))
        .unwrap_or_else(|| panic!("{}", p.text()));

    // Sampler: (time, cp0 rx, cb0 rx) every few ms until told to stop.
    let samples = Arc::new(Mutex::new(Vec::<(Instant, u64, u64)>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (s, stop, name) = (samples.clone(), stop.clone(), ns.name.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let (a, b) = tap_rx(&name);
                s.lock().unwrap().push((Instant::now(), a, b));
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let replies = ns.run(|| {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        sock.connect((GUEST, 7777)).unwrap();
        let mut got: Vec<(Instant, u64)> = Vec::new();
        let mut id = 0u64;
        let mut fault_at = None;
        let mut resumed = false;
        let mut activated_at: Option<Instant> = None;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            id += 1;
            if let Some(v) = ask(&sock, id) {
                got.push((Instant::now(), v));
            }
            if fault_at.is_none() && got.len() >= 20 {
                match fault {
                    Fault::EtcdCut => etcd_link.cut(),
                    Fault::Stop => p.signal(libc::SIGSTOP),
                }
                fault_at = Some(Instant::now());
            }
            if activated_at.is_none() && blog.wait_for("ACTIVATED", Duration::ZERO).is_some() {
                activated_at = Some(Instant::now());
            }
            if fault == Fault::Stop && activated_at.is_some() && !resumed {
                p.signal(libc::SIGCONT);
                resumed = true;
            }
            // Enough answers from the activated copy.
            if activated_at.is_some()
                && got.iter().filter(|(t, _)| Some(*t) > activated_at).count() >= 15
            {
                break;
            }
        }
        (
            got,
            fault_at.expect("the fault was injected"),
            activated_at.unwrap_or_else(|| {
                panic!(
                    "the backup did not activate in time; backup:\n{}\nprimary:\n{}",
                    blog.text(),
                    p.text()
                )
            }),
        )
    });
    let (got, fault_at, activated_at) = replies;
    let pcode = p.exit_code(Duration::from_secs(10));
    // Keep sampling a little after the primary ended (or was resumed).
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    sampler.join().unwrap();
    let _ = b.child.kill();
    let _ = b.child.wait();
    let btext = blog.text();
    let ptext = p.text();

    assert!(
        btext.contains("ACTIVATED"),
        "the backup must take over:\n{btext}"
    );
    let s = samples.lock().unwrap();
    // Output from one copy at a time: the primary's TAP never receives a
    // frame once the backup's has received one.
    let first_b = s
        .iter()
        .position(|x| x.2 > s[0].2)
        .expect("the activated copy released output");
    let last_p = s
        .windows(2)
        .rposition(|w| w[1].1 > w[0].1)
        .map_or(0, |i| i + 1);
    assert!(
        last_p < first_b,
        "both copies released output: primary's TAP grew at sample {last_p} ({:?} after the fault), backup's first at {first_b} ({:?})",
        s[last_p].0 - fault_at,
        s[first_b].0 - fault_at
    );
    let p_frozen = s[last_p].1;
    assert_eq!(s.last().unwrap().1, p_frozen);
    assert_eq!(
        pcode,
        Some(5),
        "the primary must self-fence (exit 5):\n{ptext}\n--- backup:\n{btext}"
    );
    assert!(ptext.contains("SELF-FENCED"), "{ptext}");
    assert!(
        btext.contains("ACTIVATED"),
        "the backup must take over:\n{btext}"
    );
    // The client's view: counters only grow, and the guest answers again.
    assert!(
        !output_commit || got.windows(2).all(|w| w[1].1 > w[0].1),
        "counter stepped back: {:?}\n--- primary:\n{ptext}\n--- backup:\n{btext}",
        got.iter().map(|g| g.1).collect::<Vec<_>>()
    );
    // Replies after the backup said it activated: the primary had
    // self-fenced (c) or was stopped or fenced (d) by then.
    let after: Vec<_> = got.iter().filter(|(t, _)| *t > activated_at).collect();
    assert!(
        after.len() >= 10,
        "the guest did not continue on the backup: {} replies",
        after.len()
    );
    let ms = |t: Instant| (t.saturating_duration_since(fault_at)).as_millis();
    Some(format!(
        "last primary output +{} ms, first backup output +{} ms, last counter before {} first after {}, replies {} ({} after failover), primary exit {:?}",
        ms(s[last_p].0),
        ms(s[first_b].0),
        got.iter().rfind(|(t, _)| *t <= activated_at).map_or(0, |g| g.1),
        after[0].1,
        got.len(),
        after.len(),
        pcode
    ))
}

#[test]
fn c_primary_cut_off_from_etcd_self_fences_backup_takes_over() {
    for trial in 0..3 {
        let Some(r) = kvm_trial(Fault::EtcdCut, trial, true) else {
            return;
        };
        eprintln!("(c) trial {trial}: {r}");
    }
}

#[test]
fn d_stopped_primary_resumed_after_takeover_releases_nothing() {
    for trial in 0..3 {
        let Some(r) = kvm_trial(Fault::Stop, 10 + trial, true) else {
            return;
        };
        eprintln!("(d) trial {trial}: {r}");
    }
}

/// (d) without output commit: the resumed primary's guest answers the
/// requests queued on its TAP while it was stopped, and only the lease
/// gate in the output queue and the pause at the next epoch keep those
/// answers off the wire. (Given no lease, i.e. without self-fencing, this
/// test fails: the primary's TAP grows after the backup's.)
#[test]
fn d_without_output_commit_the_lease_gate_alone_holds_output() {
    for trial in 0..2 {
        let Some(r) = kvm_trial(Fault::Stop, 20 + trial, false) else {
            return;
        };
        eprintln!("(d, no output commit) trial {trial}: {r}");
    }
}

/// (e) The activated backup holds its etcd lease the same way: cut off from
/// etcd it self-fences its guest (exit 5) within the TTL.
#[test]
fn e_activated_backup_cut_off_from_etcd_self_fences() {
    if sim_unavailable() {
        return;
    }
    let Some(e) = Etcd::start(None) else { return };
    let key = "castor/test-e";
    let backup_etcd = Proxy::start(&format!("127.0.0.1:{}", e.port));
    let arb_b = format!("etcd:http://{}/{key}", backup_etcd.addr);
    let arb_p = format!("etcd:{}/{key}", e.url);
    let dir = tempfile::tempdir().unwrap();
    let b = etcd_backup(
        castor(),
        dir.path(),
        &arb_b,
        &["--epoch", "5ms", "--run-for", "60s"],
    );
    let mut b = b;
    let blog = Lines::collect(b.child.stderr.take().unwrap());
    let p = Logged::spawn(protect_cmd(
        castor(),
        "sim:mem=16MiB,workload=mixed,writes=300,seed=21,threads=2",
        &b.addr,
        &arb_p,
    ));
    p.wait_for("acked", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("{}", p.text()));
    drop(p); // SIGKILL
    blog.wait_for("ACTIVATED", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("backup did not activate:\n{}", blog.text()));
    backup_etcd.cut();
    let cut = Instant::now();
    // The message is printed when the guest has been stopped; the exit
    // comes after a last (here: futile) attempt to revoke the lease.
    let fenced = blog.wait_for("SELF-FENCED", TTL * 3);
    let took = cut.elapsed();
    let code = wait_deadline(&mut b.child, EXIT_PATIENCE)
        .unwrap_or_else(|| panic!("backup did not exit (killed):\n{}", blog.text()))
        .code();
    let text = blog.text();
    eprintln!(
        "(e) activated backup self-fenced {} ms after the cut, exited {} ms after (exit {code:?})",
        took.as_millis(),
        cut.elapsed().as_millis()
    );
    assert!(fenced.is_some(), "{text}");
    assert_eq!(code, Some(5), "{text}");
    // `took` is when this test *read* the SELF-FENCED line through a pipe,
    // polled every 5 ms: on a loaded host (load 12+, 2 cores) it lagged the
    // act by up to 0.6 s. That no output leaves after the lease is checked
    // by the TAP counters of (c) and (d) and the lease gate's unit tests;
    // here the bound is the one the issue sets for every loss: TTL + 1 s.
    assert!(
        took <= TTL + Duration::from_secs(1),
        "self-fenced only {took:?} after the cut (TTL {TTL:?})"
    );
}

/// (f) The link is cut; the primary declares its backup lost and runs on
/// unprotected, which it first records in etcd (heir: nobody); then it
/// dies. The backup wins the arbiter once the dead primary's lease
/// expired, but its replica is older than output the world has seen: it
/// must not activate (exit 6), and says why.
#[test]
fn f_backup_of_a_primary_that_ran_on_unprotected_does_not_activate() {
    if sim_unavailable() {
        return;
    }
    let Some(e) = Etcd::start(None) else { return };
    let arb = format!("etcd:{}/castor/test-f", e.url);
    let dir = tempfile::tempdir().unwrap();
    // Suspects the primary only after 4 s of silence, then campaigns for
    // 4 s + TTL: the primary declares it lost (1 s), runs on unprotected
    // and dies within that window.
    let b = Backup::start_cmd(
        castor(),
        &dir.path().join("replica"),
        &["--activate", "--heartbeat-timeout", "4s", "--arbiter", &arb],
        KEY,
    );
    let bdir = b.dir.clone();
    let link = Proxy::start(&b.addr);
    let mut cmd = protect_cmd(
        castor(),
        "sim:mem=16MiB,workload=edits,rate=2000,seed=8",
        &link.addr,
        &arb,
    );
    cmd.args(["--backup-timeout", "1s"]);
    let mut p = Logged::spawn(cmd);
    p.wait_for("acked", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("{}", p.text()));
    link.cut();
    p.wait_for("UNPROTECTED", Duration::from_secs(15))
        .unwrap_or_else(|| panic!("the primary never ran on unprotected:\n{}", p.text()));
    p.signal(libc::SIGKILL);
    let (st, err) = b.wait_within(Duration::from_secs(60));
    eprintln!("(f) backup:\n{err}");
    assert_eq!(st.code(), Some(6), "primary:\n{}\nbackup:\n{err}", p.text());
    assert!(err.contains("NOT ACTIVATING"), "{err}");
    assert!(
        err.contains("UNPROTECTED after losing this backup"),
        "{err}"
    );
    assert!(!err.contains("ACTIVATED"), "{err}");
    assert!(!bdir.join("activated").exists());
    let _ = p.exit_code(Duration::from_secs(5));
}
