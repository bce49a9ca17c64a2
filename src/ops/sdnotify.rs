//! systemd's notify protocol (sd_notify(3)), written directly: one
//! datagram of `KEY=VALUE` lines to the unix socket named by
//! `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
//!
//! Used by `Type=notify` units: `READY=1` once castor serves (the backup
//! listens; the primary holds the arbiter and its first backup answered),
//! `WATCHDOG=1` every half `$WATCHDOG_USEC` from [`Watchdog`] while the
//! process's liveness check passes, `STOPPING=1` at shutdown. Without
//! `$NOTIFY_SOCKET` every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("$NOTIFY_SOCKET {path:?}: {op}: {source}")]
    Socket {
        path: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("$WATCHDOG_USEC {0:?} is not a positive number of microseconds")]
    WatchdogUsec(String),
    #[error("spawning the castor-watchdog thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Sends `state` (e.g. `"READY=1\nSTATUS=listening"`) to the service
/// manager. Ok(false) when not run under a notify-aware manager.
pub fn notify(state: &str) -> Result<bool, NotifyError> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let path = path.to_string_lossy().into_owned();
    send_to(&path, state)?;
    Ok(true)
}

/// Sends `state` to the notify socket `path`.
pub fn send_to(path: &str, state: &str) -> Result<(), NotifyError> {
    let err = |op| {
        move |source| NotifyError::Socket {
            path: path.to_string(),
            op,
            source,
        }
    };
    let sock = UnixDatagram::unbound().map_err(err("creating a datagram socket"))?;
    match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .map_err(err("naming the abstract socket"))?;
            sock.send_to_addr(state.as_bytes(), &addr)
        }
        None => sock.send_to(state.as_bytes(), path),
    }
    .map_err(err("sending"))?;
    Ok(())
}

/// Best effort: a failed notification is logged, never fatal (castor works
/// the same outside systemd).
pub fn notify_or_log(state: &str) {
    if let Err(e) = notify(state) {
        tracing::warn!("sd_notify {state:?}: {e}");
    }
}

/// The watchdog interval systemd asked for (`$WATCHDOG_USEC`, for this
/// process per `$WATCHDOG_PID`), if any.
pub fn watchdog_interval() -> Result<Option<Duration>, NotifyError> {
    let Ok(usec) = std::env::var("WATCHDOG_USEC") else {
        return Ok(None);
    };
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim() != std::process::id().to_string() {
            return Ok(None);
        }
    }
    match usec.trim().parse::<u64>() {
        Ok(u) if u > 0 => Ok(Some(Duration::from_micros(u))),
        _ => Err(NotifyError::WatchdogUsec(usec)),
    }
}

/// Sends `WATCHDOG=1` every half watchdog interval while `alive()` holds;
/// when it stops holding, pings stop and systemd restarts the unit after
/// the interval. Stops when dropped.
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts pinging if systemd asked for a watchdog; None otherwise.
    pub fn start(
        alive: impl Fn() -> bool + Send + 'static,
    ) -> Result<Option<Watchdog>, NotifyError> {
        let Some(every) = watchdog_interval()? else {
            return Ok(None);
        };
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let half = every / 2;
        let thread = std::thread::Builder::new()
            .name("castor-watchdog".into())
            .spawn(move || {
                let tick = Duration::from_millis(50).min(half);
                let mut since = Duration::ZERO;
                while !s.load(Ordering::Relaxed) {
                    if since >= half {
                        since = Duration::ZERO;
                        if alive() {
                            notify_or_log("WATCHDOG=1");
                        }
                    }
                    std::thread::sleep(tick);
                    since += tick;
                }
            })
            .map_err(NotifyError::Spawn)?;
        Ok(Some(Watchdog {
            stop,
            thread: Some(thread),
        }))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagram_reaches_a_path_socket_and_an_abstract_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("notify");
        let rx = UnixDatagram::bind(&p).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        send_to(p.to_str().unwrap(), "READY=1\nSTATUS=listening").unwrap();
        let mut buf = [0u8; 128];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=listening");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("castor-test-{}", std::process::id());
        let a = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&a).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        send_to(&format!("@{name}"), "WATCHDOG=1").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }

    #[test]
    fn a_missing_socket_is_a_named_error() {
        match send_to("/nonexistent/castor-notify", "READY=1") {
            Err(NotifyError::Socket { path, op, .. }) => {
                assert_eq!(path, "/nonexistent/castor-notify");
                assert_eq!(op, "sending");
            }
            other => panic!("{other:?}"),
        }
    }
}
