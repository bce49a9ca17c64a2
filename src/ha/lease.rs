//! How long the arbiter is known to be held.
//!
//! An arbiter whose hold can lapse (etcd: a lease with a TTL that must be
//! kept alive) publishes a [`LeaseWatch`]; holders that never lapse while
//! the process lives (`local`, `none`) publish none. The holder's live
//! copy may run, and release output, only while the watch says the lease
//! is valid; when it is not, the copy self-fences (pauses the guest and
//! holds its output), because a successor may be about to win.
//!
//! Invariant: `valid_until` only ever names a time at or before the
//! moment the arbiter could hand the lease to someone else, measured on
//! this host's monotonic clock from *before* the renewal request was sent
//! (so the network delay of the request is never counted as held time).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Shared, cloneable view of a lease's expiry. Cheap to query.
#[derive(Clone, Debug)]
pub struct LeaseWatch {
    origin: Instant,
    /// Nanoseconds after `origin` until which the lease is held; 0 = lost.
    until_ns: Arc<AtomicU64>,
}

impl LeaseWatch {
    /// A watch that is not yet valid.
    pub fn new() -> Self {
        LeaseWatch {
            origin: Instant::now(),
            until_ns: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Records that the lease is held until `until` (never moves backwards
    /// unless [`LeaseWatch::revoke`] is called).
    pub fn extend_to(&self, until: Instant) {
        let ns = until.saturating_duration_since(self.origin).as_nanos() as u64;
        self.until_ns.fetch_max(ns, Ordering::AcqRel);
    }

    /// Marks the lease lost (revoked, or the arbiter said it is gone).
    pub fn revoke(&self) {
        self.until_ns.store(0, Ordering::Release);
    }

    /// Time left before the lease may lapse; zero once it may have.
    pub fn remaining(&self) -> Duration {
        let until = self.until_ns.load(Ordering::Acquire);
        let now = self.origin.elapsed().as_nanos() as u64;
        Duration::from_nanos(until.saturating_sub(now))
    }

    /// Whether the lease is held for at least `margin` more.
    pub fn held_for(&self, margin: Duration) -> bool {
        self.until_ns.load(Ordering::Acquire) > 0 && self.remaining() > margin
    }
}

impl Default for LeaseWatch {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_follows_extensions_and_revocation() {
        let w = LeaseWatch::new();
        assert!(!w.held_for(Duration::ZERO), "a new watch is not held");
        w.extend_to(Instant::now() + Duration::from_secs(60));
        assert!(w.held_for(Duration::from_secs(30)));
        assert!(!w.held_for(Duration::from_secs(61)));
        // An older renewal's answer arriving late never shortens the lease.
        w.extend_to(Instant::now() + Duration::from_secs(1));
        assert!(w.held_for(Duration::from_secs(30)));
        let c = w.clone();
        c.revoke();
        assert!(!w.held_for(Duration::ZERO), "clones share one lease");
        w.extend_to(Instant::now() - Duration::from_secs(1));
        assert!(
            !w.held_for(Duration::ZERO),
            "an expiry in the past is not held"
        );
    }
}
