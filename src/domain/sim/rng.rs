//! The workload's random number generator: SplitMix64.
//!
//! Its whole state is one `u64`, which is what lets a workload thread keep
//! its generator inside guest memory (the control block) and reload it every
//! operation: a replica of the memory carries the generator with it. The
//! sequence is a pure function of the initial state on every platform.

/// Weyl-sequence increment of SplitMix64 (the golden ratio in 64 bits).
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// Advances `state` and returns the next 64 random bits.
#[inline]
pub fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(GAMMA);
    mix64(*state)
}

/// A uniform value in `0..n` (`n > 0`), by multiply-high. The bias is below
/// `n / 2^64`, irrelevant for choosing pages and offsets.
#[inline]
pub fn below(state: &mut u64, n: u64) -> u64 {
    debug_assert!(n > 0);
    ((next(state) as u128 * n as u128) >> 64) as u64
}

/// SplitMix64's output function: a bijective 64-bit mixer, also used as a
/// stateless hash to derive per-page and per-thread seeds.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform fraction in `[0, 1)` from 53 random bits.
#[inline]
pub fn unit(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_reference_splitmix64() {
        // First outputs of SplitMix64 seeded with 1234567 (reference C code).
        let mut s = 1234567u64;
        assert_eq!(next(&mut s), 6457827717110365317);
        assert_eq!(next(&mut s), 3203168211198807973);
        assert_eq!(next(&mut s), 9817491932198370423);
    }

    #[test]
    fn below_stays_in_range() {
        let mut s = 42;
        for n in [1u64, 2, 3, 7, 1000, u64::MAX] {
            for _ in 0..1000 {
                assert!(below(&mut s, n) < n);
            }
        }
    }

    #[test]
    fn unit_is_a_fraction() {
        assert_eq!(unit(0), 0.0);
        assert!(unit(u64::MAX) < 1.0);
    }
}
