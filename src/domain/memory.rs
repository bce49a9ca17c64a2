//! Guest memory: one page-aligned mapping, anonymous (sim domain, replicas)
//! or a shared memfd (kvm domain).
//!
//! Guest memory is shared between the guest (workload threads or vCPUs) and
//! castor's own threads, which read it while the guest may be writing. It is
//! therefore only ever accessed through raw pointers, never through Rust
//! references that would promise the bytes do not change. Readers that need
//! stable bytes (checkpoint copy, digest) run while the domain is paused.

use std::ptr::NonNull;

use crate::domain::DomainError;
use crate::PAGE_SIZE;

/// A page-aligned mapping of `len` bytes of guest memory.
#[derive(Debug)]
pub struct GuestMemory {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: GuestMemory is a plain mapping; all access goes through raw
// pointers whose synchronisation is the domain's pause protocol, so moving
// or sharing the handle between threads is sound.
unsafe impl Send for GuestMemory {}
// SAFETY: as above; `&GuestMemory` hands out only raw pointers and copies.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Maps `len` bytes (a multiple of the page size) of zeroed memory.
    /// Transparent huge pages are disabled so dirty tracking is per 4 KiB.
    pub fn new(len: usize) -> Result<Self, DomainError> {
        Self::map(len, libc::MADV_NOHUGEPAGE)
    }

    /// Like [`GuestMemory::new`], backed by transparent huge pages where
    /// the kernel has them: for castor's own page buffers that are never
    /// dirty-tracked (the primary's shadow with `--huge-shadow`). A buffer
    /// written at random gfns then takes one fault per 2 MiB instead of one
    /// per page (each 4 KiB fault costs the writer a kernel entry, a zeroed
    /// page and a memcg charge; in the 1 GiB uniform bench, early epochs
    /// encoded at 7-14 µs per page against 1.1 with huge pages), and its TLB
    /// reach grows 512 times. Cost: memory is committed and zeroed per
    /// 2 MiB, so a sparse buffer may hold up to 2 MiB per page written (a
    /// seed of a guest whose data is spread thin zeroes all of it).
    pub fn new_huge(len: usize) -> Result<Self, DomainError> {
        Self::map(len, libc::MADV_HUGEPAGE)
    }

    /// Maps `len` zeroed bytes and applies `advice` (huge pages or not).
    fn map(len: usize, advice: libc::c_int) -> Result<Self, DomainError> {
        if len == 0 || len % PAGE_SIZE != 0 {
            return Err(DomainError::Spec {
                spec: format!("{len} bytes"),
                reason: format!("memory size must be a non-zero multiple of {PAGE_SIZE}"),
            });
        }
        // SAFETY: anonymous mapping with no address hint; the kernel picks a
        // fresh range, so no existing Rust object is aliased.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(DomainError::Map {
                bytes: len as u64,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `p` is the mapping just created, `len` bytes long. A failed
        // madvise only costs dirty-tracking precision or speed, never
        // soundness.
        unsafe {
            libc::madvise(p, len, advice);
        }
        Ok(GuestMemory {
            ptr: NonNull::new(p as *mut u8).expect("mmap returned null without MAP_FAILED"),
            len,
        })
    }

