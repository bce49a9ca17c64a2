//! The committed replica on disk (`--state-dir`).
//!
//! ```text
//! memory.img   raw guest memory, page 0 first (sparse: zero pages are holes)
//! state.bin    saved vCPU/device state of the committed epoch
//! meta.json    {"format":"castor-replica-v1","epoch":E,"pages":P,"page_size":4096,
//!               "domain":"sim:...","digest":"<hex>","memory_bytes":…,"state_bytes":…}
//! ```
//! Files are written under temporary names, synced, then renamed; meta.json
//! is renamed last, so a meta.json always describes complete image files.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::PAGE_SIZE;

pub const FORMAT: &str = "castor-replica-v1";

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
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ReplicaError + 'a {
    move |source| ReplicaError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn write_atomic(
    dir: &Path,
    name: &str,
    f: impl FnOnce(&File) -> io::Result<()>,
) -> Result<(), ReplicaError> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let dst = dir.join(name);
    let file = File::create(&tmp).map_err(io_err("creating", &tmp))?;
    f(&file).map_err(io_err("writing", &tmp))?;
    file.sync_all().map_err(io_err("syncing", &tmp))?;
    fs::rename(&tmp, &dst).map_err(io_err("renaming", &dst))?;
    Ok(())
}

/// Saves a committed replica. `memory` must not change during the call.
pub fn save(
    dir: &Path,
    memory: &[u8],
    state: &[u8],
    epoch: u64,
    domain: &str,
) -> Result<Meta, ReplicaError> {
    fs::create_dir_all(dir).map_err(io_err("creating directory", dir))?;
    write_atomic(dir, "memory.img", |f| {
        f.set_len(memory.len() as u64)?;
        // Write runs of non-zero pages; zero pages stay holes.
        let mut i = 0;
        let pages = memory.len() / PAGE_SIZE;
        let is_zero = |p: usize| {
            memory[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
                .iter()
                .all(|&b| b == 0)
        };
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
    })?;
    write_atomic(dir, "state.bin", |mut f| f.write_all(state))?;
    let meta = Meta {
        format: FORMAT.into(),
        epoch,
        pages: (memory.len() / PAGE_SIZE) as u64,
        page_size: PAGE_SIZE as u32,
        domain: domain.into(),
        digest: Digest::of(memory, state).to_hex(),
        memory_bytes: memory.len() as u64,
        state_bytes: state.len() as u64,
    };
    let json = serde_json::to_vec_pretty(&meta).expect("meta serialises");
    write_atomic(dir, "meta.json", |mut f| f.write_all(&json))?;
    Ok(meta)
}

pub fn read_meta(dir: &Path) -> Result<Meta, ReplicaError> {
    let p = dir.join("meta.json");
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

/// Recomputes the digest of the saved image and checks it against meta.json.
pub fn verify(dir: &Path) -> Result<(Meta, Digest), ReplicaError> {
    let meta = read_meta(dir)?;
    let mp = dir.join("memory.img");
    let sp = dir.join("state.bin");
    let memory = fs::read(&mp).map_err(io_err("reading", &mp))?;
    let state = fs::read(&sp).map_err(io_err("reading", &sp))?;
    if memory.len() as u64 != meta.memory_bytes || state.len() as u64 != meta.state_bytes {
        return Err(ReplicaError::Invalid {
            path: dir.to_path_buf(),
            reason: format!(
                "image sizes {}+{} bytes disagree with meta.json ({}+{})",
                memory.len(),
                state.len(),
                meta.memory_bytes,
                meta.state_bytes
            ),
        });
    }
    let d = Digest::of(&memory, &state);
    if d.to_hex() != meta.digest {
        return Err(ReplicaError::Invalid {
            path: dir.to_path_buf(),
            reason: format!(
                "image digest {d} does not match meta.json's {}",
                meta.digest
            ),
        });
    }
    Ok((meta, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_verify_and_detect_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let mut mem = vec![0u8; 8 * PAGE_SIZE];
        mem[3 * PAGE_SIZE + 7] = 9;
        mem[7 * PAGE_SIZE] = 1;
        let m = save(dir.path(), &mem, b"st", 42, "sim:").unwrap();
        let (m2, d) = verify(dir.path()).unwrap();
        assert_eq!(m, m2);
        assert_eq!(d, Digest::of(&mem, b"st"));
        assert_eq!(fs::read(dir.path().join("memory.img")).unwrap(), mem);
        fs::write(dir.path().join("state.bin"), b"xx").unwrap();
        assert!(verify(dir.path()).is_err());
    }
}
