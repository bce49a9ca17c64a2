//! Encoder/decoder tests per page kind and for malformed input.

use super::*;

const ALL_COMPRESSORS: [Compressor; 3] = [Compressor::None, Compressor::Lz4, Compressor::Zstd(1)];

/// Deterministic, compressible "text" page.
fn text_page(seed: u64) -> [u8; PAGE_SIZE] {
    let words: [&[u8]; 8] = [
        b"page ", b"dirty ", b"epoch ", b"guest ", b"frame ", b"backup ", b"ack ", b"\n",
    ];
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(PAGE_SIZE + 8);
    while v.len() < PAGE_SIZE {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v.extend_from_slice(words[(s % 8) as usize]);
    }
    v.truncate(PAGE_SIZE);
    v.try_into().unwrap()
}

fn random_page(seed: u64) -> [u8; PAGE_SIZE] {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    std::array::from_fn(|_| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 24) as u8
    })
}

fn roundtrip(
    c: Compressor,
    page: &[u8; PAGE_SIZE],
    prev: Option<&[u8; PAGE_SIZE]>,
) -> (PageKind, usize) {
    let mut enc = Encoder::new(c);
    let mut out = vec![0xEE; 3]; // encode appends
    let kind = enc.encode(page, prev, &mut out);
    assert_eq!(&out[..3], &[0xEE; 3]);
    let payload = &out[3..];
    assert!(payload.len() <= PAGE_SIZE);
    let base = prev.copied().unwrap_or([0x5A; PAGE_SIZE]);
    let mut got = [0xA5u8; PAGE_SIZE];
    let k = Decoder::new()
        .decode(kind as u8, payload, &base, &mut got)
        .unwrap();
    assert_eq!(k, kind);
    assert!(got == *page, "{c:?} {kind:?} roundtrip mismatch");
    assert_eq!(enc.stats().pages[kind as usize], 1);
    assert_eq!(enc.stats().bytes[kind as usize], payload.len() as u64);
    (kind, payload.len())
}

#[test]
fn kind_numbers_are_stable() {
    for (i, k) in PageKind::ALL.iter().enumerate() {
        assert_eq!(*k as usize, i);
        assert_eq!(PageKind::from_u8(i as u8), Some(*k));
    }
    assert_eq!(PageKind::from_u8(9), None);
    assert_eq!(PageKind::FullZstd as u8, 8);
    assert!(PageKind::Delta.needs_base() && !PageKind::Full.needs_base());
}

#[test]
fn zero_page() {
    let zero = [0u8; PAGE_SIZE];
    for c in ALL_COMPRESSORS {
        assert_eq!(roundtrip(c, &zero, None), (PageKind::Zero, 0));
        assert_eq!(
            roundtrip(c, &zero, Some(&text_page(1))),
            (PageKind::Zero, 0)
        );
        // A zero page over a zero copy is Unchanged: the engine does not
        // send unchanged pages at all, which is what makes the seed of a
        // mostly empty guest cost nothing on the wire.
        assert_eq!(roundtrip(c, &zero, Some(&zero)), (PageKind::Unchanged, 0));
    }
}

#[test]
fn unchanged_page() {
    let p = text_page(2);
    for c in ALL_COMPRESSORS {
        assert_eq!(roundtrip(c, &p, Some(&p)), (PageKind::Unchanged, 0));
    }
}

#[test]
fn small_edit_is_plain_delta() {
    let prev = text_page(3);
    let mut page = prev;
    page[100..132].copy_from_slice(&[0xAB; 32]);
    page[4000] ^= 0xFF;
    for c in ALL_COMPRESSORS {
        let (kind, len) = roundtrip(c, &page, Some(&prev));
        assert_eq!(kind, PageKind::Delta);
        assert!(len <= 32 + 1 + 6, "{len}");
    }
}

#[test]
fn large_compressible_delta_is_packed() {
    let prev = [0u8; PAGE_SIZE];
    let mut page = prev;
    page[..1500].fill(7); // one big, very compressible literal
    page[PAGE_SIZE - 1] = 1;
    assert_eq!(
        roundtrip(Compressor::None, &page, Some(&prev)).0,
        PageKind::Delta
    );
    assert_eq!(
        roundtrip(Compressor::Lz4, &page, Some(&prev)).0,
        PageKind::DeltaLz4
    );
    assert_eq!(
        roundtrip(Compressor::Zstd(1), &page, Some(&prev)).0,
        PageKind::DeltaZstd
    );
}

#[test]
fn dense_delta_compresses_the_page_instead() {
    // 3000 bytes rewritten: the stream is too dense, the page is compressed.
    let prev = text_page(12);
    let mut page = prev;
    page[..3000].copy_from_slice(&text_page(13)[..3000]);
    assert_eq!(
        roundtrip(Compressor::Lz4, &page, Some(&prev)).0,
        PageKind::FullLz4
    );
    // Incompressible rewrite of 3000 bytes: the plain delta is still smaller.
    page[..3000].copy_from_slice(&random_page(14)[..3000]);
    let (k, len) = roundtrip(Compressor::Zstd(1), &page, Some(&prev));
    assert_eq!(k, PageKind::Delta);
    assert!(len < 3100, "{len}");
}

