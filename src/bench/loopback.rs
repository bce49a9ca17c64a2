//! The `bench` and `demo` job: a backup child process of this binary and
//! an in-process primary on loopback; then a digest check (replica ==
//! primary at the last acknowledged epoch), the CPU each side used, and a
//! plain-memcpy baseline of the pause's copy stage.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::domain::progress::{speed_ratio, Window};
use crate::domain::{Domain, DomainError, DomainSpec};
use crate::engine::dial::{open_session, select_transport, DialError};
use crate::engine::primary::{self, PrimaryConfig, PrimaryError, PrimaryOutcome};
use crate::engine::replica::{self, ReplicaError};
use crate::engine::shadow::PageBuf;
use crate::metrics::{self, round3, Pct, Summary};
use crate::transport::auth::Protection;
use crate::transport::handshake::{random_nonce, Psk};
use crate::transport::TransportKind;
use crate::PAGE_SIZE;

#[derive(Debug, thiserror::Error)]
pub enum LoopbackError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error(transparent)]
    Primary(#[from] PrimaryError),
    #[error("backup process: {0}")]
    Backup(String),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
}

/// Opens a session over `transport` and runs the primary on it.
fn run_session(
    domain: Box<dyn Domain>,
    addr: &str,
    psk: &Psk,
    cfg: &PrimaryConfig,
    transport: TransportKind,
) -> Result<PrimaryOutcome, LoopbackError> {
    let opened = open_session(addr, psk, &*domain, Duration::from_secs(10))?;
    let (sink, reader) = select_transport(addr, opened, transport)?;
    let mut out =
        primary::run(domain, sink, reader, cfg).map_err(|(e, _)| LoopbackError::from(e))?;
    out.summary.transport = transport.name().into();
    out.summary.records = match psk.protection {
        Protection::Mac => "mac".into(),
        Protection::Encrypt => "aes-gcm".into(),
    };
    Ok(out)
}

/// A backup running as a child process of this binary. Dropped before it
/// was reaped (a run that failed before or during its session), it is
/// killed: it would otherwise wait for a primary forever.
struct BackupChild {
    child: Child,
    addr: String,
    /// Its stderr, kept to explain a failed run.
    log: tempfile::NamedTempFile,
    /// Reaped by [`BackupChild::wait`]: its pid may be another process's
    /// since, so it is never signalled again.
    reaped: bool,
}

impl Drop for BackupChild {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl BackupChild {
    /// Waits for the backup to exit: its raw wait status and CPU time.
    fn wait(&mut self) -> std::io::Result<(i32, std::time::Duration)> {
        let r = metrics::wait_child(self.child.id());
        self.reaped = r.is_ok();
        r
    }

    /// The last lines the backup wrote to stderr.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log.path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(6)..].join("\n")
    }
}

