//! Paravirtual block device: synchronous sector reads and writes between an
//! image file and guest memory, on a port-I/O register block at
//! [`BLOCK_BASE`].
//!
//! Guest interface (guests/README.md, "Paravirtual block device"), all
//! 32-bit ports:
//!
//! | port | dir | register |
//! |------|-----|----------|
//! | +0x00 | IN/OUT | SECTOR_LO: first sector, low 32 bits |
//! | +0x04 | IN/OUT | SECTOR_HI: first sector, high 32 bits |
//! | +0x08 | IN/OUT | COUNT: sectors, 1..=[`MAX_SECTORS`] |
//! | +0x0c | IN/OUT | BUF: gpa of the guest buffer (COUNT × 512 bytes) |
//! | +0x10 | OUT | CMD: [`CMD_READ`], [`CMD_WRITE`], [`CMD_FLUSH`]; runs to completion before the OUT returns |
//! | +0x14 | IN | STATUS of the last command ([`ST_OK`] ...) |
//! | +0x18 | IN | CAPACITY_LO: image size in sectors, low 32 bits |
//! | +0x1c | IN | CAPACITY_HI: high 32 bits |
//!
//! Invariants:
//! - A command is checked entirely (sector range inside the image, buffer
//!   inside guest memory, count in range) before any byte moves; a bad one
//!   sets a status and changes nothing.
//! - Reads write guest memory only on the vCPU thread, inside the guest's
//!   OUT to CMD, and mark the pages VMM-dirty.
//! - Writes go through the disk's [`WriteLog`]: applied to the image at
//!   once, tagged with the running epoch and, while the domain is
//!   protected, carried to the backup in that epoch's checkpoint
//!   (`crate::disk`). A fenced copy's writes fail with [`ST_IO_ERROR`] and
//!   change nothing.

use std::sync::Arc;

use crate::disk::WriteLog;

use crate::domain::kvm::error::Result;
use crate::domain::kvm::guest_ram::GuestRam;
use crate::domain::kvm::wire::{RawRecord, Reader, RecordWriter};

pub const BLOCK_BASE: u16 = 0x6100;
pub const BLOCK_PORTS: u16 = 0x20;

pub const REG_SECTOR_LO: u16 = 0x00;
pub const REG_SECTOR_HI: u16 = 0x04;
pub const REG_COUNT: u16 = 0x08;
pub const REG_BUF: u16 = 0x0c;
pub const REG_CMD: u16 = 0x10;
pub const REG_STATUS: u16 = 0x14;
pub const REG_CAP_LO: u16 = 0x18;
pub const REG_CAP_HI: u16 = 0x1c;

pub const SECTOR: u64 = 512;
/// Largest request: 128 KiB.
pub const MAX_SECTORS: u32 = 256;

pub const CMD_READ: u32 = 1;
pub const CMD_WRITE: u32 = 2;
pub const CMD_FLUSH: u32 = 3;

pub const ST_OK: u32 = 0;
pub const ST_NO_DISK: u32 = 1;
pub const ST_BAD_SECTOR: u32 = 2;
pub const ST_BAD_BUFFER: u32 = 3;
pub const ST_IO_ERROR: u32 = 4;
pub const ST_BAD_COMMAND: u32 = 5;
pub const ST_BAD_COUNT: u32 = 6;

/// Guest-visible registers: everything a checkpoint must carry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockRegs {
    pub sector: u64,
    pub count: u32,
    pub buf: u32,
    pub status: u32,
}

pub struct Block {
    regs: BlockRegs,
    ram: Option<GuestRam>,
    disk: Option<Arc<WriteLog>>,
    /// Image size in sectors (a trailing partial sector is not usable).
    sectors: u64,
    scratch: Vec<u8>,
}

impl Block {
    /// A device without a disk (every command fails with [`ST_NO_DISK`])
    /// until [`Block::attach`].
    pub fn new() -> Self {
        Block {
            regs: BlockRegs::default(),
            ram: None,
            disk: None,
            sectors: 0,
            scratch: Vec::new(),
        }
    }

    /// Gives the device guest memory and optionally a disk.
    pub fn attach(&mut self, ram: GuestRam, disk: Option<Arc<WriteLog>>) {
        self.ram = Some(ram);
        if let Some(log) = disk {
            self.sectors = log.size() / SECTOR;
            self.disk = Some(log);
        }
    }

