//! An HVM checkpoint (with its QEMU device state) written as a Xen save
//! file, for `xl restore`.
//!
//! The same container as the PV file ([`stream`](super::stream)), with an
//! x86 HVM domain header and, after libxc's stream, libxl's
//! EMULATOR_CONTEXT record carrying QEMU's device state
//! (`docs/specs/libxc-migration-stream.pandoc`,
//! `docs/specs/libxl-migration-stream.pandoc`; order as
//! `xg_sr_save_x86_hvm.c` and `libxl_stream_write.c` write it):
//!
//! ```text
//! xl header, libxl header, LIBXC_CONTEXT, libxc header
//! domain header  type 2 (x86 HVM) | page shift 12 | Xen major | minor
//! records        STATIC_DATA_END, PAGE_DATA * n (RAM, then the special
//!                pages), HVM_CONTEXT, HVM_PARAMS, END
//! libxl records  EMULATOR_CONTEXT (emulator id | index 0 | QEMU's state), END
//! ```
//!
//! An HVM guest's memory holds no machine frames: pages travel as they
//! are (type NOTAB). Xen's restore populates exactly the pfns the stream
//! lists, so gfns without memory on the primary (the VGA hole) are left
//! out, and the special pages above the replicated layout (xenstore and
//! console rings, ioreq pages: the checkpoint lists their gfns) are sent
//! zeroed: Xen's restore clears the console and ioreq pages itself, and the
//! guest, resumed through its own migration path, reconnects to a fresh
//! xenstore ring, as the PVH failover does with `xl create`'s cleared
//! pages.
//!
//! Not written (optional to Xen's restore): X86_TSC_INFO (the HVM
//! context carries the guest's TSC), CPUID/MSR policies (libxl applies the
//! domain's default), EMULATOR_XENSTORE_DATA (QEMU's physmap keys, which
//! exist only for a guest that mapped emulated VRAM).

use std::io::Write;

use super::stream::{
    headers, page, rec, Counted, StreamError, BATCH, DHDR_X86_HVM, LIBXL_END, REC_END,
    REC_PAGE_DATA, TYPE_NOTAB,
};
use crate::PAGE_SIZE;

const REC_HVM_CONTEXT: u32 = 0x09;
const REC_HVM_PARAMS: u32 = 0x0a;
const REC_STATIC_DATA_END: u32 = 0x10;
const LIBXL_EMULATOR_CONTEXT: u32 = 3;

/// One HVM checkpoint, as the backup holds it.
pub struct HvmImage<'a> {
    /// Guest memory, gfn `g` at byte `g * 4096`.
    pub memory: &'a [u8],
    /// Gfn ranges inside `memory` with no memory on the primary.
    pub holes: &'a [(u64, u64)],
    /// Populated gfns above `memory` (special pages), ascending.
    pub special: &'a [u64],
    pub hvm_context: &'a [u8],
    pub hvm_params: &'a [(u32, u64)],
    /// (emulator id, QEMU's device state).
    pub device_model: (u32, &'a [u8]),
    /// Written into the domain header (Xen's restore only logs it).
    pub xen_version: (u32, u32),
}

/// What was written.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WrittenHvm {
    /// Pages of RAM sent (the layout minus its holes).
    pub pages: u64,
    pub hole_pages: u64,
    pub special: u64,
    pub device_model: u64,
    pub bytes: u64,
}

