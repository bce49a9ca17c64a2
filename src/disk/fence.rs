//! The export's write gate: fencing enforced where the writes land.
//!
//! An NBD export is the one output receiver castor owns, so it can refuse
//! to complete writes itself instead of trusting every caller to stop in
//! time. A [`Fence`] says whether this copy may complete writes now:
//! it may while it is not revoked and, when an arbiter lease backs it,
//! while that lease is still held. The write path checks the gate under
//! the same lock that applies the write ([`super::log::WriteLog`]), so once
//! [`Fence::revoke`] returns (or the lease lapses) no later write reaches
//! the image, whether it was already queued in a connection or arrives
//! afterwards.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::ha::lease::LeaseWatch;

#[derive(Debug, Default)]
pub struct Fence {
    revoked: AtomicBool,
    /// Fencing token (the arbiter's revision) this copy holds; 0 = none named.
    token: AtomicU64,
    lease: Option<LeaseWatch>,
}

impl Fence {
    /// An open gate: the copy runs alone or its arbiter never lapses.
    pub fn open() -> Fence {
        Fence::default()
    }

    /// A gate held under fencing token `token`, valid while `lease` is (when
    /// the arbiter's hold can lapse).
    pub fn holding(token: u64, lease: Option<LeaseWatch>) -> Fence {
        Fence {
            revoked: AtomicBool::new(false),
            token: AtomicU64::new(token),
            lease,
        }
    }

    /// Closes the gate for good: this copy lost the arbiter (or stopped).
    pub fn revoke(&self) {
        self.revoked.store(true, Ordering::SeqCst);
    }

    pub fn token(&self) -> u64 {
        self.token.load(Ordering::Acquire)
    }

    /// Whether a write may be completed now.
    pub fn allows_writes(&self) -> bool {
        if self.revoked.load(Ordering::SeqCst) {
            return false;
        }
        match &self.lease {
            None => true,
            Some(l) => l.held_for(std::time::Duration::ZERO),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn revoked_or_lapsed_gates_refuse() {
        let f = Fence::open();
        assert!(f.allows_writes());
        f.revoke();
        assert!(!f.allows_writes());

        let lease = LeaseWatch::new();
        let f = Fence::holding(7, Some(lease.clone()));
        assert_eq!(f.token(), 7);
        assert!(!f.allows_writes(), "a lease never extended is not held");
        lease.extend_to(Instant::now() + Duration::from_secs(60));
        assert!(f.allows_writes());
        lease.revoke();
        assert!(!f.allows_writes(), "a lapsed lease closes the gate");
    }
}
