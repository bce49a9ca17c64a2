//! The backup side for an **HVM** guest with a QEMU device model: the
//! replica built by Xen's own restore from one complete checkpoint.
//!
//! The checkpoint holds the guest's RAM, its HVM context and params, the
//! gfns of its special pages and holes, and QEMU's device state (saved by
//! the primary inside each pause, `qmp.rs`). At activation castor writes
//! it as a Xen save file ([`stream_hvm`](super::stream_hvm)) into a pipe
//! that `xl restore -p CONFIG /proc/self/fd/0` reads: libxl creates the
//! domain, libxc populates and fills its physmap, sets the params and the
//! HVM context, seeds the grant table, and libxl starts QEMU with the
//! carried device state. The domain is left paused; the engine's first
//! resume sends QEMU `cont` and unpauses it (what `xl unpause` does).
//!
//! As for PV and PVH, the checkpoint must come from `suspend=xenstore`:
//! the guest, stopped inside its own suspend hypercall, resumes through
//! its migration path (re-maps shared info and grants, rebinds event
//! channels, reconnects xenstore and its PV network front end). The
//! activated domain runs unprotected ([`ActivatedPv`]).

use std::io::BufWriter;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::domain::domid_of;
use super::replica::ReplicaConfig;
use super::restore_pv::ActivatedPv;
use super::spec::{Target, XenSpec};
use super::state::XenState;
use super::stream::StreamError;
use super::stream_hvm::{self, HvmImage, HvmStreamError};
use super::sys::{Xc, XenError};
use super::xl;
use crate::domain::GuestMemory;

/// Bound on `xl restore` (it loads every page and starts QEMU; slow under
/// emulation).
const XL_TIMEOUT: Duration = Duration::from_secs(300);

/// Written into the save file's domain header; Xen's restore only logs it.
const XEN_VERSION: (u32, u32) = (4, 17);

/// Builds the HVM replica from `memory` and `st`, paused.
pub(super) fn restore_hvm(
    xc: &Arc<Xc>,
    spec: &XenSpec,
    cfg: &ReplicaConfig,
    cfg_path: &Path,
    memory: GuestMemory,
    st: &XenState,
) -> Result<ActivatedPv, XenError> {
    let state = |reason: String| XenError::State { domid: 0, reason };
    let (id, blob) = st.device_model.as_ref().ok_or_else(|| {
        state(
            "the HVM checkpoint carries no QEMU device state (the primary found no \
             qmp-libxl socket for its guest)"
                .into(),
        )
    })?;
    let ctx = st
        .hvm_context
        .as_deref()
        .ok_or_else(|| state("the HVM checkpoint has no HVM context".into()))?;
    let log = std::env::temp_dir().join(format!("castor-replica-{}.xl.log", cfg.name));
    let img = HvmImage {
        // SAFETY: the replica is not written by anyone during activation.
        memory: unsafe { memory.as_slice() },
        holes: &st.holes,
        special: &st.special_pfns,
        hvm_context: ctx,
        hvm_params: &st.hvm_params,
        device_model: (*id, blob),
        xen_version: XEN_VERSION,
    };
    let t0 = Instant::now();
    let c = cfg_path.to_string_lossy();
    let args = ["restore", "-p", &c, "/proc/self/fd/0"];
    let (ran, fed) = xl::run_fed(&xl::program(), &args, &log, XL_TIMEOUT, |stdin| {
        stream_hvm::write_hvm(&mut BufWriter::with_capacity(1 << 20, stdin), &img)
    })
    .map_err(|e| state(e.to_string()))?;
    let written = match (ran, fed) {
        (Ok(()), Ok(w)) => w,
        (Err(e), Err(HvmStreamError::Stream(StreamError::Io(io))))
            if io.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            return Err(state(e.to_string()))
        }
        (_, Err(e)) => return Err(state(format!("writing the save file for xl: {e}"))),
        (Err(e), Ok(_)) => return Err(state(e.to_string())),
    };
    let domid = domid_of(xc, &Target::Name(cfg.name.clone()))?;
    let info = xc.info(domid)?;
    if !info.hvm() || !info.paused() {
        let _ = xc.destroy(domid);
        return Err(XenError::State {
            domid,
            reason: "`xl restore -p` left a domain that is not a paused HVM domain".into(),
        });
    }
    eprintln!(
        "castor: xen replica {:?} is domain {domid}: HVM save file of {} pages ({} hole \
         pages left out, {} special pages zeroed, QEMU state {} bytes, {:.1} MiB) piped to xl, \
         restored by xl in {:.1} s",
        cfg.name,
        written.pages,
        written.hole_pages,
        written.special,
        written.device_model,
        written.bytes as f64 / (1 << 20) as f64,
        t0.elapsed().as_secs_f64()
    );
    Ok(ActivatedPv::restored(
        xc, domid, true, spec, cfg_path, st, memory,
    ))
}
