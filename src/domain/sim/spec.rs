//! The `sim` domain's spec: `key=value,...` after the `sim:` prefix.
//!
//! Invariants of a parsed [`SimSpec`] (checked by [`SimSpec::parse`], relied
//! on by the rest of the domain):
//! - `mem` is a multiple of the page size and holds at least [`MIN_PAGES`]
//!   pages; page 0 is the control block, pages `1..` are data.
//! - `1 <= threads <= MAX_THREADS` and every thread owns at least one data
//!   page.
//! - `fill` is in `[0, 1]`, `hot` in `(0, 1]`, `edit` in `1..=PAGE_SIZE`.
//! - The pace is either timed (`rate`, writes per second, 0 = unpaced) or
//!   deterministic (`writes` per epoch), never both.
//!
//! [`SimSpec`]'s `Display` is canonical: every key, in a fixed order, with
//! sizes in the largest exact binary unit, so `parse(&s.to_string()) == s`.

use std::fmt;
use std::str::FromStr;

use crate::domain::{DomainError, Layout};
use crate::PAGE_SIZE;

/// Smallest guest: the control block page plus a few data pages.
pub const MIN_PAGES: u64 = 4;
/// Workload threads the control block has slots for (see `control`).
pub const MAX_THREADS: u32 = 63;

pub const DEFAULT_MEM: u64 = 64 << 20;
pub const DEFAULT_RATE: u64 = 200_000;
pub const DEFAULT_SEED: u64 = 0x00ca_5704_5eed;
pub const DEFAULT_FILL: f64 = 0.25;
pub const DEFAULT_HOT: f64 = 0.05;
pub const DEFAULT_EDIT: u32 = 32;

/// What the workload threads write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    /// Full rewrites of uniformly random pages with text-like content.
    Uniform,
    /// Like `Uniform`, but 90% of writes land in a hot set of `hot` pages.
    HotCold,
    /// Full rewrites sweeping each thread's pages in order, wrapping.
    Sequential,
    /// Small `edit`-byte text edits at random offsets of random pages.
    Edits,
    /// Zero-fills of random pages.
    Zero,
    /// Full rewrites of random pages with random bytes.
    Incompressible,
    /// A mixture: mostly edits, some rewrites, zero and random pages, with
    /// hot/cold page choice.
    Mixed,
}

impl WorkloadKind {
    pub const ALL: [WorkloadKind; 7] = [
        WorkloadKind::Uniform,
        WorkloadKind::HotCold,
        WorkloadKind::Sequential,
        WorkloadKind::Edits,
        WorkloadKind::Zero,
        WorkloadKind::Incompressible,
        WorkloadKind::Mixed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Uniform => "uniform",
            WorkloadKind::HotCold => "hotcold",
            WorkloadKind::Sequential => "sequential",
            WorkloadKind::Edits => "edits",
            WorkloadKind::Zero => "zero",
            WorkloadKind::Incompressible => "incompressible",
            WorkloadKind::Mixed => "mixed",
        }
    }

    /// Stable numeric code recorded in the control block header.
    pub fn code(self) -> u64 {
        WorkloadKind::ALL
            .iter()
            .position(|&k| k == self)
            .unwrap_or(0) as u64
            + 1
    }
}

impl FromStr for WorkloadKind {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        WorkloadKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or(())
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How fast the workload writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// `rate` page writes per second in total (0: as fast as possible).
    Timed { rate: u64 },
    /// Exactly `writes` page writes per epoch in total, then wait.
    Deterministic { writes: u64 },
}

/// Parsed `sim:` spec (the part after the colon, `key=value,...`).
#[derive(Debug, Clone, PartialEq)]
pub struct SimSpec {
    /// Guest memory size in bytes.
    pub mem: u64,
    pub workload: WorkloadKind,
    pub pace: Pace,
    pub seed: u64,
    pub threads: u32,
    /// Fraction of data pages prefilled with text at creation.
    pub fill: f64,
    /// Hot-set fraction of each thread's pages (hotcold, mixed).
    pub hot: f64,
    /// Bytes per small edit (edits, mixed).
    pub edit: u32,
    /// The guest's UDP counter service (`counter=ADDR`, see `counter`).
    pub counter: Option<std::net::SocketAddr>,
    /// Optional disk workload (see `super::disk`).
    pub disk: Option<SimDisk>,
    /// Synthetic output: one frame per this many page writes of a thread,
    /// through the output queue (0: no output; timed mode only).
    pub out: u64,
    /// Phased pacing (timed mode): the workload cycles through quiet,
    /// write-heavy and output-heavy phases of this many ms each (0: off).
    /// See `runner::Phase`.
    pub phase_ms: u64,
}

