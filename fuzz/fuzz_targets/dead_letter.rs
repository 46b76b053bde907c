//! Fuzz target `dead_letter`: the properties are `twinguard_schemas::fuzz_check::check_dead_letter`.
#![no_main]

use twinguard_schemas::fuzz_check::{check_dead_letter, seeds_dead_letter};

libfuzzer_sys::fuzz_target!(
    init: twinguard_schemas::testing::write_fuzz_seeds_if_asked(seeds_dead_letter),
    |data: &[u8]| check_dead_letter(data)
);
