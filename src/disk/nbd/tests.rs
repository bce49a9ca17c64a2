//! NBD server tests: a raw client for protocol and hostile cases, and real
//! clients (qemu-io, nbdinfo) where installed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use super::proto::*;
use super::*;
use crate::disk::{DiskImage, Fence, LogConfig, WriteLog};

const SIZE: u64 = 1 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    log: Arc<WriteLog>,
    server: NbdServer,
}

fn fixture_with(cfg: ServerConfig, names: &[&str]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let img = DiskImage::create(&dir.path().join("d.img"), SIZE).unwrap();
    let log = Arc::new(WriteLog::new(
        img,
        Arc::new(Fence::open()),
        LogConfig::default(),
    ));
    let exports = names
        .iter()
        .map(|n| Export {
            name: n.to_string(),
            log: log.clone(),
        })
        .collect();
    let addr: NbdAddr = "127.0.0.1:0".parse().unwrap();
    let server = NbdServer::start(&addr, exports, cfg).unwrap();
    Fixture {
        _dir: dir,
        log,
        server,
    }
}

fn fixture() -> Fixture {
    fixture_with(ServerConfig::default(), &["data"])
}

fn image_bytes(log: &WriteLog) -> Vec<u8> {
    let mut b = vec![0u8; SIZE as usize];
    log.read(&mut b, 0).unwrap();
    b
}

/// A raw client: `opt` sends an option, `req` a request.
struct Client(TcpStream);

impl Client {
    fn connect(f: &Fixture) -> Client {
        let s = TcpStream::connect(f.server.local_addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Client(s);
        let mut hello = [0u8; 18];
        c.0.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[0..8], &NBDMAGIC.to_be_bytes());
        assert_eq!(&hello[8..16], &IHAVEOPT.to_be_bytes());
        c
    }

    fn flags(&mut self, f: u32) {
        self.0.write_all(&f.to_be_bytes()).unwrap();
    }

    fn opt(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.0.write_all(&b).unwrap();
    }

