//! The primary's epoch write log.
//!
//! Remus's disk model: a guest write is applied to the primary's image at
//! once and completed to the guest; it is tagged with the epoch running and
//! queued for that epoch's checkpoint, which carries it to the backup. The
//! epoch driver cuts the log inside the pause ([`WriteLog::cut`]), so a
//! write belongs to exactly one epoch. An epoch's writes are appended in
//! wire order to the records that will carry them ([`EpochOps`]): no
//! allocation per write, nothing to lay out at the send; a range rewritten
//! whole within an epoch travels once, with its last bytes.
//!
//! Invariants:
//! - Applying a write to the image and appending it to the epoch's records
//!   happen under one lock, so the records hold the writes in the order
//!   they reached the image (the last of two overlapping writes wins on
//!   the backup as it did here) and a cut never splits a write.
//! - The fencing gate is checked under that same lock: once the gate closes
//!   no write, queued or new, reaches the image or the log.
//! - The queue is bounded ([`LogConfig::max_queued`]); a writer that finds
//!   it full waits for the next cut (backpressure on the guest, like an
//!   extended epoch), never grows it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::fence::Fence;
use super::image::{DiskImage, ImageError};
use super::pool;
pub use super::records::EpochOps;
use super::wire::MAX_OP_DATA;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("disk {path}: this copy is fenced (it no longer holds the arbiter); write refused")]
    Fenced { path: String },
    #[error("disk {path}: {queued} bytes of writes wait for a checkpoint for over {waited:?}; write refused")]
    Backlog {
        path: String,
        queued: usize,
        waited: Duration,
    },
    #[error(transparent)]
    Image(#[from] ImageError),
}

#[derive(Debug, Clone, Copy)]
pub struct LogConfig {
    /// Bytes of queued writes (data plus op headers, after coalescing)
    /// above which writers wait for the next cut.
    pub max_queued: usize,
    /// Longest a writer waits for room before its write fails.
    pub max_wait: Duration,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            max_queued: 256 << 20,
            max_wait: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    recording: bool,
    /// The ops of the epoch a writer last found running (`set.epoch`).
    set: EpochOps,
    /// Ops of earlier epochs, not collected yet (oldest first; at most
    /// one while the epoch driver collects every epoch it marks).
    done: Vec<EpochOps>,
}

impl Inner {
    /// Bytes queued for the backup.
    fn queued(&self) -> usize {
        self.set.bytes() + self.done.iter().map(EpochOps::bytes).sum::<usize>()
    }
}

/// An image plus the log of its writes per epoch. Shared by every NBD
/// connection (or the kvm block device) and the epoch driver.
///
/// The epoch boundary is an atomic ([`WriteLog::mark`]), read by each
/// writer under the lock *after* its write reached the image: the pause
/// never takes the lock a writer holds across its `pwrite` (which can
/// block in the kernel: writeback, the file system's journal, the
/// allocator's `mmap_lock`). A write completed before the mark is in
/// that epoch or an earlier one; a write in flight across it lands in
/// either (the guest had no completion yet); writes reach the log in the
/// order they reached the image, epochs included. [`WriteLog::collect`]
/// takes an ended epoch's ops, outside the pause.
#[derive(Debug)]
pub struct WriteLog {
    image: DiskImage,
    fence: Arc<Fence>,
    cfg: LogConfig,
    inner: Mutex<Inner>,
    room: Condvar,
    /// The running epoch.
    running: AtomicU64,
}

impl WriteLog {
    /// A log that is not recording yet: writes only reach the image.
    pub fn new(image: DiskImage, fence: Arc<Fence>, cfg: LogConfig) -> WriteLog {
        WriteLog {
            image,
            fence,
            cfg,
            inner: Mutex::new(Inner::default()),
            room: Condvar::new(),
            running: AtomicU64::new(0),
        }
    }

    pub fn image(&self) -> &DiskImage {
        &self.image
    }

    pub fn size(&self) -> u64 {
        self.image.size()
    }

