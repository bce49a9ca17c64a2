//! Saved vCPU state: the KVM structures, typed, with an explicit
//! little-endian encoding (one record each, see `wire.rs`), and the
//! symmetric save/restore ioctl sequences.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};

use super::error::{KvmError, Result};
use super::wire::{RawRecord, Reader, RecordWriter};

/// MSRs worth carrying, kept only if KVM_GET_MSR_INDEX_LIST offers them.
/// EFER is absent on purpose: KVM_SET_SREGS carries it.
const WANTED_MSRS: &[u32] = &[
    0x10,        // IA32_TSC
    0x3b,        // IA32_TSC_ADJUST
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x1a0,       // IA32_MISC_ENABLE
    0x277,       // IA32_PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// Index of IA32_TSC: the one MSR that keeps moving while the vCPU does not
/// run, so a save → restore → save round trip differs only there.
pub const MSR_IA32_TSC: u32 = 0x10;

/// The MSRs this host's KVM can save and restore, from [`WANTED_MSRS`].
pub fn supported_msrs(kvm: &Kvm) -> Result<Vec<u32>> {
    let list = kvm
        .get_msr_index_list()
        .map_err(KvmError::GetMsrIndexList)?;
    let offered = list.as_slice();
    Ok(WANTED_MSRS
        .iter()
        .copied()
        .filter(|i| offered.contains(i))
        .collect())
}

/// Everything KVM holds about one vCPU that a checkpoint must carry (no
/// in-kernel LAPIC exists: the VM has no irqchip).
#[derive(Clone, Default)]
pub struct VcpuState {
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: kvm_fpu,
    /// None when the host lacks KVM_CAP_XCRS.
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    /// (index, value), in the order of [`supported_msrs`].
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
}

impl VcpuState {
    /// Reads the state of a vCPU that is not inside KVM_RUN.
    ///
    /// Ordering constraints (the GET ioctls are not all pure reads):
    /// - KVM_GET_MP_STATE first: it runs `kvm_apic_accept_events()`, which
    ///   may change other vCPU state; everything read after it sees the
    ///   result.
    /// - KVM_GET_MSRS needs the index list filled in; it returns how many
    ///   it read, and a short read is an error, not a silent drop.
    /// - KVM_GET_VCPU_EVENTS last: pending exception/interrupt/NMI state
    ///   can be touched by the other GETs' internal bookkeeping; reading it
    ///   last captures the final word. SREGS also carries a pending
    ///   interrupt (the bitmap); EVENTS is the authority on restore.
    pub fn save(vcpu: &VcpuFd, msr_indices: &[u32], has_xcrs: bool) -> Result<Self> {
        let mp_state = vcpu.get_mp_state().map_err(KvmError::GetMpState)?;
        let regs = vcpu.get_regs().map_err(KvmError::GetRegs)?;
        let sregs = vcpu.get_sregs().map_err(KvmError::GetSregs)?;
        let fpu = vcpu.get_fpu().map_err(KvmError::GetFpu)?;
        let xcrs = if has_xcrs {
            Some(vcpu.get_xcrs().map_err(KvmError::GetXcrs)?)
        } else {
            None
        };
        let debugregs = vcpu.get_debug_regs().map_err(KvmError::GetDebugRegs)?;
        let entries: Vec<kvm_msr_entry> = msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| KvmError::State {
            record: "MSRS",
            reason: format!("building the KVM_GET_MSRS list: {e:?}"),
        })?;
        let n = vcpu.get_msrs(&mut msrs).map_err(KvmError::GetMsrs)?;
        if n != entries.len() {
            return Err(KvmError::GetMsrs(vmm_sys_util::errno::Error::new(
                libc::EIO,
            )));
        }
        let msrs = msrs.as_slice().iter().map(|e| (e.index, e.data)).collect();
        let events = vcpu.get_vcpu_events().map_err(KvmError::GetVcpuEvents)?;
        Ok(VcpuState {
            mp_state,
            regs,
            sregs,
            fpu,
            xcrs,
            debugregs,
            msrs,
            events,
        })
    }

    /// Loads this state into a fresh vCPU (CPUID already set).
    ///
    /// Ordering constraints:
    /// - KVM_SET_CPUID2 before everything (done at vCPU creation): MSR
    ///   writes and XCR0 are validated against the guest's CPUID.
    /// - KVM_SET_MP_STATE early, as Firecracker does: it only sets the run
    ///   state and must not be overridden by later calls.
    /// - KVM_SET_SREGS before KVM_SET_REGS: SREGS switches the CPU mode
    ///   (CR0/CR4/EFER, segment caches) and resets the MMU; REGS then lands
    ///   in the mode it was saved in.
    /// - KVM_SET_XCRS, KVM_SET_DEBUGREGS and KVM_SET_MSRS after SREGS: XCR0
    ///   and several MSRs are checked against control-register state, and
    ///   EFER (an MSR too) must come from SREGS alone.
    /// - KVM_SET_VCPU_EVENTS last: KVM_SET_REGS cancels a pending
    ///   exception and KVM_SET_SREGS rewrites the pending-interrupt bitmap;
    ///   EVENTS restores exception, interrupt, NMI, SMM and the interrupt
    ///   shadow and must not be undone afterwards.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<()> {
        vcpu.set_mp_state(self.mp_state)
            .map_err(KvmError::SetMpState)?;
        vcpu.set_sregs(&self.sregs).map_err(KvmError::SetSregs)?;
        vcpu.set_regs(&self.regs).map_err(KvmError::SetRegs)?;
        vcpu.set_fpu(&self.fpu).map_err(KvmError::SetFpu)?;
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs).map_err(KvmError::SetXcrs)?;
        }
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(KvmError::SetDebugRegs)?;
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| KvmError::State {
            record: "MSRS",
            reason: format!("building the KVM_SET_MSRS list: {e:?}"),
        })?;
        let set = vcpu.set_msrs(&msrs).map_err(KvmError::SetMsrs)?;
        if set != entries.len() {
            return Err(KvmError::SetMsrsPartial {
                set,
                want: entries.len(),
                index: entries[set].index,
            });
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(KvmError::SetVcpuEvents)
    }

    /// Appends one record per structure.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = RecordWriter::begin(out, *b"MPST", 1);
        w.u32(self.mp_state.mp_state);
        w.finish();

        let r = &self.regs;
        let mut w = RecordWriter::begin(out, *b"REGS", 1);
        for v in [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15, r.rip, r.rflags,
        ] {
            w.u64(v);
        }
        w.finish();

        let s = &self.sregs;
        let mut w = RecordWriter::begin(out, *b"SREG", 1);
        for seg in [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt] {
            put_segment(&mut w, seg);
        }
        for dt in [&s.gdt, &s.idt] {
            w.u64(dt.base).u16(dt.limit);
        }
        for v in [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base] {
            w.u64(v);
        }
        for v in s.interrupt_bitmap {
            w.u64(v);
        }
        w.finish();

        let f = &self.fpu;
        let mut w = RecordWriter::begin(out, *b"FPU_", 1);
        for r in &f.fpr {
            w.bytes(r);
        }
        w.u16(f.fcw).u16(f.fsw).u8(f.ftwx).u16(f.last_opcode);
        w.u64(f.last_ip).u64(f.last_dp);
        for x in &f.xmm {
            w.bytes(x);
        }
        w.u32(f.mxcsr);
        w.finish();

        if let Some(x) = &self.xcrs {
            let mut w = RecordWriter::begin(out, *b"XCRS", 1);
            let n = (x.nr_xcrs as usize).min(x.xcrs.len());
            w.u32(n as u32).u32(x.flags);
            for xcr in &x.xcrs[..n] {
                w.u32(xcr.xcr).u64(xcr.value);
            }
            w.finish();
        }

        let d = &self.debugregs;
        let mut w = RecordWriter::begin(out, *b"DBGR", 1);
        for v in d.db {
            w.u64(v);
        }
        w.u64(d.dr6).u64(d.dr7).u64(d.flags);
        w.finish();

        let mut w = RecordWriter::begin(out, *b"MSRS", 1);
        w.u32(self.msrs.len() as u32);
        for &(i, v) in &self.msrs {
            w.u32(i).u64(v);
        }
        w.finish();

        let e = &self.events;
        let mut w = RecordWriter::begin(out, *b"EVNT", 1);
        w.u8(e.exception.injected)
            .u8(e.exception.nr)
            .u8(e.exception.has_error_code)
            .u8(e.exception.pending)
            .u32(e.exception.error_code);
        w.u8(e.interrupt.injected)
            .u8(e.interrupt.nr)
            .u8(e.interrupt.soft)
            .u8(e.interrupt.shadow);
        w.u8(e.nmi.injected).u8(e.nmi.pending).u8(e.nmi.masked);
        w.u32(e.sipi_vector).u32(e.flags);
        w.u8(e.smi.smm)
            .u8(e.smi.pending)
            .u8(e.smi.smm_inside_nmi)
            .u8(e.smi.latched_init);
        w.u8(e.triple_fault.pending);
        w.u8(e.exception_has_payload).u64(e.exception_payload);
        w.finish();
    }

    /// Decodes the vCPU records out of `records` (other tags are skipped;
    /// the caller checks for unknown ones). Every vCPU record but XCRS is
    /// required. Each record is decoded by its own function below, which
    /// checks its version, every field's bounds and that nothing trails.
    pub fn decode(records: &[RawRecord<'_>]) -> Result<Self> {
        // In this order, so the first bad record reported stays the same.
        let mp_state = decode_mpst(&find(records, "MPST")?)?;
        let regs = decode_regs(&find(records, "REGS")?)?;
        let sregs = decode_sregs(&find(records, "SREG")?)?;
        let fpu = decode_fpu(&find(records, "FPU_")?)?;
        let xcrs = match records.iter().find(|r| &r.magic == b"XCRS") {
            Some(raw) => Some(decode_xcrs(raw)?),
            None => None,
        };
        let debugregs = decode_dbgr(&find(records, "DBGR")?)?;
        let msrs = decode_msrs(&find(records, "MSRS")?)?;
        let events = decode_events(&find(records, "EVNT")?)?;
        Ok(VcpuState {
            mp_state,
            regs,
            sregs,
            fpu,
            xcrs,
            debugregs,
            msrs,
            events,
        })
    }
}

