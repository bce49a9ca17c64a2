//! The `kvm` domain: a small VMM on /dev/kvm running an embedded test guest
//! (`guests/`), with KVM dirty logging, a serial console and a paravirtual
//! clock.
//!
//! Pieces, one file each: [`spec`] (`kvm:key=value,...`), `guests` (the
//! embedded images), `boot` (guest layout and entry state), `dirty` (dirty
//! log), `ring` (the dirty ring alternative), `vcpu` (the vCPU thread and pause protocol), `vcpu_state` (vCPU
//! save/restore), [`devices`] (serial, clock, NIC, block), `guest_ram`
//! (bounds-checked device access to guest memory), [`tap`] (the NIC's
//! backend), `state` and `wire` (the saved-state format).
//!
//! Public surface: [`KvmSpec`] (`kvm:guest=memtouch,mem=16MiB,...`; keys
//! guest, mem, regions, region_pages, touch, pattern, seed, dirty, tap,
//! mac, ip, disk, console),
//! [`KvmDomain::new`] / [`KvmDomain::restore`], the [`Domain`] trait, and
//! [`KvmDomain::console`] for the guest's serial output. The guest ABI
//! (entry state, memory layout, ports) is documented in guests/README.md.
//!
//! Invariants:
//! - One memory slot covers all guest memory from gpa 0 with
//!   `KVM_MEM_LOG_DIRTY_PAGES`; pages the VMM writes (boot layout) are in
//!   the VMM-side dirty bitmap, so the first harvest reports them too.
//! - A fresh domain holds the boot image and boot vCPU state; a restored
//!   one ([`KvmDomain::restore`]) holds the given memory and state and
//!   continues where the checkpoint left off once started. Neither has run
//!   a guest instruction before `start`.
//! - Between `pause` and `resume` the vCPU thread is parked outside
//!   KVM_RUN with no I/O half done, so memory is stable and the saved state
//!   is exact. Devices write guest memory (NIC RX, block reads) only on the
//!   vCPU thread inside a port exit, so this holds for them too, and they
//!   mark every page they write VMM-dirty.

mod boot;
pub mod devices;
mod dirty;
mod error;
mod guest_ram;
mod guests;
mod ring;
pub mod spec;
mod state;
pub mod tap;
mod vcpu;
mod vcpu_state;
mod wire;

use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Cap, Kvm, VmFd};

use crate::domain::{Domain, DomainError, GuestMemory, Layout};

pub use devices::console::Console;
pub use dirty::DirtyMode;
pub use error::KvmError;
pub use spec::{ConsoleSink, DirtyKind, KvmSpec, Pattern};
pub use vcpu::PauseTiming;

use devices::Devices;
use dirty::DirtyLog;
use error::Result;
use vcpu::Vcpu;
use vcpu_state::{VcpuState, MSR_IA32_TSC};

/// The single memory slot.
const SLOT: u32 = 0;
/// Where KVM may put the real-mode TSS on Intel hosts: three pages just
/// below the 4 GiB BIOS area, outside guest RAM.
const TSS_ADDR: usize = 0xfffb_d000;

/// A guest on /dev/kvm with one vCPU.
pub struct KvmDomain {
    spec: KvmSpec,
    /// Declared first: the vCPU thread stops before the VM and memory drop.
    vcpu: Vcpu,
    devices: Arc<Mutex<Devices>>,
    console: Console,
    dirty: DirtyLog,
    vm: VmFd,
    kvm: Kvm,
    msr_indices: Vec<u32>,
    has_xcrs: bool,
    /// IA32_TSC of a restored domain, rewritten at `start` so guest TSC does
    /// not leap by the time between restore and start.
    pending_tsc: Option<u64>,
    started: bool,
    running: bool,
    /// Declared last: unmapped after the VM that references it is closed.
    mem: GuestMemory,
}

/// A VM with memory, dirty log and one vCPU, nothing loaded yet.
struct Parts {
    kvm: Kvm,
    vm: VmFd,
    mem: GuestMemory,
    dirty: DirtyLog,
    vcpu: Vcpu,
    msr_indices: Vec<u32>,
    has_xcrs: bool,
}

