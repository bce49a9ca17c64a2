//! The backup's undo journal: what makes an epoch's disk writes all or
//! nothing when the backup's own disk fails or the backup dies mid-apply.
//!
//! Before a commit overwrites a byte of a replica disk, the old contents of
//! every range the epoch writes, zeroes or trims are copied into
//! `STATE_DIR/disks/.undo` (a range under 64 KiB is read into a buffer
//! that goes into the journal in one write per MiB, cheaper than a
//! `copy_file_range` per 4 KiB range; a larger one is copied in the
//! kernel, `copy_file_range`; a range of
//! 256 KiB or more that is a hole is recorded as one, without data), and the journal is sealed
//! by its header. Then the writes are applied; then the header is cleared.
//! An error while applying rolls the copied ranges back (newest first) and
//! the disks are at the last committed epoch again; a backup that died
//! mid-apply finds the sealed journal at its next start ([`recover`]) and
//! rolls back the same way. So a replica disk is only ever at a committed
//! epoch, never between two.
//!
//! ```text
//! .undo:  header (one 4 KiB page) · old data … · table
//! header: magic "CSTUNDO1" · version u32 · flags u32 · epoch u64 · boot_id [36]
//!         · table_at u64 · table_len u64 · data_hash [32] · names u16
//!         · names × (len u8 · name) · header_hash [32]
//! table:  entries × (disk u16 · kind u8 (0 data, 1 hole) · offset u64 · len u64 · data_at u64)
//! ```
//!
//! `header_hash` is BLAKE3 over the header before it and the table: a
//! header that does not match was never sealed (apply had not begun).
//! Durability follows the epoch's: an epoch carrying a flush seals with
//! `data_hash` (BLAKE3 of the old data) and one `fdatasync` before any
//! write is applied, so the journal survives a power loss; an epoch
//! without one is not synced (its writes themselves sit in the page cache,
//! a volatile write cache as the guest asked for), which is exact after a
//! process crash (one page cache) and is trusted after a reboot only when
//! the data hash proves it (`boot_id` tells the two apart).
//!
//! Invariant: while the header is sealed, the journal's data and table
//! hold the pre-epoch contents of every range the open apply may touch.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::image::{DiskImage, ImageError};

/// The journal's file name in the disks directory.
pub const UNDO_FILE: &str = ".undo";
const MAGIC: [u8; 8] = *b"CSTUNDO1";
const VERSION: u32 = 1;
const HEADER: u64 = 4096;
const ENTRY: usize = 27;
const FLAG_DURABLE: u32 = 1;
const BOOT_ID: usize = 36;
/// Ranges this long or longer are checked for holes before being saved.
const HOLE_CHECK: u64 = 256 << 10;
/// Largest copy per `copy_file_range` call.
const COPY_CHUNK: u64 = 1 << 30;
/// Ranges shorter than this are saved through [`Undo::pending`].
const BUFFERED_SAVE: u64 = 64 << 10;
/// [`Undo::pending`] goes into the journal once it holds this much.
const PENDING_FLUSH: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum UndoError {
    #[error("{op} undo journal {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("undo journal {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// One saved range: its old bytes at `data_at` in the journal, or `None`
/// when the range was a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    disk: u16,
    offset: u64,
    len: u64,
    data_at: Option<u64>,
}

/// The journal of a disk set (one commit point for all its disks).
#[derive(Debug)]
pub struct Undo {
    file: File,
    path: PathBuf,
    /// Image file names in the journal's directory, by disk index.
    names: Vec<String>,
    entries: Vec<Entry>,
    /// Next free byte of the data area (counting [`Undo::pending`]).
    end: u64,
    /// Old data of small ranges read and not yet written to the journal:
    /// it belongs at `end - pending.len()`. Empty whenever the journal is
    /// sealed (written before the table).
    pending: Vec<u8>,
    sealed: bool,
}

/// What [`recover`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    /// No sealed journal: every disk is at a committed epoch.
    Nothing,
    /// A sealed journal was rolled back: the disks are at the epoch before.
    RolledBack {
        epoch: u64,
        ranges: usize,
        bytes: u64,
    },
    /// A journal of an epoch without a flush, written before a reboot:
    /// its old data may not have reached the disk, so it was dropped and
    /// the disks may mix epoch `epoch - 1` and `epoch`.
    Untrusted { epoch: u64 },
}

