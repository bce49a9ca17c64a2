//! The backup's half of the `rdma` transport: listens on an rdma_cm id,
//! registers and announces the receive ring, accepts the primary; then
//! chunks land by RDMA WRITE WITH IMMEDIATE and credits leave by SEND,
//! under the shared [`RingReader`].

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rdma_sys::*;

use super::verbs::{empty_wc, expect_event, sockaddr_of, Buf, Conn, Mr};
use super::{
    call_err, probe, to_record_err, RdmaError, CM_EVENT_TIMEOUT, IDLE_SLICE, WR_CREDIT_SEND,
};
use crate::transport::auth::Opener;
use crate::transport::link::RecordSource;
use crate::transport::record::RecordError;
use crate::transport::ring::{MirrorRing, RingLink, RingReader};
use crate::transport::slots::{recvs_for, Announce, Credit, RingState};
use crate::transport::wire::HEADER_LEN;

/// Backup side after the agreement: listens, registers the ring, announces
/// it with `announce`, accepts the primary's connection.
pub fn backup<E: std::fmt::Display>(
    sock: TcpStream,
    ann: Announce,
    open: Option<Opener>,
    announce: impl Fn(&Announce) -> Result<(), E>,
) -> Result<Box<dyn RecordSource>, RdmaError> {
    Ok(Box::new(backup_source(sock, ann, open, announce)?))
}

/// [`backup`], returning the source itself.
pub(super) fn backup_source<E: std::fmt::Display>(
    sock: TcpStream,
    ann: Announce,
    open: Option<Opener>,
    announce: impl Fn(&Announce) -> Result<(), E>,
) -> Result<RdmaSource, RdmaError> {
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
        CM_EVENT_TIMEOUT,
    )?;
    // One RECV per chunk landing; the primary writes no more chunks than
    // this before credits return them (`ChunkBudget`).
    let recvs = recvs_for(ann.slots);
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
        CM_EVENT_TIMEOUT,
    )?;
    c.connected = true;
    let link = RdmaLink {
        conn: c,
        credit_buf,
        credit_lkey,
        credit_in_flight: false,
        sock,
    };
    Ok(RingReader::over(link, ring, &full).authenticate(open))
}

/// The backup's receiving half over RDMA.
pub type RdmaSource = RingReader<RdmaLink>;

/// How chunks reach the ring over RDMA (WRITE WITH IMMEDIATE, one RECV
/// completion each), and how credits go back (SEND).
///
/// Invariant: the [`RingReader`] owning this link drops it before the ring,
/// so QP and MRs go before the memory they name.
pub struct RdmaLink {
    /// Dropped first: QP and MRs go before the buffers they name.
    conn: Conn,
    credit_buf: Buf,
    credit_lkey: u32,
    /// A credit SEND is posted and not yet completed (its buffer is busy).
    credit_in_flight: bool,
    sock: TcpStream,
}

impl RdmaLink {
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

    fn post_credit(&mut self, state: &mut RingState) -> Result<(), RdmaError> {
        if self.credit_in_flight {
            return Ok(()); // sent once the previous one completes
        }
        match state.take_credit() {
            Some(c) => self.send_credit_now(c),
            None => Ok(()),
        }
    }

    /// A credit as a faulty backup would send it, outside the protocol
    /// (tests): waits for the previous credit's SEND first.
    #[cfg(test)]
    pub(super) fn send_raw_credit(&mut self, c: Credit) -> Result<(), RdmaError> {
        let start = Instant::now();
        let mut wcs: [ibv_wc; 1] = [empty_wc()];
        while self.credit_in_flight {
            if self.conn.poll(&mut wcs)? > 0 && wcs[0].wr_id == WR_CREDIT_SEND {
                self.credit_in_flight = false;
            }
            if start.elapsed() > Duration::from_secs(10) {
                return Err(RdmaError::Stalled(Duration::from_secs(10)));
            }
        }
        self.send_credit_now(c)
    }

    /// Posts `c` by SEND from the credit buffer (no credit in flight).
    fn send_credit_now(&mut self, c: Credit) -> Result<(), RdmaError> {
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
}

impl RingLink for RdmaLink {
    fn send_credit(&mut self, state: &mut RingState) -> Result<(), RecordError> {
        self.post_credit(state).map_err(to_record_err)
    }

    /// Waits for the next chunk and accounts for it.
    fn receive(
        &mut self,
        state: &mut RingState,
        _ring: &MirrorRing,
        at_boundary: bool,
    ) -> Result<(), RecordError> {
        let start = Instant::now();
        let mut spins = 0;
        loop {
            let mut wcs: [ibv_wc; 8] = std::array::from_fn(|_| empty_wc());
            let n = self.conn.poll(&mut wcs).map_err(to_record_err)?;
            let mut landed = false;
            for wc in &wcs[..n] {
                match wc.opcode {
                    ibv_wc_opcode::IBV_WC_SEND if wc.wr_id == WR_CREDIT_SEND => {
                        self.credit_in_flight = false;
                        self.post_credit(state).map_err(to_record_err)?;
                    }
                    ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM => {
                        // SAFETY: the union holds the immediate for this opcode.
                        let imm =
                            u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data });
                        let p = state.on_chunk(imm)?;
                        if wc.byte_len as usize != p.len {
                            return Err(to_record_err(RdmaError::ChunkLength {
                                tag: p.tag,
                                got: wc.byte_len,
                            }));
                        }
                        state.on_landed(p.len);
                        self.conn
                            .post_recv(wc.wr_id, 0, 0, 0)
                            .map_err(to_record_err)?;
                        // Only once its RECV is posted again may the
                        // chunk be returned to the primary's budget.
                        state.on_chunk_taken();
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
            if n > 0 {
                spins = 0;
            } else {
                if start.elapsed() > Duration::from_millis(10) && self.control_closed() {
                    return Err(if at_boundary {
                        RecordError::Eof
                    } else {
                        RecordError::Truncated {
                            what: "record in the receive ring",
                            got: state.available() as usize,
                            want: HEADER_LEN,
                        }
                    });
                }
                self.conn
                    .idle(&mut spins, IDLE_SLICE)
                    .map_err(to_record_err)?;
            }
        }
    }

    fn stream(&self) -> &TcpStream {
        &self.sock
    }
}
