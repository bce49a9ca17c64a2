//! Arbitration: before a copy of the domain goes live (a primary starting,
//! a backup activating) it must win the arbiter, which hands out a fencing
//! token that grows with every winner.
//!
//! - `local:PATH`: an exclusive `flock` on PATH. The token is a u64 kept in
//!   the file, incremented by each winner and fsynced before the win is
//!   reported. The winner keeps the file open for as long as it is live; the
//!   kernel drops the lock when the holder's process dies (SIGKILL
//!   included), so a dead holder never blocks its successor. Good for one
//!   host (demos, tests) or a shared filesystem whose locks work across
//!   hosts; not a substitute for a real quorum service.
//! - `etcd:http://HOST:PORT[,...][/KEY][?ttl=DURATION]`: a leader key
//!   bound to a lease in an etcd cluster; the token is the key's create
//!   revision. The hold lapses when the lease is not renewed in time, which
//!   the holder learns through [`Arbiter::lease`] (see [`etcd`]).
//! - `none`: always wins, token 0. That is Xen Remus's behaviour: nothing
//!   stops a partitioned backup from running next to a live primary. Only
//!   when asked for, with a warning.

mod contract;
pub mod etcd;
mod local;

pub use contract::{Arbiter, ArbiterError, FencingToken};
pub use local::{default_local_path, heir_path, LocalLock, NoArbiter, NONE_WARNING};

/// Parses `local:PATH`, `etcd:...` (with an explicit /KEY) or `none`.
pub fn from_spec(spec: &str) -> Result<Box<dyn Arbiter>, ArbiterError> {
    from_spec_for_pair(spec, None)
}

/// [`from_spec`] for the pair whose backup listens on `backup_port`, which
/// names the default etcd key (`castor/pair-PORT`).
pub fn from_spec_for_pair(
    spec: &str,
    backup_port: Option<u16>,
) -> Result<Box<dyn Arbiter>, ArbiterError> {
    if spec == "none" {
        return Ok(Box::new(NoArbiter));
    }
    if let Some(rest) = spec.strip_prefix("etcd:") {
        let s = etcd::EtcdSpec::parse(rest, backup_port)?;
        return Ok(Box::new(etcd::EtcdArbiter::new(s)));
    }
    match spec.strip_prefix("local:") {
        Some(p) if !p.is_empty() => Ok(Box::new(LocalLock::new(p))),
        _ => Err(ArbiterError::Spec(spec.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!(from_spec("none").unwrap().describe(), "none");
        assert_eq!(from_spec("local:/x/y").unwrap().describe(), "local:/x/y");
        assert!(from_spec("local:").is_err());
        assert!(from_spec("etcd:foo").is_err());
        assert!(from_spec("etcd:http://h:2379").is_err(), "no key, no port");
        assert_eq!(
            from_spec_for_pair("etcd:http://h:2379", Some(7700))
                .unwrap()
                .describe(),
            "etcd:http://h:2379/castor/pair-7700?ttl=2s"
        );
    }
}
