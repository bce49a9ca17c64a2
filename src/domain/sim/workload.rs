//! Workload operations: what one page write does, for every workload kind.
//!
//! Invariants:
//! - Thread `t` writes only data pages in its own range `lo..hi` (page 0,
//!   the control block, is never a data page) and its own control-block
//!   slot. Ranges are disjoint, so the memory after any set of operations
//!   does not depend on how the threads interleave.
//! - [`step`] loads the thread's state from its slot, performs exactly one
//!   page write, and stores the state back. It is the only code that
//!   writes data pages while the domain runs, and is shared by the threaded
//!   domain and by the synchronous [`run_epochs`] behind `expected_after`.
//! - Everything written is a function of the spec and the slot state.

use std::sync::OnceLock;

use crate::domain::GuestMemory;
use crate::PAGE_SIZE;

use super::control::{self, Field, Slot};
use super::rng;
use super::spec::{Pace, SimSpec, WorkloadKind};

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Percent of hot/cold writes that land in the hot set.
const HOT_PERCENT: u64 = 90;

/// Immutable description of the workload, derived from the spec.
#[derive(Debug, Clone)]
pub struct Plan {
    pub kind: WorkloadKind,
    pub edit: usize,
    pub threads: Vec<ThreadPlan>,
    /// Page writes per output frame of a thread (0: no output).
    pub out: u64,
    /// Phase length of a phased workload.
    pub phase: Option<std::time::Duration>,
}

/// One thread's share of the work.
#[derive(Debug, Clone, Copy)]
pub struct ThreadPlan {
    pub index: usize,
    /// First data page of the thread's range (inclusive).
    pub lo: u64,
    /// End of the range (exclusive); `lo < hi`.
    pub hi: u64,
    /// Hot pages are `lo..lo + hot_len`; `1 <= hot_len <= hi - lo`.
    pub hot_len: u64,
    /// Page writes per epoch (deterministic mode).
    pub quota: u64,
    /// Page writes per second (timed mode; 0 = unpaced).
    pub rate: u64,
}

impl Plan {
    pub fn new(spec: &SimSpec) -> Plan {
        let n = spec.threads as u64;
        let data = spec.data_pages();
        let share = |total: u64, t: u64| total / n + u64::from(t < total % n);
        let threads = (0..n)
            .map(|t| {
                let lo = 1 + t * data / n;
                let hi = 1 + (t + 1) * data / n;
                let hot_len = ((((hi - lo) as f64) * spec.hot).round() as u64).clamp(1, hi - lo);
                let (quota, rate) = match spec.pace {
                    Pace::Deterministic { writes } => (share(writes, t), 0),
                    Pace::Timed { rate: 0 } => (0, 0),
                    Pace::Timed { rate } => (0, share(rate, t).max(1)),
                };
                ThreadPlan {
                    index: t as usize,
                    lo,
                    hi,
                    hot_len,
                    quota,
                    rate,
                }
            })
            .collect();
        Plan {
            kind: spec.workload,
            edit: spec.edit as usize,
            threads,
            out: spec.out,
            phase: (spec.phase_ms > 0).then(|| std::time::Duration::from_millis(spec.phase_ms)),
        }
    }
}

/// Per-thread scratch space, so `step` never allocates.
pub struct Scratch(Box<[u8; PAGE_SIZE]>);

impl Default for Scratch {
    fn default() -> Self {
        Scratch(Box::new([0; PAGE_SIZE]))
    }
}

/// Writes the initial memory: text in a `fill` fraction of the data pages
/// (chosen and generated from the seed alone) and the control block.
pub fn build_initial(mem: &GuestMemory, spec: &SimSpec) {
    let mut buf = Scratch::default();
    for gfn in 1..spec.layout().pages {
        let h = rng::mix64(spec.seed ^ rng::mix64(gfn.wrapping_mul(0x100_0000_01b3)));
        if rng::unit(h) < spec.fill {
            let mut state = rng::mix64(h);
            rewrite_text(mem, gfn, &mut state, &mut buf.0);
        }
    }
    control::init(mem, spec);
}

