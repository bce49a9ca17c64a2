//! `castor bench-transport`: the transports side by side in one run.
//!
//! For each transport (tcp, uring) and payload (raw incompressible pages,
//! lz4-compressed pages) a sender thread streams Pages-sized records of
//! pre-encoded pages through the transport's sink, on loopback and (with
//! `--veth`) across a veth pair between two network namespaces, and a
//! receiver thread takes them from the transport's source and applies them
//! to a destination memory like the backup does (raw: copied out of the
//! receive buffer; compressed: decompressed into place). Reported per case:
//! replicated page bytes per second and CPU seconds (whole process, both
//! ends, kernel included) per replicated GiB. Encoding is done before the
//! clock starts, so the figures are the transport's and the apply step's.
//! The same run measures single-thread memcpy bandwidth (the physical
//! limit of a copy) and, when iperf3 is installed, the line rate of the
//! same links. `uring` is the transport's default (zero copy where it
//! pays, see [`crate::transport::uring::SendMode::Auto`]); `uring-zc`
//! forces SENDMSG_ZC for every chunk and `uring-copy` plain SENDMSG, both
//! from the sender's own buffers lent to the sink: on loopback (and veth)
//! the kernel copies zero-copy pages when it delivers them locally, so the
//! difference is what zero copy costs where it cannot pay off. With
//! `--zc-sizes` a second table compares `uring-zc` and `uring-copy` by
//! send size (the choice of [`crate::transport::uring::ZC_MIN`]).

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics;
use crate::transport::auth::{Opener, Protection, Role, Sealer, SessionKeys};
use crate::transport::record::{write_record, RecordKind, RecordReader};
use crate::transport::seal::SealSink;
use crate::transport::slots::{Announce, DEFAULT_SLOT_SIZE, URING_SLOTS};
use crate::transport::tcp::TcpSink;
use crate::transport::uring::{CreditFilter, SendMode, UringSink, UringSource};
use crate::transport::{Lent, RecordSink, RecordSource, TransportKind};
use crate::PAGE_SIZE;

/// Pages per record (one Pages record of the primary is ~256 KiB).
const PAGES_PER_RECORD: usize = 64;
/// Distinct pages cycled through (destination memory size).
const PAGES: usize = 16384; // 64 MiB

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    Raw,
    Lz4,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CaseResult {
    pub link: String,
    pub transport: String,
    pub payload: String,
    pub sealing: String,
    pub seconds: f64,
    pub page_bytes: u64,
    pub wire_bytes: u64,
    pub gib_per_s: f64,
    pub wire_gib_per_s: f64,
    pub cpu_s_per_gib: f64,
    /// The sending thread's share of `cpu_s_per_gib` (its own CPU time).
    pub sender_cpu_s_per_gib: f64,
    /// The receiving thread's share (verifying and applying included).
    pub receiver_cpu_s_per_gib: f64,
}

/// CPU time (user + system) of the calling thread (zero if unreadable).
fn thread_cpu() -> Duration {
    crate::metrics::thread_cpu_time().unwrap_or_default()
}

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Incompressible pages, or text-like pages lz4 halves or better.
fn make_pages(p: Payload) -> Vec<u8> {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut v = vec![0u8; PAGES * PAGE_SIZE];
    match p {
        Payload::Raw => {
            for c in v.chunks_mut(8) {
                c.copy_from_slice(&rng(&mut seed).to_le_bytes()[..c.len()]);
            }
        }
        Payload::Lz4 => {
            const WORDS: [&[u8]; 12] = [
                b"checkpoint ",
                b"the ",
                b"epoch ",
                b"of ",
                b"a ",
                b"guest ",
                b"page ",
                b"dirty ",
                b"backup ",
                b"replica ",
                b"0x7f3a ",
                b"\n",
            ];
            let mut i = 0;
            while i < v.len() {
                let w = WORDS[(rng(&mut seed) % WORDS.len() as u64) as usize];
                let n = w.len().min(v.len() - i);
                v[i..i + n].copy_from_slice(&w[..n]);
                i += n;
            }
        }
    }
    v
}