impl Undo {
    /// Creates (or empties) the journal of the images `names` in `dir`.
    /// A sealed journal left there must be [`recover`]ed first.
    pub fn create(dir: &Path, names: Vec<String>) -> Result<Undo, UndoError> {
        let path = dir.join(UNDO_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|source| UndoError::Io {
                op: "creating",
                path: path.clone(),
                source,
            })?;
        Ok(Undo {
            file,
            path,
            names,
            entries: Vec::new(),
            end: HEADER,
            pending: Vec::new(),
            sealed: false,
        })
    }

    fn io(&self, op: &'static str) -> impl FnOnce(io::Error) -> UndoError + '_ {
        move |source| UndoError::Io {
            op,
            path: self.path.clone(),
            source,
        }
    }

    /// Saves the current contents of `offset..offset+len` of disk `disk`
    /// (`img`) before the open epoch overwrites them.
    pub fn save(
        &mut self,
        disk: u16,
        img: &DiskImage,
        offset: u64,
        len: u64,
    ) -> Result<(), UndoError> {
        img.check(offset, len)?;
        // Below HOLE_CHECK the lseek costs more than copying zeros would.
        let hole = len >= HOLE_CHECK && !img.next_data(offset)?.is_some_and(|d| d < offset + len);
        let data_at = if hole {
            None
        } else if len < BUFFERED_SAVE {
            let at = self.pending.len();
            self.pending.resize(at + len as usize, 0);
            img.read_at(&mut self.pending[at..], offset)?;
            self.end += len;
            if self.pending.len() >= PENDING_FLUSH {
                self.write_pending()?;
            }
            Some(self.end - len)
        } else {
            self.write_pending()?;
            copy_range(img.file(), offset, &self.file, self.end, len)
                .map_err(self.io("saving old disk data into"))?;
            self.end += len;
            Some(self.end - len)
        };
        self.entries.push(Entry {
            disk,
            offset,
            len,
            data_at,
        });
        Ok(())
    }

    /// Writes [`Undo::pending`] to its place in the journal.
    fn write_pending(&mut self) -> Result<(), UndoError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let at = self.end - self.pending.len() as u64;
        self.file
            .write_all_at(&self.pending, at)
            .map_err(self.io("saving old disk data into"))?;
        self.pending.clear();
        Ok(())
    }

    /// Ranges saved for the open epoch.
    pub fn ranges(&self) -> usize {
        self.entries.len()
    }

    /// Bytes of old data saved for the open epoch.
    pub fn saved_bytes(&self) -> u64 {
        self.end - HEADER
    }

    /// Seals the journal for `epoch`: from now on [`recover`] rolls the
    /// saved ranges back. `durable` (the epoch carries a flush): hashed and
    /// synced before this returns.
    pub fn seal(&mut self, epoch: u64, durable: bool) -> Result<(), UndoError> {
        self.write_pending()?;
        let table = encode_table(&self.entries);
        self.file
            .write_all_at(&table, self.end)
            .map_err(self.io("writing the table of"))?;
        let data_hash = if durable { self.hash_data()? } else { [0; 32] };
        let h = Header {
            flags: if durable { FLAG_DURABLE } else { 0 },
            epoch,
            boot_id: boot_id(),
            table_at: self.end,
            table_len: table.len() as u64,
            data_hash,
            names: self.names.clone(),
        };
        let page = h.encode(&table).ok_or_else(|| UndoError::Corrupt {
            path: self.path.clone(),
            reason: "disk names do not fit in the header page".into(),
        })?;
        self.file
            .write_all_at(&page, 0)
            .map_err(self.io("sealing"))?;
        if durable {
            self.file.sync_data().map_err(self.io("syncing"))?;
        }
        self.sealed = true;
        Ok(())
    }

    fn hash_data(&self) -> Result<[u8; 32], UndoError> {
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = HEADER;
        while at < self.end {
            let n = ((self.end - at) as usize).min(buf.len());
            self.file
                .read_exact_at(&mut buf[..n], at)
                .map_err(self.io("reading back"))?;
            h.update(&buf[..n]);
            at += n as u64;
        }
        Ok(*h.finalize().as_bytes())
    }

