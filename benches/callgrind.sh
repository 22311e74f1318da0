#!/usr/bin/env bash
# Instruction-count regression guard: fixed workloads of the release binary under
# `valgrind --tool=callgrind`, which counts instructions, not seconds, so the numbers repeat on a
# busy machine. Each count is compared with benches/callgrind-baseline.txt; more than 10 % above
# its baseline fails.
#
#   bash benches/callgrind.sh            # check (what .ci/run does)
#   bash benches/callgrind.sh --update   # record new baselines (after an intended change)
#
# The inputs are made by `eddy generate` with fixed seeds, so they are the same everywhere.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
baseline="benches/callgrind-baseline.txt"
update=false
[ "${1:-}" = "--update" ] && update=true
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)"; exit 1; }
cargo build --release --quiet --bin eddy
eddy="$root/target/release/eddy"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$eddy" generate --scenario trades --count 20000 --seed 1 > "$work/trades.ndjson"
"$eddy" generate --scenario sensors --count 20000 --seed 1 > "$work/sensors.ndjson"
"$eddy" generate --scenario games --count 20000 --seed 1 > "$work/games.ndjson"
"$eddy" generate --scenario social --count 2000 --seed 1 > "$work/social.ndjson"

# name | input | queries
workloads=(
  "vwap_20k|trades|vwap"
  "trades_all_20k|trades|vwap ohlc_1m price_alerts"
  "sensor_anomaly_20k|sensors|sensor_anomaly"
  "player_stats_20k|games|player_stats"
  "hashtag_sentiment_2k|social|hashtag_sentiment"
)

declare -A counts
for w in "${workloads[@]}"; do
  IFS='|' read -r name input queries <<< "$w"
  args=()
  for q in $queries; do args+=("queries/$q.rhai"); done
  EDDY_LOG=error valgrind --tool=callgrind --callgrind-out-file="$work/$name.out" \
    "$eddy" run "${args[@]}" --input "$work/$input.ndjson" > /dev/null 2> "$work/$name.err"
  counts[$name]=$(grep -oE 'Collected : [0-9]+' "$work/$name.err" | grep -oE '[0-9]+$')
done

if $update; then
  {
    echo "# Instructions (valgrind callgrind Ir) per workload, from benches/callgrind.sh --update."
    for w in "${workloads[@]}"; do name="${w%%|*}"; echo "$name ${counts[$name]}"; done
  } > "$baseline"
  cat "$baseline"
  exit 0
fi

status=0
printf '%-24s %15s %15s %8s\n' workload baseline now change
for w in "${workloads[@]}"; do
  name="${w%%|*}"
  base=$(awk -v n="$name" '$1 == n { print $2 }' "$baseline")
  now=${counts[$name]}
  if [ -z "$base" ]; then
    printf '%-24s %15s %15s %8s\n' "$name" "-" "$now" "new"
    continue
  fi
  change=$(awk -v a="$now" -v b="$base" 'BEGIN { printf "%+.2f%%", (a - b) * 100 / b }')
  printf '%-24s %15s %15s %8s\n' "$name" "$base" "$now" "$change"
  if awk -v a="$now" -v b="$base" 'BEGIN { exit !(a > b * 1.10) }'; then
    echo "  $name: more than 10 % over its baseline"
    status=1
  fi
done
exit $status
