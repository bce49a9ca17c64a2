//! State the primary's threads share: the in-flight table (what was sent and
//! not yet acknowledged), the failure flag, metrics, and the pause gate that
//! holds encoders back while the guest is paused.
//!
//! Invariants:
//! - `Inflight::broken` is set once and never cleared: the first failure
//!   wins, and every wait on `cv` returns it ([`Shared::wait_while`]).
//! - Every change to `inflight` is followed by `cv.notify_all()`, so waiters
//!   (backpressure, the seed, the final ack) see it at once; they also wake
//!   every 50 ms.
//! - While `pausing` is set encoders do not start another page; it is
//!   cleared on every path out of a pause ([`PauseGate`] reopens on drop).
//! - The first failure also shuts the session's connection down (both
//!   ways, [`Shared::fail`]): a write blocked on a partitioned link, a read
//!   waiting for an ack and a zero-copy send all return at once, so the
//!   teardown that joins them is never held by the network. Bytes the
//!   backup sent before (its Error record) stay readable.

use std::collections::BTreeMap;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{PrimaryConfig, PrimaryError};
use crate::engine::codec_choice::CodecChoice;
use crate::ha::lease::LeaseGate;
use crate::metrics::{EpochRecord, Metrics};

pub(super) struct InflightEntry {
    pub record: EpochRecord,
    pub pause_start: Instant,
    /// When its last byte was handed to the sink; None while sending.
    pub sent_at: Option<Instant>,
}

#[derive(Default)]
pub(super) struct Inflight {
    /// Highest epoch acknowledged; None before the seed's ack.
    pub acked: Option<u64>,
    /// Sent (or being sent), not yet acknowledged, by epoch.
    pub pending: BTreeMap<u64, InflightEntry>,
    /// Set once the link failed; the reason.
    pub broken: Option<String>,
    /// The backup itself reported an error and refused to go on (a
    /// mismatched configuration, a stream it found corrupt).
    pub refused: bool,
    /// The session failed because the backup went silent (nothing read
    /// for the backup timeout), not because the link reported an error.
    pub silent: bool,
    /// Units (seed rounds and checkpoints) fully handed to the sink.
    pub units_sent: u64,
    /// When the last ack arrived.
    pub last_ack_at: Option<Instant>,
}

impl Inflight {
    /// The session's failure, once it failed.
    pub fn error(&self) -> Option<PrimaryError> {
        let reason = self.broken.clone()?;
        Some(if self.refused {
            PrimaryError::Refused { reason }
        } else {
            PrimaryError::BackupLost {
                acked: self.acked.unwrap_or(0),
                reason,
            }
        })
    }
}

pub(super) struct Shared {
    pub inflight: Mutex<Inflight>,
    pub cv: Condvar,
    pub metrics: Mutex<Metrics>,
    pub seed_done: Mutex<Option<(Duration, u64)>>,
    /// Pages the seed's first pass read (those that may hold data).
    pub seed_first_pass: AtomicU64,
    pub stop_encoders: AtomicBool,
    /// Set while the guest is paused: encoders step aside so the copy
    /// threads have the cores (the pause is what the guest feels).
    pausing: AtomicBool,
    gate: Mutex<()>,
    gate_cv: Condvar,
    /// When checkpointing began (after the seed): run time is counted from here.
    pub ckpt_start: std::sync::OnceLock<Instant>,
    /// Set when the run ends because the arbiter's lease lapsed.
    pub lease_lost: AtomicBool,
    /// When the last record from the backup was read.
    pub heard: Mutex<Instant>,
    /// The session's one lease gate: the lease watcher, each pause and the
    /// output queue ask it.
    pub lease: LeaseGate,
    /// The per-epoch compression choice: `castor-tx` feeds it each unit's
    /// costs, the epoch thread asks it before dispatching a unit.
    pub codec: Mutex<CodecChoice>,
    /// The guest's progress when checkpointing began and at the final
    /// pause (domains that can tell), for the guest's rate while protected.
    pub progress: Mutex<(
        Option<crate::domain::ProgressMark>,
        Option<crate::domain::ProgressMark>,
    )>,
    /// The session's connection, shut down by the first failure.
    link: Mutex<Option<TcpStream>>,
}

