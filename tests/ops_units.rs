//! The service units and the cluster resource agent in tools/: systemd's
//! own verifier on the units, `ocf-tester` (Debian's resource-agents) on
//! the OCF agent driving real castor processes on loopback, and the example
//! configs accepted by the binary.

mod common;
use common::*;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn installed(tool: &str, package: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(tool).is_file();
    if !found {
        eprintln!("SKIP: {tool} not installed (Debian package {package})");
    }
    found
}

/// `systemd-analyze verify tools/systemd/*.service`, as is: no finding.
#[test]
fn systemd_units_verify_clean() {
    if !installed("systemd-analyze", "systemd") {
        return;
    }
    let mut units = Vec::new();
    for e in std::fs::read_dir(repo().join("tools/systemd")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "service") {
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(
                text.contains("Type=notify") && text.contains("WatchdogSec="),
                "{p:?}"
            );
            // The pause enters SCHED_FIFO 1 and raises its helpers 10 nice
            // steps (src/domain/priority.rs); the sandbox must allow both.
            assert!(!text.contains("RestrictRealtime=yes"), "{p:?}");
            assert!(text.contains("\nLimitRTPRIO=1\n"), "{p:?}");
            assert!(text.contains("\nLimitNICE=-10\n"), "{p:?}");
            units.push(p);
        }
    }
    assert_eq!(units.len(), 2, "castor-backup@ and castor-protect@");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "systemd-analyze verify:\n{said}");
    assert!(
        said.trim().is_empty(),
        "systemd-analyze verify findings:\n{said}"
    );
}

