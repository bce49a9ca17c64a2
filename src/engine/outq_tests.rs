//! Output commit through the whole primary pipeline: a fake guest emits a
//! frame every few hundred µs through the output queue, a real backup
//! (in-process, over loopback TCP) acknowledges checkpoints, and the test
//! checks guarantee 1 from the outside: every frame reached the "wire"
//! only after the primary had read the Ack of the epoch that produced it.
//!
//! The epoch a frame belongs to is the fake guest's own truth (how many
//! pauses preceded it), not the queue's tag, and the ack times come from
//! the raw bytes the primary read off the socket, not from the engine.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::domain::{Domain, DomainError, GuestMemory, Layout};
use crate::engine::backup::{self, BackupConfig};
use crate::engine::primary::{self, PrimaryConfig, PrimaryError};
use crate::outq::{Egress, OutputHandle, OutputQueue};
use crate::transport::handshake::{self, random_nonce, Psk};
use crate::transport::messages::Hello;
use crate::transport::record::{parse_header, RecordKind, RecordReader, HEADER_LEN};
use crate::transport::tcp;
use crate::transport::wire::TAG_LEN;
use crate::PAGE_SIZE;

#[derive(Default)]
struct Ctl {
    paused: bool,
    pauses: u64,
    stop: bool,
}

type Log = Arc<Mutex<Vec<(u64, Instant)>>>;

/// The "wire": (frame sequence number, release time).
struct Recorder(Log);

impl Egress for Recorder {
    fn release(&mut self, frame: &[u8]) {
        let seq = u64::from_le_bytes(frame[..8].try_into().unwrap());
        self.0.lock().unwrap().push((seq, Instant::now()));
    }
}

/// A guest whose only activity is output: one frame (its sequence number)
/// every 200 µs while running, emitted with the control lock held, so a
/// `pause` that took the lock knows no emit is half done (as a parked vCPU).
struct FakeGuest {
    mem: GuestMemory,
    ctl: Arc<(Mutex<Ctl>, Condvar)>,
    /// truth[seq] = the epoch the frame was produced in (pauses before + 1).
    truth: Arc<Mutex<Vec<u64>>>,
    handle: Option<OutputHandle>,
    wire: Log,
    producer: Option<JoinHandle<()>>,
    /// Emit one frame as soon as output is attached, before protection
    /// starts (what a host-device source such as NFQUEUE can read then).
    emit_at_attach: bool,
}

impl FakeGuest {
    fn new() -> Self {
        FakeGuest {
            mem: GuestMemory::new(64 * PAGE_SIZE).unwrap(),
            ctl: Arc::default(),
            truth: Arc::default(),
            handle: None,
            wire: Arc::default(),
            producer: None,
            emit_at_attach: false,
        }
    }
}

impl Drop for FakeGuest {
    fn drop(&mut self) {
        self.ctl.0.lock().unwrap().stop = true;
        self.ctl.1.notify_all();
        if let Some(p) = self.producer.take() {
            let _ = p.join();
        }
    }
}

impl Domain for FakeGuest {
    fn layout(&self) -> Layout {
        Layout {
            page_size: PAGE_SIZE as u32,
            pages: self.mem.pages(),
        }
    }
    fn memory(&self) -> &GuestMemory {
        &self.mem
    }
    fn describe(&self) -> String {
        "fake:output".into()
    }
    fn start(&mut self) -> Result<(), DomainError> {
        let h = self.handle.clone().expect("attach_output before start");
        let (ctl, truth) = (self.ctl.clone(), self.truth.clone());
        self.producer = Some(std::thread::spawn(move || loop {
            {
                let mut g = ctl.0.lock().unwrap();
                while g.paused && !g.stop {
                    g = ctl.1.wait(g).unwrap();
                }
                if g.stop {
                    return;
                }
                let mut t = truth.lock().unwrap();
                let seq = t.len() as u64;
                t.push(g.pauses + 1);
                h.emit_now(&seq.to_le_bytes());
            }
            std::thread::sleep(Duration::from_micros(200));
        }));
        Ok(())
    }
    /// Idempotent, and a no-op before `start`, like the real domains.
    fn pause(&mut self) -> Result<(), DomainError> {
        let mut g = self.ctl.0.lock().unwrap();
        if self.producer.is_some() && !g.paused {
            g.paused = true;
            g.pauses += 1;
        }
        Ok(())
    }
    /// Before `start` it is `start`.
    fn resume(&mut self) -> Result<(), DomainError> {
        if self.producer.is_none() {
            return self.start();
        }
        self.ctl.0.lock().unwrap().paused = false;
        self.ctl.1.notify_all();
        Ok(())
    }
    fn harvest_dirty(&mut self, _out: &mut Vec<u64>) -> Result<(), DomainError> {
        Ok(())
    }
    fn present_pages(&self, _out: &mut Vec<u64>) -> Result<bool, DomainError> {
        Ok(false)
    }
    fn save_state(&mut self, out: &mut Vec<u8>) -> Result<(), DomainError> {
        out.extend_from_slice(&self.ctl.0.lock().unwrap().pauses.to_le_bytes());
        Ok(())
    }
    fn attach_output(&mut self, q: &OutputQueue) -> Result<(), DomainError> {
        let h = q.handle(Box::new(Recorder(self.wire.clone())));
        if self.emit_at_attach {
            // Produced before the first checkpoint: it belongs to epoch 1.
            let mut t = self.truth.lock().unwrap();
            h.emit_now(&(t.len() as u64).to_le_bytes());
            t.push(1);
        }
        self.handle = Some(h);
        Ok(())
    }
}

