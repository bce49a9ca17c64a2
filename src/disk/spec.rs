//! `--disk NAME=PATH,nbd=ADDR`: a disk castor serves over NBD and
//! replicates.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use super::addr::NbdAddr;
use super::fence::Fence;
use super::image::DiskImage;
use super::log::{LogConfig, WriteLog};
use super::nbd::{Export, NbdError, NbdServer, ServerConfig};
use super::session::check_name;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskArg {
    pub name: String,
    pub path: PathBuf,
    pub nbd: NbdAddr,
}

#[derive(Debug, thiserror::Error)]
#[error("--disk {value:?}: {reason} (expected NAME=PATH,nbd=HOST:PORT or NAME=PATH,nbd=unix:PATH)")]
pub struct DiskArgError {
    pub value: String,
    pub reason: String,
}

impl FromStr for DiskArg {
    type Err = DiskArgError;

    fn from_str(s: &str) -> Result<DiskArg, DiskArgError> {
        let err = |reason: String| DiskArgError {
            value: s.to_string(),
            reason,
        };
        let (head, rest) = s.split_once(',').ok_or_else(|| err("no nbd=ADDR".into()))?;
        let (name, path) = head
            .split_once('=')
            .ok_or_else(|| err("no NAME=PATH".into()))?;
        check_name(name).map_err(err)?;
        if path.is_empty() {
            return Err(err("empty PATH".into()));
        }
        let addr = rest
            .strip_prefix("nbd=")
            .ok_or_else(|| err(format!("unknown option {rest:?}")))?;
        let nbd = addr
            .parse()
            .map_err(|e: super::addr::AddrError| err(e.to_string()))?;
        Ok(DiskArg {
            name: name.to_string(),
            path: PathBuf::from(path),
            nbd,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("--disk {name}: {source}")]
    Image {
        name: String,
        #[source]
        source: super::image::ImageError,
    },
    #[error("--disk {name} given twice")]
    Duplicate { name: String },
    #[error(transparent)]
    Nbd(#[from] NbdError),
}

/// Disks being served: their logs (argument order) and the servers.
#[derive(Debug)]
pub struct Served {
    pub logs: Vec<(String, Arc<WriteLog>)>,
    pub servers: Vec<NbdServer>,
}

/// Opens every disk behind a write log gated by `fence` and serves them,
/// one server per distinct address (disks sharing an address are exports
/// of one server).
pub fn serve_disks(
    disks: &[DiskArg],
    fence: Arc<Fence>,
    cfg: ServerConfig,
) -> Result<Served, ServeError> {
    let mut logs = Vec::new();
    let mut by_addr: BTreeMap<String, (NbdAddr, Vec<Export>)> = BTreeMap::new();
    for d in disks {
        if logs.iter().any(|(n, _)| n == &d.name) {
            return Err(ServeError::Duplicate {
                name: d.name.clone(),
            });
        }
        let img = DiskImage::open(&d.path).map_err(|source| ServeError::Image {
            name: d.name.clone(),
            source,
        })?;
        let log = Arc::new(WriteLog::new(img, fence.clone(), LogConfig::default()));
        logs.push((d.name.clone(), log.clone()));
        by_addr
            .entry(d.nbd.to_string())
            .or_insert_with(|| (d.nbd.clone(), Vec::new()))
            .1
            .push(Export {
                name: d.name.clone(),
                log,
            });
    }
    let mut servers = Vec::new();
    for (_, (addr, exports)) in by_addr {
        servers.push(NbdServer::start(&addr, exports, cfg)?);
    }
    Ok(Served { logs, servers })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_names_bad_values() {
        let d: DiskArg = "data=/tmp/d.img,nbd=127.0.0.1:10809".parse().unwrap();
        assert_eq!(d.name, "data");
        assert_eq!(d.path, PathBuf::from("/tmp/d.img"));
        assert_eq!(d.nbd, NbdAddr::Tcp("127.0.0.1:10809".into()));
        let u: DiskArg = "x=/d,nbd=unix:/run/x.sock".parse().unwrap();
        assert_eq!(u.nbd, NbdAddr::Unix("/run/x.sock".into()));
        for (bad, what) in [
            ("data=/d", "no nbd"),
            ("data,nbd=h:1", "no NAME=PATH"),
            ("../x=/d,nbd=h:1", "disk name"),
            ("d=,nbd=h:1", "empty PATH"),
            ("d=/x,nfs=h:1", "unknown option"),
            ("d=/x,nbd=h", "no port"),
        ] {
            let e = bad.parse::<DiskArg>().unwrap_err().to_string();
            assert!(e.contains(what) && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn disks_sharing_an_address_share_a_server() {
        let dir = tempfile::tempdir().unwrap();
        let mk = |n: &str| {
            let p = dir.path().join(n);
            std::fs::write(&p, vec![0u8; 4096]).unwrap();
            p
        };
        let sock = dir.path().join("s.sock");
        let args = vec![
            DiskArg {
                name: "a".into(),
                path: mk("a"),
                nbd: NbdAddr::Unix(sock.clone()),
            },
            DiskArg {
                name: "b".into(),
                path: mk("b"),
                nbd: NbdAddr::Unix(sock.clone()),
            },
        ];
        let Served { logs, servers } =
            serve_disks(&args, Arc::new(Fence::open()), ServerConfig::default()).unwrap();
        assert_eq!(logs.len(), 2);
        assert_eq!(servers.len(), 1);
        assert_eq!(servers[0].exports().len(), 2);
        drop(servers);
        let dup = vec![args[0].clone(), args[0].clone()];
        let e = serve_disks(&dup, Arc::new(Fence::open()), ServerConfig::default()).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let missing = vec![DiskArg {
            path: dir.path().join("nope"),
            ..args[0].clone()
        }];
        let e =
            serve_disks(&missing, Arc::new(Fence::open()), ServerConfig::default()).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
