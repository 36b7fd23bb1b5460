#![no_main]
// See fuzz/src/targets.rs and docs/FUZZING.md.
libfuzzer_sys::fuzz_target!(|data: &[u8]| (vtpm_fuzz::targets::migration_import)(data));
