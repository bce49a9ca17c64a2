//! A disk image file: positional reads and writes with every range checked
//! against the image's size, zeroing by hole punching, and `fdatasync`.
//!
//! Invariant: no method touches a byte at or past [`DiskImage::size`]; a
//! range that does not fit is refused before any I/O.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{op} disk image {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {path}: range {offset}+{len} runs past its size {size}")]
    Range {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("disk image {path} is empty (size 0); create it with a size first (qemu-img create -f raw PATH 64M)")]
    Empty { path: PathBuf },
}

/// An open raw image. Cheap to share behind an `Arc`: positional I/O needs
/// no `&mut`.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    size: u64,
    path: PathBuf,
}

/// Largest buffer of zeros written when hole punching is not supported.
const ZERO_CHUNK: usize = 1 << 20;

impl DiskImage {
    /// Opens an existing image read-write; its size is the file's length.
    pub fn open(path: &Path) -> Result<DiskImage, ImageError> {
        let io_err = |op| {
            let path = path.to_path_buf();
            move |source| ImageError::Io { op, path, source }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err("opening"))?;
        let size = file.metadata().map_err(io_err("reading size of"))?.len();
        if size == 0 {
            return Err(ImageError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(DiskImage {
            file,
            size,
            path: path.to_path_buf(),
        })
    }

    /// Creates (or truncates) an all-zero sparse image of `size` bytes.
    pub fn create(path: &Path, size: u64) -> Result<DiskImage, ImageError> {
        let io_err = |op| {
            let path = path.to_path_buf();
            move |source| ImageError::Io { op, path, source }
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err("creating the directory of"))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io_err("creating"))?;
        file.set_len(size).map_err(io_err("sizing"))?;
        Ok(DiskImage {
            file,
            size,
            path: path.to_path_buf(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, op: &'static str) -> impl FnOnce(io::Error) -> ImageError + '_ {
        move |source| ImageError::Io {
            op,
            path: self.path.clone(),
            source,
        }
    }

    /// Checks that `offset..offset+len` lies inside the image.
    pub fn check(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(ImageError::Range {
                path: self.path.clone(),
                offset,
                len,
                size: self.size,
            }),
        }
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        self.check(offset, buf.len() as u64)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(self.io("reading"))
    }

    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<(), ImageError> {
        self.check(offset, data.len() as u64)?;
        self.file
            .write_all_at(data, offset)
            .map_err(self.io("writing"))
    }

    /// Writes `bufs`, one after another, at `offset` (`pwritev`, repeated
    /// until every byte is written). `bufs` is consumed (advanced past what
    /// was written).
    pub fn write_vectored_at(
        &self,
        bufs: &mut [io::IoSlice<'_>],
        offset: u64,
    ) -> Result<(), ImageError> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check(offset, total)?;
        let mut bufs = bufs;
        let mut at = offset;
        io::IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            let n = bufs.len().min(1024) as libc::c_int;
            // SAFETY: `IoSlice` is ABI-compatible with `iovec` (std
            // guarantees it on Unix); the first `n` of them point at live
            // buffers we only read, and the range was checked above.
            let rc = unsafe {
                libc::pwritev(
                    self.file.as_raw_fd(),
                    bufs.as_ptr().cast::<libc::iovec>(),
                    n,
                    at as libc::off_t,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(self.io("writing")(e));
            }
            if rc == 0 {
                return Err(self.io("writing")(io::ErrorKind::WriteZero.into()));
            }
            at += rc as u64;
            io::IoSlice::advance_slices(&mut bufs, rc as usize);
        }
        Ok(())
    }

    /// Makes `offset..offset+len` read as zeros: punches a hole (keeping the
    /// size), or writes zeros where the file system cannot punch.
    pub fn zero(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let punched = self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        );
        if punched.is_ok() {
            return Ok(());
        }
        let zeros = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = ((end - at) as usize).min(zeros.len());
            self.file
                .write_all_at(&zeros[..n], at)
                .map_err(self.io("zeroing"))?;
            at += n as u64;
        }
        Ok(())
    }

    /// Allocates the blocks of `offset..offset+len` (size unchanged), so a
    /// write there cannot then fail for lack of space. Where the file
    /// system cannot preallocate, does nothing.
    pub fn reserve(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match self.fallocate(libc::FALLOC_FL_KEEP_SIZE, offset, len) {
            Ok(()) => Ok(()),
            Err(e) => match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(()),
                _ => Err(self.io("reserving space in")(e)),
            },
        }
    }

    /// `fallocate(2)` with `mode` on a range the caller has checked.
    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on an fd we own with a range the caller checked;
        // it touches no memory of ours.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// The first offset at or after `offset` that may hold data (`None`:
    /// only a hole remains). Where the file system cannot tell
    /// (`SEEK_DATA` unsupported) every offset may hold data.
    pub fn next_data(&self, offset: u64) -> Result<Option<u64>, ImageError> {
        if offset >= self.size {
            return Ok(None);
        }
        // SAFETY: lseek on an fd we own; it touches no memory of ours.
        let at = unsafe {
            libc::lseek(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                libc::SEEK_DATA,
            )
        };
        if at >= 0 {
            return Ok(Some((at as u64).min(self.size)));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some(offset)),
            _ => Err(self.io("seeking data in")(e)),
        }
    }

