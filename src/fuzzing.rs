//! Bodies of the fuzz targets in `fuzz/` (cargo-fuzz), shared with
//! `tests/fuzz_corpus.rs`, which replays the seed corpus and every input a
//! fuzzer ever failed on as part of the normal test suite.
//!
//! Each body takes arbitrary bytes, as they could arrive from the wire, the
//! kernel or a datagram, and must neither panic nor break the invariant it
//! asserts: inputs decide only which error is returned.

use crate::codec::{Compressor, Decoder, Encoder, PageKind};
use crate::digest::Digest;
use crate::engine::receiver::{Event, Receiver};
use crate::ha::beacon;
use crate::outq::nfqueue::msg;
use crate::transport::auth::{Protection, Role, SessionKeys};
use crate::transport::handshake::{self, Psk};
use crate::transport::messages::{Hello, NONCE_LEN};
use crate::transport::record::{Record, RecordKind, RecordReader, MAX_PAYLOAD};
use crate::PAGE_SIZE;

/// The key every target uses (an input cannot know a MAC under it).
pub const KEY: &[u8] = b"castor-fuzz-key-0123456789abcdef";

/// A target's body.
pub type Body = fn(&[u8]);

/// Every target, by name: what `fuzz/fuzz_targets/NAME.rs` runs.
pub const TARGETS: [(&str, Body); 8] = [
    ("record", record),
    ("handshake", handshake),
    ("page", page),
    ("receiver", receiver),
    ("nfqueue", nfqueue),
    ("beacon", beacon),
    ("disk_writes", disk_writes),
    ("nbd", nbd),
];

/// The session keys the `record` target opens with (an input cannot know
/// a tag under them, but a seed sealed with them reaches past the check).
fn record_keys(p: Protection) -> SessionKeys {
    SessionKeys::derive(KEY, &[1; NONCE_LEN], &[2; NONCE_LEN], p)
}

/// The record parser: a byte stream split into verified records. `data[0]`
/// picks the stream: 0 before the handshake (CRC only), 1 authenticated
/// (tags), 2 encrypted (decrypted in place).
pub fn record(data: &[u8]) {
    record_run(data);
}

/// [`record`]'s body; the number of records accepted.
pub fn record_run(data: &[u8]) -> usize {
    let Some((&mode, data)) = data.split_first() else {
        return 0;
    };
    let mut n = 0;
    let mut r = RecordReader::new(data);
    match mode {
        0 => {}
        1 => r.authenticate(record_keys(Protection::Mac).split(Role::Backup).1),
        _ => r.authenticate(record_keys(Protection::Encrypt).split(Role::Backup).1),
    }
    for _ in 0..4096 {
        match r.next() {
            Ok(rec) => assert!(rec.payload.len() <= MAX_PAYLOAD),
            Err(_) => break,
        }
        n += 1;
    }
    n
}

/// Both sides of the handshake against a peer that sends `data[1..]`
/// (`data[0]` picks the side). No input can authenticate: the other
/// side's proof covers a nonce the input cannot know.
pub fn handshake(data: &[u8]) {
    let Some((&side, rest)) = data.split_first() else {
        return;
    };
    let psk = Psk::from_bytes(KEY);
    let mut r = RecordReader::new(rest);
    let mut w = Vec::new();
    if side & 1 == 0 {
        let res = handshake::server(&mut r, &mut w, &psk, |h| {
            if h.page_size as usize == PAGE_SIZE && h.pages > 0 && h.pages <= 1 << 20 {
                Ok(())
            } else {
                Err(format!("layout of {} pages refused", h.pages))
            }
        });
        assert!(res.is_err(), "a fuzz input authenticated as a primary");
    } else {
        let hello = Hello {
            page_size: PAGE_SIZE as u32,
            pages: 16,
            nonce: [7; NONCE_LEN],
            protection: Default::default(),
            desc: "sim:fuzz".into(),
        };
        let res = handshake::client(&mut r, &mut w, &psk, &hello);
        assert!(res.is_err(), "a fuzz input authenticated as a backup");
    }
}

