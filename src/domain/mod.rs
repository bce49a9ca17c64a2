//! Domains: where the protected guest lives. The engine drives every backend
//! through the [`Domain`] trait and never knows which one it has.

pub mod kvm;
pub mod memory;
pub mod pagemap;
pub mod priority;
pub mod progress;
pub mod seen;
pub mod sim;
pub mod xen;

use std::fmt;
use std::time::Instant;

pub use memory::GuestMemory;
pub use progress::ProgressMark;

/// Guest-physical memory layout: one contiguous range of `pages` pages of
/// `page_size` bytes, named by guest frame number (gfn) `0..pages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub page_size: u32,
    pub pages: u64,
}

impl Layout {
    pub fn bytes(&self) -> u64 {
        self.pages * self.page_size as u64
    }
}

/// Errors of any domain backend.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error("invalid domain spec {spec:?}: {reason}")]
    Spec { spec: String, reason: String },
    #[error("mapping {bytes} bytes of guest memory failed: {source}")]
    Map {
        bytes: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("dirty tracking unavailable: {0}")]
    DirtyTracking(String),
    #[error("{op} failed: {source}")]
    Sys {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("workload thread failed: {0}")]
    Workload(String),
}

/// A running guest the engine can checkpoint.
///
/// Lifecycle: created paused with its initial memory and dirty tracking
/// armed (every page written after creation is reported by the first
/// [`Domain::harvest_dirty`]); [`Domain::start`] lets it run; then any number
/// of `pause` → `harvest_dirty` → `save_state` → `resume` cycles. The N-th
/// `pause` ends epoch N: `save_state` taken after it describes checkpoint N.
pub trait Domain: Send {
    fn layout(&self) -> Layout;
    /// Guest memory. Bytes change under the caller while the domain runs;
    /// they are stable between `pause` and `resume`.
    fn memory(&self) -> &GuestMemory;
    /// Spec string naming this domain, carried in the handshake.
    fn describe(&self) -> String;
    fn start(&mut self) -> Result<(), DomainError>;
    /// Returns once no guest write can happen until `resume`. In
    /// deterministic mode, first waits until the epoch's quota is done.
    fn pause(&mut self) -> Result<(), DomainError>;
    fn resume(&mut self) -> Result<(), DomainError>;
    /// Appends the gfns written since the previous harvest (sorted, unique)
    /// to `out` and re-arms tracking for them. Only called while paused.
    fn harvest_dirty(&mut self, out: &mut Vec<u64>) -> Result<(), DomainError>;
    /// The harvest split into stripes that several threads scan at once,
    /// when this backend's dirty log allows it: the stripes' outputs,
    /// concatenated in order, are exactly what `harvest_dirty` would have
    /// appended (and scanning them re-arms tracking alike). Same calling
    /// rules as `harvest_dirty`. Default: None (harvest on one thread).
    fn stripe_scan(&self) -> Option<pagemap::StripeScan> {
        None
    }
    /// Appends the pages that may be non-zero (ever written) to `out`,
    /// sorted, and returns true; or returns false if the backend cannot
    /// tell, and the initial copy reads every page. Called while running.
    fn present_pages(&self, out: &mut Vec<u64>) -> Result<bool, DomainError> {
        pagemap::present_pages(self.memory(), out)?;
        Ok(true)
    }
    /// Takes `pct` percent of the guest's run time away from now on (0:
    /// none), so it dirties memory more slowly; 100 stops it altogether
    /// until lowered (the pause budget's last resort while the pipeline
    /// has no room; the guest is not paused: no checkpoint is taken). A
    /// domain may take less than asked (sim: at most 95 % short of 100).
    /// Returns false when this domain cannot be throttled. Called while
    /// running or paused, never inside the pause's critical work.
    /// Default: cannot.
    fn throttle(&mut self, pct: u8) -> bool {
        let _ = pct;
        false
    }
    /// Page writes the guest made so far, counted by the domain itself
    /// (cheaply, while it runs): the pages written since some moment are at
    /// most the difference of two readings. Read by the epoch thread while
    /// the guest runs, to end an epoch whose dirty set reached the pause
    /// budget. None when the domain cannot count (kvm: the guest writes
    /// memory directly; its dirty log is read only by a harvest). Default:
    /// None.
    fn page_writes(&self) -> Option<u64> {
        None
    }
    /// The guest's own progress so far in its own units (sim: page
    /// writes), for throughput with and without protection; None when the
    /// domain cannot tell. Default: None.
    fn progress(&self) -> Option<u64> {
        None
    }
    /// [`Domain::progress`] with when it was reached and, where the guest
    /// runs on threads of its own (kvm: the vCPU), the CPU time they had
    /// used by then: rates between two marks are then exact (no partial
    /// loop counted) and can be told apart from the CPU the host scheduler
    /// happened to give the guest. Default: the count now, CPU unknown.
    fn progress_mark(&self) -> Option<ProgressMark> {
        self.progress().map(|count| ProgressMark {
            count,
            at: Instant::now(),
            cpu: None,
        })
    }
    /// Appends the saved non-memory state (vCPUs, devices) to `out`.
    /// Only called while paused.
    fn save_state(&mut self, out: &mut Vec<u8>) -> Result<(), DomainError>;
    /// Routes everything the guest sends to the outside world through the
    /// output queue `q` (output commit), from now on. Called by the
    /// primary before `start`. Every output source must produce only while
    /// the guest runs (never between `pause` and `resume`), so that the
    /// queue's epoch counter, advanced during the pause, tags it exactly.
    /// A domain that never calls this (the backup's activated domain, tests)
    /// sends its output straight out. Default: the domain has no output.
    fn attach_output(&mut self, q: &crate::outq::OutputQueue) -> Result<(), DomainError> {
        let _ = q;
        Ok(())
    }
    /// After activation on a new host: tells the network where the guest's
    /// addresses now live (gratuitous ARP), so switches and neighbours move
    /// their entries before the guest next speaks. Returns what was
    /// announced, for the log. Default: nothing to announce.
    fn announce(&mut self) -> Result<Vec<String>, DomainError> {
        Ok(Vec::new())
    }
    /// The domain's own disks (name, write log), replicated automatically
    /// when it is protected (see `crate::disk`). Default: none.
    fn disks(&self) -> Vec<(String, std::sync::Arc<crate::disk::WriteLog>)> {
        Vec::new()
    }
}

