//! A diagnostic for log-dirty itself (`CASTOR_XEN_CHECK_UNLOGGED=1`): keeps
//! a full copy of guest memory and, at every harvest inside a pause,
//! reports the pages whose bytes changed since the previous one although
//! no harvest in between reported them. Those are writes log-dirty missed
//! (the hypervisor writing guest pages through its own mappings, or an
//! emulated CPU's stale TLB), which a replica would lack.
//!
//! Costs a second copy of guest memory and a full compare per epoch: for
//! the lab, never for production.

use crate::domain::GuestMemory;
use crate::PAGE_SIZE;

pub struct Unlogged {
    copy: Vec<u8>,
    /// Pages some harvest reported since the last check.
    reported: Vec<bool>,
    checks: u64,
}

impl Unlogged {
    /// Enabled by `CASTOR_XEN_CHECK_UNLOGGED=1`; takes the first copy (call
    /// with the guest stopped).
    pub fn from_env(mem: &GuestMemory) -> Option<Unlogged> {
        if std::env::var("CASTOR_XEN_CHECK_UNLOGGED").as_deref() != Ok("1") {
            return None;
        }
        // SAFETY: the guest is stopped while the domain is opened.
        let copy = unsafe { mem.as_slice() }.to_vec();
        let pages = copy.len() / PAGE_SIZE;
        eprintln!("castor: xen: checking log-dirty against a full copy of {pages} pages");
        Some(Unlogged {
            copy,
            reported: vec![false; pages],
            checks: 0,
        })
    }

    pub fn reported(&mut self, gfns: &[u64]) {
        for &g in gfns {
            if let Some(r) = self.reported.get_mut(g as usize) {
                *r = true;
            }
        }
    }

    /// With the guest stopped: prints the pages changed but never reported
    /// since the last check, then starts the next interval.
    pub fn check(&mut self, mem: &GuestMemory) {
        // SAFETY: called only while the guest is stopped.
        let now = unsafe { mem.as_slice() };
        let mut missed = Vec::new();
        for (g, (a, b)) in now
            .chunks_exact(PAGE_SIZE)
            .zip(self.copy.chunks_exact_mut(PAGE_SIZE))
            .enumerate()
        {
            if a != b {
                if !self.reported[g] {
                    missed.push(g);
                }
                b.copy_from_slice(a);
            }
        }
        self.reported.fill(false);
        self.checks += 1;
        if !missed.is_empty() {
            let show: Vec<String> = missed.iter().take(16).map(|g| format!("{g:#x}")).collect();
            eprintln!(
                "castor: xen check {}: {} pages changed without being logged: {}",
                self.checks,
                missed.len(),
                show.join(" ")
            );
        }
    }
}
