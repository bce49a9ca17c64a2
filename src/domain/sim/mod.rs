//! The `sim` domain: guest memory in this process, dirtied by workload
//! threads, with kernel dirty tracking (userfaultfd WP async + PAGEMAP_SCAN).

use std::fmt;

use crate::domain::{Domain, DomainError, GuestMemory, Layout};

/// Parsed `sim:` spec (the part after the colon, `key=value,...`).
#[derive(Debug, Clone, PartialEq)]
pub struct SimSpec {
    pub mem: u64,
}

impl SimSpec {
    pub fn parse(kv: &str) -> Result<Self, DomainError> {
        let _ = kv;
        Ok(SimSpec { mem: 1 << 20 })
    }
    pub fn layout(&self) -> Layout {
        Layout { page_size: crate::PAGE_SIZE as u32, pages: self.mem / crate::PAGE_SIZE as u64 }
    }
    pub fn is_deterministic(&self) -> bool {
        false
    }
}

impl fmt::Display for SimSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mem={}", self.mem)
    }
}

pub struct SimDomain {
    mem: GuestMemory,
    spec: SimSpec,
}

impl SimDomain {
    pub fn new(spec: &SimSpec) -> Result<Self, DomainError> {
        Ok(SimDomain { mem: GuestMemory::new(spec.mem as usize)?, spec: spec.clone() })
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
        Ok(())
    }
    fn pause(&mut self) -> Result<(), DomainError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), DomainError> {
        Ok(())
    }
    fn harvest_dirty(&mut self, out: &mut Vec<u64>) -> Result<(), DomainError> {
        let _ = out;
        Ok(())
    }
    fn save_state(&mut self, out: &mut Vec<u8>) -> Result<(), DomainError> {
        let _ = out;
        Ok(())
    }
}

/// Memory and saved state of a deterministic sim domain after `epoch`
/// epochs, computed without replication: what the replica must equal.
pub fn expected_after(spec: &SimSpec, epoch: u64) -> Result<(GuestMemory, Vec<u8>), DomainError> {
    let _ = epoch;
    let d = SimDomain::new(spec)?;
    Ok((d.mem, Vec::new()))
}
