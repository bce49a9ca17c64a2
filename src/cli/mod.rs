//! The commands of the `castor` binary, one file each, and the flags and
//! value parsers they share.
//!
//! Each command module holds its clap argument struct (`XxxArgs`) and a
//! `run` that turns those arguments into library calls and an exit status.
//! Errors come back as the message `main` prints after `castor: error:`.
//!
//! A new command (`tune`, `status`, ...) is a new file here with its
//! `XxxArgs` and `run`, a variant of `Cmd` in `main.rs` (its doc comment is
//! the command's help) and one line in `dispatch`. Flags several commands
//! share go in a file of their own, as [`engine_args`] does.

pub mod backup;
pub mod bench;
pub mod bench_transport;
pub mod demo;
pub mod digest;
pub mod keygen;
pub mod protect;
pub mod serve_disk;
pub mod status;
pub mod tune;

mod arbiter;
pub mod engine_args;
mod keys;
mod nfqueue;
mod ops;
mod parse;
