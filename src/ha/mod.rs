//! High availability: deciding that the primary is gone ([`detector`],
//! with [`beacon`] as a second heartbeat path), deciding who may go live
//! ([`arbiter`]; an etcd lease is watched through [`lease`]), and fencing
//! the loser ([`fence`]).
//!
//! The order on the backup is fixed and is what guarantee 3 (one active
//! copy) rests on: suspect → win the arbiter (a fencing token) → run the
//! fence command → activate ([`failover`] strings these steps together).
//! A backup that cannot win the arbiter keeps its replica saved and does
//! not activate: some other copy holds the arbiter and may still be
//! releasing output. [`exit`] names the exit statuses these outcomes give.

pub mod arbiter;
pub mod beacon;
pub mod detector;
pub mod exit;
pub mod failover;
pub mod fence;
pub mod heir;
pub mod lease;

/// `castor::ha::etcd`, where the etcd arbiter always lived.
pub use arbiter::etcd;
