//! The primary: runs the guest in epochs and streams checkpoints.
//!
//! ```text
//! castor-epoch: wait timer ─► wait in-flight < K ─► pause ─► harvest ─► copy ─► save state ─► resume
//!                   │ EpochJob (Arc: gfns + staging)                     │ Meta (state, timings)
//!                   ▼                                                    ▼
//! castor-enc-N: encode own gfn shard vs shadow ─► ShardOut ─────► castor-tx: assemble epoch in order,
//!                                                                  send Begin, Pages…, State, End
//! castor-ack:   Ack(N) ─► latency, metrics, free in-flight slot ◄── backup
//! ```
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
//! - Output commit: the guest's output goes to a `castor-outq` queue
//!   (`Domain::attach_output`, before `start`). The epoch thread opens
//!   epoch N+1 in the queue between the pause ending N and the resume; the
//!   ack thread commits N when Ack(N) arrives. When the run fails, held
//!   output is dropped with the queue, never released.
//! - Self-fencing: with `PrimaryConfig::lease` (an arbiter whose hold can
//!   lapse) the guest runs, and output leaves, only while the lease is held
//!   for at least `lease_margin` more. Once it is not, the guest is paused
//!   and never resumed, the output queue stops releasing (it checks the
//!   lease itself before every release), and the run ends with
//!   [`PrimaryError::LeaseLost`]; held output is then dropped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::codec::{Compressor, Encoder, PageKind};
use crate::digest::Digest;
use crate::domain::{Domain, DomainError};
use crate::engine::copy::CopyPool;
use crate::engine::shadow::PageBuf;
use crate::metrics::{EpochRecord, Metrics, Summary};
use crate::outq::{Committer, Mode, OutputQueue};
use crate::transport::messages::{EpochBegin, EpochClass, EpochEnd, PagesWriter};
use crate::transport::record::{write_record, RecordError, RecordKind, RecordReader};
use crate::transport::RecordSink;
use crate::PAGE_SIZE;

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

/// Tunables of the primary pipeline.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    pub epoch: Duration,
    /// K: checkpoints allowed in flight (sent, not acknowledged).
    pub max_inflight: usize,
    /// Encode workers, each owning a shard of the page range.
    pub workers: usize,
    /// Threads copying dirty pages during the pause (including the epoch thread).
    pub copy_threads: usize,
    pub pin: bool,
    /// With `pin`: the cores workers and copy threads are pinned to, in
    /// order (worker i gets `cores[i % len]`); `None`: every core.
    pub cores: Option<Vec<usize>>,
    pub compressor: Compressor,
    pub duration: Option<Duration>,
    pub max_epochs: Option<u64>,
    /// Print a progress line to stderr every second.
    pub progress: bool,
    pub keep_records: bool,
    /// How long to wait for the final acknowledgement on a clean stop.
    pub final_ack_timeout: Duration,
    /// Keep this many recent dirty lists for post-run measurements.
    pub keep_dirty_lists: usize,
    /// Pre-copy ends once a round's dirty set is at most this many pages.
    pub precopy_target: u64,
    /// At most this many pre-copy rounds after the first full pass.
    pub precopy_rounds: u32,
    /// Hold guest output until the backup acknowledged its epoch (true), or
    /// let it out at once (false: `--no-output-commit`, UNSAFE, experiments).
    pub output_commit: bool,
    /// The arbiter's lease, when its hold can lapse (etcd): see the module
    /// doc, "Self-fencing".
    pub lease: Option<crate::ha::lease::LeaseWatch>,
    /// Self-fence once the lease is held for less than this. It covers the
    /// delay between a check and the act it allows (the output thread's
    /// release, the next pause): 100 ms is above the worst thread wake-up
    /// delay measured under CPU overload (64 ms, see `ha::detector`).
    pub lease_margin: Duration,
    /// Declare the backup lost when no record (ack or heartbeat; it sends
    /// one every 100 ms without traffic) arrived for this long. Longer than
    /// the backup's own 500 ms: losing a slow backup costs a full re-seed,
    /// so the primary waits out more scheduling noise before giving up.
    pub backup_silence: Duration,
    /// Send a heartbeat to the backup after this long without sending
    /// anything (the backup's `--heartbeat-timeout` must allow several).
    pub heartbeat_interval: Duration,
    /// Also hold host-device output queued to this NFQUEUE (`--nfqueue`).
    pub nfqueue: Option<crate::outq::nfqueue::NfqSpec>,
}

impl Default for PrimaryConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        PrimaryConfig {
            epoch: Duration::from_millis(25),
            max_inflight: 2,
            workers: cores.clamp(1, 8),
            copy_threads: cores.clamp(1, 4),
            pin: true,
            cores: None,
            compressor: Compressor::Lz4,
            duration: None,
            max_epochs: None,
            progress: false,
            keep_records: false,
            final_ack_timeout: Duration::from_secs(30),
            keep_dirty_lists: 0,
            precopy_target: 4096,
            precopy_rounds: 30,
            output_commit: true,
            lease: None,
            lease_margin: Duration::from_millis(100),
            backup_silence: Duration::from_secs(2),
            heartbeat_interval: Duration::from_millis(100),
            nfqueue: None,
        }
    }
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
}

/// One epoch's work for the encoders. Seed jobs have no staging: encoders
/// read live guest memory for their whole shard.
struct EpochJob {
    /// Position in the send order: seed rounds first, then checkpoints.
    unit: u64,
    epoch: u64,
    source: Source,
}

/// Where an encoder reads the job's pages.
enum Source {
    /// Every page of the shard, live (first seed round).
    AllLive,
    /// The listed pages, live (later seed rounds).
    Live(Vec<u64>),
    /// Page `gfns[i]` is in staging slot `i`, copied during the pause.
    Staged(Vec<u64>, PageBuf),
}

