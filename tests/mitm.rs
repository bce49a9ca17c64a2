//! A man in the middle between a real primary and a real backup (both the
//! binary) that tampers with the record stream after the handshake: flips
//! a bit, drops, replays, reorders or injects one record, in either
//! direction. Every attack must end the session with the authentication
//! error naming the record, the primary must never count as acknowledged
//! an epoch the backup did not acknowledge (so no output of it was
//! released: output is committed only on an accepted ack), and the
//! backup's replica must stay at its last complete epoch (the last ack it
//! really sent), matching a from-scratch computation of that epoch.

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use castor::transport::record::{write_record, RecordKind};

/// Records each direction sends before its records carry tags: the
/// primary's Hello and Auth, the backup's HelloAck and AuthOk.
const HANDSHAKE_RECORDS: usize = 2;
const TAG_LEN: usize = 16;
/// Genuine acks let through before the attack (checkpoints flowing).
const ACKS_BEFORE: u64 = 3;
const SPEC: &str = "sim:mem=8MiB,workload=edits,writes=200,seed=5,threads=2";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Dir {
    ToBackup,
    ToPrimary,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Attack {
    Flip,
    Drop,
    Replay,
    Reorder,
    Inject,
}

/// What the man in the middle saw and did.
#[derive(Default)]
struct Seen {
    /// Highest epoch the backup really acknowledged.
    genuine_ack: Option<u64>,
    acks: u64,
    fired: bool,
}

/// One record off the wire: its bytes and header fields.
struct Rec {
    bytes: Vec<u8>,
    kind: u8,
    epoch: u64,
}

fn read_rec(s: &mut TcpStream, tagged: bool) -> Option<Rec> {
    let mut h = [0u8; 24];
    s.read_exact(&mut h).ok()?;
    let len = u32::from_le_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut bytes = h.to_vec();
    bytes.resize(24 + len + if tagged { TAG_LEN } else { 0 }, 0);
    s.read_exact(&mut bytes[24..]).ok()?;
    Some(Rec {
        kind: h[6],
        epoch: u64::from_le_bytes(h[8..16].try_into().unwrap()),
        bytes,
    })
}

/// A well-formed record (CRC filled in) and a made-up tag: what an
/// attacker without the key can build.
fn forged(kind: RecordKind, epoch: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    write_record(&mut v, kind, epoch, payload);
    v.extend_from_slice(&[0x5a; TAG_LEN]);
    v
}

/// Forwards `dir`'s records from `from` to `to`, applying `attack` once to
/// the target record: in the data direction the first Pages record after
/// [`ACKS_BEFORE`] acks, in the ack direction the ack after them.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    dir: Dir,
    attack: Option<(Dir, Attack)>,
    seen: Arc<Mutex<Seen>>,
) {
    let mut n = 0usize;
    let mut held: Option<Vec<u8>> = None;
    let mut to_gone = false;
    while let Some(r) = read_rec(&mut from, n >= HANDSHAKE_RECORDS) {
        n += 1;
        let mut out: Vec<Vec<u8>> = Vec::new();
        let target = {
            let mut s = seen.lock().unwrap();
            let ack = dir == Dir::ToPrimary && r.kind == RecordKind::Ack as u8;
            let target = match dir {
                Dir::ToBackup => r.kind == RecordKind::Pages as u8 && s.acks >= ACKS_BEFORE,
                Dir::ToPrimary => ack && s.acks >= ACKS_BEFORE,
            } && !s.fired
                && attack.is_some_and(|(d, _)| d == dir);
            if ack {
                s.acks += 1;
                s.genuine_ack = Some(s.genuine_ack.map_or(r.epoch, |g| g.max(r.epoch)));
            }
            s.fired |= target;
            target
        };
        match (target, attack.map(|a| a.1)) {
            (true, Some(Attack::Flip)) => {
                let mut b = r.bytes;
                // Inside the payload (Pages) or the epoch field (Ack).
                let at = if b.len() > 24 + TAG_LEN + 100 {
                    24 + 100
                } else {
                    8
                };
                b[at] ^= 0x04;
                out.push(b);
            }
            (true, Some(Attack::Drop)) => {}
            (true, Some(Attack::Replay)) => {
                out.push(r.bytes.clone());
                out.push(r.bytes);
            }
            (true, Some(Attack::Reorder)) => held = Some(r.bytes),
            (true, Some(Attack::Inject)) => {
                out.push(match dir {
                    // A forged ack of an epoch not yet acknowledged.
                    Dir::ToPrimary => forged(RecordKind::Ack, r.epoch + 1, &[]),
                    Dir::ToBackup => forged(RecordKind::Close, r.epoch, &[]),
                });
                out.push(r.bytes);
            }
            _ => {
                out.push(r.bytes);
                out.extend(held.take());
            }
        }
        if to_gone {
            continue;
        }
        for b in out {
            if to.write_all(&b).is_err() {
                // The primary has hung up (it refused the attack). The
                // backup may still acknowledge an epoch it had in full:
                // read on to its end, so `genuine_ack` is every ack it
                // sent, not only those sent before the primary left.
                to_gone = dir == Dir::ToPrimary;
                if !to_gone {
                    return;
                }
                break;
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// Listens on loopback and relays one connection to `target` through the
/// man in the middle.
fn mitm(
    target: String,
    attack: Option<(Dir, Attack)>,
) -> (String, Arc<Mutex<Seen>>, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    let h = std::thread::spawn(move || {
        let (p, _) = l.accept().unwrap();
        let b = TcpStream::connect(&target).unwrap();
        let (p2, b2, s2) = (p.try_clone().unwrap(), b.try_clone().unwrap(), s.clone());
        let back = std::thread::spawn(move || pump(b2, p2, Dir::ToPrimary, attack, s2));
        pump(p, b, Dir::ToBackup, attack, s);
        let _ = back.join();
    });
    (addr, seen, h)
}

/// Protects [`SPEC`] through a man in the middle doing `attack`; returns
/// (primary's stderr, the last epoch it counted as acknowledged, backup's
/// stderr, what the man in the middle saw, the replica's meta).
fn run(attack: Option<(Dir, Attack)>, epochs: u64) -> (String, u64, String, Seen, Meta) {
    let dir = tempfile::tempdir().unwrap();
    let b = Backup::start_with(
        &dir.path().join("replica"),
        &["--heartbeat-timeout", "10s"],
        KEY,
    );
    let bdir = b.dir.clone();
    let (addr, seen, relay) = mitm(b.addr.clone(), attack);
    let json = dir.path().join("run.json");
    let out = output_within(
        castor()
            .env("CASTOR_PSK", KEY)
            .args(["protect", "--quiet", "--domain", SPEC, "--backup", &addr])
            .args(["--epoch", "5ms", "--epochs", &epochs.to_string()])
            .args(["--backup-timeout", "10s", "--stop-on-backup-loss", "--json"])
            .arg(&json)
            .args(["--arbiter", &pair_lock(dir.path())]),
        EXIT_PATIENCE,
    );
    let perr = String::from_utf8_lossy(&out.stderr).into_owned();
    let (_, berr) = b.wait();
    relay.join().unwrap();
    // A clean end writes the JSON report; a lost backup ends with the line
    // `stopped: backup connection lost (last acknowledged epoch N): why`.
    let acked = match std::fs::read(&json) {
        Ok(j) => serde_json::from_slice::<serde_json::Value>(&j).unwrap()["acked_epoch"].as_u64(),
        Err(_) => perr
            .split_once("last acknowledged epoch ")
            .and_then(|(_, r)| r.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()),
    };
    let acked = acked.unwrap_or_else(|| panic!("no acknowledged epoch reported; primary:\n{perr}"));
    let m = meta(&bdir).unwrap_or_else(|| panic!("no replica saved; backup:\n{berr}"));
    assert_eq!(
        m.digest,
        replica_digest(&bdir),
        "replica files differ from their meta"
    );
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    (perr, acked, berr, seen, m)
}

/// Runs one attack and checks every property the module promises.
fn attacked(dir: Dir, attack: Attack) {
    if sim_unavailable() {
        return;
    }
    let (perr, acked, berr, seen, m) = run(Some((dir, attack)), 400);
    assert!(
        seen.fired,
        "the attack never happened:\nprimary: {perr}\nbackup: {berr}"
    );
    let (victim, log) = match dir {
        Dir::ToBackup => ("primary", &berr),
        Dir::ToPrimary => ("backup", &perr),
    };
    assert!(
        log.contains(&format!("from the {victim} failed authentication")),
        "{attack:?} {dir:?}: no authentication error naming the {victim}:\nprimary: {perr}\nbackup: {berr}"
    );
    let genuine = seen.genuine_ack.expect("the backup acknowledged epochs");
    assert!(
        acked <= genuine,
        "{attack:?} {dir:?}: the primary counted epoch {acked} acknowledged, the backup acknowledged only {genuine}"
    );
    assert!(acked < 400, "the session ran to its end despite the attack");
    // The replica is the last epoch the backup committed and acknowledged.
    assert_eq!(m.epoch, genuine, "{attack:?} {dir:?}: backup:\n{berr}");
    assert_eq!(
        m.digest,
        expected_digest(SPEC, genuine),
        "{attack:?} {dir:?}"
    );
}

#[test]
fn untouched_session_completes() {
    if sim_unavailable() {
        return;
    }
    let (perr, acked, berr, seen, m) = run(None, 20);
    assert!(!seen.fired);
    assert_eq!(acked, 20, "primary: {perr}\nbackup: {berr}");
    assert_eq!((m.epoch, seen.genuine_ack), (20, Some(20)));
    assert_eq!(m.digest, expected_digest(SPEC, 20));
}

#[test]
fn flipped_bit_in_a_data_record() {
    attacked(Dir::ToBackup, Attack::Flip);
}

#[test]
fn dropped_data_record() {
    attacked(Dir::ToBackup, Attack::Drop);
}

#[test]
fn replayed_data_record() {
    attacked(Dir::ToBackup, Attack::Replay);
}

#[test]
fn reordered_data_records() {
    attacked(Dir::ToBackup, Attack::Reorder);
}

#[test]
fn injected_close() {
    attacked(Dir::ToBackup, Attack::Inject);
}

#[test]
fn flipped_bit_in_an_ack() {
    attacked(Dir::ToPrimary, Attack::Flip);
}

#[test]
fn dropped_ack() {
    attacked(Dir::ToPrimary, Attack::Drop);
}

#[test]
fn replayed_ack() {
    attacked(Dir::ToPrimary, Attack::Replay);
}

#[test]
fn reordered_ack() {
    attacked(Dir::ToPrimary, Attack::Reorder);
}

#[test]
fn forged_ack_of_an_unacknowledged_epoch() {
    attacked(Dir::ToPrimary, Attack::Inject);
}
