//! The backup side for a **PV** guest: the replica built by Xen's own
//! restore from one complete checkpoint.
//!
//! A PV guest's page tables, vCPU context, p2m and start-info page all
//! name machine frames, and Xen's restore (`xg_sr_restore_x86_pv.c`)
//! already knows how to rebuild them in a new domain: populate the
//! physmap, localise each page table pfn → new frame and pin the pinned
//! ones after all pages are in, translate cr3, the GDT frames and the
//! start-info frame, rewrite the guest's p2m pages and its start info
//! (fresh xenstore and console rings and event channels), clear the
//! pending events in shared info, and seed the grant table. So at
//! activation castor writes the checkpoint as a Xen save file
//! ([`stream`](super::stream): page tables normalised against the p2m the
//! checkpoint itself holds) into a pipe that `xl restore -p CONFIG
//! /proc/self/fd/0` reads (no copy of guest RAM on disk); the new domain
//! is left paused until the engine starts it.
//!
//! The guest was stopped inside its own suspend hypercall
//! (`suspend=xenstore`), whose saved return value is 0, "resumed in a new
//! domain": on unpause Linux takes its migration path (re-maps shared
//! info, rebuilds its p2m frame lists, rebinds event channels, reconnects
//! xenstore, the console and its network front end).
//!
//! The activated domain ([`ActivatedPv`]) runs unprotected: it is paused
//! and resumed with `xc_domain_pause`/`unpause` as the engine asks, and
//! its dirty pages are not tracked (a PV domain's p2m is unreadable from
//! outside until the guest has rebuilt its frame lists): re-protecting it
//! is refused, and the memory and state it reports are the checkpoint's.

use std::io::BufWriter;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::domain::domid_of;
use super::replica::ReplicaConfig;
use super::spec::{SuspendMode, Target, XenSpec};
use super::state::XenState;
use super::stream::{self, PvImage, StreamError};
use super::sys::{Xc, XenError};
use super::xl;
use crate::domain::{Domain, DomainError, GuestMemory, Layout};
use crate::PAGE_SIZE;

/// Bound on `xl restore` (it loads every page and, for HVM, starts QEMU;
/// slow under emulation).
const XL_TIMEOUT: Duration = Duration::from_secs(300);

/// Written into the save file's domain header; Xen's restore only logs it.
pub(super) const XEN_VERSION: (u32, u32) = (4, 17);

/// Pipes the save file `write` produces into `xl restore -p CFG_PATH`
/// (bounded by [`XL_TIMEOUT`]; no copy of guest RAM on disk) and finds the
/// domain it left: it must be paused and HVM exactly when `hvm`, else it
/// is destroyed. Returns what `write` reported, the new domid and how long
/// the restore took. `broken_pipe` tells a writer error that only means xl
/// stopped reading (xl's own error is then the one reported).
pub(super) fn xl_restore<W: Send, E: Send + std::fmt::Display>(
    xc: &Xc,
    cfg: &ReplicaConfig,
    cfg_path: &Path,
    hvm: bool,
    write: impl FnOnce(&mut BufWriter<std::process::ChildStdin>) -> Result<W, E> + Send,
    broken_pipe: impl Fn(&E) -> bool,
) -> Result<(W, u32, Duration), XenError> {
    let state = |reason: String| XenError::State { domid: 0, reason };
    let log = std::env::temp_dir().join(format!("castor-replica-{}.xl.log", cfg.name));
    let t0 = Instant::now();
    let c = cfg_path.to_string_lossy();
    let args = ["restore", "-p", &c, "/proc/self/fd/0"];
    let (ran, fed) = xl::run_fed(&xl::program(), &args, &log, XL_TIMEOUT, |stdin| {
        write(&mut BufWriter::with_capacity(1 << 20, stdin))
    })
    .map_err(|e| state(e.to_string()))?;
    let written = match (ran, fed) {
        (Ok(()), Ok(w)) => w,
        (Err(e), Err(f)) if broken_pipe(&f) => return Err(state(e.to_string())),
        (_, Err(e)) => return Err(state(format!("writing the save file for xl: {e}"))),
        (Err(e), Ok(_)) => return Err(state(e.to_string())),
    };
    let took = t0.elapsed();
    let domid = domid_of(xc, &Target::Name(cfg.name.clone()))?;
    let info = xc.info(domid)?;
    if info.hvm() != hvm || !info.paused() {
        let _ = xc.destroy(domid);
        let kind = if hvm { "HVM" } else { "PV" };
        return Err(XenError::State {
            domid,
            reason: format!("`xl restore -p` left a domain that is not a paused {kind} domain"),
        });
    }
    Ok((written, domid, took))
}

