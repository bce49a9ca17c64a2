//! Value types shared by the modules that measure ([`crate::metrics`]) and
//! the ones that report what they did ([`crate::outq`]): plain data, below
//! both, so neither has to import the other.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Percentiles of one quantity, in its histogram's unit.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Pct {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
    pub mean: f64,
}

impl Pct {
    pub fn of(h: &Histogram<u64>) -> Pct {
        if h.is_empty() {
            return Pct::default();
        }
        Pct {
            p50: h.value_at_quantile(0.5),
            p99: h.value_at_quantile(0.99),
            max: h.max(),
            mean: (h.mean() * 10.0).round() / 10.0,
        }
    }
}

/// What the output queue ([`crate::outq`]) did, reported at shutdown.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OutqReport {
    /// Items that entered the queue.
    pub items: u64,
    /// Items released to their destination.
    pub released: u64,
    /// Items released without waiting (pass-through mode, or produced in an
    /// already committed epoch).
    pub passed_through: u64,
    /// Items that were held at least until a commit.
    pub held: u64,
    /// Uncommitted items discarded at shutdown, at the end of a protection
    /// session, or while fenced (never released).
    pub dropped: u64,
    /// Items emitted after the queue shut down (never released).
    pub late: u64,
    /// Highest committed epoch of the last protection session.
    pub committed: u64,
    /// Protection sessions opened (backups that protected this copy).
    pub sessions: u64,
    /// Output release delay (emit → release), µs.
    pub release_delay_us: Pct,
    /// The same for output of epochs after the first (whose output waits
    /// for the whole initial copy): the steady-state figure `tune` reports.
    pub release_delay_steady_us: Pct,
}
