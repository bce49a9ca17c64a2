//! [`XenDomain`]: a running Xen guest driven through the [`Domain`] trait.
//!
//! Call order, as Xen's checkpointed save does it (xg_sr_save.c):
//! open pauses the guest, turns log-dirty on (`enable_logdirty`, with the
//! shadow-off retry) and maps all of its memory; `start` unpauses it and the
//! engine copies every present page while it runs (pages it writes
//! meanwhile are in the next harvest). Each epoch then: `pause` suspends
//! the guest (`suspend.rs`); `harvest_dirty` takes the log-dirty bitmap
//! with `CLEAN | LOGDIRTY_FINAL` (final: the guest is stopped, nothing can
//! race the read) and the scanner pool turns it into frame numbers;
//! `save_state` reads vCPU contexts (PV) or the HVM context and params;
//! `resume` resumes with `xc_domain_resume(fast=1)`.
//!
//! Invariants:
//! - `frames[g]` is the frame mapped at page `g` of `mem` (PV: the machine
//!   frame from the guest's p2m; HVM: `g` itself). A PV guest that changes
//!   its p2m writes one of its p2m pages; when a harvest reports such a
//!   page, the p2m is re-read from `mem` and the changed pages remapped
//!   before the engine copies them.
//! - Dropping the domain leaves the guest running, with log-dirty off.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::batch;
use super::config;
use super::ffi;
use super::map::{self, PvP2m};
use super::qmp::{self, DeviceModel};
use super::scan::ScanPool;
use super::spec::{Target, XenSpec};
use super::state::{XenState, EMULATOR_QEMU_XEN};
use super::suspend::Suspender;
use super::sys::{Bitmap, DomInfo, Foreign, Result, Store, Xc, XenError};
use super::types::PageTypes;
use super::unlogged::Unlogged;
use crate::domain::{Domain, DomainError, GuestMemory, Layout};
use crate::PAGE_SIZE;

/// HVM params a checkpoint carries (the ones Xen's HVM save sends that
/// describe guest-visible placement of special pages and features).
const HVM_PARAMS: &[u32] = &[
    ffi::HVM_PARAM_STORE_PFN,
    ffi::HVM_PARAM_IOREQ_PFN,
    ffi::HVM_PARAM_BUFIOREQ_PFN,
    ffi::HVM_PARAM_PAGING_RING_PFN,
    ffi::HVM_PARAM_MONITOR_RING_PFN,
    ffi::HVM_PARAM_SHARING_RING_PFN,
    ffi::HVM_PARAM_VM86_TSS_SIZED,
    ffi::HVM_PARAM_CONSOLE_PFN,
    ffi::HVM_PARAM_ACPI_IOPORTS_LOCATION,
    ffi::HVM_PARAM_VIRIDIAN,
    ffi::HVM_PARAM_IDENT_PT,
    ffi::HVM_PARAM_VM_GENERATION_ID_ADDR,
    ffi::HVM_PARAM_IOREQ_SERVER_PFN,
    ffi::HVM_PARAM_NR_IOREQ_SERVER_PAGES,
    ffi::HVM_PARAM_X87_FIP_WIDTH,
    ffi::HVM_PARAM_MCA_CAP,
];

/// Who stopped the guest, so that `pause` and `resume` are idempotent as
/// the engine expects (it pauses an already paused domain when a session
/// begins). Xen's own pause is counted: two `xc_domain_pause` need two
/// unpauses, so castor must never stack them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Run {
    /// Paused by `open` (one `xc_domain_pause`), never let run yet.
    Opened,
    /// Stopped by the suspender at the end of an epoch.
    Stopped,
    Running,
}

/// The guest-facing parts of each pause the engine cannot see apart: the
/// engine's pause time includes them, plus harvest, copy and state.
#[derive(Default)]
struct PauseTimes {
    suspend: Samples,
    resume: Samples,
    /// QEMU's device-state save (HVM with a device model), inside the pause.
    device: Samples,
}

