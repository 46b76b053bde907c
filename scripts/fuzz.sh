#!/usr/bin/env bash
# Coverage-guided fuzzing of twinguard with libFuzzer (issue 13, C4). See fuzz/README.md.
#
#   scripts/fuzz.sh [--minutes N] [--jobs J] [--out DIR] [--no-merge] [--build-only] [target...]
#
# Targets: decode dead_letter control twin_restore audit_verify (default: all).
# Builds the targets (stable rustc, no cargo-fuzz needed: the sanitizer-coverage
# flags cargo-fuzz passes, `--cfg fuzzing`, debug assertions and overflow checks on)
# into $TWINGUARD_FUZZ_TARGET_DIR (default $HOME/.cache/twinguard/fuzz-target),
# writes each target's built-in seeds into fuzz/corpus/<target>/seed-*, fuzzes each
# target for N minutes (default 30), J at a time (default 2), under `nice -n 19`,
# then merges (minimises) what was found into fuzz/corpus/<target>/ and prints one
# row per target: executions, exec/s, libFuzzer's final `cov:` and `ft:`, corpus
# size, findings. A crash, timeout or OOM leaves its input in DIR/<target>/ and
# makes the exit status 1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="$HOME/.cargo/bin:$PATH"

ALL=(decode dead_letter control twin_restore audit_verify)
MINUTES=30
JOBS=2
OUT=""
MERGE=1
BUILD_ONLY=0
TARGETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) MINUTES="$2"; shift 2 ;;
    --jobs) JOBS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --no-merge) MERGE=0; shift ;;
    --build-only) BUILD_ONLY=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) TARGETS+=("$1"); shift ;;
  esac
done
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL[@]}")
for t in "${TARGETS[@]}"; do
  [[ " ${ALL[*]} " == *" $t "* ]] || { echo "unknown target $t (targets: ${ALL[*]})" >&2; exit 2; }
done
OUT="${OUT:-/tmp/twinguard-fuzz-$(date -u +%Y%m%dT%H%M%S)}"
mkdir -p "$OUT"

TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
export CARGO_TARGET_DIR="${TWINGUARD_FUZZ_TARGET_DIR:-$HOME/.cache/twinguard/fuzz-target}"
BIN="$CARGO_TARGET_DIR/$TRIPLE/release"

echo "==> building ${TARGETS[*]} (target dir $CARGO_TARGET_DIR)"
# --target keeps these flags off build scripts and proc macros.
( cd fuzz && RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    -Cdebug-assertions -Coverflow-checks" \
  nice -n 19 cargo build --locked --release -j "${CARGO_BUILD_JOBS:-1}" --target "$TRIPLE" \
    $(printf -- '--bin %s ' "${TARGETS[@]}") )
for t in "${TARGETS[@]}"; do
  TWINGUARD_FUZZ_WRITE_SEEDS="$ROOT/fuzz/corpus/$t" "$BIN/$t"
done
[ "$BUILD_ONLY" = 1 ] && { echo "built into $BIN: ${TARGETS[*]}"; exit 0; }

run_one() {
  local t="$1" d="$OUT/$1"
  mkdir -p "$d/corpus"
  # New inputs go to the scratch corpus (first directory); the committed one is read.
  nice -n 19 "$BIN/$t" "$d/corpus" "$ROOT/fuzz/corpus/$t" \
    -max_total_time=$((MINUTES * 60)) -rss_limit_mb=2048 -timeout=10 \
    -print_final_stats=1 -artifact_prefix="$d/" >"$d/fuzz.log" 2>&1 || true
  if [ "$MERGE" = 1 ]; then
    # Seeds and reproducers (repro-*) first, so that only inputs adding coverage to
    # them are kept.
    rm -rf "$d/merged" && mkdir -p "$d/merged"
    find "$ROOT/fuzz/corpus/$t" -type f \( -name 'seed-*' -o -name 'repro-*' \) -exec cp {} "$d/merged/" \;
    nice -n 19 "$BIN/$t" -merge=1 -rss_limit_mb=2048 -timeout=10 "$d/merged" "$ROOT/fuzz/corpus/$t" "$d/corpus" >"$d/merge.log" 2>&1 || true
    if [ -n "$(ls -A "$d/merged")" ]; then
      find "$ROOT/fuzz/corpus/$t" -type f ! -name 'seed-*' ! -name 'repro-*' -delete
      find "$d/merged" -type f ! -name 'seed-*' ! -name 'repro-*' -exec cp {} "$ROOT/fuzz/corpus/$t/" \;
    fi
  fi
}

echo "==> fuzzing ${TARGETS[*]}: $MINUTES min each, $JOBS at a time (logs: $OUT/<target>/fuzz.log)"
running=0
for t in "${TARGETS[@]}"; do
  if [ "$running" -ge "$JOBS" ]; then wait -n || true; running=$((running - 1)); fi
  echo "    $(date -u +%H:%M:%S) start $t"
  run_one "$t" &
  running=$((running + 1))
done
wait

status=0
printf '\n| target | minutes | executions | exec/s | cov | ft | corpus (files, bytes) | findings |\n'
printf '|---|---|---|---|---|---|---|---|\n'
for t in "${TARGETS[@]}"; do
  log="$OUT/$t/fuzz.log"
  stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
  last="$(grep -E '^#[0-9]+' "$log" | grep -E 'cov: ' | tail -1 || true)"
  cov="$(sed -n 's/.*cov: \([0-9]*\).*/\1/p' <<<"$last")"
  ft="$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")"
  files="$(find "$ROOT/fuzz/corpus/$t" -type f | wc -l)"
  bytes="$(find "$ROOT/fuzz/corpus/$t" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')"
  findings="$(cd "$OUT/$t" && ls crash-* timeout-* oom-* leak-* slow-unit-* 2>/dev/null | tr '\n' ' ' || true)"
  [ -n "$findings" ] && status=1
  printf '| %s | %s | %s | %s | %s | %s | %s, %s | %s |\n' "$t" "$MINUTES" "$(stat number_of_executed_units)" \
    "$(stat average_exec_per_sec)" "${cov:-?}" "${ft:-?}" "$files" "$bytes" "${findings:-none}"
done
echo
echo "logs and any crash inputs: $OUT"
exit $status