struct ShardStats {
    unchanged: u64,
    zero: u64,
    delta: u64,
    full: u64,
    raw_bytes: u64,
    encode_us: u64,
}

struct ShardOut {
    unit: u64,
    shard: usize,
    buf: Vec<u8>,
    records: u32,
    entries: u64,
    stats: ShardStats,
}

struct Meta {
    unit: u64,
    epoch: u64,
    class: EpochClass,
    /// Seed rounds: the first opens epoch 0, the last closes it.
    first_round: bool,
    last_round: bool,
    dirty: u64,
    state: Vec<u8>,
    record: EpochRecord,
    pause_start: Instant,
    job: Arc<EpochJob>,
}

enum TxMsg {
    Meta(Meta),
    Shard(ShardOut),
    /// No epoch after this one; send Close once it is out.
    Finish(u64),
}

struct InflightEntry {
    record: EpochRecord,
    pause_start: Instant,
}

#[derive(Default)]
struct Inflight {
    /// Highest epoch acknowledged; None before the seed's ack.
    acked: Option<u64>,
    /// Sent (or being sent), not yet acknowledged, by epoch.
    pending: BTreeMap<u64, InflightEntry>,
    /// Set once the link failed; the reason.
    broken: Option<String>,
    /// The backup itself reported an error and refused to go on (a
    /// mismatched configuration, a stream it found corrupt).
    refused: bool,
    /// Units (seed rounds and checkpoints) fully handed to the sink.
    units_sent: u64,
}

struct Shared {
    inflight: Mutex<Inflight>,
    cv: Condvar,
    metrics: Mutex<Metrics>,
    seed_done: Mutex<Option<(Duration, u64)>>,
    stop_encoders: AtomicBool,
    /// Set while the guest is paused: encoders step aside so the copy
    /// threads have the cores (the pause is what the guest feels).
    pausing: AtomicBool,
    gate: Mutex<()>,
    gate_cv: Condvar,
    /// When checkpointing began (after the seed): run time is counted from here.
    ckpt_start: std::sync::OnceLock<Instant>,
    /// Set when the run ends because the arbiter's lease lapsed.
    lease_lost: AtomicBool,
    /// When the last record from the backup was read.
    heard: Mutex<Instant>,
}

impl Shared {
    fn set_pausing(&self, on: bool) {
        let _g = self.gate.lock().unwrap();
        self.pausing.store(on, Ordering::SeqCst);
        if !on {
            self.gate_cv.notify_all();
        }
    }

    /// Called by encoders between pages: blocks while a pause is underway.
    fn yield_to_pause(&self) {
        if self.pausing.load(Ordering::Relaxed) {
            let mut g = self.gate.lock().unwrap();
            while self.pausing.load(Ordering::SeqCst) {
                g = self.gate_cv.wait(g).unwrap();
            }
        }
    }
}

impl Inflight {
    /// The session's failure, once it failed.
    fn error(&self) -> Option<PrimaryError> {
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

impl Shared {
    /// Waits on the in-flight table while `cond` holds; fails as soon as the
    /// link is broken.
    fn wait_while<'a>(
        &'a self,
        mut g: std::sync::MutexGuard<'a, Inflight>,
        cond: impl Fn(&Inflight) -> bool,
    ) -> Result<std::sync::MutexGuard<'a, Inflight>, PrimaryError> {
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

    fn fail(&self, reason: String) {
        let mut g = self.inflight.lock().unwrap();
        if g.broken.is_none() {
            g.broken = Some(reason);
        }
        self.cv.notify_all();
    }

    /// The backup reported an error: the session fails as refused.
    fn refuse(&self, reason: String) {
        let mut g = self.inflight.lock().unwrap();
        if g.broken.is_none() {
            g.broken = Some(reason);
            g.refused = true;
        }
        self.cv.notify_all();
    }
}

/// Holds encoders back for the length of a pause; reopens on drop, so an
/// error inside the pause cannot leave them blocked.
struct PauseGate<'a>(&'a Shared);

impl<'a> PauseGate<'a> {
    fn close(s: &'a Shared) -> Self {
        s.set_pausing(true);
        PauseGate(s)
    }
}

impl Drop for PauseGate<'_> {
    fn drop(&mut self) {
        self.0.set_pausing(false);
    }
}

/// Pointer to the shadow, shared by encoders; each touches only its shard.
#[derive(Clone, Copy)]
struct ShadowPtr(*mut u8, u64);
// SAFETY: encoders write disjoint gfn ranges of the shadow (shard ownership),
// and the shadow outlives them (joined before it is dropped).
unsafe impl Send for ShadowPtr {}

#[derive(Clone, Copy)]
struct MemPtr(*const u8);
// SAFETY: guest memory outlives the encoders (joined before the domain is
// returned); seed reads race with guest writes by design, and every page
// written during the seed is dirty and re-sent in epoch 1.
unsafe impl Send for MemPtr {}

/// Pages are dealt to encoders in stripes of 2^STRIPE_SHIFT pages (256 KiB),
/// so a hot region spreads over every encoder while each stripe of the
/// shadow still has exactly one owner.
const STRIPE_SHIFT: u32 = 6;

fn owner(gfn: u64, shards: usize) -> usize {
    ((gfn >> STRIPE_SHIFT) % shards as u64) as usize
}

