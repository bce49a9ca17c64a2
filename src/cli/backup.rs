//! `castor backup`: receive checkpoints from one primary, save the committed
//! replica when its stream ends or breaks and, with `--activate`, fail over
//! ([`castor::ha::failover`]): arbiter, fence, activation, re-protection.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use castor::engine::activate::{self, ActivateConfig};
use castor::engine::backup::{self, BackgroundSave, BackupConfig, BackupOutcome};
use castor::engine::live::LiveEnd;
use castor::engine::primary::PrimaryConfig;
use castor::ha::arbiter::Arbiter;
use castor::ha::beacon;
use castor::ha::exit;
use castor::ha::failover::{self, Activated, Plan};
use castor::ha::heir::HeirBook;
use castor::ha::lease::LeaseWatch;
use castor::transport::handshake::Psk;
use castor::transport::TransportKind;
use castor::units;

use super::arbiter::make_arbiter;
use super::keys::{check_dev_key, load_psk};
use super::ops::{self, MetricsArgs};
use super::parse::check_heartbeat;

#[derive(Args)]
pub struct BackupArgs {
    /// Address to listen on (port 0 picks a free port; the bound address is printed first).
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: String,
    /// Directory for the committed replica: `current` names the complete
    /// version (memory.img, state.bin, meta.json), replaced as a set.
    #[arg(long)]
    state_dir: PathBuf,
    /// Transport the primary must use: tcp, uring or rdma.
    #[arg(long, value_enum, default_value_t = TransportKind::Tcp)]
    transport: TransportKind,
    #[arg(long)]
    psk_file: Option<PathBuf>,
    /// Require records to be encrypted (AES-256-GCM), not only
    /// authenticated; the primary must run with --encrypt too.
    #[arg(long)]
    encrypt: bool,
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
    /// A connecting primary must complete the handshake within this;
    /// strangers (port scans, health checks, wrong keys) are logged and
    /// dropped while the backup keeps listening.
    #[arg(long, default_value = "5s", value_parser = units::parse_duration)]
    handshake_timeout: Duration,
    /// Threads decoding received pages, each owning a stripe of guest
    /// memory (1: on the receiving thread). Default: 1 on hosts with fewer
    /// than 4 cores or guests under 64 MiB, else half the cores, at most 4.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    decode_lanes: Option<u16>,
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
    /// Do not listen: activate the replica saved in --state-dir by an
    /// earlier backup run whose primary is gone (a cluster manager's
    /// promote; see docs/operations.md, Pacemaker). Needs an explicit
    /// --arbiter; the failover runs as after a stream loss.
    #[arg(long, requires_all = ["activate", "arbiter"])]
    from_saved: bool,
    /// FOR TESTS ONLY: delay every ack by this long (output commit tests).
    #[arg(long, hide = true, value_parser = units::parse_duration)]
    test_ack_delay: Option<Duration>,
    #[command(flatten)]
    metrics: MetricsArgs,
}

pub fn run(a: BackupArgs) -> Result<ExitCode, String> {
    check_heartbeat(
        a.heartbeat_interval,
        a.heartbeat_timeout,
        "--heartbeat-interval vs --heartbeat-timeout",
    )?;
    let psk = load_psk(a.psk_file.as_ref(), a.encrypt)?;
    check_dev_key(&psk, "--listen", &a.listen)?;
    a.transport.check_available()?;
    let _ops = ops::start(&a.metrics, castor::ops::telemetry::Role::Backup, "backup")?;
    // A backup killed while applying an epoch to its disks left them half
    // way: put them back to the epoch before, before anything reads them.
    castor::disk::session::recover_disks(&a.state_dir.join("disks"))
        .map_err(|e| format!("--state-dir {}: {e}", a.state_dir.display()))?;
    if a.from_saved {
        return activate_saved(&a, psk);
    }
    let l = castor::transport::tcp::listen(&a.listen).map_err(|e| e.to_string())?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    // Chosen (and checked) now, so a bad spec fails before replication.
    let mut arbiter = if a.activate {
        Some(make_arbiter(a.arbiter.as_deref(), addr.port())?)
    } else {
        None
    };
    {
        use std::io::Write;
        let mut o = std::io::stdout();
        let _ = writeln!(o, "listening on {addr}");
        let _ = o.flush();
    }
    ops::ready(&format!("listening on {addr}"));
    if let Some(arb) = &arbiter {
        castor::ops::telemetry::with(|t| t.set_arbiter(&arb.describe(), None, None));
    }
    let cfg = backup_config(&a, &psk)?;
    if let Some(d) = a.test_ack_delay {
        eprintln!(
            "castor backup: TEST MODE: every ack is delayed by {} ms",
            d.as_millis()
        );
    }
    if a.activate {
        castor::engine::install_stop_handler();
    }
    let mut out = backup::serve_with(&l, &cfg, a.transport).map_err(|e| format!("backup: {e}"))?;
    match (&out.meta, out.committed) {
        (Some(m), Some(e)) => eprintln!(
            "castor backup: replica holds epoch {e} (digest {}), saved to {}",
            m.digest,
            a.state_dir.display()
        ),
        (None, Some(e)) if out.unsaved => eprintln!(
            "castor backup: replica holds epoch {e}; saving it to {} while failing over",
            a.state_dir.display()
        ),
        _ => eprintln!("castor backup: no checkpoint was completed; nothing saved"),
    }
    if let Some(arb) = arbiter.as_mut() {
        if let Some(code) = fail_over(&a, psk, arb.as_mut(), &mut out)? {
            return Ok(ExitCode::from(code));
        }
    }
    Ok(if out.clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(exit::STREAM_LOST)
    })
}

