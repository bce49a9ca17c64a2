//! The backup's redo log: what makes an epoch's disk writes all or nothing
//! when the backup's own disk fails or the backup dies mid-apply.
//!
//! Before a commit changes a byte of a replica disk, the epoch's staged
//! `DiskWrites` payloads (already verified whole, [`super::wire::parse`])
//! are written to `STATE_DIR/disks/.redo` in large sequential writes
//! (`pwritev`, the payloads where they are staged, no copy), and the log is
//! sealed by its header. Then the writes are applied to the images; then
//! the header is cleared. Nothing reads the old contents of a disk.
//!
//! ```text
//! .redo:   header (one 4 KiB page) · records …
//! header:  magic "CSTREDO1" · version u32 · flags u32 · epoch u64 · boot_id [36]
//!          · data_len u64 · records u64 · data_hash [32] · names u16
//!          · names × (len u8 · name) · header_hash [32]
//! records: records × (len u32 · DiskWrites payload [len]), data_len bytes
//!          from offset 4096 (the staging spill file's format)
//! ```
//!
//! `header_hash` is BLAKE3 over the header before it. Durability follows
//! the epoch's: an epoch carrying a flush seals with `data_hash` (BLAKE3 of
//! the records, computed while writing them) and one `fdatasync` before any
//! write is applied; an epoch without one is not synced, which is exact
//! after a process crash (one page cache) and untrusted after a reboot
//! (`boot_id` tells the two apart).
//!
//! Invariants:
//! - Sealing the log commits the epoch's disk writes. The receiver seals
//!   before the memory commit of the same epoch and applies after it
//!   (`engine::receiver`), so a sealed log's epoch is never newer than the
//!   replica's memory, and a seal that fails rejects the epoch whole with
//!   the disks untouched.
//! - While the header is sealed for epoch N, the images hold epoch N-1
//!   plus some prefix of N's writes in order (the open apply), and nothing
//!   else writes them: replaying every record in order ([`recover`]) puts
//!   them at exactly N (a write applied twice leaves what it left once;
//!   later ops overwrite earlier ones as they did in the first pass).
//! - A header that does not verify was never sealed, so no write of its
//!   epoch was applied: it is discarded and the disks are at N-1.
//! - A sealed log is untrusted input: every record is bounds-checked
//!   against the images and parsed before the first byte is replayed; one
//!   that does not check out is refused whole ([`RedoError::Corrupt`]),
//!   nothing written.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::fault::Fault;
use super::image::{DiskImage, ImageError};
use super::stage::{apply, Applied, StageError};
use super::wire::parse;

/// The undo journal of releases before the redo log (stop 17), and its
/// magic: present while it was sealed, zeroed once cleared.
const OLD_UNDO_FILE: &str = ".undo";
const OLD_UNDO_MAGIC: [u8; 8] = *b"CSTUNDO1";

/// A disks directory left by an older castor with its undo journal still
/// sealed may hold an epoch half applied, which only that release can roll
/// back: refused, naming the file. A cleared journal is removed.
fn refuse_old_journal(dir: &Path) -> Result<(), RedoError> {
    let path = dir.join(OLD_UNDO_FILE);
    let mut magic = [0u8; 8];
    match File::open(&path).and_then(|f| f.read_exact_at(&mut magic, 0)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Ok(()) if magic == OLD_UNDO_MAGIC => Err(RedoError::OldJournal { path }),
        // Cleared (or shorter than its magic: never sealed).
        _ => std::fs::remove_file(&path).map_err(|source| RedoError::Io {
            op: "removing the old undo journal",
            path,
            source,
        }),
    }
}