fn pattern() -> Box<[u8; PAGE_SIZE]> {
    let mut p = Box::new([0u8; PAGE_SIZE]);
    for (i, b) in p.iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    p
}

/// The page decoder on an untrusted (kind, payload), and the encoder's
/// round trip on a page made of the input.
pub fn page(data: &[u8]) {
    let Some((&kind, payload)) = data.split_first() else {
        return;
    };
    let base = pattern();
    let mut out = Box::new([0u8; PAGE_SIZE]);
    let mut dec = Decoder::new();
    let r = dec.decode(kind, payload, &base, &mut out);
    if kind == PageKind::Delta as u8 {
        // check_delta is what the receiver trusts to apply in place later.
        let checked = Decoder::check_delta(payload);
        assert_eq!(
            checked.is_ok(),
            r.is_ok(),
            "check_delta disagrees with decode"
        );
        if checked.is_ok() {
            let mut p = base.clone();
            Decoder::apply_delta(payload, &mut p).expect("a checked delta applies");
            assert!(p[..] == out[..], "apply_delta differs from decode");
        }
    }
    let mut page = base.clone();
    for (i, &b) in data.iter().take(PAGE_SIZE).enumerate() {
        page[i * 97 % PAGE_SIZE] = b;
    }
    for c in [Compressor::None, Compressor::Lz4, Compressor::Zstd(1)] {
        let mut enc = Encoder::new(c);
        let mut wire = Vec::new();
        let k = enc.encode(&page, Some(&base), &mut wire);
        let got = dec.decode(k as u8, &wire, &base, &mut out);
        assert!(got.is_ok(), "{c:?}: own {k:?} encoding refused: {got:?}");
        assert!(page[..] == out[..], "{c:?}: {k:?} round trip differs");
    }
}

/// The receiver's epoch staging on a stream of records framed as
/// `kind u8, epoch u8, len u16 le, payload` (no CRC, so the fuzzer reaches
/// the state machine). Atomic checkpoints: whatever the stream, once it
/// fails the replica equals the last committed checkpoint, byte for byte.
pub fn receiver(data: &[u8]) {
    receiver_run(data);
}

/// [`receiver`]; returns the last epoch committed.
pub fn receiver_run(data: &[u8]) -> Option<u64> {
    let mut rx = Receiver::new(8).expect("8 pages");
    let digest = |rx: &Receiver| {
        // SAFETY: the receiver is the replica's only writer and it is idle.
        Digest::of(unsafe { rx.memory().as_slice() }, rx.state())
    };
    let mut committed: Option<(u64, Digest)> = None;
    let mut c = data;
    while c.len() >= 4 {
        let len = (u16::from_le_bytes([c[2], c[3]]) as usize).min(c.len() - 4);
        let (kind, epoch, payload) = (c[0], u64::from(c[1]), &c[4..4 + len]);
        c = &c[4 + len..];
        let Some(kind) = RecordKind::from_u8(kind) else {
            continue;
        };
        match rx.on_record(Record {
            kind,
            epoch,
            payload,
            buf: None,
        }) {
            Ok(Event::Committed(e)) => {
                if let Some((last, _)) = committed {
                    assert_eq!(e, last + 1, "commits out of order");
                }
                if let Some(n) = rx.committed() {
                    assert_eq!(n, e);
                    committed = Some((e, digest(&rx)));
                }
            }
            Ok(Event::Closed(_)) => break,
            Ok(Event::None) => {}
            Err(_) => {
                rx.discard_open();
                if let Some((e, d)) = committed {
                    assert_eq!(rx.committed(), Some(e));
                    assert!(digest(&rx) == d, "a failed epoch changed the replica");
                }
                break;
            }
        }
    }
    rx.committed()
}

