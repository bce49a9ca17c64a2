//! Measuring castor: `bench` and `demo` on loopback ([`loopback`]; their
//! report is [`crate::report`]) and `bench-transport`, the transports side
//! by side ([`transport`]). The criterion micro-benchmarks live in the
//! top-level `bench/` folder.

pub mod loopback;
pub mod transport;