/// Durations in µs, at most [`Samples::MAX`] kept (the first ones).
#[derive(Default)]
struct Samples(Vec<u64>);

impl Samples {
    const MAX: usize = 1 << 16;

    fn push(&mut self, d: Duration) {
        if self.0.len() < Self::MAX {
            self.0.push(d.as_micros() as u64);
        }
    }

    /// "p50 A p99 B max C µs (n=N)", or None without samples.
    fn describe(&self) -> Option<String> {
        let mut v = self.0.clone();
        v.sort_unstable();
        let at = |q: usize| v[(v.len() - 1) * q / 100];
        let max = *v.last()?;
        Some(format!(
            "p50 {} p99 {} max {max} µs (n={})",
            at(50),
            at(99),
            v.len()
        ))
    }
}

impl PauseTimes {
    fn summary(&self) -> Option<String> {
        let s = self.suspend.describe()?;
        let r = self.resume.describe().unwrap_or_else(|| "none".into());
        match self.device.describe() {
            Some(d) => Some(format!("suspend {s}; resume {r}; device model save {d}")),
            None => Some(format!("suspend {s}; resume {r}")),
        }
    }
}

pub struct XenDomain {
    spec: XenSpec,
    xc: Arc<Xc>,
    fm: Foreign,
    info: DomInfo,
    width: u32,
    bitmap: Bitmap,
    pool: ScanPool,
    suspender: Suspender,
    frames: Vec<u64>,
    /// PV: pfn of each p2m page, in table order (empty for HVM).
    p2m_pfns: Vec<u64>,
    /// The same pfns sorted, for membership tests in harvest.
    p2m_sorted: Vec<u64>,
    shinfo: Option<GuestMemory>,
    /// PV: every pfn's page type, current as of the last harvest.
    types: Option<PageTypes>,
    run: Run,
    /// How long each suspend and resume took (reported when dropped).
    times: PauseTimes,
    /// `CASTOR_XEN_CHECK_UNLOGGED=1`: log-dirty checked against a copy.
    unlogged: Option<Unlogged>,
    /// HVM with a QEMU device model: its state joins every checkpoint.
    dm: Option<DeviceModel>,
    /// The device model was stopped by `save_state` and not yet continued.
    dm_stopped: bool,
    /// HVM: the physmap's layout beyond the replicated pages.
    hvm_layout: HvmLayout,
    /// Declared last: unmapped after everything that may read it.
    mem: GuestMemory,
}

pub(super) fn domid_of(xc: &Xc, target: &Target) -> Result<u32> {
    let name = match target {
        Target::Domid(d) => return Ok(*d),
        Target::Name(n) => n,
    };
    let store = Store::open()?;
    for d in xc.list(1, 4096)? {
        let path = format!("/local/domain/{}/name", d.domid);
        if store.read(&path)?.as_deref() == Some(name.as_str()) {
            return Ok(d.domid);
        }
    }
    Err(XenError::NoSuchName(name.clone()))
}

fn uuid(h: &[u8; 16]) -> String {
    let x: Vec<String> = h.iter().map(|b| format!("{b:02x}")).collect();
    let x = x.concat();
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..]
    )
}

/// The guest's config: the xl file the spec names, else what libxl keeps
/// as the domain's userdata: the "xl" text when the toolstack stored it,
/// else the "libxl-json" domain config (what xl 4.17 stores).
fn config_text(spec: &XenSpec, info: &DomInfo) -> std::result::Result<String, DomainError> {
    let base = format!(
        "/var/lib/xen/userdata-d.{}.{}",
        info.domid,
        uuid(&info.handle)
    );
    let paths: Vec<std::path::PathBuf> = match &spec.config {
        Some(p) => vec![p.clone()],
        None => vec![
            format!("{base}.xl").into(),
            format!("{base}.libxl-json").into(),
        ],
    };
    let mut tried = Vec::new();
    for p in &paths {
        match std::fs::read_to_string(p) {
            Ok(t) => return Ok(t),
            Err(e) => tried.push(format!("{}: {e}", p.display())),
        }
    }
    Err(DomainError::Spec {
        spec: format!("xen:{spec}"),
        reason: format!(
            "no config for the guest ({}); the backup needs it to build the replica: \
             give config=PATH",
            tried.join("; ")
        ),
    })
}

