use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Duration;

use super::*;

/// Records released frames on a channel (the test's view of the wire).
pub(super) struct Wire(Sender<Vec<u8>>);

impl Egress for Wire {
    fn release(&mut self, frame: &[u8]) {
        let _ = self.0.send(frame.to_vec());
    }
}

pub(super) fn wire() -> (Box<dyn Egress>, Receiver<Vec<u8>>) {
    let (tx, rx) = channel();
    (Box::new(Wire(tx)), rx)
}

/// Waits until the queue thread has handled every message sent so far: a
/// round trip through a dedicated probe destination.
/// The probe item is tagged 0 (≤ any commit), so it is released as soon
/// as the thread reaches it, after everything sent before it.
fn settle(probe: &OutputHandle, probe_rx: &Receiver<Vec<u8>>) {
    probe.emit(0, b"probe");
    probe_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("queue thread answers");
}

fn got(rx: &Receiver<Vec<u8>>) -> Vec<Vec<u8>> {
    rx.try_iter().collect()
}

#[test]
fn items_wait_for_their_epoch_and_leave_in_order() {
    let q = OutputQueue::start(Mode::Commit).unwrap();
    let (w, rx) = wire();
    let (pw, prx) = wire();
    let h = q.handle(w);
    let probe = q.handle(pw);
    assert_eq!(h.epoch(), 1);
    h.emit_now(b"a1");
    h.emit_now(b"b1");
    q.open_epoch(2);
    h.emit_now(b"c2");
    q.open_epoch(3);
    h.emit_now(b"d3");
    settle(&probe, &prx);
    assert!(got(&rx).is_empty(), "released before any commit");
    q.commit(0); // the seed's ack releases nothing
    settle(&probe, &prx);
    assert!(got(&rx).is_empty());
    q.commit(1);
    settle(&probe, &prx);
    assert_eq!(got(&rx), [b"a1".to_vec(), b"b1".to_vec()]);
    q.commit(3);
    settle(&probe, &prx);
    assert_eq!(got(&rx), [b"c2".to_vec(), b"d3".to_vec()]);
    let r = q.shutdown().unwrap();
    // 4 frames + 4 probes (tagged 0, released at once).
    assert_eq!((r.items, r.held, r.dropped, r.committed), (8, 4, 0, 3));
    assert_eq!(r.released, 8);
}

#[test]
fn commit_is_monotonic() {
    let q = OutputQueue::start(Mode::Commit).unwrap();
    let (w, rx) = wire();
    let (pw, prx) = wire();
    let h = q.handle(w);
    let probe = q.handle(pw);
    q.commit(5);
    q.commit(2); // stale: must not lower the committed epoch
    h.emit(4, b"old"); // produced in a committed epoch: may go at once
    h.emit(6, b"new");
    settle(&probe, &prx);
    assert_eq!(got(&rx), [b"old".to_vec()]);
    q.commit(5);
    settle(&probe, &prx);
    assert!(
        got(&rx).is_empty(),
        "epoch 6 released by a repeated commit(5)"
    );
    q.commit(6);
    settle(&probe, &prx);
    assert_eq!(got(&rx), [b"new".to_vec()]);
    assert_eq!(q.shutdown().unwrap().committed, 6);
}

#[test]
fn shutdown_and_drop_never_release_uncommitted_items() {
    let (w, rx) = wire();
    let q = OutputQueue::start(Mode::Commit).unwrap();
    let h = q.handle(w);
    h.emit(1, b"x");
    h.emit(2, b"y");
    q.commit(1);
    let r = q.shutdown().unwrap();
    assert_eq!(got(&rx), [b"x".to_vec()]);
    assert_eq!((r.released, r.dropped), (1, 1));
    // After shutdown the handle's items go nowhere.
    h.emit(1, b"late");
    assert!(got(&rx).is_empty());

    let (w, rx) = wire();
    let q = OutputQueue::start(Mode::Commit).unwrap();
    let h = q.handle(w);
    for i in 0..100u8 {
        h.emit(1 + i as u64 / 10, &[i]);
    }
    drop(q);
    assert!(got(&rx).is_empty(), "drop released held output");
    drop(h);
}

#[test]
fn items_of_several_sources_keep_production_order() {
    let q = OutputQueue::start(Mode::Commit).unwrap();
    let (tx, rx) = channel();
    let a = q.handle(Box::new(Wire(tx.clone())));
    let b = q.handle(Box::new(Wire(tx)));
    for i in 0..50u8 {
        if i % 2 == 0 {
            a.emit_now(&[i]);
        } else {
            b.emit_now(&[i]);
        }
        if i % 10 == 9 {
            q.open_epoch(q.epoch() + 1);
        }
    }
    q.commit(3);
    let r = q.shutdown().unwrap();
    let v: Vec<u8> = rx.try_iter().map(|f| f[0]).collect();
    assert_eq!(v, (0..30).collect::<Vec<u8>>());
    assert_eq!(r.dropped, 20);
}

