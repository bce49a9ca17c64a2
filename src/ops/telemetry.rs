//! The process's live figures: Prometheus metrics and the `/status` state.
//!
//! Every metric is named `castor_*`; times are in seconds, sizes in bytes
//! (Prometheus conventions). The full list with meanings is in
//! `docs/operations.md`, "Metrics". Invariants:
//! - One [`Telemetry`] per process, installed at most once
//!   ([`install`]); producers call [`get`] and do nothing when it is `None`,
//!   so code paths without `--metrics` pay one atomic load.
//! - Counters only grow; `castor_acked_epoch` only grows within one
//!   protection session (a new session starts again at its own epochs).
//! - Histogram buckets resolve 100 µs to 1 s ([`BUCKETS`]): a pause of a
//!   few hundred µs and a checkpoint latency of a second land in different
//!   buckets.
//! - `castor_throttle_ratio` is the fraction of guest run time taken away
//!   by throttling during the last acknowledged checkpoint's epoch (0 to
//!   1; 0 with `--no-throttle` or a guest the link keeps up with).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::ha::lease::LeaseWatch;
use crate::metrics::EpochRecord;

use super::status::{FailoverStep, Status};

/// Histogram buckets (seconds): 1-2-5 steps from 100 µs to 1 s.
pub const BUCKETS: [f64; 13] = [
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
];

/// What this process is in the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The live copy: runs the guest (a protect process, or a backup that
    /// activated).
    Primary,
    /// Receives checkpoints; has not activated.
    Backup,
    /// `bench`/`demo`: primary in this process, backup a child process.
    Bench,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
            Role::Bench => "bench",
        }
    }
}

/// Where the backup's failover path is (`castor_failover_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailoverState {
    /// Receiving checkpoints (or waiting for a primary); nothing suspected.
    Standby,
    /// The primary is suspected (stream broken or silent).
    Suspect,
    /// Campaigning for the arbiter.
    Arbiter,
    /// Arbiter won; the fence command runs.
    Fence,
    /// Restoring the last complete checkpoint.
    Activating,
    /// The activated guest runs: this copy is now the primary.
    Running,
    /// Not activated: the arbiter is held by another copy, or the fence
    /// command failed.
    Refused,
}

