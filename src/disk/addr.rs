//! Where an NBD export listens: `HOST:PORT` (TCP) or `unix:PATH`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// `HOST:PORT`, resolved when bound (`[::1]:10809` for IPv6).
    Tcp(String),
    Unix(PathBuf),
}

#[derive(Debug, thiserror::Error)]
#[error("NBD address {value:?}: {reason} (expected HOST:PORT or unix:PATH)")]
pub struct AddrError {
    pub value: String,
    pub reason: &'static str,
}

impl FromStr for NbdAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<NbdAddr, AddrError> {
        let err = |reason| AddrError {
            value: s.to_string(),
            reason,
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(err("empty socket path"));
            }
            return Ok(NbdAddr::Unix(PathBuf::from(path)));
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(|| err("no port"))?;
        if host.is_empty() {
            return Err(err("no host"));
        }
        port.parse::<u16>()
            .map_err(|_| err("port is not a number in 0..=65535"))?;
        Ok(NbdAddr::Tcp(s.to_string()))
    }
}

impl fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdAddr::Tcp(a) => f.write_str(a),
            NbdAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms_and_names_bad_values() {
        assert_eq!(
            "127.0.0.1:10809".parse::<NbdAddr>().unwrap(),
            NbdAddr::Tcp("127.0.0.1:10809".into())
        );
        assert_eq!("[::1]:1".parse::<NbdAddr>().unwrap().to_string(), "[::1]:1");
        assert_eq!(
            "unix:/tmp/x.sock".parse::<NbdAddr>().unwrap(),
            NbdAddr::Unix("/tmp/x.sock".into())
        );
        for bad in ["", "unix:", "host", ":80", "h:99999", "h:x"] {
            let e = bad.parse::<NbdAddr>().unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }
}
