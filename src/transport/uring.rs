//! The `uring` transport: io_uring over the session's TCP connection, with
//! the slot/credit protocol of [`crate::transport::slots`].
//!
//! Primary ([`UringSink`]): records are cut into chunks that each fit the
//! backup's current receive slot, each sent with an 8-byte chunk header
//! (`tag` u32 = [`ChunkTag`], `seq` u32 = chunk count mod 2^32) on a fixed
//! file. By default ([`SendMode::Direct`]) a chunk is one
//! `IORING_OP_SENDMSG_ZC` whose iovecs are the header (in sink-owned memory)
//! and the pieces of the caller's buffers that make up its body, so the
//! sink copies no byte; since the caller lends those buffers only for the
//! call, `send` returns only once every one of its sends has both its
//! completion and its zero-copy notification (`IORING_CQE_F_NOTIF`), i.e.
//! once the kernel no longer reads them. The staged modes copy the chunk
//! into the sink's registered staging buffers instead and send it with
//! `IORING_OP_SEND_ZC` (or plain `SEND`) from there; a staging buffer is
//! reused only after its completion and notification arrived. One batch of
//! chunks is submitted as one linked chain (links keep them in order on the
//! socket). The sink never places a byte into a slot
//! it holds no credit for; credits arrive on the return path, where
//! [`CreditFilter`] takes `Credit` records out of the stream the ack thread
//! reads and hands them to the sink.
//!
//! Backup ([`UringSource`]): the receive ring is one memfd mapped twice back
//! to back ([`MirrorRing`]), the first mapping registered as a fixed buffer.
//! Chunk bodies are read with `IORING_OP_READ_FIXED` straight into their
//! slot; records are verified and handed to the receiver as slices of the
//! ring (a record running past the ring's end reads on into the mirror), so
//! no byte is copied between the socket and the decoder beyond the kernel's
//! own copy. Consumed slots are credited back in order.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};

use crate::transport::record::{
    parse_header, verify, write_record, Header, Record, RecordError, RecordKind, RecordReader,
    HEADER_LEN,
};
use crate::transport::slots::{
    Announce, ChunkTag, Credit, CreditWindow, Placement, RingState, SlotError,
};
use crate::transport::{RecordSink, RecordSource};

/// Bytes before each chunk body on the wire: tag u32, seq u32.
pub const CHUNK_HEADER: usize = 8;
/// Staging buffers of the sink (each holds one chunk header + one slot).
const STAGE_BUFS: usize = 8;
const RING_ENTRIES: u32 = 64;
/// SENDMSG_ZC operations the direct mode keeps in flight at most (one
/// batch: each yields two completions, so the completion queue of
/// `2 * RING_ENTRIES` never overflows).
const DIRECT_OPS: usize = RING_ENTRIES as usize / 2;
/// iovecs of one SENDMSG_ZC (header + body pieces); a chunk is cut short
/// rather than span more pieces (well under the kernel's UIO_MAXIOV).
const MAX_IOV: usize = 64;
/// How long `send` waits for the kernel to finish with the caller's buffers
/// before it shuts the socket down and fails.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The sink gives up when no credit arrives for this long.
const CREDIT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum UringError {
    #[error("io_uring is unavailable on this kernel ({kernel}): {source} (is io_uring disabled by the kernel.io_uring_disabled sysctl or a seccomp policy?); use --transport tcp")]
    Setup { kernel: String, source: io::Error },
    #[error(
        "kernel {kernel} does not support io_uring {op} (needs Linux {needs}); use --transport tcp"
    )]
    Unsupported {
        kernel: String,
        op: &'static str,
        needs: &'static str,
    },
    #[error("registering {what} with io_uring: {source}")]
    Register {
        what: &'static str,
        source: io::Error,
    },
    #[error("mapping {what} of {len} bytes: {source}")]
    Map {
        what: &'static str,
        len: usize,
        source: io::Error,
    },
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn new_ring() -> Result<IoUring, UringError> {
    let ring = IoUring::new(RING_ENTRIES).map_err(|source| UringError::Setup {
        kernel: kernel(),
        source,
    })?;
    let mut p = Probe::new();
    ring.submitter()
        .register_probe(&mut p)
        .map_err(|source| UringError::Setup {
            kernel: kernel(),
            source,
        })?;
    for (code, op, needs) in [
        (opcode::SendZc::CODE, "IORING_OP_SEND_ZC", "6.0"),
        (opcode::ReadFixed::CODE, "IORING_OP_READ_FIXED", "5.1"),
    ] {
        if !p.is_supported(code) {
            return Err(UringError::Unsupported {
                kernel: kernel(),
                op,
                needs,
            });
        }
    }
    Ok(ring)
}

/// Checks that this machine can run the transport (ring setup and the ops
/// it needs), for a clear error at start-up.
pub fn probe() -> Result<(), UringError> {
    new_ring().map(drop)
}

/// Page-aligned anonymous memory, unmapped on drop.
struct Region {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain memory; access is coordinated by its owner.
unsafe impl Send for Region {}

impl Region {
    fn new(len: usize, what: &'static str) -> Result<Self, UringError> {
        // SAFETY: anonymous private mapping, no address hint.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(UringError::Map {
                what,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Region { ptr: p.cast(), len })
    }

    fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr.cast(),
            iov_len: self.len,
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: mapped by `new` with this length; pages the kernel still
        // pins (registered buffers) stay alive in the kernel until released.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A ring of `len` bytes mapped twice back to back: byte `len + i` is byte
/// `i`, so any `n <= len` bytes from any offset `< len` are one slice.
///
/// Invariant: `base..base+2*len` stays mapped for the value's life.
pub struct MirrorRing {
    base: *mut u8,
    len: usize,
}

// SAFETY: plain memory; the owner coordinates writers (the kernel, into
// accepted placements) and readers (the parser, behind the write position).
unsafe impl Send for MirrorRing {}

impl MirrorRing {
    /// `len` must be a multiple of the page size (validated announcements are).
    pub fn new(len: usize) -> Result<Self, UringError> {
        let map_err = |source| UringError::Map {
            what: "the receive ring",
            len,
            source,
        };
        // SAFETY: memfd_create with a static NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"castor-ring".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(map_err(io::Error::last_os_error()));
        }
        // SAFETY: fd is ours; closed below on every path.
        let r = unsafe { libc::ftruncate(fd, len as libc::off_t) };
        if r != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: fd is ours.
            unsafe { libc::close(fd) };
            return Err(map_err(e));
        }
        // SAFETY: reserve 2*len of address space, then map the memfd over
        // both halves with MAP_FIXED inside our own reservation.
        let base = unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                2 * len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                let e = io::Error::last_os_error();
                libc::close(fd);
                return Err(map_err(e));
            }
            for half in 0..2 {
                let p = libc::mmap(
                    base.cast::<u8>().add(half * len).cast(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_POPULATE,
                    fd,
                    0,
                );
                if p == libc::MAP_FAILED {
                    let e = io::Error::last_os_error();
                    libc::munmap(base, 2 * len);
                    libc::close(fd);
                    return Err(map_err(e));
                }
            }
            libc::close(fd);
            base.cast::<u8>()
        };
        Ok(MirrorRing { base, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start of the first mapping (what gets registered with the kernel).
    pub fn base(&self) -> *mut u8 {
        self.base
    }

    /// `n` bytes at ring offset `off`, read through the mirror past the end.
    /// Panics unless `off < len` and `n <= len`.
    pub fn slice(&self, off: usize, n: usize) -> &[u8] {
        assert!(off < self.len && n <= self.len, "ring slice out of range");
        // SAFETY: off + n < 2*len lies inside the mapping (invariant); the
        // caller reads only bytes that have landed and that no accepted
        // placement overwrites before the next credit (slots protocol).
        unsafe { std::slice::from_raw_parts(self.base.add(off), n) }
    }
}

impl Drop for MirrorRing {
    fn drop(&mut self) {
        // SAFETY: the reservation made in `new`.
        unsafe { libc::munmap(self.base.cast(), 2 * self.len) };
    }
}

/// The next whole record waiting in a slot ring, if one has fully
/// arrived: its offset, verified header and total length (the caller
/// checks the CRC with [`verify`] and consumes it). Shared by the uring and
/// rdma sources, which differ only in how bytes reach the ring.
pub(crate) fn ready_record(
    state: &RingState,
    ring: &MirrorRing,
) -> Result<Option<(usize, Header, usize)>, RecordError> {
    let avail = state.available();
    if avail < HEADER_LEN as u64 {
        return Ok(None);
    }
    let off = state.read_offset();
    let h: [u8; HEADER_LEN] = ring
        .slice(off, HEADER_LEN)
        .try_into()
        .expect("slice of HEADER_LEN bytes");
    let hd = parse_header(&h)?;
    let need = HEADER_LEN + hd.len;
    // Guaranteed by a validated announcement (len <= MAX_PAYLOAD).
    assert!(state.fits(need as u64));
    Ok((avail >= need as u64).then_some((off, hd, need)))
}

/// Credits and end-of-stream handed from the return path to the sink.
#[derive(Default)]
pub struct CreditShared {
    m: Mutex<CreditQueue>,
    cv: Condvar,
}

#[derive(Default)]
struct CreditQueue {
    credits: VecDeque<Credit>,
    /// Why the return path ended, once it has.
    closed: Option<String>,
}

impl CreditShared {
    fn close(&self, why: String) {
        let mut g = self.m.lock().unwrap();
        g.closed.get_or_insert(why);
        self.cv.notify_all();
    }
}

/// The primary's return path: reads the backup's records, applies `Credit`
/// records to the sink's queue and passes every other record on unchanged
/// (re-framed) to whoever reads it (the primary's ack thread).
pub struct CreditFilter {
    inner: RecordReader<TcpStream>,
    /// None: credits do not travel on this path (rdma), and one is an error.
    shared: Option<Arc<CreditShared>>,
    out: Vec<u8>,
    pos: usize,
}

impl CreditFilter {
    pub fn new(inner: RecordReader<TcpStream>, shared: Arc<CreditShared>) -> Self {
        CreditFilter {
            inner,
            shared: Some(shared),
            out: Vec::new(),
            pos: 0,
        }
    }

    /// A return path on which a `Credit` record is a protocol error.
    pub fn passthrough(inner: RecordReader<TcpStream>) -> Self {
        CreditFilter {
            inner,
            shared: None,
            out: Vec::new(),
            pos: 0,
        }
    }

    fn close(&self, why: String) {
        if let Some(s) = &self.shared {
            s.close(why);
        }
    }
}

impl Read for CreditFilter {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.out.len() {
            match self.inner.next() {
                Ok(rec) if rec.kind == RecordKind::Credit => {
                    match (Credit::decode(rec.payload), &self.shared) {
                        (Ok(c), Some(sh)) => {
                            let mut g = sh.m.lock().unwrap();
                            g.credits.push_back(c);
                            sh.cv.notify_all();
                        }
                        (Ok(_), None) => {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "backup sent a Credit record on the TCP path of an rdma session",
                            ))
                        }
                        (Err(e), _) => {
                            let msg = format!("malformed credit from the backup: {e}");
                            self.close(msg.clone());
                            return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
                        }
                    }
                }
                Ok(rec) => {
                    self.out.clear();
                    self.pos = 0;
                    write_record(&mut self.out, rec.kind, rec.epoch, rec.payload);
                }
                Err(RecordError::Eof) => {
                    self.close("backup closed the connection".into());
                    return Ok(0);
                }
                Err(e) => {
                    let msg = e.to_string();
                    self.close(msg.clone());
                    return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
                }
            }
        }
        let n = buf.len().min(self.out.len() - self.pos);
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// How [`UringSink`] puts chunks on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendMode {
    /// `IORING_OP_SENDMSG_ZC` straight from the caller's buffers (default).
    Direct,
    /// Copy into the registered staging buffers, `IORING_OP_SEND_ZC` from
    /// there (the default on kernels without SENDMSG_ZC, before 6.1).
    StagedZc,
    /// Copy into the staging buffers, plain `IORING_OP_SEND` (benchmarks:
    /// on loopback the kernel copies zero-copy pages on local delivery).
    StagedCopy,
}

