//! Port-I/O devices of the kvm VMM, each owning its state: the serial
//! console and the paravirtual clock. [`Devices`] dispatches port accesses
//! and saves/restores every device as one record each.

pub mod clock;
pub mod console;
pub mod serial;

use clock::{Clock, CLOCK_HI, CLOCK_LO};
use console::Console;
use serial::{Serial, SERIAL_BASE, SERIAL_PORTS};

use super::error::{KvmError, Result};
use super::wire::RawRecord;

pub struct Devices {
    pub serial: Serial,
    pub clock: Clock,
}

impl Devices {
    pub fn new(console: Console) -> Self {
        Devices {
            serial: Serial::new(console),
            clock: Clock::new(),
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
        }
    }

    /// Appends `SERL` and `CLCK` records.
    pub fn save(&self, out: &mut Vec<u8>) {
        self.serial.save(out);
        self.clock.save(out);
    }

    /// Loads device state from the `SERL` and `CLCK` records (both
    /// required). The clock stays frozen until [`Clock::run`].
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
        Ok(())
    }
}
