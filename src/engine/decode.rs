//! The backup's decode pool: the pages of the open epoch decoded in
//! parallel, one lane per stripe of the guest's pages.
//!
//! The receiving thread verifies each Pages record and checks every entry
//! against the stream's rules (see `receiver.rs`); this module only decodes.
//! Entry `gfn` goes to lane [`owner`]`(gfn)`: stripes of 2^[`STRIPE_SHIFT`]
//! pages dealt round-robin, as the primary deals them to its encoders. With
//! one lane the receiving thread decodes itself, straight from the record;
//! with more, each lane is a thread (`castor-dec-N`) fed batches (a copy of
//! its entries' payloads) through a bounded channel.
//!
//! Invariants:
//! - A lane owns its pages: every entry for a gfn goes to the same lane,
//!   in arrival order (channels are FIFO), so a seed page sent twice is
//!   written in the order it was sent, and two lanes never touch the same
//!   replica page.
//! - Checkpoint pages are decoded into the lane's staging, never into the
//!   replica; the replica is written only by [`Decoders::commit`], which the
//!   receiver calls after [`Decoders::finish`] reported every page of the
//!   epoch decoded without a fault. A fault anywhere rejects the epoch
//!   whole: the receiver discards it ([`Decoders::discard`]).
//! - Seed pages (epoch 0, a live pre-copy) are written through in place.
//! - Between [`Decoders::finish`] (or `commit`, `discard`) and the next
//!   [`Decoders::decode`], no lane runs: the replica is stable for readers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::codec::{Decoder, PageKind};
use crate::domain::GuestMemory;
use crate::transport::messages::EpochClass;
use crate::PAGE_SIZE;

/// Pages are dealt to lanes in stripes of 2^STRIPE_SHIFT pages (256 KiB).
pub const STRIPE_SHIFT: u32 = 6;

/// Batches a lane may have queued before the receiving thread waits for
/// it (bounds the copies held: about this many records' worth per lane).
const QUEUE: usize = 16;

/// The lane decoding `gfn`.
pub fn owner(gfn: u64, lanes: usize) -> usize {
    ((gfn >> STRIPE_SHIFT) % lanes as u64) as usize
}

/// One checked page entry; its payload is `bytes[at..at + len]` of the
/// buffer handed along with it.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub gfn: u64,
    pub kind: u8,
    pub at: usize,
    pub len: usize,
}

/// The first page a lane failed to decode, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageFault {
    pub gfn: u64,
    pub reason: String,
}

/// The replica's pages, shared with the lanes.
#[derive(Clone, Copy)]
struct Replica {
    base: *mut u8,
    pages: u64,
}

// SAFETY: lanes write disjoint pages (ownership by stripe), only while the
// receiver has them running (see the module invariants), and the replica
// mapping outlives every lane (the `Decoders` is dropped, joining them,
// before the memory: see `Receiver`).
unsafe impl Send for Replica {}

impl Replica {
    /// # Safety
    /// `gfn < pages`, no one else accesses the page while the reference
    /// lives, and it does not outlive the mapping.
    unsafe fn page<'a>(self, gfn: u64) -> &'a mut [u8; PAGE_SIZE] {
        debug_assert!(gfn < self.pages);
        // SAFETY: the caller's contract; pages are PAGE_SIZE apart.
        unsafe { &mut *(self.base.add(gfn as usize * PAGE_SIZE) as *mut [u8; PAGE_SIZE]) }
    }
}

/// How a staged page of an open checkpoint reaches the replica at commit.
#[derive(Clone, Copy)]
enum Staged {
    /// Decoded page at this offset of `staging`: copied over the replica page.
    Page(usize),
    /// Validated `Delta` payload at `deltas[at..at + len]`: XORed into the
    /// replica page in place, touching only the changed bytes.
    Delta { at: usize, len: usize },
}

/// One lane's share of the open epoch.
struct Lane {
    decoder: Decoder,
    staged: Vec<(u64, Staged)>,
    /// Decoded pages of the open checkpoint in `staging[..used]`; the rest
    /// is room kept from earlier epochs (never zeroed again).
    staging: Vec<u8>,
    used: usize,
    deltas: Vec<u8>,
    scratch: Box<[u8; PAGE_SIZE]>,
    fault: Option<PageFault>,
}

impl Lane {
    fn new() -> Lane {
        Lane {
            decoder: Decoder::new(),
            staged: Vec::new(),
            staging: Vec::new(),
            used: 0,
            deltas: Vec::new(),
            scratch: Box::new([0; PAGE_SIZE]),
            fault: None,
        }
    }

    /// Decodes `entries` (payloads in `bytes`); after a fault, does nothing
    /// until cleared.
    fn decode(&mut self, mem: Replica, class: EpochClass, entries: &[Entry], bytes: &[u8]) {
        if self.fault.is_some() {
            return;
        }
        for e in entries {
            if let Err(reason) = self.one(mem, class, e, &bytes[e.at..e.at + e.len]) {
                self.fault = Some(PageFault { gfn: e.gfn, reason });
                return;
            }
        }
    }