/// A backup that restarts whenever it exits: the test's stand-in for the
/// peer node's unpromoted instance (a primary's clean stop ends its stream).
struct PeerBackup {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeerBackup {
    fn start(addr: &str, dir: &Path) -> PeerBackup {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, addr, dir) = (stop.clone(), addr.to_string(), dir.to_path_buf());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                // Guarded: dies with the test process even if killed.
                let mut c: Child = spawn_guarded(
                    castor()
                        .args(["backup", "--listen", &addr, "--state-dir"])
                        .arg(&dir)
                        .stdout(Stdio::null())
                        .stderr(Stdio::null()),
                )
                .unwrap();
                while !s.load(Ordering::Relaxed) {
                    if c.try_wait().unwrap().is_some() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        });
        PeerBackup {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for PeerBackup {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A directory `nobody` can traverse (ocf-tester runs meta-data as nobody).
fn open_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("castor-ocf-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

#[test]
fn ocf_agent_meta_data_is_valid_resource_agent_xml() {
    let out = Command::new(repo().join("tools/ocf/castor"))
        .arg("meta-data")
        .output()
        .unwrap();
    assert!(out.status.success());
    let xml = String::from_utf8(out.stdout).unwrap();
    for a in [
        "start",
        "stop",
        "monitor",
        "promote",
        "demote",
        "validate-all",
        "meta-data",
    ] {
        assert!(
            xml.contains(&format!("<action name=\"{a}\"")),
            "action {a}:\n{xml}"
        );
    }
    if !installed("xmllint", "libxml2-utils") {
        return;
    }
    let dtd = Path::new("/usr/share/resource-agents/ra-api-1.dtd");
    if !dtd.exists() {
        eprintln!("SKIP part: {dtd:?} missing (Debian package resource-agents)");
        return;
    }
    let mut c = Command::new("xmllint")
        .args(["--noout", "--valid", "-"])
        .current_dir(dtd.parent().unwrap())
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        c.stdin.take().unwrap().write_all(xml.as_bytes()).unwrap();
    }
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "meta-data does not conform to ra-api-1.dtd:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ocf_tester_passes() {
    if sim_unavailable()
        || !installed("ocf-tester", "resource-agents")
        || !installed("xmllint", "libxml2-utils")
    {
        return;
    }
    let d = open_dir();
    let agent = d.path().join("castor");
    std::fs::copy(repo().join("tools/ocf/castor"), &agent).unwrap();
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let peer = format!("127.0.0.1:{}", free_port());
    let _peer = PeerBackup::start(&peer, &d.path().join("peer"));
    let (listen, metrics) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let out = Command::new("ocf-tester")
        .args(["-n", "castor-test"])
        .arg("-o")
        .arg(format!("binary={}", env!("CARGO_BIN_EXE_castor")))
        .args(["-o", "domain=sim:mem=16MiB,workload=edits,rate=5000"])
        .arg("-o")
        .arg(format!("listen={listen}"))
        .arg("-o")
        .arg(format!("peer={peer}"))
        .arg("-o")
        .arg(format!("metrics={metrics}"))
        .arg("-o")
        .arg(format!("state_dir={}", d.path().join("state").display()))
        .arg("-o")
        .arg(format!(
            "arbiter=local:{}",
            d.path().join("arbiter.lock").display()
        ))
        .arg(&agent)
        .env("CASTOR_PSK", KEY)
        .env("HA_RSCTMP", d.path().join("run"))
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let log = std::fs::read_to_string(d.path().join("state/castor.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "ocf-tester:\n{said}\ncastor.log:\n{log}"
    );
    assert!(said.contains("passed all tests"), "{said}");
}

#[test]
fn example_configs_are_accepted() {
    // `--config` with each example: the keys are all known to the command
    // (a parse error names the key); --help stops before anything runs.
    for (cmd, file) in [
        ("protect", "protect.toml"),
        ("backup", "backup.toml"),
        ("protect", "pair.toml"),
        ("backup", "pair.toml"),
    ] {
        let out = output_within(
            castor()
                .args([cmd, "--config"])
                .arg(repo().join("tools/config").join(file))
                .arg("--help"),
            EXIT_PATIENCE,
        );
        assert!(
            out.status.success(),
            "castor {cmd} --config {file}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// One node's instance of the agent: its parameters as OCF sees them.
struct Node {
    name: &'static str,
    env: Vec<(String, String)>,
    agent: PathBuf,
}

impl Node {
    fn new(
        name: &'static str,
        d: &Path,
        agent: &Path,
        listen: &str,
        peer: &str,
        counter: &str,
    ) -> Node {
        let metrics = format!("127.0.0.1:{}", free_port());
        let env = vec![
            ("OCF_RESOURCE_INSTANCE", format!("web-{name}")),
            (
                "HA_RSCTMP",
                d.join(format!("run-{name}")).display().to_string(),
            ),
            (
                "OCF_RESKEY_binary",
                env!("CARGO_BIN_EXE_castor").to_string(),
            ),
            (
                "OCF_RESKEY_domain",
                format!("sim:mem=16MiB,workload=edits,rate=5000,counter={counter}"),
            ),
            ("OCF_RESKEY_listen", listen.to_string()),
            ("OCF_RESKEY_peer", peer.to_string()),
            ("OCF_RESKEY_metrics", metrics),
            (
                "OCF_RESKEY_state_dir",
                d.join(format!("state-{name}")).display().to_string(),
            ),
            (
                "OCF_RESKEY_arbiter",
                format!("local:{}", d.join("arbiter.lock").display()),
            ),
            ("CASTOR_PSK", KEY.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Node {
            name,
            env,
            agent: agent.to_path_buf(),
        }
    }

    /// Runs `action`; its exit status and what it said.
    fn act(&self, action: &str) -> (i32, String) {
        let out = Command::new(&self.agent)
            .arg(action)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr).to_string();
        (out.status.code().unwrap_or(-1), said)
    }

    fn expect(&self, action: &str, rc: i32) {
        let (got, said) = self.act(action);
        let dir = &self
            .env
            .iter()
            .find(|(k, _)| k == "OCF_RESKEY_state_dir")
            .unwrap()
            .1;
        let log = std::fs::read_to_string(Path::new(dir).join("castor.log")).unwrap_or_default();
        assert_eq!(
            got, rc,
            "node {} {action}: {said}\ncastor.log:\n{log}",
            self.name
        );
    }

    /// The pid of the castor process this instance runs.
    fn pid(&self) -> i32 {
        let run = &self.env.iter().find(|(k, _)| k == "HA_RSCTMP").unwrap().1;
        std::fs::read_to_string(
            Path::new(run)
                .join("castor-web-".to_string() + self.name)
                .join("pid"),
        )
        .unwrap()
        .trim()
        .parse()
        .unwrap()
    }
}

/// Two instances of the agent as Pacemaker drives them on two nodes: A
/// promoted (a fresh primary), B unpromoted (its backup); A's castor is
/// SIGKILLed (the node dies; Pacemaker would fence it); monitor on B finds
/// the replica saved; promote on B activates it, and the guest's counter
/// answers again, continuing where it was.
#[test]
fn ocf_promote_after_primary_loss_activates_the_saved_replica() {
    if sim_unavailable() {
        return;
    }
    let d = open_dir();
    let agent = d.path().join("castor");
    std::fs::copy(repo().join("tools/ocf/castor"), &agent).unwrap();
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (la, lb) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let counter = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let a = Node::new("a", d.path(), &agent, &la, &lb, &counter.to_string());
    let b = Node::new("b", d.path(), &agent, &lb, &la, &counter.to_string());
    let cleanup = |n: &Node| {
        let _ = n.act("stop");
    };
    a.expect("start", 0);
    b.expect("start", 0);
    a.expect("promote", 0);
    a.expect("monitor", 8);
    b.expect("monitor", 0);

    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client.connect(counter).unwrap();
    let ask = |id: u64| {
        castor::domain::sim::counter::ask(
            &client,
            id,
            Duration::from_millis(100),
            Duration::from_secs(20),
        )
    };
    let mut last = 0;
    for id in 1..=20 {
        let v = ask(id).expect("the primary's counter answers");
        assert_eq!(v, last + 1, "counter steps by one");
        last = v;
    }
    // Node A dies.
    // SAFETY: kill(2) on a process this test started through the agent.
    unsafe { libc::kill(a.pid(), libc::SIGKILL) };
    // Pacemaker's monitor on B: still a healthy unpromoted instance, now
    // with a saved replica; then B is promoted.
    let t0 = std::time::Instant::now();
    while b.act("monitor").0 == 0 && !d.path().join("state-b/ocf-replica-ready").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "B never saw its primary's stream end"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    b.expect("promote", 0);
    b.expect("monitor", 8);
    a.expect("monitor", 9);
    for id in 21..=30 {
        let v = ask(id).expect("the activated copy's counter answers");
        assert_eq!(
            v,
            last + 1,
            "the counter continues after the failover (request {id})"
        );
        last = v;
    }
    cleanup(&b);
    cleanup(&a);
    b.expect("monitor", 7);
}

/// Type=notify as systemd runs it: `$NOTIFY_SOCKET` gets READY=1 once the
/// backup listens, then WATCHDOG=1 every half `$WATCHDOG_USEC`.
#[test]
fn backup_notifies_ready_and_pings_the_watchdog() {
    let d = tempfile::tempdir().unwrap();
    let sock_path = d.path().join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let _b = Reaped::spawn(
        castor()
            .args(["backup", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(d.path().join("replica"))
            .env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", "200000")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let mut buf = [0u8; 256];
    let mut got = Vec::new();
    while !(got.iter().any(|m: &String| m.starts_with("READY=1"))
        && got.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2)
    {
        let n = sock.recv(&mut buf).expect("a notification within 20 s");
        got.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    let ready = got.iter().find(|m| m.starts_with("READY=1")).unwrap();
    assert!(ready.contains("STATUS=listening on 127.0.0.1:"), "{ready}");
}
