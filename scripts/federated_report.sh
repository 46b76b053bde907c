#!/usr/bin/env bash
# models/federated/{report.json, dr_vs_alpha.png, dr_vs_poisoned.png, robust_vs_budget.png}
# from what scripts/federated.sh (out/fed/) and `twinguard attack` (out/attack3/) wrote.
#
#   scripts/federated_report.sh [--fed DIR] [--attacks DIR] [--out DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/deps.sh
. "$here/deps.sh"
cd "$here/.."
# Its own venv: the peer venv's list differs, and a different list rebuilds a venv.
venv=${REPORT_VENV:-$HOME/.cache/twinguard/report-venv}
ensure_python_tools "$venv" scikit-learn==1.9.1 pandas==3.1.1 numpy==2.4.6 matplotlib==3.10.8
PYTHONPATH=benches/peer "$venv/bin/python" benches/peer/federated_report.py "$@"
