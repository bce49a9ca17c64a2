//! `castor protect`: run a domain in epochs and stream each checkpoint to a
//! backup; hold the arbiter for the primary's whole life.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use castor::disk::session::PrimaryDisks;
use castor::disk::spec::serve_disks;
use castor::disk::{Fence, ServerConfig};
use castor::engine::live::LiveEnd;
use castor::engine::primary::PrimaryConfig;
use castor::engine::protect::{self, ProtectOpts, Protected};
use castor::ha::arbiter::Arbiter;
use castor::ha::exit;
use castor::outq::nfqueue::rules::Installed;
use castor::report;
use castor::units;

use super::arbiter::make_arbiter;
use super::engine_args::EngineArgs;
use super::keys::{check_dev_key, load_psk};
use super::nfqueue::nfqueue_rules;
use super::ops::{self, MetricsArgs};
use super::parse::{check_heartbeat, parse_spec};

#[derive(Args)]
pub struct ProtectArgs {
    /// The guest, one of:
    ///   sim:mem=SIZE[,workload=edits|uniform|hotcold|sequential|zero|incompressible|mixed,rate=N,...]
    ///       castor's own simulated guest (any machine)
    ///   kvm:guest=memtouch,mem=SIZE[,regions=N,touch=N,pattern=...,seed=N]
    ///       a guest castor runs itself under /dev/kvm
    ///   xen:name=NAME|domid=N[,suspend=auto|evtchn|shutdown|xenstore|pause,suspend_timeout=10s,config=PATH,scanners=2]
    ///       a running Xen guest, from dom0 (needs a castor built with --features xen; docs/xen.md)
    #[arg(long, verbatim_doc_comment)]
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
    /// Serve the raw image PATH as NBD export NAME at ADDR (`HOST:PORT` or
    /// `unix:PATH`) and replicate its writes with the checkpoints; the
    /// backup keeps it as STATE_DIR/disks/NAME.img. Repeatable (disks with
    /// the same ADDR are exports of one server).
    #[arg(long = "disk", value_name = "NAME=PATH,nbd=ADDR")]
    disks: Vec<castor::disk::spec::DiskArg>,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
}

pub fn run(a: ProtectArgs) -> Result<ExitCode, String> {
    let spec = parse_spec(&a.domain)?;
    check_heartbeat(
        a.engine.heartbeat_interval,
        a.engine.backup_timeout,
        "--heartbeat-interval vs --backup-timeout",
    )?;
    // Rules first (and their check), so a missing queue fails
    // before anything runs; removed when `rules` drops.
    let rules = match a.nfqueue {
        Some(q) => nfqueue_rules(q, &a.nfqueue_dev)?,
        None => Vec::new(),
    };
    let psk = load_psk(a.psk_file.as_ref(), a.engine.encrypt)?;
    check_dev_key(&psk, "--backup", &a.backup)?;
    a.engine.transport.check_available()?;
    let _ops = ops::start(&a.metrics, castor::ops::telemetry::Role::Primary, "protect")?;
    castor::ops::telemetry::with(|t| {
        t.set_domain(&spec.to_string());
        t.set_peer(&a.backup);
    });
    // Held until this process exits: while it is held no backup can
    // activate a second copy.
    let Some((arb, token)) = win_arbiter(&a)? else {
        return Ok(ExitCode::from(exit::ARBITER_HELD));
    };
    // The exports complete writes only while this copy holds the arbiter
    // (and its lease, when it can lapse): fencing enforced where the
    // writes land.
    let fence = Arc::new(Fence::holding(token, arb.lease()));
    let served = serve_disks(&a.disks, fence.clone(), ServerConfig::default())
        .map_err(|e| format!("protect: {e}"))?;
    for s in &served.servers {
        for e in s.exports() {
            eprintln!(
                "castor protect: disk {} served at nbd://{}/{}",
                e.name,
                s.local_addr(),
                e.name
            );
        }
    }
    let mut cfg = primary_config(&a, &rules);
    let nbd = a
        .disks
        .iter()
        .map(|d| (d.name.clone(), d.nbd.to_string()))
        .collect();
    cfg.disks = PrimaryDisks {
        disks: served.logs.clone(),
        nbd,
    };
    castor::engine::install_stop_handler();
    let opts = ProtectOpts {
        continue_unprotected: !a.stop_on_backup_loss,
        redial_every: (!a.redial_every.is_zero()).then_some(a.redial_every),
        beacon: a.beacon,
        transport: a.engine.transport,
        lease: arb.lease(),
        heirs: arb.heir_book(),
    };
    let out = protect::protect(&spec, &a.backup, &psk, &cfg, &opts);
    if !matches!(&out, Ok(o) if matches!(o.live.end, LiveEnd::Stopped)) {
        // Self-fenced, lost or failed: no later write may complete here.
        fence.revoke();
    }
    let out = out.map_err(|e| format!("protect: {e}"))?;
    report(&out, a.json)
}

