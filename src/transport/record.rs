//! Framed, checksummed records: the unit of everything on the wire.
//!
//! See `docs/wire-format.md` for the full specification. Every record is a
//! 24-byte little-endian header followed by `len` payload bytes:
//!
//! ```text
//! off size field
//!   0    4 magic    "CSTR" (0x52545343 LE)
//!   4    2 version  WIRE_VERSION
//!   6    1 kind     RecordKind (0 = Invalid, never sent)
//!   7    1 flags    must be 0
//!   8    8 epoch    epoch the record belongs to (0 where it has none)
//!  16    4 len      payload length, <= MAX_PAYLOAD
//!  20    4 crc      CRC-32C of header bytes 0..20 followed by the payload;
//!                    0 after the handshake
//! ```
//!
//! After the handshake a record also carries a 16-byte tag after its
//! payload ([`crate::transport::auth`]): a reader given an [`Opener`]
//! ([`RecordReader::authenticate`]) checks it instead of the CRC, and
//! requires the CRC field to be 0 (the tag covers the header and payload,
//! every byte the CRC covered; the sealer zeroes the field).
//!
//! Two builders: [`write_record`] / [`send_record`] fill in the CRC (a
//! record any reader accepts: the handshake's, and small control records);
//! [`begin_record`] / [`finish_record`], the data path's (Pages, and
//! `disk::frame`'s DiskWrites), leave it 0 and so cost no pass over the
//! payload: such records are only valid sealed, in an authenticated
//! session, which every session after the handshake is. A stream of them
//! read without a key (tests, fuzz seeds, benchmarks) gets its checksums
//! from [`add_checksums`].
//!
//! Invariant: [`RecordReader`] hands out a record only after magic, version,
//! kind, flags, length bound and checksum (or, authenticated, its tag under
//! the session key and the record's sequence number, and a zero CRC field)
//! have all been verified; the payload is still untrusted in content and its parser must
//! bounds-check it.

use std::io::{self, Read, Write};
use std::sync::Arc;

use crate::transport::auth::{AuthError, Opener, TAG_LEN};
use crate::transport::recv_buf::{self, Bufs, Held};

pub use crate::transport::wire::{
    Cursor, PayloadError, HEADER_LEN, MAGIC, MAX_PAYLOAD, WIRE_VERSION,
};

#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    Invalid = 0,
    Hello = 1,
    HelloAck = 2,
    Auth = 3,
    AuthOk = 4,
    EpochBegin = 10,
    Pages = 11,
    State = 12,
    EpochEnd = 13,
    Ack = 20,
    Heartbeat = 21,
    Close = 22,
    Error = 23,
    /// Primary → backup right after AuthOk: the transport it wants (one
    /// byte, see `transport::TransportKind`). Absent means tcp.
    Transport = 24,
    /// Backup → primary: the receive ring (`transport::slots::Announce`).
    Slots = 25,
    /// Backup → primary: slots handed back (`transport::slots::Credit`).
    Credit = 26,
    /// Primary → backup, once before the seed: the session's disks
    /// (`disk::session::encode_announce`).
    Disks = 27,
    /// Primary → backup inside an epoch: guest disk writes of that epoch
    /// (`disk::wire`), counted in its EpochEnd.
    DiskWrites = 28,
}

