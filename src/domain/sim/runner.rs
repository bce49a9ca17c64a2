//! Workload threads and the pause barrier.
//!
//! Threads `castor-sim-N` run [`workload::step`] in a loop. They meet the
//! controller (the domain's owner) at one [`Gate`]:
//!
//! - **Timed mode.** `pause()` raises the PAUSE flag (under the gate lock)
//!   and waits until every thread is parked. A thread checks the flag before
//!   every write; seeing it, it parks: counts itself in `parked`, wakes the
//!   controller, and waits for the generation to change. Pacing sleeps are
//!   condvar waits on the same gate, so a pause wakes them at once.
//! - **Deterministic mode.** Threads ignore PAUSE: each runs its quota for
//!   the gate's current epoch (recorded in its control-block slot), then
//!   parks. `pause()` waits until all have parked, i.e. the epoch's quota is
//!   done everywhere.
//! - `resume()` clears PAUSE, resets `parked` to 0, bumps the generation
//!   (and, deterministic, the epoch) and wakes everyone. Because the
//!   controller resets `parked` itself, a later `pause()` cannot count a
//!   thread that has not parked again since.
//!
//! Invariant: when `pause()` returns, every thread is inside the gate's
//! wait (parked, or sleeping out a pacing wait: `sleeping`; it re-checks
//! the flags under the lock before writing again) and cannot write guest
//! memory until the next `resume()`. Writes
//! made before parking happen-before `pause()` returning (mutex hand-off).
//! A thread that panics is counted as `failed`, so `pause()` reports an
//! error instead of waiting forever.
//!
//! Throttling (timed mode): the engine may take a share `p` (percent) of
//! the workload's time, as a hypervisor throttles vCPUs when the guest
//! dirties memory faster than replication ships it. A paced thread then
//! writes at `rate * (100 - p) / 100`; an unpaced one works 1 ms slices
//! and sleeps `p / (100 - p)` of each (QEMU's `cpu-throttle` rule). Sleeps
//! are waits on the gate, so a pause still parks a throttled thread at once.
//! Every thread adds its writes to `progress`, the guest's own measure of
//! how fast it got on (read at any time; flushed at least every 64 writes
//! and on parking).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::domain::{DomainError, GuestMemory};
use crate::outq::OutputHandle;

use super::workload::{self, Plan, Scratch, ThreadPlan};

const PAUSE: u8 = 1;
const STOP: u8 = 2;

#[derive(Debug, Default)]
struct GateState {
    paused: bool,
    stop: bool,
    /// Deterministic mode: the epoch threads may work on.
    epoch: u64,
    /// Bumped by every resume; parked threads wait for it to change.
    generation: u64,
    parked: usize,
    /// Timed threads sleeping out a pacing or throttle wait: they cannot
    /// write before they take the lock again and see the flags, so a
    /// pause need not wait for them to wake and park.
    sleeping: usize,
    failed: Vec<String>,
}

#[derive(Debug, Default)]
struct Gate {
    /// PAUSE | STOP, mirrored from `state` for a lock-free check per write.
    flags: AtomicU8,
    /// Percent of the workload's time taken away (0..=MAX_THROTTLE).
    throttle: AtomicU8,
    /// Page writes done by all threads (flushed in batches).
    progress: AtomicU64,
    state: Mutex<GateState>,
    /// Workers wait here (parked or pacing).
    workers: Condvar,
    /// The controller waits here for `parked` to reach the thread count.
    controller: Condvar,
    /// Kernel ids of the timed threads, boosted when a pause asks them to
    /// stop (see `domain::priority::boost`).
    tids: Mutex<Vec<libc::pid_t>>,
    /// Pauses that boosted `tids`; a thread that sees a new count after a
    /// wait puts itself back at the process's priority.
    boosts: AtomicU64,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        // A poisoned lock only means a worker panicked while holding it; the
        // state is plain counters that stay meaningful.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Parks the calling worker until the next resume. Returns false when
    /// the worker must exit.
    fn park(&self, mut st: MutexGuard<'_, GateState>) -> bool {
        st.parked += 1;
        self.controller.notify_all();
        let generation = st.generation;
        while st.generation == generation && !st.stop {
            st = self.workers.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        !st.stop
    }
}

/// Marks a worker that unwinds as failed, waking the controller.
struct FailGuard<'a> {
    gate: &'a Gate,
    name: String,
}

