//! The heir record: which replica may become the live copy if the holder
//! of the arbiter dies.
//!
//! A backup's replica is only as new as the last epoch it acknowledged.
//! While the primary is protected that is enough: output waits for the
//! acks. But a primary that loses its backup runs on *unprotected* and
//! releases output at once; from then on the lost backup's replica is
//! older than what the world has seen. If that backup later wins the
//! arbiter (the primary's lease lapsed, its process died), activating it
//! would step time backwards for every client.
//!
//! So the live copy names its heir in the arbiter, under its own hold:
//! - [`Heir::Session`] when a protection session starts (before it holds
//!   any output), naming the session by the primary's handshake nonce;
//! - [`Heir::Nobody`] before it releases a single byte unprotected.
//!
//! A backup that wins the arbiter activates only if the record names its
//! own session (or there is no record: `--arbiter none`, or an arbiter
//! that never had a castor live copy). The record is written only while
//! the writer still holds the arbiter (etcd: a transaction comparing the
//! leader key's create revision; local: the writer holds the lock), and a
//! winner reads it after winning, when no earlier holder can change it.
//!
//! Invariant: a live copy never releases output unprotected before its
//! record says [`Heir::Nobody`]; when the record cannot be written it
//! self-fences instead (see [`name_while_held`]).

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::arbiter::etcd::{EtcdError, HeirKey};
use super::lease::{LeaseGate, Verdict};

/// How often [`name_while_held`] retries a record the arbiter could not
/// take (etcd briefly unreachable).
const RETRY: Duration = Duration::from_millis(50);

/// Who may activate if the arbiter's holder dies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heir {
    /// The backup of the protection session whose primary handshake nonce
    /// is this (lowercase hex).
    Session(String),
    /// No backup: the live copy runs unprotected, every replica is stale.
    Nobody,
}

impl Heir {
    /// The heir of the session whose primary nonce is `nonce`.
    pub fn session(nonce: &[u8]) -> Heir {
        Heir::Session(hex(nonce))
    }

    /// The record's text: `session HEX` or `nobody`.
    pub fn encode(&self) -> String {
        match self {
            Heir::Session(id) => format!("session {id}"),
            Heir::Nobody => "nobody".into(),
        }
    }

    /// Parses [`Heir::encode`]'s text; `None` for anything else.
    pub fn decode(s: &str) -> Option<Heir> {
        match s.trim().split_once(' ') {
            None if s.trim() == "nobody" => Some(Heir::Nobody),
            Some(("session", id))
                if !id.is_empty()
                    && id.len() <= 128
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) =>
            {
                Some(Heir::Session(id.to_string()))
            }
            _ => None,
        }
    }
}

/// Lowercase hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Why a backup that won the arbiter must not activate its replica.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Stale {
    #[error(
        "the primary ran on UNPROTECTED after losing this backup, so its clients have seen output \
         newer than this replica"
    )]
    PrimaryRanOn,
    #[error("a later protection session (primary nonce {newer}) replaced this backup's")]
    Replaced { newer: String },
}

