//! Whole-domain tests: lifecycle, determinism against `expected_after`,
//! dirty tracking under real workload threads, pacing.

use std::time::{Duration, Instant};

use super::control::{Field, Slot};
use super::workload;
use super::*;
use crate::PAGE_SIZE;

/// Opens the domain, or explains why this machine cannot and returns None.
fn open_or_skip(kv: &str) -> Option<SimDomain> {
    let spec = SimSpec::parse(kv).unwrap();
    match SimDomain::new(&spec) {
        Ok(d) => Some(d),
        Err(DomainError::DirtyTracking(why)) => {
            eprintln!("skipping: kernel dirty tracking unavailable here: {why}");
            None
        }
        Err(e) => panic!("{kv}: {e}"),
    }
}

fn snapshot(mem: &GuestMemory) -> Vec<u8> {
    // SAFETY: callers hold the domain paused (or never started).
    unsafe { mem.as_slice().to_vec() }
}

fn total_writes(d: &SimDomain) -> u64 {
    (0..d.spec.threads as usize)
        .map(|t| Slot::of(&d.mem, t).get(Field::Writes))
        .sum()
}

#[test]
fn threaded_epochs_equal_expected_after() {
    const EPOCHS: u64 = 4;
    for kind in WorkloadKind::ALL {
        for threads in [1, 2] {
            let kv = format!("mem=2MiB,workload={kind},writes=997,threads={threads},seed=5");
            let Some(mut d) = open_or_skip(&kv) else {
                return;
            };
            d.start().unwrap();
            for epoch in 1..=EPOCHS {
                d.pause().unwrap();
                let (want_mem, want_state) = expected_after(&d.spec, epoch).unwrap();
                let mut state = Vec::new();
                d.save_state(&mut state).unwrap();
                assert_eq!(state, want_state, "{kv} epoch {epoch}");
                assert!(
                    snapshot(&d.mem) == snapshot(&want_mem),
                    "{kv}: memory differs from expected_after after epoch {epoch}"
                );
                assert_eq!(total_writes(&d), 997 * epoch, "{kv}");
                d.resume().unwrap();
            }
        }
    }
}

#[test]
fn harvest_covers_every_changed_page() {
    let Some(mut d) = open_or_skip("mem=4MiB,workload=mixed,writes=400,threads=2") else {
        return;
    };
    let mut dirty = Vec::new();
    d.harvest_dirty(&mut dirty).unwrap();
    assert!(dirty.is_empty(), "nothing ran yet, harvested {dirty:?}");
    let mut before = snapshot(&d.mem);
    d.start().unwrap();
    for _ in 0..3 {
        d.pause().unwrap();
        dirty.clear();
        d.harvest_dirty(&mut dirty).unwrap();
        assert!(
            dirty.windows(2).all(|w| w[0] < w[1]),
            "not sorted and unique"
        );
        let after = snapshot(&d.mem);
        let changed: Vec<u64> = (0..d.layout().pages)
            .filter(|&g| {
                let r = g as usize * PAGE_SIZE..(g as usize + 1) * PAGE_SIZE;
                before[r.clone()] != after[r]
            })
            .collect();
        assert!(
            changed.iter().all(|g| dirty.binary_search(g).is_ok()),
            "missed a page"
        );
        assert_eq!(dirty[0], 0, "the control block changes every epoch");
        // Pages rewritten with equal bytes may be dirty yet unchanged, but a
        // mixed workload of 400 writes changes most of what it touches.
        assert!(
            changed.len() * 2 > dirty.len(),
            "{} changed, {} dirty",
            changed.len(),
            dirty.len()
        );
        before = after;
        d.resume().unwrap();
    }
}

/// The workload threads run at the process's priority (not the boost of
/// the thread that started them), are raised while a pause waits for them
/// (into the real-time class where the process may: root here and in CI;
/// else by nice steps), and are back in the normal class at the process's
/// priority once they run again.
#[test]
fn workload_threads_are_boosted_only_to_reach_a_pause() {
    let Some(mut d) = open_or_skip("mem=8MiB,workload=uniform,rate=0,threads=2") else {
        return;
    };
    let base = crate::domain::priority::process_nice();
    let normal = (libc::SCHED_OTHER, base);
    std::thread::scope(|s| {
        s.spawn(|| {
            crate::engine::copy::raise_priority();
            d.start().unwrap();
        });
    });
    let w = |d: &SimDomain| d.workers.as_ref().unwrap().scheduling();
    while w(&d).len() < 2 {
        std::thread::yield_now();
    }
    assert_eq!(w(&d), [normal, normal], "started by a boosted thread");
    d.pause().unwrap();
    let boosted = (base - crate::domain::priority::PAUSE_BOOST).max(-20);
    if crate::domain::priority::realtime_allowed() {
        let rt = w(&d);
        assert!(
            rt.iter().all(|&(p, _)| p == libc::SCHED_FIFO),
            "asked to stop: {rt:?}"
        );
    } else if crate::domain::priority::raising_allowed() {
        let b = (libc::SCHED_OTHER, boosted);
        assert_eq!(w(&d), [b, b], "asked to stop");
    } else {
        eprintln!("skipping the boost check: this process may not raise a thread");
    }
    let writes = |d: &SimDomain, t: usize| Slot::of(&d.mem, t).get(Field::Writes);
    let before = [writes(&d, 0), writes(&d, 1)];
    d.resume().unwrap();
    // Each thread wrote since: it left the pause's wait, and so put itself back.
    while writes(&d, 0) == before[0] || writes(&d, 1) == before[1] {
        std::thread::yield_now();
    }
    assert_eq!(w(&d), [normal, normal], "running again");
}

