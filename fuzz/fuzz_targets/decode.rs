//! Fuzz target `decode`: the properties are `twinguard_schemas::fuzz_check::check_decode`.
#![no_main]

use twinguard_schemas::fuzz_check::{check_decode, seeds_decode};

libfuzzer_sys::fuzz_target!(
    init: twinguard_fuzz_seeds(seeds_decode),
    |data: &[u8]| check_decode(data)
);

/// With `TWINGUARD_FUZZ_WRITE_SEEDS=<dir>`, write the built-in seeds there and exit
/// (scripts/fuzz.sh seeds the corpus this way).
fn twinguard_fuzz_seeds(seeds: fn() -> Vec<Vec<u8>>) {
    if let Some(dir) = std::env::var_os("TWINGUARD_FUZZ_WRITE_SEEDS") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).expect("seed directory");
        for (i, s) in seeds().iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), s).expect("seed file");
        }
        std::process::exit(0);
    }
}