/// The record tagged `tag`, which must be present.
fn find<'a>(records: &[RawRecord<'a>], tag: &'static str) -> Result<RawRecord<'a>> {
    records
        .iter()
        .find(|r| r.magic.as_slice() == tag.as_bytes())
        .copied()
        .ok_or_else(|| KvmError::State {
            record: tag,
            reason: "missing from the saved state".into(),
        })
}

fn decode_mpst(raw: &RawRecord<'_>) -> Result<kvm_mp_state> {
    let mut r = Reader::new("MPST", raw, 1)?;
    let st = kvm_mp_state {
        mp_state: r.u32("mp_state")?,
    };
    r.finish()?;
    Ok(st)
}

fn decode_regs(raw: &RawRecord<'_>) -> Result<kvm_regs> {
    let mut r = Reader::new("REGS", raw, 1)?;
    let mut g = kvm_regs::default();
    for (name, slot) in [
        ("rax", &mut g.rax),
        ("rbx", &mut g.rbx),
        ("rcx", &mut g.rcx),
        ("rdx", &mut g.rdx),
        ("rsi", &mut g.rsi),
        ("rdi", &mut g.rdi),
        ("rsp", &mut g.rsp),
        ("rbp", &mut g.rbp),
        ("r8", &mut g.r8),
        ("r9", &mut g.r9),
        ("r10", &mut g.r10),
        ("r11", &mut g.r11),
        ("r12", &mut g.r12),
        ("r13", &mut g.r13),
        ("r14", &mut g.r14),
        ("r15", &mut g.r15),
        ("rip", &mut g.rip),
        ("rflags", &mut g.rflags),
    ] {
        *slot = r.u64(name)?;
    }
    r.finish()?;
    Ok(g)
}

