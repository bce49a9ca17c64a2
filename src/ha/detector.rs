//! Failure detection on the backup: the primary is suspected when no record
//! (checkpoint data or heartbeat) arrived for the heartbeat timeout.
//!
//! End of stream alone is not enough: a hung primary, or one behind a
//! network partition, keeps its TCP connection open and simply stops
//! sending. The receiving loop stamps every record it reads into a
//! [`Liveness`]; a watchdog thread (`castor-watchdog`) checks the stamp and,
//! once the silence exceeds the timeout, records it and shuts the socket
//! down. The blocked read then returns, and the receiving loop ends exactly
//! as for a broken stream: the open epoch is discarded whole, the replica
//! stays at the last complete one.
//!
//! Silence is measured only on what the backup is actually waiting for:
//! while the receiving loop processes a record (decoding, committing an
//! epoch, sending its ack) it is not reading, and data the primary sent
//! meanwhile waits in the socket. [`Liveness::processing`] brackets that
//! work: the watchdog never fires inside it, and its end counts as a beat,
//! so the backup's own slowness is never taken for a silent primary. Beacons
//! (the second path, [`crate::ha::beacon`]) beat the same [`Liveness`].

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Default heartbeat timeout.
///
/// The primary's transport thread sends a heartbeat whenever it has sent
/// nothing for 100 ms, and checkpoint records flow every epoch (25 ms by
/// default), so a live primary's longest gap between records is the
/// heartbeat interval plus its thread's wake-up delay. Measured with the
/// backup's "longest gap between records" line (2-core machine, 6 s runs of
/// `protect` on a sim domain): 106 ms with 1 s epochs (heartbeats only) and
/// 71 ms with 25 ms epochs on an idle machine; 164 ms and 115 ms with four
/// CPU hogs competing for the two cores. 500 ms is five heartbeat intervals,
/// three times the worst healthy gap measured under overload (no false
/// suspicion, which would cost a needless failover attempt), while keeping
/// detection well under a second (the guest's outage after a real failure is
/// timeout + arbiter + restore).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);

/// When the last sign of life arrived, shareable between the receiving loop
/// (which stamps) and a watchdog (which checks).
#[derive(Debug)]
pub struct Liveness {
    base: Instant,
    /// Nanoseconds after `base` of the last record.
    last_ns: AtomicU64,
    timeout: Duration,
    /// The receiving loop is processing a record, not waiting for one.
    busy: AtomicBool,
}

impl Liveness {
    pub fn new(timeout: Duration) -> Self {
        Self::starting_at(Instant::now(), timeout)
    }

