//! Page-granular buffers shared by the pipeline's threads: the shadow (last
//! sent copy of every page) and the staging areas (dirty pages copied during
//! the pause).
//!
//! Both are written by several threads at once through raw pointers. The
//! invariants that make this sound are positional: the shadow is divided into
//! shards by gfn range and only the encoder owning a shard touches it;
//! staging slot `i` is written only by the copy thread given index `i`
//! during the pause and read by encoders only after the copy finished.

use crate::domain::{DomainError, GuestMemory};
use crate::PAGE_SIZE;

/// A buffer of `slots` pages with raw, position-partitioned access.
pub struct PageBuf {
    mem: GuestMemory,
}

impl PageBuf {
    /// `slots` zeroed pages, mapped per 4 KiB page on first write.
    pub fn new(slots: usize) -> Result<Self, DomainError> {
        Ok(PageBuf {
            mem: GuestMemory::new(slots.max(1) * PAGE_SIZE)?,
        })
    }

    /// `slots` zeroed pages on transparent huge pages (castor's own buffer,
    /// never dirty-tracked; see [`GuestMemory::new_huge`] for the cost).
    pub fn new_huge(slots: usize) -> Result<Self, DomainError> {
        Ok(PageBuf {
            mem: GuestMemory::new_huge(slots.max(1) * PAGE_SIZE)?,
        })
    }

    /// Like `new`, with every page faulted in now rather than on first use,
    /// so writing it later (during a pause) costs no page faults.
    pub fn new_populated(slots: usize) -> Result<Self, DomainError> {
        let b = Self::new(slots)?;
        // SAFETY: the range is exactly the mapping just created.
        let rc = unsafe {
            libc::madvise(
                b.mem.as_ptr() as *mut libc::c_void,
                b.mem.len(),
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc != 0 {
            // Older kernels: touch each page instead.
            for i in 0..b.slots() {
                // SAFETY: slot i is inside the mapping; nobody else holds it yet.
                unsafe { b.slot_ptr(i).write_volatile(0) };
            }
        }
        Ok(b)
    }

    pub fn slots(&self) -> usize {
        self.mem.len() / PAGE_SIZE
    }

    pub fn slot_ptr(&self, i: usize) -> *mut u8 {
        self.mem.page_ptr(i as u64)
    }

    /// Slot `i` as a page reference.
    ///
    /// # Safety
    /// No thread writes slot `i` while the reference lives.
    pub unsafe fn slot(&self, i: usize) -> &[u8; PAGE_SIZE] {
        // SAFETY: slot_ptr is page-aligned, in bounds, PAGE_SIZE long; the
        // caller rules out concurrent writers.
        unsafe { &*(self.slot_ptr(i) as *const [u8; PAGE_SIZE]) }
    }
}
