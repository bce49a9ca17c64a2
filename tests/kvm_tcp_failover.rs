//! The `tcpcount` guest (its own ARP/IPv4/ICMP/TCP stack, guests/README.md)
//! under protection, with a client in a network namespace of its own that
//! holds ONE TCP connection and sends request lines back to back. The
//! primary is SIGKILLed at a random moment; the backup activates the guest
//! on its own TAP on the same bridge. The connection must survive: no
//! reset, every request answered exactly once, every counter one more than
//! the previous. Segments the primary produced but never released (output
//! commit) are retransmitted by the restored guest or by the client.
//!
//! Topology (all inside namespaces this test creates and deletes):
//! namespace "castor" holds bridge br0, the primary's TAP tp0, the backup's
//! TAP tb0 and one end of a veth pair; the other end is the client's eth0
//! (10.202.0.1/24) in the client's namespace. The guest is 10.202.0.2.
//!
//! Each failover trial prints the client-visible pause and its breakdown:
//! kill → detection (backup's stream ended) → arbitration (lock won) →
//! fencing (`--fence-cmd true`) → activation (guest running) → first reply
//! (the TCP retransmission that carries the request or reply over).
//! `CASTOR_TCP_CLIENT_RTO_MIN=50ms` sets the client route's minimum RTO
//! (Linux default 200 ms) to see how much of the pause it is.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const GUEST: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 2);
const CLIENT: &str = "10.202.0.1/24";
const CLIENT_MAC: &str = "02:00:00:00:02:01";
const PORT: u16 = 7000;

/// Lines a child wrote to stderr, each with when the test read it.
type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

fn collect(stream: impl Read + Send + 'static) -> (Lines, std::thread::JoinHandle<()>) {
    let lines: Lines = Arc::default();
    let l = lines.clone();
    let h = std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            l.lock().unwrap().push((Instant::now(), line));
        }
    });
    (lines, h)
}

/// A protected tcpcount guest with an activating backup, and a client
/// namespace wired to the same bridge.
struct Rig {
    // Dropped in this order: processes first, then the namespaces.
    primary: Option<Reaped>,
    backup: Backup,
    backup_err: Lines,
    backup_reader: Option<std::thread::JoinHandle<()>>,
    client_ns: Netns,
    _ns: Netns,
    _dir: tempfile::TempDir,
}

impl Rig {
    /// None (reason printed) when the machine lacks /dev/kvm, root or
    /// network namespaces. The guest image itself is built by build.rs,
    /// which fails the build with a clear message without `gcc -m32`.
    fn start(tag: &str) -> Option<Rig> {
        if std::fs::File::open("/dev/kvm").is_err() {
            eprintln!("SKIP: /dev/kvm is not available");
            return None;
        }
        if !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("SKIP: /dev/net/tun does not exist (no TAP devices)");
            return None;
        }
        let ns = Netns::create(tag)?;
        let client_ns = Netns::create(&format!("{tag}c"))?;
        ns.ip(&["link", "add", "br0", "type", "bridge"]);
        ns.ip(&["link", "set", "br0", "up"]);
        for tap in ["tp0", "tb0"] {
            ns.ip(&["tuntap", "add", "dev", tap, "mode", "tap"]);
            ns.ip(&["link", "set", tap, "master", "br0"]);
            ns.ip(&["link", "set", tap, "up"]);
        }
        ns.ip(&[
            "link",
            "add",
            "vc0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &client_ns.name,
        ]);
        ns.ip(&["link", "set", "vc0", "master", "br0"]);
        ns.ip(&["link", "set", "vc0", "up"]);
        client_ns.ip(&["link", "set", "eth0", "address", CLIENT_MAC]);
        client_ns.ip(&["addr", "add", CLIENT, "dev", "eth0"]);
        client_ns.ip(&["link", "set", "eth0", "up"]);
        // Tuning knob for measurements: the client's minimum RTO (Linux
        // default 200 ms), which bounds how soon it resends a request the
        // dead primary took with it.
        if let Ok(rto) = std::env::var("CASTOR_TCP_CLIENT_RTO_MIN") {
            client_ns.ip(&[
                "route",
                "replace",
                "10.202.0.0/24",
                "dev",
                "eth0",
                "rto_min",
                &rto,
            ]);
        }

