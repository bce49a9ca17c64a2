//! The `kvm` domain's spec: `kvm:guest=memtouch,mem=16MiB[,key=value...]`.
//!
//! Invariants of a parsed [`KvmSpec`] (checked by [`KvmSpec::parse`]):
//! - `guest` names an embedded guest image ([`super::guests`]).
//! - `mem` is a multiple of the page size, at most [`MAX_MEM`] (the boot
//!   params carry it as a u32), and holds the guest's layout: image, boot
//!   pages and every memtouch region ([`KvmSpec::min_mem`]).
//! - `regions` is in `1..=MAX_REGIONS` (one checksum page), `region_pages`
//!   and `touch` are at least 1, `seed` is non-zero.
//!
//! `Display` is canonical: every key in a fixed order, `console` last and
//! only when given, sizes in the largest exact binary unit, so
//! `parse(&s.to_string()) == s`.

use std::fmt;

use crate::domain::{DomainError, Layout};
use crate::PAGE_SIZE;

use super::boot::DATA_GPA;

/// Largest guest memory: the boot params describe memory with u32 fields
/// and 32-bit guests address at most 4 GiB.
pub const MAX_MEM: u64 = 3 << 30;
/// Regions whose checksums fit the one checksum page.
pub const MAX_REGIONS: u32 = (PAGE_SIZE / 4) as u32;

/// How memtouch picks regions and pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Regions round-robin, pages in order within the region.
    Sequential,
    /// Regions and pages drawn from the guest's xorshift RNG.
    Random,
    /// One word in each of `touch` consecutive pages per iteration,
    /// sweeping all regions: the most dirty pages per guest instruction.
    Sweep,
}

impl Pattern {
    /// The `CASTOR_PATTERN_*` code of guests/abi.h.
    pub fn code(self) -> u32 {
        match self {
            Pattern::Sequential => 0,
            Pattern::Random => 1,
            Pattern::Sweep => 2,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Pattern::Sequential => "sequential",
            Pattern::Random => "random",
            Pattern::Sweep => "sweep",
        }
    }
}

/// Which KVM interface tracks guest writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyKind {
    /// KVM_GET_DIRTY_LOG (+ KVM_CLEAR_DIRTY_LOG when available).
    Bitmap,
    /// KVM_CAP_DIRTY_LOG_RING.
    Ring,
}

/// Where console (serial) output goes besides the in-memory buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleSink {
    /// The VMM's standard error (`console=stderr`).
    Stderr,
    /// Appended to a file (`console=PATH`).
    File(String),
}

/// Parsed `kvm:` spec (the part after the colon).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmSpec {
    pub guest: String,
    /// Guest RAM in bytes, from guest-physical 0.
    pub mem: u64,
    /// memtouch: number of checksummed regions.
    pub regions: u32,
    /// memtouch: pages per region.
    pub region_pages: u32,
    /// memtouch: words written per iteration (one `seq` line); with
    /// `pattern=sweep` each lands in a different page.
    pub touch: u32,
    pub pattern: Pattern,
    pub seed: u32,
    pub dirty: DirtyKind,
    /// NIC backend: TAP interface name. `None`: the NIC has no backend
    /// (TX dropped and counted, RX always empty).
    pub tap: Option<String>,
    /// NIC MAC address; `None`: [`super::devices::DEFAULT_MAC`].
    pub mac: Option<[u8; 6]>,
    /// The guest's IPv4 address, passed in the boot params (0 when absent).
    pub ip: Option<std::net::Ipv4Addr>,
    /// An IPv6 address the guest owns: announced (unsolicited neighbour
    /// advertisement) when a backup activates it.
    pub ip6: Option<std::net::Ipv6Addr>,
    /// Block device image file; `None`: no disk (commands fail).
    pub disk: Option<String>,
    pub console: Option<ConsoleSink>,
}

pub const DEFAULT_MEM: u64 = 16 << 20;

impl Default for KvmSpec {
    fn default() -> Self {
        KvmSpec {
            guest: "memtouch".into(),
            mem: DEFAULT_MEM,
            regions: 64,
            region_pages: 4,
            touch: 8,
            pattern: Pattern::Random,
            seed: 1,
            dirty: DirtyKind::Bitmap,
            tap: None,
            mac: None,
            ip: None,
            ip6: None,
            disk: None,
            console: None,
        }
    }
}

const KEYS: &str =
    "guest, mem, regions, region_pages, touch, pattern, seed, dirty, tap, mac, ip, ip6, disk, console";

