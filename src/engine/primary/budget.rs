//! The pause budget: how many dirty pages an epoch may collect before it
//! must end, so that its pause (harvest + copy + state) stays near a target
//! (`--pause-target`, default [`DEFAULT_TARGET`]).
//!
//! The pause copies the pages written since the pre-copy (see
//! `epoch.rs`); the pre-copy takes longer, and the guest writes more
//! meanwhile, as the epoch's dirty set grows, so the pause's copy still
//! grows with the set, only far more slowly than when the pause copied the
//! whole set. An epoch that runs long (extended while it waits for acks)
//! or a guest that writes hard collects a large set. The budget turns the
//! pause target into pages: the pause's copy time per page of the dirty
//! set measured in recent pauses (median of the last [`RECENT`], so one
//! pause stretched by a descheduled thread counts for nothing) against
//! the time the target leaves for the copy (the target less the median of
//! the rest of recent pauses: stopping the guest, the harvest, the state). The
//! epoch thread ends the epoch once its dirty set reaches the budget, or,
//! when the pipeline has no room for another checkpoint, throttles the
//! guest hard until it has (both outside the pause; see `pacing.rs`).
//!
//! Invariants: [`PauseBudget::pages`] is always within
//! `[MIN_PAGES, MAX_PAGES]`; before any pause was measured it is the
//! budget of [`DEFAULT_NS_PER_PAGE`]. Pure: no clock, no thread.

use std::collections::VecDeque;
use std::time::Duration;

/// The pause `--pause-target` aims at when not given.
pub const DEFAULT_TARGET: Duration = Duration::from_millis(4);
/// Copy cost per page assumed until pauses were measured (a 4 KiB copy
/// from cold memory on one thread, about 10 GB/s).
pub const DEFAULT_NS_PER_PAGE: f64 = 400.0;
/// The budget never falls below this (a descheduled copy thread must not
/// shrink epochs to nothing) nor rises above that.
pub const MIN_PAGES: u64 = 1024;
pub const MAX_PAGES: u64 = 1 << 20;
/// The copy's share of the target is at least this much of it, whatever
/// the rest of the pause measured.
pub const MIN_COPY_SHARE: f64 = 0.25;
/// Pauses that copied fewer pages than this say little about the rate.
pub const MIN_SAMPLE_PAGES: u64 = 256;
/// A guest throttled hard at its budget while the epoch waits for an
/// in-flight slot is stopped altogether once its dirty set may exceed the
/// budget by this share of it (1/4): the pause after a long wait copies at
/// most that much more than the target allows.
pub const HOLD_SLACK: u64 = 4;
/// How many recent pauses the medians take.
pub const RECENT: usize = 16;
/// A harvest to count the dirty set waits for at least this share of the
/// budget in new writes, so that a guest rewriting a hot set (whose writes
/// overstate its dirty set) is not harvested at every poll; the dirty set
/// may then exceed the budget by this share between two harvests.
pub const REHARVEST_SHARE: u64 = 8;

/// A `--pause-target` value that could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PauseTargetError {
    #[error("--pause-target {0:?}: expected a duration like 4ms (at most 1s), or off")]
    Syntax(String),
}

/// Parses `--pause-target`: a duration in (0, 1 s], or `off` (None: no
/// budget).
pub fn parse_target(s: &str) -> Result<Option<Duration>, PauseTargetError> {
    let s = s.trim();
    if s == "off" {
        return Ok(None);
    }
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() && d <= Duration::from_secs(1) => Ok(Some(d)),
        _ => Err(PauseTargetError::Syntax(s.into())),
    }
}

/// The pause budget of one session.
#[derive(Debug, Clone)]
pub struct PauseBudget {
    target: Duration,
    /// Copy cost of recent pauses, nanoseconds per page.
    per_page: VecDeque<f64>,
    /// The rest of recent pauses (pause less copy), nanoseconds.
    rest: VecDeque<f64>,
}

fn push(v: &mut VecDeque<f64>, x: f64) {
    if v.len() == RECENT {
        v.pop_front();
    }
    v.push_back(x);
}

fn median(v: &VecDeque<f64>) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().collect();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied()
}

impl PauseBudget {
    pub fn new(target: Duration) -> Self {
        PauseBudget {
            target,
            per_page: VecDeque::with_capacity(RECENT),
            rest: VecDeque::with_capacity(RECENT),
        }
    }

    /// The pause this budget aims at.
    pub fn target(&self) -> Duration {
        self.target
    }

