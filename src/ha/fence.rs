//! The fence hook: a user command (a STONITH agent such as fence_ipmilan,
//! or a script) run after the backup won the arbiter and before it
//! activates, to make sure the old primary is really gone.

use std::process::Command;

use crate::ha::arbiter::FencingToken;

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("running the fence command {cmd:?}: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the fence command {cmd:?} failed ({status}); not activating: the old primary may still be running")]
    Failed { cmd: String, status: String },
}

/// Runs `sh -c CMD` with `CASTOR_FENCING_TOKEN` and `CASTOR_PEER` (the old
/// primary's address) in its environment; Ok only on exit status 0.
pub fn run(cmd: &str, token: FencingToken, peer: &str) -> Result<(), FenceError> {
    let st = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("CASTOR_FENCING_TOKEN", token.0.to_string())
        .env("CASTOR_PEER", peer)
        .status()
        .map_err(|source| FenceError::Spawn {
            cmd: cmd.to_string(),
            source,
        })?;
    if st.success() {
        Ok(())
    } else {
        Err(FenceError::Failed {
            cmd: cmd.to_string(),
            status: st.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_token_and_peer_and_reports_failure() {
        run(
            r#"test "$CASTOR_FENCING_TOKEN" = 7 && test "$CASTOR_PEER" = 1.2.3.4:5"#,
            FencingToken(7),
            "1.2.3.4:5",
        )
        .unwrap();
        let e = run("exit 3", FencingToken(7), "p").unwrap_err();
        assert!(e.to_string().contains("exit status: 3"), "{e}");
    }
}
