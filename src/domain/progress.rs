//! The guest's own progress, and `guest_speed_ratio`: how fast the guest
//! runs protected against unprotected, from two windows of
//! [`ProgressMark`]s measured in the same run.
//!
//! Why the CPU time: on a shared host the vCPU thread's share of a core
//! changes from one window to the next for reasons that are not castor's
//! (other processes, the scheduler's placement). Measured on this 2-core
//! machine, memtouch made 28-30 loops per second of vCPU CPU time in both
//! windows while the vCPU got 0.4-0.9 of a core protected and 0.3-0.6
//! unprotected, so the wall-clock ratio read 1.1-2.6. Where the guest's
//! CPU time is known the ratio is therefore the guest's progress per
//! second of its own CPU (what tracking its writes and handling its exits
//! cost it) times the share of the protected window it was not frozen in a
//! pause; the wall-clock ratio is kept beside it.

use std::time::{Duration, Instant};

/// The guest's progress counter at one moment (see
/// `Domain::progress_mark`). Invariant: `count` is exactly the progress
/// made by `at`, and `cpu` (when known) the CPU time the guest's own
/// threads had used by `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgressMark {
    pub count: u64,
    pub at: Instant,
    pub cpu: Option<Duration>,
}

/// Progress between two marks. Invariant: `count > 0` and `wall > 0`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub count: u64,
    pub wall: Duration,
    /// The guest's CPU time in the window, when both marks know it.
    pub cpu: Option<Duration>,
}

impl Window {
    /// The window from `a` to `b`; None when no progress was made or no
    /// time passed (too short to tell).
    pub fn between(a: &ProgressMark, b: &ProgressMark) -> Option<Window> {
        let count = b.count.checked_sub(a.count).filter(|&c| c > 0)?;
        let wall = b.at.checked_duration_since(a.at).filter(|w| !w.is_zero())?;
        let cpu = match (a.cpu, b.cpu) {
            (Some(x), Some(y)) => y.checked_sub(x).filter(|c| !c.is_zero()),
            _ => None,
        };
        Some(Window { count, wall, cpu })
    }

    /// Progress per second of wall-clock time.
    pub fn rate(&self) -> f64 {
        self.count as f64 / self.wall.as_secs_f64()
    }

    /// Progress per second of the guest's own CPU time.
    pub fn rate_per_cpu(&self) -> Option<f64> {
        self.cpu.map(|c| self.count as f64 / c.as_secs_f64())
    }

    /// The guest's CPU seconds per wall second (1.0: a core all the time).
    pub fn cpu_share(&self) -> Option<f64> {
        self.cpu.map(|c| c.as_secs_f64() / self.wall.as_secs_f64())
    }
}

/// The two ratios of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpeedRatio {
    /// Per second of the guest's own CPU, times the share of the
    /// protected window not spent paused; the wall-clock ratio where the
    /// guest's CPU time is unknown.
    pub ratio: f64,
    /// Protected / unprotected progress per wall-clock second.
    pub wall: f64,
}

/// `guest_speed_ratio` from the protected window, the unprotected one and
/// the time the guest spent paused by checkpoints inside the protected
/// window.
pub fn speed_ratio(protected: &Window, unprotected: &Window, paused: Duration) -> SpeedRatio {
    let wall = protected.rate() / unprotected.rate();
    let ratio = match (protected.rate_per_cpu(), unprotected.rate_per_cpu()) {
        (Some(p), Some(u)) => {
            let frozen = (paused.as_secs_f64() / protected.wall.as_secs_f64()).min(1.0);
            p / u * (1.0 - frozen)
        }
        _ => wall,
    };
    SpeedRatio { ratio, wall }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(t0: Instant, count: u64, wall_ms: u64, cpu_ms: Option<u64>) -> ProgressMark {
        ProgressMark {
            count,
            at: t0 + Duration::from_millis(wall_ms),
            cpu: cpu_ms.map(Duration::from_millis),
        }
    }

    /// What stop 10 saw: the same guest, as efficient in both windows, but
    /// given a core 0.8 of the time protected and 0.4 unprotected. The
    /// wall-clock ratio (the old figure) reads 2; the guest's own speed
    /// is unchanged, less its paused time.
    #[test]
    fn a_bigger_cpu_share_while_protected_is_not_speed() {
        let t = Instant::now();
        // 30 loops per CPU second in both windows.
        let p = Window::between(&mark(t, 0, 0, Some(0)), &mark(t, 120, 5000, Some(4000))).unwrap();
        let u = Window::between(&mark(t, 0, 0, Some(0)), &mark(t, 36, 3000, Some(1200))).unwrap();
        assert_eq!(p.cpu_share(), Some(0.8));
        let r = speed_ratio(&p, &u, Duration::from_millis(100));
        assert!((r.wall - 2.0).abs() < 1e-9, "{r:?}");
        assert!((r.ratio - 0.98).abs() < 1e-9, "{r:?}");
    }

    /// A guest that needs 10% more CPU per loop while protected (its
    /// writes tracked) is 0.9 as fast, whatever CPU it was given.
    #[test]
    fn extra_cpu_per_loop_is_the_overhead() {
        let t = Instant::now();
        let p = Window::between(&mark(t, 0, 0, Some(0)), &mark(t, 90, 4000, Some(3300))).unwrap();
        let u = Window::between(&mark(t, 0, 0, Some(0)), &mark(t, 100, 4000, Some(3300))).unwrap();
        let r = speed_ratio(&p, &u, Duration::ZERO);
        assert!((r.ratio - 0.9).abs() < 1e-9, "{r:?}");
    }

    /// Without the guest's CPU time (sim) the ratio is the wall-clock one.
    #[test]
    fn without_cpu_time_the_wall_ratio_stands() {
        let t = Instant::now();
        let p = Window::between(&mark(t, 0, 0, None), &mark(t, 900, 1000, None)).unwrap();
        let u = Window::between(&mark(t, 0, 0, Some(0)), &mark(t, 1000, 1000, Some(900))).unwrap();
        let r = speed_ratio(&p, &u, Duration::from_millis(50));
        assert_eq!(r.ratio, r.wall);
        assert!((r.ratio - 0.9).abs() < 1e-9);
    }

    /// No progress, no time or a counter that went back: no window.
    #[test]
    fn empty_windows_are_refused() {
        let t = Instant::now();
        assert_eq!(
            Window::between(&mark(t, 5, 0, None), &mark(t, 5, 100, None)),
            None
        );
        assert_eq!(
            Window::between(&mark(t, 5, 0, None), &mark(t, 9, 0, None)),
            None
        );
        assert_eq!(
            Window::between(&mark(t, 9, 0, None), &mark(t, 5, 100, None)),
            None
        );
        let w = Window::between(&mark(t, 0, 0, Some(7)), &mark(t, 3, 100, Some(7))).unwrap();
        assert_eq!(w.cpu, None, "no CPU used: unknown, not infinite speed");
    }
}
