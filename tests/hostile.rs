//! Hostile and broken streams sent to a real backup process: each is
//! rejected with a clear error, nothing panics, and the saved replica is
//! exactly the last complete epoch (or nothing, if none completed).

mod common;
use common::fake::*;
use common::*;

use std::io::Write;
use std::net::TcpStream;

use castor::codec::PageKind;
use castor::transport::messages::{EpochBegin, EpochClass, PagesWriter};
use castor::transport::record::{write_record, RecordKind};
use castor::PAGE_SIZE;

/// Runs a scenario: `good` complete epochs, then `bad` bytes, then close.
/// Returns (exit code, stderr, saved epoch, saved digest, expected digest).
fn scenario(
    good: u64,
    bad: impl FnOnce(&mut Primary) -> Vec<u8>,
) -> (Option<i32>, String, Option<u64>, Option<String>, String) {
    scenario_on_wire(good, bad, |_| {})
}

/// [`scenario`], with the `bad` bytes sealed as a primary would and then
/// `damage`d on the way (what a faulty link or a man in the middle does).
fn scenario_on_wire(
    good: u64,
    bad: impl FnOnce(&mut Primary) -> Vec<u8>,
    damage: impl FnOnce(&mut Vec<u8>),
) -> (Option<i32>, String, Option<u64>, Option<String>, String) {
    let dir = tempfile::tempdir().unwrap();
    let b = Backup::start(&dir.path().join("replica"));
    let bdir = b.dir.clone();
    let mut s = session(&b.addr, KEY).unwrap();
    let mut p = Primary::new();
    let mut bytes = p.seed();
    for _ in 0..good {
        bytes.extend(p.checkpoint());
    }
    let expected = p.digest();
    let mut wire = s.sealed(&bytes).unwrap();
    let mut tail = s.sealed(&bad(&mut p)).unwrap();
    damage(&mut tail);
    wire.extend(tail);
    // Like a real primary, keep reading acks until the backup hangs up.
    let mut rd = s.try_clone().unwrap();
    // Bounded: a backup that never hangs up fails in b.wait() below.
    rd.set_read_timeout(Some(EXIT_PATIENCE)).unwrap();
    let drain = std::thread::spawn(move || std::io::copy(&mut rd, &mut std::io::sink()));
    let _ = s.write_raw(&wire);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let _ = drain.join();
    let (st, err) = b.wait();
    let m = meta(&bdir);
    (
        st.code(),
        err,
        m.as_ref().map(|m| m.epoch),
        m.map(|m| m.digest),
        expected,
    )
}

