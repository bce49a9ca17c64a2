//! The backup's receiver: turns a verified record stream into committed
//! checkpoints, atomically.
//!
//! States: `Idle` (between epochs) and `Open(epoch)`. Pages of an open
//! checkpoint are decoded into a staging area (plain deltas are validated
//! and kept as deltas, to be XORed in place), never into the replica; only
//! the epoch's end record, after its totals are checked and every page is
//! decoded, copies them into the replica and replaces the saved state.
//! Decoding runs on the lanes of `engine::decode` (by stripe of pages, in
//! parallel when there are several); this thread checks every entry first. Any error discards the open epoch
//! whole: the replica stays at the last committed epoch. The seed (epoch 0,
//! a live pre-copy) is applied in place because the replica holds no
//! committed checkpoint before epoch 1 commits; its pre-copy rounds may
//! send a page more than once.
//!
//! Every field from the wire is checked: epochs must follow one another,
//! gfns must lie inside the layout, a gfn may appear once per epoch, entry
//! and record counts must match the end record, and payloads must decode.
//!
//! Disks (`crate::disk`): a `Disks` record before the seed creates the
//! replica disks; `DiskWrites` of the seed are written in place, those of a
//! checkpoint are validated whole and staged, and applied at its commit
//! before the memory (with `fdatasync` when the epoch carried a flush), so
//! the ack covers memory and disks alike.

use std::path::PathBuf;

use crate::disk::session::{decode_announce, BackupDisks};
use crate::domain::GuestMemory;
use crate::engine::decode::{Decoders, Entry, PageFault};
use crate::transport::messages::{parse_pages, EpochBegin, EpochClass, EpochEnd};
use crate::transport::record::{PayloadError, Record, RecordKind};
use crate::PAGE_SIZE;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("epoch {epoch}: {source}")]
    Payload {
        epoch: u64,
        #[source]
        source: PayloadError,
    },
    #[error("epoch {epoch}, page {gfn}: {reason}")]
    Page {
        epoch: u64,
        gfn: u64,
        reason: String,
    },
    #[error("{0}")]
    Protocol(String),
    #[error("primary reported an error: {0}")]
    Peer(String),
    #[error("epoch {epoch}: {source}")]
    Disk {
        epoch: u64,
        #[source]
        source: crate::disk::session::SessionError,
    },
}

/// Lanes a receiver of `pages` pages decodes on by default: half the cores
/// (at most 4) on hosts of 4 cores or more, for guests of 64 MiB or more;
/// else the receiving thread alone. A lane pool costs more CPU in all
/// (payload copies, hand-offs: about +20 % per epoch in `cargo bench
/// --bench decode`) for a shorter critical path, which pays only when the
/// lanes have cores of their own; on 2 cores shared with the receiving
/// thread (and in `castor bench`, with the primary) it does not.
pub fn default_lanes(pages: u64) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if pages < 16384 || cores < 4 {
        return 1;
    }
    (cores / 2).min(4)
}

fn fault(epoch: u64, f: PageFault) -> StreamError {
    StreamError::Page {
        epoch,
        gfn: f.gfn,
        reason: f.reason,
    }
}

/// What a record did to the session.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    None,
    /// Epoch committed (or seed applied): acknowledge it.
    Committed(u64),
    /// Clean end of stream after epoch `.0`.
    Closed(u64),
}

struct Open {
    epoch: u64,
    class: EpochClass,
    dirty: u64,
    entries: u64,
    records: u32,
    state: Option<Vec<u8>>,
    /// DiskWrites records received in this epoch.
    disk_records: u32,
}

/// The replica and the receiver's state machine.
pub struct Receiver {
    /// Declared before `mem`: its lanes stop before the replica unmaps.
    decoders: Decoders,
    mem: GuestMemory,
    pages: u64,
    state: Vec<u8>,
    committed: Option<u64>,
    seeded: bool,
    next_epoch: u64,
    open: Option<Open>,
    /// Pages of the open checkpoint, in arrival order (their `seen` bits).
    gfns: Vec<u64>,
    /// The checked entries of the record being decoded.
    entries: Vec<Entry>,
    /// One bit per gfn: seen in the open epoch (duplicates are hostile).
    seen: Vec<u64>,
    /// Pages applied by the last commit (for metrics).
    last_pages: u64,
    /// Where replica disks live (`STATE_DIR`); None: disks are refused.
    disk_dir: Option<PathBuf>,
    disks: Option<BackupDisks>,
}

