//! Digest of a domain image: what "replica equals primary" means.
//!
//! `digest = BLAKE3("castor-digest-v1" ‖ len(memory) ‖ memory ‖ len(state) ‖ state)`
//! with lengths as u64 little-endian. Memory and saved state are both
//! covered, so a replica with the right pages but stale vCPU/device state
//! does not match.
//!
//! A domain with disks (`crate::disk`) extends it: after the state, for each
//! disk in name order, `"disk" ‖ len(name) ‖ name ‖ len(bytes) ‖ bytes`. With
//! no disks the digest is the one above.

use std::fmt;

use crate::domain::{DomainError, DomainSpec};

#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(memory: &[u8], state: &[u8]) -> Digest {
        Digest(*Self::hasher(memory, state).finalize().as_bytes())
    }

    /// The digest of memory, state and disks (`(name, bytes)`, any order).
    pub fn with_disks(memory: &[u8], state: &[u8], disks: &[(&str, &[u8])]) -> Digest {
        let mut h = Self::hasher(memory, state);
        let mut sorted: Vec<_> = disks.to_vec();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        for (name, bytes) in sorted {
            add_disk(&mut h, name, bytes.len() as u64);
            h.update(bytes);
        }
        Digest(*h.finalize().as_bytes())
    }

    /// The digest of memory, state and disk image files (`(name, path)`,
    /// any order), streamed from the files.
    pub fn with_disk_files(
        memory: &[u8],
        state: &[u8],
        disks: &[(String, std::path::PathBuf)],
    ) -> std::io::Result<Digest> {
        let mut h = Self::hasher(memory, state);
        let mut sorted: Vec<_> = disks.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, path) in sorted {
            let f = std::fs::File::open(path)?;
            add_disk(&mut h, name, f.metadata()?.len());
            std::io::copy(&mut std::io::BufReader::with_capacity(1 << 20, f), &mut h)?;
        }
        Ok(Digest(*h.finalize().as_bytes()))
    }

    fn hasher(memory: &[u8], state: &[u8]) -> blake3::Hasher {
        let mut h = blake3::Hasher::new();
        h.update(b"castor-digest-v1");
        h.update(&(memory.len() as u64).to_le_bytes());
        h.update(memory);
        h.update(&(state.len() as u64).to_le_bytes());
        h.update(state);
        h
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(s: &str) -> Option<Digest> {
        if s.len() != 64 {
            return None;
        }
        let mut d = [0u8; 32];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let hex = std::str::from_utf8(chunk).ok()?;
            d[i] = u8::from_str_radix(hex, 16).ok()?;
        }
        Some(Digest(d))
    }
}

fn add_disk(h: &mut blake3::Hasher, name: &str, len: u64) {
    h.update(b"disk");
    h.update(&(name.len() as u64).to_le_bytes());
    h.update(name.as_bytes());
    h.update(&len.to_le_bytes());
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

/// What the replica of a deterministic sim domain must hold after `epoch`
/// epochs (`castor digest --domain SPEC --at-epoch N`), computed without
/// replication. A kvm guest is not deterministic: no such digest exists.
pub fn expected(spec: &DomainSpec, epoch: u64) -> Result<Digest, DomainError> {
    match spec {
        DomainSpec::Sim(s) => {
            let (mem, state) = crate::domain::sim::expected_after(s, epoch)?;
            // SAFETY: `mem` is a private image nobody else writes.
            let mem = unsafe { mem.as_slice() };
            Ok(match &s.disk {
                None => Digest::of(mem, &state),
                Some(d) => {
                    use crate::domain::sim::disk::{expected_disk, SIM_DISK};
                    let disk = expected_disk(s.seed, d.size, d.writes, epoch);
                    Digest::with_disks(mem, &state, &[(SIM_DISK, &disk)])
                }
            })
        }
        DomainSpec::Kvm(_) | DomainSpec::Xen(_) => Err(DomainError::Spec {
            spec: spec.to_string(),
            reason: "a kvm or xen guest is not deterministic: no expected digest exists \
                     (use a sim domain with writes=N)"
                .into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_state_matters() {
        let a = Digest::of(&[1, 2, 3], b"s1");
        assert_eq!(Digest::from_hex(&a.to_hex()), Some(a));
        assert_ne!(a, Digest::of(&[1, 2, 3], b"s2"));
        // Moving a byte between memory and state changes the digest.
        assert_ne!(Digest::of(&[1, 2], &[3]), Digest::of(&[1], &[2, 3]));
        assert_eq!(Digest::from_hex("zz"), None);
    }

    #[test]
    fn disks_are_covered_and_files_hash_like_bytes() {
        let (m, s) = (&[1u8, 2][..], &b"st"[..]);
        assert_eq!(Digest::with_disks(m, s, &[]), Digest::of(m, s));
        let a = Digest::with_disks(m, s, &[("a", &[0, 1]), ("b", &[2])]);
        assert_eq!(
            a,
            Digest::with_disks(m, s, &[("b", &[2]), ("a", &[0, 1])]),
            "name order"
        );
        assert_ne!(a, Digest::with_disks(m, s, &[("a", &[0, 1]), ("b", &[3])]));
        assert_ne!(a, Digest::with_disks(m, s, &[("a", &[0]), ("b", &[1, 2])]));
        let dir = tempfile::tempdir().unwrap();
        let (pa, pb) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&pa, [0, 1]).unwrap();
        std::fs::write(&pb, [2]).unwrap();
        let files = [("b".to_string(), pb), ("a".to_string(), pa)];
        assert_eq!(Digest::with_disk_files(m, s, &files).unwrap(), a);
    }
}
