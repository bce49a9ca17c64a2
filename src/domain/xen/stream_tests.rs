use super::*;
use crate::domain::xen::pte::with_frame;

const PAGES: u64 = 600;

fn mfn(pfn: u64) -> u64 {
    0x10000 + 7 * pfn
}

fn put(mem: &mut [u8], pfn: u64, slot: usize, v: u64) {
    let at = pfn as usize * PAGE_SIZE + slot * 8;
    mem[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn word(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// A 600-page guest: p2m pages at pfns 10 and 11 (pfn 599 invalid), a
/// 4-level table 20 → 21 → 22 → 23 → pfn 100, vCPU 0 online with its start
/// info at pfn 5 and GDT at pfn 6, vCPU 1 offline.
struct Guest {
    mem: Vec<u8>,
    types: Vec<(u64, u8)>,
    vcpus: Vec<(u32, Vec<u8>)>,
    shinfo: Vec<u8>,
}

fn guest() -> Guest {
    let mut mem = vec![0u8; PAGES as usize * PAGE_SIZE];
    for pfn in 0..PAGES {
        let e = if pfn == 599 { u64::MAX } else { mfn(pfn) };
        put(&mut mem, 10 + pfn / 512, (pfn % 512) as usize, e);
        if pfn != 10 && pfn != 11 && !(20..24).contains(&pfn) {
            put(&mut mem, pfn, 1, 0xabc0_0000 + pfn); // recognisable data
        }
    }
    put(&mut mem, 20, 0, with_frame(0x67, mfn(21)));
    put(&mut mem, 20, 256, with_frame(0x63, 0xdead)); // Xen's slot
    put(&mut mem, 21, 3, with_frame(0x67, mfn(22)));
    put(&mut mem, 22, 4, with_frame(0x67, mfn(23)));
    put(&mut mem, 23, 5, with_frame((1 << 63) | 0x67, mfn(100)));
    put(&mut mem, 23, 6, 0x1234_5000); // not present: kept
    let mut c0 = vec![0u8; ctx64::SIZE + 16]; // the union may be larger
    set(&mut c0, ctx64::FLAGS, ctx64::FLAG_ONLINE | 4);
    set(&mut c0, ctx64::RDX, mfn(5));
    set(&mut c0, ctx64::GDT_ENTS, 16);
    set(&mut c0, ctx64::GDT_FRAMES, mfn(6));
    set(&mut c0, ctx64::CR3, mfn(20) << 12);
    let c1 = vec![0u8; ctx64::SIZE]; // offline: cr3 0 is never looked at
    Guest {
        mem,
        types: vec![(20, 0xc), (21, 3), (22, 2), (23, 1)],
        vcpus: vec![(0, c0), (1, c1)],
        shinfo: vec![0x5a; PAGE_SIZE],
    }
}

fn write(g: &Guest) -> Result<(Vec<u8>, Written), StreamError> {
    let img = PvImage {
        memory: &g.mem,
        p2m_frames: &[10, 11],
        types: &g.types,
        vcpus: &g.vcpus,
        shared_info: &g.shinfo,
        xen_version: (4, 17),
    };
    let mut out = Vec::new();
    let w = write_pv(&mut out, &img)?;
    Ok((out, w))
}

/// The records of a libxc image (after its two headers), as (type, body).
fn records(mut b: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let mut v = Vec::new();
    loop {
        let ty = u32::from_le_bytes(b[..4].try_into().unwrap());
        let len = u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize;
        let padded = len.div_ceil(8) * 8;
        v.push((ty, b[8..8 + len].to_vec()));
        assert!(b[8 + len..8 + padded].iter().all(|&x| x == 0), "padding");
        b = &b[8 + padded..];
        if b.is_empty() {
            return v;
        }
    }
}

#[test]
fn headers_are_xls_libxls_and_libxcs() {
    let (out, w) = write(&guest()).unwrap();
    assert_eq!(w.bytes, out.len() as u64);
    assert_eq!(&out[..32], XL_MAGIC);
    assert_eq!(&out[32..36], &[4, 3, 2, 1]); // 0x01020304, little-endian
    assert_eq!(&out[36..40], &2u32.to_le_bytes()); // STREAMv2, no JSON
    assert_eq!(&out[40..48], &[0; 8]); // no optional data
    assert_eq!(&out[48..56], b"LibxlFmt");
    assert_eq!(&out[56..64], &[0, 0, 0, 2, 0, 0, 0, 0]);
    assert_eq!(&out[64..72], &[1, 0, 0, 0, 0, 0, 0, 0]); // LIBXC_CONTEXT
    assert_eq!(&out[72..80], &[0xff; 8]);
    assert_eq!(&out[80..88], b"XENF\0\0\0\x03");
    assert_eq!(&out[88..96], &[0; 8]);
    assert_eq!(&out[96..100], &1u32.to_le_bytes()); // x86 PV
    assert_eq!(&out[100..102], &12u16.to_le_bytes());
    assert_eq!(&out[104..112], &[4, 0, 0, 0, 17, 0, 0, 0]);
    let recs = records(&out[112..]);
    let kinds: Vec<u32> = recs.iter().map(|r| r.0).collect();
    // PV_INFO, STATIC_DATA_END, P2M_FRAMES, 1 PAGE_DATA (600 < 1024),
    // SHARED_INFO, one online vCPU, libxc END, libxl END.
    assert_eq!(kinds, vec![2, 0x10, 3, 1, 7, 4, 0, 0]);
    assert_eq!(recs[0].1, vec![8, 4, 0, 0, 0, 0, 0, 0]);
    let f = &recs[2].1;
    assert_eq!(&f[..8], &[0, 0, 0, 0, 0x57, 2, 0, 0]); // 0..=599
    assert_eq!(word(f, 8), 10);
    assert_eq!(word(f, 16), 11);
    assert_eq!(recs[4].1, vec![0x5a; PAGE_SIZE]);
}

#[test]
fn pages_carry_types_and_tables_are_normalised() {
    let (out, w) = write(&guest()).unwrap();
    assert_eq!(w.pages, PAGES);
    assert_eq!(w.data_pages, PAGES - 1, "pfn 599 has no frame: no data");
    assert_eq!(w.tables, [1, 1, 1, 1]);
    let recs = records(&out[112..]);
    let pd = &recs[3].1;
    assert_eq!(u32::from_le_bytes(pd[..4].try_into().unwrap()), 600);
    let pfn_word = |i: usize| word(pd, 8 + 8 * i);
    assert_eq!(pfn_word(0), 0);
    assert_eq!(pfn_word(20), (0xc << 60) | 20);
    assert_eq!(pfn_word(23), (1 << 60) | 23);
    assert_eq!(pfn_word(599), (0xf << 60) | 599);
    assert_eq!(pd.len(), 8 + 8 * 600 + PAGE_SIZE * 599);
    let data = &pd[8 + 8 * 600..];
    let page = |pfn: usize| &data[pfn * PAGE_SIZE..(pfn + 1) * PAGE_SIZE];
    assert_eq!(word(page(7), 8), 0xabc0_0007, "ordinary pages as they are");
    assert_eq!(word(page(20), 0), with_frame(0x67, 21));
    assert_eq!(word(page(20), 256 * 8), 0, "Xen's L4 slot cleared");
    assert_eq!(word(page(21), 3 * 8), with_frame(0x67, 22));
    assert_eq!(word(page(23), 5 * 8), with_frame((1 << 63) | 0x67, 100));
    assert_eq!(word(page(23), 6 * 8), 0x1234_5000);
    // The p2m pages travel as they are (Xen's restore rewrites them).
    assert_eq!(word(page(10), 8 * 5), mfn(5));
}

#[test]
fn the_vcpu_context_names_pfns() {
    let (out, w) = write(&guest()).unwrap();
    assert_eq!(w.vcpus, 1, "the offline vCPU is not sent");
    let recs = records(&out[112..]);
    let v = &recs[5].1;
    assert_eq!(&v[..8], &[0; 8], "vCPU 0, reserved 0");
    let c = &v[8..];
    assert_eq!(c.len(), ctx64::SIZE);
    assert_eq!(get(c, ctx64::RDX), 5);
    assert_eq!(get(c, ctx64::GDT_FRAMES), 6);
    assert_eq!(get(c, ctx64::CR3), 20 << 12);
    assert_eq!(get(c, ctx64::CR1), 0);
}

#[test]
fn a_user_l4_in_cr1_is_normalised_with_its_valid_bit() {
    let mut g = guest();
    g.types.push((24, 0x4));
    set(&mut g.vcpus[0].1, ctx64::CR1, mfn(24) << 12);
    let (out, _) = write(&g).unwrap();
    let recs = records(&out[112..]);
    assert_eq!(get(&recs[5].1[8..], ctx64::CR1), 1 | (24 << 12));
}

#[test]
fn frames_outside_the_p2m_are_named_not_written() {
    let mut g = guest();
    put(&mut g.mem, 22, 9, with_frame(0x67, 0x4242));
    let e = write(&g).unwrap_err();
    assert!(
        matches!(
            e,
            StreamError::Table(pte::PteError::MfnNotInP2m {
                pfn: 22,
                level: 2,
                slot: 9,
                mfn: 0x4242,
                ..
            })
        ),
        "{e}"
    );
    let mut g = guest();
    set(&mut g.vcpus[0].1, ctx64::GDT_FRAMES, 0x999);
    let e = write(&g).unwrap_err().to_string();
    assert!(e.contains("GDT frame 0") && e.contains("0x999"), "{e}");
    let mut g = guest();
    set(&mut g.vcpus[0].1, ctx64::CR3, mfn(7) << 12);
    let e = write(&g).unwrap_err().to_string();
    assert!(
        e.contains("cr3") && e.contains("pfn 0x7") && e.contains("L4"),
        "{e}"
    );
    let mut g = guest();
    set(&mut g.vcpus[0].1, ctx64::RDX, mfn(20));
    let e = write(&g).unwrap_err().to_string();
    assert!(e.contains("start-info") && e.contains("0x14"), "{e}");
}

#[test]
fn hostile_checkpoints_are_refused() {
    let g = guest();
    let mut img = PvImage {
        memory: &g.mem,
        p2m_frames: &[10],
        types: &g.types,
        vcpus: &g.vcpus,
        shared_info: &g.shinfo,
        xen_version: (4, 17),
    };
    let e = write_pv(&mut Vec::new(), &img).unwrap_err();
    assert!(
        matches!(
            e,
            StreamError::P2mFrames {
                got: 1,
                need: 2,
                ..
            }
        ),
        "{e}"
    );
    img.p2m_frames = &[10, 1 << 40];
    let e = write_pv(&mut Vec::new(), &img).unwrap_err();
    assert!(
        matches!(e, StreamError::P2mFrameRange { index: 1, .. }),
        "{e}"
    );
    img.p2m_frames = &[10, 11];
    let far = [(600u64, 1u8)];
    img.types = &far;
    let e = write_pv(&mut Vec::new(), &img).unwrap_err();
    assert!(matches!(e, StreamError::TypeRange { pfn: 600, .. }), "{e}");
    img.types = &g.types;
    let short = vec![(0, vec![0u8; 100])];
    img.vcpus = &short;
    let e = write_pv(&mut Vec::new(), &img).unwrap_err();
    assert!(matches!(e, StreamError::VcpuSize { got: 100, .. }), "{e}");
    let offline = vec![(0, vec![0u8; ctx64::SIZE])];
    img.vcpus = &offline;
    assert!(matches!(
        write_pv(&mut Vec::new(), &img),
        Err(StreamError::NoVcpu0)
    ));
    img.vcpus = &g.vcpus;
    img.memory = &g.mem[..100];
    assert!(matches!(
        write_pv(&mut Vec::new(), &img),
        Err(StreamError::MemorySize { got: 100, .. })
    ));
    let mut g2 = guest();
    set(&mut g2.vcpus[0].1, ctx64::GDT_ENTS, 14 * 512 + 1);
    assert!(matches!(write(&g2), Err(StreamError::Gdt { .. })));
}

#[test]
fn types_of_pages_without_frames_stay_xtab() {
    let p2m = [1, u64::MAX, 3 | (1 << 62)];
    let t = dense_types(&p2m, &[(1, 0x1), (0, 0xc)]).unwrap();
    assert_eq!(t, vec![0xc, TYPE_XTAB, TYPE_XTAB]);
}

/// The offsets above match Xen's own structure (built against the
/// installed headers).
#[cfg(feature = "xen")]
#[test]
fn context_offsets_match_xens_headers() {
    use crate::domain::xen::ffi::{cpu_user_regs_x86_64 as R, vcpu_guest_context_x86_64 as C};
    use std::mem::offset_of;
    assert_eq!(std::mem::size_of::<C>(), ctx64::SIZE);
    assert_eq!(offset_of!(C, flags), ctx64::FLAGS);
    // rdx is the 13th register, an anonymous union (rdx/edx) in bindgen's output.
    let rdx = offset_of!(R, __bindgen_anon_13);
    // SAFETY: reads a field of a zeroed plain-data union.
    let u = unsafe { R::default().__bindgen_anon_13.rdx };
    assert_eq!(u, 0);
    assert_eq!(offset_of!(C, user_regs) + rdx, ctx64::RDX);
    assert_eq!(offset_of!(C, gdt_frames), ctx64::GDT_FRAMES);
    assert_eq!(offset_of!(C, gdt_ents), ctx64::GDT_ENTS);
    assert_eq!(offset_of!(C, ctrlreg) + 8, ctx64::CR1);
    assert_eq!(offset_of!(C, ctrlreg) + 24, ctx64::CR3);
}
