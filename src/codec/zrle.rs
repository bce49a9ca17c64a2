//! Zero-run encoding (ZRLE) of `page XOR prev`; the token format is specified
//! in the module doc of [`super`] and is part of the wire format.
//!
//! The encoder works in two passes over little-endian `u64` words:
//! 1. [`super::scan::scan`] reads both pages once: the zero check, a 64-bit
//!    bitmap of the 64-byte blocks that changed, and the changed bytes.
//! 2. [`encode`] visits only dirty blocks, trims literals to byte precision
//!    with `trailing_zeros`/`leading_zeros`, and XORs literal bytes straight
//!    from the two pages into the output. A small edit costs a handful of
//!    word reads beyond pass 1.

use super::{CodecError, PageKind};
use crate::PAGE_SIZE;

const WORDS: usize = PAGE_SIZE / 8;
/// Bytes covered by one bit of the dirty-block bitmap (64 blocks per page).
const BLOCK: usize = PAGE_SIZE / 64;
const BLOCK_WORDS: usize = BLOCK / 8;

/// Zero gaps of at most this many bytes inside a literal are kept in it: a new
/// token costs 2 header bytes for short runs, so splitting would not pay.
/// (Gaps inside one word are always kept; this is an encoder choice, not part
/// of the format.)
const MERGE_GAP: usize = 2;

/// Largest value a 2-byte varint holds.
pub const VARINT_MAX: usize = (1 << 14) - 1;

#[inline(always)]
fn le64(chunk: &[u8]) -> u64 {
    // Callers pass 8-byte chunks; the fallback is unreachable and compiled out.
    u64::from_le_bytes(chunk.try_into().unwrap_or_default())
}

#[inline(always)]
fn xor_word(page: &[u8; PAGE_SIZE], prev: &[u8; PAGE_SIZE], i: usize) -> u64 {
    le64(&page[i * 8..i * 8 + 8]) ^ le64(&prev[i * 8..i * 8 + 8])
}

/// True when every byte of `page` is zero. Exits at the first non-zero
/// 512-byte stretch, so ordinary data pages cost a few dozen loads.
pub fn is_zero(page: &[u8; PAGE_SIZE]) -> bool {
    page.chunks_exact(512)
        .all(|c| c.chunks_exact(8).fold(0u64, |acc, w| acc | le64(w)) == 0)
}

/// First word at index >= `i` whose XOR is non-zero, skipping clean blocks.
#[inline(always)]
fn next_dirty(
    page: &[u8; PAGE_SIZE],
    prev: &[u8; PAGE_SIZE],
    dirty: u64,
    mut i: usize,
) -> Option<(usize, u64)> {
    while i < WORDS {
        let b = i / BLOCK_WORDS;
        let rest = dirty & (u64::MAX << b);
        if rest == 0 {
            return None;
        }
        let nb = rest.trailing_zeros() as usize;
        if nb > b {
            i = nb * BLOCK_WORDS;
        }
        let x = xor_word(page, prev, i);
        if x != 0 {
            return Some((i, x));
        }
        i += 1;
    }
    None
}

#[inline(always)]
fn varint_len(v: usize) -> usize {
    1 + usize::from(v >= 0x80)
}

#[inline(always)]
fn put_varint(out: &mut Vec<u8>, v: usize) {
    debug_assert!(v <= VARINT_MAX);
    if v < 0x80 {
        out.push(v as u8);
    } else {
        out.extend_from_slice(&[(v as u8) | 0x80, (v >> 7) as u8]);
    }
}

/// Pass 2: appends the ZRLE stream of `page XOR prev` to `out`, given the
/// `dirty` bitmap from [`super::scan::scan`]. Returns false (and leaves `out` as it was)
/// if the stream would exceed `limit` bytes.
pub fn encode(
    page: &[u8; PAGE_SIZE],
    prev: &[u8; PAGE_SIZE],
    dirty: u64,
    out: &mut Vec<u8>,
    limit: usize,
) -> bool {
    let base = out.len();
    let cap = base + limit;
    let mut pos = 0usize; // page offset where the current zero run starts
    let mut i = 0usize; // next word to examine
    while let Some((w, x)) = next_dirty(page, prev, dirty, i) {
        let start = w * 8 + (x.trailing_zeros() / 8) as usize;
        let mut end = w * 8 + 8 - (x.leading_zeros() / 8) as usize;
        let mut j = w + 1;
        // Literal bytes that still fit: checked while extending so a dense
        // page gives up as soon as it overflows, not after the whole page.
        let room = cap.saturating_sub(out.len());
        while j < WORDS {
            if end - start > room {
                out.truncate(base);
                return false;
            }
            let y = xor_word(page, prev, j);
            // A zero word is a gap of >= 8 bytes: always ends the literal.
            if y == 0 {
                break;
            }
            let s = j * 8 + (y.trailing_zeros() / 8) as usize;
            if s - end > MERGE_GAP {
                break;
            }
            end = j * 8 + 8 - (y.leading_zeros() / 8) as usize;
            j += 1;
        }
        let run = start - pos;
        let len = end - start;
        if out.len() + varint_len(run) + varint_len(len) + len > cap {
            out.truncate(base);
            return false;
        }
        put_varint(out, run);
        put_varint(out, len);
        out.extend(
            page[start..end]
                .iter()
                .zip(&prev[start..end])
                .map(|(a, b)| a ^ b),
        );
        pos = end;
        i = j;
    }
    true
}

