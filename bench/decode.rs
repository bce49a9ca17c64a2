//! The backup's decode cost: a stream of checkpoints fed to the receiver
//! decoding on one lane (the receiving thread alone, as before the pool)
//! and on a pool of lanes, side by side in one run (receivers alternate
//! epoch by epoch, so machine noise hits both alike). Prints, per page
//! mix, the backup's CPU per epoch (the whole process: receiving thread
//! and lanes) and its ceiling in pages/s. Two ceilings: over the wall time
//! the receiver took (what this loaded machine gave), and over the CPU time
//! of its busiest thread (the receiving thread or one lane: what a backup
//! whose threads each had a core could commit; on an idle host with enough
//! cores the two agree).
//!
//! Records come from memory, unauthenticated: what is measured is checking
//! entries, decoding, staging and commit, not the socket or the MAC.
//!
//! `cargo bench --bench decode`. Environment: `CASTOR_DECODE_POOLS=2,4`
//! (lanes of the pools), `CASTOR_DECODE_PAGES=8192` (pages per epoch),
//! `CASTOR_DECODE_EPOCHS=12` (epochs per receiver and mix).

use std::time::{Duration, Instant};

use castor::codec::{Compressor, Encoder};
use castor::engine::receiver::Receiver;
use castor::transport::messages::{EpochBegin, EpochClass, EpochEnd, PagesWriter};
use castor::transport::record::{add_checksums, write_record, RecordKind, RecordReader};
use castor::PAGE_SIZE;

#[path = "pages.rs"]
mod pages;
use pages::{text_page, Page, Rng};

/// Guest size: 1 GiB, as in the table.
const GUEST_PAGES: u64 = 1 << 18;

fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|v| {
            v.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}: {v:?} is not a number"))
        })
        .collect()
}

/// CPU time of the calling thread so far.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, ours.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time so far of every decode lane of the process, by thread id
/// (`/proc/self/task/*/schedstat`, nanoseconds).
fn lane_cpu() -> Vec<(u64, Duration)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("castor-dec-") {
            continue;
        }
        let ns = std::fs::read_to_string(t.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        let tid = t.file_name().to_string_lossy().parse().unwrap_or(0);
        out.push((tid, Duration::from_nanos(ns)));
    }
    out
}

/// CPU time of the whole process so far.
fn process_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, ours.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// One checkpoint's bytes: `pages` distinct gfns spread over the guest,
/// each page's new image encoded against its old one.
fn checkpoint(epoch: u64, gfns: &[u64], new: &[Page], old: &[Page], c: Compressor) -> Vec<u8> {
    let mut v = Vec::new();
    let begin = EpochBegin {
        class: EpochClass::Checkpoint,
        dirty: gfns.len() as u64,
    };
    write_record(&mut v, RecordKind::EpochBegin, epoch, &begin.encode());
    let mut w = PagesWriter::new(epoch);
    let mut enc = Encoder::new(c);
    for (i, &g) in gfns.iter().enumerate() {
        w.push(&mut v, g, |o| {
            Some(enc.encode(&new[i], Some(&old[i]), o) as u8)
        });
    }
    w.close(&mut v);
    write_record(&mut v, RecordKind::State, epoch, b"st");
    let end = EpochEnd {
        page_entries: w.entries,
        pages_records: w.records,
        state_len: 2,
        disk_records: 0,
    };
    write_record(&mut v, RecordKind::EpochEnd, epoch, &end.encode());
    // Read without a session key: the Pages records need their CRC.
    add_checksums(&mut v);
    v
}

/// A mix: its name and the (old, new) image of each page of an epoch.
fn mixes(n: usize) -> Vec<(&'static str, Compressor, Vec<Page>, Vec<Page>)> {
    let mut rng = Rng(0x5851_F42D_4C95_7F2D);
    let old: Vec<Page> = (0..n).map(|_| text_page(&mut rng)).collect();
    let random: Vec<Page> = (0..n)
        .map(|_| {
            let mut p = [0u8; PAGE_SIZE];
            p.iter_mut().for_each(|b| *b = rng.next() as u8);
            p
        })
        .collect();
    let text: Vec<Page> = (0..n).map(|_| text_page(&mut rng)).collect();
    let mut edits = old.clone();
    for p in &mut edits {
        let off = rng.below(PAGE_SIZE - 16);
        p[off..off + 16].fill(rng.next() as u8);
    }
    vec![
        (
            "whole pages, raw (none)",
            Compressor::None,
            old.clone(),
            random,
        ),
        ("whole text pages, lz4", Compressor::Lz4, old.clone(), text),
        ("small edits (deltas)", Compressor::Lz4, old, edits),
    ]
}

