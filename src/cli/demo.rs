//! `castor demo`: a failover on loopback with embedded defaults (no root):
//! a sim guest with a counter service, a client, SIGKILL of the primary,
//! the backup taking over with the counter continuing, and the timeline.
//! `--no-failover`: live replication on loopback and its report.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use castor::bench::loopback::{self, LoopbackOpts};
use castor::ops::demo::{self, FailoverOpts};
use castor::report;
use castor::units;

use super::engine_args::EngineArgs;
use super::ops::{self, MetricsArgs};
use super::parse::parse_spec;

#[derive(Args)]
pub struct DemoArgs {
    /// The sim domain (default: sim:mem=64MiB,workload=mixed,rate=50000
    /// for the failover, sim:mem=256MiB,workload=mixed,rate=100000 with
    /// --no-failover).
    #[arg(long)]
    domain: Option<String>,
    /// With --no-failover: how long to replicate.
    #[arg(long, default_value = "10s", value_parser = units::parse_duration)]
    duration: Duration,
    /// Only replicate on loopback and report; no failover.
    #[arg(long)]
    no_failover: bool,
    /// Replication before the demo kills the primary.
    #[arg(long, default_value = "8s", value_parser = units::parse_duration, conflicts_with = "no_failover")]
    before: Duration,
    /// How long the activated copy answers the client before the demo stops.
    #[arg(long, default_value = "4s", value_parser = units::parse_duration, conflicts_with = "no_failover")]
    after: Duration,
    #[command(flatten)]
    engine: EngineArgs,
    /// (The failover demo serves the backup's metrics here: it is the
    /// process that survives.)
    #[command(flatten)]
    metrics: MetricsArgs,
}

pub fn run(a: DemoArgs) -> Result<ExitCode, String> {
    let default = if a.no_failover {
        "sim:mem=256MiB,workload=mixed,rate=100000"
    } else {
        "sim:mem=64MiB,workload=mixed,rate=50000"
    };
    let spec = parse_spec(a.domain.as_deref().unwrap_or(default))?;
    if !a.no_failover {
        return failover(&a, &spec);
    }
    a.engine.transport.check_available()?;
    let _ops = ops::start(&a.metrics, castor::ops::telemetry::Role::Bench, "demo")?;
    let mut cfg = a.engine.config();
    cfg.duration = Some(a.duration);
    cfg.progress = true;
    cfg.keep_dirty_lists = 20;
    castor::engine::install_stop_handler();
    eprintln!(
        "castor demo: protecting {spec} for {} with epochs of {}; backup on loopback (Ctrl-C stops cleanly)",
        humantime::format_duration(a.duration),
        a.engine.epoch
    );
    let s = loopback::loopback(
        &spec,
        &cfg,
        &LoopbackOpts {
            state_dir: None,
            quiet_backup: false,
            transport: a.engine.transport,
            backup_silence: cfg.backup_silence,
            ip: loopback::LOOPBACK,
            protection: a.engine.protection(),
            decode_lanes: None,
        },
    )
    .map_err(|e| e.to_string())?;
    report::print_table(&s);
    Ok(if s.digest_match {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn failover(a: &DemoArgs, spec: &castor::domain::DomainSpec) -> Result<ExitCode, String> {
    let castor::domain::DomainSpec::Sim(_) = spec else {
        return Err(format!(
            "the failover demo runs a sim domain (its counter service is the client's peer); \
             {spec} is not one: use --no-failover, or tests/kvm_counter_failover.rs for kvm"
        ));
    };
    eprintln!(
        "castor demo: protecting {spec} with epochs of {}, a backup on loopback, and a client; \
         the primary is killed after {} (--no-failover: replication only)",
        a.engine.epoch,
        humantime::format_duration(a.before)
    );
    let o = FailoverOpts {
        domain: spec.to_string(),
        // The failover demo's processes run fixed epochs (auto: its first).
        epoch: a.engine.epoch.initial(),
        before: a.before,
        after: a.after,
        metrics: a.metrics.metrics.clone(),
        transport: a.engine.transport.name().into(),
    };
    let r = demo::run_failover(&o).map_err(|e| format!("demo: {e}"))?;
    Ok(if demo::print_report(&r) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
