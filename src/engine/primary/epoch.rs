//! The epoch thread (`castor-epoch`): the seed, then one checkpoint per
//! epoch: wait (pacing), pre-harvest, pause, harvest, copy, save state,
//! resume, dispatch.
//!
//! Invariants:
//! - Harvests ([`Driver::harvest`]) are split by stripes over the pause's
//!   pinned workers (`castor-copy-N`) when the domain allows it; the list
//!   is the same as one thread's.
//! - The guest's pause ([`Driver::pause`]) holds only: the lease check,
//!   opening the next output epoch, the harvest of the last moment's dirty
//!   pages, taking a staging buffer, the copy, the state save and the
//!   resume. Every wait (deadline, backpressure) and the pre-harvest happen
//!   before it ([`super::pacing`]); dispatch and bookkeeping after it.
//! - Output tagged N is exactly what checkpoint N covers: the next epoch
//!   is opened in the output queue while every output producer is parked.
//! - Without the lease (the session's
//!   [`LeaseGate`](crate::ha::lease::LeaseGate) says fence) the guest is never
//!   resumed: the session fails as self-fenced.
//! - The final epoch is not resumed; the run returns once its ack arrived
//!   (or `final_ack_timeout` passed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::dirty::{merge_sorted, RecentDirty};
use super::job::{EpochJob, Meta, Pipe, Source};
use super::pacing::{self, Pacer};
use super::shared::{PauseGate, Shared};
use super::staging::StagingPool;
use super::{PrimaryConfig, PrimaryError};
use crate::domain::Domain;
use crate::engine::codec_choice;
use crate::engine::copy::CopyPool;
use crate::engine::epoch_control::Observation;
use crate::engine::shadow::PageBuf;
use crate::engine::throttle::{Lag, Throttle};
use crate::ha::lease::Verdict;
use crate::metrics::EpochRecord;
use crate::outq::OutputQueue;
use crate::transport::messages::EpochClass;

/// The final epoch, its saved state, and the recent dirty lists.
pub(super) type DriveResult = Result<(u64, Vec<u8>, Vec<Vec<u64>>), PrimaryError>;

/// What the epoch thread drives: the domain, the pipeline's ends, and the
/// resources the pause uses.
pub(super) struct Driver<'a> {
    pub domain: &'a mut dyn Domain,
    pub cfg: &'a PrimaryConfig,
    pub shared: &'a Shared,
    pub pipe: Pipe<'a>,
    pub staging: StagingPool<'a>,
    pub copy_pool: &'a CopyPool,
    pub outq: &'a OutputQueue,
    /// The next unit's number (its place in the send order).
    pub unit: u64,
    /// How much guest time is taken when the pipeline falls behind.
    pub throttle: Throttle,
    /// The session's disks, cut in each pause.
    pub disks: &'a crate::disk::session::PrimaryDisks,
}

/// Per-epoch buffers, reused so that the pause allocates nothing.
#[derive(Default)]
struct Capture {
    /// Dirty pages harvested before the pause.
    pre: Vec<u64>,
    /// Dirty pages harvested inside the pause.
    late: Vec<u64>,
    /// Their union: the checkpoint's pages.
    gfns: Vec<u64>,
    /// The saved vCPU and device state.
    state: Vec<u8>,
    /// The disk writes of the epoch (cut in the pause).
    disk: crate::disk::session::EpochDisks,
}

/// Seeds the backup, then checkpoints until the run ends.
pub(super) fn drive(mut d: Driver) -> DriveResult {
    // Starts a fresh domain; resumes one that was running before this
    // session (re-protection) and was paused for the output switch.
    d.domain.resume()?;
    d.seed()?;
    let _ = d.shared.ckpt_start.set(Instant::now());
    d.shared.progress.lock().unwrap().0 = d.domain.progress_mark();
    let out = d.checkpoints();
    // The guest runs free again whoever drives it next.
    d.domain.throttle(0);
    out
}

/// Staging headroom over the pre-harvested dirty set, for pages written
/// between the pre-harvest and the pause (at least this many slots).
const STAGING_HEADROOM: usize = 4096;

