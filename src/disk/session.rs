//! The disks of one replication session, on each side.
//!
//! Primary: a [`PrimaryDisks`] holds every protected disk's [`WriteLog`];
//! the epoch driver cuts all of them in the pause ([`PrimaryDisks::cut`]),
//! the sender encodes what it got into `DiskWrites` payloads. Backup: a
//! [`BackupDisks`] is built from the primary's `Disks` announcement, owns
//! the replica images (`STATE_DIR/disks/NAME.img`) and the staging of the
//! open epoch.
//!
//! `Disks` payload (sent once, before the seed):
//!
//! ```text
//! count u16 · count × (size u64 · name_len u8 · name [name_len] · nbd_len u8 · nbd [nbd_len])
//! ```
//!
//! `nbd` is the address the primary serves the disk at (`HOST:PORT` or
//! `unix:PATH`, empty for a domain's own disk): an activated backup serves
//! its replica disk at the same kind of export.
//!
//! `count <= MAX_DISKS`; a name is 1..=64 bytes of `[A-Za-z0-9_.-]`, not
//! starting with `.`, unique (it becomes a file name on the backup);
//! `1 <= size <= MAX_DISK_SIZE`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fault::Fault;
use super::image::{DiskImage, ImageError};
use super::log::{EpochOps, WriteLog};
use super::redo::{recover, Recovered, Redo, RedoError};
use super::stage::{Applied, StageError, Staging};
use super::wire::{self, OpRef};
use crate::transport::record::{Cursor, PayloadError};
use crate::transport::recv_buf::Held;

pub const MAX_DISKS: usize = 16;
/// Largest disk a backup accepts (16 TiB).
pub const MAX_DISK_SIZE: u64 = 16 << 40;
/// Longest the seed's disk scan goes without emitting a payload.
pub const SEED_KEEPALIVE: Duration = Duration::from_millis(100);
/// Disk bytes staged in memory per epoch before the backup spills to a
/// file: the primary's default log bound (`LogConfig::max_queued`), so an
/// epoch the primary let through never costs the backup a spill.
pub const STAGE_MEMORY: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("disk announcement: {0}")]
    Payload(#[from] PayloadError),
    #[error("disk announcement: {0}")]
    Invalid(String),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Stage(#[from] StageError),
    #[error(transparent)]
    Wire(#[from] wire::DiskWireError),
    #[error("the replica disks' redo log: {0}")]
    Redo(#[from] RedoError),
    #[error("the redo log of rejected epoch {0} could not be undone (see the error that ended the session): no replica is saved from these disks")]
    Unsound(u64),
    #[error("applying epoch {epoch}'s disk writes, which were not sealed (sealed: {sealed:?})")]
    NotSealed { epoch: u64, sealed: Option<u64> },
}

/// Completes an apply a stopped backup (or a failed apply) left half done
/// in `dir` (the replica's `disks/`) by replaying its sealed redo log,
/// saying so; see [`super::redo`].
pub fn recover_disks(dir: &Path) -> Result<Recovered, SessionError> {
    let r = recover(dir)?;
    report_recovery(dir, r.clone());
    Ok(r)
}

fn report_recovery(dir: &Path, r: Recovered) {
    match r {
        Recovered::Nothing => {}
        Recovered::Replayed {
            epoch,
            records,
            ops,
            bytes,
        } => eprintln!(
            "castor backup: the disks in {} were half way through epoch {epoch}: replayed its redo log ({records} records, {ops} operations, {bytes} bytes written); they are at epoch {epoch}",
            dir.display(),
        ),
        Recovered::Untrusted { epoch } => eprintln!(
            "castor backup: WARNING: the disks in {} were half way through epoch {epoch} (an epoch without a flush) when this host restarted; its redo log was not synced, so they may mix epochs {} and {epoch}",
            dir.display(),
            epoch - 1
        ),
    }
}

/// A disk as announced: name and size.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskSpec {
    pub name: String,
    pub size: u64,
    /// Where the primary serves it over NBD ("" = not served).
    pub nbd: String,
}

/// Checks a disk name (it names a file on the backup).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "disk name {name:?}: use 1-64 characters of A-Z a-z 0-9 _ . - (not starting with .)"
        ))
    }
}