/// Parses `52:54:00:12:34:56` (a unicast MAC).
fn parse_mac(v: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = v.split(':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

impl KvmSpec {
    /// Parses `key=value,...`; missing keys take their defaults.
    pub fn parse(kv: &str) -> Result<Self, DomainError> {
        let err = |reason: String| DomainError::Spec {
            spec: format!("kvm:{kv}"),
            reason,
        };
        let mut s = KvmSpec::default();
        for (key, value) in crate::domain::spec_pairs(kv, KEYS).map_err(err)? {
            let bad = |form: &str| err(format!("{key}={value}: expected {form}"));
            let positive = |v: &str| v.parse::<u32>().ok().filter(|&n| n >= 1);
            match key {
                "guest" => {
                    if !super::guests::NAMES.contains(&value) {
                        return Err(bad(&format!(
                            "an embedded guest, one of {}",
                            super::guests::NAMES.join(", ")
                        )));
                    }
                    s.guest = value.to_string();
                }
                "mem" => {
                    s.mem = crate::units::parse_size(value)
                        .map_err(|_| bad("a size like 16MiB, 64M or a byte count"))?
                }
                "regions" => {
                    s.regions = positive(value)
                        .filter(|&n| n <= MAX_REGIONS)
                        .ok_or_else(|| bad(&format!("an integer in 1..={MAX_REGIONS}")))?
                }
                "region_pages" => {
                    s.region_pages =
                        positive(value).ok_or_else(|| bad("pages per region, an integer >= 1"))?
                }
                "touch" => {
                    s.touch = positive(value)
                        .ok_or_else(|| bad("words written per iteration, an integer >= 1"))?
                }
                "pattern" => {
                    s.pattern = match value {
                        "sequential" => Pattern::Sequential,
                        "random" => Pattern::Random,
                        "sweep" => Pattern::Sweep,
                        _ => return Err(bad("sequential, random or sweep")),
                    }
                }
                "seed" => s.seed = positive(value).ok_or_else(|| bad("a non-zero u32 seed"))?,
                "dirty" => {
                    s.dirty = match value {
                        "bitmap" => DirtyKind::Bitmap,
                        "ring" => DirtyKind::Ring,
                        _ => return Err(bad("bitmap or ring")),
                    }
                }
                "tap" => {
                    if value.is_empty() || value.len() > 15 {
                        return Err(bad("a TAP interface name of 1..=15 bytes"));
                    }
                    s.tap = Some(value.to_string());
                }
                "mac" => {
                    s.mac = Some(
                        parse_mac(value)
                            .ok_or_else(|| bad("a unicast MAC like 52:54:00:12:34:56"))?,
                    )
                }
                "ip" => {
                    s.ip = Some(
                        value
                            .parse()
                            .map_err(|_| bad("an IPv4 address like 10.200.0.2"))?,
                    )
                }
                "ip6" => {
                    let a: std::net::Ipv6Addr = value
                        .parse()
                        .map_err(|_| bad("a unicast IPv6 address like fd00:200::2"))?;
                    if a.is_multicast() || a.is_unspecified() {
                        return Err(bad("a unicast IPv6 address like fd00:200::2"));
                    }
                    s.ip6 = Some(a);
                }
                "disk" => {
                    if value.is_empty() {
                        return Err(bad("an image file path"));
                    }
                    s.disk = Some(value.to_string());
                }
                "console" => {
                    s.console = match value {
                        "" => return Err(bad("stderr or a file path")),
                        "stderr" => Some(ConsoleSink::Stderr),
                        path => Some(ConsoleSink::File(path.to_string())),
                    }
                }
                _ => {
                    return Err(err(format!(
                        "unknown key {key:?} in {key}={value} (keys: {KEYS})"
                    )))
                }
            }
        }
        if s.mem == 0 || s.mem % PAGE_SIZE as u64 != 0 || s.mem > MAX_MEM {
            return Err(err(format!(
                "mem={}: expected a non-zero multiple of {PAGE_SIZE} bytes, at most {}",
                s.mem,
                FmtSize(MAX_MEM)
            )));
        }
        if s.mem < s.min_mem() {
            return Err(err(format!(
                "mem={}: regions={} x region_pages={} need at least {} bytes of guest memory",
                FmtSize(s.mem),
                s.regions,
                s.region_pages,
                s.min_mem()
            )));
        }
        Ok(s)
    }

    /// Bytes the guest layout needs: everything below [`DATA_GPA`] plus the
    /// memtouch regions (saturating, so absurd sizes fail the check).
    pub fn min_mem(&self) -> u64 {
        (self.regions as u64)
            .saturating_mul(self.region_pages as u64)
            .saturating_mul(PAGE_SIZE as u64)
            .saturating_add(DATA_GPA)
    }

    pub fn layout(&self) -> Layout {
        Layout {
            page_size: PAGE_SIZE as u32,
            pages: self.mem / PAGE_SIZE as u64,
        }
    }
}

impl fmt::Display for KvmSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "guest={},mem={},regions={},region_pages={},touch={},pattern={},seed={},dirty={}",
            self.guest,
            FmtSize(self.mem),
            self.regions,
            self.region_pages,
            self.touch,
            self.pattern.name(),
            self.seed,
            match self.dirty {
                DirtyKind::Bitmap => "bitmap",
                DirtyKind::Ring => "ring",
            }
        )?;
        if let Some(t) = &self.tap {
            write!(f, ",tap={t}")?;
        }
        if let Some(m) = &self.mac {
            write!(
                f,
                ",mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                m[0], m[1], m[2], m[3], m[4], m[5]
            )?;
        }
        if let Some(ip) = &self.ip {
            write!(f, ",ip={ip}")?;
        }
        if let Some(ip) = &self.ip6 {
            write!(f, ",ip6={ip}")?;
        }
        if let Some(d) = &self.disk {
            write!(f, ",disk={d}")?;
        }
        match &self.console {
            None => Ok(()),
            Some(ConsoleSink::Stderr) => write!(f, ",console=stderr"),
            Some(ConsoleSink::File(p)) => write!(f, ",console={p}"),
        }
    }
}

