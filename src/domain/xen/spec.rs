//! The `xen` domain's spec: `xen:domid=N` or `xen:name=NAME`, plus
//! options.
//!
//! Keys: `domid` or `name` (exactly one; which running domain to protect),
//! `suspend` (`auto`, `evtchn`, `shutdown`, `xenstore`, `pause`; how each
//! epoch stops the guest, see `suspend.rs`), `suspend_timeout` (how long
//! the guest may take to suspend, default 10s: emulated hosts are slow),
//! `config` (path of the guest's xl config to carry to the backup, when
//! libxl's saved copy is not wanted), `scanners` (threads scanning the
//! dirty bitmap), and two keys the primary fills in for the backup:
//! `pages` (the physmap size) and `cfg` (the packed xl config, see
//! `config.rs`).
//!
//! `Display` is canonical (fixed key order, defaults omitted), so
//! `parse(&s.to_string()) == s`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::domain::{spec_pairs, DomainError, Layout};
use crate::PAGE_SIZE;

const KEYS: &str = "domid, name, suspend, suspend_timeout, config, scanners, pages, cfg";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_SCANNERS: usize = 2;

/// Which domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Domid(u32),
    Name(String),
}

/// How an epoch stops the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuspendMode {
    /// The guest's suspend event channel if it has one, else
    /// `xc_domain_shutdown` for HVM without PV drivers, else xenstore.
    Auto,
    Evtchn,
    Shutdown,
    Xenstore,
    /// `xc_domain_pause` only: no guest cooperation. Memory and vCPU state
    /// are exact, but a replica restored from it has no reconnected PV
    /// devices; for benchmarks and digests, not failover.
    Pause,
}