/// Pre-encoded records of `per_record` pages each, cycled by the sender.
fn make_records(p: Payload, pages: &[u8], per_record: usize) -> Vec<Vec<u8>> {
    pages
        .chunks(per_record * PAGE_SIZE)
        .enumerate()
        .map(|(i, chunk)| {
            let mut payload = Vec::with_capacity(chunk.len() + 64);
            payload.extend_from_slice(&((i * per_record) as u32).to_le_bytes());
            for page in chunk.chunks(PAGE_SIZE) {
                match p {
                    Payload::Raw => payload.extend_from_slice(page),
                    Payload::Lz4 => {
                        let c = lz4_flex::block::compress(page);
                        payload.extend_from_slice(&(c.len() as u32).to_le_bytes());
                        payload.extend_from_slice(&c);
                    }
                }
            }
            let mut rec = Vec::new();
            write_record(&mut rec, RecordKind::Pages, 1, &payload);
            rec
        })
        .collect()
}

/// Applies one record's pages to `dest`; returns page bytes applied.
fn apply(p: Payload, payload: &[u8], dest: &mut [u8]) -> Result<u64, String> {
    let first = u32::from_le_bytes(payload[..4].try_into().unwrap()) as usize;
    let mut at = 4;
    let mut n = 0;
    while at < payload.len() {
        let gfn = first + n;
        let page = dest
            .get_mut(gfn * PAGE_SIZE..(gfn + 1) * PAGE_SIZE)
            .ok_or("page out of range")?;
        match p {
            Payload::Raw => {
                page.copy_from_slice(&payload[at..at + PAGE_SIZE]);
                at += PAGE_SIZE;
            }
            Payload::Lz4 => {
                let len = u32::from_le_bytes(payload[at..at + 4].try_into().unwrap()) as usize;
                at += 4;
                let got = lz4_flex::block::decompress_into(&payload[at..at + len], page)
                    .map_err(|e| e.to_string())?;
                if got != PAGE_SIZE {
                    return Err(format!("page decompressed to {got} bytes"));
                }
                at += len;
            }
        }
        n += 1;
    }
    Ok((n * PAGE_SIZE) as u64)
}

/// Where the two ends of a case talk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Loopback,
    /// Across the veth pair of a [`Veth`]: sender in its namespace B,
    /// receiver in A.
    Veth,
}

impl Link {
    fn name(self) -> &'static str {
        match self {
            Link::Loopback => "loopback",
            Link::Veth => "veth",
        }
    }
}

/// Runs `f` on a thread that entered network namespace `ns`; sockets it
/// creates stay in that namespace wherever they are used later.
fn in_netns<R: Send>(
    ns: &str,
    f: impl FnOnce() -> std::io::Result<R> + Send,
) -> std::io::Result<R> {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|sc| {
        sc.spawn(|| {
            let f_ns = std::fs::File::open(&path)?;
            // SAFETY: `f_ns` is an open netns file; CLONE_NEWNET changes
            // only this thread's network namespace.
            if unsafe { libc::setns(f_ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("netns thread panicked")))
    })
}

fn pair(link: Link) -> std::io::Result<(TcpStream, TcpStream)> {
    let (l, c) = match link {
        Link::Loopback => {
            let l = TcpListener::bind("127.0.0.1:0")?;
            let c = TcpStream::connect(l.local_addr()?)?;
            (l, c)
        }
        Link::Veth => {
            let l = in_netns(VETH_A, || TcpListener::bind((VETH_IP_A, 0)))?;
            let to = l.local_addr()?;
            let c = in_netns(VETH_B, || TcpStream::connect(to))?;
            (l, c)
        }
    };
    let (s, _) = l.accept()?;
    c.set_nodelay(true)?;
    s.set_nodelay(true)?;
    Ok((c, s))
}

/// How a case protects its records: `None` plain (no tag, as before
/// the handshake), else as a session would after it.
pub type Sealing = Option<Protection>;

fn sealing_name(s: Sealing) -> &'static str {
    match s {
        None => "plain",
        Some(Protection::Mac) => "mac",
        Some(Protection::Encrypt) => "aes-gcm",
    }
}

/// What one send carries: `records` records of `pages` pages each.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub pages: usize,
    pub records: usize,
}

/// Eight records of 64 pages per send, like an epoch's head + shards + tail.
pub const EPOCH_SHAPE: Shape = Shape {
    pages: PAGES_PER_RECORD,
    records: 8,
};

/// One send's records, lent to the sink: the shared pre-encoded records
/// (never written again) and which of them, in order.
struct Batch {
    records: Arc<Vec<Vec<u8>>>,
    first: usize,
    n: usize,
}

