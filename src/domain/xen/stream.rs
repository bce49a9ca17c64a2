//! A PV checkpoint written as a Xen save file, for `xl restore`.
//!
//! The backup builds a PV replica by handing one complete checkpoint to
//! Xen's own restore (`xl restore -p CONFIG FILE`), which populates the
//! physmap, localises and pins the page tables, translates the vCPU
//! context, rewrites the guest's p2m and start-info page, and seeds the
//! grant table. This module writes that file from the backup's replica
//! image and state, following the formats documented in Xen's tree
//! (`docs/specs/libxl-migration-stream.pandoc`,
//! `docs/specs/libxc-migration-stream.pandoc`, and xl's save-file header
//! in `tools/xl/xl.h`):
//!
//! ```text
//! xl header      "Xen saved domain, xl format\n \0 \r" | byte order 0x01020304
//!                | mandatory flags (STREAMv2) | optional flags 0 | optional length 0
//! libxl header   "LibxlFmt" | version 2 | options 0            (big-endian)
//! libxl record   LIBXC_CONTEXT (the libxc image follows)
//! libxc header   marker ~0 | "XENF" | version 3 | options 0   (big-endian)
//! domain header  type 1 (x86 PV) | page shift 12 | Xen major | minor
//! records        X86_PV_INFO, STATIC_DATA_END, X86_PV_P2M_FRAMES,
//!                PAGE_DATA * n, SHARED_INFO, X86_PV_VCPU_BASIC * online vCPUs, END
//! libxl record   END
//! ```
//!
//! Records are `type u32 | length u32 | body`, padded to 8 bytes. Pages
//! travel with their type; page tables are normalised (machine frames →
//! pfns, [`pte::normalise`]) against the primary's p2m as the checkpoint
//! holds it, and so are the vCPU context's frames (cr3, the user cr1, the
//! GDT frames, and vCPU 0's start-info frame in rdx, the argument of the
//! guest's suspend hypercall). Any frame not in the p2m is an error naming
//! it: the file is never written with a wrong frame.
//!
//! Not written (Xen's restore treats them as optional): TSC info, the
//! extended/XSAVE/MSR vCPU records (the primary does not read them), CPUID
//! and MSR policies (libxl applies the domain's default when absent).

use std::io::Write;

use super::pte::{self, MfnMap};
use crate::PAGE_SIZE;

/// xl's save-file magic.
const XL_MAGIC: &[u8; 32] = b"Xen saved domain, xl format\n \0 \r";
/// xl mandatory flag: the stream that follows is libxl's v2 format.
const XL_FLAG_STREAM_V2: u32 = 1 << 1;

const LIBXL_IDENT: u64 = 0x4c69_6278_6c46_6d74; // "LibxlFmt"
const LIBXL_VERSION: u32 = 2;
pub(super) const LIBXL_END: u32 = 0;
const LIBXL_LIBXC_CONTEXT: u32 = 1;

const LIBXC_MARKER: u64 = u64::MAX;
const LIBXC_ID: u32 = 0x5845_4e46; // "XENF"
const LIBXC_VERSION: u32 = 3;
const DHDR_X86_PV: u32 = 1;
pub(super) const DHDR_X86_HVM: u32 = 2;

pub(super) const REC_END: u32 = 0x00;
pub(super) const REC_PAGE_DATA: u32 = 0x01;
const REC_X86_PV_INFO: u32 = 0x02;
const REC_X86_PV_P2M_FRAMES: u32 = 0x03;
const REC_X86_PV_VCPU_BASIC: u32 = 0x04;
const REC_SHARED_INFO: u32 = 0x07;
const REC_STATIC_DATA_END: u32 = 0x10;

/// Pfns per PAGE_DATA record (Xen's saver batches 1024).
pub const BATCH: usize = 1024;

/// Page type nibbles (`XEN_DOMCTL_PFINFO_*` >> 28).
pub const TYPE_NOTAB: u8 = 0x0;
pub const TYPE_XTAB: u8 = 0xf;

