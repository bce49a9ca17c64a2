//! Output commit: the queue that holds everything the guest says to the
//! outside world until the backup holds the checkpoint that produced it
//! (DESIGN.md, guarantee 1).
//!
//! ```text
//! vCPU thread ── OutputHandle::emit(epoch, frame) ──┐   (mpsc, no lock)
//! castor-ack  ── OutputQueue::commit(N) ────────────┤
//! castor-epoch ─ OutputQueue::open_epoch(N+1) (atomic store, at the pause)
//!                                                   ▼
//!                 castor-outq: hold items tagged > committed; on commit(N)
//!                 release every held item tagged ≤ N, in production order,
//!                 to its destination (an [`Egress`], e.g. the TAP)
//! ```
//!
//! Invariants:
//! - Only `castor-outq` owns held items and destinations; producers and the
//!   engine talk to it by message, so nothing on the hot path takes a lock.
//! - Epoch tagging is exact. Items produced while epoch N runs (after the
//!   pause that ended N-1, before the pause that ends N) are tagged N. The
//!   engine advances the counter with [`OutputQueue::open_epoch`] *between*
//!   `Domain::pause` and `Domain::resume`: every producer is part of the
//!   guest (the kvm NIC transmits on the vCPU thread) and is parked then, so
//!   no producer can read the counter across the boundary. Host-device
//!   sources ([`nfqueue`]) are not parked; they tag what they read with
//!   the epoch running at the read, which is never earlier than the epoch
//!   that produced it (conservative: held at most one epoch longer).
//! - In commit mode an item is released only after `commit(n)` with
//!   n ≥ its tag. `commit` is monotonic: a smaller n than already committed
//!   is ignored. Items of one destination leave in the order they were
//!   emitted.
//! - Nothing uncommitted is ever released: [`OutputQueue::shutdown`], drop
//!   of the queue, and any error path discard held items (counted as
//!   dropped and reported), they never flush them.
//! - With a gate ([`OutputQueue::gate`]: the arbiter's lease), nothing is
//!   released unless the lease is held for the gate's margin at that
//!   moment; what the gate stops stays held (and is dropped at shutdown).
//! - [`Mode::PassThrough`] (`--no-output-commit`) releases every item at
//!   once. It breaks guarantee 1 and exists for experiments only.
//! - Protection sessions. The queue outlives any one backup: a live copy
//!   that loses its backup keeps running unprotected (pass-through) while
//!   it holds the arbiter, and is protected again when a backup returns.
//!   [`OutputQueue::protect`] opens a session (commit mode, epoch 1,
//!   nothing committed); [`OutputQueue::unprotect`] ends it, dropping what
//!   it still held. A commit carries its session: a late ack of an old
//!   backup can never release output of the next session.
//! - [`OutputQueue::fence`] drops everything held and everything produced
//!   from then on: the state of a copy that may no longer be the live one
//!   never leaves.
//! - [`Mode::Hold`] is how a primary's queue starts: sources (the domain's
//!   NIC, NFQUEUE) are attached before the first session opens, and what
//!   they produce in that window is held, never passed through. The first
//!   [`OutputQueue::protect`] carries it into the session (tagged with the
//!   first epoch, whose checkpoint covers it); `unprotect` releases it (no
//!   backup was asked for); `fence` drops it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use hdrhistogram::Histogram;

use crate::ha::lease::{LeaseGate, Verdict};
pub use crate::stats::OutqReport;
use crate::stats::Pct;

/// Errors of the output queue.
#[derive(Debug, thiserror::Error)]
pub enum OutqError {
    #[error("spawning the castor-outq thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the castor-outq thread panicked")]
    Panicked,
}

/// Where released items go (the TAP of a kvm NIC, a test recorder...).
/// Owned by the queue thread once registered.
pub trait Egress: Send {
    /// Sends one released frame. Runs on `castor-outq`; must not block long.
    fn release(&mut self, frame: &[u8]);
    /// Called for each item thrown away (shutdown, end of a session,
    /// fenced): never released. A destination that holds the real packets
    /// elsewhere (NFQUEUE: in the kernel) must drop them; default: nothing.
    fn discard(&mut self, _frame: &[u8]) {}
    /// Called after each batch of `release`/`discard` calls (one commit,
    /// one pass-through item, a drop), so a destination can act on the
    /// batch at once (NFQUEUE: one batch verdict).
    fn flush(&mut self) {}
}