        let dir = tempfile::tempdir().unwrap();
        let lock = pair_lock(dir.path());
        let mut backup = Backup::start_cmd(
            castor_in(&ns.name),
            &dir.path().join("replica"),
            &[
                "--arbiter",
                &lock,
                // Detection here is the stream's end at the SIGKILL; a
                // generous silence timeout keeps a stall under load from
                // being suspected as a failure before it.
                "--heartbeat-timeout",
                "5s",
                "--activate",
                "--override",
                "tap=tb0",
                "--run-for",
                "60s",
                "--fence-cmd",
                "true",
            ],
            KEY,
        );
        let (backup_err, reader) = collect(backup.child.stderr.take().unwrap());
        let spec = format!("kvm:guest=tcpcount,tap=tp0,ip={GUEST},console=stderr");
        let primary = Reaped::spawn(
            castor_in(&ns.name)
                .args([
                    "protect",
                    "--quiet",
                    "--domain",
                    &spec,
                    "--backup",
                    &backup.addr,
                    "--arbiter",
                    &lock,
                    "--backup-timeout",
                    "10s",
                ])
                .stderr(Stdio::inherit()),
        );
        Some(Rig {
            primary: Some(primary),
            backup,
            backup_err,
            backup_reader: Some(reader),
            client_ns,
            _ns: ns,
            _dir: dir,
        })
    }

    /// Stops the backup (SIGTERM: an activated domain stops cleanly and
    /// the backup prints its failover summary) and returns everything it
    /// wrote to stderr.
    fn finish(mut self) -> Vec<(Instant, String)> {
        drop(self.primary.take());
        let pid = self.backup.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own unreaped child: the pid is still ours.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let t0 = Instant::now();
        while self.backup.child.try_wait().unwrap().is_none() {
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = self.backup.child.kill();
                let _ = self.backup.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(h) = self.backup_reader.take() {
            h.join().unwrap();
        }
        let lines = std::mem::take(&mut *self.backup_err.lock().unwrap());
        let all: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
        assert!(
            !all.iter().any(|l| l.contains("panicked")),
            "backup panicked:\n{}",
            all.join("\n")
        );
        lines
    }
}

/// Connects to the guest, retrying while it boots (first ARP, first SYN).
fn connect(deadline: Duration) -> TcpStream {
    let addr = SocketAddr::from((GUEST, PORT));
    let t0 = Instant::now();
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => return s,
            Err(e) if t0.elapsed() < deadline => {
                eprintln!("connect: {e}; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("cannot connect to the guest within {deadline:?}: {e}"),
        }
    }
}

/// The client's view of one connection: line-at-a-time requests.
struct Client {
    w: TcpStream,
    r: BufReader<TcpStream>,
    next_id: u64,
}

/// One answered request.
#[derive(Clone, Copy, Debug)]
struct Reply {
    counter: u64,
    sent: Instant,
    received: Instant,
}

impl Client {
    fn new(s: TcpStream) -> Client {
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Client {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
            next_id: 1,
        }
    }