/// The NFQUEUE netlink parser on a datagram "from the kernel".
pub fn nfqueue(data: &[u8]) {
    if let Ok(msgs) = msg::parse(data) {
        assert!(msgs.len() <= data.len() / 16);
    }
}

/// The beacon decoder: only a datagram made with the key decodes, and
/// then it is exactly the encoding of what it decoded to.
pub fn beacon(data: &[u8]) {
    let psk = Psk::from_bytes(KEY);
    if let Ok((seq, nonce)) = beacon::decode(&psk, data) {
        assert!(beacon::encode(&psk, &nonce, seq)[..] == *data);
    }
    if data.len() >= 8 + NONCE_LEN {
        let seq = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
        let nonce: [u8; NONCE_LEN] = data[8..8 + NONCE_LEN].try_into().expect("nonce");
        let b = beacon::encode(&psk, &nonce, seq);
        assert_eq!(beacon::decode(&psk, &b), Ok((seq, nonce)));
    }
}

/// Valid inputs of each target, the start of its corpus (`fuzz/corpus/`,
/// written by `tests/fuzz_corpus.rs`'s ignored `write_seed_corpus`).
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "record" => record_seeds(),
        "handshake" => handshake_seeds(),
        "page" => page_seeds(),
        "receiver" => vec![receiver_stream()],
        "nfqueue" => nfqueue_seeds(),
        "beacon" => vec![beacon::encode(&Psk::from_bytes(KEY), &[3; NONCE_LEN], 5).to_vec()],
        "disk_writes" => vec![disk_writes_seed()],
        "nbd" => vec![nbd_seed()],
        _ => Vec::new(),
    }
}

/// The same records plain, sealed with a MAC and encrypted (as the
/// primary's sealer would after the handshake), each after its mode byte.
fn record_seeds() -> Vec<Vec<u8>> {
    let plain = record_stream();
    let mut out = vec![[&[0u8][..], &plain].concat()];
    for (mode, p) in [(1u8, Protection::Mac), (2, Protection::Encrypt)] {
        let (mut seal, _) = record_keys(p).split(Role::Primary);
        let sealed = seal
            .seal(&[&plain[..]])
            .expect("well-formed records")
            .concat();
        out.push([&[mode][..], &sealed].concat());
    }
    out
}

/// A stream of well-formed records (epoch 1's, an ack, a heartbeat, a close).
pub fn record_stream() -> Vec<u8> {
    use crate::transport::messages::{EpochBegin, EpochClass, EpochEnd};
    use crate::transport::record::write_record;
    let mut v = Vec::new();
    let begin = EpochBegin {
        class: EpochClass::Checkpoint,
        dirty: 1,
    };
    write_record(&mut v, RecordKind::EpochBegin, 1, &begin.encode());
    write_record(&mut v, RecordKind::State, 1, b"state");
    write_record(
        &mut v,
        RecordKind::EpochEnd,
        1,
        &EpochEnd::default().encode(),
    );
    write_record(&mut v, RecordKind::Ack, 1, &[]);
    write_record(&mut v, RecordKind::Heartbeat, 0, &[]);
    write_record(&mut v, RecordKind::Close, 1, &[]);
    v
}

fn handshake_seeds() -> Vec<Vec<u8>> {
    use crate::transport::record::write_record;
    let hello = Hello {
        page_size: PAGE_SIZE as u32,
        pages: 16,
        nonce: [1; NONCE_LEN],
        protection: Default::default(),
        desc: "sim:mem=64KiB".into(),
    };
    let mut server = vec![0];
    write_record(&mut server, RecordKind::Hello, 0, &hello.encode());
    write_record(&mut server, RecordKind::Auth, 0, &[9; 32]);
    let mut client = vec![1];
    write_record(&mut client, RecordKind::HelloAck, 0, &[2; NONCE_LEN + 32]);
    write_record(&mut client, RecordKind::AuthOk, 0, &[]);
    let mut refused = vec![1];
    write_record(&mut refused, RecordKind::Error, 0, b"refused");
    vec![server, client, refused]
}

