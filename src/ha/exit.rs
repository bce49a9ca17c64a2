//! Exit statuses of `castor protect` and `castor backup` (documented in
//! their `--help`), named once for the commands and the failover sequence.

/// `backup`: the stream broke or the primary went silent; `protect
/// --stop-on-backup-loss`: the backup was lost.
pub const STREAM_LOST: u8 = 2;
/// The arbiter is held by another live copy (the backup did not activate;
/// the primary did not start).
pub const ARBITER_HELD: u8 = 3;
/// The fence command failed; the backup did not activate.
pub const FENCE_FAILED: u8 = 4;
/// The arbiter's lease lapsed; this copy paused its guest and dropped its
/// held output (another copy may be live now).
pub const SELF_FENCED: u8 = 5;
/// The backup won the arbiter, but the arbiter's heir record says its
/// replica is stale (the primary ran on unprotected after losing it, or a
/// later backup replaced it): it did not activate.
pub const REPLICA_STALE: u8 = 6;