impl Shared {
    pub fn new(cfg: &PrimaryConfig) -> Self {
        Shared {
            inflight: Mutex::new(Inflight::default()),
            cv: Condvar::new(),
            metrics: Mutex::new(Metrics::new(cfg.keep_records)),
            seed_done: Mutex::new(None),
            seed_first_pass: AtomicU64::new(0),
            stop_encoders: AtomicBool::new(false),
            pausing: AtomicBool::new(false),
            gate: Mutex::new(()),
            gate_cv: Condvar::new(),
            ckpt_start: std::sync::OnceLock::new(),
            lease_lost: AtomicBool::new(false),
            heard: Mutex::new(Instant::now()),
            lease: cfg.lease_gate(),
            codec: Mutex::new(cfg.codec_choice()),
            progress: Mutex::new((None, None)),
            link: Mutex::new(None),
        }
    }

    /// Registers the session's connection (a clone) for [`Shared::fail`]
    /// to shut down; shut down at once if the session already failed.
    pub fn set_link(&self, conn: TcpStream) {
        let mut link = self.link.lock().unwrap();
        // Checked after taking `link`: a failure either sees the link
        // stored or is seen here.
        if self.inflight.lock().unwrap().broken.is_some() {
            let _ = conn.shutdown(Shutdown::Both);
        }
        *link = Some(conn);
    }

    /// Shuts the session's connection down both ways: every thread blocked
    /// on it (a write into a full send buffer, a read waiting for the
    /// backup) returns now. Idempotent.
    pub fn cut_link(&self) {
        if let Some(c) = self.link.lock().unwrap().as_ref() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    fn set_pausing(&self, on: bool) {
        let _g = self.gate.lock().unwrap();
        self.pausing.store(on, Ordering::SeqCst);
        if !on {
            self.gate_cv.notify_all();
        }
    }

    /// Called by encoders between pages: blocks while a pause is underway.
    pub fn yield_to_pause(&self) {
        if self.pausing.load(Ordering::Relaxed) {
            let mut g = self.gate.lock().unwrap();
            while self.pausing.load(Ordering::SeqCst) {
                g = self.gate_cv.wait(g).unwrap();
            }
        }
    }

    /// Waits on the in-flight table while `cond` holds; fails as soon as the
    /// link is broken.
    pub fn wait_while<'a>(
        &'a self,
        mut g: MutexGuard<'a, Inflight>,
        cond: impl Fn(&Inflight) -> bool,
    ) -> Result<MutexGuard<'a, Inflight>, PrimaryError> {
        while cond(&g) {
            if let Some(e) = g.error() {
                return Err(e);
            }
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(50))
                .unwrap()
                .0;
        }
        Ok(g)
    }

    /// Fails the session (the first reason wins) and cuts the link, so no
    /// thread of the session stays blocked on the network.
    pub fn fail(&self, reason: String) {
        let mut g = self.inflight.lock().unwrap();
        if g.broken.is_none() {
            g.broken = Some(reason);
        }
        self.cv.notify_all();
        drop(g);
        self.cut_link();
    }

    /// The backup was silent for the backup timeout: the session fails.
    pub fn fail_silent(&self, reason: String) {
        let mut g = self.inflight.lock().unwrap();
        if g.broken.is_none() {
            g.broken = Some(reason);
            g.silent = true;
        }
        self.cv.notify_all();
        drop(g);
        self.cut_link();
    }

    /// The backup reported an error: the session fails as refused. The
    /// backup's own reason wins over an earlier plain failure: a backup
    /// that refuses and hangs up makes the primary's next write fail with
    /// a reset, which may be seen before the refusal is read.
    pub fn refuse(&self, reason: String) {
        let mut g = self.inflight.lock().unwrap();
        if !g.refused {
            g.broken = Some(reason);
            g.refused = true;
        }
        self.cv.notify_all();
        drop(g);
        self.cut_link();
    }

    /// The arbiter's lease lapsed: the session fails, and its end is
    /// reported as a self-fence.
    pub fn lease_lapsed(&self) {
        self.lease_lost.store(true, Ordering::SeqCst);
        self.fail("the arbiter's lease lapsed".into());
    }
}

/// Holds encoders back for the length of a pause; reopens on drop, so an
/// error inside the pause cannot leave them blocked.
pub(super) struct PauseGate<'a>(&'a Shared);

impl<'a> PauseGate<'a> {
    pub fn close(s: &'a Shared) -> Self {
        s.set_pausing(true);
        PauseGate(s)
    }
}

impl Drop for PauseGate<'_> {
    fn drop(&mut self) {
        self.0.set_pausing(false);
    }
}