fn build_vm(spec: &KvmSpec) -> Result<Parts> {
    let kvm = Kvm::new().map_err(KvmError::OpenKvm)?;
    let vm = kvm.create_vm().map_err(KvmError::CreateVm)?;
    vm.set_tss_address(TSS_ADDR).map_err(KvmError::SetTssAddr)?;
    let len = usize::try_from(spec.mem).map_err(|_| DomainError::Spec {
        spec: spec.to_string(),
        reason: format!("mem={} does not fit this host's address space", spec.mem),
    })?;
    let mem = GuestMemory::new_memfd(len, "castor-guest")?;
    // The manual-protect capability must be enabled before the slot exists.
    let mut dirty = DirtyLog::new(&vm, SLOT, mem.pages(), spec.dirty == DirtyKind::Ring)?;
    let region = kvm_userspace_memory_region {
        slot: SLOT,
        flags: KVM_MEM_LOG_DIRTY_PAGES,
        guest_phys_addr: 0,
        memory_size: spec.mem,
        userspace_addr: mem.as_ptr() as u64,
    };
    // SAFETY: the region is `mem`'s whole mapping, which outlives the VM
    // (KvmDomain drops `mem` last) and is not unmapped while registered.
    unsafe { vm.set_user_memory_region(region) }.map_err(|source| KvmError::SetMemoryRegion {
        bytes: spec.mem,
        source,
    })?;
    let fd = vm.create_vcpu(0).map_err(KvmError::CreateVcpu)?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(KvmError::GetSupportedCpuid)?;
    fd.set_cpuid2(&cpuid).map_err(KvmError::SetCpuid)?;
    let ring = dirty.attach_ring(&fd, &vm)?;
    let msr_indices = vcpu_state::supported_msrs(&kvm)?;
    let has_xcrs = kvm.check_extension(Cap::Xcrs);
    Ok(Parts {
        kvm,
        vm,
        mem,
        dirty,
        vcpu: Vcpu::new(fd, ring)?,
        msr_indices,
        has_xcrs,
    })
}

/// Gives the NIC and block device guest memory and the backends the spec
/// names (TAP, disk image).
fn attach_devices(spec: &KvmSpec, p: &Parts, mut devices: Devices) -> Result<Devices> {
    // SAFETY: the devices live in the KvmDomain built from `p`, which drops
    // them (and joins the vCPU thread holding them) before `p.mem`.
    let ram = unsafe { guest_ram::GuestRam::new(&p.mem, p.dirty.vmm_handle()) };
    if let Some(mac) = spec.mac {
        devices.net = devices::net::Net::new(mac);
    }
    match &spec.tap {
        Some(name) => {
            let tap = tap::TapBackend(std::sync::Arc::new(tap::Tap::open(name)?));
            devices.net.attach(
                ram.clone(),
                Some(Box::new(tap.clone())),
                Some(Box::new(tap)),
            );
        }
        None => devices.net.attach(ram.clone(), None, None),
    }
    let disk = match &spec.disk {
        Some(path) => Some(open_disk(path)?),
        None => None,
    };
    devices.block.attach(ram, disk);
    Ok(devices)
}

/// Opens the block device's image behind a write log (see `crate::disk`).
fn open_disk(path: &str) -> Result<Arc<crate::disk::WriteLog>> {
    let img = crate::disk::DiskImage::open(std::path::Path::new(path))?;
    Ok(Arc::new(crate::disk::WriteLog::new(
        img,
        Arc::new(crate::disk::Fence::open()),
        crate::disk::LogConfig::default(),
    )))
}

/// Name of the block device's disk in a protection session (the backup
/// keeps it as `STATE_DIR/disks/block.img`).
pub const BLOCK_DISK: &str = "block";

impl KvmDomain {
    /// Creates the guest paused at its first instruction, with the boot
    /// layout in memory (and in the dirty log) and dirty tracking armed.
    pub fn new(spec: &KvmSpec) -> Result<Self> {
        let p = build_vm(spec)?;
        let image = guests::image(&spec.guest).ok_or_else(|| DomainError::Spec {
            spec: spec.to_string(),
            reason: format!("no embedded guest {:?}", spec.guest),
        })?;
        boot::load_guest(spec, image, &p.mem, &p.dirty)?;
        boot::setup_boot_state(&p.vcpu.fd())?;
        let console = Console::new(spec.console.as_ref())?;
        let devices = attach_devices(spec, &p, Devices::new(console.clone()))?;
        Ok(Self::assemble(spec, p, devices, console, None))
    }

