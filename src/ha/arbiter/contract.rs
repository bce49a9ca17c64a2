//! What every arbiter is: the [`Arbiter`] trait, the [`FencingToken`] a
//! win yields, and the errors arbiters report. The implementations
//! ([`super::local`], [`super::etcd`]) and the constructor by spec
//! ([`super::from_spec`]) build on this file; it depends on none of them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::ha::heir::HeirBook;
use crate::ha::lease::LeaseWatch;

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
    Etcd(#[from] EtcdError),
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
    fn lease(&self) -> Option<LeaseWatch> {
        None
    }

    /// How long a holder that died may still hold the arbiter: a successor
    /// campaigns at least this long before giving up. Zero when the hold
    /// ends with the holder's process (a lock); a lease's TTL otherwise.
    fn takeover_wait(&self) -> Duration {
        Duration::ZERO
    }

    /// Where this arbiter keeps the heir record ([`crate::ha::heir`]),
    /// valid once won. [`HeirBook::Nowhere`] for an arbiter that records
    /// nothing (`none`) or before a win.
    fn heir_book(&self) -> HeirBook {
        HeirBook::Nowhere
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

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd arbiter spec {spec:?}: {why} (use etcd:http://HOST:PORT[,http://HOST:PORT...][/KEY][?ttl=DURATION])")]
    Spec { spec: String, why: String },
    #[error("etcd {call}: no endpoint answered ({tried})")]
    Unreachable { call: &'static str, tried: String },
    #[error("etcd {call} at {endpoint}: {code} {message}")]
    Status {
        call: &'static str,
        endpoint: String,
        code: String,
        message: String,
    },
    #[error("etcd {call} at {endpoint}: the answer is not JSON ({why}): {body:?}")]
    Json {
        call: &'static str,
        endpoint: String,
        why: String,
        body: String,
    },
    #[error("etcd {call}: field {field} is {value}, expected {expected}")]
    Field {
        call: &'static str,
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("spawning the castor-etcd keepalive thread: {0}")]
    Spawn(#[source] std::io::Error),
}
