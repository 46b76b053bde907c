#!/usr/bin/env bash
# One-shot job of the compose stack (service `topics`, image apache/kafka): creates
# twinguard's topics before any twinguard process starts, and checks topics that
# already exist have the partitioning the pipeline needs. Idempotent: a second run
# changes nothing. The names are those of compose/config/twinguard.toml [topics]
# (the pipeline's defaults); scripts/check-compose.sh compares the two lists, so keep
# one `create` line per topic.
set -euo pipefail

BOOTSTRAP="${BOOTSTRAP:-kafka:9092}"
PARTITIONS="${PARTITIONS:-6}"      # = topics.partitions
REPLICATION="${REPLICATION:-1}"    # one broker
KT=/opt/kafka/bin/kafka-topics.sh

created=()
create() {
  local topic=$1
  shift
  "$KT" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic "$topic" \
    --partitions "$PARTITIONS" --replication-factor "$REPLICATION" "$@" >/dev/null
  created+=("$topic")
}

create iomt.telemetry                                        # topics.input, keyed by device id
create iomt.verdicts                                         # topics.verdicts
create iomt.telemetry.dlq                                    # topics.dlq
create twinguard.twins.changelog --config cleanup.policy=compact   # topics.changelog
create iomt.alerts                                           # topics.alerts
create iomt.commands                                         # topics.commands
create iomt.commands.acks                                    # topics.acks
create iomt.alerts.feedback                                  # topics.feedback
create twinguard.audit --config retention.ms=-1              # topics.audit: the signed trail is kept

# Topics that existed before this job keep their partition count: check the ones
# partitioned like the input (twinguard refuses to start otherwise, with less detail).
describe=$("$KT" --bootstrap-server "$BOOTSTRAP" --describe --exclude-internal)
count() { awk -v t="$1" '$1 == "Topic:" && $2 == t { for (i = 1; i < NF; i++) if ($i == "PartitionCount:") print $(i + 1) }' <<<"$describe"; }
configs() { awk -v t="$1" '$1 == "Topic:" && $2 == t { for (i = 1; i < NF; i++) if ($i == "Configs:") print $(i + 1) }' <<<"$describe"; }

input=$(count iomt.telemetry)
fail=0
for t in "${created[@]}"; do
  n=$(count "$t")
  if [ -z "$n" ]; then
    echo "topics: $t is missing after creation" >&2
    fail=1
  fi
done
[ "$(count iomt.commands.acks)" = "$input" ] ||
  { echo "topics: iomt.commands.acks must have exactly as many partitions as iomt.telemetry ($input)" >&2; fail=1; }
for t in twinguard.twins.changelog twinguard.audit; do
  [ "$(count "$t")" -ge "$input" ] ||
    { echo "topics: $t must have at least as many partitions as iomt.telemetry ($input)" >&2; fail=1; }
done
case ",$(configs twinguard.twins.changelog)," in
  *,cleanup.policy=compact,*) ;;
  *) echo "topics: twinguard.twins.changelog exists but is not compacted (cleanup.policy=compact)" >&2; fail=1 ;;
esac
[ "$fail" = 0 ] || exit 1
echo "topics ready (${#created[@]} topics, $input partitions):"
printf '  %s\n' "${created[@]}"
