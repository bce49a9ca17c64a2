//! The `rdma` transport (cargo feature `rdma`): rdma-sys verbs over a
//! reliable-connected QP set up with librdmacm, and the slot/credit
//! protocol of [`crate::transport::slots`].
//!
//! After the TCP handshake and the transport agreement the backup listens
//! on an rdma_cm id bound to the address the primary reached it at, maps its
//! receive ring ([`MirrorRing`]), registers it for REMOTE_WRITE and announces
//! `{slots, slot_size, addr, rkey, cm_port}` on the TCP connection. The
//! primary resolves address and route, connects, and writes each chunk with
//! RDMA WRITE WITH IMMEDIATE from its own registered staging memory; the
//! immediate is the chunk's [`ChunkTag`] (slot and length). The backup
//! consumes one posted RECV per chunk, judges the tag with [`RingState`],
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

use std::ffi::CStr;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdma_sys::*;

use crate::transport::record::{verify, Record, RecordError, RecordReader, HEADER_LEN};
use crate::transport::select::{ReturnPath, SetupError};
use crate::transport::slots::{Announce, ChunkTag, Credit, CreditWindow, RingState, SlotError};
use crate::transport::uring::{ready_record, CreditFilter, MirrorRing};
use crate::transport::{RecordSink, RecordSource};

/// Staging buffers of the primary (each one slot).
const STAGE_BUFS: usize = 16;
/// Credit messages the primary keeps RECVs posted for.
const CREDIT_RECVS: usize = 64;
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

fn sockaddr_of(a: SocketAddr) -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match a {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
        }
        SocketAddr::V6(v6) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            sin6.sin6_scope_id = v6.scope_id();
        }
    }
    ss
}

fn event_name(t: u32) -> String {
    // SAFETY: rdma_event_str returns a static string for any value.
    unsafe { CStr::from_ptr(rdma_event_str(t)) }
        .to_string_lossy()
        .into_owned()
}

/// Waits for the next cm event on `ch`, which must be `want`; returns the
/// event's id.
fn expect_event(
    ch: *mut rdma_event_channel,
    want: rdma_cm_event_type::Type,
    name: &'static str,
) -> Result<*mut rdma_cm_id, RdmaError> {
    let mut ev: *mut rdma_cm_event = std::ptr::null_mut();
    // SAFETY: ch is a live channel; ev receives an event we ack below.
    if unsafe { rdma_get_cm_event(ch, &mut ev) } != 0 {
        return Err(call_err("rdma_get_cm_event"));
    }
    // SAFETY: ev is valid until acked.
    let (t, status, id) = unsafe { ((*ev).event, (*ev).status, (*ev).id) };
    // SAFETY: acking the event we got.
    unsafe { rdma_ack_cm_event(ev) };
    if t != want || status != 0 {
        return Err(RdmaError::CmEvent {
            want: name,
            got: event_name(t),
            status,
        });
    }
    Ok(id)
}

/// A registered memory region, deregistered on drop.
struct Mr(*mut ibv_mr);

impl Mr {
    fn new(
        pd: *mut ibv_pd,
        ptr: *mut u8,
        len: usize,
        access: ibv_access_flags,
    ) -> Result<Mr, RdmaError> {
        // SAFETY: ptr..ptr+len is memory owned by the caller that outlives the Mr.
        let mr = unsafe { ibv_reg_mr(pd, ptr.cast(), len, access.0 as i32) };
        if mr.is_null() {
            return Err(call_err("ibv_reg_mr"));
        }
        Ok(Mr(mr))
    }
    fn lkey(&self) -> u32 {
        // SAFETY: live MR.
        unsafe { (*self.0).lkey }
    }
    fn rkey(&self) -> u32 {
        // SAFETY: live MR.
        unsafe { (*self.0).rkey }
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered by Mr::new, deregistered once.
        unsafe { ibv_dereg_mr(self.0) };
    }
}

/// The verbs objects of one connection, torn down in order on drop.
/// Invariant: the QP (if any) lives on `id` and uses `pd` and `cq`.
struct Conn {
    ch: *mut rdma_event_channel,
    listen: *mut rdma_cm_id,
    id: *mut rdma_cm_id,
    pd: *mut ibv_pd,
    cq: *mut ibv_cq,
    qp: bool,
    connected: bool,
    /// Regions registered on `pd`: dropped (deregistered) before the PD.
    mrs: Vec<Mr>,
}

