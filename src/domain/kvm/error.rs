//! Errors of the kvm domain: one variant per failing operation, each naming
//! the ioctl (or system call) and carrying its source error.

use crate::domain::DomainError;

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("opening /dev/kvm failed: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR failed: {0}")]
    SetTssAddr(#[source] kvm_ioctls::Error),
    #[error(
        "KVM_SET_USER_MEMORY_REGION ({bytes} bytes, KVM_MEM_LOG_DIRTY_PAGES) failed: {source}"
    )]
    SetMemoryRegion {
        bytes: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) failed: {0}")]
    EnableManualDirtyLog(#[source] kvm_ioctls::Error),
    #[error("dirty=ring: KVM_CAP_DIRTY_LOG_RING allows {max} bytes per ring, {want} needed (use dirty=bitmap)")]
    DirtyRingUnsupported { max: i32, want: u64 },
    #[error("KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING) failed: {0}")]
    EnableDirtyRing(#[source] kvm_ioctls::Error),
    #[error("mmap of the vCPU dirty ring failed: {0}")]
    MapDirtyRing(#[source] std::io::Error),
    #[error("KVM_RESET_DIRTY_RINGS failed: {0}")]
    ResetDirtyRings(#[source] std::io::Error),
    #[error("KVM_GET_DIRTY_LOG failed: {0}")]
    GetDirtyLog(#[source] std::io::Error),
    #[error("KVM_CLEAR_DIRTY_LOG failed: {0}")]
    ClearDirtyLog(#[source] std::io::Error),
    #[error("KVM_CREATE_VCPU failed: {0}")]
    CreateVcpu(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    GetSupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_CPUID2 failed: {0}")]
    SetCpuid(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_MSR_INDEX_LIST failed: {0}")]
    GetMsrIndexList(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_REGS failed: {0}")]
    GetRegs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_REGS failed: {0}")]
    SetRegs(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_SREGS failed: {0}")]
    GetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_SREGS failed: {0}")]
    SetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_FPU failed: {0}")]
    GetFpu(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_FPU failed: {0}")]
    SetFpu(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_XCRS failed: {0}")]
    GetXcrs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_XCRS failed: {0}")]
    SetXcrs(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_MSRS failed: {0}")]
    GetMsrs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_MSRS failed: {0}")]
    SetMsrs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_MSRS set {set} of {want} MSRs; MSR {index:#x} was refused")]
    SetMsrsPartial { set: usize, want: usize, index: u32 },
    #[error("KVM_GET_VCPU_EVENTS failed: {0}")]
    GetVcpuEvents(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_VCPU_EVENTS failed: {0}")]
    SetVcpuEvents(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_DEBUGREGS failed: {0}")]
    GetDebugRegs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_DEBUGREGS failed: {0}")]
    SetDebugRegs(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_MP_STATE failed: {0}")]
    GetMpState(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_MP_STATE failed: {0}")]
    SetMpState(#[source] kvm_ioctls::Error),
    #[error("KVM_RUN failed: {0}")]
    Run(#[source] kvm_ioctls::Error),
    #[error("registering the vCPU kick signal (SIGRTMIN+{offset}) failed: {source}")]
    RegisterKick {
        offset: i32,
        #[source]
        source: vmm_sys_util::errno::Error,
    },
    #[error("spawning the vCPU thread failed: {0}")]
    SpawnVcpu(#[source] std::io::Error),
    #[error("vCPU thread: {0}")]
    VcpuThread(String),
    #[error("guest {guest}: image of {image} bytes does not fit below {limit:#x}")]
    GuestImage {
        guest: String,
        image: usize,
        limit: u64,
    },
    #[error("saved state record {record}: {reason}")]
    State {
        record: &'static str,
        reason: String,
    },
    #[error("restore: memory image is {got} bytes, spec says mem={want}")]
    RestoreMemory { got: usize, want: u64 },
    #[error("opening console file {path:?} failed: {source}")]
    Console {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tap(#[from] super::tap::TapError),
    #[error(transparent)]
    DiskImage(#[from] crate::disk::image::ImageError),
    #[error(transparent)]
    Domain(#[from] DomainError),
}

impl From<KvmError> for DomainError {
    fn from(e: KvmError) -> Self {
        match e {
            KvmError::Domain(d) => d,
            other => DomainError::Sys {
                op: "kvm domain",
                source: std::io::Error::other(other),
            },
        }
    }
}

pub type Result<T> = std::result::Result<T, KvmError>;
