//! The backup side: building the replica domain at activation (PVH here;
//! a PV checkpoint goes to `restore_pv.rs`, an HVM one with a device model
//! to `restore_hvm.rs`, both through Xen's own restore).
//!
//! Chosen point: at activation, not at each commit. The engine already
//! keeps checkpoint N atomically in the backup's replica image (staged,
//! then committed whole), so writing every commit into a paused Xen domain
//! too would double the backup's work per epoch and need a second staging
//! step to stay atomic; at activation the image is complete by definition.
//! The price is the build time inside the failover (measured, docs/xen.md).
//!
//! Call order (learned from libxl's restore and `xg_sr_restore_x86_hvm.c`,
//! where the toolstack builds the domain and the stream fills it):
//! 1. `xl create -p` from the carried xl config (`replica.rs`): the domain
//!    with its physmap populated, special pages cleared, fresh xenstore and
//!    console event channels, grant table seeded, devices added; paused.
//! 2. Guest RAM (gfns `0..pages`) written from the replica through a
//!    writable foreign mapping; gfns the new domain lacks are skipped (a
//!    non-zero replica page there is reported).
//! 3. The carried HVM params that differ (special-page gfns must agree).
//! 4. `xc_domain_hvm_setcontext` (vCPUs, LAPIC, timers, ...), last, as
//!    Xen's `x86_hvm_stream_complete` does.
//! 5. The domain is opened as an ordinary [`XenDomain`] (log-dirty, mapped
//!    memory, `suspend=pause`: the activated copy is not checkpointed
//!    unless re-protected) and left paused until `start`.
//!
//! A guest checkpointed with `suspend=xenstore` was stopped inside its own
//! suspend hypercall, whose saved return value is 0 ("resumed in a new
//! domain"): on unpause it re-maps shared info and grant frames, rebinds
//! its event channels and reconnects xenstore and the console to the new
//! domain's rings, as after a migration. A `suspend=pause` checkpoint has
//! no such point: its guest would keep using the old domain's event
//! channels and grants (refused with an error below).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::domain::{domid_of, XenDomain};
use super::map;
use super::replica::{self, ReplicaConfig};
use super::spec::{SuspendMode, Target, XenSpec};
use super::state::XenState;
use super::sys::{Foreign, Xc, XenError};
use super::xl;
use crate::domain::{Domain, DomainError, GuestMemory};
use crate::PAGE_SIZE;

/// Bound on `xl create -p` (it loads the guest's kernel, which the replica
/// then overwrites; slow under emulation).
const XL_TIMEOUT: Duration = Duration::from_secs(300);

pub fn restore(
    spec: &XenSpec,
    memory: GuestMemory,
    state: &[u8],
) -> Result<Box<dyn Domain>, DomainError> {
    let err = |reason: String| DomainError::Spec {
        spec: format!("xen:{spec}"),
        reason,
    };
    let st = XenState::decode(state).map_err(|e| err(e.to_string()))?;
    let text = spec
        .config_text()
        .ok_or_else(|| err("the checkpoint carries no xl config (cfg=)".into()))?;
    let name = match &spec.target {
        Target::Name(n) => Some(n.as_str()),
        Target::Domid(_) => None,
    };
    let cfg = replica::replica_config(&text, name).map_err(|e| err(e.to_string()))?;
    if st.hvm != (cfg.kind != "pv") {
        return Err(err(format!(
            "the checkpoint is of a{} guest but the carried config says type = {:?}",
            if st.hvm { "n HVM/PVH" } else { " PV" },
            cfg.kind
        )));
    }
    if spec.suspend == SuspendMode::Pause {
        return Err(err(
            "the primary checkpointed with suspend=pause: its guest never went through its \
             suspend path, so in a new domain it would keep the old domain's event channels \
             and grants; protect with suspend=xenstore (or auto) for a failover"
                .into(),
        ));
    }
    if let Some(p) = spec.pages {
        if p != memory.pages() {
            return Err(err(format!(
                "replica holds {} pages, the primary announced {p}",
                memory.pages()
            )));
        }
    }
    let xc = Xc::open()?;
    if domid_of(&xc, &Target::Name(cfg.name.clone())).is_ok() {
        return Err(err(format!(
            "a domain named {:?} still runs on this host: the primary must be fenced \
             (--fence-cmd 'xl destroy {}') before its replica is built",
            cfg.name, cfg.name
        )));
    }
    let path = write_config(&cfg).map_err(|e| err(e.to_string()))?;
    if !st.hvm {
        let d = super::restore_pv::restore_pv(&xc, spec, &cfg, &path, memory, &st)
            .map_err(|e| err(e.to_string()))?;
        return Ok(Box::new(d));
    }
    if cfg.kind == "hvm" {
        let d = super::restore_hvm::restore_hvm(&xc, spec, &cfg, &path, memory, &st)
            .map_err(|e| err(e.to_string()))?;
        return Ok(Box::new(d));
    }
    let t0 = Instant::now();
    let domid = create_paused(&xc, &cfg, &path).map_err(|e| err(e.to_string()))?;
    let built = t0.elapsed();
    let t1 = Instant::now();
    if let Err(e) = load(&xc, domid, &memory, &st) {
        let _ = xc.destroy(domid);
        return Err(e.into());
    }
    let loaded = t1.elapsed();
    let pages = memory.pages();
    drop(memory);
    let live = XenSpec {
        target: Target::Domid(domid),
        suspend: SuspendMode::Pause,
        config: Some(path),
        pages: None,
        cfg: None,
        ..spec.clone()
    };
    let domain = match XenDomain::open_sized(&live, Some(pages)) {
        // open's own pause holds the guest; drop the one `xl create -p` left.
        Ok(d) => xc.unpause(domid).map(|()| d),
        Err(e) => {
            let _ = xc.destroy(domid);
            return Err(e);
        }
    };
    let domain = domain.inspect_err(|_| {
        let _ = xc.destroy(domid);
    })?;
    eprintln!(
        "castor: xen replica {:?} is domain {domid}: built by xl in {:.1} s, memory and \
         state loaded in {:.1} s",
        cfg.name,
        built.as_secs_f64(),
        loaded.as_secs_f64()
    );
    Ok(Box::new(domain))
}

