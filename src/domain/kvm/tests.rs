//! Tests of the kvm domain against the real /dev/kvm. Each skips (with a
//! printed reason) when /dev/kvm is missing or cannot run the guest.

use std::time::{Duration, Instant};

use super::*;
use crate::domain::Domain;
use crate::PAGE_SIZE;

/// Serial waits are generous: these hosts emulate the guest slowly and the
/// test binary runs tests in parallel on two cores.
const WAIT: Duration = Duration::from_secs(30);

fn spec(extra: &str) -> KvmSpec {
    KvmSpec::parse(&format!("guest=memtouch,mem=16MiB{extra}")).unwrap()
}

/// A fresh domain, or None (with the reason printed) on a machine without
/// /dev/kvm. Where /dev/kvm exists (CI has it) a domain that cannot be built
/// is a failure, not a skip: skipping would hide a broken VMM.
pub(super) fn open(s: &KvmSpec) -> Option<KvmDomain> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm does not exist");
        return None;
    }
    match KvmDomain::new(s) {
        Ok(d) => Some(d),
        Err(e) => panic!("/dev/kvm exists but the domain {s} cannot be built: {e}"),
    }
}

/// The `seq N ok` numbers in `text`, in order; panics on a FAIL line.
fn seqs(text: &str) -> Vec<u64> {
    for line in text.lines() {
        assert!(!line.starts_with("FAIL"), "guest reported: {line}\n{text}");
    }
    text.lines()
        .filter_map(|l| l.strip_prefix("seq ")?.strip_suffix(" ok")?.parse().ok())
        .collect()
}

fn last_seq(c: &Console) -> u64 {
    seqs(&c.text()).last().copied().unwrap_or(0)
}

/// Waits until the guest printed a seq line above `above`.
fn wait_seq_above(c: &Console, above: u64) -> u64 {
    let t = c
        .wait_for(WAIT, |t| {
            t.contains("FAIL") || seqs_lenient(t).last().is_some_and(|&s| s > above)
        })
        .unwrap_or_else(|| panic!("no seq line above {above} within {WAIT:?}:\n{}", c.text()));
    *seqs(&t).last().expect("a seq line")
}

fn seqs_lenient(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("seq ")?.strip_suffix(" ok")?.parse().ok())
        .collect()
}

fn mem_hash(d: &KvmDomain) -> blake3::Hash {
    // SAFETY: callers hold the domain paused, so nothing writes memory.
    blake3::hash(unsafe { d.memory().as_slice() })
}

#[test]
fn memtouch_boots_and_counts() {
    let Some(mut d) = open(&spec("")) else { return };
    d.start().unwrap();
    wait_seq_above(d.console(), 20);
    d.pause().unwrap();
    let text = d.console().text();
    assert!(text.starts_with("memtouch regions=64"), "{text}");
    let s = seqs(&text);
    assert!(s.len() >= 20, "{text}");
    for (i, w) in s.windows(2).enumerate() {
        assert_eq!(w[1], w[0] + 1, "line {i}: {text}");
    }
    assert_eq!(s[0], 1);
}

/// memtouch's progress is its loop count: one per `seq N ok` line (its
/// banner is the one line that is not a loop).
#[test]
fn memtouch_progress_counts_its_loops() {
    let Some(mut d) = open(&spec("")) else { return };
    assert_eq!(d.progress(), Some(0));
    d.start().unwrap();
    wait_seq_above(d.console(), 10);
    d.pause().unwrap();
    let loops = last_seq(d.console());
    assert_eq!(d.progress(), Some(loops + 1), "{}", d.console().text());
    let counter = KvmSpec::parse("guest=counter,mem=16MiB").unwrap();
    if let Some(c) = open(&counter) {
        assert_eq!(c.progress(), None, "the counter guest has no loop count");
    }
}

