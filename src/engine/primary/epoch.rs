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
//!   pages, placing them in staging, their copy, the state save and the
//!   resume. Every wait (deadline, backpressure), the pre-harvest and the
//!   pre-copy happen before it ([`super::pacing`], [`Driver::precopy`]);
//!   dispatch and bookkeeping after it.
//! - Pre-copy: the pre-harvested pages are copied into staging while the
//!   guest runs. The pre-harvest re-armed dirty tracking on them before
//!   that copy began, so a page written during or after it is in the
//!   pause's harvest and copied again there, over its pre-copied slot:
//!   staging holds every page as it was when the guest stood still.
//! - Output tagged N is exactly what checkpoint N covers: the next epoch
//!   is opened in the output queue while every output producer is parked.
//! - Without the lease (the session's
//!   [`LeaseGate`](crate::ha::lease::LeaseGate) says fence) the guest is never
//!   resumed: the session fails as self-fenced.
//! - The final epoch is not resumed; the run returns once its ack arrived
//!   (or `final_ack_timeout` passed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::budget::{self, DirtyEstimate, PauseBudget};
use super::dirty::{merge_sorted, RecentDirty};
use super::job::{EpochJob, Meta, Pipe, Source};
use super::pacing::{self, DirtyGauge, Pacer};
use super::shared::{PauseGate, Shared};
use super::staging::StagingPool;
use super::{PrimaryConfig, PrimaryError};
use crate::domain::Domain;
use crate::engine::codec_choice;
use crate::engine::copy::CopyPool;
use crate::engine::epoch_control::Observation;
use crate::engine::shadow::PageBuf;
use crate::engine::throttle::{Lag, Throttle, MAX_PCT};
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
    /// Dirty pages harvested before the pause (while the epoch ran, when
    /// the budget asked, and just before the pause), sorted and unique.
    pre: Vec<u64>,
    /// Dirty pages harvested inside the pause.
    late: Vec<u64>,
    /// The staging slot of each late page: its pre-copied slot when it is
    /// in `pre`, else the next free one.
    slots: Vec<usize>,
    /// Their union, the checkpoint's pages: page `gfns[i]` is in staging
    /// slot `i` (`pre`, then the late pages not in it; each part sorted).
    /// Sorted while a pause is given up.
    gfns: Vec<u64>,
    /// The saved vCPU and device state.
    state: Vec<u8>,
    /// The disk writes of the epoch (cut in the pause).
    disk: crate::disk::session::EpochDisks,
    /// How long the last pause lasted (None before the first): decides
    /// whether the next one runs in the real-time class.
    last_pause: Option<Duration>,
    /// The domain's write count when the budget last counted the dirty
    /// set, and when (the guest's write rate spans epochs).
    counted: Option<(Instant, u64)>,
    /// When the budget counts the dirty set next ([`budget::poll_after`];
    /// None: [`budget::POLL_MIN`]).
    next_poll: Option<Duration>,
}

/// The pause runs in the real-time class ([`PauseRealtime`]) only while
/// pauses are short: when the previous one lasted under this. A sim or kvm
/// pause takes about a millisecond; a Xen guest's own suspend (hundreds of
/// milliseconds under the lab's emulation) is no place to hold cores from
/// the host's services (xenstored, netback), and a pause that long gains
/// nothing measurable from skipping a 4 ms scheduler tick.
///
/// [`PauseRealtime`]: crate::domain::priority::PauseRealtime
const REALTIME_PAUSE_LIMIT: Duration = Duration::from_millis(10);

