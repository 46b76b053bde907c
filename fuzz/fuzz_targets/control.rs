//! Fuzz target `control`: the properties are `twinguard_schemas::fuzz_check::check_control`.
#![no_main]

use twinguard_schemas::fuzz_check::{check_control, seeds_control};

libfuzzer_sys::fuzz_target!(
    init: twinguard_fuzz_seeds(seeds_control),
    |data: &[u8]| check_control(data)
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