impl Receiver {
    /// A receiver for `pages` pages, decoding on [`default_lanes`] lanes.
    pub fn new(pages: u64) -> Result<Receiver, crate::domain::DomainError> {
        let mem = GuestMemory::new(pages as usize * PAGE_SIZE)?;
        Ok(Receiver {
            decoders: Decoders::new(&mem, default_lanes(pages), &[]),
            mem,
            pages,
            state: Vec::new(),
            committed: None,
            seeded: false,
            next_epoch: 0,
            open: None,
            gfns: Vec::new(),
            entries: Vec::new(),
            seen: vec![0; (pages as usize).div_ceil(64)],
            last_pages: 0,
            disk_dir: None,
            disks: None,
        })
    }

    /// Decodes on `lanes` lanes (1: on the receiving thread), pinned to
    /// `cores` round-robin when given. Call before the first record.
    pub fn with_decoders(mut self, lanes: usize, cores: &[core_affinity::CoreId]) -> Receiver {
        self.decoders = Decoders::new(&self.mem, lanes, cores);
        self
    }

    /// Lanes decoding pages.
    pub fn decode_lanes(&self) -> usize {
        self.decoders.lanes()
    }

    /// Pages the last committed checkpoint applied.
    pub fn last_pages(&self) -> u64 {
        self.last_pages
    }

    /// Accepts a primary's disks, kept under `state_dir/disks/`.
    pub fn with_disk_dir(mut self, state_dir: PathBuf) -> Receiver {
        self.disk_dir = Some(state_dir);
        self
    }

    /// The replica disks, once the primary announced them.
    pub fn disks(&self) -> Option<&BackupDisks> {
        self.disks.as_ref()
    }

    /// Last committed checkpoint, if any.
    pub fn committed(&self) -> Option<u64> {
        self.committed
    }