impl RecordKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        use RecordKind::*;
        Some(match v {
            1 => Hello,
            2 => HelloAck,
            3 => Auth,
            4 => AuthOk,
            10 => EpochBegin,
            11 => Pages,
            12 => State,
            13 => EpochEnd,
            20 => Ack,
            21 => Heartbeat,
            22 => Close,
            23 => Error,
            24 => Transport,
            25 => Slots,
            26 => Credit,
            27 => Disks,
            28 => DiskWrites,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("connection closed by peer")]
    Eof,
    #[error("stream ended inside a record ({got} of {want} bytes of {what})")]
    Truncated {
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error("bad magic 0x{0:08x} (not a castor stream, or stream out of sync)")]
    BadMagic(u32),
    #[error("unsupported wire version {got} (this castor speaks {WIRE_VERSION})")]
    Version { got: u16 },
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("record flags 0x{0:02x} not zero")]
    Flags(u8),
    #[error("{kind:?} record payload of {len} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLong { kind: RecordKind, len: usize },
    #[error("{kind:?} record payload of {len} bytes before authentication (at most {limit})")]
    Unauthenticated {
        kind: RecordKind,
        len: usize,
        limit: usize,
    },
    #[error("checksum mismatch in {kind:?} record of epoch {epoch}: header says 0x{want:08x}, computed 0x{got:08x}")]
    Checksum {
        kind: RecordKind,
        epoch: u64,
        want: u32,
        got: u32,
    },
    #[error("authenticated {kind:?} record of epoch {epoch} has CRC field 0x{crc:08x}, must be 0 (the peer's framing is broken)")]
    SealedCrc {
        kind: RecordKind,
        epoch: u64,
        crc: u32,
    },
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("receive ring: {0}")]
    Slot(#[from] crate::transport::slots::SlotError),
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// A verified record borrowed from the reader's buffer.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub kind: RecordKind,
    pub epoch: u64,
    pub payload: &'a [u8],
    /// The buffer `payload` lies in, when its reader lets consumers keep
    /// it ([`Record::hold`]); `None` for other sources.
    pub buf: Option<&'a Arc<Vec<u8>>>,
}

impl Record<'_> {
    /// The payload kept in place past the next record, without a copy,
    /// if the source allows it (see [`crate::transport::recv_buf`]).
    pub fn hold(&self) -> Option<Held> {
        self.buf.map(|b| recv_buf::held(b, self.payload))
    }
}

fn header_bytes(kind: RecordKind, epoch: u64, len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&WIRE_VERSION.to_le_bytes());
    h[6] = kind as u8;
    h[7] = 0;
    h[8..16].copy_from_slice(&epoch.to_le_bytes());
    h[16..20].copy_from_slice(&len.to_le_bytes());
    h
}

/// Appends a complete, checksummed record to `out`.
pub fn write_record(out: &mut Vec<u8>, kind: RecordKind, epoch: u64, payload: &[u8]) {
    let start = begin_record(out, kind, epoch);
    out.extend_from_slice(payload);
    finish_record(out, start);
    set_checksum(&mut out[start..]);
}

/// Appends a complete record without its CRC (the field stays 0): for a
/// session whose sealer tags every record, where the reader requires the
/// field to be 0 (see the module documentation). Saves a pass over the
/// payload: a disk's seed goes out this way, chunk by chunk.
pub fn write_sealed_record(out: &mut Vec<u8>, kind: RecordKind, epoch: u64, payload: &[u8]) {
    let start = begin_record(out, kind, epoch);
    out.extend_from_slice(payload);
    finish_record(out, start);
}

/// Sends one complete record on `w` with a single `write_all`, so writers
/// that share a connection behind a lock never interleave their records.
pub fn send_record(
    w: &mut impl Write,
    kind: RecordKind,
    epoch: u64,
    payload: &[u8],
) -> io::Result<()> {
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    write_record(&mut v, kind, epoch, payload);
    w.write_all(&v)
}

/// Starts a record whose payload the caller appends in place; returns the
/// record's offset for [`finish_record`]. Lets encoders build payloads
/// directly in the send buffer with no copy.
pub fn begin_record(out: &mut Vec<u8>, kind: RecordKind, epoch: u64) -> usize {
    let start = out.len();
    out.extend_from_slice(&header_bytes(kind, epoch, 0));
    start
}

/// Fills in the length of the record begun at `start`, whose payload is
/// everything appended since. The CRC field stays 0: the record is for an
/// authenticated session (see the module documentation).
pub fn finish_record(out: &mut [u8], start: usize) {
    let len = out.len() - start - HEADER_LEN;
    assert!(len <= MAX_PAYLOAD, "record payload {len} over MAX_PAYLOAD");
    out[start + 16..start + 20].copy_from_slice(&(len as u32).to_le_bytes());
}