/// memtouch's progress mark is stamped at its loop lines with the vCPU's
/// CPU time: it advances with the loops, never counts a loop in progress,
/// and stands still while paused, so a rate between two marks is whole
/// loops against the vCPU's own time (what `guest_speed_ratio` needs on a
/// host where the vCPU's share of a core varies).
#[test]
fn memtouch_progress_mark_carries_the_vcpu_cpu_time() {
    let Some(mut d) = open(&spec("")) else { return };
    d.start().unwrap();
    let s = wait_seq_above(d.console(), 2);
    let a = d.progress_mark().unwrap();
    wait_seq_above(d.console(), s + 4);
    d.pause().unwrap();
    let b = d.progress_mark().unwrap();
    assert_eq!(b.count, d.progress().unwrap(), "the mark is the count");
    assert_eq!(b.count, last_seq(d.console()) + 1, "banner + whole loops");
    let (ca, cb) = (a.cpu.expect("vCPU CPU time"), b.cpu.expect("vCPU CPU time"));
    assert!(b.count > a.count && cb > ca, "{a:?} {b:?}");
    // One thread: its CPU time between the marks fits in their wall time.
    let slack = Duration::from_millis(2);
    assert!(cb - ca <= b.at - a.at + slack, "{a:?} {b:?}");
    let parked = d.vcpu.cpu_time().unwrap();
    std::thread::sleep(Duration::from_millis(30)); // time passing is the point
    assert_eq!(d.progress_mark().unwrap(), b, "no loop ends while paused");
    let idle = d.vcpu.cpu_time().unwrap() - parked;
    assert!(idle < slack, "a parked vCPU used {idle:?} of CPU");
}

/// The vCPU thread's CPU time over `window` (time passing is the point),
/// as a share of it.
fn vcpu_share(d: &KvmDomain, window: Duration) -> f64 {
    let (c0, t0) = (d.vcpu.cpu_time().unwrap(), Instant::now());
    std::thread::sleep(window);
    (d.vcpu.cpu_time().unwrap() - c0).as_secs_f64() / t0.elapsed().as_secs_f64()
}

/// The throttle takes its share of the vCPU whatever the host's load (a
/// nap is a sleep, so a loaded host only lowers the share further): at
/// 75 % the vCPU uses at most about a quarter of the wall time, at 100 %
/// next to none while the guest is not paused. A pause taken while it
/// naps returns, and at 0 the guest counts on.
#[test]
fn the_vcpu_throttle_takes_its_share() {
    let Some(mut d) = open(&spec("")) else { return };
    d.start().unwrap();
    wait_seq_above(d.console(), 2);
    assert!(d.throttle(75), "kvm can be throttled");
    let at75 = vcpu_share(&d, Duration::from_millis(600));
    assert!(
        at75 <= 0.35,
        "throttled to 75 %, the vCPU used {at75:.2} of the time"
    );
    d.throttle(100);
    let at100 = vcpu_share(&d, Duration::from_millis(300));
    assert!(
        at100 <= 0.05,
        "held still, the vCPU used {at100:.2} of the time"
    );
    d.pause().unwrap();
    let held = last_seq(d.console());
    d.throttle(0);
    d.resume().unwrap();
    wait_seq_above(d.console(), held + 3);
}

#[test]
fn domain_spec_parses_kvm() {
    let text =
        "kvm:guest=memtouch,mem=16MiB,regions=64,region_pages=4,touch=8,pattern=random,seed=1,dirty=bitmap";
    let s = crate::domain::DomainSpec::parse(text).unwrap();
    assert_eq!(s.to_string(), text);
    assert_eq!(s.layout().pages, 4096);
}

/// Pages written by the VMM (boot layout) are in the first harvest; every
/// page whose bytes change during an epoch is in that epoch's harvest, also
/// when part of the epoch was harvested while running (pre-copy).
#[test]
fn dirty_log_reports_guest_and_vmm_writes() {
    dirty_log_check(",pattern=sequential");
}

#[test]
fn dirty_ring_reports_guest_and_vmm_writes() {
    dirty_log_check(",pattern=sequential,dirty=ring");
}

