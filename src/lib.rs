//! castor: Remus-style continuous replication of a running domain.
//!
//! Data flows one way: [`domain`] (where the guest lives) → [`engine`] (epoch
//! driver, copy/encode workers) → [`codec`] (page encoding) → [`transport`]
//! (framed, checksummed records) → backup → ack → [`outq`] (guest output
//! held until its checkpoint is acknowledged). See `../shared/DESIGN.md` and
//! `docs/wire-format.md`.

pub mod codec;
pub mod digest;
pub mod disk;
pub mod domain;
pub mod engine;
pub mod ha;
pub mod harness;
pub mod metrics;
pub mod outq;
pub mod stats;
pub mod transport;
pub mod transport_bench;
pub mod units;

/// Size of a guest page in bytes. Every domain castor drives uses 4 KiB pages.
pub const PAGE_SIZE: usize = 4096;
