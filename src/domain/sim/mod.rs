//! The `sim` domain: guest memory in this process, dirtied by workload
//! threads, with kernel dirty tracking (userfaultfd WP async + PAGEMAP_SCAN).
//!
//! Pieces, one file each: [`spec`] (the `sim:key=value,...` spec),
//! `control` (the control block in page 0 holding all workload state),
//! `workload` (what one page write does), `runner` (threads and the pause
//! barrier), [`dirty`] (kernel dirty tracking), `rng` (SplitMix64).
//!
//! Invariants:
//! - Creation builds the initial memory (prefill + control block) as a pure
//!   function of the spec, then arms dirty tracking: the first harvest
//!   reports exactly the pages written since.
//! - All workload state lives in guest memory (page 0); the domain's own
//!   fields are only the epoch counter and handles. A replica of the memory
//!   plus the spec could continue the workload.
//! - Epoch N runs from the (N-1)-th `resume` (or `start`) to the N-th
//!   `pause`. In deterministic mode (`writes=`), memory and saved state
//!   after epoch N are a pure function of (spec, N), and
//!   [`expected_after`] computes them without threads.

mod control;
pub mod counter;
pub mod dirty;
pub mod disk;
mod rng;
mod runner;
pub mod spec;
mod workload;
mod zerofill;

use std::sync::Arc;

use crate::domain::{Domain, DomainError, GuestMemory, Layout};

pub use dirty::DirtyTracker;
pub use spec::{Pace, SimSpec, WorkloadKind};

use runner::Workers;
use workload::Plan;

/// Magic and version of the saved-state record.
pub const STATE_MAGIC: [u8; 8] = *b"SIMST001";

/// A `sim` domain: memory, workload threads and a dirty tracker.
pub struct SimDomain {
    spec: SimSpec,
    plan: Arc<Plan>,
    /// Declared before `mem` and `tracker`: threads stop before the rest drops.
    workers: Option<Workers>,
    /// The counter service (`counter=ADDR`), while started.
    counter: Option<counter::Counter>,
    /// The counter service bound by `attach_output`, until `start`.
    prepared: Option<counter::Prepared>,
    tracker: DirtyTracker,
    mem: Arc<GuestMemory>,
    /// The disk the workload writes, if the spec has one.
    disk: Option<Arc<crate::disk::WriteLog>>,
    /// Epochs started: 0 before `start`, N while running or paused in epoch N.
    epoch: u64,
    running: bool,
    /// The synthetic output source's queue handle (`out=`, `phase=`).
    output: Option<crate::outq::OutputHandle>,
}

impl SimDomain {
    /// Creates the domain paused, with its initial memory and dirty
    /// tracking armed.
    pub fn new(spec: &SimSpec) -> Result<Self, DomainError> {
        let mem = initial_memory(spec)?;
        let tracker = DirtyTracker::new(&mem)?;
        Ok(SimDomain {
            spec: spec.clone(),
            plan: Arc::new(Plan::new(spec)),
            workers: None,
            counter: None,
            prepared: None,
            tracker,
            mem: Arc::new(mem),
            disk: open_disk(spec, true)?,
            epoch: 0,
            running: false,
            output: None,
        })
    }

    /// Rebuilds a domain from a checkpoint: `memory` is the replica image
    /// (adopted, not copied) and `state` its saved state. The domain is
    /// paused at the checkpoint's epoch; `start` continues with the next
    /// one. Workload threads resume from their state in guest memory.
    pub fn restore(spec: &SimSpec, memory: GuestMemory, state: &[u8]) -> Result<Self, DomainError> {
        let (epoch, mut saved) = decode_state(state)?;
        // The disk may live elsewhere on the restoring host (`--override`).
        if let (Some(s), Some(d)) = (saved.disk.as_mut(), spec.disk.as_ref()) {
            s.path.clone_from(&d.path);
        }
        if saved != *spec {
            return Err(DomainError::Spec {
                spec: spec.to_string(),
                reason: format!("the checkpoint was taken of a different domain: sim:{saved}"),
            });
        }
        if memory.len() as u64 != spec.mem {
            return Err(DomainError::Spec {
                spec: spec.to_string(),
                reason: format!(
                    "memory image of {} bytes, the spec says {}",
                    memory.len(),
                    spec.mem
                ),
            });
        }
        let tracker = DirtyTracker::new(&memory)?;
        Ok(SimDomain {
            spec: spec.clone(),
            plan: Arc::new(Plan::new(spec)),
            workers: None,
            counter: None,
            prepared: None,
            tracker,
            mem: Arc::new(memory),
            disk: open_disk(spec, false)?,
            epoch,
            running: false,
            output: None,
        })
    }

