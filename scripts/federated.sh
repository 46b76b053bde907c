#!/usr/bin/env bash
# The federated evaluation protocol (models/FEDERATED.md): central against federated
# arms on CICIoMT2024 and WUSTL-EHMS-2020, clean and with poisoned sites under the
# default robust rules and undefended (rule mean). Every arm is a
# `twinguard federate simulate` run, scored with `twinguard eval --scores`, and
# tabled by benches/peer/federated_table.py.
#
#   scripts/federated.sh [ARM...]      (default: every arm; outputs in out/fed/)
#
# Arms: cic-central wustl-central cic5-a05 cic5-a01 cic10-a05 wustl5-periods
#       cic5-a05-local cic5-a01-local wustl5-periods-local (each site alone)
#       cic10-{invert,targeted,replace,little,fang,inflate}-{robust,mean}
#       (inflate: honest models, score histograms that claim high-scoring normal rows)
#       cic5-a05-bagging cic5-a01-bagging cic10-a05-bagging wustl5-periods-bagging
#       cic10-{invert,replace}-bagging (the boosted member by bagging, not cyclic)
#       cic5-a05-dp-z<Z>-e<E> (differential privacy: noise multiplier Z on the SVM
#       and LSTM, record-level ε = E on the threshold), e.g. cic5-a05-dp-z1-e1;
#       a suffix -t<T> sets the trees' record-level ε (default 1), e.g. cic5-a05-dp-z1-e4-t4
#       cic10-<kind>-dp (3 of 10 sites poisoned in a private federation: z 1,
#       threshold ε 4, trees ε 1)
#       cic-central-s<N> cic5-a05-s<N> (seed N: split, sites and models reseeded)
#       cic5-alpha<A> (5 sites, Dirichlet α = A), cic10-<kind>-k<K>-{robust,mean}
#       (K of 10 sites poisoned)
#       <arm>-lr<N>: that arm with N LSTM rounds (default 5), e.g. cic5-a05-lr15
#       <arm>-any: that arm with `--combine any` (each member against its own
#       threshold, the most suspicious decides), e.g. cic5-a05-any
# About 1 minute per arm on 2 cores. Needs the twinguard binary ($TWINGUARD_BIN,
# else $CARGO_TARGET_DIR/debug/twinguard) and the peer venv (scripts/peer.sh makes it).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/deps.sh
. "$here/deps.sh"
cd "$here/.."
venv=${PEER_VENV:-$HOME/.cache/twinguard/peer-venv}
ensure_python_tools "$venv" scikit-learn==1.9.1 pandas==3.1.1 numpy==2.4.6
target=${CARGO_TARGET_DIR:-$HOME/.cache/twinguard/target}
bin=${TWINGUARD_BIN:-$target/debug/twinguard}
C=../shared/datasets/ciciomt2024/train_sample.csv.gz
W=../shared/datasets/wustl-ehms-2020/train.csv
cic=(--dataset "$C" --schema ciciomt-flow-window/v1 --split stratified)
out=out/fed
mkdir -p "$out"
arms=("$@")
[ ${#arms[@]} -gt 0 ] || arms=(cic-central wustl-central cic5-a05 cic5-a01 cic10-a05 wustl5-periods
    cic5-a05-local cic5-a01-local wustl5-periods-local
    cic10-invert-robust cic10-invert-mean cic10-targeted-robust cic10-targeted-mean
    cic10-replace-robust cic10-replace-mean cic10-little-robust cic10-little-mean
    cic10-fang-robust cic10-fang-mean
    cic5-a05-bagging cic5-a01-bagging cic10-a05-bagging wustl5-periods-bagging
    cic10-invert-bagging cic10-replace-bagging
    cic5-a05-dp-z1-e1 cic5-a05-dp-z1-e4 cic5-a05-dp-z0.5-e10)
for arm in "${arms[@]}"; do
    dir=$out/$arm
    echo "== $arm" >&2
    extra=()
    base=$arm
    if [ "${arm%-any}" != "$arm" ]; then extra=(--combine any); base=${arm%-any}; fi
    case $base in *-lr[0-9]*) extra+=(--lstm-rounds "${base##*-lr}"); base=${base%-lr*} ;; esac
    case $base in
        cic-central) "$bin" train "${cic[@]}" "${extra[@]}" --out "$dir" ;;
        wustl-central) "$bin" train --dataset "$W" "${extra[@]}" --out "$dir" ;;
        cic5-a05) "$bin" federate simulate "${cic[@]}" --sites 5 --alpha 0.5 "${extra[@]}" --out "$dir" ;;
        cic5-a01) "$bin" federate simulate "${cic[@]}" --sites 5 --alpha 0.1 "${extra[@]}" --out "$dir" ;;
        cic10-a05) "$bin" federate simulate "${cic[@]}" --sites 10 --alpha 0.5 "${extra[@]}" --out "$dir" ;;
        wustl5-periods) "$bin" federate simulate --dataset "$W" --sites 5 --periods "${extra[@]}" --out "$dir" ;;
        cic5-a05-local) "$bin" federate simulate "${cic[@]}" --sites 5 --alpha 0.5 --local-only "${extra[@]}" --out "$dir" ;;
        cic5-a01-local) "$bin" federate simulate "${cic[@]}" --sites 5 --alpha 0.1 --local-only "${extra[@]}" --out "$dir" ;;
        wustl5-periods-local) "$bin" federate simulate --dataset "$W" --sites 5 --periods --local-only "${extra[@]}" --out "$dir" ;;
        cic5-a05-bagging) "$bin" federate simulate "${cic[@]}" --sites 5 --alpha 0.5 --gbdt bagging "${extra[@]}" --out "$dir" ;;
        cic5-a01-bagging) "$bin" federate simulate "${cic[@]}" --sites 5 --alpha 0.1 --gbdt bagging "${extra[@]}" --out "$dir" ;;
        cic10-a05-bagging) "$bin" federate simulate "${cic[@]}" --sites 10 --alpha 0.5 --gbdt bagging "${extra[@]}" --out "$dir" ;;
        wustl5-periods-bagging) "$bin" federate simulate --dataset "$W" --sites 5 --periods --gbdt bagging "${extra[@]}" --out "$dir" ;;
        cic-central-s*) "$bin" train "${cic[@]}" --seed "${base##*-s}" "${extra[@]}" --out "$dir" ;;
        cic5-a05-s*) "$bin" federate simulate "${cic[@]}" --sites 5 --alpha 0.5 --seed "${base##*-s}" "${extra[@]}" --out "$dir" ;;
        cic5-alpha*) "$bin" federate simulate "${cic[@]}" --sites 5 --alpha "${base#cic5-alpha}" "${extra[@]}" --out "$dir" ;;
        cic10-*-k*-robust|cic10-*-k*-mean)
            kind=${base#cic10-}; kind=${kind%%-k*}; k=${base##*-k}; k=${k%-*}
            rule=clip-multi-krum; [ "${base##*-}" = mean ] && rule=mean
            "$bin" federate simulate "${cic[@]}" --sites 10 --alpha 0.5 --poison "$k:$kind" --rule "$rule" "${extra[@]}" --out "$dir" ;;
        cic5-a05-dp-z*-e*)
            z=${base#*-z}; z=${z%%-e*}; e=${base#*-e}; e=${e%%-t*}; t=1
            case $base in *-t*) t=${base##*-t} ;; esac
            "$bin" federate simulate "${cic[@]}" --sites 5 --alpha 0.5 --dp-noise "$z" --dp-threshold-epsilon "$e" --dp-trees-epsilon "$t" "${extra[@]}" --out "$dir" ;;
        cic10-*-dp)
            kind=${base#cic10-}; kind=${kind%-dp}
            "$bin" federate simulate "${cic[@]}" --sites 10 --alpha 0.5 --poison "3:$kind" --dp-noise 1 --dp-threshold-epsilon 4 "${extra[@]}" --out "$dir" ;;
        cic10-*-bagging)
            kind=${base#cic10-}; kind=${kind%-*}
            "$bin" federate simulate "${cic[@]}" --sites 10 --alpha 0.5 --poison "3:$kind" --gbdt bagging "${extra[@]}" --out "$dir" ;;
        cic10-*-robust|cic10-*-mean)
            kind=${base#cic10-}; kind=${kind%-*}
            rule=clip-multi-krum; [ "${base##*-}" = mean ] && rule=mean
            "$bin" federate simulate "${cic[@]}" --sites 10 --alpha 0.5 --poison "3:$kind" --rule "$rule" "${extra[@]}" --out "$dir" ;;
        *) echo "unknown arm $arm" >&2; exit 2 ;;
    esac > "$dir.log" 2>&1 || { tail -20 "$dir.log" >&2; exit 1; }
    [ -f "$dir/local.json" ] || "$bin" eval --model "$dir" --out "$dir/eval" --scores "$dir/scores.csv" >/dev/null
done
runs=()
for arm in "${arms[@]}"; do runs+=("$arm=$out/$arm"); done
"$venv/bin/python" benches/peer/federated_table.py "${runs[@]}"