impl Lent for Batch {
    fn pieces(&self) -> Vec<&[u8]> {
        (0..self.n)
            .map(|k| &self.records[(self.first + k) % self.records.len()][..])
            .collect()
    }
}

/// The case's name for a uring send mode (None: the transport's default).
fn mode_name(t: TransportKind, mode: Option<SendMode>) -> String {
    match mode {
        None | Some(SendMode::Auto) => t.name().into(),
        Some(SendMode::Direct) => format!("{t}-zc"),
        Some(SendMode::DirectCopy) => format!("{t}-copy"),
        Some(SendMode::StagedZc) => format!("{t}-stzc"),
        Some(SendMode::StagedCopy) => format!("{t}-stcp"),
    }
}

/// One case: streams records for `dur`, returns the measured figures.
/// `mode`: the uring sink's send mode (None: its default).
pub fn run_case(
    t: TransportKind,
    p: Payload,
    dur: Duration,
    mode: Option<SendMode>,
    link: Link,
    sealing: Sealing,
) -> Result<CaseResult, String> {
    run_shaped(t, p, dur, mode, link, sealing, EPOCH_SHAPE)
}

/// [`run_case`] with sends of `shape`.
pub fn run_shaped(
    t: TransportKind,
    p: Payload,
    dur: Duration,
    mode: Option<SendMode>,
    link: Link,
    sealing: Sealing,
    shape: Shape,
) -> Result<CaseResult, String> {
    let keys = sealing.map(|s| SessionKeys::derive(b"bench-transport key", &[1; 32], &[2; 32], s));
    let (mut p_seal, mut p_open, mut b_open) = (None, None, None);
    if let Some(k) = &keys {
        let (s, o) = k.split(Role::Primary);
        (p_seal, p_open) = (Some(s), Some(o));
        // The backup's sealer would seal its acks: the bench sends none.
        let (_, o) = k.split(Role::Backup);
        b_open = Some(o);
    }
    let pages = make_pages(p);
    let records = Arc::new(make_records(p, &pages, shape.pages));
    drop(pages);
    let (c, s) = pair(link).map_err(|e| format!("connecting over {}: {e}", link.name()))?;
    // The ring a uring backup announces in a session.
    let ann = Announce::new(URING_SLOTS, DEFAULT_SLOT_SIZE).map_err(|e| e.to_string())?;
    let mut source = case_source(t, s, &ann, b_open)?;
    let (mut sink, back_reader) = case_sink(t, &c, mode, p_open, p_seal)?;
    // The destination is faulted in before the clock starts, so neither
    // case pays for first touches inside its figures.
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let receiver = std::thread::Builder::new()
        .name("bt-receiver".into())
        .spawn(move || -> Result<(u64, u64, Duration), String> {
            let mut dest = vec![1u8; PAGES * PAGE_SIZE];
            let _ = ready_tx.send(());
            let cpu0 = thread_cpu();
            let (mut page_bytes, mut wire) = (0u64, 0u64);
            loop {
                let r = source.next_record().map_err(|e| e.to_string())?;
                wire += (r.payload.len() + 24) as u64;
                match r.kind {
                    RecordKind::Pages => page_bytes += apply(p, r.payload, &mut dest)?,
                    RecordKind::Close => return Ok((page_bytes, wire, thread_cpu() - cpu0)),
                    k => return Err(format!("unexpected {k:?}")),
                }
            }
        })
        .map_err(|e| format!("spawning the receiver: {e}"))?;
    ready
        .recv()
        .map_err(|_| "the receiver ended before it was ready")?;
    let cpu0 = metrics::self_cpu();
    let send_cpu0 = thread_cpu();
    let t0 = Instant::now();
    let mut i = 0;
    while t0.elapsed() < dur {
        let batch = Batch {
            records: records.clone(),
            first: i,
            n: shape.records,
        };
        sink.send_lent(Box::new(batch)).map_err(|e| e.to_string())?;
        i += shape.records;
    }
    let mut close = Vec::new();
    write_record(&mut close, RecordKind::Close, 1, &[]);
    sink.send(&[&close]).map_err(|e| e.to_string())?;
    let send_cpu = (thread_cpu() - send_cpu0).as_secs_f64();
    let (page_bytes, wire, recv_cpu) = receiver.join().map_err(|_| "receiver panicked")??;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = (metrics::self_cpu() - cpu0).as_secs_f64();
    drop(sink);
    let _ = c.shutdown(std::net::Shutdown::Both);
    if let Some(h) = back_reader {
        let _ = h.join();
    }
    let gib = page_bytes as f64 / (1u64 << 30) as f64;
    Ok(CaseResult {
        link: link.name().into(),
        transport: mode_name(t, mode),
        sealing: sealing_name(sealing).into(),
        payload: payload_name(p).into(),
        seconds: secs,
        page_bytes,
        wire_bytes: wire,
        gib_per_s: gib / secs,
        wire_gib_per_s: wire as f64 / (1u64 << 30) as f64 / secs,
        cpu_s_per_gib: cpu / gib,
        sender_cpu_s_per_gib: send_cpu / gib,
        receiver_cpu_s_per_gib: recv_cpu.as_secs_f64() / gib,
    })
}

