//! Planning the foreign mappings of guest memory, and reading a PV guest's
//! physical-to-machine table. Pure functions; `map.rs` executes the plan.
//!
//! Guest memory is mapped once into one reserved, contiguous range (frame
//! `g` at offset `g * 4096`), so the engine sees it as ordinary
//! [`GuestMemory`](crate::domain::GuestMemory). The mapping is made in
//! batches (one privcmd ioctl each, bounded so a single call never holds
//! the hypervisor for long) and only over frames that exist: holes in the
//! physmap (an invalid p2m entry, an HVM MMIO hole) get a private zero page
//! instead, so a read there yields zeros rather than SIGBUS.
//!
//! For a PV guest the frames handed to the mapping call are machine frames
//! (MFNs) taken from the guest's own p2m, which Xen's save code reads the
//! same way: shared_info names the frame-list-list, whose entries name the
//! frame-list pages, whose entries name the p2m pages.

use std::ops::Range;

/// What a run of consecutive guest frames becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Guest frames `frames` (indices into the plan's input).
    pub frames: Range<usize>,
    /// True: no frame behind these (map zeros). False: map them, one
    /// foreign-map call.
    pub hole: bool,
}

/// Splits `frames` (the frame to map for each guest pfn, or `invalid` for
/// none) into runs: maximal runs of holes, and runs of real frames of at
/// most `max_batch` each. The runs cover `0..frames.len()` in order.
pub fn plan(frames: &[u64], invalid: u64, max_batch: usize) -> Vec<Run> {
    let max_batch = max_batch.max(1);
    let mut out: Vec<Run> = Vec::new();
    for (i, &f) in frames.iter().enumerate() {
        let hole = f == invalid;
        match out.last_mut() {
            Some(r) if r.hole == hole && (hole || r.frames.len() < max_batch) => {
                r.frames.end = i + 1;
            }
            _ => out.push(Run {
                frames: i..i + 1,
                hole,
            }),
        }
    }
    out
}

/// Coalesces the per-frame errors of one mapping call into runs of failed
/// frames (relative to the call's first frame), to be backed by zeros.
pub fn failed_runs(errs: &[i32]) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for (i, &e) in errs.iter().enumerate() {
        if e == 0 {
            continue;
        }
        match out.last_mut() {
            Some(r) if r.end == i => r.end = i + 1,
            _ => out.push(i..i + 1),
        }
    }
    out
}

/// The ranges of `0..len` not covered by `runs` (sorted, disjoint, as
/// [`failed_runs`] makes them): the frames a batch did map.
pub fn complement(runs: &[Range<usize>], len: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut at = 0;
    for r in runs {
        if r.start > at {
            out.push(at..r.start);
        }
        at = at.max(r.end);
    }
    if at < len {
        out.push(at..len);
    }
    out
}

/// Where the replicated layout ends: after the last page before the first
/// run of at least `gap` hole pages that reaches the end of the physmap
/// or is followed only by a few pages (an HVM/PVH physmap places its
/// special pages, xenstore and console rings, just below 4 GiB, far above
/// RAM). `holes` are sorted, disjoint ranges of `0..len`. Returns `len`
/// when no such gap exists.
pub fn layout_end(holes: &[Range<usize>], len: usize, gap: usize) -> usize {
    // Holes come per mapping batch: merge touching ranges first.
    let mut merged: Vec<Range<usize>> = Vec::new();
    for h in holes {
        match merged.last_mut() {
            Some(m) if m.end == h.start => m.end = h.end,
            _ => merged.push(h.clone()),
        }
    }
    merged
        .iter()
        .find(|h| h.len() >= gap)
        .map(|h| h.start.max(1))
        .unwrap_or(len)
}

/// Gfns in `from..len` that are not in any of `holes` (ranges of
/// `0..len`): the populated pages above an HVM layout's end.
pub fn populated_from(holes: &[Range<usize>], from: usize, len: usize) -> Vec<u64> {
    let mut hole = vec![false; len.saturating_sub(from)];
    for h in holes {
        for g in h.start.max(from)..h.end.min(len) {
            hole[g - from] = true;
        }
    }
    (from..len)
        .filter(|g| !hole[g - from])
        .map(|g| g as u64)
        .collect()
}