pub fn encode_announce(disks: &[DiskSpec]) -> Vec<u8> {
    let mut p = (disks.len() as u16).to_le_bytes().to_vec();
    for d in disks {
        p.extend_from_slice(&d.size.to_le_bytes());
        p.push(d.name.len() as u8);
        p.extend_from_slice(d.name.as_bytes());
        let nbd = &d.nbd.as_bytes()[..d.nbd.len().min(255)];
        p.push(nbd.len() as u8);
        p.extend_from_slice(nbd);
    }
    p
}

pub fn decode_announce(p: &[u8]) -> Result<Vec<DiskSpec>, SessionError> {
    let mut c = Cursor::new(p, "disks");
    let n = c.u16()? as usize;
    if n == 0 || n > MAX_DISKS {
        return Err(SessionError::Invalid(format!(
            "{n} disks, expected 1..={MAX_DISKS}"
        )));
    }
    let mut out: Vec<DiskSpec> = Vec::with_capacity(n);
    for _ in 0..n {
        let size = c.u64()?;
        let len = c.u8()? as usize;
        let name = std::str::from_utf8(c.bytes(len)?)
            .map_err(|_| SessionError::Invalid("disk name is not UTF-8".into()))?
            .to_string();
        check_name(&name).map_err(SessionError::Invalid)?;
        let nlen = c.u8()? as usize;
        let nbd = std::str::from_utf8(c.bytes(nlen)?)
            .map_err(|_| SessionError::Invalid(format!("disk {name:?}: NBD address is not UTF-8")))?
            .to_string();
        if !nbd.is_empty() {
            nbd.parse::<super::addr::NbdAddr>()
                .map_err(|e| SessionError::Invalid(e.to_string()))?;
        }
        if size == 0 || size > MAX_DISK_SIZE {
            return Err(SessionError::Invalid(format!(
                "disk {name:?} of {size} bytes, expected 1..={MAX_DISK_SIZE}"
            )));
        }
        if out.iter().any(|d| d.name == name) {
            return Err(SessionError::Invalid(format!("disk name {name:?} twice")));
        }
        out.push(DiskSpec { name, size, nbd });
    }
    c.finish()?;
    Ok(out)
}

/// The primary's protected disks, in announcement order (index = wire disk).
#[derive(Debug, Clone, Default)]
pub struct PrimaryDisks {
    pub disks: Vec<(String, Arc<WriteLog>)>,
    /// NBD address per disk name, for the announcement.
    pub nbd: Vec<(String, String)>,
}

/// The writes one pause cut, per disk index.
pub type EpochDisks = Vec<(u16, EpochOps)>;

impl PrimaryDisks {
    pub fn is_empty(&self) -> bool {
        self.disks.is_empty()
    }