    /// The attached disk's write log, if any.
    pub fn disk(&self) -> Option<&Arc<WriteLog>> {
        self.disk.as_ref()
    }

    pub fn regs(&self) -> BlockRegs {
        self.regs
    }

    pub fn read(&self, off: u16) -> u32 {
        match off {
            REG_SECTOR_LO => self.regs.sector as u32,
            REG_SECTOR_HI => (self.regs.sector >> 32) as u32,
            REG_COUNT => self.regs.count,
            REG_BUF => self.regs.buf,
            REG_STATUS => self.regs.status,
            REG_CAP_LO => self.sectors as u32,
            REG_CAP_HI => (self.sectors >> 32) as u32,
            _ => 0xffff_ffff,
        }
    }

    pub fn write(&mut self, off: u16, v: u32) {
        match off {
            REG_SECTOR_LO => self.regs.sector = (self.regs.sector & !0xffff_ffff) | v as u64,
            REG_SECTOR_HI => {
                self.regs.sector = (self.regs.sector & 0xffff_ffff) | ((v as u64) << 32)
            }
            REG_COUNT => self.regs.count = v,
            REG_BUF => self.regs.buf = v,
            REG_CMD => self.regs.status = self.command(v),
            _ => {}
        }
    }

    fn command(&mut self, cmd: u32) -> u32 {
        let (Some(disk), Some(ram)) = (&self.disk, &self.ram) else {
            return ST_NO_DISK;
        };
        if cmd == CMD_FLUSH {
            return match disk.flush() {
                Ok(()) => ST_OK,
                Err(_) => ST_IO_ERROR,
            };
        }
        if cmd != CMD_READ && cmd != CMD_WRITE {
            return ST_BAD_COMMAND;
        }
        let r = self.regs;
        if r.count == 0 || r.count > MAX_SECTORS {
            return ST_BAD_COUNT;
        }
        match r.sector.checked_add(r.count as u64) {
            Some(end) if end <= self.sectors => {}
            _ => return ST_BAD_SECTOR,
        }
        let bytes = r.count as u64 * SECTOR;
        if ram.check(r.buf as u64, bytes).is_err() {
            return ST_BAD_BUFFER;
        }
        self.scratch.resize(bytes as usize, 0);
        let offset = r.sector * SECTOR;
        let ok = if cmd == CMD_READ {
            disk.read(&mut self.scratch, offset).is_ok()
                && ram.write(r.buf as u64, &self.scratch).is_ok()
        } else {
            ram.read(r.buf as u64, &mut self.scratch).is_ok()
                && disk.write(offset, &self.scratch, false).is_ok()
        };
        if ok {
            ST_OK
        } else {
            ST_IO_ERROR
        }
    }

    /// Record `BLKD` v1: sector u64, count buf status u32. The image is
    /// named by the spec, not the checkpoint.
    pub fn save(&self, out: &mut Vec<u8>) {
        let mut w = RecordWriter::begin(out, *b"BLKD", 1);
        w.u64(self.regs.sector)
            .u32(self.regs.count)
            .u32(self.regs.buf)
            .u32(self.regs.status);
        w.finish();
    }

    pub fn restore(&mut self, raw: &RawRecord<'_>) -> Result<()> {
        let mut r = Reader::new("BLKD", raw, 1)?;
        let regs = BlockRegs {
            sector: r.u64("sector")?,
            count: r.u32("count")?,
            buf: r.u32("buf")?,
            status: r.u32("status")?,
        };
        r.finish()?;
        self.regs = regs;
        Ok(())
    }
}

impl Default for Block {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::kvm::dirty::VmmDirty;
    use crate::domain::GuestMemory;

    const PAGES: u64 = 8;

    fn cmd(b: &mut Block, c: u32, sector: u64, count: u32, buf: u32) -> u32 {
        b.write(REG_SECTOR_LO, sector as u32);
        b.write(REG_SECTOR_HI, (sector >> 32) as u32);
        b.write(REG_COUNT, count);
        b.write(REG_BUF, buf);
        b.write(REG_CMD, c);
        b.read(REG_STATUS)
    }

