//! `castor bench`: backup and primary on loopback; measure, report, and
//! check replica == primary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use castor::bench::loopback::{self, LoopbackOpts};
use castor::report;
use castor::units;

use super::engine_args::EngineArgs;
use super::parse::parse_spec;

#[derive(Args)]
pub struct BenchArgs {
    #[arg(long, default_value = "sim:mem=1GiB,workload=edits,rate=200000")]
    domain: String,
    #[arg(long, default_value = "10s", value_parser = units::parse_duration)]
    duration: Duration,
    #[arg(long)]
    json: Option<PathBuf>,
    /// Include every epoch's record in the JSON report.
    #[arg(long)]
    per_epoch: bool,
    /// Print a progress line every second.
    #[arg(long)]
    progress: bool,
    #[command(flatten)]
    engine: EngineArgs,
}

pub fn run(a: BenchArgs) -> Result<ExitCode, String> {
    let spec = parse_spec(&a.domain)?;
    a.engine.transport.check_available()?;
    let mut cfg = a.engine.config();
    cfg.duration = Some(a.duration);
    cfg.progress = a.progress;
    cfg.keep_records = a.per_epoch;
    cfg.keep_dirty_lists = 20;
    castor::engine::install_stop_handler();
    let s = loopback::loopback(
        &spec,
        &cfg,
        &LoopbackOpts {
            state_dir: None,
            quiet_backup: true,
            transport: a.engine.transport,
        },
    )
    .map_err(|e| e.to_string())?;
    report::print_table(&s);
    if let Some(p) = a.json {
        report::write_json(&p, &s).map_err(|e| e.to_string())?;
    }
    Ok(if s.digest_match {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
