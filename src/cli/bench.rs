//! `castor bench`: backup and primary on this host (loopback, or the
//! address `--addr` names); measure, report, and check replica == primary.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use castor::bench::hlog;
use castor::bench::loopback::{self, LoopbackOpts};
use castor::report;
use castor::units;

use super::engine_args::EngineArgs;
use super::ops::{self, MetricsArgs};
use super::parse::parse_spec;

#[derive(Args)]
pub struct BenchArgs {
    /// The guest, one of:
    ///   sim:mem=SIZE[,workload=edits|uniform|hotcold|sequential|zero|incompressible|mixed,rate=N,...]
    ///       castor's own simulated guest (any machine)
    ///   kvm:guest=memtouch,mem=SIZE[,regions=N,touch=N,pattern=...,seed=N]
    ///       a guest castor runs itself under /dev/kvm
    ///   xen:name=NAME|domid=N[,suspend=auto|evtchn|shutdown|xenstore|pause,suspend_timeout=10s,config=PATH,scanners=2]
    ///       a running Xen guest, from dom0 (needs a castor built with --features xen; docs/xen.md)
    #[arg(
        long,
        default_value = "sim:mem=1GiB,workload=edits,rate=200000",
        verbatim_doc_comment
    )]
    domain: String,
    #[arg(long, default_value = "10s", value_parser = units::parse_duration)]
    duration: Duration,
    #[arg(long)]
    json: Option<PathBuf>,
    /// Include every epoch's record in the JSON report.
    #[arg(long)]
    per_epoch: bool,
    /// Write pause and checkpoint latency as an HdrHistogram interval log
    /// (`.hlog`, one interval per second) to FILE.
    #[arg(long)]
    hlog: Option<PathBuf>,
    /// Print a progress line every second.
    #[arg(long)]
    progress: bool,
    /// Local address the backup listens on and the primary dials (default:
    /// $CASTOR_BENCH_ADDR, else 127.0.0.1). `--transport rdma` needs an
    /// address on an RDMA device; the lab sets CASTOR_BENCH_ADDR to one.
    #[arg(long)]
    addr: Option<IpAddr>,
    /// The backup's decode threads (`castor backup --decode-lanes`).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    decode_lanes: Option<u16>,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
}

/// `--addr`, else $CASTOR_BENCH_ADDR, else loopback.
pub fn bench_ip(flag: Option<IpAddr>) -> Result<IpAddr, String> {
    if let Some(ip) = flag {
        return Ok(ip);
    }
    match std::env::var("CASTOR_BENCH_ADDR") {
        Ok(v) => v.trim().parse().map_err(|e| {
            format!("CASTOR_BENCH_ADDR={v:?} is not an IP address ({e}); e.g. 10.9.0.1")
        }),
        Err(_) => Ok(loopback::LOOPBACK),
    }
}

pub fn run(a: BenchArgs) -> Result<ExitCode, String> {
    let spec = parse_spec(&a.domain)?;
    let ip = bench_ip(a.addr)?;
    a.engine.transport.check_available()?;
    let _ops = ops::start(&a.metrics, castor::ops::telemetry::Role::Bench, "bench")?;
    castor::ops::telemetry::with(|t| t.set_domain(&spec.to_string()));
    let mut cfg = a.engine.config();
    let (duration, note) = loopback::whole_cycles(&spec, a.duration);
    if let Some(note) = note {
        eprintln!("castor bench: {note}");
    }
    cfg.duration = Some(duration);
    cfg.progress = a.progress;
    cfg.keep_records = a.per_epoch || a.hlog.is_some();
    cfg.keep_dirty_lists = 20;
    castor::engine::install_stop_handler();
    let s = loopback::loopback(
        &spec,
        &cfg,
        &LoopbackOpts {
            state_dir: None,
            quiet_backup: true,
            transport: a.engine.transport,
            backup_silence: cfg.backup_silence,
            ip,
            protection: a.engine.protection(),
            decode_lanes: a.decode_lanes,
        },
    )
    .map_err(|e| e.to_string())?;
    report::print_table(&s);
    let mut s = s;
    if let Some(p) = &a.hlog {
        let base = s.per_epoch.first().map_or(0, |r| r.closed_at_ns);
        hlog::write(
            p,
            &s.per_epoch,
            base,
            &format!("castor bench on {}", s.domain),
        )
        .map_err(|e| e.to_string())?;
        if !a.per_epoch {
            s.per_epoch.clear();
        }
    }
    if let Some(p) = a.json {
        report::write_json(&p, &s).map_err(|e| e.to_string())?;
    }
    Ok(if s.digest_match {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