impl SuspendMode {
    fn name(self) -> &'static str {
        match self {
            SuspendMode::Auto => "auto",
            SuspendMode::Evtchn => "evtchn",
            SuspendMode::Shutdown => "shutdown",
            SuspendMode::Xenstore => "xenstore",
            SuspendMode::Pause => "pause",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XenSpec {
    pub target: Target,
    pub suspend: SuspendMode,
    pub suspend_timeout: Duration,
    pub config: Option<PathBuf>,
    pub scanners: usize,
    pub pages: Option<u64>,
    /// Packed xl config (`config::pack`).
    pub cfg: Option<String>,
}

impl XenSpec {
    pub fn parse(kv: &str) -> Result<XenSpec, DomainError> {
        let spec = |reason: String| DomainError::Spec {
            spec: format!("xen:{kv}"),
            reason,
        };
        let mut target = None;
        let mut s = XenSpec {
            target: Target::Domid(0),
            suspend: SuspendMode::Auto,
            suspend_timeout: DEFAULT_TIMEOUT,
            config: None,
            scanners: DEFAULT_SCANNERS,
            pages: None,
            cfg: None,
        };
        for (k, v) in spec_pairs(kv, KEYS).map_err(spec)? {
            let num = |what: &str| {
                v.parse::<u64>()
                    .map_err(|_| spec(format!("{what}={v:?} is not a number")))
            };
            match k {
                "domid" | "name" if target.is_some() => {
                    return Err(spec("give one of domid= and name=, not both".into()))
                }
                "domid" => {
                    let d = num("domid")?;
                    if d == 0 || d >= 0x7ff0 {
                        return Err(spec(format!(
                            "domid={d} is not a guest domain (1..32751; dom0 cannot be protected)"
                        )));
                    }
                    target = Some(Target::Domid(d as u32));
                }
                "name" if v.is_empty() => return Err(spec("name= is empty".into())),
                "name" => target = Some(Target::Name(v.to_string())),
                "suspend" => s.suspend = parse_mode(v).map_err(spec)?,
                "suspend_timeout" => {
                    let d = crate::units::parse_duration(v)
                        .map_err(|e| spec(format!("suspend_timeout: {e}")))?;
                    if d.is_zero() || d > Duration::from_secs(600) {
                        return Err(spec(format!("suspend_timeout={v} is not in (0, 600s]")));
                    }
                    s.suspend_timeout = d;
                }
                "config" => s.config = Some(PathBuf::from(v)),
                "scanners" => {
                    let n = num("scanners")?;
                    if !(1..=64).contains(&n) {
                        return Err(spec(format!("scanners={n} is not in 1..=64")));
                    }
                    s.scanners = n as usize;
                }
                "pages" => {
                    let n = num("pages")?;
                    if n == 0 || n > (1 << 40) / PAGE_SIZE as u64 {
                        return Err(spec(format!("pages={n} is not in 1..=2^28")));
                    }
                    s.pages = Some(n);
                }
                "cfg" => {
                    super::config::unpack(v).map_err(|e| spec(e.to_string()))?;
                    s.cfg = Some(v.to_string());
                }
                other => return Err(spec(format!("unknown key {other:?} (keys: {KEYS})"))),
            }
        }
        s.target = target.ok_or_else(|| spec("name the domain: domid=N or name=NAME".into()))?;
        Ok(s)
    }

    /// The layout the primary announced (`pages`), or an empty one for a
    /// spec a user typed (the domain itself knows its size once opened).
    pub fn layout(&self) -> Layout {
        Layout {
            page_size: PAGE_SIZE as u32,
            pages: self.pages.unwrap_or(0),
        }
    }

    /// The carried xl config text, if any.
    pub fn config_text(&self) -> Option<String> {
        self.cfg
            .as_deref()
            .and_then(|c| super::config::unpack(c).ok())
    }
}

fn parse_mode(v: &str) -> Result<SuspendMode, String> {
    Ok(match v {
        "auto" => SuspendMode::Auto,
        "evtchn" => SuspendMode::Evtchn,
        "shutdown" => SuspendMode::Shutdown,
        "xenstore" => SuspendMode::Xenstore,
        "pause" => SuspendMode::Pause,
        other => {
            return Err(format!(
                "suspend={other:?} (one of auto, evtchn, shutdown, xenstore, pause)"
            ))
        }
    })
}

impl fmt::Display for XenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Domid(d) => write!(f, "domid={d}")?,
            Target::Name(n) => write!(f, "name={n}")?,
        }
        if self.suspend != SuspendMode::Auto {
            write!(f, ",suspend={}", self.suspend.name())?;
        }
        if self.suspend_timeout != DEFAULT_TIMEOUT {
            write!(f, ",suspend_timeout={}ms", self.suspend_timeout.as_millis())?;
        }
        if let Some(c) = &self.config {
            write!(f, ",config={}", c.display())?;
        }
        if self.scanners != DEFAULT_SCANNERS {
            write!(f, ",scanners={}", self.scanners)?;
        }
        if let Some(p) = self.pages {
            write!(f, ",pages={p}")?;
        }
        if let Some(c) = &self.cfg {
            write!(f, ",cfg={c}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_round_trips() {
        let s = XenSpec::parse("name=guest1").unwrap();
        assert_eq!(s.target, Target::Name("guest1".into()));
        assert_eq!(s.suspend, SuspendMode::Auto);
        assert_eq!(s.to_string(), "name=guest1");
        let cfg = super::super::config::pack("memory = 128\n").unwrap();
        let text =
            format!("domid=7,suspend=xenstore,suspend_timeout=2s,scanners=3,pages=32768,cfg={cfg}");
        let s = XenSpec::parse(&text).unwrap();
        assert_eq!(s.target, Target::Domid(7));
        assert_eq!(s.layout().pages, 32768);
        assert_eq!(s.config_text().as_deref(), Some("memory = 128\n"));
        assert_eq!(XenSpec::parse(&s.to_string()).unwrap(), s);
    }

    #[test]
    fn bad_specs_name_the_value() {
        let err = |s: &str| XenSpec::parse(s).unwrap_err().to_string();
        assert!(err("").contains("domid=N or name=NAME"));
        assert!(err("domid=1,name=x").contains("not both"));
        assert!(err("domid=0").contains("dom0"));
        assert!(err("domid=x").contains("\"x\""));
        assert!(err("name=g,suspend=nap").contains("nap"));
        assert!(err("name=g,suspend_timeout=0s").contains("suspend_timeout"));
        assert!(err("name=g,scanners=0").contains("scanners=0"));
        assert!(err("name=g,cfg=!!").contains("base64"));
        assert!(err("name=g,colour=red").contains("colour"));
        assert!(err("name=").contains("empty"));
    }
}