fn backup_config(a: &BackupArgs, psk: &Psk) -> Result<BackupConfig, String> {
    let beacon = match &a.beacon_listen {
        Some(addr) => {
            let r = beacon::Receiver::bind(addr, psk.clone()).map_err(|e| e.to_string())?;
            if !a.quiet {
                eprintln!(
                    "castor backup: beacons (second heartbeat path) on udp {}",
                    r.local_addr().map_err(|e| e.to_string())?
                );
            }
            Some(Arc::new(r))
        }
        None => None,
    };
    Ok(BackupConfig {
        state_dir: a.state_dir.clone(),
        psk: psk.clone(),
        max_mem: a.max_mem.unwrap_or_else(phys_mem),
        quiet: a.quiet,
        heartbeat_timeout: a.heartbeat_timeout,
        heartbeat_interval: a.heartbeat_interval,
        ack_delay: a.test_ack_delay.unwrap_or_default(),
        handshake_timeout: a.handshake_timeout,
        beacon,
        decode_lanes: a.decode_lanes.map(usize::from),
        // An activating backup saves while it arbitrates (fail_over).
        defer_save: a.activate,
    })
}

/// `--from-saved`: the failover sequence on the replica an earlier run
/// saved in --state-dir.
fn activate_saved(a: &BackupArgs, psk: Psk) -> Result<ExitCode, String> {
    let (meta, mem, state) =
        castor::engine::replica::load(&a.state_dir).map_err(|e| format!("--from-saved: {e}"))?;
    restore_saved_disks(&a.state_dir, &meta)?;
    let mut arb = make_arbiter(a.arbiter.as_deref(), 0)?;
    eprintln!(
        "castor backup: activating the replica of epoch {} saved in {} ({})",
        meta.epoch,
        a.state_dir.display(),
        meta.domain
    );
    ops::ready("activating the saved replica");
    let session = meta.session.clone();
    let mut out = BackupOutcome {
        peer: "(the primary of the saved replica)".into(),
        domain: meta.domain.clone(),
        clean: true,
        end: "activation of the saved replica asked (--from-saved)".into(),
        discarded: None,
        committed: Some(meta.epoch),
        meta: Some(meta),
        digest: None,
        bytes_received: 0,
        silent: None,
        ended_at: std::time::Instant::now(),
        replica: Some((mem, state)),
        session,
        disks: Vec::new(),
        unsaved: false,
    };
    let code = fail_over(a, psk, arb.as_mut(), &mut out)?;
    Ok(ExitCode::from(code.unwrap_or(0)))
}

/// Puts the saved version's disks where activation takes them from
/// (`STATE_DIR/disks/NAME.img`). The working disks there may be newer than
/// the saved memory (a backup that crashed mid-session committed later
/// epochs to them), or gone (an earlier activation moved them): the
/// version's copies are the ones at the saved epoch. Copied, sparse, so
/// the saved version stays whole.
fn restore_saved_disks(
    state_dir: &std::path::Path,
    meta: &castor::engine::replica::Meta,
) -> Result<(), String> {
    if meta.disks.is_empty() {
        return Ok(());
    }
    let ver = castor::engine::replica::version_dir(state_dir)
        .map_err(|e| format!("--from-saved: {e}"))?;
    for d in &meta.disks {
        let from = castor::engine::replica::disk_path(&ver, &d.name);
        let to = castor::engine::replica::disk_path(state_dir, &d.name);
        let failed = |e: std::io::Error| {
            format!(
                "--from-saved: copying the saved disk {} to {}: {e}",
                from.display(),
                to.display()
            )
        };
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).map_err(failed)?;
        }
        castor::disk::image::copy_sparse(&from, &to).map_err(failed)?;
    }
    Ok(())
}