/// Discards `items` at their destinations (never released), then flushes.
fn discard_all(
    items: impl IntoIterator<Item = Item>,
    dests: &mut [Option<Box<dyn Egress>>],
) -> u64 {
    let mut n = 0;
    for it in items {
        if let Some(Some(d)) = dests.get_mut(it.dest) {
            d.discard(&it.frame);
        }
        n += 1;
    }
    dests.iter_mut().flatten().for_each(|d| d.flush());
    n
}

/// Whether the queue holds output until its epoch is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Output commit: hold until `commit` of the item's epoch.
    Commit,
    /// Release at once. UNSAFE while a backup exists: output may leave
    /// before the backup holds the state that produced it; for latency
    /// experiments, and for a live copy that has no backup (unprotected).
    PassThrough,
    /// Release nothing, ever: the copy self-fenced.
    Fenced,
    /// Hold everything until the first mode change: a queue whose sources
    /// are attached before its first protection session opens.
    Hold,
}

enum Msg {
    Register(usize, Box<dyn Egress>),
    Item(Item),
    /// (session, epoch)
    Commit(u64, u64),
    Gate(LeaseGate),
    /// Enter `mode`; a new commit-mode session gets this number.
    SetMode(Mode, u64, Sender<OutqReport>),
    Shutdown(Sender<OutqReport>),
}

struct Item {
    dest: usize,
    epoch: u64,
    at: Instant,
    frame: Vec<u8>,
}

/// State shared by the queue and its handles: only atomics.
struct Tags {
    /// The epoch the guest is running now; producers tag items with it.
    current: AtomicU64,
    /// The protection session commits must name (0: none yet).
    session: AtomicU64,
    /// Items emitted after the thread ended.
    late: AtomicU64,
    next_dest: AtomicU64,
    /// Items handed to the queue so far (for the adaptive epoch: did the
    /// guest produce output during the epoch just ended?).
    emitted: AtomicU64,
    /// Raised by the queue thread when it starts holding a new epoch's
    /// output (the adaptive epoch's wake-up).
    held: Arc<HeldSignal>,
}

/// A producer's end: cloneable, cheap, bound to one destination.
#[derive(Clone)]
pub struct OutputHandle {
    tx: Sender<Msg>,
    tags: Arc<Tags>,
    dest: usize,
}

impl OutputHandle {
    /// The epoch now running: what an item produced now must be tagged with.
    pub fn epoch(&self) -> u64 {
        self.tags.current.load(Ordering::Acquire)
    }

