//! The pause's pinned workers: harvest of the dirty log by stripes, and
//! parallel copy of dirty pages into staging, while the guest is paused.
//!
//! A harvest splits the guest's pages into contiguous stripes: the epoch
//! thread scans the first itself, `castor-copy-N` helpers the others, and
//! [`CopyPool::harvest`] returns once every helper reported. A copy is
//! shared by chunks: the epoch thread and the helpers claim chunks of the
//! dirty list from one counter until none is left, so a helper whose core
//! is busy leaves its share to the epoch thread instead of holding the
//! pause (a helper pinned to a busy core had stretched 800-page copies to
//! 15-40 ms). [`CopyPool::copy`] returns once every claimed chunk is
//! copied; a helper that gets the task later claims nothing. Either way
//! the borrowed memory outlives every helper's use of it.
//!
//! Invariant: [`CopyPool::harvest`] appends exactly what one scan of the
//! whole range would (stripes are disjoint and ascending, their outputs are
//! concatenated in stripe order), so the pool's size never changes a
//! checkpoint's dirty set.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::domain::pagemap::{self, PageRegion, StripeScan};
use crate::domain::{DomainError, GuestMemory};
use crate::engine::shadow::PageBuf;
use crate::PAGE_SIZE;

/// Stripes smaller than this many pages (1 GiB, about 1 ms of page-table
/// walk) are not worth waking a pinned helper for: on a loaded host the
/// helper may wait for its core longer than the scan takes (`cargo bench
/// --bench harvest`: on 2 loaded cores the pool lost at 1 GiB, won from
/// 8 GiB on). Guests under 2 GiB are scanned by the epoch thread alone.
const MIN_STRIPE_PAGES: u64 = 1 << 18;

/// Work for a helper.
enum Task {
    Copy(CopyTask),
    /// Scan stripe `k` (`gfns`) into `out` (cleared, owned by the pool).
    Scan {
        k: usize,
        scan: StripeScan,
        gfns: Range<u64>,
        out: Vec<u64>,
    },
}

/// A helper's answer to a scan (a copy's progress is in its [`CopyJob`]).
enum Done {
    Scanned {
        k: usize,
        out: Vec<u64>,
        result: Result<(), DomainError>,
    },
}

/// One copy, shared by the threads working on it: they claim chunks of
/// [`CHUNK`] pages until none is left, so a helper that is not running (a
/// busy or descheduled core) leaves its share to the others instead of
/// holding the pause.
struct CopyJob {
    /// The next chunk to claim.
    next: AtomicUsize,
    /// Pages copied so far (every claimed chunk adds its pages when done).
    finished: AtomicUsize,
}

/// Pages per claimed chunk of a copy (256 KiB: tens of microseconds).
const CHUNK: usize = 64;

struct CopyTask {
    src: *const u8,
    dst: *mut u8,
    gfns: *const u64,
    /// Page `gfns[i]` goes to slot `slots[i]`; null: to slot `i`.
    slots: *const usize,
    /// Slots in staging (every slot index is checked against it).
    dst_slots: usize,
    len: usize,
    guest_pages: u64,
    job: Arc<CopyJob>,
}

// SAFETY: a CopyTask's pointers are dereferenced only for a chunk claimed
// from its job before the job ran out; `CopyPool::copy` returns only once
// every claimed chunk is finished, and chunks never overlap. A helper that
// gets the task later claims nothing and touches no pointer.
unsafe impl Send for CopyTask {}

/// Claims and copies chunks of `t` until none is left: page `gfns[i]` into
/// staging slot `slots[i]` (slot `i` without a slot list).
fn run_task(t: &CopyTask) {
    loop {
        let from = t.job.next.fetch_add(1, Ordering::Relaxed) * CHUNK;
        if from >= t.len {
            return;
        }
        let to = (from + CHUNK).min(t.len);
        for i in from..to {
            // SAFETY: i < len = gfns.len(), and the list outlives the
            // claimed chunk (see `CopyTask`).
            let gfn = unsafe { *t.gfns.add(i) };
            let slot = if t.slots.is_null() {
                i
            } else {
                // SAFETY: as for gfns: the slot list is as long as the
                // gfn list and outlives the claimed chunk.
                unsafe { *t.slots.add(i) }
            };
            assert!(gfn < t.guest_pages, "dirty gfn {gfn} outside guest memory");
            assert!(slot < t.dst_slots, "staging slot {slot} out of range");
            // SAFETY: gfn is inside guest memory and the slot inside
            // staging (both checked); staging and guest memory never
            // overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    t.src.add(gfn as usize * PAGE_SIZE),
                    t.dst.add(slot * PAGE_SIZE),
                    PAGE_SIZE,
                )
            }
        }
        t.job.finished.fetch_add(to - from, Ordering::Release);
    }
}