/// The log's file name in the disks directory.
pub const REDO_FILE: &str = ".redo";
const MAGIC: [u8; 8] = *b"CSTREDO1";
const VERSION: u32 = 1;
const HEADER: u64 = 4096;
const FLAG_DURABLE: u32 = 1;
const BOOT_ID: usize = 36;
/// Most iovecs one `pwritev` takes (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;
/// Buffer of the copy of spilled records and of the replay's reads.
const CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RedoError {
    #[error("{op} redo log {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("redo log {path} is sealed but refused, nothing replayed: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path} is a sealed undo journal of a castor release before the redo log: these disks may be half way through an epoch that only that release can roll back; recover them with it, or remove the replica")]
    OldJournal { path: PathBuf },
    #[error("redo log {path}: disk names do not fit in its header")]
    Names { path: PathBuf },
    #[error("redo log {path} of a rejected epoch could neither be cleared ({clear}) nor removed ({source}); the next recovery may replay that epoch, which the replica never committed; remove it by hand")]
    Abandon {
        path: PathBuf,
        clear: Box<RedoError>,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("replaying epoch {epoch} from redo log {path}: {source}")]
    Replay {
        epoch: u64,
        path: PathBuf,
        #[source]
        source: Box<StageError>,
    },
}

/// The redo log of a disk set (one commit point for all its disks).
#[derive(Debug)]
pub struct Redo {
    file: File,
    path: PathBuf,
    /// Image file names in the log's directory, by disk index.
    names: Vec<String>,
    /// Next free byte of the record area.
    end: u64,
    records: u64,
    /// BLAKE3 of the records so far, for an epoch carrying a flush.
    hash: Option<blake3::Hasher>,
    sealed: bool,
}

/// What [`recover`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    /// No sealed log: every disk is at a committed epoch.
    Nothing,
    /// A sealed log was replayed: the disks are at epoch `epoch`.
    Replayed {
        epoch: u64,
        records: u64,
        ops: u64,
        bytes: u64,
    },
    /// A log of an epoch without a flush, written before a reboot: its
    /// records may not have reached the disk, so it was dropped and the
    /// disks may mix epoch `epoch - 1` and `epoch`.
    Untrusted { epoch: u64 },
}

impl Redo {
    /// Creates (or empties) the log of the images `names` in `dir`. A
    /// sealed log left there must be [`recover`]ed first.
    pub fn create(dir: &Path, names: Vec<String>) -> Result<Redo, RedoError> {
        let path = dir.join(REDO_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|source| RedoError::Io {
                op: "creating",
                path: path.clone(),
                source,
            })?;
        Ok(Redo {
            file,
            path,
            names,
            end: HEADER,
            records: 0,
            hash: None,
            sealed: false,
        })
    }

    fn io(&self, op: &'static str) -> impl FnOnce(io::Error) -> RedoError + '_ {
        move |source| RedoError::Io {
            op,
            path: self.path.clone(),
            source,
        }
    }

    /// Starts the log of an epoch; `durable`: it carries a flush.
    pub fn begin(&mut self, durable: bool) {
        self.end = HEADER;
        self.records = 0;
        self.hash = durable.then(blake3::Hasher::new);
    }

    /// Appends `payloads` as records, in order, with as few `pwritev`s as
    /// the iovec limit allows.
    pub fn append(&mut self, payloads: &[&[u8]]) -> Result<(), RedoError> {
        let lens: Vec<[u8; 4]> = payloads
            .iter()
            .map(|p| (p.len() as u32).to_le_bytes())
            .collect();
        for (ps, ls) in payloads.chunks(IOV_MAX / 2).zip(lens.chunks(IOV_MAX / 2)) {
            let mut bufs = Vec::with_capacity(ps.len() * 2);
            for (p, l) in ps.iter().zip(ls) {
                bufs.push(IoSlice::new(l));
                bufs.push(IoSlice::new(p));
            }
            if let Some(h) = &mut self.hash {
                for b in &bufs {
                    h.update(b);
                }
            }
            let n: u64 = bufs.iter().map(|b| b.len() as u64).sum();
            write_vectored_all(&self.file, &mut bufs, self.end).map_err(self.io("writing"))?;
            self.end += n;
            self.records += ps.len() as u64;
        }
        Ok(())
    }

    /// Appends `len` bytes of `records` records already in the log's
    /// format (a staging spill file) from the start of `src`.
    pub fn append_raw(&mut self, src: &File, len: u64, records: u64) -> Result<(), RedoError> {
        let mut buf = vec![0u8; CHUNK.min(len as usize)];
        let mut done = 0;
        while done < len {
            let n = ((len - done) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], done)
                .map_err(self.io("copying spilled records into"))?;
            if let Some(h) = &mut self.hash {
                h.update(&buf[..n]);
            }
            self.file
                .write_all_at(&buf[..n], self.end + done)
                .map_err(self.io("writing"))?;
            done += n as u64;
        }
        self.end += len;
        self.records += records;
        Ok(())
    }

