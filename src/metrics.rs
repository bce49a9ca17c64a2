//! Per-epoch measurements and their aggregation.
//!
//! Every checkpoint yields one [`EpochRecord`], filled in as it flows down
//! the pipeline (driver → encoders → transport → ack). [`Metrics`] folds
//! completed records into HdrHistograms; [`Summary`] is the stable,
//! documented JSON shape of a run (see docs/cli.md, "JSON report").

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

pub use crate::stats::Pct;

/// Measurements of one checkpoint. Times in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EpochRecord {
    pub epoch: u64,
    pub dirty_pages: u64,
    /// Pages whose bytes equalled the last sent copy (not sent).
    pub unchanged_pages: u64,
    pub zero_pages: u64,
    pub delta_pages: u64,
    pub full_pages: u64,
    /// Guest paused: pause request → resume returned.
    pub pause_us: u64,
    /// Dirty-log harvest inside the pause (the last moment's writes).
    pub harvest_us: u64,
    /// Dirty-log harvest just before the pause, while the guest runs.
    pub preharvest_us: u64,
    /// Pages the harvest inside the pause found (written since the
    /// pre-harvest; some may be in the pre-harvest too).
    pub late_pages: u64,
    /// Copy inside the pause: the late pages only (the pre-harvested ones
    /// were pre-copied).
    pub copy_us: u64,
    /// Of `copy_us`: finding the late pages' staging slots.
    pub staging_us: u64,
    /// Copy of the pre-harvested pages into staging just before the pause,
    /// while the guest runs.
    pub precopy_us: u64,
    /// Pages pre-copied (a page written again after it is copied again in
    /// the pause, and counted in `late_pages` too).
    pub precopy_pages: u64,
    pub state_us: u64,
    /// Of `pause_us`: the pause request until the guest stood still.
    pub stop_us: u64,
    /// Of `pause_us`: the resume call.
    pub resume_us: u64,
    /// Times the epoch thread was preempted (involuntary context switches)
    /// during the pause: a long pause with none waited for something; with
    /// some, the host took the core.
    pub pause_preempted: u64,
    /// Time waited for a free in-flight slot before pausing.
    pub extension_us: u64,
    /// Sum of encoder CPU time over all shards.
    pub encode_us: u64,
    pub raw_bytes: u64,
    pub wire_bytes: u64,
    pub state_bytes: u64,
    pub send_us: u64,
    /// Pause start → ack received.
    pub latency_us: u64,
    /// CLOCK_MONOTONIC (ns) just after the next epoch was opened in the
    /// output queue: output read later is tagged with a later epoch.
    pub closed_at_ns: u64,
    /// CLOCK_MONOTONIC (ns) when the ack arrived and the output queue was
    /// told to commit this epoch.
    pub acked_at_ns: u64,
    /// Share of guest time taken by throttling while this epoch ran
    /// (percent; 0: the guest ran free). See `engine::throttle`.
    pub throttle_pct: u64,
    /// Output frames the guest emitted while this epoch ran (held for it).
    pub output_frames: u64,
    /// Compressor the encoders used for this epoch ("none", "lz4",
    /// "zstd"); chosen per epoch with `--compress auto`.
    pub compressor: &'static str,
    /// The pause budget (dirty pages) in force while the epoch ran (0:
    /// none: `--pause-target off`, or the domain cannot count its writes).
    pub budget_pages: u64,
    /// Pauses given up before the epoch ended in them (the dirty set
    /// outgrew the staging readied for it) and taken again.
    pub retried_pauses: u64,
    /// The epoch ended early: its dirty set reached the budget.
    pub budget_end: bool,
    /// The dirty set reached the budget while every in-flight slot was
    /// taken: the guest was throttled as hard as it may be until one freed.
    pub budget_hold: bool,
    /// Disk operations (writes, zeroes, trims, flushes) the epoch carried.
    pub disk_ops: u64,
    /// Guest bytes those disk writes wrote.
    pub disk_bytes: u64,
    /// Bytes of the epoch's DiskWrites records on the wire (headers included).
    pub disk_wire_bytes: u64,
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process and network
/// namespace on the host, so tests can compare events across processes.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time (user + system) the calling thread has used; None if the
/// clock cannot be read.
pub fn thread_cpu_time() -> Option<std::time::Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Aggregates of completed epochs.
pub struct Metrics {
    pub pause: Histogram<u64>,
    pub harvest: Histogram<u64>,
    pub copy: Histogram<u64>,
    pub state: Histogram<u64>,
    pub encode: Histogram<u64>,
    pub send: Histogram<u64>,
    pub latency: Histogram<u64>,
    pub dirty: Histogram<u64>,
    pub throttle: Histogram<u64>,
    /// Epochs per compressor used: none, lz4, zstd.
    pub compressor_epochs: [u64; 3],
    /// Epoch length as run: pause start to the next pause start, µs (the
    /// `closed_at_ns` of consecutive checkpoints).
    pub epoch_len: Histogram<u64>,
    /// `closed_at_ns` of the last record added (0: none yet).
    last_closed_ns: u64,
    /// Checkpoint latency of the last record added, µs.
    last_latency_us: u64,
    /// Dirty pages of the last record added.
    last_dirty_pages: u64,
    pub epochs: u64,
    pub acked_epoch: u64,
    pub extended_epochs: u64,
    pub extension_us: u64,
    pub budget_ended: u64,
    pub budget_held: u64,
    /// Sum of every epoch's `pause_us`.
    pub pause_us_total: u64,
    pub dirty_pages: u64,
    pub raw_bytes: u64,
    pub wire_bytes: u64,
    pub state_bytes: u64,
    pub unchanged_pages: u64,
    pub zero_pages: u64,
    pub delta_pages: u64,
    pub full_pages: u64,
    pub disk_ops: u64,
    pub disk_bytes: u64,
    pub disk_wire_bytes: u64,
    /// Keep every record for `--json` consumers that want the raw series.
    pub records: Vec<EpochRecord>,
    pub keep_records: bool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(false)
    }
}

