//! The `/status` document (`castor status`): what an operator asks first —
//! which role, how far behind, what is held, who holds the arbiter, and
//! how the last failover went.

use serde::{Deserialize, Serialize};

use super::telemetry::{FailoverState, Role};

/// One step of a failover, timed from suspecting the primary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailoverStep {
    /// suspect, arbiter, fence, activating, running, first_output (the
    /// activated copy's first released output), refused.
    pub step: String,
    /// Milliseconds after the primary was suspected.
    pub at_ms: f64,
}

/// The JSON served at `/status`. Keys are stable (docs/operations.md).
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub role: Role,
    pub uptime_s: f64,
    pub domain: Option<String>,
    /// Epoch running (primary) or last committed (backup).
    pub epoch: u64,
    /// Highest checkpoint acknowledged in this protection session.
    pub acked_epoch: u64,
    /// Epochs run but not yet acknowledged: how far the backup trails.
    pub lag_epochs: u64,
    pub last_checkpoint_latency_ms: f64,
    pub checkpoints_in_flight: u64,
    pub output_held: u64,
    pub output_released: u64,
    pub output_dropped: u64,
    /// The backup (on a primary) or the primary (on a backup).
    pub peer: Option<String>,
    pub peer_connected: bool,
    pub arbiter: Option<String>,
    pub arbiter_token: u64,
    pub lease_left_s: Option<f64>,
    pub failover_state: FailoverState,
    pub last_failover: Vec<FailoverStep>,
    /// CLOCK_MONOTONIC (ns) when the primary was suspected: other
    /// processes on this host can time their own events against it.
    pub failover_started_mono_ns: Option<u64>,
}

/// A human summary of a `/status` document (`castor status` without `--json`).
pub fn describe(v: &serde_json::Value) -> String {
    let s = |k: &str| match &v[k] {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut out = format!(
        "role        {}\ndomain      {}\nepoch       {} (acknowledged {}, lag {} epochs, {} in flight, last latency {} ms)\n\
         output      {} held, {} released, {} dropped\npeer        {} ({})\narbiter     {} (token {}, lease left {} s)\n\
         failover    {}",
        s("role"),
        s("domain"),
        s("epoch"),
        s("acked_epoch"),
        s("lag_epochs"),
        s("checkpoints_in_flight"),
        s("last_checkpoint_latency_ms"),
        s("output_held"),
        s("output_released"),
        s("output_dropped"),
        s("peer"),
        if v["peer_connected"] == serde_json::Value::Bool(true) {
            "connected"
        } else {
            "not connected"
        },
        s("arbiter"),
        s("arbiter_token"),
        s("lease_left_s"),
        s("failover_state"),
    );
    if let Some(steps) = v["last_failover"].as_array().filter(|a| !a.is_empty()) {
        let line: Vec<String> = steps
            .iter()
            .map(|st| format!("{} +{} ms", st["step"].as_str().unwrap_or("?"), st["at_ms"]))
            .collect();
        out.push_str(&format!("\nlast failover {}", line.join(" → ")));
    }
    out
}
