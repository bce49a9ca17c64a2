//! The primary: runs the guest in epochs and streams checkpoints.
//!
//! ```text
//! castor-epoch: wait timer ─► wait in-flight < K ─► pause ─► harvest ─► copy ─► save state ─► resume
//!                   │ EpochJob (Arc: gfns + staging)                     │ Meta (state, timings)
//!                   ▼                                                    ▼
//! castor-enc-N: encode own gfn shard vs shadow ─► ShardOut ─────► castor-tx: assemble epoch in order,
//!                                                                  send Begin, Pages…, State, End
//! castor-ack:   Ack(N) ─► latency, metrics, commit output N, free in-flight slot ◄── backup
//! ```
//!
//! One file per responsibility:
//!
//! | file | responsibility |
//! |------|----------------|
//! | `config.rs`  | [`PrimaryConfig`], the tunables, and the session's lease gate |
//! | `session.rs` | [`run_session`]: start the threads, run the epoch thread, tear down |
//! | `epoch.rs`   | `castor-epoch`: the checkpoint loop and the pause itself |
//! | `seed.rs`    | epoch 0: live pre-copy rounds and when they stop |
//! | `pacing.rs`  | before the pause: epoch deadlines and backpressure (extension) |
//! | `budget.rs`  | the pause budget: the dirty pages an epoch may collect |
//! | `staging.rs` | staging buffers the pause copies into, and their recycling |
//! | `dirty.rs`   | merging harvests; recent dirty lists |
//! | `job.rs`     | the messages between threads, and dispatching a unit |
//! | `encode.rs`  | `castor-enc-N`: encode one shard of each unit against the shadow |
//! | `tx.rs`      | `castor-tx`: assemble, frame and send units in order; heartbeats |
//! | `ack.rs`     | `castor-ack`: acks, output commit, latency |
//! | `watch.rs`   | `castor-lease`, `castor-watch`, `castor-progress` |
//! | `shared.rs`  | the in-flight table, failure flag and pause gate the threads share |
//!
//! Where the next features land (seams, no behaviour yet):
//! - throttling the guest when it dirties faster than the pipeline ships:
//!   a verdict of `pacing::Pacer::wait_for_pause`, decided before the pause;
//! - an adaptive epoch length: `pacing::Pacer::next_epoch`, the one place the
//!   next deadline is chosen (inputs: the epoch's `EpochRecord`);
//! - per-record MACs: `tx::Tx::frame` and the sink, where every record of a
//!   unit is written;
//! - disk-write records: collected in `epoch::Driver::pause` next to the
//!   state save, carried in `job::Meta`, framed by `tx::Tx::frame` between
//!   the pages and the State record.
//!
//! Invariants:
//! - Epochs reach the wire strictly in order, each whole (Begin, all shards,
//!   State, End), because only `castor-tx` writes and it sends epoch N+1
//!   only after N.
//! - The shadow equals what the backup will hold once it applies everything
//!   sent: encoders update the shadow exactly with the bytes they encoded,
//!   and each gfn belongs to one encoder.
//! - At most `max_inflight` checkpoints are unacknowledged when a pause
//!   starts; the wait for a slot is recorded as the epoch's extension.
//! - The guest's pause holds only harvest, copy and state save (plus the
//!   lease check and the output epoch switch): the deadline and backpressure
//!   waits are taken before it, and so is readying staging; a pause whose
//!   dirty set outgrew the staging readied is given up before its epoch
//!   ends and taken again (see `epoch.rs`, `staging.rs`).
//! - The pause budget (`budget.rs`): an epoch whose dirty set reaches the
//!   pages a `--pause-target` pause can copy ends early, or, with K
//!   checkpoints in flight, the guest is throttled hard (then stopped, past
//!   the budget's slack) until a slot frees: both before the pause, and
//!   output stays held whatever the throttle.
//! - Output commit: the guest's output goes to a `castor-outq` queue
//!   (`Domain::attach_output`, before `start`). The epoch thread opens
//!   epoch N+1 in the queue between the pause ending N and the resume; the
//!   ack thread commits N when Ack(N) arrives. When the run fails, held
//!   output is dropped with the queue, never released.
//! - Self-fencing: with `PrimaryConfig::lease` (an arbiter whose hold can
//!   lapse) the guest runs, and output leaves, only while the session's
//!   [`LeaseGate`](crate::ha::lease::LeaseGate) says proceed: the lease
//!   thread, each pause and the output queue before every release ask it.
//!   Once it says fence, the guest is paused and never resumed, the output
//!   queue stops releasing, and the run ends with
//!   [`PrimaryError::LeaseLost`]; held output is then dropped.

