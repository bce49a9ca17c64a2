//! `castor demo`: a failover anyone can watch on one host, no root.
//!
//! ```text
//!  castor demo (this process) ── client: one request every 20 ms ──► sim guest's counter (udp)
//!     │ spawns                                                       ▲ replies held until acked
//!     ├── castor protect  (primary: the sim guest, counter=ADDR) ────┘
//!     └── castor backup --activate (local arbiter, echo fence, --metrics)
//!  after `before`: SIGKILL the primary → the backup suspects it, wins the
//!  arbiter, fences, runs the last complete checkpoint → the counter answers
//!  again, from the activated copy, continuing where the client left it.
//! ```
//!
//! The demo checks what a client of the guest would check (guarantee 4):
//! every reply is the previous one plus one, never a step back, never a
//! repeat. It prints the failover timeline from the backup's `/status`
//! (times after suspicion; `CLOCK_MONOTONIC` makes the client's and the
//! kill's times comparable across the processes).

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::domain::sim::counter;
use crate::metrics::mono_ns;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Step(String),
}

fn io(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let op = op.into();
    move |source| DemoError::Io { op, source }
}

/// What the failover demo runs.
#[derive(Debug, Clone)]
pub struct FailoverOpts {
    /// The sim domain spec (without `counter=`: the demo adds it).
    pub domain: String,
    pub epoch: Duration,
    /// Replication before the primary is killed.
    pub before: Duration,
    /// How long the activated copy keeps answering before the demo stops.
    pub after: Duration,
    /// The backup's `--metrics` address (default 127.0.0.1:0).
    pub metrics: Option<String>,
    /// Transport of the pair (tcp, uring, rdma).
    pub transport: String,
}

/// What the client saw and the backup reported.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FailoverReport {
    pub replies: u64,
    pub last_before_kill: u64,
    pub first_after_kill: u64,
    /// Replies that were not the previous one plus one.
    pub steps_back: u64,
    pub repeats: u64,
    pub gaps: u64,
    /// Client: last reply from the primary → first from the activated copy.
    pub client_pause_ms: f64,
    /// Kill → the backup suspected the primary.
    pub kill_to_suspect_ms: f64,
    /// Steps after suspicion, from the backup's /status.
    pub timeline: Vec<(String, f64)>,
    /// Suspicion → the client's first reply from the activated copy.
    pub first_reply_ms: Option<f64>,
}

/// A child castor whose stderr is echoed with a prefix.
struct Proc {
    child: Child,
    echo: Option<JoinHandle<()>>,
}