fn realtime_pause(last: Option<Duration>) -> bool {
    last.is_some_and(|d| d < REALTIME_PAUSE_LIMIT)
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

/// Staging buffers grow in steps of this many slots (16 MiB).
const STAGING_STEP: usize = 4096;

impl Driver<'_> {
    fn checkpoints(&mut self) -> DriveResult {
        let k = self.cfg.max_inflight.max(1) as u64;
        let start = Instant::now();
        let mut cap = Capture::default();
        let mut recent = RecentDirty::new(self.cfg.keep_dirty_lists);
        let mut pacer = Pacer::start(self.cfg.epoch_policy(), Some(self.outq.held_signal()));
        let mut emitted = self.outq.emitted();
        let mut epoch = 0u64;
        let mut budget = self.cfg.pause_target.map(PauseBudget::new);
        // The guest's page writes at the last harvest (None: not counted).
        let mut base = self.domain.page_writes();
        loop {
            epoch += 1;
            let limit = budget.as_ref().map_or(0, PauseBudget::pages);
            let waited = {
                let shared = self.shared;
                let mut gauge = Gauge {
                    d: self,
                    cap: &mut cap,
                    base: &mut base,
                    limit,
                    stopped: false,
                };
                pacer.wait_for_pause(shared, epoch, k, &mut gauge)?
            };
            let final_epoch = self.is_final(start, epoch, Instant::now());
            let mut rec = EpochRecord {
                epoch,
                throttle_pct: u64::from(self.throttle.pct()),
                budget_pages: if base.is_some() { limit } else { 0 },
                budget_end: waited.full,
                budget_hold: waited.held,
                ..Default::default()
            };
            self.pace_guest(waited.extension, waited.unacked, k, pacer.length());
            let (pause_start, staging) =
                self.ready_and_pause(epoch, final_epoch, &mut cap, &mut rec, &mut base)?;
            // The disk writes the pause marked as this epoch's (waits for a
            // write being applied: after the pause, at normal priority).
            cap.disk = self.disks.collect(epoch);
            if let Some(b) = budget.as_mut() {
                b.observe(
                    rec.dirty_pages,
                    Duration::from_micros(rec.copy_us - rec.staging_us),
                    Duration::from_micros(rec.pause_us),
                );
            }
            rec.extension_us += pacing::extension_us(waited.extension);
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
            rec.output_frames = seen.output_frames;
            emitted = now_emitted;
            recent.push(&cap.gfns);
            cap.pre.clear();
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

    /// Readies the pause and takes it: pre-harvests while the guest still
    /// runs (most of the epoch's dirty set is collected and re-armed
    /// outside the pause; the harvest inside it only picks up the last
    /// moment's writes), readies a staging buffer for the pre-harvested
    /// set plus headroom (waiting or allocating while the guest runs,
    /// counted as extension), then pauses. A pause whose dirty set turns
    /// out larger than the staging readied is given up before the epoch
    /// ends in it (a short pause: stop, harvest, resume) and taken again
    /// once a larger buffer is ready, so the pause never waits for or
    /// allocates staging.
    fn ready_and_pause(
        &mut self,
        epoch: u64,
        final_epoch: bool,
        cap: &mut Capture,
        rec: &mut EpochRecord,
        base: &mut Option<u64>,
    ) -> Result<(Instant, PageBuf), PrimaryError> {
        let limit = rec.budget_pages as usize;
        let pages = self.domain.memory().pages() as usize;
        let mut held = false;
        let taken = loop {
            let t_pre = Instant::now();
            self.harvest_into_pre(cap, base)?;
            rec.preharvest_us += t_pre.elapsed().as_micros() as u64;
            // Rounded up to 16 MiB steps, so that a set that creeps up
            // does not reallocate a buffer every epoch.
            let set = cap.pre.len();
            let want = (set + (set / 4).max(STAGING_HEADROOM))
                .next_multiple_of(STAGING_STEP)
                .min(pages.max(1));
            // Readying staging that is not there yet (an allocation, or a
            // wait for a buffer in flight), a set already at the budget,
            // or a pause given up: the set must not grow meanwhile, so the
            // guest is held.
            let short = !self.staging.ready(want);
            if !held && (short || rec.retried_pauses > 0 || (limit > 0 && set >= limit)) {
                held = self.hold(true);
            }
            let ready = self.staging.prepare(want, self.shared);
            let taken = match ready {
                Ok(ready) => {
                    rec.extension_us += pacing::extension_us(ready);
                    let staging = self.staging.take(want).expect("prepare readied it");
                    self.precopy(cap, rec, &staging);
                    self.pause(epoch, final_epoch, cap, rec, base, staging)
                }
                Err(e) => Err(e),
            };
            match taken {
                Ok(Some(t)) => break Ok(t),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            // Given up: the pages harvested in it stay this epoch's.
            std::mem::swap(&mut cap.pre, &mut cap.gfns);
            rec.retried_pauses += 1;
        };
        if held {
            self.hold(false);
            rec.budget_hold = true;
        }
        taken
    }

    /// Copies the pre-harvested pages (`cap.pre`) into staging slots
    /// `0..pre.len()` while the guest runs: the pause then copies only the
    /// pages written since the pre-harvest (see the module's invariants).
    fn precopy(&mut self, cap: &Capture, rec: &mut EpochRecord, staging: &PageBuf) {
        let t = Instant::now();
        self.copy_pool.copy(self.domain.memory(), &cap.pre, staging);
        rec.precopy_us += t.elapsed().as_micros() as u64;
        rec.precopy_pages += cap.pre.len() as u64;
    }

    /// Throttles the guest as hard as it may be (`on`), or back to the
    /// throttle controller's share. Returns whether anything was applied
    /// (not with `--no-throttle`).
    fn hold(&mut self, on: bool) -> bool {
        if !self.cfg.throttle {
            return false;
        }
        let pct = if on { MAX_PCT } else { self.throttle.pct() };
        self.domain.throttle(pct)
    }

    /// Harvests (outside the pause) and adds the pages to `cap.pre`;
    /// `base` becomes the guest's write count read just before (writes
    /// after it may or may not be in this harvest: counted as not).
    fn harvest_into_pre(
        &mut self,
        cap: &mut Capture,
        base: &mut Option<u64>,
    ) -> Result<(), PrimaryError> {
        *base = self.domain.page_writes();
        cap.late.clear();
        self.harvest(&mut cap.late)?;
        merge_sorted(&cap.pre, &cap.late, &mut cap.gfns);
        std::mem::swap(&mut cap.pre, &mut cap.gfns);
        Ok(())
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
    /// `epoch` is the running epoch's length (with `--epoch auto`, what
    /// the controller chose for it, not the first length).
    fn pace_guest(&mut self, ext: Duration, unacked: u64, k: u64, epoch: Duration) {
        if !self.cfg.throttle {
            return;
        }
        let before = self.throttle.pct();
        let pct = self.throttle.update(&Lag {
            epoch,
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

    /// The guest's pause: harvest, copy the late pages to `staging` (which
    /// holds `cap.pre` pre-copied), save state, resume (not after the final
    /// epoch). Fills the pause's timings into `rec`; returns when the pause
    /// started and the staging holding the pages `cap.gfns`. Nothing here
    /// waits for castor's own resources: when `staging` cannot hold the
    /// dirty set, the guest is resumed at once, before the epoch ends,
    /// `staging` goes back to the pool and None is returned (`cap.gfns`
    /// then holds every page harvested so far, sorted). `base` becomes the
    /// guest's write count while it stood still (exact).
    fn pause(
        &mut self,
        epoch: u64,
        final_epoch: bool,
        cap: &mut Capture,
        rec: &mut EpochRecord,
        base: &mut Option<u64>,
        staging: PageBuf,
    ) -> Result<Option<(Instant, PageBuf)>, PrimaryError> {
        // Dropped last, after the resume: nothing preempts the pause.
        let _rt = realtime_pause(cap.last_pause)
            .then(|| crate::domain::priority::PauseRealtime::enter(self.copy_pool.tids()));
        let t0 = Instant::now();
        let preempted = involuntary_switches();
        let gate = PauseGate::close(self.shared);
        self.domain.pause()?;
        let t_stopped = Instant::now();
        // Self-fencing: without the lease the guest must not run on.
        if self.shared.lease.may_proceed(Instant::now()) == Verdict::Fence {
            self.shared.lease_lapsed();
            let g = self.shared.inflight.lock().unwrap();
            return Err(g.error().expect("just failed"));
        }
        cap.late.clear();
        self.harvest(&mut cap.late)?;
        *base = self.domain.page_writes();
        let t_harvest = Instant::now();
        place_late(cap);
        if cap.gfns.len() > staging.slots() {
            self.domain.resume()?;
            self.staging.give_back(staging);
            merge_sorted(&cap.pre, &cap.late, &mut cap.gfns);
            return Ok(None);
        }
        let t_staged = Instant::now();
        // Output commit: epoch `epoch` ends here. The guest (every
        // output producer) is parked until `resume`, so output tagged
        // `epoch` is exactly what checkpoint `epoch` covers; from the
        // resume on, output belongs to the next epoch.
        self.outq.open_epoch(epoch + 1);
        crate::ops::telemetry::with(|t| t.epoch_started(epoch + 1));
        // Disk writes completed so far belong to this epoch; later ones to
        // the next (an atomic store: the pause never takes the log's lock,
        // which a writer holds across its pwrite; collected after resume).
        self.disks.mark(epoch);
        // Read after the store: output read from now on is tagged > epoch.
        rec.closed_at_ns = crate::metrics::mono_ns();
        self.copy_pool
            .copy_to_slots(self.domain.memory(), &cap.late, &cap.slots, &staging);
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
        rec.late_pages = cap.late.len() as u64;
        rec.stop_us = (t_stopped - t0).as_micros() as u64;
        rec.harvest_us = (t_harvest - t_stopped).as_micros() as u64;
        rec.staging_us = (t_staged - t_harvest).as_micros() as u64;
        rec.copy_us = (t_copy - t_harvest).as_micros() as u64;
        rec.state_us = (t_state - t_copy).as_micros() as u64;
        rec.resume_us = (t_end - t_state).as_micros() as u64;
        rec.pause_us = (t_end - t0).as_micros() as u64;
        cap.last_pause = Some(t_end - t0);
        rec.pause_preempted = involuntary_switches().saturating_sub(preempted);
        Ok(Some((t0, staging)))
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

/// Lays out the checkpoint's pages in staging: `cap.gfns` = `cap.pre`
/// (pre-copied into slots `0..pre.len()`) then the late pages not in it;
/// `cap.slots[i]` is late page `i`'s slot (its pre-copied one when it was
/// pre-harvested too: copied again over it).
fn place_late(cap: &mut Capture) {
    cap.gfns.clear();
    cap.gfns.extend_from_slice(&cap.pre);
    cap.slots.clear();
    for &g in &cap.late {
        match cap.pre.binary_search(&g) {
            Ok(i) => cap.slots.push(i),
            Err(_) => {
                cap.slots.push(cap.gfns.len());
                cap.gfns.push(g);
            }
        }
    }
}

/// The calling thread's involuntary context switches so far (0 if the
/// kernel will not say).
fn involuntary_switches() -> u64 {
    // SAFETY: getrusage writes only the struct it is given.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_THREAD, &mut ru) == 0 {
            ru.ru_nivcsw as u64
        } else {
            0
        }
    }
}

/// The throttle that stops the guest altogether (see `Domain::throttle`).
const STAND_STILL: u8 = 100;

/// The running epoch's dirty set as the pacer sees it: the pages harvested
/// from it so far and the domain's write count since the last harvest,
/// against the pause budget `limit` (see [`super::budget`]).
struct Gauge<'g, 'a> {
    d: &'g mut Driver<'a>,
    cap: &'g mut Capture,
    base: &'g mut Option<u64>,
    /// The budget, pages (0: none).
    limit: u64,
    /// The guest was stopped by [`DirtyGauge::tighten`].
    stopped: bool,
}

impl DirtyGauge for Gauge<'_, '_> {
    fn poll(&self) -> Option<Duration> {
        (self.limit > 0 && self.base.is_some())
            .then(|| self.cap.next_poll.unwrap_or(budget::POLL_MIN))
    }

    fn full(&mut self) -> Result<bool, PrimaryError> {
        let (Some(base), Some(now)) = (*self.base, self.d.domain.page_writes()) else {
            return Ok(false);
        };
        let e = DirtyEstimate {
            harvested: self.cap.pre.len() as u64,
            writes_since: now.saturating_sub(base),
        };
        let t = Instant::now();
        let rate = match self.cap.counted {
            Some((t0, w0)) if t > t0 => now.saturating_sub(w0) as f64 / (t - t0).as_secs_f64(),
            _ => f64::INFINITY,
        };
        self.cap.counted = Some((t, now));
        self.cap.next_poll = Some(budget::poll_after(e, self.limit, rate));
        match budget::verdict(e, self.limit) {
            budget::Verdict::Run => Ok(false),
            budget::Verdict::Full => Ok(true),
            budget::Verdict::Harvest => {
                self.d.harvest_into_pre(self.cap, self.base)?;
                Ok(self.cap.pre.len() as u64 >= self.limit)
            }
        }
    }

    fn hold(&mut self, on: bool) {
        self.d.hold(on);
        self.stopped = false;
    }

    fn tighten(&mut self) -> Result<(), PrimaryError> {
        let (Some(base), Some(now)) = (*self.base, self.d.domain.page_writes()) else {
            return Ok(());
        };
        let upper = self.cap.pre.len() as u64 + now.saturating_sub(base);
        if !self.stopped && upper >= self.limit + self.limit / budget::HOLD_SLACK {
            self.stopped = self.d.cfg.throttle && self.d.domain.throttle(STAND_STILL);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a pause that follows a short one runs in the real-time class;
    /// the first (length unknown) and any after a long one do not.
    #[test]
    fn only_short_pauses_run_real_time() {
        let ms = Duration::from_millis;
        assert!(!realtime_pause(None));
        assert!(realtime_pause(Some(ms(1))));
        assert!(realtime_pause(Some(ms(9))));
        assert!(!realtime_pause(Some(ms(10))));
        assert!(!realtime_pause(Some(ms(230))));
    }

    /// The pre-copied pages keep their slots; a late page already
    /// pre-copied is copied again into its own slot, a new one gets the
    /// next free slot; every page of the union has exactly one slot.
    #[test]
    fn late_pages_go_to_their_pre_copied_slot_or_the_next_free_one() {
        let mut cap = Capture {
            pre: vec![2, 5, 9, 40],
            late: vec![1, 5, 40, 41],
            ..Default::default()
        };
        place_late(&mut cap);
        assert_eq!(cap.gfns, [2, 5, 9, 40, 1, 41]);
        assert_eq!(cap.slots, [4, 1, 3, 5]);
        for (g, &s) in cap.late.iter().zip(&cap.slots) {
            assert_eq!(cap.gfns[s], *g, "late page {g} in slot {s}");
        }
        let mut union = cap.gfns.clone();
        union.sort_unstable();
        union.dedup();
        assert_eq!(union.len(), cap.gfns.len(), "a page in two slots");

        // Nothing pre-harvested: the late pages in order; nothing late: pre.
        let mut cap = Capture {
            late: vec![3, 7],
            ..Default::default()
        };
        place_late(&mut cap);
        assert_eq!(
            (cap.gfns.as_slice(), cap.slots.as_slice()),
            (&[3, 7][..], &[0, 1][..])
        );
        cap.pre = vec![3, 7];
        cap.late.clear();
        place_late(&mut cap);
        assert_eq!((cap.gfns.as_slice(), cap.slots.len()), (&[3, 7][..], 0));
    }
}