impl FailoverState {
    pub const ALL: [FailoverState; 7] = [
        FailoverState::Standby,
        FailoverState::Suspect,
        FailoverState::Arbiter,
        FailoverState::Fence,
        FailoverState::Activating,
        FailoverState::Running,
        FailoverState::Refused,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FailoverState::Standby => "standby",
            FailoverState::Suspect => "suspect",
            FailoverState::Arbiter => "arbiter",
            FailoverState::Fence => "fence",
            FailoverState::Activating => "activating",
            FailoverState::Running => "running",
            FailoverState::Refused => "refused",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabel {
    role: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabel {
    step: String,
}

type GaugeF = Gauge<f64, AtomicU64>;

/// Strings and handles behind `/status`, rarely written.
#[derive(Default)]
struct Info {
    peer: Option<String>,
    arbiter: Option<String>,
    lease: Option<LeaseWatch>,
    domain: Option<String>,
    failover: Vec<FailoverStep>,
    failover_from: Option<Instant>,
    /// CLOCK_MONOTONIC (ns) at suspicion: comparable across processes.
    failover_mono_ns: Option<u64>,
}

/// The metrics of one castor process.
pub struct Telemetry {
    registry: Registry,
    started: Instant,
    role_now: Mutex<Role>,
    role: Family<RoleLabel, Gauge>,
    epoch: Gauge,
    epochs: Counter,
    acked_epoch: Gauge,
    last_latency_us: AtomicU64,
    pause: Histogram,
    latency: Histogram,
    dirty_pages: Counter,
    raw_bytes: Counter,
    wire_bytes: Counter,
    output_held: Gauge,
    output_released: Counter,
    output_dropped: Counter,
    inflight: Gauge,
    throttle: GaugeF,
    backup_connected: Gauge,
    arbiter_token: Gauge,
    lease_left: GaugeF,
    failover_state: Family<StateLabel, Gauge>,
    failover_step: Family<StepLabel, GaugeF>,
    /// Set on entering `Running`: the next released output is the first
    /// reply of the activated copy (step `first_output`).
    first_output_pending: std::sync::atomic::AtomicBool,
    info: Mutex<Info>,
}

fn hist() -> Histogram {
    Histogram::new(BUCKETS)
}

impl Telemetry {
    /// A fresh set of metrics for a process in `role`.
    pub fn new(role: Role) -> Telemetry {
        let mut t = Telemetry {
            registry: Registry::with_prefix("castor"),
            started: Instant::now(),
            role_now: Mutex::new(role),
            role: Family::default(),
            epoch: Gauge::default(),
            epochs: Counter::default(),
            acked_epoch: Gauge::default(),
            last_latency_us: AtomicU64::new(0),
            pause: hist(),
            latency: hist(),
            dirty_pages: Counter::default(),
            raw_bytes: Counter::default(),
            wire_bytes: Counter::default(),
            output_held: Gauge::default(),
            output_released: Counter::default(),
            output_dropped: Counter::default(),
            inflight: Gauge::default(),
            throttle: GaugeF::default(),
            backup_connected: Gauge::default(),
            arbiter_token: Gauge::default(),
            lease_left: GaugeF::default(),
            failover_state: Family::default(),
            failover_step: Family::default(),
            first_output_pending: std::sync::atomic::AtomicBool::new(false),
            info: Mutex::new(Info::default()),
        };
        t.register();
        t.set_role(role);
        t.set_failover_state(FailoverState::Standby);
        t.lease_left.set(-1.0);
        t
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "role",
            "What this process is: 1 for its current role",
            self.role.clone(),
        );
        r.register(
            "epoch",
            "Epoch running (primary) or last committed (backup)",
            self.epoch.clone(),
        );
        r.register(
            "epochs",
            "Checkpoints acknowledged (primary) or committed (backup)",
            self.epochs.clone(),
        );
        r.register(
            "acked_epoch",
            "Highest checkpoint the backup acknowledged in this protection session",
            self.acked_epoch.clone(),
        );
        r.register(
            "pause_seconds",
            "Guest pause per checkpoint: harvest + copy + state save",
            self.pause.clone(),
        );
        r.register(
            "checkpoint_latency_seconds",
            "Pause start to the backup's acknowledgement",
            self.latency.clone(),
        );
        r.register(
            "dirty_pages",
            "Dirty pages checkpointed",
            self.dirty_pages.clone(),
        );
        r.register(
            "raw_bytes",
            "Bytes of dirty pages before encoding",
            self.raw_bytes.clone(),
        );
        r.register(
            "wire_bytes",
            "Bytes of encoded pages sent (primary) or received (backup)",
            self.wire_bytes.clone(),
        );
        r.register(
            "output_held",
            "Guest output items held now, waiting for their checkpoint's acknowledgement",
            self.output_held.clone(),
        );
        r.register(
            "output_released",
            "Guest output items released",
            self.output_released.clone(),
        );
        r.register(
            "output_dropped",
            "Guest output items discarded, never released (session lost, fenced, shutdown)",
            self.output_dropped.clone(),
        );
        r.register(
            "checkpoints_in_flight",
            "Checkpoints sent and not yet acknowledged",
            self.inflight.clone(),
        );
        r.register(
            "throttle_ratio",
            "Fraction of guest run time removed by throttling in the last acknowledged epoch",
            self.throttle.clone(),
        );
        r.register(
            "backup_connected",
            "1 while a backup protects this copy (primary) or a primary streams to it (backup)",
            self.backup_connected.clone(),
        );
        r.register(
            "arbiter_token",
            "Fencing token held from the arbiter (0: none)",
            self.arbiter_token.clone(),
        );
        r.register(
            "arbiter_lease_seconds_left",
            "Time left on the arbiter's lease (-1: the arbiter has no lease, e.g. a local lock)",
            self.lease_left.clone(),
        );
        r.register(
            "failover_state",
            "Where the backup's failover path is: 1 for the current state",
            self.failover_state.clone(),
        );
        r.register(
            "failover_step_seconds",
            "Last failover: time from suspecting the primary to each step",
            self.failover_step.clone(),
        );
    }

    /// Moves this process to `role` (a backup that activated is a primary).
    pub fn set_role(&self, role: Role) {
        let mut now = self.role_now.lock().unwrap_or_else(|p| p.into_inner());
        self.role
            .get_or_create(&RoleLabel { role: now.name() })
            .set(0);
        self.role
            .get_or_create(&RoleLabel { role: role.name() })
            .set(1);
        *now = role;
    }

    pub fn role(&self) -> Role {
        *self.role_now.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A checkpoint acknowledged by the backup (primary side).
    pub fn epoch_acked(&self, r: &EpochRecord) {
        self.epochs.inc();
        self.acked_epoch
            .set(self.acked_epoch.get().max(r.epoch as i64));
        self.pause.observe(r.pause_us as f64 / 1e6);
        self.latency.observe(r.latency_us as f64 / 1e6);
        self.last_latency_us.store(r.latency_us, Ordering::Relaxed);
        self.dirty_pages.inc_by(r.dirty_pages);
        self.raw_bytes.inc_by(r.raw_bytes);
        self.wire_bytes.inc_by(r.wire_bytes);
        self.throttle.set(r.throttle_pct.min(100) as f64 / 100.0);
    }

    /// Epoch `n` started running (primary).
    pub fn epoch_started(&self, n: u64) {
        self.epoch.set(n as i64);
    }

    /// A protection session began: acknowledgements start again from its
    /// own epochs.
    pub fn session_started(&self) {
        self.acked_epoch.set(0);
        self.inflight.set(0);
        self.backup_connected.set(1);
    }

    pub fn session_ended(&self) {
        self.backup_connected.set(0);
        self.inflight.set(0);
    }

    pub fn set_inflight(&self, n: usize) {
        self.inflight.set(n as i64);
    }

    /// The backup committed checkpoint `epoch` of `pages` pages whose
    /// records took `wire` bytes.
    pub fn epoch_committed(&self, epoch: u64, pages: u64, wire: u64) {
        self.epochs.inc();
        self.epoch.set(epoch as i64);
        self.acked_epoch.set(epoch as i64);
        self.dirty_pages.inc_by(pages);
        self.raw_bytes.inc_by(pages * crate::PAGE_SIZE as u64);
        self.wire_bytes.inc_by(wire);
    }

    /// Output queue news: `held` items held now, `released` and `dropped`
    /// more items since the last call. The first release after a failover
    /// is its `first_output` step (the activated copy's first reply).
    pub fn output(&self, held: u64, released: u64, dropped: u64) {
        self.output_held.set(held as i64);
        self.output_released.inc_by(released);
        self.output_dropped.inc_by(dropped);
        if released > 0 && self.first_output_pending.swap(false, Ordering::Relaxed) {
            self.failover_step("first_output", None);
        }
    }

    /// The arbiter this process uses, and its fencing token once won.
    pub fn set_arbiter(&self, describe: &str, token: Option<u64>, lease: Option<LeaseWatch>) {
        self.arbiter_token.set(token.unwrap_or(0) as i64);
        let mut i = self.info();
        i.arbiter = Some(describe.to_string());
        i.lease = lease;
    }

    pub fn set_domain(&self, desc: &str) {
        self.info().domain = Some(desc.to_string());
    }

    pub fn set_peer(&self, peer: &str) {
        self.info().peer = Some(peer.to_string());
    }

    /// Sets the failover state. Entering `Running` makes the next released
    /// output the `first_output` step.
    pub fn set_failover_state(&self, s: FailoverState) {
        for st in FailoverState::ALL {
            self.failover_state
                .get_or_create(&StateLabel { state: st.name() })
                .set(i64::from(st == s));
        }
        self.first_output_pending
            .store(s == FailoverState::Running, Ordering::Relaxed);
    }

    /// The primary was suspected (its stream lost at `at`): a new failover
    /// timeline starts there, with its `suspect` step at 0.
    pub fn failover_began(&self, at: Instant) {
        let mut i = self.info();
        i.failover.clear();
        i.failover_from = Some(at);
        i.failover_mono_ns =
            Some(crate::metrics::mono_ns().saturating_sub(at.elapsed().as_nanos() as u64));
        self.failover_step.clear();
        drop(i);
        self.set_failover_state(FailoverState::Suspect);
        self.failover_step("suspect", Some(Duration::ZERO));
    }

    /// Records step `name` of the current failover, `at` after suspicion
    /// (default: now). A step outside a failover is ignored.
    pub fn failover_step(&self, name: &str, at: Option<Duration>) {
        let mut i = self.info();
        let Some(from) = i.failover_from else { return };
        let at = at.unwrap_or_else(|| from.elapsed());
        self.failover_step
            .get_or_create(&StepLabel {
                step: name.to_string(),
            })
            .set(at.as_secs_f64());
        i.failover.retain(|s| s.step != name);
        i.failover.push(FailoverStep {
            step: name.to_string(),
            at_ms: (at.as_secs_f64() * 1e6).round() / 1e3,
        });
    }

    fn info(&self) -> std::sync::MutexGuard<'_, Info> {
        self.info.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gauges computed at scrape time (the lease's time left).
    fn refresh(&self) {
        let left = match &self.info().lease {
            Some(l) => l.remaining().as_secs_f64(),
            None => -1.0,
        };
        self.lease_left.set(left);
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        self.refresh();
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// The `/status` document.
    pub fn status(&self) -> Status {
        self.refresh();
        let i = self.info();
        let epoch = self.epoch.get().max(0) as u64;
        let acked = self.acked_epoch.get().max(0) as u64;
        Status {
            role: self.role(),
            uptime_s: (self.started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            domain: i.domain.clone(),
            epoch,
            acked_epoch: acked,
            lag_epochs: epoch.saturating_sub(acked),
            last_checkpoint_latency_ms: self.last_latency_us.load(Ordering::Relaxed) as f64 / 1e3,
            checkpoints_in_flight: self.inflight.get().max(0) as u64,
            output_held: self.output_held.get().max(0) as u64,
            output_released: self.output_released.get(),
            output_dropped: self.output_dropped.get(),
            peer: i.peer.clone(),
            peer_connected: self.backup_connected.get() == 1,
            arbiter: i.arbiter.clone(),
            arbiter_token: self.arbiter_token.get().max(0) as u64,
            lease_left_s: i.lease.as_ref().map(|l| l.remaining().as_secs_f64()),
            failover_state: FailoverState::ALL
                .into_iter()
                .find(|s| {
                    self.failover_state
                        .get_or_create(&StateLabel { state: s.name() })
                        .get()
                        == 1
                })
                .unwrap_or(FailoverState::Standby),
            last_failover: i.failover.clone(),
            failover_started_mono_ns: i.failover_mono_ns,
        }
    }
}

static GLOBAL: OnceLock<Arc<Telemetry>> = OnceLock::new();

/// Installs the process's telemetry; returns it, or the one installed
/// before (the first install wins: one process, one set of metrics).
pub fn install(role: Role) -> Arc<Telemetry> {
    GLOBAL
        .get_or_init(|| Arc::new(Telemetry::new(role)))
        .clone()
}

/// The installed telemetry, if a command asked for metrics.
#[inline]
pub fn get() -> Option<&'static Telemetry> {
    GLOBAL.get().map(|t| &**t)
}

/// Runs `f` on the installed telemetry; nothing without `--metrics`.
#[inline]
pub fn with(f: impl FnOnce(&Telemetry)) {
    if let Some(t) = get() {
        f(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: &Telemetry, name: &str) -> Option<f64> {
        t.render().lines().find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == name).then(|| v.parse().ok())?
        })
    }

    #[test]
    fn epochs_fill_counters_and_histograms_in_seconds() {
        let t = Telemetry::new(Role::Primary);
        for e in 1..=3 {
            t.epoch_acked(&EpochRecord {
                epoch: e,
                dirty_pages: 10,
                pause_us: 150,
                latency_us: 30_000,
                raw_bytes: 40960,
                wire_bytes: 1000,
                ..Default::default()
            });
        }
        assert_eq!(sample(&t, "castor_epochs_total"), Some(3.0));
        assert_eq!(sample(&t, "castor_acked_epoch"), Some(3.0));
        assert_eq!(sample(&t, "castor_dirty_pages_total"), Some(30.0));
        assert_eq!(sample(&t, "castor_wire_bytes_total"), Some(3000.0));
        // 150 µs lands above the 100 µs bucket and inside the 200 µs one.
        assert_eq!(
            sample(&t, "castor_pause_seconds_bucket{le=\"0.0001\"}"),
            Some(0.0)
        );
        assert_eq!(
            sample(&t, "castor_pause_seconds_bucket{le=\"0.0002\"}"),
            Some(3.0)
        );
        assert_eq!(
            sample(&t, "castor_checkpoint_latency_seconds_bucket{le=\"0.02\"}"),
            Some(0.0)
        );
        assert_eq!(
            sample(&t, "castor_checkpoint_latency_seconds_bucket{le=\"0.05\"}"),
            Some(3.0)
        );
        assert_eq!(sample(&t, "castor_throttle_ratio"), Some(0.0));
        t.epoch_acked(&EpochRecord {
            epoch: 4,
            throttle_pct: 35,
            ..Default::default()
        });
        assert_eq!(sample(&t, "castor_throttle_ratio"), Some(0.35));
        assert_eq!(sample(&t, "castor_arbiter_lease_seconds_left"), Some(-1.0));
        assert_eq!(sample(&t, "castor_role{role=\"primary\"}"), Some(1.0));
    }

    #[test]
    fn output_gauge_and_counters_follow_the_queue() {
        let t = Telemetry::new(Role::Primary);
        t.output(5, 0, 0);
        t.output(1, 3, 1);
        t.output(0, 2, 4);
        let s = t.status();
        assert_eq!(s.output_held, 0);
        assert_eq!(s.output_released, 5);
        assert_eq!(s.output_dropped, 5);
    }

    #[test]
    fn failover_timeline_starts_at_suspicion_and_role_moves() {
        let t = Telemetry::new(Role::Backup);
        t.failover_step("arbiter", None); // outside a failover: ignored
        assert!(t.status().last_failover.is_empty());
        t.failover_began(Instant::now());
        t.set_failover_state(FailoverState::Arbiter);
        t.failover_step("arbiter", None);
        t.failover_step("fence", Some(Duration::from_millis(1500)));
        t.output(0, 1, 0); // before running: not the activated copy's
        t.set_failover_state(FailoverState::Running);
        t.failover_step("running", None);
        t.set_role(Role::Primary);
        t.output(0, 1, 0);
        t.output(0, 1, 0); // only the first counts
        let s = t.status();
        let steps: Vec<&str> = s.last_failover.iter().map(|s| s.step.as_str()).collect();
        assert_eq!(
            steps,
            ["suspect", "arbiter", "fence", "running", "first_output"]
        );
        assert_eq!(s.failover_state, FailoverState::Running);
        assert_eq!(s.role, Role::Primary);
        assert_eq!(
            sample(&t, "castor_failover_step_seconds{step=\"fence\"}"),
            Some(1.5)
        );
        assert_eq!(
            sample(&t, "castor_failover_state{state=\"running\"}"),
            Some(1.0)
        );
        assert_eq!(sample(&t, "castor_role{role=\"backup\"}"), Some(0.0));
    }

    #[test]
    fn lease_left_is_read_at_scrape_time() {
        let t = Telemetry::new(Role::Primary);
        let l = LeaseWatch::new();
        l.extend_to(Instant::now() + Duration::from_secs(5));
        t.set_arbiter("etcd:x", Some(7), Some(l));
        let left = sample(&t, "castor_arbiter_lease_seconds_left").unwrap();
        assert!(left > 4.0 && left <= 5.0, "{left}");
        assert_eq!(sample(&t, "castor_arbiter_token"), Some(7.0));
    }
}