    pub fn spec(&self) -> &SimSpec {
        &self.spec
    }

    /// The current epoch: 0 before `start`, else the epoch running or just
    /// ended by `pause`.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

impl Domain for SimDomain {
    fn layout(&self) -> Layout {
        self.spec.layout()
    }

    fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    fn describe(&self) -> String {
        format!("sim:{}", self.spec)
    }

    fn start(&mut self) -> Result<(), DomainError> {
        if self.workers.is_some() {
            return Err(DomainError::Workload("start called twice".into()));
        }
        let det = self.spec.is_deterministic();
        let next = self.epoch + 1;
        let disk = match (&self.disk, &self.spec.disk) {
            (Some(log), Some(d)) => Some(runner::DiskWork {
                log: log.clone(),
                seed: self.spec.seed,
                writes: d.writes,
            }),
            _ => None,
        };
        self.workers = Some(Workers::start(
            self.mem.clone(),
            self.plan.clone(),
            det,
            next,
            disk,
            self.output.clone(),
        )?);
        if let Some(addr) = self.spec.counter {
            let p = match self.prepared.take() {
                Some(p) => p,
                None => counter::Prepared::bind(addr, None)?,
            };
            self.counter = Some(p.start(&self.mem)?);
        }
        self.epoch = next;
        self.running = true;
        Ok(())
    }

    /// Idempotent: pausing a paused (or not yet started) domain does nothing.
    fn pause(&mut self) -> Result<(), DomainError> {
        if let (true, Some(w)) = (self.running, &self.workers) {
            w.pause()?;
            if let Some(c) = &self.counter {
                c.pause();
            }
            self.running = false;
        }
        Ok(())
    }

    /// Starts the next epoch; before `start` it is `start`, and resuming a
    /// running domain does nothing.
    fn resume(&mut self) -> Result<(), DomainError> {
        match (&self.workers, self.running) {
            (None, _) => self.start(),
            (Some(_), true) => Ok(()),
            (Some(w), false) => {
                if let Some(c) = &self.counter {
                    c.resume();
                }
                w.resume()?;
                self.epoch += 1;
                self.running = true;
                Ok(())
            }
        }
    }

    fn harvest_dirty(&mut self, out: &mut Vec<u64>) -> Result<(), DomainError> {
        self.tracker.harvest(out)
    }

    /// From the tracker's page tables and history, not from the workload's
    /// plan: see [`DirtyTracker::holds_data`] (the plain `PAGEMAP_SCAN`
    /// present set would count every never-written page, whose
    /// write-protect marker the kernel reports as swapped).
    fn present_pages(&self, out: &mut Vec<u64>) -> Result<bool, DomainError> {
        self.tracker.holds_data(out)?;
        Ok(true)
    }

    fn stripe_scan(&self) -> Option<crate::domain::pagemap::StripeScan> {
        Some(self.tracker.stripe_scan())
    }

    fn throttle(&mut self, pct: u8) -> bool {
        match &self.workers {
            Some(w) if !self.spec.is_deterministic() => {
                w.set_throttle(pct);
                true
            }
            _ => false,
        }
    }

    fn progress(&self) -> Option<u64> {
        Some(self.workers.as_ref().map_or(0, Workers::progress))
    }

    /// Timed workloads count every page write (one page per step, plus
    /// each thread's control-block slot, a page per thread); deterministic
    /// ones do not count, so they have no pause budget (their epochs are
    /// fixed quotas anyway).
    fn page_writes(&self) -> Option<u64> {
        if self.spec.is_deterministic() {
            return None;
        }
        Some(self.workers.as_ref().map_or(0, Workers::progress))
    }

    fn disks(&self) -> Vec<(String, Arc<crate::disk::WriteLog>)> {
        self.disk
            .iter()
            .map(|l| (disk::SIM_DISK.to_string(), l.clone()))
            .collect()
    }