/// HVM/PVH physmaps put special pages just below 4 GiB, far above RAM: the
/// replicated layout stops at a gap of this many hole pages (64 MiB).
const SPECIAL_GAP: usize = 16384;

/// What an HVM checkpoint carries about gfns it does not copy: the
/// populated gfns above the layout (special pages) and the holes inside it.
#[derive(Default, Clone)]
struct HvmLayout {
    special: Vec<u64>,
    holes: Vec<(u64, u64)>,
}

/// Maps the guest; holes are marked invalid in the returned frames so the
/// initial copy skips them. For HVM, the layout ends before the big gap
/// below the special pages (mapped twice: once to find the holes, once
/// for the layout kept; privcmd mappings cannot be cut afterwards).
fn map_guest(
    fm: &Foreign,
    domid: u32,
    mut frames: Vec<u64>,
    hvm: bool,
) -> Result<(GuestMemory, Vec<u64>, usize, HvmLayout)> {
    let (mut mem, mut holes) = map::map_frames(fm, domid, &frames, u64::MAX, libc::PROT_READ)?;
    let mut layout = HvmLayout::default();
    if hvm {
        let end = batch::layout_end(&holes, frames.len(), SPECIAL_GAP);
        if end < frames.len() {
            layout.special = batch::populated_from(&holes, end, frames.len());
            let dropped = frames.len()
                - end
                - holes
                    .iter()
                    .map(|h| h.end.min(frames.len()).saturating_sub(h.start.max(end)))
                    .sum::<usize>();
            eprintln!(
                "castor: xen domain {domid}: replicating gfns 0..{end}; {dropped} special pages \
                 above (xenstore/console rings) are not replicated"
            );
            drop(mem);
            frames.truncate(end);
            (mem, holes) = map::map_frames(fm, domid, &frames, u64::MAX, libc::PROT_READ)?;
        }
    }
    for h in &holes {
        frames[h.clone()].fill(u64::MAX);
    }
    let n = holes.iter().map(|h| h.len()).sum();
    if hvm {
        layout.holes = batch::merged(&holes);
    }
    Ok((mem, frames, n, layout))
}

impl XenDomain {
    pub fn open(spec: &XenSpec) -> std::result::Result<XenDomain, DomainError> {
        Self::open_sized(spec, None)
    }

    /// `open`, for an HVM/PVH guest whose RAM is known to be gfns
    /// `0..pages` (the backup's replica domain, built to the primary's
    /// layout): the physmap is not searched for its end, which maps the
    /// whole space below the special pages (about a million gfns; minutes
    /// under emulation).
    pub(super) fn open_sized(
        spec: &XenSpec,
        pages: Option<u64>,
    ) -> std::result::Result<XenDomain, DomainError> {
        let xc = Xc::open()?;
        let domid = domid_of(&xc, &spec.target)?;
        let info = xc.info(domid)?;
        if info.dying() || info.shutdown_reason().is_some() {
            return Err(XenError::State {
                domid,
                reason: "is shutting down or dying; castor protects a running guest".into(),
            }
            .into());
        }
        let mut spec = spec.clone();
        spec.cfg =
            Some(
                config::pack(&config_text(&spec, &info)?).map_err(|e| DomainError::Spec {
                    spec: format!("xen:{spec}"),
                    reason: e.to_string(),
                })?,
            );
        xc.pause(domid)?;
        match Self::arm(spec, xc.clone(), info, pages) {
            Ok(d) => Ok(d),
            Err(e) => {
                let _ = xc.disable_logdirty(domid);
                let _ = xc.unpause(domid);
                Err(e)
            }
        }
    }