/// `disk=PATH,disk_size=S,disk_writes=N`: an image at PATH of S bytes,
/// written with N 4 KiB blocks per epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimDisk {
    pub path: String,
    pub size: u64,
    pub writes: u64,
}

pub const DEFAULT_DISK_SIZE: u64 = 16 << 20;
pub const DEFAULT_DISK_WRITES: u64 = 16;

impl Default for SimSpec {
    fn default() -> Self {
        SimSpec {
            mem: DEFAULT_MEM,
            workload: WorkloadKind::Uniform,
            pace: Pace::Timed { rate: DEFAULT_RATE },
            seed: DEFAULT_SEED,
            threads: 1,
            fill: DEFAULT_FILL,
            hot: DEFAULT_HOT,
            edit: DEFAULT_EDIT,
            counter: None,
            disk: None,
            out: 0,
            phase_ms: 0,
        }
    }
}

const KEYS: &str =
    "mem, workload, rate, writes, seed, threads, fill, hot, edit, counter, disk, disk_size, \
                    disk_writes, out, phase";

/// The pacing `rate=` and `writes=` select (timed by default).
fn pace_of(
    rate: Option<u64>,
    writes: Option<u64>,
    out: u64,
    phase_ms: u64,
) -> Result<Pace, String> {
    match (rate, writes) {
        (Some(_), Some(_)) => Err("rate and writes exclude each other: rate paces the timed \
                                mode, writes selects the deterministic mode"
            .to_string()),
        (_, Some(_)) if out > 0 || phase_ms > 0 => {
            Err("out and phase need the timed mode (rate=), not writes=".to_string())
        }
        (_, Some(writes)) => Ok(Pace::Deterministic { writes }),
        (rate, None) => Ok(Pace::Timed {
            rate: rate.unwrap_or(DEFAULT_RATE),
        }),
    }
}

/// The disk workload `disk=`, `disk_size=` and `disk_writes=` describe.
fn disk_of(
    path: Option<String>,
    size: Option<u64>,
    writes: Option<u64>,
) -> Result<Option<SimDisk>, String> {
    match (path, size, writes) {
        (Some(path), size, writes) => Ok(Some(SimDisk {
            path,
            size: size.unwrap_or(DEFAULT_DISK_SIZE),
            writes: writes.unwrap_or(DEFAULT_DISK_WRITES),
        })),
        (None, None, None) => Ok(None),
        (None, _, _) => Err("disk_size and disk_writes need disk=PATH".to_string()),
    }
}