/// Marks the start of deterministic epoch `epoch` in thread `t`'s slot.
pub fn begin_epoch(mem: &GuestMemory, t: usize, epoch: u64) {
    let s = Slot::of(mem, t);
    s.set(Field::Epoch, epoch);
    s.set(Field::EpochDone, 0);
}

/// Whether thread `tp` has finished the quota of the epoch in its slot
/// (epoch 0, before the first, counts as finished).
pub fn epoch_finished(mem: &GuestMemory, tp: &ThreadPlan) -> (u64, bool) {
    let s = Slot::of(mem, tp.index);
    let epoch = s.get(Field::Epoch);
    (epoch, epoch == 0 || s.get(Field::EpochDone) >= tp.quota)
}

/// Performs one page write of thread `tp`, reading and updating its slot.
pub fn step(mem: &GuestMemory, plan: &Plan, tp: &ThreadPlan, scratch: &mut Scratch) {
    let slot = Slot::of(mem, tp.index);
    let mut state = slot.get(Field::Rng);
    let buf = &mut scratch.0;
    let len = tp.hi - tp.lo;
    match plan.kind {
        WorkloadKind::Uniform => {
            let gfn = tp.lo + rng::below(&mut state, len);
            rewrite_text(mem, gfn, &mut state, buf);
        }
        WorkloadKind::HotCold => {
            let gfn = hotcold_page(tp, &mut state);
            rewrite_text(mem, gfn, &mut state, buf);
        }
        WorkloadKind::Sequential => {
            let cursor = slot.get(Field::Cursor) % len;
            rewrite_text(mem, tp.lo + cursor, &mut state, buf);
            slot.set(Field::Cursor, (cursor + 1) % len);
        }
        WorkloadKind::Edits => {
            let gfn = tp.lo + rng::below(&mut state, len);
            edit_page(mem, gfn, plan.edit, &mut state);
        }
        WorkloadKind::Zero => {
            let gfn = tp.lo + rng::below(&mut state, len);
            mem.write_page(gfn, &ZERO_PAGE);
        }
        WorkloadKind::Incompressible => {
            let gfn = tp.lo + rng::below(&mut state, len);
            random_page(mem, gfn, &mut state, buf);
        }
        WorkloadKind::Mixed => {
            let gfn = hotcold_page(tp, &mut state);
            match rng::below(&mut state, 100) {
                0..=59 => edit_page(mem, gfn, plan.edit, &mut state),
                60..=79 => rewrite_text(mem, gfn, &mut state, buf),
                80..=89 => mem.write_page(gfn, &ZERO_PAGE),
                _ => random_page(mem, gfn, &mut state, buf),
            }
        }
    }
    slot.set(Field::Rng, state);
    slot.set(Field::Writes, slot.get(Field::Writes).wrapping_add(1));
    slot.set(Field::EpochDone, slot.get(Field::EpochDone).wrapping_add(1));
}

/// Runs deterministic epochs `from..=to` synchronously, thread after
/// thread: the reference the threaded domain must equal byte for byte.
pub fn run_epochs(mem: &GuestMemory, plan: &Plan, from: u64, to: u64) {
    let mut scratch = Scratch::default();
    for epoch in from..=to {
        for tp in &plan.threads {
            begin_epoch(mem, tp.index, epoch);
            for _ in 0..tp.quota {
                step(mem, plan, tp, &mut scratch);
            }
        }
    }
}

fn hotcold_page(tp: &ThreadPlan, state: &mut u64) -> u64 {
    if rng::below(state, 100) < HOT_PERCENT {
        tp.lo + rng::below(state, tp.hot_len)
    } else {
        tp.lo + rng::below(state, tp.hi - tp.lo)
    }
}

/// A full rewrite with text: a page-sized window of the corpus, made
/// distinct by a few freshly generated words at random places.
fn rewrite_text(mem: &GuestMemory, gfn: u64, state: &mut u64, buf: &mut [u8; PAGE_SIZE]) {
    let c = corpus();
    let off = rng::below(state, (c.len() - PAGE_SIZE + 1) as u64) as usize;
    buf.copy_from_slice(&c[off..off + PAGE_SIZE]);
    for _ in 0..STAMPS {
        let pos = rng::below(state, (PAGE_SIZE - STAMP_LEN + 1) as u64) as usize;
        text(state, &mut buf[pos..pos + STAMP_LEN]);
    }
    mem.write_page(gfn, buf);
}