    fn one(
        &mut self,
        mem: Replica,
        class: EpochClass,
        e: &Entry,
        payload: &[u8],
    ) -> Result<(), String> {
        if class == EpochClass::Checkpoint && e.kind == PageKind::Delta as u8 {
            // The common case: keep the (small) delta, proven valid now,
            // and patch the replica page in place at commit.
            Decoder::check_delta(payload).map_err(|c| c.to_string())?;
            let at = self.deltas.len();
            self.deltas.extend_from_slice(payload);
            let len = payload.len();
            self.staged.push((e.gfn, Staged::Delta { at, len }));
            return Ok(());
        }
        // SAFETY: the receiver checked gfn < pages; this lane owns the page,
        // and in a checkpoint nobody writes the replica until commit.
        let base = unsafe { mem.page(e.gfn) };
        if class == EpochClass::Seed {
            let slot = &mut *self.scratch;
            self.decoder
                .decode(e.kind, payload, base, slot)
                .map_err(|c| c.to_string())?;
            // Not a checkpoint: write through.
            base.copy_from_slice(slot);
            return Ok(());
        }
        let at = self.used;
        if self.staging.len() < at + PAGE_SIZE {
            self.staging.resize(at + PAGE_SIZE, 0);
        }
        let slot = <&mut [u8; PAGE_SIZE]>::try_from(&mut self.staging[at..at + PAGE_SIZE])
            .expect("one page");
        self.decoder
            .decode(e.kind, payload, base, slot)
            .map_err(|c| c.to_string())?;
        self.used = at + PAGE_SIZE;
        self.staged.push((e.gfn, Staged::Page(at)));
        Ok(())
    }

    /// Applies the staged pages to the replica, then forgets them.
    fn commit(&mut self, mem: Replica) {
        for &(gfn, how) in &self.staged {
            // SAFETY: gfn < pages (checked on receipt), owned by this lane.
            let page = unsafe { mem.page(gfn) };
            match how {
                Staged::Page(at) => page.copy_from_slice(&self.staging[at..at + PAGE_SIZE]),
                Staged::Delta { at, len } => {
                    let r = Decoder::apply_delta(&self.deltas[at..at + len], page);
                    debug_assert!(r.is_ok(), "delta validated on receipt failed at commit");
                }
            }
        }
        self.clear();
    }

    fn clear(&mut self) {
        self.staged.clear();
        self.used = 0;
        self.deltas.clear();
        self.fault = None;
    }

    fn status(&self) -> Result<(), PageFault> {
        self.fault.clone().map_or(Ok(()), Err)
    }
}

/// A lane's payload copies for one record.
#[derive(Default)]
struct Batch {
    class: Option<EpochClass>,
    entries: Vec<Entry>,
    bytes: Vec<u8>,
}

enum Msg {
    Batch(Batch),
    /// Answer with the lane's status once everything before is decoded.
    Finish,
    Commit,
    Discard,
}

struct Worker {
    tx: SyncSender<Msg>,
    /// Emptied batches coming back for reuse.
    spare: Receiver<Batch>,
    handle: JoinHandle<()>,
}

/// The lanes of a pool, with the receiving thread's half-filled batches.
struct Pool {
    workers: Vec<Worker>,
    replies: Receiver<Result<(), PageFault>>,
    /// Set by a lane at its first fault: the receiver stops early.
    failed: Arc<AtomicBool>,
    filling: Vec<Batch>,
}

/// The decode lanes of one receiver.
pub struct Decoders {
    mem: Replica,
    inline: Option<Box<Lane>>,
    pool: Option<Pool>,
}

impl Decoders {
    /// `lanes` lanes over the replica `mem` (at least one; one decodes on
    /// the caller's thread). `mem` must outlive the `Decoders`. Lanes are
    /// pinned to `cores` round-robin when given.
    pub fn new(mem: &GuestMemory, lanes: usize, cores: &[core_affinity::CoreId]) -> Decoders {
        let mem = Replica {
            base: mem.as_ptr(),
            pages: mem.pages(),
        };
        if lanes <= 1 {
            return Decoders {
                mem,
                inline: Some(Box::new(Lane::new())),
                pool: None,
            };
        }
        let failed = Arc::new(AtomicBool::new(false));
        let (reply_tx, replies) = channel();
        let workers = (0..lanes)
            .map(|i| {
                let core = (!cores.is_empty()).then(|| cores[i % cores.len()]);
                spawn_lane(i, mem, core, reply_tx.clone(), failed.clone())
            })
            .collect();
        let filling = (0..lanes).map(|_| Batch::default()).collect();
        Decoders {
            mem,
            inline: None,
            pool: Some(Pool {
                workers,
                replies,
                failed,
                filling,
            }),
        }
    }