use crate::domain::priority::PAUSE_BOOST;

/// The pause is what the guest feels: threads working inside it run
/// [`PAUSE_BOOST`] nice steps above the rest of the process (encoders, the
/// transmit thread, the guest's own threads: see
/// [`crate::domain::priority`]) and the backup, when the process may (root
/// or CAP_SYS_NICE); otherwise this is a no-op. Relative to the process,
/// not absolute (under `nice -n -15` an absolute -10 had put the pause's
/// threads *below* the encoders they must preempt) and not to the calling
/// thread (the copy helpers, spawned by the boosted epoch thread, had
/// boosted twice).
pub fn raise_priority() {
    let base = crate::domain::priority::process_nice();
    // SAFETY: plain syscalls on the calling thread; failure is harmless.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, (base - PAUSE_BOOST).max(-20));
    }
}

/// The calling thread's share of a harvest, reused across epochs.
#[derive(Default)]
struct Own {
    regions: Vec<PageRegion>,
    /// Stripe k's output (k >= 1), empty between harvests.
    parts: Vec<Vec<u64>>,
}

pub struct CopyPool {
    helpers: Vec<(Sender<Task>, JoinHandle<()>)>,
    /// The helpers' kernel thread ids (for the pause's real-time class).
    tids: Vec<libc::pid_t>,
    done: Receiver<Done>,
    own: Mutex<Own>,
}

/// A helper's loop: runs tasks until the pool drops its sender.
fn helper(rx: Receiver<Task>, done: Sender<Done>) {
    let mut regions = pagemap::region_buffer();
    for t in rx {
        let d = match t {
            Task::Copy(c) => {
                run_task(&c);
                continue;
            }
            Task::Scan {
                k,
                scan,
                gfns,
                mut out,
            } => {
                let result = scan.scan(gfns, &mut regions, &mut out);
                Done::Scanned { k, out, result }
            }
        };
        if done.send(d).is_err() {
            break;
        }
    }
}

impl CopyPool {
    /// `threads` copiers in total, counting the calling thread. Helpers are
    /// pinned to `cores` round-robin when given.
    pub fn new(threads: usize, cores: &[core_affinity::CoreId]) -> CopyPool {
        let (done_tx, done) = channel();
        let (tid_tx, tid_rx) = channel();
        let helpers: Vec<_> = (1..threads.max(1))
            .map(|n| {
                let (tx, rx) = channel::<Task>();
                let done_tx = done_tx.clone();
                let tid_tx = tid_tx.clone();
                let core = (!cores.is_empty()).then(|| cores[n % cores.len()]);
                let h = std::thread::Builder::new()
                    .name(format!("castor-copy-{n}"))
                    .spawn(move || {
                        if let Some(c) = core {
                            core_affinity::set_for_current(c);
                        }
                        raise_priority();
                        let _ = tid_tx.send(crate::domain::priority::current_tid());
                        drop(tid_tx);
                        helper(rx, done_tx);
                    })
                    .expect("spawning copy thread");
                (tx, h)
            })
            .collect();
        let own = Own {
            regions: pagemap::region_buffer(),
            parts: vec![Vec::new(); threads.max(1)],
        };
        drop(tid_tx);
        // Every helper sends its id first thing (a helper that died before
        // only closes its sender).
        let tids = tid_rx.iter().collect();
        CopyPool {
            helpers,
            tids,
            done,
            own: Mutex::new(own),
        }
    }

    /// The helper threads' kernel ids.
    pub fn tids(&self) -> &[libc::pid_t] {
        &self.tids
    }

