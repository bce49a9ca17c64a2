//! The slot/credit protocol shared by the `uring` and `rdma` transports.
//! Pure bookkeeping: no I/O, no unsafe.
//!
//! The backup owns a receive ring of `slots` × `slot_size` bytes, announced
//! once at connect time ([`Announce`]). The primary's record stream is laid
//! into the ring byte by byte: stream offset `p` lands at ring offset
//! `p mod (slots × slot_size)`, so slot `k` of the ring holds stream bytes
//! `[q × slot_size, (q+1) × slot_size)` for every *slot sequence number* `q`
//! with `q mod slots = k`. Each transfer (a *chunk*) stays inside one slot
//! and is named by a 32-bit tag ([`ChunkTag`], the RDMA immediate): the slot
//! index and the length. Its offset inside the slot is implied by the stream
//! position, which both ends track.
//!
//! Credits: the primary may write into slot sequence `q` only while
//! `q < released + slots`, `released` being the number of slot sequences the
//! backup has handed back. The backup hands a slot back ([`Credit`]) once
//! its parser has consumed every byte of it, so a record is read in place
//! from the ring until it has been applied. Credits are returned in order:
//! `{first, count}` must start exactly at the sender's `released`.
//!
//! Because a record may straddle slots (and the ring's end), the backup maps
//! its ring twice back to back (see the transports) and the parser reads
//! a record as one slice. For that a whole record must fit in the window
//! behind a partly consumed slot: `(slots - 1) × slot_size >= MAX_RECORD`,
//! which [`Announce::validate`] enforces.
//!
//! Invariants checked against a hostile peer, each failing with a typed
//! [`SlotError`] and never a panic: a chunk names the slot the stream is in,
//! is non-empty, ends inside that slot and inside the credited window; a
//! credit starts at the sender's first outstanding slot, is non-empty and
//! releases only slots the sender has completely written.

use crate::transport::wire::{Cursor, PayloadError, HEADER_LEN, MAX_PAYLOAD, TAG_LEN};

/// Largest record on the wire (header + largest payload + tag).
pub const MAX_RECORD: u64 = (HEADER_LEN + MAX_PAYLOAD + TAG_LEN) as u64;
/// Bits of a [`ChunkTag`] holding `len - 1`; the rest hold the slot index.
pub const LEN_BITS: u32 = 20;
/// Largest slot: a chunk length must fit in [`LEN_BITS`].
pub const MAX_SLOT_SIZE: u32 = 1 << LEN_BITS;
/// Most slots: the slot index must fit in the remaining 12 bits.
pub const MAX_SLOTS: u32 = 1 << (32 - LEN_BITS);
/// Smallest slot accepted (keeps per-chunk overhead sane).
pub const MIN_SLOT_SIZE: u32 = 4096;

/// Defaults of the ring a backup offers: 16 × 1 MiB = 16 MiB (bigger slots
/// mean fewer chunks: `bench-transport` measured 0.68 CPU s per replicated
/// GiB over uring with 1 MiB slots against 0.87 with 256 KiB ones).
pub const DEFAULT_SLOTS: u32 = 16;
pub const DEFAULT_SLOT_SIZE: u32 = 1 << 20;
/// Slots of a uring backup's ring: the fewest 1 MiB slots that hold a
/// whole record behind a partly read slot, plus one. uring is paced by
/// TCP's window, not by the ring, so a bigger ring buys no throughput and
/// costs cache: the backup's parser reads each byte right after the kernel
/// wrote it, and a 16 MiB ring cycles through more memory than the caches
/// keep (docs/throughput.md, "uring without credits").
pub const URING_SLOTS: u32 = 6;

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum SlotError {
    #[error("slot count {0} out of range 2..={MAX_SLOTS}")]
    SlotCount(u32),
    #[error(
        "slot size {0} out of range {MIN_SLOT_SIZE}..={MAX_SLOT_SIZE} or not a multiple of 4096"
    )]
    SlotSize(u32),
    #[error("ring of {slots} × {slot_size} bytes cannot hold a whole record of {MAX_RECORD} bytes behind a partly read slot (need (slots-1) × slot_size >= {MAX_RECORD})")]
    RingTooSmall { slots: u32, slot_size: u32 },
    #[error("chunk names slot {got}, but the stream is at slot {want}")]
    WrongSlot { got: u32, want: u32 },
    #[error("chunk of {len} bytes at offset {offset} overruns its slot of {slot_size} bytes")]
    ChunkOverrun {
        len: u32,
        offset: u32,
        slot_size: u32,
    },
    #[error(
        "chunk into slot sequence {seq} without a credit (only {released} + {slots} credited)"
    )]
    NoCredit { seq: u64, released: u64, slots: u32 },
    #[error("credit starting at slot sequence {first} repeats slots already credited (next expected {want})")]
    DuplicateCredit { first: u64, want: u64 },
    #[error("credit starting at slot sequence {first} skips slots (next expected {want})")]
    CreditGap { first: u64, want: u64 },
    #[error("credit of {count} slots from {first} releases slots not yet completely sent (only {completed} completed)")]
    CreditOverflow {
        first: u64,
        count: u32,
        completed: u64,
    },
    #[error("empty credit")]
    EmptyCredit,
    #[error("credit returns {chunks} chunks, but only {outstanding} are outstanding")]
    ChunkCreditOverflow { chunks: u32, outstanding: u32 },
    #[error("chunk header carries sequence {got}, expected {want} (stream out of sync)")]
    ChunkSequence { got: u32, want: u32 },
    #[error(transparent)]
    Payload(#[from] PayloadError),
}