    fn starting_at(base: Instant, timeout: Duration) -> Self {
        Liveness {
            base,
            last_ns: AtomicU64::new(0),
            timeout,
            busy: AtomicBool::new(false),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A record arrived at `now`.
    pub fn beat_at(&self, now: Instant) {
        let ns = now.saturating_duration_since(self.base).as_nanos() as u64;
        self.last_ns.fetch_max(ns, Ordering::Relaxed);
    }

    pub fn beat(&self) {
        self.beat_at(Instant::now())
    }

    /// How long the peer has been silent at `now`.
    pub fn silent_at(&self, now: Instant) -> Duration {
        let last = self.base + Duration::from_nanos(self.last_ns.load(Ordering::Relaxed));
        now.saturating_duration_since(last)
    }

    /// `Some(silence)` once the silence at `now` exceeds the timeout.
    /// Runs `f` (processing what was read) with the silence clock stopped:
    /// no expiry inside it, and its end counts as a sign of life.
    pub fn processing<T>(&self, f: impl FnOnce() -> T) -> T {
        self.busy.store(true, Ordering::SeqCst);
        let r = f();
        self.beat();
        self.busy.store(false, Ordering::SeqCst);
        r
    }

    pub fn expired_at(&self, now: Instant) -> Option<Duration> {
        if self.busy.load(Ordering::SeqCst) {
            return None;
        }
        let s = self.silent_at(now);
        (s > self.timeout).then_some(s)
    }
}

/// Shuts a connection down when its [`Liveness`] expires.
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    /// Silence in ms that fired the watchdog (0: not fired).
    fired_ms: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Watches `live`; on expiry shuts `stream` down (both directions) so
    /// that a read blocked on it returns.
    pub fn spawn(live: Arc<Liveness>, stream: TcpStream) -> std::io::Result<Watchdog> {
        let stop = Arc::new(AtomicBool::new(false));
        let fired_ms = Arc::new(AtomicU64::new(0));
        // Check often enough that detection lands within ~10% of the timeout.
        let tick = (live.timeout() / 10).clamp(Duration::from_millis(1), Duration::from_millis(50));
        let thread = {
            let (stop, fired_ms) = (stop.clone(), fired_ms.clone());
            std::thread::Builder::new()
                .name("castor-watchdog".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::park_timeout(tick);
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        if let Some(s) = live.expired_at(Instant::now()) {
                            fired_ms.store((s.as_millis() as u64).max(1), Ordering::SeqCst);
                            let _ = stream.shutdown(Shutdown::Both);
                            break;
                        }
                    }
                })?
        };
        Ok(Watchdog {
            stop,
            fired_ms,
            thread: Some(thread),
        })
    }

    /// Stops watching; returns the silence that fired it, if it fired.
    pub fn finish(mut self) -> Option<Duration> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        match self.fired_ms.load(Ordering::SeqCst) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn silence_is_measured_from_the_last_record() {
        let t0 = Instant::now();
        let l = Liveness::starting_at(t0, 500 * MS);
        assert_eq!(l.silent_at(t0 + 100 * MS), 100 * MS);
        l.beat_at(t0 + 80 * MS);
        assert_eq!(l.silent_at(t0 + 100 * MS), 20 * MS);
        // A late stamp from a slower thread never moves the clock back.
        l.beat_at(t0 + 50 * MS);
        assert_eq!(l.silent_at(t0 + 100 * MS), 20 * MS);
    }

    #[test]
    fn expires_only_after_the_timeout() {
        let t0 = Instant::now();
        let l = Liveness::starting_at(t0, 500 * MS);
        l.beat_at(t0 + 100 * MS);
        assert_eq!(l.expired_at(t0 + 600 * MS), None, "exactly the timeout");
        assert_eq!(l.expired_at(t0 + 601 * MS), Some(501 * MS));
        // Heartbeats every 100 ms keep it alive indefinitely.
        for i in 2..50 {
            l.beat_at(t0 + i * 100 * MS);
            assert_eq!(l.expired_at(t0 + i * 100 * MS + 99 * MS), None);
        }
    }

    #[test]
    fn processing_is_never_silence() {
        let l = Liveness::new(20 * MS);
        l.processing(|| {
            std::thread::sleep(60 * MS);
            assert_eq!(
                l.expired_at(Instant::now()),
                None,
                "expired while processing"
            );
        });
        assert_eq!(
            l.expired_at(Instant::now()),
            None,
            "the end of processing is a beat"
        );
        std::thread::sleep(30 * MS);
        assert!(
            l.expired_at(Instant::now()).is_some(),
            "silence after processing counts"
        );
    }

    #[test]
    fn watchdog_shuts_a_silent_connection_down() {
        use std::io::Read;
        let lis = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(lis.local_addr().unwrap()).unwrap();
        let (mut s, _) = lis.accept().unwrap();
        let live = Arc::new(Liveness::new(100 * MS));
        let t = Instant::now();
        let w = Watchdog::spawn(live, s.try_clone().unwrap()).unwrap();
        let mut b = [0u8; 8];
        // Blocks until the watchdog shuts the socket down.
        let n = s.read(&mut b).unwrap_or(0);
        assert_eq!(n, 0);
        let waited = t.elapsed();
        let fired = w.finish().expect("watchdog fired");
        assert!(fired >= 100 * MS, "{fired:?}");
        assert!(waited >= 100 * MS && waited < 1000 * MS, "{waited:?}");
    }

    #[test]
    fn watchdog_stays_quiet_while_records_arrive() {
        let lis = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(lis.local_addr().unwrap()).unwrap();
        let (s, _) = lis.accept().unwrap();
        let live = Arc::new(Liveness::new(100 * MS));
        let w = Watchdog::spawn(live.clone(), s).unwrap();
        for _ in 0..10 {
            std::thread::sleep(30 * MS);
            live.beat();
        }
        assert_eq!(w.finish(), None);
    }
}
