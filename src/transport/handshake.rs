//! Session handshake: versions, memory layout, and mutual authentication
//! with a pre-shared key.
//!
//! ```text
//! primary                                   backup
//!   Hello{page_size, pages, nonce_p, desc} ──►
//!                                           ◄── HelloAck{nonce_b, mac_b}   (or Error)
//!   Auth{mac_p}                            ──►
//!                                           ◄── AuthOk                     (or Error)
//! mac_b = HMAC-SHA256(psk, "castor-backup-v1"  ‖ Hello payload ‖ nonce_b)
//! mac_p = HMAC-SHA256(psk, "castor-primary-v1" ‖ Hello payload ‖ nonce_b)
//! ```
//!
//! Each side proves knowledge of the key over both nonces, so neither a
//! replayed Hello nor a replayed Auth is accepted. The backup applies no
//! page before it has verified `mac_p`. Both sides then derive the
//! session's record keys from the key and both nonces
//! ([`SessionKeys::derive`]): every record after AuthOk carries a tag
//! (and, with `--encrypt`, an encrypted payload), see
//! [`crate::transport::auth`]. The Hello names the protection, so it is
//! covered by both proofs: a man in the middle cannot downgrade it.
//!
//! The built-in development key is public: [`Psk::check_link`] refuses it
//! unless both ends of the connection are on loopback.

use std::io::{self, Write};
use std::net::IpAddr;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::transport::auth::{Protection, SessionKeys};
use crate::transport::messages::{Hello, MAC_LEN, NONCE_LEN};
use crate::transport::record::{
    send_record, PayloadError, RecordError, RecordKind, RecordReader, WIRE_VERSION,
};

/// Built-in key used when none is configured: lets one-host demos run with
/// no setup, and is announced with a warning because anyone can use it.
const DEV_KEY: &[u8] = b"castor-development-key-do-not-use-in-production";
pub const MIN_KEY_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("reading pre-shared key file {path}: {source}")]
    KeyFile {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("pre-shared key in {path} is {len} bytes; at least {MIN_KEY_LEN} are required (make one with `castor keygen > FILE`)")]
    KeyTooShort { path: String, len: usize },
    #[error("peer authentication failed: {0} (wrong pre-shared key?)")]
    Auth(&'static str),
    #[error("peer refused the session: {0}")]
    Refused(String),
    #[error("the built-in development key is public and only allowed when both ends are on loopback, but this connection runs {local} <-> {peer}: make a key with `castor keygen > castor.key`, copy it to both hosts and pass --psk-file castor.key (or set $CASTOR_PSK) on both")]
    DevKeyOffLoopback { local: IpAddr, peer: IpAddr },
    #[error("{0}")]
    Protection(String),
    #[error("expected {want:?} during handshake, got {got:?}")]
    Unexpected { want: RecordKind, got: RecordKind },
    #[error("incompatible layout: {0}")]
    Layout(String),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(transparent)]
    Payload(#[from] PayloadError),
    #[error("i/o error during handshake: {0}")]
    Io(#[from] io::Error),
}

/// A pre-shared key. Debug output never shows the key.
#[derive(Clone)]
pub struct Psk {
    key: Vec<u8>,
    pub is_default: bool,
    /// How this end protects records after the handshake (`--encrypt`);
    /// both ends must agree.
    pub protection: Protection,
}

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Psk({} bytes{})",
            self.key.len(),
            if self.is_default { ", built-in" } else { "" }
        )
    }
}

impl Psk {
    pub fn from_bytes(key: &[u8]) -> Psk {
        Psk {
            key: key.to_vec(),
            is_default: false,
            protection: Protection::Mac,
        }
    }

    /// The same key, protecting records as `p`.
    pub fn with_protection(mut self, p: Protection) -> Psk {
        self.protection = p;
        self
    }

    /// Refuses the built-in development key on a connection that leaves
    /// the host: anyone can use that key, so it protects nothing there.
    pub fn check_link(&self, local: IpAddr, peer: IpAddr) -> Result<(), HandshakeError> {
        if self.is_default && !(local.is_loopback() && peer.is_loopback()) {
            return Err(HandshakeError::DevKeyOffLoopback { local, peer });
        }
        Ok(())
    }