    /// Reads one option reply: (type, data).
    fn opt_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(&h[0..8], &REPLY_MAGIC.to_be_bytes());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.0.read_exact(&mut d).unwrap();
        (kind, d)
    }

    fn go(f: &Fixture, name: &str) -> Client {
        let mut c = Client::connect(f);
        c.flags(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES);
        c.opt(OPT_GO, &info_data(name, &[]));
        let (k, d) = c.opt_reply();
        assert_eq!(k, REP_INFO);
        assert_eq!(&d[2..10], &SIZE.to_be_bytes());
        assert_eq!(c.opt_reply().0, REP_ACK);
        c
    }

    fn req(&mut self, kind: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> u32 {
        let r = Request {
            magic: REQUEST_MAGIC,
            flags,
            kind,
            cookie: 77,
            offset,
            len,
        };
        let mut b = r.encode().to_vec();
        b.extend_from_slice(data);
        self.0.write_all(&b).unwrap();
        self.reply()
    }

    fn reply(&mut self) -> u32 {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(&h[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            77,
            "cookie echoed"
        );
        u32::from_be_bytes(h[4..8].try_into().unwrap())
    }

    /// Whether the server has closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

#[test]
fn options_list_info_and_unknown_are_answered() {
    let f = fixture();
    let mut c = Client::connect(&f);
    c.flags(CLIENT_FIXED_NEWSTYLE);
    c.opt(OPT_LIST, &[]);
    let (k, d) = c.opt_reply();
    assert_eq!((k, &d[4..]), (REP_SERVER, &b"data"[..]));
    assert_eq!(c.opt_reply().0, REP_ACK);
    c.opt(OPT_LIST, b"x");
    assert_eq!(c.opt_reply().0, REP_ERR_INVALID);
    c.opt(99, b"whatever");
    assert_eq!(c.opt_reply().0, REP_ERR_UNSUP);
    c.opt(OPT_INFO, &info_data("nope", &[]));
    assert_eq!(c.opt_reply().0, REP_ERR_UNKNOWN);
    let mut bad = info_data("data", &[INFO_BLOCK_SIZE]);
    bad.push(0);
    c.opt(OPT_INFO, &bad);
    assert_eq!(c.opt_reply().0, REP_ERR_INVALID, "trailing byte");
    c.opt(OPT_INFO, &[0, 0, 0xff, 0xff]);
    assert_eq!(
        c.opt_reply().0,
        REP_ERR_INVALID,
        "name longer than the data"
    );
    c.opt(OPT_INFO, &info_data("data", &[INFO_BLOCK_SIZE, INFO_NAME]));
    let (k, d) = c.opt_reply();
    assert_eq!(
        (k, u16::from_be_bytes([d[0], d[1]])),
        (REP_INFO, INFO_EXPORT)
    );
    assert_eq!(u16::from_be_bytes([d[10], d[11]]), EXPORT_FLAGS);
    let (_, d) = c.opt_reply();
    assert_eq!(u16::from_be_bytes([d[0], d[1]]), INFO_BLOCK_SIZE);
    let (_, d) = c.opt_reply();
    assert_eq!(&d[2..], b"data");
    assert_eq!(c.opt_reply().0, REP_ACK);
    c.opt(OPT_ABORT, &[]);
    assert_eq!(c.opt_reply().0, REP_ACK);
    assert!(c.closed());
}

#[test]
fn the_only_export_answers_to_the_empty_name_and_commands_work() {
    let f = fixture();
    let mut c = Client::go(&f, "");
    assert_eq!(c.req(CMD_WRITE, CMD_FLAG_FUA, 4096, 8, &[3; 8]), 0);
    assert_eq!(c.req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 4100, 2, &[]), 0);
    assert_eq!(c.req(CMD_TRIM, 0, 0, 4096, &[]), 0);
    assert_eq!(c.req(CMD_FLUSH, 0, 0, 0, &[]), 0);
    assert_eq!(c.req(CMD_READ, 0, 4096, 8, &[]), 0);
    let mut d = [0u8; 8];
    c.0.read_exact(&mut d).unwrap();
    assert_eq!(d, [3, 3, 3, 3, 0, 0, 3, 3]);
    c.req_disc();
    assert!(c.closed());

    // With two exports the empty name is ambiguous.
    let f2 = fixture_with(ServerConfig::default(), &["a", "b"]);
    let mut c = Client::connect(&f2);
    c.flags(CLIENT_FIXED_NEWSTYLE);
    c.opt(OPT_GO, &info_data("", &[]));
    assert_eq!(c.opt_reply().0, REP_ERR_UNKNOWN);
}

impl Client {
    fn req_disc(&mut self) {
        let r = Request {
            magic: REQUEST_MAGIC,
            flags: 0,
            kind: CMD_DISC,
            cookie: 1,
            offset: 0,
            len: 0,
        };
        self.0.write_all(&r.encode()).unwrap();
    }
}

#[test]
fn export_name_option_enters_transmission_with_zeroes_padding() {
    let f = fixture();
    let mut c = Client::connect(&f);
    c.flags(CLIENT_FIXED_NEWSTYLE);
    c.opt(OPT_EXPORT_NAME, b"data");
    let mut r = [0u8; 8 + 2 + 124];
    c.0.read_exact(&mut r).unwrap();
    assert_eq!(&r[0..8], &SIZE.to_be_bytes());
    assert!(r[10..].iter().all(|&b| b == 0));
    assert_eq!(c.req(CMD_WRITE, 0, 0, 1, &[1]), 0);

    let mut c = Client::connect(&f);
    c.flags(CLIENT_FIXED_NEWSTYLE);
    c.opt(OPT_EXPORT_NAME, b"other");
    assert!(
        c.closed(),
        "EXPORT_NAME of an unknown export has no error reply"
    );
}

#[test]
fn hostile_handshakes_are_closed() {
    let f = fixture();
    for (what, send) in [
        ("oldstyle client flags", 0u32.to_be_bytes().to_vec()),
        (
            "unknown client flag",
            (CLIENT_FIXED_NEWSTYLE | 4).to_be_bytes().to_vec(),
        ),
    ] {
        let mut c = Client::connect(&f);
        c.0.write_all(&send).unwrap();
        assert!(c.closed(), "{what}");
    }
    let mut c = Client::connect(&f);
    c.flags(CLIENT_FIXED_NEWSTYLE);
    c.0.write_all(&[0xAB; 16]).unwrap();
    assert!(c.closed(), "bad option magic");
    let mut c = Client::connect(&f);
    c.flags(CLIENT_FIXED_NEWSTYLE);
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    c.0.write_all(&b).unwrap();
    assert!(
        c.closed(),
        "oversize option length, refused before reading it"
    );
    // The server still serves a well-behaved client.
    let mut c = Client::go(&f, "data");
    assert_eq!(c.req(CMD_FLUSH, 0, 0, 0, &[]), 0);
}

#[test]
fn hostile_requests_get_errors_and_write_nothing() {
    let f = fixture();
    let mut c = Client::go(&f, "data");
    assert_eq!(
        c.req(CMD_WRITE, 0, SIZE - 4, 8, &[9; 8]),
        ENOSPC,
        "write past the end"
    );
    assert_eq!(
        c.req(CMD_WRITE, 0, u64::MAX - 2, 8, &[9; 8]),
        ENOSPC,
        "offset overflow"
    );
    assert_eq!(
        c.req(CMD_WRITE, 0x80, 0, 8, &[9; 8]),
        EINVAL,
        "unknown flag"
    );
    assert_eq!(c.req(CMD_WRITE, 0, 0, 0, &[]), EINVAL, "empty write");
    assert_eq!(
        c.req(CMD_READ, 0, SIZE, 1, &[]),
        EINVAL,
        "read past the end"
    );
    assert_eq!(c.req(CMD_READ, 0, 0, 0, &[]), EINVAL, "empty read");
    assert_eq!(
        c.req(CMD_READ, 0, 0, 64 << 20, &[]),
        EINVAL,
        "oversize read"
    );
    assert_eq!(
        c.req(CMD_TRIM, 0, SIZE - 1, 2, &[]),
        EINVAL,
        "trim past the end"
    );
    assert_eq!(c.req(CMD_WRITE_ZEROES, 0, SIZE, 1, &[]), ENOSPC);
    assert_eq!(
        c.req(CMD_WRITE_ZEROES, 16, 0, 1, &[]),
        EINVAL,
        "FAST_ZERO never offered"
    );
    assert_eq!(
        c.req(CMD_FLUSH, 0, 0, 1, &[]),
        EINVAL,
        "flush with a length"
    );
    assert_eq!(
        c.req(7, 0, 0, 4096, &[]),
        EINVAL,
        "BLOCK_STATUS never offered"
    );
    assert_eq!(c.req(200, 0, 0, 0, &[]), EINVAL, "unknown command");
    assert!(
        image_bytes(&f.log).iter().all(|&b| b == 0),
        "nothing written"
    );
    // Oversize write: refused, connection closed, payload never read.
    let r = Request {
        magic: REQUEST_MAGIC,
        flags: 0,
        kind: CMD_WRITE,
        cookie: 77,
        offset: 0,
        len: u32::MAX,
    };
    c.0.write_all(&r.encode()).unwrap();
    assert_eq!(c.reply(), EINVAL);
    assert!(c.closed());
    // Bad request magic.
    let mut c = Client::go(&f, "data");
    c.0.write_all(&[0x55; REQUEST_LEN]).unwrap();
    assert!(c.closed());
    assert!(image_bytes(&f.log).iter().all(|&b| b == 0));
}

#[test]
fn a_client_vanishing_mid_write_writes_nothing() {
    let f = fixture();
    let mut c = Client::go(&f, "data");
    let r = Request {
        magic: REQUEST_MAGIC,
        flags: 0,
        kind: CMD_WRITE,
        cookie: 77,
        offset: 0,
        len: 4096,
    };
    c.0.write_all(&r.encode()).unwrap();
    c.0.write_all(&[7; 1000]).unwrap();
    drop(c);
    // A second client's flush is served after the first one's thread gave up;
    // the partial write never reached the image.
    let mut c2 = Client::go(&f, "data");
    assert_eq!(c2.req(CMD_FLUSH, 0, 0, 0, &[]), 0);
    let wait = std::time::Instant::now();
    while lock(&f.server.shared.conns).len() > 1 {
        assert!(
            wait.elapsed() < Duration::from_secs(10),
            "vanished client's thread never ended"
        );
        std::thread::yield_now();
    }
    assert!(image_bytes(&f.log).iter().all(|&b| b == 0));
}

#[test]
fn a_stalled_request_hits_its_deadline() {
    let cfg = ServerConfig {
        request_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let f = fixture_with(cfg, &["data"]);
    let mut c = Client::go(&f, "data");
    c.0.write_all(&REQUEST_MAGIC.to_be_bytes()).unwrap();
    // Blocks until the server gives up on the rest of the header.
    assert!(c.closed());
    let cfg = ServerConfig {
        handshake_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let f = fixture_with(cfg, &["data"]);
    let mut c = Client::connect(&f);
    assert!(c.closed(), "a client that never sends its flags is dropped");
}

#[test]
fn a_trickling_client_cannot_stretch_a_request_past_its_deadline() {
    let cfg = ServerConfig {
        request_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let f = fixture_with(cfg, &["data"]);
    let mut c = Client::go(&f, "data");
    let r = Request {
        magic: REQUEST_MAGIC,
        flags: 0,
        kind: CMD_WRITE,
        cookie: 77,
        offset: 0,
        len: 4096,
    };
    c.0.write_all(&r.encode()).unwrap();
    // One byte every 20 ms: each read succeeds, the whole never arrives
    // within the request's 300 ms; the pace, not a synchronisation.
    let start = std::time::Instant::now();
    while c.0.write_all(&[9]).is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "the trickle stretched the request past its deadline"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(
        image_bytes(&f.log).iter().all(|&b| b == 0),
        "nothing written"
    );
}

#[test]
fn pipelined_requests_across_the_read_ahead_are_served_in_order() {
    let f = fixture();
    f.log.start_recording(1);
    let mut c = Client::go(&f, "data");
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    assert!(big.len() > conn::READ_AHEAD && big.len() >= crate::disk::pool::MIN_POOLED);
    let reqs: [(u16, u64, Vec<u8>); 4] = [
        (CMD_WRITE, 0, vec![1; 4096]),
        (CMD_WRITE, 8192, big.clone()),
        (CMD_WRITE, 300_000, vec![3; 10]),
        (CMD_WRITE, 8192 + 100, vec![4; 50]),
    ];
    // Every request in one send: headers and payloads straddle the
    // server's read-ahead in every way the sizes allow.
    let mut b = Vec::new();
    for (kind, offset, data) in &reqs {
        let r = Request {
            magic: REQUEST_MAGIC,
            flags: 0,
            kind: *kind,
            cookie: 77,
            offset: *offset,
            len: data.len() as u32,
        };
        b.extend_from_slice(&r.encode());
        b.extend_from_slice(data);
    }
    c.0.write_all(&b).unwrap();
    for _ in &reqs {
        assert_eq!(c.reply(), 0);
    }
    let mut want = vec![0u8; SIZE as usize];
    for (_, offset, data) in &reqs {
        want[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }
    assert!(
        image_bytes(&f.log) == want,
        "image differs from the writes in order"
    );
    // The log holds the same bytes (the large write's buffer itself).
    let mut logged = vec![0u8; SIZE as usize];
    for op in &f.log.cut(2).ops() {
        if let crate::disk::wire::DiskOp::Write { offset, data } = op {
            logged[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
        }
    }
    assert!(logged == want, "log differs from the writes in order");
}

/// A request header with `cookie`, followed by `data`.
fn request(kind: u16, flags: u16, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let len = if kind == CMD_READ {
        512
    } else {
        data.len() as u32
    };
    let r = Request {
        magic: REQUEST_MAGIC,
        flags,
        kind,
        cookie,
        offset,
        len,
    };
    let mut b = r.encode().to_vec();
    b.extend_from_slice(data);
    b
}

/// Reads one simple reply: (error, cookie).
fn reply_of(s: &mut TcpStream) -> (u32, u64) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
    (
        u32::from_be_bytes(h[4..8].try_into().unwrap()),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
    )
}

#[test]
fn replies_to_a_pipelined_burst_all_arrive_before_the_server_waits_for_more() {
    let f = fixture();
    let mut c = Client::go(&f, "data");
    c.0.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Three writes, a FUA write, a read of the first, a flush, then the
    // first half of one more header: the server must answer all six
    // (queued replies go out before it blocks on the socket for the rest).
    let mut b = Vec::new();
    b.extend(request(CMD_WRITE, 0, 1, 0, &[1; 4096]));
    b.extend(request(CMD_WRITE, 0, 2, 4096, &[2; 4096]));
    b.extend(request(CMD_WRITE, 0, 3, 0, &[3; 100]));
    b.extend(request(CMD_WRITE, CMD_FLAG_FUA, 4, 9000, &[4; 10]));
    b.extend(request(CMD_READ, 0, 5, 0, &[]));
    b.extend(request(CMD_FLUSH, 0, 6, 0, &[]));
    let last = request(CMD_WRITE, 0, 7, 20_000, &[7; 64]);
    b.extend_from_slice(&last[..10]);
    c.0.write_all(&b).unwrap();
    for cookie in 1..=5 {
        assert_eq!(reply_of(&mut c.0), (0, cookie), "in order");
    }
    let mut read = vec![0u8; 512];
    c.0.read_exact(&mut read).unwrap();
    let mut want = vec![3u8; 100];
    want.extend_from_slice(&[1; 412]);
    assert_eq!(read, want, "the read sees the writes before it");
    assert_eq!(reply_of(&mut c.0), (0, 6));
    c.0.write_all(&last[10..]).unwrap();
    assert_eq!(reply_of(&mut c.0), (0, 7));
    let img = image_bytes(&f.log);
    assert_eq!(&img[4096..8192], &[2; 4096][..]);
    assert_eq!(&img[20_000..20_064], &[7; 64][..]);
}

#[test]
fn a_fenced_export_completes_no_write() {
    let f = fixture();
    let mut c = Client::go(&f, "data");
    f.log.start_recording(1);
    assert_eq!(c.req(CMD_WRITE, 0, 0, 4, &[1; 4]), 0);
    f.log.fence().revoke();
    assert_eq!(c.req(CMD_WRITE, 0, 8, 4, &[2; 4]), ESHUTDOWN);
    assert_eq!(c.req(CMD_WRITE_ZEROES, 0, 0, 4, &[]), ESHUTDOWN);
    assert_eq!(c.req(CMD_FLUSH, 0, 0, 0, &[]), ESHUTDOWN);
    let img = image_bytes(&f.log);
    assert_eq!(&img[0..12], &[1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        f.log.cut(2).ops().len(),
        1,
        "only the write before the fence is logged"
    );
}

#[test]
fn stop_closes_idle_connections() {
    let f = fixture();
    let mut c = Client::go(&f, "data");
    f.server.stop();
    assert!(c.closed());
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn qemu_io_writes_and_reads_back_through_tcp_and_unix() {
    if !have("qemu-io") {
        eprintln!("skipping: qemu-io not installed (apt-get install qemu-utils)");
        return;
    }
    let f = fixture();
    let url = format!("nbd://{}/data", f.server.local_addr());
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0xab 4096 65536",
            "-c",
            "write -z 8192 4096",
            "-c",
            "flush",
        ])
        .arg(&url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = image_bytes(&f.log);
    assert!(img[4096..8192].iter().all(|&b| b == 0xab));
    assert!(img[8192..12288].iter().all(|&b| b == 0));
    assert!(img[12288..4096 + 65536].iter().all(|&b| b == 0xab));
    assert!(img[4096 + 65536..].iter().all(|&b| b == 0));

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let addr: NbdAddr = format!("unix:{}", sock.display()).parse().unwrap();
    let s = NbdServer::start(
        &addr,
        vec![Export {
            name: "data".into(),
            log: f.log.clone(),
        }],
        ServerConfig::default(),
    )
    .unwrap();
    let url = format!("nbd+unix:///data?socket={}", sock.display());
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "read -P 0xab 4096 4096",
            "-c",
            "read -P 0 8192 4096",
        ])
        .arg(&url)
        .output()
        .unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !so.contains("Pattern verification failed"),
        "{so}"
    );
    s.stop();
    assert!(!Path::new(&sock).exists(), "socket removed on stop");
}

#[test]
fn nbdinfo_sees_the_export() {
    if !have("nbdinfo") {
        eprintln!("skipping: nbdinfo not installed (apt-get install libnbd-bin)");
        return;
    }
    let f = fixture();
    let out = Command::new("nbdinfo")
        .args(["--json", &format!("nbd://{}/data", f.server.local_addr())])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], SIZE);
    assert_eq!(e["can_flush"], true);
    assert_eq!(e["can_trim"], true);
    assert_eq!(e["can_zero"], true);
    assert_eq!(e["can_fua"], true);
    assert_eq!(e["can_multi_conn"], true);
}
