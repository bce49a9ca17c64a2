//! Randomised fault trials that can be replayed: a small xorshift whose
//! seed is printed, and taken from `$CASTOR_KILL_SEED` (or another
//! variable, [`Trials::seeded_from`]) when set.

/// The trials' random source.
pub struct Trials {
    state: u64,
    seed: u64,
}

impl Trials {
    /// Seeded from `$CASTOR_KILL_SEED`, else from the process id; prints
    /// the seed under `label` so a failing run can be replayed.
    pub fn seeded(label: &str) -> Trials {
        Self::seeded_from(label, "CASTOR_KILL_SEED")
    }

    /// [`Trials::seeded`] from the environment variable `var`.
    pub fn seeded_from(label: &str, var: &str) -> Trials {
        let seed = std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&s| s != 0) // xorshift's one fixed point
            .unwrap_or_else(|| (std::process::id() as u64 * 2654435761) | 1);
        eprintln!("{label} seed {seed} (set {var}={seed} to replay)");
        Trials { state: seed, seed }
    }

    /// The seed this source started from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The next value in `0..below` (`below` > 0).
    pub fn below(&mut self, below: u64) -> u64 {
        let s = &mut self.state;
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s % below
    }
}