    /// Folds in one pause: an epoch of `pages` dirty pages whose pause
    /// spent `copy` copying (the pages written since the pre-copy) and was
    /// `pause` long in all.
    pub fn observe(&mut self, pages: u64, copy: Duration, pause: Duration) {
        push(&mut self.rest, pause.saturating_sub(copy).as_nanos() as f64);
        if pages >= MIN_SAMPLE_PAGES {
            push(&mut self.per_page, copy.as_nanos() as f64 / pages as f64);
        }
    }

    /// Dirty pages an epoch may collect: the copy time the target leaves
    /// over the measured cost per page.
    pub fn pages(&self) -> u64 {
        let target = self.target.as_nanos() as f64;
        let rest = median(&self.rest).unwrap_or(0.0);
        let copy = (target - rest).max(target * MIN_COPY_SHARE);
        let per_page = median(&self.per_page)
            .unwrap_or(DEFAULT_NS_PER_PAGE)
            .max(1.0);
        ((copy / per_page) as u64).clamp(MIN_PAGES, MAX_PAGES)
    }
}

/// What the epoch thread knows of the running epoch's dirty set: the pages
/// harvested from it so far (outside the pause) and the guest's page
/// writes since the last harvest (an upper bound on the pages dirtied
/// since, from the domain's own count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyEstimate {
    pub harvested: u64,
    pub writes_since: u64,
}

/// What to do about the running epoch's dirty set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Under budget even if every write since the last harvest hit a new
    /// page: let the epoch run.
    Run,
    /// The writes may have reached the budget: harvest now (outside the
    /// pause) to count the dirty set exactly.
    Harvest,
    /// The dirty set reached the budget: end the epoch (or, with no room
    /// in the pipeline, throttle the guest hard until there is).
    Full,
}

/// The shortest wait between two counts of the running epoch's dirty set
/// (a guest at or near its budget is counted this often).
pub const POLL_MIN: Duration = Duration::from_micros(500);
/// The longest: a guest that idled and starts writing at full speed is
/// counted at most this late (at 1 M pages/s, 5 000 pages past its budget).
pub const POLL_MAX: Duration = Duration::from_millis(5);

/// How long the epoch may run before its dirty set is counted again: half
/// the time the guest, writing `writes_per_s`, needs to bring the estimate's
/// upper bound (harvested + writes since) to `budget`, within
/// [`POLL_MIN`, `POLL_MAX`]. Counting every 500 µs cost the epoch thread
/// 1 800 wake-ups a second (about 30 ms of CPU) on a guest writing 2 000
/// pages a second, whose budget of 1 024 pages or more no 25 ms epoch nears
/// (stop 17).
pub fn poll_after(e: DirtyEstimate, budget: u64, writes_per_s: f64) -> Duration {
    let headroom = budget.saturating_sub(e.harvested + e.writes_since) as f64;
    let secs = if writes_per_s > 0.0 {
        headroom / writes_per_s / 2.0
    } else {
        f64::INFINITY
    };
    Duration::from_secs_f64(secs.clamp(POLL_MIN.as_secs_f64(), POLL_MAX.as_secs_f64()))
}