    /// Bytes of records in the open epoch's log.
    pub fn bytes(&self) -> u64 {
        self.end - HEADER
    }

    /// Seals the log for `epoch`: from now on [`recover`] replays it. An
    /// epoch begun `durable` is synced before this returns.
    pub fn seal(&mut self, epoch: u64) -> Result<(), RedoError> {
        let durable = self.hash.is_some();
        let h = Header {
            flags: if durable { FLAG_DURABLE } else { 0 },
            epoch,
            boot_id: boot_id(),
            data_len: self.end - HEADER,
            records: self.records,
            data_hash: self
                .hash
                .take()
                .map_or([0; 32], |h| *h.finalize().as_bytes()),
            names: self.names.clone(),
        };
        let page = h.encode().ok_or_else(|| RedoError::Names {
            path: self.path.clone(),
        })?;
        // From the first byte of the header on, the log may read as
        // sealed: an error from here must be undone ([`Redo::abandon`]).
        self.sealed = true;
        self.file
            .write_all_at(&page, 0)
            .map_err(self.io("sealing"))?;
        if durable {
            self.file.sync_data().map_err(self.io("syncing"))?;
        }
        Ok(())
    }

    /// Undoes a seal that failed (the epoch is rejected, its memory not
    /// committed): clears the header, or failing that removes the file,
    /// so no later [`recover`] replays an epoch the replica never
    /// committed. An error here means the log may still read as sealed.
    pub fn abandon(&mut self) -> Result<(), RedoError> {
        let Err(clear) = self.clear() else {
            return Ok(());
        };
        std::fs::remove_file(&self.path).map_err(|source| RedoError::Abandon {
            path: self.path.clone(),
            clear: Box::new(clear),
            source,
        })?;
        self.sealed = false;
        Ok(())
    }

    /// The sealed epoch is applied (or was never sealed): forgets it.
    pub fn clear(&mut self) -> Result<(), RedoError> {
        if self.sealed {
            clear_file(&self.file, &self.path)?;
            self.sealed = false;
        }
        self.begin(false);
        Ok(())
    }
}