/// The backup's half of one case: `t` over `s` (uring: into a ring of
/// `ann`), opening with `open` when the case is sealed.
fn case_source(
    t: TransportKind,
    s: TcpStream,
    ann: &Announce,
    mut b_open: Option<Opener>,
) -> Result<Box<dyn RecordSource + Send>, String> {
    Ok(match t {
        TransportKind::Tcp => {
            let mut r = RecordReader::new(s);
            if let Some(o) = b_open.take() {
                r.authenticate(o);
            }
            Box::new(r)
        }
        TransportKind::Uring => Box::new(
            UringSource::new(s, ann)
                .map_err(|e| e.to_string())?
                .authenticate(b_open.take()),
        ),
        TransportKind::Rdma => return Err("rdma cannot be benchmarked without a device".into()),
    })
}

/// A case's sink and the thread draining its return path (rings only).
type CaseSink = (Box<dyn RecordSink>, Option<std::thread::JoinHandle<()>>);

/// The primary's half of one case: `t` over `c` (and, for a ring, the
/// thread draining its return path), sealing with `seal` when the case is
/// sealed.
fn case_sink(
    t: TransportKind,
    c: &TcpStream,
    mode: Option<SendMode>,
    mut p_open: Option<Opener>,
    mut p_seal: Option<Sealer>,
) -> Result<CaseSink, String> {
    let mut back_reader = None;
    let mut sink: Box<dyn RecordSink> = match t {
        TransportKind::Tcp => Box::new(TcpSink(c.try_clone().map_err(|e| e.to_string())?)),
        _ => {
            let mut r = RecordReader::new(c.try_clone().map_err(|e| e.to_string())?);
            if let Some(o) = p_open.take() {
                r.authenticate(o);
            }
            let back = CreditFilter::passthrough(r);
            let h = std::thread::Builder::new()
                .name("bt-return".into())
                .spawn(move || {
                    let mut b = back;
                    let mut sink = [0u8; 4096];
                    while matches!(b.read(&mut sink), Ok(n) if n > 0) {}
                })
                .map_err(|e| format!("spawning the return path reader: {e}"))?;
            back_reader = Some(h);
            let sink = UringSink::new(c.try_clone().map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
            Box::new(match mode {
                Some(m) if sink.mode().is_direct() || !m.is_direct() => sink.with_mode(m),
                _ => sink,
            })
        }
    };
    if let Some(s) = p_seal.take() {
        sink = Box::new(SealSink::new(sink, s));
    }
    Ok((sink, back_reader))
}

/// Protections a transport case runs with, plain first.
const SEALINGS: [Sealing; 3] = [None, Some(Protection::Mac), Some(Protection::Encrypt)];

/// One protection's cost on one core.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SealRate {
    pub sealing: String,
    pub seal_gib_s: f64,
    pub open_gib_s: f64,
}

