//! The pure decisions of building the replica domain on the backup (the
//! calls are in `restore.rs`): which config the new domain is created
//! from, which carried HVM params are written into it, and which replica
//! pages had no place in it.
//!
//! A PVH guest's new domain is made by `xl create -p` from the primary's
//! carried xl config (a PV guest's by `xl restore -p` of the same config,
//! `restore_pv.rs`), so the toolstack sets up what Xen's own restore also leaves to
//! it (libxl restore, `xg_sr_restore_x86_hvm.c`): the special pages
//! (xenstore and console rings, cleared), fresh event channels for them
//! (`HVM_PARAM_STORE_EVTCHN`, `HVM_PARAM_CONSOLE_EVTCHN`), the grant-table
//! seed for the two backends, xenstore's introduction and the devices.
//! The checkpoint then supplies guest RAM, the HVM context and the other
//! params. The special pages must sit at the gfns the guest remembers:
//! [`param_plan`] refuses a new domain that placed them elsewhere.

use std::ops::Range;

use super::config::{self, ConfigError};
use crate::PAGE_SIZE;

/// HVM params naming special pages the toolstack places and clears in the
/// new domain (xenstore ring, console ring; Xen ABI numbers 1 and 17).
/// They are kept, and must equal the carried values.
pub const KEPT_PFN_PARAMS: &[(u32, &str)] = &[(1, "xenstore ring"), (17, "console ring")];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    #[error(
        "the carried config is libxl's JSON, which `xl create` does not read: run the \
         primary with config=PATH naming the guest's xl file"
    )]
    JsonConfig,
    #[error("the carried xl config: {0}")]
    Config(#[from] ConfigError),
    #[error("the carried xl config names no guest (no name = ...) and the spec gives no name=")]
    NoName,
    #[error(
        "a guest of type {0:?} cannot be rebuilt here: castor builds PV, PVH and HVM replicas"
    )]
    Kind(String),
    #[error(
        "HVM param {index} ({what}) is {new:#x} in the new domain but {carried:#x} in the \
         checkpoint: the guest would look for its {what} at the old gfn"
    )]
    SpecialPage {
        index: u32,
        what: &'static str,
        new: u64,
        carried: u64,
    },
}

/// The xl config the replica domain is created from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaConfig {
    pub name: String,
    pub text: String,
    /// `pv`, `pvh` or `hvm`.
    pub kind: String,
}

/// Checks the carried config describes a guest castor can rebuild (PV or
/// PVH, xl text) and names it `name` (the spec's name, else the config's own).
pub fn replica_config(carried: &str, name: Option<&str>) -> Result<ReplicaConfig, ReplicaError> {
    if carried.trim_start().starts_with('{') {
        return Err(ReplicaError::JsonConfig);
    }
    let s = config::summary(carried)?;
    if s.kind != "pvh" && s.kind != "pv" && s.kind != "hvm" {
        return Err(ReplicaError::Kind(s.kind));
    }
    let name = match (name, s.name) {
        (Some(n), _) => n.to_string(),
        (None, Some(n)) => n,
        (None, None) => return Err(ReplicaError::NoName),
    };
    Ok(ReplicaConfig {
        text: config::with_name(carried, &name),
        name,
        kind: s.kind,
    })
}

/// The params to write into the new domain: every carried one whose value
/// differs there (`current` reads the new domain's), except the special
/// pages of [`KEPT_PFN_PARAMS`], which must already agree.
pub fn param_plan(
    carried: &[(u32, u64)],
    current: impl Fn(u32) -> Option<u64>,
) -> Result<Vec<(u32, u64)>, ReplicaError> {
    let mut set = Vec::new();
    for &(index, value) in carried {
        let now = current(index);
        if let Some(&(_, what)) = KEPT_PFN_PARAMS.iter().find(|(i, _)| *i == index) {
            let new = now.unwrap_or(0);
            if new != value {
                return Err(ReplicaError::SpecialPage {
                    index,
                    what,
                    new,
                    carried: value,
                });
            }
        } else if now != Some(value) {
            set.push((index, value));
        }
    }
    Ok(set)
}

/// Replica pages that are not all zeros yet fall in `holes` (gfns the new
/// domain has no memory at). Zero pages there lose nothing.
pub fn lost_pages(replica: &[u8], holes: &[Range<usize>]) -> Vec<usize> {
    let pages = replica.len() / PAGE_SIZE;
    holes
        .iter()
        .flat_map(|h| h.start.min(pages)..h.end.min(pages))
        .filter(|&g| {
            replica[g * PAGE_SIZE..(g + 1) * PAGE_SIZE]
                .iter()
                .any(|&b| b != 0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PVH: &str = "name = \"g\"\ntype = \"pvh\"\nmemory = 96\nkernel = \"/k\"\n";

    #[test]
    fn config_is_renamed_and_checked() {
        let c = replica_config(PVH, None).unwrap();
        assert_eq!(c.name, "g");
        let c = replica_config(PVH, Some("other")).unwrap();
        assert_eq!(c.name, "other");
        let s = config::summary(&c.text).unwrap();
        assert_eq!(s.name.as_deref(), Some("other"));
        assert_eq!(s.memory_mib, Some(96));
        assert_eq!(
            replica_config("{\"c_info\": {}}", None),
            Err(ReplicaError::JsonConfig)
        );
        assert_eq!(
            replica_config("type = \"pvh\"\n", None),
            Err(ReplicaError::NoName)
        );
        assert_eq!(c.kind, "pvh");
        let pv = replica_config("name = \"g\"\n", None).unwrap();
        assert_eq!(pv.kind, "pv", "xl's default type");
        let hvm = replica_config("name = \"g\"\nbuilder = \"hvm\"\n", None).unwrap();
        assert_eq!(hvm.kind, "hvm");
        let arm = replica_config("name = \"g\"\ntype = \"arm\"\n", None).unwrap_err();
        assert_eq!(arm, ReplicaError::Kind("arm".into()));
        assert!(arm.to_string().contains("\"arm\""), "{arm}");
        assert!(matches!(
            replica_config("nonsense\n", None),
            Err(ReplicaError::Config(_))
        ));
    }

    #[test]
    fn params_set_only_what_differs_and_special_pages_must_agree() {
        let carried = [(1, 0xfeffc), (17, 0xfefff), (38, 1), (23, 0x10)];
        let now = |i: u32| match i {
            1 => Some(0xfeffc),
            17 => Some(0xfefff),
            38 => Some(1),
            _ => None,
        };
        assert_eq!(param_plan(&carried, now).unwrap(), vec![(23, 0x10)]);
        let moved = |i: u32| if i == 17 { Some(0xfeffe) } else { now(i) };
        let e = param_plan(&carried, moved).unwrap_err();
        assert_eq!(
            e,
            ReplicaError::SpecialPage {
                index: 17,
                what: "console ring",
                new: 0xfeffe,
                carried: 0xfefff
            }
        );
        assert!(e.to_string().contains("0xfefff"), "{e}");
        assert!(param_plan(&[], now).unwrap().is_empty());
    }

    #[test]
    fn only_non_zero_pages_in_holes_are_lost() {
        let mut img = vec![0u8; 8 * PAGE_SIZE];
        img[2 * PAGE_SIZE + 7] = 1; // in a hole
        img[5 * PAGE_SIZE] = 1; // not in a hole
        img[7 * PAGE_SIZE + PAGE_SIZE - 1] = 9; // in a hole running past the end
        assert_eq!(lost_pages(&img, &[1..4, 6..20]), vec![2, 7]);
        assert!(lost_pages(&img, &[]).is_empty());
    }
}