impl Driver<'_> {
    fn checkpoints(&mut self) -> DriveResult {
        let k = self.cfg.max_inflight.max(1) as u64;
        let start = Instant::now();
        let mut cap = Capture::default();
        let mut recent = RecentDirty::new(self.cfg.keep_dirty_lists);
        let mut pacer = Pacer::start(self.cfg.epoch_policy(), Some(self.outq.held_signal()));
        let mut emitted = self.outq.emitted();
        let mut epoch = 0u64;
        loop {
            epoch += 1;
            let (ext, unacked) = pacer.wait_for_pause(self.shared, epoch, k)?;
            let final_epoch = self.is_final(start, epoch, Instant::now());
            let mut rec = EpochRecord {
                epoch,
                throttle_pct: u64::from(self.throttle.pct()),
                ..Default::default()
            };
            self.pace_guest(ext, unacked, k);

            // Pre-harvest while the guest still runs: most of the epoch's
            // dirty set is collected (and re-armed) outside the pause; the
            // harvest inside the pause only picks up the last moment's writes.
            let t_pre = Instant::now();
            cap.pre.clear();
            self.harvest(&mut cap.pre)?;
            rec.preharvest_us = t_pre.elapsed().as_micros() as u64;
            // Staging for the pre-harvested set plus the last moment's
            // writes, readied now: the pause never waits for or allocates it.
            let want = cap.pre.len() + (cap.pre.len() / 4).max(STAGING_HEADROOM);
            let ready = self.staging.prepare(want, self.shared)?;
            rec.extension_us = pacing::extension_us(ext + ready);

            let (pause_start, staging) = self.pause(epoch, final_epoch, &mut cap, &mut rec)?;
            // What the epoch controller sees: this pause, how long the
            // epoch ran and what it dirtied, the output the guest produced
            // in it, the latest acknowledged checkpoint.
            let now_emitted = self.outq.emitted();
            let acked = self.shared.metrics.lock().unwrap().last_ack();
            let seen = Observation {
                pause: Duration::from_micros(rec.pause_us),
                ran: pacer.ran_until(pause_start),
                dirty_pages: cap.gfns.len() as u64,
                output_frames: now_emitted - emitted,
                latency: acked.map(|a| a.0),
                acked_pages: acked.map_or(0, |a| a.1),
            };
            emitted = now_emitted;
            recent.push(&cap.gfns);
            let dirty = cap.gfns.len() as u64;
            let compressor = self.shared.codec.lock().unwrap().choose();
            rec.compressor = codec_choice::name(compressor);
            let job = Arc::new(EpochJob {
                unit: self.unit,
                epoch,
                source: Source::Staged(std::mem::take(&mut cap.gfns), staging),
                compressor,
            });
            self.pipe.dispatch(Meta {
                unit: self.unit,
                epoch,
                class: EpochClass::Checkpoint,
                first_round: false,
                last_round: false,
                dirty,
                state: cap.state.clone(),
                record: rec,
                pause_start,
                job,
                disk: std::mem::take(&mut cap.disk),
            });
            self.unit += 1;
            if final_epoch {
                self.shared.progress.lock().unwrap().1 = self.domain.progress_mark();
                self.pipe.finish(epoch);
                break;
            }
            pacer.next_epoch(&seen);
        }
        self.wait_final_ack(epoch)?;
        Ok((epoch, cap.state, recent.into_lists()))
    }

    /// Appends the dirty pages since the last harvest to `out` (sorted,
    /// unique): scanned by the pause's pinned workers, one stripe each,
    /// when the domain's dirty log can be split; else by the domain on this
    /// thread. Either way the same list.
    pub(super) fn harvest(&mut self, out: &mut Vec<u64>) -> Result<(), PrimaryError> {
        match self.domain.stripe_scan() {
            Some(scan) if self.copy_pool.threads() > 1 => self.copy_pool.harvest(&scan, out)?,
            _ => self.domain.harvest_dirty(out)?,
        }
        Ok(())
    }

    /// Throttles the guest for the next epoch from how far behind the
    /// pipeline was at this deadline (see [`crate::engine::throttle`]).
    /// Runs before the pause; output stays held whatever it decides.
    fn pace_guest(&mut self, ext: Duration, unacked: u64, k: u64) {
        if !self.cfg.throttle {
            return;
        }
        let before = self.throttle.pct();
        let pct = self.throttle.update(&Lag {
            epoch: self.cfg.epoch,
            extension: ext,
            unacked,
            max_inflight: k,
        });
        // A domain that cannot be throttled runs free, and says so in the
        // records (0 %), rather than reporting a throttle nobody applied.
        if pct != before && !self.domain.throttle(pct) {
            self.throttle.set(0);
        }
    }

    /// Whether `epoch` is the run's last: a stop signal, the run's duration
    /// (counted from `start`, the first checkpoint) or its epoch count.
    fn is_final(&self, start: Instant, epoch: u64, now: Instant) -> bool {
        let cfg = self.cfg;
        crate::engine::stop_requested()
            || cfg
                .duration
                .is_some_and(|d| now.duration_since(start) + cfg.epoch >= d)
            || cfg.max_epochs.is_some_and(|n| epoch >= n)
    }

    /// The guest's pause: harvest, copy to staging, save state, resume
    /// (not after the final epoch). Fills the pause's timings into `rec`;
    /// returns when the pause started and the staging holding the pages
    /// `cap.gfns`. Nothing here waits for the pipeline unless every staging
    /// buffer is in flight (see [`StagingPool::take`]).
    fn pause(
        &mut self,
        epoch: u64,
        final_epoch: bool,
        cap: &mut Capture,
        rec: &mut EpochRecord,
    ) -> Result<(Instant, PageBuf), PrimaryError> {
        let t0 = Instant::now();
        let gate = PauseGate::close(self.shared);
        self.domain.pause()?;
        // Self-fencing: without the lease the guest must not run on.
        if self.shared.lease.may_proceed(Instant::now()) == Verdict::Fence {
            self.shared.lease_lapsed();
            let g = self.shared.inflight.lock().unwrap();
            return Err(g.error().expect("just failed"));
        }
        // Output commit: epoch `epoch` ends here. The guest (every
        // output producer) is parked until `resume`, so output tagged
        // `epoch` is exactly what checkpoint `epoch` covers; from the
        // resume on, output belongs to the next epoch.
        self.outq.open_epoch(epoch + 1);
        crate::ops::telemetry::with(|t| t.epoch_started(epoch + 1));
        // Disk writes completed so far belong to this epoch; later ones to
        // the next (a swap of the log's queue: no I/O in the pause).
        cap.disk = self.disks.cut(epoch);
        // Read after the store: output read from now on is tagged > epoch.
        rec.closed_at_ns = crate::metrics::mono_ns();
        let t_paused = Instant::now();
        cap.late.clear();
        self.harvest(&mut cap.late)?;
        merge_sorted(&cap.pre, &cap.late, &mut cap.gfns);
        let t_harvest = Instant::now();
        let staging = self.staging.take(cap.gfns.len(), self.shared)?;
        self.copy_pool
            .copy(self.domain.memory(), &cap.gfns, &staging);
        let t_copy = Instant::now();
        cap.state.clear();
        self.domain.save_state(&mut cap.state)?;
        let t_state = Instant::now();
        if !final_epoch {
            self.domain.resume()?;
        }
        let t_end = Instant::now();
        drop(gate);
        rec.dirty_pages = cap.gfns.len() as u64;
        rec.harvest_us = (t_harvest - t_paused).as_micros() as u64;
        rec.copy_us = (t_copy - t_harvest).as_micros() as u64;
        rec.state_us = (t_state - t_copy).as_micros() as u64;
        rec.pause_us = (t_end - t0).as_micros() as u64;
        Ok((t0, staging))
    }

    /// Clean stop: waits for the final epoch's acknowledgement.
    fn wait_final_ack(&self, epoch: u64) -> Result<(), PrimaryError> {
        let waited = Instant::now();
        let mut g = self.shared.inflight.lock().unwrap();
        while g.acked != Some(epoch) {
            if let Some(e) = g.error() {
                return Err(e);
            }
            if waited.elapsed() > self.cfg.final_ack_timeout {
                return Err(PrimaryError::AckTimeout {
                    epoch,
                    waited: waited.elapsed(),
                });
            }
            g = self
                .shared
                .cv
                .wait_timeout(g, Duration::from_millis(50))
                .unwrap()
                .0;
        }
        Ok(())
    }
}