/// Splits a spec's `key=value,...` list (items trimmed, empty items
/// skipped), refusing an item without `=` and a key given twice. `keys`
/// lists the accepted keys for the error message.
pub fn spec_pairs<'a>(kv: &'a str, keys: &str) -> Result<Vec<(&'a str, &'a str)>, String> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for item in kv.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((key, value)) = item.split_once('=') else {
            return Err(format!("{item:?} is not key=value (keys: {keys})"));
        };
        let (key, value) = (key.trim(), value.trim());
        if out.iter().any(|(k, _)| *k == key) {
            return Err(format!("key {key} given twice"));
        }
        out.push((key, value));
    }
    Ok(out)
}

/// A parsed `--domain` argument: `KIND:key=value,...`.
#[derive(Debug, Clone, PartialEq)]
pub enum DomainSpec {
    Sim(sim::SimSpec),
    Kvm(kvm::KvmSpec),
    Xen(xen::XenSpec),
}

impl DomainSpec {
    pub fn parse(s: &str) -> Result<Self, DomainError> {
        let (kind, rest) = s.split_once(':').unwrap_or((s, ""));
        match kind {
            "sim" => Ok(DomainSpec::Sim(sim::SimSpec::parse(rest)?)),
            "kvm" => Ok(DomainSpec::Kvm(kvm::KvmSpec::parse(rest)?)),
            "xen" => Ok(DomainSpec::Xen(xen::XenSpec::parse(rest)?)),
            other => Err(DomainError::Spec {
                spec: s.to_string(),
                reason: format!("unknown domain kind {other:?} (known: sim, kvm, xen)"),
            }),
        }
    }

    /// Creates the domain, paused, with dirty tracking armed.
    pub fn open(&self) -> Result<Box<dyn Domain>, DomainError> {
        match self {
            DomainSpec::Sim(s) => Ok(Box::new(sim::SimDomain::new(s)?)),
            DomainSpec::Kvm(s) => Ok(Box::new(kvm::KvmDomain::new(s)?)),
            DomainSpec::Xen(s) => xen::open(s),
        }
    }

    pub fn layout(&self) -> Layout {
        match self {
            DomainSpec::Sim(s) => s.layout(),
            DomainSpec::Kvm(s) => s.layout(),
            DomainSpec::Xen(s) => s.layout(),
        }
    }

    /// The same spec with some `key=value` pairs replaced or added, e.g. a
    /// backup giving an activated guest its own console file or TAP device.
    /// Values may not contain `,` or `=`.
    pub fn with_overrides(&self, overrides: &str) -> Result<DomainSpec, DomainError> {
        let text = self.to_string();
        let (kind, rest) = text.split_once(':').unwrap_or((&text, ""));
        let split = |p: &str| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| DomainError::Spec {
                    spec: overrides.to_string(),
                    reason: format!("override {p:?} is not key=value"),
                })
        };
        let mut pairs: Vec<(String, String)> = rest
            .split(',')
            .filter(|p| !p.is_empty())
            .map(split)
            .collect::<Result<_, _>>()?;
        for o in overrides.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = split(o)?;
            match pairs.iter_mut().find(|(pk, _)| *pk == k) {
                Some(p) => p.1 = v,
                None => pairs.push((k, v)),
            }
        }
        let joined: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        DomainSpec::parse(&format!("{kind}:{}", joined.join(",")))
    }

    /// Rebuilds the domain from a checkpoint (memory image and saved
    /// state), paused; `start` resumes the guest where the checkpoint left it.
    pub fn restore(
        &self,
        memory: GuestMemory,
        state: &[u8],
    ) -> Result<Box<dyn Domain>, DomainError> {
        match self {
            DomainSpec::Sim(s) => Ok(Box::new(sim::SimDomain::restore(s, memory, state)?)),
            DomainSpec::Kvm(s) => {
                // SAFETY: the replica memory is ours alone until restored.
                let image = unsafe { memory.as_slice() };
                Ok(Box::new(kvm::KvmDomain::restore(s, image, state)?))
            }
            DomainSpec::Xen(s) => xen::restore(s, memory, state),
        }
    }
}

impl fmt::Display for DomainSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainSpec::Sim(s) => write!(f, "sim:{s}"),
            DomainSpec::Kvm(s) => write!(f, "kvm:{s}"),
            DomainSpec::Xen(s) => write!(f, "xen:{s}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_replace_and_add_keys() {
        let s = DomainSpec::parse("kvm:guest=memtouch,mem=16MiB").unwrap();
        let o = s.with_overrides("console=/tmp/x.log,seed=9").unwrap();
        let t = o.to_string();
        assert!(
            t.contains("console=/tmp/x.log") && t.contains("seed=9"),
            "{t}"
        );
        assert!(s.with_overrides("nonsense").is_err());
        assert!(s.with_overrides("nokey=1").is_err());
    }
}
