//! The verbs and rdma_cm objects of one connection, each released on drop
//! in the order the verbs API requires.

use std::ffi::CStr;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use rdma_sys::*;

use super::{call_err, RdmaError};
use crate::transport::slots::Credit;

/// Empty polls of the CQ before a waiter arms the completion channel and
/// sleeps in poll(2): a short spin keeps latency low while completions
/// stream, the sleep keeps an idle connection off the CPU.
const SPIN_POLLS: u32 = 200;

/// Waits until `fd` is readable or `timeout` passes; true when readable.
fn wait_readable(fd: i32, timeout: Duration) -> Result<bool, RdmaError> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one pollfd on the stack for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(RdmaError::Call {
            call: "poll",
            source: e,
        });
    }
    Ok(r > 0)
}

pub(super) fn sockaddr_of(a: SocketAddr) -> libc::sockaddr_storage {
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

/// Waits up to `timeout` for the next cm event on `ch`, which must be
/// `want`; returns the event's id. A peer that never connects (or answers)
/// fails here with [`RdmaError::CmTimeout`] instead of blocking forever.
pub(super) fn expect_event(
    ch: *mut rdma_event_channel,
    want: rdma_cm_event_type::Type,
    name: &'static str,
    timeout: Duration,
) -> Result<*mut rdma_cm_id, RdmaError> {
    // SAFETY: ch is a live channel; fd is its file descriptor.
    let fd = unsafe { (*ch).fd };
    if !wait_readable(fd, timeout)? {
        return Err(RdmaError::CmTimeout {
            want: name,
            after: timeout,
        });
    }
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
pub(super) struct Mr(*mut ibv_mr);

impl Mr {
    pub(super) fn new(
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
    pub(super) fn lkey(&self) -> u32 {
        // SAFETY: live MR.
        unsafe { (*self.0).lkey }
    }
    pub(super) fn rkey(&self) -> u32 {
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
pub(super) struct Conn {
    pub(super) ch: *mut rdma_event_channel,
    pub(super) listen: *mut rdma_cm_id,
    pub(super) id: *mut rdma_cm_id,
    pub(super) pd: *mut ibv_pd,
    pub(super) cq: *mut ibv_cq,
    /// The CQ's completion channel: its fd turns readable on a completion
    /// after [`Conn::idle`] armed the CQ.
    comp: *mut ibv_comp_channel,
    /// The CQ is armed (ibv_req_notify_cq) and its event not yet taken.
    armed: bool,
    pub(super) qp: bool,
    pub(super) connected: bool,
    /// Regions registered on `pd`: dropped (deregistered) before the PD.
    pub(super) mrs: Vec<Mr>,
}

// SAFETY: verbs objects may be used from any thread; one owner at a time.
unsafe impl Send for Conn {}

impl Conn {
    pub(super) fn new() -> Result<Conn, RdmaError> {
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
            comp: std::ptr::null_mut(),
            armed: false,
            qp: false,
            connected: false,
            mrs: Vec::new(),
        })
    }

    pub(super) fn create_id(&self) -> Result<*mut rdma_cm_id, RdmaError> {
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
    pub(super) fn make_qp(&mut self, send_wr: u32, recv_wr: u32) -> Result<(), RdmaError> {
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
        self.comp = unsafe { ibv_create_comp_channel(verbs) };
        if self.comp.is_null() {
            return Err(call_err("ibv_create_comp_channel"));
        }
        // SAFETY: as above; comp is live.
        self.cq = unsafe {
            ibv_create_cq(
                verbs,
                (send_wr + recv_wr) as i32,
                std::ptr::null_mut(),
                self.comp,
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

    pub(super) fn qp(&self) -> *mut ibv_qp {
        // SAFETY: make_qp succeeded (callers run after it).
        unsafe { (*self.id).qp }
    }

    pub(super) fn conn_param() -> rdma_conn_param {
        // SAFETY: plain data.
        let mut p: rdma_conn_param = unsafe { std::mem::zeroed() };
        p.initiator_depth = 1;
        p.responder_resources = 1;
        p.retry_count = 7;
        // Bounded (7 would retry forever): the chunk budget keeps a RECV
        // posted for every chunk, so an RNR NAK means a peer that broke
        // the protocol, and the write then fails instead of hanging.
        p.rnr_retry_count = 3;
        p
    }

    /// Posts one RECV for `len` bytes at `addr` (len 0: no scatter entry,
    /// for WRITE WITH IMMEDIATE).
    pub(super) fn post_recv(
        &self,
        wr_id: u64,
        addr: u64,
        len: u32,
        lkey: u32,
    ) -> Result<(), RdmaError> {
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
    pub(super) fn poll(&self, out: &mut [ibv_wc]) -> Result<usize, RdmaError> {
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

    /// Called after an empty [`Conn::poll`]; `spins` counts empty polls in
    /// a row (reset it when a poll finds something). Spins for the first
    /// [`SPIN_POLLS`], then arms the CQ and returns (so the caller polls
    /// once more: a completion that landed before arming raises no event),
    /// then sleeps until the completion channel fires or `slice` passes.
    pub(super) fn idle(&mut self, spins: &mut u32, slice: Duration) -> Result<(), RdmaError> {
        if *spins < SPIN_POLLS {
            *spins += 1;
            std::hint::spin_loop();
            return Ok(());
        }
        if !self.armed {
            // SAFETY: live CQ created with the completion channel.
            let r = unsafe { ibv_req_notify_cq(self.cq, 0) };
            if r != 0 {
                return Err(RdmaError::Call {
                    call: "ibv_req_notify_cq",
                    source: io::Error::from_raw_os_error(r),
                });
            }
            self.armed = true;
            return Ok(());
        }
        // SAFETY: live completion channel.
        let fd = unsafe { (*self.comp).fd };
        if wait_readable(fd, slice)? {
            let mut cq = std::ptr::null_mut();
            let mut ctx = std::ptr::null_mut();
            // SAFETY: the channel is readable, so this returns at once; the
            // event is acknowledged right away (destroying the CQ needs
            // every event acknowledged).
            if unsafe { ibv_get_cq_event(self.comp, &mut cq, &mut ctx) } == 0 {
                // SAFETY: cq is the CQ the event came from.
                unsafe { ibv_ack_cq_events(cq, 1) };
                self.armed = false;
            }
        }
        Ok(())
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
            if !self.comp.is_null() {
                ibv_destroy_comp_channel(self.comp);
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

pub(super) fn empty_wc() -> ibv_wc {
    // SAFETY: plain data.
    unsafe { std::mem::zeroed() }
}

/// Memory for staging and credit buffers: a plain heap allocation (no
/// alignment beyond the allocator's; ibv_reg_mr registers any byte range,
/// pinning the pages it touches). It must not be resized while registered.
pub(super) struct Buf(pub(super) Vec<u8>);

impl Buf {
    pub(super) fn ptr(&mut self) -> *mut u8 {
        self.0.as_mut_ptr()
    }
}
