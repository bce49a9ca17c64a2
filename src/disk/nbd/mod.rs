//! An NBD server (fixed newstyle, simple replies) over the write log.
//!
//! ```text
//! castor-nbd-accept ── accept ──► castor-nbd-N (one per client):
//!     handshake (deadline: handshake_timeout) ─► transmission:
//!     request ─► check ─► WriteLog (image + epoch log, fencing gate) ─► reply
//! ```
//!
//! Any NBD client can use a protected disk this way: QEMU (`-drive
//! file=nbd://HOST:PORT/NAME`), Xen's qdisk, qemu-io, nbdcopy, fio's nbd
//! engine. Each connection's thread owns its socket; the server keeps a
//! clone of each only to shut it down on [`NbdServer::stop`].
//!
//! Invariants: every read from a client has a deadline; a bad request gets
//! an NBD error and changes nothing; a client that vanishes mid-request
//! costs its thread and nothing else (a write is applied only once its
//! whole payload has arrived).

mod conn;
mod handshake;
pub mod proto;
mod transmission;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::addr::NbdAddr;
use super::log::WriteLog;
use conn::Conn;

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("binding NBD export to {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("NBD {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("NBD client vanished while sending its {what} ({got} of {want} bytes)")]
    Vanished {
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error("NBD client missed its deadline sending its {what} ({got} of {want} bytes)")]
    Deadline {
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error("NBD handshake: {0}")]
    Handshake(String),
    #[error("NBD protocol: {0}")]
    Protocol(String),
    #[error("NBD exports: {0}")]
    Config(String),
}

/// A named disk served by the server.
#[derive(Clone, Debug)]
pub struct Export {
    pub name: String,
    pub log: Arc<WriteLog>,
}

#[derive(Debug, Clone, Copy)]
pub struct ServerConfig {
    /// The whole handshake must finish within this.
    pub handshake_timeout: Duration,
    /// Longest a connection may sit between requests.
    pub idle_timeout: Duration,
    /// A request (header and payload) must arrive within this once begun;
    /// also bounds sending a reply.
    pub request_timeout: Duration,
    /// Largest READ/WRITE length (advertised as the maximum block size).
    pub max_request: u32,
    /// Connections beyond this are closed at once.
    pub max_connections: usize,
    /// How often idle connections and the acceptor look at the stop flag.
    pub poll_slice: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
            request_timeout: Duration::from_secs(30),
            max_request: 32 << 20,
            max_connections: 64,
            poll_slice: Duration::from_millis(200),
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> io::Result<Conn> {
        Ok(match self {
            Listener::Tcp(l) => Conn::tcp(l.accept()?.0),
            Listener::Unix(l, _) => Conn::unix(l.accept()?.0),
        })
    }
}

struct Shared {
    exports: Vec<Export>,
    cfg: ServerConfig,
    stop: AtomicBool,
    conns: Mutex<HashMap<u64, Conn>>,
    next_id: AtomicU64,
}

/// A running server; stops (closing every connection) on [`NbdServer::stop`]
/// or drop.
pub struct NbdServer {
    shared: Arc<Shared>,
    addr: String,
    unix_path: Option<PathBuf>,
    acceptor: Option<JoinHandle<()>>,
}

fn bind(addr: &NbdAddr) -> Result<(Listener, String), NbdError> {
    let bind_err = |source| NbdError::Bind {
        addr: addr.to_string(),
        source,
    };
    match addr {
        NbdAddr::Tcp(a) => {
            let l = TcpListener::bind(a.as_str()).map_err(bind_err)?;
            let local = l.local_addr().map_err(bind_err)?.to_string();
            Ok((Listener::Tcp(l), local))
        }
        NbdAddr::Unix(p) => {
            // A stale socket from an earlier run would make bind fail.
            if std::fs::symlink_metadata(p)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            {
                let _ = std::fs::remove_file(p);
            }
            let l = UnixListener::bind(p).map_err(bind_err)?;
            Ok((Listener::Unix(l, p.clone()), addr.to_string()))
        }
    }
}