/// `pwritev` of all of `bufs` at `offset`, repeated until every byte is written.
fn write_vectored_all(file: &File, bufs: &mut [IoSlice<'_>], offset: u64) -> io::Result<()> {
    let mut bufs = bufs;
    let mut at = offset;
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = bufs.len().min(IOV_MAX) as libc::c_int;
        // SAFETY: `IoSlice` is ABI-compatible with `iovec` (std guarantees
        // it on Unix); the first `n` of them point at live buffers we only
        // read.
        let rc =
            unsafe { libc::pwritev(file.as_raw_fd(), bufs.as_ptr().cast(), n, at as libc::off_t) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        at += rc as u64;
        IoSlice::advance_slices(&mut bufs, rc as usize);
    }
    Ok(())
}

/// Replays a sealed log left in `dir` by a backup that stopped between
/// its seal and its clear (killed mid-apply, or an apply that failed),
/// then clears it; see the module documentation. On error the log stays
/// sealed and the disks are as they were.
pub fn recover(dir: &Path) -> Result<Recovered, RedoError> {
    refuse_old_journal(dir)?;
    let path = dir.join(REDO_FILE);
    let io_err = |op| {
        let path = path.clone();
        move |source| RedoError::Io { op, path, source }
    };
    let file = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Recovered::Nothing),
        Err(e) => return Err(io_err("opening")(e)),
    };
    let len = file.metadata().map_err(io_err("reading size of"))?.len();
    let mut page = vec![0u8; HEADER.min(len) as usize];
    file.read_exact_at(&mut page, 0)
        .map_err(io_err("reading"))?;
    if page.len() < MAGIC.len() || page[..8] != MAGIC {
        return Ok(Recovered::Nothing);
    }
    let corrupt = |reason: String| RedoError::Corrupt {
        path: path.clone(),
        reason,
    };
    let version = u32::from_le_bytes(page.get(8..12).unwrap_or(&[0; 4]).try_into().expect("4"));
    if version != VERSION {
        return Err(corrupt(format!(
            "version {version}, this castor reads {VERSION}"
        )));
    }
    let Some(h) = Header::decode(&page) else {
        // Torn before it was sealed: the apply had not begun.
        return clear_file(&file, &path).map(|()| Recovered::Nothing);
    };
    if h.data_len > len.saturating_sub(HEADER) {
        return Err(corrupt(format!(
            "{} bytes of records in a file of {len}",
            h.data_len
        )));
    }
    let durable = h.flags & FLAG_DURABLE != 0;
    let same_boot = h.boot_id == boot_id();
    if !durable && !same_boot {
        clear_file(&file, &path)?;
        return Ok(Recovered::Untrusted { epoch: h.epoch });
    }
    let log = Log {
        file: &file,
        path: &path,
        h: &h,
    };
    let images = open_images(&h.names, dir).map_err(|e| match e {
        Opened::Name(n) => corrupt(format!("disk file name {n:?}")),
        Opened::Image(e) => RedoError::Image(e),
    })?;
    let refs: Vec<&DiskImage> = images.iter().collect();
    let sizes: Vec<u64> = images.iter().map(|i| i.size()).collect();
    match log.check(&sizes)? {
        Checked::Sound => {}
        // Its sync had not returned when the host went down: the apply
        // had not begun.
        Checked::Unsynced if !same_boot => {
            return clear_file(&file, &path).map(|()| Recovered::Nothing)
        }
        Checked::Unsynced => {
            return Err(corrupt(
                "its records do not match their hash, written in this boot".into(),
            ))
        }
    }
    let applied = log.replay(&refs, &sizes)?;
    clear_file(&file, &path)?;
    Ok(Recovered::Replayed {
        epoch: h.epoch,
        records: h.records,
        ops: applied.ops,
        bytes: applied.write_bytes,
    })
}

enum Opened {
    Name(String),
    Image(ImageError),
}

/// Opens the log's images by name, refusing a name that leaves `dir`.
fn open_images(names: &[String], dir: &Path) -> Result<Vec<DiskImage>, Opened> {
    names
        .iter()
        .map(|n| {
            if n.is_empty() || n.contains('/') || n == ".." || n == "." {
                return Err(Opened::Name(n.clone()));
            }
            DiskImage::open(&dir.join(n)).map_err(Opened::Image)
        })
        .collect()
}

/// Whether a sealed log's records are whole.
enum Checked {
    Sound,
    /// A durable log whose records do not match their hash.
    Unsynced,
}

/// A sealed log being recovered.
struct Log<'a> {
    file: &'a File,
    path: &'a Path,
    h: &'a Header,
}