    pub fn fence(&self) -> &Arc<Fence> {
        &self.fence
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A writer that panicked left the queue consistent (pushes are
        // single calls); keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts tagging writes with `epoch` and queueing them.
    pub fn start_recording(&self, epoch: u64) {
        let mut g = self.lock();
        g.recording = true;
        self.running.store(epoch, Ordering::SeqCst);
        g.set = EpochOps::new(epoch);
        g.done.clear();
    }

    /// Stops queueing; returns what was queued and not yet collected.
    pub fn stop_recording(&self) -> EpochOps {
        let mut g = self.lock();
        g.recording = false;
        let running = self.running.load(Ordering::SeqCst);
        let out = take_upto(&mut g, running, running);
        self.room.notify_all();
        out
    }

    /// Ends the running epoch: later writes are tagged `next`. Never
    /// blocks (an atomic store): the epoch driver calls it inside the
    /// pause, then [`Self::collect`]s the ended epoch after it.
    pub fn mark(&self, next: u64) {
        self.running.store(next, Ordering::SeqCst);
    }

    /// The ops of every epoch up to `epoch` not collected yet (ended by
    /// [`Self::mark`]), in order, as one epoch's. Takes the lock: waits
    /// for a write being applied.
    pub fn collect(&self, epoch: u64) -> EpochOps {
        let mut g = self.lock();
        let running = self.running.load(Ordering::SeqCst);
        let out = take_upto(&mut g, epoch, running);
        self.room.notify_all();
        out
    }

    /// [`Self::mark`] then [`Self::collect`] of the epoch before `next`.
    pub fn cut(&self, next: u64) -> EpochOps {
        self.mark(next);
        self.collect(next.saturating_sub(1))
    }

    /// The running epoch's ops, for a writer holding the lock.
    fn current<'g>(&self, g: &'g mut Inner) -> &'g mut EpochOps {
        let running = self.running.load(Ordering::SeqCst);
        if g.set.epoch != running {
            let ended = std::mem::replace(&mut g.set, EpochOps::new(running));
            if !ended.is_empty() {
                g.done.push(ended);
            }
        }
        &mut g.set
    }

    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), LogError> {
        Ok(self.image.read_at(buf, offset)?)
    }

    /// Applies a write and queues it; `fua` also makes it durable here and
    /// marks its epoch as needing a flush on the backup.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), LogError> {
        self.image.check(offset, data.len() as u64)?;
        let mut g = self.admit(data.len())?;
        self.image.write_at(data, offset)?;
        if g.recording {
            let set = self.current(&mut g);
            for (i, chunk) in data.chunks(MAX_OP_DATA).enumerate() {
                set.write(offset + (i * MAX_OP_DATA) as u64, chunk);
            }
            if fua {
                set.flush();
            }
        }
        drop(g);
        if fua {
            self.image.sync()?;
        }
        Ok(())
    }

    /// [`Self::write`] of `buf`'s bytes, taking `buf` itself into the log
    /// when it is one op's worth (`pool::MIN_POOLED..=MAX_OP_DATA` bytes)
    /// and the log is recording, instead of copying it: `buf` is then left
    /// empty. Smaller writes are copied (cheaper than a buffer per write).
    pub fn write_vec(&self, offset: u64, buf: &mut Vec<u8>, fua: bool) -> Result<(), LogError> {
        if !(pool::MIN_POOLED..=MAX_OP_DATA).contains(&buf.len()) {
            return self.write(offset, buf, fua);
        }
        self.image.check(offset, buf.len() as u64)?;
        let mut g = self.admit(buf.len())?;
        self.image.write_at(buf, offset)?;
        if g.recording {
            let set = self.current(&mut g);
            set.write_owned(offset, std::mem::take(buf));
            if fua {
                set.flush();
            }
        }
        drop(g);
        if fua {
            self.image.sync()?;
        }
        Ok(())
    }

    /// Makes a range read as zeros (`trim` only changes the logged kind).
    pub fn zero(&self, offset: u64, len: u32, trim: bool, fua: bool) -> Result<(), LogError> {
        self.image.check(offset, len as u64)?;
        let mut g = self.admit(0)?;
        self.image.zero(offset, len as u64)?;
        if g.recording {
            let set = self.current(&mut g);
            set.zero(offset, len, trim);
            if fua {
                set.flush();
            }
        }
        drop(g);
        if fua {
            self.image.sync()?;
        }
        Ok(())
    }

    /// Makes every completed write durable here, and marks the running
    /// epoch as needing a flush on the backup.
    pub fn flush(&self) -> Result<(), LogError> {
        let mut g = self.admit(0)?;
        if g.recording {
            self.current(&mut g).flush();
        }
        drop(g);
        Ok(self.image.sync()?)
    }

    /// Takes the lock once the gate allows writes and the queue has room
    /// for `len` more bytes.
    fn admit(&self, len: usize) -> Result<MutexGuard<'_, Inner>, LogError> {
        let start = Instant::now();
        let mut g = self.lock();
        loop {
            if !self.fence.allows_writes() {
                return Err(LogError::Fenced {
                    path: self.image.path().display().to_string(),
                });
            }
            let queued = g.queued();
            if !g.recording || queued == 0 || queued + len <= self.cfg.max_queued {
                return Ok(g);
            }
            let waited = start.elapsed();
            if waited >= self.cfg.max_wait {
                return Err(LogError::Backlog {
                    path: self.image.path().display().to_string(),
                    queued,
                    waited,
                });
            }
            let slice = (self.cfg.max_wait - waited).min(Duration::from_millis(50));
            g = self
                .room
                .wait_timeout(g, slice)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Takes the ops of every epoch up to `epoch` (the running one is
/// `running`), merged in order and closed.
fn take_upto(g: &mut Inner, epoch: u64, running: u64) -> EpochOps {
    if g.set.epoch <= epoch {
        let ended = std::mem::replace(&mut g.set, EpochOps::new(running.max(epoch + 1)));
        g.done.push(ended);
    }
    let n = g.done.iter().take_while(|e| e.epoch <= epoch).count();
    let mut out = EpochOps::new(epoch);
    for e in g.done.drain(..n) {
        out.absorb(e);
    }
    out.close();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::wire::{DiskOp, OP_HEADER};

    fn log(size: u64, cfg: LogConfig) -> (tempfile::TempDir, WriteLog) {
        let dir = tempfile::tempdir().unwrap();
        let img = DiskImage::create(&dir.path().join("p.img"), size).unwrap();
        (dir, WriteLog::new(img, Arc::new(Fence::open()), cfg))
    }

    #[test]
    fn writes_are_applied_at_once_and_tagged_with_the_running_epoch() {
        let (_d, l) = log(1 << 20, LogConfig::default());
        l.write(0, &[1; 512], false).unwrap();
        assert!(l.cut(1).is_empty(), "nothing queued before recording");
        l.start_recording(3);
        l.write(4096, &[7; 512], false).unwrap();
        l.write(512, &[2; 512], true).unwrap();
        l.zero(4096, 100, true, false).unwrap();
        let mut b = [0u8; 512];
        l.read(&mut b, 512).unwrap();
        assert_eq!(b, [2; 512], "applied before the epoch ends");
        let e3 = l.cut(4);
        assert_eq!(e3.epoch, 3);
        // In the order they reached the image (the trim over the head of
        // the first write goes after it), the flush last.
        assert_eq!(
            e3.ops(),
            vec![
                DiskOp::Write {
                    offset: 4096,
                    data: vec![7; 512]
                },
                DiskOp::Write {
                    offset: 512,
                    data: vec![2; 512]
                },
                DiskOp::Trim {
                    offset: 4096,
                    len: 100
                },
                DiskOp::Flush,
            ]
        );
        assert_eq!(e3.bytes(), 4 * OP_HEADER + 512 + 512);
        l.flush().unwrap();
        let e4 = l.stop_recording();
        assert_eq!((e4.epoch, &e4.ops()[..]), (4, &[DiskOp::Flush][..]));
    }

    /// The pause ends an epoch with [`WriteLog::mark`]: it must not wait
    /// for the log's lock, which a writer holds across its `pwrite` (the
    /// kernel can hold that up for a long time: writeback throttling, the
    /// journal, `mmap_lock`). Here another thread holds the lock as such a
    /// writer would; the mark returns at once, and the epochs come out
    /// exactly split once the writer lets go.
    #[test]
    fn marking_an_epoch_never_waits_for_a_write_being_applied() {
        use std::sync::mpsc::channel;
        let (_d, l) = log(1 << 20, LogConfig::default());
        let l = Arc::new(l);
        l.start_recording(1);
        l.write(0, &[1; 4096], false).unwrap();
        let (held_tx, held_rx) = channel();
        let (release_tx, release_rx) = channel::<()>();
        let writer = {
            let l = l.clone();
            std::thread::spawn(move || {
                let g = l.lock();
                held_tx.send(()).unwrap();
                let _ = release_rx.recv();
                drop(g);
            })
        };
        held_rx.recv().unwrap();
        let (done_tx, done_rx) = channel();
        let pause = {
            let l = l.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                l.mark(2);
                done_tx.send(t.elapsed()).unwrap();
            })
        };
        let marked = done_rx.recv_timeout(Duration::from_secs(2));
        release_tx.send(()).unwrap();
        writer.join().unwrap();
        pause.join().unwrap();
        let took = marked.expect("the mark waited for the writer's lock");
        assert!(took < Duration::from_millis(500), "mark took {took:?}");
        // After the mark, writes belong to epoch 2; epoch 1 holds exactly
        // the write completed before it.
        l.write(4096, &[2; 4096], false).unwrap();
        let e1 = l.collect(1);
        assert_eq!(
            e1.ops(),
            vec![DiskOp::Write {
                offset: 0,
                data: vec![1; 4096]
            }]
        );
        l.mark(3);
        l.write(0, &[3; 4096], true).unwrap();
        let e2 = l.collect(2);
        assert_eq!(
            (e2.epoch, e2.ops()),
            (
                2,
                vec![DiskOp::Write {
                    offset: 4096,
                    data: vec![2; 4096]
                }]
            )
        );
        // Epochs collected late come out merged, in order, each with
        // its own flush.
        l.mark(4);
        l.write(0, &[4; 4096], false).unwrap();
        l.mark(5);
        l.write(0, &[5; 512], false).unwrap();
        let late = l.collect(4);
        let w = |b: u8, n: usize| DiskOp::Write {
            offset: 0,
            data: vec![b; n],
        };
        assert_eq!(late.ops(), vec![w(3, 4096), DiskOp::Flush, w(4, 4096)]);
        assert_eq!(l.collect(5).ops(), vec![w(5, 512)]);
    }

    #[test]
    fn a_large_write_buffer_becomes_the_logged_data_without_a_copy() {
        let (_d, l) = log(4 << 20, LogConfig::default());
        let mut buf = vec![5u8; 1 << 20];
        l.write_vec(0, &mut buf, false).unwrap();
        assert_eq!(buf.len(), 1 << 20, "not recording: the caller keeps it");
        l.start_recording(1);
        buf[0] = 6;
        let ptr = buf.as_ptr();
        l.write_vec(4096, &mut buf, true).unwrap();
        assert!(buf.is_empty(), "taken into the log");
        let mut small = vec![7u8; 4096];
        l.write_vec(8 << 20 >> 2, &mut small, false).unwrap();
        assert_eq!(small.len(), 4096, "small writes are copied");
        let e = l.cut(2);
        assert!(
            e.slices().any(|p| p.as_ptr() == ptr && p.len() == 1 << 20),
            "the buffer is sent as it is"
        );
        match &e.ops()[0] {
            DiskOp::Write { offset, data } => {
                assert_eq!((*offset, data[0]), (4096, 6));
                assert!(data[1..].iter().all(|&b| b == 5));
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(e.ops().last(), Some(&DiskOp::Flush), "FUA marks the epoch");
        let mut back = vec![0u8; 1 << 20];
        l.read(&mut back, 4096).unwrap();
        assert_eq!((back[0], back[1]), (6, 5), "and it reached the image");
    }

    #[test]
    fn large_writes_are_split_into_bounded_ops() {
        let (_d, l) = log(4 << 20, LogConfig::default());
        l.start_recording(1);
        l.write(10, &vec![3; 2 * MAX_OP_DATA + 5], false).unwrap();
        let ops = l.cut(2).ops();
        let offs: Vec<u64> = ops
            .iter()
            .map(|o| match o {
                DiskOp::Write { offset, data } => {
                    assert!(data.len() <= MAX_OP_DATA);
                    *offset
                }
                _ => panic!("{o:?}"),
            })
            .collect();
        assert_eq!(
            offs,
            vec![10, 10 + MAX_OP_DATA as u64, 10 + 2 * MAX_OP_DATA as u64]
        );
    }

    #[test]
    fn a_fenced_log_applies_and_queues_nothing() {
        let (_d, l) = log(1 << 20, LogConfig::default());
        l.start_recording(1);
        l.fence().revoke();
        assert!(matches!(
            l.write(0, &[9; 512], false),
            Err(LogError::Fenced { .. })
        ));
        assert!(l.zero(0, 512, false, false).is_err());
        assert!(l.flush().is_err());
        let mut b = [1u8; 512];
        l.read(&mut b, 0).unwrap();
        assert_eq!(b, [0; 512], "the image never saw the write");
        assert!(l.cut(2).is_empty(), "nor did the log");
    }

    #[test]
    fn a_full_queue_holds_writers_until_the_next_cut() {
        let cfg = LogConfig {
            max_queued: 2 * (OP_HEADER + 4096),
            max_wait: Duration::from_secs(20),
        };
        let (_d, l) = log(1 << 20, cfg);
        let l = Arc::new(l);
        l.start_recording(1);
        l.write(0, &[1; 4096], false).unwrap();
        l.write(4096, &[2; 4096], false).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let w = {
            let l = l.clone();
            std::thread::spawn(move || {
                l.write(8192, &[3; 4096], false).unwrap();
                tx.send(()).unwrap();
            })
        };
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "the third write waits while the queue is full"
        );
        assert_eq!(l.cut(2).op_count(), 2);
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        w.join().unwrap();
        assert_eq!(l.cut(3).op_count(), 1, "the waiting write went to epoch 2");
    }

    #[test]
    fn a_queue_never_drained_fails_the_write_after_the_wait() {
        let cfg = LogConfig {
            max_queued: 10,
            max_wait: Duration::from_millis(50),
        };
        let (_d, l) = log(1 << 20, cfg);
        l.start_recording(1);
        l.write(0, &[1; 4096], false).unwrap();
        let e = l.write(0, &[1; 4096], false).unwrap_err();
        assert!(matches!(e, LogError::Backlog { .. }), "{e}");
    }
}
