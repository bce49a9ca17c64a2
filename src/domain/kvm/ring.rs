//! KVM's dirty ring (`KVM_CAP_DIRTY_LOG_RING`): a per-vCPU ring of dirtied
//! gfns shared with the kernel, the alternative to the dirty bitmap when a
//! guest dirties few pages of a large memory.
//!
//! Protocol (Documentation/virt/kvm/api.rst, "KVM_CAP_DIRTY_LOG_RING"): KVM
//! appends `kvm_dirty_gfn` entries with flag DIRTY; userspace, walking from
//! its fetch index, takes each DIRTY entry and marks it RESET; then
//! `KVM_RESET_DIRTY_RINGS` re-protects the reset pages and frees their
//! slots. When the ring is (nearly) full the vCPU exits with
//! `KVM_EXIT_DIRTY_RING_FULL` and must not re-enter before a drain.
//!
//! Invariants:
//! - Drains are serialised by `fetch` (the harvesting thread and the vCPU
//!   thread on a full ring may both drain).
//! - A drained gfn is set in the shared pending bitmap *before* the reset
//!   that re-protects it, so no write between the two is lost: either it
//!   happened before the reset (the page's bit is already set and the
//!   caller reads the page after harvest) or it faults again afterwards.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_dirty_gfn, KVMIO, KVM_DIRTY_LOG_PAGE_OFFSET};
use kvm_ioctls::VcpuFd;
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

use super::error::{KvmError, Result};

ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

const GFN_DIRTY: u32 = 1;
const GFN_RESET: u32 = 2;

/// Entries per ring: 64 Ki entries of 16 bytes, 1 MiB (the usual maximum).
pub const RING_ENTRIES: u32 = 1 << 16;

/// The mmapped ring of vCPU 0.
pub struct Ring {
    ptr: *mut kvm_dirty_gfn,
    entries: u32,
    /// Next index to look at, and the drain lock.
    fetch: Mutex<u32>,
    /// Raw VM fd for KVM_RESET_DIRTY_RINGS; the VM outlives the ring's
    /// users (the vCPU thread is joined before the VM fd closes).
    vm_fd: i32,
    /// Where drained gfns go: the domain's pending bitmap.
    bits: Arc<Vec<AtomicU64>>,
}

// SAFETY: the mapping is only touched through atomic loads/stores of the
// entries' flags and plain reads of entries KVM has published (flag DIRTY,
// acquire), under the `fetch` lock.
unsafe impl Send for Ring {}
// SAFETY: as above.
unsafe impl Sync for Ring {}

impl Ring {
    /// Maps vCPU `vcpu`'s ring. The VM must have KVM_CAP_DIRTY_LOG_RING
    /// enabled with `RING_ENTRIES * 16` bytes before the vCPU was created.
    pub fn map(vcpu: &VcpuFd, vm_fd: i32, bits: Arc<Vec<AtomicU64>>) -> Result<Self> {
        use std::os::fd::AsRawFd;
        let bytes = RING_ENTRIES as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: a fresh shared mapping of the vCPU fd at the documented
        // ring offset; no existing Rust object is aliased.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                KVM_DIRTY_LOG_PAGE_OFFSET as libc::off_t * crate::PAGE_SIZE as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(KvmError::MapDirtyRing(std::io::Error::last_os_error()));
        }
        Ok(Ring {
            ptr: p.cast(),
            entries: RING_ENTRIES,
            fetch: Mutex::new(0),
            vm_fd,
            bits,
        })
    }

    /// Moves every published entry into the pending bitmap and re-arms the
    /// pages. Returns the number of entries drained.
    pub fn drain(&self) -> Result<usize> {
        let mut fetch = self.fetch.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0usize;
        loop {
            let i = (*fetch % self.entries) as usize;
            // SAFETY: i < entries, inside the mapping; `flags` is the first
            // u32 of the entry, accessed atomically as KVM does.
            let e = unsafe { self.ptr.add(i) };
            let flags = unsafe { &*(std::ptr::addr_of!((*e).flags) as *const AtomicU32) };
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                break;
            }
            // SAFETY: KVM published the entry (DIRTY, acquire above) and
            // does not touch it again until it is reset.
            let (slot, gfn) = unsafe { ((*e).slot, (*e).offset) };
            if slot == 0 {
                if let Some(w) = self.bits.get((gfn / 64) as usize) {
                    w.fetch_or(1 << (gfn % 64), Ordering::Relaxed);
                }
            }
            flags.store(GFN_RESET, Ordering::Release);
            *fetch = fetch.wrapping_add(1);
            n += 1;
        }
        if n > 0 {
            // SAFETY: `vm_fd` is the open VM fd (see the field); the ioctl
            // takes no argument.
            let rc = unsafe { ioctl(&RawFd(self.vm_fd), KVM_RESET_DIRTY_RINGS()) };
            if rc < 0 {
                return Err(KvmError::ResetDirtyRings(std::io::Error::last_os_error()));
            }
        }
        Ok(n)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let bytes = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmaps the mapping created in `map`, once.
        unsafe { libc::munmap(self.ptr.cast(), bytes) };
    }
}

/// A borrowed raw fd for the ioctl helpers.
struct RawFd(i32);

impl std::os::fd::AsRawFd for RawFd {
    fn as_raw_fd(&self) -> i32 {
        self.0
    }
}