fn dirty_log_check(extra: &str) {
    let Some(mut d) = open(&spec(extra)) else {
        return;
    };
    let mut boot = Vec::new();
    d.harvest_dirty(&mut boot).unwrap();
    let image_pages = guests::image("memtouch").unwrap().len().div_ceil(PAGE_SIZE) as u64;
    let mut want = vec![boot::GDT_GPA / 4096, boot::BOOT_PARAMS_GPA / 4096];
    want.extend((0..image_pages).map(|i| boot::IMAGE_GPA / 4096 + i));
    assert_eq!(
        boot, want,
        "boot harvest must be exactly the VMM-written pages"
    );

    let pages = d.memory().pages();
    let snapshot = |d: &KvmDomain| -> Vec<blake3::Hash> {
        (0..pages)
            .map(|g| {
                let mut p = [0u8; PAGE_SIZE];
                d.memory().read_page(g, &mut p);
                blake3::hash(&p)
            })
            .collect()
    };
    let before = snapshot(&d);
    d.start().unwrap();
    wait_seq_above(d.console(), 5);
    // Pre-copy: harvest once while the guest runs.
    let mut dirty = Vec::new();
    d.harvest_dirty(&mut dirty).unwrap();
    wait_seq_above(d.console(), last_seq(d.console()) + 3);
    d.pause().unwrap();
    d.harvest_dirty(&mut dirty).unwrap();
    dirty.sort_unstable();
    dirty.dedup();
    let after = snapshot(&d);
    let changed: Vec<u64> = (0..pages)
        .filter(|&g| before[g as usize] != after[g as usize])
        .collect();
    for g in &changed {
        assert!(
            dirty.binary_search(g).is_ok(),
            "gfn {g:#x} changed but was not reported"
        );
    }
    assert!(
        dirty.contains(&(boot::SUMS_GPA / 4096)),
        "checksum page written"
    );
    assert!(
        dirty.iter().any(|&g| g > boot::DATA_GPA / 4096),
        "a data page written: {dirty:?}"
    );
    // Harvested sets are sorted and unique.
    let mut again = Vec::new();
    d.harvest_dirty(&mut again).unwrap();
    assert!(again.is_empty(), "paused guest dirtied {again:?}");
    eprintln!(
        "dirty log ({:?}): {} pages changed, {} reported",
        d.dirty_mode(),
        changed.len(),
        dirty.len()
    );
}

/// save → restore into a new VM → save gives the same bytes, except the
/// IA32_TSC value, which KVM keeps counting while the vCPU does not run.
#[test]
fn vcpu_state_round_trip() {
    let s = spec("");
    let Some(mut d) = open(&s) else { return };
    d.start().unwrap();
    wait_seq_above(d.console(), 5);
    d.pause().unwrap();
    let mut s1 = Vec::new();
    d.save_state(&mut s1).unwrap();
    // SAFETY: paused.
    let mem = unsafe { d.memory().as_slice() }.to_vec();
    let mut r = KvmDomain::restore(&s, &mem, &s1).unwrap();
    let mut s2 = Vec::new();
    r.save_state(&mut s2).unwrap();
    let a = state::split(&s1).unwrap();
    let b = state::split(&s2).unwrap();
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.tag(), y.tag());
        assert_eq!(x.version, y.version);
        if &x.magic == b"MSRS" {
            continue;
        }
        assert_eq!(x.payload, y.payload, "record {} differs", x.tag());
    }
    let v1 = VcpuState::decode(&a).unwrap();
    let v2 = VcpuState::decode(&b).unwrap();
    assert_eq!(v1.msrs.len(), v2.msrs.len());
    for (&(i1, x1), &(i2, x2)) in v1.msrs.iter().zip(&v2.msrs) {
        assert_eq!(i1, i2);
        if i1 == MSR_IA32_TSC {
            assert!(x2 >= x1, "TSC went back: {x1} -> {x2}");
        } else {
            assert_eq!(x1, x2, "MSR {i1:#x}");
        }
    }
    eprintln!(
        "state: {} bytes, {} MSRs ({:?}), xcrs {}; {}",
        s1.len(),
        v1.msrs.len(),
        v1.msrs
            .iter()
            .map(|m| format!("{:#x}", m.0))
            .collect::<Vec<_>>(),
        v1.xcrs.is_some(),
        describe_state(&s1).unwrap()
    );
    // Every truncation of the state is refused with an error, never a panic.
    for cut in [0, 1, 9, 10, 11, s1.len() / 2, s1.len() - 1] {
        assert!(
            KvmDomain::restore(&s, &mem, &s1[..cut]).is_err(),
            "cut {cut}"
        );
    }
}

#[test]
fn pause_freezes_memory_and_output() {
    let Some(mut d) = open(&spec("")) else { return };
    d.start().unwrap();
    wait_seq_above(d.console(), 3);
    for _ in 0..3 {
        d.pause().unwrap();
        let (h, n) = (mem_hash(&d), d.console().total());
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(h, mem_hash(&d), "memory changed while paused");
        assert_eq!(n, d.console().total(), "serial output while paused");
        let last = last_seq(d.console());
        d.resume().unwrap();
        wait_seq_above(d.console(), last + 2);
    }
    d.pause().unwrap();
    let s = seqs(&d.console().text());
    assert!(s.windows(2).all(|w| w[1] == w[0] + 1));
}

/// Runs a domain, checkpoints it, returns (memory, state, last complete seq
/// before the checkpoint).
fn checkpoint(d: &mut KvmDomain) -> (Vec<u8>, Vec<u8>, u64) {
    d.pause().unwrap();
    let mut st = Vec::new();
    d.save_state(&mut st).unwrap();
    // SAFETY: paused.
    let mem = unsafe { d.memory().as_slice() }.to_vec();
    (mem, st, last_seq(d.console()))
}

