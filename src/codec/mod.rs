//! Page codec: per page the smallest of zero / unchanged / delta / full.
//!
//! The transport frames each page as `(gfn, kind: u8, payload)`; this module
//! defines `kind` and `payload`. Everything here is wire format: changing a
//! kind number, the zero-run token layout or a compressor's framing needs a
//! protocol version bump.
//!
//! # Page kinds
//!
//! | kind | name        | payload                                   | needs base |
//! |------|-------------|-------------------------------------------|------------|
//! | 0    | `Invalid`   | never sent (a zeroed header means nothing) | -          |
//! | 1    | `Zero`      | empty; the page is 4096 zero bytes         | no         |
//! | 2    | `Unchanged` | empty; the page equals the base            | yes        |
//! | 3    | `Delta`     | zero-run stream (below) of `page ^ base`   | yes        |
//! | 4    | `DeltaLz4`  | lz4 block of a zero-run stream             | yes        |
//! | 5    | `DeltaZstd` | zstd frame of a zero-run stream            | yes        |
//! | 6    | `Full`      | the 4096 raw bytes                         | no         |
//! | 7    | `FullLz4`   | lz4 block of the 4096 bytes                | no         |
//! | 8    | `FullZstd`  | zstd frame of the 4096 bytes               | no         |
//!
//! The *base* is the receiver's copy of the page, which must equal the
//! sender's `prev` (the last copy it sent). lz4 is the raw block format of
//! `lz4_flex::block` (no size prefix, no frame); zstd is a standard zstd frame
//! (magic, frame header with content size, no checksum: the transport record
//! has a CRC).
//!
//! # Zero-run stream (ZRLE)
//!
//! The XOR of page and base is written as a sequence of tokens, nothing else:
//!
//! ```text
//! token   = run:varint  len:varint  literal:len bytes
//! varint  = LEB128, 1 or 2 bytes, minimal: b0 < 0x80 -> b0;
//!           else b1 in 0x01..=0x7f and value = (b0 & 0x7f) | b1 << 7
//! ```
//!
//! Decoding starts at page offset 0; each token skips `run` bytes (XOR with
//! zero: the base byte is kept) and then XORs `literal` into the next `len`
//! bytes. Bytes after the last token are unchanged. Rules the decoder checks:
//! `len >= 1`; `offset + run <= 4096`; `offset + len <= 4096`; the literal
//! lies within the stream; the stream is not empty; the stream ends exactly
//! after a token (trailing bytes are an error). `run == 0` is allowed.
//!
//! Example: bytes 3, 4 and 200 changed by XOR `AA BB`, `CC` encode as
//! `03 02 AA BB  C3 01 01 CC` (run 195 is the varint `C3 01`).
//!
//! # Encoder choice (not wire format; may change freely)
//!
//! Zero, then Unchanged, are checked in one pass ([`scan`]), which also
//! counts the changed bytes. A page with more than [`DENSE_DELTA`] changed
//! bytes counts as rewritten: its zero-run stream (at least that long) is
//! never built. Otherwise the stream is built; without a compressor, a
//! stream longer than [`DENSE_DELTA`] is abandoned for the raw page
//! (bounded work per page). At most one compressor call is made per page: on the
//! stream if it is at least [`DELTA_PACK_MIN`] and at most [`DENSE_DELTA`]
//! bytes (kept if strictly shorter than the stream), on the page if the
//! stream is longer than [`DENSE_DELTA`] (then the shortest of the plain
//! stream, the compressed page and the raw page is sent).
//!
//! # Invariants
//!
//! - `Encoder::encode` never produces a payload longer than `PAGE_SIZE`; it
//!   picks a compressed kind only when strictly shorter than the alternative,
//!   and a delta only when strictly shorter than `PAGE_SIZE`.
//! - A compressed payload decompresses to at most `PAGE_SIZE` bytes: exactly
//!   `PAGE_SIZE` for `Full*`, a zero-run stream for `Delta*`.
//! - `Decoder::decode` takes untrusted input: it returns a [`CodecError`] for
//!   any malformed payload, never panics, and writes only its `out` page.
//!   After an error `out` holds unspecified bytes and must be discarded.

