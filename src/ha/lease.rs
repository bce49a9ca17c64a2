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
//!
//! Every decision that depends on the lease (the primary's lease thread,
//! each pause, the output queue before each release, the unprotected live
//! loop) asks one [`LeaseGate`] through [`LeaseGate::may_proceed`], so the
//! rule (held for more than the margin, or no lease that can lapse) lives
//! in one place.

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
        self.remaining_at(Instant::now())
    }

    /// Time left at `now` before the lease may lapse.
    pub fn remaining_at(&self, now: Instant) -> Duration {
        let until = self.until_ns.load(Ordering::Acquire);
        let now = now.saturating_duration_since(self.origin).as_nanos() as u64;
        Duration::from_nanos(until.saturating_sub(now))
    }

    /// Whether the lease is held for at least `margin` more.
    pub fn held_for(&self, margin: Duration) -> bool {
        self.held_for_at(margin, Instant::now())
    }

    /// Whether, at `now`, the lease is held for at least `margin` more.
    pub fn held_for_at(&self, margin: Duration, now: Instant) -> bool {
        self.until_ns.load(Ordering::Acquire) > 0 && self.remaining_at(now) > margin
    }
}

/// What a [`LeaseGate`] allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The lease is held for more than the margin (or cannot lapse): the
    /// guest may run on and its output may leave.
    Proceed,
    /// The lease may lapse within the margin: self-fence (pause the guest,
    /// release nothing).
    Fence,
}

/// The one lease check every self-fencing decision makes.
///
/// Invariant: with no lease (an arbiter whose hold lasts as long as the
/// process) the verdict is always [`Verdict::Proceed`]; with one, it is
/// `Proceed` exactly while [`LeaseWatch::held_for_at`]`(margin, now)`. The
/// margin covers the delay between a check and the act it allows (a
/// release, the next pause).
#[derive(Clone, Debug, Default)]
pub struct LeaseGate {
    lease: Option<LeaseWatch>,
    margin: Duration,
}

impl LeaseGate {
    pub fn new(lease: Option<LeaseWatch>, margin: Duration) -> Self {
        LeaseGate { lease, margin }
    }

    /// Whether the copy may go on at `now`.
    pub fn may_proceed(&self, now: Instant) -> Verdict {
        match &self.lease {
            Some(l) if !l.held_for_at(self.margin, now) => Verdict::Fence,
            _ => Verdict::Proceed,
        }
    }

    /// Whether there is a lease that can lapse (one worth watching).
    pub fn can_lapse(&self) -> bool {
        self.lease.is_some()
    }

    /// Time left on the lease at `now` (zero without one), for messages.
    pub fn remaining_at(&self, now: Instant) -> Duration {
        self.lease
            .as_ref()
            .map_or(Duration::ZERO, |l| l.remaining_at(now))
    }

    pub fn margin(&self) -> Duration {
        self.margin
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

    #[test]
    fn gate_fences_within_the_margin_and_never_without_a_lease() {
        let now = Instant::now();
        let open = LeaseGate::new(None, Duration::from_millis(100));
        assert_eq!(open.may_proceed(now), Verdict::Proceed);
        let w = LeaseWatch::new();
        let gate = LeaseGate::new(Some(w.clone()), Duration::from_millis(100));
        assert_eq!(gate.may_proceed(now), Verdict::Fence, "never held");
        w.extend_to(now + Duration::from_millis(300));
        assert_eq!(gate.may_proceed(now), Verdict::Proceed);
        assert_eq!(
            gate.may_proceed(now + Duration::from_millis(150)),
            Verdict::Proceed
        );
        assert_eq!(
            gate.may_proceed(now + Duration::from_millis(200)),
            Verdict::Fence,
            "exactly the margin left is not enough"
        );
        w.revoke();
        assert_eq!(gate.may_proceed(now), Verdict::Fence);
    }
}
