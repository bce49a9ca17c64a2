//! Pass 1 of the encoder: one read of a page and its previous copy that
//! says what the page needs (not wire format; may change freely).
//!
//! [`scan`] reports whether the page is all zero, which 64-byte blocks
//! changed, and how many bytes changed. The last is an exact lower bound
//! on a zero-run stream's length (every changed byte is a literal byte),
//! so a page with more than [`super::DENSE_DELTA`] changed bytes is known
//! to be rewritten without building the stream at all.
//!
//! On x86-64 with AVX2 (checked at run time, once) the pass runs 32 bytes
//! per instruction; elsewhere on 64-bit words. Both give identical results
//! (tested against each other).

use crate::PAGE_SIZE;

/// Bytes covered by one bit of the dirty-block bitmap (64 blocks per page).
pub const BLOCK: usize = PAGE_SIZE / 64;

/// What one pass over `page` and `prev` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    /// Every byte of the page is zero.
    pub zero: bool,
    /// Bit b set: bytes `64*b .. 64*b+64` of page and prev differ.
    pub dirty: u64,
    /// Bytes where page and prev differ (0 ..= PAGE_SIZE).
    pub changed: usize,
}

/// Scans `page` against `prev` (see [`Scan`]).
pub fn scan(page: &[u8; PAGE_SIZE], prev: &[u8; PAGE_SIZE]) -> Scan {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above), the only
            // requirement of `scan_avx2` beyond its safe signature.
            return unsafe { scan_avx2(page, prev) };
        }
    }
    scan_words(page, prev)
}

#[inline(always)]
fn le64(chunk: &[u8]) -> u64 {
    // Callers pass 8-byte chunks; the fallback is unreachable and compiled out.
    u64::from_le_bytes(chunk.try_into().unwrap_or_default())
}

/// Non-zero bytes of `x`.
#[inline(always)]
fn nonzero_bytes(x: u64) -> u32 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    // The high bit of each byte ends up set iff the byte is non-zero:
    // its low 7 bits carry into bit 7, or bit 7 was set already.
    (((x & LOW7).wrapping_add(LOW7) | x) & !LOW7).count_ones()
}

/// The portable pass, on 64-bit words.
pub fn scan_words(page: &[u8; PAGE_SIZE], prev: &[u8; PAGE_SIZE]) -> Scan {
    let mut or_page = 0u64;
    let mut dirty = 0u64;
    let mut changed = 0u32;
    for (b, (p, q)) in page
        .chunks_exact(BLOCK)
        .zip(prev.chunks_exact(BLOCK))
        .enumerate()
    {
        let mut op = 0u64;
        let mut ox = 0u64;
        for (pw, qw) in p.chunks_exact(8).zip(q.chunks_exact(8)) {
            let a = le64(pw);
            let x = a ^ le64(qw);
            op |= a;
            ox |= x;
            changed += nonzero_bytes(x);
        }
        or_page |= op;
        dirty |= u64::from(ox != 0) << b;
    }
    Scan {
        zero: or_page == 0,
        dirty,
        changed: changed as usize,
    }
}

/// The AVX2 pass: per 64-byte block two 32-byte XORs; equal bytes are
/// counted per byte lane (at most 2 per block, 128 per page: no lane
/// overflows) and summed once at the end.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scan_avx2(page: &[u8; PAGE_SIZE], prev: &[u8; PAGE_SIZE]) -> Scan {
    use std::arch::x86_64::*;
    let zero = _mm256_setzero_si256();
    let mut or_page = zero;
    // Per byte lane: how many of its bytes were equal (cmpeq gives -1).
    let mut equal = zero;
    let mut dirty = 0u64;
    let (p, q) = (page.as_ptr(), prev.as_ptr());
    for b in 0..PAGE_SIZE / BLOCK {
        // SAFETY: b * BLOCK + 64 <= PAGE_SIZE, so both 32-byte loads of
        // each page stay inside it; loadu needs no alignment.
        let (a0, a1, x0, x1) = unsafe {
            let pa = p.add(b * BLOCK) as *const __m256i;
            let qa = q.add(b * BLOCK) as *const __m256i;
            let (a0, a1) = (_mm256_loadu_si256(pa), _mm256_loadu_si256(pa.add(1)));
            let x0 = _mm256_xor_si256(a0, _mm256_loadu_si256(qa));
            let x1 = _mm256_xor_si256(a1, _mm256_loadu_si256(qa.add(1)));
            (a0, a1, x0, x1)
        };
        or_page = _mm256_or_si256(or_page, _mm256_or_si256(a0, a1));
        equal = _mm256_sub_epi8(equal, _mm256_cmpeq_epi8(x0, zero));
        equal = _mm256_sub_epi8(equal, _mm256_cmpeq_epi8(x1, zero));
        let x = _mm256_or_si256(x0, x1);
        dirty |= u64::from(_mm256_testz_si256(x, x) == 0) << b;
    }
    // Horizontal sum of the 32 lane counts (each <= 128).
    let sums = _mm256_sad_epu8(equal, zero);
    let mut lanes = [0u64; 4];
    // SAFETY: `lanes` is 32 writable bytes; storeu needs no alignment.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, sums) };
    let same: u64 = lanes.iter().sum();
    Scan {
        zero: _mm256_testz_si256(or_page, or_page) != 0,
        dirty,
        changed: PAGE_SIZE - same as usize,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: deterministic test bytes.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
    }

    /// Counts by definition, byte by byte.
    fn reference(page: &[u8; PAGE_SIZE], prev: &[u8; PAGE_SIZE]) -> Scan {
        let mut dirty = 0u64;
        let mut changed = 0;
        for i in 0..PAGE_SIZE {
            if page[i] != prev[i] {
                changed += 1;
                dirty |= 1 << (i / BLOCK);
            }
        }
        Scan {
            zero: page.iter().all(|&b| b == 0),
            dirty,
            changed,
        }
    }

    #[test]
    fn every_implementation_agrees_with_the_definition() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut cases: Vec<([u8; PAGE_SIZE], [u8; PAGE_SIZE])> = vec![
            ([0; PAGE_SIZE], [0; PAGE_SIZE]),
            ([0; PAGE_SIZE], [0xff; PAGE_SIZE]),
            ([0xff; PAGE_SIZE], [0; PAGE_SIZE]),
            ([0x80; PAGE_SIZE], [0x7f; PAGE_SIZE]),
        ];
        for density in [1, 3, 17, 64, 255] {
            for _ in 0..20 {
                let mut prev = [0u8; PAGE_SIZE];
                prev.iter_mut().for_each(|b| *b = rng.next() as u8);
                let mut page = prev;
                for b in page.iter_mut() {
                    if (rng.next() % 256) < density {
                        // Any other value, high bit included.
                        *b ^= 1 + (rng.next() % 255) as u8;
                    }
                }
                cases.push((page, prev));
            }
        }
        let mut edge = [0u8; PAGE_SIZE];
        edge[PAGE_SIZE - 1] = 0x80;
        cases.push((edge, [0; PAGE_SIZE]));
        for (page, prev) in &cases {
            let want = reference(page, prev);
            assert_eq!(scan_words(page, prev), want);
            assert_eq!(scan(page, prev), want);
        }
    }
}