#[test]
fn timed_pause_stops_all_writes() {
    let Some(mut d) = open_or_skip("mem=8MiB,workload=uniform,rate=0,threads=2") else {
        return;
    };
    d.start().unwrap();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(5));
        d.pause().unwrap();
        let mut dirty = Vec::new();
        d.harvest_dirty(&mut dirty).unwrap();
        assert!(!dirty.is_empty());
        let frozen = snapshot(&d.mem);
        std::thread::sleep(Duration::from_millis(10));
        dirty.clear();
        d.harvest_dirty(&mut dirty).unwrap();
        assert!(dirty.is_empty(), "written while paused: {dirty:?}");
        assert!(snapshot(&d.mem) == frozen);
        d.resume().unwrap();
    }
    let mut state = Vec::new();
    d.pause().unwrap();
    d.save_state(&mut state).unwrap();
    assert_eq!(decode_state(&state).unwrap(), (6, d.spec.clone()));
}

#[test]
fn lifecycle_edges() {
    let Some(mut d) = open_or_skip("mem=1MiB,writes=10") else {
        return;
    };
    d.pause().unwrap(); // before start: already paused
    d.resume().unwrap(); // before start: starts epoch 1
    assert_eq!(d.epoch(), 1);
    assert!(d.start().is_err());
    d.resume().unwrap(); // running: nothing
    d.pause().unwrap();
    d.pause().unwrap();
    assert_eq!(d.epoch(), 1);
    assert_eq!(total_writes(&d), 10);
    assert_eq!(d.describe(), format!("sim:{}", d.spec));
}

#[test]
fn drop_while_running_joins_threads() {
    for kv in [
        "mem=1MiB,rate=0,threads=3",
        "mem=1MiB,writes=100000000,threads=2",
    ] {
        let Some(mut d) = open_or_skip(kv) else {
            return;
        };
        d.start().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let t0 = Instant::now();
        drop(d);
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "{kv}: drop took {:?}",
            t0.elapsed()
        );
    }
}

#[test]
fn expected_after_needs_deterministic_mode() {
    let spec = SimSpec::parse("mem=1MiB,rate=10").unwrap();
    assert!(matches!(
        expected_after(&spec, 1),
        Err(DomainError::Spec { .. })
    ));
    let det = SimSpec::parse("mem=1MiB,writes=10").unwrap();
    let (m0, s0) = expected_after(&det, 0).unwrap();
    let (m1, _) = expected_after(&det, 1).unwrap();
    assert_eq!(decode_state(&s0).unwrap(), (0, det));
    assert!(snapshot(&m0) != snapshot(&m1));
}

#[test]
fn decode_state_rejects_garbage() {
    assert!(decode_state(b"").is_err());
    assert!(decode_state(b"SIMST001\0\0\0\0\0\0\0\0\xff\0\0\0mem=1MiB").is_err());
    assert!(decode_state(b"XXXXXXXX\0\0\0\0\0\0\0\0\0\0\0\0").is_err());
}

#[test]
fn timed_rate_is_paced() {
    let Some(mut d) = open_or_skip("mem=8MiB,workload=edits,rate=20000,threads=2") else {
        return;
    };
    d.start().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    d.pause().unwrap();
    let n = total_writes(&d);
    // 6000 expected. The upper bound is the pacing; a loaded machine
    // starves the writers (stalls are not banked), so the lower bound only
    // checks they ran.
    assert!(
        (1_500..=7_500).contains(&n),
        "{n} writes in 300 ms at 20000/s"
    );
}

/// CPU time consumed by the calling thread (user + system, so page faults
/// taken by its writes count).
fn thread_cpu_time() -> Duration {
    crate::metrics::thread_cpu_time().expect("clock_gettime(CLOCK_THREAD_CPUTIME_ID)")
}

