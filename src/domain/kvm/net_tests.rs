//! End-to-end tests of the NIC and block device with real guests: the
//! `counter` guest behind a TAP inside a throwaway network namespace, and
//! the `blkcheck` guest on a temporary image. Each skips (with a printed
//! reason) without /dev/kvm, root, /dev/net/tun or iproute2.
//!
//! Network rule: all traffic stays inside a namespace this test creates
//! (TAP host side 10.200.0.1/24, guest 10.200.0.2); the namespace is
//! deleted by a guard, also when the test fails.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use super::tests::open;
use super::*;
use crate::domain::Domain;

const WAIT: Duration = Duration::from_secs(30);
const HOST_IP: &str = "10.200.0.1";
const GUEST_IP: &str = "10.200.0.2";
const TAP: &str = "cst0";

/// A network namespace deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    /// Creates a fresh namespace, or None with the reason printed.
    fn create() -> Option<Self> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (network namespaces, TAP)");
            return None;
        }
        if !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("skipped: /dev/net/tun does not exist");
            return None;
        }
        // Tests run in parallel in one process: one namespace each.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("castor-net-{}-{n}", std::process::id());
        match Command::new("ip").args(["netns", "add", &name]).output() {
            Ok(o) if o.status.success() => Some(Netns { name }),
            Ok(o) => {
                eprintln!(
                    "skipped: ip netns add {name}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipped: cannot run ip (iproute2): {e}");
                None
            }
        }
    }

    /// Runs `ip -n NS args...`, panicking with its stderr on failure.
    fn ip(&self, args: &[&str]) {
        let o = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .expect("running ip");
        assert!(
            o.status.success(),
            "ip -n {} {args:?}: {}",
            self.name,
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// Runs `f` on a fresh thread that entered the namespace, so the TAP
    /// and the client socket it creates live there; the test thread and
    /// the rest of the process stay outside.
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).expect("opening the netns file");
                // SAFETY: `ns` is an open netns fd; setns with
                // CLONE_NEWNET changes only this thread's namespace.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Sends request `id` and waits for its reply; retries on timeout (a
/// reply may be lost while the guest's ARP entry is being learned or the
/// domain is being replaced). Returns the counter and the round trip of the
/// attempt that got through.
fn request(sock: &UdpSocket, id: u64) -> (u64, Duration) {
    let mut msg = [0u8; 16];
    msg[..8].copy_from_slice(&id.to_le_bytes());
    let mut buf = [0u8; 64];
    for _ in 0..20 {
        let t0 = Instant::now();
        sock.send(&msg).expect("send");
        loop {
            match sock.recv(&mut buf) {
                Ok(16) if buf[..8] == id.to_le_bytes() => {
                    let rtt = t0.elapsed();
                    return (u64::from_le_bytes(buf[8..16].try_into().unwrap()), rtt);
                }
                Ok(_) => continue, // a late reply to an earlier attempt
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    break
                }
                // ICMP unreachable while the TAP is down: retry.
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            }
        }
    }
    panic!("no reply to request {id}");
}

