#!/usr/bin/env bash
# Runs the main job: `twinguard demo` on the embedded broker. Installs the build's
# Debian packages if missing; the first build takes 20–22 minutes on 2 cores (DataFusion,
# burn, linfa; benches/RESULTS.md "Newcomer path"), later runs start in seconds. Extra
# arguments go to `twinguard demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
ensure_debian_packages "${BUILD_PACKAGES[@]}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/twinguard/target}"
ensure_own_crates_built_here
exec cargo run --locked -p twinguard -- demo "$@"
