//! The adaptive epoch (`--epoch auto[:target=..,min=..,max=..,overhead=..]`):
//! a pure controller that chooses the next epoch's length from what the
//! last epochs measured. No clocks, no threads: the primary's epoch loop
//! feeds it one [`Observation`] per checkpoint and sleeps for what
//! [`EpochController::next`] returns.
//!
//! Where the rules come from:
//! - Adaptive Remus (shorter epochs while the guest is network-bound,
//!   longer while it is CPU-bound): with no guest output in the last epoch
//!   and none held, nobody waits on a checkpoint, so the epoch grows to
//!   `max` and the guest pays for fewer pauses.
//! - Stratus, US9652338 (the checkpoint delay follows the buffered output:
//!   delay = buffered output / target rate, plus a minimum): while output
//!   is waiting, a frame's release delay is at most the epoch plus the
//!   checkpoint latency, so the epoch is `target - latency` (never below
//!   `min`), which puts the held output's p99 at the target.
//! - An overhead guard the two rules lack: the epoch never drops below
//!   `pause / overhead` (default 5%: a 1 ms pause allows 20 ms epochs), so
//!   a write-heavy phase that also talks does not lose more than that share
//!   of the guest's time to pauses. Guest speed wins over latency there.
//!
//! Invariants: every length returned is within `[min, max]`; growth is at
//! most ×1.5 per epoch (one noisy sample does not jump to `max`), shrinking
//! is immediate (output that appears is served within one epoch).

use std::fmt;
use std::time::Duration;

/// The tunables of `--epoch auto`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoParams {
    /// Output release delay (p99) to aim at while the guest produces output.
    pub target: Duration,
    /// Shortest epoch.
    pub min: Duration,
    /// Longest epoch (used while the guest produces no output).
    pub max: Duration,
    /// Largest share of the guest's time the pauses may take, in (0, 1).
    pub overhead: f64,
}

impl Default for AutoParams {
    fn default() -> Self {
        AutoParams {
            target: Duration::from_millis(20),
            min: Duration::from_millis(5),
            max: Duration::from_millis(100),
            overhead: 0.05,
        }
    }
}

/// How each epoch's length is chosen: `--epoch 25ms` or `--epoch auto...`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EpochPolicy {
    Fixed(Duration),
    Auto(AutoParams),
}

impl Default for EpochPolicy {
    fn default() -> Self {
        EpochPolicy::Fixed(Duration::from_millis(25))
    }
}

/// A `--epoch` value that could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EpochPolicyError {
    #[error("--epoch {0:?}: expected a duration like 25ms, or auto[:target=20ms,min=5ms,max=100ms,overhead=0.05]")]
    Syntax(String),
    #[error("--epoch {value:?}: {key}={raw} is not {what}")]
    BadValue {
        value: String,
        key: &'static str,
        raw: String,
        what: &'static str,
    },
    #[error("--epoch {0:?}: unknown key (keys: target, min, max, overhead)")]
    UnknownKey(String),
    #[error("--epoch {0:?}: needs 0 < min <= target and min <= max")]
    Inconsistent(String),
}

