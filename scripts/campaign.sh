#!/usr/bin/env bash
# The fault campaign of issue 13 (tests/CAMPAIGN.md): crashes, broker faults, bad input
# at volume, hostile SQL/HTTP clients, memory pressure, rebalance storms, each checked
# against a fault-free reference run of the same records ("nothing lost").
#
#   scripts/campaign.sh [--quick] [--out DIR] [--seed N] [SCENARIO...]
#
# SCENARIO: C1 C2 C3 C5 C6 C7 (default: all), or a sub-scenario such as C2c, C6b.
# --quick shrinks every scenario for development (a few minutes in all).
# Needs: the twinguard binary ($TWINGUARD_BIN, else $CARGO_TARGET_DIR/debug/twinguard,
# CARGO_TARGET_DIR defaulting to $HOME/.cache/twinguard/target; built with
# `cargo build -p twinguard --bin twinguard`), tansu 0.6.0 on PATH or $TANSU_BIN
# (scripts/test.sh installs it), and for C2b a durable tansu in $TANSU_DURABLE_BIN
# (`cargo install tansu --version 0.6.0 --locked --features dynostore,libsql`).
# Python tools (confluent-kafka) go into a venv outside the clone, made here.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/deps.sh
. "$here/deps.sh"

venv=${CAMPAIGN_VENV:-$HOME/.cache/twinguard/campaign-venv}
ensure_python_tools "$venv" confluent-kafka==2.16.1

target=${CARGO_TARGET_DIR:-$HOME/.cache/twinguard/target}
export TWINGUARD_BIN=${TWINGUARD_BIN:-$target/debug/twinguard}
if [ ! -x "$TWINGUARD_BIN" ]; then
  echo "campaign: no twinguard binary at $TWINGUARD_BIN; build it: cargo build -p twinguard --bin twinguard" >&2
  exit 2
fi
# A private copy: other builds into the same target directory must not swap the binary
# under test in the middle of a run.
snap=$(mktemp -d /tmp/twinguard-campaign-bin.XXXXXX)
cp "$TWINGUARD_BIN" "$snap/twinguard"
export TWINGUARD_BIN_ORIGIN=$TWINGUARD_BIN TWINGUARD_BIN=$snap/twinguard
export TANSU_BIN=${TANSU_BIN:-$(command -v tansu || echo "$HOME/.cargo/bin/tansu")}
if ! "$TANSU_BIN" --version >/dev/null 2>&1; then
  echo "campaign: tansu not found ($TANSU_BIN); scripts/test.sh installs it" >&2
  exit 2
fi
export PYTHONDONTWRITEBYTECODE=1
rc=0
"$venv/bin/python" -u "$here/campaign/campaign.py" "$@" || rc=$?
rm -rf "$snap"
exit $rc
