//! `castor tune`: sweep epoch lengths (and in-flight limits, compressors,
//! transports) on loopback; CSV, JSON, interval logs and plots in a folder.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use castor::bench::tune::{self, TuneConfig, TuneOpts};
use castor::codec::Compressor;
use castor::engine::epoch_control::EpochPolicy;
use castor::transport::TransportKind;
use castor::units;

use super::engine_args::parse_epoch;
use super::parse::{parse_compressor, parse_spec};

#[derive(Args)]
pub struct TuneArgs {
    #[arg(
        long,
        default_value = "sim:mem=256MiB,workload=edits,rate=50000,out=10"
    )]
    domain: String,
    /// Epoch policies to compare, comma-separated: durations and/or `auto[:...]`
    /// (an `auto` with keys goes last or alone, its keys use `,` too:
    /// prefer --epochs 10ms,25ms --epochs auto:target=15ms).
    #[arg(long, num_args = 1, action = clap::ArgAction::Append, default_value = "5ms,10ms,25ms,50ms,100ms")]
    epochs: Vec<String>,
    /// Checkpoints in flight, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2",
          value_parser = clap::value_parser!(u64).range(1..=64))]
    inflight: Vec<u64>,
    /// Compressors, comma-separated (lz4, zstd, zstd:LEVEL, none).
    #[arg(long, value_delimiter = ',', default_value = "lz4", value_parser = parse_compressor)]
    compress: Vec<Compressor>,
    /// Transports, comma-separated (tcp, uring, rdma).
    #[arg(long, value_delimiter = ',', default_value = "tcp", value_enum)]
    transport: Vec<TransportKind>,
    /// Rounds: each runs every configuration once, in the same order.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Length of each run.
    #[arg(long, default_value = "5s", value_parser = units::parse_duration)]
    duration: Duration,
    /// Folder for tune.csv, tune.json, hlog/ and the PNG plots (created).
    #[arg(long)]
    out: PathBuf,
    /// Encode workers (default: one per core).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    workers: Option<u64>,
}

/// Splits one `--epochs` value into policies: `10ms,25ms,auto:target=15ms,min=5ms`
/// (everything from `auto` on is that auto policy's keys).
fn epoch_list(v: &str) -> Result<Vec<EpochPolicy>, String> {
    let (fixed, auto) = match v.find("auto") {
        Some(i) => (&v[..i], Some(&v[i..])),
        None => (v, None),
    };
    let mut out = Vec::new();
    for item in fixed.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        out.push(parse_epoch(item)?);
    }
    if let Some(a) = auto {
        out.push(parse_epoch(a.trim_end_matches(','))?);
    }
    Ok(out)
}

pub fn run(a: TuneArgs) -> Result<ExitCode, String> {
    let domain = parse_spec(&a.domain)?;
    for t in &a.transport {
        t.check_available()?;
    }
    let mut epochs = Vec::new();
    for v in &a.epochs {
        epochs.extend(epoch_list(v)?);
    }
    if epochs.is_empty() {
        return Err("--epochs: give at least one epoch length or auto".into());
    }
    let mut configs = Vec::new();
    for &epoch in &epochs {
        for &inflight in &a.inflight {
            for &compress in &a.compress {
                for &transport in &a.transport {
                    configs.push(TuneConfig {
                        epoch,
                        inflight: inflight as usize,
                        compress,
                        transport,
                    });
                }
            }
        }
    }
    let mut base = castor::engine::primary::PrimaryConfig::default();
    if let Some(w) = a.workers {
        base.workers = w as usize;
    }
    castor::engine::install_stop_handler();
    let (duration, note) = castor::bench::loopback::whole_cycles(&domain, a.duration);
    if let Some(note) = note {
        eprintln!("castor tune: {note}");
    }
    let opts = TuneOpts {
        domain,
        configs,
        rounds: a.rounds,
        duration,
        out: a.out.clone(),
        base,
        ip: super::bench::bench_ip(None)?,
    };
    let rows = tune::run(&opts).map_err(|e| e.to_string())?;
    println!(
        "{:<24} {:>8} {:>8} {:>10} {:>10} {:>12} {:>12} {:>10}",
        "configuration",
        "epoch ms",
        "epochs/s",
        "pause p99",
        "ckpt p99",
        "output p99",
        "wire MiB/s",
        "speed"
    );
    for r in &rows {
        println!(
            "{:<24} {:>8.1} {:>8.1} {:>8}µs {:>8}µs {:>10}µs {:>12.1} {:>10}",
            r.label,
            r.epoch_ms,
            r.epochs_per_s,
            r.pause_p99_us,
            r.checkpoint_latency_p99_us,
            r.output_latency_p99_us,
            r.wire_bytes_per_s / (1 << 20) as f64,
            r.guest_speed_ratio
                .map_or("-".into(), |s| format!("{s:.3}"))
        );
    }
    println!(
        "wrote {}/tune.csv, tune.json, hlog/, *.png",
        a.out.display()
    );
    Ok(if rows.iter().all(|r| r.digest_match) {
        ExitCode::SUCCESS
    } else {
        eprintln!("castor tune: a replica did not match its primary (see digest_match)");
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_lists_split_fixed_and_auto() {
        let v = epoch_list("10ms,25ms,auto:target=15ms,min=5ms").unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[1], EpochPolicy::Fixed(Duration::from_millis(25)));
        let EpochPolicy::Auto(p) = v[2] else {
            panic!("{v:?}")
        };
        assert_eq!(
            (p.target, p.min),
            (Duration::from_millis(15), Duration::from_millis(5))
        );
        assert!(epoch_list("10ms,x").unwrap_err().contains("\"x\""));
    }
}
