//! Authenticated records: the session's keys and the per-record seal.
//!
//! After the handshake every record, in both directions, carries a 16-byte
//! tag after its payload (`docs/wire-format.md`, "Authenticated records"):
//!
//! ```text
//! header (24) ‖ payload (len) ‖ tag (16)
//! mac:     tag = BLAKE3-keyed(K_dir, seq u64 LE ‖ header ‖ payload)[0..16]
//! encrypt: payload' , tag = AES-256-GCM(K_dir, nonce = seq u64 LE ‖ 0u32,
//!                                       aad = header, payload)
//! K_p→b, K_b→p = HKDF-SHA256(salt = nonce_p ‖ nonce_b, ikm = PSK,
//!                            info = "castor-v5 record key " ‖ dir ‖ mode)
//! ```
//!
//! In both modes the header's CRC field is 0 on the wire: the sealer
//! zeroes it before the tag is computed, so the tag covers every byte a
//! CRC covered (header fields and payload) and the CRC itself is neither
//! computed (the data path's builders leave it 0) nor checked.
//!
//! `seq` is implicit: each direction counts its records from 0 after
//! AuthOk and never sends the count. A record forged, altered, replayed,
//! reordered, dropped (the next one arrives under the wrong count) or
//! injected fails its tag, and the reader ends the session.
//!
//! Invariants: a [`Sealer`] and the peer's [`Opener`] of one direction see
//! the same records in the same order, so their counters agree; an
//! [`Opener`] advances its counter only past a record whose tag verified,
//! and a reader hands out no byte of a record before that.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit};
use hkdf::Hkdf;
use sha2::Sha256;

use crate::transport::ring::Chunker;
pub use crate::transport::wire::TAG_LEN;
use crate::transport::wire::{HEADER_LEN, MAGIC, MAX_PAYLOAD};
const KEY_LEN: usize = 32;

/// How records are protected after the handshake (both ends must agree;
/// the primary names it in its Hello).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protection {
    /// Integrity only: a keyed BLAKE3 tag per record.
    #[default]
    Mac = 0,
    /// Confidentiality and integrity: AES-256-GCM over each payload (`--encrypt`).
    Encrypt = 1,
}

impl Protection {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Protection::Mac),
            1 => Some(Protection::Encrypt),
            _ => None,
        }
    }

    /// How an operator selects it.
    pub fn flag(self) -> &'static str {
        match self {
            Protection::Mac => "no --encrypt",
            Protection::Encrypt => "--encrypt",
        }
    }
}

/// Which end of a session this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Backup,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("record {seq} from the {from} failed authentication: forged, replayed, reordered or dropped on the way (the session ends)")]
    Forged { seq: u64, from: &'static str },
    #[error("record {seq} to seal is malformed: {why}")]
    Unsealable { seq: u64, why: String },
}

/// The keys of one session, one per direction.
pub struct SessionKeys {
    to_backup: [u8; KEY_LEN],
    to_primary: [u8; KEY_LEN],
    protection: Protection,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionKeys({:?})", self.protection)
    }
}

impl SessionKeys {
    /// Derives both directions' keys from the pre-shared key and both
    /// handshake nonces: every session, and each direction of it, has its
    /// own key, so records of one are never accepted in another.
    pub fn derive(psk: &[u8], nonce_p: &[u8], nonce_b: &[u8], protection: Protection) -> Self {
        let salt = [nonce_p, nonce_b].concat();
        let hk = Hkdf::<Sha256>::new(Some(&salt), psk);
        let key = |dir: &[u8]| {
            let mut k = [0u8; KEY_LEN];
            let info = [b"castor-v5 record key ", dir, &[protection as u8]].concat();
            hk.expand(&info, &mut k)
                .expect("32 bytes is a valid HKDF-SHA256 output length");
            k
        };
        SessionKeys {
            to_backup: key(b"primary->backup"),
            to_primary: key(b"backup->primary"),
            protection,
        }
    }

    pub fn protection(&self) -> Protection {
        self.protection
    }

    /// The sealer of what `me` sends and the opener of what it receives.
    pub fn split(&self, me: Role) -> (Sealer, Opener) {
        let (out, inn, peer) = match me {
            Role::Primary => (&self.to_backup, &self.to_primary, Role::Backup),
            Role::Backup => (&self.to_primary, &self.to_backup, Role::Primary),
        };
        (
            Sealer {
                dir: Direction::new(out, self.protection, me),
                scratch: Vec::new(),
                heads: Vec::new(),
                tags: Vec::new(),
            },
            Opener {
                dir: Direction::new(inn, self.protection, peer),
            },
        )
    }
}

/// One direction's key and record counter.
struct Direction {
    key: [u8; KEY_LEN],
    aead: Option<Box<Aes256Gcm>>,
    seq: u64,
    /// Who sends in this direction (for error messages).
    from: Role,
}