impl Metrics {
    pub fn new(keep_records: bool) -> Self {
        Metrics {
            pause: hist(),
            harvest: hist(),
            copy: hist(),
            state: hist(),
            encode: hist(),
            send: hist(),
            latency: hist(),
            dirty: hist(),
            throttle: hist(),
            compressor_epochs: [0; 3],
            epoch_len: hist(),
            last_closed_ns: 0,
            last_latency_us: 0,
            last_dirty_pages: 0,
            epochs: 0,
            acked_epoch: 0,
            extended_epochs: 0,
            extension_us: 0,
            budget_ended: 0,
            budget_held: 0,
            pause_us_total: 0,
            dirty_pages: 0,
            raw_bytes: 0,
            wire_bytes: 0,
            state_bytes: 0,
            unchanged_pages: 0,
            zero_pages: 0,
            delta_pages: 0,
            full_pages: 0,
            disk_ops: 0,
            disk_bytes: 0,
            disk_wire_bytes: 0,
            records: Vec::new(),
            keep_records,
        }
    }

    /// The latest acknowledged checkpoint: its latency (pause start to
    /// ack) and its dirty pages, if any was acknowledged.
    pub fn last_ack(&self) -> Option<(Duration, u64)> {
        (self.epochs > 0).then(|| {
            (
                Duration::from_micros(self.last_latency_us),
                self.last_dirty_pages,
            )
        })
    }

    pub fn add(&mut self, r: &EpochRecord) {
        let rec = |h: &mut Histogram<u64>, v: u64| {
            let _ = h.record(v);
        };
        rec(&mut self.pause, r.pause_us);
        self.pause_us_total += r.pause_us;
        rec(&mut self.harvest, r.harvest_us);
        rec(&mut self.copy, r.copy_us);
        rec(&mut self.state, r.state_us);
        rec(&mut self.encode, r.encode_us);
        rec(&mut self.send, r.send_us);
        rec(&mut self.latency, r.latency_us);
        rec(&mut self.dirty, r.dirty_pages);
        rec(&mut self.throttle, r.throttle_pct);
        match r.compressor {
            "none" => self.compressor_epochs[0] += 1,
            "lz4" => self.compressor_epochs[1] += 1,
            "zstd" => self.compressor_epochs[2] += 1,
            _ => {}
        }
        if self.last_closed_ns > 0 && r.closed_at_ns > self.last_closed_ns {
            rec(
                &mut self.epoch_len,
                (r.closed_at_ns - self.last_closed_ns) / 1000,
            );
        }
        self.last_closed_ns = r.closed_at_ns;
        self.last_latency_us = r.latency_us;
        self.last_dirty_pages = r.dirty_pages;
        self.epochs += 1;
        self.acked_epoch = self.acked_epoch.max(r.epoch);
        if r.extension_us > 0 {
            self.extended_epochs += 1;
            self.extension_us += r.extension_us;
        }
        self.budget_ended += u64::from(r.budget_end);
        self.budget_held += u64::from(r.budget_hold);
        self.dirty_pages += r.dirty_pages;
        self.raw_bytes += r.raw_bytes;
        self.wire_bytes += r.wire_bytes;
        self.state_bytes += r.state_bytes;
        self.unchanged_pages += r.unchanged_pages;
        self.zero_pages += r.zero_pages;
        self.delta_pages += r.delta_pages;
        self.full_pages += r.full_pages;
        self.disk_ops += r.disk_ops;
        self.disk_bytes += r.disk_bytes;
        self.disk_wire_bytes += r.disk_wire_bytes;
        if self.keep_records {
            self.records.push(r.clone());
        }
    }
}