    /// The open epoch is applied (or was never begun): forgets it.
    pub fn clear(&mut self) -> Result<(), UndoError> {
        if self.sealed {
            self.file
                .write_all_at(&[0; 8], 0)
                .map_err(self.io("clearing"))?;
            self.sealed = false;
        }
        self.entries.clear();
        self.pending.clear();
        self.end = HEADER;
        Ok(())
    }

    /// Puts every saved range of `images` back (newest first), syncs them
    /// and clears the journal. On error the journal stays sealed, so the
    /// next [`recover`] tries again.
    pub fn roll_back(&mut self, images: &[&DiskImage]) -> Result<(), UndoError> {
        self.write_pending()?;
        restore(&self.file, &self.path, &self.entries, images)?;
        self.clear()
    }
}

/// Writes every entry's old contents back into `images`, newest first,
/// then syncs the images.
fn restore(
    file: &File,
    path: &Path,
    entries: &[Entry],
    images: &[&DiskImage],
) -> Result<(), UndoError> {
    for e in entries.iter().rev() {
        let img = images
            .get(e.disk as usize)
            .ok_or_else(|| UndoError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("entry names disk {} of {}", e.disk, images.len()),
            })?;
        img.check(e.offset, e.len)?;
        match e.data_at {
            None => img.zero(e.offset, e.len)?,
            Some(at) => copy_range(file, at, img.file(), e.offset, e.len).map_err(|source| {
                UndoError::Io {
                    op: "restoring old disk data from",
                    path: path.to_path_buf(),
                    source,
                }
            })?,
        }
    }
    for img in images {
        img.sync()?;
    }
    Ok(())
}