    /// Threads working on each task, counting the caller.
    pub fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Appends the gfns `scan` reports over its whole range to `out`,
    /// ascending and unique, as one [`StripeScan::scan`] of `0..pages`
    /// would: stripe 0 on the calling thread, stripe k on helper k, the
    /// outputs concatenated in stripe order. Returns the first stripe's
    /// error, after every helper answered.
    pub fn harvest(&self, scan: &StripeScan, out: &mut Vec<u64>) -> Result<(), DomainError> {
        let mut own = self.own.lock().unwrap_or_else(|e| e.into_inner());
        let own = &mut *own;
        let n = self
            .threads()
            .min((scan.pages() / MIN_STRIPE_PAGES).max(1) as usize);
        let parts = pagemap::stripes(scan.pages(), n);
        let first = out.len();
        let mut sent = 0;
        let mut result = Ok(());
        for (k, gfns) in parts.iter().enumerate().skip(1) {
            let mut buf = std::mem::take(&mut own.parts[k]);
            buf.clear();
            let task = Task::Scan {
                k,
                scan: scan.clone(),
                gfns: gfns.clone(),
                out: buf,
            };
            match self.helpers[k - 1].0.send(task) {
                Ok(()) => sent += 1,
                // A helper that is gone: its stripe is scanned here.
                Err(std::sync::mpsc::SendError(Task::Scan { gfns, mut out, .. })) => {
                    result = result.and(scan.scan(gfns, &mut own.regions, &mut out));
                    own.parts[k] = out;
                }
                Err(_) => unreachable!("a scan task was sent"),
            }
        }
        let whole = parts.first().cloned().unwrap_or(0..0);
        let mine = scan.scan(whole, &mut own.regions, out);
        for _ in 0..sent {
            match self.done.recv().expect("copy helper died") {
                Done::Scanned { k, out, result: r } => {
                    own.parts[k] = out;
                    result = result.and(r);
                }
            }
        }
        for part in own.parts.iter_mut().take(parts.len()).skip(1) {
            out.extend_from_slice(part);
            part.clear();
        }
        // Stripes are disjoint and ascending: this only checks (one
        // comparison per page) unless a stripe broke its promise.
        pagemap::sort_unique_tail(out, first);
        mine.and(result)
    }

    /// Copies page `gfns[i]` of `mem` into staging slot `i` for every `i`:
    /// the calling thread and the helpers claim chunks until none is left;
    /// returns once every chunk is copied (the caller never waits for a
    /// helper that did not start).
    pub fn copy(&self, mem: &GuestMemory, gfns: &[u64], staging: &PageBuf) {
        assert!(staging.slots() >= gfns.len(), "staging too small");
        self.run_copy(mem, gfns, None, staging)
    }

    /// Copies page `gfns[i]` of `mem` into staging slot `slots[i]` for
    /// every `i`, shared like [`CopyPool::copy`]. Slots must be distinct
    /// (two pages in one slot would race) and inside staging (checked).
    pub fn copy_to_slots(
        &self,
        mem: &GuestMemory,
        gfns: &[u64],
        slots: &[usize],
        staging: &PageBuf,
    ) {
        assert_eq!(gfns.len(), slots.len(), "one slot per page");
        self.run_copy(mem, gfns, Some(slots), staging)
    }

