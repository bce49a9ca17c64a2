//! Paravirtual NIC: a port-I/O register block at [`NET_BASE`] moving whole
//! Ethernet frames between guest memory and a backend (a TAP device).
//!
//! Guest interface (guests/README.md, "Paravirtual NIC"), all 32-bit ports:
//!
//! | port | dir | register |
//! |------|-----|----------|
//! | +0x00 | IN | MAC bytes 0..4 (byte 0 in bits 0..8) |
//! | +0x04 | IN | MAC bytes 4..6 in the low 16 bits |
//! | +0x08 | IN/OUT | TX_ADDR: gpa of the frame to send |
//! | +0x0c | OUT | TX_LEN: writing sends `len` bytes at TX_ADDR (doorbell) |
//! | +0x0c | IN | TX_STATUS of the last doorbell ([`STATUS_OK`] ...) |
//! | +0x10 | IN/OUT | RX_ADDR: gpa of the guest's receive buffer |
//! | +0x14 | IN/OUT | RX_SIZE: its capacity in bytes |
//! | +0x18 | IN | RX_POLL: receive one frame into RX_ADDR; its length, 0 if none, [`RX_ERROR`] if the buffer is not in guest memory |
//! | +0x1c | IN | LINK: 1 with a backend, 0 without |
//!
//! Invariants:
//! - RX happens only inside the vCPU's IN from RX_POLL, on the vCPU
//!   thread: nothing writes guest memory while the domain is paused, so a
//!   checkpoint taken while paused sees no half-received frame.
//! - Every guest-supplied gpa/len is checked against guest memory before a
//!   byte moves ([`GuestRam`]); a bad one sets a status, never panics.
//! - Every byte written into guest memory is marked VMM-dirty.
//! - TX goes only through [`FrameSink::emit`], on the vCPU thread: under
//!   protection the sink is an `outq::OutputHandle` that holds each frame
//!   until the backup acknowledged its epoch (`Domain::attach_output`).

use crate::domain::kvm::error::Result;
use crate::domain::kvm::guest_ram::GuestRam;
use crate::domain::kvm::wire::{RawRecord, Reader, RecordWriter};

pub const NET_BASE: u16 = 0x6000;
pub const NET_PORTS: u16 = 0x20;

pub const REG_MAC_LO: u16 = 0x00;
pub const REG_MAC_HI: u16 = 0x04;
pub const REG_TX_ADDR: u16 = 0x08;
pub const REG_TX_LEN: u16 = 0x0c;
pub const REG_RX_ADDR: u16 = 0x10;
pub const REG_RX_SIZE: u16 = 0x14;
pub const REG_RX_POLL: u16 = 0x18;
pub const REG_LINK: u16 = 0x1c;

/// TX_STATUS values.
pub const STATUS_OK: u32 = 0;
/// TX_LEN outside `MIN_FRAME..=MAX_FRAME`.
pub const STATUS_BAD_LEN: u32 = 1;
/// TX_ADDR + TX_LEN not inside guest memory.
pub const STATUS_BAD_ADDR: u32 = 2;
/// No backend: the frame was dropped (and counted).
pub const STATUS_NO_LINK: u32 = 3;

/// RX_POLL result when RX_ADDR/RX_SIZE is not inside guest memory.
pub const RX_ERROR: u32 = 0xffff_ffff;

/// An Ethernet header.
pub const MIN_FRAME: usize = 14;
/// Header + 1500-byte MTU payload (no FCS).
pub const MAX_FRAME: usize = 1514;

/// Where transmitted frames go. The one hook between the device and the
/// outside world: today the TAP, later an output-commit queue that holds
/// frames until the backup acknowledges the epoch they belong to.
pub trait FrameSink: Send {
    /// Takes one whole Ethernet frame. Must not block the vCPU for long.
    fn emit(&mut self, frame: &[u8]);
}

/// A held-output handle as the NIC's sink: each frame is tagged with the
/// epoch running now (the vCPU thread only transmits while the guest runs)
/// and handed to `castor-outq`, which releases it after the epoch's ack.
impl FrameSink for crate::outq::OutputHandle {
    fn emit(&mut self, frame: &[u8]) {
        self.emit_now(frame)
    }
}

/// The NIC's original backend (the TAP) as the output queue's destination:
/// released frames go out through it.
pub struct SinkEgress(pub Box<dyn FrameSink>);

impl crate::outq::Egress for SinkEgress {
    fn release(&mut self, frame: &[u8]) {
        self.0.emit(frame)
    }
}