fn assert_rejected(
    r: &(Option<i32>, String, Option<u64>, Option<String>, String),
    epoch: u64,
    needle: &str,
) {
    let (code, err, saved, digest, expected) = r;
    assert_eq!(*code, Some(2), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in:\n{err}");
    assert_eq!(*saved, Some(epoch), "{err}");
    assert_eq!(
        digest.as_deref(),
        Some(expected.as_str()),
        "replica is not epoch {epoch}"
    );
}

#[test]
fn clean_stream_is_committed() {
    let r = scenario(3, |_| {
        let mut v = Vec::new();
        write_record(&mut v, RecordKind::Close, 3, &[]);
        v
    });
    assert_eq!(r.0, Some(0), "{}", r.1);
    assert_eq!(r.2, Some(3));
    assert_eq!(r.3.as_deref(), Some(r.4.as_str()));
}

#[test]
fn corrupted_record_discards_the_epoch() {
    // Records carry no CRC under the session's MAC (wire version 5): the
    // tag over header and payload is what rejects the damage.
    let r = scenario_on_wire(
        3,
        |p| p.checkpoint(),
        |e| {
            let n = e.len();
            e[n / 2] ^= 0x40;
        },
    );
    assert_rejected(&r, 3, "from the primary failed authentication");
    assert!(r.1.contains("epoch 4 was incomplete"), "{}", r.1);
}

#[test]
fn corrupted_header_field_discards_the_epoch() {
    // The last record's epoch field (header bytes 8..16): covered by the
    // tag as it was by the CRC.
    let r = scenario_on_wire(
        2,
        |p| p.checkpoint(),
        |e| {
            let last = e.len() - (24 + 20 + 16);
            e[last + 8] ^= 1;
        },
    );
    assert_rejected(&r, 2, "from the primary failed authentication");
    assert!(r.1.contains("epoch 3 was incomplete"), "{}", r.1);
}

#[test]
fn truncated_epoch_is_discarded() {
    let r = scenario(2, |p| {
        let e = p.checkpoint();
        e[..e.len() - 30].to_vec()
    });
    assert_rejected(&r, 2, "stream ended inside a record");
}

#[test]
fn epoch_missing_its_end_is_discarded() {
    let r = scenario(2, |p| {
        let e = p.checkpoint();
        // Cut at a record boundary: drop only the EpochEnd record (24 + 20 bytes).
        e[..e.len() - 44].to_vec()
    });
    assert_rejected(&r, 2, "connection closed without a Close record");
}

#[test]
fn reordered_epochs_are_rejected() {
    let r = scenario(2, |p| {
        let e3 = p.checkpoint();
        let e4 = p.checkpoint();
        [e4, e3].concat()
    });
    assert_rejected(&r, 2, "out of order");
}

#[test]
fn random_bytes_after_handshake_are_rejected() {
    let r = scenario(2, |_| {
        let mut x = 0x9e3779b97f4a7c15u64;
        (0..5000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    });
    // Under authentication any damage after the handshake, header
    // included, is a record failing its tag.
    assert_rejected(&r, 2, "from the primary failed authentication");
}

/// Opens checkpoint epoch `p.epoch + 1` announcing `dirty` pages and adds
/// hand-made page entries `(gfn, kind, payload)`; no State, no end record.
fn hand_epoch(p: &mut Primary, dirty: u64, entries: &[(u64, PageKind, &[u8])]) -> Vec<u8> {
    p.epoch += 1;
    let e = p.epoch;
    let mut v = Vec::new();
    let begin = EpochBegin {
        class: EpochClass::Checkpoint,
        dirty,
    };
    write_record(&mut v, RecordKind::EpochBegin, e, &begin.encode());
    let mut w = PagesWriter::new(e);
    for &(gfn, kind, payload) in entries {
        w.push(&mut v, gfn, |o| {
            o.extend_from_slice(payload);
            Some(kind as u8)
        });
    }
    w.close(&mut v);
    v
}

#[test]
fn page_outside_the_domain_is_rejected() {
    let r = scenario(1, |p| {
        hand_epoch(p, 1, &[(PAGES + 5, PageKind::Full, &[0xAA; PAGE_SIZE])])
    });
    assert_rejected(&r, 1, "gfn outside the domain");
}

#[test]
fn duplicate_page_is_rejected() {
    let page = [0xAB; PAGE_SIZE];
    let r = scenario(1, |p| {
        hand_epoch(
            p,
            2,
            &[(3, PageKind::Full, &page), (3, PageKind::Full, &page)],
        )
    });
    assert_rejected(&r, 1, "sent twice");
}

#[test]
fn malformed_page_payload_with_valid_checksum_is_rejected() {
    // A delta whose tokens run far past the end of the page.
    let bad: &[u8] = &[0xff, 0xff, 0xff, 0x7f, 0xff, 0xff, 0x03, 1, 2, 3];
    let r = scenario(2, |p| hand_epoch(p, 1, &[(7, PageKind::Delta, bad)]));
    assert_rejected(&r, 2, "page 7");
}

/// A backup that refused a stranger keeps listening: a real primary then
/// replicates to it. Returns its exit code, stderr and saved epoch.
fn still_serves(b: Backup) -> (Option<i32>, String, Option<u64>) {
    let bdir = b.dir.clone();
    let mut s = session(&b.addr, KEY).expect("the backup still accepts its primary");
    let mut p = Primary::new();
    let mut bytes = p.seed();
    bytes.extend(p.checkpoint());
    write_record(&mut bytes, RecordKind::Close, 1, &[]);
    let mut rd = s.try_clone().unwrap();
    let drain = std::thread::spawn(move || std::io::copy(&mut rd, &mut std::io::sink()));
    s.write_all(&bytes).unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    let _ = drain.join();
    let (st, err) = b.wait();
    (st.code(), err, meta(&bdir).map(|m| m.epoch))
}

#[test]
fn random_bytes_instead_of_handshake_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backup::start(&dir.path().join("replica"));
    let mut s = TcpStream::connect(&b.addr).unwrap();
    let _ = s.write_all(&[0x5a; 300]);
    drop(s);
    let (code, err, saved) = still_serves(b);
    assert_eq!((code, saved), (Some(0), Some(1)), "{err}");
    assert!(
        err.contains("dropped connection") && err.contains("bad magic"),
        "{err}"
    );
}

#[test]
fn wrong_key_is_refused_before_any_page() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backup::start(&dir.path().join("replica"));
    let bdir = b.dir.clone();
    let e = session(&b.addr, "a-completely-different-key").unwrap_err();
    assert!(e.contains("authentication failed"), "{e}");
    assert!(
        meta(&bdir).is_none(),
        "a replica was saved despite a wrong key"
    );
    assert!(!bdir.join("current").exists());
    let (code, err, saved) = still_serves(b);
    assert_eq!((code, saved), (Some(0), Some(1)), "{err}");
    assert!(err.contains("authentication"), "{err}");
}

#[test]
fn oversized_domain_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backup::start_with(&dir.path().join("replica"), &["--max-mem", "128KiB"], KEY);
    let e = session(&b.addr, KEY).unwrap_err();
    assert!(e.contains("exceeds"), "{e}");
    // The refusal is the primary's to report; the backup keeps listening
    // (the fake primary's 256 KiB domain is refused again, so stop it).
    let mut b = b;
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(b.child.try_wait().unwrap().is_none(), "the backup exited");
    let _ = b.child.kill();
    let (_, err) = b.wait();
    assert!(err.contains("exceeds this backup's --max-mem"), "{err}");
}
