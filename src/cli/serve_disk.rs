//! `castor serve-disk`: serve images over NBD without replication (the
//! unprotected baseline of the disk benchmark, or a saved replica disk
//! served by hand) until SIGINT/SIGTERM.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;

use castor::disk::spec::{serve_disks, DiskArg};
use castor::disk::{Fence, ServerConfig};

#[derive(Args)]
pub struct ServeDiskArgs {
    /// NAME=PATH,nbd=ADDR as for `protect --disk`. Repeatable.
    #[arg(long = "disk", value_name = "NAME=PATH,nbd=ADDR", required = true)]
    disks: Vec<DiskArg>,
}

pub fn run(a: ServeDiskArgs) -> Result<ExitCode, String> {
    castor::engine::install_stop_handler();
    let servers = serve_disks(&a.disks, Arc::new(Fence::open()), ServerConfig::default())
        .map_err(|e| format!("serve-disk: {e}"))?
        .servers;
    for s in &servers {
        for e in s.exports() {
            eprintln!(
                "castor serve-disk: disk {} served at nbd://{}/{}",
                e.name,
                s.local_addr(),
                e.name
            );
        }
    }
    while !castor::engine::stop_requested() {
        std::thread::park_timeout(std::time::Duration::from_millis(100));
    }
    for s in servers {
        s.stop();
    }
    Ok(ExitCode::SUCCESS)
}