    /// Builds a fresh VM holding `memory` (the whole guest image, `mem`
    /// bytes) and the saved `state` of a paused domain, ready to
    /// [`Domain::start`]: the guest continues where the checkpoint left off.
    /// Dirty tracking is armed with nothing dirty: `memory` is this
    /// domain's initial memory.
    pub fn restore(spec: &KvmSpec, memory: &[u8], state: &[u8]) -> Result<Self> {
        if memory.len() as u64 != spec.mem {
            return Err(KvmError::RestoreMemory {
                got: memory.len(),
                want: spec.mem,
            });
        }
        let records = state::split(state)?;
        let vstate = VcpuState::decode(&records)?;
        let p = build_vm(spec)?;
        // SAFETY: `memory` has exactly the mapping's length (checked above)
        // and is a Rust slice, so it cannot overlap the fresh mapping; no
        // vCPU has run yet, so nothing else writes guest memory.
        unsafe { std::ptr::copy_nonoverlapping(memory.as_ptr(), p.mem.as_ptr(), memory.len()) };
        vstate.restore(&p.vcpu.fd())?;
        let console = Console::new(spec.console.as_ref())?;
        let mut devices = attach_devices(spec, &p, Devices::new(console.clone()))?;
        devices.restore(&records)?;
        let tsc = vstate
            .msrs
            .iter()
            .find(|(i, _)| *i == MSR_IA32_TSC)
            .map(|&(_, v)| v);
        Ok(Self::assemble(spec, p, devices, console, tsc))
    }

    fn assemble(
        spec: &KvmSpec,
        p: Parts,
        devices: Devices,
        console: Console,
        pending_tsc: Option<u64>,
    ) -> Self {
        KvmDomain {
            spec: spec.clone(),
            vcpu: p.vcpu,
            devices: Arc::new(Mutex::new(devices)),
            console,
            dirty: p.dirty,
            vm: p.vm,
            kvm: p.kvm,
            msr_indices: p.msr_indices,
            has_xcrs: p.has_xcrs,
            pending_tsc,
            started: false,
            running: false,
            mem: p.mem,
        }
    }

    pub fn spec(&self) -> &KvmSpec {
        &self.spec
    }

    /// The guest's serial output.
    pub fn console(&self) -> &Console {
        &self.console
    }

    /// Which dirty-log interface this host's KVM offers.
    pub fn dirty_mode(&self) -> DirtyMode {
        self.dirty.mode()
    }

    /// Timing of the last `pause`.
    pub fn last_pause(&self) -> PauseTiming {
        self.vcpu.last_pause
    }

    /// True once the guest executed HLT (memtouch: after a FAIL line).
    pub fn halted(&self) -> bool {
        self.vcpu.halted()
    }

    /// Guest time of the paravirtual clock, in ns.
    pub fn guest_time_ns(&self) -> u64 {
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clock
            .now()
    }

    /// The NIC's frame counters.
    pub fn net_stats(&self) -> devices::net::NetStats {
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .net
            .stats
    }

    /// The /dev/kvm handle (capability queries).
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    fn save(&mut self, out: &mut Vec<u8>) -> Result<()> {
        let vstate = VcpuState::save(&self.vcpu.fd(), &self.msr_indices, self.has_xcrs)?;
        let devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        state::encode(&vstate, &devices, out);
        Ok(())
    }

    fn start_vcpu(&mut self) -> Result<()> {
        if let Some(tsc) = self.pending_tsc.take() {
            let entry = kvm_bindings::kvm_msr_entry {
                index: MSR_IA32_TSC,
                data: tsc,
                ..Default::default()
            };
            let msrs = kvm_bindings::Msrs::from_entries(&[entry]).map_err(|e| KvmError::State {
                record: "MSRS",
                reason: format!("building the IA32_TSC entry: {e:?}"),
            })?;
            self.vcpu.fd().set_msrs(&msrs).map_err(KvmError::SetMsrs)?;
        }
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clock
            .run();
        self.vcpu.start(self.devices.clone())
    }
}

/// Decodes only the vCPU registers' instruction pointer and the device
/// records of a saved state; for tests and diagnostics.
pub fn describe_state(state: &[u8]) -> std::result::Result<String, KvmError> {
    let v = state::decode_vcpu(state)?;
    Ok(format!(
        "rip={:#x} rsp={:#x} cr0={:#x} msrs={}",
        v.regs.rip,
        v.regs.rsp,
        v.sregs.cr0,
        v.msrs.len()
    ))
}

