//! Fuzz target `audit_verify`: the properties are `twinguard_operators::fuzz_check::check_audit_verify`.
#![no_main]

use twinguard_operators::fuzz_check::{check_audit_verify, seeds_audit_verify};

libfuzzer_sys::fuzz_target!(
    init: twinguard_schemas::testing::write_fuzz_seeds_if_asked(seeds_audit_verify),
    |data: &[u8]| check_audit_verify(data)
);
