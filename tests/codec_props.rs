//! Property tests of the page codec: round trips for every compressor over
//! varied pages and edits, and a decoder that survives arbitrary input.

use castor::codec::{CodecError, Compressor, Decoder, Encoder, PageKind};
use castor::PAGE_SIZE;
use proptest::prelude::*;

type Page = [u8; PAGE_SIZE];

/// Page contents, generated from a seed so cases stay small and shrinkable.
#[derive(Debug, Clone, Copy)]
enum Fill {
    Zero,
    Random(u64),
    /// Words from a small vocabulary: compresses like text or page tables.
    Text(u64),
    Pattern(u8, u8),
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn make_page(f: Fill) -> Page {
    match f {
        Fill::Zero => [0; PAGE_SIZE],
        Fill::Random(seed) => {
            let mut s = seed | 1;
            std::array::from_fn(|_| (xorshift(&mut s) >> 32) as u8)
        }
        Fill::Text(seed) => {
            let words: [&[u8]; 6] = [
                b"alpha ",
                b"beta ",
                b"gamma\n",
                b"\0\0\0\0",
                b"pte ",
                b"42 ",
            ];
            let mut s = seed | 1;
            let mut v = Vec::with_capacity(PAGE_SIZE + 8);
            while v.len() < PAGE_SIZE {
                v.extend_from_slice(words[(xorshift(&mut s) % 6) as usize]);
            }
            v.truncate(PAGE_SIZE);
            v.try_into().unwrap()
        }
        Fill::Pattern(a, period) => {
            std::array::from_fn(|i| if i % (period as usize + 1) == 0 { a } else { 0 })
        }
    }
}

fn fill() -> impl Strategy<Value = Fill> {
    prop_oneof![
        1 => Just(Fill::Zero),
        2 => any::<u64>().prop_map(Fill::Random),
        3 => any::<u64>().prop_map(Fill::Text),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(a, p)| Fill::Pattern(a, p)),
    ]
}

/// How the new page differs from `prev`.
#[derive(Debug, Clone)]
enum Edit {
    /// Single bytes at offsets.
    Bytes(Vec<(usize, u8)>),
    /// Runs of (offset, length, value).
    Runs(Vec<(usize, usize, u8)>),
    /// A different page altogether.
    Replace(Fill),
    Same,
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => prop::collection::vec((0..PAGE_SIZE, any::<u8>()), 1..64).prop_map(Edit::Bytes),
        3 => prop::collection::vec((0..PAGE_SIZE, 1usize..600, any::<u8>()), 1..8)
            .prop_map(Edit::Runs),
        2 => fill().prop_map(Edit::Replace),
        1 => Just(Edit::Same),
    ]
}

fn apply_edit(prev: &Page, e: &Edit) -> Page {
    let mut p = *prev;
    match e {
        Edit::Bytes(v) => v.iter().for_each(|&(o, b)| p[o] = b),
        Edit::Runs(v) => {
            for &(o, len, b) in v {
                let end = (o + len).min(PAGE_SIZE);
                p[o..end].fill(b);
            }
        }
        Edit::Replace(f) => p = make_page(*f),
        Edit::Same => {}
    }
    p
}

fn compressor() -> impl Strategy<Value = Compressor> {
    prop_oneof![
        Just(Compressor::None),
        Just(Compressor::Lz4),
        Just(Compressor::Zstd(1)),
        (-5i32..=19).prop_map(Compressor::Zstd),
    ]
}

/// Decodes and returns the result; the decoder must not panic whatever it gets.
fn decode(kind: u8, payload: &[u8], base: &Page) -> Result<(PageKind, Page), CodecError> {
    let mut out = [0xC3u8; PAGE_SIZE];
    let k = Decoder::new().decode(kind, payload, base, &mut out)?;
    Ok((k, out))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn roundtrip(c in compressor(), prev in fill(), e in edit(), has_prev in prop::bool::weighted(0.85)) {
        let prev = make_page(prev);
        let page = apply_edit(&prev, &e);
        let prev_opt = has_prev.then_some(&prev);
        let mut enc = Encoder::new(c);
        let mut out = Vec::new();
        let kind = enc.encode(&page, prev_opt, &mut out);
        prop_assert!(out.len() <= PAGE_SIZE, "{kind:?} payload {} bytes", out.len());
        if !has_prev {
            prop_assert!(!kind.needs_base(), "{kind:?} without prev");
        }
        if c == Compressor::None {
            prop_assert!(matches!(kind, PageKind::Zero | PageKind::Unchanged | PageKind::Delta | PageKind::Full));
        }
        // Kinds that need no base must decode against any base.
        let base = if kind.needs_base() { prev } else { make_page(Fill::Random(7)) };
        let (k, got) = decode(kind as u8, &out, &base).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(k, kind);
        prop_assert!(got == page, "{:?} with {:?} did not round-trip", kind, c);
        // Smallest-of: never worse than the raw page, and exact for trivial pages.
        if has_prev && page == prev { prop_assert_eq!(kind, PageKind::Unchanged); }
        else if page == [0; PAGE_SIZE] { prop_assert_eq!(kind, PageKind::Zero); }
    }

    #[test]
    fn encoder_reuse_is_stateless(c in compressor(), edits in prop::collection::vec((fill(), edit()), 1..6)) {
        // One encoder over many pages gives what fresh encoders give.
        let mut shared = Encoder::new(c);
        for (f, e) in &edits {
            let prev = make_page(*f);
            let page = apply_edit(&prev, e);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            let ka = shared.encode(&page, Some(&prev), &mut a);
            let kb = Encoder::new(c).encode(&page, Some(&prev), &mut b);
            prop_assert_eq!(ka, kb);
            prop_assert_eq!(a, b);
        }
        prop_assert_eq!(shared.stats().total_pages(), edits.len() as u64);
    }

    #[test]
    fn arbitrary_input_never_panics(kind in any::<u8>(), payload in prop::collection::vec(any::<u8>(), 0..PAGE_SIZE + 16), base in fill()) {
        let base = make_page(base);
        let r = decode(kind, &payload, &base);
        if kind == 0 || kind > 8 { prop_assert!(r.is_err()); }
    }

    #[test]
    fn mutated_payloads_never_panic(
        c in compressor(), prev in fill(), e in edit(),
        kind in prop::option::of(any::<u8>()),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in prop::option::of(any::<prop::sample::Index>()),
        tail in prop::collection::vec(any::<u8>(), 0..4),
    ) {
        let prev = make_page(prev);
        let page = apply_edit(&prev, &e);
        let mut out = Vec::new();
        let k = Encoder::new(c).encode(&page, Some(&prev), &mut out);
        if !out.is_empty() {
            for (i, x) in &flips {
                let i = i.index(out.len());
                out[i] ^= x;
            }
            if let Some(cut) = cut { out.truncate(cut.index(out.len())); }
        }
        out.extend_from_slice(&tail);
        let _ = decode(kind.unwrap_or(k as u8), &out, &prev);
    }

    #[test]
    fn compressed_garbage_reaches_zrle_parser(stream in prop::collection::vec(any::<u8>(), 0..300), base in fill()) {
        // Valid lz4/zstd wrapping of garbage: decompression succeeds, so the
        // zero-run parser sees the hostile bytes.
        let base = make_page(base);
        let lz = lz4_flex::block::compress(&stream);
        let zs = zstd::bulk::compress(&stream, 1).unwrap();
        for (kind, p) in [(3u8, &stream), (4, &lz), (5, &zs), (7, &lz), (8, &zs)] {
            let _ = decode(kind, p, &base);
        }
    }
}
