//! The saved non-memory state of a Xen guest: versioned records.
//!
//! ```text
//! header   magic "CXST" | version u16 (2; 1 is read too, without records
//!          7..9) | flags u16 (bit 0: HVM)
//!          | guest width u32 (bytes) | record count u32
//! record   tag u16 | reserved u16 (0) | length u32 | payload
//!   1 VCPU        vcpu id u32 | vcpu_guest_context bytes (PV)
//!   2 HVM_CONTEXT xc_domain_hvm_getcontext blob (HVM)
//!   3 HVM_PARAMS  count u32 | (index u32 | value u64) * count (HVM)
//!   4 SHARED_INFO the shared-info page, 4096 bytes (PV)
//!   5 PV_TYPES    count u32 | (pfn u64 | type u8 | 0 u8 * 7) * count (PV):
//!                 every pfn whose page type is not NOTAB, ascending
//!   6 P2M_FRAMES  count u32 | pfn u64 * count (PV): the pfns of the
//!                 guest's p2m pages, in table order
//!   7 DEVICE_MODEL emulator u32 (2: qemu-xen) | QEMU's device state, as
//!                 `xen-save-devices-state` wrote it (HVM with a device model)
//!   8 SPECIAL_PFNS count u32 | pfn u64 * count (HVM): populated gfns above
//!                 the replicated layout (xenstore/console rings, ioreq
//!                 pages), ascending; the backup's save file recreates them
//!   9 HOLES       count u32 | (start u64 | end u64) * count (HVM): gfn
//!                 ranges inside the layout with no memory (the VGA hole),
//!                 ascending and disjoint
//! ```
//!
//! A PV checkpoint's types and p2m frames are complete in every state
//! (not a delta): the backup builds the replica from one checkpoint alone.
//!
//! All integers little-endian. A checkpoint's state arrives from the wire
//! (via the backup's replica), so [`XenState::decode`] treats it as hostile:
//! every length is checked before use, sizes are capped, a vCPU appears at
//! most once, unknown tags and trailing bytes are refused, and every error
//! names the field and value. A future format bumps `version`; decoders
//! refuse versions they do not know rather than guess.

const MAGIC: &[u8; 4] = b"CXST";
pub const VERSION: u16 = 2;
/// The first version, without the HVM device-model records (7..9).
const VERSION_1: u16 = 1;
const FLAG_HVM: u16 = 1;

const TAG_VCPU: u16 = 1;
const TAG_HVM_CONTEXT: u16 = 2;
const TAG_HVM_PARAMS: u16 = 3;
const TAG_SHARED_INFO: u16 = 4;
const TAG_PV_TYPES: u16 = 5;
const TAG_P2M_FRAMES: u16 = 6;
const TAG_DEVICE_MODEL: u16 = 7;
const TAG_SPECIAL_PFNS: u16 = 8;
const TAG_HOLES: u16 = 9;

/// `EMULATOR_CONTEXT`'s id for QEMU upstream (qemu-xen), libxl's stream.
pub const EMULATOR_QEMU_XEN: u32 = 2;
/// Upper bound on QEMU's device state (tens of KiB in practice).
pub const MAX_DEVICE_MODEL: usize = 16 << 20;
/// Upper bound on special pfns and hole ranges.
const MAX_HVM_ENTRIES: u32 = 1 << 16;

