#![no_main]
//! See `castor::fuzzing::disk_writes` for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| castor::fuzzing::disk_writes(data));
