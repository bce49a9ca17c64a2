//! The held-output event: how the epoch clock learns, without polling, that
//! the guest said something that now waits for a checkpoint.
//!
//! `castor-outq` calls [`HeldSignal::held`] for every item it holds; the
//! first item of a new epoch tag wakes whoever waits in
//! [`HeldSignal::wait`] (the primary's pacer, which may then end the
//! running epoch early: `--epoch auto`). Later items of the same tag only
//! add their bytes, without a wake-up.
//!
//! Invariants:
//! - [`HeldOutput::first_at`] is the *emit* time of the first item held
//!   with that tag (taken on the producer's thread), so the queue thread's
//!   own delay does not shift a deadline computed from it.
//! - Tags within a protection session never decrease, so "a tag other
//!   than the last one" means "a new epoch"; a new session (tags restart
//!   at 1) starts a new record the same way.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// What is held for one epoch tag so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldOutput {
    /// The epoch tag of the items.
    pub epoch: u64,
    /// When the first of them was emitted.
    pub first_at: Instant,
    /// Their total size.
    pub bytes: u64,
}

/// The event `castor-outq` raises when it starts holding output of a new
/// epoch (shared by the queue thread and the engine).
#[derive(Debug, Default)]
pub struct HeldSignal {
    last: Mutex<Option<HeldOutput>>,
    cv: Condvar,
}

impl HeldSignal {
    /// The queue thread holds an item tagged `epoch`, emitted at `at`.
    pub(super) fn held(&self, epoch: u64, at: Instant, bytes: usize) {
        let mut g = self.last.lock().unwrap();
        match g.as_mut() {
            Some(h) if h.epoch == epoch => h.bytes += bytes as u64,
            _ => {
                *g = Some(HeldOutput {
                    epoch,
                    first_at: at,
                    bytes: bytes as u64,
                });
                self.cv.notify_all();
            }
        }
    }

    /// What is held for `epoch` so far, if anything.
    pub fn of(&self, epoch: u64) -> Option<HeldOutput> {
        (*self.last.lock().unwrap()).filter(|h| h.epoch == epoch)
    }

    /// Waits at most `timeout` for output of `epoch` to be held (returns at
    /// once if some already is); returns what is held for it.
    pub fn wait(&self, epoch: u64, timeout: Duration) -> Option<HeldOutput> {
        let g = self.last.lock().unwrap();
        let (g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |h| !h.is_some_and(|h| h.epoch == epoch))
            .unwrap();
        (*g).filter(|h| h.epoch == epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{tests::wire, Mode, OutputQueue};
    use std::time::{Duration, Instant};

    const LONG: Duration = Duration::from_secs(5);

    #[test]
    fn holding_a_new_epochs_output_wakes_the_waiter_with_its_emit_time() {
        let q = OutputQueue::start(Mode::Commit).unwrap();
        let sig = q.held_signal();
        let (w, _rx) = wire();
        let h = q.handle(w);
        let waiter = {
            let sig = sig.clone();
            std::thread::spawn(move || sig.wait(1, LONG))
        };
        let before = Instant::now();
        h.emit_now(&[0u8; 64]);
        let got = waiter.join().unwrap().expect("woken by the held frame");
        assert_eq!(got.epoch, 1);
        assert!(got.first_at >= before && got.first_at <= Instant::now());
        // A second frame of the same epoch adds its bytes, same first time.
        h.emit_now(&[0u8; 36]);
        q.open_epoch(2);
        h.emit_now(&[0u8; 10]);
        let two = sig.wait(2, LONG).expect("epoch 2 held");
        assert_eq!(two.bytes, 10);
        assert_eq!(sig.of(1), None, "only the running epoch is kept");
        q.shutdown().unwrap();
    }

    #[test]
    fn output_that_is_not_held_raises_nothing() {
        let mut q = OutputQueue::start(Mode::Commit).unwrap();
        q.unprotect().unwrap();
        let sig = q.held_signal();
        let (w, rx) = wire();
        let h = q.handle(w);
        h.emit_now(b"free");
        rx.recv_timeout(LONG).expect("passed through");
        assert_eq!(sig.wait(1, Duration::from_millis(20)), None);
        q.shutdown().unwrap();
    }

    #[test]
    fn bytes_accumulate_per_epoch() {
        let q = OutputQueue::start(Mode::Commit).unwrap();
        let sig = q.held_signal();
        let (w, _rx) = wire();
        let (pw, prx) = wire();
        let h = q.handle(w);
        let probe = q.handle(pw);
        for _ in 0..3 {
            h.emit_now(&[1u8; 100]);
        }
        // The probe (tag 0, released at once) proves the thread saw them.
        probe.emit(0, b"p");
        prx.recv_timeout(LONG).unwrap();
        assert_eq!(sig.of(1).map(|h| h.bytes), Some(300));
        q.shutdown().unwrap();
    }
}