mod compress;
mod error;
pub mod scan;
mod zrle;

pub use error::CodecError;

use crate::PAGE_SIZE;
use compress::{Packer, Unpacker};
use scan::Scan;

/// Try lz4/zstd on a zero-run stream only from this length on: below it the
/// stream is a few small edits that compressors barely shrink, and the call
/// would cost more than the rest of the encode.
pub const DELTA_PACK_MIN: usize = 256;

/// A zero-run stream longer than this means the page was largely rewritten:
/// compress the page itself instead of the stream (only one is tried).
pub const DENSE_DELTA: usize = PAGE_SIZE / 2;

/// Compressor used after the XOR/zero-run stage and for full pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compressor {
    None,
    Lz4,
    /// zstd at this level (clamped to zstd's range; 1 is a good default).
    Zstd(i32),
}

/// Wire tag of an encoded page. Zero is `Invalid` so a zeroed buffer means nothing.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageKind {
    Invalid = 0,
    Zero = 1,
    Unchanged = 2,
    Delta = 3,
    DeltaLz4 = 4,
    DeltaZstd = 5,
    Full = 6,
    FullLz4 = 7,
    FullZstd = 8,
}

impl PageKind {
    /// Number of kinds; kind numbers are `0..COUNT`.
    pub const COUNT: usize = 9;

    /// All kinds, indexed by their wire number.
    pub const ALL: [PageKind; PageKind::COUNT] = [
        PageKind::Invalid,
        PageKind::Zero,
        PageKind::Unchanged,
        PageKind::Delta,
        PageKind::DeltaLz4,
        PageKind::DeltaZstd,
        PageKind::Full,
        PageKind::FullLz4,
        PageKind::FullZstd,
    ];

    /// The kind with wire number `v`, if there is one.
    pub fn from_u8(v: u8) -> Option<PageKind> {
        PageKind::ALL.get(usize::from(v)).copied()
    }

    /// Whether decoding this kind reads the receiver's base page.
    pub fn needs_base(self) -> bool {
        matches!(
            self,
            PageKind::Unchanged | PageKind::Delta | PageKind::DeltaLz4 | PageKind::DeltaZstd
        )
    }
}

/// Pages and payload bytes produced per kind (indexed by kind number).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodeStats {
    pub pages: [u64; PageKind::COUNT],
    pub bytes: [u64; PageKind::COUNT],
}

impl EncodeStats {
    pub fn total_pages(&self) -> u64 {
        self.pages.iter().sum()
    }

    pub fn total_bytes(&self) -> u64 {
        self.bytes.iter().sum()
    }

    fn record(&mut self, kind: PageKind, len: usize) {
        self.pages[kind as usize] += 1;
        self.bytes[kind as usize] += len as u64;
    }
}

/// Encodes pages; keeps its scratch buffers and compressor contexts across
/// pages, so one per encoding thread.
pub struct Encoder {
    compressor: Compressor,
    packer: Packer,
    stats: EncodeStats,
}

impl Encoder {
    pub fn new(c: Compressor) -> Self {
        Encoder {
            compressor: c,
            packer: Packer::new(c),
            stats: EncodeStats::default(),
        }
    }

    pub fn compressor(&self) -> Compressor {
        self.compressor
    }

    /// Counts of what this encoder produced since creation or the last reset.
    pub fn stats(&self) -> &EncodeStats {
        &self.stats
    }

    pub fn reset_stats(&mut self) {
        self.stats = EncodeStats::default();
    }