/// Xen's limit on vCPUs per domain (HVM_MAX_VCPUS is 128 for HVM; PV
/// domains are bounded by the domctl's max_vcpus, well under this).
pub const MAX_VCPUS: u32 = 4096;
/// Upper bound on one vCPU context (vcpu_guest_context_any_t is ~5 KiB).
pub const MAX_VCPU_BYTES: usize = 64 << 10;
/// Upper bound on the HVM context blob.
pub const MAX_HVM_CONTEXT: usize = 16 << 20;
const MAX_PARAMS: u32 = 256;
/// Upper bound on a pfn in a PV record (a 52-bit frame number, as the
/// migration stream's PAGE_DATA field).
pub const MAX_PFN: u64 = (1 << 52) - 1;
/// Upper bound on PV_TYPES and P2M_FRAMES entries (16 Mi: 64 GiB of page
/// tables, a p2m of 8 Gi pages).
const MAX_PV_ENTRIES: u32 = 1 << 24;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("xen state: truncated at byte {at}: {what} needs {need} bytes, {left} left")]
    Truncated {
        at: usize,
        what: &'static str,
        need: usize,
        left: usize,
    },
    #[error("xen state: bad magic {0:?} (not a castor xen state)")]
    Magic([u8; 4]),
    #[error("xen state: version {0} is not supported (this build reads version {VERSION})")]
    Version(u16),
    #[error("xen state: unknown flags {0:#x}")]
    Flags(u16),
    #[error("xen state: guest width {0} is not 4 or 8 (or 0 for HVM)")]
    Width(u32),
    #[error("xen state: unknown record tag {tag} at byte {at}")]
    Tag { tag: u16, at: usize },
    #[error("xen state: record {tag} at byte {at}: {reason}")]
    Record { tag: u16, at: usize, reason: String },
    #[error("xen state: {0} trailing bytes after the last record")]
    Trailing(usize),
    #[error("xen state: {0}")]
    Incomplete(String),
}

/// Non-memory state of one checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XenState {
    pub hvm: bool,
    pub guest_width: u32,
    /// PV: (vcpu id, raw vcpu_guest_context), ascending ids.
    pub vcpus: Vec<(u32, Vec<u8>)>,
    pub hvm_context: Option<Vec<u8>>,
    pub hvm_params: Vec<(u32, u64)>,
    pub shared_info: Option<Vec<u8>>,
    /// PV: (pfn, page type nibble `XEN_DOMCTL_PFINFO_*` >> 28) of every
    /// page that is not NOTAB, ascending pfns.
    pub pv_types: Vec<(u64, u8)>,
    /// PV: pfns of the guest's p2m pages, in table order.
    pub p2m_frames: Vec<u64>,
    /// HVM with a device model: (emulator id, QEMU's device state).
    pub device_model: Option<(u32, Vec<u8>)>,
    /// HVM: populated gfns above the replicated layout, ascending.
    pub special_pfns: Vec<u64>,
    /// HVM: gfn ranges without memory inside the layout, ascending.
    pub holes: Vec<(u64, u64)>,
}

fn record(out: &mut Vec<u8>, tag: u16, payload: &[&[u8]]) {
    let len: usize = payload.iter().map(|p| p.len()).sum();
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(len as u32).to_le_bytes());
    for p in payload {
        out.extend_from_slice(p);
    }
}

