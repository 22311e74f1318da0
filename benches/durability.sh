#!/usr/bin/env bash
# Durability costs, measured with the release binary on loopback:
#   1. events/s with the ingest log (fsync always, group commit) against --ephemeral, VWAP at
#      100 events per frame, alternating in the same run (ROUNDS rounds, medians);
#   2. a checkpoint of KEYS keys: its time, and the longest a shard stopped to copy its state;
#   3. recovery: a restart loading that checkpoint.
#   4. latency while checkpoints run: with KEYS keys held, a feed at LAT_RATE events/s and a
#      probe on vwap, once with a checkpoint every 2 s and once with none (same data, same
#      rate): p50/p99/max from send to receipt, and the checkpoints' pauses.
#
#   bash benches/durability.sh                 # ROUNDS=3, KEYS=1000000
#   ROUNDS=1 KEYS=100000 bash benches/durability.sh   # quick
#   STEPS="2 4" bash benches/durability.sh   # some steps only (4 needs 2's keys)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
rounds="${ROUNDS:-3}"
keys="${KEYS:-1000000}"
lat_rate="${LAT_RATE:-20000}"
steps=" ${STEPS:-1 2 3 4} "
step() { [[ "$steps" == *" $1 "* ]]; }
# Where step 2 leaves its keys, for steps 3 and 4.
data=""
cargo build --release --quiet --bin eddy
eddy="$root/target/release/eddy"
work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/queries"
cp queries/vwap.rhai "$work/queries/"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Starts `eddy serve` with extra flags; sets $port and $pid, logs to $work/serve.log.
serve() {
  port="$(free_port)"
  EDDY_LOG=info "$eddy" serve --listen "127.0.0.1:$port" --queries "$work/queries" "$@" \
    > /dev/null 2> "$work/serve.log" &
  pid=$!
  pids+=("$pid")
  for _ in $(seq 1 100); do
    if curl -sf "http://127.0.0.1:$port/healthz" > /dev/null 2>&1; then return; fi
    sleep 0.1
  done
  echo "the server did not start"; cat "$work/serve.log"; exit 1
}

stop() {
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
}

metric() { curl -s "http://127.0.0.1:$port/metrics" | awk -v n="$1" '$1 == n { print $2 }'; }

if step 1; then
echo "== 1. events/s, ingest log (fsync always) against --ephemeral, $rounds rounds"
declare -a eph logd
for r in $(seq 1 "$rounds"); do
  for mode in ephemeral log; do
    if [ "$mode" = ephemeral ]; then serve --ephemeral; else serve --data-dir "$work/data-$r"; fi
    eps="$("$eddy" feed "ws://127.0.0.1:$port" --rate max --batch 100 --duration 8s --json \
      | python3 -c 'import sys, json; print(int(json.load(sys.stdin)["events_per_second"]))')"
    stop
    echo "round $r  $mode  $eps events/s"
    if [ "$mode" = ephemeral ]; then eph+=("$eps"); else logd+=("$eps"); fi
  done
done
median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
me="$(median "${eph[@]}")"
ml="$(median "${logd[@]}")"
echo "median: ephemeral $me, log $ml events/s: log/ephemeral = $(python3 -c "print(f'{$ml / $me:.2f}')")"
fi

if step 2; then
echo "== 2. a checkpoint of about $keys keys"
data="$work/data-keys"
serve --data-dir "$data" --checkpoint-interval 1h
# Random symbols out of $keys: enough events that nearly every one is seen.
seconds=$(python3 -c "print(max(5, int($keys * 3 / 100000)))")
"$eddy" feed "ws://127.0.0.1:$port" --rate max --batch 100 --keys "$keys" --duration "${seconds}s" \
  --json > /dev/null
held="$(curl -s "http://127.0.0.1:$port/queries" | python3 -c 'import sys, json; q = json.load(sys.stdin); q = q if isinstance(q, list) else q["queries"]; print(sum(x["keys"] for x in q))')"
echo "keys held: $held"
stop
grep -o 'checkpoint at shutdown.*' "$work/serve.log" | sed 's/\x1b\[[0-9;]*m//g'
ls -l "$data/checkpoints" | awk '/msgpack/ { print "checkpoint file:", $5, "bytes" }'
fi

if step 3; then
echo "== 3. recovery of that checkpoint"
serve --data-dir "$data" --checkpoint-interval 1h
grep -o 'recovered.*' "$work/serve.log" | sed 's/\x1b\[[0-9;]*m//g'
stop
fi

if step 4; then
echo "== 4. latency at $lat_rate events/s over $keys keys, with a checkpoint every 2 s and with none"
for every in 2s 1h; do
  serve --data-dir "$data" --checkpoint-interval "$every"
  "$eddy" probe "ws://127.0.0.1:$port" --topic vwap --duration 20s --json > "$work/probe.json" &
  probe=$!
  sleep 0.5
  "$eddy" feed "ws://127.0.0.1:$port" --rate "$lat_rate" --batch 10 --keys "$keys" --duration 20s \
    --json > /dev/null
  wait "$probe" || true
  checkpoints="$(metric eddy_checkpoints_total)"
  pause="$(metric eddy_checkpoint_last_pause_seconds)"
  stop
  python3 - "$work/probe.json" "$every" "$checkpoints" "$pause" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
ms = lambda us: us / 1000
print(f"checkpoint every {sys.argv[2]}: {r['items']} items, p50 {ms(r['p50_us']):.2f} ms, "
      f"p99 {ms(r['p99_us']):.2f} ms, p999 {ms(r['p999_us']):.2f} ms, max {ms(r['max_us']):.1f} ms; "
      f"{sys.argv[3] or 0} checkpoints, last pause {float(sys.argv[4] or 0) * 1000:.1f} ms")
PY
done
fi
