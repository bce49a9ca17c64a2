//! The backup's staging of an open epoch's disk writes.
//!
//! A `DiskWrites` payload is validated whole ([`super::wire::parse`])
//! before it is staged; staged payloads are kept in memory up to a bound
//! and spill to an unnamed temporary file beyond it. A large payload the
//! record reader lets us keep in its receive buffer
//! ([`crate::transport::recv_buf::Held`]) is staged in place, not copied;
//! the bound then counts the whole buffers such payloads pin. Nothing reaches a
//! disk image before the epoch's end: the receiver seals the epoch's
//! payloads into the redo log ([`Staging::seal`], [`super::redo`]) before
//! the memory commit and applies them ([`Staging::apply_sealed`]) after
//! it and before it acks (the first commit, to images that replace nothing
//! yet, needs no log: [`Staging::commit`]). The apply replays the writes
//! in arrival order and, when the epoch carried a flush (or a FUA write),
//! `fdatasync`s the images it touched before returning.
//! Epochs without a flush leave their writes in the backup's page cache
//! (a volatile write cache, as the guest asked for no durability).
//!
//! Invariant: a discarded epoch ([`Staging::discard`]) leaves every image
//! untouched.

use std::fs::File;
use std::io::{self, IoSlice};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::fault::Fault;
use super::image::{DiskImage, ImageError};
use super::redo::{Redo, RedoError};
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
    #[error("writing the redo log: {0}")]
    Redo(#[from] RedoError),
    #[error("sealing epoch {epoch}'s redo log failed ({seal}), and undoing it too: {abandon}")]
    Abandoned {
        epoch: u64,
        seal: Box<StageError>,
        #[source]
        abandon: RedoError,
    },
    #[error("applying epoch {epoch}'s disk writes failed; its sealed redo log stays, replayed at the save or at the next start of the backup (the replica disks then hold epoch {epoch} whole): {source}")]
    Unapplied {
        epoch: u64,
        #[source]
        source: Box<StageError>,
    },
}

