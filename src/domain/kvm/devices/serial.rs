//! A 16550-style UART at the COM1 ports (0x3f8..=0x3ff), transmit only.
//!
//! Guest interface (guests/README.md): writing THR (offset 0, DLAB=0)
//! transmits a byte, which is always accepted at once (LSR reports THR
//! empty and transmitter idle); reads of RBR return 0 and LSR never reports
//! received data; no interrupts are raised (IER is stored, not acted on).
//! The divisor latch, LCR, MCR and scratch registers read back what was
//! written. Those registers are this device's saved state.

use super::console::Console;
use crate::domain::kvm::error::Result;
use crate::domain::kvm::wire::{RawRecord, Reader, RecordWriter};

pub const SERIAL_BASE: u16 = 0x3f8;
pub const SERIAL_PORTS: u16 = 8;

const LCR_DLAB: u8 = 0x80;
/// LSR: THR empty | transmitter empty.
const LSR_IDLE: u8 = 0x60;
/// IIR: no interrupt pending, FIFOs enabled bits mirror FCR bit 0.
const IIR_NONE: u8 = 0x01;
/// MSR: DCD, DSR, CTS asserted.
const MSR_READY: u8 = 0xb0;

/// Registers a guest can set; everything else is derived.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SerialRegs {
    pub ier: u8,
    pub lcr: u8,
    pub mcr: u8,
    pub scr: u8,
    pub fcr: u8,
    pub dll: u8,
    pub dlm: u8,
}

pub struct Serial {
    regs: SerialRegs,
    console: Console,
}

impl Serial {
    pub fn new(console: Console) -> Self {
        Serial {
            // 115200 baud, 8N1: what firmware leaves behind.
            regs: SerialRegs {
                lcr: 0x03,
                dll: 1,
                ..Default::default()
            },
            console,
        }
    }

    pub fn read(&mut self, offset: u16) -> u8 {
        let r = &self.regs;
        let dlab = r.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => r.dll,
            0 => 0,
            1 if dlab => r.dlm,
            1 => r.ier,
            2 => IIR_NONE | if r.fcr & 1 != 0 { 0xc0 } else { 0 },
            3 => r.lcr,
            4 => r.mcr,
            5 => LSR_IDLE,
            6 => MSR_READY,
            7 => r.scr,
            _ => 0xff,
        }
    }

    pub fn write(&mut self, offset: u16, v: u8) {
        let dlab = self.regs.lcr & LCR_DLAB != 0;
        let r = &mut self.regs;
        match offset {
            0 if dlab => r.dll = v,
            0 => self.console.put(v),
            1 if dlab => r.dlm = v,
            1 => r.ier = v & 0x0f,
            2 => r.fcr = v,
            3 => r.lcr = v,
            4 => r.mcr = v & 0x1f,
            7 => r.scr = v,
            _ => {}
        }
    }

    /// Record `SERL` v1: ier, lcr, mcr, scr, fcr, dll, dlm (u8 each).
    pub fn save(&self, out: &mut Vec<u8>) {
        let r = &self.regs;
        let mut w = RecordWriter::begin(out, *b"SERL", 1);
        for v in [r.ier, r.lcr, r.mcr, r.scr, r.fcr, r.dll, r.dlm] {
            w.u8(v);
        }
        w.finish();
    }

    pub fn restore(&mut self, raw: &RawRecord<'_>) -> Result<()> {
        let mut r = Reader::new("SERL", raw, 1)?;
        self.regs = SerialRegs {
            ier: r.u8("ier")?,
            lcr: r.u8("lcr")?,
            mcr: r.u8("mcr")?,
            scr: r.u8("scr")?,
            fcr: r.u8("fcr")?,
            dll: r.u8("dll")?,
            dlm: r.u8("dlm")?,
        };
        r.finish()
    }

    pub fn regs(&self) -> SerialRegs {
        self.regs
    }
}