fn random_page(mem: &GuestMemory, gfn: u64, state: &mut u64, buf: &mut [u8; PAGE_SIZE]) {
    for chunk in buf.chunks_exact_mut(8) {
        chunk.copy_from_slice(&rng::next(state).to_le_bytes());
    }
    mem.write_page(gfn, buf);
}

/// A small edit: `edit` bytes of corpus text at a random offset.
fn edit_page(mem: &GuestMemory, gfn: u64, edit: usize, state: &mut u64) {
    let offset = rng::below(state, (PAGE_SIZE - edit + 1) as u64) as usize;
    let c = corpus();
    let src = rng::below(state, (c.len() - edit + 1) as u64) as usize;
    let dst = mem.page_ptr(gfn);
    // SAFETY: offset + edit <= PAGE_SIZE, so the write stays inside page
    // `gfn` (validated by page_ptr), which only this thread writes; the
    // corpus is a Rust allocation and cannot overlap guest memory.
    unsafe { std::ptr::copy_nonoverlapping(c[src..src + edit].as_ptr(), dst.add(offset), edit) }
}

/// Words stamped into each corpus window by a full text rewrite.
const STAMPS: usize = 4;
const STAMP_LEN: usize = 16;
const CORPUS_LEN: usize = 64 << 10;
const CORPUS_SEED: u64 = 0x7e47_c0b9;

/// Text shared by all domains: a constant (not seed-dependent) function of
/// this code, generated once per process.
fn corpus() -> &'static [u8] {
    static CORPUS: OnceLock<Box<[u8]>> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let mut c = vec![0u8; CORPUS_LEN].into_boxed_slice();
        let mut seed = CORPUS_SEED;
        text(&mut seed, &mut c);
        c
    })
}

/// Words of the text-like content: a small vocabulary compresses like
/// prose or logs (several-fold), unlike random bytes.
const WORDS: [&[u8]; 64] = [
    b"the ",
    b"of ",
    b"and ",
    b"to ",
    b"in ",
    b"is ",
    b"that ",
    b"for ",
    b"it ",
    b"as ",
    b"with ",
    b"was ",
    b"on ",
    b"be ",
    b"at ",
    b"by ",
    b"this ",
    b"from ",
    b"or ",
    b"an ",
    b"page ",
    b"memory ",
    b"epoch ",
    b"guest ",
    b"backup ",
    b"primary ",
    b"dirty ",
    b"copy ",
    b"send ",
    b"ack ",
    b"commit ",
    b"replica ",
    b"checkpoint ",
    b"network ",
    b"disk ",
    b"request ",
    b"reply ",
    b"user ",
    b"session ",
    b"table ",
    b"index ",
    b"value ",
    b"key ",
    b"error ",
    b"warning ",
    b"info ",
    b"debug ",
    b"0 ",
    b"1 ",
    b"42 ",
    b"200 ",
    b"404 ",
    b"GET ",
    b"POST ",
    b"/api/v1/items ",
    b"ok, ",
    b"done. ",
    b"retry; ",
    b"\n",
    b"\n\n",
    b"id=7 ",
    b"len=4096 ",
    b"state=ready ",
    b"2024-06-01T12:00:00Z ",
];

