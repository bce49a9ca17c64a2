//! Page contents shared by the benchmarks: a small deterministic RNG and
//! text-like pages that compress like typical heap and page-cache data.

#![allow(dead_code)]

use castor::PAGE_SIZE;

pub type Page = [u8; PAGE_SIZE];

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Text-like page: words, numbers and some zero padding, compressing ~3-4x
/// with lz4 like typical heap / page-cache contents.
pub fn text_page(rng: &mut Rng) -> Page {
    const WORDS: [&[u8]; 16] = [
        b"the ",
        b"replica ",
        b"epoch ",
        b"checkpoint ",
        b"memory ",
        b"of ",
        b"guest ",
        b"page ",
        b"dirty ",
        b"network ",
        b"buffer ",
        b"and ",
        b"to ",
        b"is ",
        b"\n",
        b"{\"id\": ",
    ];
    let mut v = Vec::with_capacity(PAGE_SIZE + 32);
    while v.len() < PAGE_SIZE {
        match rng.below(10) {
            0 => v.extend_from_slice(format!("{} ", rng.next() % 100_000).as_bytes()),
            1 => v.extend_from_slice(&[0; 12]),
            _ => v.extend_from_slice(WORDS[rng.below(WORDS.len())]),
        }
    }
    v.truncate(PAGE_SIZE);
    v.try_into().unwrap()
}
