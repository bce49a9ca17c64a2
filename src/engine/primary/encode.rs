//! The encode workers (`castor-enc-N`): each encodes its own shard of every
//! unit against the shadow copy, after the guest resumed.
//!
//! Invariants:
//! - Pages are dealt in stripes of 2^[`STRIPE_SHIFT`] pages; stripe s
//!   belongs to encoder `s % shards` ([`owner`]), so each shadow page has
//!   exactly one writer and a hot region still spreads over every encoder.
//! - The shadow page of gfn g equals what the backup will hold for g once it
//!   applies everything sent: an encoder updates it with exactly the bytes it
//!   encoded, unless the page encoded as unchanged.
//! - Encoders step aside every 32 pages while a pause is underway
//!   ([`Shared::yield_to_pause`]), so the copy threads have the cores.
//! - An encoder drops its clone of the job before reporting its shard, so
//!   `castor-tx` can reclaim the staging buffer once every shard is in.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use super::job::{EpochJob, ShardOut, ShardStats, Source, TxMsg};
use super::shared::Shared;
use crate::codec::{Encoder, PageKind};
use crate::transport::messages::PagesWriter;
use crate::PAGE_SIZE;

/// Pointer to the shadow, shared by encoders; each touches only its shard.
#[derive(Clone, Copy)]
pub(super) struct ShadowPtr(pub *mut u8, pub u64);
// SAFETY: encoders write disjoint gfn ranges of the shadow (shard ownership),
// and the shadow outlives them (joined before it is dropped).
unsafe impl Send for ShadowPtr {}

#[derive(Clone, Copy)]
pub(super) struct MemPtr(pub *const u8);
// SAFETY: guest memory outlives the encoders (joined before the domain is
// returned); seed reads race with guest writes by design, and every page
// written during the seed is dirty and re-sent in epoch 1 (the seed's last
// round is read before epoch 1 ends: see `seed`).
unsafe impl Send for MemPtr {}

/// What a page never sent holds on the backup (and in the shadow).
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Pages are dealt to encoders in stripes of 2^STRIPE_SHIFT pages (256 KiB),
/// so a hot region spreads over every encoder while each stripe of the
/// shadow still has exactly one owner.
const STRIPE_SHIFT: u32 = 6;

fn owner(gfn: u64, shards: usize) -> usize {
    ((gfn >> STRIPE_SHIFT) % shards as u64) as usize
}

/// One encoder's fixed inputs.
pub(super) struct Worker {
    pub shard: usize,
    pub shards: usize,
    pub shadow: ShadowPtr,
    pub mem: MemPtr,
    pub shared: Arc<Shared>,
}

impl ShardStats {
    fn count(&mut self, kind: PageKind) {
        match kind {
            PageKind::Unchanged => self.unchanged += 1,
            PageKind::Zero => self.zero += 1,
            PageKind::Delta | PageKind::DeltaLz4 | PageKind::DeltaZstd => self.delta += 1,
            _ => self.full += 1,
        }
    }
}

/// Encodes this worker's shard of every job until `jobs` closes; output
/// buffers come back from `castor-tx` through `bufs`.
pub(super) fn encoder_thread(
    w: Worker,
    jobs: Receiver<Arc<EpochJob>>,
    out: Sender<TxMsg>,
    bufs: Receiver<Vec<u8>>,
) {
    // One encoder per compressor the jobs asked for (contexts kept).
    let mut encs: Vec<Encoder> = Vec::new();
    let mut page = Box::new([0u8; PAGE_SIZE]);
    for job in jobs {
        let t0 = Instant::now();
        let mut buf = bufs.try_recv().unwrap_or_default();
        buf.clear();
        let mut pw = PagesWriter::new(job.epoch);
        let mut st = ShardStats::default();
        let enc = match encs.iter().position(|e| e.compressor() == job.compressor) {
            Some(i) => &mut encs[i],
            None => {
                encs.push(Encoder::new(job.compressor));
                encs.last_mut().expect("just pushed")
            }
        };
        if !encode_job(&w, &job, enc, &mut page, &mut buf, &mut pw, &mut st) {
            // The session failed: nobody sends this shard.
            return;
        }
        pw.close(&mut buf);
        st.encode_us = t0.elapsed().as_micros() as u64;
        let unit = job.unit;
        drop(job); // before reporting, so the tx thread can reclaim staging
        let msg = ShardOut {
            unit,
            shard: w.shard,
            buf,
            records: pw.records,
            entries: pw.entries,
            stats: st,
        };
        if out.send(TxMsg::Shard(msg)).is_err() {
            return;
        }
    }
}