/// First complete seq line of a restored guest's console.
fn first_seq(text: &str) -> Option<u64> {
    seqs(text).first().copied()
}

#[test]
fn restore_continues_sequence() {
    let s = spec("");
    let Some(mut d) = open(&s) else { return };
    d.start().unwrap();
    wait_seq_above(d.console(), 10);
    let (mem, st, last) = checkpoint(&mut d);
    // The original keeps going: both copies are independent afterwards.
    d.resume().unwrap();
    let mut r = KvmDomain::restore(&s, &mem, &st).unwrap();
    r.start().unwrap();
    let got = wait_seq_above(r.console(), last + 5);
    let text = r.console().text();
    assert!(
        !text.contains("memtouch regions"),
        "guest rebooted:\n{text}"
    );
    let first = first_seq(&text).unwrap();
    // The checkpoint may have cut a line in half: its rest is the first
    // output, and the next complete line is last + 2.
    assert!(
        first == last + 1 || first == last + 2,
        "last {last}, restored starts at {first}:\n{text}"
    );
    assert!(got > last + 5);
    r.pause().unwrap();
    assert!(!r.halted());
}

/// A replica whose checksum page is stale (older than its data pages) must
/// make memtouch report FAIL.
#[test]
fn torn_checkpoint_is_detected() {
    let s = spec(",regions=8,region_pages=2");
    let Some(mut d) = open(&s) else { return };
    d.start().unwrap();
    wait_seq_above(d.console(), 5);
    let (old_mem, _, _) = checkpoint(&mut d);
    d.resume().unwrap();
    wait_seq_above(d.console(), last_seq(d.console()) + 10);
    let (mut mem, st, _) = checkpoint(&mut d);
    let sums = boot::SUMS_GPA as usize;
    mem[sums..sums + PAGE_SIZE].copy_from_slice(&old_mem[sums..sums + PAGE_SIZE]);
    let mut r = KvmDomain::restore(&s, &mem, &st).unwrap();
    r.start().unwrap();
    let text = r
        .console()
        .wait_for(WAIT, |t| t.contains("FAIL"))
        .unwrap_or_else(|| panic!("torn replica not detected:\n{}", r.console().text()));
    assert!(text.contains("FAIL region"), "{text}");
    // memtouch halts after FAIL.
    let t0 = Instant::now();
    while !r.halted() && t0.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(r.halted());
    r.pause().unwrap();
}

