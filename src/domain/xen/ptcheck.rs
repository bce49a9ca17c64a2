//! A diagnostic for PV page tables (`CASTOR_XEN_CHECK_PTE=1`): at open,
//! with the guest paused, reads every frame's page type from Xen
//! (`xc_get_pfn_type_batch`, as Xen's save does), and runs each L1..L4
//! page through [`pte::normalise`] (machine frames → pfns, against the
//! inverse of the guest's own p2m) and back through [`pte::localise`]
//! (pfns → the same p2m). On the primary's own p2m the round trip must give
//! the page back (Xen's L4 slots aside): proof, on a real guest, that the
//! rewriting stage 2 relies on finds every frame a page table names.
//! Prints one summary line; never changes the guest. For the lab.

use std::fmt;

use super::pte::{self, MfnMap, PageType, ENTRIES, XEN_L4_SLOTS};
use super::sys::Xc;
use crate::domain::GuestMemory;
use crate::PAGE_SIZE;

/// Frames per `xc_get_pfn_type_batch` call (Xen's save uses 1024).
const BATCH: usize = 1024;

#[derive(Default)]
struct Summary {
    tables: [u64; 4],
    pinned: u64,
    entries: u64,
    errors: u64,
    first_error: Option<String>,
    round_trip_diffs: u64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [l1, l2, l3, l4] = self.tables;
        write!(
            f,
            "L1 {l1}, L2 {l2}, L3 {l3}, L4 {l4} ({} pinned), {} present entries normalised, \
             {} errors, {} pages differ after the round trip",
            self.pinned, self.entries, self.errors, self.round_trip_diffs
        )?;
        if let Some(e) = &self.first_error {
            write!(f, "; first error: {e}")?;
        }
        Ok(())
    }
}

/// Runs the check when `CASTOR_XEN_CHECK_PTE=1` (call with the guest
/// paused; `frames[pfn]` is the guest's p2m, `u64::MAX` where invalid).
pub fn from_env(xc: &Xc, domid: u32, frames: &[u64], mem: &GuestMemory) {
    if std::env::var("CASTOR_XEN_CHECK_PTE").as_deref() != Ok("1") {
        return;
    }
    match check(xc, domid, frames, mem) {
        Ok(s) => eprintln!("castor: xen: page-table check: {s}"),
        Err(e) => eprintln!("castor: xen: page-table check failed: {e}"),
    }
}

fn check(
    xc: &Xc,
    domid: u32,
    frames: &[u64],
    mem: &GuestMemory,
) -> Result<Summary, Box<dyn std::error::Error>> {
    let map = MfnMap::new(frames, u64::MAX)?;
    // SAFETY: the guest is paused while the domain is opened.
    let all = unsafe { mem.as_slice() };
    let mut s = Summary::default();
    let valid: Vec<u64> = (0..frames.len() as u64)
        .filter(|&p| frames[p as usize] != u64::MAX)
        .collect();
    for pfns in valid.chunks(BATCH) {
        let mut arr: Vec<u64> = pfns.iter().map(|&p| frames[p as usize]).collect();
        xc.pfn_types(domid, &mut arr)?;
        for (&pfn, &raw) in pfns.iter().zip(&arr) {
            let raw =
                u32::try_from(raw).map_err(|_| pte::PteError::BadType { pfn, raw: u32::MAX })?;
            let PageType::Table { level, pinned } = PageType::from_raw(pfn, raw)? else {
                continue;
            };
            s.tables[level as usize - 1] += 1;
            s.pinned += pinned as u64;
            let at = pfn as usize * PAGE_SIZE;
            let Some(orig) = all.get(at..at + PAGE_SIZE) else {
                continue;
            };
            round_trip(&mut s, orig, pfn, level, &map, frames);
        }
    }
    Ok(s)
}

/// Normalises and localises one page table, counting what happened.
fn round_trip(s: &mut Summary, orig: &[u8], pfn: u64, level: u8, map: &MfnMap, frames: &[u64]) {
    let mut page = orig.to_vec();
    let res = pte::normalise(&mut page, pfn, level, map)
        .and_then(|()| pte::localise(&mut page, pfn, level, frames, u64::MAX));
    if let Err(e) = res {
        s.errors += 1;
        s.first_error.get_or_insert_with(|| e.to_string());
        return;
    }
    let word = |b: &[u8], i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
    let mut differs = false;
    for i in 0..ENTRIES {
        let (a, b) = (word(orig, i), word(&page, i));
        s.entries += a & pte::PTE_PRESENT;
        if level == 4 && XEN_L4_SLOTS.contains(&i) {
            continue;
        }
        differs |= a != b;
    }
    s.round_trip_diffs += differs as u64;
}
