//! `castor tune`: every configuration (epoch policy × in-flight limit ×
//! compressor × transport) run on loopback, rounds interleaved so that
//! machine noise hits all alike; one CSV/JSON row per configuration, an
//! HdrHistogram interval log per configuration, and PNG plots.
//!
//! Per configuration, histogram figures (pause, checkpoint latency, epoch
//! length) merge the epochs of every round; rates, CPU, guest speed and
//! the output release delay are means over rounds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::bench::loopback::{self, LoopbackError, LoopbackOpts};
use crate::bench::{hlog, plot};
use crate::codec::Compressor;
use crate::domain::DomainSpec;
use crate::engine::epoch_control::{AutoParams, EpochPolicy};
use crate::engine::primary::PrimaryConfig;
use crate::metrics::{EpochRecord, Pct, Summary};
use crate::transport::TransportKind;

#[derive(Debug, thiserror::Error)]
pub enum TuneError {
    #[error("configuration {label}, round {round}: {source}")]
    Run {
        label: String,
        round: u32,
        #[source]
        source: LoopbackError,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Hlog(#[from] hlog::HlogError),
    #[error(transparent)]
    Plot(#[from] plot::PlotError),
}

/// One point of the sweep.
#[derive(Debug, Clone)]
pub struct TuneConfig {
    pub epoch: EpochPolicy,
    pub inflight: usize,
    pub compress: Compressor,
    pub transport: TransportKind,
}

/// `auto-t20-m2-x100` (target, min, max), plus `-o..` (overhead, per
/// mille), `-d..` (delay) and `-r..` (rate, Mbit/s) where they differ from
/// the defaults, so no two distinct policies share a label.
fn auto_tag(p: &AutoParams) -> String {
    let d = AutoParams::default();
    // Whole milliseconds as `20`, anything finer as `1500us`.
    let t = |x: Duration| match x.subsec_nanos() % 1_000_000 {
        0 => x.as_millis().to_string(),
        _ => format!("{}us", x.as_micros()),
    };
    let mut tag = format!("auto-t{}-m{}-x{}", t(p.target), t(p.min), t(p.max));
    if p.overhead != d.overhead {
        tag += &format!("-o{}", (p.overhead * 1000.0).round());
    }
    if p.delay != d.delay {
        tag += &format!("-d{}", t(p.delay));
    }
    if p.rate_bps != d.rate_bps {
        tag += &format!("-r{}", (p.rate_bps / 1e6).round());
    }
    tag
}

impl TuneConfig {
    /// A file-name-safe label, e.g. `e25ms-k2-lz4-tcp`, `eauto-k2-lz4-tcp`
    /// (default auto) or `eauto-t20-m10-x100-k2-lz4-tcp` (target, min, max).
    pub fn label(&self) -> String {
        let e = match self.epoch {
            EpochPolicy::Fixed(d) => format!("{}ms", d.as_secs_f64() * 1000.0),
            EpochPolicy::Auto(p) if p == AutoParams::default() => "auto".into(),
            // Two auto variants in one sweep must not share files.
            EpochPolicy::Auto(p) => auto_tag(&p),
        };
        format!(
            "e{e}-k{}-{}-{}",
            self.inflight,
            compress_name(self.compress).replace(':', ""),
            self.transport.name()
        )
    }

    /// The curve this configuration belongs to in the plots: every
    /// parameter but the epoch.
    fn curve(&self) -> String {
        format!(
            "inflight {}, {}, {}",
            self.inflight,
            compress_name(self.compress),
            self.transport.name()
        )
    }
}

/// `lz4`, `zstd:3`, `none`: as `--compress` spells it.
fn compress_name(c: Compressor) -> String {
    match c {
        Compressor::None => "none".into(),
        Compressor::Lz4 => "lz4".into(),
        Compressor::Zstd(l) => format!("zstd:{l}"),
    }
}

/// What `tune` sweeps and where it writes.
pub struct TuneOpts {
    pub domain: DomainSpec,
    pub configs: Vec<TuneConfig>,
    pub rounds: u32,
    pub duration: Duration,
    pub out: PathBuf,
    /// The primary's other settings (workers, pinning, ...).
    pub base: PrimaryConfig,
    /// The address backup and primary meet on (as `bench`: loopback, or
    /// an RDMA device's address).
    pub ip: std::net::IpAddr,
}

/// One configuration's row of `tune.csv` / `tune.json`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Row {
    pub label: String,
    pub epoch: String,
    /// Fixed: the epoch; auto: the median epoch length it ran.
    pub epoch_ms: f64,
    pub inflight: usize,
    pub compress: String,
    pub transport: String,
    pub rounds: u32,
    pub epochs_per_s: f64,
    /// The guest's own progress protected vs unprotected (from the run's
    /// report, where the engine measures it; empty otherwise).
    pub guest_speed_ratio: Option<f64>,
    pub pause_p50_us: u64,
    pub pause_p99_us: u64,
    pub pause_max_us: u64,
    pub checkpoint_latency_p50_us: u64,
    pub checkpoint_latency_p99_us: u64,
    /// Output latency: each round's percentile, the median over rounds
    /// (one round stalled by a loaded host does not decide the row).
    pub output_latency_p50_us: u64,
    pub output_latency_p99_us: u64,
    /// The worst round's output latency p99, next to the median.
    pub output_latency_p99_worst_us: u64,
    pub output_frames: u64,
    pub epoch_len_p50_us: u64,
    pub epoch_len_p99_us: u64,
    pub wire_bytes_per_s: f64,
    pub cpu_primary_per_s: f64,
    pub cpu_backup_per_s: f64,
    pub digest_match: bool,
    /// The same per wall-clock second (moves with the CPU share a shared
    /// host gave the guest in each window).
    pub guest_speed_ratio_wall: Option<f64>,
}

/// The CSV header, in `Row` field order.
pub const CSV_HEADER: &str =
    "label,epoch,epoch_ms,inflight,compress,transport,rounds,epochs_per_s,\
guest_speed_ratio,pause_p50_us,pause_p99_us,pause_max_us,checkpoint_latency_p50_us,\
checkpoint_latency_p99_us,output_latency_p50_us,output_latency_p99_us,output_frames,\
epoch_len_p50_us,epoch_len_p99_us,wire_bytes_per_s,cpu_primary_per_s,cpu_backup_per_s,digest_match,\
output_latency_p99_worst_us,guest_speed_ratio_wall";

impl Row {
    fn csv(&self) -> String {
        format!(
            "{},{},{:.3},{},{},{},{},{:.2},{},{},{},{},{},{},{},{},{},{},{},{:.0},{:.3},{:.3},{},{},{}",
            self.label,
            csv_field(&self.epoch),
            self.epoch_ms,
            self.inflight,
            self.compress,
            self.transport,
            self.rounds,
            self.epochs_per_s,
            self.guest_speed_ratio
                .map_or(String::new(), |r| format!("{r:.3}")),
            self.pause_p50_us,
            self.pause_p99_us,
            self.pause_max_us,
            self.checkpoint_latency_p50_us,
            self.checkpoint_latency_p99_us,
            self.output_latency_p50_us,
            self.output_latency_p99_us,
            self.output_frames,
            self.epoch_len_p50_us,
            self.epoch_len_p99_us,
            self.wire_bytes_per_s,
            self.cpu_primary_per_s,
            self.cpu_backup_per_s,
            self.digest_match,
            self.output_latency_p99_worst_us,
            self.guest_speed_ratio_wall
                .map_or(String::new(), |r| format!("{r:.3}")),
        )
    }
}

/// Runs the sweep; writes tune.csv, tune.json, hlog/*.hlog and the PNGs
/// under `opts.out`. Returns the rows.
pub fn run(opts: &TuneOpts) -> Result<Vec<Row>, TuneError> {
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TuneError::Write { path, source }
    };
    let hdir = opts.out.join("hlog");
    std::fs::create_dir_all(&hdir).map_err(write_err(&hdir))?;
    let rdir = opts.out.join("runs");
    std::fs::create_dir_all(&rdir).map_err(write_err(&rdir))?;
    let n = opts.configs.len();
    let mut runs: Vec<Vec<Summary>> = vec![Vec::new(); n];
    let total = n as u32 * opts.rounds;
    let base_ns = crate::metrics::mono_ns();
    for round in 0..opts.rounds {
        for (i, c) in opts.configs.iter().enumerate() {
            let done = round * n as u32 + i as u32;
            eprint!(
                "\rcastor tune: run {}/{total} (round {}/{}, {})          ",
                done + 1,
                round + 1,
                opts.rounds,
                c.label()
            );
            let mut cfg = opts.base.clone();
            cfg.set_epoch_policy(c.epoch);
            cfg.max_inflight = c.inflight;
            cfg.compressor = c.compress;
            cfg.duration = Some(opts.duration);
            cfg.keep_records = true;
            let lo = LoopbackOpts {
                state_dir: None,
                quiet_backup: true,
                transport: c.transport,
                ip: opts.ip,
                backup_silence: cfg.backup_silence,
                protection: crate::transport::auth::Protection::Mac,
                decode_lanes: None,
            };
            let s = run_one(opts, c, round + 1, &cfg, &lo)?;
            // Each run's own report (without its epoch records), so that
            // one round's outlier can be told from a trend.
            let path = rdir.join(format!("{}-r{}.json", c.label(), round + 1));
            let mut report = serde_json::to_value(&s).expect("serialises");
            if let Some(o) = report.as_object_mut() {
                o.remove("per_epoch");
            }
            std::fs::write(
                &path,
                serde_json::to_vec_pretty(&report).expect("serialises"),
            )
            .map_err(write_err(&path))?;
            runs[i].push(s);
        }
    }
    eprintln!("\rcastor tune: {total} runs done{:40}", "");
    let rows: Vec<Row> = opts
        .configs
        .iter()
        .zip(&runs)
        .map(|(c, r)| row(c, r))
        .collect();
    for (c, r) in opts.configs.iter().zip(&runs) {
        let recs: Vec<EpochRecord> = r.iter().flat_map(|s| s.per_epoch.clone()).collect();
        let comment = format!("castor tune {} on {}", c.label(), opts.domain);
        hlog::write(
            &hdir.join(format!("{}.hlog", c.label())),
            &recs,
            base_ns,
            &comment,
        )?;
    }
    let csv = opts.out.join("tune.csv");
    let mut text = String::from(CSV_HEADER);
    text.push('\n');
    for r in &rows {
        text.push_str(&r.csv());
        text.push('\n');
    }
    std::fs::write(&csv, text).map_err(write_err(&csv))?;
    let json = opts.out.join("tune.json");
    let doc = serde_json::json!({
        "domain": opts.domain.to_string(),
        "duration_s": opts.duration.as_secs_f64(),
        "rounds": opts.rounds,
        "rows": rows,
    });
    std::fs::write(&json, serde_json::to_vec_pretty(&doc).expect("serialises"))
        .map_err(write_err(&json))?;
    plots(&opts.out, &opts.configs, &rows)?;
    Ok(rows)
}

/// A CSV field, quoted (RFC 4180) when it holds a comma or a quote, as an
/// `auto:target=..,min=..` policy does.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Attempts at one run: a failed session (on a loaded machine, a backup
/// that declared the primary silent during the seed) is retried, with a
/// warning naming it, before the sweep gives up.
const ATTEMPTS: u32 = 3;

fn run_one(
    opts: &TuneOpts,
    c: &TuneConfig,
    round: u32,
    cfg: &PrimaryConfig,
    lo: &LoopbackOpts,
) -> Result<Summary, TuneError> {
    let mut attempt = 1;
    loop {
        match loopback::loopback(&opts.domain, cfg, lo) {
            Ok(s) => return Ok(s),
            Err(e) if attempt < ATTEMPTS && !crate::engine::stop_requested() => {
                let first = e.to_string();
                let first = first.lines().next().unwrap_or("");
                eprintln!(
                    "\ncastor tune: {} round {round} failed ({first}); retrying",
                    c.label()
                );
                attempt += 1;
            }
            Err(source) => {
                return Err(TuneError::Run {
                    label: c.label(),
                    round,
                    source,
                })
            }
        }
    }
}

/// Aggregates one configuration's rounds.
fn row(c: &TuneConfig, runs: &[Summary]) -> Row {
    let k = runs.len().max(1) as f64;
    let mean = |f: &dyn Fn(&Summary) -> f64| runs.iter().map(f).sum::<f64>() / k;
    let merged = |f: &dyn Fn(&EpochRecord) -> u64| {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("bounds");
        for r in runs.iter().flat_map(|s| &s.per_epoch) {
            let _ = h.record(f(r).max(1));
        }
        Pct::of(&h)
    };
    // Epoch lengths from consecutive pauses within each run.
    let mut lens = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("bounds");
    for s in runs {
        for w in s.per_epoch.windows(2) {
            let d = w[1].closed_at_ns.saturating_sub(w[0].closed_at_ns) / 1000;
            let _ = lens.record(d.max(1));
        }
    }
    let lens = Pct::of(&lens);
    let pause = merged(&|r| r.pause_us);
    let lat = merged(&|r| r.latency_us);
    let per_round = |f: &dyn Fn(&Pct) -> u64| -> Vec<u64> {
        runs.iter()
            .map(|s| {
                s.output
                    .as_ref()
                    .map_or(0, |o| f(&o.release_delay_steady_us))
            })
            .collect()
    };
    let out = |f: &dyn Fn(&Pct) -> u64| median(per_round(f));
    let ratio = |key: &str| -> Option<f64> {
        let v: Vec<f64> = runs.iter().filter_map(|s| report_f64(s, key)).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    Row {
        label: c.label(),
        epoch: c.epoch.to_string(),
        epoch_ms: match c.epoch {
            EpochPolicy::Fixed(d) => d.as_secs_f64() * 1000.0,
            EpochPolicy::Auto(_) => lens.p50 as f64 / 1000.0,
        },
        inflight: c.inflight,
        compress: compress_name(c.compress),
        transport: c.transport.name().into(),
        rounds: runs.len() as u32,
        epochs_per_s: mean(&|s| s.epochs_per_s),
        guest_speed_ratio: ratio("guest_speed_ratio"),
        guest_speed_ratio_wall: ratio("guest_speed_ratio_wall"),
        pause_p50_us: pause.p50,
        pause_p99_us: pause.p99,
        pause_max_us: pause.max,
        checkpoint_latency_p50_us: lat.p50,
        checkpoint_latency_p99_us: lat.p99,
        output_latency_p50_us: out(&|p| p.p50),
        output_latency_p99_us: out(&|p| p.p99),
        output_latency_p99_worst_us: per_round(&|p| p.p99).into_iter().max().unwrap_or(0),
        output_frames: mean(&|s| s.output.as_ref().map_or(0.0, |o| o.released as f64)) as u64,
        epoch_len_p50_us: lens.p50,
        epoch_len_p99_us: lens.p99,
        wire_bytes_per_s: mean(&|s| s.wire_bytes as f64 / s.duration_s.max(1e-9)),
        cpu_primary_per_s: mean(&|s| s.cpu.primary_s / s.duration_s.max(1e-9)),
        cpu_backup_per_s: mean(&|s| s.cpu.backup_s / s.duration_s.max(1e-9)),
        digest_match: runs.iter().all(|s| s.digest_match),
    }
}

/// The median of `v` (the upper one of an even count); 0 when empty.
fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// A figure of a run's report such as `guest_speed_ratio`, where the
/// engine measures it (read through the JSON shape so that `tune` does not
/// depend on which engine version fills it).
fn report_f64(s: &Summary, key: &str) -> Option<f64> {
    serde_json::to_value(s).ok()?.get(key)?.as_f64()
}

/// latency_vs_epoch.png, guest_speed_vs_epoch.png (epochs/s where the
/// guest's speed is not measured), wire_vs_epoch.png: x is the epoch
/// length (auto at the median it ran), one curve per other parameter.
fn plots(dir: &Path, configs: &[TuneConfig], rows: &[Row]) -> Result<(), TuneError> {
    let curves = |name: &str, y: &dyn Fn(&Row) -> f64| -> Vec<plot::Series> {
        let mut out: Vec<plot::Series> = Vec::new();
        for (c, r) in configs.iter().zip(rows) {
            let auto = matches!(c.epoch, EpochPolicy::Auto(_));
            let label = format!("{name}{}{}", c.curve(), if auto { " (auto)" } else { "" });
            let pos = out.iter().position(|s| s.label == label);
            let s = match pos {
                Some(i) => &mut out[i],
                None => {
                    out.push(plot::Series {
                        label,
                        points: Vec::new(),
                    });
                    out.last_mut().expect("just pushed")
                }
            };
            s.points.push((r.epoch_ms, y(r)));
        }
        for s in &mut out {
            s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        out
    };
    let ms = |us: u64| us as f64 / 1000.0;
    let mut lat = curves("output p99: ", &|r| ms(r.output_latency_p99_us));
    if rows.iter().all(|r| r.output_frames == 0) {
        lat.clear();
    }
    lat.extend(curves("checkpoint p99: ", &|r| {
        ms(r.checkpoint_latency_p99_us)
    }));
    lat.extend(curves("pause p99: ", &|r| ms(r.pause_p99_us)));
    plot::draw(
        &dir.join("latency_vs_epoch.png"),
        &plot::Chart {
            title: "Latency against epoch length",
            x_label: "epoch length (ms)",
            y_label: "p99 latency (ms)",
            series: lat,
        },
    )?;
    let have_speed = rows.iter().any(|r| r.guest_speed_ratio.is_some());
    let (title, y_label, speed) = if have_speed {
        (
            "Guest speed against epoch length",
            "guest speed, protected / unprotected",
            curves("", &|r| r.guest_speed_ratio.unwrap_or(0.0)),
        )
    } else {
        (
            "Checkpoint rate against epoch length",
            "checkpoints per second",
            curves("", &|r| r.epochs_per_s),
        )
    };
    plot::draw(
        &dir.join("guest_speed_vs_epoch.png"),
        &plot::Chart {
            title,
            x_label: "epoch length (ms)",
            y_label,
            series: speed,
        },
    )?;
    plot::draw(
        &dir.join("wire_vs_epoch.png"),
        &plot::Chart {
            title: "Replication traffic against epoch length",
            x_label: "epoch length (ms)",
            y_label: "wire (MiB/s)",
            series: curves("", &|r| r.wire_bytes_per_s / (1 << 20) as f64),
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_quote_an_auto_policy_and_match_the_header() {
        let r = Row {
            label: "eauto-k2-lz4-tcp".into(),
            epoch: EpochPolicy::parse("auto").unwrap().to_string(),
            ..Default::default()
        };
        let line = r.csv();
        assert!(
            line.starts_with("eauto-k2-lz4-tcp,\"auto:target=20ms,min=1ms,"),
            "{line}"
        );
        // Outside the quotes, as many fields as the header names.
        let unquoted: String = line.split('"').step_by(2).collect();
        assert_eq!(
            unquoted.split(',').count(),
            CSV_HEADER.split(',').count(),
            "{line}"
        );
        assert_eq!(csv_field("25ms"), "25ms");
    }

    /// One stalled round does not decide a row's output latency: the
    /// median of the rounds' p99 does, with the worst one beside it.
    #[test]
    fn output_latency_is_the_median_round_with_the_worst_beside_it() {
        let round = |p99_ms: u64| Summary {
            output: Some(crate::stats::OutqReport {
                release_delay_steady_us: Pct {
                    p50: p99_ms * 500,
                    p99: p99_ms * 1000,
                    ..Pct::default()
                },
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = TuneConfig {
            epoch: EpochPolicy::parse("10ms").unwrap(),
            inflight: 2,
            compress: Compressor::Lz4,
            transport: TransportKind::Tcp,
        };
        let r = row(&c, &[round(12), round(5000), round(20)]);
        assert_eq!(r.output_latency_p99_us, 20_000);
        assert_eq!(r.output_latency_p50_us, 10_000);
        assert_eq!(r.output_latency_p99_worst_us, 5_000_000);
    }

    #[test]
    fn two_auto_variants_get_distinct_labels() {
        let c = |e: &str| TuneConfig {
            epoch: EpochPolicy::parse(e).unwrap(),
            inflight: 2,
            compress: Compressor::Lz4,
            transport: TransportKind::Tcp,
        };
        assert_eq!(c("auto").label(), "eauto-k2-lz4-tcp");
        assert_eq!(c("auto:min=10ms").label(), "eauto-t20-m10-x100-k2-lz4-tcp");
        assert_eq!(
            c("auto:min=1500us,overhead=0.02").label(),
            "eauto-t20-m1500us-x100-o20-k2-lz4-tcp"
        );
        assert_ne!(
            c("auto:delay=1ms").label(),
            c("auto:rate=50").label(),
            "delay and rate variants must not share files"
        );
    }
}
