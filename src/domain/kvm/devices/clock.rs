//! Paravirtual clock: a 64-bit nanosecond guest-time counter on two ports.
//!
//! Guest interface (guests/README.md): a 32-bit IN from [`CLOCK_LO`]
//! latches the current guest time and returns its low 32 bits; a 32-bit IN
//! from [`CLOCK_HI`] returns the high 32 bits of the latched value. Writes
//! are ignored.
//!
//! Guest time = host `CLOCK_MONOTONIC` + `offset` while the domain runs.
//! Invariants:
//! - Guest time never goes backwards, within one VM and across a
//!   checkpoint: a saved record holds the guest time at `save` (taken while
//!   paused, so no later guest read exists), and a restored clock is
//!   frozen at that value (a fresh one at 0) until [`Clock::run`], which
//!   recomputes `offset` so guest time continues from it. Time the replica spent waiting on the
//!   backup does not appear as a leap, and a host clock that differs
//!   between primary and backup does not matter.
//! - Within one VM the offset never changes while running, so reads are
//!   monotonic because CLOCK_MONOTONIC is.

use crate::domain::kvm::error::Result;
use crate::domain::kvm::wire::{RawRecord, Reader, RecordWriter};

pub const CLOCK_LO: u16 = 0x5f0;
pub const CLOCK_HI: u16 = 0x5f4;

/// Host CLOCK_MONOTONIC in ns.
pub fn host_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always
    // exists on Linux, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub struct Clock {
    /// guest = host + offset (wrapping arithmetic on u64 = signed offset).
    offset: u64,
    /// Some(t): frozen at guest time `t` until `run` (a restored clock).
    frozen: Option<u64>,
    latched: u64,
}

impl Clock {
    /// A clock at guest time 0, frozen until [`Clock::run`] (the domain's
    /// `start`), so guest time counts only from the first instruction.
    pub fn new() -> Self {
        Clock {
            offset: 0,
            frozen: Some(0),
            latched: 0,
        }
    }

    /// Current guest time in ns.
    pub fn now(&self) -> u64 {
        match self.frozen {
            Some(t) => t,
            None => host_ns().wrapping_add(self.offset),
        }
    }

    /// Unfreezes a restored clock: guest time continues from the frozen
    /// value. No effect on a running clock.
    pub fn run(&mut self) {
        if let Some(t) = self.frozen.take() {
            self.offset = t.wrapping_sub(host_ns());
        }
    }

    pub fn read(&mut self, port: u16) -> u32 {
        match port {
            CLOCK_LO => {
                self.latched = self.now();
                self.latched as u32
            }
            CLOCK_HI => (self.latched >> 32) as u32,
            _ => 0xffff_ffff,
        }
    }

    /// Record `CLCK` v1: guest time now (u64 ns), latched value (u64).
    pub fn save(&self, out: &mut Vec<u8>) {
        let mut w = RecordWriter::begin(out, *b"CLCK", 1);
        w.u64(self.now()).u64(self.latched);
        w.finish();
    }

    /// A clock frozen at the saved guest time until [`Clock::run`].
    pub fn restore(raw: &RawRecord<'_>) -> Result<Self> {
        let mut r = Reader::new("CLCK", raw, 1)?;
        let t = r.u64("guest_ns")?;
        let latched = r.u64("latched")?;
        r.finish()?;
        Ok(Clock {
            offset: 0,
            frozen: Some(t),
            latched,
        })
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restored_clock_continues_from_checkpoint() {
        let mut c = Clock::new();
        assert_eq!(c.now(), 0);
        c.run();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut rec = Vec::new();
        c.save(&mut rec);
        let raws = crate::domain::kvm::wire::split("test", &rec).unwrap();
        let t0 = u64::from_le_bytes(raws[0].payload[..8].try_into().unwrap());
        let mut r = Clock::restore(&raws[0]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(r.now(), t0, "frozen until run");
        r.run();
        let t1 = r.now();
        assert!(t1 >= t0 && t1 - t0 < 10_000_000, "t0 {t0} t1 {t1}");
    }
}
