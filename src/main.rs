//! castor command line: parses the arguments and hands each command to its
//! module in [`cli`] (one file per command, shared flags and parsers beside
//! them). Nothing else happens here.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod cli;

use cli::{
    backup, bench, bench_transport, demo, digest, keygen, protect, serve_disk, status, tune,
};

#[derive(Parser)]
#[command(
    name = "castor",
    version,
    about = "Keep a running VM alive when its host dies: continuous checkpoints to a backup (Remus-style).",
    after_help = "Domain specs: sim:mem=SIZE,workload=uniform|hotcold|sequential|edits|zero|incompressible|mixed,\
rate=WRITES/S[,writes=N (deterministic: N page writes per epoch)][,seed=S][,threads=T][,fill=F][,hot=F][,edit=BYTES]\n\
              kvm:guest=memtouch|counter|blkcheck,mem=SIZE[,console=PATH|stderr][,tap=NAME][,ip=A.B.C.D][,mac=M]\
[,disk=PATH][,dirty=bitmap|ring] (guest ABI: guests/README.md)\n\
Keys: --psk-file FILE or $CASTOR_PSK (at least 16 bytes); without either a built-in development key is used, with a warning."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Read options from a TOML file whose keys are the long flags
    /// (`backup = "host:port"`, `activate = true`); flags given on the
    /// command line override it. See docs/operations.md.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
}

// The doc comments of the variants are the commands' `--help` texts; the
// argument structs carry none so that these stay the only ones.
#[derive(Subcommand)]
enum Cmd {
    /// Live replication on loopback with embedded defaults: a progress line per second, then a report.
    Demo(demo::DemoArgs),
    /// Receive checkpoints from one primary; save the committed replica when its stream ends or breaks.
    ///
    /// Exit status: 0 the primary closed the stream; 2 stream broken or
    /// primary silent (activated, with --activate); 3 not activated, the
    /// arbiter is held by another live copy; 4 not activated, the fence
    /// command failed; 5 activated, then self-fenced: the arbiter's lease
    /// (etcd) lapsed, the guest was paused; 1 any other error.
    Backup(backup::BackupArgs),
    /// Protect a domain: run it in epochs and stream each checkpoint to a backup.
    ///
    /// Exit status 3: refused to start, the arbiter is held by another copy.
    /// Exit status 5: self-fenced: the arbiter's lease (etcd) could not be
    /// renewed in time, so the guest was paused and its unacknowledged
    /// output dropped (a backup may be taking over).
    Protect(protect::ProtectArgs),
    /// Backup and primary on this host (loopback, or `--addr`): measure, report, and check replica == primary.
    Bench(bench::BenchArgs),
    /// Digest of a saved replica (verified against its meta.json), or the
    /// expected digest of a deterministic sim domain after N epochs.
    Digest(digest::DigestArgs),
    /// Print a new random pre-shared key (hex) for --psk-file.
    Keygen,
    /// What a running castor says about itself: role, epoch, lag, held
    /// output, arbiter, peer, last failover (from its --metrics address).
    Status(status::StatusArgs),
    /// Transports side by side on loopback (tcp and uring, raw and lz4
    /// pages): page bytes per second and CPU seconds per replicated GiB,
    /// with memcpy bandwidth (and iperf3 line rate) from the same run.
    BenchTransport(bench_transport::BenchTransportArgs),
    /// Serve raw images over NBD without replication (baseline for the
    /// disk benchmark, or a saved replica disk) until SIGINT/SIGTERM.
    ServeDisk(serve_disk::ServeDiskArgs),
    /// Sweep epoch lengths (fixed and `auto`), in-flight limits, compressors
    /// and transports on loopback, rounds interleaved: DIR/tune.csv,
    /// tune.json, hlog/*.hlog (HdrHistogram interval logs) and PNG plots.
    Tune(tune::TuneArgs),
}

fn dispatch(cmd: Cmd) -> Result<ExitCode, String> {
    match cmd {
        Cmd::Demo(a) => demo::run(a),
        Cmd::Backup(a) => backup::run(a),
        Cmd::Protect(a) => protect::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Digest(a) => digest::run(a),
        Cmd::Keygen => keygen::run(),
        Cmd::Status(a) => status::run(a),
        Cmd::BenchTransport(a) => bench_transport::run(a),
        Cmd::ServeDisk(a) => serve_disk::run(a),
        Cmd::Tune(a) => tune::run(a),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("CASTOR_LOG"))
        .with_writer(std::io::stderr)
        .init();
    // `--config FILE`: its keys become flags placed before the typed ones.
    let args = match castor::ops::config::expand(&Cli::command(), std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("castor: error: {e}");
            return ExitCode::from(1);
        }
    };
    let cli = Cli::parse_from(args);
    match dispatch(cli.cmd) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("castor: error: {e}");
            ExitCode::from(1)
        }
    }
}