/// The backup's ring, as announced to the primary. `addr` and `rkey` are
/// the RDMA target of the ring (zero for `uring`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announce {
    pub slots: u32,
    pub slot_size: u32,
    pub addr: u64,
    pub rkey: u32,
    /// rdma: the port the backup's rdma_cm listener waits on (0 for uring).
    pub cm_port: u16,
}

impl Announce {
    pub const LEN: usize = 22;

    pub fn new(slots: u32, slot_size: u32) -> Result<Self, SlotError> {
        let a = Announce {
            slots,
            slot_size,
            addr: 0,
            rkey: 0,
            cm_port: 0,
        };
        a.validate()?;
        Ok(a)
    }

    pub fn validate(&self) -> Result<(), SlotError> {
        if !(2..=MAX_SLOTS).contains(&self.slots) {
            return Err(SlotError::SlotCount(self.slots));
        }
        if !(MIN_SLOT_SIZE..=MAX_SLOT_SIZE).contains(&self.slot_size) || self.slot_size % 4096 != 0
        {
            return Err(SlotError::SlotSize(self.slot_size));
        }
        if (self.slots as u64 - 1) * (self.slot_size as u64) < MAX_RECORD {
            return Err(SlotError::RingTooSmall {
                slots: self.slots,
                slot_size: self.slot_size,
            });
        }
        Ok(())
    }

    /// Bytes of the ring.
    pub fn ring_len(&self) -> usize {
        self.slots as usize * self.slot_size as usize
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&self.slots.to_le_bytes());
        b[4..8].copy_from_slice(&self.slot_size.to_le_bytes());
        b[8..16].copy_from_slice(&self.addr.to_le_bytes());
        b[16..20].copy_from_slice(&self.rkey.to_le_bytes());
        b[20..22].copy_from_slice(&self.cm_port.to_le_bytes());
        b
    }

    /// Decodes and validates an announcement from the wire.
    pub fn decode(p: &[u8]) -> Result<Self, SlotError> {
        let mut c = Cursor::new(p, "Slots");
        let a = Announce {
            slots: c.u32()?,
            slot_size: c.u32()?,
            addr: c.u64()?,
            rkey: c.u32()?,
            cm_port: c.u16()?,
        };
        c.finish()?;
        a.validate()?;
        Ok(a)
    }
}

/// A chunk's 32-bit name: slot index in the high 12 bits, `len - 1` in the
/// low 20 (the RDMA immediate; the `uring` chunk header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkTag {
    pub slot: u32,
    pub len: u32,
}

impl ChunkTag {
    /// Encodes; `len` must be in 1..=MAX_SLOT_SIZE and `slot` < MAX_SLOTS
    /// (guaranteed by a validated [`Announce`]).
    pub fn encode(&self) -> u32 {
        debug_assert!(self.len >= 1 && self.len <= MAX_SLOT_SIZE && self.slot < MAX_SLOTS);
        (self.slot << LEN_BITS) | (self.len - 1)
    }

    /// Every u32 decodes to some tag; [`RingState::on_chunk`] judges it.
    pub fn decode(v: u32) -> Self {
        ChunkTag {
            slot: v >> LEN_BITS,
            len: (v & (MAX_SLOT_SIZE - 1)) + 1,
        }
    }
}