/// Writes the replica's xl config into the temporary directory; returns
/// its path.
fn write_config(cfg: &ReplicaConfig) -> Result<PathBuf, XenError> {
    let path = std::env::temp_dir().join(format!("castor-replica-{}.cfg", cfg.name));
    std::fs::write(&path, &cfg.text).map_err(|e| XenError::State {
        domid: 0,
        reason: format!("writing {}: {e}", path.display()),
    })?;
    Ok(path)
}

/// Runs `xl create -p` on the written config; returns the new domain's id.
fn create_paused(xc: &Xc, cfg: &ReplicaConfig, path: &Path) -> Result<u32, XenError> {
    let log = std::env::temp_dir().join(format!("castor-replica-{}.xl.log", cfg.name));
    let state = |reason: String| XenError::State { domid: 0, reason };
    let p = path.to_string_lossy();
    xl::run(&xl::program(), &["create", "-p", &p], &log, XL_TIMEOUT)
        .map_err(|e| state(e.to_string()))?;
    domid_of(xc, &Target::Name(cfg.name.clone()))
}

/// Steps 2–4 on the paused new domain.
fn load(xc: &Xc, domid: u32, memory: &GuestMemory, st: &XenState) -> Result<(), XenError> {
    let info = xc.info(domid)?;
    if !info.hvm() || !info.paused() {
        return Err(XenError::State {
            domid,
            reason: format!(
                "the new domain is {} and {}; a paused PVH domain was expected",
                if info.hvm() { "HVM" } else { "PV" },
                if info.paused() { "paused" } else { "running" }
            ),
        });
    }
    write_pages(domid, memory)?;
    let plan =
        replica::param_plan(&st.hvm_params, |p| xc.hvm_param(domid, p).ok()).map_err(|e| {
            XenError::State {
                domid,
                reason: e.to_string(),
            }
        })?;
    for (p, v) in plan {
        xc.set_hvm_param(domid, p, v).map_err(|e| XenError::State {
            domid,
            reason: format!("HVM param {p} = {v:#x}: {e}"),
        })?;
    }
    let mut ctx = st.hvm_context.clone().ok_or_else(|| XenError::State {
        domid,
        reason: "the checkpoint has no HVM context".into(),
    })?;
    xc.set_hvm_context(domid, &mut ctx)
}

/// Copies the replica's pages into the new domain's RAM.
fn write_pages(domid: u32, memory: &GuestMemory) -> Result<(), XenError> {
    let fm = Foreign::open()?;
    let frames: Vec<u64> = (0..memory.pages()).collect();
    let (dst, holes) = map::map_frames(
        &fm,
        domid,
        &frames,
        u64::MAX,
        libc::PROT_READ | libc::PROT_WRITE,
    )?;
    let mut hole = vec![false; frames.len()];
    for h in &holes {
        hole[h.clone()].fill(true);
    }
    for (g, _) in hole.iter().enumerate().filter(|(_, &h)| !h) {
        // SAFETY: page g lies in both mappings (same page count); `dst` is
        // writable there (mapped, not a hole) and the domain is paused;
        // `memory` is the backup's replica, which nothing else writes now.
        unsafe {
            std::ptr::copy_nonoverlapping(
                memory.page_ptr(g as u64),
                dst.page_ptr(g as u64),
                PAGE_SIZE,
            )
        };
    }
    // SAFETY: the replica is not written by anyone during activation.
    let lost = replica::lost_pages(unsafe { memory.as_slice() }, &holes);
    if !lost.is_empty() {
        eprintln!(
            "castor: xen replica domain {domid}: {} non-zero replica pages have no RAM in the \
             new domain (first gfn {:#x}); left out",
            lost.len(),
            lost[0]
        );
    }
    Ok(())
}
