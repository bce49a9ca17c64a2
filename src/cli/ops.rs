//! Flags and start-up shared by the long-running commands: `--metrics
//! ADDR` (Prometheus `/metrics` and JSON `/status`) and systemd's notify
//! protocol (READY, WATCHDOG, STOPPING).

use clap::Args;

use castor::ops::http::Server;
use castor::ops::sdnotify::{self, Watchdog};
use castor::ops::telemetry::{self, Role};

#[derive(Args, Clone, Debug)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics and a JSON status
    /// at http://ADDR/status (port 0 picks a free port; the address is
    /// printed as "metrics on http://ADDR/metrics").
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
}

/// What keeps the operational side alive for a command's run.
pub struct Ops {
    _server: Option<Server>,
    _watchdog: Option<Watchdog>,
}

impl Drop for Ops {
    fn drop(&mut self) {
        sdnotify::notify_or_log("STOPPING=1");
    }
}

/// Installs telemetry for `role` and serves it when `--metrics` was
/// given; starts the systemd watchdog when the unit asked for one.
pub fn start(m: &MetricsArgs, role: Role, who: &str) -> Result<Ops, String> {
    let server = match &m.metrics {
        Some(addr) => {
            let t = telemetry::install(role);
            let s = castor::ops::http::serve(addr, t).map_err(|e| e.to_string())?;
            eprintln!(
                "castor {who}: metrics on http://{}/metrics (status: /status)",
                s.local_addr()
            );
            Some(s)
        }
        None => None,
    };
    // The watchdog shows the process is scheduled and its threads run; a
    // wedged engine is caught by the peer's heartbeat timeout instead.
    let watchdog = Watchdog::start(|| true).map_err(|e| e.to_string())?;
    Ok(Ops {
        _server: server,
        _watchdog: watchdog,
    })
}

/// Tells systemd (Type=notify) that the service is ready.
pub fn ready(status: &str) {
    sdnotify::notify_or_log(&format!("READY=1\nSTATUS={status}"));
}
