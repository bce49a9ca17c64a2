//! A checkpoint's `DiskWrites` records, as pieces for one vectored send.
//!
//! The write log lays each epoch's writes out as their records while they
//! happen ([`super::records`]), so framing copies nothing: it tags the
//! records with the checkpoint's epoch and disk index and lists their
//! buffers. The records carry no CRC (field 0, as `record::finish_record`
//! leaves it): they only travel sealed, and the session's tag covers every
//! byte. Apart from that field the bytes are exactly those of
//! `record::write_record(wire::encode(..))` of the same ops (tested in
//! `records`).

use super::session::EpochDisks;

pub use super::records::MAX_RECORD_PAYLOAD;

/// What an epoch's `DiskWrites` records add to its checkpoint.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Framed {
    /// Records framed (the epoch's End counts them).
    pub records: u32,
    /// Bytes on the wire, headers included.
    pub wire_bytes: u64,
}

/// Tags the records of `disks` (the writes cut for `epoch`, per disk
/// index) with `epoch` and their disk index, and counts them.
pub fn frame(disks: &mut EpochDisks, epoch: u64) -> Framed {
    let mut f = Framed::default();
    for (disk, e) in disks.iter_mut() {
        e.close();
        e.retag(epoch, *disk);
        f.records += e.records();
        f.wire_bytes += e.wire_bytes();
    }
    f
}

/// The records' bytes in order, disk by disk.
pub fn slices(disks: &EpochDisks) -> impl Iterator<Item = &[u8]> + '_ {
    disks.iter().flat_map(|(_, e)| e.slices())
}
