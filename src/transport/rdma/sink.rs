//! The primary's half of the `rdma` transport: connects to the backup's
//! listener, then writes each chunk with RDMA WRITE WITH IMMEDIATE from
//! registered staging memory, within the credits the backup SENDs back.

use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rdma_sys::*;

use super::verbs::{empty_wc, expect_event, sockaddr_of, Buf, Conn, Mr};
use super::{
    call_err, probe, RdmaError, CM_EVENT_TIMEOUT, CM_TIMEOUT_MS, IDLE_SLICE, STALL_TIMEOUT,
};
use crate::transport::link::RecordSink;
use crate::transport::record::RecordReader;
use crate::transport::ring::{Chunker, CreditFilter, ReturnPath};
use crate::transport::slots::{recvs_for, Announce, ChunkBudget, Credit, CreditWindow};

/// Staging buffers of the primary (each one slot).
const STAGE_BUFS: usize = 16;
/// Credit messages the primary keeps RECVs posted for.
const CREDIT_RECVS: usize = 64;

/// Primary side after the agreement: connects and returns the sink and the
/// (TCP) return path.
pub fn primary(
    reader: RecordReader<TcpStream>,
    writer: TcpStream,
    ann: &Announce,
) -> Result<(Box<dyn RecordSink>, ReturnPath), RdmaError> {
    let (sink, back) = primary_sink(reader, writer, ann)?;
    Ok((Box::new(sink), back))
}

/// [`primary`], returning the sink itself.
pub(super) fn primary_sink(
    reader: RecordReader<TcpStream>,
    writer: TcpStream,
    ann: &Announce,
) -> Result<(RdmaSink, ReturnPath), RdmaError> {
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
        CM_EVENT_TIMEOUT,
    )?;
    // SAFETY: live id with a resolved address.
    if unsafe { rdma_resolve_route(c.id, CM_TIMEOUT_MS) } != 0 {
        return Err(call_err("rdma_resolve_route"));
    }
    expect_event(
        c.ch,
        rdma_cm_event_type::RDMA_CM_EVENT_ROUTE_RESOLVED,
        "ROUTE_RESOLVED",
        CM_EVENT_TIMEOUT,
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
        CM_EVENT_TIMEOUT,
    )?;
    c.connected = true;
    let sink = RdmaSink {
        control: writer,
        window: CreditWindow::new(ann),
        recvs: ChunkBudget::new(recvs_for(ann.slots)),
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
    Ok((sink, RecordReader::new(back)))
}

/// The primary's sending half over RDMA.
pub struct RdmaSink {
    /// Dropped first (after Drop drained the writes): QP and MRs go before
    /// the buffers they name.
    conn: Conn,
    /// The TCP control connection (handshake, acks and credits come back
    /// on it). Its write timeout, which a protection session sets to
    /// `--backup-timeout`, is also this sink's stall deadline.
    control: TcpStream,
    window: CreditWindow,
    /// Chunks written whose RECV the backup has not yet posted again.
    recvs: ChunkBudget,
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
                    self.recvs.on_credit(c)?;
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

    /// How long a wait for a completion or a credit may last: the control
    /// connection's write timeout (`--backup-timeout` in a protection
    /// session), else [`STALL_TIMEOUT`].
    fn stall_deadline(&self) -> Duration {
        match self.control.write_timeout() {
            Ok(Some(t)) if !t.is_zero() => t,
            _ => STALL_TIMEOUT,
        }
    }

    /// Reaps until `done` holds, failing after [`Self::stall_deadline`]; between
    /// empty polls it spins briefly, then sleeps on the completion channel.
    fn reap_until(&mut self, done: impl Fn(&Self) -> bool) -> Result<(), RdmaError> {
        let start = Instant::now();
        let mut spins = 0;
        while !done(self) {
            if self.reap()? > 0 {
                spins = 0;
                continue;
            }
            let stall = self.stall_deadline();
            if start.elapsed() > stall {
                return Err(RdmaError::Stalled(stall));
            }
            self.conn.idle(&mut spins, IDLE_SLICE)?;
        }
        Ok(())
    }

    fn send_inner(&mut self, bufs: &[&[u8]]) -> Result<(), RdmaError> {
        let mut chunks = Chunker::new(bufs);
        // One call's writes are posted as one chain.
        let mut sges: Vec<ibv_sge> = Vec::new();
        let mut wrs: Vec<ibv_send_wr> = Vec::new();
        while chunks.left() > 0 {
            self.reap()?;
            if !self.recvs.has_room() {
                self.post(&mut wrs, &mut sges)?;
                self.reap_until(|s| s.recvs.has_room())?;
                continue;
            }
            let p = match self.window.place(chunks.left()) {
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
            chunks.copy_into(&mut self.stage.0[base..base + p.len]);
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
            self.recvs.on_chunk();
            self.window.advance(&p);
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

#[cfg(test)]
impl RdmaSink {
    /// Writes `bytes` at ring offset `at` with immediate `imm`, outside the
    /// credit protocol, as a faulty primary would; waits for the write's
    /// completion (the backup judges it in software afterwards).
    pub(super) fn write_raw(&mut self, imm: u32, at: u64, bytes: &[u8]) -> Result<(), RdmaError> {
        self.reap_until(|s| !s.busy[0])?;
        self.stage.0[..bytes.len()].copy_from_slice(bytes);
        let mut sges = vec![ibv_sge {
            addr: self.stage.ptr() as u64,
            length: bytes.len() as u32,
            lkey: self.stage_lkey,
        }];
        // SAFETY: plain data; the fields used are set below.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        wr.num_sge = 1;
        wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
        wr.wr.rdma.remote_addr = self.remote + at;
        wr.wr.rdma.rkey = self.rkey;
        self.busy[0] = true;
        self.post(&mut vec![wr], &mut sges)?;
        self.reap_until(|s| !s.busy[0])
    }
}

impl RecordSink for RdmaSink {
    /// The control connection: the session arms its deadlines on it and
    /// shuts it down on failure, which wakes a read blocked on the return
    /// path.
    fn connection(&self) -> Option<TcpStream> {
        self.control.try_clone().ok()
    }

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