/// Everything the primary read from the backup, with when each read returned.
#[derive(Default)]
struct ReadLog {
    bytes: Vec<u8>,
    /// (total bytes read so far, when that read returned)
    reads: Vec<(usize, Instant)>,
}

struct TimedRead(TcpStream, Arc<Mutex<ReadLog>>);

impl Read for TimedRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        let mut l = self.1.lock().unwrap();
        l.bytes.extend_from_slice(&buf[..n]);
        let total = l.bytes.len();
        l.reads.push((total, Instant::now()));
        Ok(n)
    }
}

impl ReadLog {
    /// epoch → the time the primary had read that epoch's whole Ack record.
    /// (The primary's reader checked the records; this only walks their
    /// headers: the two handshake records, then records with tags.)
    fn ack_times(&self) -> BTreeMap<u64, Instant> {
        let mut end = 0usize;
        let mut out = BTreeMap::new();
        for i in 0.. {
            let Some(h) = self.bytes.get(end..end + HEADER_LEN) else {
                break;
            };
            let Ok(rec) = parse_header(h.try_into().unwrap()) else {
                break;
            };
            end += HEADER_LEN + rec.len + if i >= 2 { TAG_LEN } else { 0 };
            if end > self.bytes.len() {
                break;
            }
            if rec.kind == RecordKind::Ack {
                let t = self.reads.iter().find(|(n, _)| *n >= end).unwrap().1;
                out.insert(rec.epoch, t);
            }
        }
        out
    }
}

const KEY: &[u8] = b"outq-engine-test-key-0123456789";

