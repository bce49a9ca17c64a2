//! The backup's front door: keeps accepting connections until one primary
//! has authenticated, and refuses every connection that arrives while its
//! session runs.
//!
//! ```text
//! castor-accept ── poll(listener, 100 ms) ── accept ──┬─ serving?  → Error record "already serving", close
//!                                                     ├─ too many handshakes in progress → close
//!                                                     └─ castor-handshake thread (deadline) ─┐
//!  Door::primary ◄─────── first authenticated primary ◄──────────────────────────────────────┘
//!                         every failed handshake: logged (rate-limited), dropped
//! ```
//!
//! Invariants:
//! - A stranger costs the backup one thread and a few KiB until the
//!   handshake deadline at most: handshakes run concurrently (at most
//!   [`MAX_PENDING`]), each against one deadline for the whole exchange
//!   (not per read, so a peer trickling bytes gains nothing), and the
//!   handshake reader holds records of at most [`HANDSHAKE_MAX`] bytes.
//!   A silent or slow stranger therefore never delays a real primary.
//! - Exactly one session: the first handshake to complete claims the door;
//!   any later one is told "already serving" (even after it authenticated)
//!   and closed.
//! - Failed handshakes are logged at most once per [`LOG_EVERY`]; the rest
//!   are counted and summarised in the next line.

use std::io::{self, Read};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::transport::auth::Role;
use crate::transport::handshake::{self, HandshakeError, Psk};
use crate::transport::messages::Hello;
use crate::transport::record::{send_record, RecordError, RecordKind, RecordReader};
use crate::transport::seal::SealedWriter;
use crate::PAGE_SIZE;

/// Handshakes in progress at once; more connections are closed at once.
pub const MAX_PENDING: usize = 64;
/// Largest record a peer may send before it authenticated.
pub const HANDSHAKE_MAX: usize = 4096;
/// At most one log line per this long about dropped connections.
pub const LOG_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("listening socket: {0}")]
    Listener(#[source] io::Error),
    #[error("spawning the castor-accept thread: {0}")]
    Spawn(#[source] io::Error),
    #[error("the castor-accept thread ended")]
    Closed,
}

/// What a handshake must check before it proves the key.
#[derive(Debug, Clone)]
pub struct DoorConfig {
    pub psk: Psk,
    /// Largest guest memory a primary may ask the backup to hold.
    pub max_mem: u64,
    /// The whole handshake must complete within this.
    pub handshake_timeout: Duration,
    /// Log nothing about dropped connections.
    pub quiet: bool,
}

/// A primary that completed the handshake: its reader opens and its
/// writer seals every record with the session's keys.
pub struct Authenticated {
    pub peer: String,
    pub reader: RecordReader<TcpStream>,
    pub writer: SealedWriter<TcpStream>,
    pub hello: Hello,
}

/// Failed-handshake log, rate-limited.
struct DropLog {
    quiet: bool,
    last: Option<Instant>,
    suppressed: u64,
}

impl DropLog {
    fn dropped(&mut self, peer: &str, why: &str) {
        if self.quiet {
            return;
        }
        let now = Instant::now();
        if self.last.is_some_and(|t| now - t < LOG_EVERY) {
            self.suppressed += 1;
            return;
        }
        let more = match std::mem::take(&mut self.suppressed) {
            0 => String::new(),
            n => format!(" ({n} more dropped since the last report)"),
        };
        eprintln!("castor backup: dropped connection from {peer}: {why}{more}");
        self.last = Some(now);
    }

    fn summary(&mut self) {
        if !self.quiet && self.suppressed > 0 {
            eprintln!(
                "castor backup: {} more dropped connections not shown (one line per {} s)",
                std::mem::take(&mut self.suppressed),
                LOG_EVERY.as_secs()
            );
        }
    }
}

struct Shared {
    cfg: DoorConfig,
    stop: AtomicBool,
    pending: AtomicUsize,
    /// The peer being served, once a primary authenticated.
    serving: Mutex<Option<String>>,
    log: Mutex<DropLog>,
}

/// The accepting thread and what it found.
pub struct Door {
    shared: Arc<Shared>,
    found: Receiver<Authenticated>,
    thread: Option<JoinHandle<()>>,
}

impl Door {
    /// Starts accepting on (a clone of) `listener`.
    pub fn open(listener: &TcpListener, cfg: DoorConfig) -> Result<Door, AcceptError> {
        let l = listener.try_clone().map_err(AcceptError::Listener)?;
        l.set_nonblocking(true).map_err(AcceptError::Listener)?;
        let shared = Arc::new(Shared {
            log: Mutex::new(DropLog {
                quiet: cfg.quiet,
                last: None,
                suppressed: 0,
            }),
            cfg,
            stop: AtomicBool::new(false),
            pending: AtomicUsize::new(0),
            serving: Mutex::new(None),
        });
        let (tx, found) = channel();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("castor-accept".into())
            .spawn(move || accept_loop(&l, &s, &tx))
            .map_err(AcceptError::Spawn)?;
        Ok(Door {
            shared,
            found,
            thread: Some(thread),
        })
    }

    /// Waits for the first primary to authenticate; strangers are logged
    /// and dropped meanwhile. From then on the door refuses everyone.
    pub fn primary(&self) -> Result<Authenticated, AcceptError> {
        let a = self.found.recv().map_err(|_| AcceptError::Closed)?;
        self.shared.log.lock().unwrap().summary();
        Ok(a)
    }
}

impl Drop for Door {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.shared.log.lock().unwrap().summary();
    }
}

