//! What the primary's threads hand each other: a unit of work (a seed round
//! or a checkpoint), its metadata, and the encoders' output.
//!
//! Invariants:
//! - A unit's number is its place in the send order: seed rounds first,
//!   then one unit per checkpoint; `castor-tx` sends unit u+1 only after u.
//! - An [`EpochJob`]'s staging buffer is written only during the pause, before
//!   the job is dispatched, and read only by encoders; it goes back to the
//!   epoch thread once every holder of the job's `Arc` dropped it.
//! - [`Pipe::dispatch`] sends the metadata to `castor-tx` before any encoder can
//!   report a shard, and does not keep the job itself.

use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use crate::codec::Compressor;
use crate::engine::shadow::PageBuf;
use crate::metrics::EpochRecord;
use crate::transport::messages::EpochClass;

/// One unit's work for the encoders. Seed jobs have no staging: encoders
/// read live guest memory for their whole shard.
pub(super) struct EpochJob {
    /// Position in the send order: seed rounds first, then checkpoints.
    pub unit: u64,
    pub epoch: u64,
    pub source: Source,
    /// What the encoders compress with (chosen per unit).
    pub compressor: Compressor,
}

/// Where an encoder reads the job's pages.
pub(super) enum Source {
    /// Every page of the shard, live (first seed round).
    AllLive,
    /// The listed pages, live (later seed rounds).
    Live(Vec<u64>),
    /// The listed pages, live, none of them sent before in this session
    /// (the seed's first round): the backup holds each as zeros, and so
    /// does the shadow, which is therefore not read (reading never-written
    /// shadow pages would map the zero page, and the update after it would
    /// cost a copy-on-write fault and a TLB shootdown per page).
    FirstPass(Vec<u64>),
    /// Page `gfns[i]` is in staging slot `i`, copied during the pause.
    Staged(Vec<u64>, PageBuf),
}

/// How one encoder's share of a unit encoded.
#[derive(Default)]
pub(super) struct ShardStats {
    pub unchanged: u64,
    pub zero: u64,
    pub delta: u64,
    pub full: u64,
    pub raw_bytes: u64,
    pub encode_us: u64,
}

/// One encoder's encoded share of a unit: Pages records, ready to send.
pub(super) struct ShardOut {
    pub unit: u64,
    pub shard: usize,
    pub buf: Vec<u8>,
    pub records: u32,
    pub entries: u64,
    pub stats: ShardStats,
}

/// What the epoch thread knows of a unit: the saved state and timings.
pub(super) struct Meta {
    pub unit: u64,
    pub epoch: u64,
    pub class: EpochClass,
    /// Seed rounds: the first opens epoch 0, the last closes it.
    pub first_round: bool,
    pub last_round: bool,
    pub dirty: u64,
    pub state: Vec<u8>,
    pub record: EpochRecord,
    pub pause_start: Instant,
    pub job: Arc<EpochJob>,
    /// Checkpoints: the disk writes cut in this epoch's pause.
    pub disk: crate::disk::session::EpochDisks,
}

/// Messages to `castor-tx`.
pub(super) enum TxMsg {
    Meta(Box<Meta>),
    Shard(ShardOut),
    /// No epoch after this one; send Close once it is out.
    Finish(u64),
}

/// The epoch thread's ends of the pipeline.
pub(super) struct Pipe<'a> {
    pub tx: &'a Sender<TxMsg>,
    pub jobs: &'a [Sender<Arc<EpochJob>>],
}

impl Pipe<'_> {
    /// Hands a unit to the tx thread (its metadata) and to every encoder (its
    /// pages). The job's Arc is not kept: the tx thread reclaims staging once
    /// every encoder dropped its clone.
    pub fn dispatch(&self, meta: Meta) {
        let job = meta.job.clone();
        let _ = self.tx.send(TxMsg::Meta(Box::new(meta)));
        // The last encoder gets our own clone: once every encoder has reported,
        // the tx thread's is the only one left and it can reclaim the staging.
        if let Some((last, rest)) = self.jobs.split_last() {
            for j in rest {
                let _ = j.send(job.clone());
            }
            let _ = last.send(job);
        }
    }

    /// Tells the tx thread that `epoch` is the last one.
    pub fn finish(&self, epoch: u64) {
        let _ = self.tx.send(TxMsg::Finish(epoch));
    }
}