#[allow(clippy::too_many_arguments)]
fn encoder_thread(
    shard: usize,
    shards: usize,
    jobs: Receiver<Arc<EpochJob>>,
    out: Sender<TxMsg>,
    bufs: Receiver<Vec<u8>>,
    shadow: ShadowPtr,
    mem: MemPtr,
    compressor: Compressor,
    shared: Arc<Shared>,
) {
    let mut enc = Encoder::new(compressor);
    let pages = shadow.1;
    let mut page = Box::new([0u8; PAGE_SIZE]);
    for job in jobs {
        let t0 = Instant::now();
        let mut buf = bufs.try_recv().unwrap_or_default();
        buf.clear();
        let mut w = PagesWriter::new(job.epoch);
        let mut st = ShardStats {
            unchanged: 0,
            zero: 0,
            delta: 0,
            full: 0,
            raw_bytes: 0,
            encode_us: 0,
        };
        let mut n = 0u32;
        let mut one = |gfn: u64, src: &[u8; PAGE_SIZE], buf: &mut Vec<u8>, w: &mut PagesWriter| {
            n = n.wrapping_add(1);
            if n % 32 == 0 {
                shared.yield_to_pause();
            }
            // SAFETY: gfn < pages and owner(gfn) == shard: this encoder
            // alone touches this shadow page.
            let prev =
                unsafe { &mut *(shadow.0.add(gfn as usize * PAGE_SIZE) as *mut [u8; PAGE_SIZE]) };
            st.raw_bytes += PAGE_SIZE as u64;
            let mut kind = PageKind::Invalid;
            w.push(buf, gfn, |o| {
                kind = enc.encode(src, Some(prev), o);
                (kind != PageKind::Unchanged).then_some(kind as u8)
            });
            match kind {
                PageKind::Unchanged => st.unchanged += 1,
                PageKind::Zero => st.zero += 1,
                PageKind::Delta | PageKind::DeltaLz4 | PageKind::DeltaZstd => st.delta += 1,
                _ => st.full += 1,
            }
            if kind != PageKind::Unchanged {
                prev.copy_from_slice(src);
            }
        };
        let mine = |g: &u64| owner(*g, shards) == shard;
        let mut live = |gfn: u64, buf: &mut Vec<u8>, w: &mut PagesWriter| {
            // SAFETY: gfn < pages; copying out of guest memory into our own
            // buffer (see MemPtr for the race argument).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    mem.0.add(gfn as usize * PAGE_SIZE),
                    page.as_mut_ptr(),
                    PAGE_SIZE,
                )
            };
            one(gfn, &page, buf, w);
        };
        match &job.source {
            Source::AllLive => {
                let stripe = 1u64 << STRIPE_SHIFT;
                let mut start = shard as u64 * stripe;
                while start < pages {
                    (start..(start + stripe).min(pages)).for_each(|g| live(g, &mut buf, &mut w));
                    start += stripe * shards as u64;
                }
            }
            Source::Live(gfns) => gfns
                .iter()
                .filter(|g| mine(g))
                .for_each(|&g| live(g, &mut buf, &mut w)),
            Source::Staged(gfns, staging) => {
                for (i, &gfn) in gfns.iter().enumerate().filter(|(_, g)| mine(g)) {
                    // SAFETY: the copy into staging finished before the job
                    // was sent; nobody writes staging until it is returned.
                    let src = unsafe { staging.slot(i) };
                    one(gfn, src, &mut buf, &mut w);
                }
            }
        }
        w.close(&mut buf);
        st.encode_us = t0.elapsed().as_micros() as u64;
        let unit = job.unit;
        drop(job); // before reporting, so the tx thread can reclaim staging
        let msg = ShardOut {
            unit,
            shard,
            buf,
            records: w.records,
            entries: w.entries,
            stats: st,
        };
        if out.send(TxMsg::Shard(msg)).is_err() {
            return;
        }
    }
}

struct Assembly {
    meta: Option<Meta>,
    shards: Vec<Option<ShardOut>>,
    got: usize,
}

