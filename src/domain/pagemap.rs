//! The `PAGEMAP_SCAN` ioctl on `/proc/self/pagemap` (Linux >= 6.7): ask the
//! kernel which pages of a mapping of ours are in a given state, as runs of
//! pages, optionally write-protecting the matches in the same call.
//!
//! Debian's headers predate it, so the structures and constants are defined
//! here from the kernel's uapi (`linux/fs.h`) and checked against the
//! ioctl number the C macros produce.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::domain::seen::SeenPages;
use crate::domain::{DomainError, GuestMemory};
use crate::PAGE_SIZE;

const PAGE_IS_WRITTEN: u64 = 1 << 1;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
const PAGE_IS_PFNZERO: u64 = 1 << 5;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// One run of pages `[start, end)` (addresses) in the matched categories.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 =
    (3 << 30) | ((std::mem::size_of::<PmScanArg>() as u64) << 16) | ((b'f' as u64) << 8) | 16;
const _: () = assert!(PAGEMAP_SCAN == 0xc060_6610);

/// Regions fetched per call; runs of adjacent pages share one region, so
/// this bounds calls, not pages.
pub const REGIONS_PER_CALL: usize = 8192;

/// What to ask the kernel.
#[derive(Debug, Clone, Copy)]
pub struct ScanQuery {
    flags: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
    /// Matched regions whose categories include any of these bits are not
    /// reported (filtered here: the kernel's masks cannot say "A or (B and
    /// not C)"). Must be 0 for a query that write-protects what it matches.
    skip: u64,
}

impl ScanQuery {
    /// Pages written since they were last write-protected (uffd WP async),
    /// re-protected by the same call: a dirty-log harvest.
    pub const WRITTEN_AND_REPROTECT: ScanQuery = ScanQuery {
        flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
        category_mask: PAGE_IS_WRITTEN,
        category_anyof_mask: 0,
        return_mask: PAGE_IS_WRITTEN,
        skip: 0,
    };

    /// Pages backed by memory or swap, but not the shared zero page (a
    /// never-written page read once maps it: it reads as zeros); every
    /// other page of an anonymous mapping has never been written and reads
    /// as zeros. Only valid on a mapping without userfaultfd write-protect:
    /// its markers on never-written pages count as `PAGE_IS_SWAPPED` too
    /// (see [`ScanQuery::HOLDS_DATA_TRACKED`]).
    pub const PRESENT: ScanQuery = ScanQuery {
        flags: 0,
        category_mask: 0,
        category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO,
        skip: PAGE_IS_PFNZERO,
    };

    /// On a write-protect-tracked mapping: pages present in memory (not the
    /// zero page), or written since their last harvest wherever they are
    /// (memory or swap), without re-protecting anything. A tracked page
    /// that is swapped and write-protected is not reported: the kernel
    /// reports a real swap entry and the uffd-wp marker of a never-written
    /// page alike (`PAGE_IS_SWAPPED`, not `PAGE_IS_WRITTEN`), so those are
    /// known from history instead ([`SeenPages`]).
    pub const HOLDS_DATA_TRACKED: ScanQuery = ScanQuery {
        flags: 0,
        category_mask: 0,
        category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_WRITTEN,
        return_mask: PAGE_IS_PRESENT | PAGE_IS_WRITTEN | PAGE_IS_PFNZERO,
        skip: PAGE_IS_PFNZERO,
    };
}

/// A region buffer for [`scan`].
pub fn region_buffer() -> Vec<PageRegion> {
    vec![PageRegion::default(); REGIONS_PER_CALL]
}

/// Appends to `out` the page indices (relative to `base`) of `[base,
/// base+len)` matching `q`, ascending and unique. `pagemap` is
/// `/proc/self/pagemap`.
///
/// The kernel's regions are not trusted to be disjoint: while another
/// thread writes the range, a page-table walk that is retried (a PMD that
/// changed under it) or resumed after a full region vector can report a
/// page again that was written again after its first report. Seen here as
/// an epoch of 263,142 "dirty pages" in a 262,144-page guest under 200,000
/// rewrites/s; the duplicate is harmless to report once (it is dirty).
pub fn scan(
    pagemap: &File,
    base: u64,
    len: u64,
    q: ScanQuery,
    regions: &mut [PageRegion],
    out: &mut Vec<u64>,
) -> Result<(), DomainError> {
    scan_with(
        |start, end, regions| pagemap_scan(pagemap, start, end, q, regions),
        base,
        base..base + len,
        regions,
        out,
    )
}