    /// The epoch being received, if one is open.
    pub fn open_epoch(&self) -> Option<u64> {
        self.open.as_ref().map(|o| o.epoch)
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The replica's memory and saved state, consuming the receiver.
    pub fn into_replica(self) -> (GuestMemory, Vec<u8>) {
        let Receiver {
            decoders,
            mem,
            state,
            ..
        } = self;
        drop(decoders); // joins the lanes before the memory changes hands
        (mem, state)
    }

    pub fn state(&self) -> &[u8] {
        &self.state
    }

    /// Drops the open epoch, if any (after an error or a torn stream).
    /// Returns the discarded epoch number.
    pub fn discard_open(&mut self) -> Option<u64> {
        let o = self.open.take()?;
        self.clear_staging();
        if let Some(d) = &mut self.disks {
            d.discard();
        }
        Some(o.epoch)
    }

    /// Forgets the open epoch's staged pages (and their `seen` bits);
    /// returns once no decode lane runs.
    fn clear_staging(&mut self) {
        self.forget_gfns();
        self.decoders.discard();
    }

    fn forget_gfns(&mut self) {
        for &g in &self.gfns {
            self.seen[(g / 64) as usize] &= !(1 << (g % 64));
        }
        self.gfns.clear();
    }

    fn proto(&self, msg: String) -> StreamError {
        StreamError::Protocol(msg)
    }

    /// Applies one verified record. On `Err` the caller must end the session
    /// (and call [`Receiver::discard_open`]); the replica is untouched.
    pub fn on_record(&mut self, rec: Record<'_>) -> Result<Event, StreamError> {
        match rec.kind {
            RecordKind::EpochBegin => self.begin(rec),
            RecordKind::Pages => self.pages(rec),
            RecordKind::State => self.state_rec(rec),
            RecordKind::EpochEnd => self.end(rec),
            RecordKind::Disks => self.disks_rec(rec),
            RecordKind::DiskWrites => self.disk_writes(rec),
            RecordKind::Heartbeat => Ok(Event::None),
            RecordKind::Close => {
                if let Some(o) = &self.open {
                    return Err(self.proto(format!("stream closed inside epoch {}", o.epoch)));
                }
                Ok(Event::Closed(rec.epoch))
            }
            RecordKind::Error => Err(StreamError::Peer(
                String::from_utf8_lossy(rec.payload).into_owned(),
            )),
            other => Err(self.proto(format!("unexpected {other:?} record after the handshake"))),
        }
    }

    fn begin(&mut self, rec: Record<'_>) -> Result<Event, StreamError> {
        if let Some(o) = &self.open {
            return Err(self.proto(format!(
                "epoch {} begins while epoch {} is still open",
                rec.epoch, o.epoch
            )));
        }
        if rec.epoch != self.next_epoch {
            return Err(self.proto(format!(
                "epoch {} out of order: expected epoch {}",
                rec.epoch, self.next_epoch
            )));
        }
        let b = EpochBegin::decode(rec.payload).map_err(|source| StreamError::Payload {
            epoch: rec.epoch,
            source,
        })?;
        let want = if rec.epoch == 0 {
            EpochClass::Seed
        } else {
            EpochClass::Checkpoint
        };
        if b.class != want {
            return Err(self.proto(format!(
                "epoch {} has class {:?}, expected {want:?}",
                rec.epoch, b.class
            )));
        }
        if b.dirty > self.pages {
            return Err(self.proto(format!(
                "epoch {} claims {} dirty pages; the domain has {}",
                rec.epoch, b.dirty, self.pages
            )));
        }
        self.open = Some(Open {
            epoch: rec.epoch,
            class: b.class,
            dirty: b.dirty,
            entries: 0,
            records: 0,
            state: None,
            disk_records: 0,
        });
        Ok(Event::None)
    }

    fn disks_rec(&mut self, rec: Record<'_>) -> Result<Event, StreamError> {
        if self.disks.is_some() {
            return Err(self.proto("a second Disks record".into()));
        }
        if self.open.is_some() || self.next_epoch != 0 {
            return Err(self.proto("Disks record after the seed began".into()));
        }
        let Some(dir) = &self.disk_dir else {
            return Err(self.proto("the primary has disks but this backup keeps none".into()));
        };
        let disk = |source| StreamError::Disk { epoch: 0, source };
        let specs = decode_announce(rec.payload).map_err(disk)?;
        self.disks = Some(BackupDisks::create(dir, specs).map_err(disk)?);
        Ok(Event::None)
    }

    fn disk_writes(&mut self, rec: Record<'_>) -> Result<Event, StreamError> {
        let epoch = rec.epoch;
        let class = self.open_for(&rec)?.class;
        let Some(disks) = &mut self.disks else {
            return Err(self.proto(format!(
                "DiskWrites record in epoch {epoch} without a Disks record"
            )));
        };
        let disk = |source| StreamError::Disk { epoch, source };
        match class {
            EpochClass::Seed => disks.apply_seed(rec.payload).map_err(disk)?,
            EpochClass::Checkpoint => disks.stage(rec.payload, rec.hold()).map_err(disk)?,
        }
        self.open.as_mut().expect("open checked").disk_records += 1;
        Ok(Event::None)
    }

    fn open_for(&mut self, rec: &Record<'_>) -> Result<&mut Open, StreamError> {
        let open_epoch = self.open.as_ref().map(|o| o.epoch);
        match open_epoch {
            Some(e) if e == rec.epoch => Ok(self.open.as_mut().expect("open")),
            Some(e) => Err(StreamError::Protocol(format!(
                "{:?} record for epoch {} inside epoch {}",
                rec.kind, rec.epoch, e
            ))),
            None => Err(StreamError::Protocol(format!(
                "{:?} record for epoch {} outside any epoch",
                rec.kind, rec.epoch
            ))),
        }
    }

    fn pages(&mut self, rec: Record<'_>) -> Result<Event, StreamError> {
        let epoch = rec.epoch;
        let (class, dirty, entries) = {
            let o = self.open_for(&rec)?;
            o.records += 1;
            (o.class, o.dirty, o.entries)
        };
        let (_, iter) =
            parse_pages(rec.payload).map_err(|source| StreamError::Payload { epoch, source })?;
        let mut n = entries;
        self.entries.clear();
        for e in iter {
            let e = e.map_err(|source| StreamError::Payload { epoch, source })?;
            let gfn = e.gfn;
            let page_err = |reason: String| StreamError::Page { epoch, gfn, reason };
            if gfn >= self.pages {
                return Err(page_err(format!(
                    "gfn outside the domain's {} pages",
                    self.pages
                )));
            }
            let (w, bit) = ((gfn / 64) as usize, 1u64 << (gfn % 64));
            // The seed's pre-copy rounds legitimately resend pages; a
            // checkpoint names each page at most once, within its dirty set.
            if class == EpochClass::Checkpoint {
                if self.seen[w] & bit != 0 {
                    return Err(page_err("page sent twice in one epoch".into()));
                }
                if n + 1 > dirty {
                    return Err(page_err(format!(
                        "more page entries than the {dirty} dirty pages announced"
                    )));
                }
                self.seen[w] |= bit;
                self.gfns.push(gfn);
            }
            n += 1;
            // The payload lies inside the record's (a sub-slice of it).
            let at = e.payload.as_ptr() as usize - rec.payload.as_ptr() as usize;
            self.entries.push(Entry {
                gfn,
                kind: e.kind,
                at,
                len: e.payload.len(),
            });
        }
        self.open.as_mut().expect("open checked").entries = n;
        self.decoders
            .decode(class, &self.entries, rec.payload)
            .map_err(|f| fault(epoch, f))?;
        Ok(Event::None)
    }

    fn state_rec(&mut self, rec: Record<'_>) -> Result<Event, StreamError> {
        let o = self.open_for(&rec)?;
        if o.class == EpochClass::Seed {
            return Err(StreamError::Protocol(
                "State record inside the seed epoch".into(),
            ));
        }
        if o.state.is_some() {
            return Err(StreamError::Protocol(format!(
                "second State record in epoch {}",
                rec.epoch
            )));
        }
        o.state = Some(rec.payload.to_vec());
        Ok(Event::None)
    }

    fn end(&mut self, rec: Record<'_>) -> Result<Event, StreamError> {
        let epoch = rec.epoch;
        let end = EpochEnd::decode(rec.payload)
            .map_err(|source| StreamError::Payload { epoch, source })?;
        let o = self.open_for(&rec)?;
        if end.page_entries != o.entries || end.pages_records != o.records {
            return Err(StreamError::Protocol(format!(
                "epoch {epoch} incomplete: end record says {} entries in {} records, received {} in {}",
                end.page_entries, end.pages_records, o.entries, o.records
            )));
        }
        if end.disk_records != o.disk_records {
            return Err(StreamError::Protocol(format!(
                "epoch {epoch} incomplete: end record says {} DiskWrites records, received {}",
                end.disk_records, o.disk_records
            )));
        }
        let state = match (o.class, o.state.take()) {
            (EpochClass::Seed, _) => None,
            (EpochClass::Checkpoint, Some(s)) if s.len() == end.state_len as usize => Some(s),
            (EpochClass::Checkpoint, Some(s)) => {
                return Err(StreamError::Protocol(format!(
                    "epoch {epoch}: state of {} bytes, end record says {}",
                    s.len(),
                    end.state_len
                )))
            }
            (EpochClass::Checkpoint, None) => {
                return Err(StreamError::Protocol(format!(
                    "epoch {epoch} ended without its State record"
                )))
            }
        };
        // Every page decoded (seed pages written through) before anything
        // is committed or acknowledged; a fault rejects the epoch whole.
        self.decoders.finish().map_err(|f| fault(epoch, f))?;
        // Verified whole: commit. The disks' writes first, sealed in their
        // redo log (the only step that can fail before anything is
        // committed: an I/O error on the backup's own disk rejects the
        // epoch whole, the disks untouched), then the memory (which cannot
        // fail: a sealed epoch is committed in memory too), then the
        // disks' apply.
        let checkpoint = state.is_some();
        if let Some(d) = self.disks.as_mut().filter(|_| checkpoint) {
            d.seal(epoch)
                .map_err(|source| StreamError::Disk { epoch, source })?;
        }
        if let Some(s) = state {
            self.decoders.commit();
            self.state = s;
            self.committed = Some(epoch);
            self.last_pages = self.gfns.len() as u64;
        } else {
            self.seeded = true;
        }
        // The lanes hold nothing now (committed, or the seed written through).
        self.forget_gfns();
        self.open = None;
        self.next_epoch = epoch + 1;
        // Epoch `epoch` is committed in memory; an apply that fails now
        // ends the session with its redo log sealed, and the save (or the
        // next start) replays it, so the saved disks are at `epoch` too.
        if let Some(d) = self.disks.as_mut().filter(|_| checkpoint) {
            d.apply(epoch)
                .map_err(|source| StreamError::Disk { epoch, source })?;
        }
        Ok(Event::Committed(epoch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Compressor, Encoder, PageKind};
    use crate::transport::messages::PagesWriter;
    use crate::transport::record::{add_checksums, write_record, RecordReader};

    const PAGES: u64 = 16;

    fn feed(rx: &mut Receiver, bytes: &[u8]) -> Result<Vec<Event>, StreamError> {
        let mut r = RecordReader::new(bytes);
        let mut ev = Vec::new();
        while let Ok(rec) = r.next() {
            ev.push(rx.on_record(rec)?);
        }
        Ok(ev)
    }

    /// Epoch `e` with the given (gfn, new page) entries encoded against `old`,
    /// plus optionally one raw bad entry appended before the end record.
    fn epoch(
        e: u64,
        old: &[[u8; PAGE_SIZE]],
        new: &[(u64, [u8; PAGE_SIZE])],
        bad: Option<(u64, u8, &[u8])>,
    ) -> Vec<u8> {
        let mut v = Vec::new();
        let class = if e == 0 {
            EpochClass::Seed
        } else {
            EpochClass::Checkpoint
        };
        let dirty = new.len() as u64 + bad.is_some() as u64;
        write_record(
            &mut v,
            RecordKind::EpochBegin,
            e,
            &EpochBegin { class, dirty }.encode(),
        );
        let mut w = PagesWriter::new(e);
        let mut enc = Encoder::new(Compressor::Lz4);
        for (g, p) in new {
            w.push(&mut v, *g, |o| {
                Some(enc.encode(p, Some(&old[*g as usize]), o) as u8)
            });
        }
        if let Some((g, k, payload)) = bad {
            w.push(&mut v, g, |o| {
                o.extend_from_slice(payload);
                Some(k)
            });
        }
        end_epoch(v, w, e)
    }

    /// Closes `w`'s pages and appends epoch `e`'s State (not for the seed)
    /// and EpochEnd records, with the totals `w` counted.
    fn end_epoch(mut v: Vec<u8>, mut w: PagesWriter, e: u64) -> Vec<u8> {
        w.close(&mut v);
        if e > 0 {
            write_record(&mut v, RecordKind::State, e, b"st");
        }
        let end = EpochEnd {
            page_entries: w.entries,
            pages_records: w.records,
            state_len: if e > 0 { 2 } else { 0 },
            disk_records: 0,
        };
        write_record(&mut v, RecordKind::EpochEnd, e, &end.encode());
        // Read without a session key: the Pages records need their CRC.
        add_checksums(&mut v);
        v
    }

    fn image(rx: &Receiver) -> Vec<u8> {
        // SAFETY: the test owns the receiver; nothing writes concurrently.
        unsafe { rx.memory().as_slice() }.to_vec()
    }

    #[test]
    fn deltas_commit_in_place_and_a_bad_entry_leaves_the_replica_untouched() {
        let mut rx = Receiver::new(PAGES).unwrap();
        let zero = vec![[0u8; PAGE_SIZE]; PAGES as usize];
        let mut cur = zero.clone();
        for (g, p) in cur.iter_mut().enumerate() {
            p.iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i * 31 + g) as u8);
        }
        let seed: Vec<_> = (0..PAGES).map(|g| (g, cur[g as usize])).collect();
        assert_eq!(
            feed(&mut rx, &epoch(0, &zero, &seed, None)).unwrap().last(),
            Some(&Event::Committed(0))
        );
        // Epoch 1: small edits (plain deltas) on three pages.
        let mut next = cur.clone();
        for g in [1usize, 5, 9] {
            next[g][100..110].copy_from_slice(b"0123456789");
        }
        let e1: Vec<_> = [1u64, 5, 9]
            .iter()
            .map(|&g| (g, next[g as usize]))
            .collect();
        assert_eq!(
            feed(&mut rx, &epoch(1, &cur, &e1, None)).unwrap().last(),
            Some(&Event::Committed(1))
        );
        assert_eq!(image(&rx), next.concat());
        assert_eq!(rx.state(), b"st");
        cur = next.clone();
        // Epoch 2: valid deltas, then a delta that overruns the page.
        for g in [2usize, 3] {
            next[g][7] ^= 0xff;
        }
        let e2: Vec<_> = [2u64, 3].iter().map(|&g| (g, next[g as usize])).collect();
        let bad: &[u8] = &[0x80, 0x20, 0x10, 1];
        let err = feed(
            &mut rx,
            &epoch(2, &cur, &e2, Some((4, PageKind::Delta as u8, bad))),
        )
        .unwrap_err();
        assert!(err.to_string().contains("page 4"), "{err}");
        assert_eq!(rx.discard_open(), Some(2));
        assert_eq!(
            image(&rx),
            cur.concat(),
            "a rejected epoch changed the replica"
        );
        assert_eq!(rx.committed(), Some(1));
    }

    /// Epoch `e` whose entries each carry their own base (what the primary's
    /// shadow held): `(gfn, new, old)`, in order; `bad` is appended as in
    /// [`epoch`] but placed first, so the other lanes keep decoding after it.
    fn epoch_from(e: u64, entries: &[(u64, Page, Page)], bad: Option<(u64, u8, &[u8])>) -> Vec<u8> {
        let mut v = Vec::new();
        let class = if e == 0 {
            EpochClass::Seed
        } else {
            EpochClass::Checkpoint
        };
        // The seed's pre-copy may send more entries than pages.
        let dirty = if e == 0 {
            0
        } else {
            entries.len() as u64 + bad.is_some() as u64
        };
        write_record(
            &mut v,
            RecordKind::EpochBegin,
            e,
            &EpochBegin { class, dirty }.encode(),
        );
        let mut w = PagesWriter::new(e);
        if let Some((g, k, payload)) = bad {
            w.push(&mut v, g, |o| {
                o.extend_from_slice(payload);
                Some(k)
            });
        }
        let mut enc = Encoder::new(Compressor::Lz4);
        for (g, new, old) in entries {
            w.push(&mut v, *g, |o| Some(enc.encode(new, Some(old), o) as u8));
        }
        end_epoch(v, w, e)
    }

    type Page = [u8; PAGE_SIZE];

    /// The next epoch's changes to `cur`: small edits, whole random pages
    /// and zeroed pages over every stripe; returns the entries (new, old).
    fn churn(cur: &mut [Page], rng: &mut u64, n: usize) -> Vec<(u64, Page, Page)> {
        let mut next = || {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            *rng
        };
        let mut gfns: Vec<u64> = (0..n).map(|_| next() % cur.len() as u64).collect();
        gfns.sort_unstable();
        gfns.dedup();
        gfns.into_iter()
            .map(|g| {
                let old = cur[g as usize];
                let p = &mut cur[g as usize];
                match next() % 3 {
                    0 => p[(next() % 4000) as usize..][..16].fill(next() as u8),
                    1 => p.iter_mut().for_each(|b| *b = next() as u8),
                    _ => p.fill(0),
                }
                (g, *p, old)
            })
            .collect()
    }

    /// Inline and pooled receivers reach the same replica, epoch after
    /// epoch (a seed resending pages, then checkpoints of deltas, whole and
    /// zero pages on every lane); a corrupt entry rejects its epoch whole on
    /// every lane, and the next epoch commits exactly its own pages.
    #[test]
    fn decode_lanes_agree_and_a_fault_rejects_the_epoch_whole() {
        const N: u64 = 700;
        for lanes in [1, 2, 3] {
            let mut rx = Receiver::new(N).unwrap().with_decoders(lanes, &[]);
            assert_eq!(rx.decode_lanes(), lanes);
            let mut rng = 0x1234_5678_9abc_def1u64;
            let mut cur = vec![[0u8; PAGE_SIZE]; N as usize];
            // Seed: every page, then a second round resending some of them.
            let mut seed: Vec<_> = (0..N)
                .map(|g| (g, [g as u8; PAGE_SIZE], [0; PAGE_SIZE]))
                .collect();
            cur.iter_mut()
                .enumerate()
                .for_each(|(g, p)| *p = [g as u8; PAGE_SIZE]);
            seed.extend(churn(&mut cur, &mut rng, 300));
            let ev = feed(&mut rx, &epoch_from(0, &seed, None)).unwrap();
            assert_eq!(ev.last(), Some(&Event::Committed(0)));
            assert!(image(&rx) == cur.concat(), "{lanes} lanes: seed");
            for e in 1..=4 {
                let entries = churn(&mut cur, &mut rng, 250);
                let ev = feed(&mut rx, &epoch_from(e, &entries, None)).unwrap();
                assert_eq!(ev.last(), Some(&Event::Committed(e)));
                assert!(image(&rx) == cur.concat(), "{lanes} lanes: epoch {e}");
                assert_eq!(rx.last_pages(), entries.len() as u64);
            }
            // Epoch 5: many valid pages on every lane, one bad delta first.
            let before = image(&rx);
            let mut scratch = cur.clone();
            let entries: Vec<_> = churn(&mut scratch, &mut rng, 250)
                .into_iter()
                .filter(|(g, ..)| *g != 130)
                .collect();
            let bad: &[u8] = &[0x80, 0x20, 0x10, 1];
            let err = feed(
                &mut rx,
                &epoch_from(5, &entries, Some((130, PageKind::Delta as u8, bad))),
            )
            .unwrap_err();
            assert!(err.to_string().contains("page 130"), "{lanes} lanes: {err}");
            assert_eq!(rx.discard_open(), Some(5));
            assert!(
                image(&rx) == before,
                "{lanes} lanes: a rejected epoch changed the replica"
            );
            assert_eq!(rx.committed(), Some(4));
            // Epoch 5 again, valid: nothing of the rejected one leaks in.
            let entries = churn(&mut cur, &mut rng, 40);
            let ev = feed(&mut rx, &epoch_from(5, &entries, None)).unwrap();
            assert_eq!(ev.last(), Some(&Event::Committed(5)));
            assert!(
                image(&rx) == cur.concat(),
                "{lanes} lanes: epoch 5 after the rejected one"
            );
            assert_eq!(rx.last_pages(), entries.len() as u64);
        }
    }

    /// A checkpoint with no pages: `disk` DiskWrites payloads, an end
    /// record claiming `claim` of them.
    fn disk_epoch(e: u64, disk: &[Vec<u8>], claim: u32) -> Vec<u8> {
        let mut v = Vec::new();
        let class = if e == 0 {
            EpochClass::Seed
        } else {
            EpochClass::Checkpoint
        };
        let begin = EpochBegin { class, dirty: 0 };
        write_record(&mut v, RecordKind::EpochBegin, e, &begin.encode());
        for p in disk {
            write_record(&mut v, RecordKind::DiskWrites, e, p);
        }
        if e > 0 {
            write_record(&mut v, RecordKind::State, e, b"st");
        }
        let end = EpochEnd {
            state_len: if e > 0 { 2 } else { 0 },
            disk_records: claim,
            ..Default::default()
        };
        write_record(&mut v, RecordKind::EpochEnd, e, &end.encode());
        v
    }

    fn ops(o: &[crate::disk::wire::DiskOp]) -> Vec<u8> {
        let mut p = Vec::new();
        crate::disk::wire::encode(&mut p, 0, o);
        p
    }

    #[test]
    fn disk_writes_reach_the_replica_disk_only_at_commit() {
        use crate::disk::session::{encode_announce, replica_disk_path, DiskSpec};
        use crate::disk::wire::DiskOp;
        let dir = tempfile::tempdir().unwrap();
        let mut rx = Receiver::new(PAGES)
            .unwrap()
            .with_disk_dir(dir.path().to_path_buf());
        let mut v = Vec::new();
        let spec = DiskSpec {
            name: "d".into(),
            size: 8192,
            nbd: String::new(),
        };
        write_record(&mut v, RecordKind::Disks, 0, &encode_announce(&[spec]));
        let w = |off, b| DiskOp::Write {
            offset: off,
            data: vec![b; 4096],
        };
        v.extend(disk_epoch(0, &[ops(&[w(0, 1)])], 1));
        v.extend(disk_epoch(1, &[ops(&[w(4096, 2)])], 1));
        feed(&mut rx, &v).unwrap();
        let path = replica_disk_path(dir.path(), "d");
        let disk = std::fs::read(&path).unwrap();
        assert!(disk[..4096].iter().all(|&b| b == 1) && disk[4096..].iter().all(|&b| b == 2));
        // Epoch 2 claims two records but carries one: rejected, and its
        // write never reaches the disk.
        let e = feed(&mut rx, &disk_epoch(2, &[ops(&[w(0, 3)])], 2)).unwrap_err();
        assert!(e.to_string().contains("DiskWrites"), "{e}");
        rx.discard_open();
        assert_eq!(std::fs::read(&path).unwrap(), disk);
        // A torn epoch (no end record) leaves nothing either.
        let torn = disk_epoch(2, &[ops(&[w(0, 4)])], 1);
        let mut r = RecordReader::new(&torn[..]);
        for _ in 0..2 {
            rx.on_record(r.next().unwrap()).unwrap();
        }
        rx.discard_open();
        assert_eq!(std::fs::read(&path).unwrap(), disk);
        assert_eq!(rx.committed(), Some(1));
    }

    /// Large writes are staged in the reader's buffers (not copied): they
    /// still reach the disk only at commit, a torn epoch leaves nothing,
    /// and what lands is exactly what was sent though the reader read on.
    #[test]
    fn held_disk_writes_reach_the_disk_only_at_commit() {
        use crate::disk::session::{encode_announce, replica_disk_path, DiskSpec};
        use crate::disk::wire::DiskOp;
        const MB: usize = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let mut rx = Receiver::new(PAGES)
            .unwrap()
            .with_disk_dir(dir.path().to_path_buf());
        let spec = DiskSpec {
            name: "d".into(),
            size: 4 * MB as u64,
            nbd: String::new(),
        };
        let w = |off: usize, n: usize, b: u8| DiskOp::Write {
            offset: off as u64,
            data: (0..n).map(|i| b ^ (i / 4096) as u8).collect(),
        };
        // Held (>= 256 KiB), copied (4 KiB), held: applied in this order.
        let epoch_ops = |b: u8| {
            vec![
                ops(&[w(0, MB, b)]),
                ops(&[w(MB / 2, 4096, b + 1)]),
                ops(&[w(3 * MB, 600 << 10, b + 2), w(MB - 4096, 8192, b + 3)]),
            ]
        };
        let mut want = vec![0u8; 4 * MB];
        let put = |want: &mut Vec<u8>, o: &DiskOp| {
            if let DiskOp::Write { offset, data } = o {
                want[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            }
        };
        let mut v = Vec::new();
        write_record(&mut v, RecordKind::Disks, 0, &encode_announce(&[spec]));
        v.extend(disk_epoch(0, &[], 0));
        v.extend(disk_epoch(1, &epoch_ops(10), 3));
        // Read in the reader's own steps: feed() gives it the whole stream.
        feed(&mut rx, &v).unwrap();
        for o in [
            w(0, MB, 10),
            w(MB / 2, 4096, 11),
            w(3 * MB, 600 << 10, 12),
            w(MB - 4096, 8192, 13),
        ] {
            put(&mut want, &o);
        }
        let path = replica_disk_path(dir.path(), "d");
        assert!(std::fs::read(&path).unwrap() == want, "epoch 1 on disk");
        // Epoch 2 torn after its three records: nothing of it lands.
        let full = disk_epoch(2, &epoch_ops(50), 3);
        let mut r = RecordReader::new(&full[..]);
        for _ in 0..4 {
            rx.on_record(r.next().unwrap()).unwrap();
        }
        rx.discard_open();
        assert!(
            std::fs::read(&path).unwrap() == want,
            "a torn epoch reached the disk"
        );
        // Sent again whole, it commits.
        feed(&mut rx, &full).unwrap();
        for o in [
            w(0, MB, 50),
            w(MB / 2, 4096, 51),
            w(3 * MB, 600 << 10, 52),
            w(MB - 4096, 8192, 53),
        ] {
            put(&mut want, &o);
        }
        assert!(std::fs::read(&path).unwrap() == want, "epoch 2 on disk");
        assert_eq!(rx.committed(), Some(2));
    }

    #[test]
    fn disk_records_out_of_place_are_refused() {
        use crate::disk::session::{encode_announce, DiskSpec};
        let spec = || {
            encode_announce(&[DiskSpec {
                name: "d".into(),
                size: 8192,
                nbd: String::new(),
            }])
        };
        let mut rx = Receiver::new(PAGES).unwrap();
        let mut v = Vec::new();
        write_record(&mut v, RecordKind::Disks, 0, &spec());
        let e = feed(&mut rx, &v).unwrap_err();
        assert!(e.to_string().contains("keeps none"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let mut rx = Receiver::new(PAGES)
            .unwrap()
            .with_disk_dir(dir.path().to_path_buf());
        let e = feed(&mut rx, &disk_epoch(0, &[ops(&[])], 1)).unwrap_err();
        assert!(e.to_string().contains("without a Disks record"), "{e}");

        let mut rx = Receiver::new(PAGES)
            .unwrap()
            .with_disk_dir(dir.path().to_path_buf());
        let mut v = Vec::new();
        write_record(&mut v, RecordKind::Disks, 0, &spec());
        write_record(&mut v, RecordKind::Disks, 0, &spec());
        let e = feed(&mut rx, &v).unwrap_err();
        assert!(e.to_string().contains("second Disks"), "{e}");
    }
}
