#![no_main]
//! See `castor::fuzzing::nbd` for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| castor::fuzzing::nbd(data));