/// Reads a varint of at most 2 bytes at `stream[at..]`; returns (value, next).
#[inline(always)]
fn get_varint(stream: &[u8], at: usize) -> Result<(usize, usize), CodecError> {
    let b0 = *stream.get(at).ok_or(CodecError::TruncatedVarint { at })?;
    if b0 < 0x80 {
        return Ok((usize::from(b0), at + 1));
    }
    let b1 = *stream
        .get(at + 1)
        .ok_or(CodecError::TruncatedVarint { at })?;
    if b1 >= 0x80 {
        return Err(CodecError::VarintTooLong { at });
    }
    if b1 == 0 {
        return Err(CodecError::NonCanonicalVarint { at });
    }
    Ok((usize::from(b0 & 0x7f) | usize::from(b1) << 7, at + 2))
}

/// XORs the ZRLE `stream` (untrusted) into `out`, which must already hold the
/// base page. On error `out` is partly updated and must be discarded.
pub fn apply(stream: &[u8], out: &mut [u8; PAGE_SIZE], kind: PageKind) -> Result<(), CodecError> {
    walk(stream, kind, |pos, lit| {
        for (o, l) in out[pos..pos + lit.len()].iter_mut().zip(lit) {
            *o ^= l;
        }
    })
}

/// Checks an untrusted ZRLE `stream` without applying it: a stream that
/// passes makes [`apply`] succeed on any page.
pub fn check(stream: &[u8], kind: PageKind) -> Result<(), CodecError> {
    walk(stream, kind, |_, _| {})
}

