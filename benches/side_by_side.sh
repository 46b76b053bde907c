#!/usr/bin/env bash
# Side by side on one tansu broker: the passthrough ceiling, the Python stream peer
# (confluent-kafka + scikit-learn, benches/peer/stream_peer.py) and `twinguard run`
# with a trained model, then response time at fixed loads (benches/side_by_side.py
# explains the method; figures in benches/RESULTS.md). Outside CI.
#
#   benches/side_by_side.sh [--events N] [--rounds R] [--workers 1,2] [--pin]
#                           [--loads 2000,5000,10000,half] [--seconds S] [--out DIR]
#
# Model: $TWINGUARD_BENCH_MODEL (a `twinguard train` output directory), else one
# trained here on ../shared/datasets/wustl-ehms-2020/train.csv with the `train`
# defaults, into the output directory (a few minutes, once). The peer's forest is
# trained on the same file. Binary: $TWINGUARD_BIN, else $CARGO_TARGET_DIR/debug/
# twinguard (the README's profile: everything optimised); build it first with
# `cargo build -p twinguard --bin twinguard`. Needs tansu (scripts/test.sh installs it).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=scripts/deps.sh
. "$root/scripts/deps.sh"
[ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ] && { sed -n '2,15p' "$0"; exit 0; }
out=$root/out/side-by-side
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$(realpath -m "$2"); shift 2 ;;  # absolute: the configs it writes name files under it
    *) args+=("$1"); shift ;;
  esac
done
mkdir -p "$out"
venv=${SBS_VENV:-$HOME/.cache/twinguard/sbs-venv}
ensure_python_tools "$venv" confluent-kafka==2.16.1 scikit-learn==1.9.1 pandas==3.1.1 numpy==2.4.6
target=${CARGO_TARGET_DIR:-$HOME/.cache/twinguard/target}
export TWINGUARD_BIN=${TWINGUARD_BIN:-$target/debug/twinguard}
[ -x "$TWINGUARD_BIN" ] || { echo "side_by_side: no twinguard binary at $TWINGUARD_BIN; build it: cargo build -p twinguard --bin twinguard" >&2; exit 2; }
export TANSU_BIN=${TANSU_BIN:-$(command -v tansu || echo "$HOME/.cargo/bin/tansu")}
"$TANSU_BIN" --version >/dev/null 2>&1 || { echo "side_by_side: tansu not found ($TANSU_BIN); scripts/test.sh installs it" >&2; exit 2; }
dataset=$root/../shared/datasets/wustl-ehms-2020/train.csv
model=${TWINGUARD_BENCH_MODEL:-$out/model}
if [ ! -f "$model/model.json" ]; then
  echo "side_by_side: training the twinguard model on $dataset into $model" >&2
  "$TWINGUARD_BIN" train --dataset "$dataset" --out "$model" >&2
fi
if [ ! -f "$out/peer.pkl" ]; then
  "$venv/bin/python" "$here/peer/stream_peer.py" train --dataset "$dataset" --out "$out/peer.pkl" >&2
fi
export PYTHONDONTWRITEBYTECODE=1
exec "$venv/bin/python" -u "$here/side_by_side.py" --model "$model" --peer-model "$out/peer.pkl" --out "$out" "${args[@]}"
