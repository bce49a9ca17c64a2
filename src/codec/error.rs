//! Errors of the page decoder. Every variant names the offending value, so a
//! log line says which byte of which record was wrong, not just "corrupt".

use super::PageKind;
use crate::PAGE_SIZE;

/// Why [`super::Decoder::decode`] rejected an untrusted `kind`/`payload`.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("unknown page kind {0}")]
    UnknownKind(u8),

    #[error("page kind 0 (Invalid) on the wire: a zeroed record header was sent")]
    InvalidKind,

    #[error("payload of {len} bytes for a {kind:?} page (kind {k}), which carries none", k = *kind as u8)]
    UnexpectedPayload { kind: PageKind, len: usize },

    #[error("payload of {len} bytes for a {kind:?} page exceeds the page size {PAGE_SIZE}")]
    PayloadTooLong { kind: PageKind, len: usize },

    #[error("Full page payload of {len} bytes, expected {PAGE_SIZE}")]
    FullLength { len: usize },

    #[error("empty zero-run stream in a {kind:?} page (an unchanged page is kind Unchanged)")]
    EmptyDelta { kind: PageKind },

    #[error("zero-run stream truncated in a varint at stream offset {at}")]
    TruncatedVarint { at: usize },

    #[error("varint at zero-run stream offset {at} is longer than 2 bytes")]
    VarintTooLong { at: usize },

    #[error("varint at zero-run stream offset {at} is not minimally encoded")]
    NonCanonicalVarint { at: usize },

    #[error("zero-run token overruns page: offset {offset} + run {run} > {PAGE_SIZE}")]
    ZeroRunOverrun { offset: usize, run: usize },

    #[error("literal overruns page: offset {offset} + length {len} > {PAGE_SIZE}")]
    LiteralOverrun { offset: usize, len: usize },

    #[error(
        "empty literal in zero-run token at page offset {offset} (literal length must be >= 1)"
    )]
    EmptyLiteral { offset: usize },

    #[error(
        "literal of {len} bytes at zero-run stream offset {at} but only {remaining} bytes remain"
    )]
    TruncatedLiteral {
        at: usize,
        len: usize,
        remaining: usize,
    },

    #[error("lz4 payload of a {kind:?} page ({len} bytes) does not decompress within {PAGE_SIZE} bytes: {source}")]
    Lz4 {
        kind: PageKind,
        len: usize,
        source: lz4_flex::block::DecompressError,
    },

    #[error("zstd payload of a {kind:?} page ({len} bytes) does not decompress within {PAGE_SIZE} bytes: {source}")]
    Zstd {
        kind: PageKind,
        len: usize,
        source: std::io::Error,
    },

    #[error("{codec} payload decompressed to {got} bytes, expected {PAGE_SIZE}")]
    DecompressedSize { codec: &'static str, got: usize },

    #[error(
        "zstd decompression context unavailable (allocation failed); cannot decode {kind:?} page"
    )]
    ZstdUnavailable { kind: PageKind },
}