/// Offsets in a 64-bit `vcpu_guest_context` (Xen's public
/// `arch-x86/xen-x86_64.h`; checked against the bindings when built with
/// the `xen` feature).
pub mod ctx64 {
    pub const SIZE: usize = 5168;
    pub const FLAGS: usize = 512;
    /// `user_regs.rdx` (the 13th register of `cpu_user_regs`).
    pub const RDX: usize = 520 + 12 * 8;
    pub const GDT_FRAMES: usize = 4832;
    pub const GDT_ENTS: usize = 4960;
    pub const CR1: usize = 4984 + 8;
    pub const CR3: usize = 4984 + 3 * 8;
    /// `VGCF_online`.
    pub const FLAG_ONLINE: u64 = 1 << 5;
    /// GDT entries a guest may own (`FIRST_RESERVED_GDT_ENTRY`).
    pub const MAX_GDT_ENTS: u64 = 14 * 512;
}

/// Errors writing the save file; each names the value that failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("replica of {got} bytes is not {pages} pages")]
    MemorySize { got: usize, pages: u64 },
    #[error("{pages} pages do not fit the stream's 32-bit p2m end pfn")]
    TooLarge { pages: u64 },
    #[error("the checkpoint lists {got} p2m pages; {pages} pages need {need}")]
    P2mFrames { got: usize, need: usize, pages: u64 },
    #[error("p2m page {index} is at pfn {pfn:#x}, beyond the replica's {pages} pages")]
    P2mFrameRange { index: usize, pfn: u64, pages: u64 },
    #[error("page type listed for pfn {pfn:#x}, beyond the replica's {pages} pages")]
    TypeRange { pfn: u64, pages: u64 },
    #[error("page table: {0}")]
    Table(#[from] pte::PteError),
    #[error("vCPU {vcpu}: context of {got} bytes, a 64-bit PV context is {need}")]
    VcpuSize { vcpu: u32, got: usize, need: usize },
    #[error("vCPU {vcpu}: {what} names mfn {mfn:#x}, which is not in the guest's p2m")]
    VcpuFrame { vcpu: u32, what: String, mfn: u64 },
    #[error("vCPU {vcpu}: {what} is at pfn {pfn:#x} of type {got:#x}, not {want}")]
    VcpuFrameType {
        vcpu: u32,
        what: String,
        pfn: u64,
        got: u8,
        want: &'static str,
    },
    #[error("vCPU {vcpu}: {ents} GDT entries, more than {max}")]
    Gdt { vcpu: u32, ents: u64, max: u64 },
    #[error("no online vCPU 0 in the checkpoint")]
    NoVcpu0,
    #[error("shared info of {0} bytes, not one page")]
    SharedInfo(usize),
    #[error("writing the save file: {0}")]
    Io(#[from] std::io::Error),
}

/// One PV checkpoint, as the backup holds it.
pub struct PvImage<'a> {
    /// Guest memory, pfn `p` at byte `p * 4096`.
    pub memory: &'a [u8],
    /// Pfns of the guest's p2m pages (the state's P2M_FRAMES).
    pub p2m_frames: &'a [u64],
    /// (pfn, type nibble) of every page that is not NOTAB.
    pub types: &'a [(u64, u8)],
    /// (vCPU id, raw `vcpu_guest_context`).
    pub vcpus: &'a [(u32, Vec<u8>)],
    pub shared_info: &'a [u8],
    /// Written into the domain header (Xen's restore only logs it).
    pub xen_version: (u32, u32),
}

/// What was written.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Written {
    pub pages: u64,
    /// Pages sent with data (NOTAB and page tables).
    pub data_pages: u64,
    /// Page tables normalised, per level L1..L4.
    pub tables: [u64; 4],
    pub vcpus: u32,
    pub bytes: u64,
}

