//! Encode scaling: castor's page encoder on 1 and 2 pinned workers, each
//! owning an interleaved stripe of the page range as in the primary's
//! pipeline, side by side in one run (runs alternate 1, 2, 1, 2, ... so
//! machine noise hits both alike). Prints input GiB/s per set and the
//! 2-worker speedup, next to single-thread memcpy of the same bytes.
//!
//! `cargo bench --bench scaling` (about 20 s). `CASTOR_SCALING_REPS=N`
//! changes the number of alternating rounds (default 7; the median is
//! reported).

use std::hint::black_box;
use std::time::{Duration, Instant};

use castor::codec::{Compressor, Encoder, PageKind};
use castor::PAGE_SIZE;

#[path = "pages.rs"]
mod pages;
use pages::{text_page, Page, Rng};

/// Pages per set: 64 MiB, far beyond the caches, like a busy epoch's
/// dirty set on a large guest.
const PAGES: usize = 16384;
/// Pages per stripe unit, as the engine interleaves shards.
const STRIPE: usize = 64;

/// (current, previous) page images of one set.
struct Set {
    name: &'static str,
    cur: Vec<Page>,
    prev: Vec<Page>,
}

fn sets() -> Vec<Set> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut small = Set {
        name: "small-edits",
        cur: vec![[0; PAGE_SIZE]; PAGES],
        prev: vec![[0; PAGE_SIZE]; PAGES],
    };
    let mut text = Set {
        name: "text-rewrite",
        cur: vec![[0; PAGE_SIZE]; PAGES],
        prev: vec![[0; PAGE_SIZE]; PAGES],
    };
    let mut random = Set {
        name: "random",
        cur: vec![[0; PAGE_SIZE]; PAGES],
        prev: vec![[0; PAGE_SIZE]; PAGES],
    };
    for i in 0..PAGES {
        small.prev[i] = text_page(&mut rng);
        small.cur[i] = small.prev[i];
        for _ in 0..1 + rng.below(4) {
            let off = rng.below(PAGE_SIZE - 16);
            for b in &mut small.cur[i][off..off + 16] {
                *b = rng.next() as u8;
            }
        }
        text.prev[i] = text_page(&mut rng);
        text.cur[i] = text_page(&mut rng);
        for c in random.cur[i].chunks_exact_mut(8) {
            c.copy_from_slice(&rng.next().to_le_bytes());
        }
        for c in random.prev[i].chunks_exact_mut(8) {
            c.copy_from_slice(&rng.next().to_le_bytes());
        }
    }
    vec![small, text, random]
}

