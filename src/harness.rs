//! User jobs built from the engine: `protect` (primary against a remote
//! backup) and `bench`/`demo` (backup child process + primary on loopback,
//! then a digest check and a report).

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::digest::Digest;
use crate::domain::{Domain, DomainSpec, Layout};
use crate::engine::live::{self, LiveConfig, LiveError, LiveOutcome, Session};
use crate::engine::primary::{self, PrimaryConfig, PrimaryError, PrimaryOutcome};
use crate::engine::replica;
use crate::engine::shadow::PageBuf;
use crate::metrics::{self, Pct, Summary};
use crate::outq::{Mode, OutputQueue};
use crate::transport::handshake::{self, random_nonce, HandshakeError, Psk};
use crate::transport::messages::Hello;
use crate::transport::record::RecordReader;
use crate::transport::tcp::{self, TcpSink};
use crate::transport::{select, TransportKind};
use crate::PAGE_SIZE;

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error(transparent)]
    Domain(#[from] crate::domain::DomainError),
    #[error("connecting to backup {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("handshake with backup {addr}: {source}")]
    Handshake {
        addr: String,
        #[source]
        source: HandshakeError,
    },
    #[error("transport with backup {addr}: {source}")]
    Transport {
        addr: String,
        #[source]
        source: crate::transport::select::SetupError,
    },
    #[error(transparent)]
    Primary(#[from] PrimaryError),
    #[error("backup process: {0}")]
    Backup(String),
    #[error(transparent)]
    Replica(#[from] replica::ReplicaError),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Connects and authenticates to a backup for `domain`.
pub fn open_session(
    addr: &str,
    psk: &Psk,
    domain: &dyn Domain,
    patience: Duration,
) -> Result<(TcpSink, RecordReader<TcpStream>), HarnessError> {
    open_session_for(addr, psk, domain.layout(), &domain.describe(), patience)
}

/// Connects and authenticates to a backup for a domain of `layout` named
/// `desc`.
pub fn open_session_for(
    addr: &str,
    psk: &Psk,
    layout: Layout,
    desc: &str,
    patience: Duration,
) -> Result<(TcpSink, RecordReader<TcpStream>), HarnessError> {
    open_session_nonce(addr, psk, layout, desc, patience, random_nonce())
}

/// [`open_session_for`] as a live copy's session: beaconing to `beacon`
/// (the backup's second heartbeat path) for as long as the session's
/// sending half lives.
pub fn open_protection(
    addr: &str,
    psk: &Psk,
    layout: Layout,
    desc: &str,
    patience: Duration,
    beacon: Option<(std::net::SocketAddr, Duration)>,
    transport: TransportKind,
) -> Result<Session<Box<dyn std::io::Read + Send>>, HarnessError> {
    let nonce = random_nonce();
    let (sink, reader) = open_session_nonce(addr, psk, layout, desc, patience, nonce)?;
    let (sink, reader): Session<Box<dyn std::io::Read + Send>> = match transport {
        TransportKind::Tcp => (
            Box::new(sink),
            reader.map_inner(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ),
        kind => {
            select::primary(kind, reader, sink.0).map_err(|source| HarnessError::Transport {
                addr: addr.to_string(),
                source,
            })?
        }
    };
    let sink: Box<dyn crate::transport::RecordSink> = match beacon {
        Some((to, every)) => {
            let b = crate::ha::beacon::Sender::start(to, psk.clone(), nonce, every).map_err(
                |source| HarnessError::Connect {
                    addr: format!("beacon path {to}"),
                    source,
                },
            )?;
            Box::new(crate::ha::beacon::BeaconSink::new(sink, b))
        }
        None => sink,
    };
    Ok((sink, reader))
}

fn open_session_nonce(
    addr: &str,
    psk: &Psk,
    layout: Layout,
    desc: &str,
    patience: Duration,
    nonce: [u8; crate::transport::messages::NONCE_LEN],
) -> Result<(TcpSink, RecordReader<TcpStream>), HarnessError> {
    let conn_err = |source| HarnessError::Connect {
        addr: addr.to_string(),
        source,
    };
    let s = tcp::connect(addr, patience).map_err(conn_err)?;
    let mut w = s.try_clone().map_err(conn_err)?;
    let mut r = RecordReader::new(s);
    let hello = Hello {
        page_size: layout.page_size,
        pages: layout.pages,
        nonce,
        desc: desc.to_string(),
    };
    handshake::client(&mut r, &mut w, psk, &hello).map_err(|source| HarnessError::Handshake {
        addr: addr.to_string(),
        source,
    })?;
    Ok((TcpSink(w), r))
}

/// How `protect` treats the loss of its backup.
#[derive(Debug, Clone)]
pub struct ProtectOpts {
    /// Keep the guest running unprotected while the arbiter is held.
    pub continue_unprotected: bool,
    /// Dial `addr` again this often while unprotected (re-protection).
    pub redial_every: Option<Duration>,
    /// The backup's beacon address (second heartbeat path), if any.
    pub beacon: Option<std::net::SocketAddr>,
    /// Transport of every session (the backups must run the same).
    pub transport: TransportKind,
    /// The arbiter's lease, when its hold can lapse.
    pub lease: Option<crate::ha::lease::LeaseWatch>,
}

/// What `protect` ends with.
pub struct Protected {
    pub live: LiveOutcome,
    /// Digest of the paused domain's memory and state at the end.
    pub digest: Digest,
}

/// Runs `spec` as the live copy protected by the backup at `addr`: the
/// first backup must answer within 10 s; later ones (after a loss) are
/// dialed per `opts`.
pub fn protect(
    spec: &DomainSpec,
    addr: &str,
    psk: &Psk,
    cfg: &PrimaryConfig,
    opts: &ProtectOpts,
) -> Result<Protected, HarnessError> {
    let mut domain = spec.open()?;
    let mut outq = OutputQueue::start(Mode::PassThrough)
        .map_err(|e| HarnessError::Primary(PrimaryError::Protocol(e.to_string())))?;
    domain.attach_output(&outq)?;
    // Host devices (`--nfqueue`): alive until after the queue's shutdown.
    let host = crate::outq::nfqueue::attach(&outq, cfg.nfqueue.as_ref())
        .map_err(|e| HarnessError::Primary(e.into()))?;
    let first = open_protection(
        addr,
        psk,
        domain.layout(),
        &domain.describe(),
        Duration::from_secs(10),
        opts.beacon.map(|b| (b, cfg.heartbeat_interval)),
        opts.transport,
    )?;
    let lcfg = LiveConfig {
        primary: cfg.clone(),
        run_for: cfg.duration,
        run_epochs: cfg.max_epochs,
        continue_unprotected: opts.continue_unprotected,
        redial_every: opts.redial_every,
        dial_after: Duration::ZERO,
        lease: opts.lease.clone(),
        lease_margin: Duration::from_millis(100),
        announce_at: Vec::new(),
        label: "castor protect".into(),
    };
    let (target, psk) = (addr.to_string(), psk.clone());
    let beacon = opts.beacon.map(|b| (b, cfg.heartbeat_interval));
    let transport = opts.transport;
    let dial = move |layout, desc: &str| {
        open_protection(
            &target,
            &psk,
            layout,
            desc,
            Duration::ZERO,
            beacon,
            transport,
        )
        .map_err(|e| e.to_string())
    };
    let mut live =
        live::run(domain, &mut outq, Some(first), dial, &lcfg).map_err(|(e, _)| match e {
            LiveError::Session(p) => HarnessError::Primary(p),
            LiveError::Domain(d) => HarnessError::Domain(d),
            LiveError::Output(o) => HarnessError::Primary(PrimaryError::Protocol(o.to_string())),
        })?;
    if let Ok(r) = outq.shutdown() {
        live.output = r;
    }
    if let Some(h) = host {
        eprintln!("castor: {}", h.describe());
    }
    let mut state = Vec::new();
    live.domain.save_state(&mut state)?;
    // SAFETY: the live copy ends with the domain paused and no castor
    // thread touching guest memory.
    let digest = Digest::of(unsafe { live.domain.memory().as_slice() }, &state);
    Ok(Protected { live, digest })
}

/// Opens a session over `transport` and runs the primary on it.
fn run_session(
    domain: Box<dyn Domain>,
    addr: &str,
    psk: &Psk,
    cfg: &PrimaryConfig,
    transport: TransportKind,
) -> Result<PrimaryOutcome, HarnessError> {
    let (sink, reader) = open_session(addr, psk, &*domain, Duration::from_secs(10))?;
    let mut out = match transport {
        TransportKind::Tcp => primary::run(domain, Box::new(sink), reader, cfg),
        kind => {
            let (sink, reader) = select::primary(kind, reader, sink.0).map_err(|source| {
                HarnessError::Transport {
                    addr: addr.to_string(),
                    source,
                }
            })?;
            primary::run(domain, sink, reader, cfg)
        }
    }
    .map_err(|(e, _)| HarnessError::from(e))?;
    out.summary.transport = transport.name().into();
    Ok(out)
}

/// A backup running as a child process of this binary.
struct BackupChild {
    child: Child,
    addr: String,
    /// Its stderr, kept to explain a failed run.
    log: tempfile::NamedTempFile,
}

impl BackupChild {
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
    quiet: bool,
    transport: TransportKind,
) -> Result<BackupChild, HarnessError> {
    let exe = std::env::current_exe()
        .map_err(|e| HarnessError::Backup(format!("locating castor binary: {e}")))?;
    let log = tempfile::NamedTempFile::new()
        .map_err(|e| HarnessError::Backup(format!("creating a log file: {e}")))?;
    let err = log
        .reopen()
        .map_err(|e| HarnessError::Backup(format!("opening the log file: {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.args(["backup", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(state_dir)
        .args(["--transport", transport.name()])
        .env("CASTOR_PSK", psk_hex)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    if quiet {
        cmd.stderr(Stdio::from(err));
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| HarnessError::Backup(format!("starting backup: {e}")))?;
    let out = child.stdout.take().expect("stdout piped");
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .map_err(|e| HarnessError::Backup(format!("reading backup's address: {e}")))?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .ok_or_else(|| {
            HarnessError::Backup(format!("unexpected first line from backup: {line:?}"))
        })?
        .to_string();
    Ok(BackupChild { child, addr, log })
}

/// Options of a loopback run.
pub struct LoopbackOpts {
    pub state_dir: Option<PathBuf>,
    pub quiet_backup: bool,
    pub transport: TransportKind,
}

/// Backup child + in-process primary on loopback; then checks that the
/// replica's digest equals the primary's at the last acknowledged epoch.
pub fn loopback(
    spec: &DomainSpec,
    cfg: &PrimaryConfig,
    opts: &LoopbackOpts,
) -> Result<Summary, HarnessError> {
    let tmp;
    let state_dir = match &opts.state_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("castor-replica-")
                .tempdir()
                .map_err(|e| HarnessError::Backup(format!("creating a state directory: {e}")))?;
            tmp.path().to_path_buf()
        }
    };
    let key: String = random_nonce().iter().map(|b| format!("{b:02x}")).collect();
    let psk = Psk::from_bytes(key.as_bytes());
    let backup = spawn_backup(&state_dir, &key, opts.quiet_backup, opts.transport)?;
    let cpu0 = metrics::self_cpu();
    let domain = spec.open()?;
    let run = run_session(domain, &backup.addr, &psk, cfg, opts.transport);
    let (raw, backup_cpu) =
        metrics::wait_child(backup.child.id()).map_err(|e| HarnessError::Backup(e.to_string()))?;
    let status = std::os::unix::process::ExitStatusExt::from_raw(raw);
    let explain = |what: String| {
        let tail = backup.log_tail();
        if tail.is_empty() {
            what
        } else {
            format!("{what}\nbackup said:\n{tail}")
        }
    };
    let outcome = run.map_err(|e| HarnessError::Backup(explain(e.to_string())))?;
    let primary_cpu = metrics::self_cpu() - cpu0;
    if !std::process::ExitStatus::success(&status) {
        return Err(HarnessError::Backup(explain(format!(
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
    Ok(s)
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
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

/// Writes the JSON report.
pub fn write_json(path: &Path, s: &Summary) -> Result<(), HarnessError> {
    let j = serde_json::to_vec_pretty(s).expect("summary serialises");
    std::fs::write(path, j).map_err(|source| HarnessError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Prints the human-readable report table.
pub fn print_table(s: &Summary) {
    let pct = |p: &Pct| format!("{:>8} {:>8} {:>8}", p.p50, p.p99, p.max);
    println!("domain            {}", s.domain);
    println!(
        "transport         {}, epoch {} ms, max in flight {}, {} encode workers",
        s.transport, s.epoch_ms, s.max_inflight, s.workers
    );
    println!(
        "run               {:.1} s, {} epochs, {:.1} epochs/s, {} extended ({} ms waiting for acks)",
        s.duration_s,
        s.epochs,
        s.epochs_per_s,
        s.extended_epochs,
        s.extension_us_total / 1000
    );
    println!(
        "seed              {:.1} ms, {} on the wire",
        s.seed_ms,
        crate::units::fmt_bytes(s.seed_wire_bytes)
    );
    println!("                       p50      p99      max");
    println!("dirty pages/epoch {}", pct(&s.dirty_pages_per_epoch));
    println!("pause µs          {}", pct(&s.pause_us));
    println!("  harvest µs      {}", pct(&s.harvest_us));
    println!("  copy µs         {}", pct(&s.copy_us));
    println!("  state µs        {}", pct(&s.state_us));
    if let Some(m) = &s.memcpy_us {
        println!(
            "plain memcpy µs   {}   (same dirty sets, one thread, after the run)",
            pct(m)
        );
    }
    println!("encode µs (cpu)   {}", pct(&s.encode_us));
    println!("send µs           {}", pct(&s.send_us));
    println!("ckpt latency µs   {}", pct(&s.checkpoint_latency_us));
    println!(
        "wire              {} of {} raw dirty bytes ({:.2}%), {:.0} bytes per dirty page",
        crate::units::fmt_bytes(s.wire_bytes),
        crate::units::fmt_bytes(s.raw_bytes),
        s.wire_ratio * 100.0,
        s.wire_bytes_per_dirty_page
    );
    println!(
        "pages             {} delta, {} full, {} zero, {} unchanged",
        s.pages_delta, s.pages_full, s.pages_zero, s.pages_unchanged
    );
    if let Some(o) = &s.output {
        println!(
            "output            {} released ({} held), {} dropped; release delay µs p50 {} p99 {} max {}",
            o.released,
            o.held,
            o.dropped + o.late,
            o.release_delay_us.p50,
            o.release_delay_us.p99,
            o.release_delay_us.max
        );
    }
    println!(
        "cpu               primary {:.2} s, backup {:.2} s",
        s.cpu.primary_s, s.cpu.backup_s
    );
    println!(
        "primary digest    {} (epoch {})",
        s.primary_digest, s.acked_epoch
    );
    println!(
        "replica digest    {} (epoch {})",
        s.replica_digest, s.replica_epoch
    );
    println!(
        "replica           {}",
        if s.digest_match {
            "MATCHES the primary"
        } else {
            "DOES NOT MATCH the primary"
        }
    );
}

/// `castor digest --domain SPEC --at-epoch N`.
pub fn expected_digest(spec: &DomainSpec, epoch: u64) -> Result<Digest, HarnessError> {
    match spec {
        DomainSpec::Sim(s) => {
            let (mem, state) = crate::domain::sim::expected_after(s, epoch)?;
            // SAFETY: `mem` is a private image nobody else writes.
            Ok(Digest::of(unsafe { mem.as_slice() }, &state))
        }
        DomainSpec::Kvm(_) => Err(crate::domain::DomainError::Spec {
            spec: spec.to_string(),
            reason: "a kvm guest is not deterministic: no expected digest exists \
                     (use a sim domain with writes=N)"
                .into(),
        }
        .into()),
    }
}