impl Proc {
    fn spawn(
        mut cmd: Command,
        label: &'static str,
        lines: Sender<String>,
    ) -> Result<(Proc, Option<String>), DemoError> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(io(format!("starting the {label}")))?;
        let mut first = None;
        if label == "backup" {
            let out = child.stdout.take().expect("stdout piped");
            let mut line = String::new();
            BufReader::new(out)
                .read_line(&mut line)
                .map_err(io("reading the backup's address"))?;
            first = Some(
                line.trim()
                    .strip_prefix("listening on ")
                    .ok_or_else(|| DemoError::Step(format!("backup said {line:?}")))?
                    .to_string(),
            );
        }
        let err = child.stderr.take().expect("stderr piped");
        let echo = std::thread::Builder::new()
            .name(format!("demo-echo-{label}"))
            .spawn(move || {
                for l in BufReader::new(err).lines().map_while(Result::ok) {
                    eprintln!("{label:<7} │ {l}");
                    let _ = lines.send(l);
                }
            })
            .map_err(io("spawning an echo thread"))?;
        Ok((
            Proc {
                child,
                echo: Some(echo),
            },
            first,
        ))
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    fn wait(mut self) -> std::process::ExitStatus {
        let st = self
            .child
            .wait()
            .unwrap_or_else(|_| std::os::unix::process::ExitStatusExt::from_raw(1));
        if let Some(e) = self.echo.take() {
            let _ = e.join();
        }
        st
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The client: asks the counter every 20 ms, records every answer.
struct Client {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(u64, u64)>>>, // (value, mono_ns)
    thread: Option<JoinHandle<()>>,
}

impl Client {
    fn start(addr: std::net::SocketAddr) -> Result<Client, DemoError> {
        let sock = UdpSocket::bind("127.0.0.1:0").map_err(io("binding the client socket"))?;
        sock.connect(addr)
            .map_err(io("connecting the client socket"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, v) = (stop.clone(), seen.clone());
        let thread = std::thread::Builder::new()
            .name("demo-client".into())
            .spawn(move || {
                let mut id = 0u64;
                let mut last_print = Instant::now();
                while !s.load(Ordering::Relaxed) {
                    id += 1;
                    // Retries the same id until answered (the guest answers
                    // a retried id with the same value).
                    loop {
                        if s.load(Ordering::Relaxed) {
                            return;
                        }
                        if let Some(val) = counter::ask(
                            &sock,
                            id,
                            Duration::from_millis(100),
                            Duration::from_millis(500),
                        ) {
                            v.lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push((val, mono_ns()));
                            if last_print.elapsed() >= Duration::from_secs(1) {
                                eprintln!("client  │ counter {val}");
                                last_print = Instant::now();
                            }
                            break;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
            .map_err(io("spawning the client thread"))?;
        Ok(Client {
            stop,
            seen,
            thread: Some(thread),
        })
    }

    fn seen(&self) -> Vec<(u64, u64)> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn finish(mut self) -> Vec<(u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.seen()
    }
}

/// Waits for a line containing `needle` (Err after `patience`).
fn wait_line(rx: &Receiver<String>, needle: &str, patience: Duration) -> Result<String, DemoError> {
    let end = Instant::now() + patience;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(needle) => return Ok(l),
            Ok(_) => {}
            Err(_) => {
                return Err(DemoError::Step(format!(
                    "no {needle:?} within {} s",
                    patience.as_secs()
                )))
            }
        }
    }
}

fn castor(exe: &Path, key: &str) -> Command {
    let mut c = Command::new(exe);
    c.env("CASTOR_PSK", key);
    c
}

/// Runs the failover demo; Err when a step did not happen in time.
pub fn run_failover(o: &FailoverOpts) -> Result<FailoverReport, DemoError> {
    let exe = std::env::current_exe().map_err(io("locating the castor binary"))?;
    let dir = tempfile::Builder::new()
        .prefix("castor-demo-")
        .tempdir()
        .map_err(io("creating a state directory"))?;
    let key: String = crate::transport::handshake::random_nonce()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let lock = format!("local:{}", dir.path().join("arbiter.lock").display());
    let caddr = UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map_err(io("picking a port for the counter service"))?;
    let epoch = format!("{}ms", o.epoch.as_millis());

    let (btx, brx) = channel();
    let mut b = castor(&exe, &key);
    b.args(["backup", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.path().join("replica"))
        .args(["--activate", "--arbiter", &lock, "--epoch", &epoch])
        .args(["--transport", &o.transport])
        .args(["--metrics", o.metrics.as_deref().unwrap_or("127.0.0.1:0")])
        .args([
            "--fence-cmd",
            "echo \"fence: the old primary ($CASTOR_PEER) was SIGKILLed by castor demo; token $CASTOR_FENCING_TOKEN\" >&2",
        ]);
    let (backup, addr) = Proc::spawn(b, "backup", btx)?;
    let addr = addr.expect("backup address");
    let murl = wait_line(&brx, "metrics on http://", Duration::from_secs(10))?;
    let maddr = murl
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .ok_or_else(|| DemoError::Step(format!("cannot read the metrics address in {murl:?}")))?
        .to_string();

    let (ptx, prx) = channel();
    let mut p = castor(&exe, &key);
    p.args([
        "protect",
        "--domain",
        &format!("{},counter={caddr}", o.domain),
    ])
    .args(["--backup", &addr, "--arbiter", &lock, "--epoch", &epoch])
    .args(["--transport", &o.transport]);
    let (primary, _) = Proc::spawn(p, "primary", ptx)?;
    wait_line(&prx, "arbiter", Duration::from_secs(10))?;

    eprintln!("demo    │ client asks the guest's counter at udp {caddr} every 20 ms");
    let client = Client::start(caddr)?;
    std::thread::sleep(o.before);
    let before = client.seen();
    let last_before = before.last().map_or(0, |v| v.0);
    let kill_ns = mono_ns();
    primary.signal(libc::SIGKILL);
    eprintln!(
        "demo    │ SIGKILL the primary (pid {}) — the client's last answer was {last_before}",
        primary.child.id()
    );
    let _ = primary.wait();

    // The activated copy answers; then let it run a little.
    let t0 = Instant::now();
    let first_after = loop {
        if let Some(v) = client.seen().iter().find(|v| v.1 > kill_ns) {
            break *v;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            return Err(DemoError::Step(
                "the counter did not answer within 20 s of the kill".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    eprintln!(
        "demo    │ the counter answers again: {} (from the activated copy)",
        first_after.0
    );
    std::thread::sleep(o.after);
    let status = crate::ops::http::get(&maddr, "/status", Duration::from_secs(2))
        .map_err(|e| DemoError::Step(format!("reading the backup's /status: {e}")))?;
    let seen = client.finish();
    backup.signal(libc::SIGTERM);
    let _ = backup.wait();
    let status: serde_json::Value = serde_json::from_str(&status)
        .map_err(|e| DemoError::Step(format!("the backup's /status is not JSON: {e}")))?;
    Ok(report(&seen, kill_ns, &status))
}

fn report(seen: &[(u64, u64)], kill_ns: u64, status: &serde_json::Value) -> FailoverReport {
    let (mut back, mut rep, mut gaps) = (0, 0, 0);
    for w in seen.windows(2) {
        match w[1].0.cmp(&(w[0].0 + 1)) {
            std::cmp::Ordering::Equal => {}
            std::cmp::Ordering::Greater => gaps += 1,
            std::cmp::Ordering::Less if w[1].0 == w[0].0 => rep += 1,
            std::cmp::Ordering::Less => back += 1,
        }
    }
    let last_before = seen
        .iter()
        .rfind(|v| v.1 <= kill_ns)
        .copied()
        .unwrap_or((0, kill_ns));
    let first_after = seen
        .iter()
        .find(|v| v.1 > kill_ns)
        .copied()
        .unwrap_or((0, kill_ns));
    let suspect = status["failover_started_mono_ns"].as_u64();
    let ms = |a: u64, b: u64| (a as f64 - b as f64) / 1e6;
    FailoverReport {
        replies: seen.len() as u64,
        last_before_kill: last_before.0,
        first_after_kill: first_after.0,
        steps_back: back,
        repeats: rep,
        gaps,
        client_pause_ms: ms(first_after.1, last_before.1),
        kill_to_suspect_ms: suspect.map_or(f64::NAN, |s| ms(s, kill_ns)),
        timeline: status["last_failover"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| {
                        (
                            s["step"].as_str().unwrap_or("?").to_string(),
                            s["at_ms"].as_f64().unwrap_or(f64::NAN),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        first_reply_ms: suspect.map(|s| ms(first_after.1, s)),
    }
}

/// Prints the report; true when the client saw no step back and no repeat.
pub fn print_report(r: &FailoverReport) -> bool {
    println!("failover timeline (ms after the backup suspected the primary):");
    println!(
        "  {:<14} {:>9.1}   (SIGKILL by the demo)",
        "primary killed", -r.kill_to_suspect_ms
    );
    for (step, at) in &r.timeline {
        println!("  {step:<14} {at:>9.1}");
    }
    if let Some(f) = r.first_reply_ms {
        println!(
            "  {:<14} {f:>9.1}   (the client's first answer from the activated copy)",
            "first reply"
        );
    }
    println!(
        "client            {} answers; last from the primary {}, first from the activated copy {}; \
         no answer for {:.0} ms",
        r.replies, r.last_before_kill, r.first_after_kill, r.client_pause_ms
    );
    let ok = r.steps_back == 0 && r.repeats == 0;
    println!(
        "counter           {} ({} steps back, {} repeats, {} gaps)",
        if ok && r.gaps == 0 {
            "CONTINUES: every answer is the previous one plus one"
        } else if ok {
            "continues with gaps (never back, never repeated)"
        } else {
            "STEPPED BACK OR REPEATED: guarantee 4 broken"
        },
        r.steps_back,
        r.repeats,
        r.gaps
    );
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_counts_steps_back_repeats_and_gaps() {
        let seen = [
            (1, 10),
            (2, 20),
            (3, 30),
            (3, 40),
            (2, 50),
            (4, 60),
            (7, 70),
        ];
        let st = serde_json::json!({
            "failover_started_mono_ns": 35,
            "last_failover": [{"step": "suspect", "at_ms": 0.0}, {"step": "running", "at_ms": 12.5}]
        });
        let r = report(&seen, 30, &st);
        assert_eq!((r.steps_back, r.repeats, r.gaps), (1, 1, 2));
        assert_eq!((r.last_before_kill, r.first_after_kill), (3, 3));
        assert_eq!(r.timeline[1], ("running".to_string(), 12.5));
        assert_eq!(r.kill_to_suspect_ms, 5e-6);
    }
}