    /// Hands `frame`, produced during `epoch`, to the queue. Never blocks.
    pub fn emit(&self, epoch: u64, frame: &[u8]) {
        let item = Item {
            dest: self.dest,
            epoch,
            at: Instant::now(),
            frame: frame.to_vec(),
        };
        self.tags.emitted.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(Msg::Item(item)).is_err() {
            // The queue is gone: the item is dropped, never released.
            self.tags.late.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Emits `frame` tagged with the epoch now running.
    pub fn emit_now(&self, frame: &[u8]) {
        self.emit(self.epoch(), frame)
    }
}

/// The engine's end: owns the `castor-outq` thread.
pub struct OutputQueue {
    tx: Sender<Msg>,
    tags: Arc<Tags>,
    mode: Mode,
    thread: Option<JoinHandle<()>>,
}

impl OutputQueue {
    /// Starts the queue thread. The first epoch is 1: output produced
    /// before the first checkpoint's pause belongs to checkpoint 1 (the
    /// seed, epoch 0, carries no device state, so its ack releases nothing).
    pub fn start(mode: Mode) -> Result<Self, OutqError> {
        let (tx, rx) = channel();
        let tags = Arc::new(Tags {
            current: AtomicU64::new(1),
            session: AtomicU64::new(u64::from(mode == Mode::Commit)),
            late: AtomicU64::new(0),
            next_dest: AtomicU64::new(0),
            emitted: AtomicU64::new(0),
            held: Arc::default(),
        });
        let held = tags.held.clone();
        let thread = std::thread::Builder::new()
            .name("castor-outq".into())
            .spawn(move || queue_thread(rx, mode, &held))
            .map_err(OutqError::Spawn)?;
        Ok(OutputQueue {
            tx,
            tags,
            mode,
            thread: Some(thread),
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// A producer handle whose items go to `dest` (moved to the queue thread).
    pub fn handle(&self, dest: Box<dyn Egress>) -> OutputHandle {
        let id = self.tags.next_dest.fetch_add(1, Ordering::Relaxed) as usize;
        // Sent before any item of this handle, so the thread knows `id`
        // first (one channel, FIFO).
        let _ = self.tx.send(Msg::Register(id, dest));
        OutputHandle {
            tx: self.tx.clone(),
            tags: self.tags.clone(),
            dest: id,
        }
    }

    /// The epoch now running.
    pub fn epoch(&self) -> u64 {
        self.tags.current.load(Ordering::Acquire)
    }

    /// Items emitted by every producer so far.
    pub fn emitted(&self) -> u64 {
        self.tags.emitted.load(Ordering::Relaxed)
    }

    /// The event raised when the queue starts holding an epoch's output:
    /// what the epoch clock waits on to end an epoch early.
    pub fn held_signal(&self) -> Arc<HeldSignal> {
        self.tags.held.clone()
    }

    /// Starts epoch `n`: items produced from now on are tagged `n`.
    /// Call only while every producer is parked (the guest is paused).
    pub fn open_epoch(&self, n: u64) {
        self.tags.current.store(n, Ordering::Release);
    }

    /// The backup acknowledged checkpoint `n`: release every item tagged
    /// ≤ n. Monotonic; a stale `n` is ignored by the thread.
    pub fn commit(&self, n: u64) {
        self.committer().commit(n)
    }

    /// From now on release only while `lease` is held for `margin` more
    /// (self-fencing; see the module invariants).
    pub fn gate(&self, lease: crate::ha::lease::LeaseWatch, margin: std::time::Duration) {
        self.set_gate(LeaseGate::new(Some(lease), margin));
    }

    /// From now on release only while `gate` says [`Verdict::Proceed`].
    pub fn set_gate(&self, gate: LeaseGate) {
        let _ = self.tx.send(Msg::Gate(gate));
    }

    /// A sender for `commit`, bound to the current protection session,
    /// that another thread (the ack thread) can own.
    pub fn committer(&self) -> Committer {
        Committer {
            tx: self.tx.clone(),
            session: self.tags.session.load(Ordering::Acquire),
        }
    }

    /// Opens a protection session: from now on items are held until their
    /// epoch is committed by a committer of this session; epochs restart
    /// at 1. Call while the guest is paused or before it runs.
    pub fn protect(&mut self) -> Result<OutqReport, OutqError> {
        let session = self.tags.session.load(Ordering::Acquire) + 1;
        self.tags.current.store(1, Ordering::Release);
        self.tags.session.store(session, Ordering::Release);
        self.set_mode(Mode::Commit, session)
    }

    /// Ends the protection session: items it still holds are dropped
    /// (never released) and later items pass straight through. Call only
    /// when no other copy can go live (the arbiter is held).
    pub fn unprotect(&mut self) -> Result<OutqReport, OutqError> {
        self.set_mode(Mode::PassThrough, 0)
    }

    /// Self-fencing: drops everything held and everything produced later.
    pub fn fence(&mut self) -> Result<OutqReport, OutqError> {
        self.set_mode(Mode::Fenced, 0)
    }

    /// Switches mode once the thread has handled everything sent before;
    /// returns the running report.
    fn set_mode(&mut self, mode: Mode, session: u64) -> Result<OutqReport, OutqError> {
        self.mode = mode;
        let (rtx, rrx) = channel();
        self.tx
            .send(Msg::SetMode(mode, session, rtx))
            .map_err(|_| OutqError::Panicked)?;
        rrx.recv().map_err(|_| OutqError::Panicked)
    }

    /// Stops the thread. Items not committed by now are dropped (counted in
    /// the report), never released.
    pub fn shutdown(mut self) -> Result<OutqReport, OutqError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<OutqReport, OutqError> {
        let Some(thread) = self.thread.take() else {
            return Ok(OutqReport::default());
        };
        let (rtx, rrx) = channel();
        let _ = self.tx.send(Msg::Shutdown(rtx));
        let report = rrx.recv();
        thread.join().map_err(|_| OutqError::Panicked)?;
        let mut r = report.map_err(|_| OutqError::Panicked)?;
        r.late = self.tags.late.load(Ordering::Relaxed);
        Ok(r)
    }
}

impl Drop for OutputQueue {
    /// Same as [`OutputQueue::shutdown`]: held output is dropped, never
    /// released.
    fn drop(&mut self) {
        if let Ok(r) = self.stop() {
            if r.dropped > 0 {
                tracing::warn!(
                    dropped = r.dropped,
                    committed = r.committed,
                    "output queue dropped uncommitted output"
                );
            }
        }
    }
}

/// Sends commits of one protection session to the queue from another
/// thread; once that session has ended its commits are ignored.
#[derive(Clone)]
pub struct Committer {
    tx: Sender<Msg>,
    session: u64,
}

impl Committer {
    /// See [`OutputQueue::commit`].
    pub fn commit(&self, n: u64) {
        let _ = self.tx.send(Msg::Commit(self.session, n));
    }
}

/// Release delays, µs: of every item, and of items tagged after the first
/// epoch (the first one also holds what the guest said during the seed,
/// which waits for the whole initial copy).
struct Delays {
    all: Histogram<u64>,
    steady: Histogram<u64>,
}

impl Default for Delays {
    fn default() -> Self {
        let h = || Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
        Delays {
            all: h(),
            steady: h(),
        }
    }
}

impl Delays {
    fn record(&mut self, epoch: u64, us: u64) {
        let _ = self.all.record(us);
        if epoch >= 2 {
            let _ = self.steady.record(us);
        }
    }

    fn report(&self, r: &mut OutqReport) {
        r.release_delay_us = Pct::of(&self.all);
        r.release_delay_steady_us = Pct::of(&self.steady);
    }
}

/// The queue thread's state: what castor-outq owns.
struct Queue<'a> {
    dests: Vec<Option<Box<dyn Egress>>>,
    held: VecDeque<Item>,
    mode: Mode,
    /// The current session (0: none) and its highest committed epoch.
    session: u64,
    committed: u64,
    /// No gate until one is set: releases need no lease.
    gate: LeaseGate,
    r: OutqReport,
    hist: Delays,
    signal: &'a HeldSignal,
    /// (released, dropped) last published to the process's telemetry.
    published: (u64, u64),
}

fn queue_thread(rx: Receiver<Msg>, mode: Mode, signal: &HeldSignal) {
    let session = u64::from(mode == Mode::Commit);
    let mut q = Queue {
        dests: Vec::new(),
        held: VecDeque::new(),
        mode,
        session,
        committed: 0,
        gate: LeaseGate::default(),
        r: OutqReport {
            sessions: session,
            ..OutqReport::default()
        },
        hist: Delays::default(),
        signal,
        published: (0, 0),
    };
    for msg in rx.iter() {
        match msg {
            Msg::Register(id, d) => {
                if q.dests.len() <= id {
                    q.dests.resize_with(id + 1, || None);
                }
                q.dests[id] = Some(d);
            }
            Msg::Item(it) => q.item(it),
            Msg::SetMode(m, s, reply) => {
                let _ = reply.send(q.set_mode(m, s));
            }
            Msg::Commit(s, n) => q.commit(s, n),
            Msg::Gate(g) => q.gate = g,
            Msg::Shutdown(reply) => {
                let _ = reply.send(q.shutdown());
                return;
            }
        }
        publish(&q.r, q.held.len(), &mut q.published);
    }
}

impl Queue<'_> {
    /// Whether the lease gate lets output leave now.
    fn open(&self) -> bool {
        self.gate.may_proceed(Instant::now()) == Verdict::Proceed
    }

    /// Hands one item to its destination (not flushed) and records its delay.
    fn release(&mut self, it: Item) {
        if let Some(Some(d)) = self.dests.get_mut(it.dest) {
            d.release(&it.frame);
        }
        self.r.released += 1;
        self.hist
            .record(it.epoch, (it.at.elapsed().as_micros() as u64).max(1));
    }

    fn release_now(&mut self, it: Item) {
        let dest = it.dest;
        self.release(it);
        if let Some(Some(d)) = self.dests.get_mut(dest) {
            d.flush();
        }
    }

    fn flush_all(&mut self) {
        self.dests.iter_mut().flatten().for_each(|d| d.flush());
    }

    fn item(&mut self, it: Item) {
        self.r.items += 1;
        match self.mode {
            Mode::Fenced => self.r.dropped += discard_all([it], &mut self.dests),
            Mode::Hold => {
                self.r.held += 1;
                self.held.push_back(it);
            }
            // The lease gate: nothing leaves without the arbiter.
            Mode::PassThrough if !self.open() => {
                self.r.dropped += discard_all([it], &mut self.dests)
            }
            Mode::PassThrough => {
                self.r.passed_through += 1;
                self.release_now(it);
            }
            Mode::Commit if it.epoch <= self.committed && self.open() => {
                self.r.passed_through += 1;
                self.release_now(it);
            }
            Mode::Commit => {
                self.r.held += 1;
                self.signal.held(it.epoch, it.at, it.frame.len());
                self.held.push_back(it);
            }
        }
    }

    /// Switches to mode `m` (session `s` when it is Commit); returns the
    /// report so far.
    fn set_mode(&mut self, m: Mode, s: u64) -> OutqReport {
        match (self.mode, m) {
            // Held before the first session: its first checkpoint covers
            // it (tags are at most that session's epoch 1).
            (Mode::Hold, Mode::Commit) => self.held.iter_mut().for_each(|it| it.epoch = 1),
            // No backup was asked for (--no-output-commit).
            (Mode::Hold, Mode::PassThrough) if self.open() => {
                while let Some(it) = self.held.pop_front() {
                    self.r.passed_through += 1;
                    self.release(it);
                }
                self.flush_all();
            }
            // Whatever the old session still held is not covered by any
            // backup that can still acknowledge it: drop, never release.
            _ => self.r.dropped += discard_all(self.held.drain(..), &mut self.dests),
        }
        self.r.committed = self.committed;
        self.mode = m;
        self.committed = 0;
        if m == Mode::Commit {
            self.session = s;
            self.r.sessions += 1;
        } else {
            self.session = 0;
        }
        self.hist.report(&mut self.r);
        self.r.clone()
    }

    /// Session `s` acknowledged epoch `n`: release what it covers.
    fn commit(&mut self, s: u64, n: u64) {
        if self.mode != Mode::Commit || s != self.session || n <= self.committed || !self.open() {
            return;
        }
        self.committed = n;
        // Tags are non-decreasing in production order when the tagging
        // invariant holds, so the releasable items are a prefix; keep any
        // later-tagged one in place regardless.
        let mut keep = VecDeque::with_capacity(self.held.len());
        while let Some(it) = self.held.pop_front() {
            if it.epoch <= n {
                self.release(it);
            } else {
                keep.push_back(it);
            }
        }
        self.held = keep;
        self.flush_all();
    }

    /// Drops what is held (never released) and returns the final report.
    fn shutdown(&mut self) -> OutqReport {
        self.r.dropped += discard_all(self.held.drain(..), &mut self.dests);
        publish(&self.r, 0, &mut self.published);
        self.r.committed = self.committed;
        self.hist.report(&mut self.r);
        self.r.clone()
    }
}

/// Tells the process's telemetry (`--metrics`) what changed since the
/// last call: items held now, released and dropped since.
fn publish(r: &OutqReport, held: usize, last: &mut (u64, u64)) {
    crate::ops::telemetry::with(|t| {
        t.output(held as u64, r.released - last.0, r.dropped - last.1);
    });
    *last = (r.released, r.dropped);
}

pub mod nfqueue;
mod signal;
pub use signal::{HeldOutput, HeldSignal};

#[cfg(test)]
mod tests;

#[cfg(test)]
mod gate_tests;