    /// The synthetic output source (`out=N`: a 64-byte frame per N page
    /// writes of each thread; `phase=`: per phase) emits into `q`, to a
    /// destination that drops released frames: what is measured is the
    /// queue's release delay. Workload threads emit only while running and
    /// are parked during a pause, so the queue's epoch tags them exactly.
    /// (Threads started before this call keep emitting nothing.)
    fn attach_output(&mut self, q: &crate::outq::OutputQueue) -> Result<(), DomainError> {
        if self.spec.out > 0 || self.spec.phase_ms > 0 {
            self.output = Some(q.handle(Box::new(NullEgress)));
        }
        // The counter service's replies go through `q` too.
        if let Some(addr) = self.spec.counter {
            self.prepared = Some(counter::Prepared::bind(addr, Some(q))?);
        }
        Ok(())
    }

    fn save_state(&mut self, out: &mut Vec<u8>) -> Result<(), DomainError> {
        encode_state(&self.spec, self.epoch, out);
        Ok(())
    }
}

/// Where the synthetic output goes once released: nowhere.
struct NullEgress;

impl crate::outq::Egress for NullEgress {
    fn release(&mut self, _frame: &[u8]) {}
}

/// The saved-state record: magic `SIMST001`, epoch (u64 LE), canonical
/// spec length (u32 LE) and bytes. Workload state itself is in memory.
fn encode_state(spec: &SimSpec, epoch: u64, out: &mut Vec<u8>) {
    let text = spec.to_string();
    out.extend_from_slice(&STATE_MAGIC);
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(&(text.len() as u32).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// Decodes a record written by `save_state`: (epoch, spec).
pub fn decode_state(bytes: &[u8]) -> Result<(u64, SimSpec), DomainError> {
    let bad = |reason: &str| DomainError::Spec {
        spec: format!("{} bytes of sim saved state", bytes.len()),
        reason: reason.to_string(),
    };
    if bytes.len() < 20 || bytes[..8] != STATE_MAGIC {
        return Err(bad("not a SIMST001 record"));
    }
    let epoch = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let len = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes")) as usize;
    let text = bytes
        .get(20..)
        .filter(|t| t.len() == len)
        .and_then(|t| std::str::from_utf8(t).ok())
        .ok_or_else(|| bad("spec length or encoding does not match the record"))?;
    Ok((epoch, SimSpec::parse(text)?))
}

/// The spec's disk: created all-zero for a new domain, opened as it is
/// (the replica's disk) for a restored one.
fn open_disk(
    spec: &SimSpec,
    fresh: bool,
) -> Result<Option<Arc<crate::disk::WriteLog>>, DomainError> {
    let Some(d) = &spec.disk else {
        return Ok(None);
    };
    let path = std::path::Path::new(&d.path);
    let bad = |reason: String| DomainError::Spec {
        spec: spec.to_string(),
        reason,
    };
    let img = if fresh {
        crate::disk::DiskImage::create(path, d.size)
    } else {
        crate::disk::DiskImage::open(path)
    }
    .map_err(|e| bad(e.to_string()))?;
    if img.size() != d.size {
        return Err(bad(format!(
            "disk {} has {} bytes, the spec says disk_size={}",
            d.path,
            img.size(),
            d.size
        )));
    }
    Ok(Some(Arc::new(crate::disk::WriteLog::new(
        img,
        Arc::new(crate::disk::Fence::open()),
        crate::disk::LogConfig::default(),
    ))))
}

fn initial_memory(spec: &SimSpec) -> Result<GuestMemory, DomainError> {
    let len = usize::try_from(spec.mem).map_err(|_| DomainError::Spec {
        spec: spec.to_string(),
        reason: format!("mem={} does not fit this host's address space", spec.mem),
    })?;
    let mem = GuestMemory::new(len)?;
    workload::build_initial(&mem, spec);
    Ok(mem)
}

/// Memory and saved state of a deterministic sim domain after `epoch`
/// epochs, computed without replication: what the replica must equal.
pub fn expected_after(spec: &SimSpec, epoch: u64) -> Result<(GuestMemory, Vec<u8>), DomainError> {
    if !spec.is_deterministic() {
        return Err(DomainError::Spec {
            spec: spec.to_string(),
            reason: "expected_after needs the deterministic mode: give writes=N \
                     (page writes per epoch) instead of rate"
                .into(),
        });
    }
    let mem = initial_memory(spec)?;
    workload::run_epochs(&mem, &Plan::new(spec), 1, epoch);
    let mut state = Vec::new();
    encode_state(spec, epoch, &mut state);
    Ok((mem, state))
}

#[cfg(test)]
mod tests;
