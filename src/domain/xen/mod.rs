//! The `xen` domain: protects a running Xen guest through libxenctrl,
//! libxenguest, libxenforeignmemory, libxenevtchn and libxenstore.
//!
//! Pieces, one file each: [`spec`] (`xen:domid=N` / `xen:name=NAME`),
//! [`config`] (the xl config carried to the backup), [`state`] (saved
//! vCPU/platform state records), [`scan`] (striped dirty-bitmap scan),
//! [`batch`] (foreign-map planning and the PV p2m), [`pte`] (PV page
//! tables normalised to pfns and localised to a replica's frames), [`replica`] (what the
//! backup's replica domain is built from), [`xl`] (the toolstack command,
//! bounded), and with the `xen`
//! feature: `ffi` (bindgen output), [`sys`] (the checked safe layer),
//! `map` (guest memory as one foreign mapping), `suspend` (stopping and
//! resuming the guest), `domain` (the [`Domain`](crate::domain::Domain)
//! implementation) and `restore` (building the replica on the backup;
//! `restore_pv` for PV guests, through a Xen save file written by
//! [`stream`]).
//!
//! The pure pieces build and are tested on any machine; everything that
//! talks to Xen needs the feature and a Xen dom0 (the lab, docs/lab.md).

pub mod batch;
pub mod config;
pub mod pte;
pub mod qmp;
pub mod replica;
pub mod scan;
pub mod spec;
pub mod state;
pub mod stream;
pub mod stream_hvm;
pub mod xl;

#[cfg(feature = "xen")]
mod domain;
#[cfg(feature = "xen")]
mod ffi;
#[cfg(feature = "xen")]
mod map;
#[cfg(feature = "xen")]
mod ptcheck;
#[cfg(feature = "xen")]
mod restore;
#[cfg(feature = "xen")]
mod restore_hvm;
#[cfg(feature = "xen")]
mod restore_pv;
#[cfg(feature = "xen")]
mod suspend;
#[cfg(feature = "xen")]
pub mod sys;
#[cfg(feature = "xen")]
mod types;
#[cfg(feature = "xen")]
mod unlogged;

pub use spec::XenSpec;

use crate::domain::{Domain, DomainError, GuestMemory};

/// Opens the running domain `spec` names, with log-dirty armed.
pub fn open(spec: &XenSpec) -> Result<Box<dyn Domain>, DomainError> {
    #[cfg(feature = "xen")]
    {
        Ok(Box::new(domain::XenDomain::open(spec)?))
    }
    #[cfg(not(feature = "xen"))]
    {
        Err(not_built(spec))
    }
}

/// Builds the replica domain from a checkpoint, paused.
pub fn restore(
    spec: &XenSpec,
    memory: GuestMemory,
    state: &[u8],
) -> Result<Box<dyn Domain>, DomainError> {
    #[cfg(feature = "xen")]
    {
        restore::restore(spec, memory, state)
    }
    #[cfg(not(feature = "xen"))]
    {
        let _ = (memory, state);
        Err(not_built(spec))
    }
}

#[cfg(not(feature = "xen"))]
fn not_built(spec: &XenSpec) -> DomainError {
    DomainError::Spec {
        spec: format!("xen:{spec}"),
        reason: "this castor was built without the `xen` feature \
                 (cargo build --release --features xen; needs libxen-dev and libclang-dev)"
            .into(),
    }
}