// SAFETY: verbs objects may be used from any thread; one owner at a time.
unsafe impl Send for Conn {}

impl Conn {
    fn new() -> Result<Conn, RdmaError> {
        // SAFETY: no preconditions.
        let ch = unsafe { rdma_create_event_channel() };
        if ch.is_null() {
            return Err(call_err("rdma_create_event_channel"));
        }
        Ok(Conn {
            ch,
            listen: std::ptr::null_mut(),
            id: std::ptr::null_mut(),
            pd: std::ptr::null_mut(),
            cq: std::ptr::null_mut(),
            qp: false,
            connected: false,
            mrs: Vec::new(),
        })
    }

    fn create_id(&self) -> Result<*mut rdma_cm_id, RdmaError> {
        let mut id = std::ptr::null_mut();
        // SAFETY: live channel; id receives a new cm id we destroy on drop.
        if unsafe {
            rdma_create_id(
                self.ch,
                &mut id,
                std::ptr::null_mut(),
                rdma_port_space::RDMA_PS_TCP,
            )
        } != 0
        {
            return Err(call_err("rdma_create_id"));
        }
        Ok(id)
    }

    /// PD, CQ and an RC QP on `self.id`'s device.
    fn make_qp(&mut self, send_wr: u32, recv_wr: u32) -> Result<(), RdmaError> {
        // SAFETY: id is a cm id bound to a device (verbs set by resolve/connect request).
        let verbs = unsafe { (*self.id).verbs };
        if self.pd.is_null() {
            // SAFETY: verbs is a live device context.
            self.pd = unsafe { ibv_alloc_pd(verbs) };
            if self.pd.is_null() {
                return Err(call_err("ibv_alloc_pd"));
            }
        }
        // SAFETY: as above.
        self.cq = unsafe {
            ibv_create_cq(
                verbs,
                (send_wr + recv_wr) as i32,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        if self.cq.is_null() {
            return Err(call_err("ibv_create_cq"));
        }
        // SAFETY: plain data; the fields that matter are set below.
        let mut attr: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        attr.send_cq = self.cq;
        attr.recv_cq = self.cq;
        attr.qp_type = ibv_qp_type::IBV_QPT_RC;
        attr.cap = ibv_qp_cap {
            max_send_wr: send_wr,
            max_recv_wr: recv_wr,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: Credit::LEN as u32,
        };
        // SAFETY: id, pd and cq are live and on the same device.
        if unsafe { rdma_create_qp(self.id, self.pd, &mut attr) } != 0 {
            return Err(call_err("rdma_create_qp"));
        }
        self.qp = true;
        Ok(())
    }

    fn qp(&self) -> *mut ibv_qp {
        // SAFETY: make_qp succeeded (callers run after it).
        unsafe { (*self.id).qp }
    }

    fn conn_param() -> rdma_conn_param {
        // SAFETY: plain data.
        let mut p: rdma_conn_param = unsafe { std::mem::zeroed() };
        p.initiator_depth = 1;
        p.responder_resources = 1;
        p.retry_count = 7;
        p.rnr_retry_count = 7;
        p
    }

    /// Posts one RECV for `len` bytes at `addr` (len 0: no scatter entry,
    /// for WRITE WITH IMMEDIATE).
    fn post_recv(&self, wr_id: u64, addr: u64, len: u32, lkey: u32) -> Result<(), RdmaError> {
        let mut sge = ibv_sge {
            addr,
            length: len,
            lkey,
        };
        let mut wr = ibv_recv_wr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: i32::from(len > 0),
        };
        let mut bad = std::ptr::null_mut();
        // SAFETY: live QP; wr and sge live across the call (the HCA copies them).
        let r = unsafe { ibv_post_recv(self.qp(), &mut wr, &mut bad) };
        if r != 0 {
            return Err(RdmaError::Call {
                call: "ibv_post_recv",
                source: io::Error::from_raw_os_error(r),
            });
        }
        Ok(())
    }

    /// Polls up to `out.len()` completions; fails on any error status.
    fn poll(&self, out: &mut [ibv_wc]) -> Result<usize, RdmaError> {
        // SAFETY: live CQ; out has room for out.len() entries.
        let n = unsafe { ibv_poll_cq(self.cq, out.len() as i32, out.as_mut_ptr()) };
        if n < 0 {
            return Err(RdmaError::Call {
                call: "ibv_poll_cq",
                source: io::Error::from_raw_os_error(-n),
            });
        }
        for wc in &out[..n as usize] {
            if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
                // SAFETY: ibv_wc_status_str returns a static string.
                let s = unsafe { CStr::from_ptr(ibv_wc_status_str(wc.status)) };
                return Err(RdmaError::Completion {
                    wr_id: wc.wr_id,
                    status: s.to_string_lossy().into_owned(),
                    vendor: wc.vendor_err,
                });
            }
        }
        Ok(n as usize)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: each object was created by this Conn and is destroyed once,
        // dependents first: QP before MRs, CQ and PD; ids before the channel.
        unsafe {
            if self.connected {
                rdma_disconnect(self.id);
            }
            if self.qp {
                rdma_destroy_qp(self.id);
            }
            self.mrs.clear();
            if !self.cq.is_null() {
                ibv_destroy_cq(self.cq);
            }
            if !self.pd.is_null() {
                ibv_dealloc_pd(self.pd);
            }
            if !self.id.is_null() {
                rdma_destroy_id(self.id);
            }
            if !self.listen.is_null() {
                rdma_destroy_id(self.listen);
            }
            rdma_destroy_event_channel(self.ch);
        }
    }
}

