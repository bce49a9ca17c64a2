//! `local:PATH` (an exclusive `flock` holding a fencing token) and `none`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::contract::{Arbiter, ArbiterError, FencingToken};
use crate::ha::heir::HeirBook;

/// Default local lock of a replication pair, named by the backup's port:
/// the primary knows it from `--backup HOST:PORT`, the backup from its
/// listening socket, and on one host no two live backups share a port, so
/// distinct pairs never contend while the two halves of one pair always do.
pub fn default_local_path(backup_port: u16) -> PathBuf {
    PathBuf::from(format!("/run/castor/pair-{backup_port}.lock"))
}

/// `local:PATH`.
pub struct LocalLock {
    path: PathBuf,
    held: Option<(File, FencingToken)>,
}

impl LocalLock {
    pub fn new(path: impl AsRef<Path>) -> Self {
        LocalLock {
            path: path.as_ref().to_path_buf(),
            held: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open(&self) -> Result<File, ArbiterError> {
        let open_err = |source| ArbiterError::Open {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(open_err)?;
        }
        // Rust opens with O_CLOEXEC: a fence command we spawn does not
        // inherit the lock.
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.path)
            .map_err(open_err)
    }

    /// Reads the last winner's token, writes ours (one more) and fsyncs it.
    fn bump(&self, f: &mut File) -> Result<FencingToken, ArbiterError> {
        let upd = |source| ArbiterError::Update {
            path: self.path.clone(),
            source,
        };
        let mut s = String::new();
        f.seek(SeekFrom::Start(0)).map_err(upd)?;
        f.read_to_string(&mut s).map_err(upd)?;
        let last = match s.trim() {
            "" => 0,
            t => t.parse::<u64>().map_err(|_| ArbiterError::Corrupt {
                path: self.path.clone(),
                content: s.chars().take(40).collect(),
            })?,
        };
        let token = FencingToken(last + 1);
        f.set_len(0).map_err(upd)?;
        f.seek(SeekFrom::Start(0)).map_err(upd)?;
        f.write_all(format!("{}\n", token.0).as_bytes())
            .map_err(upd)?;
        f.sync_all().map_err(upd)?;
        Ok(token)
    }
}

impl Arbiter for LocalLock {
    fn try_acquire(&mut self) -> Result<Option<FencingToken>, ArbiterError> {
        if let Some((_, t)) = &self.held {
            return Ok(Some(*t));
        }
        let mut f = self.open()?;
        // SAFETY: `f` is an open file descriptor owned by this function;
        // flock has no memory-safety preconditions.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EWOULDBLOCK) => Ok(None),
                _ => Err(ArbiterError::Lock {
                    path: self.path.clone(),
                    source: e,
                }),
            };
        }
        // Dropping `f` on an error below releases the lock again.
        let token = self.bump(&mut f)?;
        self.held = Some((f, token));
        Ok(Some(token))
    }

    fn describe(&self) -> String {
        format!("local:{}", self.path.display())
    }

    fn heir_book(&self) -> HeirBook {
        match &self.held {
            Some(_) => HeirBook::File(heir_path(&self.path)),
            None => HeirBook::Nowhere,
        }
    }
}

/// The heir record beside the lock file `lock`: `LOCK.heir`.
pub fn heir_path(lock: &Path) -> PathBuf {
    let mut s = lock.as_os_str().to_owned();
    s.push(".heir");
    PathBuf::from(s)
}

/// `none`: always wins. Xen Remus's behaviour; unsafe under partitions.
pub struct NoArbiter;

impl Arbiter for NoArbiter {
    fn try_acquire(&mut self) -> Result<Option<FencingToken>, ArbiterError> {
        Ok(Some(FencingToken(0)))
    }

    fn describe(&self) -> String {
        "none".into()
    }
}

/// The warning printed whenever `--arbiter none` is used.
pub const NONE_WARNING: &str =
    "WARNING: --arbiter none: nothing prevents two copies of the domain \
     from running with output released (split brain) if the link between primary and backup fails \
     while both live. This is Xen Remus's behaviour; use --arbiter local:PATH (or a real arbiter) \
     for anything that matters.";

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn local_lock_excludes_and_tokens_grow() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/pair.lock");
        let mut a = LocalLock::new(&p);
        let mut b = LocalLock::new(&p);
        let ta = a.try_acquire().unwrap().expect("first wins");
        assert_eq!(ta, FencingToken(1));
        assert_eq!(a.try_acquire().unwrap(), Some(ta), "held: same token");
        assert_eq!(b.try_acquire().unwrap(), None, "second loses while held");
        drop(a);
        let tb = b.try_acquire().unwrap().expect("wins once released");
        assert!(tb > ta);
        assert_eq!(std::fs::read_to_string(&p).unwrap().trim(), "2");
    }

    #[test]
    fn acquire_within_waits_for_a_release() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pair.lock");
        let mut a = LocalLock::new(&p);
        a.try_acquire().unwrap().unwrap();
        let mut b = LocalLock::new(&p);
        let ms = Duration::from_millis;
        let t = Instant::now();
        assert_eq!(b.acquire_within(ms(100), ms(10)).unwrap(), None);
        assert!(t.elapsed() >= ms(100));
        let rel = std::thread::spawn(move || {
            std::thread::sleep(ms(50));
            drop(a);
        });
        assert_eq!(
            b.acquire_within(ms(2000), ms(10)).unwrap(),
            Some(FencingToken(2))
        );
        rel.join().unwrap();
    }

    #[test]
    fn corrupt_token_file_is_an_error_and_releases() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pair.lock");
        std::fs::write(&p, "not a number").unwrap();
        let mut a = LocalLock::new(&p);
        assert!(matches!(a.try_acquire(), Err(ArbiterError::Corrupt { .. })));
        std::fs::write(&p, "41\n").unwrap();
        assert_eq!(a.try_acquire().unwrap(), Some(FencingToken(42)));
    }
}
