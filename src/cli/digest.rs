//! `castor digest`: the digest of a saved replica, or the expected digest
//! of a deterministic sim domain after N epochs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use castor::engine::replica;

use super::parse::parse_spec;

#[derive(Args)]
pub struct DigestArgs {
    #[arg(long, conflicts_with_all = ["domain", "at_epoch"])]
    replica: Option<PathBuf>,
    #[arg(long, requires = "at_epoch")]
    domain: Option<String>,
    #[arg(long, requires = "domain")]
    at_epoch: Option<u64>,
}

pub fn run(a: DigestArgs) -> Result<ExitCode, String> {
    match a {
        DigestArgs {
            replica: Some(dir), ..
        } => {
            let (meta, d) = replica::verify(&dir).map_err(|e| e.to_string())?;
            println!("{d} epoch {} {}", meta.epoch, meta.domain);
            Ok(ExitCode::SUCCESS)
        }
        DigestArgs {
            domain: Some(domain),
            at_epoch: Some(n),
            ..
        } => {
            let spec = parse_spec(&domain)?;
            let d = castor::digest::expected(&spec, n).map_err(|e| e.to_string())?;
            println!("{d} epoch {n} {spec}");
            Ok(ExitCode::SUCCESS)
        }
        _ => Err("digest needs --replica DIR, or --domain SPEC --at-epoch N".into()),
    }
}
