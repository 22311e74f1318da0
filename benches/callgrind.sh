#!/usr/bin/env bash
# Instruction-count regression guard: fixed workloads of the release binary under
# `valgrind --tool=callgrind`, which counts instructions, not seconds, so the numbers repeat on a
# busy machine. Each count is compared with benches/callgrind-baseline.txt; more than 10 % above
# its baseline fails.
#
#   bash benches/callgrind.sh            # check (what .ci/run does)
#   bash benches/callgrind.sh --update   # record new baselines (after an intended change)
#
# Each shipped query the compiler handles is measured on both engines (`--engine auto` and
# `--engine interpreter`), and a query that does nothing shows the cost outside the script.
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
eddy="${CARGO_TARGET_DIR:-$root/target}/release/eddy"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$eddy" generate --scenario trades --count 20000 --seed 1 > "$work/trades.ndjson"
"$eddy" generate --scenario sensors --count 20000 --seed 1 > "$work/sensors.ndjson"
"$eddy" generate --scenario games --count 20000 --seed 1 > "$work/games.ndjson"
"$eddy" generate --scenario social --count 2000 --seed 1 > "$work/social.ndjson"
"$eddy" generate --scenario sensors --count 2000 --seed 1 > "$work/sensors2k.ndjson"

# A query that does nothing: what parsing, routing and the call itself cost.
cat > "$work/noop.rhai" <<'EOF_NOOP'
let source = "trades";
let key_by = "symbol";
fn on_event(ev) { }
EOF_NOOP

# name | input | engine | queries (a query without a folder is in queries/)
workloads=(
  "vwap_20k|trades|auto|vwap"
  "vwap_interpreted_20k|trades|interpreter|vwap"
  "noop_20k|trades|auto|$work/noop.rhai"
  "noop_interpreted_20k|trades|interpreter|$work/noop.rhai"
  "trades_all_20k|trades|auto|vwap ohlc_1m price_alerts"
  "asof_join_20k|trades|auto|asof_join"
  "asof_join_interpreted_20k|trades|interpreter|asof_join"
  "price_alerts_20k|trades|auto|price_alerts"
  "price_alerts_interpreted_20k|trades|interpreter|price_alerts"
  "trade_anomaly_20k|trades|auto|trade_anomaly"
  "trade_anomaly_interpreted_20k|trades|interpreter|trade_anomaly"
  "ohlc_1m_20k|trades|auto|ohlc_1m"
  "ohlc_1m_interpreted_20k|trades|interpreter|ohlc_1m"
  "sensor_anomaly_20k|sensors|auto|sensor_anomaly"
  "sensor_anomaly_interpreted_20k|sensors|interpreter|sensor_anomaly"
  "sensor_failure_2k|sensors2k|auto|sensor_failure"
  "sensor_failure_interpreted_2k|sensors2k|interpreter|sensor_failure"
  "player_stats_20k|games|auto|player_stats"
  "player_stats_interpreted_20k|games|interpreter|player_stats"
  "player_churn_20k|games|auto|player_churn"
  "player_churn_interpreted_20k|games|interpreter|player_churn"
  "hashtag_sentiment_2k|social|auto|hashtag_sentiment"
  "hashtag_sentiment_interpreted_2k|social|interpreter|hashtag_sentiment"
  # Not a shipped query: the compiler's hidden-query check, in the shipped queries' style.
  "order_flow_20k|trades|auto|tests/hidden/order_flow.rhai"
  "order_flow_interpreted_20k|trades|interpreter|tests/hidden/order_flow.rhai"
  # Not shipped either: rolling statistics with the standard math functions (`sqrt`, `min`, ...).
  "running_stats_20k|trades|auto|tests/hidden/running_stats.rhai"
  "running_stats_interpreted_20k|trades|interpreter|tests/hidden/running_stats.rhai"
  # Not shipped either: words of a text against constant lists (`split`, `contains`).
  "word_mood_2k|social|auto|tests/hidden/word_mood.rhai"
  "word_mood_interpreted_2k|social|interpreter|tests/hidden/word_mood.rhai"
  # Not shipped either: a table of constants read by index in a loop.
  "fee_tiers_20k|trades|auto|tests/hidden/fee_tiers.rhai"
  "fee_tiers_interpreted_20k|trades|interpreter|tests/hidden/fee_tiers.rhai"
)

# Two workloads at a time (the machines have 2 cores): an instruction count does not depend on
# what else runs.
run_one() {
  local name="$1" input="$2" engine="$3" queries="$4" args=() q
  for q in $queries; do
    case "$q" in */*) args+=("$q") ;; *) args+=("queries/$q.rhai") ;; esac
  done
  EDDY_LOG=error valgrind --tool=callgrind --callgrind-out-file="$work/$name.out" \
    "$eddy" run "${args[@]}" --engine "$engine" --input "$work/$input.ndjson" > /dev/null 2> "$work/$name.err"
}
for w in "${workloads[@]}"; do
  IFS='|' read -r name input engine queries <<< "$w"
  while [ "$(jobs -rp | wc -l)" -ge 2 ]; do wait -n; done
  run_one "$name" "$input" "$engine" "$queries" &
done
wait
declare -A counts
for w in "${workloads[@]}"; do
  name="${w%%|*}"
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