/// Decides from the estimate: `Full` once the harvested pages alone reach
/// `budget`, `Harvest` once they could together with the writes since
/// (and those are at least `budget / REHARVEST_SHARE`).
pub fn verdict(e: DirtyEstimate, budget: u64) -> Verdict {
    if e.harvested >= budget {
        Verdict::Full
    } else if e.harvested + e.writes_since >= budget && e.writes_since >= budget / REHARVEST_SHARE {
        Verdict::Harvest
    } else {
        Verdict::Run
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_slow_writer_is_counted_rarely_and_one_near_its_budget_often() {
        let e = |harvested, writes_since| DirtyEstimate {
            harvested,
            writes_since,
        };
        // 2 000 writes/s, 1 024 pages of budget: half of 0.5 s, capped.
        assert_eq!(poll_after(e(0, 0), 1024, 2_000.0), POLL_MAX);
        // 100 000 writes/s with 400 pages left: half of 4 ms.
        assert_eq!(poll_after(e(500, 124), 1024, 100_000.0), 2 * MS);
        // At or past the budget (a hot set rewritten): as often as allowed.
        assert_eq!(poll_after(e(900, 500), 1024, 100_000.0), POLL_MIN);
        assert_eq!(poll_after(e(10, 0), 1024, 1e9), POLL_MIN);
        // No writes seen: the longest wait.
        assert_eq!(poll_after(e(10, 0), 1024, 0.0), POLL_MAX);
    }

    #[test]
    fn pause_targets_parse_or_name_the_value() {
        assert_eq!(parse_target("4ms"), Ok(Some(4 * MS)));
        assert_eq!(parse_target(" off "), Ok(None));
        for bad in ["0ms", "2s", "fast", ""] {
            let e = parse_target(bad).unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn budget_is_the_copy_time_the_target_leaves_over_the_cost_per_page() {
        let mut b = PauseBudget::new(4 * MS);
        // Unmeasured: 4 ms at 400 ns per page.
        assert_eq!(b.pages(), 10_000);
        // 5,000 pages copied in 2.5 ms (500 ns each), pauses of 3.5 ms:
        // 1 ms of rest leaves 3 ms for the copy, 6,000 pages.
        for _ in 0..RECENT {
            b.observe(
                5_000,
                Duration::from_micros(2_500),
                Duration::from_micros(3_500),
            );
        }
        assert_eq!(b.pages(), 6_000);
        // A few pauses stretched tenfold by a descheduled copy thread do
        // not move the median.
        for _ in 0..RECENT / 2 - 1 {
            b.observe(5_000, 25 * MS, 26 * MS);
        }
        assert_eq!(b.pages(), 6_000);
        // Tiny pauses are no evidence of the rate.
        b.observe(10, Duration::from_micros(500), Duration::from_micros(600));
        assert_eq!(b.pages(), 6_000);
    }

    #[test]
    fn budget_stays_within_its_bounds() {
        let mut slow = PauseBudget::new(4 * MS);
        // 100 µs per page and 10 ms of rest: the copy keeps its 1 ms
        // floor share (10 pages), raised to the minimum.
        for _ in 0..RECENT {
            slow.observe(1_000, 100 * MS, 110 * MS);
        }
        assert_eq!(slow.pages(), MIN_PAGES);
        let mut fast = PauseBudget::new(Duration::from_secs(10));
        for _ in 0..RECENT {
            fast.observe(1_000, Duration::from_micros(1), Duration::from_micros(2));
        }
        assert_eq!(fast.pages(), MAX_PAGES);
    }

    /// A fake guest dirtying `rate` distinct pages per second, polled
    /// every `poll`: the epoch loop's use of [`verdict`] (harvest when the
    /// writes could reach the budget, end when the harvested set does)
    /// keeps every epoch's dirty set within the budget plus what one poll
    /// interval (or the re-harvest share) adds, whatever the rate; without
    /// it the set grows with the epoch.
    #[test]
    fn the_verdict_bounds_the_dirty_set_given_a_rate() {
        let budget = 6_000u64;
        let poll_us = 250u64;
        for rate in [50_000u64, 200_000, 400_000, 800_000, 3_000_000] {
            let per_poll = rate * poll_us / 1_000_000;
            // The epoch runs 25 ms, or ends at Full.
            let (mut harvested, mut since, mut t) = (0u64, 0u64, 0u64);
            let mut ended_early = false;
            while t < 25_000 {
                t += poll_us;
                since += per_poll;
                match verdict(
                    DirtyEstimate {
                        harvested,
                        writes_since: since,
                    },
                    budget,
                ) {
                    Verdict::Run => {}
                    Verdict::Harvest => {
                        harvested += since;
                        since = 0;
                        if verdict(
                            DirtyEstimate {
                                harvested,
                                writes_since: 0,
                            },
                            budget,
                        ) == Verdict::Full
                        {
                            ended_early = true;
                            break;
                        }
                    }
                    Verdict::Full => {
                        ended_early = true;
                        break;
                    }
                }
            }
            // The pause's own harvest adds what was written since.
            let dirty = harvested + since;
            let unbounded = rate * 25 / 1000;
            assert!(
                dirty <= budget + per_poll.max(budget / REHARVEST_SHARE),
                "rate {rate}: {dirty} pages against a budget of {budget}"
            );
            assert_eq!(ended_early, unbounded > budget, "rate {rate}");
        }
    }

    /// A guest rewriting a hot set smaller than the budget: its writes
    /// overstate the dirty set, a harvest says so, and the next harvest
    /// waits for a share of the budget in new writes.
    #[test]
    fn a_hot_set_is_harvested_once_per_share_of_new_writes() {
        let budget = 8_000;
        let e = |harvested, writes_since| DirtyEstimate {
            harvested,
            writes_since,
        };
        assert_eq!(verdict(e(0, 7_999), budget), Verdict::Run);
        assert_eq!(verdict(e(0, 8_000), budget), Verdict::Harvest);
        // Harvested: only 5,000 distinct pages.
        assert_eq!(verdict(e(5_000, 0), budget), Verdict::Run);
        assert_eq!(verdict(e(7_500, 999), budget), Verdict::Run);
        assert_eq!(verdict(e(7_500, 1_000), budget), Verdict::Harvest);
        assert_eq!(verdict(e(8_000, 0), budget), Verdict::Full);
    }
}
