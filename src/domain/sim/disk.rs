//! The sim domain's optional disk workload (`disk=PATH,disk_size=S,
//! disk_writes=N`).
//!
//! One thread, `castor-sim-disk`, writes `disk_writes` 4 KiB blocks per
//! epoch through the disk's [`WriteLog`] (so a protected domain replicates
//! them), then parks until the next resume like the memory workers. Block
//! `i` of epoch `e` is a pure function of `(seed, e, i)` ([`block`]), so in
//! the deterministic mode the disk after epoch E is a pure function of the
//! spec and E ([`expected_disk`]), and `castor digest --at-epoch E` covers
//! it. A new domain starts from an all-zero disk of `disk_size` bytes.

use super::rng;
use crate::disk::WriteLog;
use crate::PAGE_SIZE;

/// Name of the sim disk in a protection session (`STATE_DIR/disks/sim.img`).
pub const SIM_DISK: &str = "sim";

/// Where block `i` of epoch `epoch` lands and what it holds.
pub fn block(seed: u64, size: u64, epoch: u64, i: u64, out: &mut [u8; PAGE_SIZE]) -> u64 {
    let mut st = rng::mix64(seed ^ rng::mix64(epoch.wrapping_mul(0x9e37_79b9) ^ i));
    let blocks = (size / PAGE_SIZE as u64).max(1);
    let offset = rng::below(&mut st, blocks) * PAGE_SIZE as u64;
    out[..8].copy_from_slice(&epoch.to_le_bytes());
    out[8..16].copy_from_slice(&i.to_le_bytes());
    for c in out[16..].chunks_mut(8) {
        let v = rng::next(&mut st).to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
    offset
}

/// Writes epoch `epoch`'s blocks through `log`, in order.
pub fn run_epoch(log: &WriteLog, seed: u64, writes: u64, epoch: u64) -> Result<(), String> {
    let mut buf = [0u8; PAGE_SIZE];
    for i in 0..writes {
        let off = block(seed, log.size(), epoch, i, &mut buf);
        log.write(off, &buf, false).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The disk after epochs `1..=epoch` from all zeros.
pub fn expected_disk(seed: u64, size: u64, writes: u64, epoch: u64) -> Vec<u8> {
    let mut disk = vec![0u8; size as usize];
    let mut buf = [0u8; PAGE_SIZE];
    for e in 1..=epoch {
        for i in 0..writes {
            let off = block(seed, size, e, i, &mut buf) as usize;
            let n = PAGE_SIZE.min(disk.len() - off);
            disk[off..off + n].copy_from_slice(&buf[..n]);
        }
    }
    disk
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{DiskImage, Fence, LogConfig};
    use std::sync::Arc;

    #[test]
    fn the_threaded_workload_matches_the_replay() {
        let dir = tempfile::tempdir().unwrap();
        let img = DiskImage::create(&dir.path().join("s.img"), 64 * 4096).unwrap();
        let log = WriteLog::new(img, Arc::new(Fence::open()), LogConfig::default());
        for e in 1..=3 {
            run_epoch(&log, 7, 10, e).unwrap();
        }
        let got = std::fs::read(log.image().path()).unwrap();
        assert_eq!(got, expected_disk(7, 64 * 4096, 10, 3));
        assert_ne!(
            got,
            expected_disk(7, 64 * 4096, 10, 2),
            "epoch 3 changed the disk"
        );
        assert_ne!(got, expected_disk(8, 64 * 4096, 10, 3), "the seed matters");
    }
}
