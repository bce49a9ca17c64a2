//! Pacing and backpressure: when the next pause may start, and how long the
//! epoch is.
//!
//! Every decision that delays or reshapes an epoch is taken here, *before*
//! the pause, while the guest runs; the pause itself never waits for the
//! pipeline. Today: the fixed epoch length (`--epoch`) and the wait for an
//! in-flight slot (at most K checkpoints unacknowledged at pause time),
//! recorded as the epoch's extension. Wave 2 lands here: throttling the
//! guest when it dirties faster than the pipeline ships (a verdict of
//! [`Pacer::wait_for_pause`]), and the epoch length: [`Pacer::next_epoch`]
//! is the one place it is decided, by an
//! [`EpochController`](crate::engine::epoch_control::EpochController)
//! (fixed `--epoch`, or `--epoch auto`).
//!
//! Invariants:
//! - A pause starts only once the epoch's deadline passed (or a stop was
//!   requested) and fewer than K checkpoints are unacknowledged.
//! - Deadlines advance by the epoch length from the previous deadline, not
//!   from the pause, so epochs keep their cadence; a deadline already in the
//!   past is moved to now (no burst of back-to-back epochs after a stall).
//! - With `--epoch auto`, an epoch whose output the queue holds ends early:
//!   `castor-outq` raises [`HeldSignal`] when it holds the epoch's first
//!   frame (no polling), and the pause starts
//!   [`EpochController::cut_after`] that frame, though never before
//!   [`EpochController::floor`] into the epoch. A cut epoch's pause is the
//!   base of the next deadline, and its length, as [`Pacer::length`] tells
//!   the throttle, is what it ran until the cut, not its nominal length.
//! - With a pause budget (`super::budget`), an epoch whose dirty set
//!   reached it ends at once (its deadline moves to now); while K
//!   checkpoints are in flight the guest is throttled hard instead, and
//!   released to the throttle controller's share once a slot frees.
//! - A failure of the session ends any wait (within 50 ms).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::shared::{Inflight, Shared};
use super::PrimaryError;
use crate::engine::epoch_control::{EpochController, EpochPolicy, Observation};
use crate::outq::HeldSignal;

/// What the epoch thread's wait needs to know of the running epoch's dirty
/// set (see [`super::budget`]); implemented by the epoch thread, which
/// owns the domain.
pub(super) trait DirtyGauge {
    /// How often to ask [`DirtyGauge::full`]; None: this domain cannot
    /// count its writes, and the budget is never asked.
    fn poll(&self) -> Option<Duration>;
    /// Whether the epoch's dirty set reached the pause budget. May harvest
    /// (outside the pause) to count it exactly.
    fn full(&mut self) -> Result<bool, PrimaryError>;
    /// Throttles the guest as hard as it may be (true), or back to the
    /// throttle controller's share (false).
    fn hold(&mut self, on: bool);
    /// While held: stops the guest altogether once its dirty set grew past
    /// the budget's slack anyway (a long wait for a slot).
    fn tighten(&mut self) -> Result<(), PrimaryError>;
}

/// What [`Pacer::wait_for_pause`] saw.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Waited {
    /// How long backpressure held the epoch open past its end.
    pub extension: Duration,
    /// Checkpoints unacknowledged when the epoch ended (before waiting).
    pub unacked: u64,
    /// The epoch ended because its dirty set reached the budget.
    pub full: bool,
    /// The guest was throttled hard while the epoch waited for a slot.
    pub held: bool,
}

/// Extensions shorter than this are scheduling noise, recorded as none.
const EXTENSION_NOISE: Duration = Duration::from_micros(200);

/// Longest single wait: how soon a failure or a stop is noticed.
const WAKE: Duration = Duration::from_millis(50);

/// The epoch clock of one session's checkpoints.
pub(super) struct Pacer {
    control: EpochController,
    /// The running epoch's nominal end.
    deadline: Instant,
    /// When the running epoch began (the previous pause, roughly).
    started: Instant,
    /// The output queue's held-output event (None: never cut).
    held: Option<Arc<HeldSignal>>,
    /// How long the running epoch ran before a cut ended it (None: not cut).
    cut: Option<Duration>,
}

impl Pacer {
    /// Starts the first epoch now. `held` lets an adaptive epoch end early
    /// when the guest's output is held.
    pub fn start(policy: EpochPolicy, held: Option<Arc<HeldSignal>>) -> Self {
        let control = EpochController::new(policy);
        let now = Instant::now();
        Pacer {
            deadline: now + control.current(),
            started: now,
            held,
            cut: None,
            control,
        }
    }

