//! The `rdma` transport (cargo feature `rdma`): rdma-sys verbs over a
//! reliable-connected QP set up with librdmacm, and the slot/credit
//! protocol of [`crate::transport::slots`].
//!
//! After the TCP handshake and the transport agreement the backup listens
//! on an rdma_cm id bound to the address the primary reached it at, maps its
//! receive ring ([`MirrorRing`](crate::transport::ring::MirrorRing)), registers it for REMOTE_WRITE and announces
//! `{slots, slot_size, addr, rkey, cm_port}` on the TCP connection. The
//! primary resolves address and route, connects, and writes each chunk with
//! RDMA WRITE WITH IMMEDIATE from its own registered staging memory; the
//! immediate is the chunk's [`ChunkTag`] (slot and length). The backup
//! consumes one posted RECV per chunk, judges the tag with [`RingState`](crate::transport::slots::RingState),
//! parses records in place from the ring, and returns credits by SEND (the
//! primary keeps RECVs posted for them). Acknowledgements and heartbeats
//! from the backup stay on the TCP connection.
//!
//! Every completion is checked: a status other than success, an opcode or
//! length that does not fit the protocol, or a cm event other than the one
//! expected fails with a typed [`RdmaError`]. Teardown disconnects, destroys
//! the QP, deregisters memory, destroys CQ, PD, ids and event channel, in
//! that order.
//!
//! These machines have no RDMA device: this module is built in CI and its
//! protocol logic is exercised through the `uring` transport.
//!
//! Files: `verbs.rs` (the verbs and rdma_cm objects, torn down in order),
//! `sink.rs` (the primary: connect, write chunks, take credits),
//! `source.rs` (the backup: listen, announce the ring, land chunks and send
//! credits under the shared [`crate::transport::ring::RingReader`]).

mod sink;
mod source;
mod verbs;

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use rdma_sys::*;

use crate::transport::record::RecordError;
use crate::transport::slots::{ChunkTag, SlotError};

pub use sink::{primary, RdmaSink};
pub use source::{backup, RdmaLink, RdmaSource};

const CM_TIMEOUT_MS: i32 = 2000;
/// Give up when no credit or completion arrives for this long.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
const WR_CREDIT_SEND: u64 = u64::MAX;

#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    #[error("no RDMA device found (ibv_get_device_list returned 0 devices); use --transport uring or tcp")]
    NoDevice,
    #[error("{call} failed: {source}")]
    Call {
        call: &'static str,
        source: io::Error,
    },
    #[error("rdma_cm: expected event {want}, got {got} (status {status})")]
    CmEvent {
        want: &'static str,
        got: String,
        status: i32,
    },
    #[error("address {0} is not on an RDMA device")]
    NotRdma(IpAddr),
    #[error("work completion {wr_id} failed: {status} (vendor error 0x{vendor:x})")]
    Completion {
        wr_id: u64,
        status: String,
        vendor: u32,
    },
    #[error("unexpected work completion: opcode {opcode}, {len} bytes")]
    UnexpectedCompletion { opcode: u32, len: u32 },
    #[error("RDMA write of chunk {tag:?} carried {got} bytes")]
    ChunkLength { tag: ChunkTag, got: u32 },
    #[error("no completion for {0:?}: peer stalled")]
    Stalled(Duration),
    #[error(transparent)]
    Slot(#[from] SlotError),
}

fn call_err(call: &'static str) -> RdmaError {
    RdmaError::Call {
        call,
        source: io::Error::last_os_error(),
    }
}

/// Fails with [`RdmaError::NoDevice`] unless an RDMA device is present.
pub fn probe() -> Result<(), RdmaError> {
    let mut n: i32 = 0;
    // SAFETY: ibv_get_device_list writes the count and returns a list we free.
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        return Err(RdmaError::NoDevice);
    }
    // SAFETY: list came from ibv_get_device_list.
    unsafe { ibv_free_device_list(list) };
    if n <= 0 {
        return Err(RdmaError::NoDevice);
    }
    Ok(())
}

fn to_record_err(e: RdmaError) -> RecordError {
    match e {
        RdmaError::Slot(s) => RecordError::Slot(s),
        e => RecordError::Io(io::Error::other(format!("rdma: {e}"))),
    }
}
