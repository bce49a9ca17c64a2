//! `--arbiter SPEC`, shared by `protect` and `backup --activate`.

use castor::ha::arbiter::{self, Arbiter};

/// `--arbiter SPEC`, or the pair's default local lock named by the
/// backup's port. Warns when the arbiter is `none`.
pub fn make_arbiter(spec: Option<&str>, backup_port: u16) -> Result<Box<dyn Arbiter>, String> {
    let a = match spec {
        Some(s) => arbiter::from_spec_for_pair(s, (backup_port > 0).then_some(backup_port))
            .map_err(|e| e.to_string())?,
        None => Box::new(arbiter::LocalLock::new(arbiter::default_local_path(
            backup_port,
        ))),
    };
    if a.describe() == "none" {
        eprintln!("castor: {}", arbiter::NONE_WARNING);
    }
    Ok(a)
}
