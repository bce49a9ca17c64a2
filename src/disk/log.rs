//! The primary's epoch write log.
//!
//! Remus's disk model: a guest write is applied to the primary's image at
//! once and completed to the guest; it is tagged with the epoch running and
//! queued for that epoch's checkpoint, which carries it to the backup. The
//! epoch driver cuts the log inside the pause ([`WriteLog::cut`]), so a
//! write belongs to exactly one epoch. An epoch's writes are kept
//! coalesced ([`WriteSet`]): a range rewritten within an epoch travels
//! once, with its last bytes.
//!
//! Invariants:
//! - Applying a write to the image and recording it in the epoch's set
//!   happen under one lock, so the set holds, for each byte the epoch
//!   touched, what the image holds at the cut (the last of two overlapping
//!   writes wins on the backup as it did here) and a cut never splits a
//!   write.
//! - The fencing gate is checked under that same lock: once the gate closes
//!   no write, queued or new, reaches the image or the log.
//! - The queue is bounded ([`LogConfig::max_queued`]); a writer that finds
//!   it full waits for the next cut (backpressure on the guest, like an
//!   extended epoch), never grows it.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::coalesce::WriteSet;
use super::fence::Fence;
use super::image::{DiskImage, ImageError};
use super::pool;
use super::wire::{DiskOp, MAX_OP_DATA};

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

/// The writes of one epoch, coalesced: disjoint ranges in offset order
/// holding their bytes at the epoch's end, then a `Flush` if the epoch
/// carried one.
///
/// Dropping it (once its checkpoint is sent) hands the write buffers back
/// to [`pool`], for the next large writes to be received into.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EpochOps {
    pub epoch: u64,
    pub ops: Vec<DiskOp>,
    /// Sum of the ops' wire lengths.
    pub bytes: usize,
}

impl Drop for EpochOps {
    fn drop(&mut self) {
        for op in self.ops.drain(..) {
            if let DiskOp::Write { data, .. } = op {
                pool::give(data);
            }
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    recording: bool,
    epoch: u64,
    set: WriteSet,
}

/// An image plus the log of its writes per epoch. Shared by every NBD
/// connection (or the kvm block device) and the epoch driver.
#[derive(Debug)]
pub struct WriteLog {
    image: DiskImage,
    fence: Arc<Fence>,
    cfg: LogConfig,
    inner: Mutex<Inner>,
    room: Condvar,
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
        g.epoch = epoch;
        g.set = WriteSet::default();
    }

    /// Stops queueing; returns what was queued and not yet cut.
    pub fn stop_recording(&self) -> EpochOps {
        let mut g = self.lock();
        g.recording = false;
        let out = take(&mut g);
        self.room.notify_all();
        out
    }

    /// Ends the running epoch: returns its writes and tags later writes
    /// with `next`. Called by the epoch driver inside the pause.
    pub fn cut(&self, next: u64) -> EpochOps {
        let mut g = self.lock();
        let out = take(&mut g);
        g.epoch = next;
        self.room.notify_all();
        out
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
            for (i, chunk) in data.chunks(MAX_OP_DATA).enumerate() {
                g.set.write(offset + (i * MAX_OP_DATA) as u64, chunk);
            }
            if fua {
                g.set.flush();
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
            g.set.write_owned(offset, std::mem::take(buf));
            if fua {
                g.set.flush();
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
            g.set.zero(offset, len, trim);
            if fua {
                g.set.flush();
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
            g.set.flush();
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
            let queued = g.set.bytes();
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

fn take(g: &mut Inner) -> EpochOps {
    let set = std::mem::take(&mut g.set);
    EpochOps {
        epoch: g.epoch,
        bytes: set.bytes(),
        ops: set.into_ops(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::wire::OP_HEADER;

    fn log(size: u64, cfg: LogConfig) -> (tempfile::TempDir, WriteLog) {
        let dir = tempfile::tempdir().unwrap();
        let img = DiskImage::create(&dir.path().join("p.img"), size).unwrap();
        (dir, WriteLog::new(img, Arc::new(Fence::open()), cfg))
    }

    #[test]
    fn writes_are_applied_at_once_and_tagged_with_the_running_epoch() {
        let (_d, l) = log(1 << 20, LogConfig::default());
        l.write(0, &[1; 512], false).unwrap();
        assert!(l.cut(1).ops.is_empty(), "nothing queued before recording");
        l.start_recording(3);
        l.write(4096, &[7; 512], false).unwrap();
        l.write(512, &[2; 512], true).unwrap();
        l.zero(4096, 100, true, false).unwrap();
        let mut b = [0u8; 512];
        l.read(&mut b, 512).unwrap();
        assert_eq!(b, [2; 512], "applied before the epoch ends");
        let e3 = l.cut(4);
        assert_eq!(e3.epoch, 3);
        // Coalesced: in offset order, the trim over the head of the first
        // write wins there, the flush comes last.
        assert_eq!(
            e3.ops,
            vec![
                DiskOp::Write {
                    offset: 512,
                    data: vec![2; 512]
                },
                DiskOp::Trim {
                    offset: 4096,
                    len: 100
                },
                DiskOp::Write {
                    offset: 4196,
                    data: vec![7; 412]
                },
                DiskOp::Flush,
            ]
        );
        assert_eq!(e3.bytes, 4 * OP_HEADER + 512 + 412);
        l.flush().unwrap();
        let e4 = l.stop_recording();
        assert_eq!((e4.epoch, &e4.ops[..]), (4, &[DiskOp::Flush][..]));
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
        match &e.ops[0] {
            DiskOp::Write { offset, data } => {
                assert_eq!((*offset, data.as_ptr(), data[0]), (4096, ptr, 6));
                assert!(data[1..].iter().all(|&b| b == 5));
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(e.ops.last(), Some(&DiskOp::Flush), "FUA marks the epoch");
        let mut back = vec![0u8; 1 << 20];
        l.read(&mut back, 4096).unwrap();
        assert_eq!((back[0], back[1]), (6, 5), "and it reached the image");
    }

    #[test]
    fn large_writes_are_split_into_bounded_ops() {
        let (_d, l) = log(4 << 20, LogConfig::default());
        l.start_recording(1);
        l.write(10, &vec![3; 2 * MAX_OP_DATA + 5], false).unwrap();
        let ops = std::mem::take(&mut l.cut(2).ops);
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
        assert!(l.cut(2).ops.is_empty(), "nor did the log");
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
        assert_eq!(l.cut(2).ops.len(), 2);
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        w.join().unwrap();
        assert_eq!(l.cut(3).ops.len(), 1, "the waiting write went to epoch 2");
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
