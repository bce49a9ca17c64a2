//! Kernel dirty tracking: userfaultfd write-protect in async mode plus the
//! PAGEMAP_SCAN ioctl (Linux ≥ 6.7).
//!
//! How it works: the guest range is registered with a userfaultfd in WP
//! mode with `UFFD_FEATURE_WP_ASYNC` (the kernel resolves write faults on
//! protected pages by itself, clearing the page's uffd-wp bit, instead of
//! queueing a message) and `UFFD_FEATURE_WP_UNPOPULATED` (pages never
//! touched get a write-protect marker too, so their first write is seen).
//! A page whose uffd-wp bit is clear has been written since it was last
//! protected. `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING` reports those pages
//! (`PAGE_IS_WRITTEN`) and re-protects exactly the reported ones in the
//! same page-table walk, so no write can fall between report and re-arm.
//!
//! Invariants: the tracker covers exactly one `GuestMemory` mapping, which
//! must outlive it; harvests return sorted, unique gfns relative to the
//! mapping's base. The uffd stays open for the tracker's life (closing it
//! unregisters the range). Every page present (or swapped) when tracking
//! was armed and every page any harvest reported is recorded in a
//! [`SeenPages`] history, which [`DirtyTracker::holds_data`] needs (see
//! there and `domain/seen.rs`: write-protect markers look like swap).
//!
//! Cost: arming write-protects the whole range, which allocates page tables for it:
//! about 2 MiB per GiB; a background thread then maps the shared zero
//! page into never-touched pages. Each harvest walks the page tables of the whole
//! range (about 0.2 ms per GiB here; 0.9 ms when never-touched pages hold
//! write-protect markers instead, see `zerofill.rs`) plus a
//! little per reported region.
//!
//! The kernel structures and ioctl numbers are defined here from the uapi
//! headers (`linux/userfaultfd.h`, `linux/fs.h`) because distribution
//! headers predate PAGEMAP_SCAN.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use crate::domain::pagemap::{self, PageRegion, ScanQuery};
use crate::domain::seen::SeenPages;
use crate::domain::sim::zerofill::ZeroFill;
use crate::domain::{DomainError, GuestMemory};

// ---- ioctl number encoding (asm-generic/ioctl.h; x86, arm64, riscv) ----
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

const fn ioc(dir: u64, ty: u8, nr: u8, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}

const fn iowr<T>(ty: u8, nr: u8) -> u64 {
    ioc(IOC_READ | IOC_WRITE, ty, nr, std::mem::size_of::<T>())
}

// ---- linux/userfaultfd.h ----
const UFFD_API: u64 = 0xAA;
const UFFDIO: u8 = 0xAA;
const _UFFDIO_REGISTER: u8 = 0x00;
const _UFFDIO_WRITEPROTECT: u8 = 0x06;
const _UFFDIO_API: u8 = 0x3F;
/// `userfaultfd(2)` flag: handle only user-mode faults (no privilege
/// needed, and all we want).
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

const UFFDIO_API: u64 = iowr::<UffdioApi>(UFFDIO, _UFFDIO_API);
const UFFDIO_REGISTER: u64 = iowr::<UffdioRegister>(UFFDIO, _UFFDIO_REGISTER);
const UFFDIO_WRITEPROTECT: u64 = iowr::<UffdioWriteprotect>(UFFDIO, _UFFDIO_WRITEPROTECT);

// Cross-checked against the C headers' macros (gcc on x86_64).
const _: () = assert!(UFFDIO_API == 0xc018_aa3f);
const _: () = assert!(UFFDIO_REGISTER == 0xc020_aa00);
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xc018_aa06);

const ADVICE: &str = "needs Linux >= 6.7 with userfaultfd (UFFD_FEATURE_WP_ASYNC) and \
                      PAGEMAP_SCAN; use a newer kernel or another domain (--domain kvm)";

/// Written-page tracker over one guest memory mapping.
pub struct DirtyTracker {
    uffd: OwnedFd,
    pagemap: Arc<File>,
    base: u64,
    len: u64,
    regions: Vec<PageRegion>,
    /// Pages present before the arm or reported by a harvest since.
    seen: Arc<SeenPages>,
    /// Maps the zero page into never-touched pages (speeds up harvests);
    /// held only so that it stops with the tracker.
    #[cfg_attr(not(test), allow(dead_code))]
    zero_fill: ZeroFill,
}

