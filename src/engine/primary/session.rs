//! One protection session: starts the pipeline's threads around a domain,
//! runs the epoch thread, and tears everything down in order.
//!
//! Invariants:
//! - The output queue enters the session's mode while the guest is paused,
//!   so no output is tagged across the switch; the lease gate is queued
//!   before any commit can be.
//! - Teardown order: encoders (no more jobs), then `castor-tx` (everything
//!   encoded is sent or the link failed), then the watchers. A self-fenced
//!   run pauses the guest before waiting for the silence watchdog.
//! - On any failure the guest is left paused and the session's held output
//!   is dropped, never released; after a clean stop everything was committed.
//! - The shadow and guest memory outlive every encoder (joined before
//!   either is dropped or the domain handed back).

use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::ack::ack_thread;
use super::encode::{encoder_thread, MemPtr, ShadowPtr, Worker};
use super::epoch::{drive, DriveResult, Driver};
use super::job::{EpochJob, Pipe, TxMsg};
use super::shared::Shared;
use super::staging::StagingPool;
use super::tx::{tx_thread, TxEnds};
use super::watch::Watchers;
use super::{PrimaryConfig, PrimaryError, PrimaryOutcome};
use crate::digest::Digest;
use crate::disk::session::PrimaryDisks;
use crate::domain::progress::Window;
use crate::domain::Domain;
use crate::engine::copy::CopyPool;
use crate::engine::shadow::PageBuf;
use crate::engine::throttle::Throttle;
use crate::metrics::Summary;
use crate::outq::OutputQueue;
use crate::transport::record::RecordReader;
use crate::transport::RecordSink;

type SessionResult = Result<PrimaryOutcome, (PrimaryError, Option<Box<dyn Domain>>)>;

/// One protection session of a domain that may already be running (a live
/// copy re-protected by a fresh backup): seeds the backup while the guest
/// runs, then checkpoints. `outq` (already attached to the domain's output)
/// is put in commit mode for the session (unless output commit is off) and
/// left unprotected (its held output dropped) when the session ends with an
/// error; after a clean stop everything was committed.
pub fn run_session<R: std::io::Read + Send + 'static>(
    mut domain: Box<dyn Domain>,
    outq: &mut OutputQueue,
    mut sink: Box<dyn RecordSink>,
    reader: RecordReader<R>,
    cfg: &PrimaryConfig,
) -> SessionResult {
    let pages = domain.layout().pages;
    let workers = cfg.workers.max(1);
    if let Err(e) = enter(&mut *domain, outq, cfg) {
        return Err((e, Some(domain)));
    }
    // Disk writes from here on travel in checkpoint 1 or later; the seed
    // reads the disks after this (see `PrimaryDisks::seed_payloads`).
    let disks = session_disks(&*domain, cfg);
    disks.start(1);
    let cores = pick_cores(cfg);
    let shadow = if cfg.huge_shadow {
        PageBuf::new_huge(pages as usize)
    } else {
        PageBuf::new(pages as usize)
    };
    let shadow = match shadow {
        Ok(s) => s,
        Err(e) => return Err((e.into(), Some(domain))),
    };
    let shared = Arc::new(Shared::new(cfg));
    if let Some(conn) = sink.connection() {
        arm_deadlines(&conn, cfg.backup_silence);
        shared.set_link(conn);
    }
    let s = shared.clone();
    sink.on_failure(Box::new(move |why| {
        s.fail(format!("sending to the backup: {why}"))
    }));
    if shared.lease.can_lapse() {
        // Queued before any commit can be (one FIFO channel).
        outq.set_gate(shared.lease.clone());
    }
    let start = Instant::now();
    crate::ops::telemetry::with(|t| t.session_started());
    let (tx_send, tx_recv) = channel::<TxMsg>();
    let (staging_ret_tx, staging_ret_rx) = channel::<PageBuf>();
    let workers_ptrs = (
        ShadowPtr(shadow.slot_ptr(0), pages),
        MemPtr(domain.memory().as_ptr()),
    );
    let (job_txs, buf_rets, enc_handles) =
        spawn_encoders(workers, workers_ptrs, &shared, &tx_send, &cores);
    let tx_handle = {
        let ends = TxEnds {
            shards: workers,
            shared: shared.clone(),
            buf_return: buf_rets,
            staging_return: staging_ret_tx,
            seed_start: start,
            hb_every: cfg.heartbeat_interval,
            disks: disks.clone(),
        };
        std::thread::Builder::new()
            .name("castor-tx".into())
            .spawn(move || tx_thread(sink, tx_recv, ends))
            .expect("spawning tx thread")
    };
    // `ack_done` disconnects when the ack thread ends.
    let (ack_alive, ack_done) = channel::<()>();
    let ack_handle = {
        let shared = shared.clone();
        let committer = outq.committer();
        std::thread::Builder::new()
            .name("castor-ack".into())
            .spawn(move || {
                let _alive = ack_alive;
                ack_thread(reader, shared, committer)
            })
            .expect("spawning ack thread")
    };
    let mut watchers = Watchers::spawn(&shared, cfg, start);
    let pipe = Pipe {
        tx: &tx_send,
        jobs: &job_txs,
    };
    let result = run_epoch_thread(
        &mut *domain,
        cfg,
        &shared,
        pipe,
        staging_ret_rx,
        &cores,
        outq,
        &disks,
    );
    // Any failure (a domain error too) cuts the link first, so a write
    // blocked on the network cannot hold the joins below.
    if let Err(e) = &result {
        shared.fail(e.to_string());
    }
    // Tear down: encoders first (no more jobs), then wait for tx to finish.
    drop(job_txs);
    shared.stop_encoders.store(true, Ordering::Relaxed);
    for h in enc_handles {
        let _ = h.join();
    }
    drop(tx_send);
    let _ = tx_handle.join();
    disks.stop();
    watchers.stop();
    let result = self_fenced(result, &shared, &mut *domain);
    let result = refused_after_all(result, &shared, &ack_done);
    watchers.join_watchdog();
    // The ack thread exits when the connection closes; do not wait for it.
    drop(ack_handle);
    crate::ops::telemetry::with(|t| t.session_ended());
    match result {
        Ok(v) => finish(domain, outq, &shared, cfg, (workers, &disks), v),
        Err(e) => {
            abandon(&mut *domain, outq);
            Err((e, Some(domain)))
        }
    }
}