fn page_seeds() -> Vec<Vec<u8>> {
    let base = pattern();
    let mut out = Vec::new();
    let mut changed = base.clone();
    changed[100..140].fill(0xaa);
    let zero = Box::new([0u8; PAGE_SIZE]);
    for c in [Compressor::None, Compressor::Lz4, Compressor::Zstd(1)] {
        for (page, prev) in [(&changed, Some(&*base)), (&changed, None), (&zero, None)] {
            let mut wire = Vec::new();
            let k = Encoder::new(c).encode(page, prev, &mut wire);
            let mut s = vec![k as u8];
            s.extend_from_slice(&wire);
            out.push(s);
        }
    }
    out
}

/// Seed epoch 0 (one full page) then checkpoints 1 and 2, framed as
/// [`receiver`] reads them.
fn receiver_stream() -> Vec<u8> {
    use crate::transport::messages::{EpochBegin, EpochClass, EpochEnd};
    let mut v = Vec::new();
    let mut rec = |kind: RecordKind, epoch: u8, p: &[u8]| {
        v.extend_from_slice(&[kind as u8, epoch]);
        v.extend_from_slice(&(p.len() as u16).to_le_bytes());
        v.extend_from_slice(p);
    };
    let page = pattern();
    for epoch in 0u8..3 {
        let class = if epoch == 0 {
            EpochClass::Seed
        } else {
            EpochClass::Checkpoint
        };
        rec(
            RecordKind::EpochBegin,
            epoch,
            &EpochBegin { class, dirty: 1 }.encode(),
        );
        let mut wire = Vec::new();
        let k = Encoder::new(Compressor::Lz4).encode(&page, None, &mut wire);
        let mut pages = 1u32.to_le_bytes().to_vec();
        pages.extend_from_slice(&u64::from(epoch + 1).to_le_bytes());
        pages.push(k as u8);
        pages.extend_from_slice(&(wire.len() as u16).to_le_bytes());
        pages.extend_from_slice(&wire);
        rec(RecordKind::Pages, epoch, &pages);
        let state_len = if epoch == 0 { 0 } else { 3 };
        if epoch > 0 {
            rec(RecordKind::State, epoch, b"st!");
        }
        let end = EpochEnd {
            page_entries: 1,
            pages_records: 1,
            state_len,
            disk_records: 0,
        };
        rec(RecordKind::EpochEnd, epoch, &end.encode());
    }
    v
}

fn nfqueue_seeds() -> Vec<Vec<u8>> {
    let mut hdr = 5u32.to_be_bytes().to_vec();
    hdr.extend_from_slice(&0x0800u16.to_be_bytes());
    hdr.push(0);
    let mut packet = msg::Builder::new(libc::NFQNL_MSG_PACKET, 0, 0, 7)
        .attr(libc::NFQA_MARK, &1u32.to_be_bytes())
        .attr(libc::NFQA_PACKET_HDR, &hdr)
        .finish();
    packet[6] = 0;
    let mut error = Vec::new();
    error.extend_from_slice(&36u32.to_ne_bytes());
    error.extend_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
    error.extend_from_slice(&0u16.to_ne_bytes());
    error.extend_from_slice(&9u32.to_ne_bytes());
    error.extend_from_slice(&0u32.to_ne_bytes());
    error.extend_from_slice(&(-libc::EBUSY).to_ne_bytes());
    error.extend_from_slice(&[0; 16]);
    let mut both = packet.clone();
    both.extend_from_slice(&error);
    vec![packet, error, both]
}

/// Size of the disk [`disk_writes`] and [`nbd`] check against.
const DISK_SIZE: u64 = 1 << 20;

