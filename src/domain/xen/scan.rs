//! Scanning the log-dirty bitmap in stripes, one per pinned worker.
//!
//! Xen hands back one bit per guest frame. The bitmap is cut into
//! contiguous, word-aligned stripes; worker `i` turns the set bits of stripe
//! `i` into frame numbers. Stripes are in ascending order and disjoint, so
//! concatenating the workers' outputs in stripe order gives the sorted,
//! unique list the [`Domain`](crate::domain::Domain) trait promises, with no
//! merge step.
//!
//! [`ScanPool`] keeps the workers alive across epochs (spawning threads
//! inside the guest's pause would cost more than the scan); each is pinned
//! to a core when cores are given and owns its output vector.

use std::ops::Range;
use std::sync::mpsc;
use std::thread::JoinHandle;

/// Splits `words` bitmap words into at most `workers` contiguous stripes of
/// near-equal size (no empty stripe; none when `words` is 0).
pub fn stripes(words: usize, workers: usize) -> Vec<Range<usize>> {
    let n = workers.max(1).min(words);
    if n == 0 {
        return Vec::new();
    }
    let (base, extra) = (words / n, words % n);
    let mut out = Vec::with_capacity(n);
    let mut start = 0;
    for i in 0..n {
        let len = base + usize::from(i < extra);
        out.push(start..start + len);
        start += len;
    }
    out
}

/// Appends, in ascending order, the frame numbers of the set bits of
/// `words[range]`, ignoring bits at or above `bits` (the bitmap's tail).
pub fn scan(words: &[u64], range: Range<usize>, bits: u64, out: &mut Vec<u64>) {
    for w in range {
        let mut v = words[w];
        while v != 0 {
            let gfn = w as u64 * 64 + v.trailing_zeros() as u64;
            if gfn >= bits {
                return;
            }
            out.push(gfn);
            v &= v - 1;
        }
    }
}

/// A bitmap shared with the workers for the length of one scan. The caller
/// of [`ScanPool::scan`] keeps the words alive and unchanged until it
/// returns (it waits for every worker).
#[derive(Clone, Copy)]
struct Job {
    words: *const u64,
    len: usize,
    range: (usize, usize),
    bits: u64,
}

// SAFETY: a Job only travels to a worker during `ScanPool::scan`, which
// blocks until every worker has answered, so the pointed-to words outlive
// every use and are not written meanwhile.
unsafe impl Send for Job {}

struct Worker {
    tx: mpsc::Sender<Job>,
    rx: mpsc::Receiver<Vec<u64>>,
    handle: Option<JoinHandle<()>>,
}

/// Persistent scanner threads (`castor-xscan-N`).
pub struct ScanPool {
    workers: Vec<Worker>,
}

/// Bitmaps smaller than this many words are scanned by the caller alone:
/// handing them out costs more than scanning them.
const INLINE_WORDS: usize = 4096;

impl ScanPool {
    /// Starts `n` workers, the i-th pinned to `cores[i % cores.len()]` when
    /// cores are given.
    pub fn new(n: usize, cores: &[core_affinity::CoreId]) -> std::io::Result<ScanPool> {
        let mut workers = Vec::new();
        for i in 0..n.max(1) {
            let (tx, job_rx) = mpsc::channel::<Job>();
            let (out_tx, rx) = mpsc::channel::<Vec<u64>>();
            let core = (!cores.is_empty()).then(|| cores[i % cores.len()]);
            let handle = std::thread::Builder::new()
                .name(format!("castor-xscan-{i}"))
                .spawn(move || {
                    if let Some(c) = core {
                        core_affinity::set_for_current(c);
                    }
                    let mut spare = Vec::new();
                    while let Ok(job) = job_rx.recv() {
                        // SAFETY: see `Job`: the words stay valid and
                        // unwritten until we send our answer.
                        let words = unsafe { std::slice::from_raw_parts(job.words, job.len) };
                        let mut out = std::mem::take(&mut spare);
                        out.clear();
                        scan(words, job.range.0..job.range.1, job.bits, &mut out);
                        if out_tx.send(out).is_err() {
                            break;
                        }
                    }
                })?;
            workers.push(Worker {
                tx,
                rx,
                handle: Some(handle),
            });
        }
        Ok(ScanPool { workers })
    }