    /// Maps `len` bytes of a fresh memfd, shared: guest memory another
    /// process (a device backend, a future live-upgraded VMM) can map too.
    /// Zero-filled and page-granular like [`GuestMemory::new`].
    pub fn new_memfd(len: usize, name: &str) -> Result<Self, DomainError> {
        if len == 0 || len % PAGE_SIZE != 0 {
            return Err(DomainError::Spec {
                spec: format!("{len} bytes"),
                reason: format!("memory size must be a non-zero multiple of {PAGE_SIZE}"),
            });
        }
        let sys = |op: &'static str| DomainError::Sys {
            op,
            source: std::io::Error::last_os_error(),
        };
        let cname = std::ffi::CString::new(name).map_err(|_| DomainError::Spec {
            spec: name.to_string(),
            reason: "memfd name contains a NUL byte".into(),
        })?;
        // SAFETY: memfd_create takes a NUL-terminated name and flags.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(sys("memfd_create"));
        }
        // SAFETY: fd is the new memfd, owned here and closed exactly once.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on our own fd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(sys("ftruncate memfd"));
        }
        // SAFETY: a shared mapping of the whole memfd at a kernel-chosen
        // address; no existing Rust object is aliased. The mapping keeps the
        // file alive after `fd` is closed.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(DomainError::Map {
                bytes: len as u64,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(GuestMemory {
            ptr: NonNull::new(p as *mut u8).expect("mmap returned null without MAP_FAILED"),
            len,
        })
    }

    /// Takes ownership of an existing mapping (a Xen guest's memory mapped
    /// through privcmd, say); it is unmapped with `munmap` on drop.
    ///
    /// # Safety
    /// `ptr .. ptr + len` is one page-aligned mapping (possibly made of
    /// several VMAs) that nothing else unmaps, readable for its whole length.
    pub unsafe fn from_raw_mapping(ptr: NonNull<u8>, len: usize) -> Self {
        GuestMemory { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn pages(&self) -> u64 {
        (self.len / PAGE_SIZE) as u64
    }

    /// Base address of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Address of page `gfn`. Panics if `gfn` is outside the mapping: a gfn
    /// reaching this point has already been validated by its producer.
    pub fn page_ptr(&self, gfn: u64) -> *mut u8 {
        assert!(
            gfn < self.pages(),
            "gfn {gfn} outside {} pages",
            self.pages()
        );
        // SAFETY: gfn < pages, so the offset stays inside the mapping.
        unsafe { self.ptr.as_ptr().add(gfn as usize * PAGE_SIZE) }
    }

    /// Copies page `gfn` into `out`.
    pub fn read_page(&self, gfn: u64, out: &mut [u8; PAGE_SIZE]) {
        let src = self.page_ptr(gfn);
        // SAFETY: src is a valid page inside the mapping and `out` is a
        // distinct Rust buffer of exactly one page.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), PAGE_SIZE) }
    }

    /// Overwrites page `gfn` with `data`.
    pub fn write_page(&self, gfn: u64, data: &[u8; PAGE_SIZE]) {
        let dst = self.page_ptr(gfn);
        // SAFETY: dst is a valid page inside the mapping; `data` is a Rust
        // buffer and cannot overlap guest memory handed out only as pointers.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, PAGE_SIZE) }
    }

    /// The whole mapping as a byte slice.
    ///
    /// # Safety
    /// No thread may write guest memory while the slice is alive (the domain
    /// is paused, or the memory belongs to a replica nobody else writes).
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the caller guarantees no concurrent writers; the mapping is
        // `len` bytes and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe the mapping created in `new`, unmapped once.
        unsafe {
            libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unaligned_size() {
        assert!(GuestMemory::new(100).is_err());
        assert!(GuestMemory::new(0).is_err());
    }

    #[test]
    fn memfd_memory_round_trips_pages() {
        let m = GuestMemory::new_memfd(8 * PAGE_SIZE, "castor-test").unwrap();
        m.write_page(5, &[3u8; PAGE_SIZE]);
        let mut p = [0u8; PAGE_SIZE];
        m.read_page(5, &mut p);
        assert_eq!(p, [3u8; PAGE_SIZE]);
        m.read_page(4, &mut p);
        assert_eq!(p, [0u8; PAGE_SIZE]);
        assert!(GuestMemory::new_memfd(100, "x").is_err());
    }

    /// The `VmFlags` line of the mapping that starts at `addr`
    /// (`/proc/self/smaps`).
    fn vm_flags(addr: *mut u8) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{:x}-", addr as usize);
        let vma = smaps.split_once(&start).expect("mapping in smaps").1;
        let line = vma.lines().find(|l| l.starts_with("VmFlags:")).unwrap();
        line.to_string()
    }

    /// Guest memory is tracked per 4 KiB, so it must never be backed by
    /// huge pages; castor's own buffers may ask for them (`--huge-shadow`).
    #[test]
    fn only_castors_own_buffers_ask_for_huge_pages() {
        let len = 4 << 20;
        let guest = GuestMemory::new(len).unwrap();
        let own = GuestMemory::new_huge(len).unwrap();
        let (g, o) = (vm_flags(guest.as_ptr()), vm_flags(own.as_ptr()));
        assert!(g.split_whitespace().any(|f| f == "nh"), "guest: {g}");
        assert!(!g.split_whitespace().any(|f| f == "hg"), "guest: {g}");
        assert!(o.split_whitespace().any(|f| f == "hg"), "own: {o}");
        own.write_page(600, &[9u8; PAGE_SIZE]);
        let mut p = [0u8; PAGE_SIZE];
        own.read_page(600, &mut p);
        assert_eq!(p, [9u8; PAGE_SIZE]);
    }

    #[test]
    fn page_round_trip() {
        let m = GuestMemory::new(4 * PAGE_SIZE).unwrap();
        let mut p = [7u8; PAGE_SIZE];
        m.write_page(3, &p);
        p.fill(0);
        m.read_page(3, &mut p);
        assert!(p.iter().all(|&b| b == 7));
        m.read_page(2, &mut p);
        assert!(p.iter().all(|&b| b == 0));
    }
}