/// Sorted hole ranges as (start, end) pairs, touching or overlapping ones
/// merged and empty ones dropped.
pub fn merged(holes: &[Range<usize>]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for h in holes.iter().filter(|h| !h.is_empty()) {
        match out.last_mut() {
            Some(l) if l.1 >= h.start as u64 => l.1 = l.1.max(h.end as u64),
            _ => out.push((h.start as u64, h.end as u64)),
        }
    }
    out
}

/// Errors reading a PV guest's p2m.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum P2mError {
    #[error("guest word width {0} is not 4 or 8")]
    Width(u32),
    #[error(
        "p2m of {pfns} frames needs {needed} frame-list entries, the frame-list-list holds {max}"
    )]
    TooLarge { pfns: u64, needed: u64, max: u64 },
    #[error("{what} page {index} is {got} bytes, not 4096")]
    PageSize {
        what: &'static str,
        index: usize,
        got: usize,
    },
}

/// Entries of one p2m page for a guest of word width `width` bytes.
fn per_page(width: u32) -> Result<u64, P2mError> {
    match width {
        4 | 8 => Ok(crate::PAGE_SIZE as u64 / width as u64),
        w => Err(P2mError::Width(w)),
    }
}

/// The invalid p2m entry for a guest of `width` bytes (all ones).
pub fn invalid_entry(width: u32) -> u64 {
    if width == 4 {
        u32::MAX as u64
    } else {
        u64::MAX
    }
}

/// How many p2m pages and frame-list pages hold `pfns` entries.
pub fn p2m_shape(pfns: u64, width: u32) -> Result<(u64, u64), P2mError> {
    let per = per_page(width)?;
    let p2m_pages = pfns.div_ceil(per);
    let list_pages = p2m_pages.div_ceil(per);
    if list_pages > per {
        return Err(P2mError::TooLarge {
            pfns,
            needed: list_pages,
            max: per,
        });
    }
    Ok((p2m_pages, list_pages))
}