impl std::fmt::Debug for DirtyTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyTracker")
            .field("uffd", &self.uffd.as_raw_fd())
            .field("base", &format_args!("{:#x}", self.base))
            .field("len", &self.len)
            .finish()
    }
}

impl DirtyTracker {
    /// Arms tracking over all of `mem`: every page written after this call
    /// is reported by the first [`DirtyTracker::harvest`]. `mem` must
    /// outlive the tracker, and nothing may write it during this call (the
    /// pages holding data are read from the page tables just before the
    /// arm).
    pub fn new(mem: &GuestMemory) -> Result<Self, DomainError> {
        let base = mem.as_ptr() as u64;
        let len = mem.len() as u64;

        // SAFETY: userfaultfd takes only flags and returns a new fd or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_userfaultfd,
                libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(DomainError::DirtyTracking(format!(
                "userfaultfd(UFFD_USER_MODE_ONLY) failed: {e}; {ADVICE}"
            )));
        }
        // SAFETY: fd was just returned by the kernel and is owned by no one
        // else; OwnedFd closes it exactly once.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };

        let wanted = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: wanted,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one uffdio_api; `api` is that
        // repr(C) struct.
        if let Err(e) = unsafe { ioctl(&uffd, UFFDIO_API, &mut api) } {
            return Err(DomainError::DirtyTracking(format!(
                "UFFDIO_API with WP_ASYNC|WP_UNPOPULATED failed: {e}; {ADVICE}"
            )));
        }
        if api.features & wanted != wanted {
            return Err(DomainError::DirtyTracking(format!(
                "UFFDIO_API granted features {:#x}, lacking WP_ASYNC|WP_UNPOPULATED; {ADVICE}",
                api.features
            )));
        }

        let mut reg = UffdioRegister {
            range: UffdioRange { start: base, len },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one uffdio_register; `reg`
        // is that repr(C) struct. The range is our own anonymous mapping.
        unsafe { ioctl(&uffd, UFFDIO_REGISTER, &mut reg) }
            .map_err(|e| sys("ioctl UFFDIO_REGISTER", e))?;
        if reg.ioctls & (1 << _UFFDIO_WRITEPROTECT) == 0 {
            return Err(DomainError::DirtyTracking(format!(
                "UFFDIO_REGISTER does not offer UFFDIO_WRITEPROTECT (ioctls {:#x}); {ADVICE}",
                reg.ioctls
            )));
        }

        // Before the arm, no marker exists yet: PRESENT|SWAPPED is exactly
        // the pages that may hold data.
        let pagemap =
            File::open("/proc/self/pagemap").map_err(|e| sys("open /proc/self/pagemap", e))?;
        let mut regions = pagemap::region_buffer();
        let mut present = Vec::new();
        pagemap::scan(
            &pagemap,
            base,
            len,
            ScanQuery::PRESENT,
            &mut regions,
            &mut present,
        )?;
        let seen = SeenPages::new(len / crate::PAGE_SIZE as u64);
        seen.mark(&present);

        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start: base, len },
            mode: UFFDIO_WRITEPROTECT_MODE_WP,
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads one uffdio_writeprotect; `wp` is
        // that repr(C) struct. Protection changes no memory contents.
        unsafe { ioctl(&uffd, UFFDIO_WRITEPROTECT, &mut wp) }
            .map_err(|e| sys("ioctl UFFDIO_WRITEPROTECT", e))?;
        let zero_fill = ZeroFill::start(base, len / crate::PAGE_SIZE as u64, &present)?;

