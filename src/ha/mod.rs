//! High availability: deciding that the primary is gone ([`detector`]),
//! deciding who may go live ([`arbiter`]), and fencing the loser
//! ([`fence`]).
//!
//! The order on the backup is fixed and is what guarantee 3 (one active
//! copy) rests on: suspect → win the arbiter (a fencing token) → run the
//! fence command → activate. A backup that cannot win the arbiter keeps its
//! replica saved and does not activate: some other copy holds the arbiter
//! and may still be releasing output.

pub mod arbiter;
pub mod beacon;
pub mod detector;
pub mod etcd;
pub mod exit;
pub mod failover;
pub mod fence;
pub mod lease;