/// Errors particular to an HVM file.
#[derive(Debug, thiserror::Error)]
pub enum HvmStreamError {
    #[error("replica of {0} bytes is not whole pages")]
    MemorySize(usize),
    #[error("hole {start:#x}..{end:#x} lies outside the replica's {pages} pages")]
    Hole { start: u64, end: u64, pages: u64 },
    #[error("special page {pfn:#x} lies inside the replica's {pages} pages")]
    Special { pfn: u64, pages: u64 },
    #[error("the checkpoint has an empty HVM context")]
    NoContext,
    #[error("the checkpoint has no QEMU device state")]
    NoDeviceModel,
    #[error(transparent)]
    Stream(#[from] StreamError),
}

impl From<std::io::Error> for HvmStreamError {
    fn from(e: std::io::Error) -> Self {
        HvmStreamError::Stream(StreamError::Io(e))
    }
}

/// Writes the whole save file for `img` to `out`.
pub fn write_hvm(out: &mut impl Write, img: &HvmImage) -> Result<WrittenHvm, HvmStreamError> {
    let pages = (img.memory.len() / PAGE_SIZE) as u64;
    if img.memory.len() % PAGE_SIZE != 0 {
        return Err(HvmStreamError::MemorySize(img.memory.len()));
    }
    let hole = hole_map(img.holes, pages)?;
    if let Some(&pfn) = img.special.iter().find(|&&p| p < pages) {
        return Err(HvmStreamError::Special { pfn, pages });
    }
    if img.hvm_context.is_empty() {
        return Err(HvmStreamError::NoContext);
    }
    if img.device_model.1.is_empty() {
        return Err(HvmStreamError::NoDeviceModel);
    }
    let mut w = Counted { out, bytes: 0 };
    headers(&mut w, img.xen_version, DHDR_X86_HVM)?;
    rec(&mut w, REC_STATIC_DATA_END, &[])?;
    let mut written = WrittenHvm {
        hole_pages: hole.iter().filter(|&&h| h).count() as u64,
        ..Default::default()
    };
    let ram: Vec<u64> = (0..pages).filter(|&g| !hole[g as usize]).collect();
    for batch in ram.chunks(BATCH) {
        page_data(&mut w, batch, |g| {
            page(img.memory, g).expect("gfn below pages")
        })?;
        written.pages += batch.len() as u64;
    }
    let zero = [0u8; PAGE_SIZE];
    for batch in img.special.chunks(BATCH) {
        page_data(&mut w, batch, |_| &zero[..])?;
        written.special += batch.len() as u64;
    }
    rec(&mut w, REC_HVM_CONTEXT, &[img.hvm_context])?;
    let mut params = Vec::with_capacity(8 + 16 * img.hvm_params.len());
    params.extend_from_slice(&(img.hvm_params.len() as u32).to_le_bytes());
    params.extend_from_slice(&0u32.to_le_bytes());
    for &(i, v) in img.hvm_params {
        params.extend_from_slice(&u64::from(i).to_le_bytes());
        params.extend_from_slice(&v.to_le_bytes());
    }
    rec(&mut w, REC_HVM_PARAMS, &[&params])?;
    rec(&mut w, REC_END, &[])?;
    let (id, blob) = img.device_model;
    rec(
        &mut w,
        LIBXL_EMULATOR_CONTEXT,
        &[&id.to_le_bytes(), &0u32.to_le_bytes(), blob],
    )?;
    rec(&mut w, LIBXL_END, &[])?;
    w.out.flush()?;
    written.device_model = blob.len() as u64;
    written.bytes = w.bytes;
    Ok(written)
}

/// Per-gfn hole flags for `0..pages`; a hole reaching beyond is an error.
fn hole_map(holes: &[(u64, u64)], pages: u64) -> Result<Vec<bool>, HvmStreamError> {
    let mut hole = vec![false; pages as usize];
    for &(start, end) in holes {
        if start >= end || end > pages {
            return Err(HvmStreamError::Hole { start, end, pages });
        }
        hole[start as usize..end as usize].fill(true);
    }
    Ok(hole)
}

/// One PAGE_DATA record: the gfns (type NOTAB) and their pages.
fn page_data<'m>(
    w: &mut Counted<impl Write>,
    gfns: &[u64],
    data: impl Fn(u64) -> &'m [u8],
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(8 + 8 * gfns.len());
    head.extend_from_slice(&(gfns.len() as u32).to_le_bytes());
    head.extend_from_slice(&0u32.to_le_bytes());
    let mut body = Vec::with_capacity(gfns.len() * PAGE_SIZE);
    for &g in gfns {
        head.extend_from_slice(&((u64::from(TYPE_NOTAB) << 60) | g).to_le_bytes());
        body.extend_from_slice(data(g));
    }
    rec(w, REC_PAGE_DATA, &[&head, &body])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (type, body) of each record after the fixed headers; `libxc` marks
    /// libxc's records apart from libxl's.
    fn records(b: &[u8]) -> Vec<(bool, u32, Vec<u8>)> {
        // xl header 48, libxl header 16, LIBXC_CONTEXT record 8, libxc
        // header 24, domain header 16.
        assert_eq!(&b[..32], b"Xen saved domain, xl format\n \0 \r");
        assert_eq!(&b[72 + 8..72 + 12], b"XENF");
        assert_eq!(u32::from_le_bytes(b[96..100].try_into().unwrap()), 2);
        let mut at = 112;
        let mut libxc = true;
        let mut out = Vec::new();
        while at < b.len() {
            let ty = u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
            let len = u32::from_le_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize;
            out.push((libxc, ty, b[at + 8..at + 8 + len].to_vec()));
            at += 8 + len.div_ceil(8) * 8;
            if libxc && ty == 0 {
                libxc = false;
            }
        }
        assert_eq!(at, b.len());
        out
    }