impl EpochPolicy {
    /// Parses `25ms` or `auto[:key=value,...]`.
    pub fn parse(s: &str) -> Result<Self, EpochPolicyError> {
        let s = s.trim();
        let Some(rest) = s.strip_prefix("auto") else {
            return match humantime::parse_duration(s) {
                Ok(d) if !d.is_zero() => Ok(EpochPolicy::Fixed(d)),
                _ => Err(EpochPolicyError::Syntax(s.into())),
            };
        };
        let mut p = AutoParams::default();
        let kv = match rest {
            "" => "",
            r => r
                .strip_prefix(':')
                .ok_or_else(|| EpochPolicyError::Syntax(s.into()))?,
        };
        for item in kv.split(',').filter(|i| !i.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| EpochPolicyError::Syntax(s.into()))?;
            let bad = |key, what| EpochPolicyError::BadValue {
                value: s.into(),
                key,
                raw: v.into(),
                what,
            };
            let dur = |key| humantime::parse_duration(v).map_err(|_| bad(key, "a duration"));
            match k {
                "target" => p.target = dur("target")?,
                "min" => p.min = dur("min")?,
                "max" => p.max = dur("max")?,
                "overhead" => {
                    p.overhead = v
                        .parse::<f64>()
                        .ok()
                        .filter(|o| *o > 0.0 && *o < 1.0)
                        .ok_or_else(|| bad("overhead", "a fraction in (0, 1)"))?
                }
                _ => return Err(EpochPolicyError::UnknownKey(s.into())),
            }
        }
        if p.min.is_zero() || p.min > p.target || p.min > p.max {
            return Err(EpochPolicyError::Inconsistent(s.into()));
        }
        Ok(EpochPolicy::Auto(p))
    }

    /// The first epoch's length.
    pub fn initial(&self) -> Duration {
        match self {
            EpochPolicy::Fixed(d) => *d,
            EpochPolicy::Auto(p) => p.target.min(p.max).max(p.min),
        }
    }
}

impl fmt::Display for EpochPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
        match self {
            EpochPolicy::Fixed(d) => write!(f, "{}ms", ms(d)),
            EpochPolicy::Auto(p) => write!(
                f,
                "auto:target={}ms,min={}ms,max={}ms,overhead={}",
                ms(&p.target),
                ms(&p.min),
                ms(&p.max),
                p.overhead
            ),
        }
    }
}

/// What one checkpoint measured, as the epoch loop sees it at the pause.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Observation {
    /// How long the guest was paused.
    pub pause: Duration,
    /// Output frames the guest produced during the epoch just ended.
    pub output_frames: u64,
    /// The latest checkpoint latency (pause start to ack), if any acked.
    pub latency: Option<Duration>,
}

/// Chooses each epoch's length; see the module doc for the rules.
#[derive(Debug, Clone)]
pub struct EpochController {
    policy: EpochPolicy,
    current: Duration,
    /// Smoothed pause and checkpoint latency (EWMA, 1/4 weight per sample).
    pause: Option<f64>,
    latency: Option<f64>,
}

impl EpochController {
    pub fn new(policy: EpochPolicy) -> Self {
        EpochController {
            policy,
            current: policy.initial(),
            pause: None,
            latency: None,
        }
    }

    /// The length the controller chose last (the first: `initial`).
    pub fn current(&self) -> Duration {
        self.current
    }