fn decode_sregs(raw: &RawRecord<'_>) -> Result<kvm_sregs> {
    let mut r = Reader::new("SREG", raw, 1)?;
    let mut s = kvm_sregs::default();
    for (name, seg) in [
        ("cs", &mut s.cs),
        ("ds", &mut s.ds),
        ("es", &mut s.es),
        ("fs", &mut s.fs),
        ("gs", &mut s.gs),
        ("ss", &mut s.ss),
        ("tr", &mut s.tr),
        ("ldt", &mut s.ldt),
    ] {
        *seg = get_segment(&mut r, name)?;
    }
    for (name, dt) in [("gdt", &mut s.gdt), ("idt", &mut s.idt)] {
        dt.base = r.u64(name)?;
        dt.limit = r.u16(name)?;
    }
    for (name, slot) in [
        ("cr0", &mut s.cr0),
        ("cr2", &mut s.cr2),
        ("cr3", &mut s.cr3),
        ("cr4", &mut s.cr4),
        ("cr8", &mut s.cr8),
        ("efer", &mut s.efer),
        ("apic_base", &mut s.apic_base),
    ] {
        *slot = r.u64(name)?;
    }
    for v in s.interrupt_bitmap.iter_mut() {
        *v = r.u64("interrupt_bitmap")?;
    }
    r.finish()?;
    Ok(s)
}

fn decode_fpu(raw: &RawRecord<'_>) -> Result<kvm_fpu> {
    let mut r = Reader::new("FPU_", raw, 1)?;
    let mut f = kvm_fpu::default();
    for x in f.fpr.iter_mut() {
        *x = r.array("fpr")?;
    }
    f.fcw = r.u16("fcw")?;
    f.fsw = r.u16("fsw")?;
    f.ftwx = r.u8("ftwx")?;
    f.last_opcode = r.u16("last_opcode")?;
    f.last_ip = r.u64("last_ip")?;
    f.last_dp = r.u64("last_dp")?;
    for x in f.xmm.iter_mut() {
        *x = r.array("xmm")?;
    }
    f.mxcsr = r.u32("mxcsr")?;
    r.finish()?;
    Ok(f)
}