    /// The key from `path` (surrounding whitespace trimmed), else from the
    /// `CASTOR_PSK` environment variable, else the built-in development key.
    pub fn load(path: Option<&Path>) -> Result<Psk, HandshakeError> {
        let (key, origin) = if let Some(p) = path {
            let k = std::fs::read(p).map_err(|source| HandshakeError::KeyFile {
                path: p.display().to_string(),
                source,
            })?;
            (k, p.display().to_string())
        } else if let Ok(k) = std::env::var("CASTOR_PSK") {
            (k.into_bytes(), "$CASTOR_PSK".to_string())
        } else {
            return Ok(Psk {
                key: DEV_KEY.to_vec(),
                is_default: true,
                protection: Protection::Mac,
            });
        };
        let trimmed = k_trim(&key);
        if trimmed.len() < MIN_KEY_LEN {
            return Err(HandshakeError::KeyTooShort {
                path: origin,
                len: trimmed.len(),
            });
        }
        Ok(Psk::from_bytes(trimmed))
    }

    /// HMAC-SHA256 with this key over `parts`, concatenated: for other
    /// authenticated messages of a session (the UDP beacon).
    pub fn tag(&self, parts: &[&[u8]]) -> [u8; MAC_LEN] {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    /// Checks a (possibly truncated, at least 16-byte) [`Psk::tag`] in
    /// constant time.
    pub fn check_tag(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        for p in parts {
            m.update(p);
        }
        tag.len() >= 16 && m.verify_truncated_left(tag).is_ok()
    }

    fn mac(&self, label: &[u8], hello: &[u8], nonce_b: &[u8]) -> [u8; MAC_LEN] {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        m.update(label);
        m.update(hello);
        m.update(nonce_b);
        m.finalize().into_bytes().into()
    }

    fn verify(&self, label: &[u8], hello: &[u8], nonce_b: &[u8], tag: &[u8]) -> bool {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        m.update(label);
        m.update(hello);
        m.update(nonce_b);
        m.verify_slice(tag).is_ok()
    }

    /// The record keys of the session opened by `hello` and `nonce_b`.
    fn session_keys(&self, hello: &Hello, nonce_b: &[u8]) -> SessionKeys {
        SessionKeys::derive(&self.key, &hello.nonce, nonce_b, hello.protection)
    }
}

fn k_trim(k: &[u8]) -> &[u8] {
    let s = k
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(k.len());
    let e = k
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(s, |e| e + 1);
    &k[s..e]
}

const LABEL_B: &[u8] = b"castor-backup-v1";
const LABEL_P: &[u8] = b"castor-primary-v1";

pub fn random_nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut n).expect("getrandom failed: no entropy source");
    n
}

/// Sends an Error record with a human-readable reason (best effort).
pub fn send_error(w: &mut impl Write, msg: &str) {
    let _ = send_record(w, RecordKind::Error, 0, msg.as_bytes());
}

fn expect<R: io::Read>(r: &mut RecordReader<R>, want: RecordKind) -> Result<&[u8], HandshakeError> {
    let rec = r.next()?;
    if rec.kind == RecordKind::Error {
        return Err(HandshakeError::Refused(
            String::from_utf8_lossy(rec.payload).into_owned(),
        ));
    }
    if rec.kind != want {
        return Err(HandshakeError::Unexpected {
            want,
            got: rec.kind,
        });
    }
    Ok(rec.payload)
}

/// Primary side. Returns once the backup has accepted the session, with
/// the keys every later record is sealed and opened with
/// ([`SessionKeys::split`] as [`crate::transport::auth::Role::Primary`]).
pub fn client<R: io::Read, W: Write>(
    r: &mut RecordReader<R>,
    w: &mut W,
    psk: &Psk,
    hello: &Hello,
) -> Result<SessionKeys, HandshakeError> {
    let hp = hello.encode();
    send_record(w, RecordKind::Hello, 0, &hp)?;
    let ack = expect(r, RecordKind::HelloAck)?;
    if ack.len() != NONCE_LEN + MAC_LEN {
        return Err(HandshakeError::Auth("HelloAck has the wrong length"));
    }
    let (nonce_b, mac_b) = ack.split_at(NONCE_LEN);
    if !psk.verify(LABEL_B, &hp, nonce_b, mac_b) {
        let _ = send_record(w, RecordKind::Error, 0, b"backup failed authentication");
        return Err(HandshakeError::Auth(
            "the backup's proof of the key does not verify",
        ));
    }
    let mac_p = psk.mac(LABEL_P, &hp, nonce_b);
    send_record(w, RecordKind::Auth, 0, &mac_p)?;
    let keys = psk.session_keys(hello, nonce_b);
    expect(r, RecordKind::AuthOk)?;
    Ok(keys)
}