/// The CRC-32C of a record (`rec` = header + payload): over header bytes
/// 0..20, then the payload.
fn checksum(rec: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&rec[..20]), &rec[HEADER_LEN..])
}

/// Writes the CRC of the whole record `rec` (header + payload) into its
/// header.
fn set_checksum(rec: &mut [u8]) {
    let crc = checksum(rec);
    rec[20..24].copy_from_slice(&crc.to_le_bytes());
}

/// Fills in the CRC of every record laid end to end in `buf` (built by
/// [`finish_record`], which leaves it 0), so a reader without a session
/// key accepts them: for tests, fuzz seeds and benchmarks. Panics on
/// bytes that are not whole records (a caller's bug, never wire input).
pub fn add_checksums(buf: &mut [u8]) {
    let mut at = 0;
    while at < buf.len() {
        let h: &[u8; HEADER_LEN] = buf[at..at + HEADER_LEN]
            .try_into()
            .expect("a whole record header");
        let len = parse_header(h).expect("a well-formed record").len;
        set_checksum(&mut buf[at..at + HEADER_LEN + len]);
        at += HEADER_LEN + len;
    }
}

/// A verified header: everything but the payload's checksum.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub kind: RecordKind,
    pub epoch: u64,
    pub len: usize,
    pub crc: u32,
}

/// Verifies magic, version, kind, flags and length bound of a header.
pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<Header, RecordError> {
    let magic = u32::from_le_bytes(h[0..4].try_into().unwrap());
    if magic != MAGIC {
        return Err(RecordError::BadMagic(magic));
    }
    let version = u16::from_le_bytes(h[4..6].try_into().unwrap());
    if version != WIRE_VERSION {
        return Err(RecordError::Version { got: version });
    }
    let kind = RecordKind::from_u8(h[6]).ok_or(RecordError::UnknownKind(h[6]))?;
    if h[7] != 0 {
        return Err(RecordError::Flags(h[7]));
    }
    let epoch = u64::from_le_bytes(h[8..16].try_into().unwrap());
    let len = u32::from_le_bytes(h[16..20].try_into().unwrap()) as usize;
    if len > MAX_PAYLOAD {
        return Err(RecordError::TooLong { kind, len });
    }
    let crc = u32::from_le_bytes(h[20..24].try_into().unwrap());
    Ok(Header {
        kind,
        epoch,
        len,
        crc,
    })
}

/// Bytes on the wire of a record with `len` payload bytes: with a tag
/// once the stream is authenticated.
pub fn wire_len(len: usize, open: Option<&Opener>) -> usize {
    HEADER_LEN + len + if open.is_some() { TAG_LEN } else { 0 }
}

/// Parses a header; on an authenticated stream any damage is reported as
/// the record failing authentication (an attacker's bit flip in the header
/// is no different from one in the payload).
pub fn parse_header_of(h: &[u8; HEADER_LEN], open: Option<&Opener>) -> Result<Header, RecordError> {
    parse_header(h).map_err(|e| match open {
        Some(o) => o.forged().into(),
        None => e,
    })
}

/// Verifies a whole record `rec` ([`wire_len`] bytes: header, payload and,
/// authenticated, tag) whose header `h` was parsed. Authenticated: its tag
/// with `open` (decrypting the payload in place if the session encrypts),
/// which covers the header and payload, and a CRC field of 0 (no CRC is
/// computed: the tag replaces it). Otherwise its CRC. Returns the record.
pub fn check<'a>(
    h: &Header,
    rec: &'a mut [u8],
    open: Option<&mut Opener>,
) -> Result<Record<'a>, RecordError> {
    match open {
        Some(o) => {
            debug_assert_eq!(rec.len(), HEADER_LEN + h.len + TAG_LEN);
            o.open(rec)?;
            if h.crc != 0 {
                // Authentic, so the peer's own bug: say so, not "forged".
                return Err(RecordError::SealedCrc {
                    kind: h.kind,
                    epoch: h.epoch,
                    crc: h.crc,
                });
            }
            Ok(Record {
                kind: h.kind,
                epoch: h.epoch,
                payload: &rec[HEADER_LEN..HEADER_LEN + h.len],
                buf: None,
            })
        }
        None => verify(h, rec),
    }
}