/// The DiskWrites payload parser (a checkpoint's disk writes from the
/// wire): every op it accepts lies inside the disk.
pub fn disk_writes(data: &[u8]) {
    use crate::disk::wire::{self, OpRef};
    if let Ok((disk, ops)) = wire::parse(data, &[DISK_SIZE]) {
        assert_eq!(disk, 0);
        for op in ops {
            match op {
                OpRef::Write { offset, data } => {
                    assert!(offset + data.len() as u64 <= DISK_SIZE)
                }
                OpRef::Zero { offset, len } => assert!(offset + len <= DISK_SIZE),
                OpRef::Flush => {}
            }
        }
    }
}

fn disk_writes_seed() -> Vec<u8> {
    use crate::disk::wire::{self, DiskOp};
    let mut v = Vec::new();
    let ops = [
        DiskOp::Write {
            offset: 4096,
            data: vec![7; 512],
        },
        DiskOp::Zero {
            offset: 0,
            len: 4096,
        },
        DiskOp::Trim {
            offset: 8192,
            len: 4096,
        },
        DiskOp::Flush,
    ];
    wire::encode(&mut v, 0, &ops);
    v
}

/// One NBD server (unix socket, a 1 MiB export), started on first use.
fn nbd_server() -> &'static std::path::Path {
    use crate::disk::{DiskImage, Export, Fence, LogConfig, NbdAddr, NbdServer, WriteLog};
    use std::sync::{Arc, OnceLock};
    static SERVER: OnceLock<(tempfile::TempDir, NbdServer, std::path::PathBuf)> = OnceLock::new();
    let (_, _, path) = SERVER.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = DiskImage::create(&dir.path().join("d.img"), DISK_SIZE).expect("image");
        let log = Arc::new(WriteLog::new(
            img,
            Arc::new(Fence::open()),
            LogConfig::default(),
        ));
        let export = Export {
            name: "data".into(),
            log,
        };
        let path = dir.path().join("nbd.sock");
        let cfg = crate::disk::ServerConfig {
            handshake_timeout: std::time::Duration::from_secs(2),
            request_timeout: std::time::Duration::from_secs(2),
            idle_timeout: std::time::Duration::from_secs(2),
            ..Default::default()
        };
        let server =
            NbdServer::start(&NbdAddr::Unix(path.clone()), vec![export], cfg).expect("NBD server");
        (dir, server, path)
    });
    path
}

/// The NBD server (handshake and request parser) against a client that
/// sends `data` and closes its side: it must answer or hang up within its
/// deadlines, never panic.
pub fn nbd(data: &[u8]) {
    use std::io::{Read, Write};
    let mut c = std::os::unix::net::UnixStream::connect(nbd_server()).expect("connect");
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    let _ = c.write_all(data);
    let _ = c.shutdown(std::net::Shutdown::Write);
    let mut sink = Vec::new();
    let r = c.read_to_end(&mut sink);
    assert!(
        !matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the NBD server neither answered nor hung up within 10 s"
    );
}

/// A client that negotiates export "data" with NBD_OPT_GO, writes, reads,
/// flushes and disconnects.
fn nbd_seed() -> Vec<u8> {
    use crate::disk::nbd::proto::*;
    let mut v = Vec::new();
    v.extend_from_slice(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes());
    let name = b"data";
    let mut opt = (name.len() as u32).to_be_bytes().to_vec();
    opt.extend_from_slice(name);
    opt.extend_from_slice(&0u16.to_be_bytes());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&OPT_GO.to_be_bytes());
    v.extend_from_slice(&(opt.len() as u32).to_be_bytes());
    v.extend_from_slice(&opt);
    let req = |kind: u16, offset: u64, len: u32| Request {
        magic: REQUEST_MAGIC,
        flags: 0,
        kind,
        cookie: 1,
        offset,
        len,
    };
    v.extend_from_slice(&req(CMD_WRITE, 4096, 8).encode());
    v.extend_from_slice(b"12345678");
    v.extend_from_slice(&req(CMD_READ, 0, 512).encode());
    v.extend_from_slice(&req(CMD_FLUSH, 0, 0).encode());
    v.extend_from_slice(&req(CMD_DISC, 0, 0).encode());
    v
}