/// Builds the PV replica from `memory` and `st`, paused.
pub(super) fn restore_pv(
    xc: &Arc<Xc>,
    spec: &XenSpec,
    cfg: &ReplicaConfig,
    cfg_path: &Path,
    memory: GuestMemory,
    st: &XenState,
) -> Result<ActivatedPv, XenError> {
    let state = |reason: String| XenError::State { domid: 0, reason };
    if st.guest_width != 8 {
        return Err(state(format!(
            "the checkpoint is of a {}-bit PV guest; castor rebuilds 64-bit PV guests",
            st.guest_width * 8
        )));
    }
    let shared_info = st
        .shared_info
        .as_deref()
        .ok_or_else(|| state("the PV checkpoint has no shared-info page".into()))?;
    let img = PvImage {
        // SAFETY: the replica is not written by anyone during activation.
        memory: unsafe { memory.as_slice() },
        p2m_frames: &st.p2m_frames,
        types: &st.pv_types,
        vcpus: &st.vcpus,
        shared_info,
        xen_version: XEN_VERSION,
    };
    let (written, domid, took) = xl_restore(
        xc,
        cfg,
        cfg_path,
        false,
        |w| stream::write_pv(w, &img),
        |e| matches!(e, StreamError::Io(io) if io.kind() == std::io::ErrorKind::BrokenPipe),
    )?;
    let [l1, l2, l3, l4] = written.tables;
    eprintln!(
        "castor: xen replica {:?} is domain {domid}: save file of {} pages ({} with data, \
         page tables L1 {l1} L2 {l2} L3 {l3} L4 {l4}, {} vCPUs, {:.1} MiB) piped to xl, \
         restored by xl in {:.1} s",
        cfg.name,
        written.pages,
        written.data_pages,
        written.vcpus,
        written.bytes as f64 / (1 << 20) as f64,
        took.as_secs_f64()
    );
    Ok(ActivatedPv::restored(
        xc, domid, false, spec, cfg_path, st, memory,
    ))
}

/// The activated PV (or HVM, `restore_hvm.rs`) replica: runs unprotected
/// (see the module doc).
pub(super) struct ActivatedPv {
    pub(super) xc: Arc<Xc>,
    pub(super) domid: u32,
    /// HVM: QEMU, restored by `xl restore -p`, gets a QMP `cont` before the
    /// domain first runs (as `xl unpause` does).
    pub(super) dm_cont: bool,
    pub(super) live: XenSpec,
    /// The checkpoint's state, encoded.
    pub(super) state: Vec<u8>,
    /// Paused by `xl restore -p` or by castor (one count, never stacked).
    pub(super) paused: bool,
    /// The checkpoint it was built from.
    pub(super) mem: GuestMemory,
}

impl ActivatedPv {
    /// The domain `xl restore -p` left paused as `domid` from checkpoint
    /// `st`/`memory`: from now on addressed by domid with
    /// `suspend=pause` (it runs unprotected; see the module doc), its
    /// config at `cfg_path`. `dm_cont`: HVM, QEMU waits for a `cont`.
    pub(super) fn restored(
        xc: &Arc<Xc>,
        domid: u32,
        dm_cont: bool,
        spec: &XenSpec,
        cfg_path: &Path,
        st: &XenState,
        memory: GuestMemory,
    ) -> ActivatedPv {
        let mut state = Vec::new();
        st.encode(&mut state);
        ActivatedPv {
            xc: xc.clone(),
            domid,
            dm_cont,
            live: XenSpec {
                target: Target::Domid(domid),
                suspend: SuspendMode::Pause,
                config: Some(cfg_path.to_path_buf()),
                pages: None,
                cfg: None,
                ..spec.clone()
            },
            state,
            paused: true,
            mem: memory,
        }
    }
}

impl Domain for ActivatedPv {
    fn layout(&self) -> Layout {
        Layout {
            page_size: PAGE_SIZE as u32,
            pages: self.mem.pages(),
        }
    }

    fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    fn describe(&self) -> String {
        format!("xen:{}", self.live)
    }

    fn start(&mut self) -> Result<(), DomainError> {
        self.resume()
    }

    fn pause(&mut self) -> Result<(), DomainError> {
        if !self.paused {
            self.xc.pause(self.domid)?;
            self.paused = true;
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), DomainError> {
        if self.dm_cont {
            super::qmp::DeviceModel::new(self.domid, super::qmp::QMP_TIMEOUT)
                .cont()
                .map_err(super::domain::dm_error)?;
            self.dm_cont = false;
        }
        if self.paused {
            self.xc.unpause(self.domid)?;
            self.paused = false;
        }
        Ok(())
    }

    /// Not tracked: the activated PV domain is not checkpointed.
    fn harvest_dirty(&mut self, _out: &mut Vec<u64>) -> Result<(), DomainError> {
        Ok(())
    }

    fn present_pages(&self, _out: &mut Vec<u64>) -> Result<bool, DomainError> {
        Err(DomainError::Spec {
            spec: self.describe(),
            reason: "re-protecting an activated PV or HVM Xen domain is not supported (its \
                     dirty pages are not tracked)"
                .into(),
        })
    }

    fn save_state(&mut self, out: &mut Vec<u8>) -> Result<(), DomainError> {
        out.extend_from_slice(&self.state);
        Ok(())
    }
}

impl Drop for ActivatedPv {
    /// Leaves the guest running, as [`super::domain::XenDomain`] does.
    fn drop(&mut self) {
        if self.dm_cont {
            let mut dm = super::qmp::DeviceModel::new(self.domid, super::qmp::QMP_TIMEOUT);
            if let Err(e) = dm.cont() {
                tracing::error!(
                    "domain {}: device model may be left stopped: {e}",
                    self.domid
                );
            }
        }
        if self.paused {
            if let Err(e) = self.xc.unpause(self.domid) {
                tracing::error!("domain {} may be left paused: {e}", self.domid);
            }
        }
    }
}
