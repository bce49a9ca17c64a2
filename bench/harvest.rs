//! Harvest time against guest size: the dirty log of a sim guest scanned by
//! one thread (`DirtyTracker::harvest`, what the epoch thread did alone)
//! and by the pause's pool of pinned workers (`CopyPool::harvest`, one
//! stripe each), side by side in one run: methods alternate round by round
//! on the same guest so machine noise hits them alike.
//!
//! `cargo bench --bench harvest` (about a minute). Environment:
//! `CASTOR_HARVEST_GIB=1,4,8,16` (guest sizes), `CASTOR_HARVEST_POOLS=2,4`
//! (pool sizes, counting the caller), `CASTOR_HARVEST_DIRTY=5000` (pages
//! written between harvests), `CASTOR_HARVEST_ROUNDS=9`.
//!
//! Guests are sparse: memory is mapped `MAP_NORESERVE` and only written
//! pages are populated; arming write-protection costs page tables (about
//! 2 MiB per GiB). The figures printed with each size (`VmRSS`, `VmPTE`)
//! show what the guest really took.

use std::time::{Duration, Instant};

use castor::domain::sim::DirtyTracker;
use castor::domain::GuestMemory;
use castor::engine::copy::CopyPool;

fn env_list(name: &str, default: &str) -> Vec<u64> {
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

/// `VmRSS` and `VmPTE` of this process, in MiB.
fn memory_use() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (kib("VmRSS:") / 1024, kib("VmPTE:") / 1024)
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let sizes = env_list("CASTOR_HARVEST_GIB", "1,4,8,16");
    let pools = env_list("CASTOR_HARVEST_POOLS", "2,4");
    let dirty = env_list("CASTOR_HARVEST_DIRTY", "5000")[0];
    let rounds = env_list("CASTOR_HARVEST_ROUNDS", "9")[0] as usize;
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "harvest bench: {} online cores, {dirty} pages written between harvests, \
         {rounds} rounds per method, loadavg {}",
        cores.len(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let pools: Vec<CopyPool> = pools
        .iter()
        .map(|&n| CopyPool::new(n as usize, &cores))
        .collect();
    println!(
        "| guest | one thread (median / min) | {} | RSS / page tables |",
        pools
            .iter()
            .map(|p| format!("pool of {} (median / min, speedup)", p.threads()))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|---|{}---|", "---|".repeat(pools.len()));
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for gib in sizes {
        let pages = gib << 18;
        let mem = GuestMemory::new((gib << 30) as usize).expect("mapping the guest");
        let mut tracker = match DirtyTracker::new(&mem) {
            Ok(t) => t,
            Err(e) => {
                println!("skipping: kernel dirty tracking unavailable here: {e}");
                return;
            }
        };
        let scan = tracker.stripe_scan();
        let mut times: Vec<Vec<Duration>> = vec![Vec::new(); pools.len() + 1];
        let mut out = Vec::with_capacity(2 * dirty as usize);
        for round in 0..rounds * times.len() {
            for _ in 0..dirty {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let g = (state >> 17) % pages;
                // SAFETY: g < pages; a byte inside a page of our own mapping.
                unsafe { mem.page_ptr(g).write_volatile(round as u8) };
            }
            out.clear();
            let m = round % times.len();
            let t0 = Instant::now();
            match m {
                0 => tracker.harvest(&mut out).expect("harvest"),
                k => pools[k - 1].harvest(&scan, &mut out).expect("pool harvest"),
            }
            times[m].push(t0.elapsed());
            assert!(
                out.len() as u64 <= dirty && !out.is_empty(),
                "harvest found {}",
                out.len()
            );
        }
        let single = median(&mut times[0]);
        let cells: Vec<String> = times[1..]
            .iter_mut()
            .map(|t| {
                let m = median(t);
                format!(
                    "{m:.2?} / {:.2?} ({:.2}x)",
                    t[0],
                    single.as_secs_f64() / m.as_secs_f64()
                )
            })
            .collect();
        let (rss, pte) = memory_use();
        println!(
            "| {gib} GiB | {single:.2?} / {:.2?} | {} | {rss} / {pte} MiB |",
            times[0][0],
            cells.join(" | ")
        );
    }
}