impl Domain for KvmDomain {
    fn layout(&self) -> Layout {
        self.spec.layout()
    }

    /// memtouch's loops: it writes one console line (`seq N ok`) per
    /// pass of touching and verifying. Other guests: unknown.
    fn progress(&self) -> Option<u64> {
        (self.spec.guest == "memtouch").then(|| self.console.lines())
    }

    /// memtouch: stamped when its last loop line ended, with the vCPU's
    /// CPU time then (so a loop in progress is never counted); before
    /// its first line, now.
    fn progress_mark(&self) -> Option<crate::domain::ProgressMark> {
        if self.spec.guest != "memtouch" {
            return None;
        }
        let (count, at, cpu) = self
            .console
            .line_mark()
            .unwrap_or_else(|| (0, std::time::Instant::now(), self.vcpu.cpu_time()));
        Some(crate::domain::ProgressMark { count, at, cpu })
    }

    fn disks(&self) -> Vec<(String, Arc<crate::disk::WriteLog>)> {
        let d = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        d.block
            .disk()
            .map(|l| vec![(BLOCK_DISK.to_string(), l.clone())])
            .unwrap_or_default()
    }

    fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    fn describe(&self) -> String {
        format!("kvm:{}", self.spec)
    }

    fn start(&mut self) -> std::result::Result<(), DomainError> {
        if self.started {
            return Err(DomainError::Workload(
                "kvm domain: start called twice".into(),
            ));
        }
        self.start_vcpu()?;
        self.started = true;
        self.running = true;
        Ok(())
    }

    /// Idempotent; returns once the vCPU is parked outside KVM_RUN.
    fn pause(&mut self) -> std::result::Result<(), DomainError> {
        if self.running {
            self.vcpu.pause()?;
            self.running = false;
        }
        Ok(())
    }

    /// Before `start` it is `start`; resuming a running domain does nothing.
    fn resume(&mut self) -> std::result::Result<(), DomainError> {
        if !self.started {
            return self.start();
        }
        if !self.running {
            self.vcpu.resume()?;
            self.running = true;
        }
        Ok(())
    }

    /// Naps the vCPU `pct` percent of every 10 ms (see `vcpu.rs`); 100
    /// holds it still until lowered.
    fn throttle(&mut self, pct: u8) -> bool {
        self.vcpu.set_throttle(pct);
        true
    }

    /// Also valid while running (pre-copy): see `dirty.rs` for why no write
    /// is lost when the caller reads the pages after this returns.
    fn harvest_dirty(&mut self, out: &mut Vec<u64>) -> std::result::Result<(), DomainError> {
        Ok(self.dirty.harvest(&self.vm, out)?)
    }

    /// Puts the NIC's backend (the TAP) behind the output queue: the vCPU
    /// thread hands each TX frame to the queue tagged with the running
    /// epoch, and `castor-outq` writes it to the TAP once committed. TX
    /// happens only on the vCPU thread inside a port exit, which is parked
    /// between `pause` and `resume`: the tagging invariant of `outq` holds.
    fn attach_output(
        &mut self,
        q: &crate::outq::OutputQueue,
    ) -> std::result::Result<(), DomainError> {
        if self.started {
            return Err(DomainError::Workload(
                "kvm domain: attach_output must come before start".into(),
            ));
        }
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sink) = devices.net.take_sink() {
            let handle = q.handle(Box::new(devices::net::SinkEgress(sink)));
            devices.net.set_sink(Some(Box::new(handle)));
        }
        Ok(())
    }

    fn announce(&mut self) -> std::result::Result<Vec<String>, DomainError> {
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        let mut said = Vec::new();
        if let Some(ip) = self.spec.ip {
            if devices.net.announce_ipv4(ip) {
                said.push(format!("gratuitous ARP for {ip}"));
            }
        }
        if let Some(ip) = self.spec.ip6 {
            if devices.net.announce_ipv6(ip) {
                said.push(format!("unsolicited neighbour advertisement for {ip}"));
            }
        }
        Ok(said)
    }

    fn save_state(&mut self, out: &mut Vec<u8>) -> std::result::Result<(), DomainError> {
        if self.running {
            return Err(DomainError::Workload(
                "kvm domain: save_state needs the domain paused".into(),
            ));
        }
        Ok(self.save(out)?)
    }
}

#[cfg(test)]
mod net_tests;
#[cfg(test)]
mod tests;