/// The primary's p2m (pfn → machine frame) for pfns `0..pages`, read from
/// the checkpoint's own p2m pages.
pub fn read_p2m(memory: &[u8], p2m_frames: &[u64], pages: u64) -> Result<Vec<u64>, StreamError> {
    let per = (PAGE_SIZE / 8) as u64;
    let need = pages.div_ceil(per) as usize;
    if p2m_frames.len() < need {
        return Err(StreamError::P2mFrames {
            got: p2m_frames.len(),
            need,
            pages,
        });
    }
    let mut p2m = Vec::with_capacity(pages as usize);
    for (index, &pfn) in p2m_frames[..need].iter().enumerate() {
        let page = page(memory, pfn).ok_or(StreamError::P2mFrameRange { index, pfn, pages })?;
        for e in page.chunks_exact(8) {
            if p2m.len() as u64 == pages {
                break;
            }
            p2m.push(u64::from_le_bytes(e.try_into().expect("8 bytes")));
        }
    }
    Ok(p2m)
}

/// Whether a p2m entry names a real frame (not INVALID, not one of Linux's
/// identity or foreign markers in bits 62..63).
pub fn has_frame(entry: u64) -> bool {
    entry >> 62 == 0
}

pub(super) fn page(memory: &[u8], pfn: u64) -> Option<&[u8]> {
    let at = usize::try_from(pfn).ok()?.checked_mul(PAGE_SIZE)?;
    memory.get(at..at.checked_add(PAGE_SIZE)?)
}

/// Per-pfn type nibbles: the listed types, XTAB where the p2m has no
/// frame, NOTAB elsewhere.
pub fn dense_types(p2m: &[u64], listed: &[(u64, u8)]) -> Result<Vec<u8>, StreamError> {
    let pages = p2m.len() as u64;
    let mut t: Vec<u8> = p2m
        .iter()
        .map(|&m| if has_frame(m) { TYPE_NOTAB } else { TYPE_XTAB })
        .collect();
    for &(pfn, ty) in listed {
        let slot = t
            .get_mut(pfn as usize)
            .filter(|_| pfn < pages)
            .ok_or(StreamError::TypeRange { pfn, pages })?;
        if *slot != TYPE_XTAB {
            *slot = ty;
        }
    }
    Ok(t)
}

/// Whether a page of this type carries data in PAGE_DATA (NOTAB, L1..L4
/// pinned or not).
fn has_data(ty: u8) -> bool {
    matches!(ty, 0x0..=0x4 | 0x9..=0xc)
}

/// Writes the whole save file for `img` to `out`.
pub fn write_pv(out: &mut impl Write, img: &PvImage) -> Result<Written, StreamError> {
    let pages = (img.memory.len() / PAGE_SIZE) as u64;
    if img.memory.len() % PAGE_SIZE != 0 {
        return Err(StreamError::MemorySize {
            got: img.memory.len(),
            pages,
        });
    }
    if pages == 0 || pages > u64::from(u32::MAX) {
        return Err(StreamError::TooLarge { pages });
    }
    if img.shared_info.len() != PAGE_SIZE {
        return Err(StreamError::SharedInfo(img.shared_info.len()));
    }
    let p2m = read_p2m(img.memory, img.p2m_frames, pages)?;
    let map = MfnMap::new(&p2m, u64::MAX)?;
    let types = dense_types(&p2m, img.types)?;
    let vcpus = normalise_vcpus(img.vcpus, &map, &types)?;
    let mut w = Counted { out, bytes: 0 };
    headers(&mut w, img.xen_version, DHDR_X86_PV)?;
    rec(&mut w, REC_X86_PV_INFO, &[&[8, 4, 0, 0, 0, 0, 0, 0]])?;
    rec(&mut w, REC_STATIC_DATA_END, &[])?;
    let per = PAGE_SIZE / 8;
    let mut frames = Vec::with_capacity(8 + 8 * img.p2m_frames.len());
    frames.extend_from_slice(&0u32.to_le_bytes());
    frames.extend_from_slice(&((pages - 1) as u32).to_le_bytes());
    for pfn in &img.p2m_frames[..(pages as usize).div_ceil(per)] {
        frames.extend_from_slice(&pfn.to_le_bytes());
    }
    rec(&mut w, REC_X86_PV_P2M_FRAMES, &[&frames])?;
    let mut written = Written {
        pages,
        ..Default::default()
    };
    for start in (0..pages).step_by(BATCH) {
        let end = (start + BATCH as u64).min(pages);
        page_data(&mut w, img.memory, start..end, &types, &map, &mut written)?;
    }
    rec(&mut w, REC_SHARED_INFO, &[img.shared_info])?;
    for (id, ctx) in &vcpus {
        rec(
            &mut w,
            REC_X86_PV_VCPU_BASIC,
            &[&id.to_le_bytes(), &0u32.to_le_bytes(), ctx],
        )?;
    }
    rec(&mut w, REC_END, &[])?;
    rec(&mut w, LIBXL_END, &[])?;
    w.out.flush()?;
    written.vcpus = vcpus.len() as u32;
    written.bytes = w.bytes;
    Ok(written)
}

