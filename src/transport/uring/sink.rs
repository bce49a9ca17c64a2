//! The primary's half of the `uring` transport (see the module doc of
//! [`crate::transport::uring`]): the record stream cut into sends of at
//! most [`SEND_MAX`] bytes, each one SENDMSG(_ZC) straight from the
//! caller's buffers (or from registered staging buffers). TCP's own flow
//! control paces the sends: no credit round trip through the primary's
//! threads.
//!
//! Ownership hand-off: [`RecordSink::send_lent`] takes the caller's
//! buffers ([`Lent`]) and returns once every chunk is on the socket (each
//! send completed), not when the kernel is done reading them: the buffers
//! stay with the sink ([`super::loans`]) until the last zero-copy
//! notification of that send arrives, and are given back then, from
//! whichever later call reaps it ([`RecordSink::reclaim`] between sends).
//! So the sender prepares and sends its next unit while the backup is
//! still reading this one. [`RecordSink::send`] (borrowed buffers) still
//! waits for its own notifications.
//!
//! Zero copy or copy, per chunk ([`SendMode::Auto`], the default): a chunk
//! of at least [`ZC_MIN`] bytes goes as SENDMSG_ZC, a smaller one as plain
//! SENDMSG (pinning pages and a notification cost more than copying a few
//! KiB), and once the kernel reports [`COPIED_SWITCH`] notifications in a
//! row that it copied the pages anyway (`IORING_NOTIF_USAGE_ZC_COPIED`:
//! local delivery, as on loopback or veth, where the receiving socket must
//! not hold the sender's pages) every later chunk goes as plain SENDMSG.
//!
//! Deadlines: every wait (a send's completion, a notification freeing a
//! buffer) is a bounded `io_uring_enter` of at most
//! [`WAIT_SLICE`], and fails once the kernel reported nothing for the
//! sink's deadline: the socket's write timeout (SO_SNDTIMEO, which a
//! protection session sets to `--backup-timeout`), else
//! [`DEFAULT_DEADLINE`]. A session's failure shuts the socket down, which
//! completes every pending send at once.
//!
//! Buffer lifetime: the kernel may read a zero-copy send's memory until its
//! notification. On any failure the sink tears the connection down for
//! good ([`UringSink::purge`]: the kernel drops what it still queues, and
//! the notifications come), then waits for them, bounded by
//! [`PURGE_WAIT`]. Heap memory the kernel still holds after that (the
//! caller's buffers, the op slots' iovecs) is leaked with a warning, never
//! freed: freed heap is reused, and the kernel would send its new contents.

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};

use super::loans::Loans;
use super::{kernel, new_ring, Region, UringError, RING_ENTRIES};
use crate::transport::link::{FailureReport, Lent, RecordSink};
use crate::transport::ring::Chunker;

