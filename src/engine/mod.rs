//! The replication engine: the primary's epoch pipeline and the backup's
//! receiver.
//!
//! Primary threads, each owning its data: `castor-epoch` (timer, pause,
//! harvest, copy to staging, state save, resume), `castor-copy-N` (pinned;
//! scan their stripe of the dirty log and copy dirty pages during the
//! pause), `castor-enc-N` (encode one shard of the page range against the
//! shadow copy after resume), `castor-tx` (owns the
//! connection's sending half), `castor-ack` (owns the receiving half and the
//! in-flight table). Backup: one receiver that checks each record and stages
//! each epoch, `castor-dec-N` lanes decoding its pages by stripe
//! (`decode.rs`), the epoch applied whole at its end record; plus a
//! heartbeat thread.

pub mod accept;
pub mod activate;
pub mod backup;
pub mod codec_choice;
pub mod copy;
pub mod decode;
pub mod dial;
pub mod epoch_control;
pub mod live;
pub mod primary;
pub mod protect;
pub mod receiver;
pub mod replica;
pub(crate) mod shadow;
mod signals;
pub mod throttle;

#[cfg(test)]
mod outq_tests;

pub use signals::{install_stop_handler, stop_requested};
