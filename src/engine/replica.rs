//! The committed replica on disk (`--state-dir`), replaced as a set.
//!
//! ```text
//! STATE_DIR/
//!   current -> v00000000000000000042-5f3a…    symlink naming the complete replica
//!   v00000000000000000042-5f3a…/
//!     memory.img   raw guest memory, page 0 first (sparse: zero pages are holes)
//!     state.bin    saved vCPU/device state of the committed epoch
//!     meta.json    {"format":"castor-replica-v1","epoch":E,"pages":P,"page_size":4096,
//!                   "domain":"sim:...","digest":"<hex>","memory_bytes":…,"state_bytes":…}
//!     disks/       disk images of the epoch, when the domain has disks
//!   disks/NAME.img  the backup's working disks (`crate::disk`): written at
//!                   each commit, copied into the version when it is saved
//! ```
//!
//! meta.json lists the disks (`"disks":[{"name":…,"size":…,"nbd":…}]`) and
//! its digest covers them (see [`crate::digest`]).
//!
//! A save never touches the replica `current` names. It writes a whole new
//! version under a temporary name (`.tmp-v…`), syncs every file and the
//! version directory, renames it to its final name, syncs STATE_DIR, then
//! points a fresh symlink at it and renames that symlink over `current`
//! (rename is atomic), and syncs STATE_DIR again. Only then are older
//! versions removed. A crash at any point therefore leaves `current`
//! naming either the old or the new complete replica, never neither and
//! never a mix; leftovers of an interrupted save are removed by the next one.
//!
//! Readers ([`verify`], [`read_meta`], [`version_dir`]) follow `current`. A
//! directory written by an older castor (the three files directly in
//! STATE_DIR, no `current`) is still read; the next save replaces it.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::PAGE_SIZE;

pub const FORMAT: &str = "castor-replica-v1";
/// The symlink naming the complete replica.
pub const CURRENT: &str = "current";
/// Where a version keeps its disk images.
pub const DISKS: &str = "disks";
const TMP_PREFIX: &str = ".tmp-";
const CURRENT_TMP: &str = ".current.tmp";
const LEGACY_FILES: [&str; 3] = ["memory.img", "state.bin", "meta.json"];

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a castor replica: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    pub format: String,
    pub epoch: u64,
    pub pages: u64,
    pub page_size: u32,
    pub domain: String,
    pub digest: String,
    pub memory_bytes: u64,
    pub state_bytes: u64,
    /// The replica's disks (`disks/NAME.img` in the version), if any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<crate::disk::session::DiskSpec>,
    /// The protection session that produced the replica (the primary's
    /// handshake nonce, hex): the name the arbiter's heir record must carry
    /// for the replica to be activated ([`crate::ha::heir`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

/// One step of a save, in order; [`save_with`]'s hook runs before each, so
/// tests can fail any of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    CreateVersion,
    WriteMemory,
    WriteState,
    WriteDisks,
    WriteMeta,
    SyncFiles,
    SyncVersionDir,
    RenameVersion,
    SyncStateDirAfterRename,
    LinkCurrent,
    SwitchCurrent,
    SyncStateDirAfterSwitch,
    RemoveOld,
}