/// The memory one direct SENDMSG_ZC hands the kernel: chunk header, iovec
/// list and msghdr. Lives in a vector that is never resized, so its address
/// never changes; rewritten only while its op slot is free (no completion or notification due), so the
/// kernel never sees it change under an operation.
struct DirectOp {
    hdr: [u8; CHUNK_HEADER],
    iov: [libc::iovec; MAX_IOV],
    msg: libc::msghdr,
}

// SAFETY: the raw pointers in `iov`/`msg` point at the op itself and at the
// caller's buffers of the current `send` call; the op is only touched by the
// sink that owns it, which never returns from `send` with one in flight.
unsafe impl Send for DirectOp {}

impl DirectOp {
    fn new() -> Self {
        DirectOp {
            hdr: [0; CHUNK_HEADER],
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_IOV],
            // SAFETY: msghdr is plain data (pointers and integers) for which
            // all-zero is valid: no name, no iovecs, no control data.
            msg: unsafe { std::mem::zeroed() },
        }
    }
}

/// State of one staging buffer (or, in direct mode, one op slot).
#[derive(Clone, Copy, Default)]
struct Stage {
    /// Bytes submitted from it (header + body).
    len: usize,
    /// Its send completion is still due.
    result_due: bool,
    /// Its zero-copy notification is still due.
    notif_due: bool,
}

/// The primary's sending half over io_uring (see the module doc).
pub struct UringSink {
    ring: IoUring,
    /// Keeps the registered fd (fixed file 0) open.
    _sock: TcpStream,
    /// STAGE_BUFS buffers of `stride` bytes, registered as fixed buffer 0.
    stage: Region,
    stride: usize,
    /// One per staging buffer, or per op slot in direct mode (the index is
    /// the user_data of its submissions).
    stages: Vec<Stage>,
    /// DIRECT_OPS op slots (direct mode only; empty otherwise). Allocated
    /// once in `with_mode` and never resized, so no op moves while the
    /// kernel holds pointers into it.
    direct: Vec<DirectOp>,
    free: Vec<usize>,
    /// Entries of the batch being built, in order.
    batch: Vec<(squeue::Entry, usize)>,
    window: CreditWindow,
    credits: Arc<CreditShared>,
    seq: u32,
    /// First fatal error; later calls repeat it.
    failed: Option<String>,
    mode: SendMode,
    /// Notifications reporting the kernel copied instead of sending from
    /// our pages (always the case on loopback).
    pub zc_copied: u64,
    pub zc_notifs: u64,
}

impl UringSink {
    /// `sock` is the session's connection (a clone; the caller keeps reading
    /// the return path through a [`CreditFilter`] sharing `credits`).
    pub fn new(
        sock: TcpStream,
        ann: &Announce,
        credits: Arc<CreditShared>,
    ) -> Result<Self, UringError> {
        let ring = new_ring()?;
        let mut probe = Probe::new();
        let direct_supported = ring.submitter().register_probe(&mut probe).is_ok()
            && probe.is_supported(opcode::SendMsgZc::CODE);
        let stride = (CHUNK_HEADER + ann.slot_size as usize).next_multiple_of(4096);
        let stage = Region::new(stride * STAGE_BUFS, "the send staging buffers")?;
        // SAFETY: the region outlives the ring's use of it: pages of
        // registered buffers are pinned by the kernel until unregistered.
        unsafe { ring.submitter().register_buffers(&[stage.iovec()]) }.map_err(|source| {
            UringError::Register {
                what: "the send staging buffers",
                source,
            }
        })?;
        ring.submitter()
            .register_files(&[sock.as_raw_fd()])
            .map_err(|source| UringError::Register {
                what: "the socket as a fixed file",
                source,
            })?;
        Ok(UringSink {
            ring,
            _sock: sock,
            stage,
            stride,
            stages: Vec::new(),
            direct: Vec::new(),
            free: Vec::new(),
            batch: Vec::new(),
            window: CreditWindow::new(ann),
            credits,
            seq: 0,
            failed: None,
            mode: SendMode::Direct,
            zc_copied: 0,
            zc_notifs: 0,
        }
        .with_mode(if direct_supported {
            SendMode::Direct
        } else {
            SendMode::StagedZc
        }))
    }