/// `--activate`: the failover sequence on the committed replica; the exit
/// status it imposes, if any.
fn fail_over(
    a: &BackupArgs,
    psk: Psk,
    arb: &mut dyn Arbiter,
    out: &mut BackupOutcome,
) -> Result<Option<u8>, String> {
    // A replica the stream just ended with is saved meanwhile: arbitration
    // and fencing do not wait for its write and fsync.
    let mut saving = BackgroundSave::start(&a.state_dir, out);
    let mut replica = out.replica.take();
    if saving.is_none() && replica.is_none() {
        return Err("cannot activate: no checkpoint was completed".into());
    }
    let dir = a.state_dir.join("activated");
    let plan = Plan {
        peer: &out.peer,
        why: &out.end,
        from_epoch: out.committed.unwrap_or(0),
        session: out.session.as_deref(),
        stream_lost_at: out.ended_at,
        heartbeat_timeout: a.heartbeat_timeout,
        fence_cmd: a.fence_cmd.as_deref(),
        fence_timeout: a.fence_timeout,
        state_dir: &a.state_dir,
        activated_dir: &dir,
    };
    let domain = &out.domain;
    let disks = out
        .meta
        .as_ref()
        .map_or_else(|| out.disks.clone(), |m| m.disks.clone());
    let slot = &mut saving;
    let activation = |lease: Option<LeaseWatch>, heirs| {
        // The save works on a snapshot (the replica is here), or on the
        // replica itself (always with disks): activation waits for it.
        let (mem, state) = match replica.take() {
            Some(r) => r,
            None => saved(slot.take().expect("the replica is being saved")),
        };
        let mut acfg = activate_config(a, lease, heirs);
        acfg.disks = disks;
        let dial = reprotect_dial(a, psk);
        let r = activate::activate(domain, mem, &state, plan.from_epoch, &acfg, &dir, dial)
            .map_err(|e| e.to_string())?;
        Ok(Activated {
            from_epoch: r.from_epoch,
            running_at: r.running_at,
            epochs_run: r.epochs_run,
            stopped_epoch: r.meta.epoch,
            digest: r.meta.digest.to_string(),
            self_fenced: match r.end {
                LiveEnd::SelfFenced(why) => Some(why),
                _ => None,
            },
        })
    };
    let f = failover::run(&plan, arb, activation);
    if let Some(job) = saving {
        // A snapshot's save, or not activated: the saved replica is what a
        // later run can use.
        saved(job);
    }
    Ok(f.map_err(|e| e.to_string())?.outcome.exit_status())
}

/// Waits for the background save (it says how it went); the replica back.
fn saved(job: BackgroundSave) -> (castor::domain::GuestMemory, Vec<u8>) {
    job.finish().0
}

fn activate_config(a: &BackupArgs, lease: Option<LeaseWatch>, heirs: HeirBook) -> ActivateConfig {
    ActivateConfig {
        epoch: a.epoch,
        overrides: a.overrides.clone(),
        run_for: a.run_for,
        run_epochs: a.run_epochs,
        reprotect_every: a.reprotect.as_ref().map(|_| a.reprotect_every),
        primary: PrimaryConfig {
            progress: !a.quiet,
            ..Default::default()
        },
        lease,
        heirs,
        disks: Vec::new(),
        replica_dir: a.state_dir.clone(),
    }
}

/// Dials the fresh backup of `--reprotect`; it runs this backup's
/// --transport.
fn reprotect_dial(
    a: &BackupArgs,
    psk: Psk,
) -> impl FnMut(
    castor::domain::Layout,
    &str,
) -> Result<castor::engine::live::Session<Box<dyn std::io::Read + Send>>, String>
       + Send
       + 'static {
    let target = a.reprotect.clone().unwrap_or_default();
    let beacon = a.reprotect_beacon.map(|b| (b, a.heartbeat_interval));
    let transport = a.transport;
    move |layout, desc: &str| {
        castor::engine::dial::open_protection(
            &target,
            &psk,
            layout,
            desc,
            Duration::ZERO,
            beacon,
            transport,
        )
        .map_err(|e| e.to_string())
    }
}

/// Physical memory of this host, bytes: the default `--max-mem`.
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