/// Seals, then opens, Pages-sized (256 KiB) records on this thread for
/// `dur` each: GiB/s of payload per core for the MAC and the cipher (the
/// sender's and the receiver's side of the per-byte cost).
pub fn seal_gib_s(dur: Duration) -> Vec<SealRate> {
    let mut rec = Vec::new();
    write_record(
        &mut rec,
        RecordKind::Pages,
        1,
        &make_pages(Payload::Raw)[..256 << 10],
    );
    [Protection::Mac, Protection::Encrypt]
        .into_iter()
        .map(|p| {
            let keys = SessionKeys::derive(b"bench-transport key", &[1; 32], &[2; 32], p);
            let (mut seal, _) = keys.split(Role::Primary);
            let (_, mut open) = keys.split(Role::Backup);
            let mut sealed = Vec::new();
            let t0 = Instant::now();
            let mut n = 0u64;
            while t0.elapsed() < dur {
                let bufs = [&rec[..]];
                let out = seal.seal(&bufs).expect("a well-formed record");
                std::hint::black_box(&out);
                if n == 0 {
                    sealed = out.concat();
                }
                n += 1;
            }
            let seal_rate =
                n as f64 * (256 << 10) as f64 / (1u64 << 30) as f64 / t0.elapsed().as_secs_f64();
            // Opening needs each record under its own sequence number:
            // time one open per sealed record, resealing outside the clock.
            let (mut seal, _) = keys.split(Role::Primary);
            let (mut spent, mut m) = (Duration::ZERO, 0u64);
            while spent < dur {
                sealed.clear();
                sealed.extend(
                    seal.seal(&[&rec[..]])
                        .expect("a well-formed record")
                        .concat(),
                );
                let t = Instant::now();
                open.open(&mut sealed).expect("the sealer's own record");
                spent += t.elapsed();
                m += 1;
            }
            SealRate {
                sealing: sealing_name(Some(p)).into(),
                seal_gib_s: seal_rate,
                open_gib_s: m as f64 * (256 << 10) as f64
                    / (1u64 << 30) as f64
                    / spent.as_secs_f64(),
            }
        })
        .collect()
}

/// Single-thread memcpy bandwidth, GiB/s, over 64 MiB buffers for `dur`.
pub fn memcpy_gib_s(dur: Duration) -> f64 {
    let src = vec![1u8; 64 << 20];
    let mut dst = vec![0u8; 64 << 20];
    dst.copy_from_slice(&src); // fault in
    let t0 = Instant::now();
    let mut bytes = 0u64;
    while t0.elapsed() < dur {
        dst.copy_from_slice(std::hint::black_box(&src));
        bytes += src.len() as u64;
    }
    std::hint::black_box(&dst);
    bytes as f64 / (1u64 << 30) as f64 / t0.elapsed().as_secs_f64()
}

/// `iperf3 ARGS`, run through `prefix` (e.g. `ip netns exec NS`) if any.
fn iperf3_cmd(prefix: &[&str], args: &[&str]) -> Command {
    let mut all: Vec<&str> = prefix.to_vec();
    all.push("iperf3");
    all.extend_from_slice(args);
    let mut c = Command::new(all[0]);
    c.args(&all[1..]);
    c
}