/// Slots handed back by the backup: sequence numbers `first..first+count`;
/// and `chunks`, the chunks it took since its last credit (rdma: their
/// RECVs are posted again; see [`ChunkBudget`]). A credit may carry chunks
/// and no slots, never neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credit {
    pub first: u64,
    pub count: u32,
    pub chunks: u32,
}

impl Credit {
    pub const LEN: usize = 16;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&self.first.to_le_bytes());
        b[8..12].copy_from_slice(&self.count.to_le_bytes());
        b[12..16].copy_from_slice(&self.chunks.to_le_bytes());
        b
    }

    pub fn decode(p: &[u8]) -> Result<Self, SlotError> {
        let mut c = Cursor::new(p, "Credit");
        let v = Credit {
            first: c.u64()?,
            count: c.u32()?,
            chunks: c.u32()?,
        };
        c.finish()?;
        Ok(v)
    }
}

/// Where a chunk goes: ring offset and length (and its tag for the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub ring_offset: usize,
    pub len: usize,
    pub tag: ChunkTag,
}

/// The primary's side: stream position and credits.
///
/// Invariant: every byte it places lies in a slot sequence
/// `< released + slots`, i.e. never more outstanding slots than credits.
#[derive(Debug, Clone)]
pub struct CreditWindow {
    slots: u32,
    slot_size: u32,
    /// Stream bytes placed so far.
    pos: u64,
    /// Slot sequences credited back.
    released: u64,
}

impl CreditWindow {
    pub fn new(a: &Announce) -> Self {
        CreditWindow {
            slots: a.slots,
            slot_size: a.slot_size,
            pos: 0,
            released: 0,
        }
    }

    pub fn pos(&self) -> u64 {
        self.pos
    }

    /// Slot sequences currently written to but not yet credited back.
    pub fn outstanding(&self) -> u64 {
        self.pos.div_ceil(self.slot_size as u64) - self.released
    }

    /// Places up to `want` (> 0) bytes at the current position, or `None`
    /// when the next byte needs a slot the backup has not credited yet.
    /// Call [`Self::advance`] once the chunk is on its way.
    pub fn place(&self, want: usize) -> Option<Placement> {
        let s = self.slot_size as u64;
        let seq = self.pos / s;
        if want == 0 || seq >= self.released + self.slots as u64 {
            return None;
        }
        let off = self.pos % s;
        let len = (want as u64).min(s - off);
        let slot = (seq % self.slots as u64) as u32;
        Some(Placement {
            ring_offset: slot as usize * self.slot_size as usize + off as usize,
            len: len as usize,
            tag: ChunkTag {
                slot,
                len: len as u32,
            },
        })
    }

    pub fn advance(&mut self, p: &Placement) {
        self.pos += p.len as u64;
    }

    /// The slot sequence the next placed byte lands in.
    pub fn next_seq(&self) -> u64 {
        self.pos / self.slot_size as u64
    }

    /// Applies a credit from the wire.
    pub fn on_credit(&mut self, c: Credit) -> Result<(), SlotError> {
        if c.count == 0 && c.chunks == 0 {
            return Err(SlotError::EmptyCredit);
        }
        if c.first < self.released {
            return Err(SlotError::DuplicateCredit {
                first: c.first,
                want: self.released,
            });
        }
        if c.first > self.released {
            return Err(SlotError::CreditGap {
                first: c.first,
                want: self.released,
            });
        }
        let completed = self.pos / self.slot_size as u64;
        match self.released.checked_add(c.count as u64) {
            Some(r) if r <= completed => {
                self.released = r;
                Ok(())
            }
            _ => Err(SlotError::CreditOverflow {
                first: c.first,
                count: c.count,
                completed,
            }),
        }
    }
}

/// RECVs the backup keeps posted for chunks landing in a ring of `slots`
/// slots (rdma: one RECV is consumed per chunk).
pub fn recvs_for(slots: u32) -> u32 {
    slots.saturating_mul(2)
}