/// `regions` as returned by one walk for `q`, without those `q` skips.
fn kept(regions: &mut [PageRegion], n: usize, q: ScanQuery) -> usize {
    let n = n.min(regions.len());
    if q.skip == 0 {
        return n;
    }
    let mut keep = 0;
    for i in 0..n {
        if regions[i].categories & q.skip == 0 {
            regions[keep] = regions[i];
            keep += 1;
        }
    }
    keep
}

/// The scan loop over addresses `span`, with `walk` standing for one
/// `PAGEMAP_SCAN` call (it fills `regions` from `start` up to `end` and
/// returns how many it filled and where it stopped). Appends page indices
/// relative to `origin`, ascending and unique.
pub fn scan_with(
    mut walk: impl FnMut(u64, u64, &mut [PageRegion]) -> Result<(usize, u64), DomainError>,
    origin: u64,
    span: std::ops::Range<u64>,
    regions: &mut [PageRegion],
    out: &mut Vec<u64>,
) -> Result<(), DomainError> {
    let (mut start, end) = (span.start, span.end);
    let first = out.len();
    let page = PAGE_SIZE as u64;
    while start < end {
        let (n, walk_end) = walk(start, end, regions)?;
        for r in &regions[..n.min(regions.len())] {
            out.extend((r.start - origin) / page..(r.end - origin) / page);
        }
        // The kernel stops early (walk_end < end) when the region vector is
        // full; continue from where it stopped.
        if walk_end <= start || walk_end > end {
            return Err(DomainError::DirtyTracking(format!(
                "PAGEMAP_SCAN made no progress (start {start:#x}, walk_end {walk_end:#x}, end {end:#x})"
            )));
        }
        start = walk_end;
    }
    sort_unique_tail(out, first);
    Ok(())
}

/// One `PAGEMAP_SCAN` call over `[start, end)`: the regions it filled and
/// the address its walk stopped at.
fn pagemap_scan(
    pagemap: &File,
    start: u64,
    end: u64,
    q: ScanQuery,
    regions: &mut [PageRegion],
) -> Result<(usize, u64), DomainError> {
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        flags: q.flags,
        start,
        end,
        vec: regions.as_mut_ptr() as u64,
        vec_len: regions.len() as u64,
        category_mask: q.category_mask,
        category_anyof_mask: q.category_anyof_mask,
        return_mask: q.return_mask,
        ..PmScanArg::default()
    };
    loop {
        // SAFETY: PAGEMAP_SCAN reads and writes one pm_scan_arg (`arg`,
        // repr(C)) and writes at most `vec_len` page_regions to `vec`,
        // which points at `regions` of that length, exclusively borrowed.
        let r = unsafe {
            libc::ioctl(
                pagemap.as_raw_fd(),
                PAGEMAP_SCAN as _,
                &mut arg as *mut PmScanArg,
            )
        };
        if r >= 0 {
            return Ok((kept(regions, r as usize, q), arg.walk_end));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ENOTTY) => {
                return Err(DomainError::DirtyTracking(format!(
                    "PAGEMAP_SCAN not supported by this kernel ({e}): needs Linux >= 6.7"
                )))
            }
            _ => {
                return Err(DomainError::Sys {
                    op: "ioctl PAGEMAP_SCAN",
                    source: e,
                })
            }
        }
    }
}

/// Pages per 2 MiB page-table leaf: stripes start on one, so no two
/// scanners walk the same PMD.
pub const STRIPE_ALIGN: u64 = 512;

/// Splits `pages` pages into at most `n` contiguous, ascending, disjoint
/// stripes of near-equal size, each starting on a [`STRIPE_ALIGN`]
/// boundary (fewer stripes when the range is small; none when empty).
pub fn stripes(pages: u64, n: usize) -> Vec<std::ops::Range<u64>> {
    let units = pages.div_ceil(STRIPE_ALIGN);
    let n = (n.max(1) as u64).min(units);
    let mut out = Vec::with_capacity(n as usize);
    let mut from = 0;
    for i in 0..n {
        let len = units / n + u64::from(i < units % n);
        let to = ((from + len) * STRIPE_ALIGN).min(pages);
        out.push(from * STRIPE_ALIGN..to);
        from += len;
    }
    out
}