    fn run_copy(
        &self,
        mem: &GuestMemory,
        gfns: &[u64],
        slots: Option<&[usize]>,
        staging: &PageBuf,
    ) {
        let job = Arc::new(CopyJob {
            next: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
        });
        let task = || CopyTask {
            src: mem.as_ptr(),
            dst: staging.slot_ptr(0),
            gfns: gfns.as_ptr(),
            slots: slots.map_or(std::ptr::null(), <[usize]>::as_ptr),
            dst_slots: staging.slots(),
            len: gfns.len(),
            guest_pages: mem.pages(),
            job: job.clone(),
        };
        // Too few pages to be worth waking helpers otherwise.
        if gfns.len() >= 2 * CHUNK {
            for (tx, _) in &self.helpers {
                let _ = tx.send(Task::Copy(task()));
            }
        }
        run_task(&task());
        // Only chunks a helper claimed and is still copying are left.
        let mut spins = 0u32;
        while job.finished.load(Ordering::Acquire) < gfns.len() {
            spins += 1;
            if spins < 1000 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

impl Drop for CopyPool {
    fn drop(&mut self) {
        for (tx, h) in self.helpers.drain(..) {
            drop(tx);
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::domain::sim::DirtyTracker;

    fn tracked(pages: u64) -> Option<(GuestMemory, DirtyTracker)> {
        let mem = GuestMemory::new(pages as usize * PAGE_SIZE).unwrap();
        match DirtyTracker::new(&mem) {
            Ok(t) => Some((mem, t)),
            Err(e) => {
                eprintln!("skipping: kernel dirty tracking unavailable here: {e}");
                None
            }
        }
    }

    /// The same writes on two guests: one harvested by one thread, the
    /// other by the pool's stripes, epoch after epoch. The lists must be
    /// identical (and the true dirty set).
    #[test]
    fn pool_harvest_equals_one_thread_harvest() {
        let pages = 3 * MIN_STRIPE_PAGES + 77;
        let (Some((mem_a, mut one)), Some((mem_b, striped))) = (tracked(pages), tracked(pages))
        else {
            return;
        };
        let pool = CopyPool::new(4, &[]);
        let scan = striped.stripe_scan();
        let bounds = pagemap::stripes(pages, 3);
        let mut state = 99u64;
        for round in 0..6u8 {
            let mut want: Vec<u64> = bounds
                .iter()
                .flat_map(|r| r.start.saturating_sub(2)..(r.start + 2).min(pages))
                .chain([0, pages - 1])
                .collect();
            for _ in 0..3000 {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                want.push((state >> 20) % pages);
            }
            for &g in &want {
                mem_a.write_page(g, &[round; PAGE_SIZE]);
                mem_b.write_page(g, &[round; PAGE_SIZE]);
            }
            want.sort_unstable();
            want.dedup();
            let (mut a, mut b) = (vec![7], vec![7]);
            one.harvest(&mut a).unwrap();
            pool.harvest(&scan, &mut b).unwrap();
            assert_eq!(b, a, "round {round}");
            assert_eq!(&a[1..], &want[..], "round {round}");
        }
        let mut clean = Vec::new();
        pool.harvest(&scan, &mut clean).unwrap();
        assert!(clean.is_empty(), "re-armed pages reported again: {clean:?}");
    }

    /// While a writer runs, pool harvests stay sorted and unique, and no
    /// write is lost: every page written shows up in some harvest.
    #[test]
    fn pool_harvest_under_concurrent_writes_loses_nothing() {
        let pages = 2 * MIN_STRIPE_PAGES;
        let Some((mem, t)) = tracked(pages) else {
            return;
        };
        let pool = CopyPool::new(2, &[]);
        let scan = t.stripe_scan();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let mut seen = vec![false; pages as usize];
        let written = std::thread::scope(|s| {
            let writer = s.spawn(|| {
                let mut w = Vec::new();
                let mut g = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || w.len() < 20_000 {
                    g = (g + 7919) % pages;
                    mem.write_page(g, &[1; PAGE_SIZE]);
                    w.push(g);
                }
                w
            });
            for _ in 0..20 {
                let mut out = Vec::new();
                pool.harvest(&scan, &mut out).unwrap();
                assert!(out.windows(2).all(|w| w[0] < w[1]), "not sorted and unique");
                out.iter().for_each(|&g| seen[g as usize] = true);
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            writer.join().unwrap()
        });
        let mut out = Vec::new();
        pool.harvest(&scan, &mut out).unwrap();
        out.iter().for_each(|&g| seen[g as usize] = true);
        let lost: Vec<u64> = written.into_iter().filter(|&g| !seen[g as usize]).collect();
        assert!(
            lost.is_empty(),
            "{} written pages never harvested",
            lost.len()
        );
    }

    #[test]
    fn copies_exactly_the_listed_pages() {
        let mem = GuestMemory::new(512 * PAGE_SIZE).unwrap();
        for g in 0..512u64 {
            mem.write_page(g, &[g as u8; PAGE_SIZE]);
        }
        let gfns: Vec<u64> = (0..512).filter(|g| g % 3 == 1).collect();
        let st = PageBuf::new(gfns.len()).unwrap();
        CopyPool::new(3, &[]).copy(&mem, &gfns, &st);
        for (i, g) in gfns.iter().enumerate() {
            // SAFETY: copy finished; nobody writes staging now.
            assert_eq!(unsafe { st.slot(i) }, &[*g as u8; PAGE_SIZE]);
        }
    }

    /// Pages go to the slots listed, and only those slots are written:
    /// the rest of staging keeps what was there (a pre-copy's pages).
    #[test]
    fn copies_into_the_listed_slots_only() {
        let mem = GuestMemory::new(512 * PAGE_SIZE).unwrap();
        for g in 0..512u64 {
            mem.write_page(g, &[g as u8; PAGE_SIZE]);
        }
        let st = PageBuf::new(400).unwrap();
        for i in 0..400 {
            // SAFETY: nobody else uses staging in this test.
            unsafe { std::ptr::write_bytes(st.slot_ptr(i), 0xee, PAGE_SIZE) };
        }
        // More than two chunks, so the helpers take part; slots scattered.
        let gfns: Vec<u64> = (0..300).map(|i| (i * 7 + 3) % 512).collect();
        let slots: Vec<usize> = (0..300).map(|i| 399 - i).collect();
        CopyPool::new(3, &[]).copy_to_slots(&mem, &gfns, &slots, &st);
        for i in 0..400usize {
            let want = match slots.iter().position(|&s| s == i) {
                Some(k) => gfns[k] as u8,
                None => 0xee,
            };
            // SAFETY: the copy finished; nobody writes staging now.
            assert_eq!(unsafe { st.slot(i) }, &[want; PAGE_SIZE], "slot {i}");
        }
    }
}