    /// Sends one request line and waits up to `patience` for its reply
    /// line. Panics on a reset, EOF, a malformed reply or no reply.
    fn ask(&mut self, patience: Duration) -> Reply {
        let id = self.next_id;
        self.next_id += 1;
        let sent = Instant::now();
        self.w
            .write_all(format!("request {id}\n").as_bytes())
            .unwrap_or_else(|e| panic!("request {id}: write failed (connection lost): {e}"));
        let mut line = String::new();
        loop {
            match self.r.read_line(&mut line) {
                Ok(0) => panic!("request {id}: the guest closed the connection"),
                Ok(_) if line.ends_with('\n') => break,
                Ok(_) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    assert!(
                        sent.elapsed() < patience,
                        "request {id} unanswered after {patience:?} (partial {line:?})"
                    );
                }
                Err(e) => panic!("request {id}: read failed (connection lost): {e}"),
            }
        }
        let counter = line
            .trim_end_matches('\n')
            .parse::<u64>()
            .unwrap_or_else(|e| panic!("request {id}: reply {line:?} is not a counter: {e}"));
        Reply {
            counter,
            sent,
            received: Instant::now(),
        }
    }

    /// Half-closes and checks that nothing but the guest's FIN follows:
    /// a request answered twice would leave an extra reply line here.
    fn close(mut self) {
        self.w.shutdown(std::net::Shutdown::Write).unwrap();
        self.w
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut rest = Vec::new();
        self.r
            .read_to_end(&mut rest)
            .expect("the guest closes its side after ours (FIN, not reset)");
        assert!(
            rest.is_empty(),
            "bytes after the last reply (a request answered twice?): {:?}",
            String::from_utf8_lossy(&rest)
        );
    }

    /// The kernel's retransmission count for this connection (TCP_INFO).
    fn retransmissions(&self) -> u32 {
        use std::os::fd::AsRawFd;
        // SAFETY: tcp_info is plain old data; all-zero is a valid value.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: the fd is an open TCP socket; info/len describe a
        // writable buffer of len bytes.
        let rc = unsafe {
            libc::getsockopt(
                self.w.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                &mut info as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
        info.tcpi_total_retrans
    }
}

fn ones_complement(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One ICMP echo round trip over a raw socket (the caller is root);
/// true when the matching echo reply came back within `patience`.
fn ping(dst: Ipv4Addr, seq: u16, patience: Duration) -> bool {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh socket owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let ident = (std::process::id() & 0xffff) as u16;
    let mut msg = vec![8u8, 0, 0, 0];
    msg.extend_from_slice(&ident.to_be_bytes());
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend_from_slice(b"castor tcpcount ping payload");
    let c = ones_complement(&msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    // SAFETY: sockaddr_in is plain old data; all-zero is valid.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: fd is open; the pointers and lengths describe live values.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr() as *const libc::c_void,
            msg.len(),
            0,
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
    }
    let t0 = Instant::now();
    let mut buf = [0u8; 1500];
    while t0.elapsed() < patience {
        // SAFETY: buf is writable for its length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n < 20 {
            continue;
        }
        let n = n as usize;
        let ihl = usize::from(buf[0] & 15) * 4;
        if n < ihl + 8 || buf[12..16] != dst.octets() {
            continue;
        }
        let icmp = &buf[ihl..n];
        if icmp[0] == 0
            && icmp[4..6] == ident.to_be_bytes()
            && icmp[6..8] == seq.to_be_bytes()
            && icmp[8..] == msg[8..]
            && ones_complement(icmp) == 0
        {
            return true;
        }
    }
    false
}

/// Without a failover: ping works, one connection answers many lines in
/// order, closes cleanly, and a second connection continues the counter.
#[test]
fn tcp_guest_answers_lines_in_order() {
    let Some(rig) = Rig::start("tcs") else {
        return;
    };
    rig.client_ns.run(|| {
        let mut c = Client::new(connect(Duration::from_secs(60)));
        let mut last = 0;
        for i in 0..300 {
            let r = c.ask(Duration::from_secs(10));
            assert_eq!(r.counter, last + 1, "reply {i}");
            last = r.counter;
        }
        eprintln!("300 lines, client retransmissions: {}", c.retransmissions());
        c.close();
        for seq in 1..=3 {
            assert!(
                ping(GUEST, seq, Duration::from_secs(5)),
                "no echo reply to ping {seq}"
            );
        }
        let mut c = Client::new(connect(Duration::from_secs(10)));
        let r = c.ask(Duration::from_secs(10));
        assert_eq!(r.counter, last + 1, "the counter spans connections");
        c.close();
    });
    rig.finish();
}

/// Parses the `+N.N ms` figures of a backup line, in order.
fn millis(line: &str) -> Vec<f64> {
    line.split('+')
        .skip(1)
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Sets the flag when dropped (also while unwinding).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// One failover trial: returns the printed summary line.
fn failover_trial(trial: usize) -> Option<String> {
    let rig = Rig::start("tcf")?;
    let killed_at: Mutex<Option<Instant>> = Mutex::new(None);
    let answered = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    // The kill lands after 40 warm-up replies plus a random 0..400 ms, so
    // it hits requests, replies and checkpoints at arbitrary phases.
    let mut rnd = [0u8; 2];
    getrandom::getrandom(&mut rnd).unwrap();
    let extra = Duration::from_millis(u64::from(u16::from_le_bytes(rnd)) % 400);
    let primary_child = &rig.primary;
    let (replies, retrans) = std::thread::scope(|s| {
        s.spawn(|| {
            // Bounded: the client side always sets `stop` (even when it
            // panics, see StopOnDrop), and the deadline covers the rest.
            let t0 = Instant::now();
            while answered.load(Ordering::Acquire) < 40 {
                if stop.load(Ordering::Acquire) || t0.elapsed() > Duration::from_secs(180) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(extra);
            // SAFETY: kill(2) on our own child's pid (still unreaped, so
            // the pid cannot have been reused).
            let pid = primary_child.as_ref().unwrap().0.id() as libc::pid_t;
            let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
            *killed_at.lock().unwrap() = Some(Instant::now());
            assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
        });
        // Whatever happens on the client side (a panic in connect too),
        // the kill thread is told to stop, so the scope can end.
        let _stop = StopOnDrop(&stop);
        let out = rig.client_ns.run(|| {
            let mut c = Client::new(connect(Duration::from_secs(60)));
            let mut replies = Vec::new();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loop {
                let r = c.ask(Duration::from_secs(20));
                replies.push(r);
                answered.store(replies.len() as u64, Ordering::Release);
                if let Some(k) = *killed_at.lock().unwrap() {
                    let after = replies.iter().filter(|r| r.sent > k).count();
                    if after >= 40 {
                        break;
                    }
                }
            }));
            stop.store(true, Ordering::Release);
            if let Err(e) = result {
                std::panic::resume_unwind(e);
            }
            let retrans = c.retransmissions();
            c.close();
            (replies, retrans)
        });
        stop.store(true, Ordering::Release);
        out
    });
    let kill = killed_at.lock().unwrap().expect("the primary was killed");
    let lines = rig.finish();
    let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
    let text = text.join("\n");
    assert!(
        text.contains("ACTIVATED"),
        "the backup never activated:\n{text}"
    );

    // The property: one reply per request, each counter one more than the
    // previous (strictly increasing, nothing counted twice or skipped).
    for w in replies.windows(2) {
        assert_eq!(
            w[1].counter,
            w[0].counter + 1,
            "counter sequence broken across the failover:\n{text}"
        );
    }

    // Breakdown, all on the test's clock. The backup prints each step's
    // time since it lost the stream ("+X ms"); the arrival of its "won"
    // line places that origin on our clock.
    let (won_seen, won_line) = lines
        .iter()
        .find(|(_, l)| l.contains("won (fencing token"))
        .unwrap_or_else(|| panic!("no arbiter line:\n{text}"));
    let won_ms = *millis(won_line).first().expect("arbiter line has +X ms");
    let summary = text
        .lines()
        .find(|l| l.contains("failover: suspect"))
        .unwrap_or_else(|| panic!("no failover summary:\n{text}"));
    let steps = millis(summary);
    assert_eq!(steps.len(), 3, "won, fenced, activated in {summary:?}");
    let ended = *won_seen - Duration::from_secs_f64(won_ms / 1000.0);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let detection = ms(ended.saturating_duration_since(kill));
    let running = ended + Duration::from_secs_f64(steps[2] / 1000.0);
    let first = replies
        .iter()
        .find(|r| r.received > running)
        .expect("a reply after activation");
    let resume = ms(first.received - running);
    let total = ms(first.received - kill);
    let pause = replies
        .windows(2)
        .map(|w| w[1].received - w[0].received)
        .max()
        .unwrap();
    // Whose retransmission carried the stream over: the guest prints
    // `tcp rto N` when its timer fires; the client's count is TCP_INFO's.
    let guest_rto = text.lines().filter(|l| l.starts_with("tcp rto")).count();
    let line = format!(
        "trial {trial}: kill at +{} ms into the stream; client-visible pause {:.1} ms; \
         kill → first reply from the backup {total:.1} ms = detection {detection:.1} + arbitration {:.1} + \
         fencing {:.1} + activation {:.1} + resume {resume:.1} (retransmissions: client {retrans}, guest {guest_rto}); \
         {} replies, counters {}..={}",
        extra.as_millis(),
        ms(pause),
        steps[0],
        steps[1] - steps[0],
        steps[2] - steps[1],
        replies.len(),
        replies[0].counter,
        replies.last().unwrap().counter,
    );
    eprintln!("{line}");
    Some(line)
}

/// The seed's demonstration: a client holds one TCP connection to the guest
/// and sends requests continuously; the primary is SIGKILLed mid-stream at
/// a random moment, three times. The connection survives (same socket, no
/// reset), every reply's counter exceeds the previous one and no request
/// goes unanswered or is answered twice.
#[test]
fn tcp_connection_survives_failover() {
    let mut lines = Vec::new();
    for trial in 0..3 {
        let Some(l) = failover_trial(trial) else {
            return;
        };
        lines.push(l);
    }
    eprintln!("summary:\n{}", lines.join("\n"));
}

/// The guest's MAC (the kvm NIC's default, guests/README.md).
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xca, 0x57, 0x01];
/// The raw peer's address: on the client's link, owned by no interface, so
/// the client's kernel drops (never resets) the guest's segments to it.
const RAW_IP: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 3);
const RAW_PORT: u16 = 40_000;