impl Step {
    pub const ALL: [Step; 13] = [
        Step::CreateVersion,
        Step::WriteMemory,
        Step::WriteState,
        Step::WriteDisks,
        Step::WriteMeta,
        Step::SyncFiles,
        Step::SyncVersionDir,
        Step::RenameVersion,
        Step::SyncStateDirAfterRename,
        Step::LinkCurrent,
        Step::SwitchCurrent,
        Step::SyncStateDirAfterSwitch,
        Step::RemoveOld,
    ];
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ReplicaError + 'a {
    move |source| ReplicaError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What a save writes besides memory and state: fills the version's
/// `disks/` directory (already created) with the epoch's disk images.
/// Every regular file it leaves there is synced and switched with the rest.
pub type DiskWriter<'a> = &'a mut dyn FnMut(&Path) -> io::Result<()>;

/// Runs before each [`Step`]; an error fails the save at that step.
pub type StepHook<'a> = &'a mut dyn FnMut(Step) -> io::Result<()>;

/// Saves a committed replica (no disks). `memory` must not change during
/// the call.
pub fn save(
    dir: &Path,
    memory: &[u8],
    state: &[u8],
    epoch: u64,
    domain: &str,
) -> Result<Meta, ReplicaError> {
    save_with(dir, memory, state, epoch, domain, None, &mut |_| Ok(()))
}

/// [`save`] with the epoch's disk images (`disks`) and a hook run before
/// every step (error injection in tests; `&mut |_| Ok(())` otherwise).
pub fn save_with(
    dir: &Path,
    memory: &[u8],
    state: &[u8],
    epoch: u64,
    domain: &str,
    disks: Option<DiskWriter<'_>>,
    hook: StepHook<'_>,
) -> Result<Meta, ReplicaError> {
    let meta = Meta::describe(
        memory,
        state,
        (epoch, domain),
        Digest::of(memory, state),
        &[],
    );
    save_version(dir, memory, state, meta, disks, hook)
}

impl Meta {
    /// The metadata of a replica of `memory`, `state` and `disks` at
    /// `epoch`, whose digest (over all of them) is `digest`.
    fn describe(
        memory: &[u8],
        state: &[u8],
        (epoch, domain): (u64, &str),
        digest: Digest,
        disks: &[crate::disk::session::DiskSpec],
    ) -> Meta {
        Meta {
            format: FORMAT.into(),
            epoch,
            pages: (memory.len() / PAGE_SIZE) as u64,
            page_size: PAGE_SIZE as u32,
            domain: domain.into(),
            digest: digest.to_hex(),
            memory_bytes: memory.len() as u64,
            state_bytes: state.len() as u64,
            disks: disks.to_vec(),
            session: None,
        }
    }
}

/// Where the working disk `name` of the replica in `dir` lives.
pub fn disk_path(dir: &Path, name: &str) -> PathBuf {
    crate::disk::session::replica_disk_path(dir, name)
}

/// [`save`] of a replica with disks: the images at [`disk_path`]`(from, …)`
/// (at the same epoch as `memory`) are copied into the new version, and
/// the digest covers them. `session` names the protection session the
/// replica came from, if any.
pub fn save_with_disks(
    dir: &Path,
    memory: &[u8],
    state: &[u8],
    (epoch, domain, session): (u64, &str, Option<&str>),
    disks: &[crate::disk::session::DiskSpec],
    from: &Path,
) -> Result<Meta, ReplicaError> {
    if disks.is_empty() {
        let mut meta = Meta::describe(
            memory,
            state,
            (epoch, domain),
            Digest::of(memory, state),
            &[],
        );
        meta.session = session.map(String::from);
        return save_version(dir, memory, state, meta, None, &mut |_| Ok(()));
    }
    let files: Vec<(String, PathBuf)> = disks
        .iter()
        .map(|d| (d.name.clone(), disk_path(from, &d.name)))
        .collect();
    let digest = Digest::with_disk_files(memory, state, &files)
        .map_err(io_err("reading the disks for the digest in", from))?;
    let mut meta = Meta::describe(memory, state, (epoch, domain), digest, disks);
    meta.session = session.map(String::from);
    let mut copy = |to: &Path| {
        for (name, src) in &files {
            crate::disk::image::copy_sparse(src, &to.join(format!("{name}.img")))?;
        }
        Ok(())
    };
    save_version(dir, memory, state, meta, Some(&mut copy), &mut |_| Ok(()))
}

/// Writes `meta`'s version and makes it current (the steps of [`save_with`]).
fn save_version(
    dir: &Path,
    memory: &[u8],
    state: &[u8],
    meta: Meta,
    disks: Option<DiskWriter<'_>>,
    hook: StepHook<'_>,
) -> Result<Meta, ReplicaError> {
    fs::create_dir_all(dir).map_err(io_err("creating directory", dir))?;
    let epoch = meta.epoch;
    let name = version_name(epoch);
    let tmp = dir.join(format!("{TMP_PREFIX}{name}"));
    write_version(&tmp, memory, state, &meta, disks, hook)?;
    let ver = dir.join(&name);
    run(hook, Step::RenameVersion, &ver)?;
    fs::rename(&tmp, &ver).map_err(io_err("renaming the new version to", &ver))?;
    run(hook, Step::SyncStateDirAfterRename, dir)?;
    sync_dir(dir)?;
    switch_current(dir, &name, hook)?;
    // The new replica is saved and current: failing to tidy up is no
    // failure of the save (the next save retries).
    if let Err(e) = run(hook, Step::RemoveOld, dir).and_then(|()| remove_stale(dir, &name)) {
        tracing::warn!("replica of epoch {epoch} saved, but removing older versions failed: {e}");
    }
    Ok(meta)
}

fn run(hook: StepHook<'_>, step: Step, path: &Path) -> Result<(), ReplicaError> {
    hook(step).map_err(|source| ReplicaError::Io {
        op: "injected failure before",
        path: path.join(format!("{step:?}")),
        source,
    })
}

/// A fresh, unique version name that sorts by epoch.
fn version_name(epoch: u64) -> String {
    let mut r = [0u8; 8];
    if getrandom::getrandom(&mut r).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        r = (t.as_nanos() as u64 ^ std::process::id() as u64).to_le_bytes();
    }
    format!("v{epoch:020}-{:016x}", u64::from_le_bytes(r))
}

