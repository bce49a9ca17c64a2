//! Fencing enforced at the NBD export, end to end with a real etcd
//! (issue 12): a primary serving `--disk data=PATH,nbd=…` under
//! `--arbiter etcd:…` is cut off from etcd while a client writes. Its lease
//! lapses: from then on the export completes no write, and no write it
//! refused (pending or later) reaches any disk — neither the primary's
//! image nor the backup's. The backup wins the arbiter once the lease has
//! expired, activates and serves its replica disk: the disk after exactly
//! a prefix of the writes the primary completed.

mod common;
use common::etcd::Etcd;
use common::lines::Lines;
use common::nbd::Nbd;
use common::proxy::Proxy;
use common::writes::{after, nth_write, prefix_of, BLOCKS};
use common::*;

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TTL: Duration = castor::ha::etcd::DEFAULT_TTL;
/// NBD's ESHUTDOWN: the export's answer to a write it may not complete.
const ESHUTDOWN: u32 = 108;

/// What the client saw of each write: when it completed, or its error.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Seen {
    Done(Instant),
    Refused(u32, Instant),
}

/// Writes the pattern until `stop` or the connection ends.
fn client(addr: String, stop: Arc<AtomicBool>, seen: Arc<Mutex<Vec<Seen>>>) {
    let mut c = Nbd::connect(&addr, "data").unwrap();
    for i in 0.. {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let (off, d) = nth_write(i);
        let r = match c.write(off, &d) {
            Ok(0) => Seen::Done(Instant::now()),
            Ok(e) => Seen::Refused(e, Instant::now()),
            Err(_) => return, // the fenced primary exited
        };
        seen.lock().unwrap().push(r);
    }
}

#[test]
fn a_primary_whose_etcd_lease_lapses_completes_no_more_writes_and_the_backup_serves_the_replica() {
    if sim_unavailable() {
        return;
    }
    let Some(e) = Etcd::start(None) else { return };
    let key = "castor/test-disk-fence";
    let etcd_link = Proxy::start(&format!("127.0.0.1:{}", e.port));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.img");
    std::fs::write(&path, vec![0u8; (BLOCKS * 4096) as usize]).unwrap();
    let (pport, bport) = (free_port(), free_port());
    let mut b = Backup::start_with(
        &dir.path().join("replica"),
        &[
            "--activate",
            "--heartbeat-timeout",
            "500ms",
            "--arbiter",
            &format!("etcd:{}/{key}", e.url),
            "--override",
            &format!("nbd.data=127.0.0.1:{bport}"),
        ],
        KEY,
    );
    let blog = Lines::watch(b.child.stderr.take().unwrap());
    let mut p = Reaped::spawn(
        castor()
            .env("CASTOR_PSK", KEY)
            .args([
                "protect",
                "--domain",
                "sim:mem=4MiB,workload=uniform,rate=20000,seed=3",
            ])
            .args(["--backup", &b.addr, "--epoch", "25ms"])
            .args([
                "--arbiter",
                &format!("etcd:http://{}/{key}", etcd_link.addr),
            ])
            .args([
                "--disk",
                &format!("data={},nbd=127.0.0.1:{pport}", path.display()),
            ])
            .stderr(Stdio::piped()),
    );
    let plog = Lines::watch(p.0.stderr.take().unwrap());
    plog.wait_for("acked", Duration::from_secs(60));

    let (stop, seen) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let writer = {
        let (stop, seen, addr) = (stop.clone(), seen.clone(), format!("127.0.0.1:{pport}"));
        std::thread::spawn(move || client(addr, stop, seen))
    };
    // Writes complete and travel in checkpoints before the cut.
    let t0 = Instant::now();
    while seen.lock().unwrap().len() < 200 && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    etcd_link.cut();
    let cut = Instant::now();
    plog.wait_for("SELF-FENCED", TTL * 3);
    eprintln!("self-fenced {:?} after the cut", cut.elapsed());
    let code = p.wait_within(EXIT_PATIENCE).code();
    eprintln!("primary exited {:?} after the cut", cut.elapsed());
    blog.wait_for("ACTIVATED", Duration::from_secs(60));
    eprintln!("backup activated {:?} after the cut", cut.elapsed());
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let seen = seen.lock().unwrap().clone();
    let ptext = plog.text();
    assert_eq!(code, Some(5), "the primary self-fences (exit 5):\n{ptext}");

    // The export stopped completing writes once the lease could have
    // lapsed, and refused every later one while it lived.
    let completed = seen
        .iter()
        .take_while(|s| matches!(s, Seen::Done(_)))
        .count();
    let refused = &seen[completed..];
    assert!(
        refused
            .iter()
            .all(|s| matches!(s, Seen::Refused(ESHUTDOWN, _))),
        "a write completed after one was refused, or an error other than ESHUTDOWN: {:?}",
        refused.iter().take(5).collect::<Vec<_>>()
    );
    assert!(
        !refused.is_empty(),
        "the client saw no refused write:\n{ptext}"
    );
    let Seen::Done(last_ok) = seen[completed - 1] else {
        unreachable!()
    };
    // The last renewal was before the cut, so the lease ran out by
    // cut + TTL; the client sees a completion a scheduling delay after
    // the export checked its gate.
    let slack = Duration::from_millis(300);
    assert!(
        last_ok <= cut + TTL + slack,
        "a write completed {:?} after the cut (TTL {TTL:?})",
        last_ok - cut
    );

    // No refused write reached the primary's image: it holds exactly the
    // completed writes.
    let primary = std::fs::read(&path).unwrap();
    assert!(
        primary == after(completed as u64),
        "the primary's image is not the disk after its {completed} completed writes"
    );

    // The activated backup serves its replica disk: a prefix of the
    // completed writes, none the primary refused. It holds the lease, so
    // it completes writes.
    let mut c = Nbd::connect(&format!("127.0.0.1:{bport}"), "data").unwrap();
    let replica = c.read(0, (BLOCKS * 4096) as u32).unwrap();
    let k = prefix_of(&replica).filter(|&k| k <= completed as u64);
    let btext = blog.text();
    assert!(
        k.is_some(),
        "the backup's disk is no prefix of the {completed} completed writes:\n{btext}"
    );
    assert_eq!(
        c.write(0, &[0x77; 4096]).unwrap(),
        0,
        "the activated copy completes writes"
    );
    assert_eq!(c.read(0, 4096).unwrap(), vec![0x77; 4096]);
    eprintln!(
        "{completed} writes completed (last {} ms after the cut, TTL {} ms), {} refused; \
         the backup serves the disk after the first {} of them",
        (last_ok.saturating_duration_since(cut)).as_millis(),
        TTL.as_millis(),
        refused.len(),
        k.unwrap()
    );
    drop(c);
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(b.child.id() as i32, libc::SIGINT) };
    let st = wait_deadline(&mut b.child, EXIT_PATIENCE);
    eprintln!("backup stopped {:?} after the cut", cut.elapsed());
    assert!(
        st.is_some(),
        "the activated backup stops on SIGINT:\n{}",
        blog.text()
    );
}