/// A read on the connection may wait this much longer than the silence
/// watchdog, which therefore speaks first and names the silence.
const READ_SLACK: Duration = Duration::from_millis(500);

/// Every blocking call on the session's connection gets a deadline tied to
/// `--backup-timeout`: a write that moves nothing for `silence` fails (the
/// tcp sink; the uring sink reads the same value for its own waits), and so
/// does a read that gets nothing for `silence` + [`READ_SLACK`].
fn arm_deadlines(conn: &std::net::TcpStream, silence: Duration) {
    if silence.is_zero() {
        return;
    }
    let r = conn
        .set_write_timeout(Some(silence))
        .and_then(|_| conn.set_read_timeout(Some(silence + READ_SLACK)));
    if let Err(e) = r {
        tracing::warn!("setting the connection's deadlines: {e}");
    }
}

/// Runs `castor-epoch` (raised priority, its copy helpers) until the run
/// ends; a panic of the thread is an error, not a crash.
#[allow(clippy::too_many_arguments)]
fn run_epoch_thread(
    domain: &mut dyn Domain,
    cfg: &PrimaryConfig,
    shared: &Shared,
    pipe: Pipe<'_>,
    staging_ret: Receiver<PageBuf>,
    cores: &[core_affinity::CoreId],
    outq: &OutputQueue,
    disks: &PrimaryDisks,
) -> DriveResult {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("castor-epoch".into())
            .spawn_scoped(scope, move || {
                crate::engine::copy::raise_priority();
                let copy_pool = CopyPool::new(cfg.copy_threads, cores);
                drive(Driver {
                    domain,
                    cfg,
                    shared,
                    pipe,
                    staging: StagingPool::new(cfg.max_inflight.max(1), &staging_ret),
                    copy_pool: &copy_pool,
                    outq,
                    unit: 0,
                    throttle: Throttle::new(),
                    disks,
                })
            })
            .expect("spawning epoch thread")
            .join()
            .unwrap_or_else(|_| Err(PrimaryError::Protocol("epoch thread panicked".into())))
    })
}

/// The session's disks: `--disk`'s and the domain's own.
fn session_disks(domain: &dyn Domain, cfg: &PrimaryConfig) -> PrimaryDisks {
    let mut d = cfg.disks.clone();
    d.disks.extend(domain.disks());
    d
}

