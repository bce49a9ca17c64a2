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
use crate::domain::GuestMemory;
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
    /// Leave the committed replica unsaved in the outcome
    /// ([`BackupOutcome::unsaved`]): an activating backup saves it with
    /// [`BackgroundSave`] while it arbitrates and fences.
    pub defer_save: bool,
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
            defer_save: false,
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
    pub replica: Option<(GuestMemory, Vec<u8>)>,
    /// The session's name in the arbiter's heir record (the primary's
    /// handshake nonce, hex; [`crate::ha::heir`]).
    pub session: Option<String>,
    /// The replica's disks (as `meta` lists them once saved).
    pub disks: Vec<crate::disk::session::DiskSpec>,
    /// The committed replica is in `replica` but not yet saved to the
    /// state directory (`defer_save`).
    pub unsaved: bool,
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
            disks: Vec::new(),
            unsaved: false,
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
/// directory, unless `cfg.defer_save`, and completes `out` with it.
fn save(
    cfg: &BackupConfig,
    rx: Receiver,
    mut out: BackupOutcome,
) -> Result<BackupOutcome, BackupError> {
    if let Some(epoch) = rx.committed() {
        out.disks = rx.disks().map(|d| d.specs().to_vec()).unwrap_or_default();
        if let Some(d) = rx.disks() {
            d.check_sound()?;
        }
        if !out.disks.is_empty() {
            // An apply that failed left its epoch's redo log sealed (the
            // memory holds that epoch): the disks are brought to it by
            // replaying the log (or the save refused) before they are copied.
            crate::disk::session::recover_disks(&cfg.state_dir.join("disks"))?;
        }
        if cfg.defer_save {
            out.unsaved = true;
        } else {
            // SAFETY: the receiver is the replica's only writer and it is idle.
            let mem = unsafe { rx.memory().as_slice() };
            let meta = replica::save_with_disks(
                &cfg.state_dir,
                mem,
                rx.state(),
                (epoch, &out.domain, out.session.as_deref()),
                &out.disks,
                &cfg.state_dir,
            )?;
            out.digest = Digest::from_hex(&meta.digest);
            out.meta = Some(meta);
        }
    }
    out.committed = rx.committed();
    out.replica = out.committed.map(|_| rx.into_replica());
    Ok(out)
}

/// Saves a committed replica on its own thread, so that an activating
/// backup's arbitration, fencing and activation do not wait for the write
/// and fsync of the whole image. When this host has room for a copy and
/// the replica has no disks, the thread saves a snapshot and the replica
/// stays in the outcome for activation at once; else the replica goes
/// with the thread (and the disks are copied) and comes
/// back with [`BackgroundSave::finish`], which must come before anything
/// writes it again (activation adopts it).
pub struct BackgroundSave(SaveState);

/// The replica back and what its save made of it.
type Saved = ((GuestMemory, Vec<u8>), Result<Meta, ReplicaError>);

enum SaveState {
    Running(std::thread::JoinHandle<Saved>),
    /// No thread could be started: saved in the foreground.
    Done(Box<Saved>),
}

impl BackgroundSave {
    /// Starts saving `out`'s unsaved replica into `state_dir`; None (and
    /// `out` untouched) when it has none to save. `out.replica` is Some
    /// afterwards when the save works on a snapshot.
    pub fn start(state_dir: &std::path::Path, out: &mut BackupOutcome) -> Option<Self> {
        Self::start_with(state_dir, out, true)
    }

    fn start_with(
        state_dir: &std::path::Path,
        out: &mut BackupOutcome,
        may_snapshot: bool,
    ) -> Option<Self> {
        let (Some(epoch), true, Some(_)) = (out.committed, out.unsaved, &out.replica) else {
            return None;
        };
        let job = SaveJob {
            dir: state_dir.to_path_buf(),
            epoch,
            domain: out.domain.clone(),
            session: out.session.clone(),
            disks: out.disks.clone(),
        };
        // The replica follows through a channel once the thread exists, so
        // a failed spawn cannot take it along.
        let (tx, rx) = std::sync::mpsc::sync_channel::<(GuestMemory, Vec<u8>)>(1);
        let job = Arc::new(job);
        let worker = job.clone();
        let spawned = std::thread::Builder::new()
            .name("castor-save".into())
            .spawn(move || {
                let replica = rx
                    .recv()
                    .expect("the replica is sent right after the spawn");
                let r = worker.run(&replica);
                (replica, r)
            });
        let mut replica = out.replica.take().expect("checked above");
        out.unsaved = false;
        // With room for a copy, the save works on a snapshot and the
        // replica goes straight back: activation need not wait at all.
        // Not with disks: the save copies the disk images, which the
        // activated guest would write meanwhile (the saved version's disk
        // would run ahead of its memory).
        let may_snapshot = may_snapshot && out.disks.is_empty();
        if let Some(copy) = snapshot(&replica.0).filter(|_| may_snapshot) {
            out.replica = Some(replica);
            replica = (copy, out.replica.as_ref().expect("just put").1.clone());
        }
        Some(BackgroundSave(match spawned {
            Ok(thread) => {
                tx.send(replica)
                    .expect("the save thread waits for the replica");
                SaveState::Running(thread)
            }
            Err(e) => {
                eprintln!("castor backup: spawning the save thread: {e}; saving first");
                let r = job.run(&replica);
                job.report(&r);
                SaveState::Done(Box::new((replica, r)))
            }
        }))
    }

    /// Waits for the save; the replica back, and what the save made of it.
    pub fn finish(self) -> Saved {
        match self.0 {
            SaveState::Running(t) => match t.join() {
                Ok(r) => r,
                Err(p) => std::panic::resume_unwind(p),
            },
            SaveState::Done(r) => *r,
        }
    }
}