    pub fn specs(&self) -> Vec<DiskSpec> {
        self.disks
            .iter()
            .map(|(name, log)| DiskSpec {
                name: name.clone(),
                size: log.size(),
                nbd: self
                    .nbd
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, a)| a.clone())
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// The disks' image files, by name (for digests).
    pub fn files(&self) -> Vec<(String, PathBuf)> {
        self.disks
            .iter()
            .map(|(n, l)| (n.clone(), l.image().path().to_path_buf()))
            .collect()
    }

    /// Starts logging: writes from now on travel in checkpoint `first`.
    pub fn start(&self, first: u64) {
        for (_, l) in &self.disks {
            l.start_recording(first);
        }
    }

    /// Ends checkpoint `epoch`'s writes: inside its pause, never blocks
    /// (see [`WriteLog::mark`]); [`Self::collect`] them after it.
    pub fn mark(&self, epoch: u64) {
        for (_, l) in &self.disks {
            l.mark(epoch + 1);
        }
    }

    /// The writes of checkpoint `epoch` (and of any earlier one not
    /// collected), once [`Self::mark`]ed; may wait for a write being
    /// applied, so not inside the pause.
    pub fn collect(&self, epoch: u64) -> EpochDisks {
        self.disks
            .iter()
            .enumerate()
            .map(|(i, (_, l))| (i as u16, l.collect(epoch)))
            .filter(|(_, o)| !o.is_empty())
            .collect()
    }

    /// [`Self::mark`] and [`Self::collect`] at once (outside a pause).
    pub fn cut(&self, epoch: u64) -> EpochDisks {
        self.mark(epoch);
        self.collect(epoch)
    }

    /// Stops logging (end of the session); writes go on reaching the images.
    pub fn stop(&self) {
        for (_, l) in &self.disks {
            l.stop_recording();
        }
    }

    /// Calls `emit` with seed payloads carrying every non-zero `chunk`-sized
    /// region of every disk, read now. Writes logged since [`Self::start`]
    /// are sent again in the first checkpoint, so a region read before a
    /// concurrent write ends up right.
    ///
    /// Holes are skipped without reading (`SEEK_DATA`). A scan that finds
    /// nothing to send for [`SEED_KEEPALIVE`] (a large disk of written
    /// zeros) emits an empty payload, so the stream never falls silent
    /// long enough for the backup to declare the primary dead.
    pub fn seed_payloads(
        &self,
        chunk: usize,
        mut emit: impl FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<u64, String> {
        let mut buf = vec![0u8; chunk];
        let mut payload = Vec::with_capacity(chunk + 64);
        let mut bytes = 0;
        let mut last_emit = Instant::now();
        for (i, (_, log)) in self.disks.iter().enumerate() {
            let size = log.size();
            let mut at = 0u64;
            while at < size {
                if last_emit.elapsed() >= SEED_KEEPALIVE {
                    payload.clear();
                    wire::encode(&mut payload, i as u16, &[]);
                    emit(&payload)?;
                    last_emit = Instant::now();
                }
                let Some(data) = log.image().next_data(at).map_err(|e| e.to_string())? else {
                    break;
                };
                at = data - data % chunk as u64;
                let n = (size - at).min(chunk as u64) as usize;
                log.read(&mut buf[..n], at).map_err(|e| e.to_string())?;
                if buf[..n].iter().any(|&b| b != 0) {
                    payload.clear();
                    let op = wire::DiskOp::Write {
                        offset: at,
                        data: buf[..n].to_vec(),
                    };
                    wire::encode(&mut payload, i as u16, std::slice::from_ref(&op));
                    emit(&payload)?;
                    last_emit = Instant::now();
                    bytes += n as u64;
                }
                at += n as u64;
            }
        }
        Ok(bytes)
    }
}

/// Where the backup keeps disk `name` of the replica in `state_dir`.
pub fn replica_disk_path(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("disks").join(format!("{name}.img"))
}

/// Where a session's disk lives until its first checkpoint commits: the
/// replica of an earlier session keeps its disk meanwhile.
fn seeding_path(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("disks").join(format!(".{name}.img.seeding"))
}

/// The backup's replica disks and the open epoch's staging.
///
/// Invariant: `STATE_DIR/disks/NAME.img` only ever holds a committed
/// checkpoint's disk (of this session once its first checkpoint
/// committed, else of an earlier one): the seed is written to a
/// `.NAME.img.seeding` file, renamed over it at the first commit.
#[derive(Debug)]
pub struct BackupDisks {
    state_dir: PathBuf,
    specs: Vec<DiskSpec>,
    images: Vec<DiskImage>,
    sizes: Vec<u64>,
    staging: Staging,
    /// The redo log of commits after the first ([`super::redo`]).
    redo: Redo,
    promoted: bool,
    /// The epoch sealed in [`BackupDisks::redo`] and not yet applied.
    sealed: Option<u64>,
    /// What the first commit applied ([`BackupDisks::seal`] applies it),
    /// until [`BackupDisks::apply`] hands it over.
    first: Option<Applied>,
    /// A rejected epoch whose sealed log could not be undone
    /// ([`StageError::Abandoned`]): a replay would take the disks past
    /// the replica's memory, so nothing is saved from them.
    unsound: Option<u64>,
}

impl BackupDisks {
    /// Creates fresh, all-zero images for `specs` (the seed fills them),
    /// first completing an apply a stopped backup left half done.
    pub fn create(state_dir: &Path, specs: Vec<DiskSpec>) -> Result<BackupDisks, SessionError> {
        let dir = state_dir.join("disks");
        std::fs::create_dir_all(&dir).map_err(|source| {
            SessionError::Image(ImageError::Io {
                op: "creating the directory of",
                path: dir.clone(),
                source,
            })
        })?;
        recover_disks(&dir)?;
        let fault = Fault::from_env().map_err(SessionError::Invalid)?;
        let names = specs.iter().map(|s| format!("{}.img", s.name)).collect();
        let redo = Redo::create(&dir, names)?;
        let mut images = Vec::with_capacity(specs.len());
        for s in &specs {
            let img = DiskImage::create(&seeding_path(state_dir, &s.name), s.size)?;
            if let Err(e) = img.advise_random() {
                tracing::warn!("{e} (read-ahead stays on)");
            }
            images.push(img);
        }
        Ok(BackupDisks {
            state_dir: state_dir.to_path_buf(),
            sizes: specs.iter().map(|s| s.size).collect(),
            specs,
            images,
            staging: Staging::new(STAGE_MEMORY, &dir).with_fault(fault),
            redo,
            promoted: false,
            sealed: None,
            first: None,
            unsound: None,
        })
    }

    /// The images' final paths, by name.
    pub fn paths(&self) -> Vec<(String, PathBuf)> {
        self.specs
            .iter()
            .map(|s| (s.name.clone(), replica_disk_path(&self.state_dir, &s.name)))
            .collect()
    }

    pub fn specs(&self) -> &[DiskSpec] {
        &self.specs
    }

    pub fn images(&self) -> &[DiskImage] {
        &self.images
    }

    /// Seed payload: validated whole, then written in place (the replica
    /// holds no committed checkpoint yet).
    pub fn apply_seed(&mut self, payload: &[u8]) -> Result<(), SessionError> {
        let (disk, ops) = wire::parse(payload, &self.sizes)?;
        let img = &self.images[disk as usize];
        for op in ops {
            match op {
                OpRef::Write { offset, data } => img.write_at(data, offset)?,
                OpRef::Zero { offset, len } => img.zero(offset, len)?,
                OpRef::Flush => {}
            }
        }
        Ok(())
    }

    /// Checkpoint payload: validated whole and staged.
    pub fn stage(&mut self, payload: &[u8], held: Option<Held>) -> Result<(), SessionError> {
        Ok(self.staging.stage(payload, held, &self.sizes)?)
    }

    /// `DiskWrites` records staged in the open epoch.
    pub fn staged_records(&self) -> u32 {
        self.staging.records()
    }

    /// Commits the open epoch `epoch`'s disk writes, before its memory
    /// commit: seals them in the redo log (nothing applied yet; an error
    /// leaves the disks untouched and the epoch must be rejected). The
    /// first commit has no log: it applies the writes to the seeding
    /// images and moves them to their final names (until then they
    /// replace nothing), all or nothing. [`BackupDisks::apply`] follows.
    pub fn seal(&mut self, epoch: u64) -> Result<(), SessionError> {
        if self.promoted {
            let r = self.staging.seal(&mut self.redo, epoch);
            if let Err(StageError::Abandoned { .. }) = r {
                self.unsound = Some(epoch);
            }
            r?;
            self.sealed = Some(epoch);
            return Ok(());
        }
        let imgs: Vec<&DiskImage> = self.images.iter().collect();
        let applied = self.staging.commit(&imgs)?;
        for (img, s) in self.images.iter_mut().zip(&self.specs) {
            img.sync()?;
            img.rename_to(&replica_disk_path(&self.state_dir, &s.name))?;
        }
        self.promoted = true;
        self.first = Some(applied);
        Ok(())
    }

    /// Applies the epoch [`BackupDisks::seal`] sealed (after its memory
    /// commit, before its ack). On error the log stays sealed: the save
    /// or the next start replays it ([`recover_disks`]).
    pub fn apply(&mut self, epoch: u64) -> Result<Applied, SessionError> {
        if let Some(a) = self.first.take() {
            return Ok(a);
        }
        let sealed = self.sealed.take();
        if sealed != Some(epoch) {
            return Err(SessionError::NotSealed { epoch, sealed });
        }
        let imgs: Vec<&DiskImage> = self.images.iter().collect();
        Ok(self.staging.apply_sealed(&imgs, &mut self.redo, epoch)?)
    }

    /// [`BackupDisks::seal`] then [`BackupDisks::apply`] (the receiver
    /// commits the memory between the two).
    #[cfg(test)]
    pub fn commit(&mut self, epoch: u64) -> Result<Applied, SessionError> {
        self.seal(epoch)?;
        self.apply(epoch)
    }

    pub fn discard(&mut self) {
        self.staging.discard();
    }

    /// Refuses (with [`SessionError::Unsound`]) when a rejected epoch's
    /// redo log could not be undone: the disks must not be saved.
    pub fn check_sound(&self) -> Result<(), SessionError> {
        self.unsound
            .map_or(Ok(()), |e| Err(SessionError::Unsound(e)))
    }

    /// Makes every image durable (when the replica is saved).
    pub fn sync(&self) -> Result<(), SessionError> {
        for i in &self.images {
            i.sync()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{Fence, LogConfig};

    #[test]
    fn announcements_round_trip_and_hostile_ones_are_refused() {
        let d = vec![
            DiskSpec {
                name: "data".into(),
                size: 1 << 20,
                nbd: "127.0.0.1:1".into(),
            },
            DiskSpec {
                name: "kvm-block".into(),
                size: 512,
                nbd: String::new(),
            },
        ];
        assert_eq!(decode_announce(&encode_announce(&d)).unwrap(), d);
        let one = |name: &str, size: u64| {
            encode_announce(&[DiskSpec {
                name: name.into(),
                size,
                nbd: String::new(),
            }])
        };
        for (p, what) in [
            (one("../etc", 1), "disk name"),
            (one(".hidden", 1), "disk name"),
            (one("a/b", 1), "disk name"),
            (one("", 1), "disk name"),
            (one("x", 0), "bytes"),
            (one("x", u64::MAX), "bytes"),
            (encode_announce(&[]), "0 disks"),
            (
                encode_announce(&[DiskSpec {
                    name: "x".into(),
                    size: 1,
                    nbd: "nope".into(),
                }]),
                "NBD address",
            ),
            (encode_announce(&[d[0].clone(), d[0].clone()]), "twice"),
        ] {
            let e = decode_announce(&p).unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        }
        let mut p = encode_announce(&d);
        p.push(0);
        assert!(decode_announce(&p).is_err(), "trailing byte");
        assert!(decode_announce(&p[..5]).is_err(), "truncated");
    }

    #[test]
    fn seed_then_checkpoints_make_the_replica_equal_the_primary() {
        let dir = tempfile::tempdir().unwrap();
        let img = DiskImage::create(&dir.path().join("p.img"), 64 << 10).unwrap();
        img.write_at(&[1; 5000], 10_000).unwrap();
        let log = Arc::new(WriteLog::new(
            img,
            Arc::new(Fence::open()),
            LogConfig::default(),
        ));
        let prim = PrimaryDisks {
            disks: vec![("data".into(), log.clone())],
            nbd: Vec::new(),
        };
        prim.start(1);
        // A write before the seed reads the image, and one after.
        log.write(0, &[2; 100], false).unwrap();
        let mut seed = Vec::new();
        let n = prim
            .seed_payloads(4096, |p| {
                seed.push(p.to_vec());
                Ok(())
            })
            .unwrap();
        assert_eq!(n, 3 * 4096, "only the non-zero chunks");
        log.write(12_000, &[3; 10], true).unwrap();

        let state = tempfile::tempdir().unwrap();
        let specs = decode_announce(&encode_announce(&prim.specs())).unwrap();
        let mut back = BackupDisks::create(state.path(), specs).unwrap();
        for p in &seed {
            back.apply_seed(p).unwrap();
        }
        let cut = prim.cut(1);
        assert_eq!(cut[0].1.epoch, 1);
        for (_, e) in &cut {
            for p in e.payloads() {
                back.stage(&p, None).unwrap();
            }
        }
        assert!(
            !replica_disk_path(state.path(), "data").exists(),
            "not before a commit"
        );
        let before = std::fs::read(seeding_path(state.path(), "data")).unwrap();
        assert_eq!(&before[12_000..12_010], &[1; 10], "staged, not yet applied");
        let a = back.commit(1).unwrap();
        assert!(a.synced, "the FUA write asks for a flush");
        let p = std::fs::read(dir.path().join("p.img")).unwrap();
        let b = std::fs::read(replica_disk_path(state.path(), "data")).unwrap();
        assert_eq!(p, b);
    }

    /// The backup's replica images are read without read-ahead (see
    /// [`DiskImage::advise_random`]): reading blocks in a row caches those
    /// blocks alone.
    #[test]
    fn the_backups_images_have_read_ahead_off() {
        use crate::disk::image::cache;
        let state = tempfile::tempdir().unwrap();
        let control = DiskImage::create(&state.path().join("c.img"), 64 << 20).unwrap();
        let ahead = cache::after_sequential_reads(&control, 16);
        if ahead <= 16 {
            eprintln!(
                "skipped: no read-ahead on this file system ({ahead} pages cached for 16 read)"
            );
            return;
        }
        let specs = vec![DiskSpec {
            name: "data".into(),
            size: 64 << 20,
            nbd: String::new(),
        }];
        let back = BackupDisks::create(state.path(), specs).unwrap();
        assert_eq!(
            cache::after_sequential_reads(&back.images()[0], 16),
            16,
            "without the advice: {ahead}"
        );
    }
}