/// Where received frames come from.
pub trait FrameSource: Send {
    /// Reads one queued frame into `buf` without blocking: its length, or
    /// `None` when nothing is queued.
    fn poll(&mut self, buf: &mut [u8]) -> Option<usize>;
}

/// Frame counters (also saved in checkpoints).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    pub tx_frames: u64,
    pub tx_dropped: u64,
    pub rx_frames: u64,
    pub rx_dropped: u64,
}

/// Guest-visible registers: everything a checkpoint must carry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetRegs {
    pub tx_addr: u32,
    pub tx_status: u32,
    pub rx_addr: u32,
    pub rx_size: u32,
}

/// A gratuitous ARP request (RFC 5227 announcement): broadcast, sender and
/// target protocol address both `ip`, sender hardware address `mac`.
pub fn gratuitous_arp(mac: [u8; 6], ip: std::net::Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]); // destination: broadcast
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06]); // ethertype ARP
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip.octets());
    f
}

/// An unsolicited neighbour advertisement (RFC 4861 §7.2.6) for `ip`
/// from `mac`: to all nodes (ff02::1), hop limit 255, Override set and
/// Solicited clear, with the target link-layer address option, so
/// neighbours replace a cached MAC for `ip` with `mac`.
pub fn unsolicited_na(mac: [u8; 6], ip: std::net::Ipv6Addr) -> Vec<u8> {
    const ICMP_LEN: usize = 32; // header 4 + flags 4 + target 16 + option 8
    let all_nodes = std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut f = Vec::with_capacity(14 + 40 + ICMP_LEN);
    f.extend_from_slice(&[0x33, 0x33, 0, 0, 0, 1]); // multicast MAC of ff02::1
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x86, 0xdd]); // ethertype IPv6
    f.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, no class/flow
    f.extend_from_slice(&(ICMP_LEN as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]); // next header ICMPv6, hop limit 255
    f.extend_from_slice(&ip.octets()); // source: the announced address
    f.extend_from_slice(&all_nodes.octets());
    let icmp = f.len();
    f.extend_from_slice(&[136, 0, 0, 0]); // NA, code 0, checksum below
    f.extend_from_slice(&[0x20, 0, 0, 0]); // R=0 S=0 O=1
    f.extend_from_slice(&ip.octets()); // target
    f.extend_from_slice(&[2, 1]); // option: target link-layer address, 8 bytes
    f.extend_from_slice(&mac);
    // Checksum over the pseudo-header (src, dst, length, next header).
    let mut sum = 0u32;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(&ip.octets());
    add(&all_nodes.octets());
    add(&(ICMP_LEN as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(&f[icmp..]);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let ck = !(sum as u16);
    f[icmp + 2..icmp + 4].copy_from_slice(&ck.to_be_bytes());
    f
}

pub struct Net {
    mac: [u8; 6],
    regs: NetRegs,
    pub stats: NetStats,
    ram: Option<GuestRam>,
    sink: Option<Box<dyn FrameSink>>,
    source: Option<Box<dyn FrameSource>>,
    /// Scratch for one frame.
    buf: Vec<u8>,
}

impl Net {
    /// A NIC with MAC `mac`, no memory and no backend (TX dropped, RX
    /// empty) until [`Net::attach`].
    pub fn new(mac: [u8; 6]) -> Self {
        Net {
            mac,
            regs: NetRegs::default(),
            stats: NetStats::default(),
            ram: None,
            sink: None,
            source: None,
            buf: vec![0; super::super::tap::MAX_READ],
        }
    }

    /// Gives the device guest memory and (optionally) a backend.
    pub fn attach(
        &mut self,
        ram: GuestRam,
        sink: Option<Box<dyn FrameSink>>,
        source: Option<Box<dyn FrameSource>>,
    ) {
        self.ram = Some(ram);
        self.sink = sink;
        self.source = source;
    }

    /// Takes the TX backend out (to put it behind the output queue).
    pub fn take_sink(&mut self) -> Option<Box<dyn FrameSink>> {
        self.sink.take()
    }

    /// Replaces the TX backend; `None` drops TX and reports link down.
    pub fn set_sink(&mut self, sink: Option<Box<dyn FrameSink>>) {
        self.sink = sink;
    }

    /// Sends a gratuitous ARP for `ip` from this NIC's MAC straight to the
    /// backend (not a guest frame: the VMM speaks for the guest after a
    /// failover). Returns false when there is no backend.
    pub fn announce_ipv4(&mut self, ip: std::net::Ipv4Addr) -> bool {
        let Some(sink) = &mut self.sink else {
            return false;
        };
        sink.emit(&gratuitous_arp(self.mac, ip));
        true
    }

    /// Sends an unsolicited neighbour advertisement for `ip` (see
    /// [`unsolicited_na`]). Returns false when there is no backend.
    pub fn announce_ipv6(&mut self, ip: std::net::Ipv6Addr) -> bool {
        let Some(sink) = &mut self.sink else {
            return false;
        };
        sink.emit(&unsolicited_na(self.mac, ip));
        true
    }

    pub fn regs(&self) -> NetRegs {
        self.regs
    }

    /// IN from `NET_BASE + off`.
    pub fn read(&mut self, off: u16) -> u32 {
        match off {
            REG_MAC_LO => u32::from_le_bytes(self.mac[..4].try_into().expect("4")),
            REG_MAC_HI => u16::from_le_bytes([self.mac[4], self.mac[5]]) as u32,
            REG_TX_ADDR => self.regs.tx_addr,
            REG_TX_LEN => self.regs.tx_status,
            REG_RX_ADDR => self.regs.rx_addr,
            REG_RX_SIZE => self.regs.rx_size,
            REG_RX_POLL => self.rx_poll(),
            REG_LINK => self.sink.is_some() as u32,
            _ => 0xffff_ffff,
        }
    }

    /// OUT to `NET_BASE + off`.
    pub fn write(&mut self, off: u16, v: u32) {
        match off {
            REG_TX_ADDR => self.regs.tx_addr = v,
            REG_TX_LEN => self.regs.tx_status = self.tx(v),
            REG_RX_ADDR => self.regs.rx_addr = v,
            REG_RX_SIZE => self.regs.rx_size = v,
            _ => {}
        }
    }

    fn tx(&mut self, len: u32) -> u32 {
        let len = len as usize;
        if !(MIN_FRAME..=MAX_FRAME).contains(&len) {
            self.stats.tx_dropped += 1;
            return STATUS_BAD_LEN;
        }
        let Some(ram) = &self.ram else {
            self.stats.tx_dropped += 1;
            return STATUS_BAD_ADDR;
        };
        if ram
            .read(self.regs.tx_addr as u64, &mut self.buf[..len])
            .is_err()
        {
            self.stats.tx_dropped += 1;
            return STATUS_BAD_ADDR;
        }
        match &mut self.sink {
            Some(sink) => {
                sink.emit(&self.buf[..len]);
                self.stats.tx_frames += 1;
                STATUS_OK
            }
            None => {
                self.stats.tx_dropped += 1;
                STATUS_NO_LINK
            }
        }
    }

    /// Receives at most one frame into the guest's RX buffer.
    fn rx_poll(&mut self) -> u32 {
        let (Some(ram), Some(source)) = (&self.ram, &mut self.source) else {
            return 0;
        };
        let (addr, size) = (self.regs.rx_addr as u64, self.regs.rx_size as u64);
        // Refuse a bad buffer before taking a frame off the backend, so a
        // misconfigured guest loses nothing it could still fix.
        if ram.check(addr, size).is_err() {
            return RX_ERROR;
        }
        let Some(n) = source.poll(&mut self.buf) else {
            return 0;
        };
        if n as u64 > size || n == 0 {
            self.stats.rx_dropped += 1;
            return 0;
        }
        match ram.write(addr, &self.buf[..n]) {
            Ok(()) => {
                self.stats.rx_frames += 1;
                n as u32
            }
            Err(_) => {
                self.stats.rx_dropped += 1;
                RX_ERROR
            }
        }
    }

    /// Record `NETD` v1: tx_addr tx_status rx_addr rx_size u32, then
    /// tx_frames tx_dropped rx_frames rx_dropped u64. The MAC and the
    /// backend come from the spec, not the checkpoint.
    pub fn save(&self, out: &mut Vec<u8>) {
        let mut w = RecordWriter::begin(out, *b"NETD", 1);
        w.u32(self.regs.tx_addr)
            .u32(self.regs.tx_status)
            .u32(self.regs.rx_addr)
            .u32(self.regs.rx_size)
            .u64(self.stats.tx_frames)
            .u64(self.stats.tx_dropped)
            .u64(self.stats.rx_frames)
            .u64(self.stats.rx_dropped);
        w.finish();
    }

    pub fn restore(&mut self, raw: &RawRecord<'_>) -> Result<()> {
        let mut r = Reader::new("NETD", raw, 1)?;
        let regs = NetRegs {
            tx_addr: r.u32("tx_addr")?,
            tx_status: r.u32("tx_status")?,
            rx_addr: r.u32("rx_addr")?,
            rx_size: r.u32("rx_size")?,
        };
        let stats = NetStats {
            tx_frames: r.u64("tx_frames")?,
            tx_dropped: r.u64("tx_dropped")?,
            rx_frames: r.u64("rx_frames")?,
            rx_dropped: r.u64("rx_dropped")?,
        };
        r.finish()?;
        self.regs = regs;
        self.stats = stats;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::domain::kvm::dirty::VmmDirty;
    use crate::domain::GuestMemory;

    #[derive(Clone, Default)]
    struct Fake {
        sent: Arc<Mutex<Vec<Vec<u8>>>>,
        queued: Arc<Mutex<VecDeque<Vec<u8>>>>,
    }

    impl FrameSink for Fake {
        fn emit(&mut self, frame: &[u8]) {
            self.sent.lock().unwrap().push(frame.to_vec());
        }
    }

    impl FrameSource for Fake {
        fn poll(&mut self, buf: &mut [u8]) -> Option<usize> {
            let f = self.queued.lock().unwrap().pop_front()?;
            buf[..f.len()].copy_from_slice(&f);
            Some(f.len())
        }
    }

    const PAGES: u64 = 4;

    fn nic(fake: &Fake, mem: &GuestMemory, dirty: &VmmDirty) -> Net {
        let mut n = Net::new([0x52, 0x54, 0, 1, 2, 3]);
        // SAFETY: every test keeps `mem` alive longer than the NIC.
        let ram = unsafe { GuestRam::new(mem, dirty.clone()) };
        n.attach(
            ram,
            Some(Box::new(fake.clone())),
            Some(Box::new(fake.clone())),
        );
        n
    }

    #[test]
    fn mac_tx_and_rx() {
        let mem = GuestMemory::new(PAGES as usize * 4096).unwrap();
        let dirty = VmmDirty::new(PAGES);
        let fake = Fake::default();
        let mut n = nic(&fake, &mem, &dirty);
        assert_eq!(n.read(REG_MAC_LO), 0x0100_5452);
        assert_eq!(n.read(REG_MAC_HI), 0x0302);
        assert_eq!(n.read(REG_LINK), 1);

        let frame: Vec<u8> = (0..60u8).collect();
        mem.write_page(1, &{
            let mut p = [0u8; 4096];
            p[..60].copy_from_slice(&frame);
            p
        });
        n.write(REG_TX_ADDR, 4096);
        n.write(REG_TX_LEN, 60);
        assert_eq!(n.read(REG_TX_LEN), STATUS_OK);
        assert_eq!(
            fake.sent.lock().unwrap().as_slice(),
            std::slice::from_ref(&frame)
        );

        // Nothing queued: 0, and no memory touched.
        n.write(REG_RX_ADDR, 2 * 4096 + 100);
        n.write(REG_RX_SIZE, 1514);
        assert_eq!(n.read(REG_RX_POLL), 0);
        assert!(!dirty.is_marked(2));
        fake.queued.lock().unwrap().push_back(frame.clone());
        assert_eq!(n.read(REG_RX_POLL), 60);
        let mut p = [0u8; 4096];
        mem.read_page(2, &mut p);
        assert_eq!(&p[100..160], frame.as_slice());
        assert!(dirty.is_marked(2) && !dirty.is_marked(3));
        assert_eq!(n.stats.rx_frames, 1);
    }

    #[test]
    fn hostile_addresses_and_lengths_are_refused() {
        let mem = GuestMemory::new(PAGES as usize * 4096).unwrap();
        let dirty = VmmDirty::new(PAGES);
        let fake = Fake::default();
        let mut n = nic(&fake, &mem, &dirty);
        let end = (PAGES * 4096) as u32;
        for (addr, len, want) in [
            (0, 0, STATUS_BAD_LEN),
            (0, 13, STATUS_BAD_LEN),
            (0, 1515, STATUS_BAD_LEN),
            (0, u32::MAX, STATUS_BAD_LEN),
            (end - 59, 60, STATUS_BAD_ADDR),
            (u32::MAX, 60, STATUS_BAD_ADDR),
            (end - 60, 60, STATUS_OK),
        ] {
            n.write(REG_TX_ADDR, addr);
            n.write(REG_TX_LEN, len);
            assert_eq!(n.read(REG_TX_LEN), want, "addr {addr:#x} len {len}");
        }
        assert_eq!(fake.sent.lock().unwrap().len(), 1);
        assert_eq!(n.stats.tx_dropped, 6);

        // RX buffer outside memory: error, frame stays queued.
        fake.queued.lock().unwrap().push_back(vec![1; 60]);
        for (addr, size) in [(end - 10, 1514), (u32::MAX, 2), (0, u32::MAX)] {
            n.write(REG_RX_ADDR, addr);
            n.write(REG_RX_SIZE, size);
            assert_eq!(n.read(REG_RX_POLL), RX_ERROR);
        }
        assert_eq!(fake.queued.lock().unwrap().len(), 1);
        // Frame larger than the buffer: dropped and counted.
        n.write(REG_RX_ADDR, 0);
        n.write(REG_RX_SIZE, 59);
        assert_eq!(n.read(REG_RX_POLL), 0);
        assert_eq!(n.stats.rx_dropped, 1);
        for g in 0..PAGES {
            assert!(!dirty.is_marked(g), "page {g} marked by a refused RX");
        }
    }

    #[test]
    fn no_backend_drops_and_counts() {
        let mem = GuestMemory::new(PAGES as usize * 4096).unwrap();
        let mut n = Net::new([2, 0, 0, 0, 0, 1]);
        // SAFETY: `mem` outlives `n`.
        n.attach(
            unsafe { GuestRam::new(&mem, VmmDirty::new(PAGES)) },
            None,
            None,
        );
        assert_eq!(n.read(REG_LINK), 0);
        n.write(REG_TX_ADDR, 0);
        n.write(REG_TX_LEN, 60);
        assert_eq!(n.read(REG_TX_LEN), STATUS_NO_LINK);
        assert_eq!(n.stats.tx_dropped, 1);
        n.write(REG_RX_SIZE, 1514);
        assert_eq!(n.read(REG_RX_POLL), 0);
    }

    #[test]
    fn registers_round_trip_through_record() {
        let mut n = Net::new([2, 0, 0, 0, 0, 1]);
        n.write(REG_TX_ADDR, 0x1234);
        n.write(REG_RX_ADDR, 0x5678);
        n.write(REG_RX_SIZE, 1514);
        n.stats.rx_frames = 7;
        let mut rec = Vec::new();
        n.save(&mut rec);
        let raws = crate::domain::kvm::wire::split("test", &rec).unwrap();
        let mut m = Net::new([2, 0, 0, 0, 0, 1]);
        m.restore(&raws[0]).unwrap();
        assert_eq!(m.regs(), n.regs());
        assert_eq!(m.stats, n.stats);
        for cut in 0..rec.len() - crate::domain::kvm::wire::HEADER {
            let raw = RawRecord {
                payload: &raws[0].payload[..cut],
                ..raws[0]
            };
            assert!(m.restore(&raw).is_err());
        }
    }
}

#[cfg(test)]
mod garp_tests {
    use super::*;

    #[test]
    fn gratuitous_arp_layout() {
        let mac = [0x52, 0x54, 0, 0xca, 0x57, 1];
        let f = gratuitous_arp(mac, "10.1.2.3".parse().unwrap());
        assert_eq!(f.len(), 42);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1], "ARP request");
        assert_eq!(&f[22..28], &mac, "sender MAC");
        assert_eq!(&f[28..32], &[10, 1, 2, 3], "sender IP");
        assert_eq!(&f[38..42], &[10, 1, 2, 3], "target IP = sender IP");
    }

    #[test]
    fn unsolicited_na_layout_and_checksum() {
        let mac = [0x52, 0x54, 0, 0xca, 0x57, 1];
        let ip: std::net::Ipv6Addr = "fd00:200::2".parse().unwrap();
        let f = unsolicited_na(mac, ip);
        assert_eq!(f.len(), 14 + 40 + 32);
        assert_eq!(&f[0..6], &[0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        assert_eq!(f[20], 58, "next header ICMPv6");
        assert_eq!(f[21], 255, "hop limit must be 255 or receivers drop it");
        assert_eq!(&f[54..56], &[136, 0], "neighbour advertisement");
        assert_eq!(f[58] & 0xe0, 0x20, "Override set, Solicited clear");
        assert_eq!(&f[62..78], &ip.octets(), "target");
        assert_eq!(&f[78..80], &[2, 1]);
        assert_eq!(&f[80..86], &mac);
        // The one's-complement sum over pseudo-header + message is 0xffff.
        let mut sum = 0u32;
        let mut add = |b: &[u8]| {
            for c in b.chunks(2) {
                sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
            }
        };
        add(&f[22..54]); // source + destination
        add(&[0, 0, 0, 32, 0, 0, 0, 58]);
        add(&f[54..]);
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
    }
}