    /// Folds in one checkpoint's measurements; returns the next epoch's length.
    pub fn next(&mut self, o: &Observation) -> Duration {
        let p = match self.policy {
            EpochPolicy::Fixed(d) => return d,
            EpochPolicy::Auto(p) => p,
        };
        let ewma = |old: Option<f64>, v: f64| Some(old.map_or(v, |o| o * 0.75 + v * 0.25));
        self.pause = ewma(self.pause, o.pause.as_secs_f64());
        if let Some(l) = o.latency {
            self.latency = ewma(self.latency, l.as_secs_f64());
        }
        let (min, max) = (p.min.as_secs_f64(), p.max.as_secs_f64());
        let want = if o.output_frames > 0 {
            // Stratus: release the held output within the target.
            (p.target.as_secs_f64() - self.latency.unwrap_or(0.0)).max(min)
        } else {
            // Adaptive Remus: CPU-bound, nobody waits: few pauses.
            max
        };
        // Overhead guard: pauses take at most `overhead` of the guest's time.
        let floor = self.pause.unwrap_or(0.0) / p.overhead;
        let want = want.max(floor).clamp(min, max);
        let cur = self.current.as_secs_f64();
        let next = if want > cur {
            want.min(cur * 1.5)
        } else {
            want
        };
        self.current = Duration::from_secs_f64(next.clamp(min, max));
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn auto() -> EpochController {
        EpochController::new(EpochPolicy::parse("auto:target=20ms,min=5ms,max=100ms").unwrap())
    }

    fn obs(pause_us: u64, out: u64, latency_ms: u64) -> Observation {
        Observation {
            pause: Duration::from_micros(pause_us),
            output_frames: out,
            latency: Some(Duration::from_millis(latency_ms)),
        }
    }

    #[test]
    fn parses_fixed_and_auto() {
        assert_eq!(EpochPolicy::parse("25ms"), Ok(EpochPolicy::Fixed(25 * MS)));
        assert_eq!(
            EpochPolicy::parse("auto"),
            Ok(EpochPolicy::Auto(AutoParams::default()))
        );
        let EpochPolicy::Auto(p) = EpochPolicy::parse("auto:target=30ms,max=200ms").unwrap() else {
            panic!("not auto")
        };
        assert_eq!((p.target, p.max, p.min), (30 * MS, 200 * MS, 5 * MS));
        let back = EpochPolicy::parse(&EpochPolicy::Auto(p).to_string()).unwrap();
        assert_eq!(back, EpochPolicy::Auto(p));
    }

    #[test]
    fn refuses_bad_values_naming_them() {
        for (s, needle) in [
            ("0ms", "expected a duration"),
            ("fast", "expected a duration"),
            ("auto:target=x", "target=x"),
            ("auto:overhead=1.5", "overhead=1.5"),
            ("auto:speed=1", "unknown key"),
            ("auto:min=30ms,target=20ms", "min <= target"),
            ("autox", "expected a duration"),
        ] {
            let e = EpochPolicy::parse(s).unwrap_err().to_string();
            assert!(e.contains(needle) && e.contains(s), "{s}: {e}");
        }
    }

    #[test]
    fn fixed_never_changes() {
        let mut c = EpochController::new(EpochPolicy::Fixed(25 * MS));
        assert_eq!(c.next(&obs(50_000, 100, 500)), 25 * MS);
        assert_eq!(c.next(&Observation::default()), 25 * MS);
    }

    #[test]
    fn silent_guest_grows_gradually_to_max() {
        let mut c = auto();
        assert_eq!(c.current(), 20 * MS);
        let lens: Vec<Duration> = (0..10).map(|_| c.next(&obs(200, 0, 3))).collect();
        assert_eq!(lens[0], 30 * MS, "growth is capped at x1.5 per epoch");
        assert!(lens.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*lens.last().unwrap(), 100 * MS);
    }

    #[test]
    fn output_shrinks_at_once_to_target_minus_latency() {
        let mut c = auto();
        for _ in 0..10 {
            c.next(&obs(200, 0, 4));
        }
        assert_eq!(c.current(), 100 * MS);
        // Output appears: the very next epoch is target - latency = 16 ms.
        let n = c.next(&obs(200, 5, 4));
        assert!((n.as_secs_f64() - 0.016).abs() < 1e-4, "{n:?}");
    }

    #[test]
    fn latency_above_target_gives_min() {
        let mut c = auto();
        for _ in 0..20 {
            c.next(&obs(100, 1, 40));
        }
        assert_eq!(c.current(), 5 * MS);
    }

    #[test]
    fn long_pauses_hold_the_epoch_above_the_overhead_floor() {
        let mut c = auto();
        // 2 ms pauses at 5% overhead: at least 40 ms, even while talking.
        for _ in 0..30 {
            c.next(&obs(2_000, 10, 4));
        }
        let e = c.current().as_secs_f64();
        assert!((0.039..=0.041).contains(&e), "{e}");
    }

    #[test]
    fn always_within_bounds() {
        let mut c = auto();
        for i in 0..200u64 {
            let n = c.next(&obs((i * 7919) % 20_000, i % 3, (i * 31) % 90));
            assert!((5 * MS..=100 * MS).contains(&n), "{n:?}");
        }
    }
}