fn bring_up(ns: &Netns) {
    ns.ip(&["link", "set", "lo", "up"]);
    ns.ip(&["link", "set", TAP, "up"]);
    ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// (b) ARP + UDP through a TAP, (c) save/restore into a new domain on a
/// new TAP keeps the counter going, (6) round-trip latency baseline.
#[test]
fn counter_guest_answers_udp_across_restore() {
    let Some(ns) = Netns::create() else { return };
    let spec = KvmSpec::parse(&format!(
        "guest=counter,mem=16MiB,tap={TAP},ip={GUEST_IP},mac=52:54:00:c0:ff:ee"
    ))
    .unwrap();
    ns.run(|| {
        let Some(mut d) = open(&spec) else { return };
        bring_up(&ns);
        d.start().unwrap();
        d.console()
            .wait_for(WAIT, |t| {
                t.contains("counter ip=10.200.0.2 port 7777 link=1")
            })
            .unwrap_or_else(|| panic!("no boot line:\n{}", d.console().text()));
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        sock.connect((GUEST_IP, 7777)).unwrap();

        let mut last = 0u64;
        for id in 1..=20u64 {
            let (c, _) = request(&sock, id * 1000 + 7);
            assert!(c > last, "request {id}: counter {c} after {last}");
            last = c;
        }
        // ARP worked: the host learned the guest's MAC.
        let neigh = Command::new("ip")
            .args(["-n", &ns.name, "neigh", "show", GUEST_IP])
            .output()
            .unwrap();
        let neigh = String::from_utf8_lossy(&neigh.stdout).to_string();
        assert!(
            neigh.contains("52:54:00:c0:ff:ee"),
            "neighbour table: {neigh}"
        );

        // Latency baseline: the unprotected round trip.
        let mut rtts = Vec::new();
        for id in 0..200u64 {
            let (c, rtt) = request(&sock, 1_000_000 + id);
            assert!(c > last);
            last = c;
            rtts.push(rtt);
        }
        rtts.sort();
        eprintln!(
            "counter UDP round trip (no protection), 200 requests: p50 {:?} p99 {:?} max {:?}",
            pct(&rtts, 0.50),
            pct(&rtts, 0.99),
            rtts[rtts.len() - 1]
        );

        // Checkpoint, drop the domain (its TAP disappears), restore into a
        // new domain on a new TAP of the same name.
        d.pause().unwrap();
        let mut state = Vec::new();
        d.save_state(&mut state).unwrap();
        // SAFETY: the domain is paused, nothing writes guest memory.
        let mem = unsafe { d.memory().as_slice() }.to_vec();
        let stats = d.net_stats();
        assert!(
            stats.tx_frames >= 221 && stats.rx_frames >= 221,
            "{stats:?}"
        );
        drop(d);
        let mut r = KvmDomain::restore(&spec, &mem, &state).unwrap();
        bring_up(&ns);
        r.start().unwrap();
        for id in 1..=20u64 {
            let (c, _) = request(&sock, 5_000_000 + id);
            assert!(
                c > last,
                "after restore, request {id}: counter {c} after {last}"
            );
            last = c;
        }
        assert!(r.net_stats().rx_frames >= stats.rx_frames + 20);
        let text = r.console().text();
        assert!(!text.contains("FAIL"), "{text}");
    });
}

/// The activation announcement for IPv6: a neighbour that cached another
/// MAC for the guest's IPv6 address (the old primary's path) replaces it
/// with the guest's MAC when the domain announces itself. The kernel
/// applies an unsolicited NA only if it is valid (hop limit, checksum,
/// flags), so this also proves the frame is well formed.
#[test]
fn unsolicited_na_updates_a_neighbours_cache() {
    let Some(ns) = Netns::create() else { return };
    const GUEST_IP6: &str = "fd00:200::2";
    let spec = KvmSpec::parse(&format!(
        "guest=counter,mem=16MiB,tap={TAP},ip={GUEST_IP},ip6={GUEST_IP6},mac=52:54:00:c0:ff:ee"
    ))
    .unwrap();
    ns.run(|| {
        let Some(mut d) = open(&spec) else { return };
        bring_up(&ns);
        ns.ip(&["addr", "add", "fd00:200::1/64", "dev", TAP, "nodad"]);
        ns.ip(&[
            "-6",
            "neigh",
            "replace",
            GUEST_IP6,
            "lladdr",
            "02:00:00:00:00:99",
            "nud",
            "stale",
            "dev",
            TAP,
        ]);
        let said = d.announce().unwrap();
        assert!(
            said.iter().any(|s| s.contains("neighbour advertisement")),
            "{said:?}"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        let neigh = loop {
            let o = Command::new("ip")
                .args(["-n", &ns.name, "-6", "neigh", "show", GUEST_IP6])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            if text.contains("52:54:00:c0:ff:ee") || Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            neigh.contains("52:54:00:c0:ff:ee"),
            "the neighbour cache kept the old MAC: {neigh}"
        );
    });
}

/// (d) The blkcheck guest writes and reads back through the block device
/// and sees out-of-range requests refused; the image holds its pattern.
#[test]
fn blkcheck_guest_reads_back_and_is_bounds_checked() {
    let img = tempfile::NamedTempFile::new().unwrap();
    img.as_file().set_len(64 * 512).unwrap();
    let spec = KvmSpec::parse(&format!(
        "guest=blkcheck,mem=16MiB,disk={}",
        img.path().display()
    ))
    .unwrap();
    let Some(mut d) = open(&spec) else { return };
    d.start().unwrap();
    let text = d
        .console()
        .wait_for(WAIT, |t| t.contains("blk ok") || t.contains("blk FAIL"))
        .unwrap_or_else(|| panic!("no blk line:\n{}", d.console().text()));
    assert!(text.contains("blkcheck sectors=64"), "{text}");
    assert!(text.contains("blk ok"), "{text}");
    let image = std::fs::read(img.path()).unwrap();
    let want: Vec<u8> = (0..4096u32)
        .map(|i| ((i * 31 + 7) ^ (i >> 8)) as u8)
        .collect();
    assert_eq!(&image[512..512 + 4096], want.as_slice());
    assert!(image[..512].iter().all(|&b| b == 0));
    // Sectors 9..16 stay zero; the checked sequence writes from 16 on.
    assert!(image[512 + 4096..16 * 512].iter().all(|&b| b == 0));
    let text = d
        .console()
        .wait_for(WAIT, |t| {
            t.contains("blk seq 256") || t.contains("blk FAIL")
        })
        .unwrap_or_else(|| panic!("no blk seq line:\n{}", d.console().text()));
    assert!(!text.contains("FAIL"), "{text}");
}

/// A disk image that cannot be opened is an error naming the path.
#[test]
fn missing_disk_image_is_named() {
    let spec = KvmSpec::parse("guest=blkcheck,disk=/nonexistent/castor.img").unwrap();
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm does not exist");
        return;
    }
    match KvmDomain::new(&spec) {
        Ok(_) => panic!("opened a missing disk image"),
        Err(e) => assert!(e.to_string().contains("/nonexistent/castor.img"), "{e}"),
    }
}

/// One protected run of the counter guest (primary in this process,
/// backup on loopback inside the namespace): `n` UDP round trips, sorted,
/// and the output queue's report.
fn protected_rtts(
    ns: &Netns,
    spec: &KvmSpec,
    output_commit: bool,
    n: u64,
    epoch: Duration,
) -> Option<(Vec<Duration>, crate::outq::OutqReport)> {
    use crate::engine::backup::{self, BackupConfig};
    use crate::engine::primary::{self, PrimaryConfig};
    use crate::transport::handshake::{self, random_nonce, Psk};
    use crate::transport::messages::Hello;
    use crate::transport::record::RecordReader;
    use crate::transport::tcp;
    const KEY: &[u8] = b"outq-latency-test-key-0123456789";
    /// How long each protected run lasts (after its initial copy).
    const RUN: Duration = Duration::from_secs(10);
    /// Silence either end tolerates before it gives the session up.
    const LIVENESS: Duration = Duration::from_secs(10);

    let d = open(spec)?;
    bring_up(ns);
    let console = d.console().clone();
    let dir = tempfile::tempdir().unwrap();
    let l = tcp::listen("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    // This test measures output commit, not failure detection: on a host
    // loaded by the other tests running beside it (CI runs them two at a
    // time on two cores) a 500 ms gap between records had ended the
    // session (the TAP then went away and the next send failed with
    // ENETUNREACH, hiding why).
    let mut bcfg = BackupConfig::new(dir.path().to_path_buf(), Psk::from_bytes(KEY), 1 << 30);
    bcfg.heartbeat_timeout = LIVENESS;
    let b = std::thread::spawn(move || backup::serve(&l, &bcfg).map(|_| ()));
    let s = tcp::connect(&addr, Duration::from_secs(10)).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = RecordReader::new(s);
    let hello = Hello {
        page_size: 4096,
        pages: d.layout().pages,
        nonce: random_nonce(),
        protection: Default::default(),
        desc: d.describe(),
    };
    let keys = handshake::client(&mut r, &mut w, &Psk::from_bytes(KEY), &hello).unwrap();
    let sink = crate::transport::seal::tcp_primary(&keys, w, &mut r);
    let cfg = PrimaryConfig {
        epoch,
        workers: 1,
        copy_threads: 1,
        pin: false,
        duration: Some(RUN),
        output_commit,
        backup_silence: LIVENESS,
        ..PrimaryConfig::default()
    };
    let t0 = Instant::now();
    let p =
        std::thread::spawn(move || primary::run(Box::new(d), sink, r, &cfg).map_err(|(e, _)| e));
    console
        .wait_for(WAIT, |t| t.contains("link=1"))
        .unwrap_or_else(|| panic!("no boot line:\n{}", console.text()));
    let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    sock.connect((GUEST_IP, 7777)).unwrap();
    // Warm up (ARP in both directions).
    let mut last = 0;
    for id in 0..5u64 {
        last = request(&sock, id).0;
    }
    let mut rtts = Vec::new();
    // Stop well before the primary's run ends (it leaves the guest paused).
    for id in 0..n {
        // A run that ended early (its error is reported below) took the
        // guest's TAP with it.
        if t0.elapsed() + Duration::from_millis(2500) > RUN || p.is_finished() {
            break;
        }
        let (c, rtt) = request(&sock, 1000 + id);
        assert!(c > last, "counter went back: {c} after {last}");
        last = c;
        rtts.push(rtt);
    }
    let out = p.join().unwrap();
    let backup = b.join().unwrap();
    let out = out.unwrap_or_else(|e| panic!("protected run: {e:?}; backup: {backup:?}"));
    backup.expect("backup");
    rtts.sort();
    Some((rtts, out.output))
}

/// Output commit's cost to a client: UDP round trips to the counter guest
/// under protection, with output commit and with `--no-output-commit`,
/// measured in one run (alternating) and printed side by side.
#[test]
fn output_commit_latency_side_by_side() {
    let Some(ns) = Netns::create() else { return };
    let spec = KvmSpec::parse(&format!(
        "guest=counter,mem=16MiB,tap={TAP},ip={GUEST_IP},mac=52:54:00:c0:ff:ee"
    ))
    .unwrap();
    // Epoch lengths to compare; CASTOR_OC_EPOCHS_MS=10,25,50 for the sweep.
    let epochs: Vec<u64> = std::env::var("CASTOR_OC_EPOCHS_MS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![25]);
    for ms in epochs {
        latency_at(&ns, &spec, Duration::from_millis(ms));
    }
}

fn latency_at(ns: &Netns, spec: &KvmSpec, epoch: Duration) {
    ns.run(|| {
        let (mut on, mut off) = (Vec::new(), Vec::new());
        let mut reports = Vec::new();
        for round in 0..2 {
            for commit in [true, false] {
                let Some((r, rep)) = protected_rtts(ns, spec, commit, 300, epoch) else {
                    return;
                };
                if commit {
                    // Every reply waited for its epoch's ack.
                    assert!(rep.held as usize >= r.len(), "round {round}: {rep:?}");
                    on.extend(r);
                } else {
                    assert_eq!(rep.held, 0, "{rep:?}");
                    off.extend(r);
                }
                reports.push((commit, rep));
            }
        }
        on.sort();
        off.sort();
        eprintln!(
            "counter UDP round trip under protection ({:?} epochs), {} requests each:\n  \
             output commit ON : p50 {:?} p99 {:?}\n  \
             output commit OFF: p50 {:?} p99 {:?}\n  \
             added: p50 {:?} p99 {:?}",
            epoch,
            on.len(),
            pct(&on, 0.50),
            pct(&on, 0.99),
            pct(&off, 0.50),
            pct(&off, 0.99),
            pct(&on, 0.50).saturating_sub(pct(&off, 0.50)),
            pct(&on, 0.99).saturating_sub(pct(&off, 0.99)),
        );
        for (c, r) in &reports {
            eprintln!(
                "  commit={c}: released {} held {} dropped {} release delay µs p50 {} p99 {}",
                r.released, r.held, r.dropped, r.release_delay_us.p50, r.release_delay_us.p99
            );
        }
        // Holding output until the ack costs at least part of an epoch.
        assert!(pct(&on, 0.50) > pct(&off, 0.50));
    });
}
