//! Fuzz target `decode`: the properties are `twinguard_schemas::fuzz_check::check_decode`.
#![no_main]

use twinguard_schemas::fuzz_check::{check_decode, seeds_decode};

libfuzzer_sys::fuzz_target!(
    init: twinguard_schemas::testing::write_fuzz_seeds_if_asked(seeds_decode),
    |data: &[u8]| check_decode(data)
);