/// Switches the output queue to the session's mode with the guest paused
/// (it may be running: re-protection), so no output is tagged across it.
fn enter(
    domain: &mut dyn Domain,
    outq: &mut OutputQueue,
    cfg: &PrimaryConfig,
) -> Result<(), PrimaryError> {
    domain.pause()?;
    if cfg.output_commit {
        outq.protect()
    } else {
        outq.unprotect()
    }
    .map(drop)
    .map_err(|e| PrimaryError::Protocol(e.to_string()))
}

/// The cores workers and copy threads are pinned to (none: not pinned).
fn pick_cores(cfg: &PrimaryConfig) -> Vec<core_affinity::CoreId> {
    if !cfg.pin {
        return Vec::new();
    }
    let all = core_affinity::get_core_ids().unwrap_or_default();
    match &cfg.cores {
        Some(list) => list
            .iter()
            .filter_map(|&id| all.iter().copied().find(|c| c.id == id))
            .collect(),
        None => all,
    }
}

type Encoders = (
    Vec<Sender<Arc<EpochJob>>>,
    Vec<Sender<Vec<u8>>>,
    Vec<JoinHandle<()>>,
);

/// Starts `castor-enc-N` for every shard: their job senders, the senders
/// that return their output buffers, and their handles.
fn spawn_encoders(
    workers: usize,
    (shadow, mem): (ShadowPtr, MemPtr),
    shared: &Arc<Shared>,
    out: &Sender<TxMsg>,
    cores: &[core_affinity::CoreId],
) -> Encoders {
    let (mut job_txs, mut buf_rets, mut handles) = (Vec::new(), Vec::new(), Vec::new());
    for shard in 0..workers {
        let (jt, jr) = channel::<Arc<EpochJob>>();
        let (bt, br) = channel::<Vec<u8>>();
        job_txs.push(jt);
        buf_rets.push(bt);
        let out = out.clone();
        let core = (!cores.is_empty()).then(|| cores[shard % cores.len()]);
        let w = Worker {
            shard,
            shards: workers,
            shadow,
            mem,
            shared: shared.clone(),
        };
        handles.push(
            std::thread::Builder::new()
                .name(format!("castor-enc-{shard}"))
                .spawn(move || {
                    if let Some(c) = core {
                        core_affinity::set_for_current(c);
                    }
                    encoder_thread(w, jr, out, br)
                })
                .expect("spawning encoder"),
        );
    }
    (job_txs, buf_rets, handles)
}

/// A failure noticed after the lease lapsed, by whatever wait noticed it
/// first, is reported as the self-fence; the guest is paused (idempotent).
fn self_fenced(result: DriveResult, shared: &Shared, domain: &mut dyn Domain) -> DriveResult {
    match result {
        Err(_) if shared.lease_lost.load(Ordering::SeqCst) => {
            let paused = domain.pause();
            let acked = shared.inflight.lock().unwrap().acked.unwrap_or(0);
            match paused {
                Ok(()) => Err(PrimaryError::LeaseLost { acked }),
                Err(e) => Err(e.into()),
            }
        }
        r => r,
    }
}

/// How long a lost session waits for the backup's last words.
const LAST_WORDS: Duration = Duration::from_millis(250);

/// A backup that refuses (a transport mismatch, a stream it found corrupt)
/// sends an Error record and closes; the primary's next write then fails
/// with a reset that may win the race against the ack thread reading the
/// refusal. A session lost to a link error therefore waits (at most
/// [`LAST_WORDS`]: a link that fails without a hang-up does not end the
/// ack thread) for the ack thread to read what the backup sent before it
/// hung up, and reports a refusal as one. A backup that went silent said
/// nothing: no wait.
fn refused_after_all(result: DriveResult, shared: &Shared, ack_done: &Receiver<()>) -> DriveResult {
    match result {
        Err(PrimaryError::BackupLost { .. }) => {
            if shared.inflight.lock().unwrap().silent {
                return result;
            }
            let _ = ack_done.recv_timeout(LAST_WORDS);
            match shared.inflight.lock().unwrap().error() {
                Some(e @ PrimaryError::Refused { .. }) => Err(e),
                _ => result,
            }
        }
        r => r,
    }
}

/// Backup lost (or any failure): output not yet committed is dropped,
/// never released. The guest stays paused until the caller decides (run
/// unprotected, or self-fence).
fn abandon(domain: &mut dyn Domain, outq: &mut OutputQueue) {
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
}