/// Checks the CRC of a whole record (`rec` = header bytes + payload) whose
/// header `h` was parsed, and returns the record.
pub fn verify<'a>(h: &Header, rec: &'a [u8]) -> Result<Record<'a>, RecordError> {
    debug_assert_eq!(rec.len(), HEADER_LEN + h.len);
    let payload = &rec[HEADER_LEN..];
    let crc = checksum(rec);
    if crc != h.crc {
        return Err(RecordError::Checksum {
            kind: h.kind,
            epoch: h.epoch,
            want: h.crc,
            got: crc,
        });
    }
    Ok(Record {
        kind: h.kind,
        epoch: h.epoch,
        payload,
        buf: None,
    })
}

/// Reads and verifies records from a byte stream.
///
/// The reader does its own buffering: it reads the socket in large chunks
/// straight into one buffer and hands out records as slices of it, so a
/// payload is copied once (by the kernel) between the socket and its parser.
/// A consumer may keep a payload in place ([`Record::hold`]); the reader
/// then moves on to another buffer. A read asks for at most the record
/// being completed plus [`READ_CHUNK`], so what moves with it (the bytes
/// read past a held record) stays under [`READ_CHUNK`].
pub struct RecordReader<R> {
    inner: R,
    bufs: Bufs,
    /// Unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// Bytes consumed as records so far.
    pub bytes_read: u64,
    /// Largest payload accepted, below MAX_PAYLOAD before authentication
    /// (see [`RecordReader::with_limit`]).
    limit: Option<usize>,
    /// Set once the session's keys are known: every later record must
    /// carry a valid tag.
    open: Option<Opener>,
}

/// Reads ask the kernel for at least this much room, and for at most this
/// much beyond the record being completed.
pub const READ_CHUNK: usize = 256 << 10;

/// The buffer of an authenticated reader: many records of
/// `PAGES_RECORD_TARGET` (256 KiB) fit before the unconsumed tail is moved
/// to the front, so that copy is rare (at 1 MiB or less it ran on nearly
/// every Pages record).
const BUF_SIZE: usize = 4 << 20;

impl<R: Read> RecordReader<R> {
    pub fn new(inner: R) -> Self {
        RecordReader {
            inner,
            bufs: Bufs::new(BUF_SIZE),
            start: 0,
            end: 0,
            bytes_read: 0,
            limit: None,
            open: None,
        }
    }

    /// A reader for a peer that has not authenticated yet: it starts with
    /// a buffer of a few `limit`s and refuses any record whose payload
    /// exceeds `limit`, so a stranger makes it allocate only that much.
    pub fn with_limit(inner: R, limit: usize) -> Self {
        RecordReader {
            inner,
            bufs: Bufs::new(2 * (HEADER_LEN + limit)),
            start: 0,
            end: 0,
            bytes_read: 0,
            limit: Some(limit),
            open: None,
        }
    }

    /// From the next record on, requires every record to carry a tag that
    /// `open` verifies (call right after the handshake's last record).
    pub fn authenticate(&mut self, open: Opener) {
        self.open = Some(open);
    }

    /// Takes the opener back, to go on reading the same stream elsewhere
    /// (a receive ring); the reader stops authenticating.
    pub fn take_opener(&mut self) -> Option<Opener> {
        self.open.take()
    }