impl Log<'_> {
    fn corrupt(&self, reason: String) -> RedoError {
        RedoError::Corrupt {
            path: self.path.to_path_buf(),
            reason,
        }
    }

    /// Calls `f` with every record, in order, each bounds-checked against
    /// the record area and the count of records against the header's.
    fn each(&self, mut f: impl FnMut(&[u8]) -> Result<(), RedoError>) -> Result<(), RedoError> {
        let end = HEADER + self.h.data_len;
        let (mut at, mut n) = (HEADER, 0u64);
        let mut buf = Vec::new();
        while at < end {
            let mut len = [0u8; 4];
            if end - at < 4 {
                return Err(self.corrupt(format!("a record length cut at byte {at}")));
            }
            self.read(&mut len, at)?;
            let len = u32::from_le_bytes(len) as u64;
            if len > end - at - 4 {
                return Err(self.corrupt(format!("a record of {len} bytes at byte {at}")));
            }
            buf.resize(len as usize, 0);
            self.read(&mut buf, at + 4)?;
            f(&buf)?;
            at += 4 + len;
            n += 1;
        }
        if n != self.h.records {
            return Err(self.corrupt(format!("{n} records, its header says {}", self.h.records)));
        }
        Ok(())
    }

    fn read(&self, buf: &mut [u8], at: u64) -> Result<(), RedoError> {
        self.file
            .read_exact_at(buf, at)
            .map_err(|source| RedoError::Io {
                op: "reading",
                path: self.path.to_path_buf(),
                source,
            })
    }

    /// Checks every record against the images' `sizes` (after the data
    /// hash of a durable log: records a power loss cut are not parsed)
    /// before anything is replayed.
    fn check(&self, sizes: &[u64]) -> Result<Checked, RedoError> {
        if self.h.flags & FLAG_DURABLE != 0 && self.data_hash()? != self.h.data_hash {
            return Ok(Checked::Unsynced);
        }
        let mut index = 0u64;
        self.each(|r| {
            index += 1;
            parse(r, sizes)
                .map(|_| ())
                .map_err(|e| self.corrupt(format!("record {index}: {e}")))
        })?;
        Ok(Checked::Sound)
    }

    /// BLAKE3 of the record area.
    fn data_hash(&self) -> Result<[u8; 32], RedoError> {
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; CHUNK];
        let (mut at, end) = (HEADER, HEADER + self.h.data_len);
        while at < end {
            let n = ((end - at) as usize).min(CHUNK);
            self.read(&mut buf[..n], at)?;
            h.update(&buf[..n]);
            at += n as u64;
        }
        Ok(*h.finalize().as_bytes())
    }

    /// Rewrites every record into `images`, in order, then syncs them.
    fn replay(&self, images: &[&DiskImage], sizes: &[u64]) -> Result<Applied, RedoError> {
        let mut applied = Applied::default();
        let mut fault = Fault::default();
        let failed = |source| RedoError::Replay {
            epoch: self.h.epoch,
            path: self.path.to_path_buf(),
            source: Box::new(source),
        };
        self.each(|r| apply(r, sizes, images, &mut applied, &mut fault).map_err(failed))?;
        for img in images {
            img.sync()?;
        }
        Ok(applied)
    }
}

fn clear_file(file: &File, path: &Path) -> Result<(), RedoError> {
    file.write_all_at(&[0; 8], 0)
        .map_err(|source| RedoError::Io {
            op: "clearing",
            path: path.to_path_buf(),
            source,
        })
}

/// The header's fields (see the module documentation).
#[derive(Debug)]
struct Header {
    flags: u32,
    epoch: u64,
    boot_id: [u8; BOOT_ID],
    data_len: u64,
    records: u64,
    data_hash: [u8; 32],
    names: Vec<String>,
}

impl Header {
    /// The header page with its hash; `None` if the names overflow it.
    fn encode(&self) -> Option<Vec<u8>> {
        let mut p = MAGIC.to_vec();
        p.extend_from_slice(&VERSION.to_le_bytes());
        p.extend_from_slice(&self.flags.to_le_bytes());
        p.extend_from_slice(&self.epoch.to_le_bytes());
        p.extend_from_slice(&self.boot_id);
        p.extend_from_slice(&self.data_len.to_le_bytes());
        p.extend_from_slice(&self.records.to_le_bytes());
        p.extend_from_slice(&self.data_hash);
        p.extend_from_slice(&(self.names.len() as u16).to_le_bytes());
        for n in &self.names {
            p.push(u8::try_from(n.len()).ok()?);
            p.extend_from_slice(n.as_bytes());
        }
        let hash = *blake3::hash(&p).as_bytes();
        p.extend_from_slice(&hash);
        (p.len() as u64 <= HEADER).then_some(p)
    }