    fn image<'a>(mem: &'a [u8], holes: &'a [(u64, u64)], special: &'a [u64]) -> HvmImage<'a> {
        HvmImage {
            memory: mem,
            holes,
            special,
            hvm_context: b"ctx-bytes",
            hvm_params: &[(1, 0xfeffc), (17, 0xfeffb)],
            device_model: (2, b"QEVM devices"),
            xen_version: (4, 17),
        }
    }

    #[test]
    fn writes_ram_without_holes_zeroed_specials_context_params_and_qemu_state() {
        let pages = 2100u64;
        let mut mem = vec![0u8; pages as usize * PAGE_SIZE];
        for g in 0..pages as usize {
            mem[g * PAGE_SIZE] = (g % 251) as u8 + 1;
        }
        let mut out = Vec::new();
        let w = write_hvm(&mut out, &image(&mem, &[(0xa0, 0xc0)], &[0xfeff0, 0xfeff1])).unwrap();
        assert_eq!(w.pages, pages - 0x20);
        assert_eq!((w.hole_pages, w.special, w.device_model), (0x20, 2, 12));
        assert_eq!(w.bytes, out.len() as u64);
        let recs = records(&out);
        let kinds: Vec<(bool, u32)> = recs.iter().map(|r| (r.0, r.1)).collect();
        assert_eq!(
            kinds,
            [
                (true, 0x10),
                (true, 1),
                (true, 1),
                (true, 1),
                (true, 1),
                (true, 9),
                (true, 0xa),
                (true, 0),
                (false, 3),
                (false, 0)
            ]
        );
        let mut seen = Vec::new();
        for (_, _, body) in recs.iter().filter(|r| r.1 == 1) {
            let n = u32::from_le_bytes(body[..4].try_into().unwrap()) as usize;
            let data = &body[8 + 8 * n..];
            assert_eq!(data.len(), n * PAGE_SIZE);
            for i in 0..n {
                let e = u64::from_le_bytes(body[8 + 8 * i..16 + 8 * i].try_into().unwrap());
                assert_eq!(e >> 60, 0, "type NOTAB");
                let g = e & ((1 << 52) - 1);
                let p = &data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
                if g < pages {
                    assert_eq!(p, &mem[g as usize * PAGE_SIZE..][..PAGE_SIZE]);
                } else {
                    assert!(p.iter().all(|&x| x == 0), "special page {g:#x} zeroed");
                }
                seen.push(g);
            }
        }
        let mut want: Vec<u64> = (0..pages).filter(|g| !(0xa0..0xc0).contains(g)).collect();
        want.extend([0xfeff0, 0xfeff1]);
        assert_eq!(seen, want);
        assert_eq!(recs[5].2, b"ctx-bytes");
        let p = &recs[6].2;
        assert_eq!(u32::from_le_bytes(p[..4].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(p[8..16].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(p[16..24].try_into().unwrap()), 0xfeffc);
        let e = &recs[8].2;
        assert_eq!(
            u32::from_le_bytes(e[..4].try_into().unwrap()),
            2,
            "qemu-xen"
        );
        assert_eq!(u32::from_le_bytes(e[4..8].try_into().unwrap()), 0, "index");
        assert_eq!(&e[8..], b"QEVM devices");
    }

    #[test]
    fn refusals_name_the_value() {
        let mem = vec![0u8; 16 * PAGE_SIZE];
        let mut out = Vec::new();
        let e = write_hvm(&mut out, &image(&mem, &[(4, 20)], &[])).unwrap_err();
        assert!(e.to_string().contains("hole 0x4..0x14"), "{e}");
        let e = write_hvm(&mut out, &image(&mem, &[(4, 4)], &[])).unwrap_err();
        assert!(matches!(e, HvmStreamError::Hole { .. }), "{e}");
        let e = write_hvm(&mut out, &image(&mem, &[], &[3])).unwrap_err();
        assert!(e.to_string().contains("special page 0x3"), "{e}");
        let e = write_hvm(&mut out, &image(&mem[..100], &[], &[])).unwrap_err();
        assert!(matches!(e, HvmStreamError::MemorySize(100)), "{e}");
        let mut img = image(&mem, &[], &[]);
        img.device_model.1 = b"";
        let e = write_hvm(&mut out, &img).unwrap_err();
        assert!(matches!(e, HvmStreamError::NoDeviceModel), "{e}");
        let mut img = image(&mem, &[], &[]);
        img.hvm_context = b"";
        assert!(matches!(
            write_hvm(&mut out, &img),
            Err(HvmStreamError::NoContext)
        ));
    }
}