    /// Sends with plain IORING_OP_SEND from the staging buffers instead of
    /// zero copy (benchmarks only).
    pub fn without_zero_copy(self) -> Self {
        self.with_mode(SendMode::StagedCopy)
    }

    /// Switches to `mode`; only before the first `send`.
    pub fn with_mode(mut self, mode: SendMode) -> Self {
        assert!(
            self.window.pos() == 0 && self.batch.is_empty(),
            "send mode changed after sending"
        );
        let n = if mode == SendMode::Direct {
            DIRECT_OPS
        } else {
            STAGE_BUFS
        };
        self.mode = mode;
        self.stages = vec![Stage::default(); n];
        self.free = (0..n).rev().collect();
        self.direct = if mode == SendMode::Direct {
            (0..n).map(|_| DirectOp::new()).collect()
        } else {
            Vec::new()
        };
        self
    }

    pub fn mode(&self) -> SendMode {
        self.mode
    }

    fn fail(&mut self, msg: String) -> io::Error {
        self.failed.get_or_insert(msg.clone());
        io::Error::other(msg)
    }

    /// Moves queued credits into the window.
    fn absorb_credits(&mut self) -> io::Result<()> {
        let got: Vec<Credit> = self.credits.m.lock().unwrap().credits.drain(..).collect();
        for c in got {
            if let Err(e) = self.window.on_credit(c) {
                return Err(self.fail(format!("backup sent a bad credit: {e}")));
            }
        }
        Ok(())
    }

    /// Blocks until at least one credit is queued.
    fn wait_credit(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + CREDIT_TIMEOUT;
        let mut g = self.credits.m.lock().unwrap();
        while g.credits.is_empty() {
            if let Some(why) = &g.closed {
                let msg = format!("waiting for receive-slot credits: {why}");
                drop(g);
                return Err(self.fail(msg));
            }
            let now = Instant::now();
            if now >= deadline {
                drop(g);
                return Err(self.fail(format!(
                    "no receive-slot credit from the backup for {} s ({} slots outstanding)",
                    CREDIT_TIMEOUT.as_secs(),
                    self.window.outstanding()
                )));
            }
            g = self.credits.cv.wait_timeout(g, deadline - now).unwrap().0;
        }
        drop(g);
        self.absorb_credits()
    }