/// Encodes this worker's pages of `job` into `buf`. False: the session's
/// teardown stopped the encoders midway (checked every 32 pages, so a
/// failed session's teardown never waits for a whole unit to be encoded).
fn encode_job(
    w: &Worker,
    job: &EpochJob,
    enc: &mut Encoder,
    page: &mut [u8; PAGE_SIZE],
    buf: &mut Vec<u8>,
    pw: &mut PagesWriter,
    st: &mut ShardStats,
) -> bool {
    let (shard, shards, shadow, mem, shared) = (w.shard, w.shards, w.shadow, w.mem, &*w.shared);
    let pages = shadow.1;
    let mut n = 0u32;
    let mut stopped = false;
    let fresh = matches!(job.source, Source::FirstPass(_));
    let mut one = |gfn: u64, src: &[u8; PAGE_SIZE], buf: &mut Vec<u8>, pw: &mut PagesWriter| {
        if stopped {
            return;
        }
        n = n.wrapping_add(1);
        if n % 32 == 0 {
            shared.yield_to_pause();
            if shared.stop_encoders.load(Ordering::Relaxed) {
                stopped = true;
                return;
            }
        }
        // SAFETY: gfn < pages and owner(gfn) == shard: this encoder
        // alone touches this shadow page.
        let prev =
            unsafe { &mut *(shadow.0.add(gfn as usize * PAGE_SIZE) as *mut [u8; PAGE_SIZE]) };
        st.raw_bytes += PAGE_SIZE as u64;
        let mut kind = PageKind::Invalid;
        // First pass: the shadow page is known zero (see Source::FirstPass).
        let base: &[u8; PAGE_SIZE] = if fresh { &ZERO_PAGE } else { prev };
        pw.push(buf, gfn, |o| {
            kind = enc.encode(src, Some(base), o);
            (kind != PageKind::Unchanged).then_some(kind as u8)
        });
        st.count(kind);
        if kind != PageKind::Unchanged {
            prev.copy_from_slice(src);
        }
    };
    let mine = |g: &u64| owner(*g, shards) == shard;
    let mut live = |gfn: u64, buf: &mut Vec<u8>, pw: &mut PagesWriter| {
        // SAFETY: gfn < pages; copying out of guest memory into our own
        // buffer (see MemPtr for the race argument).
        unsafe {
            std::ptr::copy_nonoverlapping(
                mem.0.add(gfn as usize * PAGE_SIZE),
                page.as_mut_ptr(),
                PAGE_SIZE,
            )
        };
        one(gfn, page, buf, pw);
    };
    match &job.source {
        Source::AllLive => {
            let stripe = 1u64 << STRIPE_SHIFT;
            let mut start = shard as u64 * stripe;
            while start < pages {
                (start..(start + stripe).min(pages)).for_each(|g| live(g, buf, pw));
                start += stripe * shards as u64;
            }
        }
        Source::Live(gfns) | Source::FirstPass(gfns) => gfns
            .iter()
            .filter(|g| mine(g))
            .for_each(|&g| live(g, buf, pw)),
        Source::Staged(gfns, staging) => {
            for (i, &gfn) in gfns.iter().enumerate().filter(|(_, g)| mine(g)) {
                // SAFETY: the copy into staging finished before the job
                // was sent; nobody writes staging until it is returned.
                let src = unsafe { staging.slot(i) };
                one(gfn, src, buf, pw);
            }
        }
    }
    !stopped
}