    #[test]
    fn read_write_and_bounds() {
        let mem = GuestMemory::new(PAGES as usize * 4096).unwrap();
        let dirty = VmmDirty::new(PAGES);
        let dir = tempfile::tempdir().unwrap();
        let img = crate::disk::DiskImage::create(&dir.path().join("b.img"), 64 * 512).unwrap();
        let log = Arc::new(WriteLog::new(
            img,
            Arc::new(crate::disk::Fence::open()),
            crate::disk::LogConfig::default(),
        ));
        let img = log.image().path().to_path_buf();
        let mut b = Block::new();
        // SAFETY: `mem` outlives `b`.
        let ram = unsafe { GuestRam::new(&mem, dirty.clone()) };
        log.start_recording(1);
        b.attach(ram.clone(), Some(log.clone()));
        assert_eq!(b.read(REG_CAP_LO), 64);
        assert_eq!(b.read(REG_CAP_HI), 0);

        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
        ram.write(4096, &pattern).unwrap();
        assert_eq!(cmd(&mut b, CMD_WRITE, 3, 2, 4096), ST_OK);
        let on_disk = std::fs::read(&img).unwrap();
        assert_eq!(&on_disk[3 * 512..5 * 512], pattern.as_slice());
        assert_eq!(cmd(&mut b, CMD_FLUSH, 0, 0, 0), ST_OK);
        assert_eq!(
            log.cut(2).ops(),
            vec![
                crate::disk::wire::DiskOp::Write {
                    offset: 3 * 512,
                    data: pattern.clone()
                },
                crate::disk::wire::DiskOp::Flush
            ],
            "the write and the flush are logged for the backup"
        );

        let fresh = VmmDirty::new(PAGES);
        // SAFETY: as above.
        b.ram = Some(unsafe { GuestRam::new(&mem, fresh.clone()) });
        assert_eq!(cmd(&mut b, CMD_READ, 3, 2, 5 * 4096), ST_OK);
        let mut back = vec![0u8; 1024];
        ram.read(5 * 4096, &mut back).unwrap();
        assert_eq!(back, pattern);
        assert!(fresh.is_marked(5) && !fresh.is_marked(4) && !fresh.is_marked(6));

        let end = (PAGES * 4096) as u32;
        for (c, sector, count, buf, want) in [
            (CMD_READ, 64, 1, 0, ST_BAD_SECTOR),
            (CMD_READ, 63, 2, 0, ST_BAD_SECTOR),
            (CMD_WRITE, u64::MAX, 1, 0, ST_BAD_SECTOR),
            (CMD_READ, 0, 0, 0, ST_BAD_COUNT),
            (CMD_READ, 0, MAX_SECTORS + 1, 0, ST_BAD_COUNT),
            (CMD_READ, 0, 1, end - 511, ST_BAD_BUFFER),
            (CMD_WRITE, 0, 2, u32::MAX, ST_BAD_BUFFER),
            (9, 0, 1, 0, ST_BAD_COMMAND),
            (CMD_READ, 63, 1, end - 512, ST_OK),
        ] {
            let fresh = VmmDirty::new(PAGES);
            // SAFETY: as above.
            b.ram = Some(unsafe { GuestRam::new(&mem, fresh.clone()) });
            assert_eq!(
                cmd(&mut b, c, sector, count, buf),
                want,
                "{c} {sector} {count} {buf:#x}"
            );
            if want != ST_OK {
                assert!((0..PAGES).all(|g| !fresh.is_marked(g)));
            }
        }
        assert_eq!(
            std::fs::read(&img).unwrap(),
            on_disk,
            "refused writes changed the image"
        );
        assert!(
            log.cut(3).ops().is_empty(),
            "refused writes were not logged"
        );
        log.fence().revoke();
        assert_eq!(
            cmd(&mut b, CMD_WRITE, 0, 1, 4096),
            ST_IO_ERROR,
            "a fenced copy writes nothing"
        );
        assert_eq!(std::fs::read(&img).unwrap(), on_disk);

        let mut none = Block::new();
        assert_eq!(cmd(&mut none, CMD_READ, 0, 1, 0), ST_NO_DISK);
    }

    #[test]
    fn registers_round_trip_through_record() {
        let mut b = Block::new();
        b.write(REG_SECTOR_HI, 1);
        b.write(REG_SECTOR_LO, 5);
        b.write(REG_COUNT, 3);
        b.write(REG_BUF, 0x8000);
        let mut rec = Vec::new();
        b.save(&mut rec);
        let raws = crate::domain::kvm::wire::split("test", &rec).unwrap();
        let mut c = Block::new();
        c.restore(&raws[0]).unwrap();
        assert_eq!(c.regs(), b.regs());
        assert_eq!(c.regs().sector, (1 << 32) | 5);
    }
}
