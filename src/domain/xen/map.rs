//! Guest memory as one foreign mapping, and the PV guest's p2m.
//!
//! Invariants:
//! - [`map_frames`] returns a mapping where page `i` shows frame
//!   `frames[i]` of the domain, or zeros where `frames[i]` is `invalid` or
//!   the hypervisor refused the frame (a hole). It is made once and kept
//!   across epochs (no per-epoch map/unmap cost); [`remap`] replaces the
//!   pages whose frame changed (a PV guest that exchanged pages).
//! - The mapping's holes are a private anonymous reservation, so every byte
//!   of the range is readable.

use std::ptr::NonNull;

use super::batch::{self, Run};
use super::ffi;
use super::sys::{Foreign, Result, XenError};
use crate::domain::GuestMemory;
use crate::PAGE_SIZE;

/// Frames per privcmd call: 1024 pages (4 MiB), Xen's save batch size.
pub const MAX_BATCH: usize = 1024;

/// Reserves `pages` readable zero pages (the background for holes).
fn reserve(domid: u32, pages: usize) -> Result<NonNull<u8>> {
    // SAFETY: a fresh anonymous mapping at a kernel-chosen address.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            pages.max(1) * PAGE_SIZE,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(XenError::Call {
            call: "mmap(reserve guest range)",
            domid,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(NonNull::new(p.cast()).expect("mmap returned null without MAP_FAILED"))
}