    /// Handles every completion in the queue (all of them, so the
    /// bookkeeping of in-flight sends stays exact), then reports the first
    /// failure among them.
    fn reap(&mut self) -> io::Result<()> {
        let cqes: Vec<cqueue::Entry> = self.ring.completion().collect();
        let mut first = None;
        for c in cqes {
            if let Err(e) = self.reap_one(c) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn reap_one(&mut self, c: cqueue::Entry) -> io::Result<()> {
        let op = match self.mode {
            SendMode::Direct => "IORING_OP_SENDMSG_ZC",
            SendMode::StagedZc => "IORING_OP_SEND_ZC from a fixed buffer",
            SendMode::StagedCopy => "IORING_OP_SEND",
        };
        let b = c.user_data() as usize;
        let Some(st) = self.stages.get_mut(b) else {
            return Err(self.fail(format!("io_uring completion for unknown buffer {b}")));
        };
        if cqueue::notif(c.flags()) {
            st.notif_due = false;
            self.zc_notifs += 1;
            // IORING_NOTIF_USAGE_ZC_COPIED is reported in res.
            if c.result() as u32 & (1 << 31) != 0 {
                self.zc_copied += 1;
            }
        } else {
            st.result_due = false;
            st.notif_due = cqueue::more(c.flags());
            let want = st.len;
            let res = c.result();
            if !st.notif_due {
                self.free.push(b);
            }
            if res < 0 {
                let e = io::Error::from_raw_os_error(-res);
                let msg = match -res {
                    libc::EOPNOTSUPP | libc::EINVAL => format!(
                        "{op} failed: {e} (kernel {} may not support zero-copy send on this socket); use --transport tcp",
                        kernel()
                    ),
                    libc::ECANCELED => format!("send cancelled after an earlier send of the batch failed: {e}"),
                    _ => format!("sending to the backup: {e}"),
                };
                return Err(self.fail(msg));
            }
            if res as usize != want {
                return Err(self.fail(format!(
                    "short send ({op}): {res} of {want} bytes (MSG_WAITALL)"
                )));
            }
            return Ok(());
        }
        if !st.result_due && !st.notif_due {
            self.free.push(b);
        }
        Ok(())
    }

    /// Submits the batch as one linked chain and waits for all its send
    /// completions (not for the notifications).
    /// Queues the send `e` of chunk `p` (`len` bytes with its header) from
    /// buffer or op slot `b`: marks its completions due, advances the credit
    /// window and the chunk sequence, and submits once half the ring is
    /// queued.
    fn queue(&mut self, e: squeue::Entry, b: usize, len: usize, p: &Placement) -> io::Result<()> {
        self.stages[b] = Stage {
            len,
            result_due: true,
            notif_due: false,
        };
        self.batch.push((e, b));
        self.window.advance(p);
        self.seq = self.seq.wrapping_add(1);
        if self.batch.len() >= RING_ENTRIES as usize / 2 {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let n = self.batch.len();
        let batch: Vec<squeue::Entry> = self.batch.iter().map(|(e, _)| e.clone()).collect();
        for (i, e) in batch.into_iter().enumerate() {
            let e = if i + 1 < n {
                e.flags(squeue::Flags::IO_LINK)
            } else {
                e
            };
            // SAFETY: a staged entry points into the registered staging
            // region, which stays untouched until its completion and
            // notification. A direct entry points at its DirectOp (in
            // `self.direct`, never resized, not rewritten while its slot is
            // in flight) and
            // at the caller's buffers, which `send_direct` holds borrowed
            // until `drain` has seen every completion and notification.
            if unsafe { self.ring.submission().push(&e) }.is_err() {
                // This entry and the rest never reach the kernel.
                for (_, b) in self.batch.drain(i..) {
                    self.stages[b] = Stage::default();
                    self.free.push(b);
                }
                return Err(self.fail("io_uring submission queue full".into()));
            }
        }
        self.batch.clear();
        loop {
            self.reap()?;
            if !self.stages.iter().any(|s| s.result_due) {
                return Ok(());
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(self.fail(format!("io_uring_enter: {e}"))),
            }
        }
    }

    /// A free staging buffer, waiting for notifications if none is.
    fn take_buffer(&mut self) -> io::Result<usize> {
        loop {
            if let Some(b) = self.free.pop() {
                return Ok(b);
            }
            self.flush()?;
            self.reap()?;
            if let Some(b) = self.free.pop() {
                return Ok(b);
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(self.fail(format!("io_uring_enter: {e}"))),
            }
        }
    }
}

impl UringSink {
    /// Direct mode: every chunk is one SENDMSG_ZC of [its header, the pieces
    /// of `bufs` that make up its body]. Returns only once the kernel is
    /// done with `bufs` (see [`Self::drain`]), error or not.
    fn send_direct(&mut self, bufs: &[&[u8]]) -> io::Result<()> {
        let sent = self.send_direct_chunks(bufs);
        // Entries built but never submitted reference nothing the kernel
        // sees; release their op slots.
        for (_, b) in std::mem::take(&mut self.batch) {
            self.stages[b] = Stage::default();
            self.free.push(b);
        }
        let drained = self.drain();
        sent.and(drained)
    }

    fn send_direct_chunks(&mut self, bufs: &[&[u8]]) -> io::Result<()> {
        let mut left: usize = bufs.iter().map(|b| b.len()).sum();
        let (mut bi, mut bo) = (0usize, 0usize);
        while left > 0 {
            self.absorb_credits()?;
            // Bytes the next MAX_IOV - 1 non-empty pieces hold: a chunk
            // needs one iovec per piece after the header's.
            let mut cap = 0;
            let mut pieces = 0;
            for (i, b) in bufs.iter().enumerate().skip(bi) {
                let n = b.len() - if i == bi { bo } else { 0 };
                if n > 0 {
                    if pieces == MAX_IOV - 1 {
                        break;
                    }
                    cap += n;
                    pieces += 1;
                }
            }
            let Some(p) = self.window.place(left.min(cap)) else {
                // Everything placed so far must be on its way before we
                // wait, or the backup could never free a slot.
                self.flush()?;
                self.wait_credit()?;
                continue;
            };
            let b = self.take_buffer()?;
            let op = &mut self.direct[b];
            op.hdr[0..4].copy_from_slice(&p.tag.encode().to_le_bytes());
            op.hdr[4..8].copy_from_slice(&self.seq.to_le_bytes());
            op.iov[0] = libc::iovec {
                iov_base: op.hdr.as_mut_ptr().cast(),
                iov_len: CHUNK_HEADER,
            };
            let mut n_iov = 1;
            let mut want = p.len;
            while want > 0 {
                let src = &bufs[bi][bo..];
                let k = src.len().min(want);
                if k > 0 {
                    op.iov[n_iov] = libc::iovec {
                        // The kernel only reads through this pointer.
                        iov_base: src.as_ptr().cast_mut().cast(),
                        iov_len: k,
                    };
                    n_iov += 1;
                }
                want -= k;
                bo += k;
                if bo == bufs[bi].len() {
                    bi += 1;
                    bo = 0;
                }
            }
            op.msg.msg_iov = op.iov.as_mut_ptr();
            op.msg.msg_iovlen = n_iov as _;
            let len = CHUNK_HEADER + p.len;
            let e = opcode::SendMsgZc::new(types::Fixed(0), &op.msg)
                .flags(libc::MSG_WAITALL as u32)
                .build()
                .user_data(b as u64);
            self.queue(e, b, len, &p)?;
            left -= p.len;
        }
        self.flush()
    }

    /// Waits until no submitted send has a completion or notification due,
    /// i.e. the kernel no longer reads any memory a send pointed at. If that
    /// takes over [`DRAIN_TIMEOUT`], shuts the socket down (so nothing more
    /// of the caller's buffers goes out) and fails the sink.
    fn drain(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let mut first = None;
        loop {
            if let Err(e) = self.reap() {
                first.get_or_insert(e);
            }
            let due = self
                .stages
                .iter()
                .filter(|s| s.result_due || s.notif_due)
                .count();
            if due == 0 {
                return first.map_or(Ok(()), Err);
            }
            let waited = if Instant::now() >= deadline {
                Err(format!(
                    "{due} zero-copy sends still unfinished after {} s",
                    DRAIN_TIMEOUT.as_secs()
                ))
            } else {
                let ts = types::Timespec::from(Duration::from_millis(100));
                let args = types::SubmitArgs::new().timespec(&ts);
                match self.ring.submitter().submit_with_args(1, &args) {
                    Ok(_) => Ok(()),
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::ETIME)) => Ok(()),
                    Err(e) => Err(format!("io_uring_enter: {e}")),
                }
            };
            if let Err(msg) = waited {
                let _ = self._sock.shutdown(std::net::Shutdown::Both);
                return Err(self.fail(format!("waiting for the kernel to finish sending: {msg}")));
            }
        }
    }
}

impl RecordSink for UringSink {
    fn send(&mut self, bufs: &[&[u8]]) -> io::Result<()> {
        if let Some(m) = &self.failed {
            return Err(io::Error::other(m.clone()));
        }
        if self.mode == SendMode::Direct {
            return self.send_direct(bufs);
        }
        let mut left: usize = bufs.iter().map(|b| b.len()).sum();
        let (mut bi, mut bo) = (0usize, 0usize);
        while left > 0 {
            self.absorb_credits()?;
            let Some(p) = self.window.place(left) else {
                // Everything placed so far must be on its way before we
                // wait, or the backup could never free a slot.
                self.flush()?;
                self.wait_credit()?;
                continue;
            };
            let b = self.take_buffer()?;
            let base = b * self.stride;
            // SAFETY: buffer b is free (no send or notification due), lies
            // inside the staging region, and CHUNK_HEADER + slot <= stride.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(self.stage.ptr.add(base), CHUNK_HEADER + p.len)
            };
            dst[0..4].copy_from_slice(&p.tag.encode().to_le_bytes());
            dst[4..8].copy_from_slice(&self.seq.to_le_bytes());
            let mut at = CHUNK_HEADER;
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
            let len = CHUNK_HEADER + p.len;
            let e = if self.mode == SendMode::StagedCopy {
                opcode::Send::new(types::Fixed(0), dst.as_ptr(), len as u32)
                    .flags(libc::MSG_WAITALL)
                    .build()
                    .user_data(b as u64)
            } else {
                opcode::SendZc::new(types::Fixed(0), dst.as_ptr(), len as u32)
                    .buf_index(Some(0))
                    .flags(libc::MSG_WAITALL)
                    .build()
                    .user_data(b as u64)
            };
            self.queue(e, b, len, &p)?;
            left -= p.len;
        }
        self.flush()
    }
}

