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
