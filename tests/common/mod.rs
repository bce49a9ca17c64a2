//! Helpers shared by the integration tests: they drive the real `castor`
//! binary as separate processes.
#![allow(dead_code)]

pub mod etcd;
pub mod fake;
pub mod lab;
pub mod lines;
pub mod nbd;
pub mod packet;
pub mod proxy;
pub mod trials;
pub mod writes;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a backup may take to print its `listening on` line, and a
/// `protect` its first acknowledged checkpoint, on a loaded 2-core machine.
pub const START_PATIENCE: Duration = Duration::from_secs(120);
/// How long [`Backup::wait`] waits for a backup to exit by itself.
pub const EXIT_PATIENCE: Duration = Duration::from_secs(300);

pub const KEY: &str = "integration-test-key-0123456789";

/// `local:DIR/pair.lock`: an arbiter of the test's own. The default lock
/// (/run/castor/pair-PORT.lock) is shared by the whole machine, and tests in
/// different network namespaces can get the same port.
pub fn pair_lock(dir: &Path) -> String {
    format!("local:{}", dir.join("pair.lock").display())
}

/// `castor` run inside network namespace `ns` (`ip netns exec`).
pub fn castor_in(ns: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_castor")]);
    c.env("CASTOR_PSK", KEY);
    c
}

pub fn castor() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_castor"));
    c.env("CASTOR_PSK", KEY);
    c
}

/// A TCP port on loopback that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Skips (returns true) when the kernel lacks what the sim domain needs.
pub fn sim_unavailable() -> bool {
    let out = output_within(
        castor().args([
            "digest",
            "--domain",
            "sim:mem=64KiB,writes=1",
            "--at-epoch",
            "0",
        ]),
        Duration::from_secs(120),
    );
    if out.status.success() {
        return false;
    }
    let err = String::from_utf8_lossy(&out.stderr);
    // Only a kernel without the dirty-tracking features is a reason to
    // skip; any other failure is a broken castor and must fail the test.
    assert!(
        err.contains("dirty tracking unavailable"),
        "castor digest failed for a reason other than the kernel:\n{err}"
    );
    eprintln!("SKIP: sim domain unavailable here: {}", err.trim());
    true
}

pub struct Backup {
    pub child: Child,
    pub addr: String,
    pub dir: PathBuf,
}

impl Backup {
    pub fn start(dir: &Path) -> Backup {
        Self::start_with(dir, &[], KEY)
    }

    pub fn start_with(dir: &Path, extra: &[&str], key: &str) -> Backup {
        Self::start_cmd(castor(), dir, extra, key)
    }

    /// A backup started by `cmd` (e.g. [`castor_in`] a namespace).
    pub fn start_cmd(cmd: Command, dir: &Path, extra: &[&str], key: &str) -> Backup {
        Self::start_at(cmd, "127.0.0.1:0", dir, extra, key)
    }

    /// A backup listening on `listen` (a fixed port: a fresh backup where
    /// a lost one was).
    pub fn start_at(
        mut cmd: Command,
        listen: &str,
        dir: &Path,
        extra: &[&str],
        key: &str,
    ) -> Backup {
        let mut child = spawn_guarded(
            cmd.env("CASTOR_PSK", key)
                .args(["backup", "--listen", listen, "--state-dir"])
                .arg(dir)
                .args(extra)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
        .expect("spawning backup");
        // The first line on a thread, so a backup that never prints it
        // fails the test instead of hanging it.
        let out = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(START_PATIENCE) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("backup printed no `listening on` line within {START_PATIENCE:?}");
            }
        };
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("backup's first line: {line:?}"))
            .to_string();
        Backup {
            child,
            addr,
            dir: dir.to_path_buf(),
        }
    }

    /// Waits for the backup to exit; returns its status and stderr.
    /// Panics (after SIGKILL) when it has not exited within [`EXIT_PATIENCE`].
    pub fn wait(self) -> (ExitStatus, String) {
        self.wait_within(EXIT_PATIENCE)
    }

    /// [`Backup::wait`] with its own deadline.
    pub fn wait_within(mut self, patience: Duration) -> (ExitStatus, String) {
        let err = drain(self.child.stderr.take().unwrap());
        let st = wait_deadline(&mut self.child, patience);
        let err = err.take();
        let Some(st) = st else {
            panic!("backup did not exit within {patience:?} (killed); stderr:\n{err}");
        };
        assert!(!err.contains("panicked"), "backup panicked:\n{err}");
        (st, err)
    }
}

