//! Memory lent to the uring sink ([`Lent`]) while the kernel may read it.
//!
//! Every `send` of the sink opens a loan id; each submitted operation of
//! that send counts under it until both its completion and (zero copy) its
//! notification arrived. A lent send's memory is held here under its id
//! and given back the moment its count reaches zero, whichever call of
//! the sink reaps that last completion. A borrowed send's id holds nothing:
//! its caller waits for the count itself.
//!
//! Invariant: a held loan is given back only when no operation of its id
//! is due (the kernel reads none of its memory), and after a failure only
//! then too: [`Loans::settle`] leaks, never frees, what is still due.

use std::collections::HashMap;

use crate::transport::link::Lent;

#[derive(Default)]
pub(super) struct Loans {
    next: u64,
    /// Operations still due per id (ids with none are absent).
    due: HashMap<u64, usize>,
    /// Lent memory whose operations are still due, by id.
    held: HashMap<u64, Box<dyn Lent>>,
    /// Loans given back so far.
    pub(super) given_back: u64,
}

impl Loans {
    /// A new id for the operations of one send.
    pub(super) fn open(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    /// An operation of `id` was queued.
    pub(super) fn op_started(&mut self, id: u64) {
        *self.due.entry(id).or_insert(0) += 1;
    }

    /// An operation of `id` is over (completed and notified, or never
    /// submitted); gives the loan back if it was the last.
    pub(super) fn op_done(&mut self, id: u64) {
        let Some(n) = self.due.get_mut(&id) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            self.due.remove(&id);
            if let Some(l) = self.held.remove(&id) {
                self.given_back += 1;
                l.give_back();
            }
        }
    }

    /// No operation of `id` is due.
    pub(super) fn is_done(&self, id: u64) -> bool {
        !self.due.contains_key(&id)
    }

    /// Takes `lent`, the memory of `id`'s operations: given back at once
    /// if none is due, else when the last is over.
    pub(super) fn hold(&mut self, id: u64, lent: Box<dyn Lent>) {
        if self.is_done(id) {
            self.given_back += 1;
            lent.give_back();
        } else {
            self.held.insert(id, lent);
        }
    }

    /// Lent memory the sink still holds.
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.held.len()
    }

    /// After the connection was torn down and its notifications awaited:
    /// what is still held has operations due that will never be reported,
    /// so the kernel may read it for ever: leaked, never freed. Returns
    /// how many loans were leaked.
    pub(super) fn leak_held(&mut self) -> usize {
        let n = self.held.len();
        for (_, l) in self.held.drain() {
            std::mem::forget(l);
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct Buf(Vec<u8>, mpsc::Sender<Vec<u8>>);

    impl Lent for Buf {
        fn pieces(&self) -> Vec<&[u8]> {
            vec![&self.0]
        }
        fn give_back(self: Box<Self>) {
            let _ = self.1.send(self.0);
        }
    }

    /// A held loan comes back exactly when its last operation is over,
    /// not before; one with nothing due comes back at once.
    #[test]
    fn a_loan_comes_back_after_its_last_operation() {
        let (tx, rx) = mpsc::channel();
        let mut l = Loans::default();
        let id = l.open();
        l.op_started(id);
        l.op_started(id);
        l.hold(id, Box::new(Buf(vec![1], tx.clone())));
        l.op_done(id);
        assert!(rx.try_recv().is_err(), "given back with an operation due");
        assert_eq!(l.held(), 1);
        l.op_done(id);
        assert_eq!(rx.try_recv().unwrap(), vec![1]);
        assert_eq!(l.held(), 0);
        let id2 = l.open();
        l.hold(id2, Box::new(Buf(vec![2], tx)));
        assert_eq!(rx.try_recv().unwrap(), vec![2]);
        assert_eq!(l.given_back, 2);
    }

    /// After a failure, a loan with operations due is leaked (never given
    /// back, so never reused), the others come back.
    #[test]
    fn a_failed_sinks_unfinished_loans_are_leaked() {
        let (tx, rx) = mpsc::channel();
        let mut l = Loans::default();
        let (a, b) = (l.open(), l.open());
        l.op_started(a);
        l.op_started(b);
        l.hold(a, Box::new(Buf(vec![1], tx.clone())));
        l.hold(b, Box::new(Buf(vec![2], tx)));
        l.op_done(a);
        assert_eq!(rx.try_recv().unwrap(), vec![1]);
        assert_eq!(l.leak_held(), 1);
        assert_eq!(l.held(), 0);
        // Leaked: its sender was forgotten with it, so the channel stays
        // open and nothing arrives.
        assert!(matches!(rx.try_recv(), Err(mpsc::TryRecvError::Empty)));
    }
}