/// xl's header (no config inside: `xl restore` is given the config file),
/// libxl's header and its LIBXC_CONTEXT record, libxc's image and domain
/// headers.
pub(super) fn headers(
    w: &mut Counted<impl Write>,
    xen: (u32, u32),
    domain_type: u32,
) -> std::io::Result<()> {
    w.put(XL_MAGIC)?;
    for v in [0x0102_0304u32, XL_FLAG_STREAM_V2, 0, 0] {
        w.put(&v.to_le_bytes())?;
    }
    w.put(&LIBXL_IDENT.to_be_bytes())?;
    w.put(&LIBXL_VERSION.to_be_bytes())?;
    w.put(&0u32.to_be_bytes())?;
    rec(w, LIBXL_LIBXC_CONTEXT, &[])?;
    w.put(&LIBXC_MARKER.to_be_bytes())?;
    w.put(&LIBXC_ID.to_be_bytes())?;
    w.put(&LIBXC_VERSION.to_be_bytes())?;
    w.put(&[0u8; 8])?; // options (little-endian) and reserved
    w.put(&domain_type.to_le_bytes())?;
    w.put(&12u16.to_le_bytes())?;
    w.put(&0u16.to_le_bytes())?;
    w.put(&xen.0.to_le_bytes())?;
    w.put(&xen.1.to_le_bytes())
}

/// One PAGE_DATA record for pfns `range`.
fn page_data(
    w: &mut Counted<impl Write>,
    memory: &[u8],
    range: std::ops::Range<u64>,
    types: &[u8],
    map: &MfnMap,
    written: &mut Written,
) -> Result<(), StreamError> {
    let mut head = Vec::with_capacity(8 + 8 * BATCH);
    head.extend_from_slice(&((range.end - range.start) as u32).to_le_bytes());
    head.extend_from_slice(&0u32.to_le_bytes());
    let mut data: Vec<u8> = Vec::with_capacity(BATCH * PAGE_SIZE);
    for pfn in range {
        let ty = types[pfn as usize];
        head.extend_from_slice(&((u64::from(ty) << 60) | pfn).to_le_bytes());
        if !has_data(ty) {
            continue;
        }
        let at = data.len();
        data.extend_from_slice(page(memory, pfn).expect("pfn below pages"));
        if let Some(level) = pte::PageType::from_raw(pfn, u32::from(ty) << 28)?.level() {
            pte::normalise(&mut data[at..], pfn, level, map)?;
            written.tables[level as usize - 1] += 1;
        }
        written.data_pages += 1;
    }
    Ok(rec(w, REC_PAGE_DATA, &[&head, &data])?)
}

