//! The primary's tunables, shared by `protect`, `bench` and `demo`.

use std::time::Duration;

use clap::Args;

use castor::engine::epoch_control::EpochPolicy;
use castor::engine::primary::PrimaryConfig;
use castor::transport::TransportKind;
use castor::units;

use super::parse::{parse_compress, parse_cores, CompressArg, CoreList};

#[derive(Args, Clone)]
pub struct EngineArgs {
    /// Epoch length: how long the guest runs between checkpoints, or `auto`
    /// to choose each epoch from the measured pause, checkpoint latency and
    /// guest output: auto[:target=20ms,min=1ms,max=100ms,overhead=0.05,delay=2ms,rate=100]
    /// (target: output release delay to aim at; overhead: largest share of
    /// time in pauses; an epoch whose output is held ends
    /// min(delay, pause/overhead) + bits/rate (Mbit/s) after its first
    /// frame). See docs/tuning.md.
    #[arg(long, default_value = "25ms", value_parser = parse_epoch)]
    pub epoch: EpochPolicy,
    /// Checkpoints allowed in flight before the next epoch is extended.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub inflight: u64,
    /// Keep the shadow (the last sent copy of every page, the base of
    /// deltas) on transparent huge pages: for guests that rewrite memory
    /// all over, whose checkpoints otherwise take a page fault per page
    /// first sent again (docs/throughput.md, stop 16). Costs memory and
    /// seed time when the guest's data is spread thin: every 2 MiB around
    /// a page that holds data is zeroed and kept.
    #[arg(long)]
    pub huge_shadow: bool,
    /// Encode workers (default: one per core).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub workers: Option<u64>,
    /// Threads harvesting (one stripe of the dirty log each) and copying
    /// dirty pages during the pause (default: one per core, at most 4).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub copy_threads: Option<u64>,
    /// Do not pin workers to cores.
    #[arg(long, conflicts_with = "cores")]
    pub no_pin: bool,
    /// Pin workers and copy threads to these cores, e.g. `2,3` or `0-3`
    /// (worker i on the i-th listed core, wrapping; default: every core).
    #[arg(long, value_parser = parse_cores)]
    pub cores: Option<CoreList>,
    /// Compressor for pages where it pays: lz4, zstd, zstd:LEVEL, none, or
    /// auto (chosen per epoch among lz4, none and zstd from measured encode
    /// time and link rate: raw when the CPU is the bottleneck).
    #[arg(long, default_value = "lz4", value_parser = parse_compress)]
    pub compress: CompressArg,
    /// Never throttle the guest: when it dirties memory faster than the
    /// pipeline ships, only extend epochs (checkpoint latency then grows
    /// without bound).
    #[arg(long)]
    pub no_throttle: bool,
    /// The pause to aim at: an epoch ends early once its dirty set reaches
    /// the pages a pause this long copies (measured), and while no
    /// checkpoint may start (all in flight) the guest is throttled hard
    /// instead; `off`: epochs are never ended early. Needs a domain that
    /// counts its writes (sim); elsewhere it has no effect.
    #[arg(long, default_value = "4ms", value_parser = parse_pause_target)]
    pub pause_target: PauseTarget,
    /// UNSAFE, for experiments: let guest output (network frames) out at
    /// once instead of holding it until the backup acknowledged the
    /// checkpoint that produced it. After a failover clients may see the
    /// guest step back in time.
    #[arg(long)]
    pub no_output_commit: bool,
    /// Declare the backup lost when nothing (ack or heartbeat) arrived from
    /// it for this long; the guest then runs unprotected (protect).
    #[arg(long, default_value = "2s", value_parser = units::parse_duration)]
    pub backup_timeout: Duration,
    /// Send a heartbeat (and a beacon, with --beacon) after this long
    /// without traffic to the backup; keep it several times shorter than
    /// the backup's --heartbeat-timeout.
    #[arg(long, default_value = "100ms", value_parser = units::parse_duration)]
    pub heartbeat_interval: Duration,
    /// Transport to the backup: tcp, uring (io_uring zero-copy send into the
    /// backup's registered slot ring) or rdma (needs the `rdma` build
    /// feature and an RDMA device). The backup must use the same one.
    #[arg(long, value_enum, default_value_t = TransportKind::Tcp)]
    pub transport: TransportKind,
    /// Encrypt every record after the handshake (AES-256-GCM under
    /// per-session keys), not only authenticate it: for links others can
    /// read. The backup must run with --encrypt too.
    #[arg(long)]
    pub encrypt: bool,
}

/// `--epoch 25ms` or `--epoch auto[:...]`.
/// `--pause-target`'s value (None: off).
#[derive(Debug, Clone, Copy)]
pub struct PauseTarget(pub Option<std::time::Duration>);

pub fn parse_pause_target(s: &str) -> Result<PauseTarget, String> {
    castor::engine::primary::budget::parse_target(s)
        .map(PauseTarget)
        .map_err(|e| e.to_string())
}

pub fn parse_epoch(s: &str) -> Result<EpochPolicy, String> {
    EpochPolicy::parse(s).map_err(|e| e.to_string())
}

impl EngineArgs {
    /// The primary's configuration from these flags (warns about
    /// `--no-output-commit`).
    /// `--encrypt` as the records' protection.
    pub fn protection(&self) -> castor::transport::auth::Protection {
        use castor::transport::auth::Protection;
        if self.encrypt {
            Protection::Encrypt
        } else {
            Protection::Mac
        }
    }

    pub fn config(&self) -> PrimaryConfig {
        let mut c = PrimaryConfig {
            max_inflight: self.inflight as usize,
            huge_shadow: self.huge_shadow,
            pin: !self.no_pin,
            cores: self.cores.as_ref().map(|c| c.0.clone()),
            compressor: self.compress.fixed,
            compress_auto: self.compress.auto,
            throttle: !self.no_throttle,
            pause_target: self.pause_target.0,
            output_commit: !self.no_output_commit,
            backup_silence: self.backup_timeout,
            heartbeat_interval: self.heartbeat_interval,
            ..PrimaryConfig::default()
        };
        if self.no_output_commit {
            eprintln!(
                "castor: WARNING: --no-output-commit is UNSAFE: guest output leaves before the backup \
                 holds the state that produced it, so after a failover clients can see replies the \
                 backup never made (a step back in time). Use it only for experiments."
            );
        }
        c.set_epoch_policy(self.epoch);
        if let Some(w) = self.workers {
            c.workers = w as usize;
        }
        if let Some(t) = self.copy_threads {
            c.copy_threads = t as usize;
        }
        c
    }
}
