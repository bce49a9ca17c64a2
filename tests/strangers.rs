//! A backup keeps serving when strangers connect: stray, hostile, slow and
//! wrong-key connections are logged (rate-limited) and dropped, and a real
//! primary then replicates to the same backup process; connections that
//! arrive while a session runs get a clear error record.

mod common;
use common::fake::*;
use common::*;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use castor::transport::record::{write_record, RecordKind, RecordReader};

/// A whole clean session (seed, `n` checkpoints, Close) over an
/// authenticated stream; returns the digest the replica must have.
fn clean_session(addr: &str, n: u64) -> String {
    let t0 = Instant::now();
    let mut s = session(addr, KEY).expect("the real primary is accepted");
    eprintln!(
        "real primary authenticated in {} ms",
        t0.elapsed().as_millis()
    );
    let mut p = Primary::new();
    let mut bytes = p.seed();
    for _ in 0..n {
        bytes.extend(p.checkpoint());
    }
    write_record(&mut bytes, RecordKind::Close, n, &[]);
    let mut rd = s.try_clone().unwrap();
    let drain = std::thread::spawn(move || std::io::copy(&mut rd, &mut std::io::sink()));
    s.write_all(&bytes).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let _ = drain.join();
    p.digest()
}

#[test]
fn strangers_then_a_real_primary_replicate_to_the_same_backup() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backup::start_with(
        &dir.path().join("replica"),
        &["--handshake-timeout", "2s"],
        KEY,
    );
    let bdir = b.dir.clone();
    // Connect and close at once (a port scan).
    drop(TcpStream::connect(&b.addr).unwrap());
    // An HTTP health check.
    let mut h = TcpStream::connect(&b.addr).unwrap();
    h.write_all(b"GET / HTTP/1.0\r\nHost: backup\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    h.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = h.read_to_end(&mut answer);
    // Random bytes.
    let mut r = TcpStream::connect(&b.addr).unwrap();
    let _ = r.write_all(&[0x5a; 300]);
    drop(r);
    // A record header announcing a 4 MiB Hello, then nothing.
    let mut big = Vec::new();
    write_record(&mut big, RecordKind::Hello, 0, &vec![0u8; 4 << 20]);
    let mut g = TcpStream::connect(&b.addr).unwrap();
    g.write_all(&big[..4096]).unwrap();
    // The wrong key.
    let e = session(&b.addr, "a-completely-different-key").unwrap_err();
    assert!(e.contains("authentication failed"), "{e}");
    // A silent connection kept open while the real primary comes.
    let silent = TcpStream::connect(&b.addr).unwrap();

    let t0 = Instant::now();
    let expected = clean_session(&b.addr, 3);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "the silent stranger delayed the real primary by {:?}",
        t0.elapsed()
    );
    let (st, err) = b.wait();
    drop((silent, g));
    assert_eq!(st.code(), Some(0), "{err}");
    // Six strangers in well under a second: the first is logged, the rest
    // counted (see many_strays_are_logged_rate_limited).
    assert!(err.contains("dropped connection"), "{err}");
    assert!(err.contains("more dropped"), "{err}");
    let m = meta(&bdir).expect("replica saved");
    assert_eq!(
        (m.epoch, m.digest.as_str()),
        (3, expected.as_str()),
        "{err}"
    );
}

#[test]
fn a_silent_connection_is_dropped_at_the_handshake_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backup::start_with(
        &dir.path().join("replica"),
        &["--handshake-timeout", "1s"],
        KEY,
    );
    let mut s = TcpStream::connect(&b.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t0 = Instant::now();
    let mut buf = Vec::new();
    let r = s.read_to_end(&mut buf);
    let waited = t0.elapsed();
    assert!(
        r.is_ok(),
        "the backup kept a silent stranger past 10 s: {r:?}"
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "dropped after {waited:?}, deadline 1 s"
    );
    // ... and it still serves.
    clean_session(&b.addr, 1);
    let (st, err) = b.wait();
    assert_eq!(st.code(), Some(0), "{err}");
    assert!(err.contains("handshake deadline"), "{err}");
}

#[test]
fn many_strays_are_logged_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backup::start(&dir.path().join("replica"));
    for _ in 0..60 {
        let mut s = TcpStream::connect(&b.addr).unwrap();
        let _ = s.write_all(b"\x16\x03\x01 hello?");
    }
    clean_session(&b.addr, 1);
    let (st, err) = b.wait();
    assert_eq!(st.code(), Some(0), "{err}");
    let lines = err
        .lines()
        .filter(|l| l.contains("dropped connection"))
        .count();
    assert!(
        (1..=10).contains(&lines),
        "{lines} drop lines for 60 strays:\n{err}"
    );
    assert!(
        err.contains("more dropped"),
        "no summary of the suppressed ones:\n{err}"
    );
}

#[test]
fn connections_during_a_session_get_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backup::start(&dir.path().join("replica"));
    let mut s = session(&b.addr, KEY).unwrap();
    let mut p = Primary::new();
    let mut bytes = p.seed();
    bytes.extend(p.checkpoint());
    s.write_all(&bytes).unwrap();
    // The session is established once the backup acknowledged the seed.
    let mut acks = s.reader();
    loop {
        let r = acks.next().expect("the backup acknowledges");
        if r.kind == RecordKind::Ack {
            break;
        }
    }
    // A second primary (even one with the key) is told why.
    for _ in 0..2 {
        let other = TcpStream::connect(&b.addr).unwrap();
        other
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut r = RecordReader::new(other);
        let rec = r.next().expect("an error record");
        assert_eq!(rec.kind, RecordKind::Error);
        let msg = String::from_utf8_lossy(rec.payload).into_owned();
        assert!(msg.contains("already serving"), "{msg}");
    }
    let e = session(&b.addr, KEY).unwrap_err();
    assert!(e.contains("already serving"), "{e}");
    let mut end = p.checkpoint();
    write_record(&mut end, RecordKind::Close, 2, &[]);
    let mut rd = s.try_clone().unwrap();
    let drain = std::thread::spawn(move || std::io::copy(&mut rd, &mut std::io::sink()));
    s.write_all(&end).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let _ = drain.join();
    let (st, err) = b.wait();
    assert_eq!(st.code(), Some(0), "{err}");
    assert_eq!(meta(&b_dir(&dir)).unwrap().digest, p.digest());
}

fn b_dir(d: &tempfile::TempDir) -> std::path::PathBuf {
    d.path().join("replica")
}
