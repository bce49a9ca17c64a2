//! Helpers shared by the integration tests: they drive the real `castor`
//! binary as separate processes.
#![allow(dead_code)]

pub mod etcd;
pub mod fake;
pub mod lab;
pub mod lines;
pub mod packet;
pub mod proxy;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

pub const KEY: &str = "integration-test-key-0123456789";

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

/// Skips (returns true) when the kernel lacks what the sim domain needs.
pub fn sim_unavailable() -> bool {
    let out = castor()
        .args([
            "digest",
            "--domain",
            "sim:mem=64KiB,writes=1",
            "--at-epoch",
            "0",
        ])
        .output()
        .expect("running castor");
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
        let mut child = cmd
            .env("CASTOR_PSK", key)
            .args(["backup", "--listen", listen, "--state-dir"])
            .arg(dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning backup");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
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
    pub fn wait(mut self) -> (ExitStatus, String) {
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let st = self.child.wait().unwrap();
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
/// test leaves nothing behind.
pub struct Reaped(pub Child);

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
    let mut p = Reaped(
        castor()
            .args([
                "protect", "--domain", spec, "--backup", addr, "--epoch", epoch,
            ])
            .args(extra)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    first_progress_line(&mut p.0);
    p
}

/// Reads a `protect` child's stderr until its first progress line that
/// reports an acknowledged checkpoint (the event that checkpoints are
/// flowing: a line saying `acked 0` can come while the seed is still being
/// copied, before the backup holds anything); returns that line.
pub fn first_progress_line(p: &mut Child) -> String {
    let err = p.stderr.take().expect("stderr piped");
    let mut lines = BufReader::new(err).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if acked_in(&line).is_some_and(|n| n >= 1) {
            // Keep draining in the background so the child never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return line;
        }
        seen.push(line);
    }
    panic!(
        "protect ended without a progress line:\n{}",
        seen.join("\n")
    );
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
    let out = cmd.output().unwrap();
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

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
