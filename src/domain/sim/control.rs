//! The control block: page 0 of guest memory holds all workload state.
//!
//! Layout (all fields little-endian `u64`):
//!
//! ```text
//! offset 0   magic "CASTSIM1"
//!        8   layout version (1)
//!        16  threads
//!        24  pages
//!        32  seed
//!        40  workload code
//!        64 + 64*t  slot of thread t (one cache line each):
//!            +0  rng state   (SplitMix64)
//!            +8  writes      (total page writes by this thread)
//!            +16 epoch       (deterministic mode: epoch being worked on)
//!            +24 epoch_done  (deterministic mode: writes done in that epoch)
//!            +32 cursor      (sequential: next page, relative to the range)
//! ```
//!
//! Invariant: thread `t` is the only writer of slot `t` while the domain
//! runs, and reads it back before every operation, so the slot (not any
//! register or stack variable) is the truth. A copy of guest memory
//! therefore carries everything needed to continue the workload.

use crate::domain::GuestMemory;
use crate::PAGE_SIZE;

use super::rng;
use super::spec::{SimSpec, MAX_THREADS};

pub const MAGIC: [u8; 8] = *b"CASTSIM1";
pub const VERSION: u64 = 1;
const SLOT_BASE: usize = 64;
const SLOT_SIZE: usize = 64;

const _: () = assert!(SLOT_BASE + SLOT_SIZE * MAX_THREADS as usize <= PAGE_SIZE);

/// One field of a thread's slot; the value is its `u64` index in the slot.
#[derive(Debug, Clone, Copy)]
#[repr(usize)]
pub enum Field {
    Rng = 0,
    Writes = 1,
    Epoch = 2,
    EpochDone = 3,
    Cursor = 4,
}

/// Raw handle on thread `t`'s slot. Holds a pointer into page 0; valid as
/// long as the `GuestMemory` it came from.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    base: *mut u64,
}

impl Slot {
    pub fn of(mem: &GuestMemory, thread: usize) -> Slot {
        assert!(thread < MAX_THREADS as usize, "thread {thread} has no slot");
        let p = mem.page_ptr(0);
        // SAFETY: SLOT_BASE + SLOT_SIZE * MAX_THREADS fits in page 0 (checked
        // at compile time above), and page 0 is inside the mapping.
        let base = unsafe { p.add(SLOT_BASE + SLOT_SIZE * thread) } as *mut u64;
        Slot { base }
    }

    #[inline]
    pub fn get(self, f: Field) -> u64 {
        // SAFETY: the slot is 8-byte aligned (page-aligned base + multiple of
        // 64) and field indices stay inside its 64 bytes; only this slot's
        // thread writes it while running, others read it only while paused.
        u64::from_le(unsafe { self.base.add(f as usize).read() })
    }

    #[inline]
    pub fn set(self, f: Field, v: u64) {
        // SAFETY: as in `get`; the caller is the slot's only writer.
        unsafe { self.base.add(f as usize).write(v.to_le()) }
    }
}

/// Writes the header and every thread's initial slot. The per-thread RNG
/// seeds are derived from the spec seed, so the block is a pure function of
/// the spec.
pub fn init(mem: &GuestMemory, spec: &SimSpec) {
    let p = mem.page_ptr(0);
    let header = [
        u64::from_le_bytes(MAGIC),
        VERSION,
        spec.threads as u64,
        spec.layout().pages,
        spec.seed,
        spec.workload.code(),
    ];
    for (i, v) in header.iter().enumerate() {
        // SAFETY: six aligned u64 in the first 64 bytes of page 0.
        unsafe { (p as *mut u64).add(i).write(v.to_le()) }
    }
    for t in 0..spec.threads as usize {
        let s = Slot::of(mem, t);
        s.set(Field::Rng, rng::mix64(spec.seed ^ rng::mix64(t as u64 + 1)));
        for f in [Field::Writes, Field::Epoch, Field::EpochDone, Field::Cursor] {
            s.set(f, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_slots_land_in_page_zero() {
        let spec = SimSpec::parse("mem=64k,threads=3,seed=9").unwrap();
        let mem = GuestMemory::new(spec.mem as usize).unwrap();
        init(&mem, &spec);
        let mut page = [0u8; PAGE_SIZE];
        mem.read_page(0, &mut page);
        assert_eq!(&page[..8], b"CASTSIM1");
        assert_eq!(page[16], 3);
        assert_eq!(page[32], 9);
        let s = Slot::of(&mem, 2);
        s.set(Field::Cursor, 0x0102);
        mem.read_page(0, &mut page);
        assert_eq!(&page[64 + 128 + 32..64 + 128 + 34], &[2, 1]);
        assert_ne!(
            Slot::of(&mem, 0).get(Field::Rng),
            Slot::of(&mem, 1).get(Field::Rng)
        );
    }
}
