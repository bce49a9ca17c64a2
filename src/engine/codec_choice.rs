//! Compression chosen per epoch from measured costs: raw when the encoders
//! (the CPU) are the bottleneck and the link has room, compressed when the
//! link is (`--compress auto`).
//!
//! An epoch flows through two stages that overlap with each other and with
//! the guest: encoding (spread over the workers) and sending. Its time
//! through the pipeline is set by the slower one, so per page a candidate
//! compressor `c` costs
//!
//! ```text
//! cost(c) = max(encode_ns(c) / workers, wire_bytes(c) / link_rate)
//! ```
//!
//! with `encode_ns` and `wire_bytes` per page measured on the epochs that
//! used `c` (moving averages) and `link_rate` the bytes per second the link
//! took while sending. The cheapest candidate wins; the first candidate
//! (the user's compressor) keeps its place unless another costs at most
//! [`SWITCH`] of it, so noise does not flip the choice. Every [`PROBE`]
//! epochs the candidate measured least recently runs once, so estimates
//! follow the workload.
//!
//! Invariant: [`CodecChoice::choose`] returns one of the candidates given at
//! construction. The choice is not wire format: every page says its kind.
//! Pure data, no clock: `castor tune` can replay it over recorded epochs.

use crate::codec::Compressor;

/// Epochs between probes of the least recently measured candidate.
pub const PROBE: u64 = 40;
/// Another candidate replaces the first only below this share of its cost.
pub const SWITCH: f64 = 0.8;
/// Weight of a new observation in the moving averages.
const ALPHA: f64 = 0.3;
/// Sends shorter than this say nothing about the link's rate.
const MIN_SEND_US: u64 = 300;

/// Measured per-page costs of one candidate.
#[derive(Debug, Clone, Copy, Default)]
struct Estimate {
    encode_ns: f64,
    wire_bytes: f64,
    /// Epoch number of the last observation; None before the first.
    seen: Option<u64>,
}

/// One epoch's figures, as the transmit thread saw them.
#[derive(Debug, Clone, Copy)]
pub struct Observed {
    pub compressor: Compressor,
    /// Pages encoded (every dirty page of the epoch).
    pub pages: u64,
    /// Encoder CPU time summed over the workers.
    pub encode_us: u64,
    pub wire_bytes: u64,
    /// Time the sink took to accept the epoch.
    pub send_us: u64,
}

/// The per-epoch chooser. One per primary session.
#[derive(Debug, Clone)]
pub struct CodecChoice {
    cands: Vec<Compressor>,
    est: Vec<Estimate>,
    workers: f64,
    /// Link rate in bytes per µs (moving average); None until measured.
    link: Option<f64>,
    epochs: u64,
    last: usize,
}

impl CodecChoice {
    /// Chooses among `cands` (the first is the default); one candidate
    /// makes a fixed choice.
    pub fn new(cands: &[Compressor], workers: usize) -> Self {
        let cands = if cands.is_empty() {
            vec![Compressor::None]
        } else {
            cands.to_vec()
        };
        CodecChoice {
            est: vec![Estimate::default(); cands.len()],
            cands,
            workers: workers.max(1) as f64,
            link: None,
            epochs: 0,
            last: 0,
        }
    }

    /// What `--compress auto` chooses among: lz4 first, then raw and zstd.
    pub fn auto(workers: usize) -> Self {
        CodecChoice::new(
            &[Compressor::Lz4, Compressor::None, Compressor::Zstd(1)],
            workers,
        )
    }

    /// Whether there is a choice to make at all.
    pub fn adaptive(&self) -> bool {
        self.cands.len() > 1
    }

    /// The compressor for the next epoch.
    pub fn choose(&mut self) -> Compressor {
        self.epochs += 1;
        let i = self.pick();
        self.last = i;
        self.cands[i]
    }

    fn pick(&self) -> usize {
        if !self.adaptive() {
            return 0;
        }
        // Unmeasured candidates first, then a periodic probe.
        if let Some(i) = self.est.iter().position(|e| e.seen.is_none()) {
            return i;
        }
        if self.epochs % PROBE == 0 {
            return (0..self.cands.len())
                .min_by_key(|&i| self.est[i].seen)
                .unwrap_or(0);
        }
        let cost: Vec<f64> = (0..self.cands.len()).map(|i| self.cost(i)).collect();
        let (best, best_cost) = cost
            .iter()
            .copied()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or((0, cost[0]));
        if best != 0 && best_cost <= cost[0] * SWITCH {
            best
        } else {
            0
        }
    }

    /// Predicted ns per page through the pipeline with candidate `i`.
    fn cost(&self, i: usize) -> f64 {
        let e = &self.est[i];
        let cpu = e.encode_ns / self.workers;
        let link = self.link.map_or(0.0, |bytes_per_us| {
            e.wire_bytes / bytes_per_us.max(1e-9) * 1000.0
        });
        cpu.max(link)
    }

