//! The replica's disks at activation.
//!
//! The activated domain continues on the replica's disks, so they move
//! (rename, O(1)) from the replica directory to the activated directory,
//! where the activated copy's own saves keep them. A domain's own disk (a
//! sim or kvm `disk=`) is handed to the restored domain through its spec
//! (`disk=PATH`, unless `--override` names one); a disk the primary served
//! over NBD is served again from the replica at the same address, or at
//! the one `--override nbd.NAME=ADDR` gives.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::addr::NbdAddr;
use super::fence::Fence;
use super::image::{DiskImage, ImageError};
use super::log::{LogConfig, WriteLog};
use super::nbd::{Export, NbdError, NbdServer, ServerConfig};
use super::session::{replica_disk_path, DiskSpec};

#[derive(Debug, thiserror::Error)]
pub enum ActivateDiskError {
    #[error("moving replica disk {from} to {to}: {source}")]
    Move {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--override nbd.{name}={value}: {reason}")]
    Override {
        name: String,
        value: String,
        reason: String,
    },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Nbd(#[from] NbdError),
}

/// What activation made of the disks.
#[derive(Debug, Default)]
pub struct ActiveDisks {
    /// The domain spec overrides to use (the user's, minus `nbd.*`, plus
    /// `disk=PATH` for a domain disk when the user named none).
    pub overrides: Option<String>,
    /// NBD disks served again: (name, log), for re-protection.
    pub logs: Vec<(String, Arc<WriteLog>)>,
    pub servers: Vec<NbdServer>,
}

/// Splits `nbd.NAME=ADDR` items out of an override string.
fn split_overrides(o: Option<&str>) -> (Vec<String>, Vec<(String, String)>) {
    let (mut rest, mut nbd) = (Vec::new(), Vec::new());
    for item in o
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|i| !i.is_empty())
    {
        match item.strip_prefix("nbd.").and_then(|kv| kv.split_once('=')) {
            Some((n, a)) => nbd.push((n.to_string(), a.to_string())),
            None => rest.push(item.to_string()),
        }
    }
    (rest, nbd)
}

/// Moves the replica's disks into `active_dir/disks/`, serves the NBD
/// ones (gated by `fence`), and returns the domain's overrides.
pub fn activate_disks(
    replica_dir: &Path,
    active_dir: &Path,
    disks: &[DiskSpec],
    overrides: Option<&str>,
    fence: Arc<Fence>,
) -> Result<ActiveDisks, ActivateDiskError> {
    let (mut rest, nbd) = split_overrides(overrides);
    for (name, value) in &nbd {
        if !disks.iter().any(|d| &d.name == name && !d.nbd.is_empty()) {
            return Err(ActivateDiskError::Override {
                name: name.clone(),
                value: value.clone(),
                reason: "the replica has no NBD disk of that name".into(),
            });
        }
    }
    let mut out = ActiveDisks::default();
    let mut exports = Vec::new();
    for d in disks {
        let from = replica_disk_path(replica_dir, &d.name);
        let to = replica_disk_path(active_dir, &d.name);
        let moved = |source| ActivateDiskError::Move {
            from: from.clone(),
            to: to.clone(),
            source,
        };
        std::fs::create_dir_all(to.parent().expect("disks/ dir")).map_err(moved)?;
        std::fs::rename(&from, &to).map_err(moved)?;
        if d.nbd.is_empty() {
            if !rest.iter().any(|i| i.starts_with("disk=")) {
                rest.push(format!("disk={}", to.display()));
            }
            continue;
        }
        let addr_s = nbd
            .iter()
            .find(|(n, _)| n == &d.name)
            .map_or(d.nbd.clone(), |(_, a)| a.clone());
        let addr: NbdAddr =
            addr_s
                .parse()
                .map_err(|e: super::addr::AddrError| ActivateDiskError::Override {
                    name: d.name.clone(),
                    value: addr_s.clone(),
                    reason: e.to_string(),
                })?;
        let log = Arc::new(WriteLog::new(
            DiskImage::open(&to)?,
            fence.clone(),
            LogConfig::default(),
        ));
        out.logs.push((d.name.clone(), log.clone()));
        exports.push((
            addr,
            Export {
                name: d.name.clone(),
                log,
            },
        ));
    }
    while let Some((addr, e)) = exports.pop() {
        let mut group = vec![e];
        exports.retain(|(a, x)| {
            let same = a == &addr;
            if same {
                group.push(x.clone());
            }
            !same
        });
        let s = NbdServer::start(&addr, group, ServerConfig::default())?;
        for e in s.exports() {
            eprintln!(
                "castor backup: disk {} served at nbd://{}/{}",
                e.name,
                s.local_addr(),
                e.name
            );
        }
        out.servers.push(s);
    }
    out.overrides = (!rest.is_empty()).then(|| rest.join(","));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_move_domain_disks_become_overrides_and_nbd_disks_are_served() {
        let dir = tempfile::tempdir().unwrap();
        let (rep, act) = (dir.path().join("r"), dir.path().join("r/activated"));
        for n in ["sim", "data"] {
            let p = replica_disk_path(&rep, n);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, vec![7u8; 4096]).unwrap();
        }
        let sock = dir.path().join("d.sock");
        let disks = vec![
            DiskSpec {
                name: "sim".into(),
                size: 4096,
                nbd: String::new(),
            },
            DiskSpec {
                name: "data".into(),
                size: 4096,
                nbd: "127.0.0.1:1".into(),
            },
        ];
        let o = format!("console=stderr,nbd.data=unix:{}", sock.display());
        let a = activate_disks(&rep, &act, &disks, Some(&o), Arc::new(Fence::open())).unwrap();
        let sim = replica_disk_path(&act, "sim");
        assert_eq!(
            a.overrides.unwrap(),
            format!("console=stderr,disk={}", sim.display())
        );
        assert!(
            sim.exists() && !replica_disk_path(&rep, "sim").exists(),
            "moved"
        );
        assert_eq!(a.servers.len(), 1);
        assert_eq!(
            a.servers[0].local_addr(),
            format!("unix:{}", sock.display())
        );
        assert_eq!(a.logs[0].1.image().path(), replica_disk_path(&act, "data"));
    }

    #[test]
    fn an_override_for_an_unknown_disk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = activate_disks(
            dir.path(),
            dir.path(),
            &[],
            Some("nbd.x=h:1"),
            Arc::new(Fence::open()),
        )
        .unwrap_err();
        assert!(e.to_string().contains("nbd.x=h:1"), "{e}");
    }
}
