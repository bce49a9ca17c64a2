//! castor: Remus-style continuous replication of a running domain.
//!
//! Data flows one way: [`domain`] (where the guest lives) → [`engine`] (epoch
//! driver, copy/encode workers) → [`codec`] (page encoding) → [`transport`]
//! (framed, checksummed records) → backup → ack → [`outq`] (guest output
//! held until its checkpoint is acknowledged). See `../shared/DESIGN.md` and
//! `docs/wire-format.md`.
//!
//! Around that flow: [`ha`] (failure detection, the arbiter, fencing, the
//! backup's failover), [`metrics`] and [`stats`] (measurements and the
//! value types they share), [`report`] (the run's table and JSON),
//! [`bench`] (the loopback and transport benchmarks), [`digest`] (what
//! "replica equals primary" means). The `castor` binary's commands are in
//! `src/cli/`, one file each; `src/main.rs` only parses and dispatches.

pub mod bench;
pub mod codec;
pub mod digest;
pub mod disk;
pub mod domain;
pub mod engine;
pub mod fuzzing;
pub mod ha;
pub mod metrics;
pub mod ops;
pub mod outq;
pub mod report;
pub mod stats;
pub mod transport;
pub mod units;

/// Size of a guest page in bytes. Every domain castor drives uses 4 KiB pages.
pub const PAGE_SIZE: usize = 4096;