/// Staging buffers of the sink (each holds one send of [`SEND_MAX`]).
const STAGE_BUFS: usize = 8;
/// Bytes of one send at most: a linked chain of [`DIRECT_OPS`] such sends
/// is what one `io_uring_enter` hands the kernel.
pub const SEND_MAX: usize = 1 << 20;
/// SENDMSG_ZC operations the direct mode keeps in flight at most (one
/// batch: each yields two completions, so the completion queue of
/// `2 * RING_ENTRIES` never overflows).
pub(super) const DIRECT_OPS: usize = RING_ENTRIES as usize / 2;
/// iovecs of one SENDMSG(_ZC); a send is cut short rather than span more
/// pieces (well under the kernel's UIO_MAXIOV).
pub(super) const MAX_IOV: usize = 64;
/// The sink's deadline when its socket has no write timeout: it fails
/// when the kernel completes nothing for this long.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);
/// The longest single wait in `io_uring_enter`.
const WAIT_SLICE: Duration = Duration::from_millis(100);
/// Smallest chunk [`SendMode::Auto`] sends with zero copy (see
/// docs/throughput.md, "io_uring ownership hand-off", for the measurement).
pub const ZC_MIN: usize = 128 << 10;
/// Notifications in a row reporting a copy after which
/// [`SendMode::Auto`] stops asking for zero copy.
pub const COPIED_SWITCH: u32 = 8;
/// `IORING_SEND_ZC_REPORT_USAGE` (in a zero-copy send's ioprio, Linux
/// 6.2): the notification's result says whether the kernel copied.
const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED`: the notification's result bit set when
/// the kernel copied the pages after all.
const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;
/// How long a torn-down sink waits for the notifications of what the kernel
/// dropped before it gives up on them (and leaks the memory they name).
const PURGE_WAIT: Duration = Duration::from_secs(2);

/// How [`UringSink`] puts chunks (sends of at most [`SEND_MAX`] bytes) on
/// the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendMode {
    /// From the caller's buffers, zero copy where it pays (see the module
    /// doc; the default on kernels with SENDMSG_ZC, 6.1 on).
    Auto,
    /// `IORING_OP_SENDMSG_ZC` straight from the caller's buffers, always.
    Direct,
    /// Plain `IORING_OP_SENDMSG` from the caller's buffers, always.
    DirectCopy,
    /// Copy into the registered staging buffers, `IORING_OP_SEND_ZC` from
    /// there (the default on kernels without SENDMSG_ZC, before 6.1).
    StagedZc,
    /// Copy into the staging buffers, plain `IORING_OP_SEND` (benchmarks:
    /// on loopback the kernel copies zero-copy pages on local delivery).
    StagedCopy,
}

/// The memory one direct SENDMSG(_ZC) hands the kernel besides the
/// caller's buffers: iovec list and msghdr. Lives in a vector that is never resized, so its address
/// never changes; rewritten only while its op slot is free (no completion or notification due), so the
/// kernel never sees it change under an operation.
struct DirectOp {
    iov: [libc::iovec; MAX_IOV],
    msg: libc::msghdr,
}

// SAFETY: the raw pointers in `iov`/`msg` point at the op itself and at the
// caller's buffers (borrowed for the call, or lent and held in `loans`);
// the op is only touched by the sink that owns it.
unsafe impl Send for DirectOp {}

impl DirectOp {
    fn new() -> Self {
        DirectOp {
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

impl SendMode {
    /// Sends from the caller's buffers (through op slots), not staging.
    pub fn is_direct(self) -> bool {
        matches!(
            self,
            SendMode::Auto | SendMode::Direct | SendMode::DirectCopy
        )
    }
}

/// State of one staging buffer (or, in direct mode, one op slot).
#[derive(Clone, Copy, Default)]
pub(super) struct Stage {
    /// Bytes submitted from it.
    len: usize,
    /// The loan id ([`Loans`]) its operation counts under (0: none).
    loan: u64,
    /// Its send completion is still due.
    pub(super) result_due: bool,
    /// Its zero-copy notification is still due.
    pub(super) notif_due: bool,
}

/// The primary's sending half over io_uring (see the module doc).
pub struct UringSink {
    ring: IoUring,
    /// Keeps the registered fd (fixed file 0) open.
    _sock: TcpStream,
    /// STAGE_BUFS buffers of [`SEND_MAX`] bytes, registered as fixed
    /// buffer 0.
    stage: Region,
    /// One per staging buffer, or per op slot in direct mode (the index is
    /// the user_data of its submissions).
    pub(super) stages: Vec<Stage>,
    /// DIRECT_OPS op slots (direct mode only; empty otherwise). Allocated
    /// once in `with_mode` and never resized, so no op moves while the
    /// kernel holds pointers into it.
    direct: Vec<DirectOp>,
    pub(super) free: Vec<usize>,
    /// Entries of the batch being built, in order.
    batch: Vec<(squeue::Entry, usize)>,
    /// Bytes handed to the kernel so far, and in how many sends.
    pub(super) sent: u64,
    pub(super) ops: u64,
    /// First fatal error; later calls repeat it.
    failed: Option<String>,
    /// When the kernel last took a submission or reported a completion:
    /// the deadline counts from here.
    progress: Instant,
    /// The connection was torn down for good ([`Self::purge`]).
    purged: bool,
    /// Sends whose memory the kernel may still read outlived the purge:
    /// their memory is never freed.
    kept: bool,
    /// Told the first fatal error, before the teardown.
    report: Option<FailureReport>,
    mode: SendMode,
    /// Memory lent by callers while its sends are due.
    pub(super) loans: Loans,
    /// [`SendMode::Auto`] stopped using zero copy (the kernel copies).
    zc_off: bool,
    /// Notifications in a row that reported a copy.
    copied_run: u32,
    /// The kernel reports copies (IORING_SEND_ZC_REPORT_USAGE, 6.2 on).
    report_usage: bool,
    /// Chunks sent by plain SENDMSG in a direct mode.
    pub copy_sends: u64,
    /// Notifications reporting the kernel copied instead of sending from
    /// our pages (always the case on loopback).
    pub zc_copied: u64,
    pub zc_notifs: u64,
}

impl UringSink {
    /// `sock` is the session's connection (a clone; the caller keeps reading
    /// the return path from it).
    pub fn new(sock: TcpStream) -> Result<Self, UringError> {
        let ring = new_ring()?;
        let mut probe = Probe::new();
        let direct_supported = ring.submitter().register_probe(&mut probe).is_ok()
            && probe.is_supported(opcode::SendMsgZc::CODE);
        let stage = Region::new(SEND_MAX * STAGE_BUFS, "the send staging buffers")?;
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
            stages: Vec::new(),
            direct: Vec::new(),
            free: Vec::new(),
            batch: Vec::new(),
            sent: 0,
            ops: 0,
            failed: None,
            progress: Instant::now(),
            purged: false,
            kept: false,
            report: None,
            mode: SendMode::Direct,
            loans: Loans::default(),
            zc_off: false,
            copied_run: 0,
            report_usage: kernel_at_least(6, 2),
            copy_sends: 0,
            zc_copied: 0,
            zc_notifs: 0,
        }
        .with_mode(if direct_supported {
            SendMode::Auto
        } else {
            SendMode::StagedZc
        }))
    }

    /// Switches to `mode`; only before the first `send`.
    pub fn with_mode(mut self, mode: SendMode) -> Self {
        assert!(
            self.sent == 0 && self.batch.is_empty(),
            "send mode changed after sending"
        );
        let n = if mode.is_direct() {
            DIRECT_OPS
        } else {
            STAGE_BUFS
        };
        self.mode = mode;
        self.stages = vec![Stage::default(); n];
        self.free = (0..n).rev().collect();
        self.direct = if mode.is_direct() {
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
        if self.failed.is_none() {
            if let Some(r) = &self.report {
                r(&msg);
            }
        }
        self.failed.get_or_insert(msg.clone());
        io::Error::other(msg)
    }

    /// The sink's deadline: the socket's write timeout, else
    /// [`DEFAULT_DEADLINE`].
    fn deadline(&self) -> Duration {
        self._sock
            .write_timeout()
            .ok()
            .flatten()
            .unwrap_or(DEFAULT_DEADLINE)
    }

    /// Waits at most [`WAIT_SLICE`] for a completion; fails once the kernel
    /// has reported nothing for the deadline (`what`: what is awaited).
    pub(super) fn wait_cqe(&mut self, what: &str) -> io::Result<()> {
        let limit = self.deadline();
        if self.progress.elapsed() >= limit {
            return Err(self.fail(format!(
                "no {what} for {} ms (the deadline, --backup-timeout): \
                 the link is partitioned or the backup stopped reading",
                limit.as_millis()
            )));
        }
        let ts = types::Timespec::from(WAIT_SLICE);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::ETIME)) => Ok(()),
            Err(e) => Err(self.fail(format!("io_uring_enter: {e}"))),
        }
    }

    /// Handles every completion in the queue (all of them, so the
    /// bookkeeping of in-flight sends stays exact), then reports the first
    /// failure among them.
    fn reap(&mut self) -> io::Result<()> {
        let cqes: Vec<cqueue::Entry> = self.ring.completion().collect();
        if !cqes.is_empty() {
            self.progress = Instant::now();
        }
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
            SendMode::Auto => "IORING_OP_SENDMSG(_ZC)",
            SendMode::Direct => "IORING_OP_SENDMSG_ZC",
            SendMode::DirectCopy => "IORING_OP_SENDMSG",
            SendMode::StagedZc => "IORING_OP_SEND_ZC from a fixed buffer",
            SendMode::StagedCopy => "IORING_OP_SEND",
        };
        let b = c.user_data() as usize;
        let Some(st) = self.stages.get_mut(b) else {
            return Err(self.fail(format!("io_uring completion for unknown buffer {b}")));
        };
        if cqueue::notif(c.flags()) {
            st.notif_due = false;
            let over = !st.result_due;
            self.on_notif(c.result());
            if over {
                self.release(b);
            }
        } else {
            st.result_due = false;
            st.notif_due = cqueue::more(c.flags());
            let want = st.len;
            let res = c.result();
            if !st.notif_due {
                self.release(b);
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
        }
        Ok(())
    }

    /// Counts a zero-copy notification; in [`SendMode::Auto`], stops zero
    /// copy once [`COPIED_SWITCH`] in a row report that the kernel copied.
    fn on_notif(&mut self, res: i32) {
        self.zc_notifs += 1;
        if res as u32 & NOTIF_USAGE_ZC_COPIED == 0 {
            self.copied_run = 0;
            return;
        }
        self.zc_copied += 1;
        self.copied_run += 1;
        if self.mode == SendMode::Auto && !self.zc_off && self.copied_run >= COPIED_SWITCH {
            self.zc_off = true;
            tracing::info!(
                "uring: the kernel copied {COPIED_SWITCH} zero-copy sends in a row \
                 (local delivery); sending by copy from now on"
            );
        }
    }

    /// Op slot or staging buffer `b` is over (completion and notification
    /// in, or never submitted): free again, and its loan one op closer to
    /// being given back.
    fn release(&mut self, b: usize) {
        let st = std::mem::take(&mut self.stages[b]);
        self.free.push(b);
        if st.loan != 0 {
            self.loans.op_done(st.loan);
        }
    }

    /// Queues the send `e` of `len` bytes from buffer or op slot `b`: marks
    /// its completions due and submits once half the ring is queued.
    fn queue(&mut self, e: squeue::Entry, (b, loan): (usize, u64), len: usize) -> io::Result<()> {
        self.stages[b] = Stage {
            len,
            loan,
            result_due: true,
            notif_due: false,
        };
        self.loans.op_started(loan);
        self.batch.push((e, b));
        self.sent += len as u64;
        self.ops += 1;
        if self.batch.len() >= RING_ENTRIES as usize / 2 {
            self.flush()?;
        }
        Ok(())
    }

    /// Submits the batch as one linked chain and waits for all its send
    /// completions (not for the notifications).
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
            // in flight) and at the caller's buffers: borrowed ones
            // (`send`) stay borrowed until `wait_loan` saw every completion
            // and notification of the call, lent ones stay in `loans`
            // until then.
            if unsafe { self.ring.submission().push(&e) }.is_err() {
                // This entry and the rest never reach the kernel.
                for (_, b) in std::mem::take(&mut self.batch).drain(i..) {
                    self.release(b);
                }
                return Err(self.fail("io_uring submission queue full".into()));
            }
        }
        self.batch.clear();
        self.progress = Instant::now();
        loop {
            self.reap()?;
            if !self.stages.iter().any(|s| s.result_due) {
                return Ok(());
            }
            self.wait_cqe("send completion")?;
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
            self.wait_cqe("zero-copy notification freeing a send buffer")?;
        }
    }

    /// Sends with a completion or notification still due.
    fn due(&self) -> usize {
        self.stages
            .iter()
            .filter(|s| s.result_due || s.notif_due)
            .count()
    }

    /// Tears the connection down for good, so the kernel stops reading our
    /// memory: shut down both ways (pending sends complete with an error),
    /// then `connect(AF_UNSPEC)`, the kernel's `tcp_disconnect`: it purges
    /// the socket's write queue (and resets the peer), and each freed
    /// packet delivers its zero-copy notification. Only for a failed sink.
    fn purge(&mut self) {
        if self.purged {
            return;
        }
        self.purged = true;
        let _ = self._sock.shutdown(std::net::Shutdown::Both);
        // SAFETY: sockaddr is plain data; all-zero with AF_UNSPEC is the
        // "dissolve the association" address connect(2) documents.
        let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
        sa.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        // EBUSY (Linux >= 6.6): another thread still sits in a blocking call
        // on the socket; the shutdown has woken it and it is leaving.
        for _ in 0..100 {
            // SAFETY: a valid socket fd and a sockaddr of the given length.
            let rc = unsafe {
                libc::connect(
                    self._sock.as_raw_fd(),
                    &sa,
                    std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
                )
            };
            let e = io::Error::last_os_error();
            if rc == 0 || e.raw_os_error() != Some(libc::EBUSY) {
                if rc != 0 {
                    tracing::debug!("disconnecting the failed uring sink's socket: {e}");
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!("the failed uring sink's socket stayed busy; not disconnected");
    }

    /// After a failure: tears the connection down and waits (at most
    /// [`PURGE_WAIT`]) until the kernel is done with every send. Returns
    /// whether it is; when not, [`Self::kept`] is set.
    fn settle(&mut self) -> bool {
        self.purge();
        let until = Instant::now() + PURGE_WAIT;
        while self.due() > 0 && Instant::now() < until {
            let _ = self.reap();
            let ts = types::Timespec::from(Duration::from_millis(20));
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
        }
        let _ = self.reap();
        let left = self.due();
        self.kept = left > 0;
        if left > 0 {
            let lent = self.loans.leak_held();
            tracing::warn!(
                "{left} zero-copy sends still unfinished {} ms after the connection was torn down; \
                 their memory ({lent} lent sends and the op slots) is leaked, never reused",
                PURGE_WAIT.as_millis()
            );
        }
        left == 0
    }
}

impl UringSink {
    /// Direct modes, borrowed buffers: every chunk (at most [`SEND_MAX`]
    /// bytes and [`MAX_IOV`] pieces) is one SENDMSG(_ZC) of the pieces of
    /// `bufs` it spans. Returns
    /// only once the kernel is done with `bufs`, error or not (on an error
    /// after [`Self::settle`]; what the kernel still holds then is
    /// reported by [`RecordSink::kernel_kept_buffers`]).
    fn send_direct(&mut self, bufs: &[&[u8]]) -> io::Result<()> {
        let id = self.loans.open();
        let r = self.send_direct_chunks(bufs, id);
        self.unqueue();
        let r = r.and_then(|()| self.wait_loan(id));
        if r.is_err() {
            self.settle();
        }
        r
    }

    /// Direct modes, lent buffers: like [`Self::send_direct`], but returns
    /// once every chunk's send completed; `lent` stays in [`Self::loans`]
    /// until the kernel is done with it.
    fn send_lent_direct(&mut self, lent: Box<dyn Lent>) -> io::Result<()> {
        let id = self.loans.open();
        let r = {
            let pieces = lent.pieces();
            self.send_direct_chunks(&pieces, id)
        };
        self.unqueue();
        // The box moves, its contents (which the sends point at) do not.
        self.loans.hold(id, lent);
        if r.is_err() {
            self.settle();
        }
        r
    }

    /// Releases the op slots of entries built but never submitted (they
    /// reference nothing the kernel sees).
    fn unqueue(&mut self) {
        for (_, b) in std::mem::take(&mut self.batch) {
            self.release(b);
        }
    }

    fn send_direct_chunks(&mut self, bufs: &[&[u8]], loan: u64) -> io::Result<()> {
        let mut chunks = Chunker::new(bufs);
        while chunks.left() > 0 {
            let len = chunks.left().min(chunks.span(MAX_IOV)).min(SEND_MAX);
            let b = self.take_buffer()?;
            let zero_copy = match self.mode {
                SendMode::Direct => true,
                SendMode::Auto => !self.zc_off && len >= ZC_MIN,
                _ => false,
            };
            let op = &mut self.direct[b];
            let mut n_iov = 0;
            chunks.take(len, |src| {
                op.iov[n_iov] = libc::iovec {
                    // The kernel only reads through this pointer.
                    iov_base: src.as_ptr().cast_mut().cast(),
                    iov_len: src.len(),
                };
                n_iov += 1;
            });
            op.msg.msg_iov = op.iov.as_mut_ptr();
            op.msg.msg_iovlen = n_iov as _;
            let e = if zero_copy {
                let usage = if self.report_usage {
                    SEND_ZC_REPORT_USAGE
                } else {
                    0
                };
                opcode::SendMsgZc::new(types::Fixed(0), &op.msg)
                    .ioprio(usage)
                    .flags(libc::MSG_WAITALL as u32)
                    .build()
            } else {
                self.copy_sends += 1;
                opcode::SendMsg::new(types::Fixed(0), &op.msg)
                    .flags(libc::MSG_WAITALL as u32)
                    .build()
            };
            self.queue(e.user_data(b as u64), (b, loan), len)?;
        }
        self.flush()
    }

    /// Waits until no operation of loan `id` is due (the kernel no longer
    /// reads the memory of that send), at most the deadline without
    /// progress.
    fn wait_loan(&mut self, id: u64) -> io::Result<()> {
        loop {
            self.reap()?;
            if self.loans.is_done(id) {
                return Ok(());
            }
            if let Some(m) = &self.failed {
                return Err(io::Error::other(m.clone()));
            }
            self.wait_cqe("zero-copy notification")?;
        }
    }
}

impl RecordSink for UringSink {
    fn send(&mut self, bufs: &[&[u8]]) -> io::Result<()> {
        if let Some(m) = &self.failed {
            return Err(io::Error::other(m.clone()));
        }
        if self.mode.is_direct() {
            self.send_direct(bufs)
        } else {
            self.send_staged(bufs)
        }
    }

    fn send_lent(&mut self, lent: Box<dyn Lent>) -> io::Result<()> {
        if let Some(m) = &self.failed {
            // Nothing of it reached the kernel.
            lent.give_back();
            return Err(io::Error::other(m.clone()));
        }
        if self.mode.is_direct() {
            self.send_lent_direct(lent)
        } else {
            // Staged: copied into the staging buffers, free at return.
            let r = self.send_staged(&lent.pieces());
            lent.give_back();
            r
        }
    }

    fn reclaim(&mut self) {
        // Errors are recorded in `failed` and reported by the next send.
        let _ = self.reap();
    }

    fn connection(&self) -> Option<TcpStream> {
        self._sock.try_clone().ok()
    }

    fn kernel_kept_buffers(&self) -> bool {
        self.kept && self.mode.is_direct()
    }

    fn on_failure(&mut self, report: FailureReport) {
        self.report = Some(report);
    }
}

impl UringSink {
    /// Staged modes: every send of up to [`SEND_MAX`] bytes is copied into
    /// a free staging buffer and sent from there.
    fn send_staged(&mut self, bufs: &[&[u8]]) -> io::Result<()> {
        let loan = self.loans.open();
        let mut chunks = Chunker::new(bufs);
        while chunks.left() > 0 {
            let len = chunks.left().min(SEND_MAX);
            let b = self.take_buffer()?;
            // SAFETY: buffer b is free (no send or notification due) and
            // lies inside the staging region of STAGE_BUFS * SEND_MAX bytes.
            let dst =
                unsafe { std::slice::from_raw_parts_mut(self.stage.ptr.add(b * SEND_MAX), len) };
            chunks.copy_into(dst);
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
            self.queue(e, (b, loan), len)?;
        }
        self.flush()
    }
}

/// Whether the running kernel is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let k = kernel();
    let mut it = k.split(|c: char| !c.is_ascii_digit());
    let num = |s: Option<&str>| s.and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
    (num(it.next()), num(it.next())) >= (major, minor)
}

impl Drop for UringSink {
    /// Collects outstanding notifications (and gives lent memory back)
    /// before the memory goes. A healthy sink's last sends (the Close) are
    /// acknowledged by the backup within [`PURGE_WAIT`]; a failed one is
    /// torn down first. Whatever the kernel still holds then: the staging
    /// region is a mapping of its own whose pinned pages the kernel keeps
    /// and nobody else gets, so it is unmapped; the op slots (iovecs
    /// the kernel was given) and lent memory are leaked.
    fn drop(&mut self) {
        if self.failed.is_some() {
            self.settle();
        } else {
            let until = Instant::now() + PURGE_WAIT;
            while self.due() > 0 && Instant::now() < until {
                if self.reap().is_err() {
                    break;
                }
                let ts = types::Timespec::from(Duration::from_millis(20));
                let args = types::SubmitArgs::new().timespec(&ts);
                let _ = self.ring.submitter().submit_with_args(1, &args);
            }
            if self.due() > 0 {
                self.settle();
            }
        }
        if self.kept {
            std::mem::forget(std::mem::take(&mut self.direct));
        }
    }
}
