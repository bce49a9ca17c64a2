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

use std::path::Path;
use std::sync::Arc;

use super::replica::ReplicaConfig;
use super::restore_pv::{xl_restore, ActivatedPv, XEN_VERSION};
use super::spec::XenSpec;
use super::state::XenState;
use super::stream::StreamError;
use super::stream_hvm::{self, HvmImage, HvmStreamError};
use super::sys::{Xc, XenError};
use crate::domain::GuestMemory;

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
    let (written, domid, took) = xl_restore(
        xc,
        cfg,
        cfg_path,
        true,
        |w| stream_hvm::write_hvm(w, &img),
        |e| {
            matches!(e, HvmStreamError::Stream(StreamError::Io(io))
                if io.kind() == std::io::ErrorKind::BrokenPipe)
        },
    )?;
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
        took.as_secs_f64()
    );
    Ok(ActivatedPv::restored(
        xc, domid, true, spec, cfg_path, st, memory,
    ))
}