/// Owns the sending half. Sends each epoch whole and in order.
#[allow(clippy::too_many_arguments)]
fn tx_thread(
    mut sink: Box<dyn RecordSink>,
    rx: Receiver<TxMsg>,
    shards: usize,
    shared: Arc<Shared>,
    buf_return: Vec<Sender<Vec<u8>>>,
    staging_return: Sender<PageBuf>,
    seed_start: Instant,
    hb_every: Duration,
) {
    let mut pending: BTreeMap<u64, Assembly> = BTreeMap::new();
    let mut next = 0u64;
    let mut finish: Option<u64> = None;
    let mut last_closed: Option<u64> = None;
    let mut last_send = Instant::now();
    let mut hb = Vec::new();
    // The seed (epoch 0) spans several units (pre-copy rounds).
    let mut seed_end = EpochEnd::default();
    // Sent units whose job may still be referenced by an encoder.
    let mut orphans: Vec<Arc<EpochJob>> = Vec::new();
    let mut seed_rec = EpochRecord::default();
    let new_assembly = || Assembly {
        meta: None,
        shards: (0..shards).map(|_| None).collect(),
        got: 0,
    };
    loop {
        match rx.recv_timeout(hb_every) {
            Ok(TxMsg::Meta(m)) => {
                let u = m.unit;
                pending.entry(u).or_insert_with(new_assembly).meta = Some(m);
            }
            Ok(TxMsg::Shard(s)) => {
                let e = pending.entry(s.unit).or_insert_with(new_assembly);
                let i = s.shard;
                e.shards[i] = Some(s);
                e.got += 1;
            }
            Ok(TxMsg::Finish(e)) => finish = Some(e),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        // Send every complete unit that is next in line.
        while let Some(a) = pending.get(&next) {
            if a.meta.is_none() || a.got < shards {
                break;
            }
            let a = pending.remove(&next).expect("checked above");
            let meta = a.meta.expect("checked above");
            let outs: Vec<ShardOut> = a
                .shards
                .into_iter()
                .map(|s| s.expect("all shards present"))
                .collect();
            let seed = meta.class == EpochClass::Seed;
            let opens = !seed || meta.first_round;
            let closes = !seed || meta.last_round;
            let mut head = Vec::with_capacity(64);
            if opens {
                let begin = EpochBegin {
                    class: meta.class,
                    dirty: meta.dirty,
                };
                write_record(
                    &mut head,
                    RecordKind::EpochBegin,
                    meta.epoch,
                    &begin.encode(),
                );
            }
            let mut rec = if seed {
                std::mem::take(&mut seed_rec)
            } else {
                meta.record
            };
            let mut end = if seed { seed_end } else { EpochEnd::default() };
            for o in &outs {
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
            if !seed {
                write_record(&mut tail, RecordKind::State, meta.epoch, &meta.state);
                end.state_len = meta.state.len() as u32;
            }
            if closes {
                write_record(&mut tail, RecordKind::EpochEnd, meta.epoch, &end.encode());
            }
            let mut bufs: Vec<&[u8]> = vec![&head];
            bufs.extend(outs.iter().map(|o| &o.buf[..]));
            bufs.push(&tail);
            rec.wire_bytes += bufs.iter().map(|b| b.len() as u64).sum::<u64>();
            rec.state_bytes = meta.state.len() as u64;
            if seed && !closes {
                seed_end = end;
                seed_rec = rec.clone();
            }
            if closes {
                let mut g = shared.inflight.lock().unwrap();
                g.pending.insert(
                    meta.epoch,
                    InflightEntry {
                        record: rec.clone(),
                        pause_start: meta.pause_start,
                    },
                );
            }
            let t = Instant::now();
            let r = sink.send(&bufs);
            let send_us = t.elapsed().as_micros() as u64;
            last_send = Instant::now();
            if let Err(e) = r {
                shared.fail(format!("sending epoch {}: {e}", meta.epoch));
                return;
            }
            {
                let mut g = shared.inflight.lock().unwrap();
                if let Some(p) = g.pending.get_mut(&meta.epoch) {
                    p.record.send_us += send_us;
                }
                g.units_sent = next + 1;
                shared.cv.notify_all();
            }
            if seed && closes {
                *shared.seed_done.lock().unwrap() = Some((seed_start.elapsed(), rec.wire_bytes));
            }
            if closes {
                last_closed = Some(meta.epoch);
            }
            drop(bufs);
            for o in outs {
                let _ = buf_return[o.shard].send(o.buf);
            }
            orphans.push(meta.job);
            next += 1;
        }
        // Return staging buffers whose job nobody else holds any more.
        orphans.retain_mut(|job| {
            let Some(j) = Arc::get_mut(job) else {
                return true;
            };
            if let Source::Staged(_, st) = std::mem::replace(&mut j.source, Source::AllLive) {
                let _ = staging_return.send(st);
            }
            false
        });
        if let (Some(f), Some(c)) = (finish, last_closed) {
            if c >= f {
                let mut c = Vec::new();
                write_record(&mut c, RecordKind::Close, f, &[]);
                if let Err(e) = sink.send(&[&c]) {
                    shared.fail(format!("sending close: {e}"));
                }
                return;
            }
        }
        if last_send.elapsed() >= hb_every {
            hb.clear();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            write_record(&mut hb, RecordKind::Heartbeat, 0, &now.to_le_bytes());
            if let Err(e) = sink.send(&[&hb]) {
                shared.fail(format!("sending heartbeat: {e}"));
                return;
            }
            last_send = Instant::now();
        }
    }
}

/// Owns the receiving half: acks complete in-flight epochs.
fn ack_thread<R: std::io::Read>(
    mut reader: RecordReader<R>,
    shared: Arc<Shared>,
    output: Committer,
) {
    loop {
        let rec = match reader.next() {
            Ok(r) => r,
            Err(RecordError::Eof) => return shared.fail("backup closed the connection".into()),
            Err(e) => return shared.fail(format!("reading from backup: {e}")),
        };
        *shared.heard.lock().unwrap() = Instant::now();
        match rec.kind {
            RecordKind::Ack => {
                let epoch = rec.epoch;
                let mut g = shared.inflight.lock().unwrap();
                let Some((&oldest, _)) = g.pending.iter().next() else {
                    drop(g);
                    return shared.fail(format!(
                        "backup acknowledged epoch {epoch}, which is not in flight"
                    ));
                };
                if oldest != epoch {
                    drop(g);
                    return shared.fail(format!(
                        "backup acknowledged epoch {epoch} while the oldest in flight is {oldest}"
                    ));
                }
                let entry = g.pending.remove(&epoch).expect("checked above");
                // Output commit: the backup holds checkpoint `epoch` whole,
                // so the output it produced may leave. Sent before `acked`
                // is published, so a clean stop (which waits for the final
                // ack, then shuts the queue) finds the commit queued first.
                // Read before the commit, which may release output at once.
                let acked_at_ns = crate::metrics::mono_ns();
                output.commit(epoch);
                g.acked = Some(epoch);
                shared.cv.notify_all();
                drop(g);
                if epoch > 0 {
                    let mut r = entry.record;
                    r.latency_us = entry.pause_start.elapsed().as_micros() as u64;
                    r.acked_at_ns = acked_at_ns;
                    shared.metrics.lock().unwrap().add(&r);
                }
            }
            RecordKind::Heartbeat => {}
            RecordKind::Error => {
                return shared.refuse(format!(
                    "backup reported: {}",
                    String::from_utf8_lossy(rec.payload)
                ))
            }
            other => return shared.fail(format!("unexpected {other:?} record from backup")),
        }
    }
}

/// Fails the session when the backup has been silent (no ack, no
/// heartbeat) for `silence`: a hung or partitioned backup whose TCP
/// connection stays open would otherwise hold the guest's output forever.
fn silence_watchdog(shared: Arc<Shared>, done: Arc<AtomicBool>, silence: Duration) {
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
        let quiet = shared.heard.lock().unwrap().elapsed();
        if quiet > silence {
            return shared.fail(format!(
                "backup silent for {} ms (timeout {} ms)",
                quiet.as_millis(),
                silence.as_millis()
            ));
        }
    }
}

fn progress_thread(shared: Arc<Shared>, start: Instant, done: Arc<AtomicBool>) {
    let mut last_epochs = 0u64;
    let mut last_wire = 0u64;
    let mut last_t = Instant::now();
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        if last_t.elapsed() < Duration::from_secs(1) {
            continue;
        }
        let dt = last_t.elapsed().as_secs_f64();
        last_t = Instant::now();
        let m = shared.metrics.lock().unwrap();
        let s = Summary::from_metrics(&m, start.elapsed());
        let eps = (m.epochs - last_epochs) as f64 / dt;
        let wire_rate = (m.wire_bytes - last_wire) as f64 / dt;
        last_epochs = m.epochs;
        last_wire = m.wire_bytes;
        drop(m);
        eprintln!(
            "[{:6.1}s] acked {:>6} | {:5.1} ep/s | dirty {:>6}/ep | pause p50 {:>6} p99 {:>6} µs | latency p99 {:>6} µs | wire {:5.1}% ({}/s){}",
            start.elapsed().as_secs_f64(),
            s.acked_epoch,
            eps,
            s.dirty_pages_per_epoch.p50,
            s.pause_us.p50,
            s.pause_us.p99,
            s.checkpoint_latency_us.p99,
            s.wire_ratio * 100.0,
            crate::units::fmt_bytes(wire_rate as u64),
            if s.extended_epochs > 0 { format!(" | {} extended", s.extended_epochs) } else { String::new() },
        );
    }
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
    let mut outq = match OutputQueue::start(Mode::PassThrough) {
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

/// One protection session of a domain that may already be running (a live
/// copy re-protected by a fresh backup): seeds the backup while the guest
/// runs, then checkpoints. `outq` (already attached to the domain's output)
/// is put in commit mode for the session (unless output commit is off) and
/// left unprotected (its held output dropped) when the session ends with an
/// error; after a clean stop everything was committed.
pub fn run_session<R: std::io::Read + Send + 'static>(
    mut domain: Box<dyn Domain>,
    outq: &mut OutputQueue,
    sink: Box<dyn RecordSink>,
    reader: RecordReader<R>,
    cfg: &PrimaryConfig,
) -> Result<PrimaryOutcome, (PrimaryError, Option<Box<dyn Domain>>)> {
    let layout = domain.layout();
    let pages = layout.pages;
    let workers = cfg.workers.max(1);
    // The guest may be running (re-protection): pause it around the switch
    // so no output is tagged across it.
    let session = domain.pause().map_err(PrimaryError::from).and_then(|_| {
        if cfg.output_commit {
            outq.protect()
        } else {
            outq.unprotect()
        }
        .map_err(|e| PrimaryError::Protocol(e.to_string()))
    });
    if let Err(e) = session {
        return Err((e, Some(domain)));
    }
    let cores: Vec<core_affinity::CoreId> = if cfg.pin {
        let all = core_affinity::get_core_ids().unwrap_or_default();
        match &cfg.cores {
            Some(list) => list
                .iter()
                .filter_map(|&id| all.iter().copied().find(|c| c.id == id))
                .collect(),
            None => all,
        }
    } else {
        Vec::new()
    };
    let shadow = match PageBuf::new(pages as usize) {
        Ok(s) => s,
        Err(e) => return Err((e.into(), Some(domain))),
    };
    let shared = Arc::new(Shared {
        inflight: Mutex::new(Inflight::default()),
        cv: Condvar::new(),
        metrics: Mutex::new(Metrics::new(cfg.keep_records)),
        seed_done: Mutex::new(None),
        stop_encoders: AtomicBool::new(false),
        pausing: AtomicBool::new(false),
        gate: Mutex::new(()),
        gate_cv: Condvar::new(),
        ckpt_start: std::sync::OnceLock::new(),
        lease_lost: AtomicBool::new(false),
        heard: Mutex::new(Instant::now()),
    });
    if let Some(l) = &cfg.lease {
        // Queued before any commit can be (one FIFO channel).
        outq.gate(l.clone(), cfg.lease_margin);
    }
    let start = Instant::now();
    let (tx_send, tx_recv) = channel::<TxMsg>();
    let (staging_ret_tx, staging_ret_rx) = channel::<PageBuf>();
    let mut job_txs = Vec::new();
    let mut buf_rets = Vec::new();
    let mut enc_handles: Vec<JoinHandle<()>> = Vec::new();
    let shadow_ptr = ShadowPtr(shadow.slot_ptr(0), pages);
    let mem_ptr = MemPtr(domain.memory().as_ptr());
    for shard in 0..workers {
        let (jt, jr) = channel::<Arc<EpochJob>>();
        let (bt, br) = channel::<Vec<u8>>();
        job_txs.push(jt);
        buf_rets.push(bt);
        let out = tx_send.clone();
        let core = (!cores.is_empty()).then(|| cores[shard % cores.len()]);
        let comp = cfg.compressor;
        let sh = shared.clone();
        enc_handles.push(
            std::thread::Builder::new()
                .name(format!("castor-enc-{shard}"))
                .spawn(move || {
                    if let Some(c) = core {
                        core_affinity::set_for_current(c);
                    }
                    encoder_thread(shard, workers, jr, out, br, shadow_ptr, mem_ptr, comp, sh)
                })
                .expect("spawning encoder"),
        );
    }
    let tx_handle = {
        let shared = shared.clone();
        let hb_every = cfg.heartbeat_interval;
        std::thread::Builder::new()
            .name("castor-tx".into())
            .spawn(move || {
                tx_thread(
                    sink,
                    tx_recv,
                    workers,
                    shared,
                    buf_rets,
                    staging_ret_tx,
                    start,
                    hb_every,
                )
            })
            .expect("spawning tx thread")
    };
    let ack_handle = {
        let shared = shared.clone();
        let committer = outq.committer();
        std::thread::Builder::new()
            .name("castor-ack".into())
            .spawn(move || ack_thread(reader, shared, committer))
            .expect("spawning ack thread")
    };
    let progress_done = Arc::new(AtomicBool::new(false));
    // Between pauses the guest runs (and waits for acks may be long): this
    // thread notices a lapsing lease within a few ms and fails the run, which
    // wakes every wait; the guest is paused on the way out.
    let lease_handle = cfg.lease.clone().map(|l| {
        let (shared, done, margin) = (shared.clone(), progress_done.clone(), cfg.lease_margin);
        std::thread::Builder::new()
            .name("castor-lease".into())
            .spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    if !l.held_for(margin) {
                        shared.lease_lost.store(true, Ordering::SeqCst);
                        shared.fail("the arbiter's lease lapsed".into());
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
            .expect("spawning lease thread")
    });
    let watchdog = {
        let (shared, done, silence) = (shared.clone(), progress_done.clone(), cfg.backup_silence);
        std::thread::Builder::new()
            .name("castor-watch".into())
            .spawn(move || silence_watchdog(shared, done, silence))
            .expect("spawning the backup watchdog")
    };
    let progress_handle = cfg.progress.then(|| {
        let shared = shared.clone();
        let done = progress_done.clone();
        std::thread::Builder::new()
            .name("castor-progress".into())
            .spawn(move || progress_thread(shared, start, done))
            .expect("spawning progress thread")
    });

    let result = std::thread::scope(|scope| {
        let (dom, shared, job_txs, tx_send, cores, outq) =
            (&mut *domain, &*shared, &job_txs, &tx_send, &cores, &*outq);
        std::thread::Builder::new()
            .name("castor-epoch".into())
            .spawn_scoped(scope, move || {
                crate::engine::copy::raise_priority();
                let copy_pool = CopyPool::new(cfg.copy_threads, cores);
                drive(
                    dom,
                    cfg,
                    shared,
                    job_txs,
                    tx_send,
                    &staging_ret_rx,
                    &copy_pool,
                    outq,
                )
            })
            .expect("spawning epoch thread")
            .join()
            .unwrap_or_else(|_| Err(PrimaryError::Protocol("epoch thread panicked".into())))
    });

    // Tear down: encoders first (no more jobs), then wait for tx to finish.
    drop(job_txs);
    shared.stop_encoders.store(true, Ordering::Relaxed);
    for h in enc_handles {
        let _ = h.join();
    }
    drop(tx_send);
    let _ = tx_handle.join();
    progress_done.store(true, Ordering::Relaxed);
    if let Some(h) = progress_handle {
        let _ = h.join();
    }
    if let Some(h) = lease_handle {
        let _ = h.join();
    }
    // Self-fenced: pause (idempotent) and report the lease, whatever wait
    // noticed it first.
    let result = match result {
        Err(_) if shared.lease_lost.load(Ordering::SeqCst) => {
            let paused = domain.pause();
            let acked = shared.inflight.lock().unwrap().acked.unwrap_or(0);
            match paused {
                Ok(()) => Err(PrimaryError::LeaseLost { acked }),
                Err(e) => Err(e.into()),
            }
        }
        r => r,
    };
    let _ = watchdog.join();
    let (final_epoch, state, recent_dirty) = match result {
        Ok(v) => v,
        Err(e) => {
            // The ack thread exits when the connection closes; do not wait for it.
            drop(ack_handle);
            // Backup lost (or any failure): output not yet committed is
            // dropped, never released. The guest stays paused until the
            // caller decides (run unprotected, or self-fence).
            let paused = domain.pause();
            match outq.unprotect() {
                Ok(r) if r.dropped + r.late > 0 => eprintln!(
                    "castor: output commit: dropped {} held output frames of epochs after {} (never released)",
                    r.dropped + r.late,
                    r.committed
                ),
                Ok(_) => {}
                Err(oe) => eprintln!("castor: output queue: {oe}"),
            }
            if let Err(pe) = paused {
                tracing::warn!("pausing the domain after the session failed: {pe}");
            }
            return Err((e, Some(domain)));
        }
    };
    drop(ack_handle);
    // Clean stop: the final epoch was acknowledged and committed (the
    // commit precedes the mode switch in the queue's channel). The guest is
    // paused; whoever resumes it decides whether it runs unprotected.
    let output = outq
        .unprotect()
        .map_err(|e| (PrimaryError::Protocol(e.to_string()), None))?;
    let elapsed = shared
        .ckpt_start
        .get()
        .map_or(Duration::ZERO, |t| t.elapsed());
    let g = shared.inflight.lock().unwrap();
    let acked = g.acked.unwrap_or(0);
    drop(g);
    let mut summary = Summary::from_metrics(&shared.metrics.lock().unwrap(), elapsed);
    if let Some((d, wire)) = *shared.seed_done.lock().unwrap() {
        summary.seed_ms = (d.as_secs_f64() * 1e4).round() / 10.0;
        summary.seed_wire_bytes = wire;
    }
    summary.domain = domain.describe();
    summary.transport = "tcp".into();
    summary.epoch_ms = cfg.epoch.as_secs_f64() * 1000.0;
    summary.max_inflight = cfg.max_inflight;
    summary.workers = workers;
    summary.output = Some(output.clone());
    // SAFETY: the domain is paused after the final epoch and no castor
    // thread touches guest memory any more (encoders joined).
    let digest = Digest::of(unsafe { domain.memory().as_slice() }, &state);
    summary.primary_digest = digest.to_hex();
    Ok(PrimaryOutcome {
        summary,
        final_epoch,
        acked_epoch: acked,
        digest,
        domain,
        recent_dirty,
        output,
    })
}

/// Hands a unit to the tx thread (its metadata) and to every encoder (its
/// pages). The job's Arc is not kept: the tx thread reclaims staging once
/// every encoder dropped its clone.
fn dispatch(tx: &Sender<TxMsg>, job_txs: &[Sender<Arc<EpochJob>>], meta: Meta) {
    let job = meta.job.clone();
    let _ = tx.send(TxMsg::Meta(meta));
    // The last encoder gets our own clone: once every encoder has reported,
    // the tx thread's is the only one left and it can reclaim the staging.
    if let Some((last, rest)) = job_txs.split_last() {
        for j in rest {
            let _ = j.send(job.clone());
        }
        let _ = last.send(job);
    }
}

/// `out` = sorted union of two sorted, duplicate-free lists.
fn merge_sorted(a: &[u64], b: &[u64], out: &mut Vec<u64>) {
    out.clear();
    out.reserve(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => {
                out.push(a[i]);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                out.push(b[j]);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                out.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
}

type DriveResult = Result<(u64, Vec<u8>, Vec<Vec<u64>>), PrimaryError>;

#[allow(clippy::too_many_arguments)]
fn drive(
    domain: &mut dyn Domain,
    cfg: &PrimaryConfig,
    shared: &Shared,
    job_txs: &[Sender<Arc<EpochJob>>],
    tx: &Sender<TxMsg>,
    staging_ret: &Receiver<PageBuf>,
    copy_pool: &CopyPool,
    outq: &OutputQueue,
) -> DriveResult {
    let k = cfg.max_inflight.max(1) as u64;
    let broken = |g: &Inflight| g.error();
    // Starts a fresh domain; resumes one that was running before this
    // session (re-protection) and was paused for the output switch.
    domain.resume()?;
    // Epoch 0, the seed: live pre-copy rounds while the guest runs. Round 0
    // reads every page; each later round re-sends the pages dirtied since
    // the previous harvest, until the dirty set is small (or stops
    // shrinking), so the first checkpoint's pause stays short.
    let pages = domain.layout().pages;
    let mut unit = 0u64;
    // Never-written pages are zero, as is the backup's fresh replica: the
    // first pass skips them when the domain can tell which they are.
    let mut present = Vec::new();
    let mut source = match domain.present_pages(&mut present) {
        Ok(true) => Source::Live(present),
        _ => Source::AllLive,
    };
    let first_pass = match &source {
        Source::Live(p) => p.len() as u64,
        _ => pages,
    };
    let mut round = 0u32;
    let mut last = false;
    let mut prev_dirty = u64::MAX;
    let mut round_start = Instant::now();
    let mut spare: Vec<PageBuf> = Vec::new();
    loop {
        let job = Arc::new(EpochJob {
            unit,
            epoch: 0,
            source,
        });
        dispatch(
            tx,
            job_txs,
            Meta {
                unit,
                epoch: 0,
                class: EpochClass::Seed,
                first_round: round == 0,
                last_round: last,
                dirty: pages,
                state: Vec::new(),
                record: EpochRecord::default(),
                pause_start: Instant::now(),
                job,
            },
        );
        unit += 1;
        if last {
            break;
        }
        drop(shared.wait_while(shared.inflight.lock().unwrap(), |g| g.units_sent < unit)?);
        if cfg.progress {
            eprintln!(
                "castor: initial copy round {round}: {} pages sent in {:.0} ms",
                if round == 0 { first_pass } else { prev_dirty },
                round_start.elapsed().as_secs_f64() * 1000.0
            );
        }
        round += 1;
        round_start = Instant::now();
        let mut d = Vec::new();
        domain.harvest_dirty(&mut d)?;
        let n = d.len() as u64;
        // Stop once the set is small, or has stopped shrinking after a few
        // rounds (the guest dirties faster than a round takes).
        last = n <= cfg.precopy_target
            || round >= cfg.precopy_rounds
            || (round >= 4 && n >= prev_dirty)
            || crate::engine::stop_requested();
        if last {
            // Staging for the first checkpoints, faulted in now (the guest
            // still runs) and sized for this round's dirty set, so no pause
            // allocates. Pages written meanwhile join this last round.
            let first = (pages as usize).min((n as usize * 2).max(8192));
            spare = (0..k)
                .map(|_| PageBuf::new_populated(first))
                .collect::<Result<_, _>>()?;
            let mut more = Vec::new();
            domain.harvest_dirty(&mut more)?;
            let mut all = Vec::new();
            merge_sorted(&d, &more, &mut all);
            d = all;
        }
        prev_dirty = d.len() as u64;
        source = Source::Live(d);
    }
    let _ = shared.ckpt_start.set(Instant::now());
    let start = Instant::now();
    let mut staging_count = spare.len();
    let mut gfns: Vec<u64> = Vec::new();
    let (mut pre, mut late) = (Vec::new(), Vec::new());
    let mut state: Vec<u8> = Vec::new();
    let mut recent: std::collections::VecDeque<Vec<u64>> = Default::default();
    let mut deadline = Instant::now() + cfg.epoch;
    let mut epoch = 0u64;
    loop {
        epoch += 1;
        let is_final = |now: Instant| {
            crate::engine::stop_requested()
                || cfg
                    .duration
                    .is_some_and(|d| now.duration_since(start) + cfg.epoch >= d)
                || cfg.max_epochs.is_some_and(|n| epoch >= n)
        };
        // Run the guest until the epoch's deadline (woken early by a failure).
        {
            let mut g = shared.inflight.lock().unwrap();
            loop {
                if let Some(e) = broken(&g) {
                    return Err(e);
                }
                let now = Instant::now();
                if now >= deadline || crate::engine::stop_requested() {
                    break;
                }
                g = shared
                    .cv
                    .wait_timeout(g, (deadline - now).min(Duration::from_millis(50)))
                    .unwrap()
                    .0;
            }
            // Backpressure: at most K checkpoints unacknowledged at pause time.
            let ext_start = Instant::now();
            // Epochs 0..epoch-1 have been handed to the pipeline; those after
            // the last ack are in flight.
            let unacked = |g: &Inflight| g.acked.map_or(epoch, |a| (epoch - 1).saturating_sub(a));
            g = shared.wait_while(g, |g| unacked(g) >= k)?;
            let ext = ext_start.elapsed();
            drop(g);
            let final_epoch = is_final(Instant::now());
            let mut rec = EpochRecord {
                epoch,
                extension_us: if ext > Duration::from_micros(200) {
                    ext.as_micros() as u64
                } else {
                    0
                },
                ..Default::default()
            };
            // Reclaim staging buffers returned by the tx thread.
            while let Ok(b) = staging_ret.try_recv() {
                spare.push(b);
            }

            // Pre-harvest while the guest still runs: most of the epoch's
            // dirty set is collected (and re-armed) outside the pause; the
            // harvest inside the pause only picks up the last moment's writes.
            let t_pre = Instant::now();
            pre.clear();
            domain.harvest_dirty(&mut pre)?;
            rec.preharvest_us = t_pre.elapsed().as_micros() as u64;

            let t0 = Instant::now();
            let gate = PauseGate::close(shared);
            domain.pause()?;
            // Self-fencing: without the lease the guest must not run on.
            if cfg
                .lease
                .as_ref()
                .is_some_and(|l| !l.held_for(cfg.lease_margin))
            {
                shared.lease_lost.store(true, Ordering::SeqCst);
                shared.fail("the arbiter's lease lapsed".into());
                return Err(broken(&shared.inflight.lock().unwrap()).expect("just failed"));
            }
            // Output commit: epoch `epoch` ends here. The guest (every
            // output producer) is parked until `resume`, so output tagged
            // `epoch` is exactly what checkpoint `epoch` covers; from the
            // resume on, output belongs to the next epoch.
            outq.open_epoch(epoch + 1);
            // Read after the store: output read from now on is tagged > epoch.
            rec.closed_at_ns = crate::metrics::mono_ns();
            let t_paused = Instant::now();
            late.clear();
            domain.harvest_dirty(&mut late)?;
            merge_sorted(&pre, &late, &mut gfns);
            let t_harvest = Instant::now();
            let mut staging = match spare.iter().position(|b| b.slots() >= gfns.len()) {
                Some(i) => spare.swap_remove(i),
                None if staging_count <= k as usize => {
                    staging_count += 1;
                    PageBuf::new_populated((gfns.len() * 5 / 4).max(1024))?
                }
                None => {
                    // All buffers busy or too small: wait for one, grow if needed.
                    let b = spare.pop().map_or_else(
                        || {
                            staging_ret.recv().map_err(|_| {
                                // The tx thread only ends early on a failed link.
                                let g = shared.inflight.lock().unwrap();
                                broken(&g).unwrap_or(PrimaryError::BackupLost {
                                    acked: g.acked.unwrap_or(0),
                                    reason: "transport thread ended".into(),
                                })
                            })
                        },
                        Ok,
                    )?;
                    if b.slots() >= gfns.len() {
                        b
                    } else {
                        PageBuf::new_populated((gfns.len() * 5 / 4).max(1024))?
                    }
                }
            };
            if staging.slots() < gfns.len() {
                staging = PageBuf::new_populated(gfns.len() * 5 / 4)?;
            }
            copy_pool.copy(domain.memory(), &gfns, &staging);
            let t_copy = Instant::now();
            state.clear();
            domain.save_state(&mut state)?;
            let t_state = Instant::now();
            if !final_epoch {
                domain.resume()?;
            }
            let t_end = Instant::now();
            drop(gate);
            rec.dirty_pages = gfns.len() as u64;
            rec.harvest_us = (t_harvest - t_paused).as_micros() as u64;
            rec.copy_us = (t_copy - t_harvest).as_micros() as u64;
            rec.state_us = (t_state - t_copy).as_micros() as u64;
            rec.pause_us = (t_end - t0).as_micros() as u64;
            if cfg.keep_dirty_lists > 0 {
                if recent.len() == cfg.keep_dirty_lists {
                    recent.pop_front();
                }
                recent.push_back(gfns.clone());
            }
            let dirty = gfns.len() as u64;
            let job = Arc::new(EpochJob {
                unit,
                epoch,
                source: Source::Staged(std::mem::take(&mut gfns), staging),
            });
            dispatch(
                tx,
                job_txs,
                Meta {
                    unit,
                    epoch,
                    class: EpochClass::Checkpoint,
                    first_round: false,
                    last_round: false,
                    dirty,
                    state: state.clone(),
                    record: rec,
                    pause_start: t0,
                    job,
                },
            );
            unit += 1;
            if final_epoch {
                let _ = tx.send(TxMsg::Finish(epoch));
                break;
            }
            deadline += cfg.epoch;
            let now = Instant::now();
            if deadline < now {
                deadline = now;
            }
        }
    }
    // Clean stop: wait for the final acknowledgement.
    let waited = Instant::now();
    let mut g = shared.inflight.lock().unwrap();
    while g.acked != Some(epoch) {
        if let Some(e) = broken(&g) {
            return Err(e);
        }
        if waited.elapsed() > cfg.final_ack_timeout {
            return Err(PrimaryError::AckTimeout {
                epoch,
                waited: waited.elapsed(),
            });
        }
        g = shared
            .cv
            .wait_timeout(g, Duration::from_millis(50))
            .unwrap()
            .0;
    }
    Ok((epoch, state, recent.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_is_sorted_union() {
        let mut out = Vec::new();
        merge_sorted(&[1, 4, 9], &[2, 4, 10, 11], &mut out);
        assert_eq!(out, [1, 2, 4, 9, 10, 11]);
        merge_sorted(&[], &[3], &mut out);
        assert_eq!(out, [3]);
        merge_sorted(&[5], &[], &mut out);
        assert_eq!(out, [5]);
    }
}