fn empty_wc() -> ibv_wc {
    // SAFETY: plain data.
    unsafe { std::mem::zeroed() }
}

/// Page-aligned memory for staging and credit buffers.
struct Buf(Vec<u8>);

impl Buf {
    fn ptr(&mut self) -> *mut u8 {
        self.0.as_mut_ptr()
    }
}

/// Primary side after the agreement: connects and returns the sink and the
/// (TCP) return path.
pub fn primary(
    reader: RecordReader<TcpStream>,
    writer: TcpStream,
    ann: &Announce,
) -> Result<(Box<dyn RecordSink>, ReturnPath), RdmaError> {
    probe()?;
    let peer = writer.peer_addr().map_err(|source| RdmaError::Call {
        call: "getpeername",
        source,
    })?;
    let mut c = Conn::new()?;
    c.id = c.create_id()?;
    let mut dst = sockaddr_of(SocketAddr::new(peer.ip(), ann.cm_port));
    // SAFETY: live id; dst is a valid sockaddr for the call.
    if unsafe {
        rdma_resolve_addr(
            c.id,
            std::ptr::null_mut(),
            (&mut dst as *mut libc::sockaddr_storage).cast(),
            CM_TIMEOUT_MS,
        )
    } != 0
    {
        return Err(call_err("rdma_resolve_addr"));
    }
    expect_event(
        c.ch,
        rdma_cm_event_type::RDMA_CM_EVENT_ADDR_RESOLVED,
        "ADDR_RESOLVED",
    )?;
    // SAFETY: live id with a resolved address.
    if unsafe { rdma_resolve_route(c.id, CM_TIMEOUT_MS) } != 0 {
        return Err(call_err("rdma_resolve_route"));
    }
    expect_event(
        c.ch,
        rdma_cm_event_type::RDMA_CM_EVENT_ROUTE_RESOLVED,
        "ROUTE_RESOLVED",
    )?;
    c.make_qp(STAGE_BUFS as u32 + 4, CREDIT_RECVS as u32)?;
    let slot = ann.slot_size as usize;
    let mut stage = Buf(vec![0u8; slot * STAGE_BUFS]);
    let mut credit_bufs = Buf(vec![0u8; Credit::LEN * CREDIT_RECVS]);
    let stage_mr = Mr::new(
        c.pd,
        stage.ptr(),
        stage.0.len(),
        ibv_access_flags::IBV_ACCESS_LOCAL_WRITE,
    )?;
    let credit_mr = Mr::new(
        c.pd,
        credit_bufs.ptr(),
        credit_bufs.0.len(),
        ibv_access_flags::IBV_ACCESS_LOCAL_WRITE,
    )?;
    for i in 0..CREDIT_RECVS {
        let addr = credit_bufs.ptr() as u64 + (i * Credit::LEN) as u64;
        c.post_recv(i as u64, addr, Credit::LEN as u32, credit_mr.lkey())?;
    }
    let (stage_lkey, credit_lkey) = (stage_mr.lkey(), credit_mr.lkey());
    c.mrs.push(stage_mr);
    c.mrs.push(credit_mr);
    let mut p = Conn::conn_param();
    // SAFETY: live id with a QP; p lives across the call.
    if unsafe { rdma_connect(c.id, &mut p) } != 0 {
        return Err(call_err("rdma_connect"));
    }
    expect_event(
        c.ch,
        rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED,
        "ESTABLISHED",
    )?;
    c.connected = true;
    let sink = RdmaSink {
        window: CreditWindow::new(ann),
        remote: ann.addr,
        rkey: ann.rkey,
        stage,
        stage_lkey,
        credit_bufs,
        credit_lkey,
        busy: vec![false; STAGE_BUFS],
        slot,
        failed: None,
        conn: c,
    };
    let back: Box<dyn Read + Send> = Box::new(CreditFilter::passthrough(reader));
    Ok((Box::new(sink), RecordReader::new(back)))
}