/// A byte count in the largest binary unit that divides it exactly.
struct FmtSize(u64);

impl fmt::Display for FmtSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
            if self.0 != 0 && self.0 % (1u64 << shift) == 0 {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_round_trip() {
        let s = KvmSpec::parse("guest=memtouch,mem=16MiB").unwrap();
        assert_eq!(s, KvmSpec::default());
        for text in [
            "guest=memtouch,mem=16MiB,regions=64,region_pages=4,touch=8,pattern=random,seed=1,dirty=bitmap",
            "guest=memtouch,mem=32MiB,regions=3,region_pages=1,touch=1,pattern=sequential,seed=7,dirty=ring,console=/tmp/x.log",
            "guest=memtouch,mem=16MiB,regions=64,region_pages=4,touch=8,pattern=random,seed=1,dirty=bitmap,console=stderr",
            "guest=memtouch,mem=16MiB,regions=64,region_pages=4,touch=8,pattern=random,seed=1,dirty=bitmap,tap=castor0,mac=52:54:00:0a:bc:de,ip=10.200.0.2,disk=/tmp/d.img,console=stderr",
            "guest=counter,mem=16MiB,regions=64,region_pages=4,touch=8,pattern=random,seed=1,dirty=bitmap,ip=10.200.0.2,ip6=fd00:200::2",
        ] {
            let s = KvmSpec::parse(text).unwrap();
            assert_eq!(s.to_string(), text);
            assert_eq!(KvmSpec::parse(&s.to_string()).unwrap(), s);
        }
    }

    #[test]
    fn errors_name_key_and_value() {
        for (text, needle) in [
            ("guest=nope", "guest=nope"),
            ("mem=12Q", "mem=12Q"),
            ("mem=4097", "mem=4097"),
            ("regions=0", "regions=0"),
            ("regions=5000", "regions=5000"),
            ("pattern=zigzag", "pattern=zigzag"),
            ("dirty=pml", "dirty=pml"),
            ("bogus=1", "bogus"),
            ("mem=4MiB,regions=1024,region_pages=16", "mem=4MiB"),
            ("touch", "\"touch\""),
            ("seed=1,seed=2", "seed given twice"),
            ("tap=", "tap="),
            ("tap=waytoolonginterfacename", "tap=waytoolong"),
            ("mac=01:00:00:00:00:01", "mac=01:"),
            ("mac=52:54:00:12:34", "mac=52"),
            ("ip=10.0.0", "ip=10.0.0"),
            ("ip6=10.0.0.1", "ip6=10.0.0.1"),
            ("ip6=ff02::1", "ip6=ff02::1"),
            ("disk=", "disk="),
        ] {
            let e = KvmSpec::parse(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