impl Drop for UringSink {
    fn drop(&mut self) {
        // Best effort: collect outstanding notifications so the kernel is
        // done with the staging pages before the ring goes (the pages stay
        // pinned by the kernel either way).
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.stages.iter().any(|s| s.notif_due || s.result_due) && Instant::now() < deadline {
            if self.reap().is_err() {
                break;
            }
            let ts = types::Timespec::from(Duration::from_millis(50));
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
        }
    }
}

/// Sends `kind` with `payload` on the shared control writer.
fn send_ctl(w: &Mutex<TcpStream>, kind: RecordKind, epoch: u64, payload: &[u8]) -> io::Result<()> {
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    write_record(&mut v, kind, epoch, payload);
    w.lock().unwrap().write_all(&v)
}

/// The backup's receiving half over io_uring (see the module doc).
pub struct UringSource {
    ring: IoUring,
    sock: TcpStream,
    mem: MirrorRing,
    /// Chunk headers land here (fixed buffer 1).
    hdr: Region,
    state: RingState,
    writer: Arc<Mutex<TcpStream>>,
    /// Bytes of the record handed out last, consumed at the next call.
    pending_consume: usize,
    /// The chunk whose body is arriving: placement and bytes landed.
    in_chunk: Option<(crate::transport::slots::Placement, usize)>,
    seq: u32,
    bytes_read: u64,
    /// Credit once this many slots are consumed (always before blocking).
    credit_batch: u64,
}

