#![no_main]
//! See `castor::fuzzing::beacon` for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| castor::fuzzing::beacon(data));
