//! Randomised fault trials that can be replayed: a small xorshift whose
//! seed is printed, and taken from `$CASTOR_KILL_SEED` when set.

/// The trials' random source.
pub struct Trials(u64);

impl Trials {
    /// Seeded from `$CASTOR_KILL_SEED`, else from the process id; prints
    /// the seed under `label` so a failing run can be replayed.
    pub fn seeded(label: &str) -> Trials {
        let seed = std::env::var("CASTOR_KILL_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| (std::process::id() as u64 * 2654435761) | 1);
        eprintln!("{label} seed {seed} (set CASTOR_KILL_SEED to replay)");
        Trials(seed)
    }

    /// The next value in `0..below` (`below` > 0).
    pub fn below(&mut self, below: u64) -> u64 {
        let s = &mut self.0;
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s % below
    }
}