    /// The compressor the last [`CodecChoice::choose`] returned.
    pub fn current(&self) -> Compressor {
        self.cands[self.last]
    }

    /// Folds one sent epoch in.
    pub fn observe(&mut self, o: &Observed) {
        if o.send_us >= MIN_SEND_US && o.wire_bytes > 0 {
            let rate = o.wire_bytes as f64 / o.send_us as f64;
            self.link = Some(self.link.map_or(rate, |r| r + ALPHA * (rate - r)));
        }
        let Some(i) = self.cands.iter().position(|&c| c == o.compressor) else {
            return;
        };
        if o.pages == 0 {
            return;
        }
        let ns = o.encode_us as f64 * 1000.0 / o.pages as f64;
        let wire = o.wire_bytes as f64 / o.pages as f64;
        let e = &mut self.est[i];
        if e.seen.is_none() {
            (e.encode_ns, e.wire_bytes) = (ns, wire);
        } else {
            e.encode_ns += ALPHA * (ns - e.encode_ns);
            e.wire_bytes += ALPHA * (wire - e.wire_bytes);
        }
        e.seen = Some(self.epochs);
    }

    /// The link rate measured so far, in bytes per second.
    pub fn link_bytes_per_s(&self) -> Option<f64> {
        self.link.map(|r| r * 1e6)
    }
}

/// The compressor's name as reports spell it.
pub fn name(c: Compressor) -> &'static str {
    match c {
        Compressor::None => "none",
        Compressor::Lz4 => "lz4",
        Compressor::Zstd(_) => "zstd",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(c: Compressor, ns_per_page: u64, wire_per_page: u64, link_mb_s: u64) -> Observed {
        let pages = 10_000;
        let wire = wire_per_page * pages;
        Observed {
            compressor: c,
            pages,
            encode_us: ns_per_page * pages / 1000,
            wire_bytes: wire,
            // bytes / (MB/s) = µs
            send_us: wire / link_mb_s,
        }
    }

    /// Runs `n` epochs where each candidate costs what `world` says.
    fn run(
        ch: &mut CodecChoice,
        n: usize,
        world: impl Fn(Compressor) -> Observed,
    ) -> Vec<Compressor> {
        (0..n)
            .map(|_| {
                let c = ch.choose();
                ch.observe(&world(c));
                c
            })
            .collect()
    }

    #[test]
    fn cpu_bound_with_link_room_sends_raw() {
        // lz4 5 µs/page halving the bytes; raw 1 µs/page; a 3 GB/s link.
        let mut ch = CodecChoice::new(&[Compressor::Lz4, Compressor::None], 2);
        let got = run(&mut ch, 120, |c| match c {
            Compressor::None => obs(c, 1000, 4100, 3000),
            _ => obs(c, 5000, 2000, 3000),
        });
        let raw = got[10..].iter().filter(|&&c| c == Compressor::None).count();
        assert!(raw >= 105, "raw in {raw} of 110 epochs");
        assert!(got[10..].contains(&Compressor::Lz4), "lz4 is still probed");
    }

    #[test]
    fn link_bound_compresses() {
        // A 100 MB/s link: 4 KiB raw pages take 41 µs each, lz4 20 µs.
        let mut ch = CodecChoice::new(&[Compressor::Lz4, Compressor::None], 2);
        let got = run(&mut ch, 120, |c| match c {
            Compressor::None => obs(c, 1000, 4100, 100),
            _ => obs(c, 5000, 2000, 100),
        });
        let lz4 = got[10..].iter().filter(|&&c| c == Compressor::Lz4).count();
        assert!(lz4 >= 105, "lz4 in {lz4} of 110 epochs");
    }

    #[test]
    fn near_ties_keep_the_first_candidate() {
        let mut ch = CodecChoice::new(&[Compressor::Lz4, Compressor::None], 1);
        let got = run(&mut ch, 50, |c| match c {
            Compressor::None => obs(c, 900, 40, 3000),
            _ => obs(c, 1000, 40, 3000),
        });
        // Only probes (one per PROBE epochs) leave the first candidate.
        let raw = got[5..].iter().filter(|&&c| c == Compressor::None).count();
        assert!(raw <= 2, "raw in {raw} of 45 epochs at a 10% difference");
    }

    #[test]
    fn a_single_candidate_is_fixed() {
        let mut ch = CodecChoice::new(&[Compressor::Zstd(3)], 4);
        assert!(!ch.adaptive());
        for _ in 0..100 {
            assert_eq!(ch.choose(), Compressor::Zstd(3));
        }
    }
}
