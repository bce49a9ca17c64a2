//! Running Xen's `xl` toolstack command with a deadline.
//!
//! `xl create` forks a monitor that keeps running for the domain's life
//! and inherits the output descriptors, so its output goes to a log file
//! (reading a pipe to its end would wait for the domain to die) and only
//! the first process's exit is awaited, at most `timeout`; past it the
//! process is killed and the error says so.

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// The toolstack command; `$CASTOR_XL` overrides (another path or a
/// wrapper).
pub fn program() -> String {
    std::env::var("CASTOR_XL").unwrap_or_else(|_| "xl".into())
}

#[derive(Debug, thiserror::Error)]
pub enum XlError {
    #[error("starting `{cmd}` failed: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` log file {path}: {source}")]
    Log {
        cmd: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` did not finish within {waited:?} (killed); its output: {output}")]
    Timeout {
        cmd: String,
        waited: Duration,
        output: String,
    },
    #[error("`{cmd}` exited with {status}; its output: {output}")]
    Failed {
        cmd: String,
        status: std::process::ExitStatus,
        output: String,
    },
}

/// Runs `program args...`, its output appended to `log`; Ok once it exits
/// 0 within `timeout`.
pub fn run(program: &str, args: &[&str], log: &Path, timeout: Duration) -> Result<(), XlError> {
    let (child, cmd) = spawn(program, args, log, Stdio::null())?;
    wait(child, cmd, log, timeout)
}

/// What [`run_fed`] returns once the command was started: the command's
/// outcome and the feeder's.
pub type Fed<T, E> = (Result<(), XlError>, Result<T, E>);

/// [`run`], with the command's standard input fed by `feed` on a thread of
/// its own (the pipe closes when `feed` returns, so the command sees the
/// end of its input, or a truncated one after an error). Returns both
/// outcomes: the command's, and `feed`'s, whose error (other than a broken
/// pipe after the command gave up) is usually the cause. A command past
/// its deadline is killed, which breaks the pipe under `feed`.
pub fn run_fed<T: Send, E: Send>(
    program: &str,
    args: &[&str],
    log: &Path,
    timeout: Duration,
    feed: impl FnOnce(ChildStdin) -> Result<T, E> + Send,
) -> Result<Fed<T, E>, XlError> {
    let (mut child, cmd) = spawn(program, args, log, Stdio::piped())?;
    let stdin = child.stdin.take().expect("stdin is piped");
    Ok(std::thread::scope(|s| {
        let feeder = s.spawn(move || feed(stdin));
        let ran = wait(child, cmd, log, timeout);
        let fed = match feeder.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        (ran, fed)
    }))
}

/// Starts the command with its output appended to `log`.
fn spawn(
    program: &str,
    args: &[&str],
    log: &Path,
    stdin: Stdio,
) -> Result<(Child, String), XlError> {
    let cmd = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let log_err = |source| XlError::Log {
        cmd: cmd.clone(),
        path: log.to_path_buf(),
        source,
    };
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(log_err)?;
    let err = out.try_clone().map_err(log_err)?;
    let child = Command::new(program)
        .args(args)
        .stdin(stdin)
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|source| XlError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    Ok((child, cmd))
}

/// Waits for the command's first process to exit, at most `timeout`
/// (then kills it).
fn wait(mut child: Child, cmd: String, log: &Path, timeout: Duration) -> Result<(), XlError> {
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(XlError::Timeout {
                    cmd,
                    waited: timeout,
                    output: tail(log),
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(source) => return Err(XlError::Spawn { cmd, source }),
        }
    };
    if status.success() {
        Ok(())
    } else {
        Err(XlError::Failed {
            cmd,
            status,
            output: tail(log),
        })
    }
}

/// The last lines of the log (at most ~2 KiB), for an error message.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let start = text.len().saturating_sub(2048);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text[start..].trim().replace('\n', " | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_failure_and_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("xl.log");
        let t = Duration::from_secs(10);
        run("sh", &["-c", "echo made"], &log, t).unwrap();
        assert!(std::fs::read_to_string(&log).unwrap().contains("made"));
        let e = run("sh", &["-c", "echo no such domain >&2; exit 3"], &log, t).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, XlError::Failed { .. }), "{m}");
        assert!(m.contains("no such domain") && m.contains('3'), "{m}");
        let t0 = Instant::now();
        let e = run("sleep", &["30"], &log, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, XlError::Timeout { .. }), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        let e = run("/nonexistent/xl", &[], &log, t).unwrap_err();
        assert!(matches!(e, XlError::Spawn { .. }), "{e}");
    }

    #[test]
    fn fed_input_reaches_the_command_and_both_outcomes_are_returned() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("xl.log");
        let got = dir.path().join("got");
        let g = got.to_str().unwrap().to_string();
        let t = Duration::from_secs(10);
        let sh = format!("cat > {g}");
        let (ran, fed) = run_fed("sh", &["-c", &sh], &log, t, |mut i| {
            i.write_all(b"stream bytes")?;
            Ok::<_, std::io::Error>(12)
        })
        .unwrap();
        ran.unwrap();
        assert_eq!(fed.unwrap(), 12);
        assert_eq!(std::fs::read(&got).unwrap(), b"stream bytes");
        // The feeder fails part-way: the command sees the end of its input.
        let (ran, fed) = run_fed("sh", &["-c", &sh], &log, t, |mut i| {
            i.write_all(b"half")?;
            Err::<(), _>(std::io::Error::other("bad page table"))
        })
        .unwrap();
        ran.unwrap();
        assert_eq!(fed.unwrap_err().to_string(), "bad page table");
        assert_eq!(std::fs::read(&got).unwrap(), b"half");
        // The command gives up: the feeder's writes break, nothing hangs.
        let (ran, fed) = run_fed("sh", &["-c", "exit 3"], &log, t, |mut i| {
            let mb = vec![0u8; 1 << 20];
            for _ in 0..64 {
                i.write_all(&mb)?;
            }
            Ok::<_, std::io::Error>(())
        })
        .unwrap();
        assert!(matches!(ran, Err(XlError::Failed { .. })), "{ran:?}");
        assert_eq!(fed.unwrap_err().kind(), std::io::ErrorKind::BrokenPipe);
        // Past the deadline the command is killed and the feeder released.
        let t0 = Instant::now();
        let (ran, fed) = run_fed(
            "sleep",
            &["30"],
            &log,
            Duration::from_millis(300),
            |mut i| {
                let mb = vec![0u8; 1 << 20];
                for _ in 0..64 {
                    i.write_all(&mb)?;
                }
                Ok::<_, std::io::Error>(())
            },
        )
        .unwrap();
        assert!(matches!(ran, Err(XlError::Timeout { .. })), "{ran:?}");
        assert!(fed.is_err());
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    }

    /// A daemon child keeping the output open does not hold the caller.
    #[test]
    fn a_forked_monitor_does_not_hold_the_call() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("xl.log");
        let t0 = Instant::now();
        run(
            "sh",
            &["-c", "(sleep 3; echo late) & echo created"],
            &log,
            Duration::from_secs(10),
        )
        .unwrap();
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }
}