#[test]
fn pass_through_releases_at_once() {
    let q = OutputQueue::start(Mode::PassThrough).unwrap();
    let (w, rx) = wire();
    let h = q.handle(w);
    h.emit_now(b"now");
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        b"now".to_vec()
    );
    let r = q.shutdown().unwrap();
    assert_eq!((r.passed_through, r.held, r.dropped), (1, 0, 0));
}

#[test]
fn release_delay_is_measured() {
    let q = OutputQueue::start(Mode::Commit).unwrap();
    let (w, rx) = wire();
    let h = q.handle(w);
    h.emit_now(b"f");
    std::thread::sleep(Duration::from_millis(20));
    q.commit(1);
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let r = q.shutdown().unwrap();
    assert!(r.release_delay_us.max >= 20_000, "{:?}", r.release_delay_us);
}

#[test]
fn a_late_ack_of_an_ended_session_releases_nothing_of_the_next() {
    let mut q = OutputQueue::start(Mode::Commit).unwrap();
    let (w, rx) = wire();
    let (pw, prx) = wire();
    let h = q.handle(w);
    let probe = q.handle(pw);
    let old = q.committer();
    h.emit_now(b"s1-e1");
    // The backup is lost before acking epoch 1: its output is dropped.
    let r = q.unprotect().unwrap();
    assert_eq!(r.dropped, 1);
    assert!(
        got(&rx).is_empty(),
        "unacked output released when the session ended"
    );
    // Unprotected: output passes straight through.
    h.emit_now(b"free");
    settle(&probe, &prx);
    assert_eq!(got(&rx), [b"free".to_vec()]);
    // A fresh backup: a new session, epochs restart at 1.
    q.protect().unwrap();
    assert_eq!(h.epoch(), 1);
    h.emit_now(b"s2-e1");
    // The old backup's ack for epoch 1 arrives late: it must not count.
    old.commit(1);
    old.commit(9);
    settle(&probe, &prx);
    assert!(
        got(&rx).is_empty(),
        "an ack of the previous session released output of the new one"
    );
    q.committer().commit(1);
    settle(&probe, &prx);
    assert_eq!(got(&rx), [b"s2-e1".to_vec()]);
    let r = q.shutdown().unwrap();
    assert_eq!((r.sessions, r.dropped, r.committed), (2, 1, 1));
}

#[test]
fn fenced_queue_releases_nothing_ever() {
    let mut q = OutputQueue::start(Mode::PassThrough).unwrap();
    let (w, rx) = wire();
    let h = q.handle(w);
    let c = q.committer();
    q.protect().unwrap();
    h.emit_now(b"held");
    let r = q.fence().unwrap();
    assert_eq!(r.dropped, 1);
    h.emit_now(b"after");
    c.commit(5);
    q.committer().commit(5);
    let r = q.shutdown().unwrap();
    assert!(got(&rx).is_empty(), "a fenced queue released output");
    assert_eq!((r.dropped, r.released), (2, 0));
}

/// A queue whose sources are attached before its first session (the
/// primary's, with NFQUEUE) holds from the first item: nothing passes
/// through in that window, and the first session's first ack releases it.
#[test]
fn hold_mode_holds_until_the_first_session_then_its_first_ack() {
    let mut q = OutputQueue::start(Mode::Hold).unwrap();
    let (w, rx) = wire();
    let h = q.handle(w);
    h.emit_now(b"early-a");
    h.emit_now(b"early-b");
    // protect() returns once the thread handled everything sent before.
    q.protect().unwrap();
    assert!(got(&rx).is_empty(), "released before protection started");
    let (pw, prx) = wire();
    let probe = q.handle(pw);
    q.commit(0);
    settle(&probe, &prx);
    assert!(got(&rx).is_empty(), "the seed's ack released held output");
    q.commit(1);
    settle(&probe, &prx);
    assert_eq!(got(&rx), [b"early-a".to_vec(), b"early-b".to_vec()]);
    let r = q.shutdown().unwrap();
    assert_eq!((r.held, r.dropped), (2, 0));
}

#[test]
fn hold_mode_releases_on_unprotect_and_drops_on_fence() {
    let mut q = OutputQueue::start(Mode::Hold).unwrap();
    let (w, rx) = wire();
    let h = q.handle(w);
    h.emit_now(b"x");
    let r = q.unprotect().unwrap();
    assert_eq!(got(&rx), [b"x".to_vec()], "--no-output-commit releases it");
    assert_eq!(r.dropped, 0);

    let mut q = OutputQueue::start(Mode::Hold).unwrap();
    let (w, rx) = wire();
    let h = q.handle(w);
    h.emit_now(b"y");
    let r = q.fence().unwrap();
    assert!(got(&rx).is_empty(), "a fenced copy released output");
    assert_eq!(r.dropped, 1);
}