#[test]
fn rewritten_text_page_goes_full_compressed() {
    let prev = random_page(4);
    let page = text_page(5);
    assert_eq!(
        roundtrip(Compressor::None, &page, Some(&prev)).0,
        PageKind::Full
    );
    let (k, len) = roundtrip(Compressor::Lz4, &page, Some(&prev));
    assert_eq!(k, PageKind::FullLz4);
    assert!(len < PAGE_SIZE / 2);
    let (k, _) = roundtrip(Compressor::Zstd(1), &page, Some(&prev));
    assert_eq!(k, PageKind::FullZstd);
    assert_eq!(roundtrip(Compressor::Lz4, &page, None).0, PageKind::FullLz4);
    assert_eq!(
        roundtrip(Compressor::Zstd(3), &page, None).0,
        PageKind::FullZstd
    );
}

#[test]
fn random_page_goes_full_raw() {
    let page = random_page(6);
    for c in ALL_COMPRESSORS {
        assert_eq!(roundtrip(c, &page, None), (PageKind::Full, PAGE_SIZE));
        assert_eq!(
            roundtrip(c, &page, Some(&random_page(7))),
            (PageKind::Full, PAGE_SIZE)
        );
    }
}

#[test]
fn stats_accumulate_and_reset() {
    let mut enc = Encoder::new(Compressor::Lz4);
    let mut out = Vec::new();
    let p = text_page(8);
    enc.encode(&[0; PAGE_SIZE], None, &mut out);
    enc.encode(&p, Some(&p), &mut out);
    enc.encode(&random_page(9), None, &mut out);
    assert_eq!(enc.stats().total_pages(), 3);
    assert_eq!(enc.stats().total_bytes(), PAGE_SIZE as u64);
    assert_eq!(out.len(), PAGE_SIZE);
    enc.reset_stats();
    assert_eq!(enc.stats(), &EncodeStats::default());
    assert_eq!(enc.compressor(), Compressor::Lz4);
}

fn decode_err(kind: u8, payload: &[u8]) -> CodecError {
    let base = text_page(10);
    let mut out = [0u8; PAGE_SIZE];
    Decoder::new()
        .decode(kind, payload, &base, &mut out)
        .unwrap_err()
}

#[test]
fn malformed_kind_and_lengths() {
    assert_eq!(decode_err(77, &[]).to_string(), "unknown page kind 77");
    assert!(matches!(decode_err(0, &[]), CodecError::InvalidKind));
    assert_eq!(
        decode_err(1, &[0; 9]).to_string(),
        "payload of 9 bytes for a Zero page (kind 1), which carries none"
    );
    assert!(matches!(
        decode_err(2, &[1]),
        CodecError::UnexpectedPayload {
            kind: PageKind::Unchanged,
            len: 1
        }
    ));
    assert_eq!(
        decode_err(6, &[0; 100]).to_string(),
        "Full page payload of 100 bytes, expected 4096"
    );
    for k in 1..=8 {
        assert!(matches!(
            decode_err(k, &[0; PAGE_SIZE + 1]),
            CodecError::PayloadTooLong { len: 4097, .. }
        ));
    }
}

#[test]
fn malformed_delta() {
    assert!(matches!(decode_err(3, &[]), CodecError::EmptyDelta { .. }));
    assert_eq!(
        decode_err(3, &[0xF9, 0x1F, 1, 0xFF, 20, 1, 0]).to_string(),
        "zero-run token overruns page: offset 4090 + run 20 > 4096"
    );
    // Trailing garbage after a valid token.
    assert!(matches!(
        decode_err(3, &[0, 1, 9, 0x80]),
        CodecError::TruncatedVarint { at: 3 }
    ));
}

#[test]
fn malformed_compressed() {
    // A valid lz4 block of 100 bytes is not a full page.
    let short = lz4_flex::block::compress(&[1u8; 100]);
    assert_eq!(
        decode_err(7, &short).to_string(),
        "lz4 payload decompressed to 100 bytes, expected 4096"
    );
    let short = zstd::bulk::compress(&[1u8; 100], 1).unwrap();
    assert_eq!(
        decode_err(8, &short).to_string(),
        "zstd payload decompressed to 100 bytes, expected 4096"
    );
    // Garbage payloads.
    for k in [4u8, 5, 7, 8] {
        let e = decode_err(k, &[0xFF; 16]);
        assert!(
            matches!(e, CodecError::Lz4 { .. } | CodecError::Zstd { .. }),
            "{k}: {e}"
        );
    }
    // A compressed delta whose stream is itself malformed.
    let bad = lz4_flex::block::compress(&[0, 0]);
    assert!(matches!(
        decode_err(4, &bad),
        CodecError::EmptyLiteral { offset: 0 }
    ));
    assert!(matches!(
        decode_err(5, &zstd::bulk::compress(&[], 1).unwrap()),
        CodecError::EmptyDelta {
            kind: PageKind::DeltaZstd
        }
    ));
    // A full page with trailing garbage after the lz4 block.
    let mut long = lz4_flex::block::compress(&text_page(11));
    long.extend_from_slice(&[0x10, 0x41]);
    assert!(decode_err(7, &long).to_string().contains("lz4"));
}

#[test]
fn zrle_stream_longer_than_page_when_decompressed_is_rejected() {
    // lz4 of a 5000-byte stream: bounded to PAGE_SIZE, so an error.
    let big = lz4_flex::block::compress(&[0u8; 5000]);
    assert!(matches!(decode_err(4, &big), CodecError::Lz4 { .. }));
}
