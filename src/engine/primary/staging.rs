//! Staging buffers: where the pause copies dirty pages for the encoders.
//!
//! Invariants:
//! - Before the first checkpoint, K buffers sized for the seed's last dirty
//!   set are allocated and faulted in while the guest still runs
//!   ([`StagingPool::prefault`]), so a pause normally allocates nothing.
//! - A buffer is either spare (here), or held by one in-flight job; `castor-tx`
//!   returns it once no encoder holds the job ([`StagingPool::reclaim`], run
//!   before the pause).
//! - Inside the pause ([`StagingPool::take`]) a spare buffer large enough is
//!   used, or none: the pause never waits for a buffer nor allocates one.
//!   Before every pause [`StagingPool::prepare`] readies a buffer sized for
//!   the pre-harvested dirty set plus headroom, waiting or allocating while
//!   the guest still runs (counted as extension); a dirty set that outgrew
//!   it anyway gives the pause up (see `epoch.rs`).

use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use super::shared::Shared;
use super::PrimaryError;
use crate::engine::shadow::PageBuf;

pub(super) struct StagingPool<'a> {
    spare: Vec<PageBuf>,
    /// Buffers in existence: spare and held by the pipeline.
    count: usize,
    /// K: checkpoints allowed in flight.
    k: usize,
    returned: &'a Receiver<PageBuf>,
}

impl<'a> StagingPool<'a> {
    pub fn new(k: usize, returned: &'a Receiver<PageBuf>) -> Self {
        StagingPool {
            spare: Vec::new(),
            count: 0,
            k,
            returned,
        }
    }

    /// Allocates and faults in the first checkpoints' K buffers, sized for a
    /// dirty set of `dirty` pages of a `pages`-page guest. Call while the
    /// guest runs.
    pub fn prefault(&mut self, pages: u64, dirty: u64) -> Result<(), PrimaryError> {
        let first = (pages as usize).min((dirty as usize * 2).max(8192));
        self.spare = (0..self.k)
            .map(|_| PageBuf::new_populated(first))
            .collect::<Result<_, _>>()?;
        self.count = self.spare.len();
        Ok(())
    }

    /// Takes back the buffers `castor-tx` returned. Call before the pause.
    pub fn reclaim(&mut self) {
        while let Ok(b) = self.returned.try_recv() {
            self.spare.push(b);
        }
    }

    /// Before the pause, while the guest runs: makes sure a spare buffer of
    /// at least `n` slots is ready, allocating (at most K+1 buffers) or
    /// growing one, and waiting for one to come back from the pipeline when
    /// all are in flight. Returns how long that waited or allocated: the
    /// epoch's extension, spent before the pause instead of inside it.
    pub fn prepare(&mut self, n: usize, shared: &Shared) -> Result<Duration, PrimaryError> {
        self.reclaim();
        if self.spare.iter().any(|b| b.slots() >= n) {
            return Ok(Duration::ZERO);
        }
        let t = Instant::now();
        let b = if self.count <= self.k {
            self.count += 1;
            PageBuf::new_populated(n)?
        } else {
            let b = match self.spare.pop() {
                Some(b) => b,
                None => self.wait_for_one(shared)?,
            };
            if b.slots() >= n {
                b
            } else {
                drop(b);
                PageBuf::new_populated(n)?
            }
        };
        self.spare.push(b);
        Ok(t.elapsed())
    }

    /// Whether a spare buffer of at least `n` slots is ready now (after
    /// taking back what the pipeline returned).
    pub fn ready(&mut self, n: usize) -> bool {
        self.reclaim();
        self.spare.iter().any(|b| b.slots() >= n)
    }

    /// A spare buffer of at least `n` slots, for use inside the pause:
    /// never waits, never allocates. None: no spare buffer holds `n` pages
    /// (the caller gives the pause up and readies one with
    /// [`StagingPool::prepare`] outside it).
    pub fn take(&mut self, n: usize) -> Option<PageBuf> {
        self.reclaim();
        let i = self.spare.iter().position(|b| b.slots() >= n)?;
        Some(self.spare.swap_remove(i))
    }

    /// Returns a buffer taken with [`StagingPool::take`] and not used (a
    /// pause given up).
    pub fn give_back(&mut self, b: PageBuf) {
        self.spare.push(b);
    }

    fn wait_for_one(&self, shared: &Shared) -> Result<PageBuf, PrimaryError> {
        self.returned.recv().map_err(|_| {
            // The tx thread only ends early on a failed link.
            let g = shared.inflight.lock().unwrap();
            g.error().unwrap_or(PrimaryError::BackupLost {
                acked: g.acked.unwrap_or(0),
                reason: "transport thread ended".into(),
            })
        })
    }
}