/// The primary's sending half over RDMA.
pub struct RdmaSink {
    /// Dropped first (after Drop drained the writes): QP and MRs go before
    /// the buffers they name.
    conn: Conn,
    window: CreditWindow,
    remote: u64,
    rkey: u32,
    stage: Buf,
    stage_lkey: u32,
    credit_bufs: Buf,
    credit_lkey: u32,
    /// Staging buffer i is the source of a posted, not yet completed write.
    busy: Vec<bool>,
    slot: usize,
    failed: Option<String>,
}

impl RdmaSink {
    /// Handles available completions: write completions free staging
    /// buffers, credit RECVs feed the window (and are reposted).
    fn reap(&mut self) -> Result<usize, RdmaError> {
        let mut wcs: [ibv_wc; 16] = std::array::from_fn(|_| empty_wc());
        let n = self.conn.poll(&mut wcs)?;
        for wc in &wcs[..n] {
            match wc.opcode {
                ibv_wc_opcode::IBV_WC_RDMA_WRITE => {
                    if let Some(b) = self.busy.get_mut(wc.wr_id as usize) {
                        *b = false;
                    }
                }
                ibv_wc_opcode::IBV_WC_RECV if wc.byte_len as usize == Credit::LEN => {
                    let i = wc.wr_id as usize;
                    if i >= CREDIT_RECVS {
                        return Err(RdmaError::UnexpectedCompletion {
                            opcode: wc.opcode,
                            len: wc.byte_len,
                        });
                    }
                    let at = i * Credit::LEN;
                    let c = Credit::decode(&self.credit_bufs.0[at..at + Credit::LEN])?;
                    self.window.on_credit(c)?;
                    let addr = self.credit_bufs.ptr() as u64 + at as u64;
                    self.conn
                        .post_recv(i as u64, addr, Credit::LEN as u32, self.credit_lkey)?;
                }
                op => {
                    return Err(RdmaError::UnexpectedCompletion {
                        opcode: op,
                        len: wc.byte_len,
                    })
                }
            }
        }
        Ok(n)
    }

    /// Reaps until `done` holds, failing after [`STALL_TIMEOUT`].
    fn reap_until(&mut self, done: impl Fn(&Self) -> bool) -> Result<(), RdmaError> {
        let start = Instant::now();
        while !done(self) {
            if self.reap()? == 0 {
                if start.elapsed() > STALL_TIMEOUT {
                    return Err(RdmaError::Stalled(STALL_TIMEOUT));
                }
                std::thread::yield_now();
            }
        }
        Ok(())
    }