    /// Renames the image file (same file system), keeping it open.
    pub fn rename_to(&mut self, to: &Path) -> Result<(), ImageError> {
        std::fs::rename(&self.path, to).map_err(|source| ImageError::Io {
            op: "renaming",
            path: self.path.clone(),
            source,
        })?;
        self.path = to.to_path_buf();
        Ok(())
    }

    /// Turns the kernel's read-ahead off for this image
    /// (`POSIX_FADV_RANDOM`): a 4 KiB read of an uncached range then brings
    /// in that range alone, as small folios. The backup's undo journal read
    /// (until stop 17, see `docs/disk.md`; the redo log reads nothing) the
    /// old contents of every range an epoch writes; with read-ahead each
    /// such read of a cold range cached the 128 KiB around it in large
    /// folios, and every later 4 KiB write into one of those walks all of
    /// its blocks (`ext4_block_write_begin`). Advice only: on failure the
    /// image works as before, so the error is returned for the caller to log.
    pub fn advise_random(&self) -> Result<(), ImageError> {
        // SAFETY: posix_fadvise on an fd we own; it touches no memory of ours.
        let rc =
            unsafe { libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        if rc == 0 {
            Ok(())
        } else {
            Err(self.io("advising random access to")(
                io::Error::from_raw_os_error(rc),
            ))
        }
    }

    /// `fdatasync`: every write before this call is durable when it returns.
    pub fn sync(&self) -> Result<(), ImageError> {
        self.file.sync_data().map_err(self.io("syncing"))
    }
}

/// Copies the file `src` to `dst` keeping it sparse: only the data
/// regions `SEEK_DATA`/`SEEK_HOLE` report are read, and 1 MiB blocks of
/// zeros inside them stay holes in the copy. (`std::fs::copy` goes through
/// `copy_file_range`, which on most file systems writes the holes out.)
pub fn copy_sparse(src: &Path, dst: &Path) -> io::Result<()> {
    let s = File::open(src)?;
    let size = s.metadata()?.len();
    let d = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dst)?;
    d.set_len(size)?;
    let mut buf = vec![0u8; ZERO_CHUNK];
    let mut at = 0;
    while at < size {
        let Some(data) = seek(&s, at, libc::SEEK_DATA)? else {
            break;
        };
        let hole = seek(&s, data, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        let mut p = data;
        while p < hole {
            let n = ((hole - p) as usize).min(buf.len());
            s.read_exact_at(&mut buf[..n], p)?;
            if buf[..n].iter().any(|&b| b != 0) {
                d.write_all_at(&buf[..n], p)?;
            }
            p += n as u64;
        }
        at = hole.max(data + 1);
    }
    Ok(())
}

/// `lseek(fd, at, whence)`: `None` when no such offset remains (ENXIO);
/// where the file system cannot tell, data is everywhere and the hole is
/// at the end.
fn seek(f: &File, at: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: lseek on an fd we own; it touches no memory of ours.
    let r = unsafe { libc::lseek(f.as_raw_fd(), at as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) if whence == libc::SEEK_DATA => Ok(Some(at)),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(None),
        _ => Err(e),
    }
}

/// Test helpers: which pages of a file the page cache holds.
#[cfg(test)]
pub(crate) mod cache {
    use super::*;

    /// How many of the first `len` bytes' pages of `file` are in the page
    /// cache (`mincore` over a mapping that is never touched).
    pub(crate) fn resident_pages(file: &File, len: usize) -> usize {
        // SAFETY: a fresh read-only shared mapping of `len` bytes of a file
        // we hold open; nothing reads through it, so no page is faulted in.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            map,
            libc::MAP_FAILED,
            "mmap: {}",
            io::Error::last_os_error()
        );
        let mut vec = vec![0u8; len.div_ceil(4096)];
        // SAFETY: `map` is a mapping of `len` bytes and `vec` has one byte
        // per page of it, as mincore requires.
        let rc = unsafe { libc::mincore(map, len, vec.as_mut_ptr()) };
        let err = io::Error::last_os_error();
        // SAFETY: unmaps exactly the mapping made above.
        unsafe { libc::munmap(map, len) };
        assert_eq!(rc, 0, "mincore: {err}");
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }

    /// Reads the first `n` 4 KiB blocks of `img` one after another (the
    /// pattern the kernel's read-ahead recognises) and returns how many of
    /// the first 1 MiB's pages the page cache then holds.
    pub(crate) fn after_sequential_reads(img: &DiskImage, n: u64) -> usize {
        let mut b = [0u8; 4096];
        for i in 0..n {
            img.read_at(&mut b, i * 4096).unwrap();
        }
        resident_pages(&img.file, 1 << 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader of scattered blocks (the backup's undo journal was one):
    /// without read-ahead, reading 16 blocks in a row caches
    /// those 16 blocks and nothing around them (with it, the kernel caches
    /// more, in large folios that make every later 4 KiB write dearer).
    #[test]
    fn an_image_advised_random_caches_only_what_was_read() {
        let dir = tempfile::tempdir().unwrap();
        let plain = DiskImage::create(&dir.path().join("plain.img"), 64 << 20).unwrap();
        let control = cache::after_sequential_reads(&plain, 16);
        if control <= 16 {
            eprintln!(
                "skipped: this file system ({}) read ahead nothing for 16 sequential 4 KiB reads \
                 ({control} pages cached), so there is no read-ahead to turn off",
                dir.path().display()
            );
            return;
        }
        let img = DiskImage::create(&dir.path().join("d.img"), 64 << 20).unwrap();
        img.advise_random().unwrap();
        assert_eq!(
            cache::after_sequential_reads(&img, 16),
            16,
            "only the blocks read are cached (without the advice: {control})"
        );
    }

    #[test]
    fn ranges_past_the_end_are_refused_before_any_io() {
        let dir = tempfile::tempdir().unwrap();
        let img = DiskImage::create(&dir.path().join("d.img"), 8192).unwrap();
        img.write_at(&[7; 4096], 4096).unwrap();
        assert!(matches!(
            img.write_at(&[1; 2], 8191),
            Err(ImageError::Range { offset: 8191, .. })
        ));
        assert!(img.zero(u64::MAX, 2).is_err(), "overflowing range");
        let mut b = [0u8; 4096];
        assert!(img.read_at(&mut b, 4097).is_err());
        img.read_at(&mut b, 4096).unwrap();
        assert_eq!(b, [7; 4096]);
        assert_eq!(std::fs::metadata(img.path()).unwrap().len(), 8192);
    }

    #[test]
    fn zero_clears_exactly_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let img = DiskImage::create(&dir.path().join("d.img"), 3 * 4096).unwrap();
        img.write_at(&[9; 3 * 4096], 0).unwrap();
        img.zero(100, 5000).unwrap();
        let mut b = vec![0u8; 3 * 4096];
        img.read_at(&mut b, 0).unwrap();
        assert!(b[..100].iter().all(|&x| x == 9));
        assert!(b[100..5100].iter().all(|&x| x == 0));
        assert!(b[5100..].iter().all(|&x| x == 9));
    }

    #[test]
    fn next_data_skips_holes() {
        let dir = tempfile::tempdir().unwrap();
        let img = DiskImage::create(&dir.path().join("d.img"), 64 << 20).unwrap();
        img.write_at(&[1; 10], (40 << 20) + 5).unwrap();
        let at = img.next_data(0).unwrap().unwrap();
        // A file system without SEEK_DATA answers 0: still correct.
        assert!(at == 0 || at <= (40 << 20) + 5, "{at}");
        if at != 0 {
            assert!(img.next_data((41 << 20) + 4096).unwrap().is_none());
        }
        assert!(img.next_data(64 << 20).unwrap().is_none());
    }

    #[test]
    fn copies_keep_holes_and_bytes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let img = DiskImage::create(&dir.path().join("s.img"), 256 << 20).unwrap();
        img.write_at(&[7; 5000], 3).unwrap();
        img.write_at(&[9; 100], (200 << 20) + 17).unwrap();
        img.write_at(&[0; 1 << 20], 100 << 20).unwrap(); // written zeros
        let to = dir.path().join("copy.img");
        copy_sparse(img.path(), &to).unwrap();
        let (a, b) = (
            std::fs::read(img.path()).unwrap(),
            std::fs::read(&to).unwrap(),
        );
        assert!(a == b, "the copy has the same bytes");
        let allocated = std::fs::metadata(&to).unwrap().blocks() * 512;
        assert!(
            allocated <= 4 << 20,
            "copy of a 256 MiB sparse disk allocates {allocated} bytes"
        );
    }

    #[test]
    fn an_empty_image_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.img");
        std::fs::File::create(&p).unwrap();
        let e = DiskImage::open(&p).unwrap_err().to_string();
        assert!(e.contains("e.img") && e.contains("empty"), "{e}");
    }
}
