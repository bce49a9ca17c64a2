//! Port-I/O devices of the kvm VMM, each owning its state: the serial
//! console, the paravirtual clock, NIC and block device. [`Devices`]
//! dispatches port accesses and saves/restores every device as one record
//! each.

pub mod block;
pub mod clock;
pub mod console;
pub mod net;
pub mod serial;

use block::{Block, BLOCK_BASE, BLOCK_PORTS};
use clock::{Clock, CLOCK_HI, CLOCK_LO};
use console::Console;
use net::{Net, NET_BASE, NET_PORTS};
use serial::{Serial, SERIAL_BASE, SERIAL_PORTS};

use super::error::{KvmError, Result};
use super::wire::RawRecord;

/// MAC of a NIC whose spec gives none (locally administered).
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xca, 0x57, 0x01];

pub struct Devices {
    pub serial: Serial,
    pub clock: Clock,
    pub net: Net,
    pub block: Block,
}

/// The 32-bit register offset of `port` in a block of `len` ports at
/// `base`, if it is one (unaligned accesses are unclaimed).
fn reg(port: u16, base: u16, len: u16) -> Option<u16> {
    let off = port.checked_sub(base)?;
    (off < len && off % 4 == 0).then_some(off)
}

impl Devices {
    /// Serial and clock; a NIC with [`DEFAULT_MAC`] and no backend and a
    /// block device without disk, neither with guest memory until
    /// attached.
    pub fn new(console: Console) -> Self {
        Devices {
            serial: Serial::new(console),
            clock: Clock::new(),
            net: Net::new(DEFAULT_MAC),
            block: Block::new(),
        }
    }

    /// Handles an IN of `data.len()` bytes from `port`. Unclaimed ports
    /// read as all ones, like an empty ISA bus.
    pub fn pio_in(&mut self, port: u16, data: &mut [u8]) {
        if (SERIAL_BASE..SERIAL_BASE + SERIAL_PORTS).contains(&port) {
            data.fill(0);
            data[0] = self.serial.read(port - SERIAL_BASE);
        } else if port == CLOCK_LO || port == CLOCK_HI {
            let v = self.clock.read(port).to_le_bytes();
            let n = data.len().min(4);
            data[..n].copy_from_slice(&v[..n]);
        } else if let Some(off) = reg(port, NET_BASE, NET_PORTS) {
            put(data, self.net.read(off));
        } else if let Some(off) = reg(port, BLOCK_BASE, BLOCK_PORTS) {
            put(data, self.block.read(off));
        } else {
            data.fill(0xff);
        }
    }

    /// Handles an OUT to `port`; unclaimed ports ignore writes.
    pub fn pio_out(&mut self, port: u16, data: &[u8]) {
        if (SERIAL_BASE..SERIAL_BASE + SERIAL_PORTS).contains(&port) {
            if let Some(&b) = data.first() {
                self.serial.write(port - SERIAL_BASE, b);
            }
        } else if let Some(off) = reg(port, NET_BASE, NET_PORTS) {
            self.net.write(off, get(data));
        } else if let Some(off) = reg(port, BLOCK_BASE, BLOCK_PORTS) {
            self.block.write(off, get(data));
        }
    }

    /// Appends `SERL`, `CLCK`, `NETD` and `BLKD` records.
    pub fn save(&self, out: &mut Vec<u8>) {
        self.serial.save(out);
        self.clock.save(out);
        self.net.save(out);
        self.block.save(out);
    }

    /// Loads device state from the `SERL` and `CLCK` records (both
    /// required) and `NETD`/`BLKD` when present (a `CKVM` v1 state has
    /// neither: the NIC and block device keep their reset state; `state.rs`
    /// checks which records each container version must hold). The clock
    /// stays frozen until [`Clock::run`].
    pub fn restore(&mut self, records: &[RawRecord<'_>]) -> Result<()> {
        let find = |tag: &[u8; 4], name: &'static str| {
            records
                .iter()
                .find(|r| &r.magic == tag)
                .ok_or_else(|| KvmError::State {
                    record: name,
                    reason: "missing from the saved state".into(),
                })
        };
        self.serial.restore(find(b"SERL", "SERL")?)?;
        self.clock = Clock::restore(find(b"CLCK", "CLCK")?)?;
        if let Ok(r) = find(b"NETD", "NETD") {
            self.net.restore(r)?;
        }
        if let Ok(r) = find(b"BLKD", "BLKD") {
            self.block.restore(r)?;
        }
        Ok(())
    }
}

/// Fills an IN of 1, 2 or 4 bytes with the low bytes of `v`.
fn put(data: &mut [u8], v: u32) {
    let n = data.len().min(4);
    data[..n].copy_from_slice(&v.to_le_bytes()[..n]);
    data[n..].fill(0);
}

/// The value of an OUT of 1, 2 or 4 bytes, zero-extended.
fn get(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}