/// What one commit applied.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub ops: u64,
    pub write_bytes: u64,
    /// `pwritev`s the writes went out in (adjacent writes go together).
    pub runs: u64,
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

    /// Applies the open epoch (`epoch`)'s writes to images that replace
    /// nothing until it succeeds (the seeding images before their first
    /// commit), in order, syncing them if the epoch carried a flush; then
    /// forgets them. The space is reserved first
    /// ([`DiskImage::reserve`]), so a full disk fails before any byte of
    /// the epoch lands. Commits after the first go through the redo log:
    /// [`Staging::seal`], then [`Staging::apply_sealed`].
    pub fn commit(&mut self, images: &[&DiskImage]) -> Result<Applied, StageError> {
        let sizes: Vec<u64> = images.iter().map(|i| i.size()).collect();
        let mut applied = Applied::default();
        let mut fault = std::mem::take(&mut self.fault);
        let r = self
            .each_payload(|p| reserve(p, &sizes, images))
            .and_then(|()| {
                self.each_payload(|p| apply(p, &sizes, images, &mut applied, &mut fault))
            })
            .and_then(|()| self.sync_if_flushed(images, &mut applied));
        self.fault = fault;
        r?;
        self.discard();
        Ok(applied)
    }

    /// Writes the open epoch (`epoch`)'s payloads to `redo` and seals it:
    /// from here on the epoch's disk writes are committed (a backup that
    /// stops before they are applied replays them, [`super::redo`]). On
    /// error the log is cleared and no image has been touched.
    /// An epoch without disk writes writes no log (nothing to replay).
    pub fn seal(&mut self, redo: &mut Redo, epoch: u64) -> Result<(), StageError> {
        if self.records == 0 {
            return Ok(());
        }
        redo.begin(self.flush);
        let r = self.write_log(redo).and_then(|()| Ok(redo.seal(epoch)?));
        if let Err(e) = r {
            return Err(match redo.abandon() {
                Ok(()) => e,
                Err(a) => StageError::Abandoned {
                    epoch,
                    seal: Box::new(e),
                    abandon: a,
                },
            });
        }
        Ok(())
    }

    /// The staged payloads into `redo`, in staging order: those in memory
    /// where they are, the spilled ones from the spill file (same format).
    fn write_log(&self, redo: &mut Redo) -> Result<(), StageError> {
        let mem: Vec<&[u8]> = self.payloads_in_memory().collect();
        redo.append(&mem)?;
        if let Some(f) = self.spill.as_ref().filter(|_| self.spilled > 0) {
            let spilled = self.records as u64 - mem.len() as u64;
            redo.append_raw(f, self.spilled, spilled)?;
        }
        Ok(())
    }

    /// Applies the epoch [`Staging::seal`] sealed in `redo` to `images`
    /// (indexed by disk), in order, syncing them if it carried a flush;
    /// then clears the log and forgets the epoch. On error the log stays
    /// sealed ([`StageError::Unapplied`]): replaying it
    /// ([`super::redo::recover`], at the save or the next start) completes
    /// the epoch.
    pub fn apply_sealed(
        &mut self,
        images: &[&DiskImage],
        redo: &mut Redo,
        epoch: u64,
    ) -> Result<Applied, StageError> {
        let sizes: Vec<u64> = images.iter().map(|i| i.size()).collect();
        let unapplied = |e: StageError| StageError::Unapplied {
            epoch,
            source: Box::new(e),
        };
        self.arm_fault(images, &sizes, epoch).map_err(unapplied)?;
        let mut applied = Applied::default();
        let mut fault = std::mem::take(&mut self.fault);
        let r = self
            .each_payload(|p| apply(p, &sizes, images, &mut applied, &mut fault))
            .and_then(|()| self.sync_if_flushed(images, &mut applied));
        self.fault = fault;
        r.map_err(unapplied)?;
        redo.clear()?;
        self.discard();
        Ok(applied)
    }

    /// FOR TESTS: arms an injected fault ([`super::fault`]) for this apply,
    /// with the epoch's operations and the disks it should leave.
    fn arm_fault(
        &mut self,
        images: &[&DiskImage],
        sizes: &[u64],
        epoch: u64,
    ) -> Result<(), StageError> {
        if !self.fault.planned() {
            return Ok(());
        }
        let mut disks = Vec::with_capacity(images.len());
        for img in images {
            let mut b = vec![0u8; img.size() as usize];
            img.read_at(&mut b, 0)?;
            disks.push(b);
        }
        let before = super::fault::hash(&disks);
        let mut ops = 0;
        self.each_payload(|p| {
            let (d, list) = parse(p, sizes)?;
            let disk = &mut disks[d as usize];
            for op in list {
                match op {
                    OpRef::Write { offset, data } => {
                        disk[offset as usize..][..data.len()].copy_from_slice(data)
                    }
                    OpRef::Zero { offset, len } => disk[offset as usize..][..len as usize].fill(0),
                    OpRef::Flush => continue,
                }
                ops += 1;
            }
            Ok(())
        })?;
        let after = super::fault::hash(&disks);
        self.fault.arm(epoch, ops, &before, &after);
        Ok(())
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
    /// The payloads staged in memory, in staging order (the spilled ones
    /// follow them, in the spill file).
    fn payloads_in_memory(&self) -> impl Iterator<Item = &[u8]> {
        self.held.iter().map(|m| match m {
            InMem::Copied(r) => &self.mem[r.clone()],
            InMem::Held(h) => h.bytes(),
        })
    }

    fn each_payload(
        &self,
        mut f: impl FnMut(&[u8]) -> Result<(), StageError>,
    ) -> Result<(), StageError> {
        for p in self.payloads_in_memory() {
            f(p)?;
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

/// Writes of `payload` that follow each other on the disk, gathered to go
/// out in one `pwritev`.
struct Run<'a> {
    offset: u64,
    end: u64,
    bufs: Vec<IoSlice<'a>>,
}

impl<'a> Run<'a> {
    /// Adds a write if it starts where the run ends; else hands it back.
    fn extend(&mut self, offset: u64, data: &'a [u8]) -> bool {
        if offset != self.end || self.bufs.len() >= MAX_RUN {
            return false;
        }
        self.bufs.push(IoSlice::new(data));
        self.end += data.len() as u64;
        true
    }

    fn write(&mut self, img: &DiskImage, applied: &mut Applied) -> Result<(), StageError> {
        if self.bufs.is_empty() {
            return Ok(());
        }
        img.write_vectored_at(&mut self.bufs, self.offset)?;
        applied.write_bytes += self.end - self.offset;
        applied.runs += 1;
        self.bufs.clear();
        Ok(())
    }
}

/// Most writes one `pwritev` carries (Linux's `IOV_MAX` is 1024).
const MAX_RUN: usize = 1024;

/// Applies `payload`'s ops in order; consecutive writes of adjacent ranges
/// go out together ([`Run`]), which keeps the order (they do not overlap).
/// Rewriting the same payload again leaves the same bytes (the replay of
/// a redo log, [`super::redo`]).
pub(super) fn apply(
    payload: &[u8],
    sizes: &[u64],
    images: &[&DiskImage],
    applied: &mut Applied,
    fault: &mut Fault,
) -> Result<(), StageError> {
    let (_, img, ops) = target(payload, sizes, images)?;
    let mut run = Run {
        offset: 0,
        end: 0,
        bufs: Vec::new(),
    };
    for op in ops {
        if fault.acts_before(applied.ops) {
            run.write(img, applied)?;
        }
        fault.before_op(applied.ops, img)?;
        match op {
            OpRef::Write { offset, data } => {
                if !run.extend(offset, data) {
                    run.write(img, applied)?;
                    run.offset = offset;
                    run.end = offset;
                    run.extend(offset, data);
                }
            }
            OpRef::Zero { offset, len } => {
                run.write(img, applied)?;
                img.zero(offset, len)?;
            }
            OpRef::Flush => {}
        }
        applied.ops += 1;
    }
    run.write(img, applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::wire::testing::{payload, w};
    use crate::disk::wire::DiskOp;

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

        /// A mounted tmpfs, or None after saying why the test is skipped
        /// (mounting needs root; CI has it).
        fn mount_or_skip(bytes: u64) -> Option<SmallFs> {
            SmallFs::mount(bytes)
                .map_err(|e| eprintln!("skipped: needs root to mount a {bytes}-byte tmpfs ({e})"))
                .ok()
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
        let Some(fs) = SmallFs::mount_or_skip(1 << 20) else {
            return;
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
        let e = st.commit(&[&img]).unwrap_err().to_string();
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

    /// Copies of `images` in `dir` with `epoch` committed to them without
    /// a fault or a log: the disks the whole epoch leaves.
    fn committed_copy(
        dir: &Path,
        images: &[&DiskImage],
        epoch: impl Fn(&mut Staging, &[u64]),
    ) -> Vec<Vec<u8>> {
        let copies: Vec<DiskImage> = images
            .iter()
            .enumerate()
            .map(|(i, img)| {
                let c = DiskImage::create(&dir.join(format!("{i}.copy")), img.size()).unwrap();
                c.write_at(&read(img), 0).unwrap();
                c
            })
            .collect();
        let refs: Vec<&DiskImage> = copies.iter().collect();
        let sizes: Vec<u64> = copies.iter().map(|c| c.size()).collect();
        let mut st = Staging::new(64 << 20, dir);
        epoch(&mut st, &sizes);
        st.commit(&refs).unwrap();
        copies.iter().map(read).collect()
    }

    /// An EIO mid-apply (after the seal and the first op): the error says
    /// the log stays sealed, the disks are between the two epochs, and the
    /// replay ([`crate::disk::redo::recover`], as at the save) leaves them
    /// exactly as the whole epoch does.
    #[test]
    fn an_io_error_mid_apply_leaves_the_log_sealed_and_its_replay_completes_the_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let a = DiskImage::create(&dir.path().join("a.img"), 64 << 10).unwrap();
        let b = DiskImage::create(&dir.path().join("b.img"), 32 << 10).unwrap();
        a.write_at(&[1; 20_000], 0).unwrap();
        b.write_at(&[2; 32 << 10], 0).unwrap();
        let before = vec![read(&a), read(&b)];
        let want = committed_copy(dir.path(), &[&a, &b], busy_epoch);
        assert_ne!(before, want);
        let sizes = [a.size(), b.size()];
        let mut redo = Redo::create(dir.path(), vec!["a.img".into(), "b.img".into()]).unwrap();
        let mut st = Staging::new(64 << 20, dir.path()).with_fault(Fault::eio_at(1));
        busy_epoch(&mut st, &sizes);
        st.seal(&mut redo, 7).unwrap();
        let e = st.apply_sealed(&[&a, &b], &mut redo, 7).unwrap_err();
        assert!(matches!(e, StageError::Unapplied { epoch: 7, .. }), "{e}");
        assert!(e.to_string().contains("injected"), "{e}");
        let mid = vec![read(&a), read(&b)];
        assert!(mid != before && mid != want, "the apply stopped half way");
        let r = crate::disk::redo::recover(dir.path()).unwrap();
        assert!(
            matches!(
                r,
                crate::disk::redo::Recovered::Replayed {
                    epoch: 7,
                    records: 3,
                    ops: 6,
                    ..
                }
            ),
            "{r:?}"
        );
        assert!(
            vec![read(&a), read(&b)] == want,
            "the disks are exactly as after epoch 7"
        );
        assert_eq!(
            crate::disk::redo::recover(dir.path()).unwrap(),
            crate::disk::redo::Recovered::Nothing,
            "the log is cleared after the replay"
        );
    }

    /// A seal that fails (the log's file system is full) leaves the disks
    /// untouched and no sealed log: the epoch is rejected whole.
    #[test]
    fn a_seal_that_fails_changes_no_disk() {
        let Some(fs) = SmallFs::mount_or_skip(64 << 10) else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let a = DiskImage::create(&dir.path().join("a.img"), 1 << 20).unwrap();
        a.write_at(&[1; 4096], 0).unwrap();
        let before = read(&a);
        let mut redo = Redo::create(fs.0.path(), vec!["a.img".into()]).unwrap();
        let mut st = Staging::new(64 << 20, dir.path());
        st.stage(&payload(0, &[w(0, 2, 512 << 10)]), None, &[a.size()])
            .unwrap();
        let e = st.seal(&mut redo, 3).unwrap_err().to_string();
        assert!(e.contains("redo log") && e.contains("writing"), "{e}");
        assert!(read(&a) == before, "no byte of the epoch reached the disk");
        assert_eq!(
            crate::disk::redo::recover(fs.0.path()).unwrap(),
            crate::disk::redo::Recovered::Nothing
        );
    }

    /// Consecutive writes of adjacent ranges are written with one
    /// `pwritev`; the disk ends as the ops applied one by one would leave
    /// it, and an error inside such a run is completed exactly by the
    /// replay.
    #[test]
    fn adjacent_writes_go_out_together_and_a_replay_completes_them_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let a = DiskImage::create(&dir.path().join("a.img"), 1 << 20).unwrap();
        a.write_at(&[1; 300 << 10], 0).unwrap();
        let sizes = [a.size()];
        let mut redo = Redo::create(dir.path(), vec!["a.img".into()]).unwrap();
        // A run of 64 adjacent 4 KiB writes, one elsewhere, a run of two,
        // and a write inside the first run again (its own op, after it).
        let mut ops: Vec<DiskOp> = (0..64u64)
            .map(|i| w(i * 4096, 2 + (i % 7) as u8, 4096))
            .collect();
        ops.extend([
            w(600 << 10, 9, 100),
            w(700 << 10, 10, 4096),
            w((700 << 10) + 4096, 11, 4096),
            w(5000, 12, 3000),
        ]);
        let mut want = read(&a);
        for op in &ops {
            if let DiskOp::Write { offset, data } = op {
                want[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            }
        }
        let mut st = Staging::new(64 << 20, dir.path());
        st.stage(&payload(0, &ops), None, &sizes).unwrap();
        st.seal(&mut redo, 5).unwrap();
        let got = st.apply_sealed(&[&a], &mut redo, 5).unwrap();
        assert_eq!((got.ops, got.runs), (68, 4), "ops, and the pwritevs");
        assert_eq!(got.write_bytes, 64 * 4096 + 100 + 2 * 4096 + 3000);
        assert!(read(&a) == want, "the disk as the ops one by one leave it");

        // An EIO before the second op of a run of overlapping writes: the
        // first op is written, and the replay leaves exactly the disk
        // after epoch 6.
        let ops: Vec<DiskOp> = (0..16u64)
            .map(|i| w(i * 2048, 0x20 + i as u8, 4096))
            .collect();
        let epoch6 = |st: &mut Staging, sizes: &[u64]| {
            st.stage(&payload(0, &ops), None, sizes).unwrap();
        };
        let want = committed_copy(dir.path(), &[&a], epoch6);
        let mut st = Staging::new(64 << 20, dir.path()).with_fault(Fault::eio_at(1));
        epoch6(&mut st, &sizes);
        st.seal(&mut redo, 6).unwrap();
        let e = st.apply_sealed(&[&a], &mut redo, 6).unwrap_err();
        assert!(matches!(e, StageError::Unapplied { epoch: 6, .. }), "{e}");
        assert!(read(&a) != want[0], "half applied");
        crate::disk::redo::recover(dir.path()).unwrap();
        assert!(read(&a) == want[0], "the disk is exactly as after epoch 6");
    }

    /// An epoch that spilled: its log holds the payloads in memory and the
    /// spilled ones (copied from the spill file), in staging order; a
    /// backup killed before the apply replays exactly that epoch.
    #[test]
    fn a_spilled_epoch_is_logged_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = DiskImage::create(&dir.path().join("a.img"), 1 << 20).unwrap();
        let epoch = |st: &mut Staging, sizes: &[u64], flush: bool| {
            for i in 0..40u64 {
                let mut ops = vec![w(i * 1000, i as u8, 5000)];
                ops.extend(flush.then_some(DiskOp::Flush));
                st.stage(&payload(0, &ops), None, sizes).unwrap();
            }
        };
        let want = committed_copy(dir.path(), &[&a], |st, s| epoch(st, s, false));
        for durable in [false, true] {
            let fresh = DiskImage::create(&dir.path().join("a.img"), 1 << 20).unwrap();
            let mut redo = Redo::create(dir.path(), vec!["a.img".into()]).unwrap();
            let mut st = Staging::new(50_000, dir.path());
            epoch(&mut st, &[fresh.size()], durable);
            assert!(st.spilled() > 0 && st.in_memory() > 0, "both kinds");
            st.seal(&mut redo, 9).unwrap();
            drop((st, redo)); // killed before the apply
            assert!(read(&fresh).iter().all(|&x| x == 0), "nothing applied");
            let r = crate::disk::redo::recover(dir.path()).unwrap();
            assert!(
                matches!(
                    r,
                    crate::disk::redo::Recovered::Replayed { records: 40, .. }
                ),
                "{r:?}"
            );
            assert!(read(&fresh) == want[0], "durable {durable}");
        }
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
        s.commit(&[&a]).unwrap();
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
        let got = s.commit(&[&a, &b]).unwrap();
        assert_eq!(
            got,
            Applied {
                ops: 4,
                write_bytes: 64 + 4096 + 10,
                runs: 3,
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
        let got = s.commit(&[&a]).unwrap();
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
        let got = s.commit(&[&a]).unwrap();
        assert!(!got.synced, "no flush in the epoch");
        let r = read(&a);
        assert!(r[..10].iter().all(|&x| x == 0));
        assert!(r[10..4096].iter().all(|&x| x == 5));
        assert!(r[4096..].iter().all(|&x| x == 0));
    }
}

/// The backup's commit in isolation, in thread CPU time (steadier than
/// throughput on a shared machine). A measurement, not a check, so
/// ignored: `cargo test --release --lib disk::stage::bench -- --ignored
/// --nocapture`.
#[cfg(test)]
mod bench {
    use super::*;
    use crate::disk::wire::{encode, DiskOp};
    use std::time::Duration;

    fn thread_cpu() -> Duration {
        crate::metrics::thread_cpu_time().expect("clock_gettime(CLOCK_THREAD_CPUTIME_ID)")
    }

    /// One replica image with its redo log and staging, and the commit CPU
    /// it took.
    struct Side {
        _dir: tempfile::TempDir,
        img: DiskImage,
        redo: Redo,
        st: Staging,
        cpu: Duration,
        /// Of `cpu`, the seal (writing the redo log).
        seal: Duration,
    }

    fn side() -> Side {
        let dir = tempfile::tempdir().unwrap();
        let img = DiskImage::create(&dir.path().join("d.img"), 64 << 20).unwrap();
        // As the backup's replica images (`disk::session`).
        let _ = img.advise_random();
        let redo = Redo::create(dir.path(), vec!["d.img".into()]).unwrap();
        let st = Staging::new(256 << 20, dir.path());
        Side {
            _dir: dir,
            img,
            redo,
            st,
            cpu: Duration::ZERO,
            seal: Duration::ZERO,
        }
    }

    /// An epoch's blocks: `n` of the 64 MiB image's 16384 in random order
    /// (fio's random map: each block once per pass), the same set in
    /// ascending order, or `n` consecutive blocks.
    fn blocks(pattern: &str, e: usize, n: usize, order: &[u64]) -> Vec<u64> {
        let at = (e * n) % (order.len() - n);
        match pattern {
            "random" => order[at..at + n].to_vec(),
            "ascending" => {
                let mut b = order[at..at + n].to_vec();
                b.sort_unstable();
                b
            }
            _ => (at as u64..(at + n) as u64).collect(),
        }
    }

    /// Epochs of 1900 4 KiB writes (fio's 300 MiB/s in 25 ms), staged in
    /// records of 256 ops and committed through the redo log (seal and
    /// apply), for each pattern: CPU ms per MiB of the commit.
    #[test]
    #[ignore]
    fn commit_cost_of_4k_epochs() {
        let (n, epochs, warm) = (1900, 100, 20);
        let mut s = 0x9e3779b97f4a7c15u64;
        let mut order: Vec<u64> = (0..(64u64 << 20) / 4096).collect();
        for i in (1..order.len()).rev() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            order.swap(i, (s % (i as u64 + 1)) as usize);
        }
        let patterns = ["random", "ascending", "sequential"];
        let mut sides: Vec<Side> = patterns.iter().map(|_| side()).collect();
        for e in 0..epochs {
            for (k, sd) in sides.iter_mut().enumerate() {
                let ops: Vec<DiskOp> = blocks(patterns[k], e, n, &order)
                    .iter()
                    .map(|&b| DiskOp::Write {
                        offset: b * 4096,
                        data: vec![e as u8; 4096],
                    })
                    .collect();
                let sizes = [sd.img.size()];
                for c in ops.chunks(256) {
                    let mut p = Vec::new();
                    encode(&mut p, 0, c);
                    sd.st.stage(&p, None, &sizes).unwrap();
                }
                let t0 = thread_cpu();
                sd.st.seal(&mut sd.redo, e as u64 + 2).unwrap();
                let t1 = thread_cpu();
                sd.st
                    .apply_sealed(&[&sd.img], &mut sd.redo, e as u64 + 2)
                    .unwrap();
                if e >= warm {
                    sd.cpu += thread_cpu() - t0;
                    sd.seal += t1 - t0;
                }
            }
        }
        let mib = ((epochs - warm) * n * 4096) as f64 / (1 << 20) as f64;
        for (p, sd) in patterns.iter().zip(&sides) {
            println!(
                "{p}: commit {:.3} ms CPU per MiB (seal {:.3})",
                sd.cpu.as_secs_f64() * 1e3 / mib,
                sd.seal.as_secs_f64() * 1e3 / mib
            );
        }
    }
}
