#![no_main]
//! See `castor::fuzzing::record` for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| castor::fuzzing::record(data));
