//! `castor bench-transport`: the transports side by side on loopback (and
//! across a veth pair, with --veth).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use castor::transport::TransportKind;
use castor::units;

#[derive(Args)]
pub struct BenchTransportArgs {
    /// Length of each case.
    #[arg(long, default_value = "3s", value_parser = units::parse_duration)]
    duration: Duration,
    /// Rounds of every case (interleaved); the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Also measure iperf3 on loopback (needs iperf3).
    #[arg(long)]
    iperf: bool,
    /// Also run every case (and iperf3, with --iperf) across a veth pair
    /// between two network namespaces this run creates and deletes
    /// (needs root and iproute2).
    #[arg(long)]
    veth: bool,
    /// Run only these cases (comma-separated: tcp, uring, uring-zc,
    /// uring-copy); all by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Run only these payloads (comma-separated: raw, lz4); all by default.
    #[arg(long, value_delimiter = ',')]
    payloads: Vec<String>,
    /// Run only these protections (comma-separated: plain, mac, aes-gcm);
    /// all by default.
    #[arg(long, value_delimiter = ',')]
    sealings: Vec<String>,
    /// Instead of the transports, compare uring zero copy with copy by
    /// send size (4 KiB to 1 MiB, raw pages, loopback).
    #[arg(long)]
    zc_sizes: bool,
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(a: BenchTransportArgs) -> Result<ExitCode, String> {
    TransportKind::Uring.check_available()?;
    if a.zc_sizes {
        let r = castor::bench::transport::zc_sizes(a.duration, a.rounds)?;
        if let Some(p) = a.json {
            let j = serde_json::to_vec_pretty(&r).expect("report serialises");
            std::fs::write(&p, j).map_err(|e| format!("writing {}: {e}", p.display()))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let only = castor::bench::transport::Only {
        cases: a.only,
        payloads: a.payloads,
        sealings: a.sealings,
    };
    let r = castor::bench::transport::run(a.duration, a.rounds, a.iperf, a.veth, &only)?;
    if let Some(p) = a.json {
        let j = serde_json::to_vec_pretty(&r).expect("report serialises");
        std::fs::write(&p, j).map_err(|e| format!("writing {}: {e}", p.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