/// iperf3 TCP throughput to `ip` (server and client each run through their
/// prefix), in GiB/s; None when iperf3 is missing or fails.
fn iperf3(server_prefix: &[&str], client_prefix: &[&str], ip: &str, secs: u32) -> Option<f64> {
    let port = "5299";
    let mut child = iperf3_cmd(server_prefix, &["-s", "-1", "-B", ip, "-p", port])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let t = secs.to_string();
    let mut out = None;
    // The server's readiness has no event to wait on: retry the client.
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        if let Ok(o) = iperf3_cmd(client_prefix, &["-c", ip, "-p", port, "-J", "-t", &t]).output() {
            if o.status.success() {
                out = Some(o.stdout);
                break;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let j: serde_json::Value = serde_json::from_slice(&out?).ok()?;
    let bps = j["end"]["sum_received"]["bits_per_second"].as_f64()?;
    Some(bps / 8.0 / (1u64 << 30) as f64)
}

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

const VETH_A: &str = "castor-bt-a";
const VETH_B: &str = "castor-bt-b";
const VETH_IP_A: &str = "10.213.0.1";

/// A veth pair between two namespaces this run creates (A: 10.213.0.1,
/// B: 10.213.0.2) and deletes when dropped; addresses exist only inside.
struct Veth;

impl Veth {
    fn create() -> Option<Veth> {
        let v = Veth;
        v.cleanup();
        let (a, b) = (VETH_A, VETH_B);
        let ok = sh(&["ip", "netns", "add", a])
            && sh(&["ip", "netns", "add", b])
            && sh(&[
                "ip", "link", "add", "cbt0", "netns", a, "type", "veth", "peer", "name", "cbt1",
                "netns", b,
            ])
            && sh(&["ip", "-n", a, "addr", "add", "10.213.0.1/30", "dev", "cbt0"])
            && sh(&["ip", "-n", b, "addr", "add", "10.213.0.2/30", "dev", "cbt1"])
            && sh(&["ip", "-n", a, "link", "set", "cbt0", "up"])
            && sh(&["ip", "-n", b, "link", "set", "cbt1", "up"])
            && sh(&["ip", "-n", a, "link", "set", "lo", "up"])
            && sh(&["ip", "-n", b, "link", "set", "lo", "up"]);
        ok.then_some(v)
    }

    fn cleanup(&self) {
        sh(&["ip", "netns", "del", VETH_A]);
        sh(&["ip", "netns", "del", VETH_B]);
    }

    /// iperf3 from B to A.
    fn iperf3(&self, secs: u32) -> Option<f64> {
        iperf3(
            &["ip", "netns", "exec", VETH_B],
            &["ip", "netns", "exec", VETH_A],
            "10.213.0.2",
            secs,
        )
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Zero copy against copy for one send size ([`zc_sizes`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SizeCase {
    pub send_bytes: usize,
    pub zc: CaseResult,
    pub copy: CaseResult,
}

/// `uring-zc` against `uring-copy` (raw pages, no sealing) for sends of 4
/// KiB to 1 MiB, one record per send (four of 256 KiB for 1 MiB), each
/// pair side by side, `rounds` rounds interleaved, the median reported:
/// what [`crate::transport::uring::ZC_MIN`] is chosen from.
pub fn zc_sizes(dur: Duration, rounds: usize) -> Result<Vec<SizeCase>, String> {
    let shapes = [(1, 1), (4, 1), (16, 1), (64, 1), (64, 4)];
    let mut all: Vec<[Vec<CaseResult>; 2]> = vec![[Vec::new(), Vec::new()]; shapes.len()];
    for round in 0..rounds.max(1) {
        eprintln!("send sizes: round {} of {}", round + 1, rounds.max(1));
        for (i, &(pages, records)) in shapes.iter().enumerate() {
            let shape = Shape { pages, records };
            for (k, m) in [SendMode::Direct, SendMode::DirectCopy]
                .into_iter()
                .enumerate()
            {
                let r = run_shaped(
                    TransportKind::Uring,
                    Payload::Raw,
                    dur,
                    Some(m),
                    Link::Loopback,
                    None,
                    shape,
                )?;
                all[i][k].push(r);
            }
        }
    }
    let median = |mut rs: Vec<CaseResult>| {
        rs.sort_by(|a, b| a.gib_per_s.total_cmp(&b.gib_per_s));
        rs.swap_remove(rs.len() / 2)
    };
    println!("send size   uring-zc GiB/s  cpu s/GiB   uring-copy GiB/s  cpu s/GiB   (loopback, raw, median of {} rounds)", rounds.max(1));
    let mut out = Vec::new();
    for (&(pages, records), [zc, copy]) in shapes.iter().zip(all) {
        let (zc, copy) = (median(zc), median(copy));
        let send_bytes = pages * records * PAGE_SIZE;
        println!(
            "{:>6} KiB {:>15.2} {:>10.3} {:>18.2} {:>10.3}",
            send_bytes >> 10,
            zc.gib_per_s,
            zc.cpu_s_per_gib,
            copy.gib_per_s,
            copy.cpu_s_per_gib
        );
        out.push(SizeCase {
            send_bytes,
            zc,
            copy,
        });
    }
    Ok(out)
}

/// Which cases [`run`] runs: each list empty for all, else the names to
/// keep (cases `tcp`, `uring`, `uring-zc`, `uring-copy`; payloads `raw`,
/// `lz4`; sealings `plain`, `mac`, `aes-gcm`).
#[derive(Debug, Clone, Default)]
pub struct Only {
    pub cases: Vec<String>,
    pub payloads: Vec<String>,
    pub sealings: Vec<String>,
}

impl Only {
    fn wants(&self, list: &[String], name: &str) -> bool {
        list.is_empty() || list.iter().any(|n| n == name)
    }
}

fn payload_name(p: Payload) -> &'static str {
    match p {
        Payload::Raw => "raw",
        Payload::Lz4 => "lz4",
    }
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub memcpy_gib_s: f64,
    /// Sealing and opening alone, one core each.
    pub seal: Vec<SealRate>,
    pub iperf3_loopback_gib_s: Option<f64>,
    pub iperf3_veth_gib_s: Option<f64>,
    pub cases: Vec<CaseResult>,
}

/// Runs every case `rounds` times for `dur` each, the cases interleaved so
/// load from elsewhere on the machine hits them alike; reports each case's
/// median round (by throughput).
/// `only`: which cases to run.
pub fn run(
    dur: Duration,
    rounds: usize,
    iperf: bool,
    veth: bool,
    only: &Only,
) -> Result<Report, String> {
    let memcpy = memcpy_gib_s(Duration::from_secs(1));
    println!("memcpy (1 thread)      {memcpy:>7.2} GiB/s");
    let seal = seal_gib_s(Duration::from_secs(1));
    for s in &seal {
        println!(
            "{:<8} (1 core)       seal {:>6.2} GiB/s   open {:>6.2} GiB/s   (256 KiB records)",
            s.sealing, s.seal_gib_s, s.open_gib_s
        );
    }
    let secs = dur.as_secs().max(1) as u32;
    let lo = if iperf {
        iperf3(&[], &[], "127.0.0.1", secs)
    } else {
        None
    };
    if iperf {
        println!(
            "iperf3 loopback        {}",
            lo.map_or("unavailable".into(), |g| format!("{g:>7.2} GiB/s"))
        );
    }
    // The veth pair (root and iproute2 needed) carries iperf3 and the
    // transports themselves; without it only loopback is measured.
    let pair = if veth {
        let v = Veth::create();
        if v.is_none() {
            eprintln!("bench-transport: cannot create the veth pair (needs root and iproute2): loopback only");
        }
        v
    } else {
        None
    };
    let ve = match (&pair, iperf) {
        (Some(v), true) => v.iperf3(secs),
        _ => None,
    };
    if veth && iperf {
        println!(
            "iperf3 veth (netns)    {}",
            ve.map_or("unavailable".into(), |g| format!("{g:>7.2} GiB/s"))
        );
    }
    let mut links = vec![Link::Loopback];
    if pair.is_some() {
        links.push(Link::Veth);
    }
    let mut plan = Vec::new();
    for &link in &links {
        for p in [Payload::Raw, Payload::Lz4] {
            for (t, zc, sealings) in [
                (TransportKind::Tcp, None, &SEALINGS[..]),
                (TransportKind::Uring, None, &SEALINGS[..]),
                (TransportKind::Uring, Some(SendMode::Direct), &SEALINGS[..1]),
                (
                    TransportKind::Uring,
                    Some(SendMode::DirectCopy),
                    &SEALINGS[..1],
                ),
            ] {
                if !only.wants(&only.cases, &mode_name(t, zc))
                    || !only.wants(&only.payloads, payload_name(p))
                {
                    continue;
                }
                for &s in sealings {
                    if only.wants(&only.sealings, sealing_name(s)) {
                        plan.push((t, p, zc, link, s));
                    }
                }
            }
        }
    }
    let mut all: Vec<Vec<CaseResult>> = vec![Vec::new(); plan.len()];
    for round in 0..rounds.max(1) {
        eprintln!("round {} of {}", round + 1, rounds.max(1));
        for (i, &(t, p, zc, link, s)) in plan.iter().enumerate() {
            all[i].push(run_case(t, p, dur, zc, link, s)?);
        }
    }
    drop(pair);
    println!("link      transport   payload sealing   page GiB/s   wire GiB/s   cpu s / replicated GiB (sender, receiver threads)   (median of {} rounds)", rounds.max(1));
    let mut cases = Vec::new();
    for mut rs in all {
        rs.sort_by(|a, b| a.gib_per_s.total_cmp(&b.gib_per_s));
        let r = rs.swap_remove(rs.len() / 2);
        {
            println!(
                "{:<9} {:<11} {:<7} {:<8} {:>12.2} {:>12.2} {:>12.3}  ({:.3}, {:.3})",
                r.link,
                r.transport,
                r.payload,
                r.sealing,
                r.gib_per_s,
                r.wire_gib_per_s,
                r.cpu_s_per_gib,
                r.sender_cpu_s_per_gib,
                r.receiver_cpu_s_per_gib
            );
            cases.push(r);
        }
    }
    Ok(Report {
        memcpy_gib_s: memcpy,
        seal,
        iperf3_loopback_gib_s: lo,
        iperf3_veth_gib_s: ve,
        cases,
    })
}
