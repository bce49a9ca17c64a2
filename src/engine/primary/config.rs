//! The primary's tunables.
//!
//! Invariant: every field has a safe default ([`Default`]); the lease
//! fields are read only through [`PrimaryConfig::lease_gate`], the one
//! rule every self-fencing decision applies.

use std::time::Duration;

use crate::codec::Compressor;
use crate::engine::codec_choice::CodecChoice;
use crate::ha::lease::LeaseGate;

/// Tunables of the primary pipeline.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    pub epoch: Duration,
    /// `--epoch auto`: each epoch's length is chosen by an
    /// `EpochController` with these parameters (`epoch` is then unused);
    /// `None`: every epoch is `epoch` long.
    pub epoch_auto: Option<crate::engine::epoch_control::AutoParams>,
    /// K: checkpoints allowed in flight (sent, not acknowledged).
    pub max_inflight: usize,
    /// The shadow (last sent copy of every page) on transparent huge
    /// pages (`--huge-shadow`): no page fault at each first write of a
    /// page, for guests that rewrite memory everywhere; but a guest whose
    /// data is spread thin has every 2 MiB around it zeroed and kept.
    pub huge_shadow: bool,
    /// Encode workers, each owning a shard of the page range.
    pub workers: usize,
    /// Threads harvesting and copying dirty pages during the pause
    /// (including the epoch thread; see `engine::copy`).
    pub copy_threads: usize,
    pub pin: bool,
    /// With `pin`: the cores workers and copy threads are pinned to, in
    /// order (worker i gets `cores[i % len]`); `None`: every core.
    pub cores: Option<Vec<usize>>,
    pub compressor: Compressor,
    /// Choose the compressor per epoch from measured costs
    /// (`--compress auto`, see [`crate::engine::codec_choice`]); else
    /// `compressor` always.
    pub compress_auto: bool,
    /// Throttle the guest when it dirties faster than the pipeline ships
    /// (see [`crate::engine::throttle`]); false: epochs are extended only.
    pub throttle: bool,
    /// The pause to aim at (`--pause-target`): an epoch ends early once its
    /// dirty set reaches the pages a pause of this length can copy (see
    /// `primary::budget`); None: no budget (`off`).
    pub pause_target: Option<Duration>,
    pub duration: Option<Duration>,
    pub max_epochs: Option<u64>,
    /// Print a progress line to stderr every second.
    pub progress: bool,
    pub keep_records: bool,
    /// How long to wait for the final acknowledgement on a clean stop.
    pub final_ack_timeout: Duration,
    /// Keep this many recent dirty lists for post-run measurements.
    pub keep_dirty_lists: usize,
    /// Pre-copy ends once a round's dirty set is at most this many pages.
    pub precopy_target: u64,
    /// At most this many pre-copy rounds after the first full pass.
    pub precopy_rounds: u32,
    /// Hold guest output until the backup acknowledged its epoch (true), or
    /// let it out at once (false: `--no-output-commit`, UNSAFE, experiments).
    pub output_commit: bool,
    /// The arbiter's lease, when its hold can lapse (etcd): see the module
    /// doc, "Self-fencing".
    pub lease: Option<crate::ha::lease::LeaseWatch>,
    /// Self-fence once the lease is held for less than this. It covers the
    /// delay between a check and the act it allows (the output thread's
    /// release, the next pause): 100 ms is above the worst thread wake-up
    /// delay measured under CPU overload (64 ms, see `ha::detector`).
    pub lease_margin: Duration,
    /// Declare the backup lost when no record (ack or heartbeat; it sends
    /// one every 100 ms without traffic) arrived for this long. Longer than
    /// the backup's own 500 ms: losing a slow backup costs a full re-seed,
    /// so the primary waits out more scheduling noise before giving up.
    pub backup_silence: Duration,
    /// Send a heartbeat to the backup after this long without sending
    /// anything (the backup's `--heartbeat-timeout` must allow several).
    pub heartbeat_interval: Duration,
    /// Also hold host-device output queued to this NFQUEUE (`--nfqueue`).
    pub nfqueue: Option<crate::outq::nfqueue::NfqSpec>,
    /// Disks replicated besides the domain's own (`--disk`, served over
    /// NBD): their writes travel in the epoch they ran in (`crate::disk`).
    pub disks: crate::disk::session::PrimaryDisks,
}

impl Default for PrimaryConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        PrimaryConfig {
            epoch: Duration::from_millis(25),
            epoch_auto: None,
            max_inflight: 2,
            huge_shadow: false,
            workers: cores.clamp(1, 8),
            copy_threads: cores.clamp(1, 4),
            pin: true,
            cores: None,
            compressor: Compressor::Lz4,
            compress_auto: false,
            throttle: true,
            pause_target: Some(super::budget::DEFAULT_TARGET),
            duration: None,
            max_epochs: None,
            progress: false,
            keep_records: false,
            final_ack_timeout: Duration::from_secs(30),
            keep_dirty_lists: 0,
            precopy_target: 4096,
            precopy_rounds: 30,
            output_commit: true,
            lease: None,
            lease_margin: Duration::from_millis(100),
            backup_silence: Duration::from_secs(2),
            heartbeat_interval: Duration::from_millis(100),
            nfqueue: None,
            disks: Default::default(),
        }
    }
}

impl PrimaryConfig {
    /// The session's compression chooser: fixed, or adaptive.
    pub fn codec_choice(&self) -> CodecChoice {
        if self.compress_auto {
            CodecChoice::auto(self.workers)
        } else {
            CodecChoice::new(&[self.compressor], self.workers)
        }
    }

    /// How each epoch's length is chosen.
    pub fn epoch_policy(&self) -> crate::engine::epoch_control::EpochPolicy {
        use crate::engine::epoch_control::EpochPolicy;
        self.epoch_auto
            .map_or(EpochPolicy::Fixed(self.epoch), EpochPolicy::Auto)
    }

    /// Sets the epoch policy: a fixed length, or `auto` (its first length
    /// goes in `epoch`).
    pub fn set_epoch_policy(&mut self, p: crate::engine::epoch_control::EpochPolicy) {
        use crate::engine::epoch_control::EpochPolicy;
        self.epoch = p.initial();
        self.epoch_auto = match p {
            EpochPolicy::Fixed(_) => None,
            EpochPolicy::Auto(a) => Some(a),
        };
    }

    /// The gate every lease decision of a session consults (the lease
    /// thread, each pause, the output queue).
    pub fn lease_gate(&self) -> LeaseGate {
        LeaseGate::new(self.lease.clone(), self.lease_margin)
    }
}
