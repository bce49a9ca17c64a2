//! Arbitration: before a copy of the domain goes live (a primary starting,
//! a backup activating) it must win the arbiter, which hands out a fencing
//! token that grows with every winner.
//!
//! - `local:PATH`: an exclusive `flock` on PATH. The token is a u64 kept in
//!   the file, incremented by each winner and fsynced before the win is
//!   reported. The winner keeps the file open for as long as it is live; the
//!   kernel drops the lock when the holder's process dies (SIGKILL
//!   included), so a dead holder never blocks its successor. Good for one
//!   host (demos, tests) or a shared filesystem whose locks work across
//!   hosts; not a substitute for a real quorum service.
//! - `etcd:http://HOST:PORT[,...][/KEY][?ttl=DURATION]`: a leader key
//!   bound to a lease in an etcd cluster; the token is the key's create
//!   revision. The hold lapses when the lease is not renewed in time, which
//!   the holder learns through [`Arbiter::lease`] (see [`super::etcd`]).
//! - `none`: always wins, token 0. That is Xen Remus's behaviour: nothing
//!   stops a partitioned backup from running next to a live primary. Only
//!   when asked for, with a warning.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Proof of having won the arbiter: larger than every earlier winner's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FencingToken(pub u64);

impl std::fmt::Display for FencingToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArbiterError {
    #[error("opening the arbiter lock file {path}: {source} (use --arbiter local:PATH with a writable path)")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("flock(LOCK_EX|LOCK_NB) on {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the arbiter lock file {path} holds {content:?}, not a fencing token (a decimal u64)")]
    Corrupt { path: PathBuf, content: String },
    #[error("updating the fencing token in {path}: {source}")]
    Update {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unknown arbiter {0:?}: use local:PATH, etcd:http://HOST:PORT[/KEY] or none")]
    Spec(String),
    #[error(transparent)]
    Etcd(#[from] super::etcd::EtcdError),
}

pub trait Arbiter: Send {
    /// Tries once to win. `Ok(None)`: another copy holds the arbiter.
    /// Once won, the arbiter stays held until `self` is dropped (or the
    /// process dies), and further calls return the same token.
    fn try_acquire(&mut self) -> Result<Option<FencingToken>, ArbiterError>;

    /// Human-readable name, e.g. `local:/run/castor/pair-7700.lock`.
    fn describe(&self) -> String;

    /// For an arbiter whose hold can lapse while this process lives (a
    /// lease), the watch that says until when it is held; `None` when a
    /// won arbiter stays held until the process exits.
    fn lease(&self) -> Option<super::lease::LeaseWatch> {
        None
    }

    /// How long a holder that died may still hold the arbiter: a successor
    /// campaigns at least this long before giving up. Zero when the hold
    /// ends with the holder's process (a lock); a lease's TTL otherwise.
    fn takeover_wait(&self) -> Duration {
        Duration::ZERO
    }

    /// Tries until won or `wait` has passed, polling every `every`.
    fn acquire_within(
        &mut self,
        wait: Duration,
        every: Duration,
    ) -> Result<Option<FencingToken>, ArbiterError> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(t) = self.try_acquire()? {
                return Ok(Some(t));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep(every.min(deadline - now));
        }
    }
}

/// Parses `local:PATH`, `etcd:...` (with an explicit /KEY) or `none`.
pub fn from_spec(spec: &str) -> Result<Box<dyn Arbiter>, ArbiterError> {
    from_spec_for_pair(spec, None)
}

/// [`from_spec`] for the pair whose backup listens on `backup_port`, which
/// names the default etcd key (`castor/pair-PORT`).
pub fn from_spec_for_pair(
    spec: &str,
    backup_port: Option<u16>,
) -> Result<Box<dyn Arbiter>, ArbiterError> {
    if spec == "none" {
        return Ok(Box::new(NoArbiter));
    }
    if let Some(rest) = spec.strip_prefix("etcd:") {
        let s = super::etcd::EtcdSpec::parse(rest, backup_port)?;
        return Ok(Box::new(super::etcd::EtcdArbiter::new(s)));
    }
    match spec.strip_prefix("local:") {
        Some(p) if !p.is_empty() => Ok(Box::new(LocalLock::new(p))),
        _ => Err(ArbiterError::Spec(spec.to_string())),
    }
}

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

    #[test]
    fn specs_parse() {
        assert_eq!(from_spec("none").unwrap().describe(), "none");
        assert_eq!(from_spec("local:/x/y").unwrap().describe(), "local:/x/y");
        assert!(from_spec("local:").is_err());
        assert!(from_spec("etcd:foo").is_err());
        assert!(from_spec("etcd:http://h:2379").is_err(), "no key, no port");
        assert_eq!(
            from_spec_for_pair("etcd:http://h:2379", Some(7700))
                .unwrap()
                .describe(),
            "etcd:http://h:2379/castor/pair-7700?ttl=2s"
        );
    }
}