/// Parses `stream`, calling `literal(offset, bytes)` for each literal once
/// its bounds are proven to lie inside the page.
fn walk(
    stream: &[u8],
    kind: PageKind,
    mut literal: impl FnMut(usize, &[u8]),
) -> Result<(), CodecError> {
    if stream.is_empty() {
        return Err(CodecError::EmptyDelta { kind });
    }
    let mut pos = 0usize;
    let mut at = 0usize;
    while at < stream.len() {
        let (run, next) = get_varint(stream, at)?;
        if pos + run > PAGE_SIZE {
            return Err(CodecError::ZeroRunOverrun { offset: pos, run });
        }
        pos += run;
        let (len, next) = get_varint(stream, next)?;
        if len == 0 {
            return Err(CodecError::EmptyLiteral { offset: pos });
        }
        if pos + len > PAGE_SIZE {
            return Err(CodecError::LiteralOverrun { offset: pos, len });
        }
        let lit = stream
            .get(next..next + len)
            .ok_or(CodecError::TruncatedLiteral {
                at: next,
                len,
                remaining: stream.len() - next,
            })?;
        literal(pos, lit);
        pos += len;
        at = next + len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::scan::Scan;

    fn scan(page: &[u8; PAGE_SIZE], prev: &[u8; PAGE_SIZE]) -> (bool, u64) {
        let Scan { zero, dirty, .. } = crate::codec::scan::scan(page, prev);
        (zero, dirty)
    }

    fn enc(page: &[u8; PAGE_SIZE], prev: &[u8; PAGE_SIZE]) -> Vec<u8> {
        let (_, dirty) = scan(page, prev);
        let mut out = Vec::new();
        assert!(encode(page, prev, dirty, &mut out, PAGE_SIZE));
        out
    }

    fn roundtrip(page: &[u8; PAGE_SIZE], prev: &[u8; PAGE_SIZE]) -> Vec<u8> {
        let s = enc(page, prev);
        let mut out = *prev;
        apply(&s, &mut out, PageKind::Delta).unwrap();
        assert_eq!(&out[..], &page[..]);
        s
    }

    #[test]
    fn zero_detection() {
        let mut p = [0u8; PAGE_SIZE];
        assert!(is_zero(&p));
        assert!(scan(&p, &p).0);
        p[PAGE_SIZE - 1] = 1;
        assert!(!is_zero(&p));
        assert!(!scan(&p, &[0; PAGE_SIZE]).0);
    }

    #[test]
    fn dirty_bitmap_marks_blocks() {
        let prev = [7u8; PAGE_SIZE];
        let mut page = prev;
        page[0] = 0;
        page[64 * 5 + 63] = 0;
        page[PAGE_SIZE - 1] = 0;
        assert_eq!(scan(&page, &prev).1, 1 | 1 << 5 | 1 << 63);
        assert_eq!(scan(&prev, &prev).1, 0);
    }

    #[test]
    fn golden_stream() {
        // The exact bytes are the wire format: changes at 3..5 and 200.
        let prev = [0u8; PAGE_SIZE];
        let mut page = prev;
        page[3] = 0xAA;
        page[4] = 0xBB;
        page[200] = 0xCC;
        let s = roundtrip(&page, &prev);
        // run 3, len 2, AA BB; run 200-5=195 (0xC3 0x01), len 1, CC.
        assert_eq!(s, [3, 2, 0xAA, 0xBB, 0xC3, 0x01, 1, 0xCC]);
    }

    #[test]
    fn short_gaps_merge_long_gaps_split() {
        let prev = [0u8; PAGE_SIZE];
        let mut page = prev;
        page[7] = 1; // end of word 0
        page[10] = 2; // gap of 2 into word 1 -> merged
        page[14] = 3; // same word -> in literal
        page[24] = 4; // word 3, word 2 is zero -> new token
        let s = roundtrip(&page, &prev);
        assert_eq!(s, [7, 8, 1, 0, 0, 2, 0, 0, 0, 3, 9, 1, 4]);
    }

    #[test]
    fn page_edges_and_dense() {
        let prev = [0x55u8; PAGE_SIZE];
        let mut page = prev;
        page[0] ^= 1;
        page[PAGE_SIZE - 1] ^= 1;
        let s = roundtrip(&page, &prev);
        assert_eq!(s.len(), 3 + 4); // [0, 1, x] [0xFE, 0x1F, 1, x]
        let dense: [u8; PAGE_SIZE] = std::array::from_fn(|i| (i * 7 + 1) as u8);
        let (_, dirty) = scan(&dense, &prev);
        let mut out = vec![9];
        assert!(!encode(&dense, &prev, dirty, &mut out, PAGE_SIZE));
        assert_eq!(out, [9]);
        // With room for the whole page it is one token of 4096 bytes.
        assert!(encode(&dense, &prev, dirty, &mut out, PAGE_SIZE + 4));
        assert_eq!(out.len(), 1 + 1 + 2 + PAGE_SIZE);
    }

    #[test]
    fn varint_rules() {
        assert_eq!(get_varint(&[0x7f], 0).unwrap(), (127, 1));
        assert_eq!(get_varint(&[0x80, 0x20], 0).unwrap(), (4096, 2));
        assert_eq!(get_varint(&[0xff, 0x7f], 0).unwrap(), (VARINT_MAX, 2));
        assert!(matches!(
            get_varint(&[0x80], 0),
            Err(CodecError::TruncatedVarint { at: 0 })
        ));
        assert!(matches!(
            get_varint(&[0x80, 0x80, 0x01], 0),
            Err(CodecError::VarintTooLong { at: 0 })
        ));
        assert!(matches!(
            get_varint(&[0x85, 0x00], 0),
            Err(CodecError::NonCanonicalVarint { at: 0 })
        ));
    }

    #[test]
    fn malformed_streams() {
        let mut out = [0u8; PAGE_SIZE];
        let mut check = |s: &[u8]| apply(s, &mut out, PageKind::Delta).unwrap_err();
        assert!(matches!(check(&[]), CodecError::EmptyDelta { .. }));
        // run 4090 then a literal of 20 bytes.
        let e = check(&[0xFA, 0x1F, 20]);
        assert!(matches!(
            e,
            CodecError::LiteralOverrun {
                offset: 4090,
                len: 20
            }
        ));
        assert_eq!(
            e.to_string(),
            "literal overruns page: offset 4090 + length 20 > 4096"
        );
        // Two tokens: literal up to 4090, then a run of 20.
        let mut s = vec![0xFA - 1, 0x1F, 1, 0xFF, 20, 1, 0];
        let e = check(&s);
        assert_eq!(
            e.to_string(),
            "zero-run token overruns page: offset 4090 + run 20 > 4096"
        );
        s.truncate(4);
        assert!(matches!(
            check(&[0, 0]),
            CodecError::EmptyLiteral { offset: 0 }
        ));
        assert!(matches!(
            check(&[0, 5, 1, 2]),
            CodecError::TruncatedLiteral {
                at: 2,
                len: 5,
                remaining: 2
            }
        ));
        // A complete token followed by a stray byte: trailing garbage.
        assert!(matches!(
            check(&[0, 1, 9, 3]),
            CodecError::TruncatedVarint { at: 4 }
        ));
        assert!(apply(&s, &mut out, PageKind::Delta).is_ok());
    }
}
