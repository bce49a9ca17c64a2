//! Disk replication: guest disk writes travel with the epoch they ran in
//! and reach the backup's image at that epoch's commit, with the memory.
//!
//! ```text
//! primary:  NBD client / kvm block ─► WriteLog: image (at once) + epoch log
//!                                        │ cut in the pause
//!                                        ▼
//!           epoch N's checkpoint: DiskWrites records (wire), counted in EpochEnd
//! backup:   Staging (memory, spill file) ─► at commit(N): seal the redo
//!           log, commit memory, apply, fdatasync if N carried a flush ─► ack(N)
//! ```
//!
//! - [`image`]: a raw image with checked positional I/O.
//! - [`log`]: the primary's per-epoch write log and its fencing gate.
//! - [`records`]: one epoch's writes, appended in wire order to the records that carry them.
//! - [`fence`]: the gate itself (revocation, arbiter lease).
//! - [`wire`]: the `DiskWrites` payload, bounds-checked.
//! - [`frame`]: a checkpoint's `DiskWrites` records as pieces for a vectored send.
//! - [`stage`]: the backup's staging and commit.
//! - [`redo`]: the backup's redo log (an epoch's apply is all or nothing).
//! - [`fault`]: FOR TESTS ONLY, a device fault injected into the apply.
//! - [`nbd`]: the NBD server that exposes a [`log::WriteLog`] to any client.
//! - [`pool`]: recycled buffers that large writes travel in (no copy into the log).
//! - [`session`]: a session's disk set on each side, the `Disks` announcement.
//! - [`spec`]: `--disk NAME=PATH,nbd=ADDR` and serving such disks.
//! - [`activate`]: the replica's disks when the backup activates.
//! - [`addr`]: `HOST:PORT` / `unix:PATH`.
//!
//! After failover the backup's disk is the disk after exactly a prefix of
//! the guest's writes, in order: the writes of every committed epoch and
//! none of a later one. See `docs/disk.md`.

pub mod activate;
pub mod addr;
pub mod fault;
pub mod fence;
pub mod frame;
pub mod image;
pub mod log;
pub mod nbd;
pub mod pool;
pub mod records;
pub mod redo;
pub mod session;
pub mod spec;
pub mod stage;
pub mod wire;

pub use addr::NbdAddr;
pub use fence::Fence;
pub use image::DiskImage;
pub use log::{EpochOps, LogConfig, WriteLog};
pub use nbd::{Export, NbdServer, ServerConfig};
pub use stage::Staging;