        let tracker = DirtyTracker {
            uffd,
            pagemap: Arc::new(pagemap),
            base,
            len,
            regions,
            seen: Arc::new(seen),
            zero_fill,
        };
        Ok(tracker)
    }

    /// Appends the gfns written since the previous harvest (or since
    /// [`DirtyTracker::new`]) to `out`, sorted and unique, and re-protects
    /// them. Pages written concurrently with the call are reported either
    /// now or by the next harvest, never lost.
    pub fn harvest(&mut self, out: &mut Vec<u64>) -> Result<(), DomainError> {
        let first = out.len();
        let scanned = pagemap::scan(
            &self.pagemap,
            self.base,
            self.len,
            ScanQuery::WRITTEN_AND_REPROTECT,
            &mut self.regions,
            out,
        );
        // Even after a failed walk: what it reported was re-protected.
        self.seen.mark(&out[first..]);
        scanned.map_err(|e| match e {
            DomainError::DirtyTracking(m) => DomainError::DirtyTracking(format!("{m}; {ADVICE}")),
            e => e,
        })
    }

    /// Appends to `out`, ascending and unique, every page that may hold
    /// data (the rest read as zeros): pages written since their last
    /// harvest, pages in memory other than the zero page, and every page
    /// of the history (present at the arm or reported by a harvest, so
    /// possibly swapped or migrating now: the kernel reports those
    /// entries and a never-written page's write-protect marker alike).
    ///
    /// Never misses a page holding data: such a page was written either
    /// before the arm (present or swapped then: in the history) or after
    /// it (then it is `PAGE_IS_WRITTEN` until a harvest reports it, and in
    /// the history from then on). Must not run concurrently with a harvest
    /// (a page re-protected by it but not yet recorded would be missed);
    /// the engine calls it before the seed's first harvest, on the thread
    /// that harvests.
    pub fn holds_data(&self, out: &mut Vec<u64>) -> Result<(), DomainError> {
        let mut now = Vec::new();
        pagemap::scan(
            &self.pagemap,
            self.base,
            self.len,
            ScanQuery::HOLDS_DATA_TRACKED,
            &mut pagemap::region_buffer(),
            &mut now,
        )?;
        self.seen.union_into(&now, out);
        Ok(())
    }

    /// Waits for the background zero-page fill (for tests).
    #[cfg(test)]
    pub(crate) fn finish_zero_fill(&mut self) {
        self.zero_fill.finish();
    }

    /// The history (for tests).
    #[cfg(test)]
    pub(crate) fn seen(&self) -> &SeenPages {
        &self.seen
    }
}

impl DirtyTracker {
    /// The same harvest, split into stripes scanned by several threads at
    /// once (see [`pagemap::StripeScan`]): the stripes' outputs in order
    /// equal one [`DirtyTracker::harvest`]. Valid while the tracker lives.
    pub fn stripe_scan(&self) -> pagemap::StripeScan {
        let pages = self.len / crate::PAGE_SIZE as u64;
        pagemap::StripeScan::new(
            self.pagemap.clone(),
            self.base,
            pages,
            ScanQuery::WRITTEN_AND_REPROTECT,
        )
        .recording(self.seen.clone())
    }
}

fn sys(op: &'static str, source: io::Error) -> DomainError {
    DomainError::Sys { op, source }
}

/// `ioctl(fd, req, arg)` for requests that return 0 on success.
///
/// # Safety
/// As for [`ioctl_ret`].
unsafe fn ioctl<T>(fd: &impl AsRawFd, req: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: forwarded contract.
    unsafe { ioctl_ret(fd, req, arg) }.map(|_| ())
}