/// Fills `out` with text-like bytes drawn from `state`.
fn text(state: &mut u64, out: &mut [u8]) {
    let mut pos = 0;
    let mut bits = 0u64;
    let mut left = 0;
    while pos < out.len() {
        if left == 0 {
            bits = rng::next(state);
            left = 10;
        }
        let word = WORDS[(bits & 63) as usize];
        bits >>= 6;
        left -= 1;
        let n = word.len().min(out.len() - pos);
        out[pos..pos + n].copy_from_slice(&word[..n]);
        pos += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(kv: &str) -> (SimSpec, Plan, GuestMemory) {
        let spec = SimSpec::parse(kv).unwrap();
        let plan = Plan::new(&spec);
        let mem = GuestMemory::new(spec.mem as usize).unwrap();
        build_initial(&mem, &spec);
        (spec, plan, mem)
    }

    fn page(mem: &GuestMemory, gfn: u64) -> [u8; PAGE_SIZE] {
        let mut p = [0; PAGE_SIZE];
        mem.read_page(gfn, &mut p);
        p
    }

    #[test]
    fn ranges_partition_the_data_pages() {
        let spec = SimSpec::parse("mem=100k,threads=7,writes=10").unwrap();
        let plan = Plan::new(&spec);
        let mut next = 1;
        for tp in &plan.threads {
            assert_eq!(tp.lo, next);
            assert!(tp.lo < tp.hi && tp.hot_len >= 1 && tp.hot_len <= tp.hi - tp.lo);
            next = tp.hi;
        }
        assert_eq!(next, spec.layout().pages);
        assert_eq!(plan.threads.iter().map(|t| t.quota).sum::<u64>(), 10);
    }

    #[test]
    fn prefill_follows_fill_fraction() {
        let (_, _, mem) = setup("mem=4MiB,fill=0.25");
        let filled = (1..1024)
            .filter(|&g| page(&mem, g) != [0; PAGE_SIZE])
            .count();
        assert!(
            (180..330).contains(&filled),
            "{filled} of 1023 pages prefilled"
        );
        let (_, _, empty) = setup("mem=4MiB,fill=0");
        assert!((1..1024).all(|g| page(&empty, g) == [0; PAGE_SIZE]));
    }

    #[test]
    fn edits_change_few_bytes_and_stay_in_range() {
        let (_, plan, mem) = setup("mem=256k,workload=edits,edit=16,threads=2,fill=1,writes=1");
        let before: Vec<_> = (0..64).map(|g| page(&mem, g)).collect();
        let mut s = Scratch::default();
        step(&mem, &plan, &plan.threads[1], &mut s);
        let changed: Vec<u64> = (1..64)
            .filter(|&g| page(&mem, g) != before[g as usize])
            .collect();
        assert_eq!(changed.len(), 1);
        let g = changed[0];
        assert!(g >= plan.threads[1].lo && g < plan.threads[1].hi);
        let after = page(&mem, g);
        let diff = after
            .iter()
            .zip(before[g as usize].iter())
            .filter(|(a, b)| a != b)
            .count();
        assert!(diff <= 16);
        assert_eq!(Slot::of(&mem, 1).get(Field::Writes), 1);
        assert_eq!(Slot::of(&mem, 0).get(Field::Writes), 0);
    }

    #[test]
    fn sequential_sweeps_and_wraps() {
        let (_, plan, mem) = setup("mem=24k,workload=sequential,fill=0,writes=1");
        let tp = plan.threads[0];
        let mut s = Scratch::default();
        for i in 0..(tp.hi - tp.lo) {
            step(&mem, &plan, &tp, &mut s);
            assert_ne!(page(&mem, tp.lo + i), [0; PAGE_SIZE]);
        }
        assert_eq!(Slot::of(&mem, 0).get(Field::Cursor), 0);
    }

    #[test]
    fn text_compresses_and_random_does_not() {
        let mut state = 1;
        let mut t = [0u8; PAGE_SIZE];
        text(&mut state, &mut t);
        let distinct_words = t
            .split(|&b| b == b' ')
            .collect::<std::collections::HashSet<_>>();
        assert!(distinct_words.len() < 100);
        assert!(t.iter().all(|b| b.is_ascii()));
    }

    #[test]
    fn synchronous_run_is_reproducible() {
        for kind in WorkloadKind::ALL {
            let kv = format!("mem=512k,workload={kind},writes=300,threads=2");
            let (_, plan, a) = setup(&kv);
            let (_, _, b) = setup(&kv);
            run_epochs(&a, &plan, 1, 3);
            run_epochs(&b, &plan, 1, 2);
            run_epochs(&b, &plan, 3, 3);
            // SAFETY: no other thread touches these private memories.
            assert!(unsafe { a.as_slice() == b.as_slice() }, "{kind}");
            assert_eq!(Slot::of(&a, 0).get(Field::Epoch), 3);
            assert_eq!(Slot::of(&a, 1).get(Field::EpochDone), 150);
        }
    }
}