/// The primary's count of chunks written and not yet returned by a
/// credit, bounded by the RECVs the backup keeps posted (rdma consumes one
/// RECV per chunk).
///
/// Why the bound suffices: the backup keeps [`recvs_for`]`(slots)` RECVs
/// posted, reposts each as it takes its completion, and only then counts
/// the chunk into its next credit ([`RingState::on_chunk_taken`]). So the
/// chunks in flight, or landed and not yet taken, are at most the
/// outstanding ones, and a primary that keeps those within the limit
/// always finds a RECV posted: no RNR NAK, no reliance on RNR retries.
/// The backup returns chunks without waiting for a slot to fill
/// ([`RingState::take_credit`]), so many small chunks cannot deadlock a
/// slot.
#[derive(Debug, Clone)]
pub struct ChunkBudget {
    limit: u32,
    outstanding: u32,
}

impl ChunkBudget {
    pub fn new(limit: u32) -> Self {
        ChunkBudget {
            limit: limit.max(1),
            outstanding: 0,
        }
    }

    /// Another chunk may be written now.
    pub fn has_room(&self) -> bool {
        self.outstanding < self.limit
    }

    /// Chunks written and not yet returned.
    pub fn outstanding(&self) -> u32 {
        self.outstanding
    }

    /// A chunk was written.
    pub fn on_chunk(&mut self) {
        self.outstanding += 1;
    }

    /// A credit from the wire returns `c.chunks` chunks; more than are
    /// outstanding is a peer that broke the protocol.
    pub fn on_credit(&mut self, c: Credit) -> Result<(), SlotError> {
        match self.outstanding.checked_sub(c.chunks) {
            Some(left) => {
                self.outstanding = left;
                Ok(())
            }
            None => Err(SlotError::ChunkCreditOverflow {
                chunks: c.chunks,
                outstanding: self.outstanding,
            }),
        }
    }
}

/// The backup's side: what has landed in the ring, what the parser has
/// consumed, what has been credited back.
///
/// Invariants: `credited*slot_size <= read <= write`, and
/// `write <= (credited + slots) * slot_size`, so no accepted chunk ever lies
/// outside the ring or over bytes the parser has not consumed.
#[derive(Debug, Clone)]
pub struct RingState {
    slots: u32,
    slot_size: u32,
    write: u64,
    read: u64,
    credited: u64,
    /// Chunks taken (their RECVs reposted) since the last credit.
    chunks_taken: u32,
    /// A credit goes back once this many chunks were taken.
    chunk_credit_at: u32,
}

impl RingState {
    pub fn new(a: &Announce) -> Self {
        RingState {
            slots: a.slots,
            slot_size: a.slot_size,
            write: 0,
            read: 0,
            credited: 0,
            chunks_taken: 0,
            chunk_credit_at: (recvs_for(a.slots) / 4).max(1),
        }
    }

    pub fn ring_len(&self) -> usize {
        self.slots as usize * self.slot_size as usize
    }

    /// Stream bytes received and not yet consumed.
    pub fn available(&self) -> u64 {
        self.write - self.read
    }

    /// Ring offset of the next unconsumed byte.
    pub fn read_offset(&self) -> usize {
        (self.read % self.ring_len() as u64) as usize
    }

    /// Stream bytes consumed.
    pub fn consumed(&self) -> u64 {
        self.read
    }

    /// Where the next chunk may land: the rest of the current slot, if the
    /// sender holds its credit (always true for a sender that follows the
    /// protocol and a receiver that keeps up).
    pub fn next_room(&self) -> Placement {
        let s = self.slot_size as u64;
        let seq = self.write / s;
        let off = self.write % s;
        let slot = (seq % self.slots as u64) as u32;
        let len = (s - off) as u32;
        Placement {
            ring_offset: slot as usize * self.slot_size as usize + off as usize,
            len: len as usize,
            tag: ChunkTag { slot, len },
        }
    }

    /// Judges a chunk tag from the wire. On success the chunk's bytes belong
    /// at the returned placement; call [`Self::on_landed`] once they are there.
    pub fn on_chunk(&self, raw: u32) -> Result<Placement, SlotError> {
        let tag = ChunkTag::decode(raw);
        let s = self.slot_size as u64;
        let seq = self.write / s;
        let off = (self.write % s) as u32;
        let want = (seq % self.slots as u64) as u32;
        if tag.slot != want {
            return Err(SlotError::WrongSlot {
                got: tag.slot,
                want,
            });
        }
        if tag.len > self.slot_size - off {
            return Err(SlotError::ChunkOverrun {
                len: tag.len,
                offset: off,
                slot_size: self.slot_size,
            });
        }
        if seq >= self.credited + self.slots as u64 {
            return Err(SlotError::NoCredit {
                seq,
                released: self.credited,
                slots: self.slots,
            });
        }
        Ok(Placement {
            ring_offset: want as usize * self.slot_size as usize + off as usize,
            len: tag.len as usize,
            tag,
        })
    }

