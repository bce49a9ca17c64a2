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
//! Waiting: a waiter polls its CQ, spins a little on an empty one, then
//! arms the CQ's completion channel and sleeps in poll(2) (in slices, so
//! deadlines and the control connection are checked): an idle connection
//! costs no CPU. Every rdma_cm event has a deadline ([`CM_EVENT_TIMEOUT`]).
//!
//! RECVs: the backup keeps `recvs_for(slots)` (2 × slots) RECVs posted
//! and reposts each as it takes its completion, before the chunk is
//! parsed. Credits bound bytes, and chunks too: each credit also returns
//! the chunks taken since the last one (sent as soon as a quarter of the
//! RECVs' worth were taken, without waiting for a slot to fill), and the
//! primary never has more chunks outstanding than RECVs posted
//! ([`ChunkBudget`](crate::transport::slots::ChunkBudget)). So no chunk
//! meets an RNR NAK; the QP's RNR retry is bounded (3), and one means a
//! peer that broke the protocol.
//!
//! What the peer can write: the ring is registered REMOTE_WRITE as a
//! whole, on a PD that holds only this connection's QP, so only the
//! connected, PSK-authenticated primary can write into it. A faulty primary
//! could overwrite bytes the backup has landed but not yet parsed, or is
//! parsing; that gives it no power it lacks anyway (it holds the key and
//! can MAC any record it likes), and it cannot reach a committed replica:
//! records are verified and decoded out of the ring into the receiver's
//! staging at receipt, and the replica is written only from staging at an
//! epoch's end. Every chunk's immediate is checked against the credited
//! window ([`RingState`](crate::transport::slots::RingState)), so a chunk
//! outside it ends the session.
//!
//! Tested for real in the emulated lab (tests/lab_rdma.rs: Soft-RoCE in
//! QEMU, docs/lab.md); the ring and credit logic is also exercised through
//! the `uring` transport on any host.
//!
//! Files: `verbs.rs` (the verbs and rdma_cm objects, torn down in order),
//! `sink.rs` (the primary: connect, write chunks, take credits),
//! `source.rs` (the backup: listen, announce the ring, land chunks and send
//! credits under the shared [`crate::transport::ring::RingReader`]).

mod sink;
mod source;
#[cfg(test)]
mod tests;
mod verbs;

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use rdma_sys::*;

use crate::transport::record::RecordError;
use crate::transport::slots::{ChunkTag, SlotError};

pub use sink::{primary, RdmaSink};
pub use source::{backup, RdmaLink, RdmaSource};

/// rdma_resolve_addr / rdma_resolve_route give up after this long.
const CM_TIMEOUT_MS: i32 = 2000;
/// Longest wait for any rdma_cm event (a backup waiting for the primary's
/// CONNECT_REQUEST, a primary waiting for ESTABLISHED): generous for
/// emulated hosts, where connecting takes far longer than on hardware.
const CM_EVENT_TIMEOUT: Duration = Duration::from_secs(20);
/// Sleep slice of an idle waiter between its checks (stall deadline, the
/// control connection).
const IDLE_SLICE: Duration = Duration::from_millis(10);
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
    #[error("rdma_cm: no {want} event within {after:?}")]
    CmTimeout { want: &'static str, after: Duration },
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
