//! Bounds-checked VMM access to guest memory for devices (the NIC's RX
//! copies, the block device's buffers).
//!
//! Invariants:
//! - Every access is checked against the memory size before any byte
//!   moves: a guest-supplied `gpa`/`len` can never make the VMM touch
//!   memory outside the guest mapping, and overflowing arithmetic is an
//!   error, not a wrap.
//! - Every write is reported to the VMM-side dirty bitmap ([`VmmDirty`])
//!   before [`GuestRam::write`] returns: KVM's dirty log only sees writes
//!   made by the guest itself.
//! - Devices call this only from the vCPU thread while it handles a port
//!   exit, so the VMM never writes guest memory while the domain is paused.

use super::dirty::VmmDirty;
use crate::domain::GuestMemory;

/// A guest-supplied range that does not lie inside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest range gpa {gpa:#x} + {len} bytes is outside guest memory ({mem} bytes)")]
pub struct OutOfRange {
    pub gpa: u64,
    pub len: u64,
    pub mem: u64,
}

/// A view of the guest's RAM plus its VMM-side dirty bitmap.
#[derive(Clone)]
pub struct GuestRam {
    ptr: *mut u8,
    len: u64,
    dirty: VmmDirty,
}

// SAFETY: the pointer is to the guest mapping, which is valid for the
// life of the domain (see `GuestRam::new`); all accesses are byte copies
// into/out of that shared mapping, which the guest also writes
// concurrently by design, so sending the view to another thread adds no
// new aliasing.
unsafe impl Send for GuestRam {}

impl GuestRam {
    /// A view of `mem` reporting writes to `dirty`.
    ///
    /// # Safety
    /// `mem` must outlive the returned value and every clone of it (the
    /// domain drops its devices, and joins the vCPU thread that holds them,
    /// before it unmaps guest memory).
    pub unsafe fn new(mem: &GuestMemory, dirty: VmmDirty) -> Self {
        GuestRam {
            ptr: mem.as_ptr(),
            len: mem.len() as u64,
            dirty,
        }
    }

    /// Bytes of guest memory.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Checks `[gpa, gpa + len)` lies inside guest memory.
    pub fn check(&self, gpa: u64, len: u64) -> Result<(), OutOfRange> {
        match gpa.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(OutOfRange {
                gpa,
                len,
                mem: self.len,
            }),
        }
    }

    /// Copies `out.len()` bytes from guest memory at `gpa`.
    pub fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), OutOfRange> {
        self.check(gpa, out.len() as u64)?;
        // SAFETY: the range is inside the mapping (checked above) and the
        // mapping is alive (`new`'s contract); `out` is a distinct Rust
        // buffer, so the ranges cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.add(gpa as usize), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    /// Copies `data` into guest memory at `gpa` and marks the pages dirty.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), OutOfRange> {
        self.check(gpa, data.len() as u64)?;
        // SAFETY: as in `read`; writing guest memory while the guest runs
        // is the normal DMA model (the guest owns the buffer it named).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(gpa as usize), data.len())
        };
        self.dirty.mark(gpa, data.len() as u64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_and_dirty() {
        let mem = GuestMemory::new(4 * 4096).unwrap();
        let dirty = VmmDirty::new(4);
        // SAFETY: `mem` outlives `ram` (same scope, declared first).
        let ram = unsafe { GuestRam::new(&mem, dirty.clone()) };
        ram.write(4096 + 10, b"hello").unwrap();
        assert!(dirty.is_marked(1) && !dirty.is_marked(0) && !dirty.is_marked(2));
        let mut b = [0u8; 5];
        ram.read(4096 + 10, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        ram.write(4 * 4096 - 2, b"ab").unwrap();
        assert!(ram.write(4 * 4096 - 1, b"ab").is_err());
        assert!(ram.read(u64::MAX - 1, &mut b).is_err());
        assert!(ram.write(4 * 4096, b"").is_ok());
        assert!(ram.check(4 * 4096 + 1, 0).is_err());
    }
}
