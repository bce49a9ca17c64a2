//! `castor status`: what a running castor says about itself, read from the
//! `/status` of its `--metrics` address.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use castor::units;

#[derive(Args)]
pub struct StatusArgs {
    /// The --metrics address of the castor process to ask.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
    metrics: String,
    /// Print the JSON document as served.
    #[arg(long)]
    json: bool,
    /// Give up after this long (connect, send, read: each).
    #[arg(long, default_value = "2s", value_parser = units::parse_duration)]
    timeout: Duration,
}

pub fn run(a: StatusArgs) -> Result<ExitCode, String> {
    let body = castor::ops::http::get(&a.metrics, "/status", a.timeout).map_err(|e| {
        format!(
            "castor status: {e} (is a castor running with --metrics {}?)",
            a.metrics
        )
    })?;
    if a.json {
        print!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| {
        format!(
            "castor status: {} answered with something that is not JSON: {e}",
            a.metrics
        )
    })?;
    println!("{}", castor::ops::status::describe(&v));
    Ok(ExitCode::SUCCESS)
}
