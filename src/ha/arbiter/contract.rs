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

    /// Tries until won, or until the arbiter has answered "held" for
    /// `wait`, polling every `every`. An arbiter that cannot be reached
    /// has not answered: that time does not count, because no holder can
    /// renew its hold through an outage either, so the outage's end is
    /// exactly when a dead holder's successor must be there to win. Gives
    /// up (returning the last such error) only after [`UNREACHABLE_CAP`]
    /// times `wait` in all.
    fn acquire_within(
        &mut self,
        wait: Duration,
        every: Duration,
    ) -> Result<Option<FencingToken>, ArbiterError> {
        let started = Instant::now();
        let cap = wait * UNREACHABLE_CAP;
        // Time spent on attempts that found the arbiter unreachable, and
        // on the sleeps after them.
        let mut lost = Duration::ZERO;
        let mut said = Instant::now();
        loop {
            let t0 = Instant::now();
            let down = match self.try_acquire() {
                Ok(Some(t)) => return Ok(Some(t)),
                Ok(None) => false,
                Err(e) if e.is_unreachable() && started.elapsed() < cap => {
                    if said.elapsed() >= Duration::from_secs(1) {
                        eprintln!(
                            "castor: arbiter {}: {e}; still campaigning",
                            self.describe()
                        );
                        said = Instant::now();
                    }
                    true
                }
                Err(e) => return Err(e),
            };
            if !down && started.elapsed().saturating_sub(lost) >= wait {
                return Ok(None);
            }
            std::thread::sleep(every);
            if down {
                lost += t0.elapsed();
            }
        }
    }
}

/// How many times its answered wait a campaign goes on against an
/// unreachable arbiter before it reports the outage as an error.
pub const UNREACHABLE_CAP: u32 = 20;

impl ArbiterError {
    /// The arbiter could not be reached or could not serve now (no etcd
    /// endpoint answered; a member without a leader): worth retrying.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ArbiterError::Etcd(e) if e.is_unreachable())
    }
}

impl EtcdError {
    /// No endpoint answered, or the one that did cannot serve now (HTTP
    /// 5xx): worth retrying.
    pub fn is_unreachable(&self) -> bool {
        match self {
            EtcdError::Unreachable { .. } => true,
            EtcdError::Status { code, .. } => code.starts_with("HTTP 5"),
            _ => false,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Unreachable for `down` attempts, then answers `then` (won or held).
    struct Flaky {
        down: u32,
        then: Option<FencingToken>,
        tries: u32,
    }

    impl Arbiter for Flaky {
        fn try_acquire(&mut self) -> Result<Option<FencingToken>, ArbiterError> {
            self.tries += 1;
            if self.tries <= self.down {
                return Err(EtcdError::Unreachable {
                    call: "lease/grant",
                    tried: "http://192.0.2.1:2379: timed out".into(),
                }
                .into());
            }
            Ok(self.then)
        }

        fn describe(&self) -> String {
            "flaky".into()
        }
    }

    const WAIT: Duration = Duration::from_millis(40);
    const EVERY: Duration = Duration::from_millis(5);

    /// An outage longer than the whole wait does not end the campaign:
    /// the arbiter wins as soon as it answers again.
    #[test]
    fn an_unreachable_arbiter_is_not_the_end_of_a_campaign() {
        let mut a = Flaky {
            down: 30, // 30 × 5 ms, well past the 40 ms wait
            then: Some(FencingToken(9)),
            tries: 0,
        };
        assert_eq!(
            a.acquire_within(WAIT, EVERY).unwrap(),
            Some(FencingToken(9))
        );
        assert_eq!(a.tries, 31);
    }

    /// Only answered "held" time counts towards the wait.
    #[test]
    fn held_answers_after_an_outage_still_get_the_whole_wait() {
        let mut a = Flaky {
            down: 30,
            then: None,
            tries: 0,
        };
        let t0 = Instant::now();
        assert_eq!(a.acquire_within(WAIT, EVERY).unwrap(), None);
        assert!(t0.elapsed() >= WAIT + EVERY * 30, "{:?}", t0.elapsed());
        assert!(a.tries > 31, "gave up after {} tries", a.tries);
    }

    /// An arbiter that never answers is reported after the cap.
    #[test]
    fn an_arbiter_that_never_answers_is_an_error_after_the_cap() {
        let mut a = Flaky {
            down: u32::MAX,
            then: None,
            tries: 0,
        };
        let t0 = Instant::now();
        let e = a.acquire_within(WAIT, EVERY).unwrap_err();
        assert!(e.is_unreachable(), "{e}");
        assert!(t0.elapsed() >= WAIT * UNREACHABLE_CAP, "{:?}", t0.elapsed());
    }
}
