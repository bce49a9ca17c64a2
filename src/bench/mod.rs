//! Measuring castor: `bench` and `demo` on loopback ([`loopback`]; their
//! report is [`crate::report`]), `tune`, the epoch sweep ([`tune`], with
//! its [`plot`]s and [`hlog`] interval logs) and `bench-transport`, the
//! transports side by side ([`transport`]). The criterion micro-benchmarks
//! live in the top-level `bench/` folder.

pub mod hlog;
pub mod loopback;
pub mod plot;
pub mod transport;
pub mod tune;