impl Drop for FailGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut st = self.gate.lock();
            st.failed.push(format!("{} panicked", self.name));
            self.gate.controller.notify_all();
        }
    }
}

/// The running workload threads of one domain.
#[derive(Debug)]
pub struct Workers {
    gate: Arc<Gate>,
    handles: Vec<JoinHandle<()>>,
    deterministic: bool,
}

impl Workers {
    /// Spawns one thread per `plan` thread, running epoch `first_epoch`
    /// (1 for a new domain; E+1 for one restored from checkpoint E, whose
    /// threads find their progress in their control-block slots).
    pub fn start(
        mem: Arc<GuestMemory>,
        plan: Arc<Plan>,
        deterministic: bool,
        first_epoch: u64,
        disk: Option<DiskWork>,
        output: Option<OutputHandle>,
    ) -> Result<Self, DomainError> {
        let t0 = Instant::now();
        let gate = Arc::new(Gate::default());
        gate.lock().epoch = first_epoch;
        let mut workers = Workers {
            gate,
            handles: Vec::new(),
            deterministic,
        };
        for tp in plan.threads.iter().copied() {
            let (mem, plan, gate) = (mem.clone(), plan.clone(), workers.gate.clone());
            let out = Output {
                handle: output.clone(),
                every: plan.out,
                phase: plan.phase,
                t0,
            };
            let name = format!("castor-sim-{}", tp.index);
            let handle = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    crate::domain::priority::at_process_priority();
                    let _guard = FailGuard { gate: &gate, name };
                    if deterministic {
                        run_deterministic(&gate, &mem, &plan, &tp)
                    } else {
                        run_timed(&gate, &mem, &plan, &tp, out)
                    }
                })
                .map_err(|source| DomainError::Sys {
                    op: "spawn workload thread",
                    source,
                })?;
            // On error above, dropping `workers` stops the threads already started.
            workers.handles.push(handle);
        }
        if let Some(d) = disk {
            let gate = workers.gate.clone();
            let handle = std::thread::Builder::new()
                .name("castor-sim-disk".into())
                .spawn(move || {
                    crate::domain::priority::at_process_priority();
                    let name = "castor-sim-disk".to_string();
                    let _guard = FailGuard { gate: &gate, name };
                    run_disk(&gate, &d, first_epoch)
                })
                .map_err(|source| DomainError::Sys {
                    op: "spawn disk workload thread",
                    source,
                })?;
            workers.handles.push(handle);
        }
        Ok(workers)
    }

    /// Returns once no worker can write until [`Workers::resume`]; in
    /// deterministic mode, once every worker finished the epoch's quota.
    pub fn pause(&self) -> Result<(), DomainError> {
        let mut st = self.gate.lock();
        st.paused = true;
        if !self.deterministic {
            self.gate.flags.fetch_or(PAUSE, Ordering::SeqCst);
            self.gate.workers.notify_all();
            let tids = self.gate.tids.lock().unwrap_or_else(|p| p.into_inner());
            // Boost, then count: a thread that sees the new count after a
            // wait was boosted before it looked, and puts itself back.
            tids.iter().for_each(|&t| crate::domain::priority::boost(t));
            self.gate.boosts.fetch_add(1, Ordering::Release);
        }
        while st.parked + st.sleeping < self.handles.len() && st.failed.is_empty() {
            st = self
                .gate
                .controller
                .wait(st)
                .unwrap_or_else(|p| p.into_inner());
        }
        if !st.failed.is_empty() {
            return Err(DomainError::Workload(st.failed.join("; ")));
        }
        Ok(())
    }

    /// Releases the parked workers (deterministic: into the next epoch).
    pub fn resume(&self) -> Result<(), DomainError> {
        let mut st = self.gate.lock();
        if !st.failed.is_empty() {
            return Err(DomainError::Workload(st.failed.join("; ")));
        }
        st.paused = false;
        st.parked = 0;
        st.generation += 1;
        if self.deterministic {
            st.epoch += 1;
        }
        self.gate.flags.fetch_and(!PAUSE, Ordering::SeqCst);
        self.gate.workers.notify_all();
        Ok(())
    }
}