/// One tracked mapping, scannable by stripes from several threads at
/// once (each with its own region buffer). Cloning shares the pagemap
/// file. Stripes are disjoint page ranges; a page is reported by the
/// stripe holding it only, so the stripes' outputs concatenated in stripe
/// order equal one scan of the whole mapping.
#[derive(Debug, Clone)]
pub struct StripeScan {
    pagemap: std::sync::Arc<File>,
    base: u64,
    pages: u64,
    query: ScanQuery,
    /// Where every reported page is recorded, if the owner keeps a history.
    seen: Option<std::sync::Arc<SeenPages>>,
}

impl StripeScan {
    /// `pagemap` is `/proc/self/pagemap`; the mapping of `pages` pages at
    /// `base` must outlive every scan.
    pub fn new(pagemap: std::sync::Arc<File>, base: u64, pages: u64, query: ScanQuery) -> Self {
        StripeScan {
            pagemap,
            base,
            pages,
            query,
            seen: None,
        }
    }

    /// Records every page a scan reports in `seen` before the scan returns.
    pub fn recording(mut self, seen: std::sync::Arc<SeenPages>) -> Self {
        self.seen = Some(seen);
        self
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Appends the matching gfns of `gfns` (clamped to the mapping) to
    /// `out`, ascending and unique.
    pub fn scan(
        &self,
        gfns: std::ops::Range<u64>,
        regions: &mut [PageRegion],
        out: &mut Vec<u64>,
    ) -> Result<(), DomainError> {
        let page = PAGE_SIZE as u64;
        let (from, to) = (gfns.start.min(self.pages), gfns.end.min(self.pages));
        let (pagemap, q) = (&*self.pagemap, self.query);
        let first = out.len();
        let scanned = scan_with(
            |start, end, regions| pagemap_scan(pagemap, start, end, q, regions),
            self.base,
            self.base + from * page..self.base + to * page,
            regions,
            out,
        );
        // Even after a failed walk: what it reported was re-protected.
        if let Some(seen) = &self.seen {
            seen.mark(&out[first..]);
        }
        scanned
    }
}

/// Makes `out[from..]` ascending and duplicate-free; costs one comparison
/// per element when it already is (the common case).
pub fn sort_unique_tail(out: &mut Vec<u64>, from: usize) {
    let tail = &mut out[from..];
    if tail.windows(2).all(|w| w[0] < w[1]) {
        return;
    }
    tail.sort_unstable();
    let mut keep = from;
    for i in from..out.len() {
        if i == from || out[i] != out[keep - 1] {
            out[keep] = out[i];
            keep += 1;
        }
    }
    out.truncate(keep);
}

/// Pages of `mem` that were ever written (present in memory or swap);
/// the rest read as zeros.
pub fn present_pages(mem: &GuestMemory, out: &mut Vec<u64>) -> Result<(), DomainError> {
    let pagemap = File::open("/proc/self/pagemap").map_err(|source| DomainError::Sys {
        op: "open /proc/self/pagemap",
        source,
    })?;
    let mut regions = region_buffer();
    scan(
        &pagemap,
        mem.as_ptr() as u64,
        mem.len() as u64,
        ScanQuery::PRESENT,
        &mut regions,
        out,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_reports_become_sorted_and_unique() {
        // What an overlapping second report looks like after the first.
        let mut out = vec![7, 1, 2, 3, 9, 10, 2, 3, 4, 10];
        sort_unique_tail(&mut out, 1);
        assert_eq!(out, [7, 1, 2, 3, 4, 9, 10]);
        let mut clean = vec![1, 2, 5];
        sort_unique_tail(&mut clean, 0);
        assert_eq!(clean, [1, 2, 5]);
        let mut empty: Vec<u64> = vec![3];
        sort_unique_tail(&mut empty, 1);
        assert_eq!(empty, [3]);
    }

    /// A stand-in for the kernel over the pages `dirty` (sorted) of a
    /// mapping at `origin`: fills at most `regions.len()` runs from `start`
    /// and, like a retried page-table walk, reports every second run again
    /// (whole, then its tail) when there is room.
    fn fake_walk(
        dirty: &[u64],
        origin: u64,
    ) -> impl FnMut(u64, u64, &mut [PageRegion]) -> Result<(usize, u64), DomainError> + '_ {
        let page = PAGE_SIZE as u64;
        move |start, end, regions| {
            let (g0, g1) = ((start - origin) / page, (end - origin) / page);
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for &g in dirty.iter().filter(|&&g| g >= g0 && g < g1) {
                match runs.last_mut() {
                    Some(r) if r.1 == g => r.1 += 1,
                    _ => runs.push((g, g + 1)),
                }
            }
            let mut n = 0;
            let mut walk_end = end;
            for (i, &(a, b)) in runs.iter().enumerate() {
                let extra = if i % 2 == 1 { 2 } else { 0 };
                if n + 1 + extra > regions.len() {
                    walk_end = origin + a * page;
                    break;
                }
                let at = |g: u64| origin + g * page;
                regions[n] = PageRegion {
                    start: at(a),
                    end: at(b),
                    categories: 0,
                };
                n += 1;
                if extra > 0 {
                    regions[n] = regions[n - 1];
                    regions[n + 1] = PageRegion {
                        start: at((a + b) / 2),
                        end: at(b),
                        categories: 0,
                    };
                    n += 2;
                }
            }
            Ok((n, walk_end))
        }
    }

    #[test]
    fn stripes_cover_the_range_disjoint_and_aligned() {
        for (pages, n) in [
            (0u64, 4usize),
            (1, 4),
            (511, 2),
            (512, 2),
            (1025, 2),
            (1 << 18, 3),
            (1 << 18, 16),
        ] {
            let s = stripes(pages, n);
            assert!(s.len() <= n.max(1));
            assert_eq!(s.first().map_or(0, |r| r.start), 0);
            assert_eq!(s.last().map_or(0, |r| r.end), pages);
            for w in s.windows(2) {
                assert_eq!(w[0].end, w[1].start, "{pages} pages in {n}: {s:?}");
            }
            assert!(
                s.iter()
                    .all(|r| r.start % STRIPE_ALIGN == 0 && r.start < r.end),
                "{s:?}"
            );
        }
    }

    /// The striped harvest's result is the single scan's, including when
    /// the kernel reports runs twice or overlapping (the case that once
    /// gave 263,142 "dirty pages" out of 262,144).
    #[test]
    fn striped_scan_equals_one_scan_with_overlapping_regions() {
        let origin = 0x7f00_0000_0000u64;
        let pages = 40_000u64;
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut dirty: Vec<u64> = (0..6000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state % pages
            })
            .collect();
        // Runs across every stripe boundary, the first and the last page.
        dirty.extend([0, 511, 512, 513, pages - 1]);
        dirty.extend(
            stripes(pages, 4)
                .iter()
                .flat_map(|r| r.start.saturating_sub(3)..r.start + 3),
        );
        dirty.sort_unstable();
        dirty.dedup();
        let page = PAGE_SIZE as u64;
        let mut regions = vec![PageRegion::default(); 7];
        let mut one = vec![42];
        scan_with(
            fake_walk(&dirty, origin),
            origin,
            origin..origin + pages * page,
            &mut regions,
            &mut one,
        )
        .unwrap();
        assert_eq!(one[0], 42);
        assert_eq!(&one[1..], &dirty[..], "single scan");
        for n in [2, 3, 4, 16] {
            let mut striped = vec![42];
            for r in stripes(pages, n) {
                let span = origin + r.start * page..origin + r.end * page;
                scan_with(
                    fake_walk(&dirty, origin),
                    origin,
                    span,
                    &mut regions,
                    &mut striped,
                )
                .unwrap();
            }
            sort_unique_tail(&mut striped, 1);
            assert_eq!(striped, one, "{n} stripes");
        }
    }

    #[test]
    fn present_pages_are_the_written_ones() {
        let mem = GuestMemory::new(64 * PAGE_SIZE).unwrap();
        for g in [0u64, 5, 6, 63] {
            mem.write_page(g, &[1; PAGE_SIZE]);
        }
        let mut out = Vec::new();
        match present_pages(&mem, &mut out) {
            Ok(()) => assert_eq!(out, [0, 5, 6, 63]),
            Err(e) => eprintln!("SKIP: {e}"),
        }
    }
}