    /// Lanes decoding (1: the caller's thread alone).
    pub fn lanes(&self) -> usize {
        self.pool.as_ref().map_or(1, |p| p.workers.len())
    }

    /// Decodes checked `entries` of one record (payloads in `bytes`).
    /// Returns a fault as soon as one is known; a pool may report it only
    /// from a later call or from [`Decoders::finish`].
    pub fn decode(
        &mut self,
        class: EpochClass,
        entries: &[Entry],
        bytes: &[u8],
    ) -> Result<(), PageFault> {
        if let Some(lane) = &mut self.inline {
            lane.decode(self.mem, class, entries, bytes);
            return lane.status();
        }
        let p = self.pool.as_mut().expect("inline or pool");
        let n = p.workers.len();
        for e in entries {
            let b = &mut p.filling[owner(e.gfn, n)];
            let at = b.bytes.len();
            b.bytes.extend_from_slice(&bytes[e.at..e.at + e.len]);
            b.entries.push(Entry { at, ..*e });
        }
        for (w, b) in p.workers.iter().zip(p.filling.iter_mut()) {
            if b.entries.is_empty() {
                continue;
            }
            let mut next = w.spare.try_recv().unwrap_or_default();
            next.entries.clear();
            next.bytes.clear();
            let mut full = std::mem::replace(b, next);
            full.class = Some(class);
            w.tx.send(Msg::Batch(full)).expect("decode lane died");
        }
        if p.failed.load(Ordering::Relaxed) {
            return self.finish();
        }
        Ok(())
    }

    /// Waits until every page handed over is decoded; the first fault (by
    /// lane) if any.
    pub fn finish(&mut self) -> Result<(), PageFault> {
        match &mut self.inline {
            Some(lane) => lane.status(),
            None => self.broadcast(|| Msg::Finish),
        }
    }

    /// Applies every staged page of the open checkpoint to the replica (the
    /// lanes in parallel) and forgets them. Call only after `finish` said Ok.
    pub fn commit(&mut self) {
        match &mut self.inline {
            Some(lane) => lane.commit(self.mem),
            None => {
                let r = self.broadcast(|| Msg::Commit);
                debug_assert!(r.is_ok());
            }
        }
    }

    /// Forgets the open epoch's staged pages and faults; returns once no
    /// lane runs.
    pub fn discard(&mut self) {
        match &mut self.inline {
            Some(lane) => lane.clear(),
            None => {
                let _ = self.broadcast(|| Msg::Discard);
            }
        }
    }

    /// Sends `msg()` to every lane and waits for all their answers; the
    /// first fault reported.
    fn broadcast(&mut self, msg: impl Fn() -> Msg) -> Result<(), PageFault> {
        let p = self.pool.as_mut().expect("pool");
        for w in &p.workers {
            w.tx.send(msg()).expect("decode lane died");
        }
        let mut out = Ok(());
        for _ in &p.workers {
            let r = p.replies.recv().expect("decode lane died");
            out = out.and(r);
        }
        p.failed.store(false, Ordering::Relaxed);
        out
    }
}

impl Drop for Decoders {
    fn drop(&mut self) {
        if let Some(p) = &mut self.pool {
            for w in p.workers.drain(..) {
                // Closing the channel ends the lane's loop.
                drop(w.tx);
                let _ = w.handle.join();
            }
        }
    }
}

/// Starts lane `i` (`castor-dec-i`).
fn spawn_lane(
    i: usize,
    mem: Replica,
    core: Option<core_affinity::CoreId>,
    replies: Sender<Result<(), PageFault>>,
    failed: Arc<AtomicBool>,
) -> Worker {
    let (tx, rx) = sync_channel::<Msg>(QUEUE);
    let (spare_tx, spare) = channel();
    let handle = std::thread::Builder::new()
        .name(format!("castor-dec-{i}"))
        .spawn(move || {
            if let Some(c) = core {
                core_affinity::set_for_current(c);
            }
            let mut lane = Lane::new();
            for m in rx {
                let answer = match m {
                    Msg::Batch(mut b) => {
                        let class = b.class.expect("batches carry their class");
                        lane.decode(mem, class, &b.entries, &b.bytes);
                        if lane.fault.is_some() {
                            failed.store(true, Ordering::Relaxed);
                        }
                        b.entries.clear();
                        b.bytes.clear();
                        let _ = spare_tx.send(b);
                        continue;
                    }
                    Msg::Finish => lane.status(),
                    Msg::Commit => {
                        lane.commit(mem);
                        Ok(())
                    }
                    Msg::Discard => {
                        lane.clear();
                        Ok(())
                    }
                };
                if replies.send(answer).is_err() {
                    break;
                }
            }
        })
        .expect("spawning a decode lane");
    Worker { tx, spare, handle }
}