impl Drop for Backup {
    /// A failing test must not leave its backup running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process killed (SIGKILL) and reaped when dropped, so a failing
/// test leaves nothing behind. Start it with [`Reaped::spawn`] so that it
/// also dies if the test process itself is killed.
pub struct Reaped(pub Child);

impl Reaped {
    /// Spawns `cmd` with [`spawn_guarded`]; panics naming the program when
    /// it cannot start.
    pub fn spawn(cmd: &mut Command) -> Reaped {
        let what = format!("{:?}", cmd.get_program());
        Reaped(spawn_guarded(cmd).unwrap_or_else(|e| panic!("spawning {what}: {e}")))
    }

    /// Waits up to `patience` for the child to exit; SIGKILLs it and
    /// panics when it does not.
    pub fn wait_within(&mut self, patience: Duration) -> ExitStatus {
        wait_deadline(&mut self.0, patience)
            .unwrap_or_else(|| panic!("child did not exit within {patience:?} (killed)"))
    }
}

/// Waits up to `patience` for `c` to exit; on timeout SIGKILLs and reaps
/// it and returns None.
pub fn wait_deadline(c: &mut Child, patience: Duration) -> Option<ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Some(st) = c.try_wait().expect("waitpid") {
            return Some(st);
        }
        if t0.elapsed() > patience {
            let _ = c.kill();
            let _ = c.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A stream read to its end on a thread.
pub struct Drained(Receiver<Vec<u8>>);

/// Reads `r` to its end on a thread (so the child never blocks on a full pipe).
pub fn drain(mut r: impl Read + Send + 'static) -> Drained {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = r.read_to_end(&mut b);
        let _ = tx.send(b);
    });
    Drained(rx)
}

impl Drained {
    /// Everything read, once the writer ended (bounded: a grandchild that
    /// inherited the pipe must not hang the test).
    pub fn take(self) -> String {
        match self.0.recv_timeout(Duration::from_secs(10)) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(_) => "<stream still open 10 s after the child ended>".into(),
        }
    }
}

/// `cmd.output()` with a deadline and a guarded child: panics (after
/// SIGKILL) with what it printed when it runs longer than `patience`.
pub fn output_within(cmd: &mut Command, patience: Duration) -> Output {
    let what = format!("{cmd:?}");
    let mut c = Reaped::spawn(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let out = drain(c.0.stdout.take().unwrap());
    let err = drain(c.0.stderr.take().unwrap());
    let status = wait_deadline(&mut c.0, patience);
    let (stdout, stderr) = (out.take(), err.take());
    let Some(status) = status else {
        panic!("{what} ran longer than {patience:?} (killed); stderr:\n{stderr}");
    };
    Output {
        status,
        stdout: stdout.into_bytes(),
        stderr: stderr.into_bytes(),
    }
}

/// One spawn request for the spawner thread.
struct SpawnJob(*mut Command, SyncSender<std::io::Result<Child>>);
// SAFETY: the requesting thread blocks until the reply, so the Command is
// used by exactly one thread at a time.
unsafe impl Send for SpawnJob {}

/// Spawns `cmd` so that the child is SIGKILLed when the test process dies
/// (PR_SET_PDEATHSIG), even by SIGKILL or abort where no Drop runs. The
/// kernel sends that signal when the *thread* that forked the child ends,
/// so every guarded child is forked by one spawner thread that lives as
/// long as the process. Note: the child starts in the spawner's (the
/// initial) network namespace; use [`castor_in`] for another one.
pub fn spawn_guarded(cmd: &mut Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<Sender<SpawnJob>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = channel::<SpawnJob>();
        std::thread::spawn(move || {
            for SpawnJob(cmd, reply) in rx {
                // SAFETY: see SpawnJob: the requester waits for the reply.
                let cmd = unsafe { &mut *cmd };
                let _ = reply.send(cmd.spawn());
            }
        });
        Mutex::new(tx)
    });
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and calls only
    // async-signal-safe functions (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl: nobody would kill us.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let (reply_tx, reply_rx) = sync_channel(1);
    tx.lock()
        .unwrap()
        .send(SpawnJob(cmd as *mut Command, reply_tx))
        .expect("spawner thread alive");
    reply_rx.recv().expect("spawner thread replies")
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `castor protect` of `spec` against `addr` with `epoch` epochs and
/// returns once checkpoints are flowing (its first progress line).
pub fn protect_flowing(spec: &str, addr: &str, epoch: &str) -> Reaped {
    protect_flowing_with(spec, addr, epoch, &[])
}

/// [`protect_flowing`] with extra arguments (e.g. `--arbiter`).
pub fn protect_flowing_with(spec: &str, addr: &str, epoch: &str, extra: &[&str]) -> Reaped {
    let mut p = Reaped::spawn(
        castor()
            .args([
                "protect", "--domain", spec, "--backup", addr, "--epoch", epoch,
            ])
            .args(extra)
            .stderr(std::process::Stdio::piped()),
    );
    first_progress_line(&mut p.0);
    p
}