    /// Lets the guest run until the epoch's deadline (woken early by a
    /// failure or a stop; with `--epoch auto`, ended early once its output
    /// is held: see the module doc; ended early once the epoch's dirty set
    /// reached the pause budget, as `gauge` says), then waits while K
    /// checkpoints are unacknowledged (`epoch` is the one about to be
    /// paused), throttling the guest hard through `gauge` while the dirty
    /// set is at the budget. Returns what the wait saw: the extension (how
    /// long backpressure held the epoch open past its deadline) and the
    /// checkpoints unacknowledged at the deadline are what the throttle
    /// reads.
    pub fn wait_for_pause(
        &mut self,
        shared: &Shared,
        epoch: u64,
        k: u64,
        gauge: &mut dyn DirtyGauge,
    ) -> Result<Waited, PrimaryError> {
        let full = match self.held.clone() {
            Some(sig) if self.control.cut_after(0).is_some() => {
                self.run_or_cut(shared, &sig, epoch, gauge)?
            }
            _ => self.run_to_deadline(shared, gauge)?,
        };
        if full {
            // The next epoch counts from this one's early end.
            self.deadline = self.deadline.min(Instant::now());
        }
        let mut g = shared.inflight.lock().unwrap();
        // Backpressure: at most K checkpoints unacknowledged at pause time.
        let ext_start = Instant::now();
        // Epochs 0..epoch-1 have been handed to the pipeline; those after
        // the last ack are in flight.
        let unacked = |g: &Inflight| g.acked.map_or(epoch, |a| (epoch - 1).saturating_sub(a));
        let at_deadline = unacked(&g);
        let mut held = full && at_deadline >= k;
        if held {
            drop(g);
            gauge.hold(true);
            g = shared.inflight.lock().unwrap();
        }
        while unacked(&g) >= k {
            if let Some(e) = g.error() {
                drop(g);
                return Err(self.unhold(gauge, held, e));
            }
            let slice = gauge.poll().unwrap_or(WAKE).min(WAKE);
            g = shared.cv.wait_timeout(g, slice).unwrap().0;
            if unacked(&g) >= k && gauge.poll().is_some() {
                drop(g);
                let asked = if held {
                    gauge.tighten()
                } else {
                    gauge.full().map(|f| {
                        held = f;
                        if held {
                            gauge.hold(true);
                        }
                    })
                };
                if let Err(e) = asked {
                    return Err(self.unhold(gauge, held, e));
                }
                g = shared.inflight.lock().unwrap();
            }
        }
        let ext = ext_start.elapsed();
        drop(g);
        if held {
            gauge.hold(false);
        }
        Ok(Waited {
            extension: ext,
            unacked: at_deadline,
            full,
            held,
        })
    }

    /// Lifts a hard throttle before an error is returned.
    fn unhold(&self, gauge: &mut dyn DirtyGauge, held: bool, e: PrimaryError) -> PrimaryError {
        if held {
            gauge.hold(false);
        }
        e
    }

    /// The fixed clock: sleeps on the in-flight table's condvar (a failure
    /// wakes it at once) until the deadline or a stop, asking `gauge`
    /// every poll interval. Returns whether the dirty set reached the
    /// budget first.
    fn run_to_deadline(
        &self,
        shared: &Shared,
        gauge: &mut dyn DirtyGauge,
    ) -> Result<bool, PrimaryError> {
        loop {
            let g = shared.inflight.lock().unwrap();
            if let Some(e) = g.error() {
                return Err(e);
            }
            let now = Instant::now();
            if now >= self.deadline || crate::engine::stop_requested() {
                return Ok(false);
            }
            let slice = gauge.poll().unwrap_or(WAKE).min(WAKE);
            drop(
                shared
                    .cv
                    .wait_timeout(g, (self.deadline - now).min(slice))
                    .unwrap(),
            );
            if gauge.poll().is_some() && gauge.full()? {
                return Ok(true);
            }
        }
    }

    /// The adaptive clock: until output of `epoch` is held, sleeps on the
    /// held-output event; then until the cut (`cut_after` the first frame,
    /// not before the floor) or the nominal deadline, whichever is first;
    /// asks `gauge` every poll interval (true: the dirty set reached the
    /// budget first). A cut moves the deadline to now (the next epoch
    /// counts from it).
    fn run_or_cut(
        &mut self,
        shared: &Shared,
        sig: &HeldSignal,
        epoch: u64,
        gauge: &mut dyn DirtyGauge,
    ) -> Result<bool, PrimaryError> {
        let earliest = self.started + self.control.floor();
        loop {
            let g = shared.inflight.lock().unwrap();
            if let Some(e) = g.error() {
                return Err(e);
            }
            let held = sig.of(epoch);
            let end = held.map_or(self.deadline, |h| {
                let cut = h.first_at + self.control.cut_after(h.bytes).unwrap_or_default();
                self.deadline.min(cut.max(earliest))
            });
            let now = Instant::now();
            if now >= end || crate::engine::stop_requested() {
                if now < self.deadline {
                    self.cut = Some(now.saturating_duration_since(self.started));
                }
                self.deadline = self.deadline.min(now);
                return Ok(false);
            }
            let slice = (end - now).min(gauge.poll().unwrap_or(WAKE).min(WAKE));
            if held.is_none() {
                drop(g);
                sig.wait(epoch, slice);
            } else {
                drop(shared.cv.wait_timeout(g, slice).unwrap());
            }
            if gauge.poll().is_some() && gauge.full()? {
                return Ok(true);
            }
        }
    }