/// Reads `n` little-endian guest words of `width` bytes from `pages` in
/// order (each page exactly 4096 bytes).
pub fn read_entries(
    pages: &[&[u8]],
    width: u32,
    n: u64,
    what: &'static str,
) -> Result<Vec<u64>, P2mError> {
    let per = per_page(width)? as usize;
    let w = width as usize;
    let mut out = Vec::with_capacity(n as usize);
    for (index, p) in pages.iter().enumerate() {
        if p.len() != crate::PAGE_SIZE {
            return Err(P2mError::PageSize {
                what,
                index,
                got: p.len(),
            });
        }
        for e in 0..per {
            if out.len() as u64 == n {
                return Ok(out);
            }
            let b = &p[e * w..e * w + w];
            out.push(match w {
                4 => u32::from_le_bytes(b.try_into().expect("4 bytes")) as u64,
                _ => u64::from_le_bytes(b.try_into().expect("8 bytes")),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const X: u64 = u64::MAX;

    #[test]
    fn plan_splits_holes_and_caps_batches() {
        let frames = [10, 11, X, X, 12, 13, 14, 15, 16, X];
        let p = plan(&frames, X, 3);
        let runs: Vec<(Range<usize>, bool)> = p.into_iter().map(|r| (r.frames, r.hole)).collect();
        assert_eq!(
            runs,
            vec![
                (0..2, false),
                (2..4, true),
                (4..7, false),
                (7..9, false),
                (9..10, true)
            ]
        );
        assert!(plan(&[], X, 8).is_empty());
        // A zero batch size still makes progress.
        assert_eq!(plan(&[1, 2], X, 0).len(), 2);
    }

    #[test]
    fn plan_covers_every_frame_once() {
        let frames: Vec<u64> = (0..1000).map(|i| if i % 13 < 3 { X } else { i }).collect();
        let p = plan(&frames, X, 64);
        let mut next = 0;
        for r in &p {
            assert_eq!(r.frames.start, next);
            assert!(r.hole || r.frames.len() <= 64);
            assert!(r.frames.clone().all(|i| (frames[i] == X) == r.hole));
            next = r.frames.end;
        }
        assert_eq!(next, frames.len());
    }

    #[test]
    fn failed_runs_coalesce() {
        assert_eq!(
            failed_runs(&[0, -14, -14, 0, 0, -2, 0, -1]),
            vec![1..3, 5..6, 7..8]
        );
        assert!(failed_runs(&[0, 0]).is_empty());
    }

    #[test]
    fn layout_ends_before_the_first_big_gap() {
        // RAM 0..32768, a small hole inside RAM, special pages near the top.
        let holes = [100..110, 32768..1_044_000, 1_044_010..1_044_480];
        assert_eq!(layout_end(&holes, 1_044_480, 16384), 32768);
        // The same gap reported in batch-sized pieces.
        let pieces: Vec<Range<usize>> = (32..1019).map(|b| b * 1024..(b + 1) * 1024).collect();
        assert_eq!(layout_end(&pieces, 1_044_480, 16384), 32768);
        // No big gap: the whole physmap.
        assert_eq!(layout_end(&holes[..1], 40000, 16384), 40000);
        // The special pages above the end, and the holes merged.
        assert_eq!(
            populated_from(&holes, 32768, 1_044_480),
            (1_044_000..1_044_010).collect::<Vec<u64>>()
        );
        assert_eq!(populated_from(&holes, 10, 5), Vec::<u64>::new());
        let touching = [0xa0..0xb0, 0xb0..0xc0, 0xc0..0xc0, 0x100..0x110];
        assert_eq!(merged(&touching), [(0xa0, 0xc0), (0x100, 0x110)]);
        // Never an empty layout.
        assert_eq!(
            layout_end(std::slice::from_ref(&(0..50000)), 50000, 16384),
            1
        );
    }

    #[test]
    fn complement_is_what_the_batch_mapped() {
        let errs = [0, -14, -14, 0, 0, -2, 0, -1];
        let f = failed_runs(&errs);
        assert_eq!(complement(&f, errs.len()), vec![0..1, 3..5, 6..7]);
        assert_eq!(complement(&[], 3), vec![0..3]);
        assert!(complement(std::slice::from_ref(&(0..3)), 3).is_empty());
        // Every index is in exactly one of the two.
        let c = complement(&f, errs.len());
        for (i, e) in errs.iter().enumerate() {
            let in_f = f.iter().any(|r| r.contains(&i));
            let in_c = c.iter().any(|r| r.contains(&i));
            assert!(in_f ^ in_c, "index {i}");
            assert_eq!(in_f, *e != 0);
        }
    }

    #[test]
    fn p2m_shape_for_both_widths() {
        // 256 MiB guest: 65536 pfns; 512 entries per page (64-bit).
        assert_eq!(p2m_shape(65536, 8).unwrap(), (128, 1));
        assert_eq!(p2m_shape(65537, 8).unwrap(), (129, 1));
        assert_eq!(p2m_shape(65536, 4).unwrap(), (64, 1));
        assert_eq!(p2m_shape(0, 8).unwrap(), (0, 0));
        assert_eq!(p2m_shape(1, 3), Err(P2mError::Width(3)));
        // More than one frame-list-list page would be needed.
        assert!(matches!(
            p2m_shape(512 * 512 * 513, 8),
            Err(P2mError::TooLarge { .. })
        ));
    }

    #[test]
    fn entries_read_little_endian_and_stop_at_n() {
        let mut a = vec![0u8; 4096];
        a[..8].copy_from_slice(&7u64.to_le_bytes());
        a[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        let mut b = vec![0u8; 4096];
        b[..8].copy_from_slice(&99u64.to_le_bytes());
        let got = read_entries(&[&a, &b], 8, 513, "p2m").unwrap();
        assert_eq!(got.len(), 513);
        assert_eq!((got[0], got[1], got[512]), (7, u64::MAX, 99));
        let got32 = read_entries(&[&a], 4, 3, "p2m").unwrap();
        assert_eq!(got32, vec![7, 0, u32::MAX as u64]);
        assert!(matches!(
            read_entries(&[&a[..100]], 8, 1, "p2m"),
            Err(P2mError::PageSize { got: 100, .. })
        ));
        assert_eq!(invalid_entry(4), u32::MAX as u64);
    }
}
