//! What the slot-ring transports (uring, rdma) share, apart from the pure
//! protocol bookkeeping of [`crate::transport::slots`]:
//!
//! - [`mirror`]: the receive ring, mapped twice so records are one slice;
//! - [`chunker`]: the read position that cuts a send into chunks;
//! - [`reader`]: the one record reader over a ring, generic over how bytes
//!   arrive and credits go back ([`RingLink`]);
//! - [`return_path`]: the primary's TCP return path, which passes acks and
//!   heartbeats on and refuses credits (none travel on it).

pub mod chunker;
pub mod mirror;
pub mod reader;
pub mod return_path;

pub use chunker::Chunker;
pub use mirror::{MirrorError, MirrorRing};
pub use reader::{RingLink, RingReader};
pub use return_path::{CreditFilter, ReturnPath};
