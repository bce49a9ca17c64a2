//! The receive ring of the slot-ring transports: one memfd mapped twice
//! back to back, so a record that runs past the ring's end is still one
//! slice (see [`crate::transport::slots`] for why records may straddle).

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("mapping the receive ring of {len} bytes: {source}")]
    Map { len: usize, source: io::Error },
}

/// A ring of `len` bytes mapped twice back to back: byte `len + i` is byte
/// `i`, so any `n <= len` bytes from any offset `< len` are one slice.
///
/// Invariant: `base..base+2*len` stays mapped for the value's life.
pub struct MirrorRing {
    base: *mut u8,
    len: usize,
}

// SAFETY: plain memory; the owner coordinates writers (the kernel, into
// accepted placements) and readers (the parser, behind the write position).
unsafe impl Send for MirrorRing {}

impl MirrorRing {
    /// `len` must be a multiple of the page size (validated announcements are).
    pub fn new(len: usize) -> Result<Self, MirrorError> {
        let map_err = |source| MirrorError::Map { len, source };
        // SAFETY: memfd_create with a static NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"castor-ring".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(map_err(io::Error::last_os_error()));
        }
        // SAFETY: fd is ours; closed below on every path.
        let r = unsafe { libc::ftruncate(fd, len as libc::off_t) };
        if r != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: fd is ours.
            unsafe { libc::close(fd) };
            return Err(map_err(e));
        }
        // SAFETY: reserve 2*len of address space, then map the memfd over
        // both halves with MAP_FIXED inside our own reservation.
        let base = unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                2 * len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                let e = io::Error::last_os_error();
                libc::close(fd);
                return Err(map_err(e));
            }
            for half in 0..2 {
                let p = libc::mmap(
                    base.cast::<u8>().add(half * len).cast(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_POPULATE,
                    fd,
                    0,
                );
                if p == libc::MAP_FAILED {
                    let e = io::Error::last_os_error();
                    libc::munmap(base, 2 * len);
                    libc::close(fd);
                    return Err(map_err(e));
                }
            }
            libc::close(fd);
            base.cast::<u8>()
        };
        Ok(MirrorRing { base, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start of the first mapping (what gets registered with the kernel).
    pub fn base(&self) -> *mut u8 {
        self.base
    }

    /// `n` bytes at ring offset `off`, read through the mirror past the end.
    /// Panics unless `off < len` and `n <= len`.
    pub fn slice(&self, off: usize, n: usize) -> &[u8] {
        assert!(off < self.len && n <= self.len, "ring slice out of range");
        // SAFETY: off + n < 2*len lies inside the mapping (invariant); the
        // caller reads only bytes that have landed and that no accepted
        // placement overwrites before the next credit (slots protocol).
        unsafe { std::slice::from_raw_parts(self.base.add(off), n) }
    }

    /// [`MirrorRing::slice`], writable: for decrypting a landed record in
    /// place. Panics unless `off < len` and `n <= len`.
    pub fn slice_mut(&mut self, off: usize, n: usize) -> &mut [u8] {
        assert!(off < self.len && n <= self.len, "ring slice out of range");
        // SAFETY: as in `slice`; `&mut self` makes this the only slice of
        // the ring handed out, and the bytes have landed, so neither the
        // kernel nor the NIC writes them until they are credited back.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(off), n) }
    }
}

impl Drop for MirrorRing {
    fn drop(&mut self) {
        // SAFETY: the reservation made in `new`.
        unsafe { libc::munmap(self.base.cast(), 2 * self.len) };
    }
}
