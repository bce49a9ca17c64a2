//! Guest-physical layout and the boot state of a fresh guest.
//!
//! Layout (the ABI in guests/README.md and guests/abi.h):
//!
//! | gpa                  | what                                    |
//! |----------------------|-----------------------------------------|
//! | `0x0500`             | GDT: null, flat code 0x08, flat data 0x10 |
//! | `0x1000`             | boot params (`struct castor_boot_params`) |
//! | below `0x90000`      | boot stack (ESP starts at `STACK_TOP`)   |
//! | `0x100000`           | guest image, entry at its first byte     |
//! | `0x200000`           | memtouch checksum page                  |
//! | `0x201000`..         | memtouch regions                        |
//!
//! Every byte the VMM writes here is reported to the [`DirtyLog`] so the
//! first harvest includes it.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;

use super::dirty::DirtyLog;
use super::error::{KvmError, Result};
use super::spec::KvmSpec;
use crate::domain::GuestMemory;

pub const GDT_GPA: u64 = 0x500;
pub const BOOT_PARAMS_GPA: u64 = 0x1000;
pub const STACK_TOP: u64 = 0x90000;
pub const IMAGE_GPA: u64 = 0x10_0000;
pub const SUMS_GPA: u64 = 0x20_0000;
pub const DATA_GPA: u64 = 0x20_1000;

/// "CBP1" read as a little-endian u32.
pub const BOOT_MAGIC: u32 = 0x3150_4243;
/// v2 appended `ip` (offset 40).
pub const BOOT_VERSION: u32 = 2;

const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
/// Flat 4 GiB descriptors: code (exec/read, accessed) and data (read/write,
/// accessed), 32-bit, page granular.
const GDT: [u64; 3] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// Writes `bytes` at `gpa` and marks the pages VMM-dirty.
fn write(mem: &GuestMemory, dirty: &DirtyLog, gpa: u64, bytes: &[u8]) {
    assert!(
        gpa as usize + bytes.len() <= mem.len(),
        "boot write outside guest memory"
    );
    // SAFETY: the range is inside the mapping (asserted); the guest has not
    // started, so nothing else writes these bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), mem.as_ptr().add(gpa as usize), bytes.len())
    };
    dirty.mark_vmm_dirty(gpa, bytes.len() as u64);
}

/// Lays out a fresh guest in `mem`: GDT, boot params and the image.
pub fn load_guest(spec: &KvmSpec, image: &[u8], mem: &GuestMemory, dirty: &DirtyLog) -> Result<()> {
    if IMAGE_GPA + image.len() as u64 > SUMS_GPA {
        return Err(KvmError::GuestImage {
            guest: spec.guest.clone(),
            image: image.len(),
            limit: SUMS_GPA,
        });
    }
    let gdt: Vec<u8> = GDT.iter().flat_map(|d| d.to_le_bytes()).collect();
    write(mem, dirty, GDT_GPA, &gdt);
    let params = [
        BOOT_MAGIC,
        BOOT_VERSION,
        spec.mem as u32,
        SUMS_GPA as u32,
        DATA_GPA as u32,
        spec.regions,
        spec.region_pages,
        spec.touch,
        spec.pattern.code(),
        spec.seed,
        // The address's bytes in network order, read as a little-endian
        // u32: byte 0 of the field is the first octet.
        spec.ip.map_or(0, |ip| u32::from_le_bytes(ip.octets())),
    ];
    let params: Vec<u8> = params.iter().flat_map(|w| w.to_le_bytes()).collect();
    write(mem, dirty, BOOT_PARAMS_GPA, &params);
    write(mem, dirty, IMAGE_GPA, image);
    Ok(())
}

fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts a fresh vCPU in the state the guest ABI promises at entry: 32-bit
/// protected mode, paging off, flat 4 GiB code/data segments (base 0),
/// interrupts off, EIP at the image's first byte, ESP at [`STACK_TOP`], EBX
/// pointing at the boot params.
///
/// This is the only place that knows the guest's CPU mode. These hosts run
/// real-mode and 32-bit protected-mode guests only; on a host with hardware
/// virtualization a 64-bit guest needs just a different version of this
/// function (page tables, CR4.PAE, EFER.LME/LMA, a 64-bit code segment),
/// the rest of the VMM is mode-agnostic.
pub fn setup_boot_state(vcpu: &VcpuFd) -> Result<()> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(KvmError::GetSregs)?;
    sregs.cs = flat_segment(CODE_SELECTOR, 0xb);
    let data = flat_segment(DATA_SELECTOR, 0x3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.cr0 |= 1; // PE
    sregs.cr0 &= !(1 << 31); // PG off
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(KvmError::SetSregs)?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: IMAGE_GPA,
        rsp: STACK_TOP,
        rbx: BOOT_PARAMS_GPA,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(KvmError::SetRegs)
}