impl UringSource {
    /// Sets up the ring for `ann` on `sock`; credits go out on `writer`.
    pub fn new(
        sock: TcpStream,
        ann: &Announce,
        writer: Arc<Mutex<TcpStream>>,
    ) -> Result<Self, UringError> {
        let ring = new_ring()?;
        let mem = MirrorRing::new(ann.ring_len())?;
        let hdr = Region::new(4096, "the chunk header buffer")?;
        let bufs = [
            libc::iovec {
                iov_base: mem.base().cast(),
                iov_len: mem.len(),
            },
            hdr.iovec(),
        ];
        // SAFETY: both regions are owned by the source and outlive the ring
        // (fields drop after `ring`... and pinned pages survive regardless).
        unsafe { ring.submitter().register_buffers(&bufs) }.map_err(|source| {
            UringError::Register {
                what: "the receive ring",
                source,
            }
        })?;
        ring.submitter()
            .register_files(&[sock.as_raw_fd()])
            .map_err(|source| UringError::Register {
                what: "the socket as a fixed file",
                source,
            })?;
        Ok(UringSource {
            ring,
            sock,
            mem,
            hdr,
            state: RingState::new(ann),
            writer,
            pending_consume: 0,
            in_chunk: None,
            seq: 0,
            bytes_read: 0,
            credit_batch: (ann.slots as u64 / 4).max(1),
        })
    }

    /// One READ_FIXED of up to `len` bytes into `ptr` (inside fixed buffer
    /// `idx`); returns bytes read (0 at end of stream).
    fn read_fixed(&mut self, ptr: *mut u8, len: usize, idx: u16) -> io::Result<usize> {
        let e = opcode::ReadFixed::new(types::Fixed(0), ptr, len as u32, idx)
            .offset(u64::MAX)
            .build()
            .user_data(7);
        // SAFETY: ptr..ptr+len lies inside registered buffer `idx` and in a
        // range no reader looks at until it has landed.
        unsafe { self.ring.submission().push(&e) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            let next = self.ring.completion().next();
            if let Some(c) = next {
                let r = c.result();
                if r == -libc::EINTR || r == -libc::EAGAIN {
                    // SAFETY: as above.
                    unsafe { self.ring.submission().push(&e) }
                        .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                    continue;
                }
                if r < 0 {
                    return Err(io::Error::from_raw_os_error(-r));
                }
                return Ok(r as usize);
            }
        }
    }

    fn flush_credits(&mut self) -> Result<(), RecordError> {
        if let Some(c) = self.state.take_credit() {
            send_ctl(&self.writer, RecordKind::Credit, 0, &c.encode())?;
        }
        Ok(())
    }

    /// Receives more bytes into the ring (one header or one body read).
    fn receive(&mut self, at_boundary: bool) -> Result<(), RecordError> {
        self.flush_credits()?;
        let (p, landed) = match self.in_chunk {
            Some(x) => x,
            None => {
                let mut got = 0;
                while got < CHUNK_HEADER {
                    // SAFETY: within the 4096-byte header region.
                    let ptr = unsafe { self.hdr.ptr.add(got) };
                    let n = self.read_fixed(ptr, CHUNK_HEADER - got, 1)?;
                    if n == 0 {
                        return Err(if got == 0 && at_boundary {
                            RecordError::Eof
                        } else {
                            RecordError::Truncated {
                                what: "chunk header",
                                got,
                                want: CHUNK_HEADER,
                            }
                        });
                    }
                    got += n;
                }
                // SAFETY: CHUNK_HEADER bytes just landed in the header region.
                let h = unsafe { std::slice::from_raw_parts(self.hdr.ptr, CHUNK_HEADER) };
                let tag = u32::from_le_bytes(h[0..4].try_into().unwrap());
                let seq = u32::from_le_bytes(h[4..8].try_into().unwrap());
                if seq != self.seq {
                    return Err(SlotError::ChunkSequence {
                        got: seq,
                        want: self.seq,
                    }
                    .into());
                }
                self.seq = self.seq.wrapping_add(1);
                let p = self.state.on_chunk(tag)?;
                debug_assert_eq!(ChunkTag::decode(tag), p.tag);
                (p, 0)
            }
        };
        // SAFETY: the placement was accepted by RingState: inside the first
        // mapping, over bytes the parser has consumed and credited.
        let ptr = unsafe { self.mem.base().add(p.ring_offset + landed) };
        let n = self.read_fixed(ptr, p.len - landed, 0)?;
        if n == 0 {
            return Err(RecordError::Truncated {
                what: "chunk body",
                got: landed,
                want: p.len,
            });
        }
        self.state.on_landed(n);
        self.in_chunk = (landed + n < p.len).then_some((p, landed + n));
        Ok(())
    }
}

