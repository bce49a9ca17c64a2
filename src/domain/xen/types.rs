//! A PV guest's page types, kept current across epochs on the primary.
//!
//! Xen's restore needs every page table's level (and whether it is
//! pinned) to localise and pin it, so each PV checkpoint carries the type
//! of every page that is not ordinary memory (`state.rs`, PV_TYPES). The
//! types are read for all frames once at open, with the guest paused, and
//! then again for the frames each harvest reports: Xen marks a page dirty
//! whenever its page-table type count becomes non-zero or zero and when
//! its pin status changes (`xen/arch/x86/mm.c`), so every type change is
//! in some harvest, and the in-pause harvest's refresh makes the types
//! exact for the checkpoint. Cost inside the pause: one
//! `xc_get_pfn_type_batch` per 1024 dirty frames.

use super::pte::PageType;
use super::sys::{Result, Xc, XenError};

/// Frames per `xc_get_pfn_type_batch` (Xen's limit and its saver's batch).
const BATCH: usize = 1024;

/// Type nibble (`XEN_DOMCTL_PFINFO_*` >> 28) of each pfn.
pub struct PageTypes {
    nib: Vec<u8>,
}

impl PageTypes {
    /// Reads the type of every pfn whose frame is valid (`frames[pfn]`,
    /// the guest's p2m; `u64::MAX` where it has none).
    pub fn read_all(xc: &Xc, domid: u32, frames: &[u64]) -> Result<PageTypes> {
        let mut t = PageTypes {
            nib: vec![0; frames.len()],
        };
        let all: Vec<u64> = (0..frames.len() as u64).collect();
        t.refresh(xc, domid, frames, &all)?;
        Ok(t)
    }

    /// Re-reads the types of `pfns` (ascending or not; pfns beyond the
    /// layout or without a frame are skipped).
    pub fn refresh(&mut self, xc: &Xc, domid: u32, frames: &[u64], pfns: &[u64]) -> Result<()> {
        let valid: Vec<u64> = pfns
            .iter()
            .copied()
            .filter(|&p| frames.get(p as usize).is_some_and(|&f| f != u64::MAX))
            .collect();
        for chunk in valid.chunks(BATCH) {
            let mut arr: Vec<u64> = chunk.iter().map(|&p| frames[p as usize]).collect();
            xc.pfn_types(domid, &mut arr)?;
            for (&pfn, &raw) in chunk.iter().zip(&arr) {
                self.nib[pfn as usize] = nibble(domid, pfn, raw)?;
            }
        }
        Ok(())
    }

    /// (pfn, type) of every page that is not ordinary memory, ascending.
    pub fn listed(&self) -> Vec<(u64, u8)> {
        self.nib
            .iter()
            .enumerate()
            .filter(|(_, &t)| t != 0)
            .map(|(p, &t)| (p as u64, t))
            .collect()
    }
}

/// The type nibble of Xen's word for `pfn`, checked.
fn nibble(domid: u32, pfn: u64, raw: u64) -> Result<u8> {
    let bad = |reason: String| XenError::State { domid, reason };
    let word = u32::try_from(raw).map_err(|_| {
        bad(format!(
            "pfn {pfn:#x}: page type word {raw:#x} is not 32 bits"
        ))
    })?;
    PageType::from_raw(pfn, word).map_err(|e| bad(e.to_string()))?;
    Ok((word >> 28) as u8)
}
