//! The general-purpose compressors behind the `*Lz4` / `*Zstd` page kinds,
//! with their scratch buffers and contexts kept across pages so that encoding
//! a page allocates nothing of ours (lz4_flex still allocates its 8 KiB hash
//! table per call; that is internal to the library).
//!
//! Decompression is always into a caller-provided buffer of at most
//! `PAGE_SIZE` bytes, so a hostile payload cannot make us produce more.

use super::{CodecError, Compressor, PageKind};
use crate::PAGE_SIZE;

/// Compression side: one per [`super::Encoder`].
pub struct Packer {
    which: Compressor,
    /// lz4_flex refuses to compress into less than its worst-case bound.
    lz4_buf: Box<[u8]>,
    /// `None` for other compressors, or if zstd could not allocate a context
    /// (then pages simply go uncompressed).
    zstd: Option<zstd::bulk::Compressor<'static>>,
    zstd_buf: Box<[u8]>,
}

impl Packer {
    pub fn new(which: Compressor) -> Self {
        let zstd = match which {
            Compressor::Zstd(level) => {
                let range = zstd::compression_level_range();
                let level = level.clamp(*range.start(), *range.end());
                zstd::bulk::Compressor::new(level).ok()
            }
            _ => None,
        };
        let lz4_len = match which {
            Compressor::Lz4 => lz4_flex::block::get_maximum_output_size(PAGE_SIZE),
            _ => 0,
        };
        let zstd_len = match which {
            Compressor::Zstd(_) => zstd::zstd_safe::compress_bound(PAGE_SIZE),
            _ => 0,
        };
        Packer {
            which,
            lz4_buf: vec![0; lz4_len].into_boxed_slice(),
            zstd,
            zstd_buf: vec![0; zstd_len].into_boxed_slice(),
        }
    }

    /// Compresses `src` (at most `PAGE_SIZE` bytes) and returns the result if
    /// it is strictly shorter than `limit` bytes; `None` when it does not pay,
    /// fails, or the compressor is `None`.
    pub fn pack(&mut self, src: &[u8], limit: usize) -> Option<&[u8]> {
        debug_assert!(src.len() <= PAGE_SIZE);
        match self.which {
            Compressor::None => None,
            Compressor::Lz4 => {
                let n = lz4_flex::block::compress_into(src, &mut self.lz4_buf).ok()?;
                (n < limit).then(|| &self.lz4_buf[..n])
            }
            Compressor::Zstd(_) => {
                // Destination sized to the compress bound, so zstd never fails
                // for lack of room; whether the result pays is decided here.
                let z = self.zstd.as_mut()?;
                let n = z.compress_to_buffer(src, &mut self.zstd_buf[..]).ok()?;
                (n < limit).then(|| &self.zstd_buf[..n])
            }
        }
    }
}

/// Decompression side: one per [`super::Decoder`].
pub struct Unpacker {
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl Unpacker {
    pub fn new() -> Self {
        Unpacker {
            zstd: zstd::bulk::Decompressor::new().ok(),
        }
    }

    /// Decompresses an lz4 block into `dst`; returns the decompressed length.
    pub fn lz4(payload: &[u8], dst: &mut [u8], kind: PageKind) -> Result<usize, CodecError> {
        lz4_flex::block::decompress_into(payload, dst).map_err(|source| CodecError::Lz4 {
            kind,
            len: payload.len(),
            source,
        })
    }

    /// Decompresses zstd frame(s) into `dst`; returns the decompressed length.
    pub fn zstd(
        &mut self,
        payload: &[u8],
        dst: &mut [u8],
        kind: PageKind,
    ) -> Result<usize, CodecError> {
        let z = self
            .zstd
            .as_mut()
            .ok_or(CodecError::ZstdUnavailable { kind })?;
        z.decompress_to_buffer(payload, dst)
            .map_err(|source| CodecError::Zstd {
                kind,
                len: payload.len(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_page() -> [u8; PAGE_SIZE] {
        let t = b"the quick brown fox jumps over the lazy dog; ";
        std::array::from_fn(|i| t[i % t.len()])
    }

    #[test]
    fn pack_roundtrip_lz4_and_zstd() {
        let page = text_page();
        let mut dst = [0u8; PAGE_SIZE];
        let mut lz = Packer::new(Compressor::Lz4);
        let c = lz.pack(&page, PAGE_SIZE).unwrap().to_vec();
        assert!(c.len() < 200);
        assert_eq!(
            Unpacker::lz4(&c, &mut dst, PageKind::FullLz4).unwrap(),
            PAGE_SIZE
        );
        assert_eq!(dst, page);

        let mut zs = Packer::new(Compressor::Zstd(1));
        let c = zs.pack(&page, PAGE_SIZE).unwrap().to_vec();
        assert!(c.len() < 200);
        dst.fill(0);
        let mut un = Unpacker::new();
        assert_eq!(
            un.zstd(&c, &mut dst, PageKind::FullZstd).unwrap(),
            PAGE_SIZE
        );
        assert_eq!(dst, page);
    }

    #[test]
    fn pack_refuses_when_it_does_not_pay() {
        let page = text_page();
        assert!(Packer::new(Compressor::None)
            .pack(&page, PAGE_SIZE)
            .is_none());
        assert!(Packer::new(Compressor::Lz4).pack(&page, 10).is_none());
        assert!(Packer::new(Compressor::Zstd(1)).pack(&page, 10).is_none());
        assert!(Packer::new(Compressor::Zstd(1)).pack(&page, 0).is_none());
        // Out-of-range levels are clamped, not rejected.
        assert!(Packer::new(Compressor::Zstd(1000))
            .pack(&page, PAGE_SIZE)
            .is_some());
    }

    #[test]
    fn decompression_is_bounded() {
        let big = [0u8; 3 * PAGE_SIZE];
        let lz = lz4_flex::block::compress(&big);
        let z = zstd::bulk::compress(&big, 1).unwrap();
        let mut dst = [0u8; PAGE_SIZE];
        assert!(matches!(
            Unpacker::lz4(&lz, &mut dst, PageKind::FullLz4),
            Err(CodecError::Lz4 { .. })
        ));
        assert!(matches!(
            Unpacker::new().zstd(&z, &mut dst, PageKind::FullZstd),
            Err(CodecError::Zstd { .. })
        ));
    }
}