    /// Encodes `page` against `prev`, the copy the receiver holds (None when
    /// it holds nothing known). Appends the payload to `out`; returns its kind.
    pub fn encode(
        &mut self,
        page: &[u8; PAGE_SIZE],
        prev: Option<&[u8; PAGE_SIZE]>,
        out: &mut Vec<u8>,
    ) -> PageKind {
        let start = out.len();
        let kind = self.choose(page, prev, out);
        debug_assert!(out.len() - start <= PAGE_SIZE);
        self.stats.record(kind, out.len() - start);
        kind
    }

    fn choose(
        &mut self,
        page: &[u8; PAGE_SIZE],
        prev: Option<&[u8; PAGE_SIZE]>,
        out: &mut Vec<u8>,
    ) -> PageKind {
        let Some(prev) = prev else {
            if zrle::is_zero(page) {
                return PageKind::Zero;
            }
            return self.full(page, out);
        };
        let Scan {
            zero,
            dirty,
            changed,
        } = scan::scan(page, prev);
        if zero {
            // A zero page the receiver already holds as zero costs nothing.
            if dirty == 0 {
                return PageKind::Unchanged;
            }
            return PageKind::Zero;
        }
        if dirty == 0 {
            return PageKind::Unchanged;
        }
        out.reserve(PAGE_SIZE);
        // Every changed byte is a literal byte of the zero-run stream, so
        // `changed` bounds the stream from below: past DENSE_DELTA the
        // page was rewritten and the stream is not even built.
        let dense = changed > DENSE_DELTA;
        // At most one compressor call per page, on whichever input should
        // win: the zero-run stream while at least half the page is unchanged
        // (a delta then beats even a well-compressed full page), else the
        // page itself (it was rewritten; its XOR with the old copy carries
        // both contents and compresses worse). With a compressor, the stream
        // is first built only up to DENSE_DELTA bytes: past that the page is
        // compressed, and the stream is finished only if that did not pay.
        if self.compressor == Compressor::None {
            // Raw is chosen when the CPU is the bottleneck: a rewritten
            // page costs one scan and one copy.
            if !dense && zrle::encode(page, prev, dirty, out, DENSE_DELTA) {
                return PageKind::Delta;
            }
            out.extend_from_slice(page);
            return PageKind::Full;
        }
        let start = out.len();
        if !dense && zrle::encode(page, prev, dirty, out, DENSE_DELTA) {
            let zlen = out.len() - start;
            if zlen < DELTA_PACK_MIN {
                return PageKind::Delta;
            }
            return match self.packer.pack(&out[start..], zlen) {
                Some(c) => {
                    out.truncate(start);
                    out.extend_from_slice(c);
                    packed(self.compressor, PageKind::Delta)
                }
                None => PageKind::Delta,
            };
        }
        let full = self.packer.pack(page, PAGE_SIZE);
        let full_len = full.map_or(PAGE_SIZE, <[u8]>::len);
        // The stream is known to exceed DENSE_DELTA: only a worse full page
        // leaves it a chance, and only if fewer bytes changed than that.
        if full_len > DENSE_DELTA
            && changed < full_len - 1
            && zrle::encode(page, prev, dirty, out, full_len - 1)
        {
            return PageKind::Delta;
        }
        match full {
            Some(c) => {
                out.extend_from_slice(c);
                packed(self.compressor, PageKind::Full)
            }
            None => {
                out.extend_from_slice(page);
                PageKind::Full
            }
        }
    }

    /// `FullLz4`/`FullZstd` if compression pays, else `Full`.
    fn full(&mut self, page: &[u8; PAGE_SIZE], out: &mut Vec<u8>) -> PageKind {
        match self.packer.pack(page, PAGE_SIZE) {
            Some(c) => {
                out.extend_from_slice(c);
                packed(self.compressor, PageKind::Full)
            }
            None => {
                out.extend_from_slice(page);
                PageKind::Full
            }
        }
    }
}

