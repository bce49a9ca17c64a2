//! The backup's staging of an open epoch's disk writes.
//!
//! A `DiskWrites` payload is validated whole ([`super::wire::parse`])
//! before it is staged; staged payloads are kept in memory up to a bound
//! and spill to an unnamed temporary file beyond it. A large payload the
//! record reader lets us keep in its receive buffer
//! ([`crate::transport::recv_buf::Held`]) is staged in place, not copied;
//! the bound then counts the whole buffers such payloads pin. Nothing reaches a
//! disk image before [`Staging::commit`], which the receiver calls at the
//! epoch's end together with the memory commit and before it acks: it
//! replays the writes in arrival order and, when the epoch carried a flush
//! (or a FUA write), `fdatasync`s the images it touched before returning.
//! Epochs without a flush leave their writes in the backup's page cache
//! (a volatile write cache, as the guest asked for no durability).
//!
//! Invariant: a discarded epoch ([`Staging::discard`]) leaves every image
//! untouched.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::fault::Fault;
use super::image::{DiskImage, ImageError};
use super::undo::{Undo, UndoError};
use super::wire::{parse, DiskWireError, OpRef};
use crate::transport::record::READ_CHUNK;
use crate::transport::recv_buf::Held;

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Wire(#[from] DiskWireError),
    #[error("{op} disk staging spill file in {dir}: {source}")]
    Spill {
        op: &'static str,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("applying staged disk writes: {0}")]
    Apply(#[from] ImageError),
    #[error("staged disk write names disk {disk}, but {disks} image(s) are open")]
    NoImage { disk: u16, disks: usize },
    #[error("saving the old disk contents before epoch {0}")]
    Undo(#[from] UndoError),
    #[error("applying epoch {epoch}'s disk writes failed and they were rolled back (the replica disks stay at the epoch before): {source}")]
    RolledBack {
        epoch: u64,
        #[source]
        source: Box<StageError>,
    },
    #[error("applying epoch {epoch}'s disk writes failed ({apply}) and rolling them back failed too: {rollback}; the undo journal stays sealed, the next start of the backup rolls it back")]
    NotRolledBack {
        epoch: u64,
        apply: Box<StageError>,
        rollback: UndoError,
    },
}

/// What one commit applied.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub ops: u64,
    pub write_bytes: u64,
    /// Whether the images were synced (the epoch carried a flush).
    pub synced: bool,
}

/// Payloads at least this large are kept where the reader received them
/// when it allows it: moving on to a new buffer costs the reader a copy of
/// under [`READ_CHUNK`] bytes, less than copying the payload.
pub const HOLD_MIN: usize = READ_CHUNK;

/// A payload staged in memory.
#[derive(Debug)]
enum InMem {
    /// Copied into [`Staging::mem`], at this range.
    Copied(Range<usize>),
    /// Left in the reader's buffer.
    Held(Held),
}

#[derive(Debug)]
pub struct Staging {
    limit: usize,
    spill_dir: PathBuf,
    /// Staged in memory, in arrival order (before any spilled payload).
    held: Vec<InMem>,
    /// The bytes of the `Copied` payloads.
    mem: Vec<u8>,
    /// Memory the staged payloads take: `mem` plus each distinct held buffer.
    in_mem: usize,
    spill: Option<File>,
    spilled: u64,
    records: u32,
    flush: bool,
    /// FOR TESTS ONLY: an injected device fault ([`super::fault`]).
    fault: Fault,
}

impl Staging {
    /// Stages up to `limit` bytes in memory, spilling to a file in `spill_dir`.
    pub fn new(limit: usize, spill_dir: &Path) -> Staging {
        Staging {
            limit,
            spill_dir: spill_dir.to_path_buf(),
            held: Vec::new(),
            mem: Vec::new(),
            in_mem: 0,
            spill: None,
            spilled: 0,
            records: 0,
            flush: false,
            fault: Fault::default(),
        }
    }

    /// Injects `fault` into later commits (tests only).
    pub fn with_fault(mut self, fault: Fault) -> Staging {
        self.fault = fault;
        self
    }

    /// `DiskWrites` records staged in the open epoch.
    pub fn records(&self) -> u32 {
        self.records
    }

    /// Bytes staged in the spill file (0 while the epoch fits in memory).
    pub fn spilled(&self) -> u64 {
        self.spilled
    }

    /// Validates `payload` against the disks' sizes and stages it whole:
    /// in place if `held` keeps it (and it is at least [`HOLD_MIN`]
    /// bytes), else by copying it.
    pub fn stage(
        &mut self,
        payload: &[u8],
        held: Option<Held>,
        sizes: &[u64],
    ) -> Result<(), StageError> {
        let (_, ops) = parse(payload, sizes)?;
        self.flush |= ops.iter().any(|o| matches!(o, OpRef::Flush));
        let held = held.filter(|_| payload.len() >= HOLD_MIN);
        let cost = match (&held, self.held.last()) {
            (Some(h), Some(InMem::Held(last))) if h.same_buffer(last) => 0,
            (Some(h), _) => h.buffer_len(),
            (None, _) => payload.len(),
        };
        if self.spill.is_none() && self.in_mem + cost <= self.limit {
            self.in_mem += cost;
            self.held.push(match held {
                Some(h) => InMem::Held(h),
                None => {
                    let at = self.mem.len();
                    self.mem.extend_from_slice(payload);
                    InMem::Copied(at..self.mem.len())
                }
            });
        } else {
            let len = (payload.len() as u32).to_le_bytes();
            self.spill_write(&len)?;
            self.spill_write(payload)?;
        }
        self.records += 1;
        Ok(())
    }

    /// Bytes of memory the open epoch's staged payloads take (copied ones,
    /// and the whole receive buffers held ones pin).
    pub fn in_memory(&self) -> usize {
        self.in_mem
    }

    fn spill_err(&self, op: &'static str) -> impl FnOnce(io::Error) -> StageError + '_ {
        move |source| StageError::Spill {
            op,
            dir: self.spill_dir.clone(),
            source,
        }
    }

    fn spill_write(&mut self, bytes: &[u8]) -> Result<(), StageError> {
        if self.spill.is_none() {
            let f = tempfile::tempfile_in(&self.spill_dir).map_err(self.spill_err("creating"))?;
            self.spill = Some(f);
        }
        let f = self.spill.as_ref().expect("created above");
        f.write_all_at(bytes, self.spilled)
            .map_err(self.spill_err("writing"))?;
        self.spilled += bytes.len() as u64;
        Ok(())
    }

    /// Applies the open epoch (`epoch`)'s writes to `images` (indexed by
    /// disk), in order, syncing them if the epoch carried a flush; then
    /// forgets them.
    ///
    /// All or nothing: with an `undo` journal the old contents of every
    /// range are saved and sealed first, and an error while applying puts
    /// them back ([`StageError::RolledBack`]), a full disk included. Without one (the seeding
    /// images before their first commit, which replace nothing until it
    /// succeeds) only the space is reserved first ([`DiskImage::reserve`]),
    /// so a full disk fails before any byte of the epoch lands.
    pub fn commit(
        &mut self,
        images: &[&DiskImage],
        undo: Option<&mut Undo>,
        epoch: u64,
    ) -> Result<Applied, StageError> {
        let sizes: Vec<u64> = images.iter().map(|i| i.size()).collect();
        let mut undo = undo;
        if let Some(u) = undo.as_deref_mut() {
            let mut ops = 0;
            let flush = self.flush;
            let saved = self
                .each_payload(|p| save_old(p, &sizes, images, u, &mut ops))
                .and_then(|()| Ok(u.seal(epoch, flush)?));
            if let Err(e) = saved {
                let _ = u.clear();
                return Err(e);
            }
            self.fault.arm(epoch, ops, images);
        }
        let mut applied = Applied::default();
        let mut fault = std::mem::take(&mut self.fault);
        // With a journal a full disk mid-apply is rolled back like any
        // error: reserving first would only cost a syscall per op.
        let reserved = match undo {
            Some(_) => Ok(()),
            None => self.each_payload(|p| reserve(p, &sizes, images)),
        };
        let r = reserved
            .and_then(|()| {
                self.each_payload(|p| apply(p, &sizes, images, &mut applied, &mut fault))
            })
            .and_then(|()| self.sync_if_flushed(images, &mut applied));
        self.fault = fault;
        match (r, undo) {
            (Ok(()), Some(u)) => u.clear()?,
            (Ok(()), None) => {}
            (Err(e), None) => return Err(e),
            (Err(e), Some(u)) => {
                return Err(match u.roll_back(images) {
                    Ok(()) => StageError::RolledBack {
                        epoch,
                        source: Box::new(e),
                    },
                    Err(rollback) => StageError::NotRolledBack {
                        epoch,
                        apply: Box::new(e),
                        rollback,
                    },
                })
            }
        }
        self.discard();
        Ok(applied)
    }

    fn sync_if_flushed(
        &self,
        images: &[&DiskImage],
        applied: &mut Applied,
    ) -> Result<(), StageError> {
        if self.flush {
            for img in images {
                img.sync()?;
            }
            applied.synced = true;
        }
        Ok(())
    }

    /// Calls `f` with every staged payload, in staging order.
    fn each_payload(
        &self,
        mut f: impl FnMut(&[u8]) -> Result<(), StageError>,
    ) -> Result<(), StageError> {
        for m in &self.held {
            f(match m {
                InMem::Copied(r) => &self.mem[r.clone()],
                InMem::Held(h) => h.bytes(),
            })?;
        }
        let mut pos = 0;
        let mut scratch = Vec::new();
        while pos < self.spilled {
            let mut len = [0u8; 4];
            let f_ = self.spill.as_ref().expect("spilled bytes live in the file");
            f_.read_exact_at(&mut len, pos)
                .map_err(self.spill_err("reading"))?;
            scratch.resize(u32::from_le_bytes(len) as usize, 0);
            f_.read_exact_at(&mut scratch, pos + 4)
                .map_err(self.spill_err("reading"))?;
            f(&scratch)?;
            pos += 4 + scratch.len() as u64;
        }
        Ok(())
    }

    /// Forgets the open epoch's writes (torn epoch, or after commit).
    pub fn discard(&mut self) {
        // Dropping the held payloads hands their buffers back to the reader.
        self.held.clear();
        self.mem.clear();
        self.in_mem = 0;
        if self.spilled > 0 {
            if let Some(f) = &self.spill {
                // Only shrinks a scratch file; on failure later writes
                // overwrite it from offset 0 anyway.
                let _ = f.set_len(0);
            }
        }
        self.spilled = 0;
        self.records = 0;
        self.flush = false;
    }
}

/// The image a DiskWrites `payload` names, and its operations.
fn target<'a, 'i>(
    payload: &'a [u8],
    sizes: &[u64],
    images: &[&'i DiskImage],
) -> Result<(u16, &'i DiskImage, Vec<OpRef<'a>>), StageError> {
    let (disk, ops) = parse(payload, sizes)?;
    let img = images.get(disk as usize).ok_or(StageError::NoImage {
        disk,
        disks: images.len(),
    })?;
    Ok((disk, img, ops))
}

/// Reserves the blocks every write of `payload` will fill.
fn reserve(payload: &[u8], sizes: &[u64], images: &[&DiskImage]) -> Result<(), StageError> {
    let (_, img, ops) = target(payload, sizes, images)?;
    for op in ops {
        if let OpRef::Write { offset, data } = op {
            img.reserve(offset, data.len() as u64)?;
        }
    }
    Ok(())
}

/// Saves the old contents of every range `payload` changes into `undo`.
fn save_old(
    payload: &[u8],
    sizes: &[u64],
    images: &[&DiskImage],
    undo: &mut Undo,
    ops: &mut u64,
) -> Result<(), StageError> {
    let (disk, img, list) = target(payload, sizes, images)?;
    for op in list {
        match op {
            OpRef::Write { offset, data } => undo.save(disk, img, offset, data.len() as u64)?,
            OpRef::Zero { offset, len } => undo.save(disk, img, offset, len)?,
            OpRef::Flush => {}
        }
        *ops += 1;
    }
    Ok(())
}

fn apply(
    payload: &[u8],
    sizes: &[u64],
    images: &[&DiskImage],
    applied: &mut Applied,
    fault: &mut Fault,
) -> Result<(), StageError> {
    let (_, img, ops) = target(payload, sizes, images)?;
    for op in ops {
        fault.before_op(applied.ops, img)?;
        match op {
            OpRef::Write { offset, data } => {
                img.write_at(data, offset)?;
                applied.write_bytes += data.len() as u64;
            }
            OpRef::Zero { offset, len } => img.zero(offset, len)?,
            OpRef::Flush => {}
        }
        applied.ops += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::wire::{encode, DiskOp};

    fn payload(disk: u16, ops: &[DiskOp]) -> Vec<u8> {
        let mut p = Vec::new();
        encode(&mut p, disk, ops);
        p
    }

    fn w(offset: u64, b: u8, n: usize) -> DiskOp {
        DiskOp::Write {
            offset,
            data: vec![b; n],
        }
    }

    fn read(img: &DiskImage) -> Vec<u8> {
        let mut b = vec![0; img.size() as usize];
        img.read_at(&mut b, 0).unwrap();
        b
    }

    /// A tmpfs of `bytes` mounted on a fresh directory, unmounted on drop.
    struct SmallFs(tempfile::TempDir);

    impl SmallFs {
        fn mount(bytes: u64) -> Result<SmallFs, String> {
            let d = tempfile::tempdir().unwrap();
            let out = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
                .arg(d.path())
                .output()
                .map_err(|e| format!("running mount: {e}"))?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
            }
            Ok(SmallFs(d))
        }
    }

    impl Drop for SmallFs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(self.0.path())
                .status();
        }
    }

    #[test]
    fn a_backup_out_of_space_applies_no_byte_of_the_epoch() {
        let fs = match SmallFs::mount(1 << 20) {
            Ok(fs) => fs,
            Err(e) => {
                eprintln!("skipped: needs root to mount a 1 MiB tmpfs ({e})");
                return;
            }
        };
        let img = DiskImage::create(&fs.0.path().join("d.img"), 4 << 20).unwrap();
        let spill = tempfile::tempdir().unwrap();
        let mut st = Staging::new(64 << 20, spill.path());
        let sizes = [img.size()];
        // The first write fits in the file system, the second does not.
        st.stage(&payload(0, &[w(0, 1, 512 << 10)]), None, &sizes)
            .unwrap();
        st.stage(&payload(0, &[w(2 << 20, 2, 1 << 20)]), None, &sizes)
            .unwrap();
        let e = st.commit(&[&img], None, 1).unwrap_err().to_string();
        assert!(e.contains("reserving space") && e.contains("d.img"), "{e}");
        assert!(
            read(&img).iter().all(|&b| b == 0),
            "no byte of the epoch reached the image"
        );
    }

    /// Two disks with data, holes and an epoch that writes over data,
    /// into a hole, zeroes and trims, across both.
    fn busy_epoch(st: &mut Staging, sizes: &[u64]) {
        st.stage(
            &payload(0, &[w(4096, 7, 8192), w(60 << 10, 8, 100)]),
            None,
            sizes,
        )
        .unwrap();
        let zero = DiskOp::Zero {
            offset: 0,
            len: 300,
        };
        let trim = DiskOp::Trim {
            offset: 16384,
            len: 8192,
        };
        st.stage(&payload(1, &[zero, w(5000, 9, 10_000), trim]), None, sizes)
            .unwrap();
        st.stage(&payload(0, &[w(4000, 6, 200)]), None, sizes)
            .unwrap();
    }

    #[test]
    fn an_io_error_mid_apply_rolls_the_epoch_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let a = DiskImage::create(&dir.path().join("a.img"), 64 << 10).unwrap();
        let b = DiskImage::create(&dir.path().join("b.img"), 32 << 10).unwrap();
        a.write_at(&[1; 20_000], 0).unwrap();
        b.write_at(&[2; 32 << 10], 0).unwrap();
        let before = (read(&a), read(&b));
        let sizes = [a.size(), b.size()];
        let mut undo = Undo::create(dir.path(), vec!["a.img".into(), "b.img".into()]).unwrap();
        let mut st = Staging::new(64 << 20, dir.path()).with_fault(Fault::eio_at(1));
        busy_epoch(&mut st, &sizes);
        let e = st.commit(&[&a, &b], Some(&mut undo), 7).unwrap_err();
        assert!(matches!(e, StageError::RolledBack { epoch: 7, .. }), "{e}");
        assert!(e.to_string().contains("injected"), "{e}");
        assert!(
            (read(&a), read(&b)) == before,
            "the disks are exactly as before epoch 7"
        );
        assert_eq!(
            crate::disk::undo::recover(dir.path()).unwrap(),
            crate::disk::undo::Recovered::Nothing,
            "the journal is cleared after the roll back"
        );
        // The fault fired once: the same epoch, received again, applies.
        st.discard();
        busy_epoch(&mut st, &sizes);
        let got = st.commit(&[&a, &b], Some(&mut undo), 7).unwrap();
        assert_eq!(got.ops, 6);
        let ra = read(&a);
        assert!(ra[4000..4200].iter().all(|&x| x == 6) && ra[4200..12288].iter().all(|&x| x == 7));
        assert!(read(&b)[..300].iter().all(|&x| x == 0));
    }

    #[test]
    fn held_payloads_count_their_buffers_and_spill_beyond_the_bound() {
        use crate::transport::record::{write_record, RecordKind, RecordReader};
        let dir = tempfile::tempdir().unwrap();
        let a = DiskImage::create(&dir.path().join("a.img"), 4 << 20).unwrap();
        let sizes = [a.size()];
        let big = |off: u64, b: u8| payload(0, &[w(off, b, 300 << 10)]);
        let mut v = Vec::new();
        for (i, p) in [
            big(0, 1),
            payload(0, &[w(0, 9, 10)]),
            big(1 << 20, 2),
            big(2 << 20, 3),
        ]
        .iter()
        .enumerate()
        {
            write_record(&mut v, RecordKind::DiskWrites, i as u64, p);
        }
        // The first payload pins the reader's first buffer (4 MiB), the
        // second is copied, the third pins the 2 MiB buffer the reader
        // moved to; the fourth, in a third buffer, is over the bound and
        // spills.
        let mut s = Staging::new(7 << 20, dir.path());
        let mut r = RecordReader::new(&v[..]);
        for _ in 0..4 {
            let rec = r.next().unwrap();
            s.stage(rec.payload, rec.hold(), &sizes).unwrap();
        }
        assert!(s.in_memory() >= 6 << 20, "held buffers counted whole");
        assert!(s.spilled() > 0, "beyond the bound the payloads spill");
        s.commit(&[&a], None, 1).unwrap();
        let got = read(&a);
        let range = |at: usize, b: u8| got[at..at + (300 << 10)].iter().all(|&x| x == b);
        assert!(
            got[..10].iter().all(|&x| x == 9),
            "the later small write wins"
        );
        assert!(
            range(1 << 20, 2) && range(2 << 20, 3) && got[10..300 << 10].iter().all(|&x| x == 1)
        );
        assert_eq!(s.in_memory(), 0);
    }

    #[test]
    fn nothing_reaches_the_image_before_commit_and_order_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = DiskImage::create(&dir.path().join("a.img"), 16384).unwrap();
        let b = DiskImage::create(&dir.path().join("b.img"), 8192).unwrap();
        let sizes = [a.size(), b.size()];
        // A tiny memory bound: the second and third payloads spill.
        let mut s = Staging::new(100, dir.path());
        s.stage(&payload(0, &[w(0, 1, 64)]), None, &sizes).unwrap();
        s.stage(&payload(0, &[w(32, 2, 4096)]), None, &sizes)
            .unwrap();
        s.stage(&payload(1, &[w(100, 3, 10), DiskOp::Flush]), None, &sizes)
            .unwrap();
        assert!(s.spilled() > 0, "the bound forced a spill");
        assert_eq!(s.records(), 3);
        assert!(read(&a).iter().all(|&x| x == 0), "staged, not applied");
        let got = s.commit(&[&a, &b], None, 1).unwrap();
        assert_eq!(
            got,
            Applied {
                ops: 4,
                write_bytes: 64 + 4096 + 10,
                synced: true
            }
        );
        let ra = read(&a);
        assert!(ra[..32].iter().all(|&x| x == 1), "first write");
        assert!(ra[32..4128].iter().all(|&x| x == 2), "second write over it");
        assert!(read(&b)[100..110].iter().all(|&x| x == 3));
        assert_eq!((s.records(), s.spilled()), (0, 0));
    }

    #[test]
    fn a_hostile_record_is_refused_whole_and_a_discarded_epoch_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let a = DiskImage::create(&dir.path().join("a.img"), 8192).unwrap();
        let mut s = Staging::new(1 << 20, dir.path());
        // First op valid, second past the end: the record is not staged.
        let bad = payload(0, &[w(0, 7, 10), w(8190, 7, 10)]);
        assert!(s.stage(&bad, None, &[a.size()]).is_err());
        assert_eq!(s.records(), 0);
        s.stage(&payload(0, &[w(0, 7, 10)]), None, &[a.size()])
            .unwrap();
        s.discard();
        let got = s.commit(&[&a], None, 1).unwrap();
        assert_eq!(got, Applied::default());
        assert!(read(&a).iter().all(|&x| x == 0));
    }

    #[test]
    fn zero_and_trim_clear_the_range_at_commit() {
        let dir = tempfile::tempdir().unwrap();
        let a = DiskImage::create(&dir.path().join("a.img"), 8192).unwrap();
        a.write_at(&[5; 8192], 0).unwrap();
        let mut s = Staging::new(1 << 20, dir.path());
        let p = payload(
            0,
            &[
                DiskOp::Zero { offset: 0, len: 10 },
                DiskOp::Trim {
                    offset: 4096,
                    len: 4096,
                },
            ],
        );
        s.stage(&p, None, &[8192]).unwrap();
        let got = s.commit(&[&a], None, 1).unwrap();
        assert!(!got.synced, "no flush in the epoch");
        let r = read(&a);
        assert!(r[..10].iter().all(|&x| x == 0));
        assert!(r[10..4096].iter().all(|&x| x == 5));
        assert!(r[4096..].iter().all(|&x| x == 0));
    }
}