    /// With the guest paused: log-dirty on, memory mapped, suspend path
    /// chosen.
    fn arm(
        mut spec: XenSpec,
        xc: Arc<Xc>,
        info: DomInfo,
        pages: Option<u64>,
    ) -> std::result::Result<XenDomain, DomainError> {
        let domid = info.domid;
        xc.enable_logdirty(domid)?;
        let fm = Foreign::open()?;
        let width = xc.guest_width(domid)?;
        let (frames, table, shinfo) = if info.hvm() {
            let n = match pages {
                Some(p) => p,
                None => xc.max_gpfn(domid)? + 1,
            };
            ((0..n).collect::<Vec<u64>>(), Vec::new(), None)
        } else {
            if width != 8 {
                return Err(XenError::State {
                    domid,
                    reason: format!(
                        "is a {}-bit PV guest; castor reads 64-bit PV guests",
                        width * 8
                    ),
                }
                .into());
            }
            let (sh, _) = map::map_frames(
                &fm,
                domid,
                &[info.shared_info_frame],
                u64::MAX,
                libc::PROT_READ,
            )?;
            // SAFETY: a private read-only view of the shared-info page.
            let PvP2m {
                frames,
                table_frames,
            } = map::read_pv_p2m(&fm, domid, unsafe { sh.as_slice() })?;
            (frames, table_frames, Some(sh))
        };
        let (mem, frames, holes, hvm_layout) = map_guest(&fm, domid, frames, info.hvm())?;
        let dm = (info.hvm() && qmp::has_device_model(domid))
            .then(|| DeviceModel::new(domid, qmp::QMP_TIMEOUT));
        let p2m_pfns = table
            .iter()
            .filter_map(|m| frames.iter().position(|f| f == m).map(|p| p as u64))
            .collect::<Vec<u64>>();
        let mut p2m_sorted = p2m_pfns.clone();
        p2m_sorted.sort_unstable();
        let bitmap = Bitmap::new(&xc, domid, frames.len() as u64)?;
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let pool = ScanPool::new(spec.scanners, &cores).map_err(|source| DomainError::Sys {
            op: "spawning the dirty-bitmap scanners",
            source,
        })?;
        let suspender = Suspender::new(&xc, &info, spec.suspend, spec.suspend_timeout)?;
        spec.pages = Some(frames.len() as u64);
        let unlogged = Unlogged::from_env(&mem);
        let types = if info.hvm() {
            None
        } else {
            super::ptcheck::from_env(&xc, domid, &frames, &mem);
            Some(PageTypes::read_all(&xc, domid, &frames)?)
        };
        eprintln!(
            "castor: xen domain {domid} ({}, {} pages, {holes} holes, {} vCPUs, shared info at {:#x}), \
             suspend via {}",
            match (info.hvm(), dm.is_some()) {
                (true, true) => "HVM, QEMU device model carried",
                (true, false) => "HVM",
                _ => "PV",
            },
            frames.len(),
            info.max_vcpu_id + 1,
            info.shared_info_frame,
            suspender.name()
        );
        Ok(XenDomain {
            spec,
            xc,
            fm,
            info,
            width,
            bitmap,
            pool,
            suspender,
            frames,
            p2m_pfns,
            p2m_sorted,
            shinfo,
            types,
            run: Run::Opened,
            times: PauseTimes::default(),
            unlogged,
            dm,
            dm_stopped: false,
            hvm_layout,
            mem,
        })
    }