/// One TCP segment from the guest.
#[derive(Debug, Clone)]
struct Seg {
    seq: u32,
    ack: u32,
    flags: u8,
    payload: Vec<u8>,
    at: Instant,
}

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

/// A hand-driven TCP peer on an AF_PACKET socket on the client's eth0:
/// sends exactly the segments a test asks for (duplicates, holes, bad
/// checksums, garbage) and sees every segment the guest sends.
struct RawPeer {
    fd: std::os::fd::OwnedFd,
    mac: [u8; 6],
}

impl RawPeer {
    fn open() -> RawPeer {
        let fd = common::packet::packet_socket(
            "eth0",
            libc::ETH_P_ALL as u16,
            std::time::Duration::from_millis(20),
        );
        let mut mac = [0u8; 6];
        for (m, h) in mac.iter_mut().zip(CLIENT_MAC.split(':')) {
            *m = u8::from_str_radix(h, 16).unwrap();
        }
        RawPeer { fd, mac }
    }

    fn send_frame(&self, frame: &[u8]) {
        use std::os::fd::AsRawFd;
        // SAFETY: frame is readable for its length; fd is bound to eth0.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }

    /// An IPv4 frame from RAW_IP to the guest around `l4` (protocol `proto`).
    fn ip_frame(&self, proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(34 + l4.len());
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&self.mac);
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        ip[6] = 0x40;
        ip[8] = 64;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&RAW_IP.octets());
        ip[16..20].copy_from_slice(&GUEST.octets());
        let c = ones_complement(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(l4);
        f
    }

