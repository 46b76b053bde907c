#!/usr/bin/env bash
# twinguard's trained models beside the scikit-learn peer on the same rows and splits
# (benches/peer/detect_peer.py; figures in models/RESULTS.md).
#
#   scripts/peer.sh MODEL_DIR [DATASET]
#
# Writes MODEL_DIR/scores.csv with `twinguard eval --scores` (the split of every
# file row, and twinguard's scores), then trains the peer on the same train rows,
# sets its threshold on the same validation rows and prints both on the same test
# rows. Needs the twinguard binary ($TWINGUARD_BIN, else
# $CARGO_TARGET_DIR/debug/twinguard); scikit-learn, pandas and numpy go into a venv
# outside the clone, made here.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/deps.sh
. "$here/deps.sh"
[ $# -ge 1 ] || { sed -n '2,12p' "$0"; exit 2; }
model=$1
# PEER_ARGS="--boosters" also compares the gradient-boosting engines.
read -r -a PEER_ARGS <<<"${PEER_ARGS:-}"
venv=${PEER_VENV:-$HOME/.cache/twinguard/peer-venv}
ensure_python_tools "$venv" scikit-learn==1.9.1 pandas==3.1.1 numpy==2.4.6 lightgbm==4.7.0 perpetual==2.3.0 forust==0.8.0
target=${CARGO_TARGET_DIR:-$HOME/.cache/twinguard/target}
bin=${TWINGUARD_BIN:-$target/debug/twinguard}
dataset=${2:-$(sed -n 's/.*"dataset":"\([^"]*\)".*/\1/p' "$model/model.json" | head -1)}
"$bin" eval --model "$model" --out "$model/eval" --scores "$model/scores.csv" >/dev/null
"$venv/bin/python" -u "$here/../benches/peer/detect_peer.py" --dataset "$dataset" --scores "$model/scores.csv" --json "$model/peer.json" "${PEER_ARGS[@]}"
