//! The session's watchers, each on its own thread: the lease watcher
//! (`castor-lease`), the backup-silence watchdog (`castor-watch`) and the
//! progress line (`castor-progress`).
//!
//! Invariants:
//! - Between pauses the guest runs and waits for acks may be long: the lease
//!   watcher asks the session's
//!   [`LeaseGate`](crate::ha::lease::LeaseGate) every 5 ms and fails the session on
//!   [`Verdict::Fence`], which wakes every wait; the guest is paused on the
//!   way out.
//! - A backup silent (no ack, no heartbeat) for longer than
//!   `backup_silence` fails the session, checked every 50 ms: a hung backup
//!   whose TCP connection stays open must not hold the guest's output forever.
//! - So does a backup that keeps talking but acknowledges nothing: a
//!   checkpoint (not the seed, whose commit writes the whole image) fully
//!   sent for longer than `backup_silence`, with no ack since, fails the
//!   session. That is a one-way partition (primary to backup dropped): the
//!   backup's heartbeats still arrive, the checkpoints no longer do.
//! - A failure cuts the session's connection ([`Shared::fail`]), so a
//!   thread blocked on the network returns and the teardown goes on.
//! - Every watcher ends within one of its periods once `done` is set.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::shared::{Inflight, Shared};
use super::PrimaryConfig;
use crate::ha::lease::Verdict;
use crate::metrics::Summary;

/// The running watchers of one session.
pub(super) struct Watchers {
    done: Arc<AtomicBool>,
    lease: Option<JoinHandle<()>>,
    watchdog: JoinHandle<()>,
    progress: Option<JoinHandle<()>>,
}

impl Watchers {
    pub fn spawn(shared: &Arc<Shared>, cfg: &PrimaryConfig, start: Instant) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let lease = shared.lease.can_lapse().then(|| {
            let (shared, done) = (shared.clone(), done.clone());
            std::thread::Builder::new()
                .name("castor-lease".into())
                .spawn(move || lease_watch(shared, done))
                .expect("spawning lease thread")
        });
        let watchdog = {
            let (shared, done, silence) = (shared.clone(), done.clone(), cfg.backup_silence);
            std::thread::Builder::new()
                .name("castor-watch".into())
                .spawn(move || silence_watchdog(shared, done, silence))
                .expect("spawning the backup watchdog")
        };
        let progress = cfg.progress.then(|| {
            let (shared, done) = (shared.clone(), done.clone());
            std::thread::Builder::new()
                .name("castor-progress".into())
                .spawn(move || progress_thread(shared, start, done))
                .expect("spawning progress thread")
        });
        Watchers {
            done,
            lease,
            watchdog,
            progress,
        }
    }

    /// Stops every watcher; joins the progress and lease threads. The
    /// watchdog is joined by [`Watchers::join_watchdog`], after the
    /// self-fence pause, which must not wait for it.
    pub fn stop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(h) = self.progress.take() {
            h.thread().unpark();
            let _ = h.join();
        }
        if let Some(h) = self.lease.take() {
            let _ = h.join();
        }
    }

    pub fn join_watchdog(self) {
        self.watchdog.thread().unpark();
        let _ = self.watchdog.join();
    }
}

/// Fails the session (as a self-fence) once the gate says to fence.
fn lease_watch(shared: Arc<Shared>, done: Arc<AtomicBool>) {
    while !done.load(Ordering::Relaxed) {
        if shared.lease.may_proceed(Instant::now()) == Verdict::Fence {
            shared.lease_lapsed();
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Fails the session when the backup has been silent (no ack, no
/// heartbeat) for `silence`: a hung or partitioned backup whose TCP
/// connection stays open would otherwise hold the guest's output forever.
fn silence_watchdog(shared: Arc<Shared>, done: Arc<AtomicBool>, silence: Duration) {
    while !done.load(Ordering::Relaxed) {
        std::thread::park_timeout(Duration::from_millis(50));
        if done.load(Ordering::Relaxed) {
            return;
        }
        let quiet = shared.heard.lock().unwrap().elapsed();
        if quiet > silence {
            return shared.fail_silent(format!(
                "backup silent for {} ms (timeout {} ms)",
                quiet.as_millis(),
                silence.as_millis()
            ));
        }
        let overdue = ack_overdue(&shared.inflight.lock().unwrap(), silence, Instant::now());
        if let Some(why) = overdue {
            return shared.fail_silent(why);
        }
    }
}

/// Why the oldest checkpoint in flight is overdue: fully sent, and no ack
/// since, for longer than `limit`. The seed (epoch 0) is exempt.
fn ack_overdue(g: &Inflight, limit: Duration, now: Instant) -> Option<String> {
    let (&epoch, entry) = g.pending.iter().next()?;
    if epoch == 0 {
        return None;
    }
    let sent = entry.sent_at?;
    let since = g.last_ack_at.map_or(sent, |a| a.max(sent));
    let waited = now.saturating_duration_since(since);
    (waited > limit).then(|| {
        format!(
            "backup acknowledged nothing for {} ms after checkpoint {epoch} went out, \
             though it still sends (timeout {} ms): the link to it is cut one way",
            waited.as_millis(),
            limit.as_millis()
        )
    })
}

fn progress_thread(shared: Arc<Shared>, start: Instant, done: Arc<AtomicBool>) {
    let mut last_epochs = 0u64;
    let mut last_wire = 0u64;
    let mut last_t = Instant::now();
    while !done.load(Ordering::Relaxed) {
        // Unparked by `Watchers::stop`: the teardown does not wait a tick.
        std::thread::park_timeout(Duration::from_millis(200));
        if done.load(Ordering::Relaxed) {
            return;
        }
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

#[cfg(test)]
mod tests {
    use super::super::shared::InflightEntry;
    use super::*;

    fn sent(g: &mut Inflight, epoch: u64, at: Option<Instant>) {
        g.pending.insert(
            epoch,
            InflightEntry {
                record: Default::default(),
                pause_start: Instant::now(),
                sent_at: at,
            },
        );
    }

    #[test]
    fn a_checkpoint_sent_and_unacknowledged_past_the_limit_is_overdue() {
        let limit = Duration::from_millis(100);
        let t0 = Instant::now();
        let mut g = Inflight::default();
        sent(&mut g, 3, Some(t0));
        assert_eq!(ack_overdue(&g, limit, t0 + limit), None, "at the limit");
        let why = ack_overdue(&g, limit, t0 + limit * 2).expect("overdue");
        assert!(
            why.contains("checkpoint 3") && why.contains("200 ms"),
            "{why}"
        );
    }

    #[test]
    fn an_ack_after_the_send_restarts_the_clock() {
        let limit = Duration::from_millis(100);
        let t0 = Instant::now();
        let mut g = Inflight::default();
        sent(&mut g, 4, Some(t0));
        g.last_ack_at = Some(t0 + limit);
        assert_eq!(ack_overdue(&g, limit, t0 + limit * 2), None);
        assert!(ack_overdue(&g, limit, t0 + limit * 3).is_some());
    }

    #[test]
    fn the_seed_and_a_unit_still_being_sent_are_never_overdue() {
        let limit = Duration::from_millis(100);
        let t0 = Instant::now();
        let mut g = Inflight::default();
        sent(&mut g, 0, Some(t0));
        sent(&mut g, 1, Some(t0));
        assert_eq!(ack_overdue(&g, limit, t0 + limit * 10), None, "seed first");
        let mut g = Inflight::default();
        sent(&mut g, 5, None);
        assert_eq!(
            ack_overdue(&g, limit, t0 + limit * 10),
            None,
            "still sending"
        );
    }
}
