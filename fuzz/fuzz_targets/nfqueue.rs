#![no_main]
//! See `castor::fuzzing::nfqueue` for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| castor::fuzzing::nfqueue(data));