    /// `n` bytes of an accepted chunk have landed (`n` at most what is left
    /// of its placement; the caller tracks partial arrivals).
    pub fn on_landed(&mut self, n: usize) {
        self.write += n as u64;
        debug_assert!(self.write <= (self.credited + self.slots as u64) * self.slot_size as u64);
    }

    /// The parser is done with `n` more bytes. Panics if more than have
    /// landed: a caller bug, not a peer's.
    pub fn consume(&mut self, n: usize) {
        assert!(n as u64 <= self.available(), "consumed past what landed");
        self.read += n as u64;
    }

    /// Bytes the sender may still place, as far as this side knows: the
    /// credited window past what has landed. The sender's own view is the
    /// same or smaller (credits in flight), and bytes it placed but that
    /// have not landed yet count here as room.
    pub fn sender_room(&self) -> u64 {
        (self.credited + self.slots as u64) * self.slot_size as u64 - self.write
    }

    /// Whether a reader about to wait for more bytes must credit first.
    /// It need not while the sender still has at least half the ring of
    /// room and owes no chunk credit: a sender blocked on credits has
    /// then placed bytes that have not landed yet (or a credit is on its
    /// way to it), so the wait ends without a credit. Deferring until half
    /// the ring is consumed sends one credit per half ring instead of one
    /// per slot (each a record on the wire and a wakeup at the primary).
    /// When room is short, a credit is due even if nothing is creditable
    /// yet: [`Self::take_credit`] then sends nothing, and the record being
    /// awaited fits the room left (a validated announcement guarantees it).
    pub fn credit_due_before_wait(&self) -> bool {
        self.sender_room() < self.ring_len() as u64 / 2 || self.chunks_taken >= self.chunk_credit_at
    }

    /// Where the next bytes of the stream may land when the receiver itself
    /// decides (uring: it reads the TCP stream, whose flow control stands
    /// in for credits): ring offset of the write position and the bytes
    /// from there up to the ring's end or the end of the room, whichever
    /// comes first. Call [`Self::free_consumed`] first, so the room counts
    /// every slot the parser is done with.
    pub fn landing_room(&self) -> (usize, usize) {
        let off = (self.write % self.ring_len() as u64) as usize;
        let len = (self.ring_len() - off).min(self.sender_room() as usize);
        (off, len)
    }

    /// Frees every slot the parser is done with, without a credit on the
    /// wire (a receiver that chooses where bytes land: uring).
    pub fn free_consumed(&mut self) {
        self.credited = self.read / self.slot_size as u64;
        self.chunks_taken = 0;
    }

    /// Slots fully consumed and not yet credited back.
    pub fn creditable(&self) -> u64 {
        self.read / self.slot_size as u64 - self.credited
    }

    /// A chunk's completion was taken and its RECV posted again (rdma).
    pub fn on_chunk_taken(&mut self) {
        self.chunks_taken += 1;
    }

    /// Slots now fully consumed and not yet credited back, with the chunks
    /// taken since the last credit, as one credit: when a slot is done, or
    /// when a quarter of the posted RECVs' worth of chunks were taken
    /// (small chunks return before their slot fills).
    pub fn take_credit(&mut self) -> Option<Credit> {
        let done = self.read / self.slot_size as u64;
        if done <= self.credited && self.chunks_taken < self.chunk_credit_at {
            return None;
        }
        let c = Credit {
            first: self.credited,
            count: (done - self.credited) as u32,
            chunks: self.chunks_taken,
        };
        self.credited = done;
        self.chunks_taken = 0;
        Some(c)
    }

