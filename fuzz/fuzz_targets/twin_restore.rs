//! Fuzz target `twin_restore`: the properties are `twinguard_operators::fuzz_check::check_twin_restore`.
#![no_main]

use twinguard_operators::fuzz_check::{check_twin_restore, seeds_twin_restore};

libfuzzer_sys::fuzz_target!(
    init: twinguard_schemas::testing::write_fuzz_seeds_if_asked(seeds_twin_restore),
    |data: &[u8]| check_twin_restore(data)
);