impl XenState {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let n = self.vcpus.len()
            + usize::from(self.hvm_context.is_some())
            + usize::from(!self.hvm_params.is_empty())
            + usize::from(self.shared_info.is_some())
            + usize::from(!self.pv_types.is_empty())
            + usize::from(!self.p2m_frames.is_empty())
            + usize::from(self.device_model.is_some())
            + usize::from(!self.special_pfns.is_empty())
            + usize::from(!self.holes.is_empty());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(if self.hvm { FLAG_HVM } else { 0 }).to_le_bytes());
        out.extend_from_slice(&self.guest_width.to_le_bytes());
        out.extend_from_slice(&(n as u32).to_le_bytes());
        for (id, ctx) in &self.vcpus {
            record(out, TAG_VCPU, &[&id.to_le_bytes(), ctx]);
        }
        if let Some(h) = &self.hvm_context {
            record(out, TAG_HVM_CONTEXT, &[h]);
        }
        if !self.hvm_params.is_empty() {
            let mut p = (self.hvm_params.len() as u32).to_le_bytes().to_vec();
            for (i, v) in &self.hvm_params {
                p.extend_from_slice(&i.to_le_bytes());
                p.extend_from_slice(&v.to_le_bytes());
            }
            record(out, TAG_HVM_PARAMS, &[&p]);
        }
        if let Some(s) = &self.shared_info {
            record(out, TAG_SHARED_INFO, &[s]);
        }
        if !self.pv_types.is_empty() {
            let mut p = (self.pv_types.len() as u32).to_le_bytes().to_vec();
            for &(pfn, t) in &self.pv_types {
                p.extend_from_slice(&pfn.to_le_bytes());
                p.extend_from_slice(&[t, 0, 0, 0, 0, 0, 0, 0]);
            }
            record(out, TAG_PV_TYPES, &[&p]);
        }
        if !self.p2m_frames.is_empty() {
            let mut p = (self.p2m_frames.len() as u32).to_le_bytes().to_vec();
            for pfn in &self.p2m_frames {
                p.extend_from_slice(&pfn.to_le_bytes());
            }
            record(out, TAG_P2M_FRAMES, &[&p]);
        }
        if let Some((id, blob)) = &self.device_model {
            record(out, TAG_DEVICE_MODEL, &[&id.to_le_bytes(), blob]);
        }
        if !self.special_pfns.is_empty() {
            let mut p = (self.special_pfns.len() as u32).to_le_bytes().to_vec();
            for pfn in &self.special_pfns {
                p.extend_from_slice(&pfn.to_le_bytes());
            }
            record(out, TAG_SPECIAL_PFNS, &[&p]);
        }
        if !self.holes.is_empty() {
            let mut p = (self.holes.len() as u32).to_le_bytes().to_vec();
            for (a, b) in &self.holes {
                p.extend_from_slice(&a.to_le_bytes());
                p.extend_from_slice(&b.to_le_bytes());
            }
            record(out, TAG_HOLES, &[&p]);
        }
    }

    pub fn decode(buf: &[u8]) -> Result<XenState, StateError> {
        let mut r = Reader { buf, at: 0 };
        let magic: [u8; 4] = r.take(4, "magic")?.try_into().expect("4 bytes");
        if &magic != MAGIC {
            return Err(StateError::Magic(magic));
        }
        let version = r.u16("version")?;
        if version != VERSION && version != VERSION_1 {
            return Err(StateError::Version(version));
        }
        let flags = r.u16("flags")?;
        if flags & !FLAG_HVM != 0 {
            return Err(StateError::Flags(flags));
        }
        let guest_width = r.u32("guest width")?;
        // HVM/PVH: Xen reports 0 (the guest's mode is in the HVM context).
        let hvm_zero = flags & FLAG_HVM != 0 && guest_width == 0;
        if guest_width != 4 && guest_width != 8 && !hvm_zero {
            return Err(StateError::Width(guest_width));
        }
        let mut st = XenState {
            hvm: flags & FLAG_HVM != 0,
            guest_width,
            ..Default::default()
        };
        let count = r.u32("record count")?;
        for _ in 0..count {
            st.read_record(&mut r, version)?;
        }
        if r.left() != 0 {
            return Err(StateError::Trailing(r.left()));
        }
        st.check_complete()?;
        Ok(st)
    }

    fn read_record(&mut self, r: &mut Reader, version: u16) -> Result<(), StateError> {
        let at = r.at;
        let tag = r.u16("record tag")?;
        let reserved = r.u16("record reserved")?;
        let len = r.u32("record length")? as usize;
        let bad = |reason: String| StateError::Record { tag, at, reason };
        if reserved != 0 {
            return Err(bad(format!("reserved field is {reserved}, not 0")));
        }
        let payload = r.take(len, "record payload")?;
        match tag {
            TAG_VCPU => self.read_vcpu(payload).map_err(bad),
            TAG_HVM_CONTEXT => {
                if self.hvm_context.is_some() {
                    return Err(bad("second HVM context".into()));
                }
                if payload.is_empty() || payload.len() > MAX_HVM_CONTEXT {
                    return Err(bad(format!(
                        "HVM context of {len} bytes (1..={MAX_HVM_CONTEXT})"
                    )));
                }
                self.hvm_context = Some(payload.to_vec());
                Ok(())
            }
            TAG_HVM_PARAMS => self.read_params(payload).map_err(bad),
            TAG_SHARED_INFO => {
                if self.shared_info.is_some() || payload.len() != crate::PAGE_SIZE {
                    return Err(bad(format!("shared info of {len} bytes (one page, once)")));
                }
                self.shared_info = Some(payload.to_vec());
                Ok(())
            }
            TAG_PV_TYPES => self.read_types(payload).map_err(bad),
            TAG_P2M_FRAMES => self.read_p2m_frames(payload).map_err(bad),
            TAG_DEVICE_MODEL | TAG_SPECIAL_PFNS | TAG_HOLES if version == VERSION_1 => {
                Err(StateError::Tag { tag, at })
            }
            TAG_DEVICE_MODEL => self.read_device_model(payload).map_err(bad),
            TAG_SPECIAL_PFNS => self.read_special(payload).map_err(bad),
            TAG_HOLES => self.read_holes(payload).map_err(bad),
            tag => Err(StateError::Tag { tag, at }),
        }
    }

    fn read_types(&mut self, p: &[u8]) -> Result<(), String> {
        if !self.pv_types.is_empty() {
            return Err("second PV types record".into());
        }
        let body = counted(p, 16, "PV types")?;
        for e in body.chunks_exact(16) {
            let pfn = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
            let t = e[8];
            if pfn > MAX_PFN {
                return Err(format!("pfn {pfn:#x} beyond {MAX_PFN:#x}"));
            }
            if e[9..].iter().any(|&b| b != 0) {
                return Err(format!("pfn {pfn:#x}: padding bytes are not zero"));
            }
            if super::pte::PageType::from_raw(pfn, u32::from(t) << 28).is_err() || t == 0 {
                return Err(format!(
                    "pfn {pfn:#x}: type {t:#x} is not a non-NOTAB page type"
                ));
            }
            if let Some(&(last, _)) = self.pv_types.last() {
                if pfn <= last {
                    return Err(format!(
                        "pfn {pfn:#x} after {last:#x} (pfns ascend, once each)"
                    ));
                }
            }
            self.pv_types.push((pfn, t));
        }
        Ok(())
    }

    fn read_device_model(&mut self, p: &[u8]) -> Result<(), String> {
        if self.device_model.is_some() {
            return Err("second device-model record".into());
        }
        if p.len() < 5 || p.len() > 4 + MAX_DEVICE_MODEL {
            return Err(format!(
                "device-model record of {} bytes (5..={})",
                p.len(),
                4 + MAX_DEVICE_MODEL
            ));
        }
        let id = u32::from_le_bytes(p[..4].try_into().expect("4 bytes"));
        if id != EMULATOR_QEMU_XEN {
            return Err(format!(
                "emulator id {id} (castor carries qemu-xen's state, id {EMULATOR_QEMU_XEN})"
            ));
        }
        self.device_model = Some((id, p[4..].to_vec()));
        Ok(())
    }

    fn read_special(&mut self, p: &[u8]) -> Result<(), String> {
        if !self.special_pfns.is_empty() {
            return Err("second special pfns record".into());
        }
        let body = counted_max(p, 8, "special pfns", MAX_HVM_ENTRIES)?;
        for e in body.chunks_exact(8) {
            let pfn = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            if pfn > MAX_PFN {
                return Err(format!("special pfn {pfn:#x} beyond {MAX_PFN:#x}"));
            }
            if self.special_pfns.last().is_some_and(|&l| pfn <= l) {
                return Err(format!(
                    "special pfn {pfn:#x} out of order (ascending, once each)"
                ));
            }
            self.special_pfns.push(pfn);
        }
        Ok(())
    }

    fn read_holes(&mut self, p: &[u8]) -> Result<(), String> {
        if !self.holes.is_empty() {
            return Err("second holes record".into());
        }
        let body = counted_max(p, 16, "holes", MAX_HVM_ENTRIES)?;
        for e in body.chunks_exact(16) {
            let a = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
            let b = u64::from_le_bytes(e[8..].try_into().expect("8 bytes"));
            if a >= b || b > MAX_PFN + 1 {
                return Err(format!(
                    "hole {a:#x}..{b:#x} is empty or beyond {MAX_PFN:#x}"
                ));
            }
            if self.holes.last().is_some_and(|&(_, e)| a < e) {
                return Err(format!(
                    "hole {a:#x}..{b:#x} overlaps or precedes the one before"
                ));
            }
            self.holes.push((a, b));
        }
        Ok(())
    }

    fn read_p2m_frames(&mut self, p: &[u8]) -> Result<(), String> {
        if !self.p2m_frames.is_empty() {
            return Err("second p2m frames record".into());
        }
        let body = counted(p, 8, "p2m frames")?;
        for e in body.chunks_exact(8) {
            let pfn = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            if pfn > MAX_PFN {
                return Err(format!("p2m frame pfn {pfn:#x} beyond {MAX_PFN:#x}"));
            }
            self.p2m_frames.push(pfn);
        }
        Ok(())
    }

    fn read_vcpu(&mut self, p: &[u8]) -> Result<(), String> {
        if p.len() < 5 || p.len() > 4 + MAX_VCPU_BYTES {
            return Err(format!(
                "vCPU record of {} bytes (5..={})",
                p.len(),
                4 + MAX_VCPU_BYTES
            ));
        }
        let id = u32::from_le_bytes(p[..4].try_into().expect("4 bytes"));
        if id >= MAX_VCPUS {
            return Err(format!("vCPU id {id} >= {MAX_VCPUS}"));
        }
        if let Some((last, _)) = self.vcpus.last() {
            if id <= *last {
                return Err(format!("vCPU id {id} after {last} (ids ascend, once each)"));
            }
        }
        self.vcpus.push((id, p[4..].to_vec()));
        Ok(())
    }

    fn read_params(&mut self, p: &[u8]) -> Result<(), String> {
        if !self.hvm_params.is_empty() {
            return Err("second HVM params record".into());
        }
        if p.len() < 4 {
            return Err(format!("HVM params record of {} bytes", p.len()));
        }
        let n = u32::from_le_bytes(p[..4].try_into().expect("4 bytes"));
        if n == 0 || n > MAX_PARAMS || p.len() != 4 + 12 * n as usize {
            return Err(format!(
                "{n} HVM params in {} bytes (1..={MAX_PARAMS}, 12 bytes each)",
                p.len()
            ));
        }
        for e in p[4..].chunks_exact(12) {
            let i = u32::from_le_bytes(e[..4].try_into().expect("4 bytes"));
            let v = u64::from_le_bytes(e[4..].try_into().expect("8 bytes"));
            self.hvm_params.push((i, v));
        }
        Ok(())
    }

    fn check_complete(&self) -> Result<(), StateError> {
        let missing = if self.hvm {
            (self.hvm_context.is_none()).then_some("an HVM guest's state has no HVM context")
        } else if self.vcpus.is_empty() {
            Some("a PV guest's state has no vCPU")
        } else if self.vcpus[0].0 != 0 {
            Some("a PV guest's state lacks vCPU 0")
        } else {
            None
        };
        match missing {
            Some(m) => Err(StateError::Incomplete(m.into())),
            None => Ok(()),
        }
    }
}