/// The arbiter (`--arbiter`, or the pair's lock named by --backup's port),
/// won; `None` when another copy holds it (already said why).
/// An arbiter won, and the fencing token it gave.
type Won = (Box<dyn Arbiter>, u64);

fn win_arbiter(a: &ProtectArgs) -> Result<Option<Won>, String> {
    let port = a
        .backup
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok());
    let mut arb = match (a.arbiter.as_deref(), port) {
        (Some(s), p) => make_arbiter(Some(s), p.unwrap_or(0))?,
        (None, Some(p)) => make_arbiter(None, p)?,
        (None, None) => {
            return Err(format!(
                "cannot name the default arbiter lock: --backup {:?} has no :PORT; give --arbiter local:PATH",
                a.backup
            ))
        }
    };
    match first_answer(arb.as_mut()).map_err(|e| format!("arbiter: {e}"))? {
        Some(t) => {
            eprintln!(
                "castor protect: arbiter {} won (fencing token {t}); held while this primary runs",
                arb.describe()
            );
            castor::ops::telemetry::with(|tm| {
                tm.set_arbiter(&arb.describe(), Some(t.0), arb.lease())
            });
            Ok(Some((arb, t.0)))
        }
        None => {
            eprintln!(
                "castor protect: error: refusing to start: the arbiter {} is held by another copy of a \
                 domain (a live primary, or a backup that activated). Stop that copy first, or give \
                 this pair its own --arbiter.",
                arb.describe()
            );
            Ok(None)
        }
    }
}

/// How long a starting primary retries an arbiter it cannot reach (a
/// freshly started or briefly overloaded etcd) before it gives up.
const START_PATIENCE: Duration = Duration::from_secs(10);

/// One campaign attempt that counts: an unreachable arbiter is asked
/// again for up to [`START_PATIENCE`]; "held" is an answer at once.
fn first_answer(
    arb: &mut dyn Arbiter,
) -> Result<Option<castor::ha::arbiter::FencingToken>, castor::ha::arbiter::ArbiterError> {
    let t0 = std::time::Instant::now();
    loop {
        match arb.try_acquire() {
            Err(e) if e.is_unreachable() && t0.elapsed() < START_PATIENCE => {
                eprintln!(
                    "castor protect: arbiter {}: {e}; asking again",
                    arb.describe()
                );
                std::thread::sleep(Duration::from_millis(250));
            }
            r => return r,
        }
    }
}

fn primary_config(a: &ProtectArgs, rules: &[Installed]) -> PrimaryConfig {
    let mut cfg = a.engine.config();
    cfg.duration = a.duration;
    cfg.max_epochs = a.epochs;
    cfg.progress = !a.quiet;
    cfg.keep_records = a.per_epoch;
    cfg.nfqueue = a.nfqueue.map(|queue| castor::outq::nfqueue::NfqSpec {
        queue,
        arp_devices: rules
            .iter()
            .filter(|r| r.bridge.is_some())
            .map(|r| r.dev.clone())
            .collect(),
    });
    cfg
}

/// The closing line, the JSON report, and the exit status of how the live
/// copy ended.
fn report(out: &Protected, json: Option<PathBuf>) -> Result<ExitCode, String> {
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
        report::write_json(&p, &s).map_err(|e| e.to_string())?;
    }
    match &live.end {
        LiveEnd::Stopped => Ok(ExitCode::SUCCESS),
        LiveEnd::BackupLost(why) => {
            eprintln!("castor protect: stopped: {why}");
            Ok(ExitCode::from(exit::STREAM_LOST))
        }
        LiveEnd::SelfFenced(why) => {
            eprintln!("castor protect: self-fenced: {why}");
            Ok(ExitCode::from(exit::SELF_FENCED))
        }
    }
}