/// Rolls back a sealed journal left in `dir` by a backup that stopped
/// mid-apply (see the module documentation), then clears it.
pub fn recover(dir: &Path) -> Result<Recovered, UndoError> {
    let path = dir.join(UNDO_FILE);
    let io_err = |op| {
        let path = path.clone();
        move |source| UndoError::Io { op, path, source }
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
    let corrupt = |reason: String| UndoError::Corrupt {
        path: path.clone(),
        reason,
    };
    let version = u32::from_le_bytes(page.get(8..12).unwrap_or(&[0; 4]).try_into().expect("4"));
    if version != VERSION {
        return Err(corrupt(format!(
            "version {version}, this castor reads {VERSION}"
        )));
    }
    let Ok((h, body)) = Header::decode(&page) else {
        // Torn before it was sealed: apply had not begun.
        return clear_file(&file, &path).map(|()| Recovered::Nothing);
    };
    let table_end = h.table_at.checked_add(h.table_len).filter(|&e| e <= len);
    let Some(_) = table_end.filter(|_| h.table_at >= HEADER && h.table_len <= 1 << 30) else {
        // Never sealed: apply had not begun.
        return clear_file(&file, &path).map(|()| Recovered::Nothing);
    };
    let mut table = vec![0u8; h.table_len as usize];
    file.read_exact_at(&mut table, h.table_at)
        .map_err(io_err("reading the table of"))?;
    if !h.hash_matches(body, &table) {
        return clear_file(&file, &path).map(|()| Recovered::Nothing);
    }
    let entries = decode_table(&table, h.table_at).map_err(&corrupt)?;
    let durable = h.flags & FLAG_DURABLE != 0;
    let undo = Undo {
        file,
        path: path.clone(),
        names: h.names.clone(),
        entries,
        end: h.table_at,
        pending: Vec::new(),
        sealed: true,
    };
    if durable && undo.hash_data()? != h.data_hash {
        // Sealed but its old data never reached the disk: the sync before
        // apply had not returned, so apply had not begun.
        return clear_file(&undo.file, &path).map(|()| Recovered::Nothing);
    }
    if !durable && h.boot_id != boot_id() {
        clear_file(&undo.file, &path)?;
        return Ok(Recovered::Untrusted { epoch: h.epoch });
    }
    roll_back_named(undo, dir, h.epoch)
}

/// Opens the journal's images by name and rolls it back.
fn roll_back_named(mut undo: Undo, dir: &Path, epoch: u64) -> Result<Recovered, UndoError> {
    let mut images = Vec::with_capacity(undo.names.len());
    for n in &undo.names {
        if n.is_empty() || n.contains('/') || n == ".." || n == "." {
            return Err(UndoError::Corrupt {
                path: undo.path.clone(),
                reason: format!("disk file name {n:?}"),
            });
        }
        images.push(DiskImage::open(&dir.join(n))?);
    }
    let refs: Vec<&DiskImage> = images.iter().collect();
    let (ranges, bytes) = (undo.entries.len(), undo.saved_bytes());
    undo.roll_back(&refs)?;
    Ok(Recovered::RolledBack {
        epoch,
        ranges,
        bytes,
    })
}

fn clear_file(file: &File, path: &Path) -> Result<(), UndoError> {
    file.write_all_at(&[0; 8], 0)
        .map_err(|source| UndoError::Io {
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
    table_at: u64,
    table_len: u64,
    data_hash: [u8; 32],
    names: Vec<String>,
}

impl Header {
    /// The header page, hashed with `table`; `None` if the names overflow it.
    fn encode(&self, table: &[u8]) -> Option<Vec<u8>> {
        let mut p = MAGIC.to_vec();
        p.extend_from_slice(&VERSION.to_le_bytes());
        p.extend_from_slice(&self.flags.to_le_bytes());
        p.extend_from_slice(&self.epoch.to_le_bytes());
        p.extend_from_slice(&self.boot_id);
        p.extend_from_slice(&self.table_at.to_le_bytes());
        p.extend_from_slice(&self.table_len.to_le_bytes());
        p.extend_from_slice(&self.data_hash);
        p.extend_from_slice(&(self.names.len() as u16).to_le_bytes());
        for n in &self.names {
            p.push(u8::try_from(n.len()).ok()?);
            p.extend_from_slice(n.as_bytes());
        }
        let hash = header_hash(&p, table);
        p.extend_from_slice(&hash);
        (p.len() as u64 <= HEADER).then_some(p)
    }

    /// The header and the bytes its hash covers.
    fn decode(page: &[u8]) -> Result<(Header, &[u8]), String> {
        let mut c = crate::transport::record::Cursor::new(page, "undo header");
        let e = |e: crate::transport::record::PayloadError| e.to_string();
        c.bytes(8).map_err(e)?;
        c.u32().map_err(e)?; // version, checked by the caller
        let flags = c.u32().map_err(e)?;
        let epoch = c.u64().map_err(e)?;
        let boot_id = c.bytes(BOOT_ID).map_err(e)?.try_into().expect("36 bytes");
        let table_at = c.u64().map_err(e)?;
        let table_len = c.u64().map_err(e)?;
        let data_hash = c.bytes(32).map_err(e)?.try_into().expect("32 bytes");
        let n = c.u16().map_err(e)?;
        let mut names = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let len = c.u8().map_err(e)? as usize;
            let b = c.bytes(len).map_err(e)?;
            names.push(
                String::from_utf8(b.to_vec()).map_err(|_| "disk name not UTF-8".to_string())?,
            );
        }
        let body_len = page.len() - c.remaining();
        let h = Header {
            flags,
            epoch,
            boot_id,
            table_at,
            table_len,
            data_hash,
            names,
        };
        Ok((h, &page[..body_len + 32.min(c.remaining())]))
    }

    fn hash_matches(&self, body: &[u8], table: &[u8]) -> bool {
        body.len() >= 32 && {
            let (b, hash) = body.split_at(body.len() - 32);
            header_hash(b, table) == hash
        }
    }
}

fn header_hash(header: &[u8], table: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(header);
    h.update(table);
    *h.finalize().as_bytes()
}

fn encode_table(entries: &[Entry]) -> Vec<u8> {
    let mut t = Vec::with_capacity(entries.len() * ENTRY);
    for e in entries {
        t.extend_from_slice(&e.disk.to_le_bytes());
        t.push(e.data_at.is_none() as u8);
        t.extend_from_slice(&e.offset.to_le_bytes());
        t.extend_from_slice(&e.len.to_le_bytes());
        t.extend_from_slice(&e.data_at.unwrap_or(0).to_le_bytes());
    }
    t
}

/// Entries of a sealed table whose data lies in `HEADER..data_end`.
fn decode_table(t: &[u8], data_end: u64) -> Result<Vec<Entry>, String> {
    if t.len() % ENTRY != 0 {
        return Err(format!("table of {} bytes", t.len()));
    }
    let u64_at = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    t.chunks(ENTRY)
        .map(|c| {
            let (offset, len, at) = (u64_at(&c[3..11]), u64_at(&c[11..19]), u64_at(&c[19..27]));
            let data_at = match c[2] {
                1 => None,
                0 if at >= HEADER && at.checked_add(len).is_some_and(|e| e <= data_end) => Some(at),
                k => return Err(format!("entry of kind {k} with data {at}+{len}")),
            };
            Ok(Entry {
                disk: u16::from_le_bytes([c[0], c[1]]),
                offset,
                len,
                data_at,
            })
        })
        .collect()
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), zeros if unknown.
/// This boot's id (read once per process: it cannot change while the
/// process lives, and reading it cost an open, a read and a close per
/// sealed epoch).
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

/// Copies `len` bytes from `src` at `from` to `dst` at `to`: in the kernel
/// (`copy_file_range`), or through a buffer where that is not supported.
fn copy_range(src: &File, from: u64, dst: &File, to: u64, len: u64) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        let (mut f, mut t) = ((from + done) as libc::loff_t, (to + done) as libc::loff_t);
        let n = (len - done).min(COPY_CHUNK) as usize;
        // SAFETY: both fds are open files we own; the offsets point at
        // locals that outlive the call; no memory of ours is written.
        let r = unsafe {
            libc::copy_file_range(src.as_raw_fd(), &mut f, dst.as_raw_fd(), &mut t, n, 0)
        };
        match r {
            0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            r if r > 0 => done += r as u64,
            _ => {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EXDEV)
                    | Some(libc::EINVAL)
                    | Some(libc::ENOSYS)
                    | Some(libc::EOPNOTSUPP) => {
                        return copy_buffered(src, from + done, dst, to + done, len - done)
                    }
                    Some(libc::EINTR) => {}
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(())
}

fn copy_buffered(src: &File, from: u64, dst: &File, to: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; (1 << 20).min(len as usize)];
    let mut done = 0;
    while done < len {
        let n = ((len - done) as usize).min(buf.len());
        src.read_exact_at(&mut buf[..n], from + done)?;
        dst.write_all_at(&buf[..n], to + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &Path) -> Vec<u8> {
        std::fs::read(p).unwrap()
    }

    /// A journal of two ranges of `d.img` (one data, one hole), sealed,
    /// and the image then half overwritten, as a backup killed mid-apply
    /// leaves it.
    fn half_applied(dir: &Path, durable: bool) -> Vec<u8> {
        let img = DiskImage::create(&dir.join("d.img"), 1 << 20).unwrap();
        img.write_at(&[3; 8192], 4096).unwrap();
        let before = read(img.path());
        let mut u = Undo::create(dir, vec!["d.img".into()]).unwrap();
        u.save(0, &img, 0, 12288).unwrap();
        u.save(0, &img, 512 << 10, 256 << 10).unwrap(); // a hole
        u.seal(9, durable).unwrap();
        img.write_at(&[4; 12288], 0).unwrap();
        img.write_at(&[5; 100], 512 << 10).unwrap();
        before
    }

    #[test]
    fn a_backup_killed_mid_apply_is_rolled_back_at_its_next_start() {
        for durable in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let before = half_applied(dir.path(), durable);
            assert_ne!(read(&dir.path().join("d.img")), before);
            let r = recover(dir.path()).unwrap();
            assert_eq!(
                r,
                Recovered::RolledBack {
                    epoch: 9,
                    ranges: 2,
                    bytes: 12288
                }
            );
            assert!(
                read(&dir.path().join("d.img")) == before,
                "durable {durable}"
            );
            assert_eq!(recover(dir.path()).unwrap(), Recovered::Nothing, "once");
        }
    }

    /// Old data of ranges saved through the buffer (small ones, more than
    /// [`PENDING_FLUSH`] of them so it goes out mid-epoch) and in the
    /// kernel (large ones) interleaved: a roll back and a recovery both
    /// put back exactly the bytes of before, the last saved range first.
    #[test]
    fn buffered_and_copied_saves_roll_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let img = DiskImage::create(&dir.path().join("d.img"), 8 << 20).unwrap();
        let pattern: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
        img.write_at(&pattern, 0).unwrap();
        // 4 KiB ranges every 12 KiB (1.3 MiB of them), a 512 KiB range in
        // the middle of them, and a 4 KiB range saved twice (the second
        // save holds what the first write left).
        let mut ranges: Vec<(u64, u64)> = (0..340u64).map(|i| (i * 12288, 4096)).collect();
        ranges.insert(170, (6 << 20, 512 << 10));
        let mut u = Undo::create(dir.path(), vec!["d.img".into()]).unwrap();
        for &(off, len) in &ranges {
            u.save(0, &img, off, len).unwrap();
        }
        u.save(0, &img, 4096 * 3, 4096).unwrap();
        img.write_at(&[0xaa; 4096], 4096 * 3).unwrap();
        u.save(0, &img, 0, 4096 * 5).unwrap();
        let saved: u64 = ranges.iter().map(|r| r.1).sum::<u64>() + 4096 + 4096 * 5;
        assert_eq!(u.saved_bytes(), saved);
        u.seal(4, false).unwrap();
        for &(off, len) in &ranges {
            img.write_at(&vec![0x55; len as usize], off).unwrap();
        }
        img.write_at(&[0x66; 4096 * 5], 0).unwrap();
        u.roll_back(&[&img]).unwrap();
        assert!(read(img.path()) == pattern, "rolled back in the process");
        // The same through a sealed journal left by a killed backup.
        let mut u = Undo::create(dir.path(), vec!["d.img".into()]).unwrap();
        for &(off, len) in &ranges {
            u.save(0, &img, off, len).unwrap();
        }
        u.seal(5, true).unwrap();
        for &(off, len) in &ranges {
            img.write_at(&vec![0x77; len as usize], off).unwrap();
        }
        drop(u);
        let r = recover(dir.path()).unwrap();
        assert_eq!(
            r,
            Recovered::RolledBack {
                epoch: 5,
                ranges: ranges.len(),
                bytes: ranges.iter().map(|r| r.1).sum()
            }
        );
        assert!(read(img.path()) == pattern, "rolled back at the next start");
    }

    #[test]
    fn a_torn_or_foreign_journal_rolls_nothing_back() {
        // A durable journal whose old data did not all reach the disk:
        // its sync had not returned, so no write of the epoch was applied.
        let dir = tempfile::tempdir().unwrap();
        half_applied(dir.path(), true);
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join(UNDO_FILE))
            .unwrap();
        f.write_all_at(&[0xee], HEADER + 5).unwrap();
        let now = read(&dir.path().join("d.img"));
        assert_eq!(recover(dir.path()).unwrap(), Recovered::Nothing);
        assert!(read(&dir.path().join("d.img")) == now);
        // A header that does not match its table was never sealed.
        let dir = tempfile::tempdir().unwrap();
        half_applied(dir.path(), false);
        let t = OpenOptions::new()
            .write(true)
            .open(dir.path().join(UNDO_FILE))
            .unwrap();
        t.write_all_at(&[0xee], HEADER + 12288 + 3).unwrap();
        assert_eq!(recover(dir.path()).unwrap(), Recovered::Nothing);
        // An entry outside its image is refused by name, nothing written.
        let dir = tempfile::tempdir().unwrap();
        let img = DiskImage::create(&dir.path().join("d.img"), 8192).unwrap();
        let mut u = Undo::create(dir.path(), vec!["../d.img".into()]).unwrap();
        u.save(0, &img, 0, 4096).unwrap();
        u.seal(3, false).unwrap();
        let e = recover(dir.path()).unwrap_err().to_string();
        assert!(e.contains("disk file name"), "{e}");
    }
}
