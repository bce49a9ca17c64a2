//! The tx thread (`castor-tx`): the only writer of the connection. It
//! assembles each unit from its metadata and every encoder's shard, frames
//! it, and sends it whole and in order; between units it returns buffers,
//! sends heartbeats, and finally the Close record.
//!
//! Invariants:
//! - Units reach the sink strictly in unit order and each whole: epoch N's
//!   Begin, all its shards, State and End go out in one `send`, and N+1 only
//!   after N. The seed (epoch 0) spans several units: its first opens the
//!   epoch, its last closes it.
//! - A closing unit is entered in the in-flight table *before* it is sent,
//!   so an ack can never arrive for an epoch the ack thread does not know.
//! - Staging goes back to the epoch thread only once no encoder holds the
//!   unit's job any more; shard buffers go back to their encoder.
//! - With nothing to send for `hb_every`, a heartbeat goes out.
//! - Disks: the `Disks` record goes out before anything else; a
//!   checkpoint's `DiskWrites` records sit between its shards and its
//!   State, counted in its End; the seed's closing unit streams every
//!   non-zero region of each disk before the seed's End (one record per
//!   region, so a large disk never sits in memory whole).

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::job::{EpochJob, Meta, ShardOut, Source, TxMsg};
use super::shared::{InflightEntry, Shared};
use crate::disk;
use crate::disk::session::{encode_announce, EpochDisks, PrimaryDisks};
use crate::engine::codec_choice::Observed;
use crate::engine::shadow::PageBuf;
use crate::metrics::EpochRecord;
use crate::transport::messages::{EpochBegin, EpochClass, EpochEnd};
use crate::transport::record::{write_sealed_record, RecordKind};
use crate::transport::{Lent, RecordSink};
use crate::PAGE_SIZE;

/// Bytes of disk per seed record.
const SEED_CHUNK: usize = 1 << 20;

/// Tags a checkpoint's disk writes (already laid out as DiskWrites
/// records by the write log; their data is sent from there, not copied)
/// with its epoch and counts them into `rec`.
fn disk_records(epoch: u64, disks: &mut EpochDisks, rec: &mut EpochRecord) -> disk::frame::Framed {
    let framed = disk::frame::frame(disks, epoch);
    for (_, e) in disks.iter() {
        rec.disk_ops += e.op_count();
        rec.disk_bytes += e.data_bytes();
    }
    rec.disk_wire_bytes += framed.wire_bytes;
    framed
}

/// Where `castor-tx` returns buffers, and its fixed settings.
pub(super) struct TxEnds {
    pub shards: usize,
    pub shared: Arc<Shared>,
    /// Per encoder: its used output buffers.
    pub buf_return: Vec<Sender<Vec<u8>>>,
    /// To the epoch thread: staging buffers no job holds any more.
    pub staging_return: Sender<PageBuf>,
    pub seed_start: Instant,
    pub hb_every: Duration,
    /// The session's disks (announced first; their seed and writes).
    pub disks: PrimaryDisks,
}

/// A unit being put together from its parts.
struct Assembly {
    meta: Option<Meta>,
    shards: Vec<Option<ShardOut>>,
    got: usize,
}

/// A unit framed for the wire: the records around the shards.
struct Framed {
    head: Vec<u8>,
    tail: Vec<u8>,
    record: EpochRecord,
    /// The seed's End, held back until the disks' seed records are out.
    seed_end: Option<EpochEnd>,
}

/// A unit's buffers, lent to the sink for its send
/// ([`RecordSink::send_lent`]): the sink keeps them while the kernel may
/// still read them (zero copy) and gives them back then, the shard
/// buffers to their encoders.
struct UnitLoan {
    head: Vec<u8>,
    outs: Vec<ShardOut>,
    /// The DiskWrites records.
    disk_ops: EpochDisks,
    tail: Vec<u8>,
    buf_return: Vec<Sender<Vec<u8>>>,
}

