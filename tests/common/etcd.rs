//! A private etcd for a test: free ports on loopback, data in a tempdir,
//! killed on drop. Optionally inside a network namespace of the test's own.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, Netns, Reaped};

pub struct Etcd {
    /// `http://IP:PORT`, the client URL (IP is 127.0.0.1 unless started
    /// with [`Etcd::start_on`]).
    pub url: String,
    pub port: u16,
    proc: Reaped,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd (in `ns` when given) and waits until it serves; None
    /// (reason printed) when /usr/bin/etcd is missing.
    pub fn start(ns: Option<&Netns>) -> Option<Etcd> {
        Self::start_on(ns, "127.0.0.1")
    }

    /// [`Etcd::start`] serving clients on `ip` (an address of `ns`), so
    /// that other namespaces can reach it.
    pub fn start_on(ns: Option<&Netns>, ip: &str) -> Option<Etcd> {
        const BIN: &str = "/usr/bin/etcd";
        if !std::path::Path::new(BIN).exists() {
            eprintln!("SKIP: {BIN} is missing (apt-get install etcd-server)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        // Ports picked on the host's loopback; a fresh namespace has all of
        // them free anyway.
        let (port, peer) = (free_port(), free_port());
        let url = format!("http://{ip}:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        cmd.arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--name", "t", "--listen-client-urls", &url])
            .args(["--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("t={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let proc = Reaped::spawn(&mut cmd);
        let e = Etcd {
            url,
            port,
            proc,
            _dir: dir,
        };
        let ready = || {
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(20) {
                let r = ureq::get(&format!("{}/health", e.url))
                    .timeout(Duration::from_millis(500))
                    .call();
                if let Ok(r) = r {
                    // Healthy, and a first write went through: a fresh
                    // etcd's first disk syncs are slow on a loaded machine,
                    // longer than a client's per-request deadline.
                    if r.into_string().unwrap_or_default().contains("true")
                        && ureq::post(&format!("{}/v3/kv/put", e.url))
                            .timeout(Duration::from_secs(5))
                            .send_string(r#"{"key":"d2FybXVw","value":"MQ=="}"#)
                            .is_ok()
                    {
                        return true;
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            false
        };
        let ok = match ns {
            Some(ns) => ns.run(ready),
            None => ready(),
        };
        assert!(
            ok,
            "etcd did not become healthy:\n{}",
            std::fs::read_to_string(e._dir.path().join("etcd.log")).unwrap_or_default()
        );
        Some(e)
    }
}

impl Etcd {
    /// etcd's own complaints so far (slow disk syncs, slow requests,
    /// elections, warnings and errors): what a failing test should show.
    pub fn complaints(&self) -> String {
        let log = std::fs::read_to_string(self._dir.path().join("etcd.log")).unwrap_or_default();
        let bad: Vec<&str> = log
            .lines()
            .filter(|l| {
                ["\"warn\"", "\"error\"", "took too long", "slow", "election"]
                    .iter()
                    .any(|p| l.contains(p))
            })
            .collect();
        bad[bad.len().saturating_sub(20)..].join("\n")
    }

    /// Sends `sig` to the etcd process (SIGSTOP / SIGCONT: an arbiter
    /// that stops answering, then comes back with its state intact).
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own unreaped child: the pid is still ours.
        let rc = unsafe { libc::kill(self.proc.0.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill etcd: {}", std::io::Error::last_os_error());
    }
}