impl SimSpec {
    /// Parses `key=value,...`; the empty string gives all defaults.
    pub fn parse(kv: &str) -> Result<Self, DomainError> {
        let err = |reason: String| DomainError::Spec {
            spec: kv.to_string(),
            reason,
        };
        let mut s = SimSpec::default();
        let mut rate = None;
        let mut writes = None;
        let (mut disk, mut disk_size, mut disk_writes) = (None, None, None);
        for (key, value) in crate::domain::spec_pairs(kv, KEYS).map_err(err)? {
            let bad = |form: &str| err(format!("{key}={value}: expected {form}"));
            match key {
                "mem" => {
                    s.mem = parse_size(value)
                        .ok_or_else(|| bad("a size like 64MiB, 1GiB, 4096k or a byte count"))?
                }
                "workload" => s.workload = value.parse().map_err(|()| {
                    bad("one of uniform, hotcold, sequential, edits, zero, incompressible, mixed")
                })?,
                "rate" => {
                    rate =
                        Some(parse_u64(value).ok_or_else(|| {
                            bad("page writes per second, an integer (0 = unpaced)")
                        })?)
                }
                "writes" => {
                    writes = Some(
                        parse_u64(value).ok_or_else(|| bad("page writes per epoch, an integer"))?,
                    )
                }
                "seed" => {
                    s.seed = parse_u64(value)
                        .ok_or_else(|| bad("an unsigned 64-bit integer (decimal or 0x-hex)"))?
                }
                "threads" => {
                    s.threads = value
                        .parse()
                        .ok()
                        .filter(|t| (1..=MAX_THREADS).contains(t))
                        .ok_or_else(|| bad(&format!("an integer in 1..={MAX_THREADS}")))?
                }
                "fill" => {
                    s.fill = parse_fraction(value, true)
                        .ok_or_else(|| bad("a fraction in [0, 1], like 0.25"))?
                }
                "hot" => {
                    s.hot = parse_fraction(value, false)
                        .ok_or_else(|| bad("a fraction in (0, 1], like 0.05"))?
                }
                "edit" => {
                    s.edit = value
                        .parse()
                        .ok()
                        .filter(|e| (1..=PAGE_SIZE as u32).contains(e))
                        .ok_or_else(|| {
                            bad(&format!("bytes per edit, an integer in 1..={PAGE_SIZE}"))
                        })?
                }
                "counter" => {
                    s.counter = Some(value.parse().map_err(|_| {
                        bad("the UDP address the guest's counter service answers on, like 127.0.0.1:7800")
                    })?)
                }
                "disk" if !value.is_empty() => disk = Some(value.to_string()),
                "disk" => return Err(bad("the path of a disk image")),
                "disk_size" => {
                    disk_size = Some(
                        parse_size(value)
                            .filter(|&v| v >= PAGE_SIZE as u64 && v % PAGE_SIZE as u64 == 0)
                            .ok_or_else(|| bad("a size, a multiple of 4096 bytes, like 16MiB"))?,
                    )
                }
                "disk_writes" => {
                    disk_writes = Some(
                        parse_u64(value)
                            .ok_or_else(|| bad("4 KiB disk writes per epoch, an integer"))?,
                    )
                }
                "out" => {
                    s.out = parse_u64(value)
                        .ok_or_else(|| bad("page writes per output frame, an integer (0 = none)"))?
                }
                "phase" => {
                    s.phase_ms = humantime::parse_duration(value)
                        .ok()
                        .map(|d| d.as_millis() as u64)
                        .filter(|ms| *ms > 0)
                        .ok_or_else(|| bad("a phase length like 1s or 500ms"))?
                }
                _ => {
                    return Err(err(format!(
                        "unknown key {key:?} in {key}={value} (keys: {KEYS})"
                    )))
                }
            }
        }
        s.pace = pace_of(rate, writes, s.out, s.phase_ms).map_err(err)?;
        s.disk = disk_of(disk, disk_size, disk_writes).map_err(err)?;
        s.checked().map_err(err)
    }

    /// The checks that span keys.
    fn checked(self) -> Result<Self, String> {
        let s = self;
        if s.mem % PAGE_SIZE as u64 != 0 || s.mem < MIN_PAGES * PAGE_SIZE as u64 {
            return Err(format!(
                "mem={}: expected a multiple of {PAGE_SIZE} bytes, at least {} bytes ({MIN_PAGES} pages)",
                s.mem,
                MIN_PAGES * PAGE_SIZE as u64
            ));
        }
        if s.counter.is_some() && s.is_deterministic() {
            return Err(
                "counter and writes exclude each other: the counter service answers \
                 clients, so memory is no longer a function of the epoch"
                    .to_string(),
            );
        }
        if s.counter.is_some() && s.threads == MAX_THREADS {
            return Err(format!(
                "counter: the service keeps its state in the last thread slot; use threads < {MAX_THREADS}"
            ));
        }
        if s.mem > isize::MAX as u64 {
            return Err(format!("mem={}: larger than this host can map", s.mem));
        }
        if s.threads as u64 > s.data_pages() {
            return Err(format!(
                "threads={}: every thread needs a data page of its own, mem={} has only {}",
                s.threads,
                FmtSize(s.mem),
                s.data_pages()
            ));
        }
        Ok(s)
    }

    pub fn layout(&self) -> Layout {
        Layout {
            page_size: PAGE_SIZE as u32,
            pages: self.mem / PAGE_SIZE as u64,
        }
    }

    /// True when memory after epoch E is a pure function of (spec, E).
    pub fn is_deterministic(&self) -> bool {
        matches!(self.pace, Pace::Deterministic { .. })
    }

    /// Pages the workload writes: all but page 0, the control block.
    pub fn data_pages(&self) -> u64 {
        self.layout().pages - 1
    }
}

impl fmt::Display for SimSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mem={},workload={},", FmtSize(self.mem), self.workload)?;
        match self.pace {
            Pace::Timed { rate } => write!(f, "rate={rate},")?,
            Pace::Deterministic { writes } => write!(f, "writes={writes},")?,
        }
        // `{}` on f64 prints the shortest string that parses back exactly.
        write!(
            f,
            "seed={},threads={},fill={},hot={},edit={}",
            self.seed, self.threads, self.fill, self.hot, self.edit
        )?;
        if let Some(a) = self.counter {
            write!(f, ",counter={a}")?;
        }
        if let Some(d) = &self.disk {
            write!(
                f,
                ",disk={},disk_size={},disk_writes={}",
                d.path,
                FmtSize(d.size),
                d.writes
            )?;
        }
        if self.out > 0 {
            write!(f, ",out={}", self.out)?;
        }
        if self.phase_ms > 0 {
            write!(f, ",phase={}ms", self.phase_ms)?;
        }
        Ok(())
    }
}