/// Starts a backup on loopback; returns its address and its thread.
fn backup_thread() -> (String, JoinHandle<()>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let l = tcp::listen("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let cfg = BackupConfig::new(dir.path().to_path_buf(), Psk::from_bytes(KEY), 1 << 30);
    let h = std::thread::spawn(move || {
        let _ = backup::serve(&l, &cfg);
    });
    (addr, h, dir)
}

/// Forwards both ways between a client and `to`; `cut()` breaks the link.
fn proxy(to: String) -> (String, Arc<Mutex<Vec<TcpStream>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let socks: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let s2 = socks.clone();
    std::thread::spawn(move || {
        let (a, _) = l.accept().unwrap();
        let b = TcpStream::connect(&to).unwrap();
        s2.lock()
            .unwrap()
            .extend([a.try_clone().unwrap(), b.try_clone().unwrap()]);
        let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        let (mut a, mut b) = (a, b);
        std::thread::spawn(move || std::io::copy(&mut a2, &mut b2));
        let _ = std::io::copy(&mut b, &mut a);
    });
    (addr, socks)
}

type RunResult = (
    Result<primary::PrimaryOutcome, PrimaryError>,
    Vec<u64>,
    Vec<(u64, Instant)>,
    BTreeMap<u64, Instant>,
);

/// Runs the primary with the fake guest against `addr`; `during` runs on
/// another thread while the primary does.
fn run_primary(
    addr: &str,
    cfg: &PrimaryConfig,
    during: impl FnOnce() + Send + 'static,
) -> RunResult {
    run_guest(FakeGuest::new(), addr, cfg, during)
}

fn run_guest(
    guest: FakeGuest,
    addr: &str,
    cfg: &PrimaryConfig,
    during: impl FnOnce() + Send + 'static,
) -> RunResult {
    let domain = Box::new(guest);
    let (truth, wire) = (domain.truth.clone(), domain.wire.clone());
    let s = tcp::connect(addr, Duration::from_secs(10)).unwrap();
    let mut w = s.try_clone().unwrap();
    let log: Arc<Mutex<ReadLog>> = Arc::default();
    let mut r = RecordReader::new(TimedRead(s, log.clone()));
    let hello = Hello {
        page_size: PAGE_SIZE as u32,
        pages: domain.layout().pages,
        nonce: random_nonce(),
        protection: Default::default(),
        desc: domain.describe(),
    };
    let keys = handshake::client(&mut r, &mut w, &Psk::from_bytes(KEY), &hello).unwrap();
    let sink = crate::transport::seal::tcp_primary(&keys, w, &mut r);
    let side = std::thread::spawn(during);
    let res = primary::run(domain, sink, r, cfg).map_err(|(e, _)| e);
    let _ = side.join();
    let truth = truth.lock().unwrap().clone();
    let wire = wire.lock().unwrap().clone();
    let acks = log.lock().unwrap().ack_times();
    (res, truth, wire, acks)
}

fn cfg(epochs: u64, output_commit: bool) -> PrimaryConfig {
    PrimaryConfig {
        epoch: Duration::from_millis(10),
        workers: 1,
        copy_threads: 1,
        pin: false,
        max_epochs: Some(epochs),
        final_ack_timeout: Duration::from_secs(10),
        output_commit,
        ..PrimaryConfig::default()
    }
}

/// Fails naming the first frames released before their epoch's ack.
fn assert_none_early(truth: &[u64], wire: &[(u64, Instant)], acks: &BTreeMap<u64, Instant>) {
    let bad = early(truth, wire, acks);
    assert!(
        bad.is_empty(),
        "{} frames left before their ack, first {:?}",
        bad.len(),
        &bad[..bad.len().min(10)]
    );
}

/// Frames released before the primary read the Ack of their epoch.
fn early(truth: &[u64], wire: &[(u64, Instant)], acks: &BTreeMap<u64, Instant>) -> Vec<u64> {
    wire.iter()
        .filter(|(seq, t)| {
            let e = truth[*seq as usize];
            acks.get(&e).map_or(true, |a| t < a)
        })
        .map(|(seq, _)| *seq)
        .collect()
}

#[test]
fn no_frame_leaves_before_the_ack_of_its_epoch() {
    let (addr, b, _dir) = backup_thread();
    let (res, truth, wire, acks) = run_primary(&addr, &cfg(30, true), || {});
    let out = res.expect("clean run");
    b.join().unwrap();
    assert!(truth.len() > 50, "the guest produced only {}", truth.len());
    assert_eq!(out.final_epoch, 30);
    assert_none_early(&truth, &wire, &acks);
    // Clean stop: the final epoch was acknowledged, so everything the guest
    // produced is out, in production order, and nothing was dropped.
    let seqs: Vec<u64> = wire.iter().map(|w| w.0).collect();
    assert_eq!(seqs, (0..truth.len() as u64).collect::<Vec<_>>());
    assert_eq!((out.output.dropped, out.output.late), (0, 0));
    assert!(out.output.release_delay_us.p50 > 0);
}

/// Output produced after the sources are attached but before protection
/// starts is held like any other: released by the ack of epoch 1.
#[test]
fn output_before_the_first_session_waits_for_the_first_ack() {
    let (addr, b, _dir) = backup_thread();
    let mut g = FakeGuest::new();
    g.emit_at_attach = true;
    let (res, truth, wire, acks) = run_guest(g, &addr, &cfg(5, true), || {});
    res.expect("clean run");
    b.join().unwrap();
    assert_eq!(truth[0], 1);
    let first = wire
        .iter()
        .find(|w| w.0 == 0)
        .expect("frame 0 released at the end");
    assert!(
        first.1 >= acks[&1],
        "frame 0 left before the ack of epoch 1"
    );
    assert_none_early(&truth, &wire, &acks);
}

/// The check above can fail: without output commit, frames leave early.
#[test]
fn without_output_commit_frames_leave_early() {
    let (addr, b, _dir) = backup_thread();
    let (res, truth, wire, acks) = run_primary(&addr, &cfg(10, false), || {});
    res.expect("clean run");
    b.join().unwrap();
    let bad = early(&truth, &wire, &acks);
    assert!(
        bad.len() > wire.len() / 2,
        "pass-through released only {} of {} frames early",
        bad.len(),
        wire.len()
    );
}

/// The link to the backup breaks mid-run: the run fails, and no frame of
/// an epoch the primary never saw acknowledged is ever released.
#[test]
fn backup_lost_drops_held_output() {
    let (addr, _b, _dir) = backup_thread();
    let (paddr, socks) = proxy(addr);
    let (res, truth, wire, acks) = run_primary(&paddr, &cfg(100_000, true), move || {
        std::thread::sleep(Duration::from_millis(400));
        for s in socks.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    });
    let Err(e) = res else {
        panic!("the run survived a cut link")
    };
    assert!(matches!(e, PrimaryError::BackupLost { .. }), "{e}");
    assert_none_early(&truth, &wire, &acks);
    let last_acked = acks.keys().max().copied().unwrap_or(0);
    let unacked = truth.iter().filter(|&&e| e > last_acked).count();
    assert!(unacked > 0, "no output was held when the link broke");
    assert_eq!(wire.len() + unacked, truth.len());
}