fn spawn_backup(
    state_dir: &Path,
    psk_hex: &str,
    opts: &LoopbackOpts,
) -> Result<BackupChild, LoopbackError> {
    let (quiet, transport) = (opts.quiet_backup, opts.transport);
    // The backup child tolerates the silence the primary tolerates
    // (--backup-timeout, 2 s by default) rather than its own 500 ms: both
    // run on this one host, which under load (or emulated, in the lab)
    // stalls either side alike.
    let silence = humantime::format_duration(opts.backup_silence).to_string();
    let exe = std::env::current_exe()
        .map_err(|e| LoopbackError::Backup(format!("locating castor binary: {e}")))?;
    let log = tempfile::NamedTempFile::new()
        .map_err(|e| LoopbackError::Backup(format!("creating a log file: {e}")))?;
    let err = log
        .reopen()
        .map_err(|e| LoopbackError::Backup(format!("opening the log file: {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.args(["backup", "--listen"])
        .arg(std::net::SocketAddr::new(opts.ip, 0).to_string())
        .arg("--state-dir")
        .arg(state_dir)
        .args(["--transport", transport.name()])
        .args(["--heartbeat-timeout", &silence])
        .args(match opts.protection {
            Protection::Encrypt => &["--encrypt"][..],
            Protection::Mac => &[],
        })
        .env("CASTOR_PSK", psk_hex)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    if let Some(n) = opts.decode_lanes {
        cmd.args(["--decode-lanes", &n.to_string()]);
    }
    if quiet {
        cmd.stderr(Stdio::from(err));
    }
    let child = cmd
        .spawn()
        .map_err(|e| LoopbackError::Backup(format!("starting backup: {e}")))?;
    let mut backup = BackupChild {
        child,
        addr: String::new(),
        log,
        reaped: false,
    };
    let out = backup.child.stdout.take().expect("stdout piped");
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .map_err(|e| LoopbackError::Backup(format!("reading backup's address: {e}")))?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .ok_or_else(|| {
            LoopbackError::Backup(format!("unexpected first line from backup: {line:?}"))
        })?
        .to_string();
    backup.addr = addr;
    Ok(backup)
}

/// Options of a loopback run.
pub struct LoopbackOpts {
    pub state_dir: Option<PathBuf>,
    pub quiet_backup: bool,
    pub transport: TransportKind,
    /// The local address the backup listens on and the primary dials:
    /// [`LOOPBACK`] unless the transport needs another (rdma: an address on
    /// an RDMA device).
    pub ip: IpAddr,
    /// The backup child's --heartbeat-timeout (the primary's backup
    /// silence).
    pub backup_silence: Duration,
    /// How records are protected (`--encrypt` on both ends for Encrypt).
    pub protection: Protection,
    /// The backup child's `--decode-lanes` (None: its default).
    pub decode_lanes: Option<u16>,
}

/// The default address of a bench or demo run.
pub const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Backup child + in-process primary on loopback; then checks that the
/// replica's digest equals the primary's at the last acknowledged epoch.
pub fn loopback(
    spec: &DomainSpec,
    cfg: &PrimaryConfig,
    opts: &LoopbackOpts,
) -> Result<Summary, LoopbackError> {
    let tmp;
    let state_dir = match &opts.state_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("castor-replica-")
                .tempdir()
                .map_err(|e| LoopbackError::Backup(format!("creating a state directory: {e}")))?;
            tmp.path().to_path_buf()
        }
    };
    let key: String = random_nonce().iter().map(|b| format!("{b:02x}")).collect();
    let psk = Psk::from_bytes(key.as_bytes()).with_protection(opts.protection);
    let mut backup = spawn_backup(&state_dir, &key, opts)?;
    let cpu0 = metrics::self_cpu();
    let domain = spec.open()?;
    let run = run_session(domain, &backup.addr, &psk, cfg, opts.transport);
    let (raw, backup_cpu) = backup
        .wait()
        .map_err(|e| LoopbackError::Backup(e.to_string()))?;
    let status = std::os::unix::process::ExitStatusExt::from_raw(raw);
    let explain = |what: String| {
        let tail = backup.log_tail();
        if tail.is_empty() {
            what
        } else {
            format!("{what}\nbackup said:\n{tail}")
        }
    };
    let outcome = run.map_err(|e| LoopbackError::Backup(explain(e.to_string())))?;
    let primary_cpu = metrics::self_cpu() - cpu0;
    if !std::process::ExitStatus::success(&status) {
        return Err(LoopbackError::Backup(explain(format!(
            "backup exited with {status:?}"
        ))));
    }
    let (meta, replica_digest) = replica::verify(&state_dir)?;
    let mut s = outcome.summary;
    s.cpu = metrics::Cpu {
        primary_s: round3(primary_cpu.as_secs_f64()),
        backup_s: round3(backup_cpu.as_secs_f64()),
    };
    s.replica_digest = replica_digest.to_hex();
    s.replica_epoch = meta.epoch;
    s.digest_match = meta.epoch == outcome.final_epoch && replica_digest == outcome.digest;
    s.memcpy_us = memcpy_baseline(&*outcome.domain, &outcome.recent_dirty);
    let mut domain = outcome.domain;
    let free = unprotected_length(cfg.duration, phase_cycle(spec));
    if let (Some(protected), Some(unprotected)) =
        (outcome.guest_window, unprotected_window(&mut *domain, free))
    {
        let r = speed_ratio(&protected, &unprotected, outcome.guest_paused);
        s.guest_rate_unprotected = Some(round3(unprotected.rate()));
        s.guest_cpu_share_unprotected = unprotected.cpu_share().map(round3);
        s.guest_speed_ratio = Some(round3(r.ratio));
        s.guest_speed_ratio_wall = Some(round3(r.wall));
    }
    Ok(s)
}

/// Longest unprotected run after the protected one (bench), unless one
/// phase cycle is longer.
const UNPROTECTED_MAX: Duration = Duration::from_secs(3);

/// A phased sim workload's cycle (quiet, write-heavy, output-heavy).
fn phase_cycle(spec: &DomainSpec) -> Option<Duration> {
    match spec {
        DomainSpec::Sim(s) if s.phase_ms > 0 => Some(Duration::from_millis(3 * s.phase_ms)),
        _ => None,
    }
}

/// The run length to use for `spec`: `d` itself, or, for a phased sim
/// workload whose cycle (3 × `phase`) does not divide `d`, `d` rounded up
/// to whole cycles, with a note saying so. A protected window that covers
/// part of a cycle over- or under-weights a phase, which biases
/// `guest_speed_ratio` against the whole-cycle baseline.
pub fn whole_cycles(spec: &DomainSpec, d: Duration) -> (Duration, Option<String>) {
    let Some(c) = phase_cycle(spec) else {
        return (d, None);
    };
    let n = d.as_nanos().div_ceil(c.as_nanos()).max(1);
    let rounded = c * u32::try_from(n).unwrap_or(u32::MAX);
    if rounded == d {
        return (d, None);
    }
    let note = format!(
        "--duration {d:?} rounded up to {rounded:?}: whole phase cycles (3 x phase = {c:?}), \
         so every phase weighs the same in the protected run as in the baseline"
    );
    (rounded, Some(note))
}

/// How long the unprotected baseline runs: a third of the protected run,
/// 1-3 s. A phased guest's rate depends on which phases a window covers,
/// so its baseline is rounded to whole cycles (at least one): a 2 s window
/// of a 3 s cycle missed a third of it, and every ratio of such a run read
/// 0.64-0.71 instead of 0.94-0.99.
fn unprotected_length(run: Option<Duration>, cycle: Option<Duration>) -> Duration {
    let free = run.map_or(UNPROTECTED_MAX, |d| {
        (d / 3).clamp(Duration::from_secs(1), UNPROTECTED_MAX)
    });
    match cycle {
        Some(c) if !c.is_zero() => {
            let n = (free.as_secs_f64() / c.as_secs_f64()).round().max(1.0);
            c.mul_f64(n)
        }
        _ => free,
    }
}

/// Runs the (paused) guest unprotected for about `d` after the session:
/// the baseline of `guest_speed_ratio`; None when the domain cannot tell.
/// The window opens at the guest's first progress after the resume (kvm
/// memtouch: its next loop line), so neither the time it sat paused
/// before nor a loop begun before the pause is counted. Leaves it paused.
fn unprotected_window(domain: &mut dyn Domain, d: Duration) -> Option<Window> {
    let before = domain.progress_mark()?.count;
    domain.throttle(0);
    domain.resume().ok()?;
    let t0 = Instant::now();
    let mut first = domain.progress_mark()?;
    // Polls a counter the guest advances (no event to wait on across
    // domains); bounded by the window itself.
    while first.count == before && t0.elapsed() < d {
        std::thread::sleep(Duration::from_millis(1));
        first = domain.progress_mark()?;
    }
    std::thread::sleep((first.at + d).saturating_duration_since(Instant::now()));
    let last = domain.progress_mark();
    domain.pause().ok()?;
    Window::between(&first, &last?)
}

/// Times a plain single-threaded copy of each recent dirty set out of the
/// (paused) guest memory: the floor the pause's copy stage is judged against.
fn memcpy_baseline(domain: &dyn Domain, lists: &[Vec<u64>]) -> Option<Pct> {
    let max = lists.iter().map(Vec::len).max()?;
    let buf = PageBuf::new_populated(max.max(1)).ok()?;
    let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok()?;
    let mem = domain.memory();
    for l in lists {
        let t = Instant::now();
        for (i, &g) in l.iter().enumerate() {
            // SAFETY: g < pages (harvested from this domain), slot i < max;
            // the domain is paused, so guest memory is stable.
            unsafe { std::ptr::copy_nonoverlapping(mem.page_ptr(g), buf.slot_ptr(i), PAGE_SIZE) };
        }
        let _ = h.record((t.elapsed().as_micros() as u64).max(1));
    }
    Some(Pct::of(&h))
}

#[cfg(test)]
mod window_tests {
    use super::*;

    #[test]
    fn a_phased_run_is_rounded_up_to_whole_cycles() {
        let phased = DomainSpec::parse("sim:mem=64MiB,out=10,phase=1s").unwrap();
        let plain = DomainSpec::parse("sim:mem=64MiB").unwrap();
        let s = Duration::from_secs;
        assert_eq!(whole_cycles(&plain, s(5)), (s(5), None));
        assert_eq!(whole_cycles(&phased, s(6)), (s(6), None));
        let (d, note) = whole_cycles(&phased, s(5));
        assert_eq!(d, s(6));
        assert!(note.unwrap().contains("rounded up to 6s"));
        assert_eq!(whole_cycles(&phased, Duration::from_millis(500)).0, s(3));
        assert_eq!(whole_cycles(&phased, s(7)).0, s(9));
    }

    #[test]
    fn a_phased_baseline_covers_whole_cycles() {
        let s = Duration::from_secs;
        // Unphased: a third of the run, within 1-3 s.
        assert_eq!(unprotected_length(Some(s(6)), None), s(2));
        assert_eq!(unprotected_length(Some(s(1)), None), s(1));
        assert_eq!(unprotected_length(None, None), s(3));
        // 1 s phases: one 3 s cycle, not the 2 s that missed a phase.
        assert_eq!(unprotected_length(Some(s(6)), Some(s(3))), s(3));
        assert_eq!(unprotected_length(Some(s(9)), Some(s(3))), s(3));
        // A cycle longer than the window: one whole cycle anyway.
        assert_eq!(unprotected_length(Some(s(6)), Some(s(12))), s(12));
        // Short cycles: the nearest whole number of them.
        let c = Duration::from_millis(900);
        assert_eq!(unprotected_length(Some(s(6)), Some(c)), c * 2);
    }
}
