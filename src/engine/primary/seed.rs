//! The seed (epoch 0): live pre-copy of the whole guest while it runs.
//!
//! Round 0 reads every page (or, when the domain can tell, every page ever
//! written: never-written pages are zero, as is the backup's fresh
//! replica); each later round re-sends the pages dirtied since the previous
//! harvest, until the dirty set is small or stops shrinking, so the first
//! checkpoint's pause stays short.
//!
//! Invariants:
//! - Every round is one unit; all rounds belong to epoch 0, the first
//!   opening it and the last closing it, so the backup commits the seed
//!   whole or not at all.
//! - A round is harvested only after the previous one was handed to the
//!   sink: the rounds pace themselves to the link.
//! - The last round also carries the pages written while the first
//!   checkpoints' staging was being faulted in.

use std::sync::Arc;
use std::time::Instant;

use super::dirty::merge_sorted;
use super::epoch::Driver;
use super::job::{EpochJob, Meta, Source};
use super::{PrimaryConfig, PrimaryError};
use crate::metrics::EpochRecord;
use crate::transport::messages::EpochClass;

impl Driver<'_> {
    /// Sends the seed's rounds; returns once the last one is dispatched
    /// (not yet acknowledged), with the first checkpoints' staging ready.
    pub(super) fn seed(&mut self) -> Result<(), PrimaryError> {
        let pages = self.domain.layout().pages;
        let mut present = Vec::new();
        let mut source = match self.domain.present_pages(&mut present) {
            Ok(true) => Source::Live(present),
            _ => Source::AllLive,
        };
        let first_pass = match &source {
            Source::Live(p) => p.len() as u64,
            _ => pages,
        };
        let mut round = 0u32;
        let mut last = false;
        let mut prev_dirty = u64::MAX;
        let mut round_start = Instant::now();
        loop {
            self.dispatch_round(source, round == 0, last, pages);
            if last {
                return Ok(());
            }
            let unit = self.unit;
            let g = self.shared.inflight.lock().unwrap();
            drop(self.shared.wait_while(g, |g| g.units_sent < unit)?);
            if self.cfg.progress {
                eprintln!(
                    "castor: initial copy round {round}: {} pages sent in {:.0} ms",
                    if round == 0 { first_pass } else { prev_dirty },
                    round_start.elapsed().as_secs_f64() * 1000.0
                );
            }
            round += 1;
            round_start = Instant::now();
            let mut d = Vec::new();
            self.domain.harvest_dirty(&mut d)?;
            let n = d.len() as u64;
            last = is_last_round(self.cfg, round, n, prev_dirty);
            if last {
                // Staging for the first checkpoints, faulted in now (the guest
                // still runs) and sized for this round's dirty set, so no pause
                // allocates. Pages written meanwhile join this last round.
                self.staging.prefault(pages, n)?;
                let mut more = Vec::new();
                self.domain.harvest_dirty(&mut more)?;
                let mut all = Vec::new();
                merge_sorted(&d, &more, &mut all);
                d = all;
            }
            prev_dirty = d.len() as u64;
            source = Source::Live(d);
        }
    }

    fn dispatch_round(&mut self, source: Source, first: bool, last: bool, pages: u64) {
        let job = Arc::new(EpochJob {
            unit: self.unit,
            epoch: 0,
            source,
        });
        self.pipe.dispatch(Meta {
            unit: self.unit,
            epoch: 0,
            class: EpochClass::Seed,
            first_round: first,
            last_round: last,
            dirty: pages,
            state: Vec::new(),
            record: EpochRecord::default(),
            pause_start: Instant::now(),
            job,
        });
        self.unit += 1;
    }
}

/// Pre-copy's stopping rule after `round` rounds, the last leaving `n`
/// dirty pages (`prev` before): stop once the set is small, or has stopped
/// shrinking after a few rounds (the guest dirties faster than a round
/// takes), or at the round limit or a stop signal.
fn is_last_round(cfg: &PrimaryConfig, round: u32, n: u64, prev: u64) -> bool {
    n <= cfg.precopy_target
        || round >= cfg.precopy_rounds
        || (round >= 4 && n >= prev)
        || crate::engine::stop_requested()
}
