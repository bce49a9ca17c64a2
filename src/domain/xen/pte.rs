//! PV page tables across machines: normalise (machine frames → guest
//! pfns, on the primary) and localise (pfns → the replica's machine
//! frames, on the backup), and the page types Xen reports for each frame.
//!
//! A PV guest's page tables hold machine frame numbers (MFNs): they are
//! meaningless in another domain. Xen's own stream (`xg_sr_save_x86_pv.c`,
//! `normalise_pagetable`) rewrites every present entry of every page typed
//! L1..L4 to the pfn the guest's p2m maps to that MFN, and clears the
//! hypervisor's L4 slots (Xen fills them in when the table is pinned);
//! the restore (`xg_sr_restore_x86_pv.c`, `localise_pagetable`) rewrites
//! each pfn to the new domain's MFN, then pins the tables. This module is
//! that rewriting, pure and checked: an entry whose frame is not in the
//! map is an error naming the table's pfn, the slot and the entry, never a
//! wrong frame written into a page table.
//!
//! Invariant: [`MfnMap`] is a bijection between the p2m's valid entries
//! and their pfns (a p2m listing one MFN at two pfns is refused when the
//! map is built, so normalising can never pick the wrong pfn).

use std::collections::HashMap;

/// Frame bits of an x86-64 PTE (bits 12..51).
pub const PTE_FRAME_MASK: u64 = 0x000f_ffff_ffff_f000;
/// The present bit.
pub const PTE_PRESENT: u64 = 1;
/// Entries in one page-table page.
pub const ENTRIES: usize = 512;
/// L4 slots that belong to Xen in a 64-bit PV guest's top-level table
/// (HYPERVISOR_VIRT_START 0xffff800000000000 to _END 0xffff880000000000,
/// inclusive, as Xen's save clears them).
pub const XEN_L4_SLOTS: std::ops::RangeInclusive<usize> = 256..=272;

/// Errors normalising or localising a page table, or decoding a type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PteError {
    #[error(
        "pfn {pfn:#x} (L{level}) slot {slot}: entry {pte:#018x} names mfn {mfn:#x}, \
         which is not in the guest's p2m"
    )]
    MfnNotInP2m {
        pfn: u64,
        level: u8,
        slot: usize,
        pte: u64,
        mfn: u64,
    },
    #[error(
        "pfn {pfn:#x} (L{level}) slot {slot}: entry {pte:#018x} names pfn {target:#x}, \
         beyond the replica's {pages} pages"
    )]
    PfnOutOfRange {
        pfn: u64,
        level: u8,
        slot: usize,
        pte: u64,
        target: u64,
        pages: u64,
    },
    #[error(
        "pfn {pfn:#x} (L{level}) slot {slot}: entry {pte:#018x} names pfn {target:#x}, \
         which has no frame in the replica domain"
    )]
    PfnNotPopulated {
        pfn: u64,
        level: u8,
        slot: usize,
        pte: u64,
        target: u64,
    },
    #[error("the p2m maps mfn {mfn:#x} at both pfn {first:#x} and pfn {second:#x}")]
    DuplicateMfn { mfn: u64, first: u64, second: u64 },
    #[error("page table at pfn {pfn:#x} is {got} bytes, not 4096")]
    PageSize { pfn: u64, got: usize },
    #[error("pfn {pfn:#x}: page type word {raw:#010x} is not one Xen reports")]
    BadType { pfn: u64, raw: u32 },
}

/// Page type of one frame, from `xc_get_pfn_type_batch`
/// (`XEN_DOMCTL_PFINFO_*`: the type in bits 28..31, pinned in bit 31).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageType {
    /// Ordinary memory.
    NoTab,
    /// A page table of level 1..4, pinned or not.
    Table { level: u8, pinned: bool },
    /// No frame behind the pfn (XTAB).
    Invalid,
    /// Allocated but not populated (XALLOC).
    Alloc,
    /// Broken (a hardware error): not readable.
    Broken,
}