/// Puts zero pages back over `pages` pages at `at` (a failed frame).
///
/// # Safety
/// `at` lies in a reservation made by [`reserve`] that we own.
unsafe fn zero_fill(domid: u32, at: *mut u8, pages: usize) -> Result<()> {
    // SAFETY: the caller owns the range; MAP_FIXED replaces only it.
    let p = unsafe {
        libc::mmap(
            at.cast(),
            pages * PAGE_SIZE,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(XenError::Call {
            call: "mmap(zero page over a hole)",
            domid,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Maps the runs of `plan` over `base` (a reservation of `frames.len()`
/// pages). Appends the ranges of pages that ended up as holes to `holes`.
///
/// # Safety
/// `base` is a reservation of at least `frames.len()` pages we own, with
/// no Rust reference into it.
unsafe fn map_runs(
    fm: &Foreign,
    domid: u32,
    base: *mut u8,
    frames: &[u64],
    runs: &[Run],
    prot: i32,
    holes: &mut Vec<std::ops::Range<usize>>,
) -> Result<()> {
    let mut errs = vec![0i32; MAX_BATCH];
    for r in runs {
        // SAFETY: r.frames lies within the reservation (plan covers
        // 0..frames.len()).
        let at = unsafe { base.add(r.frames.start * PAGE_SIZE) };
        if r.hole {
            // SAFETY: as above; a hole may overwrite an old mapping (remap).
            unsafe { zero_fill(domid, at, r.frames.len())? };
            holes.push(r.frames.clone());
            continue;
        }
        // SAFETY: as above.
        let made = unsafe { map_batch(fm, domid, at, &frames[r.frames.clone()], prot, &mut errs)? };
        holes.extend(
            made.into_iter()
                .map(|h| h.start + r.frames.start..h.end + r.frames.start),
        );
    }
    Ok(())
}

/// Maps one batch of real frames at `at`. Frames the hypervisor refuses
/// become zero pages. A privcmd mapping cannot be partly replaced (the
/// kernel refuses to split it: EINVAL), so a batch with refused frames is
/// dropped whole and its good sub-runs are mapped again on their own; a
/// sub-run refused again becomes zeros whole. Returns the holes made
/// (relative to `at`).
///
/// # Safety
/// `at .. at + frames.len()` pages lie in a reservation we own.
unsafe fn map_batch(
    fm: &Foreign,
    domid: u32,
    at: *mut u8,
    frames: &[u64],
    prot: i32,
    errs: &mut [i32],
) -> Result<Vec<std::ops::Range<usize>>> {
    let list: Vec<ffi::xen_pfn_t> = frames.iter().map(|&f| f as ffi::xen_pfn_t).collect();
    let errs = &mut errs[..list.len()];
    errs.fill(0);
    // SAFETY: the caller owns the target range.
    if let Err(e) = unsafe { fm.map_fixed(domid, at, prot, &list, errs) } {
        // The failed call may have unmapped the range: restore it.
        // SAFETY: as above.
        unsafe { zero_fill(domid, at, list.len())? };
        tracing::debug!("domain {domid}: a batch of {} frames: {e}", list.len());
        return Ok(std::iter::once(0..list.len()).collect());
    }
    let failed = batch::failed_runs(errs);
    if failed.is_empty() {
        return Ok(Vec::new());
    }
    // SAFETY: replaces exactly the batch's own mapping (no split).
    unsafe { zero_fill(domid, at, list.len())? };
    let mut holes = failed.clone();
    for good in batch::complement(&failed, list.len()) {
        let sub = &list[good.clone()];
        // SAFETY: a sub-range of the caller's range.
        let at = unsafe { at.add(good.start * PAGE_SIZE) };
        let errs = &mut errs[..sub.len()];
        errs.fill(0);
        // SAFETY: as above.
        let ok = unsafe { fm.map_fixed(domid, at, prot, sub, errs) }.is_ok()
            && errs.iter().all(|&e| e == 0);
        if !ok {
            // SAFETY: as above; replaces exactly the sub-run's mapping.
            unsafe { zero_fill(domid, at, sub.len())? };
            holes.push(good);
        }
    }
    holes.sort_by_key(|h| h.start);
    Ok(holes)
}

/// Maps `frames` (frame per guest pfn; `invalid` for none) of `domid`
/// read-only into one range. Returns the memory and the ranges of pages
/// left as holes (zeros).
pub fn map_frames(
    fm: &Foreign,
    domid: u32,
    frames: &[u64],
    invalid: u64,
    prot: i32,
) -> Result<(GuestMemory, Vec<std::ops::Range<usize>>)> {
    let base = reserve(domid, frames.len())?;
    // SAFETY: `base` is ours from here until GuestMemory owns it below.
    let mem = unsafe { GuestMemory::from_raw_mapping(base, frames.len().max(1) * PAGE_SIZE) };
    let runs = batch::plan(frames, invalid, MAX_BATCH);
    let mut holes = Vec::new();
    // SAFETY: the reservation covers frames.len() pages; `mem` hands out
    // only raw pointers, none used yet.
    unsafe { map_runs(fm, domid, base.as_ptr(), frames, &runs, prot, &mut holes)? };
    Ok((mem, holes))
}

/// Re-maps the pages whose frame differs between `old` and `new` (same
/// length), in place. Called while the guest is paused.
pub fn remap(
    fm: &Foreign,
    domid: u32,
    mem: &GuestMemory,
    old: &[u64],
    new: &[u64],
    invalid: u64,
) -> Result<usize> {
    let mut changed = 0;
    let mut i = 0;
    while i < new.len() {
        if old[i] == new[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < new.len() && old[i] != new[i] {
            i += 1;
        }
        let runs: Vec<Run> = batch::plan(&new[start..i], invalid, MAX_BATCH)
            .into_iter()
            .map(|r| Run {
                frames: r.frames.start + start..r.frames.end + start,
                hole: r.hole,
            })
            .collect();
        let mut holes = Vec::new();
        // SAFETY: `mem` is the reservation made by map_frames for these
        // frames; the guest is paused and castor holds no reference into
        // the changed pages.
        unsafe {
            map_runs(
                fm,
                domid,
                mem.as_ptr(),
                new,
                &runs,
                libc::PROT_READ,
                &mut holes,
            )?
        };
        changed += i - start;
    }
    Ok(changed)
}

/// A 64-bit PV guest's p2m as read at open.
pub struct PvP2m {
    /// Machine frame of every pfn, all-ones for none.
    pub frames: Vec<u64>,
    /// Machine frames of the p2m pages themselves, in table order.
    pub table_frames: Vec<u64>,
}

/// Reads a 64-bit PV guest's p2m. `shinfo` is the guest's shared-info page.
pub fn read_pv_p2m(fm: &Foreign, domid: u32, shinfo: &[u8]) -> Result<PvP2m> {
    let off_max = std::mem::offset_of!(ffi::shared_info, arch)
        + std::mem::offset_of!(ffi::arch_shared_info, max_pfn);
    let off_fll = std::mem::offset_of!(ffi::shared_info, arch)
        + std::mem::offset_of!(ffi::arch_shared_info, pfn_to_mfn_frame_list_list);
    let word = |o: usize| u64::from_le_bytes(shinfo[o..o + 8].try_into().expect("8 bytes"));
    let (pfns, fll) = (word(off_max), word(off_fll));
    let bad = |reason: String| XenError::State { domid, reason };
    if fll == 0 || fll == u64::MAX {
        return Err(bad(format!(
            "the guest publishes no p2m frame-list-list (shared_info says {fll:#x}): \
             a 3-level p2m tree is needed (very large guests use a linear p2m castor does not read)"
        )));
    }
    let (p2m_pages, list_pages) =
        batch::p2m_shape(pfns, 8).map_err(|e| bad(format!("p2m of max_pfn {pfns}: {e}")))?;
    let read = |frames: &[u64], n: u64, what: &'static str| -> Result<Vec<u64>> {
        let (m, holes) = map_frames(fm, domid, frames, u64::MAX, libc::PROT_READ)?;
        if !holes.is_empty() {
            return Err(bad(format!(
                "{} of the {what} pages could not be mapped",
                holes.iter().map(|h| h.len()).sum::<usize>()
            )));
        }
        // SAFETY: a private read-only mapping of p2m metadata; the guest is
        // paused while this is read.
        let bytes = unsafe { m.as_slice() };
        let pages: Vec<&[u8]> = bytes.chunks(PAGE_SIZE).take(frames.len()).collect();
        batch::read_entries(&pages, 8, n, what).map_err(|e| bad(e.to_string()))
    };
    let lists = read(&[fll], list_pages, "p2m frame-list-list")?;
    let table_frames = read(&lists, p2m_pages, "p2m frame-list")?;
    let frames = read(&table_frames, pfns, "p2m")?;
    Ok(PvP2m {
        frames,
        table_frames,
    })
}