    /// The running epoch's length as the throttle weighs its extension:
    /// what it ran until a cut ended it, else its nominal length (fixed, or
    /// what `auto` chose). The throttle scales its cut by the epoch's
    /// length (shorter epochs decide more often, each more gently), so a
    /// 1 ms cut epoch weighed at its 19 ms nominal length was throttled as
    /// hard per decision as a 19 ms one, 19 times as often (stop 15).
    pub fn length(&self) -> Duration {
        self.cut.unwrap_or(self.control.current())
    }

    /// How long the running epoch ran before its pause began at `pause`.
    pub fn ran_until(&self, pause: Instant) -> Duration {
        pause.saturating_duration_since(self.started)
    }

    /// The epoch length decision, from what the checkpoint just taken
    /// measured: the next deadline is one length after this one, or now if
    /// that has passed.
    pub fn next_epoch(&mut self, seen: &Observation) {
        self.deadline += self.control.next(seen);
        let now = Instant::now();
        if self.deadline < now {
            self.deadline = now;
        }
        self.started = now;
        self.cut = None;
    }
}

/// An extension as recorded in the epoch's metrics (µs; noise is zero).
pub(super) fn extension_us(ext: Duration) -> u64 {
    if ext > EXTENSION_NOISE {
        ext.as_micros() as u64
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::primary::PrimaryConfig;
    use crate::outq::{Egress, Mode, OutputQueue};

    const MS: Duration = Duration::from_millis(1);

    /// A domain whose dirty set is never counted.
    struct NoGauge;

    impl DirtyGauge for NoGauge {
        fn poll(&self) -> Option<Duration> {
            None
        }
        fn full(&mut self) -> Result<bool, PrimaryError> {
            Ok(false)
        }
        fn hold(&mut self, _on: bool) {}
        fn tighten(&mut self) -> Result<(), PrimaryError> {
            Ok(())
        }
    }

    /// A destination that drops released frames.
    struct Sink;

    impl Egress for Sink {
        fn release(&mut self, _frame: &[u8]) {}
    }

    fn auto(s: &str) -> EpochPolicy {
        EpochPolicy::parse(s).unwrap()
    }

    #[test]
    fn a_cut_epoch_reports_the_length_it_ran_to_the_throttle() {
        let q = OutputQueue::start(Mode::Commit).unwrap();
        let h = q.handle(Box::new(Sink));
        let shared = Shared::new(&PrimaryConfig::default());
        let policy = auto("auto:target=2s,min=1ms,max=2s,delay=1ms");
        let mut p = Pacer::start(policy, Some(q.held_signal()));
        assert_eq!(p.length(), 2 * 1000 * MS, "nominal before a cut");
        // The guest talks: the epoch (nominal 2 s) ends about 1 ms later.
        h.emit_now(&[0u8; 64]);
        let started = Instant::now();
        p.wait_for_pause(&shared, 1, 2, &mut NoGauge).unwrap();
        assert!(started.elapsed() < 1000 * MS, "cut, not run to 2 s");
        let ran = p.length();
        assert!(ran >= MS && ran <= started.elapsed() + 5 * MS, "{ran:?}");
        // The next epoch is not cut until it is: its nominal length again.
        p.next_epoch(&Observation::default());
        assert_eq!(p.length(), p.control.current());
        q.shutdown().unwrap();
    }

    #[test]
    fn an_uncut_epoch_reports_its_nominal_length() {
        let shared = Shared::new(&PrimaryConfig::default());
        let mut fixed = Pacer::start(EpochPolicy::Fixed(2 * MS), None);
        fixed.wait_for_pause(&shared, 1, 2, &mut NoGauge).unwrap();
        assert_eq!(fixed.length(), 2 * MS);
        // Auto without output: runs to its deadline, nominal length.
        let q = OutputQueue::start(Mode::Commit).unwrap();
        let policy = auto("auto:target=3ms,min=1ms,max=3ms");
        let mut silent = Pacer::start(policy, Some(q.held_signal()));
        silent.wait_for_pause(&shared, 1, 2, &mut NoGauge).unwrap();
        assert_eq!(silent.length(), 3 * MS);
        q.shutdown().unwrap();
    }
}