/// A copy of `mem` (its non-zero pages; the rest stay unmapped zeros) when
/// this host has room for it: at least twice its size available.
fn snapshot(mem: &GuestMemory) -> Option<GuestMemory> {
    let len = mem.pages() * PAGE_SIZE as u64;
    if mem_available().map_or(true, |avail| avail < 2 * len) {
        return None;
    }
    let copy = GuestMemory::new(len as usize).ok()?;
    let mut page = [0u8; PAGE_SIZE];
    for gfn in 0..mem.pages() {
        mem.read_page(gfn, &mut page);
        if page.iter().any(|&b| b != 0) {
            copy.write_page(gfn, &page);
        }
    }
    Some(copy)
}

/// This host's `MemAvailable` (`/proc/meminfo`), bytes.
fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// What [`BackgroundSave`] writes.
struct SaveJob {
    dir: PathBuf,
    epoch: u64,
    domain: String,
    session: Option<String>,
    disks: Vec<crate::disk::session::DiskSpec>,
}

impl SaveJob {
    /// Says how the save went. A failed save does not stop an activation:
    /// the replica in memory is whole; only a later `--from-saved` needs
    /// the files.
    fn report(&self, r: &Result<Meta, ReplicaError>) {
        match r {
            Ok(m) => eprintln!(
                "castor backup: replica of epoch {} (digest {}) saved to {}",
                m.epoch,
                m.digest,
                self.dir.display()
            ),
            Err(e) => eprintln!(
                "castor backup: error: saving the replica to {}: {e} (the copy in memory is used)",
                self.dir.display()
            ),
        }
    }

    fn run(&self, (mem, state): &(GuestMemory, Vec<u8>)) -> Result<Meta, ReplicaError> {
        // SAFETY: the memory moved into this thread with the job; nothing
        // else holds it until `finish` hands it back.
        let bytes = unsafe { mem.as_slice() };
        replica::save_with_disks(
            &self.dir,
            bytes,
            state,
            (self.epoch, &self.domain, self.session.as_deref()),
            &self.disks,
            &self.dir,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(replica: Option<(GuestMemory, Vec<u8>)>, unsaved: bool) -> BackupOutcome {
        BackupOutcome {
            peer: "test".into(),
            domain: "sim:mem=64KiB".into(),
            clean: false,
            end: "test".into(),
            discarded: None,
            committed: replica.as_ref().map(|_| 7),
            meta: None,
            digest: None,
            bytes_received: 0,
            silent: None,
            ended_at: Instant::now(),
            replica,
            session: Some("ab".into()),
            disks: Vec::new(),
            unsaved,
        }
    }

    /// The background save writes the replica it was given (the saved
    /// digest is that of the memory and state handed back). With a
    /// snapshot the replica stays in the outcome; without, the very same
    /// memory comes back from `finish`.
    #[test]
    fn a_background_save_writes_the_replica_and_hands_it_back() {
        for may_snapshot in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mem = GuestMemory::new(16 * PAGE_SIZE).unwrap();
            // SAFETY: a fresh private mapping of 16 pages; page 3 is inside.
            unsafe { mem.page_ptr(3).add(5).write(0x42) };
            // SAFETY: nothing else holds the memory.
            let want = Digest::of(unsafe { mem.as_slice() }, b"state").to_hex();
            let ptr = mem.as_ptr();
            let mut out = outcome(Some((mem, b"state".to_vec())), true);
            let job = BackgroundSave::start_with(dir.path(), &mut out, may_snapshot)
                .expect("something to save");
            assert!(!out.unsaved);
            let ((mem, _), meta) = job.finish();
            let meta = meta.unwrap();
            if may_snapshot {
                let kept = out.replica.as_ref().expect("the replica stays");
                assert_eq!(kept.0.as_ptr(), ptr, "not the same memory");
                assert_ne!(mem.as_ptr(), ptr, "saved from the replica itself");
            } else {
                assert!(out.replica.is_none());
                assert_eq!(mem.as_ptr(), ptr, "not the same memory");
            }
            assert_eq!((meta.epoch, meta.digest.to_string()), (7, want.clone()));
            let (saved, _, _) = replica::load(dir.path()).unwrap();
            assert_eq!(saved.digest.to_string(), want, "snapshot {may_snapshot}");
        }
    }

    /// A replica with disks is never saved from a snapshot: the save copies
    /// the disk images, which an activated guest would be writing.
    #[test]
    fn a_replica_with_disks_is_saved_before_activation() {
        let dir = tempfile::tempdir().unwrap();
        let mem = GuestMemory::new(4 * PAGE_SIZE).unwrap();
        let ptr = mem.as_ptr();
        let mut out = outcome(Some((mem, vec![])), true);
        out.disks = vec![crate::disk::session::DiskSpec {
            name: "data".into(),
            size: 4096,
            nbd: String::new(),
        }];
        let job = BackgroundSave::start(dir.path(), &mut out).expect("something to save");
        assert!(
            out.replica.is_none(),
            "activation could start before the save"
        );
        // (No disk image exists here: the save itself fails, and says so.)
        let ((mem, _), _) = job.finish();
        assert_eq!(mem.as_ptr(), ptr);
    }

    #[test]
    fn nothing_unsaved_starts_no_save() {
        let dir = tempfile::tempdir().unwrap();
        let mut saved = outcome(Some((GuestMemory::new(PAGE_SIZE).unwrap(), vec![])), false);
        assert!(BackgroundSave::start(dir.path(), &mut saved).is_none());
        assert!(saved.replica.is_some(), "the replica was taken");
        let mut none = outcome(None, true);
        assert!(BackgroundSave::start(dir.path(), &mut none).is_none());
    }
}
