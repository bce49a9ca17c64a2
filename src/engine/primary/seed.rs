//! The seed (epoch 0): live pre-copy of the whole guest while it runs.
//!
//! Round 0 reads every page (or, when the domain can tell, every page ever
//! written: never-written pages are zero, as is the backup's fresh
//! replica), encoding each against zeros rather than the shadow
//! ([`Source::FirstPass`]: nothing was sent yet); each later round re-sends the pages dirtied since the previous
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
//! - A round travels as units of at most [`SEED_UNIT_PAGES`] pages, at most
//!   [`SEED_AHEAD`] ahead of the sink: a 1 GiB first pass is not encoded
//!   whole into memory before its first byte is sent.
//! - Every round, the last included, is read out of live memory (encoded
//!   and handed to the sink) before the seed returns, hence before epoch 1
//!   ends: a page read after epoch 1's resume could carry epoch 2's writes,
//!   and checkpoint 1 (epoch 1's dirty pages only) would not correct it, so
//!   the backup's epoch 1 would not be the guest's.

use std::sync::Arc;
use std::time::Instant;

use super::dirty::merge_sorted;
use super::epoch::Driver;
use super::job::{EpochJob, Meta, Source};
use super::{PrimaryConfig, PrimaryError};

/// Pages per seed unit (64 MiB).
const SEED_UNIT_PAGES: usize = 16384;
/// Seed units dispatched beyond those the sink has taken.
const SEED_AHEAD: u64 = 2;
use crate::metrics::EpochRecord;
use crate::transport::messages::EpochClass;

impl Driver<'_> {
    /// Sends the seed's rounds; returns once the last one is handed to the
    /// sink (not yet acknowledged), with the first checkpoints' staging ready.
    pub(super) fn seed(&mut self) -> Result<(), PrimaryError> {
        let pages = self.domain.layout().pages;
        let mut present = Vec::new();
        let mut source = match self.domain.present_pages(&mut present) {
            Ok(true) => present,
            _ => (0..pages).collect(),
        };
        let first_pass = source.len() as u64;
        self.shared
            .seed_first_pass
            .store(first_pass, std::sync::atomic::Ordering::Relaxed);
        let mut round = 0u32;
        let mut last = false;
        let mut prev_dirty = u64::MAX;
        let mut round_start = Instant::now();
        loop {
            self.send_round(source, round == 0, last, pages)?;
            // The round's pages are read live by the encoders: wait until
            // they are (see the module invariants), then harvest.
            let unit = self.unit;
            let g = self.shared.inflight.lock().unwrap();
            drop(self.shared.wait_while(g, |g| g.units_sent < unit)?);
            if last {
                return Ok(());
            }
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
            self.harvest(&mut d)?;
            let n = d.len() as u64;
            last = is_last_round(self.cfg, round, n, prev_dirty);
            // The guest dirties faster than rounds ship: throttle it so
            // pre-copy converges (and the first checkpoints are small).
            let sent = if round == 1 { first_pass } else { prev_dirty };
            if self.cfg.throttle && !last {
                let before = self.throttle.pct();
                let pct = self.throttle.seed_round(sent, n);
                if pct != before && !self.domain.throttle(pct) {
                    self.throttle.set(0);
                }
            }
            if last {
                // Staging for the first checkpoints, faulted in now (the guest
                // still runs) and sized for this round's dirty set, so no pause
                // allocates. Pages written meanwhile join this last round.
                self.staging.prefault(pages, n)?;
                let mut more = Vec::new();
                self.harvest(&mut more)?;
                let mut all = Vec::new();
                merge_sorted(&d, &more, &mut all);
                d = all;
            }
            prev_dirty = d.len() as u64;
            source = d;
        }
    }

    /// Dispatches one round as units of at most [`SEED_UNIT_PAGES`] pages,
    /// each once the sink is at most [`SEED_AHEAD`] units behind: encoding
    /// overlaps sending, and encoded buffers stay bounded however large
    /// the guest. The round's first unit may open epoch 0 (`first`), its
    /// last may close it (`last`).
    fn send_round(
        &mut self,
        gfns: Vec<u64>,
        first: bool,
        last: bool,
        pages: u64,
    ) -> Result<(), PrimaryError> {
        let n = gfns.len().div_ceil(SEED_UNIT_PAGES).max(1);
        for i in 0..n {
            let unit = self.unit;
            let g = self.shared.inflight.lock().unwrap();
            drop(
                self.shared
                    .wait_while(g, |g| g.units_sent + SEED_AHEAD < unit)?,
            );
            let part = &gfns[(i * SEED_UNIT_PAGES).min(gfns.len())
                ..((i + 1) * SEED_UNIT_PAGES).min(gfns.len())];
            let source = if first {
                Source::FirstPass(part.to_vec())
            } else {
                Source::Live(part.to_vec())
            };
            self.dispatch_round(source, first && i == 0, last && i + 1 == n, pages);
        }
        Ok(())
    }

    fn dispatch_round(&mut self, source: Source, first: bool, last: bool, pages: u64) {
        let compressor = self.shared.codec.lock().unwrap().choose();
        let job = Arc::new(EpochJob {
            unit: self.unit,
            epoch: 0,
            source,
            compressor,
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
            disk: Vec::new(),
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