    /// Re-reads a PV guest's p2m from its own (mapped) p2m pages and
    /// remaps the pages whose machine frame changed.
    fn refresh_p2m(&mut self) -> Result<()> {
        let domid = self.info.domid;
        let mut new = Vec::with_capacity(self.frames.len());
        let per = PAGE_SIZE / 8;
        for &pfn in &self.p2m_pfns {
            let mut page = [0u8; PAGE_SIZE];
            self.mem.read_page(pfn, &mut page);
            for e in page.chunks_exact(8).take(per) {
                if new.len() == self.frames.len() {
                    break;
                }
                new.push(u64::from_le_bytes(e.try_into().expect("8 bytes")));
            }
        }
        if new.len() != self.frames.len() {
            return Err(XenError::State {
                domid,
                reason: format!(
                    "p2m re-read gave {} entries, not {}",
                    new.len(),
                    self.frames.len()
                ),
            });
        }
        let n = map::remap(&self.fm, domid, &self.mem, &self.frames, &new, u64::MAX)?;
        if n > 0 {
            tracing::info!("domain {domid}: p2m changed, remapped {n} pages");
        }
        self.frames = new;
        Ok(())
    }

    /// HVM/PVH: the hypervisor writes the shared-info page (event and time
    /// fields) through its own mapping, which log-dirty never sees, and the
    /// guest maps that page over one of its RAM gfns (Linux: a low one).
    /// The domain info names that gfn; it joins every harvest inside the
    /// pause (kept sorted and unique from `from` on).
    fn add_shared_info(&self, out: &mut Vec<u64>, from: usize) -> Result<()> {
        let gfn = self.xc.info(self.info.domid)?.shared_info_frame;
        if gfn < self.frames.len() as u64 {
            if let Err(at) = out[from..].binary_search(&gfn) {
                out.insert(from + at, gfn);
            }
        }
        Ok(())
    }

    fn state(&self) -> Result<XenState> {
        let domid = self.info.domid;
        let mut st = XenState {
            hvm: self.info.hvm(),
            guest_width: self.width,
            ..Default::default()
        };
        if st.hvm {
            st.hvm_context = Some(self.xc.hvm_context(domid)?);
            for &p in HVM_PARAMS {
                // A param the hypervisor does not know is left out, as
                // Xen's own save skips zero params.
                if let Ok(v) = self.xc.hvm_param(domid, p) {
                    if v != 0 {
                        st.hvm_params.push((p, v));
                    }
                }
            }
            st.special_pfns = self.hvm_layout.special.clone();
            st.holes = self.hvm_layout.holes.clone();
        } else {
            for v in 0..=self.info.max_vcpu_id {
                st.vcpus.push((v, self.xc.vcpu_context(domid, v)?));
            }
            if let Some(sh) = &self.shinfo {
                // SAFETY: the guest is stopped; a one-page private mapping.
                st.shared_info = Some(unsafe { sh.as_slice() }[..PAGE_SIZE].to_vec());
            }
            st.pv_types = self
                .types
                .as_ref()
                .map(PageTypes::listed)
                .unwrap_or_default();
            st.p2m_frames = self.p2m_pfns.clone();
        }
        Ok(st)
    }
}

impl Domain for XenDomain {
    fn layout(&self) -> Layout {
        Layout {
            page_size: PAGE_SIZE as u32,
            pages: self.frames.len() as u64,
        }
    }

    fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    fn describe(&self) -> String {
        format!("xen:{}", self.spec)
    }

    fn start(&mut self) -> std::result::Result<(), DomainError> {
        self.resume()
    }

    /// Stops the guest unless it is stopped already.
    fn pause(&mut self) -> std::result::Result<(), DomainError> {
        if self.run == Run::Running {
            let t = Instant::now();
            self.suspender.suspend()?;
            self.times.suspend.push(t.elapsed());
            self.run = Run::Stopped;
        }
        Ok(())
    }

