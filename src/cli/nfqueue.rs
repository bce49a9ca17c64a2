//! `protect --nfqueue Q --nfqueue-dev DEV...`: host devices whose output is
//! held in an NFQUEUE queue.

use castor::outq::nfqueue::rules::{self, Installed};

/// Installs the rules for each DEV, then checks that IPv4 and IPv6 do
/// reach queue `q`. The rules are removed when the returned values drop.
pub fn nfqueue_rules(q: u16, devs: &[String]) -> Result<Vec<Installed>, String> {
    let mut installed = Vec::new();
    for d in devs {
        let r = rules::install(q, d).map_err(|e| format!("--nfqueue-dev {d}: {e}"))?;
        eprintln!("castor protect: holding output of {}", r.describe());
        installed.push(r);
    }
    rules::check(q).map_err(|e| format!("--nfqueue {q}: {e}"))?;
    Ok(installed)
}