impl RecordSource for UringSource {
    fn next_record(&mut self) -> Result<Record<'_>, RecordError> {
        if self.pending_consume > 0 {
            self.state.consume(self.pending_consume);
            self.pending_consume = 0;
            if self.state.creditable() >= self.credit_batch {
                self.flush_credits()?;
            }
        }
        loop {
            if let Some((off, hd, need)) = ready_record(&self.state, &self.mem)? {
                self.pending_consume = need;
                self.bytes_read += need as u64;
                return verify(&hd, self.mem.slice(off, need));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::slots::{DEFAULT_SLOTS, DEFAULT_SLOT_SIZE};
    use std::net::TcpListener;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    fn available() -> bool {
        match probe() {
            Ok(()) => true,
            Err(e) => {
                eprintln!("SKIP: {e}");
                false
            }
        }
    }

    fn payload(i: usize) -> Vec<u8> {
        // Sizes from empty to the 4 MiB limit, so records straddle slots
        // and the ring's end.
        let len = match i % 5 {
            0 => 0,
            1 => 17,
            2 => 300 << 10,
            3 => crate::transport::record::MAX_PAYLOAD,
            _ => 5000 + i,
        };
        (0..len).map(|k| (k * 7 + i) as u8).collect()
    }

    /// Sink and source over a real socket: 60 records (≈ 50 MiB, three times
    /// the ring) arrive intact and in order, which needs credits to flow.
    #[test]
    fn records_cross_the_ring_intact() {
        if !available() {
            return;
        }
        for mode in [SendMode::Direct, SendMode::StagedZc, SendMode::StagedCopy] {
            cross_the_ring(mode);
        }
    }

    fn cross_the_ring(mode: SendMode) {
        let (c, s) = pair();
        let ann = Announce::new(DEFAULT_SLOTS, DEFAULT_SLOT_SIZE).unwrap();
        let n = 60;
        let backup = std::thread::spawn(move || {
            let w = Arc::new(Mutex::new(s.try_clone().unwrap()));
            let mut src = UringSource::new(s, &ann, w).unwrap();
            for i in 0..n {
                let r = src.next_record().unwrap();
                assert_eq!((r.kind, r.epoch), (RecordKind::State, i as u64));
                assert!(r.payload == payload(i), "record {i} differs");
            }
            assert!(matches!(src.next_record(), Err(RecordError::Eof)));
        });
        let credits = Arc::new(CreditShared::default());
        let back = CreditFilter::new(RecordReader::new(c.try_clone().unwrap()), credits.clone());
        let reader = std::thread::spawn(move || {
            let mut r = RecordReader::new(back);
            assert!(matches!(r.next(), Err(RecordError::Eof)));
        });
        let sink = UringSink::new(c.try_clone().unwrap(), &ann, credits).unwrap();
        let mut sink = if sink.mode() == SendMode::Direct {
            sink.with_mode(mode)
        } else {
            eprintln!("SKIP {mode:?}: kernel {} lacks SENDMSG_ZC", kernel());
            sink
        };
        for i in 0..n {
            let mut v = Vec::new();
            write_record(&mut v, RecordKind::State, i as u64, &payload(i));
            if i % 5 == 4 {
                // Hundreds of small pieces: more than one SENDMSG_ZC's
                // iovecs, so chunks are cut at MAX_IOV pieces.
                let pieces: Vec<&[u8]> = v.chunks(7).collect();
                assert!(pieces.len() > 2 * MAX_IOV);
                sink.send(&pieces).unwrap();
            } else {
                // Split across buffers like the primary's head/shards/tail.
                let (a, b) = v.split_at(v.len() / 3);
                sink.send(&[a, &[], b]).unwrap();
            }
            if sink.mode() == SendMode::Direct {
                // The caller's buffers are free again: nothing in flight.
                assert!(sink.stages.iter().all(|s| !s.result_due && !s.notif_due));
                assert_eq!(sink.free.len(), DIRECT_OPS);
                assert_eq!(sink.zc_notifs, sink.seq as u64, "a notification per chunk");
            }
            // Reusing (here: dropping) the buffers now cannot change what
            // the backup receives; it checks every record below.
            drop(v);
        }
        assert!(sink.window.pos() > 3 * ann.ring_len() as u64);
        drop(sink);
        c.shutdown(std::net::Shutdown::Write).unwrap();
        backup.join().unwrap();
        drop(c);
        reader.join().unwrap();
    }

    /// A backup that credits slot 0 twice makes the sink fail with the
    /// duplicate named, instead of writing over a slot in use.
    #[test]
    fn duplicate_credit_fails_the_sink() {
        if !available() {
            return;
        }
        let (c, mut s) = pair();
        let ann = Announce::new(DEFAULT_SLOTS, DEFAULT_SLOT_SIZE).unwrap();
        let credits = Arc::new(CreditShared::default());
        let back = CreditFilter::new(RecordReader::new(c.try_clone().unwrap()), credits.clone());
        let mut sink = UringSink::new(c.try_clone().unwrap(), &ann, credits).unwrap();
        let big = vec![1u8; 2 * DEFAULT_SLOT_SIZE as usize];
        // The backup reads the two chunks: a zero-copy send is finished
        // (notified) only once the bytes left the socket's queues, which on
        // loopback means once the receiver consumed them.
        let want = big.len() + 2 * CHUNK_HEADER;
        let mut sr = s.try_clone().unwrap();
        let rd = std::thread::spawn(move || {
            let mut v = vec![0u8; want];
            sr.read_exact(&mut v).unwrap();
        });
        sink.send(&[&big]).unwrap();
        rd.join().unwrap();
        let mut v = Vec::new();
        for _ in 0..2 {
            write_record(
                &mut v,
                RecordKind::Credit,
                0,
                &Credit { first: 0, count: 1 }.encode(),
            );
        }
        s.write_all(&v).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        // The return path applies both credits, then sees the close.
        let mut r = RecordReader::new(back);
        assert!(matches!(r.next(), Err(RecordError::Eof)));
        let e = sink.send(&[b"x"]).unwrap_err().to_string();
        assert!(e.contains("repeats slots already credited"), "{e}");
    }
}