    fn send_inner(&mut self, bufs: &[&[u8]]) -> Result<(), RdmaError> {
        let mut left: usize = bufs.iter().map(|b| b.len()).sum();
        let (mut bi, mut bo) = (0usize, 0usize);
        // One call's writes are posted as one chain.
        let mut sges: Vec<ibv_sge> = Vec::new();
        let mut wrs: Vec<ibv_send_wr> = Vec::new();
        while left > 0 {
            self.reap()?;
            let p = match self.window.place(left) {
                Some(p) => p,
                None => {
                    self.post(&mut wrs, &mut sges)?;
                    self.reap_until(|s| s.window.place(1).is_some())?;
                    continue;
                }
            };
            let b = match self.busy.iter().position(|b| !b) {
                Some(b) => b,
                None => {
                    self.post(&mut wrs, &mut sges)?;
                    self.reap_until(|s| s.busy.iter().any(|b| !b))?;
                    continue;
                }
            };
            let base = b * self.slot;
            let dst = &mut self.stage.0[base..base + p.len];
            let mut at = 0;
            while at < dst.len() {
                let src = &bufs[bi][bo..];
                let k = src.len().min(dst.len() - at);
                dst[at..at + k].copy_from_slice(&src[..k]);
                at += k;
                bo += k;
                if bo == bufs[bi].len() {
                    bi += 1;
                    bo = 0;
                }
            }
            sges.push(ibv_sge {
                addr: self.stage.ptr() as u64 + base as u64,
                length: p.len as u32,
                lkey: self.stage_lkey,
            });
            // SAFETY: plain data; the fields used are set below.
            let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
            wr.wr_id = b as u64;
            wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
            wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
            wr.num_sge = 1;
            wr.imm_data_invalidated_rkey_union.imm_data = p.tag.encode().to_be();
            wr.wr.rdma.remote_addr = self.remote + p.ring_offset as u64;
            wr.wr.rdma.rkey = self.rkey;
            wrs.push(wr);
            self.busy[b] = true;
            self.window.advance(&p);
            left -= p.len;
        }
        self.post(&mut wrs, &mut sges)
    }

    /// Posts the chained work requests, if any.
    fn post(
        &mut self,
        wrs: &mut Vec<ibv_send_wr>,
        sges: &mut Vec<ibv_sge>,
    ) -> Result<(), RdmaError> {
        if wrs.is_empty() {
            return Ok(());
        }
        let n = wrs.len();
        for i in 0..n {
            wrs[i].sg_list = &mut sges[i];
            wrs[i].next = if i + 1 < n {
                &mut wrs[i + 1]
            } else {
                std::ptr::null_mut()
            };
        }
        let mut bad = std::ptr::null_mut();
        // SAFETY: live QP; the chain and its sges live across the call; the
        // staging bytes they name stay untouched until their completion.
        let r = unsafe { ibv_post_send(self.conn.qp(), wrs.as_mut_ptr(), &mut bad) };
        wrs.clear();
        sges.clear();
        if r != 0 {
            return Err(RdmaError::Call {
                call: "ibv_post_send",
                source: io::Error::from_raw_os_error(r),
            });
        }
        Ok(())
    }
}

impl RecordSink for RdmaSink {
    fn send(&mut self, bufs: &[&[u8]]) -> io::Result<()> {
        if let Some(m) = &self.failed {
            return Err(io::Error::other(m.clone()));
        }
        self.send_inner(bufs).map_err(|e| {
            let m = format!("rdma: {e}");
            self.failed = Some(m.clone());
            io::Error::other(m)
        })
    }
}

impl Drop for RdmaSink {
    fn drop(&mut self) {
        // Let posted writes finish before the staging memory goes.
        let _ = self.reap_until(|s| !s.busy.iter().any(|b| *b));
    }
}

