//! Activation: the backup turns its last committed checkpoint into a
//! running domain.
//!
//! The replica's memory is adopted by the restored domain (no copy), the
//! saved state restores vCPUs and devices, and the guest resumes from
//! exactly the last complete checkpoint. Until re-protection exists (issue
//! 3/4) the activated domain runs unprotected: it is driven in epochs of
//! the same length as on the primary (so deterministic domains keep their
//! epoch structure) until its run limit or SIGINT/SIGTERM, then paused and
//! its image saved so it can be inspected or verified.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::digest::Digest;
use crate::domain::{DomainError, DomainSpec, GuestMemory};
use crate::engine::replica::{self, Meta, ReplicaError};

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
    #[error("self-fenced after {epochs} epochs: the arbiter's lease is no longer held; the guest stays paused")]
    LeaseLost { epochs: u64 },
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
    /// The arbiter's lease (etcd): the guest runs an epoch only while the
    /// lease is held for that epoch plus 100 ms; its output is not held
    /// here, so the check must cover the whole epoch ahead.
    pub lease: Option<crate::ha::lease::LeaseWatch>,
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
}

/// Restores `desc` (the primary's domain description) from checkpoint
/// `epoch` and runs it; saves its final image into `out_dir`.
pub fn activate(
    desc: &str,
    memory: GuestMemory,
    state: &[u8],
    epoch: u64,
    cfg: &ActivateConfig,
    out_dir: &Path,
) -> Result<Activation, ActivateError> {
    let t0 = Instant::now();
    let spec = DomainSpec::parse(desc)
        .and_then(|s| match &cfg.overrides {
            Some(o) => s.with_overrides(o),
            None => Ok(s),
        })
        .map_err(|source| ActivateError::Spec {
            desc: desc.to_string(),
            source,
        })?;
    let mut domain = spec.restore(memory, state)?;
    // No `attach_output`: the activated domain runs unprotected (there is no
    // backup to wait for), so its output passes straight through to its
    // devices' backends (the TAP). Holding it would only add latency.
    // Announce the guest's addresses from this host before the guest can
    // speak, so the first reply it sends already travels the new path.
    for what in domain.announce()? {
        eprintln!("castor backup: announced {what}");
    }
    domain.start()?;
    let running_at = Instant::now();
    let restore_time = running_at - t0;
    eprintln!(
        "castor backup: ACTIVATED {spec} from epoch {epoch}: guest running {:.1} ms after restore began",
        restore_time.as_secs_f64() * 1000.0
    );
    let started = Instant::now();
    let mut ran = 0u64;
    let mut scratch = Vec::new();
    let mut deadline = started + cfg.epoch;
    // Repeat the announcement: a frame sent the instant a TAP comes up can
    // be dropped while the bridge still sees the port as down (the kernel
    // reports carrier-up asynchronously), and RFC 5227 announces more than
    // once anyway.
    let mut repeats = [100u64, 500, 1500].into_iter().peekable();
    loop {
        let now = Instant::now();
        if repeats
            .peek()
            .is_some_and(|&ms| now.duration_since(started) >= Duration::from_millis(ms))
        {
            repeats.next();
            domain.announce()?;
        }
        if now < deadline {
            std::thread::sleep((deadline - now).min(Duration::from_millis(50)));
            if !crate::engine::stop_requested() {
                continue;
            }
        }
        deadline += cfg.epoch;
        domain.pause()?;
        ran += 1;
        // Unprotected: nobody needs the dirty set, but keep tracking current.
        scratch.clear();
        domain.harvest_dirty(&mut scratch)?;
        let done = crate::engine::stop_requested()
            || cfg.run_epochs.is_some_and(|n| ran >= n)
            || cfg.run_for.is_some_and(|d| started.elapsed() >= d);
        if done {
            break;
        }
        if cfg
            .lease
            .as_ref()
            .is_some_and(|l| !l.held_for(cfg.epoch + Duration::from_millis(100)))
        {
            return Err(ActivateError::LeaseLost { epochs: ran });
        }
        domain.resume()?;
    }
    let mut st = Vec::new();
    domain.save_state(&mut st)?;
    // SAFETY: the domain is paused; nothing writes its memory now.
    let mem = unsafe { domain.memory().as_slice() };
    let meta = replica::save(out_dir, mem, &st, epoch + ran, &domain.describe())?;
    debug_assert_eq!(Digest::of(mem, &st).to_hex(), meta.digest);
    Ok(Activation {
        from_epoch: epoch,
        restore_time,
        running_at,
        epochs_run: ran,
        meta,
    })
}