impl Workers {
    /// Takes `pct` percent of the workload's time from now on (clamped to
    /// [`MAX_THROTTLE`]); 0 lets it run free. Timed mode only: a
    /// deterministic workload's epochs are fixed quotas.
    pub fn set_throttle(&self, pct: u8) {
        let pct = if pct >= STAND_STILL {
            STAND_STILL
        } else {
            pct.min(MAX_THROTTLE)
        };
        self.gate.throttle.store(pct, Ordering::Relaxed);
    }

    /// The timed threads' scheduling policies and nice values now (tests).
    #[cfg(test)]
    pub fn scheduling(&self) -> Vec<(libc::c_int, libc::c_int)> {
        let tids = self.gate.tids.lock().unwrap_or_else(|p| p.into_inner());
        tids.iter()
            .map(|&t| crate::domain::priority::scheduling(t))
            .collect()
    }

    /// Page writes the workload threads made so far.
    pub fn progress(&self) -> u64 {
        self.gate.progress.load(Ordering::Relaxed)
    }
}

/// Largest share of the workload's time throttling takes: the guest never
/// stops entirely (it must still make progress, as its clients see it)...
pub const MAX_THROTTLE: u8 = 95;
/// ...except at this throttle, a hold: the threads write nothing (they
/// sleep in [`HOLD_NAP`] naps, counted as stopped for a pause) until it is
/// lowered. The engine's pause budget uses it while the pipeline has no
/// room and the dirty set is past its slack.
pub const STAND_STILL: u8 = 100;
/// How long a held thread sleeps before looking at the throttle again.
const HOLD_NAP: Duration = Duration::from_millis(1);

impl Drop for Workers {
    fn drop(&mut self) {
        {
            let mut st = self.gate.lock();
            st.stop = true;
            self.gate.flags.fetch_or(STOP, Ordering::SeqCst);
            self.gate.workers.notify_all();
        }
        for h in self.handles.drain(..) {
            // A panicked worker was already reported through `failed`.
            let _ = h.join();
        }
    }
}

fn run_deterministic(gate: &Gate, mem: &GuestMemory, plan: &Plan, tp: &ThreadPlan) {
    let mut scratch = Scratch::default();
    loop {
        if gate.flags.load(Ordering::Relaxed) & STOP != 0 {
            return;
        }
        // The slot, not a local, says which epoch this thread is in.
        let (epoch, finished) = workload::epoch_finished(mem, tp);
        if !finished {
            workload::step(mem, plan, tp, &mut scratch);
            continue;
        }
        let st = gate.lock();
        if st.stop {
            return;
        }
        if st.epoch > epoch {
            drop(st);
            workload::begin_epoch(mem, tp.index, epoch + 1);
        } else if !gate.park(st) {
            return;
        }
    }
}

/// What the disk workload thread writes with.
pub struct DiskWork {
    pub log: Arc<crate::disk::WriteLog>,
    pub seed: u64,
    pub writes: u64,
}

/// Writes each epoch's disk blocks, then parks until the next resume. A
/// failed write (a fenced disk) fails the domain at its next pause.
fn run_disk(gate: &Gate, d: &DiskWork, first_epoch: u64) {
    let mut epoch = first_epoch;
    loop {
        if gate.flags.load(Ordering::Relaxed) & STOP != 0 {
            return;
        }
        if let Err(e) = super::disk::run_epoch(&d.log, d.seed, d.writes, epoch) {
            let mut st = gate.lock();
            st.failed
                .push(format!("castor-sim-disk: epoch {epoch}: {e}"));
            gate.controller.notify_all();
            return;
        }
        let st = gate.lock();
        if st.stop || !gate.park(st) {
            return;
        }
        epoch += 1;
    }
}

/// The phases of a phased workload (`phase=`), in the order they cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// 1/20 of the rate, a frame per `out` writes: an idle server.
    Quiet,
    /// The full rate, no output: a batch computation.
    WriteHeavy,
    /// 1/10 of the rate, a frame per write: a chatty server.
    OutputHeavy,
}

impl Phase {
    /// The phase running `elapsed` after the start, phases `len` long.
    pub fn at(elapsed: Duration, len: Duration) -> Phase {
        let n = elapsed.as_nanos() / len.as_nanos().max(1);
        [Phase::Quiet, Phase::WriteHeavy, Phase::OutputHeavy][(n % 3) as usize]
    }