/// A byte count in the largest binary unit that divides it exactly.
struct FmtSize(u64);

impl fmt::Display for FmtSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
            if self.0 != 0 && self.0 % (1u64 << shift) == 0 {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// `4096`, `4096k`, `64M`, `64MiB`, `1GiB`, `1g`, `2T`: binary units, the
/// unit letter in either case, optional `iB`/`B` after it.
fn parse_size(s: &str) -> Option<u64> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        "t" | "tib" | "tb" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn parse_fraction(s: &str, allow_zero: bool) -> Option<f64> {
    let v: f64 = s.parse().ok()?;
    let low_ok = if allow_zero { v >= 0.0 } else { v > 0.0 };
    (low_ok && v <= 1.0).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(kv: &str) -> String {
        match SimSpec::parse(kv) {
            Err(DomainError::Spec { reason, .. }) => reason,
            other => panic!("{kv:?}: expected a spec error, got {other:?}"),
        }
    }

    #[test]
    fn empty_is_defaults() {
        let s = SimSpec::parse("").unwrap();
        assert_eq!(s, SimSpec::default());
        assert_eq!(s.mem, 64 << 20);
        assert!(!s.is_deterministic());
    }

    #[test]
    fn parses_every_key() {
        let s = SimSpec::parse(
            "mem=1GiB,workload=edits,writes=5000,seed=0x10,threads=2,fill=0.5,hot=0.1,edit=64",
        )
        .unwrap();
        assert_eq!(s.mem, 1 << 30);
        assert_eq!(s.workload, WorkloadKind::Edits);
        assert_eq!(s.pace, Pace::Deterministic { writes: 5000 });
        assert!(s.is_deterministic());
        assert_eq!(
            (s.seed, s.threads, s.fill, s.hot, s.edit),
            (16, 2, 0.5, 0.1, 64)
        );
        assert_eq!(s.layout().pages, 1 << 18);
    }

    #[test]
    fn sizes() {
        for (text, bytes) in [
            ("4096k", 4096 << 10),
            ("64MiB", 64 << 20),
            ("64m", 64 << 20),
            ("1GiB", 1 << 30),
            ("16384", 16384),
        ] {
            assert_eq!(
                SimSpec::parse(&format!("mem={text}")).unwrap().mem,
                bytes,
                "{text}"
            );
        }
    }

    #[test]
    fn display_round_trips() {
        for kv in [
            "",
            "mem=4096k,workload=mixed,rate=0,threads=3,fill=0.3333333333333333",
            "mem=20480,workload=zero,writes=7,seed=18446744073709551615,hot=1,edit=4096",
            "workload=incompressible,fill=0,hot=1e-3",
            "workload=edits,rate=50000,out=10,phase=1500ms",
        ] {
            let s = SimSpec::parse(kv).unwrap();
            let text = s.to_string();
            assert_eq!(SimSpec::parse(&text).unwrap(), s, "{kv:?} → {text:?}");
        }
        assert_eq!(
            SimSpec::default().to_string(),
            "mem=64MiB,workload=uniform,rate=200000,seed=869043298029,threads=1,fill=0.25,hot=0.05,edit=32"
        );
    }

    #[test]
    fn rejects_bad_values_naming_key_and_value() {
        for (kv, needle) in [
            ("mem=100", "mem=100"),
            ("mem=8k", "at least"),
            ("mem=64XB", "mem=64XB"),
            ("workload=random", "workload=random"),
            ("threads=0", "threads=0"),
            ("threads=64", "1..=63"),
            ("mem=16k,threads=4", "threads=4"),
            ("fill=1.5", "fill=1.5"),
            ("hot=0", "hot=0"),
            ("edit=0", "edit=0"),
            ("edit=4097", "edit=4097"),
            ("rate=fast", "rate=fast"),
            ("out=x", "out=x"),
            ("phase=0s", "phase=0s"),
            ("writes=5,out=3", "timed mode"),
            ("seed=-1", "seed=-1"),
            ("colour=red", "unknown key \"colour\""),
            ("mem", "not key=value"),
            ("mem=1m,mem=2m", "twice"),
            ("rate=1,writes=1", "exclude"),
        ] {
            let r = reason(kv);
            assert!(r.contains(needle), "{kv:?}: reason {r:?} lacks {needle:?}");
        }
    }
}