impl Direction {
    fn new(key: &[u8; KEY_LEN], p: Protection, from: Role) -> Self {
        Direction {
            key: *key,
            aead: (p == Protection::Encrypt)
                .then(|| Box::new(Aes256Gcm::new_from_slice(key).expect("32-byte AES-256 key"))),
            seq: 0,
            from,
        }
    }

    fn mac(&self) -> blake3::Hasher {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&self.seq.to_le_bytes());
        h
    }

    fn nonce(&self) -> aes_gcm::Nonce<aes_gcm::aes::cipher::consts::U12> {
        let mut n = [0u8; 12];
        n[..8].copy_from_slice(&self.seq.to_le_bytes());
        n.into()
    }
}

fn tag_of(h: &blake3::Hasher) -> [u8; TAG_LEN] {
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(&h.finalize().as_bytes()[..TAG_LEN]);
    t
}

/// Compares in time independent of where the tags differ.
fn tags_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// One piece of sealed output: bytes of the caller's buffers, a header
/// (its CRC field zeroed) or a tag.
enum Piece<'a> {
    Input(&'a [u8]),
    Head(usize),
    Tag(usize),
}

/// The buffers a [`Sealer`]'s output lives in ([`Sealer::take_output`]).
pub struct SealOutput {
    scratch: Vec<u8>,
    heads: Vec<[u8; HEADER_LEN]>,
    tags: Vec<[u8; TAG_LEN]>,
}

/// Seals the records one end sends, in order.
pub struct Sealer {
    dir: Direction,
    /// Encrypt: the whole sealed output of the last call.
    scratch: Vec<u8>,
    /// Mac: the headers (CRC field zeroed) of the last call.
    heads: Vec<[u8; HEADER_LEN]>,
    /// Mac: the tags of the last call.
    tags: Vec<[u8; TAG_LEN]>,
}

impl Sealer {
    pub fn protection(&self) -> Protection {
        if self.dir.aead.is_some() {
            Protection::Encrypt
        } else {
            Protection::Mac
        }
    }

    /// Gives up the output buffers of the last [`Sealer::seal`] for good
    /// (never freed nor reused): for a transport whose kernel may still
    /// read them after a failed send ([`crate::transport::RecordSink::kernel_kept_buffers`]).
    pub fn leak_buffers(&mut self) {
        std::mem::forget(std::mem::take(&mut self.scratch));
        std::mem::forget(std::mem::take(&mut self.heads));
        std::mem::forget(std::mem::take(&mut self.tags));
    }

    /// Takes out the output buffers of the last [`Sealer::seal`], for a
    /// sink that sends from them after the call returns (moving the
    /// vectors leaves their contents, which the sealed pieces point at,
    /// where they are). The next seal starts on fresh buffers, or on those
    /// handed back by [`Sealer::reuse_output`].
    pub fn take_output(&mut self) -> SealOutput {
        SealOutput {
            scratch: std::mem::take(&mut self.scratch),
            heads: std::mem::take(&mut self.heads),
            tags: std::mem::take(&mut self.tags),
        }
    }

    /// Takes back output buffers nothing reads any more, to seal into
    /// again (keeps the larger of the two scratch buffers).
    pub fn reuse_output(&mut self, out: SealOutput) {
        if out.scratch.capacity() > self.scratch.capacity() {
            self.scratch = out.scratch;
        }
        if out.heads.capacity() > self.heads.capacity() {
            self.heads = out.heads;
        }
        if out.tags.capacity() > self.tags.capacity() {
            self.tags = out.tags;
        }
    }

    /// Records sealed so far.
    pub fn sealed(&self) -> u64 {
        self.dir.seq
    }