    /// A TCP segment to the guest; `bad_csum` flips a checksum bit.
    fn segment(seq: u32, ack: u32, flags: u8, payload: &[u8], bad_csum: bool) -> Vec<u8> {
        let syn_opt: &[u8] = if flags & SYN != 0 {
            &[2, 4, 0x05, 0xb4]
        } else {
            &[]
        };
        let hl = 20 + syn_opt.len();
        let mut t = vec![0u8; hl];
        t[0..2].copy_from_slice(&RAW_PORT.to_be_bytes());
        t[2..4].copy_from_slice(&PORT.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&ack.to_be_bytes());
        t[12] = ((hl / 4) as u8) << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&8192u16.to_be_bytes());
        t[20..].copy_from_slice(syn_opt);
        t.extend_from_slice(payload);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&RAW_IP.octets());
        pseudo.extend_from_slice(&GUEST.octets());
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&(t.len() as u16).to_be_bytes());
        pseudo.extend_from_slice(&t);
        let mut c = ones_complement(&pseudo);
        if bad_csum {
            c ^= 0x0100;
        }
        t[16..18].copy_from_slice(&c.to_be_bytes());
        t
    }

    fn send(&self, seq: u32, ack: u32, flags: u8, payload: &[u8]) {
        self.send_frame(&self.ip_frame(6, &Self::segment(seq, ack, flags, payload, false)));
    }

    /// The next segment from the guest to this peer within `within`.
    fn recv(&self, within: Duration) -> Option<Seg> {
        use std::os::fd::AsRawFd;
        let t0 = Instant::now();
        let mut buf = [0u8; 2048];
        while t0.elapsed() < within {
            // SAFETY: buf is writable for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n < 54 {
                continue;
            }
            let f = &buf[..n as usize];
            if f[0..6] != self.mac || f[6..12] != GUEST_MAC || f[12..14] != [8, 0] {
                continue;
            }
            let ip = &f[14..];
            let ihl = usize::from(ip[0] & 15) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            if ip[9] != 6 || ip[16..20] != RAW_IP.octets() || total > ip.len() || total < ihl + 20 {
                continue;
            }
            assert_eq!(ones_complement(&ip[..ihl]), 0, "guest's IPv4 checksum");
            let t = &ip[ihl..total];
            if t[2..4] != RAW_PORT.to_be_bytes() {
                continue;
            }
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&ip[12..20]);
            pseudo.extend_from_slice(&[0, 6]);
            pseudo.extend_from_slice(&(t.len() as u16).to_be_bytes());
            pseudo.extend_from_slice(t);
            assert_eq!(ones_complement(&pseudo), 0, "guest's TCP checksum");
            let hl = usize::from(t[12] >> 4) * 4;
            return Some(Seg {
                seq: u32::from_be_bytes(t[4..8].try_into().unwrap()),
                ack: u32::from_be_bytes(t[8..12].try_into().unwrap()),
                flags: t[13],
                payload: t[hl..].to_vec(),
                at: Instant::now(),
            });
        }
        None
    }

    /// The next segment, which must come within `within`.
    fn expect(&self, what: &str, within: Duration) -> Seg {
        self.recv(within)
            .unwrap_or_else(|| panic!("no segment from the guest: expected {what}"))
    }

    /// Asserts the guest stays silent to this peer for `quiet`.
    fn silent(&self, what: &str, quiet: Duration) {
        if let Some(s) = self.recv(quiet) {
            panic!("{what}: unexpected segment {s:?}");
        }
    }
}