fn main() {
    let pools = env_list("CASTOR_DECODE_POOLS", "2,4");
    let n = env_list("CASTOR_DECODE_PAGES", "8192")[0];
    let epochs = env_list("CASTOR_DECODE_EPOCHS", "12")[0];
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "decode bench: 1 GiB guest, {n} pages per epoch, {epochs} epochs per receiver, \
         {} cores, loadavg {}",
        std::thread::available_parallelism().map_or(1, |c| c.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut lanes = vec![1];
    lanes.extend(pools);
    println!(
        "| mix | lanes | CPU per epoch | wall per epoch | busiest thread per epoch | \
         ceiling by wall (pages/s) | ceiling by busiest thread (pages/s) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut rng = Rng(7);
    for (name, c, old, new) in mixes(n) {
        // Each epoch rewrites `n` distinct pages, spread over every stripe.
        let streams: Vec<Vec<u8>> = (1..=epochs as u64)
            .map(|e| {
                let mut gfns: Vec<u64> = (0..n)
                    .map(|_| rng.below(GUEST_PAGES as usize) as u64)
                    .collect();
                gfns.sort_unstable();
                gfns.dedup();
                checkpoint(e, &gfns, &new[..gfns.len()], &old[..gfns.len()], c)
            })
            .collect();
        let mut rxs: Vec<Receiver> = lanes
            .iter()
            .map(|&l| Receiver::new(GUEST_PAGES).unwrap().with_decoders(l, &[]))
            .collect();
        // The replicas start from `old` nowhere: deltas apply to zero pages,
        // which costs the same. Epoch 0 (the seed) is empty.
        let mut seed = Vec::new();
        let b = EpochBegin {
            class: EpochClass::Seed,
            dirty: 0,
        };
        write_record(&mut seed, RecordKind::EpochBegin, 0, &b.encode());
        write_record(
            &mut seed,
            RecordKind::EpochEnd,
            0,
            &EpochEnd::default().encode(),
        );
        let mut cost = vec![Cost::default(); rxs.len()];
        let mut pages = 0u64;
        for rx in rxs.iter_mut() {
            feed(rx, &seed, &mut Cost::default());
        }
        for s in &streams {
            pages += count_pages(s);
            for (i, rx) in rxs.iter_mut().enumerate() {
                feed(rx, s, &mut cost[i]);
            }
        }
        for (c, l) in cost.iter().zip(&lanes) {
            let e = epochs as u32;
            println!(
                "| {name} | {l} | {:.2?} | {:.2?} | {:.2?} | {:.0} | {:.0} |",
                c.cpu / e,
                c.wall / e,
                c.busiest / e,
                pages as f64 / c.wall.as_secs_f64(),
                pages as f64 / c.busiest.as_secs_f64()
            );
        }
    }
}

/// Page entries in one epoch's stream.
fn count_pages(s: &[u8]) -> u64 {
    let mut r = RecordReader::new(s);
    let mut n = 0;
    while let Ok(rec) = r.next() {
        if rec.kind == RecordKind::EpochEnd {
            n = EpochEnd::decode(rec.payload).map_or(0, |e| e.page_entries);
        }
    }
    n
}

/// What feeding a receiver cost: process CPU, wall time, and the CPU of
/// its busiest thread, summed over epochs.
#[derive(Default, Clone, Copy)]
struct Cost {
    cpu: Duration,
    wall: Duration,
    busiest: Duration,
}

/// Feeds one epoch to `rx`, adding what it cost. Only `rx`'s lanes run
/// meanwhile (every other receiver is between epochs).
fn feed(rx: &mut Receiver, s: &[u8], cost: &mut Cost) {
    let lanes0 = lane_cpu();
    let (c0, me0, t0) = (process_cpu(), thread_cpu(), Instant::now());
    let mut r = RecordReader::new(s);
    while let Ok(rec) = r.next() {
        rx.on_record(rec).expect("a valid stream");
    }
    cost.wall += t0.elapsed();
    cost.cpu += process_cpu() - c0;
    let me = thread_cpu() - me0;
    let lane = lane_cpu()
        .into_iter()
        .map(|(tid, t)| {
            let before = lanes0
                .iter()
                .find(|(id, _)| *id == tid)
                .map_or(Duration::ZERO, |x| x.1);
            t.saturating_sub(before)
        })
        .max()
        .unwrap_or(Duration::ZERO);
    cost.busiest += me.max(lane);
}
