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
//! - A failure of the session ends any wait at once (within 50 ms).

use std::time::{Duration, Instant};

use super::shared::{Inflight, Shared};
use super::PrimaryError;
use crate::engine::epoch_control::{EpochController, EpochPolicy, Observation};

/// Extensions shorter than this are scheduling noise, recorded as none.
const EXTENSION_NOISE: Duration = Duration::from_micros(200);

/// The epoch clock of one session's checkpoints.
pub(super) struct Pacer {
    control: EpochController,
    deadline: Instant,
}

impl Pacer {
    /// Starts the first epoch now.
    pub fn start(policy: EpochPolicy) -> Self {
        let control = EpochController::new(policy);
        Pacer {
            deadline: Instant::now() + control.current(),
            control,
        }
    }

    /// Lets the guest run until the epoch's deadline (woken early by a
    /// failure or a stop), then waits while K checkpoints are unacknowledged
    /// (`epoch` is the one about to be paused). Returns the extension (how
    /// long backpressure held the epoch open past its deadline) and the
    /// checkpoints unacknowledged at the deadline: what the throttle reads.
    pub fn wait_for_pause(
        &self,
        shared: &Shared,
        epoch: u64,
        k: u64,
    ) -> Result<(Duration, u64), PrimaryError> {
        let mut g = shared.inflight.lock().unwrap();
        loop {
            if let Some(e) = g.error() {
                return Err(e);
            }
            let now = Instant::now();
            if now >= self.deadline || crate::engine::stop_requested() {
                break;
            }
            g = shared
                .cv
                .wait_timeout(g, (self.deadline - now).min(Duration::from_millis(50)))
                .unwrap()
                .0;
        }
        // Backpressure: at most K checkpoints unacknowledged at pause time.
        let ext_start = Instant::now();
        // Epochs 0..epoch-1 have been handed to the pipeline; those after
        // the last ack are in flight.
        let unacked = |g: &Inflight| g.acked.map_or(epoch, |a| (epoch - 1).saturating_sub(a));
        let at_deadline = unacked(&g);
        let g = shared.wait_while(g, |g| unacked(g) >= k)?;
        let ext = ext_start.elapsed();
        drop(g);
        Ok((ext, at_deadline))
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