/// Clean stop: the final epoch was acknowledged and committed (the commit
/// precedes the mode switch in the queue's channel). The guest is paused;
/// whoever resumes it decides whether it runs unprotected.
fn finish(
    domain: Box<dyn Domain>,
    outq: &mut OutputQueue,
    shared: &Shared,
    cfg: &PrimaryConfig,
    (workers, disks): (usize, &PrimaryDisks),
    (final_epoch, state, recent_dirty): (u64, Vec<u8>, Vec<Vec<u64>>),
) -> SessionResult {
    let output = outq
        .unprotect()
        .map_err(|e| (PrimaryError::Protocol(e.to_string()), None))?;
    let elapsed = shared
        .ckpt_start
        .get()
        .map_or(Duration::ZERO, |t| t.elapsed());
    let acked = shared.inflight.lock().unwrap().acked.unwrap_or(0);
    let (mut summary, guest_paused) = {
        let m = shared.metrics.lock().unwrap();
        (
            Summary::from_metrics(&m, elapsed),
            Duration::from_micros(m.pause_us_total),
        )
    };
    if let Some((d, wire)) = *shared.seed_done.lock().unwrap() {
        summary.seed_ms = (d.as_secs_f64() * 1e4).round() / 10.0;
        summary.seed_wire_bytes = wire;
    }
    summary.seed_first_pass_pages = shared.seed_first_pass.load(Ordering::Relaxed);
    // Timed from mark to mark (the last at the final pause), not to the
    // final ack: the guest made no progress while that was awaited.
    let guest_window = match *shared.progress.lock().unwrap() {
        (Some(a), Some(b)) => Window::between(&a, &b),
        _ => None,
    };
    if let Some(w) = guest_window {
        summary.guest_rate = Some(crate::metrics::round3(w.rate()));
        summary.guest_cpu_share = w.cpu_share().map(crate::metrics::round3);
    }
    summary.domain = domain.describe();
    summary.transport = "tcp".into();
    summary.epoch_ms = cfg.epoch.as_secs_f64() * 1000.0;
    summary.epoch_policy = cfg.epoch_policy().to_string();
    summary.max_inflight = cfg.max_inflight;
    summary.workers = workers;
    summary.output = Some(output.clone());
    // SAFETY: the domain is paused after the final epoch and no castor
    // thread touches guest memory any more (encoders joined).
    let mem = unsafe { domain.memory().as_slice() };
    let digest = Digest::with_disk_files(mem, &state, &disks.files()).map_err(|e| {
        (
            PrimaryError::Protocol(format!("reading the disks: {e}")),
            None,
        )
    })?;
    summary.primary_digest = digest.to_hex();
    Ok(PrimaryOutcome {
        summary,
        final_epoch,
        acked_epoch: acked,
        digest,
        domain,
        recent_dirty,
        output,
        guest_window,
        guest_paused,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lost(shared: &Shared) -> DriveResult {
        shared.fail("sending epoch 0: Connection reset by peer".into());
        Err(shared.inflight.lock().unwrap().error().unwrap())
    }

    #[test]
    fn a_refusal_read_after_the_reset_is_reported_as_the_refusal() {
        let shared = Arc::new(Shared::new(&PrimaryConfig::default()));
        let result = lost(&shared);
        let (alive, done) = channel::<()>();
        let ack = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let _alive = alive;
                shared.refuse("backup reported: this backup runs --transport rdma".into());
            })
        };
        match refused_after_all(result, &shared, &done) {
            Err(PrimaryError::Refused { reason }) => {
                assert!(reason.contains("--transport rdma"), "{reason}")
            }
            other => panic!("want the refusal, got {other:?}"),
        }
        ack.join().unwrap();
    }

    #[test]
    fn a_plain_loss_stays_a_loss() {
        let shared = Shared::new(&PrimaryConfig::default());
        let result = lost(&shared);
        let (alive, done) = channel::<()>();
        drop(alive);
        match refused_after_all(result, &shared, &done) {
            Err(PrimaryError::BackupLost { reason, .. }) => assert!(reason.contains("reset")),
            other => panic!("want the loss, got {other:?}"),
        }
    }

    #[test]
    fn a_later_plain_failure_does_not_hide_a_refusal() {
        let shared = Shared::new(&PrimaryConfig::default());
        shared.refuse("backup reported: corrupt record".into());
        shared.fail("backup closed the connection".into());
        let e = shared.inflight.lock().unwrap().error();
        assert!(
            matches!(e, Some(PrimaryError::Refused { ref reason }) if reason.contains("corrupt")),
            "{e:?}"
        );
    }
}