    /// The header, if the page holds one whose hash matches (a sealed one).
    fn decode(page: &[u8]) -> Option<Header> {
        let mut c = crate::transport::record::Cursor::new(page, "redo header");
        c.bytes(12).ok()?; // magic and version, checked by the caller
        let flags = c.u32().ok()?;
        let epoch = c.u64().ok()?;
        let boot_id = c.array::<BOOT_ID>().ok()?;
        let data_len = c.u64().ok()?;
        let records = c.u64().ok()?;
        let data_hash = c.array::<32>().ok()?;
        let n = c.u16().ok()?;
        let mut names = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let len = c.u8().ok()? as usize;
            names.push(String::from_utf8(c.bytes(len).ok()?.to_vec()).ok()?);
        }
        let body = page.len() - c.remaining();
        let hash = c.array::<32>().ok()?;
        (*blake3::hash(&page[..body]).as_bytes() == hash).then_some(Header {
            flags,
            epoch,
            boot_id,
            data_len,
            records,
            data_hash,
            names,
        })
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), zeros if unknown;
/// read once per process (it cannot change while the process lives).
fn boot_id() -> [u8; BOOT_ID] {
    static ID: std::sync::OnceLock<[u8; BOOT_ID]> = std::sync::OnceLock::new();
    *ID.get_or_init(|| {
        let mut id = [0u8; BOOT_ID];
        if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
            let b = s.trim().as_bytes();
            let n = b.len().min(BOOT_ID);
            id[..n].copy_from_slice(&b[..n]);
        }
        id
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::wire::testing::{payload, w};
    use crate::disk::wire::DiskOp;

    fn read(p: &Path) -> Vec<u8> {
        std::fs::read(p).unwrap()
    }

    /// An epoch of overlapping writes and a zero on two disks: its
    /// records, and the disks before and after it.
    struct Epoch {
        records: Vec<Vec<u8>>,
        before: Vec<Vec<u8>>,
        after: Vec<Vec<u8>>,
    }

    fn epoch(dir: &Path) -> Epoch {
        let a = DiskImage::create(&dir.join("a.img"), 64 << 10).unwrap();
        let b = DiskImage::create(&dir.join("b.img"), 16 << 10).unwrap();
        a.write_at(&[1; 30_000], 0).unwrap();
        b.write_at(&[2; 16 << 10], 0).unwrap();
        let records = vec![
            payload(0, &[w(0, 3, 8192), w(4096, 4, 8192)]),
            payload(
                1,
                &[
                    DiskOp::Zero {
                        offset: 0,
                        len: 5000,
                    },
                    w(4000, 5, 100),
                ],
            ),
            payload(0, &[w(6000, 6, 1000)]),
        ];
        let before = vec![read(a.path()), read(b.path())];
        let mut after = before.clone();
        after[0][..8192].fill(3);
        after[0][4096..12288].fill(4);
        after[1][..5000].fill(0);
        after[1][4000..4100].fill(5);
        after[0][6000..7000].fill(6);
        Epoch {
            records,
            before,
            after,
        }
    }

    fn disks(dir: &Path) -> Vec<Vec<u8>> {
        vec![read(&dir.join("a.img")), read(&dir.join("b.img"))]
    }

    /// Writes `e`'s log, sealed for epoch 9 unless `seal` is false.
    fn logged(dir: &Path, e: &Epoch, durable: bool, seal: bool) {
        let mut r = Redo::create(dir, vec!["a.img".into(), "b.img".into()]).unwrap();
        r.begin(durable);
        let refs: Vec<&[u8]> = e.records.iter().map(|p| &p[..]).collect();
        r.append(&refs[..1]).unwrap();
        r.append(&refs[1..]).unwrap();
        if seal {
            r.seal(9).unwrap();
        }
    }

    /// The first op of `e` applied, as a backup killed mid-apply leaves it.
    fn half_apply(dir: &Path) {
        let a = DiskImage::open(&dir.join("a.img")).unwrap();
        a.write_at(&[3; 8192], 0).unwrap();
    }

    #[test]
    fn a_backup_killed_mid_apply_replays_the_sealed_epoch_at_its_next_start() {
        for durable in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let e = epoch(dir.path());
            logged(dir.path(), &e, durable, true);
            half_apply(dir.path());
            let mid = disks(dir.path());
            assert!(mid != e.before && mid != e.after);
            let r = recover(dir.path()).unwrap();
            assert_eq!(
                r,
                Recovered::Replayed {
                    epoch: 9,
                    records: 3,
                    ops: 5,
                    bytes: 8192 * 2 + 100 + 1000
                }
            );
            assert!(disks(dir.path()) == e.after, "durable {durable}");
            assert_eq!(recover(dir.path()).unwrap(), Recovered::Nothing, "once");
            // Killed before any write: the same replay.
            let dir = tempfile::tempdir().unwrap();
            let e = epoch(dir.path());
            logged(dir.path(), &e, durable, true);
            recover(dir.path()).unwrap();
            assert!(disks(dir.path()) == e.after, "durable {durable}");
        }
    }

    /// A log whose header does not verify was never sealed: discarded,
    /// the disks (untouched by the apply, which had not begun) stay at the
    /// epoch before.
    #[test]
    fn a_log_that_was_never_sealed_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let e = epoch(dir.path());
        logged(dir.path(), &e, false, false);
        assert_eq!(recover(dir.path()).unwrap(), Recovered::Nothing);
        assert!(disks(dir.path()) == e.before);
        // Sealed, then its header torn (a byte of the epoch flipped).
        logged(dir.path(), &e, false, true);
        damage(dir.path(), 17, &[0xee]);
        assert_eq!(recover(dir.path()).unwrap(), Recovered::Nothing);
        assert!(disks(dir.path()) == e.before);
        assert_eq!(recover(dir.path()).unwrap(), Recovered::Nothing, "cleared");
    }

    /// Overwrites the log in `dir` with `bytes` at `at` (a torn or
    /// corrupted log).
    fn damage(dir: &Path, at: u64, bytes: &[u8]) {
        let f = OpenOptions::new()
            .write(true)
            .open(dir.join(REDO_FILE))
            .unwrap();
        f.write_all_at(bytes, at).unwrap();
    }

    /// Rewrites the sealed header of the log in `dir` as if sealed in
    /// another boot.
    fn from_another_boot(dir: &Path) {
        let path = dir.join(REDO_FILE);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut page = vec![0u8; HEADER as usize];
        f.read_exact_at(&mut page, 0).unwrap();
        let mut h = Header::decode(&page).expect("sealed");
        h.boot_id[0] ^= 1;
        f.write_all_at(&h.encode().unwrap(), 0).unwrap();
    }

    /// After a reboot: an unsynced log (no flush) is dropped, saying the
    /// disks may mix; a synced one is replayed; a synced one whose records
    /// did not all reach the disk (its sync had not returned, nothing was
    /// applied) is discarded.
    #[test]
    fn a_log_from_another_boot_is_trusted_only_when_synced_and_whole() {
        let dir = tempfile::tempdir().unwrap();
        let e = epoch(dir.path());
        logged(dir.path(), &e, false, true);
        from_another_boot(dir.path());
        assert_eq!(
            recover(dir.path()).unwrap(),
            Recovered::Untrusted { epoch: 9 }
        );
        assert!(disks(dir.path()) == e.before, "dropped, not replayed");
        assert_eq!(recover(dir.path()).unwrap(), Recovered::Nothing, "cleared");
        logged(dir.path(), &e, true, true);
        from_another_boot(dir.path());
        assert!(matches!(
            recover(dir.path()).unwrap(),
            Recovered::Replayed { epoch: 9, .. }
        ));
        assert!(disks(dir.path()) == e.after, "replayed");
        let dir = tempfile::tempdir().unwrap();
        let e = epoch(dir.path());
        logged(dir.path(), &e, true, true);
        from_another_boot(dir.path());
        damage(dir.path(), HEADER + 100, &[0xee; 64]);
        assert_eq!(recover(dir.path()).unwrap(), Recovered::Nothing);
        assert!(disks(dir.path()) == e.before, "discarded, not replayed");
    }

    /// A seal that failed is undone even where the header cannot be
    /// cleared (here a descriptor that cannot write): the log is removed,
    /// and no recovery replays the rejected epoch.
    #[test]
    fn an_abandoned_seal_is_never_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let e = epoch(dir.path());
        logged(dir.path(), &e, false, true);
        let path = dir.path().join(REDO_FILE);
        let mut r = Redo {
            file: File::open(&path).unwrap(),
            path: path.clone(),
            names: Vec::new(),
            end: HEADER,
            records: 0,
            hash: None,
            sealed: true,
        };
        r.abandon().unwrap();
        assert!(!path.exists(), "removed, as clearing failed");
        assert_eq!(recover(dir.path()).unwrap(), Recovered::Nothing);
        assert!(disks(dir.path()) == e.before);
    }

    /// A sealed log is untrusted: a record that does not fit the disks, a
    /// torn record area, a record count that disagrees, a damaged durable
    /// log of this boot or a name that leaves the directory is refused
    /// whole, by a typed error, with no byte replayed, and stays sealed.
    #[test]
    fn a_sealed_log_that_does_not_check_out_is_refused_whole() {
        let seal = |dir: &Path, names: &[&str], records: &[Vec<u8>], durable: bool| {
            let mut r = Redo::create(dir, names.iter().map(|n| n.to_string()).collect()).unwrap();
            r.begin(durable);
            let refs: Vec<&[u8]> = records.iter().map(|p| &p[..]).collect();
            r.append(&refs).unwrap();
            r.seal(4).unwrap();
            r
        };
        let refused = |dir: &Path, e: &Epoch, needle: &str| {
            let err = recover(dir).unwrap_err();
            assert!(
                matches!(err, RedoError::Corrupt { .. }) && err.to_string().contains(needle),
                "{err}"
            );
            assert!(disks(dir) == e.before, "nothing replayed ({needle})");
            assert!(recover(dir).is_err(), "still sealed ({needle})");
        };
        // Past the end of disk b (16 KiB), after a valid record.
        let dir = tempfile::tempdir().unwrap();
        let e = epoch(dir.path());
        let mut recs = e.records.clone();
        recs.push(payload(1, &[w(16 << 10, 7, 1)]));
        seal(dir.path(), &["a.img", "b.img"], &recs, false);
        refused(dir.path(), &e, "record 4");
        // A disk the log does not name.
        let mut recs = e.records.clone();
        recs.push(payload(2, &[w(0, 7, 1)]));
        seal(dir.path(), &["a.img", "b.img"], &recs, false);
        refused(dir.path(), &e, "disk");
        // A record length past the record area.
        let r = seal(dir.path(), &["a.img", "b.img"], &e.records, false);
        r.file
            .write_all_at(&u32::MAX.to_le_bytes(), HEADER)
            .unwrap();
        refused(dir.path(), &e, "bytes at byte 4096");
        // A record count that disagrees with the record area.
        let mut r = seal(dir.path(), &["a.img", "b.img"], &e.records, false);
        r.begin(false);
        r.end = HEADER + e.records.iter().map(|p| 4 + p.len() as u64).sum::<u64>();
        r.seal(4).unwrap();
        refused(dir.path(), &e, "3 records, its header says 0");
        // A durable log of this boot whose records do not match its hash.
        let r = seal(dir.path(), &["a.img", "b.img"], &e.records, true);
        r.file.write_all_at(&[0xee], HEADER + 10).unwrap();
        refused(dir.path(), &e, "do not match their hash");
        // A name that leaves the directory.
        seal(dir.path(), &["../a.img", "b.img"], &e.records, false);
        refused(dir.path(), &e, "disk file name");
    }

    #[test]
    fn an_older_releases_sealed_undo_journal_is_refused_and_a_cleared_one_removed() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join(OLD_UNDO_FILE);
        let mut sealed = OLD_UNDO_MAGIC.to_vec();
        sealed.resize(4096, 7);
        std::fs::write(&old, &sealed).unwrap();
        let e = recover(dir.path()).unwrap_err();
        assert!(matches!(e, RedoError::OldJournal { .. }), "{e}");
        assert!(e.to_string().contains(".undo"), "{e}");
        assert!(old.exists(), "a sealed journal is left for the old release");
        // Cleared: magic zeroed. Removed, and recovery goes on.
        sealed[..8].fill(0);
        std::fs::write(&old, &sealed).unwrap();
        assert!(matches!(recover(dir.path()), Ok(Recovered::Nothing)));
        assert!(!old.exists());
    }
}
