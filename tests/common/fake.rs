//! A fake primary speaking the real wire protocol through the library:
//! lets tests send exactly the epochs (and breakage, or silence) they want.

use std::io::Write;
use std::net::TcpStream;

use castor::codec::{Compressor, Encoder, PageKind};
use castor::digest::Digest;
use castor::transport::auth::{Opener, Role, Sealer};
use castor::transport::handshake::{self, random_nonce, Psk};
use castor::transport::messages::{EpochBegin, EpochClass, EpochEnd, Hello, PagesWriter};
use castor::transport::record::{write_record, RecordKind, RecordReader};
use castor::PAGE_SIZE;

pub const PAGES: u64 = 64;

/// A tiny primary: a memory image, its shadow, and epoch serialisation.
pub struct Primary {
    pub mem: Vec<[u8; PAGE_SIZE]>,
    pub shadow: Vec<[u8; PAGE_SIZE]>,
    pub enc: Encoder,
    pub epoch: u64,
}

impl Primary {
    pub fn new() -> Self {
        Primary {
            mem: vec![[0; PAGE_SIZE]; PAGES as usize],
            shadow: vec![[0; PAGE_SIZE]; PAGES as usize],
            enc: Encoder::new(Compressor::Lz4),
            epoch: 0,
        }
    }

    pub fn state(&self) -> Vec<u8> {
        format!("state-of-epoch-{}", self.epoch).into_bytes()
    }

    pub fn digest(&self) -> String {
        Digest::of(&self.mem.concat(), &self.state()).to_hex()
    }

    /// The seed (epoch 0): every page that differs from zero.
    pub fn seed(&mut self) -> Vec<u8> {
        let all: Vec<u64> = (0..PAGES).collect();
        self.emit(0, EpochClass::Seed, &all)
    }

    /// Dirties some pages and returns the next checkpoint's bytes.
    pub fn checkpoint(&mut self) -> Vec<u8> {
        self.epoch += 1;
        let e = self.epoch;
        let dirty: Vec<u64> = (0..PAGES).filter(|g| (g + e) % 3 == 0).collect();
        for &g in &dirty {
            let p = &mut self.mem[g as usize];
            for (i, b) in p
                .iter_mut()
                .enumerate()
                .skip((e as usize * 37) % 4000)
                .take(40)
            {
                *b = (i as u64 ^ e ^ g) as u8;
            }
        }
        self.emit(e, EpochClass::Checkpoint, &dirty)
    }

    pub fn emit(&mut self, e: u64, class: EpochClass, gfns: &[u64]) -> Vec<u8> {
        let mut out = Vec::new();
        write_record(
            &mut out,
            RecordKind::EpochBegin,
            e,
            &EpochBegin {
                class,
                dirty: gfns.len() as u64,
            }
            .encode(),
        );
        let mut w = PagesWriter::new(e);
        for &g in gfns {
            let page = self.mem[g as usize];
            let prev = self.shadow[g as usize];
            w.push(&mut out, g, |o| {
                let k = self.enc.encode(&page, Some(&prev), o);
                (k != PageKind::Unchanged).then_some(k as u8)
            });
            self.shadow[g as usize] = page;
        }
        w.close(&mut out);
        let state = self.state();
        if class == EpochClass::Checkpoint {
            write_record(&mut out, RecordKind::State, e, &state);
        }
        let end = EpochEnd {
            page_entries: w.entries,
            pages_records: w.records,
            state_len: if class == EpochClass::Checkpoint {
                state.len() as u32
            } else {
                0
            },
            disk_records: 0,
        };
        write_record(&mut out, RecordKind::EpochEnd, e, &end.encode());
        out
    }
}

/// An authenticated connection to a backup: what the test writes is
/// sealed with the session's keys, record by record, like a real primary's
/// stream (a torn last record goes out as it is, without its tag).
pub struct Session {
    stream: TcpStream,
    sealer: Sealer,
    opener: Option<Opener>,
}

impl Session {
    /// Seals the whole records at the front of `bytes` and sends them,
    /// then any torn rest unsealed.
    pub fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let sealed = self.sealed(bytes)?;
        (&self.stream).write_all(&sealed)
    }

    /// What [`Session::write_all`] would send for `bytes` (advancing the
    /// record count as if it had): to damage on the wire, then send with
    /// [`Session::write_raw`].
    pub fn sealed(&mut self, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut whole = 0;
        while bytes.len() - whole >= 24 {
            let len = u32::from_le_bytes(bytes[whole + 16..whole + 20].try_into().unwrap());
            if bytes.len() - whole < 24 + len as usize {
                break;
            }
            whole += 24 + len as usize;
        }
        let mut sealed = self
            .sealer
            .seal(&[&bytes[..whole]])
            .map_err(std::io::Error::other)?
            .concat();
        sealed.extend_from_slice(&bytes[whole..]);
        Ok(sealed)
    }

    /// Sends `bytes` as they are (already sealed, or not meant to be).
    pub fn write_raw(&self, bytes: &[u8]) -> std::io::Result<()> {
        (&self.stream).write_all(bytes)
    }

    /// A reader of the backup's records (acks, errors), opening them with
    /// the session's key. Once per session.
    pub fn reader(&mut self) -> RecordReader<TcpStream> {
        let mut r = RecordReader::new(self.stream.try_clone().unwrap());
        r.authenticate(self.opener.take().expect("one reader per session"));
        r
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Session({:?})", self.stream.peer_addr())
    }
}

impl std::ops::Deref for Session {
    type Target = TcpStream;
    fn deref(&self) -> &TcpStream {
        &self.stream
    }
}

/// Connects and authenticates with `key`.
pub fn session(addr: &str, key: &str) -> Result<Session, String> {
    let s = TcpStream::connect(addr).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = RecordReader::new(s.try_clone().unwrap());
    let hello = Hello {
        page_size: PAGE_SIZE as u32,
        pages: PAGES,
        nonce: random_nonce(),
        protection: Default::default(),
        desc: "test:hostile".into(),
    };
    let keys = handshake::client(&mut r, &mut w, &Psk::from_bytes(key.as_bytes()), &hello)
        .map_err(|e| e.to_string())?;
    let (sealer, opener) = keys.split(Role::Primary);
    Ok(Session {
        stream: s,
        sealer,
        opener: Some(opener),
    })
}