/// Guest time never goes backwards across save/restore and does not leap
/// by the time the checkpoint spent waiting to be resumed.
#[test]
fn clock_continues_across_restore() {
    let s = spec("");
    let Some(mut d) = open(&s) else { return };
    d.start().unwrap();
    wait_seq_above(d.console(), 3);
    // The clock runs on while the source is paused, and the record holds
    // its value at save: bracket that instant with reads just before and
    // just after save_state. Exact whatever the scheduling delays (a
    // loaded 2-core machine once took 578 ms between checkpoint and read).
    d.pause().unwrap();
    let t_before = d.guest_time_ns();
    let mut st = Vec::new();
    d.save_state(&mut st).unwrap();
    let t_after = d.guest_time_ns();
    // SAFETY: paused.
    let mem = unsafe { d.memory().as_slice() }.to_vec();
    let last = last_seq(d.console());
    drop(d);
    let mut r = KvmDomain::restore(&s, &mem, &st).unwrap();
    let t_restored = r.guest_time_ns();
    assert!(
        (t_before..=t_after).contains(&t_restored),
        "restored {t_restored} ns, saved between {t_before} and {t_after} ns"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(r.guest_time_ns(), t_restored, "clock runs before start");
    let started = Instant::now();
    r.start().unwrap();
    wait_seq_above(r.console(), last + 5);
    r.pause().unwrap();
    let ran = started.elapsed().as_nanos() as u64;
    let t_end = r.guest_time_ns();
    assert!(t_end >= t_restored, "clock went backwards");
    assert!(
        t_end - t_restored <= ran + 5_000_000,
        "clock leapt: advanced {} ns in {ran} ns of running",
        t_end - t_restored
    );
    // The guest checks its own reads (it prints FAIL clock otherwise).
    seqs(&r.console().text());
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Measurements (run with --nocapture): harvest time vs memory size, pause
/// breakdown, state size.
#[test]
fn measure_harvest_and_pause() {
    if open(&spec("")).is_none() {
        return;
    }
    let ring = Kvm::new()
        .and_then(|k| k.create_vm())
        .map(|vm| vm.check_extension_raw(kvm_bindings::KVM_CAP_DIRTY_LOG_RING as _))
        .unwrap_or(0);
    eprintln!("KVM_CAP_DIRTY_LOG_RING: {ring} (max ring bytes; 0 = unsupported)");
    for (mib, dirty) in [16u64, 64, 256]
        .into_iter()
        .flat_map(|m| [(m, DirtyKind::Bitmap), (m, DirtyKind::Ring)])
    {
        if dirty == DirtyKind::Ring && ring == 0 {
            continue;
        }
        // A sweeping guest dirties as many pages per instruction as it can.
        let mem = mib << 20;
        let region_pages = 16u32;
        let regions = ((mem - boot::DATA_GPA) / (region_pages as u64 * 4096)).min(1024) as u32;
        let s = KvmSpec {
            mem,
            regions,
            region_pages,
            touch: 256,
            pattern: Pattern::Sweep,
            dirty,
            ..KvmSpec::default()
        };
        let mut d = KvmDomain::new(&s).unwrap();
        let mut out = Vec::new();
        d.harvest_dirty(&mut out).unwrap();
        d.start().unwrap();
        wait_seq_above(d.console(), 1);
        for (epoch_ms, epochs) in [(10u64, 20usize), (200, 5)] {
            let mut pause = Vec::new();
            let mut kick = Vec::new();
            let mut park = Vec::new();
            let mut harvest = Vec::new();
            let mut save = Vec::new();
            let mut pages = 0;
            let mut state_len = 0;
            for _ in 0..epochs {
                std::thread::sleep(Duration::from_millis(epoch_ms));
                let t = Instant::now();
                d.pause().unwrap();
                pause.push(t.elapsed());
                kick.push(d.last_pause().kick);
                park.push(d.last_pause().park);
                out.clear();
                let t = Instant::now();
                d.harvest_dirty(&mut out).unwrap();
                harvest.push(t.elapsed());
                pages += out.len();
                let mut st = Vec::new();
                let t = Instant::now();
                d.save_state(&mut st).unwrap();
                save.push(t.elapsed());
                state_len = st.len();
                d.resume().unwrap();
            }
            // Harvest of an epoch with nothing dirty: the bitmap scan alone.
            d.pause().unwrap();
            out.clear();
            d.harvest_dirty(&mut out).unwrap();
            let t = Instant::now();
            out.clear();
            d.harvest_dirty(&mut out).unwrap();
            let idle = t.elapsed();
            d.resume().unwrap();
            eprintln!(
                "mem {mib:>3} MiB, epoch {epoch_ms:>3} ms, {:<12}: harvest median {:?} for {} dirty pages avg (idle harvest {idle:?}) | pause median {:?} (kick {:?}, park {:?}) | save_state median {:?}, {} bytes",
                format!("{:?}", d.dirty_mode()),
                median(harvest),
                pages / epochs,
                median(pause),
                median(kick),
                median(park),
                median(save),
                state_len
            );
        }
        d.pause().unwrap();
        seqs(&d.console().text());
    }
}

/// The decoder refuses every truncation and survives every single-byte
/// corruption without panicking (no KVM needed).
#[test]
fn state_decoder_is_bounds_checked() {
    let v = VcpuState {
        msrs: vec![(0x10, 5), (0x174, 8)],
        xcrs: Some(kvm_bindings::kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        }),
        ..Default::default()
    };
    let devices = Devices::new(Console::new(None).unwrap());
    let mut st = Vec::new();
    state::encode(&v, &devices, &mut st);
    let back = state::decode_vcpu(&st).unwrap();
    assert_eq!(back.msrs, v.msrs);
    for cut in 0..st.len() {
        assert!(state::decode_vcpu(&st[..cut]).is_err(), "cut {cut}");
    }
    for i in 0..st.len() {
        for x in [0x01u8, 0x80, 0xff] {
            let mut bad = st.clone();
            bad[i] ^= x;
            let _ = state::decode_vcpu(&bad);
            if let Ok(recs) = state::split(&bad) {
                let mut d = Devices::new(Console::new(None).unwrap());
                let _ = d.restore(&recs);
            }
        }
    }
    let mut dup = st.clone();
    dup.extend_from_slice(&st);
    let e = state::split(&dup).unwrap_err().to_string();
    assert!(e.contains("exactly one record"), "{e}");
}
