//! Activation: the backup turns its last committed checkpoint into a
//! running domain.
//!
//! The replica's memory is adopted by the restored domain (no copy), the
//! saved state restores vCPUs and devices, and the guest resumes from
//! exactly the last complete checkpoint. It then runs as the live copy
//! ([`crate::engine::live`]): unprotected (output passes straight through)
//! and, when asked (`--reprotect`), protected again as soon as a fresh
//! backup answers. It runs in epochs of the primary's length (so
//! deterministic domains keep their epoch structure) until its run limit or
//! SIGINT/SIGTERM, then is paused and its image saved so it can be
//! inspected or verified.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::digest::Digest;
use crate::domain::{DomainError, DomainSpec, GuestMemory};
use crate::engine::live::{self, LiveConfig, LiveEnd, LiveError, Session};
use crate::engine::primary::PrimaryConfig;
use crate::engine::replica::{self, Meta, ReplicaError};
use crate::ha::lease::LeaseWatch;
use crate::outq::{Mode, OutputQueue};

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the replica's domain {desc:?} cannot be restored here: {source}")]
    Spec {
        desc: String,
        #[source]
        source: DomainError,
    },
    #[error("restoring or running the domain: {0}")]
    Domain(#[from] DomainError),
    #[error("saving the activated domain: {0}")]
    Save(#[from] ReplicaError),
    #[error("running the activated domain: {0}")]
    Live(#[from] LiveError),
    #[error("output queue: {0}")]
    Output(#[from] crate::outq::OutqError),
    #[error("the replica's disks: {0}")]
    Disks(#[from] crate::disk::activate::ActivateDiskError),
}

#[derive(Debug, Clone)]
pub struct ActivateConfig {
    pub epoch: Duration,
    /// `key=value,...` replacing parts of the primary's domain spec (its
    /// own console file, TAP device, ...).
    pub overrides: Option<String>,
    /// Stop after this long (None: until a stop signal).
    pub run_for: Option<Duration>,
    /// Stop after this many epochs past the checkpoint.
    pub run_epochs: Option<u64>,
    /// Protect the activated domain again: dial a fresh backup this often
    /// once the announcements are done (None: run unprotected).
    pub reprotect_every: Option<Duration>,
    /// Tunables of those protection sessions (`epoch` is taken from above).
    pub primary: PrimaryConfig,
    /// The arbiter's lease, when its hold can lapse (self-fence on lapse).
    pub lease: Option<LeaseWatch>,
    /// Where the arbiter keeps the heir record.
    pub heirs: crate::ha::heir::HeirBook,
    /// The replica's disks (its meta.json) and the directory holding them
    /// (`disks/NAME.img`); they move to the activated directory.
    pub disks: Vec<crate::disk::session::DiskSpec>,
    pub replica_dir: std::path::PathBuf,
}

#[derive(Debug)]
pub struct Activation {
    /// Checkpoint the domain was restored from.
    pub from_epoch: u64,
    /// Restore: replica → domain object ready to run.
    pub restore_time: Duration,
    /// When the restored guest was started.
    pub running_at: Instant,
    /// Epochs the activated domain ran.
    pub epochs_run: u64,
    /// Saved image of the activated domain when it stopped.
    pub meta: Meta,
    /// Backups that protected the activated domain (re-protection).
    pub sessions: u64,
    /// Why it stopped.
    pub end: LiveEnd,
}

/// Restores `desc` (the primary's domain description) from checkpoint
/// `epoch` and runs it as the live copy; saves its final image into
/// `out_dir`. `dial` opens a session to a fresh backup (used only with
/// `reprotect_every`).
pub fn activate<R, D>(
    desc: &str,
    memory: GuestMemory,
    state: &[u8],
    epoch: u64,
    cfg: &ActivateConfig,
    out_dir: &Path,
    dial: D,
) -> Result<Activation, ActivateError>
where
    R: std::io::Read + Send + 'static,
    D: FnMut(crate::domain::Layout, &str) -> Result<Session<R>, String> + Send + 'static,
{
    let t0 = Instant::now();
    // Writes to the replica's disks complete only while this copy holds
    // the arbiter's lease (when it can lapse).
    let fence = std::sync::Arc::new(crate::disk::Fence::holding(0, cfg.lease.clone()));
    let disks = crate::disk::activate::activate_disks(
        &cfg.replica_dir,
        out_dir,
        &cfg.disks,
        cfg.overrides.as_deref(),
        fence.clone(),
    )?;
    let spec = DomainSpec::parse(desc)
        .and_then(|s| match &disks.overrides {
            Some(o) => s.with_overrides(o),
            None => Ok(s),
        })
        .map_err(|source| ActivateError::Spec {
            desc: desc.to_string(),
            source,
        })?;
    let mut domain = spec.restore(memory, state)?;
    // The output queue starts unprotected (pass-through): there is no
    // backup to wait for yet. It is there so a re-protecting backup can
    // hold output from its first epoch on.
    let mut outq = OutputQueue::start(Mode::PassThrough)?;
    domain.attach_output(&outq)?;
    // Announce the guest's addresses from this host before the guest can
    // speak, so the first reply it sends already travels the new path.
    for what in domain.announce()? {
        eprintln!("castor backup: announced {what}");
    }
    domain.start()?;
    let running_at = Instant::now();
    crate::ops::telemetry::with(|t| {
        t.set_failover_state(crate::ops::telemetry::FailoverState::Running);
        t.failover_step("running", None);
        t.set_role(crate::ops::telemetry::Role::Primary);
        t.set_domain(&spec.to_string());
        t.epoch_started(epoch);
    });
    let restore_time = running_at - t0;
    eprintln!(
        "castor backup: ACTIVATED {spec} from epoch {epoch}: guest running {:.1} ms after restore began",
        restore_time.as_secs_f64() * 1000.0
    );
    let lcfg = live_config(cfg, &disks.logs);
    let out = live::run(domain, &mut outq, None, dial, &lcfg).map_err(|(e, _)| {
        fence.revoke();
        e
    })?;
    if matches!(out.end, LiveEnd::SelfFenced(_)) {
        fence.revoke();
    }
    let mut domain = out.domain;
    let ran = out.epochs;
    let mut st = Vec::new();
    domain.save_state(&mut st)?;
    // SAFETY: the domain is paused; nothing writes its memory now.
    let mem = unsafe { domain.memory().as_slice() };
    let meta = replica::save_with_disks(
        out_dir,
        mem,
        &st,
        (epoch + ran, &domain.describe(), None),
        &cfg.disks,
        out_dir,
    )?;
    debug_assert!(!cfg.disks.is_empty() || Digest::of(mem, &st).to_hex() == meta.digest);
    drop(outq.shutdown());
    drop(disks.servers);
    Ok(Activation {
        from_epoch: epoch,
        restore_time,
        running_at,
        epochs_run: ran,
        meta,
        sessions: out.sessions,
        end: out.end,
    })
}

/// How the activated copy lives on: unprotected until a backup answers
/// (`--reprotect`), announcing its addresses again after it started, its
/// re-protection replicating the NBD disks served from the replica
/// (`logs`) as well as the domain's own.
fn live_config(
    cfg: &ActivateConfig,
    logs: &[(String, std::sync::Arc<crate::disk::WriteLog>)],
) -> LiveConfig {
    // Repeat the announcement: a frame sent the instant a TAP comes up can
    // be dropped while the bridge still sees the port as down (the kernel
    // reports carrier-up asynchronously), and RFC 5227 announces more than
    // once anyway. Re-protection dials only after the last one.
    let announce_at: Vec<Duration> = [100u64, 500, 1500]
        .into_iter()
        .map(Duration::from_millis)
        .collect();
    let mut primary = cfg.primary.clone();
    primary.epoch = cfg.epoch;
    // Re-protection replicates the NBD disks served from the replica too
    // (the domain's own disks come with the domain).
    primary.disks = crate::disk::session::PrimaryDisks {
        disks: logs.to_vec(),
        nbd: cfg
            .disks
            .iter()
            .map(|d| (d.name.clone(), d.nbd.clone()))
            .collect(),
    };
    LiveConfig {
        primary,
        run_for: cfg.run_for,
        run_epochs: cfg.run_epochs,
        continue_unprotected: true,
        redial_every: cfg.reprotect_every,
        dial_after: Duration::ZERO,
        lease: cfg.lease.clone(),
        heirs: cfg.heirs.clone(),
        lease_margin: Duration::from_millis(100),
        announce_at,
        label: "castor backup".into(),
    }
}
