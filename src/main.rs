//! castor command line: `demo`, `backup`, `protect`, `bench`, `digest`, `keygen`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use castor::codec::Compressor;
use castor::domain::DomainSpec;
use castor::engine::backup::{self, BackupConfig};
use castor::engine::live::LiveEnd;
use castor::engine::primary::PrimaryConfig;
use castor::engine::replica;
use castor::harness::{self, LoopbackOpts};
use castor::transport::handshake::{random_nonce, Psk};
use castor::transport::TransportKind;
use castor::units;

#[derive(Parser)]
#[command(
    name = "castor",
    version,
    about = "Keep a running VM alive when its host dies: continuous checkpoints to a backup (Remus-style).",
    after_help = "Domain specs: sim:mem=SIZE,workload=uniform|hotcold|sequential|edits|zero|incompressible|mixed,\
rate=WRITES/S[,writes=N (deterministic: N page writes per epoch)][,seed=S][,threads=T][,fill=F][,hot=F][,edit=BYTES]\n\
              kvm:guest=memtouch|counter|blkcheck,mem=SIZE[,console=PATH|stderr][,tap=NAME][,ip=A.B.C.D][,mac=M]\
[,disk=PATH][,dirty=bitmap|ring] (guest ABI: guests/README.md)\n\
Keys: --psk-file FILE or $CASTOR_PSK (at least 16 bytes); without either a built-in development key is used, with a warning."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Live replication on loopback with embedded defaults: a progress line per second, then a report.
    Demo {
        #[arg(long, default_value = "sim:mem=256MiB,workload=mixed,rate=100000")]
        domain: String,
        #[arg(long, default_value = "10s", value_parser = units::parse_duration)]
        duration: Duration,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Receive checkpoints from one primary; save the committed replica when its stream ends or breaks.
    ///
    /// Exit status: 0 the primary closed the stream; 2 stream broken or
    /// primary silent (activated, with --activate); 3 not activated, the
    /// arbiter is held by another live copy; 4 not activated, the fence
    /// command failed; 5 activated, then self-fenced: the arbiter's lease
    /// (etcd) lapsed, the guest was paused; 1 any other error.
    Backup {
        /// Address to listen on (port 0 picks a free port; the bound address is printed first).
        #[arg(long, default_value = "127.0.0.1:7700")]
        listen: String,
        /// Directory for the committed replica (memory.img, state.bin, meta.json).
        #[arg(long)]
        state_dir: PathBuf,
        /// Transport the primary must use: tcp, uring or rdma.
        #[arg(long, value_enum, default_value_t = TransportKind::Tcp)]
        transport: TransportKind,
        #[arg(long)]
        psk_file: Option<PathBuf>,
        /// Largest guest memory a primary may ask this backup to hold (default: physical RAM).
        #[arg(long, value_parser = units::parse_size)]
        max_mem: Option<u64>,
        #[arg(long)]
        quiet: bool,
        /// When the stream ends or breaks, restore the last committed
        /// checkpoint into a live domain and run it (its final image goes to
        /// STATE_DIR/activated when it stops).
        #[arg(long)]
        activate: bool,
        /// Activated domain: epoch length (as on the primary).
        #[arg(long, default_value = "25ms", value_parser = units::parse_duration)]
        epoch: Duration,
        /// Activated domain: stop after this long (default: until SIGINT/SIGTERM).
        #[arg(long, value_parser = units::parse_duration, requires = "activate")]
        run_for: Option<Duration>,
        /// Activated domain: stop after this many epochs.
        #[arg(long, requires = "activate")]
        run_epochs: Option<u64>,
        /// Activated domain: `key=value,...` replacing parts of the primary's
        /// spec, e.g. `console=/var/log/guest.log,tap=castor1`.
        #[arg(long = "override", requires = "activate")]
        overrides: Option<String>,
        /// Suspect the primary when no record (data or heartbeat, sent every
        /// 100 ms) arrived for this long, even if its connection stays open.
        #[arg(long, default_value = "500ms", value_parser = units::parse_duration)]
        heartbeat_timeout: Duration,
        /// Send a heartbeat to the primary this often (keep it several times
        /// shorter than the primary's --backup-timeout).
        #[arg(long, default_value = "100ms", value_parser = units::parse_duration)]
        heartbeat_interval: Duration,
        /// Second heartbeat path: also take authenticated UDP beacons from
        /// the primary (`protect --beacon`) on this address, ideally on
        /// another network than --listen. The primary is suspected only
        /// when both paths are silent past --heartbeat-timeout.
        #[arg(long)]
        beacon_listen: Option<String>,
        /// Who may go live: `local:PATH` (flock on a shared path),
        /// `etcd:http://HOST:PORT[,http://HOST:PORT...][/KEY][?ttl=2s]` (a
        /// leader key on a lease; KEY defaults to castor/pair-PORT; the
        /// backup campaigns for heartbeat timeout + TTL, so a dead primary's
        /// lease can expire) or `none` (always wins: Xen Remus's behaviour,
        /// unsafe). With --activate the
        /// default is local:/run/castor/pair-PORT.lock, PORT being this
        /// backup's listening port, the same lock `protect --backup HOST:PORT`
        /// takes by default. The backup activates only after winning it.
        #[arg(long, requires = "activate")]
        arbiter: Option<String>,
        /// Run `sh -c CMD` after winning the arbiter and before activating
        /// (env CASTOR_FENCING_TOKEN, CASTOR_PEER); a non-zero exit status
        /// stops the activation.
        #[arg(long, requires = "activate")]
        fence_cmd: Option<String>,
        /// Kill the fence command and do not activate if it has not finished
        /// by then (fence agents power-cycling a host take tens of seconds).
        #[arg(long, default_value = "60s", value_parser = units::parse_duration, requires = "fence_cmd")]
        fence_timeout: Duration,
        /// Activated domain: protect it again with the fresh backup at
        /// HOST:PORT (dialed every --reprotect-every until it answers; full
        /// copy while the guest runs, then checkpoints). Needs an explicit
        /// --arbiter that the fresh backup shares.
        #[arg(long, requires_all = ["activate", "arbiter"])]
        reprotect: Option<String>,
        #[arg(long, default_value = "1s", value_parser = units::parse_duration, requires = "reprotect")]
        reprotect_every: Duration,
        /// With --reprotect: beacon (second heartbeat path) to the fresh
        /// backup's --beacon-listen address every --heartbeat-interval.
        #[arg(long, requires = "reprotect")]
        reprotect_beacon: Option<std::net::SocketAddr>,
        /// FOR TESTS ONLY: delay every ack by this long (output commit tests).
        #[arg(long, hide = true, value_parser = units::parse_duration)]
        test_ack_delay: Option<Duration>,
    },
    /// Protect a domain: run it in epochs and stream each checkpoint to a backup.
    ///
    /// Exit status 3: refused to start, the arbiter is held by another copy.
    /// Exit status 5: self-fenced: the arbiter's lease (etcd) could not be
    /// renewed in time, so the guest was paused and its unacknowledged
    /// output dropped (a backup may be taking over).
    Protect {
        #[arg(long)]
        domain: String,
        /// Backup address, host:port.
        #[arg(long)]
        backup: String,
        /// Stop after this long (default: until SIGINT/SIGTERM).
        #[arg(long, value_parser = units::parse_duration)]
        duration: Option<Duration>,
        /// Stop after this many epochs.
        #[arg(long)]
        epochs: Option<u64>,
        #[arg(long)]
        psk_file: Option<PathBuf>,
        /// Write the JSON report here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// No progress line.
        #[arg(long)]
        quiet: bool,
        /// Arbiter held for the primary's whole life: `local:PATH`,
        /// `etcd:http://HOST:PORT[,...][/KEY][?ttl=2s]` (renewed every TTL/4;
        /// when it cannot be renewed in time the primary self-fences, exit
        /// 5) or `none` (Xen Remus's behaviour, unsafe). Default:
        /// local:/run/castor/pair-PORT.lock with PORT from --backup, the
        /// lock the backup takes by default before activating.
        #[arg(long)]
        arbiter: Option<String>,
        /// Second heartbeat path: send authenticated UDP beacons to the
        /// backup's `--beacon-listen` address every 100 ms during each
        /// protection session.
        #[arg(long)]
        beacon: Option<std::net::SocketAddr>,
        /// When the backup is lost, stop (and exit 2) instead of keeping the
        /// guest running unprotected while this copy holds the arbiter.
        #[arg(long)]
        stop_on_backup_loss: bool,
        /// While unprotected, dial --backup again this often; a fresh backup
        /// there re-protects the running guest (0 = never).
        #[arg(long, default_value = "1s", value_parser = units::parse_duration)]
        redial_every: Duration,
        /// Also hold output of host network devices (Xen vifs, veths) that
        /// netfilter rules send to NFQUEUE queue N; released at commit.
        /// Start-up fails if no IPv4/IPv6 rule feeds queue N.
        #[arg(long, value_name = "N")]
        nfqueue: Option<u16>,
        /// Install (and remove at exit) the rules holding DEV's IPv4, IPv6
        /// and, for a bridge port, ARP output in the --nfqueue queue. Repeatable.
        #[arg(long, value_name = "DEV", requires = "nfqueue")]
        nfqueue_dev: Vec<String>,
        /// Include every epoch's record (with ack times) in the JSON report.
        #[arg(long)]
        per_epoch: bool,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Backup and primary on loopback: measure, report, and check replica == primary.
    Bench {
        #[arg(long, default_value = "sim:mem=1GiB,workload=edits,rate=200000")]
        domain: String,
        #[arg(long, default_value = "10s", value_parser = units::parse_duration)]
        duration: Duration,
        #[arg(long)]
        json: Option<PathBuf>,
        /// Include every epoch's record in the JSON report.
        #[arg(long)]
        per_epoch: bool,
        /// Print a progress line every second.
        #[arg(long)]
        progress: bool,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Digest of a saved replica (verified against its meta.json), or the
    /// expected digest of a deterministic sim domain after N epochs.
    Digest {
        #[arg(long, conflicts_with_all = ["domain", "at_epoch"])]
        replica: Option<PathBuf>,
        #[arg(long, requires = "at_epoch")]
        domain: Option<String>,
        #[arg(long, requires = "domain")]
        at_epoch: Option<u64>,
    },
    /// Print a new random pre-shared key (hex) for --psk-file.
    Keygen,
    /// Transports side by side on loopback (tcp and uring, raw and lz4
    /// pages): page bytes per second and CPU seconds per replicated GiB,
    /// with memcpy bandwidth (and iperf3 line rate) from the same run.
    BenchTransport {
        /// Length of each case.
        #[arg(long, default_value = "3s", value_parser = units::parse_duration)]
        duration: Duration,
        /// Rounds of every case (interleaved); the median is reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Also measure iperf3 on loopback (needs iperf3).
        #[arg(long)]
        iperf: bool,
        /// Also run every case (and iperf3, with --iperf) across a veth pair
        /// between two network namespaces this run creates and deletes
        /// (needs root and iproute2).
        #[arg(long)]
        veth: bool,
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

#[derive(Args, Clone)]
struct EngineArgs {
    /// Epoch length: how long the guest runs between checkpoints.
    #[arg(long, default_value = "25ms", value_parser = units::parse_duration)]
    epoch: Duration,
    /// Checkpoints allowed in flight before the next epoch is extended.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    inflight: u64,
    /// Encode workers (default: one per core).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    workers: Option<u64>,
    /// Threads copying dirty pages during the pause (default: one per core).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    copy_threads: Option<u64>,
    /// Do not pin workers to cores.
    #[arg(long, conflicts_with = "cores")]
    no_pin: bool,
    /// Pin workers and copy threads to these cores, e.g. `2,3` or `0-3`
    /// (worker i on the i-th listed core, wrapping; default: every core).
    #[arg(long, value_parser = parse_cores)]
    cores: Option<CoreList>,
    /// Compressor for pages where it pays: lz4, zstd, zstd:LEVEL or none.
    #[arg(long, default_value = "lz4", value_parser = parse_compressor)]
    compress: Compressor,
    /// UNSAFE, for experiments: let guest output (network frames) out at
    /// once instead of holding it until the backup acknowledged the
    /// checkpoint that produced it. After a failover clients may see the
    /// guest step back in time.
    #[arg(long)]
    no_output_commit: bool,
    /// Declare the backup lost when nothing (ack or heartbeat) arrived from
    /// it for this long; the guest then runs unprotected (protect).
    #[arg(long, default_value = "2s", value_parser = units::parse_duration)]
    backup_timeout: Duration,
    /// Send a heartbeat (and a beacon, with --beacon) after this long
    /// without traffic to the backup; keep it several times shorter than
    /// the backup's --heartbeat-timeout.
    #[arg(long, default_value = "100ms", value_parser = units::parse_duration)]
    heartbeat_interval: Duration,
    /// Transport to the backup: tcp, uring (io_uring zero-copy send into the
    /// backup's registered slot ring) or rdma (needs the `rdma` build
    /// feature and an RDMA device). The backup must use the same one.
    #[arg(long, value_enum, default_value_t = TransportKind::Tcp)]
    transport: TransportKind,
}

/// A validated `--cores` list.
#[derive(Debug, Clone)]
struct CoreList(Vec<usize>);

fn parse_cores(s: &str) -> Result<CoreList, String> {
    let online: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .iter()
        .map(|c| c.id)
        .collect();
    let mut out = Vec::new();
    for part in s.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let num = |t: &str| {
            t.trim().parse::<usize>().map_err(|_| {
                format!("--cores {s:?}: {t:?} is not a core number (use e.g. 0,1 or 0-3)")
            })
        };
        let (a, b) = (num(a)?, num(b)?);
        if a > b {
            return Err(format!("--cores {s:?}: range {a}-{b} runs backwards"));
        }
        for c in a..=b {
            if !online.contains(&c) {
                return Err(format!(
                    "--cores {s:?}: core {c} is not available to this process (available: {online:?})"
                ));
            }
            if !out.contains(&c) {
                out.push(c);
            }
        }
    }
    Ok(CoreList(out))
}

fn parse_compressor(s: &str) -> Result<Compressor, String> {
    match s {
        "none" => Ok(Compressor::None),
        "lz4" => Ok(Compressor::Lz4),
        "zstd" => Ok(Compressor::Zstd(1)),
        _ => match s.strip_prefix("zstd:").map(str::parse::<i32>) {
            Some(Ok(l)) if (1..=19).contains(&l) => Ok(Compressor::Zstd(l)),
            _ => Err(format!(
                "unknown compressor {s:?}: use lz4, zstd, zstd:LEVEL (1-19) or none"
            )),
        },
    }
}

/// A heartbeat interval must leave the peer at least two beats per timeout.
fn check_heartbeat(interval: Duration, peer_timeout: Duration, names: &str) -> Result<(), String> {
    if interval.is_zero() || interval * 2 > peer_timeout {
        return Err(format!(
            "{names}: a heartbeat interval of {interval:?} leaves fewer than two beats within the \
             {peer_timeout:?} timeout; shorten the interval or lengthen the timeout"
        ));
    }
    Ok(())
}

impl EngineArgs {
    fn config(&self) -> PrimaryConfig {
        let mut c = PrimaryConfig {
            epoch: self.epoch,
            max_inflight: self.inflight as usize,
            pin: !self.no_pin,
            cores: self.cores.as_ref().map(|c| c.0.clone()),
            compressor: self.compress,
            output_commit: !self.no_output_commit,
            backup_silence: self.backup_timeout,
            heartbeat_interval: self.heartbeat_interval,
            ..PrimaryConfig::default()
        };
        if self.no_output_commit {
            eprintln!(
                "castor: WARNING: --no-output-commit is UNSAFE: guest output leaves before the backup \
                 holds the state that produced it, so after a failover clients can see replies the \
                 backup never made (a step back in time). Use it only for experiments."
            );
        }
        if let Some(w) = self.workers {
            c.workers = w as usize;
        }
        if let Some(t) = self.copy_threads {
            c.copy_threads = t as usize;
        }
        c
    }
}

fn parse_spec(s: &str) -> Result<DomainSpec, String> {
    DomainSpec::parse(s).map_err(|e| e.to_string())
}

fn load_psk(path: Option<&PathBuf>) -> Result<Psk, String> {
    let psk = Psk::load(path.map(|p| p.as_path())).map_err(|e| e.to_string())?;
    if psk.is_default {
        eprintln!(
            "castor: warning: no --psk-file or $CASTOR_PSK: using the built-in development key; \
             any castor can connect. Make a key with `castor keygen > key` for real use."
        );
    }
    Ok(psk)
}

fn phys_mem() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages.max(0) as u64).saturating_mul(size.max(0) as u64)
}

/// Exit status of `protect --stop-on-backup-loss`: the backup was lost.
const EXIT_BACKUP_LOST: u8 = 2;
/// `--nfqueue Q --nfqueue-dev DEV...`: installs the rules for each DEV,
/// then checks that IPv4 and IPv6 do reach queue Q.
fn nfqueue_rules(
    q: u16,
    devs: &[String],
) -> Result<Vec<castor::outq::nfqueue::rules::Installed>, String> {
    use castor::outq::nfqueue::rules;
    let mut installed = Vec::new();
    for d in devs {
        let r = rules::install(q, d).map_err(|e| format!("--nfqueue-dev {d}: {e}"))?;
        eprintln!("castor protect: holding output of {}", r.describe());
        installed.push(r);
    }
    rules::check(q).map_err(|e| format!("--nfqueue {q}: {e}"))?;
    Ok(installed)
}

/// Exit status: the arbiter's lease lapsed; this copy paused its guest and
/// dropped its held output (another copy may be live now).
const EXIT_SELF_FENCED: u8 = 5;

/// Exit status: the arbiter is held by another live copy (the backup did
/// not activate; the primary did not start).
const EXIT_ARBITER_HELD: u8 = 3;
/// Exit status: the fence command failed; the backup did not activate.
const EXIT_FENCE_FAILED: u8 = 4;

/// `--arbiter SPEC`, or the pair's default local lock named by the
/// backup's port.
fn make_arbiter(
    spec: Option<&str>,
    backup_port: u16,
) -> Result<Box<dyn castor::ha::arbiter::Arbiter>, String> {
    use castor::ha::arbiter;
    let a = match spec {
        Some(s) => arbiter::from_spec_for_pair(s, (backup_port > 0).then_some(backup_port))
            .map_err(|e| e.to_string())?,
        None => Box::new(arbiter::LocalLock::new(arbiter::default_local_path(
            backup_port,
        ))),
    };
    if a.describe() == "none" {
        eprintln!("castor: {}", arbiter::NONE_WARNING);
    }
    Ok(a)
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.cmd {
        Cmd::Demo {
            domain,
            duration,
            engine,
        } => {
            let spec = parse_spec(&domain)?;
            engine.transport.check_available()?;
            let mut cfg = engine.config();
            cfg.duration = Some(duration);
            cfg.progress = true;
            cfg.keep_dirty_lists = 20;
            castor::engine::install_stop_handler();
            eprintln!(
                "castor demo: protecting {spec} for {} with {} ms epochs; backup on loopback (Ctrl-C stops cleanly)",
                humantime::format_duration(duration),
                engine.epoch.as_millis()
            );
            let s = harness::loopback(
                &spec,
                &cfg,
                &LoopbackOpts {
                    state_dir: None,
                    quiet_backup: false,
                    transport: engine.transport,
                },
            )
            .map_err(|e| e.to_string())?;
            harness::print_table(&s);
            Ok(if s.digest_match {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Backup {
            listen,
            state_dir,
            transport,
            psk_file,
            max_mem,
            quiet,
            activate,
            epoch,
            run_for,
            run_epochs,
            overrides,
            heartbeat_timeout,
            heartbeat_interval,
            beacon_listen,
            arbiter,
            fence_cmd,
            fence_timeout,
            reprotect,
            reprotect_every,
            reprotect_beacon,
            test_ack_delay,
        } => {
            check_heartbeat(
                heartbeat_interval,
                heartbeat_timeout,
                "--heartbeat-interval vs --heartbeat-timeout",
            )?;
            let psk = load_psk(psk_file.as_ref())?;
            transport.check_available()?;
            let l = castor::transport::tcp::listen(&listen).map_err(|e| e.to_string())?;
            let addr = l.local_addr().map_err(|e| e.to_string())?;
            // Chosen (and checked) now, so a bad spec fails before replication.
            let mut arbiter = if activate {
                Some(make_arbiter(arbiter.as_deref(), addr.port())?)
            } else {
                None
            };
            {
                use std::io::Write;
                let mut o = std::io::stdout();
                let _ = writeln!(o, "listening on {addr}");
                let _ = o.flush();
            }
            let cfg = BackupConfig {
                state_dir: state_dir.clone(),
                psk: psk.clone(),
                max_mem: max_mem.unwrap_or_else(phys_mem),
                quiet,
                heartbeat_timeout,
                heartbeat_interval,
                ack_delay: test_ack_delay.unwrap_or_default(),
                beacon: match &beacon_listen {
                    Some(a) => {
                        let r = castor::ha::beacon::Receiver::bind(a, psk.clone())
                            .map_err(|e| e.to_string())?;
                        if !quiet {
                            eprintln!(
                                "castor backup: beacons (second heartbeat path) on udp {}",
                                r.local_addr().map_err(|e| e.to_string())?
                            );
                        }
                        Some(std::sync::Arc::new(r))
                    }
                    None => None,
                },
            };
            if let Some(d) = test_ack_delay {
                eprintln!(
                    "castor backup: TEST MODE: every ack is delayed by {} ms",
                    d.as_millis()
                );
            }
            if activate {
                castor::engine::install_stop_handler();
            }
            let mut out =
                backup::serve_with(&l, &cfg, transport).map_err(|e| format!("backup: {e}"))?;
            match (&out.meta, out.committed) {
                (Some(m), Some(e)) => eprintln!(
                    "castor backup: replica holds epoch {e} (digest {}), saved to {}",
                    m.digest,
                    state_dir.display()
                ),
                _ => eprintln!("castor backup: no checkpoint was completed; nothing saved"),
            }
            if let Some(arb) = arbiter.as_mut() {
                let Some((mem, state)) = out.replica.take() else {
                    return Err("cannot activate: no checkpoint was completed".into());
                };
                let from = out.committed.unwrap_or(0);
                let since = |t: std::time::Instant| {
                    format!("+{:.1} ms", (t - out.ended_at).as_secs_f64() * 1000.0)
                };
                eprintln!("castor backup: suspect primary {}: {}", out.peer, out.end);
                // A dying primary's lock is released only when its process
                // has exited: give it up to one heartbeat timeout, plus the
                // time a dead holder's lease takes to expire.
                let wait = heartbeat_timeout + arb.takeover_wait();
                let token = arb
                    .acquire_within(wait, Duration::from_millis(20))
                    .map_err(|e| format!("arbiter: {e}"))?;
                let Some(token) = token else {
                    eprintln!(
                        "castor backup: NOT ACTIVATING: the arbiter {} is still held by another copy after {} ms \
                         (the primary is alive: a network partition, or it closed the connection but runs on). \
                         Activating now would run two copies. The replica of epoch {from} stays saved in {}.",
                        arb.describe(),
                        wait.as_millis(),
                        state_dir.display()
                    );
                    return Ok(ExitCode::from(EXIT_ARBITER_HELD));
                };
                let won_at = std::time::Instant::now();
                eprintln!(
                    "castor backup: arbiter {} won (fencing token {token}) {}",
                    arb.describe(),
                    since(won_at)
                );
                let fenced_at = match &fence_cmd {
                    Some(cmd) => {
                        if let Err(e) = castor::ha::fence::run(cmd, token, &out.peer, fence_timeout)
                        {
                            eprintln!(
                                "castor backup: error: {e}. The replica of epoch {from} stays saved in {}.",
                                state_dir.display()
                            );
                            return Ok(ExitCode::from(EXIT_FENCE_FAILED));
                        }
                        let t = std::time::Instant::now();
                        eprintln!("castor backup: fenced {}", since(t));
                        Some(t)
                    }
                    None => None,
                };
                let acfg = castor::engine::activate::ActivateConfig {
                    epoch,
                    overrides,
                    run_for,
                    run_epochs,
                    reprotect_every: reprotect.as_ref().map(|_| reprotect_every),
                    primary: castor::engine::primary::PrimaryConfig {
                        progress: !quiet,
                        ..Default::default()
                    },
                    lease: arbiter.as_ref().and_then(|a| a.lease()),
                };
                let dir = state_dir.join("activated");
                let target = reprotect.clone().unwrap_or_default();
                // The fresh backup runs this backup's --transport.
                let dial = move |layout, desc: &str| {
                    harness::open_protection(
                        &target,
                        &psk,
                        layout,
                        desc,
                        Duration::ZERO,
                        reprotect_beacon.map(|b| (b, heartbeat_interval)),
                        transport,
                    )
                    .map_err(|e| e.to_string())
                };
                let a = castor::engine::activate::activate(
                    &out.domain,
                    mem,
                    &state,
                    from,
                    &acfg,
                    &dir,
                    dial,
                )
                .map_err(|e| e.to_string())?;
                eprintln!(
                    "castor backup: failover: suspect → arbiter won (token {token}) {} → {} → activated {}",
                    since(won_at),
                    fenced_at.map_or("no fence command".to_string(), |t| format!("fenced {}", since(t))),
                    since(a.running_at),
                );
                eprintln!(
                    "castor backup: activated domain ran {} epochs past checkpoint {} (stream loss → guest running: {:.1} ms); \
                     stopped at epoch {}, digest {}, image in {}",
                    a.epochs_run,
                    a.from_epoch,
                    (a.running_at - out.ended_at).as_secs_f64() * 1000.0,
                    a.meta.epoch,
                    a.meta.digest,
                    dir.display()
                );
                if let LiveEnd::SelfFenced(why) = &a.end {
                    eprintln!("castor backup: activated copy self-fenced: {why}");
                    return Ok(ExitCode::from(EXIT_SELF_FENCED));
                }
            }
            Ok(if out.clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Cmd::Protect {
            domain,
            backup,
            duration,
            epochs,
            psk_file,
            json,
            quiet,
            arbiter,
            stop_on_backup_loss,
            redial_every,
            beacon,
            nfqueue,
            nfqueue_dev,
            per_epoch,
            engine,
        } => {
            let spec = parse_spec(&domain)?;
            check_heartbeat(
                engine.heartbeat_interval,
                engine.backup_timeout,
                "--heartbeat-interval vs --backup-timeout",
            )?;
            // Rules first (and their check), so a missing queue fails
            // before anything runs; removed when `rules` drops.
            let rules = match nfqueue {
                Some(q) => nfqueue_rules(q, &nfqueue_dev)?,
                None => Vec::new(),
            };
            let psk = load_psk(psk_file.as_ref())?;
            engine.transport.check_available()?;
            let port = backup
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok());
            let mut arb = match (arbiter.as_deref(), port) {
                (Some(a), p) => make_arbiter(Some(a), p.unwrap_or(0))?,
                (None, Some(p)) => make_arbiter(None, p)?,
                (None, None) => {
                    return Err(format!(
                        "cannot name the default arbiter lock: --backup {backup:?} has no :PORT; give --arbiter local:PATH"
                    ))
                }
            };
            // Held until this process exits: while it is held no backup
            // can activate a second copy.
            match arb.try_acquire().map_err(|e| format!("arbiter: {e}"))? {
                Some(t) => eprintln!(
                    "castor protect: arbiter {} won (fencing token {t}); held while this primary runs",
                    arb.describe()
                ),
                None => {
                    eprintln!(
                        "castor protect: error: refusing to start: the arbiter {} is held by another copy of a \
                         domain (a live primary, or a backup that activated). Stop that copy first, or give \
                         this pair its own --arbiter.",
                        arb.describe()
                    );
                    return Ok(ExitCode::from(EXIT_ARBITER_HELD));
                }
            }
            let mut cfg = engine.config();
            cfg.duration = duration;
            cfg.max_epochs = epochs;
            cfg.progress = !quiet;
            cfg.keep_records = per_epoch;
            cfg.nfqueue = nfqueue.map(|queue| castor::outq::nfqueue::NfqSpec {
                queue,
                arp_devices: rules
                    .iter()
                    .filter(|r| r.bridge.is_some())
                    .map(|r| r.dev.clone())
                    .collect(),
            });
            castor::engine::install_stop_handler();
            let opts = harness::ProtectOpts {
                continue_unprotected: !stop_on_backup_loss,
                redial_every: (!redial_every.is_zero()).then_some(redial_every),
                beacon,
                transport: engine.transport,
                lease: arb.lease(),
            };
            let out = harness::protect(&spec, &backup, &psk, &cfg, &opts)
                .map_err(|e| format!("protect: {e}"))?;
            let live = &out.live;
            let (last, acked) = live.last_epochs.unwrap_or((0, 0));
            eprintln!(
                "castor protect: stopped after {} epochs ({} unprotected; protection sessions: {}; last session \
                 epoch {last}, acknowledged {acked}), digest {}",
                live.epochs, live.unprotected_epochs, live.sessions, out.digest
            );
            if let (Some(p), Some(s)) = (json, &live.last_summary) {
                let mut s = s.clone();
                s.output = Some(live.output.clone());
                harness::write_json(&p, &s).map_err(|e| e.to_string())?;
            }
            match &live.end {
                LiveEnd::Stopped => {}
                LiveEnd::BackupLost(why) => {
                    eprintln!("castor protect: stopped: {why}");
                    return Ok(ExitCode::from(EXIT_BACKUP_LOST));
                }
                LiveEnd::SelfFenced(why) => {
                    eprintln!("castor protect: self-fenced: {why}");
                    return Ok(ExitCode::from(EXIT_SELF_FENCED));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench {
            domain,
            duration,
            json,
            per_epoch,
            progress,
            engine,
        } => {
            let spec = parse_spec(&domain)?;
            engine.transport.check_available()?;
            let mut cfg = engine.config();
            cfg.duration = Some(duration);
            cfg.progress = progress;
            cfg.keep_records = per_epoch;
            cfg.keep_dirty_lists = 20;
            castor::engine::install_stop_handler();
            let s = harness::loopback(
                &spec,
                &cfg,
                &LoopbackOpts {
                    state_dir: None,
                    quiet_backup: true,
                    transport: engine.transport,
                },
            )
            .map_err(|e| e.to_string())?;
            harness::print_table(&s);
            if let Some(p) = json {
                harness::write_json(&p, &s).map_err(|e| e.to_string())?;
            }
            Ok(if s.digest_match {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Digest {
            replica: Some(dir), ..
        } => {
            let (meta, d) = replica::verify(&dir).map_err(|e| e.to_string())?;
            println!("{d} epoch {} {}", meta.epoch, meta.domain);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Digest {
            domain: Some(domain),
            at_epoch: Some(n),
            ..
        } => {
            let spec = parse_spec(&domain)?;
            let d = harness::expected_digest(&spec, n).map_err(|e| e.to_string())?;
            println!("{d} epoch {n} {spec}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Digest { .. } => {
            Err("digest needs --replica DIR, or --domain SPEC --at-epoch N".into())
        }
        Cmd::BenchTransport {
            duration,
            rounds,
            iperf,
            veth,
            json,
        } => {
            TransportKind::Uring.check_available()?;
            let r = castor::transport_bench::run(duration, rounds, iperf, veth)?;
            if let Some(p) = json {
                let j = serde_json::to_vec_pretty(&r).expect("report serialises");
                std::fs::write(&p, j).map_err(|e| format!("writing {}: {e}", p.display()))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Keygen => {
            println!(
                "{}",
                random_nonce()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("CASTOR_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("castor: error: {e}");
            ExitCode::from(1)
        }
    }
}
