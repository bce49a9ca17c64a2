//! The fence hook: a user command (a STONITH agent such as fence_ipmilan,
//! or a script) run after the backup won the arbiter and before it
//! activates, to make sure the old primary is really gone.

use std::process::Command;
use std::time::{Duration, Instant};

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
    #[error("the fence command {cmd:?} did not finish within {} s and was killed; not activating: the old primary may still be running", .timeout.as_secs_f64())]
    Timeout { cmd: String, timeout: Duration },
}

/// Runs `sh -c CMD` with `CASTOR_FENCING_TOKEN` and `CASTOR_PEER` (the old
/// primary's address) in its environment; Ok only on exit status 0 within
/// `timeout` (a hung STONITH agent must not hang the backup forever; past
/// the timeout it is killed and the fence counts as failed).
pub fn run(
    cmd: &str,
    token: FencingToken,
    peer: &str,
    timeout: Duration,
) -> Result<(), FenceError> {
    let spawn_err = |source| FenceError::Spawn {
        cmd: cmd.to_string(),
        source,
    };
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("CASTOR_FENCING_TOKEN", token.0.to_string())
        .env("CASTOR_PEER", peer)
        .spawn()
        .map_err(spawn_err)?;
    let deadline = Instant::now() + timeout;
    let st = loop {
        if let Some(st) = child.try_wait().map_err(spawn_err)? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(FenceError::Timeout {
                cmd: cmd.to_string(),
                timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    };
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

    const LONG: Duration = Duration::from_secs(30);

    #[test]
    fn passes_token_and_peer_and_reports_failure() {
        run(
            r#"test "$CASTOR_FENCING_TOKEN" = 7 && test "$CASTOR_PEER" = 1.2.3.4:5"#,
            FencingToken(7),
            "1.2.3.4:5",
            LONG,
        )
        .unwrap();
        let e = run("exit 3", FencingToken(7), "p", LONG).unwrap_err();
        assert!(e.to_string().contains("exit status: 3"), "{e}");
    }

    #[test]
    fn a_hung_fence_command_is_killed_and_fails() {
        let t = Instant::now();
        let e = run(
            "exec sleep 30",
            FencingToken(1),
            "p",
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(matches!(e, FenceError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