    /// Seals the whole records laid end to end in `bufs` (a record may
    /// span buffers) and returns the bytes to send, in order. Each
    /// record's CRC field goes out as 0 whatever the caller wrote there
    /// (the tag replaces it). With a MAC the payloads are not copied: the
    /// result interleaves the headers (copied, 24 bytes each) and slices
    /// of `bufs` with the tags. Encryption writes the ciphertext to an
    /// internal buffer reused from call to call.
    pub fn seal<'a>(&'a mut self, bufs: &'a [&'a [u8]]) -> Result<Vec<&'a [u8]>, AuthError> {
        self.scratch.clear();
        self.heads.clear();
        self.tags.clear();
        let mut c = Chunker::new(bufs);
        let mut plan = Vec::new();
        while c.left() > 0 {
            if c.left() < HEADER_LEN {
                return Err(self.unsealable(format!("{} bytes after the last record", c.left())));
            }
            let mut hdr = [0u8; HEADER_LEN];
            let mut at = 0;
            // The header is rewritten (CRC field zeroed) into `heads` (a
            // MAC) or `scratch` (encrypt).
            c.take(HEADER_LEN, |p| {
                hdr[at..at + p.len()].copy_from_slice(p);
                at += p.len();
            });
            // Version 5: the tag replaces the CRC in both modes.
            hdr[20..24].fill(0);
            let len = u32::from_le_bytes(hdr[16..20].try_into().unwrap()) as usize;
            if u32::from_le_bytes(hdr[0..4].try_into().unwrap()) != MAGIC || len > MAX_PAYLOAD {
                return Err(self.unsealable(format!("bad header {hdr:02x?}")));
            }
            if c.left() < len {
                return Err(
                    self.unsealable(format!("payload of {len} bytes, only {} given", c.left()))
                );
            }
            match self.dir.aead.take() {
                Some(aead) => {
                    self.encrypt_one(&aead, hdr, len, &mut c);
                    self.dir.aead = Some(aead);
                }
                None => self.mac_one(&hdr, len, &mut c, &mut plan),
            }
            self.dir.seq += 1;
        }
        let this: &'a Self = self;
        if this.dir.aead.is_some() {
            return Ok(vec![&this.scratch[..]]);
        }
        Ok(plan
            .into_iter()
            .map(|p| match p {
                Piece::Input(s) => s,
                Piece::Head(i) => &this.heads[i][..],
                Piece::Tag(i) => &this.tags[i][..],
            })
            .collect())
    }

    fn unsealable(&self, why: String) -> AuthError {
        AuthError::Unsealable {
            seq: self.dir.seq,
            why,
        }
    }

    /// The header (CRC field zeroed) was taken from `c` already.
    fn mac_one<'a>(
        &mut self,
        hdr: &[u8; HEADER_LEN],
        len: usize,
        c: &mut Chunker<'a>,
        plan: &mut Vec<Piece<'a>>,
    ) {
        self.heads.push(*hdr);
        plan.push(Piece::Head(self.heads.len() - 1));
        let mut h = self.dir.mac();
        h.update(hdr);
        c.take(len, |p| {
            h.update(p);
            plan.push(Piece::Input(p));
        });
        self.tags.push(tag_of(&h));
        plan.push(Piece::Tag(self.tags.len() - 1));
    }

    /// The header (CRC field zeroed: a CRC of the plaintext would leak
    /// 32 bits of it) was taken from `c` already.
    fn encrypt_one(
        &mut self,
        aead: &Aes256Gcm,
        hdr: [u8; HEADER_LEN],
        len: usize,
        c: &mut Chunker<'_>,
    ) {
        self.scratch.extend_from_slice(&hdr);
        let at = self.scratch.len();
        self.scratch.resize(at + len, 0);
        c.copy_into(&mut self.scratch[at..]);
        let tag = aead
            .encrypt_in_place_detached(&self.dir.nonce(), &hdr, &mut self.scratch[at..])
            .expect("AES-GCM encrypts any payload under 64 GiB");
        self.scratch.extend_from_slice(&tag);
    }
}

/// Opens the records one end receives, in order.
pub struct Opener {
    dir: Direction,
}

impl Opener {
    pub fn protection(&self) -> Protection {
        if self.dir.aead.is_some() {
            Protection::Encrypt
        } else {
            Protection::Mac
        }
    }

    /// Records opened so far (the count the next record must carry).
    pub fn opened(&self) -> u64 {
        self.dir.seq
    }

    /// Checks (and, encrypted, decrypts in place) one record: `rec` is its
    /// header, payload and tag. On success the payload is plaintext and
    /// the counter advances; on failure nothing may be used.
    pub fn open(&mut self, rec: &mut [u8]) -> Result<(), AuthError> {
        let forged = AuthError::Forged {
            seq: self.dir.seq,
            from: self.dir.from.name(),
        };
        if rec.len() < HEADER_LEN + TAG_LEN {
            return Err(forged);
        }
        let (body, tag) = rec.split_at_mut(rec.len() - TAG_LEN);
        let ok = match &self.dir.aead {
            Some(aead) => {
                let (hdr, payload) = body.split_at_mut(HEADER_LEN);
                aead.decrypt_in_place_detached(
                    &self.dir.nonce(),
                    hdr,
                    payload,
                    aes_gcm::Tag::from_slice(tag),
                )
                .is_ok()
            }
            None => {
                let mut h = self.dir.mac();
                h.update(body);
                tags_equal(&tag_of(&h), tag)
            }
        };
        if !ok {
            return Err(forged);
        }
        self.dir.seq += 1;
        Ok(())
    }

    /// The error for a record whose header is already unusable: under
    /// authentication any damage is reported as an authentication failure.
    pub fn forged(&self) -> AuthError {
        AuthError::Forged {
            seq: self.dir.seq,
            from: self.dir.from.name(),
        }
    }
}

#[cfg(test)]
#[path = "auth_tests.rs"]
mod tests;
