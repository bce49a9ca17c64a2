//! The lease gate: the queue releases only while the arbiter's lease is held.

use std::time::{Duration, Instant};

use super::tests::wire;
use super::*;
use crate::ha::lease::LeaseWatch;

#[test]
fn nothing_leaves_once_the_lease_is_lost_even_committed_output() {
    let q = OutputQueue::start(Mode::Commit).unwrap();
    let lease = LeaseWatch::new();
    lease.extend_to(Instant::now() + Duration::from_secs(60));
    q.gate(lease.clone(), Duration::from_millis(100));
    let (w, rx) = wire();
    let h = q.handle(w);
    h.emit_now(b"a1");
    q.commit(1);
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), b"a1");
    q.open_epoch(2);
    h.emit_now(b"b2");
    lease.revoke();
    q.commit(2);
    // Already committed epochs do not pass either.
    h.emit(1, b"late1");
    let r = q.shutdown().unwrap();
    assert_eq!(
        rx.try_iter().count(),
        0,
        "released after the lease was lost"
    );
    assert_eq!((r.released, r.dropped, r.committed), (1, 2, 1));
}

#[test]
fn pass_through_is_gated_too() {
    let q = OutputQueue::start(Mode::PassThrough).unwrap();
    let lease = LeaseWatch::new();
    lease.extend_to(Instant::now() + Duration::from_millis(150));
    q.gate(lease.clone(), Duration::from_millis(100));
    let (w, rx) = wire();
    let h = q.handle(w);
    h.emit_now(b"x");
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), b"x");
    // Poll until the lease is within the margin of its end.
    while lease.held_for(Duration::from_millis(100)) {
        std::thread::sleep(Duration::from_millis(5));
    }
    h.emit_now(b"y");
    let r = q.shutdown().unwrap();
    assert_eq!(rx.try_iter().count(), 0);
    assert_eq!((r.released, r.dropped), (1, 1));
}
