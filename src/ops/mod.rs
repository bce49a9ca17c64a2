//! Operating castor: what the people running an HA cluster need around the
//! engine.
//!
//! - [`telemetry`]: the process's live figures (Prometheus metrics made
//!   with `prometheus-client`, and the `/status` document), fed by the
//!   engine, the output queue and the failover path.
//! - [`http`]: a small HTTP server thread answering `GET /metrics` and
//!   `GET /status` on `--metrics ADDR` (std::net, read and write deadlines,
//!   no async runtime).
//! - [`sdnotify`]: systemd's notify protocol (`READY=1`, `WATCHDOG=1`,
//!   `STOPPING=1`) over `$NOTIFY_SOCKET`.
//! - [`config`]: `--config FILE` (TOML) turned into command-line flags, the
//!   flags given on the command line overriding it.
//!
//! Telemetry is per process, like its stderr: it is installed once
//! ([`telemetry::install`]) by a command given `--metrics`, and every
//! producer reports through [`telemetry::get`], a no-op when nothing was
//! installed. Producers only touch atomics (counters, gauges, histogram
//! buckets), never a lock on the hot path, except the rare status strings
//! (peer, arbiter, failover timeline).

pub mod config;
pub mod demo;
pub mod http;
pub mod sdnotify;
pub mod status;
pub mod telemetry;