    /// Lets the guest run: the first time by undoing `open`'s pause, later
    /// through the suspender; a running guest is left alone.
    fn resume(&mut self) -> std::result::Result<(), DomainError> {
        match self.run {
            Run::Opened => self.xc.unpause(self.info.domid)?,
            Run::Stopped => {
                let t = Instant::now();
                // As libxl's resume: the device model first, then the domain.
                self.cont_device_model()?;
                self.suspender.resume()?;
                self.times.resume.push(t.elapsed());
            }
            Run::Running => return Ok(()),
        }
        self.run = Run::Running;
        Ok(())
    }

    fn harvest_dirty(&mut self, out: &mut Vec<u64>) -> std::result::Result<(), DomainError> {
        let domid = self.info.domid;
        // FINAL (the hypervisor also marks the frames it keeps mapped for
        // writing) only with the guest stopped, as Xen's save does.
        let stopped = self.run != Run::Running;
        self.xc.logdirty_clean(domid, &mut self.bitmap, stopped)?;
        let from = out.len();
        self.pool.scan(self.bitmap.words(), self.bitmap.bits(), out);
        if stopped && self.info.hvm() {
            self.add_shared_info(out, from)?;
        }
        if let Some(u) = &mut self.unlogged {
            u.reported(&out[from..]);
            if stopped {
                u.check(&self.mem);
            }
        }
        let p2m_touched = !self.p2m_sorted.is_empty()
            && out[from..]
                .iter()
                .any(|g| self.p2m_sorted.binary_search(g).is_ok());
        if p2m_touched {
            self.refresh_p2m()?;
        }
        if let Some(t) = &mut self.types {
            t.refresh(&self.xc, domid, &self.frames, &out[from..])?;
        }
        Ok(())
    }

    fn present_pages(&self, out: &mut Vec<u64>) -> std::result::Result<bool, DomainError> {
        out.extend((0..self.frames.len() as u64).filter(|&g| self.frames[g as usize] != u64::MAX));
        Ok(true)
    }

    fn save_state(&mut self, out: &mut Vec<u8>) -> std::result::Result<(), DomainError> {
        let mut st = self.state()?;
        if let Some(dm) = &mut self.dm {
            let t = Instant::now();
            self.dm_stopped = true;
            let blob = dm.save().map_err(dm_error)?;
            self.times.device.push(t.elapsed());
            st.device_model = Some((EMULATOR_QEMU_XEN, blob));
        }
        st.encode(out);
        Ok(())
    }
}

impl Drop for XenDomain {
    fn drop(&mut self) {
        let domid = self.info.domid;
        if let Some(line) = self.times.summary() {
            eprintln!(
                "castor: xen domain {domid} via {}: {line}",
                self.suspender.name()
            );
        }
        if let Err(e) = self.xc.disable_logdirty(domid) {
            tracing::warn!("domain {domid}: {e}");
        }
        if let Err(e) = self.cont_device_model() {
            tracing::error!("domain {domid}: device model may be left stopped: {e}");
        }
        let r = match self.run {
            Run::Opened => self.xc.unpause(domid),
            Run::Stopped => self.suspender.recover(),
            Run::Running => Ok(()),
        };
        if let Err(e) = r {
            tracing::error!("domain {domid} may be left stopped: {e}");
        }
    }
}

impl XenDomain {
    /// `cont` to a device model `save_state` stopped.
    fn cont_device_model(&mut self) -> std::result::Result<(), DomainError> {
        if let (true, Some(dm)) = (self.dm_stopped, &mut self.dm) {
            dm.cont().map_err(dm_error)?;
            self.dm_stopped = false;
        }
        Ok(())
    }
}

pub(super) fn dm_error(e: qmp::QmpError) -> DomainError {
    DomainError::Sys {
        op: "xen device model",
        source: std::io::Error::other(e),
    }
}

impl From<XenError> for DomainError {
    fn from(e: XenError) -> Self {
        DomainError::Sys {
            op: "xen domain",
            source: std::io::Error::other(e),
        }
    }
}
