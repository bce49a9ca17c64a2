//! Pages of a write-protect-tracked mapping that may hold data: a bitmap
//! built from the kernel's page tables, not from what the guest meant to do.
//!
//! Why it exists: once userfaultfd write-protect is armed with
//! `UFFD_FEATURE_WP_UNPOPULATED`, every never-written page carries a
//! uffd-wp PTE marker, and `PAGEMAP_SCAN` reports a marker as
//! `PAGE_IS_SWAPPED` (a marker is a non-present, non-none PTE, so
//! `is_swap_pte()` holds) exactly like the swap or migration entry of a
//! page holding data. `/proc/self/pagemap` does not tell them apart either
//! without `CAP_SYS_ADMIN` (the swap type is hidden, and both carry
//! `PM_SWAP | PM_UFFD_WP`). So the current page tables alone cannot say
//! whether a swapped, write-protected page holds data; its history can.
//!
//! Invariant: a page whose bit is clear has held only zeros since the bitmap
//! was started, unless it was written since its last harvest (then the
//! kernel reports it `PAGE_IS_WRITTEN`, wherever the page is). The owner
//! keeps it by (1) setting, before arming write-protect and with no writer
//! running, the bit of every page the kernel reports present (not the zero
//! page) or swapped, and (2) setting the bit of every page a harvest
//! reports, before the harvest returns. Bits are never cleared: a page
//! freed since reads as zeros and is merely sent once too many.

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per page of one mapping; shared by the tracker and the striped
/// scanners (each marks its own stripe; stripes never share a word, see
/// [`crate::domain::pagemap::STRIPE_ALIGN`]).
#[derive(Debug)]
pub struct SeenPages {
    words: Box<[AtomicU64]>,
    pages: u64,
}

impl SeenPages {
    /// No page seen.
    pub fn new(pages: u64) -> Self {
        SeenPages {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// Sets the bits of `gfns` (any order; gfns beyond the mapping are
    /// ignored): one atomic OR per run of gfns in one 64-page word, so one
    /// per word touched when ascending.
    ///
    /// Relaxed: readers see the marks through whatever hands them the
    /// harvest's result (a join, a channel, the same thread).
    pub fn mark(&self, gfns: &[u64]) {
        let mut word = u64::MAX;
        let mut bits = 0u64;
        for &g in gfns.iter().filter(|&&g| g < self.pages) {
            if g / 64 != word {
                self.flush(word, bits);
                (word, bits) = (g / 64, 0);
            }
            bits |= 1 << (g % 64);
        }
        self.flush(word, bits);
    }

    fn flush(&self, word: u64, bits: u64) {
        if bits != 0 {
            self.words[word as usize].fetch_or(bits, Ordering::Relaxed);
        }
    }

    pub fn contains(&self, gfn: u64) -> bool {
        gfn < self.pages
            && self.words[(gfn / 64) as usize].load(Ordering::Relaxed) >> (gfn % 64) & 1 == 1
    }

    /// Appends to `out`, ascending and unique, the union of the seen pages
    /// and `now` (any order; gfns beyond the mapping are dropped).
    pub fn union_into(&self, now: &[u64], out: &mut Vec<u64>) {
        let mut words: Vec<u64> = self
            .words
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect();
        for &g in now.iter().filter(|&&g| g < self.pages) {
            words[(g / 64) as usize] |= 1 << (g % 64);
        }
        for (i, &w) in words.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                out.push(i as u64 * 64 + u64::from(w.trailing_zeros()));
                w &= w - 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_and_unions_are_exact() {
        let s = SeenPages::new(200);
        s.mark(&[0, 1, 63, 64, 130, 199, 200, 5000]);
        s.mark(&[]);
        s.mark(&[1, 2]);
        for g in 0..200 {
            assert_eq!(
                s.contains(g),
                [0, 1, 2, 63, 64, 130, 199].contains(&g),
                "{g}"
            );
        }
        assert!(!s.contains(200));
        let mut out = vec![7];
        s.union_into(&[150, 2, 199, 3, 900], &mut out);
        assert_eq!(out, [7, 0, 1, 2, 3, 63, 64, 130, 150, 199]);
        // The union does not mark.
        assert!(!s.contains(150));
    }
}
