//! Maps the shared zero page into a tracked mapping's never-touched pages,
//! on a background thread, after write-protect tracking is armed.
//!
//! Why: arming write-protects never-touched pages too, and with nothing
//! mapped there the kernel keeps a write-protect *marker* in the page
//! table. `PAGEMAP_SCAN` walks markers about four times slower than
//! write-protected zero-page entries (`dirty::tests::harvest_time_1gib_5000_pages`:
//! a clean 1 GiB harvest 0.92 ms over markers, 0.21 ms over zero pages),
//! and every harvest, inside the guest's pause, walks the whole range.
//!
//! Invariants: only reads are faulted in (`MADV_POPULATE_READ`), so no
//! page's contents change and no memory is used beyond page tables the
//! markers already needed. A read fault on a marked page maps the zero
//! page *write-protected* (the kernel carries the marker's uffd-wp bit
//! over), so the page's first write is still reported; a page written
//! before the thread reaches it is already mapped and left alone. Zero-page
//! entries are `PAGE_IS_PFNZERO`, which `DirtyTracker::holds_data` skips,
//! so the seed still reads only pages holding data. Pages in swap are in
//! `present` and never touched here. The thread stops early, and is
//! joined, when the [`ZeroFill`] is dropped, before the tracker (and so
//! before the mapping, which outlives the tracker) goes away.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::domain::DomainError;
use crate::PAGE_SIZE;

/// Pages populated per `madvise` call, so a drop stops the thread quickly.
const CHUNK_PAGES: u64 = 4096;

/// The background fill; dropping it stops and joins the thread.
#[derive(Debug)]
pub struct ZeroFill {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ZeroFill {
    /// Starts filling the pages of `[base, base + pages * PAGE_SIZE)` that
    /// are not in `present` (sorted, unique page indices). Must be called
    /// after write-protect is armed over the range.
    pub fn start(base: u64, pages: u64, present: &[u64]) -> Result<Self, DomainError> {
        let runs: Vec<Range<u64>> = holes(pages, present).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("castor-zerofill".into())
            .spawn(move || fill(base, &runs, &flag))
            .map_err(|source| DomainError::Sys {
                op: "spawn castor-zerofill",
                source,
            })?;
        Ok(ZeroFill {
            stop,
            thread: Some(thread),
        })
    }
}

impl ZeroFill {
    /// Waits until every hole is filled (for tests and measurements).
    #[cfg(test)]
    pub fn finish(&mut self) {
        if let Some(t) = self.thread.take() {
            t.join().expect("castor-zerofill panicked");
        }
    }
}

impl Drop for ZeroFill {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The thread's body: every run in chunks, until done or told to stop.
fn fill(base: u64, runs: &[Range<u64>], stop: &AtomicBool) {
    let page = PAGE_SIZE as u64;
    for run in runs {
        let mut at = run.start;
        while at < run.end {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let n = (run.end - at).min(CHUNK_PAGES);
            // SAFETY: read-populating pages of the tracked anonymous
            // mapping, which outlives this thread (joined on drop); it maps
            // the zero page where nothing is mapped and changes no contents.
            let r = unsafe {
                libc::madvise(
                    (base + at * page) as *mut libc::c_void,
                    (n * page) as usize,
                    libc::MADV_POPULATE_READ,
                )
            };
            if r != 0 {
                // Only the harvest's speed depends on this; say so once.
                let e = std::io::Error::last_os_error();
                tracing::warn!(
                    "madvise MADV_POPULATE_READ at page {at}: {e}; harvests stay slower"
                );
                return;
            }
            at += n;
        }
    }
}

/// The runs of `0..pages` not in `present` (sorted, unique, each < pages).
pub fn holes(pages: u64, present: &[u64]) -> impl Iterator<Item = Range<u64>> + '_ {
    let ends = present.iter().copied().chain(std::iter::once(pages));
    let starts = std::iter::once(0).chain(present.iter().map(|&p| p + 1));
    starts.zip(ends).filter(|(s, e)| s < e).map(|(s, e)| s..e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_the_runs_between_present_pages() {
        let runs = |pages, present: &[u64]| holes(pages, present).collect::<Vec<_>>();
        assert_eq!(runs(10, &[]), vec![0..10]);
        assert_eq!(runs(10, &[0, 1, 5, 9]), vec![2..5, 6..9]);
        assert_eq!(runs(4, &[0, 1, 2, 3]), vec![]);
        assert_eq!(runs(6, &[3]), vec![0..3, 4..6]);
        assert_eq!(runs(0, &[]), vec![]);
    }
}
