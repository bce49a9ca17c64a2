//! A minimal HTTP/1.x server for `--metrics ADDR`: `GET /metrics`
//! (Prometheus text format 0.0.4) and `GET /status` (JSON), one thread
//! (`castor-metrics`), one connection at a time, `Connection: close`.
//!
//! Scrapes are small and rare (seconds apart), so a single thread serving
//! connections in turn is enough; every socket gets read and write
//! deadlines ([`IO_DEADLINE`]), so a client that connects and stalls holds
//! the server for at most that long, and never touches the engine. Also a
//! client ([`get`]) for `castor status` and the tests.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::telemetry::Telemetry;

/// Deadline of every read and write on a connection.
pub const IO_DEADLINE: Duration = Duration::from_secs(2);
/// Largest request head accepted.
const MAX_HEAD: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("--metrics {addr}: binding the metrics listener: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("spawning the castor-metrics thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("{addr}: {op}: {source}")]
    Client {
        addr: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr}: answered {status:?}")]
    Status { addr: String, status: String },
}

/// The running metrics server; stops its thread when dropped.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// The bound address (port 0 in `--metrics` picks a free port).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept call with a connection of our own.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Binds `addr` and serves `t` on a `castor-metrics` thread.
pub fn serve(addr: &str, t: Arc<Telemetry>) -> Result<Server, HttpError> {
    let l = TcpListener::bind(addr).map_err(|source| HttpError::Bind {
        addr: addr.to_string(),
        source,
    })?;
    let local = l.local_addr().map_err(|source| HttpError::Bind {
        addr: addr.to_string(),
        source,
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let thread = std::thread::Builder::new()
        .name("castor-metrics".into())
        .spawn(move || {
            for conn in l.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(c) = conn {
                    if let Err(e) = answer(c, &t) {
                        tracing::debug!("metrics client: {e}");
                    }
                }
            }
        })
        .map_err(HttpError::Spawn)?;
    Ok(Server {
        addr: local,
        stop,
        thread: Some(thread),
    })
}

/// Reads one request head and answers it.
fn answer(mut c: TcpStream, t: &Telemetry) -> std::io::Result<()> {
    c.set_read_timeout(Some(IO_DEADLINE))?;
    c.set_write_timeout(Some(IO_DEADLINE))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = c.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD {
            return respond(
                &mut c,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            );
        }
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => respond(
            &mut c,
            "200 OK",
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            &t.render(),
        ),
        ("GET", "/status") => {
            let body = serde_json::to_string_pretty(&t.status()).expect("status serialises");
            respond(&mut c, "200 OK", "application/json", &(body + "\n"))
        }
        ("GET", "/") => respond(
            &mut c,
            "200 OK",
            "text/plain; charset=utf-8",
            "castor: /metrics (Prometheus), /status (JSON)\n",
        ),
        ("GET", _) => respond(&mut c, "404 Not Found", "text/plain", "not found\n"),
        _ => respond(&mut c, "405 Method Not Allowed", "text/plain", "only GET\n"),
    }
}

fn respond(c: &mut TcpStream, status: &str, ctype: &str, body: &str) -> std::io::Result<()> {
    write!(
        c,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    c.flush()
}

/// `GET path` from `addr` with a connect, read and write deadline of
/// `deadline` each; the body of a 200 answer.
pub fn get(addr: &str, path: &str, deadline: Duration) -> Result<String, HttpError> {
    let err = |op| {
        move |source| HttpError::Client {
            addr: addr.to_string(),
            op,
            source,
        }
    };
    let sa = addr
        .to_socket_addrs()
        .map_err(err("resolving"))?
        .next()
        .ok_or_else(|| {
            err("resolving")(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no address",
            ))
        })?;
    let mut c = TcpStream::connect_timeout(&sa, deadline).map_err(err("connecting"))?;
    c.set_read_timeout(Some(deadline))
        .map_err(err("connecting"))?;
    c.set_write_timeout(Some(deadline))
        .map_err(err("connecting"))?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(err("sending the request"))?;
    let mut resp = String::new();
    c.read_to_string(&mut resp)
        .map_err(err("reading the answer"))?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let status = head.lines().next().unwrap_or("").to_string();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(HttpError::Status {
            addr: addr.to_string(),
            status,
        });
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::telemetry::Role;

    #[test]
    fn serves_metrics_status_and_refuses_the_rest() {
        let t = Arc::new(Telemetry::new(Role::Backup));
        t.epoch_committed(4, 2, 100);
        let s = serve("127.0.0.1:0", t).unwrap();
        let a = s.local_addr().to_string();
        let m = get(&a, "/metrics", IO_DEADLINE).unwrap();
        assert!(m.contains("castor_epochs_total 1\n"), "{m}");
        let st: serde_json::Value =
            serde_json::from_str(&get(&a, "/status", IO_DEADLINE).unwrap()).unwrap();
        assert_eq!(st["role"], "backup");
        assert_eq!(st["epoch"], 4);
        match get(&a, "/nothing", IO_DEADLINE) {
            Err(HttpError::Status { status, .. }) => assert!(status.contains("404"), "{status}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_stalled_client_does_not_stop_the_next_scrape() {
        let t = Arc::new(Telemetry::new(Role::Primary));
        let s = serve("127.0.0.1:0", t).unwrap();
        let a = s.local_addr().to_string();
        // Connects and never sends: the server gives up on it after its
        // read deadline and serves the next client.
        let _stalled = TcpStream::connect(&a).unwrap();
        let t0 = std::time::Instant::now();
        let m = get(&a, "/metrics", IO_DEADLINE * 3).unwrap();
        assert!(m.contains("castor_role"), "{m}");
        assert!(t0.elapsed() < IO_DEADLINE * 2, "{:?}", t0.elapsed());
    }
}
