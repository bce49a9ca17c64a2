#![no_main]
//! See `castor::fuzzing::receiver` for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| castor::fuzzing::receiver(data));