/// The compressed variant of `Delta` or `Full` for compressor `c`.
fn packed(c: Compressor, plain: PageKind) -> PageKind {
    match (plain, c) {
        (PageKind::Delta, Compressor::Lz4) => PageKind::DeltaLz4,
        (PageKind::Delta, Compressor::Zstd(_)) => PageKind::DeltaZstd,
        (PageKind::Full, Compressor::Lz4) => PageKind::FullLz4,
        (PageKind::Full, Compressor::Zstd(_)) => PageKind::FullZstd,
        (k, _) => k,
    }
}

/// Decodes pages from untrusted input; one per decoding thread.
pub struct Decoder {
    unpacker: Unpacker,
    /// Decompressed zero-run stream of `DeltaLz4`/`DeltaZstd` pages.
    scratch: Box<[u8; PAGE_SIZE]>,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    pub fn new() -> Self {
        Decoder {
            unpacker: Unpacker::new(),
            scratch: Box::new([0; PAGE_SIZE]),
        }
    }

    /// Checks an untrusted uncompressed `Delta` payload without applying
    /// it. Once it passes, [`Decoder::apply_delta`] on any page cannot fail:
    /// a receiver can validate a whole epoch first and patch its replica in
    /// place at commit, touching only the changed bytes.
    pub fn check_delta(payload: &[u8]) -> Result<(), CodecError> {
        if payload.len() > PAGE_SIZE {
            return Err(CodecError::PayloadTooLong {
                kind: PageKind::Delta,
                len: payload.len(),
            });
        }
        zrle::check(payload, PageKind::Delta)
    }

    /// XORs a `Delta` payload into `page` in place (see `check_delta`).
    pub fn apply_delta(payload: &[u8], page: &mut [u8; PAGE_SIZE]) -> Result<(), CodecError> {
        zrle::apply(payload, page, PageKind::Delta)
    }

    /// Rebuilds a page into `out` from an untrusted `kind`/`payload`; `base`
    /// is the receiver's current copy of the page.
    pub fn decode(
        &mut self,
        kind: u8,
        payload: &[u8],
        base: &[u8; PAGE_SIZE],
        out: &mut [u8; PAGE_SIZE],
    ) -> Result<PageKind, CodecError> {
        let k = PageKind::from_u8(kind).ok_or(CodecError::UnknownKind(kind))?;
        let len = payload.len();
        if len > PAGE_SIZE {
            return Err(CodecError::PayloadTooLong { kind: k, len });
        }
        match k {
            PageKind::Invalid => return Err(CodecError::InvalidKind),
            PageKind::Zero | PageKind::Unchanged if len != 0 => {
                return Err(CodecError::UnexpectedPayload { kind: k, len });
            }
            PageKind::Zero => out.fill(0),
            PageKind::Unchanged => out.copy_from_slice(base),
            PageKind::Delta => {
                out.copy_from_slice(base);
                zrle::apply(payload, out, k)?;
            }
            PageKind::DeltaLz4 | PageKind::DeltaZstd => {
                let n = if k == PageKind::DeltaLz4 {
                    Unpacker::lz4(payload, &mut self.scratch[..], k)?
                } else {
                    self.unpacker.zstd(payload, &mut self.scratch[..], k)?
                };
                out.copy_from_slice(base);
                zrle::apply(&self.scratch[..n], out, k)?;
            }
            PageKind::Full if len != PAGE_SIZE => return Err(CodecError::FullLength { len }),
            PageKind::Full => out.copy_from_slice(payload),
            PageKind::FullLz4 | PageKind::FullZstd => {
                let (codec, n) = if k == PageKind::FullLz4 {
                    ("lz4", Unpacker::lz4(payload, &mut out[..], k)?)
                } else {
                    ("zstd", self.unpacker.zstd(payload, &mut out[..], k)?)
                };
                if n != PAGE_SIZE {
                    return Err(CodecError::DecompressedSize { codec, got: n });
                }
            }
        }
        Ok(k)
    }
}

#[cfg(test)]
mod tests;