/// Achievable write rate of one workload thread, per workload, measured in
/// the thread's own CPU time so that other load on the machine does not
/// distort it. "steady": pages already writable (no faults); "tracked":
/// a harvest after every 10 000 writes, so each epoch's first write to a
/// page takes a write-protect fault, as in real use. Figures with
/// `cargo test --release write_rate -- --nocapture`.
#[test]
fn write_rate_per_thread() {
    const EPOCH: u64 = 10_000;
    for kind in WorkloadKind::ALL {
        let kv = format!("mem=256MiB,workload={kind},rate=0,threads=1,fill=0.25");
        let Some(mut d) = open_or_skip(&kv) else {
            return;
        };
        // Never started: this thread is the only writer, through the same
        // step function the workload threads run.
        let (plan, tp) = (d.plan.clone(), d.plan.threads[0]);
        let mut scratch = workload::Scratch::default();
        let mut dirty = Vec::new();
        let mut run = |d: &mut SimDomain, harvest: bool| {
            // Only the writes are timed: harvest time is the engine's.
            let mut busy = Duration::ZERO;
            for _ in 0..20 {
                let t0 = thread_cpu_time();
                for _ in 0..EPOCH {
                    workload::step(&d.mem, &plan, &tp, &mut scratch);
                }
                busy += thread_cpu_time() - t0;
                if harvest {
                    dirty.clear();
                    d.harvest_dirty(&mut dirty).unwrap();
                }
            }
            (20 * EPOCH) as f64 / busy.as_secs_f64()
        };
        run(&mut d, false); // warm up: fault in never-touched pages
        let steady = run(&mut d, false);
        let tracked = run(&mut d, true);
        eprintln!(
            "{kind:>14}: {steady:>10.0} writes/s per thread steady, {tracked:>9.0} tracked \
             ({} dirty pages per {EPOCH}-write epoch)",
            dirty.len()
        );
        assert!(steady > 1000.0 && tracked > 1000.0);
    }
}

#[test]
fn the_disk_workload_follows_its_replay_and_survives_restore() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sim.img");
    let kv = format!(
        "mem=1MiB,writes=50,seed=9,disk={},disk_size=256KiB,disk_writes=7",
        path.display()
    );
    let Some(mut d) = open_or_skip(&kv) else {
        return;
    };
    let spec = d.spec.clone();
    assert_eq!(
        SimSpec::parse(&spec.to_string()).unwrap(),
        spec,
        "canonical form round-trips"
    );
    assert_eq!(d.disks().len(), 1);
    d.start().unwrap();
    for epoch in 1..=3 {
        d.pause().unwrap();
        let want = disk::expected_disk(9, 256 << 10, 7, epoch);
        assert!(
            std::fs::read(&path).unwrap() == want,
            "disk after epoch {epoch}"
        );
        d.resume().unwrap();
    }
    d.pause().unwrap();
    let mut state = Vec::new();
    d.save_state(&mut state).unwrap();
    let mem = GuestMemory::new(spec.mem as usize).unwrap();
    let mut page = [0u8; PAGE_SIZE];
    for gfn in 0..mem.pages() {
        d.mem.read_page(gfn, &mut page);
        mem.write_page(gfn, &page);
    }
    drop(d);
    // Restored from epoch 4 on a disk copied elsewhere: epoch 5 continues it.
    let moved = dir.path().join("moved.img");
    std::fs::copy(&path, &moved).unwrap();
    let mut spec2 = spec.clone();
    spec2.disk.as_mut().unwrap().path = moved.display().to_string();
    let mut r = SimDomain::restore(&spec2, mem, &state).unwrap();
    r.start().unwrap();
    r.pause().unwrap();
    assert!(std::fs::read(&moved).unwrap() == disk::expected_disk(9, 256 << 10, 7, 5));
    assert!(
        std::fs::read(&path).unwrap() == disk::expected_disk(9, 256 << 10, 7, 4),
        "the original disk is left alone"
    );
}

#[test]
fn disk_keys_are_checked() {
    for (kv, what) in [
        ("disk_writes=3", "need disk=PATH"),
        ("disk=", "path of a disk image"),
        ("disk=/x,disk_size=100", "multiple of 4096"),
        ("disk=/x,disk_writes=-1", "disk writes per epoch"),
    ] {
        let e = SimSpec::parse(kv).unwrap_err().to_string();
        assert!(e.contains(what), "{kv}: {e}");
    }
}

/// A hold (throttle 100) stops the writers outright, a pause still
/// returns at once while they nap, and lowering the throttle lets them
/// write again; `page_writes` counts what they wrote.
#[test]
fn a_hold_stands_the_guest_still_and_pauses_stay_prompt() {
    let Some(mut d) = open_or_skip("mem=8MiB,workload=uniform,rate=0,threads=2") else {
        return;
    };
    d.start().unwrap();
    let until = |d: &SimDomain, n: u64| {
        let t = Instant::now();
        while d.page_writes().unwrap() < n {
            assert!(t.elapsed() < Duration::from_secs(10), "writers stuck");
            std::thread::yield_now();
        }
    };
    until(&d, 1000);
    assert!(d.throttle(100));
    // The hold is seen within a nap and a flush; after that nothing moves.
    std::thread::sleep(Duration::from_millis(20));
    let held = d.page_writes().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(d.page_writes().unwrap(), held, "writes while held");
    // Napping threads count as stopped: the pause does not wait for them
    // to wake (each nap is 1 ms; allow a loaded host's wake-up delays).
    let t = Instant::now();
    d.pause().unwrap();
    let took = t.elapsed();
    assert!(took < Duration::from_millis(500), "pause took {took:?}");
    d.resume().unwrap();
    assert!(d.throttle(0));
    until(&d, held + 1000);
    d.pause().unwrap();
}