    /// Lifts [`RecordReader::with_limit`]'s limit (the peer authenticated)
    /// and gives the reader its full buffer.
    pub fn unlimited(mut self) -> Self {
        self.limit = None;
        self.bufs.unshare(&mut self.start, &mut self.end);
        self.bufs.grow(BUF_SIZE);
        self
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Bytes read from the stream but not yet handed out as records.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// The stream, dropping the buffer (check [`Self::buffered`] first).
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The same reader over `f(stream)`, keeping what is buffered (e.g. to
    /// box the stream's type away).
    pub fn map_inner<S: Read>(self, f: impl FnOnce(R) -> S) -> RecordReader<S> {
        RecordReader {
            inner: f(self.inner),
            bufs: self.bufs,
            start: self.start,
            end: self.end,
            bytes_read: self.bytes_read,
            limit: self.limit,
            open: self.open,
        }
    }

    /// Makes `n` unconsumed bytes available.
    fn fill(&mut self, n: usize, what: &'static str, at_boundary: bool) -> Result<(), RecordError> {
        let chunk = self.limit.map_or(READ_CHUNK, |l| HEADER_LEN + l);
        while self.end - self.start < n {
            let buf = self.bufs.writable();
            if buf.len() - self.start < n + chunk {
                // Move the partial record to the front, growing if needed.
                buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                if buf.len() < n + chunk {
                    buf.resize(n + chunk, 0);
                }
            }
            // Never far past this record (bounds what a hold moves).
            let upto = buf.len().min(self.start + n + chunk);
            match self.inner.read(&mut buf[self.end..upto]) {
                Ok(0) => {
                    let got = self.end - self.start;
                    return Err(if got == 0 && at_boundary {
                        RecordError::Eof
                    } else {
                        RecordError::Truncated { what, got, want: n }
                    });
                }
                Ok(k) => self.end += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Reads the next record. `Err(Eof)` only at a record boundary.
    #[allow(clippy::should_implement_trait)] // lends from self: not an Iterator
    pub fn next(&mut self) -> Result<Record<'_>, RecordError> {
        // The last record's buffer may be held: never write into it again.
        self.bufs.unshare(&mut self.start, &mut self.end);
        self.fill(HEADER_LEN, "record header", true)?;
        let h: [u8; HEADER_LEN] = self.bufs.bytes()[self.start..self.start + HEADER_LEN]
            .try_into()
            .expect("header length");
        let hd = parse_header_of(&h, self.open.as_ref())?;
        let len = hd.len;
        if let Some(limit) = self.limit.filter(|&l| len > l) {
            return Err(RecordError::Unauthenticated {
                kind: hd.kind,
                len,
                limit,
            });
        }
        let total = wire_len(len, self.open.as_ref());
        if let Err(e) = self.fill(total, "record payload", false) {
            return Err(match e {
                RecordError::Truncated { got, .. } => RecordError::Truncated {
                    what: "record payload",
                    got: got.saturating_sub(HEADER_LEN),
                    want: total - HEADER_LEN,
                },
                e => e,
            });
        }
        let at = self.start;
        let end = at + total;
        self.start = end;
        self.bytes_read += total as u64;
        let rec = check(&hd, &mut self.bufs.writable()[at..end], self.open.as_mut())?;
        let (kind, epoch, len) = (rec.kind, rec.epoch, rec.payload.len());
        let at = at + HEADER_LEN;
        Ok(Record {
            kind,
            epoch,
            payload: &self.bufs.bytes()[at..at + len],
            buf: Some(self.bufs.current()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(kind: RecordKind, epoch: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_record(&mut v, kind, epoch, payload);
        v
    }

    #[test]
    fn round_trip() {
        let mut v = one(RecordKind::State, 7, b"hello");
        v.extend(one(RecordKind::Ack, 8, b""));
        let mut r = RecordReader::new(&v[..]);
        let a = r.next().unwrap();
        assert_eq!(
            (a.kind, a.epoch, a.payload),
            (RecordKind::State, 7, &b"hello"[..])
        );
        let b = r.next().unwrap();
        assert_eq!((b.kind, b.epoch, b.payload.len()), (RecordKind::Ack, 8, 0));
        assert!(matches!(r.next(), Err(RecordError::Eof)));
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let v = one(RecordKind::Pages, 3, &[1, 2, 3, 4, 5, 6, 7, 8]);
        for bit in 0..v.len() * 8 {
            let mut c = v.clone();
            c[bit / 8] ^= 1 << (bit % 8);
            let mut r = RecordReader::new(&c[..]);
            assert!(r.next().is_err(), "flip of bit {bit} accepted");
        }
    }

    #[test]
    fn truncation_is_reported() {
        let v = one(RecordKind::State, 1, &[9; 100]);
        for cut in 1..v.len() {
            let mut r = RecordReader::new(&v[..cut]);
            assert!(
                matches!(r.next(), Err(RecordError::Truncated { .. })),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn oversized_length_rejected_before_reading() {
        let mut v = one(RecordKind::State, 1, b"");
        v[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut r = RecordReader::new(&v[..]);
        assert!(matches!(r.next(), Err(RecordError::TooLong { .. })));
    }

    /// Hands out at most `step` bytes per read, like a slow socket.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(out.len()).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn records_split_across_reads_and_larger_than_the_buffer() {
        let big: Vec<u8> = (0..3 << 20).map(|i| (i * 7) as u8).collect();
        let mut v = one(RecordKind::State, 1, b"a");
        v.extend(one(RecordKind::Pages, 2, &big));
        v.extend(one(RecordKind::Ack, 3, b""));
        for step in [1, 7, 4096, 1 << 20, usize::MAX] {
            let mut r = RecordReader::new(Trickle { data: &v, step });
            assert_eq!(r.next().unwrap().payload, b"a");
            if step == 1 {
                continue; // byte-at-a-time through 3 MiB is slow; prefix checked
            }
            let rec = r.next().unwrap();
            assert_eq!((rec.epoch, rec.payload.len()), (2, big.len()));
            assert!(rec.payload == &big[..]);
            assert_eq!(r.next().unwrap().epoch, 3);
            assert!(matches!(r.next(), Err(RecordError::Eof)));
            assert_eq!(r.bytes_read, v.len() as u64);
        }
    }

    #[test]
    fn held_payloads_stay_intact_while_the_reader_reads_on() {
        // Records of 300 KiB to 1.2 MiB and small ones between them, read
        // in steps that split records; every large payload is held.
        let payload =
            |i: usize, n: usize| -> Vec<u8> { (0..n).map(|k| (k * 31 + i * 7) as u8).collect() };
        let sizes: Vec<usize> = (0..24)
            .map(|i| {
                if i % 3 == 2 {
                    100
                } else {
                    (300 << 10) + i * 40_000
                }
            })
            .collect();
        let mut v = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            write_record(&mut v, RecordKind::DiskWrites, i as u64, &payload(i, n));
        }
        for step in [4096, 100_000, 1 << 20, usize::MAX] {
            let mut r = RecordReader::new(Trickle { data: &v, step });
            let mut held = Vec::new();
            for (i, &n) in sizes.iter().enumerate() {
                let rec = r.next().unwrap();
                assert_eq!((rec.epoch, rec.payload.len()), (i as u64, n));
                if n >= READ_CHUNK {
                    held.push((i, rec.hold().expect("a reader's record can be held")));
                }
            }
            assert!(matches!(r.next(), Err(RecordError::Eof)));
            assert_eq!(held.len(), 16);
            for (i, h) in &held {
                assert!(
                    h.bytes() == &payload(*i, sizes[*i])[..],
                    "step {step}: record {i} changed"
                );
            }
        }
    }

    #[test]
    fn a_limited_reader_refuses_big_records_and_stays_small() {
        let mut v = one(RecordKind::Hello, 0, &[1; 100]);
        v.extend(one(RecordKind::Pages, 1, &vec![2; 1 << 20]));
        let mut r = RecordReader::with_limit(&v[..], 4096);
        assert_eq!(r.next().unwrap().payload.len(), 100);
        let e = r.next().unwrap_err();
        assert!(
            matches!(e, RecordError::Unauthenticated { len, limit: 4096, .. } if len == 1 << 20),
            "{e}"
        );
        assert!(r.bufs.len() <= 4 * 4096, "grew to {} bytes", r.bufs.len());
        // Authenticated: the same bytes pass.
        let mut r = RecordReader::with_limit(&v[..], 4096);
        r.next().unwrap();
        let mut r = r.unlimited();
        assert_eq!(r.next().unwrap().payload.len(), 1 << 20);
    }
}