fn is_version_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() > 22 && b[0] == b'v' && b[1..21].iter().all(u8::is_ascii_digit) && b[21] == b'-'
}

/// Writes and syncs every file of a version into `tmp`, then `tmp` itself.
fn write_version(
    tmp: &Path,
    memory: &[u8],
    state: &[u8],
    meta: &Meta,
    disks: Option<DiskWriter<'_>>,
    hook: StepHook<'_>,
) -> Result<(), ReplicaError> {
    run(hook, Step::CreateVersion, tmp)?;
    fs::create_dir(tmp).map_err(io_err("creating the new version", tmp))?;
    run(hook, Step::WriteMemory, tmp)?;
    let mut files = vec![write_file(tmp, "memory.img", |f| write_sparse(f, memory))?];
    run(hook, Step::WriteState, tmp)?;
    files.push(write_file(tmp, "state.bin", |mut f| f.write_all(state))?);
    run(hook, Step::WriteDisks, tmp)?;
    if let Some(w) = disks {
        let d = tmp.join(DISKS);
        fs::create_dir(&d).map_err(io_err("creating", &d))?;
        w(&d).map_err(io_err("writing disk images into", &d))?;
        for e in fs::read_dir(&d).map_err(io_err("listing", &d))? {
            let e = e.map_err(io_err("listing", &d))?;
            if e.file_type().map_err(io_err("listing", &d))?.is_file() {
                let p = e.path();
                files.push(File::open(&p).map_err(io_err("opening", &p))?);
            }
        }
        files.push(File::open(&d).map_err(io_err("opening", &d))?);
    }
    run(hook, Step::WriteMeta, tmp)?;
    let json = serde_json::to_vec_pretty(meta).expect("meta serialises");
    files.push(write_file(tmp, "meta.json", |mut f| f.write_all(&json))?);
    run(hook, Step::SyncFiles, tmp)?;
    for f in &files {
        f.sync_all().map_err(io_err("syncing a file of", tmp))?;
    }
    run(hook, Step::SyncVersionDir, tmp)?;
    sync_dir(tmp)
}

fn write_file(
    dir: &Path,
    name: &str,
    f: impl FnOnce(&File) -> io::Result<()>,
) -> Result<File, ReplicaError> {
    let p = dir.join(name);
    let file = File::create(&p).map_err(io_err("creating", &p))?;
    f(&file).map_err(io_err("writing", &p))?;
    Ok(file)
}

/// Writes runs of non-zero pages; zero pages stay holes.
fn write_sparse(f: &File, memory: &[u8]) -> io::Result<()> {
    f.set_len(memory.len() as u64)?;
    let pages = memory.len() / PAGE_SIZE;
    let is_zero = |p: usize| {
        memory[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
            .iter()
            .all(|&b| b == 0)
    };
    let mut i = 0;
    while i < pages {
        if is_zero(i) {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < pages && j - i < 256 && !is_zero(j) {
            j += 1;
        }
        f.write_all_at(
            &memory[i * PAGE_SIZE..j * PAGE_SIZE],
            (i * PAGE_SIZE) as u64,
        )?;
        i = j;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), ReplicaError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing directory", dir))
}

/// Points `current` at version `name`: a fresh symlink renamed over it.
fn switch_current(dir: &Path, name: &str, hook: StepHook<'_>) -> Result<(), ReplicaError> {
    let link = dir.join(CURRENT_TMP);
    run(hook, Step::LinkCurrent, &link)?;
    match fs::remove_file(&link) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("removing", &link)(e)),
    }
    std::os::unix::fs::symlink(name, &link).map_err(io_err("creating symlink", &link))?;
    let cur = dir.join(CURRENT);
    run(hook, Step::SwitchCurrent, &cur)?;
    fs::rename(&link, &cur).map_err(io_err("switching", &cur))?;
    run(hook, Step::SyncStateDirAfterSwitch, dir)?;
    sync_dir(dir)
}

/// Removes everything a save owns in `dir` except version `keep`: older
/// versions, interrupted saves, and an older castor's top-level files.
fn remove_stale(dir: &Path, keep: &str) -> Result<(), ReplicaError> {
    for e in fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let e = e.map_err(io_err("listing", dir))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let p = e.path();
        let r = if (is_version_name(name) && name != keep)
            || name.strip_prefix(TMP_PREFIX).is_some_and(is_version_name)
        {
            fs::remove_dir_all(&p)
        } else if name == CURRENT_TMP
            || LEGACY_FILES.contains(&name)
            || LEGACY_FILES.iter().any(|f| name == format!(".{f}.tmp"))
        {
            fs::remove_file(&p)
        } else {
            continue;
        };
        r.map_err(io_err("removing the stale", &p))?;
    }
    Ok(())
}