mod ack;
pub mod budget;
mod config;
mod dirty;
mod encode;
mod epoch;
mod job;
mod pacing;
mod seed;
mod session;
mod shared;
mod staging;
mod tx;
mod watch;

use std::time::Duration;

use crate::digest::Digest;
use crate::domain::{Domain, DomainError};
use crate::metrics::Summary;
use crate::outq::{Mode, OutputQueue};
use crate::transport::record::RecordReader;
use crate::transport::RecordSink;

pub use config::PrimaryConfig;
pub use session::run_session;

#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    #[error("domain: {0}")]
    Domain(#[from] DomainError),
    #[error("sending to the backup failed at epoch {epoch}: {source}")]
    Send {
        epoch: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("backup connection lost (last acknowledged epoch {acked}): {reason}")]
    BackupLost { acked: u64, reason: String },
    #[error("the backup refused the session: {reason}")]
    Refused { reason: String },
    #[error("backup did not acknowledge epoch {epoch} within {waited:?}")]
    AckTimeout { epoch: u64, waited: Duration },
    #[error("protocol error from backup: {0}")]
    Protocol(String),
    #[error("self-fenced: the arbiter's lease is no longer held (last acknowledged epoch {acked}); the guest stays paused and its unacknowledged output was dropped")]
    LeaseLost { acked: u64 },
    #[error("output commit: {0}")]
    Output(#[from] crate::outq::nfqueue::NfqError),
}

/// What a finished primary run hands back.
pub struct PrimaryOutcome {
    pub summary: Summary,
    pub final_epoch: u64,
    pub acked_epoch: u64,
    /// Digest of memory + state at `final_epoch` (the domain is left paused there).
    pub digest: Digest,
    pub domain: Box<dyn Domain>,
    pub recent_dirty: Vec<Vec<u64>>,
    /// What the output queue held, released and dropped.
    pub output: crate::outq::OutqReport,
    /// The guest's progress from the first checkpoint to the final pause,
    /// where the domain can tell.
    pub guest_window: Option<crate::domain::progress::Window>,
    /// The guest's time frozen in checkpoint pauses (all epochs).
    pub guest_paused: std::time::Duration,
}

/// Runs the primary until the configured duration or epoch count is
/// reached, a stop signal arrives, or the backup is lost. `sink` and
/// `reader` are the two halves of an authenticated session.
pub fn run<R: std::io::Read + Send + 'static>(
    mut domain: Box<dyn Domain>,
    sink: Box<dyn RecordSink>,
    reader: RecordReader<R>,
    cfg: &PrimaryConfig,
) -> Result<PrimaryOutcome, (PrimaryError, Option<Box<dyn Domain>>)> {
    // Hold from the first item: sources are attached before the session
    // opens, and nothing they produce in between may pass through.
    let mut outq = match OutputQueue::start(Mode::Hold) {
        Ok(q) => q,
        Err(e) => return Err((PrimaryError::Protocol(e.to_string()), Some(domain))),
    };
    if let Err(e) = domain.attach_output(&outq) {
        return Err((e.into(), Some(domain)));
    }
    // Host-device output next to the domain's own; kept past the
    // shutdown, so held packets get their NF_DROP on a live socket.
    let host = match crate::outq::nfqueue::attach(&outq, cfg.nfqueue.as_ref()) {
        Ok(h) => h,
        Err(e) => return Err((e.into(), Some(domain))),
    };
    let mut out = run_session(domain, &mut outq, sink, reader, cfg);
    // Nothing uncommitted is held after a clean stop; on an error the
    // session's held output was already dropped. Shutting down releases
    // nothing either way.
    match (outq.shutdown(), &mut out) {
        (Ok(r), Ok(o)) => o.output = r,
        (Ok(_), Err(_)) => {}
        (Err(e), _) => tracing::warn!("output queue: {e}"),
    }
    if let Some(h) = host {
        eprintln!("castor: {}", h.describe());
    }
    out
}