/// XCRS: the count is checked against the fixed array before any entry
/// is read.
fn decode_xcrs(raw: &RawRecord<'_>) -> Result<kvm_xcrs> {
    let mut r = Reader::new("XCRS", raw, 1)?;
    let mut x = kvm_xcrs::default();
    let n = r.u32("nr_xcrs")?;
    if n as usize > x.xcrs.len() {
        return Err(r.invalid("nr_xcrs", format!("{n} exceeds {}", x.xcrs.len())));
    }
    x.nr_xcrs = n;
    x.flags = r.u32("flags")?;
    for xcr in x.xcrs[..n as usize].iter_mut() {
        xcr.xcr = r.u32("xcr")?;
        xcr.value = r.u64("value")?;
    }
    r.finish()?;
    Ok(x)
}

fn decode_dbgr(raw: &RawRecord<'_>) -> Result<kvm_debugregs> {
    let mut r = Reader::new("DBGR", raw, 1)?;
    let mut d = kvm_debugregs::default();
    for v in d.db.iter_mut() {
        *v = r.u64("db")?;
    }
    d.dr6 = r.u64("dr6")?;
    d.dr7 = r.u64("dr7")?;
    d.flags = r.u64("flags")?;
    r.finish()?;
    Ok(d)
}

/// MSRS: (index, value) pairs; the count is checked against the payload
/// before anything is allocated for it.
fn decode_msrs(raw: &RawRecord<'_>) -> Result<Vec<(u32, u64)>> {
    let mut r = Reader::new("MSRS", raw, 1)?;
    let n = r.u32("count")?;
    // Each entry is 12 bytes: refuse counts the payload cannot hold
    // before allocating for them.
    if n as usize > r_remaining(raw) / 12 {
        return Err(r.invalid("count", format!("{n} entries do not fit the record")));
    }
    let mut msrs = Vec::new();
    for _ in 0..n {
        let i = r.u32("index")?;
        let v = r.u64("data")?;
        msrs.push((i, v));
    }
    r.finish()?;
    Ok(msrs)
}

fn decode_events(raw: &RawRecord<'_>) -> Result<kvm_vcpu_events> {
    let mut r = Reader::new("EVNT", raw, 1)?;
    let mut e = kvm_vcpu_events::default();
    e.exception.injected = r.u8("exception.injected")?;
    e.exception.nr = r.u8("exception.nr")?;
    e.exception.has_error_code = r.u8("exception.has_error_code")?;
    e.exception.pending = r.u8("exception.pending")?;
    e.exception.error_code = r.u32("exception.error_code")?;
    e.interrupt.injected = r.u8("interrupt.injected")?;
    e.interrupt.nr = r.u8("interrupt.nr")?;
    e.interrupt.soft = r.u8("interrupt.soft")?;
    e.interrupt.shadow = r.u8("interrupt.shadow")?;
    e.nmi.injected = r.u8("nmi.injected")?;
    e.nmi.pending = r.u8("nmi.pending")?;
    e.nmi.masked = r.u8("nmi.masked")?;
    e.sipi_vector = r.u32("sipi_vector")?;
    e.flags = r.u32("flags")?;
    e.smi.smm = r.u8("smi.smm")?;
    e.smi.pending = r.u8("smi.pending")?;
    e.smi.smm_inside_nmi = r.u8("smi.smm_inside_nmi")?;
    e.smi.latched_init = r.u8("smi.latched_init")?;
    e.triple_fault.pending = r.u8("triple_fault.pending")?;
    e.exception_has_payload = r.u8("exception_has_payload")?;
    e.exception_payload = r.u64("exception_payload")?;
    r.finish()?;
    Ok(e)
}

fn r_remaining(raw: &RawRecord<'_>) -> usize {
    raw.payload.len().saturating_sub(4)
}

fn put_segment(w: &mut RecordWriter<'_>, s: &kvm_segment) {
    w.u64(s.base).u32(s.limit).u16(s.selector);
    for v in [
        s.type_, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable,
    ] {
        w.u8(v);
    }
}

fn get_segment(r: &mut Reader<'_>, name: &str) -> Result<kvm_segment> {
    Ok(kvm_segment {
        base: r.u64(name)?,
        limit: r.u32(name)?,
        selector: r.u16(name)?,
        type_: r.u8(name)?,
        present: r.u8(name)?,
        dpl: r.u8(name)?,
        db: r.u8(name)?,
        s: r.u8(name)?,
        l: r.u8(name)?,
        g: r.u8(name)?,
        avl: r.u8(name)?,
        unusable: r.u8(name)?,
        padding: 0,
    })
}