fn counter_of(s: &Seg) -> u64 {
    std::str::from_utf8(&s.payload)
        .ok()
        .and_then(|t| t.strip_suffix('\n'))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("not a reply line: {s:?}"))
}

/// Duplicate, out-of-order, partly old and corrupt segments, garbage
/// frames, the guest's retransmission timer with backoff, and the close,
/// driven segment by segment from a raw socket.
#[test]
fn tcp_guest_handles_duplicates_holes_and_garbage() {
    let Some(rig) = Rig::start("tcr") else {
        return;
    };
    rig.client_ns.run(|| {
        // The guest must be up: a kernel client connects first.
        let mut c = Client::new(connect(Duration::from_secs(60)));
        let base = c.ask(Duration::from_secs(10)).counter;
        c.close();
        let p = RawPeer::open();
        let w = Duration::from_secs(5);
        let isn = 1000u32;

        // Handshake; a duplicate SYN gets the same SYN-ACK again.
        p.send(isn, 0, SYN, b"");
        let sa = p.expect("SYN-ACK", w);
        assert_eq!((sa.flags, sa.ack), (SYN | ACK, isn + 1), "{sa:?}");
        p.send(isn, 0, SYN, b"");
        let sa2 = p.expect("SYN-ACK again", w);
        assert_eq!((sa2.flags, sa2.seq, sa2.ack), (SYN | ACK, sa.seq, isn + 1));
        let mut gseq = sa.seq.wrapping_add(1);
        let mut mine = isn + 1;
        p.send(mine, gseq, ACK, b"");

        // Asks one line; returns the reply's counter after checking the
        // reply's sequence number and that it acknowledges the line.
        let ask = |mine: &mut u32, gseq: &mut u32, line: &[u8], ack_it: bool| -> u64 {
            p.send(*mine, *gseq, ACK | PSH, line);
            *mine += line.len() as u32;
            // A late copy from the guest's retransmission timer (the
            // SYN-ACK, or an earlier reply, whose ACK a loaded machine
            // delivered after the guest's RTO) is valid TCP, not the reply:
            // the reply is the next segment with new data (bounded skips).
            let mut r = p.expect("a reply", w);
            for _ in 0..8 {
                let copy = r.flags & SYN != 0 || (r.seq.wrapping_sub(*gseq) as i32) < 0;
                if !copy {
                    break;
                }
                eprintln!("skipping a late retransmission {r:?}");
                r = p.expect("a reply", w);
            }
            assert_eq!((r.seq, r.ack), (*gseq, *mine), "{r:?}");
            *gseq = gseq.wrapping_add(r.payload.len() as u32);
            if ack_it {
                p.send(*mine, *gseq, ACK, b"");
            }
            counter_of(&r)
        };
        assert_eq!(ask(&mut mine, &mut gseq, b"a\n", true), base + 1);

        // A duplicate of an answered line: re-ACKed, not answered again.
        p.send(mine - 2, gseq, ACK | PSH, b"a\n");
        let d = p.expect("ACK of a duplicate", w);
        assert_eq!((d.ack, d.payload.len()), (mine, 0), "{d:?}");

        // A hole: "c\n" before "b\n" is dropped with a duplicate ACK...
        p.send(mine + 2, gseq, ACK | PSH, b"c\n");
        let d = p.expect("duplicate ACK for the hole", w);
        assert_eq!((d.ack, d.payload.len()), (mine, 0), "{d:?}");
        // ...then "b\n" is answered alone, and "c\n" again when resent.
        assert_eq!(ask(&mut mine, &mut gseq, b"b\n", true), base + 2);
        assert_eq!(ask(&mut mine, &mut gseq, b"c\n", true), base + 3);

        // Partly old: "c\nd\n" from the old "c" is trimmed to "d\n".
        p.send(mine - 2, gseq, ACK | PSH, b"c\nd\n");
        mine += 2;
        let r = p.expect("reply to the new part", w);
        assert_eq!((r.ack, counter_of(&r)), (mine, base + 4), "{r:?}");
        gseq = gseq.wrapping_add(r.payload.len() as u32);
        p.send(mine, gseq, ACK, b"");

        // Corrupt and garbage frames: no answer, no effect.
        p.send_frame(&p.ip_frame(6, &RawPeer::segment(mine, gseq, ACK | PSH, b"x\n", true)));
        let mut bad_ip = p.ip_frame(6, &RawPeer::segment(mine, gseq, ACK | PSH, b"x\n", false));
        bad_ip[14 + 10] ^= 1; // IPv4 header checksum
        p.send_frame(&bad_ip);
        let mut long = p.ip_frame(6, &RawPeer::segment(mine, gseq, ACK | PSH, b"x\n", false));
        long[14 + 2..14 + 4].copy_from_slice(&1400u16.to_be_bytes()); // total > frame
        let c = ones_complement(&{
            let mut h = long[14..34].to_vec();
            h[10..12].fill(0);
            h
        });
        long[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
        p.send_frame(&long);
        let mut doff = RawPeer::segment(mine, gseq, ACK | PSH, b"x\n", false);
        doff[12] = 15 << 4; // header longer than the segment
        p.send_frame(&p.ip_frame(6, &doff));
        p.send_frame(&p.ip_frame(6, &[0u8; 7])); // truncated TCP header
        let mut arp = GUEST_MAC.to_vec();
        arp.extend_from_slice(&p.mac);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1]); // truncated ARP
        p.send_frame(&arp);
        let mut noise = vec![0u8; 600];
        getrandom::getrandom(&mut noise).unwrap();
        noise[..6].copy_from_slice(&GUEST_MAC);
        noise[12..14].copy_from_slice(&[8, 0]);
        p.send_frame(&noise);
        p.silent("after corrupt frames", Duration::from_millis(300));
        assert_eq!(ask(&mut mine, &mut gseq, b"e\n", true), base + 5);

        // An unacknowledged reply is retransmitted on timeout, with backoff.
        let before = gseq;
        let n = ask(&mut mine, &mut gseq, b"f\n", false);
        assert_eq!(n, base + 6);
        let first = p.expect("first retransmission", w);
        let second = p.expect("second retransmission", w);
        for r in [&first, &second] {
            assert_eq!((r.seq, counter_of(r)), (before, n), "{r:?}");
        }
        // RTO 200 ms, then 400 ms: the second gap is the doubled one.
        let gap = second.at - first.at;
        assert!(
            gap > Duration::from_millis(300),
            "the second retransmission {gap:?} after the first: no backoff"
        );
        p.send(mine, gseq, ACK, b"");
        p.silent("after the ACK", Duration::from_millis(700));

        // A duplicate while a reply is outstanding: the reply again at once,
        // not on the timer. The timer's copy cannot arrive before 200 ms
        // (RTO) after the line was sent, so a copy that does is the
        // immediate one; a slower machine retries instead of guessing.
        let mut immediate = false;
        let mut extra_lines = 0;
        for _ in 0..5 {
            let before = gseq;
            let asked = Instant::now();
            let n = ask(&mut mine, &mut gseq, b"g\n", false);
            extra_lines += 1;
            p.send(mine - 2, before, ACK | PSH, b"g\n");
            let r = p.expect("retransmission on the duplicate", w);
            assert_eq!((r.seq, counter_of(&r)), (before, n), "{r:?}");
            p.send(mine, gseq, ACK, b"");
            while p.recv(Duration::from_millis(100)).is_some() {} // late timer copies
            if r.at - asked < Duration::from_millis(200) {
                immediate = true;
                break;
            }
        }
        assert!(
            immediate,
            "a duplicate never brought the outstanding reply back before the RTO"
        );

        // Close: our FIN is ACKed and answered with the guest's FIN.
        p.send(mine, gseq, FIN | ACK, b"");
        mine += 1;
        let mut fin_seen = false;
        while !fin_seen {
            let s = p.expect("the guest's FIN", w);
            assert_eq!(s.ack, mine, "{s:?}");
            fin_seen = s.flags & FIN != 0;
        }
        p.send(mine, gseq.wrapping_add(1), ACK, b"");
        // The connection is gone: new data gets a reset.
        p.send(mine, gseq.wrapping_add(1), ACK | PSH, b"h\n");
        let r = p.expect("RST for a closed connection", w);
        assert!(r.flags & RST != 0, "{r:?}");

        // The counter went on by exactly the lines answered above.
        let mut c = Client::new(connect(Duration::from_secs(10)));
        assert_eq!(
            c.ask(Duration::from_secs(10)).counter,
            base + 7 + extra_lines
        );
        c.close();
    });
    rig.finish();
}
