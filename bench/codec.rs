//! Codec micro-benchmark: castor's page encoder (lz4 and zstd-1 variants)
//! against plain zstd level 1 and plain lz4 on each full page, over page sets
//! that model what a replication epoch sends.
//!
//! Prints the wire ratio (encoded bytes / raw bytes) of every method on every
//! set first, then runs criterion groups reporting GB/s of input page bytes.
//! `cargo bench --bench codec` takes about a minute and a half on 2 cores.

use std::hint::black_box;
use std::time::Duration;

use castor::codec::{Compressor, Encoder, PageKind};
use castor::PAGE_SIZE;
use criterion::{Criterion, Throughput};

#[path = "pages.rs"]
mod pages;
use pages::{text_page, Page, Rng};

const PAGES: usize = 2048;

fn random_page(rng: &mut Rng) -> Page {
    let mut p = [0u8; PAGE_SIZE];
    for c in p.chunks_exact_mut(8) {
        c.copy_from_slice(&rng.next().to_le_bytes());
    }
    p
}

/// A page set: (new page, the receiver's previous copy) pairs.
struct Set {
    name: &'static str,
    pages: Vec<(Box<Page>, Box<Page>)>,
}

fn page_sets() -> Vec<Set> {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut small = Vec::with_capacity(PAGES);
    let mut text = Vec::with_capacity(PAGES);
    let mut random = Vec::with_capacity(PAGES);
    let mut zero = Vec::with_capacity(PAGES);
    for _ in 0..PAGES {
        // Small edits: 16..=64 bytes changed in 1..=4 places (counters,
        // pointers, a short string), at random offsets.
        let prev = Box::new(text_page(&mut rng));
        let mut page = prev.clone();
        let total = 16 + rng.below(49);
        let pieces = 1 + rng.below(4);
        for k in 0..pieces {
            let len = total / pieces + usize::from(k < total % pieces);
            let off = rng.below(PAGE_SIZE - len);
            for b in &mut page[off..off + len] {
                *b = rng.next() as u8;
            }
        }
        small.push((page, prev));
        // Rewritten with new text: delta does not help, compression does.
        text.push((Box::new(text_page(&mut rng)), Box::new(text_page(&mut rng))));
        // Incompressible (encrypted / compressed data).
        random.push((
            Box::new(random_page(&mut rng)),
            Box::new(random_page(&mut rng)),
        ));
        // Freed and zeroed pages.
        zero.push((Box::new([0; PAGE_SIZE]), Box::new(text_page(&mut rng))));
    }
    vec![
        Set {
            name: "small-edits",
            pages: small,
        },
        Set {
            name: "text-rewrite",
            pages: text,
        },
        Set {
            name: "random",
            pages: random,
        },
        Set {
            name: "zero",
            pages: zero,
        },
    ]
}

/// One way to put a page on the wire; returns payload bytes.
enum Method {
    Castor(Encoder),
    Zstd1(zstd::bulk::Compressor<'static>, Vec<u8>),
    Lz4(Vec<u8>),
}

impl Method {
    fn all() -> Vec<(&'static str, Method)> {
        vec![
            ("castor-lz4", Method::Castor(Encoder::new(Compressor::Lz4))),
            (
                "castor-zstd1",
                Method::Castor(Encoder::new(Compressor::Zstd(1))),
            ),
            (
                "zstd-1",
                Method::Zstd1(
                    zstd::bulk::Compressor::new(1).unwrap(),
                    vec![0; zstd::zstd_safe::compress_bound(PAGE_SIZE)],
                ),
            ),
            (
                "lz4",
                Method::Lz4(vec![0; lz4_flex::block::get_maximum_output_size(PAGE_SIZE)]),
            ),
        ]
    }

    /// Encodes one page; `out` is cleared by the caller between batches.
    fn run(&mut self, page: &Page, prev: &Page, out: &mut Vec<u8>) -> usize {
        match self {
            Method::Castor(enc) => {
                let before = out.len();
                enc.encode(page, Some(prev), out);
                out.len() - before
            }
            Method::Zstd1(z, buf) => z.compress_to_buffer(&page[..], &mut buf[..]).unwrap(),
            Method::Lz4(buf) => lz4_flex::block::compress_into(page, buf).unwrap(),
        }
    }
}

fn kinds_summary(enc: &Encoder) -> String {
    let s = enc.stats();
    PageKind::ALL
        .iter()
        .filter(|k| s.pages[**k as usize] > 0)
        .map(|k| format!("{k:?}:{}", s.pages[*k as usize]))
        .collect::<Vec<_>>()
        .join(" ")
}

fn print_ratios(sets: &[Set]) {
    println!("\nwire ratio = encoded bytes / raw bytes ({PAGES} pages per set)\n");
    print!("{:<14}", "set");
    for (name, _) in Method::all() {
        print!("{name:>14}");
    }
    println!("   castor-zstd1 kinds");
    for set in sets {
        print!("{:<14}", set.name);
        let mut kinds = String::new();
        for (name, mut m) in Method::all() {
            let mut out = Vec::with_capacity(PAGE_SIZE * 2);
            let mut total = 0usize;
            for (page, prev) in &set.pages {
                out.clear();
                total += m.run(page, prev, &mut out);
            }
            print!(
                "{:>14.4}",
                total as f64 / (set.pages.len() * PAGE_SIZE) as f64
            );
            if let (Method::Castor(enc), "castor-zstd1") = (&m, name) {
                kinds = kinds_summary(enc);
            }
        }
        println!("   {kinds}");
    }
    println!();
}

fn bench(c: &mut Criterion, sets: &[Set]) {
    for set in sets {
        let mut g = c.benchmark_group(format!("encode/{}", set.name));
        g.throughput(Throughput::Bytes((set.pages.len() * PAGE_SIZE) as u64));
        for (name, mut m) in Method::all() {
            let mut out = Vec::with_capacity(PAGE_SIZE * 2);
            g.bench_function(name, |b| {
                b.iter(|| {
                    let mut total = 0usize;
                    for (page, prev) in &set.pages {
                        out.clear();
                        total += m.run(black_box(page), black_box(prev), &mut out);
                    }
                    black_box(total)
                })
            });
        }
        g.finish();
    }
}

fn main() {
    let sets = page_sets();
    print_ratios(&sets);
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
        .configure_from_args();
    bench(&mut c, &sets);
    c.final_summary();
}