    /// Appends the set bits of `words` (below `bits`) to `out`, sorted.
    pub fn scan(&self, words: &[u64], bits: u64, out: &mut Vec<u64>) {
        if words.len() < INLINE_WORDS || self.workers.len() == 1 {
            scan(words, 0..words.len(), bits, out);
            return;
        }
        let parts = stripes(words.len(), self.workers.len());
        let mut sent = 0;
        for (w, r) in self.workers.iter().zip(&parts) {
            let job = Job {
                words: words.as_ptr(),
                len: words.len(),
                range: (r.start, r.end),
                bits,
            };
            if w.tx.send(job).is_err() {
                break;
            }
            sent += 1;
        }
        // Wait for every worker that got a job before touching `out` or
        // returning (the words must outlive their reads).
        let mut results: Vec<Option<Vec<u64>>> = Vec::with_capacity(sent);
        for w in &self.workers[..sent] {
            results.push(w.rx.recv().ok());
        }
        for (i, r) in parts.iter().enumerate() {
            match results.get_mut(i).and_then(Option::take) {
                Some(v) => out.extend_from_slice(&v),
                // A worker that died (or was never reached): scan its
                // stripe here so no dirty page is ever lost.
                None => scan(words, r.clone(), bits, out),
            }
        }
    }
}

impl Drop for ScanPool {
    fn drop(&mut self) {
        for w in &mut self.workers {
            let (tx, _) = mpsc::channel();
            drop(std::mem::replace(&mut w.tx, tx));
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn stripes_cover_the_bitmap_in_order() {
        assert!(stripes(0, 4).is_empty());
        assert_eq!(stripes(3, 8), vec![0..1, 1..2, 2..3]);
        assert_eq!(stripes(10, 3), vec![0..4, 4..7, 7..10]);
        assert_eq!(stripes(10, 0), vec![0..10]);
    }

    #[test]
    fn scan_ignores_bits_past_the_end() {
        let words = [0b1011u64, 1 << 63, u64::MAX];
        let mut out = Vec::new();
        scan(&words, 0..3, 130, &mut out);
        assert_eq!(out, vec![0, 1, 3, 127, 128, 129]);
    }

    fn reference(words: &[u64], bits: u64) -> Vec<u64> {
        (0..bits)
            .filter(|g| words[(g / 64) as usize] >> (g % 64) & 1 == 1)
            .collect()
    }

    proptest! {
        #[test]
        fn striped_scan_equals_a_bit_by_bit_walk(
            words in proptest::collection::vec(any::<u64>(), 0..300),
            workers in 1usize..9,
            cut in 0u64..64,
        ) {
            let bits = (words.len() as u64 * 64).saturating_sub(cut);
            let mut out = Vec::new();
            for r in stripes(words.len(), workers) {
                scan(&words, r, bits, &mut out);
            }
            prop_assert_eq!(out, reference(&words, bits));
        }
    }

    #[test]
    fn pool_scan_matches_inline_on_a_large_sparse_bitmap() {
        // 2^20 frames (4 GiB of guest) with a scattered pattern.
        let mut words = vec![0u64; 1 << 14];
        for (i, w) in words.iter_mut().enumerate() {
            if i % 7 == 0 {
                *w = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            }
        }
        let bits = words.len() as u64 * 64 - 5;
        let pool = ScanPool::new(3, &[]).unwrap();
        let mut got = Vec::new();
        pool.scan(&words, bits, &mut got);
        assert_eq!(got, reference(&words, bits));
        // The pool is reusable across epochs.
        words[5] = 1;
        got.clear();
        pool.scan(&words, bits, &mut got);
        assert_eq!(got, reference(&words, bits));
    }
}
