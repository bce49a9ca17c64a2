//! Dirty page tracking for the one guest memory slot: KVM's dirty log for
//! guest writes, merged with a VMM-side bitmap for pages the VMM writes
//! (KVM logs only writes made by the guest through its page tables).
//!
//! Invariants:
//! - The slot is registered with `KVM_MEM_LOG_DIRTY_PAGES` before the guest
//!   runs, so every guest write after registration sets a bit.
//! - With `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` enabled, `KVM_GET_DIRTY_LOG`
//!   only reads the bitmap and `KVM_CLEAR_DIRTY_LOG` re-protects exactly
//!   the pages reported; without it, `KVM_GET_DIRTY_LOG` reads, clears and
//!   re-protects in one call.
//! - With the dirty ring (`dirty=ring`, see `ring.rs`) the bitmap ioctls
//!   are unavailable; the ring is drained into the pending bitmap instead.
//! - Either way a page is re-armed *before* [`DirtyLog::harvest`] returns,
//!   so a caller that reads the reported pages after `harvest` returns sees
//!   every write made before that read, and any later write is reported by
//!   the next harvest. This holds while the guest runs (pre-copy).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1, KVMIO,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};

use super::error::{KvmError, Result};
use super::ring::{Ring, RING_ENTRIES};

ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE` from linux/kvm.h.
const MANUAL_PROTECT_ENABLE: u64 = 1;

/// Which kernel interface harvests guest writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyMode {
    /// `KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG` (manual protect).
    GetAndClear,
    /// `KVM_GET_DIRTY_LOG` alone (reads and re-protects atomically).
    GetOnly,
    /// `KVM_CAP_DIRTY_LOG_RING`: per-vCPU rings of gfns.
    Ring,
}

/// VMM-side dirty marking: pages the VMM (not the guest) writes, which
/// KVM's log cannot see. Cloneable; every clone feeds the same bitmap.
#[derive(Clone)]
pub struct VmmDirty {
    bits: Arc<Vec<AtomicU64>>,
    pages: u64,
}

impl VmmDirty {
    /// A standalone bitmap of `pages` pages (unit tests of devices).
    pub fn new(pages: u64) -> Self {
        VmmDirty {
            bits: Arc::new((0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect()),
            pages,
        }
    }

    /// Marks the pages holding bytes `[gpa, gpa + len)`; pages past the
    /// end of memory are ignored.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 || self.pages == 0 {
            return;
        }
        let first = gpa / crate::PAGE_SIZE as u64;
        let last = (gpa.saturating_add(len - 1) / crate::PAGE_SIZE as u64).min(self.pages - 1);
        for gfn in first..=last {
            self.bits[(gfn / 64) as usize].fetch_or(1 << (gfn % 64), Ordering::Relaxed);
        }
    }

    /// Whether page `gfn` is marked (tests).
    pub fn is_marked(&self, gfn: u64) -> bool {
        gfn < self.pages
            && self.bits[(gfn / 64) as usize].load(Ordering::Relaxed) & (1 << (gfn % 64)) != 0
    }
}

/// Dirty tracking of slot `slot` covering `pages` pages from gfn 0.
pub struct DirtyLog {
    slot: u32,
    pages: u64,
    mode: DirtyMode,
    /// Scratch buffer for the kernel bitmap, one bit per page.
    kvm_bits: Vec<u64>,
    /// Pending pages: written by the VMM, or drained from the dirty ring
    /// (shared with the ring, which the vCPU thread may drain too).
    vmm_bits: Arc<Vec<AtomicU64>>,
    ring: Option<Arc<Ring>>,
}

impl DirtyLog {
    /// Chooses the harvest mode: the dirty ring if `ring` (an error when
    /// the host lacks it), else the bitmap with manual protect when
    /// available. Must be called before the memory slot is registered and
    /// before any vCPU exists: both capabilities only affect what is
    /// created after them.
    pub fn new(vm: &VmFd, slot: u32, pages: u64, ring: bool) -> Result<Self> {
        let words = pages.div_ceil(64) as usize;
        let mode = if ring {
            let bytes =
                RING_ENTRIES as u64 * std::mem::size_of::<kvm_bindings::kvm_dirty_gfn>() as u64;
            let max = vm.check_extension_raw(kvm_bindings::KVM_CAP_DIRTY_LOG_RING as _);
            if (max as u64) < bytes {
                return Err(KvmError::DirtyRingUnsupported { max, want: bytes });
            }
            let cap = kvm_bindings::kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_DIRTY_LOG_RING,
                args: [bytes, 0, 0, 0],
                ..Default::default()
            };
            vm.enable_cap(&cap).map_err(KvmError::EnableDirtyRing)?;
            DirtyMode::Ring
        } else {
            let supported =
                vm.check_extension_raw(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 as _);
            if supported & MANUAL_PROTECT_ENABLE as i32 != 0 {
                let cap = kvm_bindings::kvm_enable_cap {
                    cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    args: [MANUAL_PROTECT_ENABLE, 0, 0, 0],
                    ..Default::default()
                };
                vm.enable_cap(&cap)
                    .map_err(KvmError::EnableManualDirtyLog)?;
                DirtyMode::GetAndClear
            } else {
                DirtyMode::GetOnly
            }
        };
        Ok(DirtyLog {
            slot,
            pages,
            mode,
            kvm_bits: vec![0; words],
            vmm_bits: Arc::new((0..words).map(|_| AtomicU64::new(0)).collect()),
            ring: None,
        })
    }

    /// In ring mode, maps vCPU 0's ring; returns it for the vCPU thread,
    /// which drains it on `KVM_EXIT_DIRTY_RING_FULL`.
    pub fn attach_ring(
        &mut self,
        vcpu: &kvm_ioctls::VcpuFd,
        vm: &VmFd,
    ) -> Result<Option<Arc<Ring>>> {
        use std::os::fd::AsRawFd;
        if self.mode != DirtyMode::Ring {
            return Ok(None);
        }
        let ring = Arc::new(Ring::map(vcpu, vm.as_raw_fd(), self.vmm_bits.clone())?);
        self.ring = Some(ring.clone());
        Ok(Some(ring))
    }

    pub fn mode(&self) -> DirtyMode {
        self.mode
    }

    /// Records that the VMM wrote bytes `[gpa, gpa + len)` of guest memory.
    pub fn mark_vmm_dirty(&self, gpa: u64, len: u64) {
        self.vmm_handle().mark(gpa, len);
    }

    /// A handle devices keep to report their own writes to guest memory
    /// (DMA-like copies on the vCPU thread); it feeds the same pending
    /// bitmap, so the next [`DirtyLog::harvest`] reports those pages.
    pub fn vmm_handle(&self) -> VmmDirty {
        VmmDirty {
            bits: self.vmm_bits.clone(),
            pages: self.pages,
        }
    }

    /// Appends the gfns written since the previous harvest, sorted and
    /// unique, to `out`, and re-arms them (see the module invariants).
    pub fn harvest(&mut self, vm: &VmFd, out: &mut Vec<u64>) -> Result<()> {
        if let Some(ring) = &self.ring {
            ring.drain()?;
            self.kvm_bits.fill(0);
            self.collect(out);
            return Ok(());
        }
        self.kvm_bits.fill(0);
        let log = kvm_dirty_log {
            slot: self.slot,
            padding1: 0,
            __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
                dirty_bitmap: self.kvm_bits.as_mut_ptr().cast(),
            },
        };
        // SAFETY: `vm` is a VM fd; the bitmap has one bit per page of the
        // slot (rounded up to 64) and lives across the call.
        let rc = unsafe { ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &log) };
        if rc != 0 {
            return Err(KvmError::GetDirtyLog(std::io::Error::last_os_error()));
        }
        if self.mode == DirtyMode::GetAndClear && self.kvm_bits.iter().any(|&w| w != 0) {
            let clear = kvm_clear_dirty_log {
                slot: self.slot,
                // KVM requires num_pages to be a multiple of 64 unless the
                // range ends at the end of the slot, which it does here.
                num_pages: self.pages as u32,
                first_page: 0,
                __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                    dirty_bitmap: self.kvm_bits.as_mut_ptr().cast(),
                },
            };
            // SAFETY: as above; KVM only reads the bitmap, covering
            // `num_pages` bits from `first_page` 0.
            let rc = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
            if rc != 0 {
                return Err(KvmError::ClearDirtyLog(std::io::Error::last_os_error()));
            }
        }
        self.collect(out);
        Ok(())
    }

    /// Appends the union of `kvm_bits` and the pending bits (cleared) as
    /// sorted gfns.
    fn collect(&self, out: &mut Vec<u64>) {
        for (i, (k, v)) in self.kvm_bits.iter().zip(self.vmm_bits.iter()).enumerate() {
            let mut w = *k | v.swap(0, Ordering::Relaxed);
            while w != 0 {
                let bit = w.trailing_zeros() as u64;
                let gfn = i as u64 * 64 + bit;
                if gfn < self.pages {
                    out.push(gfn);
                }
                w &= w - 1;
            }
        }
    }
}
