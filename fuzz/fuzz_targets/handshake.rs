#![no_main]
//! See `castor::fuzzing::handshake` for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| castor::fuzzing::handshake(data));