/// Encodes the whole set with `workers` threads pinned to distinct cores;
/// returns the wall time and the encoded bytes.
fn encode_with(
    set: &Set,
    workers: usize,
    cores: &[core_affinity::CoreId],
    comp: Compressor,
) -> (Duration, usize) {
    let t0 = Instant::now();
    let total = std::thread::scope(|s| {
        let hs: Vec<_> = (0..workers)
            .map(|w| {
                let core = cores.get(w % cores.len().max(1)).copied();
                s.spawn(move || {
                    if let Some(c) = core {
                        core_affinity::set_for_current(c);
                    }
                    let mut enc = Encoder::new(comp);
                    let mut out = Vec::with_capacity(PAGES / workers * PAGE_SIZE / 4);
                    let mut unit = w;
                    while unit * STRIPE < PAGES {
                        for i in unit * STRIPE..((unit + 1) * STRIPE).min(PAGES) {
                            enc.encode(&set.cur[i], Some(&set.prev[i]), &mut out);
                        }
                        unit += workers;
                    }
                    black_box(&out);
                    out.len()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum::<usize>()
    });
    (t0.elapsed(), total)
}

fn memcpy_time(set: &Set) -> Duration {
    // Non-zero fill: the destination is faulted in before the clock starts
    // (a zeroed vec would be mapped lazily and the copy would time page faults).
    let mut dst = vec![[1u8; PAGE_SIZE]; PAGES];
    let t0 = Instant::now();
    dst.copy_from_slice(&set.cur);
    black_box(&dst);
    t0.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn gib_s(d: Duration) -> f64 {
    (PAGES * PAGE_SIZE) as f64 / d.as_secs_f64() / (1u64 << 30) as f64
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing
    // useful either: any argument list runs the same measurement.
    let reps: usize = std::env::var("CASTOR_SCALING_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    println!(
        "encode scaling: {PAGES} pages (64 MiB) per set, lz4 encoder, stripes of {STRIPE} pages, \
         {} cores visible, median of {reps} alternating rounds",
        cores.len()
    );
    println!(
        "{:<14} {:>12} {:>12} {:>9} {:>14} {:>8}",
        "set", "1 worker", "2 workers", "speedup", "memcpy 1 thr", "ratio"
    );
    for set in sets() {
        let (mut one, mut two, mut cp) = (Vec::new(), Vec::new(), Vec::new());
        let mut ratio = 0.0;
        // Warm-up: page the sets in, settle frequency.
        encode_with(&set, 2, &cores, Compressor::Lz4);
        for _ in 0..reps {
            let (d1, b1) = encode_with(&set, 1, &cores, Compressor::Lz4);
            let (d2, b2) = encode_with(&set, 2, &cores, Compressor::Lz4);
            assert_eq!(b1, b2, "1 and 2 workers must encode the same bytes");
            ratio = b1 as f64 / (PAGES * PAGE_SIZE) as f64;
            one.push(d1);
            two.push(d2);
            cp.push(memcpy_time(&set));
        }
        let (m1, m2, mc) = (median(one), median(two), median(cp));
        println!(
            "{:<14} {:>8.2} GiB/s {:>6.2} GiB/s {:>8.2}x {:>9.2} GiB/s {:>8.4}",
            set.name,
            gib_s(m1),
            gib_s(m2),
            m1.as_secs_f64() / m2.as_secs_f64(),
            gib_s(mc),
            ratio
        );
    }
    raw_cost(&cores, reps);
}

/// Per-page cost of the raw path (compress none), one thread, next to a
/// 4 KiB memcpy in the same rounds. "encode" is the codec alone; "encoder
/// step" is what `castor-enc-N` does per page: encode into a reused (warm)
/// output buffer, then bring the shadow up to date (the copy the next
/// epoch's deltas are taken against). Each round starts from a fresh
/// shadow, copied outside the clock.
fn raw_cost(cores: &[core_affinity::CoreId], reps: usize) {
    println!("raw path (compress none), 1 worker, per page, median of {reps}:");
    println!(
        "{:<14} {:>10} {:>14} {:>12} {:>8} {:>8}",
        "set", "encode", "encoder step", "memcpy", "ratio", "step/cp"
    );
    if let Some(&c) = cores.first() {
        core_affinity::set_for_current(c);
    }
    let mut out = vec![1u8; PAGES * (PAGE_SIZE + 16)];
    for set in sets() {
        let (mut enc, mut step, mut cp) = (Vec::new(), Vec::new(), Vec::new());
        let mut shadow = set.prev.clone();
        for round in 0..=reps {
            shadow.copy_from_slice(&set.prev);
            enc.push(encode_raw(&set, &mut shadow, &mut out, false));
            step.push(encode_raw(&set, &mut shadow, &mut out, true));
            cp.push(memcpy_time(&set));
            if round == 0 {
                // Warm-up round: page in, settle frequency.
                enc.clear();
                step.clear();
                cp.clear();
            }
        }
        let per_page = |d: Duration| d.as_nanos() as f64 / PAGES as f64;
        let (e, st, c) = (median(enc), median(step), median(cp));
        println!(
            "{:<14} {:>7.0} ns {:>11.0} ns {:>9.0} ns {:>7.1}x {:>7.1}x",
            set.name,
            per_page(e),
            per_page(st),
            per_page(c),
            e.as_secs_f64() / c.as_secs_f64(),
            st.as_secs_f64() / c.as_secs_f64()
        );
    }
}

/// Encodes every page of `set` against `shadow` into `out` (cleared, its
/// capacity kept); with `update`, copies each page that did not encode as
/// unchanged into `shadow`, as the engine does. Returns the time taken.
fn encode_raw(set: &Set, shadow: &mut [Page], out: &mut Vec<u8>, update: bool) -> Duration {
    let mut enc = Encoder::new(Compressor::None);
    out.clear();
    let t0 = Instant::now();
    for (cur, prev) in set.cur.iter().zip(shadow.iter_mut()) {
        let kind = enc.encode(cur, Some(prev), out);
        if update && kind != PageKind::Unchanged {
            prev.copy_from_slice(cur);
        }
    }
    black_box(&out);
    t0.elapsed()
}
