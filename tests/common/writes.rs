//! The disk trials' client writes: write `i` fills one 4 KiB block of a
//! `BLOCKS`-block disk with content naming `i`, so any disk image tells
//! which prefix of the writes it holds, if any.

/// Blocks of the trial disk.
pub const BLOCKS: u64 = 64;

/// Write `i`: its byte offset and content (unique per write).
pub fn nth_write(i: u64) -> (u64, Vec<u8>) {
    let slot = (i * 13 + i / BLOCKS) % BLOCKS;
    let mut d = vec![0u8; 4096];
    for (j, c) in d.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(i << 16 | j as u64).to_le_bytes());
    }
    (slot * 4096, d)
}

/// The disk after the first `k` writes.
pub fn after(k: u64) -> Vec<u8> {
    let mut disk = vec![0u8; (BLOCKS * 4096) as usize];
    for i in 0..k {
        let (off, d) = nth_write(i);
        disk[off as usize..off as usize + 4096].copy_from_slice(&d);
    }
    disk
}

/// The `k` for which `disk` is the disk after the first `k` writes, if
/// any: every block names the write that filled it, so `k` can only be
/// one past the latest of them.
pub fn prefix_of(disk: &[u8]) -> Option<u64> {
    let k = disk
        .chunks(4096)
        .filter(|b| b.iter().any(|&x| x != 0))
        .map(|b| (u64::from_le_bytes(b[..8].try_into().unwrap()) >> 16) + 1)
        .max()
        .unwrap_or(0);
    (after(k) == disk).then_some(k)
}

/// Whether `disk` is the disk after some prefix of the writes.
pub fn is_prefix(disk: &[u8]) -> bool {
    prefix_of(disk).is_some()
}
