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
# (scripts/test.sh installs it), and for C2b a durable tansu in $TANSU_DURABLE_BIN,
# default $HOME/.cache/twinguard/tansu-durable/bin/tansu: when C2 or C2b is asked for
# (or every scenario) and it is missing, this script builds it there with
# `cargo install tansu --version 0.6.0 --locked --features dynostore,libsql`
# (~20 min on 2 cores, once; CAMPAIGN_NO_DURABLE_INSTALL=1 skips C2b instead).
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
# Durable-storage tansu for C2b (the prebuilt tansu keeps its data in memory only).
durable_root=$HOME/.cache/twinguard/tansu-durable
export TANSU_DURABLE_BIN=${TANSU_DURABLE_BIN:-$durable_root/bin/tansu}
wants_c2b=1
for a in "$@"; do
  case "$a" in
    --out|--seed) ;;
    C2|C2b) wants_c2b=1; break ;;
    C*) wants_c2b=0 ;;
  esac
done
if [ "$wants_c2b" = 1 ] && ! "$TANSU_DURABLE_BIN" --version >/dev/null 2>&1; then
  if [ "${CAMPAIGN_NO_DURABLE_INSTALL:-0}" = 1 ]; then
    echo "campaign: no durable tansu at $TANSU_DURABLE_BIN; C2b will be reported NOT RUN" >&2
  else
    echo "campaign: building a durable-storage tansu 0.6.0 into $durable_root (~20 min on 2 cores, once)" >&2
    cargo install tansu --version 0.6.0 --locked --features dynostore,libsql --root "$durable_root" >&2
  fi
fi
export PYTHONDONTWRITEBYTECODE=1
rc=0
"$venv/bin/python" -u "$here/campaign/campaign.py" "$@" || rc=$?
rm -rf "$snap"
exit $rc
