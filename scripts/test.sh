#!/usr/bin/env bash
# Runs every test of twinguard, installing what is missing first:
#   - Debian packages librdkafka's ssl/sasl build needs (libssl-dev, libsasl2-dev, pkg-config)
#   - the tansu 0.6.0 broker the integration tests start (about 18 min to compile once)
# The cargo target directory lives outside the clone and is reused between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/twinguard/target}"
export PATH="$HOME/.cargo/bin:$PATH"

step() { printf '\n==> %s\n' "$*"; }

source scripts/deps.sh
ensure_debian_packages "${BUILD_PACKAGES[@]}"

if tansu --version 2>/dev/null | grep -q '0\.6\.0'; then
  step "tansu 0.6.0 present"
else
  step "installing the tansu 0.6.0 broker (cargo install, ~18 min on 2 cores)"
  cargo install tansu --version 0.6.0 --locked --features dynostore
fi

step "building and running every test (target: $CARGO_TARGET_DIR)"
cargo test --workspace --locked "$@"