    /// (page writes per second, page writes per output frame; 0: none).
    /// An unpaced workload (rate 0) stays unpaced.
    fn pace(self, rate: u64, out: u64) -> (u64, u64) {
        let part = |d: u64| if rate == 0 { 0 } else { (rate / d).max(1) };
        match self {
            Phase::Quiet => (part(20), out.max(1)),
            Phase::WriteHeavy => (rate, 0),
            Phase::OutputHeavy => (part(10), 1),
        }
    }
}

/// A timed thread's synthetic output source and phase clock.
struct Output {
    handle: Option<OutputHandle>,
    /// Page writes per frame outside phases (0: none).
    every: u64,
    phase: Option<Duration>,
    /// When the workload started (phases count from here).
    t0: Instant,
}

/// A thread boosted by a pause (to reach it promptly) goes back to the
/// process's priority after its next wait, whether it parked or slept
/// through the pause: it never runs the guest's work boosted.
fn unboost(gate: &Gate, seen: &mut u64) {
    let now = gate.boosts.load(Ordering::Acquire);
    if now != *seen {
        *seen = now;
        crate::domain::priority::at_process_priority();
    }
}

fn run_timed(gate: &Gate, mem: &GuestMemory, plan: &Plan, tp: &ThreadPlan, out: Output) {
    gate.tids
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(crate::domain::priority::current_tid());
    let mut boosts = 0;
    let mut scratch = Scratch::default();
    let mut bucket = Bucket::new(tp.rate);
    let mut duty = Duty::new();
    let mut unflushed = 0u64;
    let mut every = out.every;
    let mut phase = None;
    // The rate the bucket paces to before throttling: the phase's, if any.
    let mut base_rate = tp.rate;
    let (mut writes, mut frames) = (0u64, 0u64);
    loop {
        if let Some(len) = out.phase {
            let now = Phase::at(out.t0.elapsed(), len);
            if phase != Some(now) {
                let (rate, per_frame) = now.pace(tp.rate, out.every);
                base_rate = rate;
                bucket = Bucket::throttled(rate, bucket.throttle);
                every = per_frame;
                phase = Some(now);
            }
        }
        if gate.flags.load(Ordering::Acquire) != 0 {
            gate.progress.fetch_add(unflushed, Ordering::Relaxed);
            unflushed = 0;
            let st = gate.lock();
            if st.stop {
                return;
            }
            if st.paused {
                let parked = Instant::now();
                if !gate.park(st) {
                    return;
                }
                unboost(gate, &mut boosts);
                bucket.resume_after(parked.elapsed());
                duty.restart();
            }
            continue;
        }
        let throttle = gate.throttle.load(Ordering::Relaxed);
        if base_rate > 0 && throttle < STAND_STILL && throttle != bucket.throttle {
            bucket = Bucket::throttled(base_rate, throttle);
        }
        let wait = match base_rate {
            _ if throttle >= STAND_STILL => Some(HOLD_NAP),
            0 => duty.take(throttle),
            _ => bucket.take(),
        };
        if let Some(wait) = wait {
            gate.progress.fetch_add(unflushed, Ordering::Relaxed);
            unflushed = 0;
            let mut st = gate.lock();
            if !st.paused && !st.stop {
                // Spurious wakeups only shorten the sleep; the bucket re-checks.
                // Asleep, the thread counts as stopped for a pause: it
                // writes again only after re-checking the flags (the
                // `continue`), which a pause raised under this lock.
                // (No pause is waiting now: `paused` is false under the lock.)
                st.sleeping += 1;
                let (mut st, _) = gate
                    .workers
                    .wait_timeout(st, wait)
                    .unwrap_or_else(|p| p.into_inner());
                st.sleeping -= 1;
            }
            unboost(gate, &mut boosts);
            continue;
        }
        workload::step(mem, plan, tp, &mut scratch);
        unflushed += 1;
        if unflushed == 64 {
            gate.progress.fetch_add(unflushed, Ordering::Relaxed);
            unflushed = 0;
        }
        writes += 1;
        if let Some(h) = out
            .handle
            .as_ref()
            .filter(|_| every > 0 && writes % every == 0)
        {
            frames += 1;
            let mut frame = [0u8; 64];
            frame[..8].copy_from_slice(&(tp.index as u64).to_le_bytes());
            frame[8..16].copy_from_slice(&frames.to_le_bytes());
            // Parked during a pause, so the running epoch tags it exactly.
            h.emit_now(&frame);
        }
    }
}