/// The body of a `count u32 | entry * count` payload, checked: count in
/// 1..=MAX_PV_ENTRIES and the length exactly `4 + size * count`.
fn counted<'a>(p: &'a [u8], size: usize, what: &str) -> Result<&'a [u8], String> {
    counted_max(p, size, what, MAX_PV_ENTRIES)
}

/// [`counted`] with its own cap on the count.
fn counted_max<'a>(p: &'a [u8], size: usize, what: &str, max: u32) -> Result<&'a [u8], String> {
    if p.len() < 4 {
        return Err(format!("{what} record of {} bytes", p.len()));
    }
    let n = u32::from_le_bytes(p[..4].try_into().expect("4 bytes"));
    if n == 0 || n > max || p.len() != 4 + size * n as usize {
        return Err(format!(
            "{n} {what} entries in {} bytes (1..={max}, {size} bytes each)",
            p.len()
        ));
    }
    Ok(&p[4..])
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.buf.len() - self.at
    }

    fn take(&mut self, need: usize, what: &'static str) -> Result<&'a [u8], StateError> {
        if need > self.left() {
            return Err(StateError::Truncated {
                at: self.at,
                what,
                need,
                left: self.left(),
            });
        }
        let s = &self.buf[self.at..self.at + need];
        self.at += need;
        Ok(s)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, StateError> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pv() -> XenState {
        XenState {
            hvm: false,
            guest_width: 8,
            vcpus: vec![(0, vec![1; 5168]), (1, vec![2; 5168])],
            shared_info: Some(vec![9; 4096]),
            pv_types: vec![(3, 0x1), (7, 0xc), (0x5000, 0xf)],
            p2m_frames: vec![0x40, 0x41, 0x10],
            ..Default::default()
        }
    }

    fn hvm() -> XenState {
        XenState {
            hvm: true,
            guest_width: 8,
            hvm_context: Some(vec![7; 1000]),
            hvm_params: vec![(1, 0xfeff0), (2, 3)],
            ..Default::default()
        }
    }

    fn enc(s: &XenState) -> Vec<u8> {
        let mut v = Vec::new();
        s.encode(&mut v);
        v
    }

    #[test]
    fn round_trips() {
        // Xen reports a guest width of 0 for a PVH guest (seen in the lab).
        let pvh = XenState {
            guest_width: 0,
            ..hvm()
        };
        for s in [pv(), hvm(), pvh] {
            assert_eq!(XenState::decode(&enc(&s)).unwrap(), s);
        }
        let pv0 = XenState {
            guest_width: 0,
            ..pv()
        };
        assert_eq!(XenState::decode(&enc(&pv0)), Err(StateError::Width(0)));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let b = enc(&pv());
        for n in 0..b.len() {
            assert!(XenState::decode(&b[..n]).is_err(), "prefix {n} accepted");
        }
    }

    #[test]
    fn hostile_headers_are_named() {
        let mut b = enc(&pv());
        b[0] = b'X';
        assert!(matches!(XenState::decode(&b), Err(StateError::Magic(_))));
        let mut b = enc(&pv());
        b[4] = 3;
        assert_eq!(XenState::decode(&b), Err(StateError::Version(3)));
        let mut b = enc(&pv());
        b[6] = 0x80;
        assert_eq!(XenState::decode(&b), Err(StateError::Flags(0x80)));
        let mut b = enc(&pv());
        b[8] = 5;
        assert_eq!(XenState::decode(&b), Err(StateError::Width(5)));
        let mut b = enc(&pv());
        b.push(0);
        assert_eq!(XenState::decode(&b), Err(StateError::Trailing(1)));
    }

    #[test]
    fn hostile_records_are_refused() {
        // Record count says more than there is.
        let mut b = enc(&pv());
        b[12] = 200;
        assert!(matches!(
            XenState::decode(&b),
            Err(StateError::Truncated { .. })
        ));
        // A length of 4 GiB.
        let mut b = enc(&pv());
        b[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            XenState::decode(&b),
            Err(StateError::Truncated { .. })
        ));
        // Unknown tag.
        let mut b = enc(&pv());
        b[16] = 77;
        assert!(matches!(
            XenState::decode(&b),
            Err(StateError::Tag { tag: 77, .. })
        ));
        // The same vCPU twice.
        let mut s = pv();
        s.vcpus[1].0 = 0;
        assert!(matches!(
            XenState::decode(&enc(&s)),
            Err(StateError::Record { .. })
        ));
        // vCPU id out of range.
        let mut s = pv();
        s.vcpus[1].0 = MAX_VCPUS;
        assert!(matches!(
            XenState::decode(&enc(&s)),
            Err(StateError::Record { .. })
        ));
        // Shared info not one page.
        let mut s = pv();
        s.shared_info = Some(vec![0; 10]);
        assert!(XenState::decode(&enc(&s)).is_err());
        // Params count disagreeing with the length.
        let mut b = enc(&hvm());
        let at = b.len() - 2 * 12 - 4;
        b[at] = 3;
        assert!(matches!(
            XenState::decode(&b),
            Err(StateError::Record { .. })
        ));
    }

    #[test]
    fn hostile_pv_records_are_refused() {
        let bad = |s: XenState, what: &str| {
            let e = XenState::decode(&enc(&s)).unwrap_err();
            assert!(matches!(e, StateError::Record { .. }), "{what}: {e}");
            e.to_string()
        };
        let mut s = pv();
        s.pv_types = vec![(7, 1), (3, 1)];
        assert!(bad(s, "descending").contains("pfn 0x3 after 0x7"));
        let mut s = pv();
        s.pv_types = vec![(3, 0x5)];
        assert!(bad(s, "reserved type").contains("type 0x5"));
        let mut s = pv();
        s.pv_types = vec![(3, 0)];
        assert!(bad(s, "NOTAB listed").contains("type 0x0"));
        let mut s = pv();
        s.pv_types = vec![(1 << 52, 1)];
        assert!(bad(s, "pfn too large").contains("beyond"));
        let mut s = pv();
        s.p2m_frames = vec![u64::MAX];
        assert!(bad(s, "p2m pfn too large").contains("p2m frame pfn"));
        // Non-zero padding after a type.
        let mut b = enc(&pv());
        let i = b
            .windows(9)
            .position(|w| w == [3, 0, 0, 0, 0, 0, 0, 0, 1])
            .unwrap();
        b[i + 9] = 1;
        assert!(matches!(
            XenState::decode(&b),
            Err(StateError::Record { tag: 5, .. })
        ));
    }

    #[test]
    fn incomplete_states_are_refused() {
        let mut s = pv();
        s.vcpus.clear();
        assert!(matches!(
            XenState::decode(&enc(&s)),
            Err(StateError::Incomplete(_))
        ));
        let mut s = pv();
        s.vcpus.remove(0);
        assert!(matches!(
            XenState::decode(&enc(&s)),
            Err(StateError::Incomplete(_))
        ));
        let mut s = hvm();
        s.hvm_context = None;
        assert!(matches!(
            XenState::decode(&enc(&s)),
            Err(StateError::Incomplete(_))
        ));
    }

    fn hvm_dm() -> XenState {
        XenState {
            device_model: Some((EMULATOR_QEMU_XEN, b"QEVM\0\0\0\x03 devices".to_vec())),
            special_pfns: vec![0xfeff0, 0xfeff1, 0xfeff7],
            holes: vec![(0xa0, 0xc0)],
            ..hvm()
        }
    }

    #[test]
    fn device_model_records_round_trip_and_version_1_still_reads() {
        let s = hvm_dm();
        assert_eq!(XenState::decode(&enc(&s)).unwrap(), s);
        // A version-1 state (no records 7..9) still decodes.
        let mut b = enc(&hvm());
        b[4] = 1;
        assert_eq!(XenState::decode(&b).unwrap(), hvm());
        // Version 1 does not know records 7..9.
        let mut b = enc(&hvm_dm());
        b[4] = 1;
        assert!(matches!(
            XenState::decode(&b),
            Err(StateError::Tag { tag: 7, .. })
        ));
        let b = enc(&s);
        for n in 0..b.len() {
            assert!(XenState::decode(&b[..n]).is_err(), "prefix {n} accepted");
        }
    }

    #[test]
    fn hostile_device_model_records_are_refused() {
        let bad = |s: XenState| {
            let e = XenState::decode(&enc(&s)).unwrap_err();
            assert!(matches!(e, StateError::Record { .. }), "{e}");
            e.to_string()
        };
        let mut s = hvm_dm();
        s.device_model = Some((1, vec![1; 8]));
        assert!(bad(s).contains("emulator id 1"));
        let mut s = hvm_dm();
        s.device_model = Some((EMULATOR_QEMU_XEN, Vec::new()));
        assert!(bad(s).contains("device-model record of 4 bytes"));
        let mut s = hvm_dm();
        s.special_pfns = vec![5, 5];
        assert!(bad(s).contains("special pfn 0x5 out of order"));
        let mut s = hvm_dm();
        s.special_pfns = vec![1 << 52];
        assert!(bad(s).contains("beyond"));
        let mut s = hvm_dm();
        s.holes = vec![(0xc0, 0xa0)];
        assert!(bad(s).contains("hole 0xc0..0xa0 is empty"));
        let mut s = hvm_dm();
        s.holes = vec![(0xa0, 0xc0), (0xb0, 0xd0)];
        assert!(bad(s).contains("overlaps"));
        // A device-model length beyond the record.
        let mut b = enc(&hvm_dm());
        let i = b.windows(4).position(|w| w == b"QEVM").unwrap();
        b[i - 8..i - 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            XenState::decode(&b),
            Err(StateError::Truncated { .. })
        ));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = XenState::decode(&b);
        }

        #[test]
        fn flipped_bytes_never_panic(i in 0usize..200, x in 1u8..=255) {
            let mut b = enc(&pv());
            let i = i % b.len();
            b[i] ^= x;
            let _ = XenState::decode(&b);
        }
    }
}