impl NbdServer {
    /// Binds `addr` and serves `exports` (names must be distinct).
    pub fn start(
        addr: &NbdAddr,
        exports: Vec<Export>,
        cfg: ServerConfig,
    ) -> Result<NbdServer, NbdError> {
        if exports.is_empty() {
            return Err(NbdError::Config("no export to serve".into()));
        }
        for (i, e) in exports.iter().enumerate() {
            if exports[..i].iter().any(|o| o.name == e.name) {
                return Err(NbdError::Config(format!(
                    "export name {:?} used twice",
                    e.name
                )));
            }
        }
        let (listener, local) = bind(addr)?;
        let unix_path = match &listener {
            Listener::Unix(_, p) => Some(p.clone()),
            Listener::Tcp(_) => None,
        };
        let shared = Arc::new(Shared {
            exports,
            cfg,
            stop: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        });
        let s = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("castor-nbd-accept".into())
            .spawn(move || accept_loop(listener, s))
            .map_err(|source| NbdError::Io {
                op: "spawning the acceptor",
                source,
            })?;
        Ok(NbdServer {
            shared,
            addr: local,
            unix_path,
            acceptor: Some(acceptor),
        })
    }

    /// The bound address (`IP:PORT` with the real port, or `unix:PATH`).
    pub fn local_addr(&self) -> &str {
        &self.addr
    }

    pub fn exports(&self) -> &[Export] {
        &self.shared.exports
    }

    /// Stops accepting, closes every connection and waits for the acceptor.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for c in lock(&self.shared.conns).values() {
            c.shutdown();
        }
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("addr", &self.addr)
            .field("exports", &self.shared.exports.len())
            .finish()
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits up to `ms` for `fd` to become readable.
fn readable(fd: RawFd, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd on our stack for the duration of the call.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

fn accept_loop(listener: Listener, shared: Arc<Shared>) {
    let slice = shared.cfg.poll_slice.as_millis().clamp(1, 1000) as i32;
    while !shared.stop.load(Ordering::SeqCst) {
        if !readable(listener.fd(), slice) {
            continue;
        }
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("nbd: accept: {e}");
                continue;
            }
        };
        if lock(&shared.conns).len() >= shared.cfg.max_connections {
            tracing::warn!(
                "nbd: {} connections already; closing a new one",
                shared.cfg.max_connections
            );
            conn.shutdown();
            continue;
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        match conn.try_clone() {
            Ok(c) => {
                lock(&shared.conns).insert(id, c);
            }
            Err(e) => {
                tracing::warn!("nbd: cloning a connection: {e}");
                continue;
            }
        }
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("castor-nbd-{id}"))
            .spawn(move || {
                if let Err(e) = client(conn, &s) {
                    tracing::info!("nbd: connection {id}: {e}");
                }
                lock(&s.conns).remove(&id);
            });
        if let Err(e) = spawned {
            tracing::warn!("nbd: spawning a connection thread: {e}");
            if let Some(c) = lock(&shared.conns).remove(&id) {
                c.shutdown();
            }
        }
    }
}

fn client(mut conn: Conn, shared: &Shared) -> Result<(), NbdError> {
    let cfg = &shared.cfg;
    conn.set_nodelay();
    conn.set_write_timeout(cfg.request_timeout)
        .map_err(|source| NbdError::Io {
            op: "setting the write timeout",
            source,
        })?;
    let deadline = Instant::now() + cfg.handshake_timeout;
    let export = match handshake::negotiate(&mut conn, &shared.exports, cfg.max_request, deadline)?
    {
        handshake::Outcome::Serve(i) => &shared.exports[i],
        handshake::Outcome::Abort => return Ok(()),
    };
    let stopping = || shared.stop.load(Ordering::SeqCst);
    let r = transmission::serve(&mut conn, export, cfg, &stopping);
    conn.shutdown();
    r
}