/// Work slice of an unpaced, throttled thread.
const SLICE: Duration = Duration::from_millis(1);

/// Duty cycle of an unpaced thread: after each [`SLICE`] of work, a sleep of
/// `pct / (100 - pct)` slices. Reads the clock every 16 writes.
#[derive(Debug)]
struct Duty {
    start: Instant,
    n: u32,
}

impl Duty {
    fn new() -> Duty {
        Duty {
            start: Instant::now(),
            n: 0,
        }
    }

    fn restart(&mut self) {
        *self = Duty::new();
    }

    /// Nothing while unthrottled or inside the work slice; else the sleep.
    fn take(&mut self, pct: u8) -> Option<Duration> {
        if pct == 0 {
            return None;
        }
        self.n = self.n.wrapping_add(1);
        if self.n % 16 != 0 {
            return None;
        }
        let worked = self.start.elapsed();
        if worked < SLICE {
            return None;
        }
        let pct = u32::from(pct.min(MAX_THROTTLE));
        let sleep = worked * pct / (100 - pct);
        self.start = Instant::now() + sleep;
        Some(sleep)
    }
}

/// Batches of tokens a late thread may catch up (one batch is 1 ms).
const MAX_BURST: u64 = 10;

/// Token bucket on the monotonic clock: `rate` writes per second, tokens
/// granted and slept for in batches of 1 ms, at most `MAX_BURST` batches
/// banked. Reads the clock only when the tokens counted at the last reading
/// are spent.
#[derive(Debug)]
struct Bucket {
    rate: u64,
    /// The throttle (percent) `rate` was reduced by.
    throttle: u8,
    batch: u64,
    t0: Instant,
    done: u64,
    allowed: u64,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        let batch = (rate / 1000).max(1);
        Bucket {
            rate,
            throttle: 0,
            batch,
            t0: Instant::now(),
            done: 0,
            allowed: batch,
        }
    }

    /// A bucket for `rate` reduced by `pct` percent (never to 0, which
    /// would mean unpaced).
    fn throttled(rate: u64, pct: u8) -> Bucket {
        let pct = pct.min(MAX_THROTTLE);
        let mut b = Bucket::new((rate * u64::from(100 - pct) / 100).max(1));
        b.throttle = pct;
        b
    }

    /// Resumes the schedule after `paused`: the time spent paused neither
    /// becomes a burst nor earns a fresh batch (a new bucket would grant
    /// one at once, which at a pause every 2 ms ran the protected guest
    /// faster than the unprotected one).
    fn resume_after(&mut self, paused: Duration) {
        self.t0 += paused;
    }

    /// Takes a token, or says how long to wait for the next batch of them.
    fn take(&mut self) -> Option<Duration> {
        if self.rate == 0 {
            return None;
        }
        if self.done < self.allowed {
            self.done += 1;
            return None;
        }
        let mut elapsed = self.t0.elapsed().as_nanos();
        self.allowed = self.batch + (elapsed * self.rate as u128 / 1_000_000_000) as u64;
        // A thread descheduled for a while may catch up at most MAX_BURST
        // batches; older tokens expire (the schedule moves forward).
        let cap = self.done + MAX_BURST * self.batch;
        if self.allowed > cap {
            let excess = self.allowed - cap;
            let shift = excess as u128 * 1_000_000_000 / self.rate as u128;
            self.t0 += Duration::from_nanos(shift as u64);
            elapsed -= shift.min(elapsed);
            self.allowed = cap;
        }
        if self.done < self.allowed {
            self.done += 1;
            return None;
        }
        // Sleep until a whole batch is allowed: batch + t * rate >= done + batch.
        let due = self.done as u128 * 1_000_000_000 / self.rate as u128;
        Some(Duration::from_nanos(
            (due.saturating_sub(elapsed)).max(50_000) as u64,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_paces_to_its_rate() {
        let mut b = Bucket::new(20_000);
        let t0 = Instant::now();
        let mut n = 0;
        while t0.elapsed() < Duration::from_millis(200) {
            match b.take() {
                None => n += 1,
                Some(d) => std::thread::sleep(d),
            }
        }
        // The bound that matters is the upper one (never above the rate
        // plus one burst); a starved thread on a loaded machine only makes
        // fewer writes (stalls are not banked), so the lower bound checks
        // liveness loosely.
        assert!(
            (1_000..=5_000).contains(&n),
            "{n} writes in 200 ms at 20000/s"
        );
    }

    #[test]
    fn bucket_does_not_bank_a_long_stall() {
        let mut b = Bucket::new(10_000);
        std::thread::sleep(Duration::from_millis(100));
        let free = (0..10_000).take_while(|_| b.take().is_none()).count();
        assert!(free <= 120, "{free} writes granted at once after a stall");
    }

    #[test]
    fn pauses_earn_no_writes() {
        // 20,000/s with a 1 ms pause after every 1 ms of running: 100
        // cycles run 100 ms, so about 2,000 writes. A bucket that granted
        // a fresh batch (20) at each resume made about 4,000.
        let mut b = Bucket::new(20_000);
        let (mut n, mut ran) = (0u64, Duration::ZERO);
        for _ in 0..100 {
            let run = Instant::now();
            while run.elapsed() < Duration::from_millis(1) {
                match b.take() {
                    None => n += 1,
                    Some(d) => std::thread::sleep(d.min(Duration::from_micros(200))),
                }
            }
            // On a loaded host a cycle's running part overruns its 1 ms:
            // the bound is the rate over the running time it really had.
            ran += run.elapsed();
            let paused = Instant::now();
            std::thread::sleep(Duration::from_millis(1));
            b.resume_after(paused.elapsed());
        }
        // Upper bound: the rate over the running time plus one batch and
        // 10% slack; a fresh batch per resume would add 2,000 more. A
        // starved thread only makes fewer.
        let max = (20_000.0 * ran.as_secs_f64() * 1.1) as u64 + 20;
        assert!(
            (300..=max).contains(&n),
            "{n} writes in {ran:?} of running at 20000/s (at most {max})"
        );
    }

    #[test]
    fn throttled_bucket_paces_to_the_reduced_rate() {
        let mut b = Bucket::throttled(20_000, 75);
        let t0 = Instant::now();
        let mut n = 0;
        while t0.elapsed() < Duration::from_millis(200) {
            match b.take() {
                None => n += 1,
                Some(d) => std::thread::sleep(d),
            }
        }
        assert!((600..=1_400).contains(&n), "{n} writes in 200 ms at 5000/s");
        assert_eq!(Bucket::throttled(10, 99).rate, 1, "never unpaced");
    }

    #[test]
    fn duty_cycle_sleeps_the_throttled_share() {
        let mut d = Duty::new();
        assert!((0..1000).all(|_| d.take(0).is_none()), "unthrottled");
        std::thread::sleep(Duration::from_millis(2));
        let sleep = (0..16)
            .find_map(|_| d.take(75))
            .expect("a sleep after the slice");
        // 75 %: three slices of sleep per slice of work (>= 2 ms worked).
        assert!(sleep >= Duration::from_millis(6), "{sleep:?}");
    }

    #[test]
    fn phases_cycle_quiet_write_heavy_output_heavy() {
        let len = Duration::from_millis(100);
        let at = |ms| Phase::at(Duration::from_millis(ms), len);
        assert_eq!(
            [at(0), at(150), at(250), at(300), at(499)],
            [
                Phase::Quiet,
                Phase::WriteHeavy,
                Phase::OutputHeavy,
                Phase::Quiet,
                Phase::WriteHeavy
            ]
        );
        assert_eq!(Phase::WriteHeavy.pace(50_000, 10), (50_000, 0));
        assert_eq!(Phase::Quiet.pace(50_000, 10), (2_500, 10));
        assert_eq!(Phase::OutputHeavy.pace(50_000, 10), (5_000, 1));
    }

    #[test]
    fn unpaced_bucket_never_waits() {
        let mut b = Bucket::new(0);
        assert!((0..1_000_000).all(|_| b.take().is_none()));
    }
}
