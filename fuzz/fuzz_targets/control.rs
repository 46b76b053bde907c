//! Fuzz target `control`: the properties are `twinguard_schemas::fuzz_check::check_control`.
#![no_main]

use twinguard_schemas::fuzz_check::{check_control, seeds_control};

libfuzzer_sys::fuzz_target!(
    init: twinguard_schemas::testing::write_fuzz_seeds_if_asked(seeds_control),
    |data: &[u8]| check_control(data)
);