/// Epochs per compressor.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct CompressorEpochs {
    pub none: u64,
    pub lz4: u64,
    pub zstd: u64,
}

/// CPU time consumed by each side, seconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Cpu {
    pub primary_s: f64,
    pub backup_s: f64,
}

/// The stable JSON report of a protect or bench run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub domain: String,
    pub transport: String,
    /// How records were protected: `mac` (BLAKE3 tag) or `aes-gcm`
    /// (`--encrypt`); empty where not recorded.
    pub records: String,
    /// Fixed: the epoch length; auto: the first epoch's (see `epoch_len_us`).
    pub epoch_ms: f64,
    /// `--epoch` as given, canonical: `25ms` or `auto:target=...`.
    pub epoch_policy: String,
    pub max_inflight: usize,
    pub workers: usize,
    pub duration_s: f64,
    pub epochs: u64,
    pub acked_epoch: u64,
    pub epochs_per_s: f64,
    pub dirty_pages: u64,
    pub dirty_pages_per_epoch: Pct,
    pub raw_bytes: u64,
    pub wire_bytes: u64,
    pub state_bytes: u64,
    pub wire_ratio: f64,
    pub wire_bytes_per_dirty_page: f64,
    pub pages_unchanged: u64,
    pub pages_zero: u64,
    pub pages_delta: u64,
    pub pages_full: u64,
    /// Disk operations replicated (see `crate::disk`), the bytes they
    /// wrote, and their records' bytes on the wire.
    pub disk_ops: u64,
    pub disk_bytes: u64,
    pub disk_wire_bytes: u64,
    pub pause_us: Pct,
    pub harvest_us: Pct,
    pub copy_us: Pct,
    pub state_us: Pct,
    pub encode_us: Pct,
    pub send_us: Pct,
    pub checkpoint_latency_us: Pct,
    /// Epoch lengths as run (what `--epoch auto` chose, plus any extension).
    pub epoch_len_us: Pct,
    pub extended_epochs: u64,
    pub extension_us_total: u64,
    /// Epochs ended early because their dirty set reached the pause
    /// budget (`--pause-target`), and epochs whose guest was throttled
    /// hard at the budget while waiting for an in-flight slot.
    pub budget_ended_epochs: u64,
    pub budget_held_epochs: u64,
    /// Share of guest time taken by throttling, per epoch (percent).
    pub throttle_pct: Pct,
    /// Epochs encoded with each compressor (`--compress auto` chooses).
    pub compressor_epochs: CompressorEpochs,
    /// The guest's own progress while protected (sim: page writes per
    /// second, kvm memtouch: loops per second), when the domain can tell.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_rate: Option<f64>,
    /// The same guest's progress unprotected, measured in the same run
    /// (bench).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_rate_unprotected: Option<f64>,
    /// Protected against unprotected speed (see `domain::progress`): per
    /// second of the guest's own CPU time, less its paused share, where
    /// the domain knows that CPU time (kvm); else per wall second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_speed_ratio: Option<f64>,
    /// `guest_rate / guest_rate_unprotected`: on a shared host it moves
    /// with the CPU share the guest was given (below).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_speed_ratio_wall: Option<f64>,
    /// The guest's CPU seconds per second protected and unprotected
    /// (kvm: the vCPU thread).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_cpu_share: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_cpu_share_unprotected: Option<f64>,
    pub seed_ms: f64,
    pub seed_wire_bytes: u64,
    /// Pages the seed's first pass read: those the domain said may hold
    /// data (all of them when it cannot tell).
    pub seed_first_pass_pages: u64,
    /// Plain single-threaded memcpy of recent dirty sets, measured after the
    /// run in the same process (bench only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memcpy_us: Option<Pct>,
    pub cpu: Cpu,
    pub primary_digest: String,
    pub replica_digest: String,
    pub replica_epoch: u64,
    pub digest_match: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_epoch: Vec<EpochRecord>,
    /// Output commit: held/released/dropped output and its release delay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<crate::stats::OutqReport>,
}