/// Backup side. `accept` checks the offered layout and may refuse it with a
/// reason; a Hello asking for another protection than `psk`'s is refused
/// here. Returns the authenticated Hello and the session's record keys.
pub fn server<R: io::Read, W: Write>(
    r: &mut RecordReader<R>,
    w: &mut W,
    psk: &Psk,
    accept: impl FnOnce(&Hello) -> Result<(), String>,
) -> Result<(Hello, SessionKeys), HandshakeError> {
    let hp = match expect(r, RecordKind::Hello) {
        Ok(p) => p.to_vec(),
        Err(HandshakeError::Record(RecordError::Version { got })) => {
            // Our Error record carries our version: an older or newer
            // primary's reader then names both versions too.
            send_error(
                w,
                &format!("wire version {got} refused: this backup speaks {WIRE_VERSION}; run the same castor release on both hosts"),
            );
            return Err(RecordError::Version { got }.into());
        }
        Err(e) => return Err(e),
    };
    let hello = match Hello::decode(&hp) {
        Ok(h) => h,
        Err(e) => {
            send_error(w, &e.to_string());
            return Err(e.into());
        }
    };
    if hello.protection != psk.protection {
        let reason = format!(
            "the primary runs with {} but this backup with {}; start both with --encrypt or both without",
            hello.protection.flag(),
            psk.protection.flag()
        );
        send_error(w, &reason);
        return Err(HandshakeError::Protection(reason));
    }
    if let Err(reason) = accept(&hello) {
        send_error(w, &reason);
        return Err(HandshakeError::Layout(reason));
    }
    let nonce_b = random_nonce();
    let mut ack = nonce_b.to_vec();
    ack.extend_from_slice(&psk.mac(LABEL_B, &hp, &nonce_b));
    send_record(w, RecordKind::HelloAck, 0, &ack)?;
    let auth = expect(r, RecordKind::Auth)?;
    if !psk.verify(LABEL_P, &hp, &nonce_b, auth) {
        send_error(w, "authentication failed: wrong pre-shared key");
        return Err(HandshakeError::Auth(
            "the primary's proof of the key does not verify",
        ));
    }
    send_record(w, RecordKind::AuthOk, 0, &[])?;
    let keys = psk.session_keys(&hello, &nonce_b);
    Ok((hello, keys))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    type Sides = (
        Result<SessionKeys, HandshakeError>,
        Result<(Hello, SessionKeys), HandshakeError>,
    );

    fn run_with(pk: &Psk, bk: &Psk) -> Sides {
        let (a, b) = UnixStream::pair().unwrap();
        let hello = Hello {
            page_size: 4096,
            pages: 16,
            nonce: random_nonce(),
            protection: pk.protection,
            desc: "sim:".into(),
        };
        let bk = bk.clone();
        let t = std::thread::spawn(move || {
            let mut r = RecordReader::new(b.try_clone().unwrap());
            let mut w = b;
            server(&mut r, &mut w, &bk, |_| Ok(()))
        });
        let mut r = RecordReader::new(a.try_clone().unwrap());
        let mut w = a;
        let c = client(&mut r, &mut w, pk, &hello);
        drop(w);
        drop(r);
        (c, t.join().unwrap())
    }

    fn run(pk: &[u8], bk: &[u8]) -> Sides {
        run_with(&Psk::from_bytes(pk), &Psk::from_bytes(bk))
    }

    /// A primary of another wire version gets an Error record naming both
    /// versions (its own reader refuses ours, which names them as well).
    #[test]
    fn a_hello_of_another_wire_version_is_answered_with_a_reason() {
        use crate::transport::record::write_record;
        let hello = Hello {
            page_size: 4096,
            pages: 16,
            nonce: [3; NONCE_LEN],
            protection: Protection::Mac,
            desc: "sim:".into(),
        };
        let mut old = Vec::new();
        write_record(&mut old, RecordKind::Hello, 0, &hello.encode());
        old[4..6].copy_from_slice(&(WIRE_VERSION - 1).to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&old[..20]), &old[24..]);
        old[20..24].copy_from_slice(&crc.to_le_bytes());
        let mut r = RecordReader::new(&old[..]);
        let mut answer = Vec::new();
        let psk = Psk::from_bytes(b"0123456789abcdef");
        let e = server(&mut r, &mut answer, &psk, |_| Ok(())).unwrap_err();
        assert!(
            matches!(e, HandshakeError::Record(RecordError::Version { got }) if got == WIRE_VERSION - 1),
            "{e}"
        );
        let rec = RecordReader::new(&answer[..])
            .next()
            .map(|r| (r.kind, r.payload.to_vec()));
        let (kind, reason) = rec.unwrap();
        assert_eq!(kind, RecordKind::Error);
        let reason = String::from_utf8(reason).unwrap();
        assert!(
            reason.contains(&format!("wire version {} refused", WIRE_VERSION - 1))
                && reason.contains(&format!("speaks {WIRE_VERSION}")),
            "{reason}"
        );
    }

    #[test]
    fn same_key_accepts() {
        let (c, s) = run(b"0123456789abcdef", b"0123456789abcdef");
        c.unwrap();
        assert_eq!(s.unwrap().0.pages, 16);
    }

    /// Both ends derive the same keys: what one seals the other opens.
    #[test]
    fn both_ends_derive_the_same_record_keys() {
        use crate::transport::auth::Role;
        use crate::transport::record::write_record;
        for p in [Protection::Mac, Protection::Encrypt] {
            let psk = Psk::from_bytes(b"0123456789abcdef").with_protection(p);
            let (c, s) = run_with(&psk, &psk);
            let (ck, (_, sk)) = (c.unwrap(), s.unwrap());
            assert_eq!((ck.protection(), sk.protection()), (p, p));
            let (mut p_seal, mut p_open) = ck.split(Role::Primary);
            let (mut b_seal, mut b_open) = sk.split(Role::Backup);
            for (seal, open) in [(&mut p_seal, &mut b_open), (&mut b_seal, &mut p_open)] {
                let mut rec = Vec::new();
                write_record(&mut rec, RecordKind::Ack, 9, b"x");
                let mut sealed = seal.seal(&[&rec[..]]).unwrap().concat();
                open.open(&mut sealed).unwrap();
                assert_eq!(&sealed[24..25], b"x");
            }
        }
    }

    #[test]
    fn protection_mismatch_is_refused_naming_both() {
        let k = Psk::from_bytes(b"0123456789abcdef");
        let (c, s) = run_with(&k.clone().with_protection(Protection::Encrypt), &k);
        let e = c.unwrap_err().to_string();
        assert!(e.contains("--encrypt") && e.contains("both"), "{e}");
        assert!(matches!(s, Err(HandshakeError::Protection(_))), "{s:?}");
    }

    #[test]
    fn the_development_key_is_refused_off_loopback() {
        let dev = Psk::load(None);
        // $CASTOR_PSK may be set by the environment running the tests.
        let Ok(dev) = dev.map(|p| Psk {
            is_default: true,
            ..p
        }) else {
            panic!("loading the built-in key");
        };
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let lo6: IpAddr = "::1".parse().unwrap();
        let far: IpAddr = "192.0.2.7".parse().unwrap();
        dev.check_link(lo, lo6).unwrap();
        let e = dev.check_link(far, lo).unwrap_err().to_string();
        assert!(
            e.contains("castor keygen") && e.contains("192.0.2.7"),
            "{e}"
        );
        assert!(dev.check_link(lo, far).is_err());
        Psk::from_bytes(b"0123456789abcdef")
            .check_link(far, far)
            .unwrap();
    }

    #[test]
    fn wrong_key_is_refused_by_both_sides() {
        let (c, s) = run(b"0123456789abcdef", b"fedcba9876543210");
        assert!(matches!(c, Err(HandshakeError::Auth(_))), "{c:?}");
        assert!(s.is_err());
    }

    #[test]
    fn key_trimming() {
        assert_eq!(k_trim(b"  abc \n"), b"abc");
        assert_eq!(k_trim(b"   "), b"");
    }
}
