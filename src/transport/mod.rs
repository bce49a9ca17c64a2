//! Transports: how records reach the backup and acknowledgements come back.
//!
//! Layers, each using only those listed before it (no module reaches back):
//!
//! - [`wire`]: header constants and the bounds-checked payload [`wire::Cursor`].
//! - [`slots`]: the slot/credit protocol (pure bookkeeping, no I/O).
//! - [`auth`]: the session's keys and the per-record tag (seal / open).
//! - [`record`]: framing, verifying and sending single records;
//!   [`recv_buf`]: the reader's buffers, which a consumer may keep.
//! - [`messages`]: the typed payloads of records.
//! - [`link`]: [`RecordSink`] (primary) and [`RecordSource`] (backup), the
//!   two halves every transport provides to the engine.
//! - [`seal`]: sealing what an end sends, over any sink or stream.
//! - [`ring`]: what the slot-ring transports share: the mirrored receive
//!   ring, the chunker that cuts a send into slot-sized pieces, the one
//!   generic ring reader, and the TCP return path that carries credits.
//! - [`tcp`], [`uring`], [`rdma`] (feature `rdma`): the transports.
//! - [`kind`]: [`TransportKind`], the name a session agrees on.
//! - [`handshake`]: the authenticated session opening; [`select`]: the
//!   transport agreement right after it, building the chosen halves.

pub mod auth;
pub mod handshake;
pub mod kind;
pub mod link;
pub mod messages;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod record;
pub mod recv_buf;
pub mod ring;
pub mod seal;
pub mod select;
pub mod slots;
pub mod tcp;
pub mod uring;
pub mod wire;

pub use kind::TransportKind;
pub use link::{Lent, RecordSink, RecordSource};