/// The online vCPUs' contexts with their frames normalised, vCPU 0 first
/// and required.
fn normalise_vcpus(
    vcpus: &[(u32, Vec<u8>)],
    map: &MfnMap,
    types: &[u8],
) -> Result<Vec<(u32, Vec<u8>)>, StreamError> {
    let mut out = Vec::new();
    for (id, raw) in vcpus {
        let vcpu = *id;
        if raw.len() < ctx64::SIZE {
            return Err(StreamError::VcpuSize {
                vcpu,
                got: raw.len(),
                need: ctx64::SIZE,
            });
        }
        let mut c = raw[..ctx64::SIZE].to_vec();
        if get(&c, ctx64::FLAGS) & ctx64::FLAG_ONLINE == 0 {
            continue;
        }
        normalise_context(vcpu, &mut c, map, types)?;
        out.push((vcpu, c));
    }
    if out.first().map(|v| v.0) != Some(0) {
        return Err(StreamError::NoVcpu0);
    }
    Ok(out)
}

fn get(c: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(c[at..at + 8].try_into().expect("8 bytes"))
}

fn set(c: &mut [u8], at: usize, v: u64) {
    c[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Machine frames in one 64-bit context rewritten to pfns, as Xen's saver
/// does: vCPU 0's rdx (start info), the GDT frames, cr3 (an L4), and the
/// user page table in cr1 when its valid bit is set.
fn normalise_context(
    vcpu: u32,
    c: &mut [u8],
    map: &MfnMap,
    types: &[u8],
) -> Result<(), StreamError> {
    let pfn_of = |what: String, mfn: u64, want: u8| -> Result<u64, StreamError> {
        let pfn = map.pfn(mfn).ok_or_else(|| StreamError::VcpuFrame {
            vcpu,
            what: what.clone(),
            mfn,
        })?;
        let got = types[pfn as usize];
        if got & 0x7 != want {
            return Err(StreamError::VcpuFrameType {
                vcpu,
                what,
                pfn,
                got,
                want: if want == 4 {
                    "an L4 table"
                } else {
                    "ordinary memory"
                },
            });
        }
        Ok(pfn)
    };
    if vcpu == 0 {
        let p = pfn_of("the start-info frame (rdx)".into(), get(c, ctx64::RDX), 0)?;
        set(c, ctx64::RDX, p);
    }
    let ents = get(c, ctx64::GDT_ENTS);
    if ents > ctx64::MAX_GDT_ENTS {
        return Err(StreamError::Gdt {
            vcpu,
            ents,
            max: ctx64::MAX_GDT_ENTS,
        });
    }
    for i in 0..ents.div_ceil(512) as usize {
        let at = ctx64::GDT_FRAMES + 8 * i;
        let p = pfn_of(format!("GDT frame {i}"), get(c, at), 0)?;
        set(c, at, p);
    }
    let p = pfn_of("cr3".into(), get(c, ctx64::CR3) >> 12, 4)?;
    set(c, ctx64::CR3, p << 12);
    let cr1 = get(c, ctx64::CR1);
    if cr1 != 0 {
        let p = pfn_of("cr1 (the user L4)".into(), cr1 >> 12, 4)?;
        set(c, ctx64::CR1, 1 | (p << 12));
    }
    Ok(())
}

/// A writer that counts bytes.
pub(super) struct Counted<'a, W: Write> {
    pub(super) out: &'a mut W,
    pub(super) bytes: u64,
}

impl<W: Write> Counted<'_, W> {
    pub(super) fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.out.write_all(b)?;
        self.bytes += b.len() as u64;
        Ok(())
    }
}

/// One record: type, body length, the body's parts, zero padding to 8.
pub(super) fn rec(w: &mut Counted<impl Write>, ty: u32, body: &[&[u8]]) -> std::io::Result<()> {
    let len: usize = body.iter().map(|b| b.len()).sum();
    w.put(&ty.to_le_bytes())?;
    w.put(&(len as u32).to_le_bytes())?;
    for b in body {
        w.put(b)?;
    }
    w.put(&[0u8; 8][..(8 - len % 8) % 8])
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