    /// Whether a record of `len` bytes starting at the read position can
    /// ever be held whole in the ring (false means the peer is hostile or
    /// the announcement was not validated).
    pub fn fits(&self, len: u64) -> bool {
        let off = self.read % self.slot_size as u64;
        off + len <= self.slots as u64 * self.slot_size as u64
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn chunk_budget_counts_chunks_until_a_credit_returns_them() {
        let mut b = ChunkBudget::new(4);
        for _ in 0..4 {
            assert!(b.has_room());
            b.on_chunk();
        }
        assert!(!b.has_room(), "4 chunks outstanding with 4 RECVs posted");
        let c = |chunks| Credit {
            first: 0,
            count: 0,
            chunks,
        };
        b.on_credit(c(3)).unwrap();
        assert_eq!(b.outstanding(), 1);
        assert_eq!(
            b.on_credit(c(2)),
            Err(SlotError::ChunkCreditOverflow {
                chunks: 2,
                outstanding: 1
            })
        );
        b.on_credit(c(1)).unwrap();
        assert!(b.has_room());
    }

    /// A stream of tiny records (many chunks per slot) between a primary
    /// that keeps its chunk budget and a backup that takes each chunk
    /// (reposting its RECV), parses at its own pace and credits as
    /// [`RingState::take_credit`] says: a RECV is always posted when a
    /// chunk arrives, and nothing deadlocks inside a slot.
    #[test]
    fn small_chunks_never_outrun_the_posted_recvs() {
        let ann = Announce::new(8, 1 << 20).unwrap();
        let (mut w, mut r) = (CreditWindow::new(&ann), RingState::new(&ann));
        let mut budget = ChunkBudget::new(recvs_for(ann.slots));
        let mut posted = recvs_for(ann.slots);
        let mut in_flight = std::collections::VecDeque::new();
        let (mut sent, mut stalls) = (0u64, 0);
        while sent < 8 << 20 {
            let room = budget.has_room().then(|| w.place(100)).flatten();
            if let Some(p) = room {
                assert!(posted > 0, "chunk {sent} arrives with no RECV posted");
                posted -= 1;
                in_flight.push_back(p);
                budget.on_chunk();
                w.advance(&p);
                sent += p.len as u64;
                continue;
            }
            // The primary waits; the backup takes what arrived, parses it
            // and credits.
            stalls += 1;
            assert!(
                !in_flight.is_empty(),
                "deadlock: nothing in flight, no room"
            );
            while let Some(p) = in_flight.pop_front() {
                assert_eq!(r.on_chunk(p.tag.encode()).unwrap(), p);
                r.on_landed(p.len);
                posted += 1;
                r.on_chunk_taken();
            }
            r.consume(r.available() as usize);
            if let Some(c) = r.take_credit() {
                w.on_credit(c).unwrap();
                budget.on_credit(c).unwrap();
            }
        }
        assert!(
            stalls > 0,
            "the budget never bound: the test proves nothing"
        );
    }

    use super::*;
    use proptest::prelude::*;

    fn ann(slots: u32, size: u32) -> Announce {
        Announce {
            slots,
            slot_size: size,
            addr: 0,
            rkey: 0,
            cm_port: 0,
        }
    }

    #[test]
    fn announce_round_trip_and_validation() {
        let a = Announce {
            addr: 0x7f00_1234_5000,
            rkey: 77,
            cm_port: 4791,
            ..Announce::new(DEFAULT_SLOTS, DEFAULT_SLOT_SIZE).unwrap()
        };
        assert_eq!(Announce::decode(&a.encode()).unwrap(), a);
        assert_eq!(
            Announce::decode(&ann(1, 1 << 20).encode()),
            Err(SlotError::SlotCount(1))
        );
        assert_eq!(
            Announce::decode(&ann(64, 5000).encode()),
            Err(SlotError::SlotSize(5000))
        );
        assert_eq!(
            Announce::decode(&ann(64, 2 << 20).encode()),
            Err(SlotError::SlotSize(2 << 20))
        );
        assert!(matches!(
            Announce::decode(&ann(8, 256 << 10).encode()),
            Err(SlotError::RingTooSmall { .. })
        ));
        assert!(matches!(
            Announce::decode(&a.encode()[..21]),
            Err(SlotError::Payload(_))
        ));
    }

    #[test]
    fn tags_round_trip_at_the_edges() {
        for (slot, len) in [(0, 1), (0, MAX_SLOT_SIZE), (MAX_SLOTS - 1, 1), (5, 4096)] {
            let t = ChunkTag { slot, len };
            assert_eq!(ChunkTag::decode(t.encode()), t);
        }
    }

    fn pair(slots: u32, size: u32) -> (CreditWindow, RingState) {
        let a = Announce::new(slots, size).unwrap();
        (CreditWindow::new(&a), RingState::new(&a))
    }

    #[test]
    fn sender_stops_at_the_credit_window_and_resumes_on_credit() {
        let (mut w, mut r) = pair(32, 256 << 10);
        let s = 256usize << 10;
        for _ in 0..32 {
            let p = w.place(usize::MAX).unwrap();
            assert_eq!(p.len, s);
            assert_eq!(r.on_chunk(p.tag.encode()).unwrap(), p);
            r.on_landed(p.len);
            w.advance(&p);
        }
        assert_eq!(w.outstanding(), 32);
        assert!(w.place(1).is_none(), "33rd slot without a credit");
        r.consume(s + 10);
        let c = r.take_credit().unwrap();
        assert_eq!(
            c,
            Credit {
                first: 0,
                count: 1,
                chunks: 0
            }
        );
        assert!(r.take_credit().is_none());
        w.on_credit(c).unwrap();
        let p = w.place(100).unwrap();
        assert_eq!((p.ring_offset, p.len, p.tag.slot), (0, 100, 0));
    }

    #[test]
    fn hostile_chunks_are_rejected() {
        let (_, mut r) = pair(32, 256 << 10);
        assert_eq!(
            r.on_chunk(ChunkTag { slot: 3, len: 10 }.encode()),
            Err(SlotError::WrongSlot { got: 3, want: 0 })
        );
        r.on_landed(100);
        assert_eq!(
            r.on_chunk(
                ChunkTag {
                    slot: 0,
                    len: 256 << 10
                }
                .encode()
            ),
            Err(SlotError::ChunkOverrun {
                len: 256 << 10,
                offset: 100,
                slot_size: 256 << 10
            })
        );
        // Fill the ring, then write once more without a credit.
        let mut r = RingState::new(&Announce::new(32, 256 << 10).unwrap());
        for i in 0..32 {
            let p = r
                .on_chunk(
                    ChunkTag {
                        slot: i,
                        len: 256 << 10,
                    }
                    .encode(),
                )
                .unwrap();
            r.on_landed(p.len);
        }
        assert!(matches!(
            r.on_chunk(ChunkTag { slot: 0, len: 1 }.encode()),
            Err(SlotError::NoCredit { seq: 32, .. })
        ));
    }

    #[test]
    fn hostile_credits_are_rejected() {
        let (mut w, _) = pair(32, 256 << 10);
        let p = w.place(3 * (256 << 10)).unwrap();
        w.advance(&p);
        let p = w.place(3 * (256 << 10)).unwrap();
        w.advance(&p);
        let p = w.place(10).unwrap();
        w.advance(&p); // slots 0 and 1 complete, 2 partly written
        assert_eq!(
            w.on_credit(Credit {
                first: 0,
                count: 3,
                chunks: 0
            }),
            Err(SlotError::CreditOverflow {
                first: 0,
                count: 3,
                completed: 2
            })
        );
        assert_eq!(
            w.on_credit(Credit {
                first: 0,
                count: 0,
                chunks: 0
            }),
            Err(SlotError::EmptyCredit)
        );
        assert_eq!(
            w.on_credit(Credit {
                first: 1,
                count: 1,
                chunks: 0
            }),
            Err(SlotError::CreditGap { first: 1, want: 0 })
        );
        w.on_credit(Credit {
            first: 0,
            count: 1,
            chunks: 0,
        })
        .unwrap();
        assert_eq!(
            w.on_credit(Credit {
                first: 0,
                count: 1,
                chunks: 0
            }),
            Err(SlotError::DuplicateCredit { first: 0, want: 1 })
        );
        assert!(matches!(
            w.on_credit(Credit {
                chunks: 0,
                first: 1,
                count: u32::MAX
            }),
            Err(SlotError::CreditOverflow { .. })
        ));
        assert!(matches!(
            Credit::decode(&[0; 15]),
            Err(SlotError::Payload(_))
        ));
    }

    /// A receiver that chooses where bytes land (uring): what it lands at
    /// [`RingState::landing_room`] never covers a byte the parser has not
    /// consumed, and there is room whenever less than a whole record's
    /// worth waits unconsumed (so a reader waiting for a record can always
    /// read on).
    #[test]
    fn landing_room_stays_behind_the_parser() {
        let a = Announce::new(URING_SLOTS, DEFAULT_SLOT_SIZE).unwrap();
        let mut r = RingState::new(&a);
        let ring = r.ring_len() as u64;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |m: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % m
        };
        let (mut wrapped, mut full) = (0, 0);
        for _ in 0..20_000 {
            r.free_consumed();
            let (off, len) = r.landing_room();
            assert_eq!(off as u64, r.write % ring);
            assert!(off + len <= ring as usize, "past the ring's end");
            assert!(
                r.write + len as u64 - r.consumed() <= ring,
                "lands over unconsumed bytes"
            );
            if r.available() < MAX_RECORD {
                assert!(len > 0, "no room with {} bytes unconsumed", r.available());
            }
            if len == 0 {
                full += 1;
            } else {
                // Often all the room: up to the ring's end or a full ring.
                let n = if next(3) == 0 {
                    len as u64
                } else {
                    1 + next(len as u64)
                };
                wrapped += ((r.write % ring) + n == ring) as u32;
                r.on_landed(n as usize);
            }
            let c = if next(3) == 0 {
                0
            } else {
                next(r.available() + 1)
            };
            r.consume(c as usize);
        }
        assert!(
            wrapped > 0 && full > 0,
            "the walk never met the ring's end or a full ring"
        );
    }

