//! `castor demo`: live replication on loopback with embedded defaults.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use castor::bench::loopback::{self, LoopbackOpts};
use castor::report;
use castor::units;

use super::engine_args::EngineArgs;
use super::parse::parse_spec;

#[derive(Args)]
pub struct DemoArgs {
    #[arg(long, default_value = "sim:mem=256MiB,workload=mixed,rate=100000")]
    domain: String,
    #[arg(long, default_value = "10s", value_parser = units::parse_duration)]
    duration: Duration,
    #[command(flatten)]
    engine: EngineArgs,
}

pub fn run(a: DemoArgs) -> Result<ExitCode, String> {
    let spec = parse_spec(&a.domain)?;
    a.engine.transport.check_available()?;
    let mut cfg = a.engine.config();
    cfg.duration = Some(a.duration);
    cfg.progress = true;
    cfg.keep_dirty_lists = 20;
    castor::engine::install_stop_handler();
    eprintln!(
        "castor demo: protecting {spec} for {} with {} ms epochs; backup on loopback (Ctrl-C stops cleanly)",
        humantime::format_duration(a.duration),
        a.engine.epoch.as_millis()
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