impl PageType {
    /// Decodes the word Xen returns for the frame at `pfn`.
    pub fn from_raw(pfn: u64, raw: u32) -> Result<PageType, PteError> {
        const LTAB_SHIFT: u32 = 28;
        const LPINTAB: u32 = 1 << 31;
        if raw & 0x0fff_ffff != 0 {
            return Err(PteError::BadType { pfn, raw });
        }
        match raw >> LTAB_SHIFT {
            0x0 => Ok(PageType::NoTab),
            t @ (0x1..=0x4 | 0x9..=0xc) => Ok(PageType::Table {
                level: (t & 0x7) as u8,
                pinned: raw & LPINTAB != 0,
            }),
            0xd => Ok(PageType::Broken),
            0xe => Ok(PageType::Alloc),
            0xf => Ok(PageType::Invalid),
            _ => Err(PteError::BadType { pfn, raw }),
        }
    }

    /// The table level when this is a page table.
    pub fn level(self) -> Option<u8> {
        match self {
            PageType::Table { level, .. } => Some(level),
            _ => None,
        }
    }
}

/// The inverse of a guest's p2m: machine frame → pfn.
#[derive(Debug, Default)]
pub struct MfnMap {
    to_pfn: HashMap<u64, u64>,
}

impl MfnMap {
    /// Builds the inverse of `p2m` (pfn i → machine frame), skipping
    /// entries equal to `invalid`. Refuses an MFN listed at two pfns.
    pub fn new(p2m: &[u64], invalid: u64) -> Result<MfnMap, PteError> {
        let mut to_pfn = HashMap::with_capacity(p2m.len());
        for (pfn, &mfn) in p2m.iter().enumerate() {
            if mfn == invalid {
                continue;
            }
            if let Some(first) = to_pfn.insert(mfn, pfn as u64) {
                return Err(PteError::DuplicateMfn {
                    mfn,
                    first,
                    second: pfn as u64,
                });
            }
        }
        Ok(MfnMap { to_pfn })
    }

    /// The pfn the guest maps `mfn` at.
    pub fn pfn(&self, mfn: u64) -> Option<u64> {
        self.to_pfn.get(&mfn).copied()
    }
}

/// The frame an entry names.
pub fn pte_frame(pte: u64) -> u64 {
    (pte & PTE_FRAME_MASK) >> 12
}

/// `pte` with its frame replaced by `frame`, every flag bit kept.
pub fn with_frame(pte: u64, frame: u64) -> u64 {
    (pte & !PTE_FRAME_MASK) | ((frame << 12) & PTE_FRAME_MASK)
}

/// Rewrites the page table at `pfn` (level `level`, 4096 bytes of
/// little-endian entries) from machine frames to pfns in place. Xen's L4
/// slots are cleared; absent entries are kept as they are.
pub fn normalise(page: &mut [u8], pfn: u64, level: u8, map: &MfnMap) -> Result<(), PteError> {
    rewrite(page, pfn, |slot, pte| {
        if level == 4 && XEN_L4_SLOTS.contains(&slot) {
            return Ok(0);
        }
        let mfn = pte_frame(pte);
        match map.pfn(mfn) {
            Some(p) => Ok(with_frame(pte, p)),
            None => Err(PteError::MfnNotInP2m {
                pfn,
                level,
                slot,
                pte,
                mfn,
            }),
        }
    })
}

/// Rewrites the normalised page table at `pfn` from pfns to the replica
/// domain's machine frames (`p2m[pfn]`, `invalid` where it has none), in
/// place. Xen's L4 slots are left for the hypervisor to fill at pin time.
pub fn localise(
    page: &mut [u8],
    pfn: u64,
    level: u8,
    p2m: &[u64],
    invalid: u64,
) -> Result<(), PteError> {
    rewrite(page, pfn, |slot, pte| {
        if level == 4 && XEN_L4_SLOTS.contains(&slot) {
            return Ok(pte);
        }
        let target = pte_frame(pte);
        match p2m.get(target as usize) {
            None => Err(PteError::PfnOutOfRange {
                pfn,
                level,
                slot,
                pte,
                target,
                pages: p2m.len() as u64,
            }),
            Some(&m) if m == invalid => Err(PteError::PfnNotPopulated {
                pfn,
                level,
                slot,
                pte,
                target,
            }),
            Some(&m) => Ok(with_frame(pte, m)),
        }
    })
}

