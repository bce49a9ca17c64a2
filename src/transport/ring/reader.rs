//! The one record reader over a slot ring, for every transport that lands
//! chunks in one ([`crate::transport::uring`], `rdma`).
//!
//! Transports differ only in how chunk bytes reach the ring and how credits
//! travel back; that is the [`RingLink`] trait. [`RingReader`] does the
//! rest the same way for all of them: it finds the next whole record in the
//! ring, verifies it in place, hands it out as a slice of the ring, and
//! consumes and credits its bytes only at the next call (a record stays
//! valid until then, as [`RecordSource`] promises).

use std::net::TcpStream;

use crate::transport::auth::Opener;
use crate::transport::link::RecordSource;
use crate::transport::record::{check, parse_header_of, wire_len, Header, Record, RecordError};
use crate::transport::ring::mirror::MirrorRing;
use crate::transport::slots::{Announce, RingState};
use crate::transport::wire::HEADER_LEN;

/// How chunk bytes arrive in a slot ring and how credits go back: the part
/// of a ring source that is specific to one transport.
pub trait RingLink {
    /// Hands back the slots `state` says are consumed and not yet credited
    /// (a link may defer while an earlier credit is still in flight).
    fn send_credit(&mut self, state: &mut RingState) -> Result<(), RecordError>;

    /// Blocks until more bytes have landed in `ring`, accepting each chunk
    /// through `state` ([`RingState::on_chunk`], [`RingState::on_landed`]).
    /// `at_boundary`: the ring holds no unconsumed byte, so an end of
    /// stream here is [`RecordError::Eof`] rather than a truncation.
    fn receive(
        &mut self,
        state: &mut RingState,
        ring: &MirrorRing,
        at_boundary: bool,
    ) -> Result<(), RecordError>;

    /// The session's TCP connection (control channel).
    fn stream(&self) -> &TcpStream;
}

/// A [`RecordSource`] reading records in place from a slot ring that `L`
/// fills.
///
/// Invariant: `link` is declared (so dropped) before `ring`: a link that
/// registered the ring with the kernel or an RDMA device releases it before
/// the memory goes.
pub struct RingReader<L> {
    link: L,
    ring: MirrorRing,
    state: RingState,
    /// Bytes of the record handed out last, consumed at the next call.
    pending_consume: usize,
    bytes_read: u64,
    /// Credit once this many slots are consumed (half the ring), or before
    /// blocking when [`RingState::credit_due_before_wait`] says so.
    credit_batch: u64,
    /// The session's opener: every record carries a tag it checks.
    open: Option<Opener>,
}

impl<L: RingLink> RingReader<L> {
    /// The link, to act as a faulty peer would (tests).
    #[cfg(test)]
    pub fn link_mut(&mut self) -> &mut L {
        &mut self.link
    }

    /// Reads the ring `ring` (of the announced geometry `ann`) filled by `link`.
    pub fn over(link: L, ring: MirrorRing, ann: &Announce) -> Self {
        RingReader {
            link,
            ring,
            state: RingState::new(ann),
            pending_consume: 0,
            bytes_read: 0,
            credit_batch: (ann.slots as u64 / 2).max(1),
            open: None,
        }
    }

    /// Requires every record to carry a tag `open` verifies (the opener of
    /// the stream's TCP reader, which read the records before the ring).
    pub fn authenticate(mut self, open: Option<Opener>) -> Self {
        self.open = open;
        self
    }
}

/// The next whole record waiting in the ring, if one has fully arrived:
/// its offset, verified header and total length (the caller checks the CRC
/// or tag with [`check`] and consumes it).
fn ready_record(
    state: &RingState,
    ring: &MirrorRing,
    open: Option<&Opener>,
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
    let hd = parse_header_of(&h, open)?;
    let need = wire_len(hd.len, open);
    // Guaranteed by a validated announcement (len <= MAX_PAYLOAD).
    assert!(state.fits(need as u64));
    Ok((avail >= need as u64).then_some((off, hd, need)))
}

impl<L: RingLink> RecordSource for RingReader<L> {
    fn next_record(&mut self) -> Result<Record<'_>, RecordError> {
        if self.pending_consume > 0 {
            self.state.consume(self.pending_consume);
            self.pending_consume = 0;
            if self.state.creditable() >= self.credit_batch {
                self.link.send_credit(&mut self.state)?;
            }
        }
        loop {
            if let Some((off, hd, need)) =
                ready_record(&self.state, &self.ring, self.open.as_ref())?
            {
                self.pending_consume = need;
                self.bytes_read += need as u64;
                return check(&hd, self.ring.slice_mut(off, need), self.open.as_mut());
            }
            let empty = self.state.available() == 0;
            if self.state.credit_due_before_wait() {
                self.link.send_credit(&mut self.state)?;
            }
            self.link.receive(&mut self.state, &self.ring, empty)?;
        }
    }

    fn stream(&self) -> &TcpStream {
        self.link.stream()
    }

    fn bytes_read(&self) -> u64 {
        self.bytes_read
    }
}
