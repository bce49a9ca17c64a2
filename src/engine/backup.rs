//! The backup: accepts one primary, receives its checkpoints, acknowledges
//! each once committed, and saves the committed replica when the stream ends
//! or breaks.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::digest::Digest;
use crate::engine::accept::{Authenticated, Door, DoorConfig};
use crate::engine::receiver::{Event, Receiver};
use crate::engine::replica::{self, Meta, ReplicaError};
use crate::ha::detector::{Liveness, Watchdog};
use crate::transport::handshake::{HandshakeError, Psk};
use crate::transport::messages::Hello;
use crate::transport::record::{send_record, RecordError, RecordKind};
use crate::transport::seal::{ControlWriter, SealedWriter};
use crate::transport::{select, RecordSource, TransportKind};
use crate::PAGE_SIZE;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("accepting a connection: {0}")]
    Accept(std::io::Error),
    #[error("handshake with {peer} failed: {source}")]
    Handshake {
        peer: String,
        #[source]
        source: HandshakeError,
    },
    #[error("transport with {peer}: {source}")]
    Transport {
        peer: String,
        #[source]
        source: crate::transport::select::SetupError,
    },
    #[error("accepting a primary: {0}")]
    Door(#[from] crate::engine::accept::AcceptError),
    #[error("allocating the replica: {0}")]
    Alloc(#[from] crate::domain::DomainError),
    #[error("saving the replica: {0}")]
    Save(#[from] ReplicaError),
    #[error("the replica disks are not at a committed epoch, nothing saved: {0}")]
    Disks(#[from] crate::disk::session::SessionError),
}

#[derive(Debug, Clone)]
pub struct BackupConfig {
    pub state_dir: PathBuf,
    pub psk: Psk,
    /// Largest guest memory a primary may ask us to hold.
    pub max_mem: u64,
    pub quiet: bool,
    /// Suspect the primary after this long without any record from it
    /// (see [`crate::ha::detector::DEFAULT_TIMEOUT`]).
    pub heartbeat_timeout: Duration,
    /// Send a heartbeat to the primary this often.
    pub heartbeat_interval: Duration,
    /// FOR TESTS ONLY (`castor backup --test-ack-delay`): send each ack this
    /// long after the epoch was committed, so a test can tell "output
    /// produced" from "ack sent" by a visible margin. Zero in real use.
    pub ack_delay: Duration,
    /// A connecting primary must complete the handshake within this.
    pub handshake_timeout: Duration,
    /// The second heartbeat path: beacons of the session's primary also
    /// count as signs of life (see [`crate::ha::beacon`]).
    pub beacon: Option<std::sync::Arc<crate::ha::beacon::Receiver>>,
    /// Lanes decoding pages (`--decode-lanes`); None: chosen from the
    /// guest's size and this host's cores ([`crate::engine::receiver::default_lanes`]).
    pub decode_lanes: Option<usize>,
}

impl BackupConfig {
    /// A quiet backup keeping its replica in `state_dir`: the defaults of
    /// `castor backup` (heartbeat timeout and interval, no beacon path, no
    /// ack delay) and a memory limit of `max_mem` bytes.
    pub fn new(state_dir: PathBuf, psk: Psk, max_mem: u64) -> Self {
        BackupConfig {
            state_dir,
            psk,
            max_mem,
            quiet: true,
            heartbeat_timeout: crate::ha::detector::DEFAULT_TIMEOUT,
            heartbeat_interval: Duration::from_millis(100),
            ack_delay: Duration::ZERO,
            handshake_timeout: Duration::from_secs(5),
            beacon: None,
            decode_lanes: None,
        }
    }
}

/// How a session ended.
#[derive(Debug)]
pub struct BackupOutcome {
    pub peer: String,
    pub domain: String,
    /// True when the primary closed the stream cleanly.
    pub clean: bool,
    /// Why the stream ended (the error, for a broken stream).
    pub end: String,
    /// Epoch discarded because it was incomplete or corrupt, if any.
    pub discarded: Option<u64>,
    pub committed: Option<u64>,
    pub meta: Option<Meta>,
    pub digest: Option<Digest>,
    pub bytes_received: u64,
    /// The primary fell silent for longer than the heartbeat timeout
    /// (its connection may still be open): the silence observed.
    pub silent: Option<Duration>,
    /// When the stream ended or broke.
    pub ended_at: std::time::Instant,
    /// The committed replica (memory, saved state), for activation.
    pub replica: Option<(crate::domain::GuestMemory, Vec<u8>)>,
    /// The session's name in the arbiter's heir record (the primary's
    /// handshake nonce, hex; [`crate::ha::heir`]).
    pub session: Option<String>,
}

/// Serves one primary from `listener` over tcp and returns once its stream ended.
pub fn serve(listener: &TcpListener, cfg: &BackupConfig) -> Result<BackupOutcome, BackupError> {
    serve_with(listener, cfg, TransportKind::Tcp)
}

/// Serves one primary that must use `transport` (see `transport::select`).
///
/// Steps: accept and authenticate the primary ([`accept`]); start the
/// session's helpers (heartbeats, delayed acks, silence watchdog:
/// [`Helpers::start`]); receive, commit and acknowledge until the stream
/// ends ([`receive`]); stop the helpers and say why it ended
/// ([`Helpers::stop`]); save the committed replica ([`save`]).
pub fn serve_with(
    listener: &TcpListener,
    cfg: &BackupConfig,
    transport: TransportKind,
) -> Result<BackupOutcome, BackupError> {
    let (
        Accepted {
            peer,
            hello,
            writer,
            mut reader,
        },
        _door,
    ) = accept(listener, cfg, transport)?;
    if !cfg.quiet {
        eprintln!(
            "castor backup: replicating {} ({} pages, {}) from {peer}",
            hello.desc,
            hello.pages,
            crate::units::fmt_bytes(hello.pages * PAGE_SIZE as u64)
        );
    }
    let mut rx = Receiver::new(hello.pages)?.with_disk_dir(cfg.state_dir.clone());
    if let Some(lanes) = cfg.decode_lanes {
        rx = rx.with_decoders(lanes, &[]);
    }
    crate::ops::telemetry::with(|t| {
        t.session_started();
        t.set_peer(&peer);
        t.set_domain(&hello.desc);
    });
    let helpers = Helpers::start(cfg, &writer, &*reader, &hello)?;
    let started = Instant::now();
    let got = receive(&mut *reader, &mut rx, &writer, &helpers, transport, started);
    let ended_at = Instant::now();
    crate::ops::telemetry::with(|t| t.session_ended());
    let (end, silent, beacons) = helpers.stop(cfg, got.end);
    let discarded = rx.discard_open();
    let bytes_received = reader.bytes_read();
    drop(reader);
    if !cfg.quiet {
        let what = if got.clean {
            "stream ended"
        } else {
            "stream broken"
        };
        eprintln!(
            "castor backup: {what}: {end} ({:.1}s; longest gap between records while live {} ms, heartbeat timeout {} ms{})",
            started.elapsed().as_secs_f64(),
            got.max_gap.as_millis(),
            cfg.heartbeat_timeout.as_millis(),
            beacons.map_or(String::new(), |n| format!("; {n} beacons heard"))
        );
        if let Some(d) = discarded {
            eprintln!("castor backup: epoch {d} was incomplete and has been discarded whole");
        }
    }
    save(
        cfg,
        rx,
        BackupOutcome {
            peer,
            domain: hello.desc,
            clean: got.clean,
            end,
            discarded,
            committed: None,
            meta: None,
            digest: None,
            bytes_received,
            silent,
            ended_at,
            replica: None,
            session: Some(crate::ha::heir::hex(&hello.nonce)),
        },
    )
}

/// An accepted, authenticated primary, its transport set up.
struct Accepted {
    peer: String,
    hello: Hello,
    /// Heartbeats, acks and credits share the writer.
    writer: ControlWriter,
    reader: Box<dyn RecordSource>,
}

/// Waits for a primary to authenticate through the backup's front door
/// ([`crate::engine::accept::Door`]: strangers are logged and dropped, each
/// handshake has a deadline) and sets up `transport` on its connection.
/// The door stays open, refusing everyone else, while the session runs.
fn accept(
    listener: &TcpListener,
    cfg: &BackupConfig,
    transport: TransportKind,
) -> Result<(Accepted, Door), BackupError> {
    let door = Door::open(
        listener,
        DoorConfig {
            psk: cfg.psk.clone(),
            max_mem: cfg.max_mem,
            handshake_timeout: cfg.handshake_timeout,
            quiet: cfg.quiet,
        },
    )?;
    let Authenticated {
        peer,
        reader,
        writer,
        hello,
    } = door.primary()?;
    // A write that cannot go out for a heartbeat timeout means the primary
    // is gone; the watchdog's shutdown also wakes a blocked write.
    writer
        .get_ref()
        .set_write_timeout(Some(cfg.heartbeat_timeout))
        .map_err(BackupError::Accept)?;
    // Heartbeats, acks and credits share the writer.
    let writer = Arc::new(Mutex::new(writer));
    let reader: Box<dyn RecordSource> = match transport {
        TransportKind::Tcp => Box::new(reader),
        kind => select::backup(kind, reader, writer.clone()).map_err(|source| {
            BackupError::Transport {
                peer: peer.clone(),
                source,
            }
        })?,
    };
    Ok((
        Accepted {
            peer,
            hello,
            writer,
            reader,
        },
        door,
    ))
}

/// Acks sent `ack_delay` after their commit, in order (tests only).
type DelayedAcks = (std::sync::mpsc::Sender<(u64, Instant)>, JoinHandle<()>);

/// The threads that run beside the receive loop for one session.
///
/// Invariant: once [`Helpers::stop`] returns, every delayed ack was sent (or
/// the link failed), and the heartbeat and watchdog threads have ended.
struct Helpers {
    done: Arc<AtomicBool>,
    /// `castor-heartbeat`: a heartbeat to the primary every interval.
    hb: JoinHandle<()>,
    delayed: Option<DelayedAcks>,
    /// Signs of life from the primary (records, and beacons if any).
    live: Arc<Liveness>,
    /// Suspects a primary that stops sending though its TCP stays open.
    watchdog: Watchdog,
}

impl Helpers {
    fn start(
        cfg: &BackupConfig,
        writer: &ControlWriter,
        reader: &dyn RecordSource,
        hello: &Hello,
    ) -> Result<Helpers, BackupError> {
        // Heartbeats to the primary while the session lasts.
        let done = Arc::new(AtomicBool::new(false));
        let hb = {
            let (w, done, every) = (writer.clone(), done.clone(), cfg.heartbeat_interval);
            std::thread::Builder::new()
                .name("castor-heartbeat".into())
                .spawn(move || {
                    while !done.load(Ordering::Relaxed) {
                        std::thread::park_timeout(every);
                        if done.load(Ordering::Relaxed) {
                            break;
                        }
                        if send_record(&mut *w.lock().unwrap(), RecordKind::Heartbeat, 0, &[])
                            .is_err()
                        {
                            break;
                        }
                    }
                })
                .expect("spawning heartbeat thread")
        };
        // Test-only ack delay: acks leave from their own thread, in order, each
        // `ack_delay` after its commit; receiving is not slowed down.
        let delayed = (!cfg.ack_delay.is_zero()).then(|| {
            let (tx, rx) = std::sync::mpsc::channel::<(u64, Instant)>();
            let w = writer.clone();
            let delay = cfg.ack_delay;
            let t = std::thread::Builder::new()
                .name("castor-ack-delay".into())
                .spawn(move || {
                    for (e, at) in rx {
                        std::thread::sleep((at + delay).saturating_duration_since(Instant::now()));
                        if send_record(&mut *w.lock().unwrap(), RecordKind::Ack, e, &[]).is_err() {
                            break;
                        }
                    }
                })
                .expect("spawning ack-delay thread");
            (tx, t)
        });

        // Suspect a primary that stops sending even though its TCP stays open.
        let live = Arc::new(Liveness::new(cfg.heartbeat_timeout));
        if let Some(b) = &cfg.beacon {
            b.follow(hello.nonce, live.clone());
        }
        let watchdog = reader
            .stream()
            .try_clone()
            .and_then(|s| Watchdog::spawn(live.clone(), s))
            .map_err(BackupError::Accept)?;
        Ok(Helpers {
            done,
            hb,
            delayed,
            live,
            watchdog,
        })
    }

    /// Stops the helpers once the stream ended for `end`. Returns why it
    /// ended (the silence, if the watchdog saw one), the silence, and the
    /// beacons heard (with a beacon path).
    fn stop(self, cfg: &BackupConfig, mut end: String) -> (String, Option<Duration>, Option<u64>) {
        if let Some((tx, t)) = self.delayed {
            drop(tx);
            let _ = t.join();
        }
        let silent = self.watchdog.finish();
        let beacons = cfg.beacon.as_ref().map(|b| b.unfollow());
        if let Some(s) = silent {
            end = format!(
                "primary silent for {} ms (heartbeat timeout {} ms{})",
                s.as_millis(),
                cfg.heartbeat_timeout.as_millis(),
                if beacons.is_some() {
                    ", on both the stream and the beacon path"
                } else {
                    ""
                }
            );
        }
        self.done.store(true, Ordering::Relaxed);
        self.hb.thread().unpark();
        let _ = self.hb.join();
        (end, silent, beacons)
    }
}

/// How the receive loop ended.
struct Received {
    /// The primary closed the stream cleanly.
    clean: bool,
    end: String,
    /// Longest silence between two records: how close a healthy session
    /// came to the heartbeat timeout.
    max_gap: Duration,
}

/// Receives records until the stream ends: each committed epoch is
/// acknowledged (at once, or through the delayed-ack thread); a transport
/// mismatch or a bad stream is reported to the primary as an Error record.
fn receive(
    reader: &mut dyn RecordSource,
    rx: &mut Receiver,
    writer: &Mutex<SealedWriter<TcpStream>>,
    helpers: &Helpers,
    transport: TransportKind,
    started: Instant,
) -> Received {
    let (live, delayed) = (&helpers.live, &helpers.delayed);
    let mut last_rec = started;
    let mut max_gap = Duration::ZERO;
    // Bytes read at the last commit (the metrics' wire bytes per epoch).
    let mut wire_seen = 0u64;
    let (clean, end) = loop {
        let rec = reader.next_record();
        let now = Instant::now();
        live.beat_at(now);
        if rec.is_ok() {
            max_gap = max_gap.max(now - last_rec);
            last_rec = now;
        }
        let rec = match rec {
            Ok(r) => r,
            Err(RecordError::Eof) => {
                break (
                    false,
                    "connection closed without a Close record".to_string(),
                )
            }
            Err(e) => break (false, e.to_string()),
        };
        if rec.kind == RecordKind::Transport {
            let msg = transport_mismatch(transport, rec.payload);
            let _ = send_record(
                &mut *writer.lock().unwrap(),
                RecordKind::Error,
                0,
                msg.as_bytes(),
            );
            break (false, msg);
        }
        // Processing (decoding, committing, acknowledging) is not silence.
        let r = live.processing(|| rx.on_record(rec));
        match r {
            Ok(Event::None) => {}
            Ok(Event::Committed(e)) => {
                crate::ops::telemetry::with(|t| {
                    let wire = reader.bytes_read();
                    t.epoch_committed(e, rx.last_pages(), wire - wire_seen);
                    wire_seen = wire;
                });
                if let Some((tx, _)) = delayed {
                    let _ = tx.send((e, now));
                } else if let Err(err) =
                    send_record(&mut *writer.lock().unwrap(), RecordKind::Ack, e, &[])
                {
                    break (false, format!("sending ack {e}: {err}"));
                }
            }
            Ok(Event::Closed(e)) => {
                break (true, format!("primary closed the stream after epoch {e}"))
            }
            Err(e) => {
                let msg = e.to_string();
                let _ = send_record(
                    &mut *writer.lock().unwrap(),
                    RecordKind::Error,
                    0,
                    msg.as_bytes(),
                );
                break (false, msg);
            }
        }
    };
    Received {
        clean,
        end,
        max_gap,
    }
}

/// The primary asked for another transport than this backup runs.
fn transport_mismatch(transport: TransportKind, payload: &[u8]) -> String {
    let asked = payload.first().copied().and_then(TransportKind::from_u8);
    format!(
        "this backup runs --transport {transport} but the primary asked for --transport {}; \
         start both with the same --transport",
        asked.map_or("(unknown)", TransportKind::name)
    )
}

/// Saves the committed replica (if any epoch was committed) to the state
/// directory and completes `out` with it.
fn save(
    cfg: &BackupConfig,
    rx: Receiver,
    mut out: BackupOutcome,
) -> Result<BackupOutcome, BackupError> {
    if let Some(epoch) = rx.committed() {
        // SAFETY: the receiver is the replica's only writer and it is idle.
        let mem = unsafe { rx.memory().as_slice() };
        let disks = rx.disks().map(|d| d.specs().to_vec()).unwrap_or_default();
        if !disks.is_empty() {
            // An apply whose roll back failed left its journal sealed: the
            // disks are put back (or the save refused) before they are copied.
            crate::disk::session::recover_disks(&cfg.state_dir.join("disks"))?;
        }
        let meta = replica::save_with_disks(
            &cfg.state_dir,
            mem,
            rx.state(),
            (epoch, &out.domain, out.session.as_deref()),
            &disks,
            &cfg.state_dir,
        )?;
        out.digest = Digest::from_hex(&meta.digest);
        out.meta = Some(meta);
    }
    out.committed = rx.committed();
    out.replica = out.committed.map(|_| rx.into_replica());
    Ok(out)
}