/// Applies `f(slot, pte)` to every present entry; the page is written
/// only when every entry succeeded (an error leaves it untouched).
fn rewrite(
    page: &mut [u8],
    pfn: u64,
    mut f: impl FnMut(usize, u64) -> Result<u64, PteError>,
) -> Result<(), PteError> {
    if page.len() != ENTRIES * 8 {
        return Err(PteError::PageSize {
            pfn,
            got: page.len(),
        });
    }
    let mut out = [0u64; ENTRIES];
    for (slot, (chunk, o)) in page.chunks_exact(8).zip(out.iter_mut()).enumerate() {
        let pte = u64::from_le_bytes(chunk.try_into().expect("chunks of 8"));
        *o = if pte & PTE_PRESENT != 0 {
            f(slot, pte)?
        } else {
            pte
        };
    }
    for (chunk, v) in page.chunks_exact_mut(8).zip(out) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INV: u64 = u64::MAX;

    fn table(entries: &[(usize, u64)]) -> Vec<u8> {
        let mut page = vec![0u8; 4096];
        for &(slot, pte) in entries {
            page[slot * 8..slot * 8 + 8].copy_from_slice(&pte.to_le_bytes());
        }
        page
    }

    fn entry(page: &[u8], slot: usize) -> u64 {
        u64::from_le_bytes(page[slot * 8..slot * 8 + 8].try_into().unwrap())
    }

    #[test]
    fn normalise_then_localise_maps_frames_and_keeps_flags() {
        // Primary: pfn i at mfn 0x1000 + 3i; replica: pfn i at mfn 0x9000 + i.
        let primary: Vec<u64> = (0..16).map(|i| 0x1000 + 3 * i).collect();
        let replica: Vec<u64> = (0..16).map(|i| 0x9000 + i).collect();
        let map = MfnMap::new(&primary, INV).unwrap();
        // NX, user, rw, present, accessed, dirty around mfn of pfn 5.
        let flags = (1u64 << 63) | 0x67;
        let absent = 0x0000_0000_dead_b000; // not present: kept as is
        let mut page = table(&[(0, with_frame(flags, 0x1000 + 15)), (1, absent)]);
        page[2 * 8..3 * 8].copy_from_slice(&with_frame(flags, 0x1000 + 3 * 5).to_le_bytes());
        normalise(&mut page, 7, 1, &map).unwrap();
        assert_eq!(entry(&page, 0), with_frame(flags, 5));
        assert_eq!(entry(&page, 1), absent);
        assert_eq!(entry(&page, 2), with_frame(flags, 5));
        localise(&mut page, 7, 1, &replica, INV).unwrap();
        assert_eq!(entry(&page, 0), with_frame(flags, 0x9005));
        assert_eq!(entry(&page, 2), with_frame(flags, 0x9005));
        assert_eq!(entry(&page, 1), absent);
    }

    #[test]
    fn an_mfn_outside_the_p2m_is_named_and_the_page_left_untouched() {
        let map = MfnMap::new(&[0x10, 0x11, INV], INV).unwrap();
        let bad = with_frame(0x63, 0x4242);
        let page0 = table(&[(0, with_frame(0x63, 0x10)), (9, bad)]);
        let mut page = page0.clone();
        let err = normalise(&mut page, 0x2a, 2, &map).unwrap_err();
        assert_eq!(
            err,
            PteError::MfnNotInP2m {
                pfn: 0x2a,
                level: 2,
                slot: 9,
                pte: bad,
                mfn: 0x4242
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("pfn 0x2a") && msg.contains("0x4242"), "{msg}");
        assert!(msg.contains(&format!("{bad:#018x}")), "{msg}");
        assert_eq!(page, page0, "a failed normalise must not write the page");
    }

    #[test]
    fn the_invalid_p2m_entry_is_not_an_mfn() {
        // A PTE naming the all-ones frame must not match an invalid entry.
        let map = MfnMap::new(&[INV, 0x10], INV).unwrap();
        let all_ones = PTE_FRAME_MASK | 1;
        let mut page = table(&[(3, all_ones)]);
        assert!(matches!(
            normalise(&mut page, 1, 1, &map),
            Err(PteError::MfnNotInP2m { slot: 3, .. })
        ));
    }

    #[test]
    fn a_p2m_naming_one_mfn_twice_is_refused() {
        let err = MfnMap::new(&[0x10, 0x20, 0x10], INV).unwrap_err();
        assert_eq!(
            err,
            PteError::DuplicateMfn {
                mfn: 0x10,
                first: 0,
                second: 2
            }
        );
    }

    #[test]
    fn localise_refuses_pfns_beyond_or_missing_in_the_replica() {
        let p2m = [0x100, INV, 0x102];
        let far = with_frame(0x3, 0x1_0000);
        let mut page = table(&[(4, far)]);
        let err = localise(&mut page, 0x33, 3, &p2m, INV).unwrap_err();
        assert_eq!(
            err,
            PteError::PfnOutOfRange {
                pfn: 0x33,
                level: 3,
                slot: 4,
                pte: far,
                target: 0x1_0000,
                pages: 3
            }
        );
        assert!(err.to_string().contains("pfn 0x33"), "{err}");
        let hole = with_frame(0x3, 1);
        let mut page = table(&[(0, with_frame(0x3, 2)), (5, hole)]);
        let before = page.clone();
        let err = localise(&mut page, 0x34, 1, &p2m, INV).unwrap_err();
        assert_eq!(
            err,
            PteError::PfnNotPopulated {
                pfn: 0x34,
                level: 1,
                slot: 5,
                pte: hole,
                target: 1
            }
        );
        assert_eq!(page, before);
    }

    #[test]
    fn xen_l4_slots_are_cleared_on_normalise_and_kept_on_localise() {
        let map = MfnMap::new(&[0x10], INV).unwrap();
        // Slot 256 holds a Xen mapping the guest's p2m does not know.
        let xen = with_frame(0x63, 0xabcdef);
        let mut page = table(&[(0, with_frame(0x63, 0x10)), (256, xen), (272, xen)]);
        normalise(&mut page, 0, 4, &map).unwrap();
        assert_eq!(entry(&page, 256), 0);
        assert_eq!(entry(&page, 272), 0);
        // The same entry at L3 is an error: only L4 has Xen's slots.
        let mut l3 = table(&[(256, xen)]);
        assert!(normalise(&mut l3, 0, 3, &map).is_err());
        let mut page = table(&[(0, with_frame(0x63, 0)), (256, xen)]);
        localise(&mut page, 0, 4, &[0x77], INV).unwrap();
        assert_eq!(entry(&page, 0), with_frame(0x63, 0x77));
        assert_eq!(entry(&page, 256), xen);
    }

    #[test]
    fn short_pages_are_refused() {
        let map = MfnMap::default();
        let mut page = vec![0u8; 4095];
        assert_eq!(
            normalise(&mut page, 9, 1, &map),
            Err(PteError::PageSize { pfn: 9, got: 4095 })
        );
    }

    #[test]
    fn page_types_decode_as_xen_reports_them() {
        assert_eq!(PageType::from_raw(0, 0).unwrap(), PageType::NoTab);
        let l1 = PageType::from_raw(0, 1 << 28).unwrap();
        assert_eq!(
            l1,
            PageType::Table {
                level: 1,
                pinned: false
            }
        );
        // L4, pinned (XEN_DOMCTL_PFINFO_LPINTAB | L4TAB).
        let l4p = PageType::from_raw(0, (1 << 31) | (4 << 28)).unwrap();
        assert_eq!(l4p.level(), Some(4));
        assert_eq!(
            l4p,
            PageType::Table {
                level: 4,
                pinned: true
            }
        );
        assert_eq!(PageType::from_raw(0, 0xf << 28).unwrap(), PageType::Invalid);
        assert_eq!(PageType::from_raw(0, 0xe << 28).unwrap(), PageType::Alloc);
        assert_eq!(PageType::from_raw(0, 0xd << 28).unwrap(), PageType::Broken);
        for raw in [5 << 28, 8 << 28, 1, (1 << 28) | 0x10] {
            assert_eq!(
                PageType::from_raw(0x77, raw),
                Err(PteError::BadType { pfn: 0x77, raw })
            );
        }
        assert!(PageType::from_raw(0x77, 1)
            .unwrap_err()
            .to_string()
            .contains("pfn 0x77"));
    }
}