/// Backup side after the agreement: listens, registers the ring, announces
/// it with `announce`, accepts the primary's connection.
pub fn backup(
    sock: TcpStream,
    ann: Announce,
    writer: Arc<Mutex<TcpStream>>,
    announce: impl Fn(&Announce) -> Result<(), SetupError>,
) -> Result<Box<dyn RecordSource>, RdmaError> {
    let _ = writer; // credits travel by SEND; acks stay on the TCP writer
    probe()?;
    let local = sock.local_addr().map_err(|source| RdmaError::Call {
        call: "getsockname",
        source,
    })?;
    let mut c = Conn::new()?;
    c.listen = c.create_id()?;
    let mut bind = sockaddr_of(SocketAddr::new(local.ip(), 0));
    // SAFETY: live id; bind is a valid sockaddr.
    if unsafe { rdma_bind_addr(c.listen, (&mut bind as *mut libc::sockaddr_storage).cast()) } != 0 {
        return Err(call_err("rdma_bind_addr"));
    }
    // SAFETY: bound id.
    let verbs = unsafe { (*c.listen).verbs };
    if verbs.is_null() {
        return Err(RdmaError::NotRdma(local.ip()));
    }
    // SAFETY: bound id.
    if unsafe { rdma_listen(c.listen, 1) } != 0 {
        return Err(call_err("rdma_listen"));
    }
    // SAFETY: bound id; the port comes back in network order.
    let port = u16::from_be(unsafe { rdma_get_src_port(c.listen) });
    // SAFETY: verbs is the listening device's context.
    c.pd = unsafe { ibv_alloc_pd(verbs) };
    if c.pd.is_null() {
        return Err(call_err("ibv_alloc_pd"));
    }
    let ring = MirrorRing::new(ann.ring_len()).map_err(|e| RdmaError::Call {
        call: "mapping the receive ring",
        source: io::Error::other(e.to_string()),
    })?;
    let ring_mr = Mr::new(
        c.pd,
        ring.base(),
        ring.len(),
        ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE,
    )?;
    let mut credit_buf = Buf(vec![0u8; Credit::LEN]);
    let credit_mr = Mr::new(
        c.pd,
        credit_buf.ptr(),
        Credit::LEN,
        ibv_access_flags::IBV_ACCESS_LOCAL_WRITE,
    )?;
    let full = Announce {
        addr: ring.base() as u64,
        rkey: ring_mr.rkey(),
        cm_port: port,
        ..ann
    };
    c.mrs.push(ring_mr);
    let credit_lkey = credit_mr.lkey();
    c.mrs.push(credit_mr);
    announce(&full).map_err(|e| RdmaError::Call {
        call: "announcing the ring",
        source: io::Error::other(e.to_string()),
    })?;
    c.id = expect_event(
        c.ch,
        rdma_cm_event_type::RDMA_CM_EVENT_CONNECT_REQUEST,
        "CONNECT_REQUEST",
    )?;
    // One RECV per chunk in flight: at most one chunk per slot outstanding
    // per credit window, plus slack.
    let recvs = ann.slots * 2;
    c.make_qp(8, recvs)?;
    for i in 0..recvs {
        c.post_recv(i as u64, 0, 0, 0)?;
    }
    let mut p = Conn::conn_param();
    // SAFETY: id from the connect request with a QP; p lives across the call.
    if unsafe { rdma_accept(c.id, &mut p) } != 0 {
        return Err(call_err("rdma_accept"));
    }
    expect_event(
        c.ch,
        rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED,
        "ESTABLISHED",
    )?;
    c.connected = true;
    Ok(Box::new(RdmaSource {
        state: RingState::new(&full),
        credit_batch: (ann.slots as u64 / 4).max(1),
        ring,
        credit_buf,
        credit_lkey,
        credit_in_flight: false,
        pending_consume: 0,
        bytes_read: 0,
        sock,
        conn: c,
    }))
}

/// The backup's receiving half over RDMA.
pub struct RdmaSource {
    /// Dropped first: QP and MRs go before the ring and buffers they name.
    conn: Conn,
    state: RingState,
    credit_batch: u64,
    ring: MirrorRing,
    credit_buf: Buf,
    credit_lkey: u32,
    /// A credit SEND is posted and not yet completed (its buffer is busy).
    credit_in_flight: bool,
    pending_consume: usize,
    bytes_read: u64,
    sock: TcpStream,
}

impl RdmaSource {
    /// Whether the TCP control connection was closed (primary gone, or the
    /// watchdog shut it down).
    fn control_closed(&self) -> bool {
        let mut b = [0u8; 1];
        // SAFETY: peeking one byte into a local buffer.
        let r = unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(&self.sock),
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        r == 0 || (r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock)
    }