/// Pure: may the backup of session `mine` activate, given the record
/// `recorded` it read after winning? No record: yes (nobody wrote one).
/// A backup that knows no session of its own (a replica saved before
/// sessions were recorded) may activate only when nothing says otherwise.
pub fn may_activate(mine: Option<&str>, recorded: Option<&Heir>) -> Result<(), Stale> {
    match (recorded, mine) {
        (None, _) => Ok(()),
        (Some(Heir::Nobody), _) => Err(Stale::PrimaryRanOn),
        (Some(Heir::Session(id)), Some(m)) if id == m => Ok(()),
        (Some(Heir::Session(id)), _) => Err(Stale::Replaced { newer: id.clone() }),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HeirError {
    #[error("writing the heir record {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the heir record {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the heir record {place} holds {content:?}, not `session HEX` or `nobody`")]
    Corrupt { place: String, content: String },
    #[error("the heir record {key} was not written: this copy no longer holds the arbiter")]
    NotHolder { key: String },
    #[error("heir record: {0}")]
    Etcd(#[from] EtcdError),
}

/// Where an arbiter keeps its heir record.
#[derive(Debug, Clone)]
pub enum HeirBook {
    /// `--arbiter none`: nothing is recorded, every backup may activate
    /// (Xen Remus's behaviour).
    Nowhere,
    /// `local:PATH`: the file `PATH.heir`, replaced atomically (write,
    /// fsync, rename, fsync the directory) by the lock's holder.
    File(PathBuf),
    /// `etcd:`: the key `KEY/heir`, put only while KEY is ours.
    Etcd(HeirKey),
}

impl HeirBook {
    /// Records `heir`, durably, if this copy still holds the arbiter.
    pub fn name(&self, heir: &Heir) -> Result<(), HeirError> {
        match self {
            HeirBook::Nowhere => Ok(()),
            HeirBook::File(path) => write_file(path, &heir.encode()),
            HeirBook::Etcd(k) => match k.put(&heir.encode())? {
                true => Ok(()),
                false => Err(HeirError::NotHolder { key: k.describe() }),
            },
        }
    }

    /// The record as it stands (`None`: never written).
    pub fn read(&self) -> Result<Option<Heir>, HeirError> {
        let (place, text) = match self {
            HeirBook::Nowhere => return Ok(None),
            HeirBook::File(path) => match std::fs::read_to_string(path) {
                Ok(t) => (path.display().to_string(), t),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(source) => {
                    return Err(HeirError::Read {
                        path: path.clone(),
                        source,
                    })
                }
            },
            HeirBook::Etcd(k) => match k.get()? {
                Some(t) => (k.describe(), t),
                None => return Ok(None),
            },
        };
        Heir::decode(&text).map(Some).ok_or(HeirError::Corrupt {
            place,
            content: text.chars().take(80).collect(),
        })
    }

    /// Whether anything is recorded at all (`none` records nothing).
    pub fn records(&self) -> bool {
        !matches!(self, HeirBook::Nowhere)
    }
}

/// Reads the record, retrying while the arbiter cannot be reached and
/// `gate` says this copy still holds it (a winner reads right after its
/// win, when a loaded etcd may answer slowly). An error means the record
/// is unknown: the caller must not act on a replica it may not own.
pub fn read_while_held(book: &HeirBook, gate: &LeaseGate) -> Result<Option<Heir>, HeirError> {
    loop {
        match book.read() {
            Err(HeirError::Etcd(e))
                if e.is_unreachable()
                    && gate.can_lapse()
                    && gate.may_proceed(Instant::now() + RETRY) == Verdict::Proceed =>
            {
                tracing::warn!("heir record: {e}; retrying while the lease holds");
                std::thread::sleep(RETRY);
            }
            r => return r,
        }
    }
}

/// Names `heir`, retrying while `gate` says the arbiter is still held
/// (etcd briefly unreachable). An error means the record may not stand,
/// and the caller must not release output that depends on it: it
/// self-fences.
pub fn name_while_held(book: &HeirBook, heir: &Heir, gate: &LeaseGate) -> Result<(), HeirError> {
    loop {
        match book.name(heir) {
            Ok(()) => return Ok(()),
            Err(e @ HeirError::NotHolder { .. }) => return Err(e),
            Err(e) => {
                if gate.may_proceed(Instant::now() + RETRY) == Verdict::Fence || !gate.can_lapse() {
                    return Err(e);
                }
                tracing::warn!("heir record: {e}; retrying while the lease holds");
                std::thread::sleep(RETRY);
            }
        }
    }
}

fn write_file(path: &PathBuf, text: &str) -> Result<(), HeirError> {
    let err = |source| HeirError::Write {
        path: path.clone(),
        source,
    };
    let tmp = path.with_extension("heir.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(format!("{text}\n").as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_hostile_text_is_refused() {
        for h in [Heir::session(&[0xab, 0x01, 0xff]), Heir::Nobody] {
            assert_eq!(Heir::decode(&h.encode()), Some(h.clone()));
            assert_eq!(Heir::decode(&format!("{}\n", h.encode())), Some(h));
        }
        for bad in [
            "",
            "session",
            "session ",
            "session AB",
            "session xyz",
            "nobody else",
            "Nobody",
            &format!("session {}", "a".repeat(129)),
        ] {
            assert_eq!(Heir::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_the_named_session_may_activate() {
        let mine = Heir::session(&[1, 2]);
        let Heir::Session(id) = &mine else { panic!() };
        assert_eq!(may_activate(Some(id), Some(&mine)), Ok(()));
        assert_eq!(may_activate(Some(id), None), Ok(()));
        assert_eq!(may_activate(None, None), Ok(()));
        assert_eq!(
            may_activate(Some(id), Some(&Heir::Nobody)),
            Err(Stale::PrimaryRanOn)
        );
        assert_eq!(
            may_activate(Some(id), Some(&Heir::session(&[9]))),
            Err(Stale::Replaced { newer: "09".into() })
        );
        assert_eq!(
            may_activate(None, Some(&mine)),
            Err(Stale::Replaced {
                newer: "0102".into()
            })
        );
    }

    #[test]
    fn a_file_book_replaces_its_record_whole() {
        let dir = tempfile::tempdir().unwrap();
        let book = HeirBook::File(dir.path().join("pair.lock.heir"));
        assert_eq!(book.read().unwrap(), None);
        book.name(&Heir::session(&[7; 32])).unwrap();
        assert_eq!(book.read().unwrap(), Some(Heir::session(&[7; 32])));
        book.name(&Heir::Nobody).unwrap();
        assert_eq!(book.read().unwrap(), Some(Heir::Nobody));
        std::fs::write(dir.path().join("pair.lock.heir"), "garbage").unwrap();
        assert!(matches!(book.read(), Err(HeirError::Corrupt { .. })));
        assert_eq!(HeirBook::Nowhere.read().unwrap(), None);
        HeirBook::Nowhere.name(&Heir::Nobody).unwrap();
    }

    #[test]
    fn an_unwritable_record_is_an_error_at_once_without_a_lease() {
        let book = HeirBook::File(PathBuf::from("/proc/castor-no-such-dir/x.heir"));
        let gate = LeaseGate::new(None, Duration::ZERO);
        assert!(matches!(
            name_while_held(&book, &Heir::Nobody, &gate),
            Err(HeirError::Write { .. })
        ));
    }
}