/// The directory holding the complete replica of `dir`: the version
/// `current` names, or `dir` itself for an older castor's layout.
pub fn version_dir(dir: &Path) -> Result<PathBuf, ReplicaError> {
    let cur = dir.join(CURRENT);
    match fs::read_link(&cur) {
        Ok(target) => {
            let name = target.to_str().filter(|n| is_version_name(n));
            match name {
                Some(n) => Ok(dir.join(n)),
                None => Err(ReplicaError::Invalid {
                    path: cur,
                    reason: format!("it points to {target:?}, not to a version of this directory"),
                }),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound && dir.join("meta.json").exists() => {
            Ok(dir.to_path_buf())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ReplicaError::Invalid {
            path: dir.to_path_buf(),
            reason: format!("no {CURRENT} (nothing was saved here)"),
        }),
        Err(e) => Err(io_err("reading symlink", &cur)(e)),
    }
}

pub fn read_meta(dir: &Path) -> Result<Meta, ReplicaError> {
    read_meta_in(&version_dir(dir)?)
}

fn read_meta_in(ver: &Path) -> Result<Meta, ReplicaError> {
    let p = ver.join("meta.json");
    let bytes = fs::read(&p).map_err(io_err("reading", &p))?;
    let meta: Meta = serde_json::from_slice(&bytes).map_err(|e| ReplicaError::Invalid {
        path: p.clone(),
        reason: e.to_string(),
    })?;
    if meta.format != FORMAT {
        return Err(ReplicaError::Invalid {
            path: p,
            reason: format!("format {:?}, expected {FORMAT:?}", meta.format),
        });
    }
    Ok(meta)
}

/// Loads a saved replica for activation (`backup --from-saved`): its
/// meta.json, the memory image in fresh guest memory, and the saved state;
/// the digest is checked against meta.json first, so a torn or altered
/// image is refused, never run.
pub fn load(dir: &Path) -> Result<(Meta, crate::domain::GuestMemory, Vec<u8>), ReplicaError> {
    let (meta, _) = verify(dir)?;
    // The files of the version `current` names (verify followed it too; no
    // save runs while a stopped backup's replica is being activated).
    let ver = version_dir(dir)?;
    let mp = ver.join("memory.img");
    let sp = ver.join("state.bin");
    let state = fs::read(&sp).map_err(io_err("reading", &sp))?;
    let bad = |reason: String| ReplicaError::Invalid {
        path: ver.clone(),
        reason,
    };
    let len = usize::try_from(meta.memory_bytes).map_err(|_| {
        bad(format!(
            "{} bytes of memory do not fit here",
            meta.memory_bytes
        ))
    })?;
    let mem = crate::domain::GuestMemory::new(len).map_err(|e| bad(e.to_string()))?;
    let f = File::open(&mp).map_err(io_err("opening", &mp))?;
    let mut page = [0u8; PAGE_SIZE];
    for gfn in 0..mem.pages() {
        f.read_exact_at(&mut page, gfn * PAGE_SIZE as u64)
            .map_err(io_err("reading", &mp))?;
        if page.iter().any(|&b| b != 0) {
            mem.write_page(gfn, &page);
        }
    }
    Ok((meta, mem, state))
}

/// Recomputes the digest of the saved image and checks it against meta.json.
pub fn verify(dir: &Path) -> Result<(Meta, Digest), ReplicaError> {
    let ver = version_dir(dir)?;
    let meta = read_meta_in(&ver)?;
    let mp = ver.join("memory.img");
    let sp = ver.join("state.bin");
    let memory = fs::read(&mp).map_err(io_err("reading", &mp))?;
    let state = fs::read(&sp).map_err(io_err("reading", &sp))?;
    if memory.len() as u64 != meta.memory_bytes || state.len() as u64 != meta.state_bytes {
        return Err(ReplicaError::Invalid {
            path: ver,
            reason: format!(
                "image sizes {}+{} bytes disagree with meta.json ({}+{})",
                memory.len(),
                state.len(),
                meta.memory_bytes,
                meta.state_bytes
            ),
        });
    }
    let files: Vec<(String, PathBuf)> = meta
        .disks
        .iter()
        .map(|d| {
            (
                d.name.clone(),
                ver.join(DISKS).join(format!("{}.img", d.name)),
            )
        })
        .collect();
    let d = Digest::with_disk_files(&memory, &state, &files)
        .map_err(io_err("reading the disks of", &ver))?;
    if d.to_hex() != meta.digest {
        return Err(ReplicaError::Invalid {
            path: ver,
            reason: format!(
                "image digest {d} does not match meta.json's {}",
                meta.digest
            ),
        });
    }
    Ok((meta, d))
}

#[cfg(test)]
#[path = "replica_tests.rs"]
mod tests;