    fn send_credit(&mut self) -> Result<(), RdmaError> {
        if self.credit_in_flight {
            return Ok(()); // sent once the previous one completes
        }
        let Some(c) = self.state.take_credit() else {
            return Ok(());
        };
        self.credit_buf.0.copy_from_slice(&c.encode());
        let mut sge = ibv_sge {
            addr: self.credit_buf.ptr() as u64,
            length: Credit::LEN as u32,
            lkey: self.credit_lkey,
        };
        // SAFETY: plain data.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = WR_CREDIT_SEND;
        wr.opcode = ibv_wr_opcode::IBV_WR_SEND;
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        let mut bad = std::ptr::null_mut();
        // SAFETY: live QP; wr and sge live across the call; the buffer stays
        // untouched until the send completes (credit_in_flight).
        let r = unsafe { ibv_post_send(self.conn.qp(), &mut wr, &mut bad) };
        if r != 0 {
            return Err(RdmaError::Call {
                call: "ibv_post_send",
                source: io::Error::from_raw_os_error(r),
            });
        }
        self.credit_in_flight = true;
        Ok(())
    }

    /// Waits for the next chunk and accounts for it.
    fn receive(&mut self, at_boundary: bool) -> Result<(), RecordError> {
        self.send_credit().map_err(to_record_err)?;
        let start = Instant::now();
        loop {
            let mut wcs: [ibv_wc; 8] = std::array::from_fn(|_| empty_wc());
            let n = self.conn.poll(&mut wcs).map_err(to_record_err)?;
            let mut landed = false;
            for wc in &wcs[..n] {
                match wc.opcode {
                    ibv_wc_opcode::IBV_WC_SEND if wc.wr_id == WR_CREDIT_SEND => {
                        self.credit_in_flight = false;
                        self.send_credit().map_err(to_record_err)?;
                    }
                    ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM => {
                        // SAFETY: the union holds the immediate for this opcode.
                        let imm =
                            u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data });
                        let p = self.state.on_chunk(imm)?;
                        if wc.byte_len as usize != p.len {
                            return Err(to_record_err(RdmaError::ChunkLength {
                                tag: p.tag,
                                got: wc.byte_len,
                            }));
                        }
                        self.state.on_landed(p.len);
                        self.conn
                            .post_recv(wc.wr_id, 0, 0, 0)
                            .map_err(to_record_err)?;
                        landed = true;
                    }
                    op => {
                        return Err(to_record_err(RdmaError::UnexpectedCompletion {
                            opcode: op,
                            len: wc.byte_len,
                        }))
                    }
                }
            }
            if landed {
                return Ok(());
            }
            if n == 0 {
                if start.elapsed() > Duration::from_millis(10) && self.control_closed() {
                    return Err(if at_boundary {
                        RecordError::Eof
                    } else {
                        RecordError::Truncated {
                            what: "record in the receive ring",
                            got: self.state.available() as usize,
                            want: HEADER_LEN,
                        }
                    });
                }
                std::thread::yield_now();
            }
        }
    }
}

fn to_record_err(e: RdmaError) -> RecordError {
    match e {
        RdmaError::Slot(s) => RecordError::Slot(s),
        e => RecordError::Io(io::Error::other(format!("rdma: {e}"))),
    }
}

impl RecordSource for RdmaSource {
    fn next_record(&mut self) -> Result<Record<'_>, RecordError> {
        if self.pending_consume > 0 {
            self.state.consume(self.pending_consume);
            self.pending_consume = 0;
            if self.state.creditable() >= self.credit_batch {
                self.send_credit().map_err(to_record_err)?;
            }
        }
        loop {
            if let Some((off, hd, need)) = ready_record(&self.state, &self.ring)? {
                self.pending_consume = need;
                self.bytes_read += need as u64;
                return verify(&hd, self.ring.slice(off, need));
            }
            let empty = self.state.available() == 0;
            self.receive(empty)?;
        }
    }

    fn stream(&self) -> &TcpStream {
        &self.sock
    }

    fn bytes_read(&self) -> u64 {
        self.bytes_read
    }
}
