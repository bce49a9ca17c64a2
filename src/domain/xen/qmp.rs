//! QEMU's device state through QMP, for an HVM guest with a device model.
//!
//! libxl starts qemu-xen with a QMP monitor on `/var/run/xen/qmp-libxl-DOMID`
//! and, to checkpoint the device model (Remus, COLO:
//! `libxl_dom_suspend.c`, `libxl_qmp.c`), sends `stop` and
//! `xen-save-devices-state` (QEMU writes its device state, no RAM, to a
//! file), and `cont` when the guest resumes. castor does the same inside
//! each pause: [`DeviceModel::save`] after the guest is suspended,
//! [`DeviceModel::cont`] before it resumes. `live: false`: the checkpoint
//! is not a migration, so QEMU keeps its block devices active.
//!
//! Each pause opens its own connection, used for `save` and the `cont`
//! that ends the pause, and closed then: QEMU serves one client per
//! monitor socket, and libxl, which connects per operation, must reach it
//! between pauses. Every read and write is bounded by the deadline; each
//! error names the call and the domid.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Bound on one QMP call (QEMU's device-state save is milliseconds).
pub const QMP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("domain {domid}: connecting to QEMU's QMP socket {path}: {source}")]
    Connect {
        domid: u32,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("domain {domid}: QMP {call}: {source}")]
    Io {
        domid: u32,
        call: &'static str,
        source: std::io::Error,
    },
    #[error("domain {domid}: QMP {call}: no answer within {timeout:?}")]
    Timeout {
        domid: u32,
        call: &'static str,
        timeout: Duration,
    },
    #[error("domain {domid}: QMP {call} failed: {reply}")]
    Refused {
        domid: u32,
        call: &'static str,
        reply: String,
    },
    #[error("domain {domid}: QMP {call}: unreadable reply {reply:?}")]
    Reply {
        domid: u32,
        call: &'static str,
        reply: String,
    },
    #[error("domain {domid}: reading QEMU's device state from {path}: {source}")]
    File {
        domid: u32,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// libxl's QMP socket of a domain's device model.
pub fn socket_path(domid: u32) -> PathBuf {
    PathBuf::from(format!("/var/run/xen/qmp-libxl-{domid}"))
}

/// Whether the domain has a libxl-started QEMU device model.
pub fn has_device_model(domid: u32) -> bool {
    socket_path(domid).exists()
}

/// A domain's device model, reached through QMP.
pub struct DeviceModel {
    domid: u32,
    timeout: Duration,
    /// Where QEMU writes the device state (dom0's tmpfs).
    file: PathBuf,
    /// The connection of the current pause (from `save` to `cont`).
    session: Option<Session>,
}

impl DeviceModel {
    pub fn new(domid: u32, timeout: Duration) -> DeviceModel {
        DeviceModel {
            domid,
            timeout,
            file: std::env::temp_dir().join(format!("castor-qemu-state-{domid}")),
            session: None,
        }
    }

    /// Stops the device model and returns its device state
    /// (`stop`, `xen-save-devices-state` with `live: false`). The
    /// connection is kept for the [`cont`](Self::cont) that follows.
    pub fn save(&mut self) -> Result<Vec<u8>, QmpError> {
        self.session = None;
        let q = self
            .session
            .insert(Session::open(self.domid, self.timeout)?);
        q.call("stop", serde_json::json!({"execute": "stop"}))?;
        let _ = std::fs::remove_file(&self.file);
        let cmd = serde_json::json!({
            "execute": "xen-save-devices-state",
            "arguments": {"filename": self.file.to_string_lossy(), "live": false},
        });
        q.call("xen-save-devices-state", cmd)?;
        let blob = std::fs::read(&self.file).map_err(|source| QmpError::File {
            domid: self.domid,
            path: self.file.clone(),
            source,
        })?;
        let _ = std::fs::remove_file(&self.file);
        Ok(blob)
    }

    /// Lets the device model run again (`cont`), on the connection
    /// [`save`](Self::save) opened if there is one; the connection is then
    /// closed, so that libxl can reach QEMU between pauses.
    pub fn cont(&mut self) -> Result<(), QmpError> {
        let mut q = match self.session.take() {
            Some(q) => q,
            None => Session::open(self.domid, self.timeout)?,
        };
        q.call("cont", serde_json::json!({"execute": "cont"}))
    }
}

/// One QMP connection past its greeting and capabilities negotiation.
struct Session {
    domid: u32,
    deadline: Instant,
    timeout: Duration,
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Session {
    fn open(domid: u32, timeout: Duration) -> Result<Session, QmpError> {
        Self::open_at(domid, socket_path(domid), timeout)
    }

    fn open_at(domid: u32, path: PathBuf, timeout: Duration) -> Result<Session, QmpError> {
        let s = UnixStream::connect(&path).map_err(|source| QmpError::Connect {
            domid,
            path,
            source,
        })?;
        let io = |source| QmpError::Io {
            domid,
            call: "connect",
            source,
        };
        let w = s.try_clone().map_err(io)?;
        let mut q = Session {
            domid,
            deadline: Instant::now() + timeout,
            timeout,
            r: BufReader::new(s),
            w,
        };
        let greeting = q.line("greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Reply {
                domid,
                call: "greeting",
                reply: greeting.to_string(),
            });
        }
        q.call(
            "qmp_capabilities",
            serde_json::json!({"execute": "qmp_capabilities"}),
        )?;
        Ok(q)
    }

    /// Sends one command and waits for its answer (events are skipped).
    fn call(&mut self, call: &'static str, cmd: Value) -> Result<(), QmpError> {
        self.deadline = Instant::now() + self.timeout;
        let mut text = cmd.to_string();
        text.push('\n');
        self.w
            .set_write_timeout(Some(self.timeout))
            .and_then(|()| self.w.write_all(text.as_bytes()))
            .map_err(|source| QmpError::Io {
                domid: self.domid,
                call,
                source,
            })?;
        loop {
            let v = self.line(call)?;
            if v.get("return").is_some() {
                return Ok(());
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Refused {
                    domid: self.domid,
                    call,
                    reply: e.to_string(),
                });
            }
            if v.get("event").is_none() {
                return Err(QmpError::Reply {
                    domid: self.domid,
                    call,
                    reply: v.to_string(),
                });
            }
        }
    }

    /// One JSON line, read before the deadline.
    fn line(&mut self, call: &'static str) -> Result<Value, QmpError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        let timeout = QmpError::Timeout {
            domid: self.domid,
            call,
            timeout: self.timeout,
        };
        if left.is_zero() {
            return Err(timeout);
        }
        let mut line = String::new();
        let r = self
            .r
            .get_ref()
            .set_read_timeout(Some(left))
            .and_then(|()| self.r.read_line(&mut line));
        match r {
            Ok(0) => Err(QmpError::Io {
                domid: self.domid,
                call,
                source: std::io::ErrorKind::UnexpectedEof.into(),
            }),
            Ok(_) => serde_json::from_str(&line).map_err(|_| QmpError::Reply {
                domid: self.domid,
                call,
                reply: line.trim_end().to_string(),
            }),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(timeout)
            }
            Err(source) => Err(QmpError::Io {
                domid: self.domid,
                call,
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake QEMU on a socket in a temporary directory, answering
    /// with `replies` (one per line read after the greeting).
    fn serve(dir: &std::path::Path, greeting: &'static str, replies: Vec<&'static str>) -> PathBuf {
        let path = dir.join("qmp");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            w.write_all(greeting.as_bytes()).unwrap();
            for reply in replies {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    return;
                }
                w.write_all(reply.as_bytes()).unwrap();
            }
            // Then silence, until the client goes.
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) {}
        });
        path
    }

    fn session_at(path: &std::path::Path, timeout: Duration) -> Result<Session, QmpError> {
        Session::open_at(7, path.to_path_buf(), timeout)
    }

    const GREETING: &str = "{\"QMP\": {\"version\": {}}}\n";

    #[test]
    fn a_call_skips_events_and_reads_its_return() {
        let dir = tempfile::tempdir().unwrap();
        let path = serve(
            dir.path(),
            GREETING,
            vec![
                "{\"return\": {}}\n",
                "{\"event\": \"STOP\"}\n{\"return\": {}}\n",
            ],
        );
        let mut q = session_at(&path, Duration::from_secs(5)).unwrap();
        q.call("stop", serde_json::json!({"execute": "stop"}))
            .unwrap();
    }

    #[test]
    fn an_error_reply_names_the_call_and_domid() {
        let dir = tempfile::tempdir().unwrap();
        let path = serve(
            dir.path(),
            GREETING,
            vec![
                "{\"return\": {}}\n",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}}\n",
            ],
        );
        let mut q = session_at(&path, Duration::from_secs(5)).unwrap();
        let e = q
            .call("xen-save-devices-state", serde_json::json!({}))
            .unwrap_err();
        let t = e.to_string();
        assert!(matches!(e, QmpError::Refused { .. }), "{t}");
        assert!(
            t.contains("domain 7") && t.contains("xen-save-devices-state"),
            "{t}"
        );
    }

    #[test]
    fn silence_is_a_timeout_and_garbage_an_unreadable_reply() {
        let dir = tempfile::tempdir().unwrap();
        let path = serve(dir.path(), GREETING, vec!["{\"return\": {}}\n"]);
        let mut q = session_at(&path, Duration::from_millis(300)).unwrap();
        let t0 = Instant::now();
        let e = q.call("cont", serde_json::json!({})).unwrap_err();
        assert!(matches!(e, QmpError::Timeout { call: "cont", .. }), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        let dir = tempfile::tempdir().unwrap();
        let path = serve(dir.path(), "not json\n", vec![]);
        assert!(matches!(
            session_at(&path, Duration::from_secs(5)),
            Err(QmpError::Reply {
                call: "greeting",
                ..
            })
        ));
    }

    #[test]
    fn no_socket_is_a_connect_error_naming_the_path() {
        let e = DeviceModel::new(4_000_000, Duration::from_secs(1))
            .save()
            .unwrap_err();
        assert!(e.to_string().contains("qmp-libxl-4000000"), "{e}");
    }
}
