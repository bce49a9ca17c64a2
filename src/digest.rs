//! Digest of a domain image: what "replica equals primary" means.
//!
//! `digest = BLAKE3("castor-digest-v1" ‖ len(memory) ‖ memory ‖ len(state) ‖ state)`
//! with lengths as u64 little-endian. Memory and saved state are both
//! covered, so a replica with the right pages but stale vCPU/device state
//! does not match.

use std::fmt;

use crate::domain::{DomainError, DomainSpec};

#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(memory: &[u8], state: &[u8]) -> Digest {
        let mut h = blake3::Hasher::new();
        h.update(b"castor-digest-v1");
        h.update(&(memory.len() as u64).to_le_bytes());
        h.update(memory);
        h.update(&(state.len() as u64).to_le_bytes());
        h.update(state);
        Digest(*h.finalize().as_bytes())
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
            Ok(Digest::of(unsafe { mem.as_slice() }, &state))
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
}