impl Lent for UnitLoan {
    fn pieces(&self) -> Vec<&[u8]> {
        let mut v: Vec<&[u8]> = vec![&self.head];
        v.extend(self.outs.iter().map(|o| &o.buf[..]));
        v.extend(disk::frame::slices(&self.disk_ops));
        v.push(&self.tail);
        v
    }

    fn give_back(self: Box<Self>) {
        for o in self.outs {
            let _ = self.buf_return[o.shard].send(o.buf);
        }
    }
}

struct Tx {
    sink: Box<dyn RecordSink>,
    ends: TxEnds,
    pending: BTreeMap<u64, Assembly>,
    /// The next unit to send.
    next: u64,
    finish: Option<u64>,
    last_closed: Option<u64>,
    last_send: Instant,
    hb: Vec<u8>,
    /// The seed (epoch 0) spans several units (pre-copy rounds): its End and
    /// measurements so far.
    seed_end: EpochEnd,
    seed_rec: EpochRecord,
    /// Sent units whose job may still be referenced by an encoder.
    orphans: Vec<Arc<EpochJob>>,
}

/// Owns the sending half. Sends each epoch whole and in order.
pub(super) fn tx_thread(sink: Box<dyn RecordSink>, rx: Receiver<TxMsg>, ends: TxEnds) {
    let hb_every = ends.hb_every;
    let mut tx = Tx {
        sink,
        ends,
        pending: BTreeMap::new(),
        next: 0,
        finish: None,
        last_closed: None,
        last_send: Instant::now(),
        hb: Vec::new(),
        seed_end: EpochEnd::default(),
        seed_rec: EpochRecord::default(),
        orphans: Vec::new(),
    };
    if !tx.ends.disks.is_empty() {
        let mut v = Vec::new();
        let p = encode_announce(&tx.ends.disks.specs());
        write_sealed_record(&mut v, RecordKind::Disks, 0, &p);
        if let Err(e) = tx.sink.send(&[&v]) {
            tx.ends.shared.fail(format!("sending the disks: {e}"));
            tx.keep_if_kernel_reads(v);
            return;
        }
    }
    loop {
        match rx.recv_timeout(hb_every) {
            Ok(msg) => tx.take(msg),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        tx.sink.reclaim();
        // Send every complete unit that is next in line.
        while let Some(a) = tx.next_complete() {
            if tx.send_unit(a).is_err() {
                return;
            }
        }
        tx.reclaim_staging();
        if tx.close_if_done() {
            return;
        }
        if tx.last_send.elapsed() >= hb_every && tx.heartbeat().is_err() {
            return;
        }
    }
}

/// The session already failed (recorded in [`Shared`]).
struct Failed;

impl Tx {
    fn assembly(&mut self, unit: u64) -> &mut Assembly {
        let shards = self.ends.shards;
        self.pending.entry(unit).or_insert_with(|| Assembly {
            meta: None,
            shards: (0..shards).map(|_| None).collect(),
            got: 0,
        })
    }

    fn take(&mut self, msg: TxMsg) {
        match msg {
            TxMsg::Meta(m) => {
                let u = m.unit;
                self.assembly(u).meta = Some(*m);
            }
            TxMsg::Shard(s) => {
                let e = self.assembly(s.unit);
                let i = s.shard;
                e.shards[i] = Some(s);
                e.got += 1;
            }
            TxMsg::Finish(e) => self.finish = Some(e),
        }
    }

    /// The next unit in send order, once all its parts are in.
    fn next_complete(&mut self) -> Option<Assembly> {
        let a = self.pending.get(&self.next)?;
        if a.meta.is_none() || a.got < self.ends.shards {
            return None;
        }
        self.pending.remove(&self.next)
    }

    /// Builds the records around a unit's shards and its measurements
    /// (`wire_bytes` counts head, shards and tail).
    fn frame(&mut self, meta: &mut Meta, outs: &[ShardOut]) -> Framed {
        let seed = meta.class == EpochClass::Seed;
        let opens = !seed || meta.first_round;
        let closes = !seed || meta.last_round;
        let mut head = Vec::with_capacity(64);
        if opens {
            let begin = EpochBegin {
                class: meta.class,
                dirty: meta.dirty,
            };
            write_sealed_record(
                &mut head,
                RecordKind::EpochBegin,
                meta.epoch,
                &begin.encode(),
            );
        }
        let mut rec = if seed {
            std::mem::take(&mut self.seed_rec)
        } else {
            std::mem::take(&mut meta.record)
        };
        let mut end = if seed {
            self.seed_end
        } else {
            EpochEnd::default()
        };
        for o in outs {
            rec.unchanged_pages += o.stats.unchanged;
            rec.zero_pages += o.stats.zero;
            rec.delta_pages += o.stats.delta;
            rec.full_pages += o.stats.full;
            rec.raw_bytes += o.stats.raw_bytes;
            rec.encode_us += o.stats.encode_us;
            end.page_entries += o.entries;
            end.pages_records += o.records;
        }
        let mut tail = Vec::with_capacity(meta.state.len() + 64);
        let mut disk = disk::frame::Framed::default();
        if !seed {
            disk = disk_records(meta.epoch, &mut meta.disk, &mut rec);
            end.disk_records = disk.records;
        }
        if !seed {
            write_sealed_record(&mut tail, RecordKind::State, meta.epoch, &meta.state);
            end.state_len = meta.state.len() as u32;
        }
        let seed_disks = seed && closes && !self.ends.disks.is_empty();
        if closes && !seed_disks {
            write_sealed_record(&mut tail, RecordKind::EpochEnd, meta.epoch, &end.encode());
        }
        let shard_bytes: u64 = outs.iter().map(|o| o.buf.len() as u64).sum();
        rec.wire_bytes += head.len() as u64 + shard_bytes + disk.wire_bytes + tail.len() as u64;
        rec.state_bytes = meta.state.len() as u64;
        if seed && !closes {
            self.seed_end = end;
            self.seed_rec = rec.clone();
        }
        Framed {
            head,
            tail,
            record: rec,
            seed_end: seed_disks.then_some(end),
        }
    }

    /// Streams the disks' seed (every non-zero region) and then the seed's
    /// End counting those records.
    fn send_seed_disks(&mut self, mut end: EpochEnd) -> Result<(), Failed> {
        let mut v = Vec::new();
        let (sink, disks) = (&mut self.sink, &self.ends.disks);
        let r = disks.seed_payloads(SEED_CHUNK, |p| {
            v.clear();
            write_sealed_record(&mut v, RecordKind::DiskWrites, 0, p);
            end.disk_records += 1;
            sink.send(&[&v]).map_err(|e| e.to_string())
        });
        v.clear();
        write_sealed_record(&mut v, RecordKind::EpochEnd, 0, &end.encode());
        let r = r.and_then(|_| self.sink.send(&[&v]).map_err(|e| e.to_string()));
        if let Err(e) = r {
            self.ends
                .shared
                .fail(format!("sending the disks' seed: {e}"));
            self.keep_if_kernel_reads(v);
            return Err(Failed);
        }
        Ok(())
    }

    /// Frames and sends one complete unit, then hands its buffers back.
    fn send_unit(&mut self, a: Assembly) -> Result<(), Failed> {
        let mut meta = a.meta.expect("checked by next_complete");
        let outs: Vec<ShardOut> = a
            .shards
            .into_iter()
            .map(|s| s.expect("all shards present"))
            .collect();
        let seed = meta.class == EpochClass::Seed;
        let closes = !seed || meta.last_round;
        let Framed {
            head,
            tail,
            record,
            seed_end,
        } = self.frame(&mut meta, &outs);
        let shared = self.ends.shared.clone();
        let pages = outs.iter().map(|o| o.stats.raw_bytes).sum::<u64>() / PAGE_SIZE as u64;
        let encode_us = outs.iter().map(|o| o.stats.encode_us).sum();
        let loan = Box::new(UnitLoan {
            head,
            outs,
            disk_ops: std::mem::take(&mut meta.disk),
            tail,
            buf_return: self.ends.buf_return.clone(),
        });
        let wire_bytes = loan.pieces().iter().map(|b| b.len() as u64).sum();
        if closes {
            let mut g = shared.inflight.lock().unwrap();
            g.pending.insert(
                meta.epoch,
                InflightEntry {
                    record: record.clone(),
                    pause_start: meta.pause_start,
                    sent_at: None,
                },
            );
            crate::ops::telemetry::with(|t| t.set_inflight(g.pending.len()));
        }
        let t = Instant::now();
        // The sink owns the buffers from here (and leaks them itself if
        // the kernel may still read them after a failure).
        let r = self.sink.send_lent(loan);
        let send_us = t.elapsed().as_micros() as u64;
        let observed = Observed {
            compressor: meta.job.compressor,
            pages,
            encode_us,
            wire_bytes,
            send_us,
        };
        shared.codec.lock().unwrap().observe(&observed);
        self.last_send = Instant::now();
        if let Err(e) = r {
            shared.fail(format!("sending epoch {}: {e}", meta.epoch));
            return Err(Failed);
        }
        if let Some(end) = seed_end {
            self.send_seed_disks(end)?;
        }
        {
            let mut g = shared.inflight.lock().unwrap();
            if let Some(p) = g.pending.get_mut(&meta.epoch) {
                p.record.send_us += send_us;
                p.sent_at = Some(Instant::now());
            }
            g.units_sent = self.next + 1;
            shared.cv.notify_all();
        }
        if seed && closes {
            *shared.seed_done.lock().unwrap() =
                Some((self.ends.seed_start.elapsed(), record.wire_bytes));
        }
        if closes {
            self.last_closed = Some(meta.epoch);
        }
        self.orphans.push(meta.job);
        self.next += 1;
        Ok(())
    }

    /// After a failed send: buffers of that send the kernel may still read
    /// from (a zero-copy send whose notification never came, see
    /// [`RecordSink::kernel_kept_buffers`]) are leaked, never freed: freed
    /// memory would be reused and its new contents sent.
    fn keep_if_kernel_reads<T>(&self, bufs: T) {
        if self.sink.kernel_kept_buffers() {
            tracing::warn!("leaking the failed send's buffers: the kernel may still read them");
            std::mem::forget(bufs);
        }
    }

    /// Returns staging buffers whose job nobody else holds any more.
    fn reclaim_staging(&mut self) {
        let staging_return = &self.ends.staging_return;
        self.orphans.retain_mut(|job| {
            let Some(j) = Arc::get_mut(job) else {
                return true;
            };
            if let Source::Staged(_, st) = std::mem::replace(&mut j.source, Source::AllLive) {
                let _ = staging_return.send(st);
            }
            false
        });
    }

    /// Sends Close once the final epoch is out; true when the thread is done.
    fn close_if_done(&mut self) -> bool {
        let (Some(f), Some(c)) = (self.finish, self.last_closed) else {
            return false;
        };
        if c < f {
            return false;
        }
        let mut c = Vec::new();
        write_sealed_record(&mut c, RecordKind::Close, f, &[]);
        if let Err(e) = self.sink.send(&[&c]) {
            self.ends.shared.fail(format!("sending close: {e}"));
            self.keep_if_kernel_reads(c);
        }
        true
    }

    fn heartbeat(&mut self) -> Result<(), Failed> {
        self.hb.clear();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        write_sealed_record(&mut self.hb, RecordKind::Heartbeat, 0, &now.to_le_bytes());
        if let Err(e) = self.sink.send(&[&self.hb]) {
            self.ends.shared.fail(format!("sending heartbeat: {e}"));
            let hb = std::mem::take(&mut self.hb);
            self.keep_if_kernel_reads(hb);
            return Err(Failed);
        }
        self.last_send = Instant::now();
        Ok(())
    }
}
