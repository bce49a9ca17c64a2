//! Guest throttling: when the guest dirties memory faster than the pipeline
//! ships it, take CPU time from the guest (as QEMU's auto-converge and
//! dirty-limit do) so epochs keep their cadence and checkpoint latency stays
//! bounded, instead of extending epochs without end.
//!
//! One decision per epoch, made by the epoch thread *before* the pause from
//! what the last deadline showed ([`Lag`]); the domain applies it while the
//! guest runs. Throttling only slows the guest: output stays held until its
//! epoch is acknowledged whatever the throttle.
//!
//! Rule (proportional, with a slow release):
//! - behind = extension / epoch length, where the extension is how long the
//!   deadline had to wait for an in-flight slot. Behind by `b` epochs raises
//!   the throttle by `b * GAIN` points (at least [`MIN_STEP`], at most
//!   [`MAX_STEP`] per epoch), up to [`MAX_PCT`].
//! - No extension and a free slot at the deadline (the pipeline kept up with
//!   room): lower it by [`RELEASE`] points per epoch.
//! - Otherwise (the pipeline just kept up): hold.
//!
//! Invariant: the value is always within `0..=MAX_PCT`; 0 means the guest
//! runs free. The controller holds no clock and no thread: it is a function
//! of the inputs, so `castor tune` can drive it from recorded epochs.

use std::time::Duration;

/// Largest share of guest time taken (the guest always makes progress).
pub const MAX_PCT: u8 = 95;
/// Points added per epoch of lag.
pub const GAIN: f64 = 40.0;
/// Smallest and largest raise after a late epoch.
pub const MIN_STEP: u8 = 5;
pub const MAX_STEP: u8 = 30;
/// Points released per epoch the pipeline had room.
pub const RELEASE: u8 = 2;
/// Extensions shorter than this share of the epoch are scheduling noise.
pub const NOISE: f64 = 0.04;

/// What the last epoch's deadline showed about the pipeline.
#[derive(Debug, Clone, Copy)]
pub struct Lag {
    /// The configured epoch length.
    pub epoch: Duration,
    /// How long the deadline waited for an in-flight slot (backpressure).
    pub extension: Duration,
    /// Checkpoints unacknowledged when the deadline came (before waiting).
    pub unacked: u64,
    /// Checkpoints allowed in flight (K).
    pub max_inflight: u64,
}

/// The throttle controller: one per primary session.
#[derive(Debug, Default, Clone)]
pub struct Throttle {
    pct: u8,
}

impl Throttle {
    pub fn new() -> Self {
        Throttle::default()
    }

    /// The current throttle in percent of guest time.
    pub fn pct(&self) -> u8 {
        self.pct
    }

    /// Folds one epoch's lag in; returns the throttle for the next epoch.
    pub fn update(&mut self, lag: &Lag) -> u8 {
        let epoch = lag.epoch.as_secs_f64().max(1e-6);
        let behind = lag.extension.as_secs_f64() / epoch;
        if behind > NOISE {
            let step = (behind * GAIN)
                .round()
                .clamp(MIN_STEP as f64, MAX_STEP as f64) as u8;
            self.pct = self.pct.saturating_add(step).min(MAX_PCT);
        } else if lag.unacked < lag.max_inflight.saturating_sub(1).max(1) {
            self.pct = self.pct.saturating_sub(RELEASE);
        }
        self.pct
    }

    /// The seed (pre-copy) did not shrink its dirty set this round: the
    /// guest outruns the copy. Raises the throttle by [`MAX_STEP`].
    pub fn seed_not_converging(&mut self) -> u8 {
        self.pct = self.pct.saturating_add(MAX_STEP).min(MAX_PCT);
        self.pct
    }

    /// Checkpointing starts: the seed's throttle carries over (the guest
    /// dirties as fast as before) and is released by [`Throttle::update`].
    pub fn set(&mut self, pct: u8) {
        self.pct = pct.min(MAX_PCT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lag(ext_ms: u64, unacked: u64) -> Lag {
        Lag {
            epoch: Duration::from_millis(25),
            extension: Duration::from_millis(ext_ms),
            unacked,
            max_inflight: 2,
        }
    }

    #[test]
    fn raises_in_proportion_to_the_extension() {
        let mut t = Throttle::new();
        // Half an epoch late: 20 points.
        assert_eq!(t.update(&lag(12, 2)), 19);
        // A tiny delay: the minimum step.
        let mut u = Throttle::new();
        assert_eq!(u.update(&lag(2, 2)), MIN_STEP);
        // Ten epochs late: capped per step, then at the maximum.
        let mut v = Throttle::new();
        assert_eq!(v.update(&lag(250, 2)), MAX_STEP);
        for _ in 0..10 {
            v.update(&lag(250, 2));
        }
        assert_eq!(v.pct(), MAX_PCT);
    }

    #[test]
    fn releases_only_when_the_pipeline_had_room() {
        let mut t = Throttle::new();
        t.set(50);
        // Kept up, but both slots busy: hold.
        assert_eq!(t.update(&lag(0, 2)), 50);
        // Room to spare: release.
        assert_eq!(t.update(&lag(0, 0)), 50 - RELEASE);
        // Noise-sized extension is not lag.
        assert_eq!(t.update(&lag(1, 1)), 50 - RELEASE);
        let mut z = Throttle::new();
        assert_eq!(z.update(&lag(0, 0)), 0, "never below zero");
    }

    #[test]
    fn seed_that_does_not_converge_raises_it() {
        let mut t = Throttle::new();
        assert_eq!(t.seed_not_converging(), MAX_STEP);
        for _ in 0..5 {
            t.seed_not_converging();
        }
        assert_eq!(t.pct(), MAX_PCT);
    }
}
