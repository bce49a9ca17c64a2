//! A kvm domain's saved state: one `CKVM` v1 record (see `wire.rs`) whose
//! payload is, in this order:
//!
//! | record | from | content |
//! |--------|------|---------|
//! | `MPST` v1 | vCPU | mp_state u32 |
//! | `REGS` v1 | vCPU | rax..r15, rip, rflags: 18 × u64 |
//! | `SREG` v1 | vCPU | cs ds es fs gs ss tr ldt (base u64, limit u32, selector u16, type present dpl db s l g avl unusable u8), gdt idt (base u64, limit u16), cr0 cr2 cr3 cr4 cr8 efer apic_base u64, interrupt_bitmap 4 × u64 |
//! | `FPU_` v1 | vCPU | fpr 8 × 16 B, fcw fsw u16, ftwx u8, last_opcode u16, last_ip last_dp u64, xmm 16 × 16 B, mxcsr u32 |
//! | `XCRS` v1 | vCPU, optional | n u32, flags u32, n × (xcr u32, value u64) |
//! | `DBGR` v1 | vCPU | db0..db3 dr6 dr7 flags u64 |
//! | `MSRS` v1 | vCPU | n u32, n × (index u32, value u64) |
//! | `EVNT` v1 | vCPU | kvm_vcpu_events field by field (see `vcpu_state.rs`) |
//! | `SERL` v1 | serial | ier lcr mcr scr fcr dll dlm u8 |
//! | `CLCK` v1 | clock | guest_ns u64, latched u64 |
//! | `NETD` v1 | NIC (`CKVM` v2) | tx_addr tx_status rx_addr rx_size u32, tx_frames tx_dropped rx_frames rx_dropped u64 |
//! | `BLKD` v1 | block device (`CKVM` v2) | sector u64, count buf status u32 |
//!
//! Unknown or duplicated records are errors: a reader that skipped what it
//! does not understand could resume a guest with state silently missing.
//! Adding a record or changing one bumps that record's version; a change of
//! the set of records bumps `CKVM`'s.
//!
//! Versions: `CKVM` v2 added `NETD` and `BLKD` (both required in v2). This
//! build writes v2 and still reads v1 states, which must not hold them
//! (the NIC and block device then restore to their reset state, which is
//! what a v1 writer, without those devices, had).

use super::devices::Devices;
use super::error::{KvmError, Result};
use super::vcpu_state::VcpuState;
use super::wire::{self, RawRecord, Reader, RecordWriter};

pub const CONTAINER_MAGIC: [u8; 4] = *b"CKVM";
pub const CONTAINER_VERSION: u16 = 2;
/// Oldest `CKVM` version this build reads.
pub const CONTAINER_VERSION_MIN: u16 = 1;

const KNOWN: [&[u8; 4]; 12] = [
    b"MPST", b"REGS", b"SREG", b"FPU_", b"XCRS", b"DBGR", b"MSRS", b"EVNT", b"SERL", b"CLCK",
    b"NETD", b"BLKD",
];
/// Records added by `CKVM` v2: required there, absent before.
const SINCE_V2: [&[u8; 4]; 2] = [b"NETD", b"BLKD"];

/// Appends the `CKVM` record for this vCPU and these devices.
pub fn encode(vcpu: &VcpuState, devices: &Devices, out: &mut Vec<u8>) {
    let mut w = RecordWriter::begin(out, CONTAINER_MAGIC, CONTAINER_VERSION);
    vcpu.encode(w.inner());
    devices.save(w.inner());
    w.finish();
}

/// Splits a `CKVM` record (exactly `bytes`) into its inner records, checked
/// for unknown and duplicate tags.
pub fn split(bytes: &[u8]) -> Result<Vec<RawRecord<'_>>> {
    let outer = wire::split("CKVM", bytes)?;
    let [outer] = outer.as_slice() else {
        return Err(KvmError::State {
            record: "CKVM",
            reason: format!("expected exactly one record, found {}", outer.len()),
        });
    };
    if outer.magic != CONTAINER_MAGIC {
        return Err(KvmError::State {
            record: "CKVM",
            reason: format!("bad magic {:?}", outer.tag()),
        });
    }
    if !(CONTAINER_VERSION_MIN..=CONTAINER_VERSION).contains(&outer.version) {
        // Reports the version error in the usual words.
        Reader::new("CKVM", outer, CONTAINER_VERSION)?;
    }
    let inner = wire::split("CKVM", outer.payload)?;
    for tag in SINCE_V2 {
        let present = inner.iter().any(|r| &r.magic == tag);
        if present != (outer.version >= 2) {
            return Err(KvmError::State {
                record: "CKVM",
                reason: format!(
                    "version {} {} record {:?}",
                    outer.version,
                    if present { "must not hold" } else { "lacks" },
                    String::from_utf8_lossy(tag)
                ),
            });
        }
    }
    for (i, r) in inner.iter().enumerate() {
        if !KNOWN.contains(&&r.magic) {
            return Err(KvmError::State {
                record: "CKVM",
                reason: format!("unknown record {:?}", r.tag()),
            });
        }
        if inner[..i].iter().any(|p| p.magic == r.magic) {
            return Err(KvmError::State {
                record: "CKVM",
                reason: format!("record {:?} appears twice", r.tag()),
            });
        }
    }
    Ok(inner)
}

/// Decodes the vCPU part of a saved state.
pub fn decode_vcpu(bytes: &[u8]) -> Result<VcpuState> {
    VcpuState::decode(&split(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::kvm::devices::console::Console;

    /// A `CKVM` v1 state (no NETD/BLKD) still restores; v2 must hold both
    /// and v1 neither.
    #[test]
    fn reads_v1_and_checks_v2_records() {
        let devices = Devices::new(Console::new(None).unwrap());
        let mut st = Vec::new();
        encode(&VcpuState::default(), &devices, &mut st);
        let inner = split(&st).unwrap();
        assert!(inner.iter().any(|r| &r.magic == b"NETD"));
        let rewrap = |version: u16, keep: &dyn Fn(&RawRecord<'_>) -> bool| {
            let mut out = Vec::new();
            let mut w = RecordWriter::begin(&mut out, CONTAINER_MAGIC, version);
            for r in inner.iter().filter(|r| keep(r)) {
                let mut rw = RecordWriter::begin(w.inner(), r.magic, r.version);
                rw.bytes(r.payload);
                rw.finish();
            }
            w.finish();
            out
        };
        let v1 = rewrap(1, &|r| !SINCE_V2.contains(&&r.magic));
        let recs = split(&v1).unwrap();
        let mut d = Devices::new(Console::new(None).unwrap());
        d.restore(&recs).unwrap();
        assert!(decode_vcpu(&v1).is_ok());
        let e = split(&rewrap(1, &|_| true)).unwrap_err().to_string();
        assert!(e.contains("must not hold"), "{e}");
        let e = split(&rewrap(2, &|r| &r.magic != b"BLKD"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("lacks") && e.contains("BLKD"), "{e}");
        let e = split(&rewrap(3, &|_| true)).unwrap_err().to_string();
        assert!(e.contains("version 3"), "{e}");
    }
}