/// Waits up to 100 ms for a connection on `l`.
fn readable(l: &TcpListener) -> bool {
    let mut p = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, 100) > 0 }
}

fn accept_loop(l: &TcpListener, s: &Arc<Shared>, found: &Sender<Authenticated>) {
    while !s.stop.load(Ordering::Relaxed) {
        if !readable(l) {
            continue;
        }
        let (stream, addr) = match l.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::warn!("accepting a connection: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let peer = addr.to_string();
        if stream.set_nonblocking(false).is_err() {
            continue;
        }
        if let Some(p) = s.serving.lock().unwrap().clone() {
            refuse(SealedWriter::new(stream), &busy_message(&p));
            s.log.lock().unwrap().dropped(&peer, "a session is running");
            continue;
        }
        if s.pending.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING {
            s.pending.fetch_sub(1, Ordering::SeqCst);
            s.log
                .lock()
                .unwrap()
                .dropped(&peer, "too many handshakes in progress");
            continue;
        }
        let (s, found) = (s.clone(), found.clone());
        let spawned = std::thread::Builder::new()
            .name("castor-handshake".into())
            .spawn(move || {
                let r = handshake(stream, &peer, &s.cfg);
                s.pending.fetch_sub(1, Ordering::SeqCst);
                match r {
                    Ok(a) => claim(&s, a, &found),
                    Err(why) => s.log.lock().unwrap().dropped(&peer, &why),
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("spawning a handshake thread: {e}");
        }
    }
}

/// The first authenticated primary gets the session; a later one is told.
fn claim(s: &Shared, a: Authenticated, found: &Sender<Authenticated>) {
    let mut serving = s.serving.lock().unwrap();
    if let Some(p) = serving.as_ref() {
        let msg = busy_message(p);
        drop(serving);
        refuse(a.writer, &msg);
        s.log
            .lock()
            .unwrap()
            .dropped(&a.peer, "a session is running");
        return;
    }
    *serving = Some(a.peer.clone());
    let _ = found.send(a);
}

fn busy_message(peer: &str) -> String {
    format!(
        "this backup is already serving a primary ({peer}); one backup protects one domain: \
         give this one another backup, or stop the other primary first"
    )
}

/// Sends one Error record (bounded by a write timeout) and closes.
fn refuse(mut s: SealedWriter<TcpStream>, msg: &str) {
    let _ = s.get_ref().set_write_timeout(Some(Duration::from_secs(1)));
    let _ = send_record(&mut s, RecordKind::Error, 0, msg.as_bytes());
    let _ = s.get_ref().shutdown(std::net::Shutdown::Both);
}

/// The stream under one deadline for every read of the handshake.
struct Deadline {
    s: TcpStream,
    until: Instant,
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.s.set_read_timeout(Some(left))?;
        self.s.read(buf).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock => io::ErrorKind::TimedOut.into(),
            _ => e,
        })
    }
}

/// Runs the server side of the handshake under the deadline; the reason
/// it failed, for the log.
fn handshake(stream: TcpStream, peer: &str, cfg: &DoorConfig) -> Result<Authenticated, String> {
    let _ = stream.set_nodelay(true);
    let io_err = |e: io::Error| format!("socket: {e}");
    let (local, far) = (stream.local_addr(), stream.peer_addr());
    let (local, far) = (local.map_err(io_err)?, far.map_err(io_err)?);
    if let Err(e) = cfg.psk.check_link(local.ip(), far.ip()) {
        let mut w = stream;
        handshake::send_error(&mut w, &e.to_string());
        return Err(e.to_string());
    }
    stream
        .set_write_timeout(Some(cfg.handshake_timeout))
        .map_err(io_err)?;
    let mut writer = stream.try_clone().map_err(io_err)?;
    let until = Instant::now() + cfg.handshake_timeout;
    let mut reader = RecordReader::with_limit(Deadline { s: stream, until }, HANDSHAKE_MAX);
    let max_mem = cfg.max_mem;
    let (hello, keys) = handshake::server(&mut reader, &mut writer, &cfg.psk, |h| {
        if h.page_size as usize != PAGE_SIZE {
            return Err(format!(
                "page size {} unsupported (castor uses {PAGE_SIZE})",
                h.page_size
            ));
        }
        match h.pages.checked_mul(PAGE_SIZE as u64) {
            Some(b) if h.pages > 0 && b <= max_mem => Ok(()),
            _ => Err(format!(
                "domain of {} pages exceeds this backup's --max-mem of {} bytes",
                h.pages, max_mem
            )),
        }
    })
    .map_err(|e| describe(&e, cfg.handshake_timeout))?;
    let mut reader = reader.map_inner(|d| d.s).unlimited();
    reader.get_ref().set_read_timeout(None).map_err(io_err)?;
    writer.set_write_timeout(None).map_err(io_err)?;
    let (sealer, opener) = keys.split(Role::Backup);
    reader.authenticate(opener);
    let mut writer = SealedWriter::new(writer);
    writer.authenticate(sealer);
    Ok(Authenticated {
        peer: peer.to_string(),
        reader,
        writer,
        hello,
    })
}

fn describe(e: &HandshakeError, deadline: Duration) -> String {
    let timed_out = |io: &io::Error| io.kind() == io::ErrorKind::TimedOut;
    match e {
        HandshakeError::Record(RecordError::Io(io)) | HandshakeError::Io(io) if timed_out(io) => {
            format!(
                "no complete handshake within the handshake deadline ({} ms)",
                deadline.as_millis()
            )
        }
        HandshakeError::Record(RecordError::Eof) => "closed before completing the handshake".into(),
        e => format!("handshake failed: {e}"),
    }
}
