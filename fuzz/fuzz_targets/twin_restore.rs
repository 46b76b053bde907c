//! Fuzz target `twin_restore`: the properties are `twinguard_operators::fuzz_check::check_twin_restore`.
#![no_main]

use twinguard_operators::fuzz_check::{check_twin_restore, seeds_twin_restore};

libfuzzer_sys::fuzz_target!(
    init: twinguard_fuzz_seeds(seeds_twin_restore),
    |data: &[u8]| check_twin_restore(data)
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