    proptest! {
        /// A sender and a receiver following the protocol through arbitrary
        /// send sizes and consumption steps: the stream arrives intact, the
        /// sender never holds more slots than credits, and every chunk stays
        /// inside the ring and inside one slot.
        #[test]
        fn protocol_moves_a_stream_intact(
            slots in 18u32..40,
            size_pages in 64u32..=256,
            sends in proptest::collection::vec(1usize..1_000_000, 1..24),
            consume_steps in proptest::collection::vec(1usize..1_500_000, 1..40),
        ) {
            let size = size_pages * 4096;
            let (mut w, mut r) = pair(slots, size);
            let ring_len = r.ring_len();
            let mut ring = vec![0u8; ring_len];
            let total: usize = sends.iter().sum();
            let stream: Vec<u8> = (0..total).map(|i| (i * 31 + i / 7) as u8).collect();
            let mut sent = 0usize;
            let mut got = Vec::with_capacity(total);
            let mut step = 0usize;
            while got.len() < total {
                // Sender: as much as credits allow.
                while sent < total {
                    let Some(p) = w.place(total - sent) else { break };
                    prop_assert!(p.ring_offset + p.len <= ring_len);
                    prop_assert!(p.ring_offset / size as usize == (p.ring_offset + p.len - 1) / size as usize);
                    let q = r.on_chunk(p.tag.encode()).unwrap();
                    prop_assert_eq!(q, p);
                    ring[p.ring_offset..p.ring_offset + p.len].copy_from_slice(&stream[sent..sent + p.len]);
                    r.on_landed(p.len);
                    w.advance(&p);
                    sent += p.len;
                    prop_assert!(w.outstanding() <= slots as u64);
                }
                // Receiver: consume some of what landed, credit back.
                let want = consume_steps[step % consume_steps.len()];
                step += 1;
                let mut n = (want as u64).min(r.available()) as usize;
                while n > 0 {
                    let off = r.read_offset();
                    let k = n.min(ring_len - off);
                    got.extend_from_slice(&ring[off..off + k]);
                    r.consume(k);
                    n -= k;
                }
                if let Some(c) = r.take_credit() {
                    w.on_credit(c).unwrap();
                }
            }
            prop_assert!(got == stream);
        }

        /// Arbitrary tags and credits from a hostile peer never panic and
        /// never place a byte outside the ring.
        #[test]
        fn arbitrary_wire_values_never_escape_the_ring(
            tags in proptest::collection::vec(any::<u32>(), 1..200),
            credits in proptest::collection::vec((any::<u64>(), any::<u32>()), 1..50),
            ann_bytes in proptest::collection::vec(any::<u8>(), 0..30),
        ) {
            let _ = Announce::decode(&ann_bytes);
            let (mut w, mut r) = pair(20, 256 << 10);
            for t in tags {
                if let Ok(p) = r.on_chunk(t) {
                    prop_assert!(p.ring_offset + p.len <= r.ring_len());
                    r.on_landed(p.len);
                }
            }
            let p = w.place(5 << 20).unwrap();
            w.advance(&p);
            for (first, count) in credits {
                let before = w.outstanding();
                if w.on_credit(Credit { first, count, chunks: 0 }).is_ok() {
                    prop_assert!(w.outstanding() < before);
                }
            }
        }
    }
}