impl Summary {
    pub fn from_metrics(m: &Metrics, elapsed: Duration) -> Summary {
        let secs = elapsed.as_secs_f64().max(1e-9);
        Summary {
            duration_s: (secs * 1000.0).round() / 1000.0,
            epochs: m.epochs,
            acked_epoch: m.acked_epoch,
            epochs_per_s: ((m.epochs as f64 / secs) * 10.0).round() / 10.0,
            dirty_pages: m.dirty_pages,
            dirty_pages_per_epoch: Pct::of(&m.dirty),
            raw_bytes: m.raw_bytes,
            wire_bytes: m.wire_bytes,
            state_bytes: m.state_bytes,
            wire_ratio: if m.raw_bytes == 0 {
                0.0
            } else {
                m.wire_bytes as f64 / m.raw_bytes as f64
            },
            wire_bytes_per_dirty_page: if m.dirty_pages == 0 {
                0.0
            } else {
                m.wire_bytes as f64 / m.dirty_pages as f64
            },
            pages_unchanged: m.unchanged_pages,
            pages_zero: m.zero_pages,
            pages_delta: m.delta_pages,
            pages_full: m.full_pages,
            disk_ops: m.disk_ops,
            disk_bytes: m.disk_bytes,
            disk_wire_bytes: m.disk_wire_bytes,
            pause_us: Pct::of(&m.pause),
            harvest_us: Pct::of(&m.harvest),
            copy_us: Pct::of(&m.copy),
            state_us: Pct::of(&m.state),
            encode_us: Pct::of(&m.encode),
            send_us: Pct::of(&m.send),
            checkpoint_latency_us: Pct::of(&m.latency),
            epoch_len_us: Pct::of(&m.epoch_len),
            extended_epochs: m.extended_epochs,
            extension_us_total: m.extension_us,
            budget_ended_epochs: m.budget_ended,
            budget_held_epochs: m.budget_held,
            throttle_pct: Pct::of(&m.throttle),
            compressor_epochs: CompressorEpochs {
                none: m.compressor_epochs[0],
                lz4: m.compressor_epochs[1],
                zstd: m.compressor_epochs[2],
            },
            per_epoch: m.records.clone(),
            ..Default::default()
        }
    }
}

/// CPU time (user + system) of this process so far.
pub fn self_cpu() -> Duration {
    rusage_cpu(libc::RUSAGE_SELF)
}

/// Waits for child `pid` to exit; returns its raw wait status and the CPU
/// time (user + system) that child alone consumed.
pub fn wait_child(pid: u32) -> std::io::Result<(i32, Duration)> {
    let mut status = 0;
    // SAFETY: wait4 writes only the status int and the zeroed rusage we own.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        loop {
            let r = libc::wait4(pid as libc::pid_t, &mut status, 0, &mut ru);
            if r >= 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        ru
    };
    Ok((status, tv(ru.ru_utime) + tv(ru.ru_stime)))
}

fn tv(t: libc::timeval) -> Duration {
    Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000)
}

fn rusage_cpu(who: libc::c_int) -> Duration {
    // SAFETY: getrusage fills the zeroed struct we own; `who` is a valid constant.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut ru);
        ru
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// `v` rounded to three decimals (report figures).
pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregates_and_percentiles() {
        let mut m = Metrics::new(true);
        for i in 1..=100u64 {
            m.add(&EpochRecord {
                epoch: i,
                dirty_pages: 10,
                pause_us: i * 10,
                raw_bytes: 40960,
                wire_bytes: 4096,
                closed_at_ns: i * 20_000_000,
                ..Default::default()
            });
        }
        let s = Summary::from_metrics(&m, Duration::from_secs(2));
        assert_eq!(s.epochs, 100);
        assert_eq!(s.acked_epoch, 100);
        assert_eq!(s.epochs_per_s, 50.0);
        assert!((s.pause_us.p50 as i64 - 500).abs() <= 5, "{:?}", s.pause_us);
        assert!(s.pause_us.p99 >= 980 && s.pause_us.max >= 1000);
        assert!((s.wire_ratio - 0.1).abs() < 1e-9);
        assert_eq!(s.per_epoch.len(), 100);
        // 20 ms between consecutive pauses, to the histogram's 3 digits.
        for v in [s.epoch_len_us.p50, s.epoch_len_us.max] {
            assert!((19_980..=20_020).contains(&v), "{:?}", s.epoch_len_us);
        }
    }
}
