//! FOR TESTS ONLY: a device fault injected into the backup's apply, so
//! tests can drive the real commit path (redo log, replay at the save or
//! at the next start) through an I/O error or a crash at a chosen point.
//!
//! `CASTOR_TEST_DISK_FAULT=eio@N` or `stall@N`, read when a session's
//! replica disks are created: the `N`-th commit (`N >= 1`, counting those
//! after the first checkpoint) whose epoch carries at least two disk
//! operations fails its second operation's write with `EIO` (once), or
//! stops before it for good, saying `stalled` (a test then kills the
//! backup). Either first prints `TEST FAULT: … epoch E; disks before it:
//! HEX; after it: HEX`, BLAKE3 over the replica images' bytes before the
//! apply and as the whole epoch leaves them (computed in memory), so a
//! test can check that what is left is exactly one of the two, never a mix.

use std::io;

use super::image::{DiskImage, ImageError};

/// The environment variable naming the fault.
pub const ENV: &str = "CASTOR_TEST_DISK_FAULT";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Eio,
    Stall,
}

/// An injected fault and how far the apply has come towards it.
#[derive(Debug, Default)]
pub struct Fault {
    plan: Option<(Mode, u64)>,
    /// Commits with at least two operations seen so far.
    seen: u64,
    armed: bool,
}

impl Fault {
    /// The fault [`ENV`] names, if any.
    pub fn from_env() -> Result<Fault, String> {
        let Ok(v) = std::env::var(ENV) else {
            return Ok(Fault::default());
        };
        let bad = || format!("{ENV}={v:?}: expected eio@N or stall@N with N >= 1");
        let (mode, n) = v.split_once('@').ok_or_else(bad)?;
        let mode = match mode {
            "eio" => Mode::Eio,
            "stall" => Mode::Stall,
            _ => return Err(bad()),
        };
        let n: u64 = n.parse().ok().filter(|&n| n >= 1).ok_or_else(bad)?;
        eprintln!("castor backup: TEST MODE ({ENV}): {v}");
        Ok(Fault {
            plan: Some((mode, n)),
            ..Fault::default()
        })
    }

    /// An `EIO` at the `n`-th commit of two operations or more (unit tests).
    #[cfg(test)]
    pub(crate) fn eio_at(n: u64) -> Fault {
        Fault {
            plan: Some((Mode::Eio, n)),
            ..Fault::default()
        }
    }

    /// Whether a fault is planned at all (arming it costs a read of the
    /// images, for the hashes it prints).
    pub fn planned(&self) -> bool {
        self.plan.is_some()
    }

    /// Called before the apply of `epoch` (`ops` operations), with the
    /// hashes ([`hash`]) of the disks before and after it.
    pub fn arm(&mut self, epoch: u64, ops: u64, before: &str, after: &str) {
        let Some((mode, n)) = self.plan else { return };
        if ops < 2 {
            return;
        }
        self.seen += 1;
        if self.seen != n {
            return;
        }
        self.armed = true;
        eprintln!(
            "castor backup: TEST FAULT: {mode:?} before operation 2 of {ops} applying epoch {epoch}; disks before it: {before}; after it: {after}"
        );
    }

    /// Whether [`Fault::before_op`] will fail or stall at operation
    /// `index`: the apply must have written every operation before it.
    pub fn acts_before(&self, index: u64) -> bool {
        self.armed && index == 1
    }

    /// Called before operation `index` (from 0) of the apply.
    pub fn before_op(&mut self, index: u64, img: &DiskImage) -> Result<(), ImageError> {
        if !self.acts_before(index) {
            return Ok(());
        }
        self.armed = false;
        match self.plan.map(|p| p.0) {
            Some(Mode::Stall) => {
                eprintln!("castor backup: TEST FAULT: stalled mid-apply (operation 1 applied)");
                loop {
                    std::thread::park();
                }
            }
            _ => Err(ImageError::Io {
                op: "writing (injected test fault)",
                path: img.path().to_path_buf(),
                source: io::Error::from_raw_os_error(libc::EIO),
            }),
        }
    }
}

/// BLAKE3 over every disk's bytes, in order (hex).
pub fn hash(disks: &[Vec<u8>]) -> String {
    let mut h = blake3::Hasher::new();
    for d in disks {
        h.update(d);
    }
    h.finalize().to_hex().to_string()
}