/// `ioctl(fd, req, arg)` returning the kernel's non-negative result.
///
/// # Safety
/// `T` must be the structure `req` takes, and any pointers inside `*arg`
/// must be valid for what the kernel does with them.
unsafe fn ioctl_ret<T>(fd: &impl AsRawFd, req: u64, arg: &mut T) -> io::Result<libc::c_int> {
    // SAFETY: the caller guarantees `*arg` is what `req` reads and writes;
    // the fd is open for the duration of the call (borrowed).
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::pagemap::REGIONS_PER_CALL;
    use crate::PAGE_SIZE;
    use std::time::Instant;

    /// Builds a tracker, or explains why this machine cannot and returns None.
    fn tracker_or_skip(mem: &GuestMemory) -> Option<DirtyTracker> {
        match DirtyTracker::new(mem) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("skipping: kernel dirty tracking unavailable here: {e}");
                None
            }
        }
    }

    fn touch(mem: &GuestMemory, gfn: u64, offset: usize) {
        // SAFETY: offset < PAGE_SIZE inside a page of a private test mapping.
        unsafe { mem.page_ptr(gfn).add(offset).write(0x5a) }
    }

    /// Arming maps the zero page into never-touched pages (so harvests walk
    /// entries, not markers), and they still report their first write.
    #[test]
    fn never_touched_pages_hold_the_zero_page_and_report_writes() {
        let mem = GuestMemory::new(512 * PAGE_SIZE).unwrap();
        touch(&mem, 7, 0);
        let Some(mut t) = tracker_or_skip(&mem) else {
            return;
        };
        t.finish_zero_fill();
        // Mapped, yet not holding data: the zero page.
        for g in [0, 6, 8, 511] {
            assert_eq!(
                pte_state(&mem, g),
                (true, false),
                "gfn {g} unmapped after the arm"
            );
        }
        let mut data = Vec::new();
        t.holds_data(&mut data).unwrap();
        assert_eq!(data, vec![7]);
        for g in [0, 300, 511] {
            touch(&mem, g, 1);
        }
        let mut out = Vec::new();
        t.harvest(&mut out).unwrap();
        assert_eq!(out, vec![0, 300, 511]);
        out.clear();
        t.harvest(&mut out).unwrap();
        assert!(out.is_empty(), "re-reported {out:?}");
    }

    #[test]
    fn reports_exactly_the_written_pages() {
        let mem = GuestMemory::new(256 * PAGE_SIZE).unwrap();
        // Populate some pages before arming: they must not be reported.
        for g in [0, 1, 2, 100] {
            touch(&mem, g, 0);
        }
        let Some(mut t) = tracker_or_skip(&mem) else {
            return;
        };
        let mut out = Vec::new();
        t.harvest(&mut out).unwrap();
        assert_eq!(out, Vec::<u64>::new());

        // Populated and never-touched pages, adjacent runs, the last page.
        let written = [1u64, 2, 3, 7, 100, 101, 200, 255];
        for &g in written.iter().rev() {
            touch(&mem, g, 4095);
        }
        t.harvest(&mut out).unwrap();
        assert_eq!(out, written);

        out.clear();
        t.harvest(&mut out).unwrap();
        assert!(out.is_empty(), "second harvest reported {out:?}");

        // Reading does not dirty; writing again is reported again.
        // SAFETY: plain read inside the private test mapping.
        let _ = unsafe { mem.page_ptr(50).read_volatile() };
        touch(&mem, 3, 17);
        touch(&mem, 0, 0);
        t.harvest(&mut out).unwrap();
        assert_eq!(out, [0, 3]);
    }

    /// `/proc/self/pagemap`'s entry for `gfn` of `mem`: (present, swapped).
    /// Read independently of `PAGEMAP_SCAN`, to know what the test did.
    fn pte_state(mem: &GuestMemory, gfn: u64) -> (bool, bool) {
        use std::os::unix::fs::FileExt;
        let f = File::open("/proc/self/pagemap").unwrap();
        let mut e = [0u8; 8];
        let vpn = mem.page_ptr(gfn) as u64 / PAGE_SIZE as u64;
        f.read_exact_at(&mut e, vpn * 8).unwrap();
        let e = u64::from_le_bytes(e);
        (e >> 63 & 1 == 1, e >> 62 & 1 == 1)
    }

    /// Asks the kernel to swap `gfn` out now (`MADV_PAGEOUT`, Linux >= 5.4);
    /// returns whether it is swapped afterwards (never without swap space).
    fn page_out(mem: &GuestMemory, gfn: u64) -> bool {
        // SAFETY: advice on one page of our own private mapping; MADV_PAGEOUT
        // keeps its contents (they come back from swap on the next access).
        unsafe { libc::madvise(mem.page_ptr(gfn).cast(), PAGE_SIZE, libc::MADV_PAGEOUT) };
        pte_state(mem, gfn) == (false, true)
    }

    /// The seed's present set is what the memory holds: pages written
    /// before the arm, after it (harvested or not, by the striped scanners
    /// too), also once swapped out; never a page only read, nor one never
    /// touched (whose write-protect marker the kernel reports as swapped).
    #[test]
    fn holds_data_is_exactly_the_written_pages_even_swapped() {
        let pages = 1024u64;
        let mem = GuestMemory::new(pages as usize * PAGE_SIZE).unwrap();
        for g in [1, 2, 3, 600] {
            touch(&mem, g, 9);
        }
        // SAFETY: plain reads inside the private test mapping: they map the
        // shared zero page, before and after the arm.
        let _ = unsafe { mem.page_ptr(10).read_volatile() };
        let Some(mut t) = tracker_or_skip(&mem) else {
            return;
        };
        t.finish_zero_fill();
        // SAFETY: as above.
        let _ = unsafe { mem.page_ptr(11).read_volatile() };

        // Present or swapped, not the zero page: the arm filled every hole
        // with the zero page, so no write-protect marker reads as swapped.
        let mut plain = Vec::new();
        let mut regions = pagemap::region_buffer();
        pagemap::scan(
            &t.pagemap,
            t.base,
            t.len,
            ScanQuery::PRESENT,
            &mut regions,
            &mut plain,
        )
        .unwrap();
        assert_eq!(plain, [1, 2, 3, 600], "a marker read as swapped");

        // Written after the arm: 20, 21 harvested by the striped scanners
        // (re-protected), 30 not harvested.
        touch(&mem, 20, 0);
        touch(&mem, 21, 0);
        let mut dirty = Vec::new();
        let scan = t.stripe_scan();
        for r in pagemap::stripes(pages, 2) {
            scan.scan(r, &mut regions, &mut dirty).unwrap();
        }
        assert_eq!(dirty, [20, 21]);
        assert!(t.seen().contains(20) && t.seen().contains(21));
        touch(&mem, 30, 0);

        let swapped: Vec<u64> = [1, 2, 20, 30]
            .into_iter()
            .filter(|&g| page_out(&mem, g))
            .collect();
        if swapped.is_empty() {
            eprintln!(
                "note: MADV_PAGEOUT swapped nothing (no swap space here: see /proc/swaps); \
                 the swapped case is covered by the history only"
            );
        } else {
            eprintln!("swapped out for the test: {swapped:?}");
        }
        let mut held = vec![u64::MAX];
        t.holds_data(&mut held).unwrap();
        assert_eq!(held, [u64::MAX, 1, 2, 3, 20, 21, 30, 600]);
        // The harvest still sees 30 (written, maybe swapped), and only it.
        dirty.clear();
        t.harvest(&mut dirty).unwrap();
        assert_eq!(dirty, [30]);
        // Swapped pages kept their data.
        for g in [1, 2] {
            // SAFETY: a plain read inside the private test mapping.
            assert_eq!(unsafe { mem.page_ptr(g).add(9).read_volatile() }, 0x5a);
        }
    }

    #[test]
    fn loops_when_the_region_vector_fills() {
        let pages = 4 * REGIONS_PER_CALL as u64;
        let mem = GuestMemory::new(pages as usize * PAGE_SIZE).unwrap();
        let Some(mut t) = tracker_or_skip(&mem) else {
            return;
        };
        // Every other page: one region each, 2x the vector's capacity.
        let written: Vec<u64> = (0..pages).step_by(2).collect();
        for &g in &written {
            touch(&mem, g, 1);
        }
        let mut out = vec![u64::MAX]; // harvest appends
        t.harvest(&mut out).unwrap();
        assert_eq!(out[0], u64::MAX);
        assert_eq!(&out[1..], &written[..]);
    }

    /// Harvest cost on 1 GiB with 5000 scattered dirty pages, over never
    /// touched memory (write-protect markers) and fully populated memory.
    /// Run with `cargo test --release harvest_time -- --nocapture` to see
    /// the figures; on a loaded machine compare minimum and median.
    #[test]
    fn harvest_time_1gib_5000_pages() {
        let pages = (1u64 << 30) / PAGE_SIZE as u64;
        for populated in [false, true] {
            let mem = GuestMemory::new(1 << 30).unwrap();
            if populated {
                (0..pages).for_each(|g| touch(&mem, g, 0));
            }
            let t0 = Instant::now();
            let Some(mut t) = tracker_or_skip(&mem) else {
                return;
            };
            let armed = t0.elapsed();
            t.finish_zero_fill();
            eprintln!(
                "arm 1 GiB: {armed:?}, zero fill {:?} (populated {populated})",
                t0.elapsed()
            );
            let mut out = Vec::with_capacity(8192);
            let mut state = 7u64;
            let mut samples = Vec::new();
            for round in 0..20 {
                let mut want: Vec<u64> = (0..5000)
                    .map(|_| super::super::rng::below(&mut state, pages))
                    .collect();
                for &g in &want {
                    touch(&mem, g, round);
                }
                want.sort_unstable();
                want.dedup();
                out.clear();
                let t0 = Instant::now();
                t.harvest(&mut out).unwrap();
                samples.push(t0.elapsed());
                assert_eq!(out, want);
            }
            let t0 = Instant::now();
            out.clear();
            t.harvest(&mut out).unwrap();
            let clean = t0.elapsed();
            samples.sort();
            eprintln!(
                "harvest 1 GiB ({}), ~5000 dirty pages: min {:?} median {:?} max {:?}; \
                 clean harvest {:?}",
                if populated {
                    "populated"
                } else {
                    "never touched"
                },
                samples[0],
                samples[samples.len() / 2],
                samples[samples.len() - 1],
                clean
            );
        }
    }
}