/// Reads a `protect` child's stderr until its first progress line that
/// reports an acknowledged checkpoint (the event that checkpoints are
/// flowing: a line saying `acked 0` can come while the seed is still being
/// copied, before the backup holds anything); returns that line. Panics
/// (after SIGKILL) when none comes within [`START_PATIENCE`].
pub fn first_progress_line(p: &mut Child) -> String {
    let err = p.stderr.take().expect("stderr piped");
    let (tx, rx) = channel();
    let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
    let keep = seen.clone();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(err).lines();
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if acked_in(&line).is_some_and(|n| n >= 1) {
                let _ = tx.send(line);
                // Keep draining so the child never blocks on a full pipe.
                lines.for_each(drop);
                return;
            }
            keep.lock().unwrap().push(line);
        }
    });
    match rx.recv_timeout(START_PATIENCE) {
        Ok(line) => line,
        Err(e) => {
            let _ = p.kill();
            let _ = p.wait();
            let why = match e {
                std::sync::mpsc::RecvTimeoutError::Timeout => format!("within {START_PATIENCE:?}"),
                _ => "before it ended".into(),
            };
            panic!(
                "protect printed no acknowledged progress line {why}:\n{}",
                seen.lock().unwrap().join("\n")
            );
        }
    }
}

/// The acknowledged epoch a progress line reports (`… acked N | …`).
fn acked_in(line: &str) -> Option<u64> {
    let rest = line.split_once("acked")?.1;
    rest.split_whitespace().next()?.parse().ok()
}

#[derive(Debug, serde::Deserialize)]
pub struct Meta {
    pub epoch: u64,
    pub digest: String,
}

/// The meta.json of the replica `dir/current` names, if one was saved.
pub fn meta(dir: &Path) -> Option<Meta> {
    let ver = std::fs::read_link(dir.join("current")).ok()?;
    let b = std::fs::read(dir.join(ver).join("meta.json")).ok()?;
    Some(serde_json::from_slice(&b).expect("meta.json parses"))
}

/// Runs a castor command that must succeed; returns the first word it printed.
pub fn first_word(cmd: &mut Command) -> String {
    let out = output_within(cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// `castor digest --domain SPEC --at-epoch N`.
pub fn expected_digest(spec: &str, epoch: u64) -> String {
    first_word(castor().args(["digest", "--domain", spec, "--at-epoch", &epoch.to_string()]))
}

/// `castor digest --replica DIR` (verifies the files against meta.json).
pub fn replica_digest(dir: &Path) -> String {
    first_word(castor().args(["digest", "--replica"]).arg(dir))
}

/// A network namespace of the test's own, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A fresh namespace with loopback up, or None (reason printed) when
    /// this machine cannot make one.
    pub fn create(tag: &str) -> Option<Netns> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: needs root for network namespaces and TAP devices");
            return None;
        }
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(sweep_dead_namespaces);
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("castor-{tag}-{}-{n}", std::process::id());
        match Command::new("ip").args(["netns", "add", &name]).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                eprintln!(
                    "SKIP: ip netns add: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                return None;
            }
            Err(e) => {
                eprintln!("SKIP: cannot run ip (iproute2): {e}");
                return None;
            }
        }
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        Some(ns)
    }

    /// `ip -n NS args...`; panics with ip's message on failure.
    pub fn ip(&self, args: &[&str]) {
        let o = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .expect("running ip");
        assert!(
            o.status.success(),
            "ip -n {} {args:?}: {}",
            self.name,
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// Runs `f` on a thread that entered the namespace.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        use std::os::fd::AsRawFd;
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).expect("opening the netns file");
                // SAFETY: `ns` is an open netns fd; CLONE_NEWNET moves only this thread.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

/// Deletes the namespaces (with their bridges, TAPs and veths) of test
/// processes that died without running their Drops (SIGKILL, abort): names
/// `castor-TAG-PID-N` whose PID no longer exists. A live PID, even reused,
/// keeps its namespaces.
fn sweep_dead_namespaces() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let mut parts = name.rsplitn(3, '-');
        let (Some(_n), Some(pid), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if rest.starts_with("castor-") && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("removing namespace {name} left by dead test process {pid}");
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs `castor bench ARGS --json FILE` to completion, asserts it exited
/// successfully (its stderr otherwise), and returns the JSON report.
pub fn bench_json(args: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = output_within(
        castor().arg("bench").args(args).arg("--json").arg(&json),
        EXIT_PATIENCE,
    );
    assert!(
        out.status.success(),
        "castor bench {args:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}
