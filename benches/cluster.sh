#!/usr/bin/env bash
# Cluster mode costs, measured with the release binary and a real nats-server on loopback:
#   1. events/s through one node, alone (--ephemeral) against one cluster node on JetStream,
#      VWAP at 100 events per frame with acks, alternating (ROUNDS rounds, medians), and the CPU
#      seconds per event of eddy (and of nats-server, in cluster mode) over the same feed;
#   2. recovery: a node holding about KEYS keys leaves (SIGTERM: it checkpoints every
#      partition), then another node starts and takes all the partitions: the time until it
#      owns them all with every key restored.
#
#   EDDY_NATS_SERVER=/path/to/nats-server bash benches/cluster.sh        # ROUNDS=3, KEYS=100000
#   3. (MARKS=1) the mark messages: one cluster node with a query on event time with
#      `on_timer` against the same query without it (both carry the producer's marks in each
#      event message; only the first makes the node send a mark message to every partition every
#      100 ms), paced at each of MARK_RATES (default "1000 max") events/s for MARK_SECONDS (10):
#      CPU milliseconds per second of eddy and nats-server, and mark messages per second.
#
#   LATEST="0 250ms" ... : one cluster run per [cluster] latest_interval in each round (default
#   250ms), to compare how often the latest values are written; RECOVERY=0 skips part 2,
#   THROUGHPUT=0 part 1.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
rounds="${ROUNDS:-3}"
latest_intervals="${LATEST:-250ms}"
keys="${KEYS:-100000}"
nats="${EDDY_NATS_SERVER:-$(command -v nats-server || true)}"
[ -x "$nats" ] || { echo "no nats-server: set EDDY_NATS_SERVER"; exit 1; }
cargo build --release --quiet --bin eddy
eddy="${CARGO_TARGET_DIR:-$root/target}/release/eddy"
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
# utime + stime of a process, in seconds.
cpu() { awk '{ printf "%.2f", ($14 + $15) / 100 }' "/proc/$1/stat"; }

# A fresh nats-server with JetStream; sets $nats_url and $nats_pid.
start_nats() {
  local store="$work/nats-$RANDOM"
  "$nats" -js -a 127.0.0.1 -p -1 -sd "$store" 2> "$work/nats.log" &
  nats_pid=$!
  pids+=("$nats_pid")
  for _ in $(seq 1 100); do
    nats_port="$(grep -o 'Listening for client connections on 127.0.0.1:[0-9]*' "$work/nats.log" | grep -o '[0-9]*$' || true)"
    if [ -n "$nats_port" ] && grep -q 'Server is ready' "$work/nats.log"; then
      nats_url="nats://127.0.0.1:$nats_port"
      return
    fi
    sleep 0.1
  done
  echo "nats-server did not start"; cat "$work/nats.log"; exit 1
}

# Starts `eddy serve` with extra flags; sets $port and $pid, logs to $work/serve.log.
serve() {
  port="$(free_port)"
  EDDY_LOG=info "$eddy" serve --listen "127.0.0.1:$port" --queries "${queries:-$work/queries}" "$@" \
    > /dev/null 2> "$work/serve-$port.log" &
  pid=$!
  pids+=("$pid")
  for _ in $(seq 1 100); do
    if curl -sf "http://127.0.0.1:$port/healthz" > /dev/null 2>&1; then return; fi
    sleep 0.1
  done
  echo "the server did not start"; cat "$work/serve-$port.log"; exit 1
}

stop() {
  kill -TERM "$1"
  wait "$1" 2>/dev/null || true
}

owned() { curl -s "http://127.0.0.1:$1/cluster" | python3 -c 'import sys, json; print(json.load(sys.stdin)["owned"])'; }
metric() { curl -s "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n { print $2 }'; }

if [ "${MARKS:-0}" = 1 ]; then
  echo "== 3. the mark messages: on_timer against none, one cluster node, $rounds rounds"
  mkdir -p "$work/q-plain" "$work/q-timers"
  cat > "$work/q-plain/ev.rhai" <<'Q'
let source = "trades";
let key_by = "symbol";
let time_field = "ts";
let lateness = "1s";
fn on_event(ev) { this.n = (this.n ?? 0) + 1; }
Q
  cp "$work/q-plain/ev.rhai" "$work/q-timers/ev.rhai"
  echo 'fn on_timer(t) { }' >> "$work/q-timers/ev.rhai"
  seconds="${MARK_SECONDS:-10}"
  for r in $(seq 1 "$rounds"); do
    for rate in ${MARK_RATES:-1000 max}; do
      for v in plain timers; do
        start_nats
        queries="$work/q-$v" serve --cluster "$nats_url" --node bench
        for _ in $(seq 1 100); do [ "$(owned "$port")" = 64 ] && break; sleep 0.1; done
        e0="$(cpu "$pid")"; n0="$(cpu "$nats_pid")"; t0="$(date +%s.%N)"
        report="$("$eddy" feed "ws://127.0.0.1:$port" --rate "$rate" --batch 100 --duration "${seconds}s" --json)"
        for _ in $(seq 1 300); do [ "$(metric "$port" eddy_cluster_consumer_lag)" = 0 ] && break; sleep 0.1; done
        e1="$(cpu "$pid")"; n1="$(cpu "$nats_pid")"; t1="$(date +%s.%N)"
        marks="$(metric "$port" eddy_cluster_mark_messages_total)"
        events="$(echo "$report" | python3 -c 'import sys, json; print(json.load(sys.stdin)["accepted"])')"
        stop "$pid"; stop "$nats_pid"
        python3 -c "
t = $t1 - $t0
print(f'round $r  rate $rate  $v: {$events} events in {t:.1f} s;' \
      f' eddy {($e1 - $e0) * 1e3 / t:.0f} ms CPU/s ({($e1 - $e0) * 1e6 / $events:.2f} µs/event),' \
      f' nats-server {($n1 - $n0) * 1e3 / t:.0f} ms CPU/s ({($n1 - $n0) * 1e6 / $events:.2f} µs/event),' \
      f' {$marks / t:.0f} mark messages/s')"
      done
    done
  done
fi
[ "${THROUGHPUT:-1}" = 0 ] && [ "${RECOVERY:-1}" = 0 ] && exit 0

if [ "${THROUGHPUT:-1}" != 0 ]; then
echo "== 1. events/s and CPU per event: alone against one cluster node, $rounds rounds"
declare -a alone clus
for r in $(seq 1 "$rounds"); do
  for mode in alone $(for l in $latest_intervals; do echo "cluster:$l"; done); do
    if [ "$mode" = alone ]; then
      serve --ephemeral
    else
      start_nats
      printf '[cluster]\nlatest_interval = "%s"\n' "${mode#cluster:}" > "$work/eddy.toml"
      serve --config "$work/eddy.toml" --cluster "$nats_url" --node bench
      for _ in $(seq 1 100); do [ "$(owned "$port")" = 64 ] && break; sleep 0.1; done
    fi
    e0="$(cpu "$pid")"; n0=0; [ "$mode" != alone ] && n0="$(cpu "$nats_pid")"
    report="$("$eddy" feed "ws://127.0.0.1:$port" --rate max --batch 100 --duration 8s --json)"
    # The owner may still be working through what was acknowledged: wait for it.
    if [ "$mode" != alone ]; then
      for _ in $(seq 1 300); do [ "$(metric "$port" eddy_cluster_consumer_lag)" = 0 ] && break; sleep 0.1; done
    fi
    e1="$(cpu "$pid")"; n1=0; [ "$mode" != alone ] && n1="$(cpu "$nats_pid")"
    read -r eps events < <(echo "$report" | python3 -c 'import sys, json; r = json.load(sys.stdin); print(int(r["events_per_second"]), r["accepted"])')
    stop "$pid"
    [ "$mode" != alone ] && stop "$nats_pid"
    per_event="$(python3 -c "print(f'{($e1 - $e0) * 1e6 / $events:.1f}')")"
    nats_per_event="$(python3 -c "print(f'{($n1 - $n0) * 1e6 / $events:.1f}')")"
    echo "round $r  $mode  $eps events/s  eddy $per_event µs CPU/event  nats-server $nats_per_event µs CPU/event"
    if [ "$mode" = alone ]; then alone+=("$eps"); else clus+=("$mode=$eps"); fi
  done
done
median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
ma="$(median "${alone[@]}")"
for l in $latest_intervals; do
  mc="$(median $(printf '%s\n' "${clus[@]}" | awk -F= -v m="cluster:$l" '$1 == m { print $2 }'))"
  echo "median: alone $ma, cluster (latest_interval $l) $mc events/s: cluster/alone = $(python3 -c "print(f'{$mc / $ma:.2f}')")"
done
fi
[ "${RECOVERY:-1}" = 0 ] && exit 0

echo "== 2. recovery of about $keys keys from partition checkpoints"
start_nats
serve --cluster "$nats_url" --node one --checkpoint-interval 1h
one_port="$port"; one_pid="$pid"
for _ in $(seq 1 100); do [ "$(owned "$one_port")" = 64 ] && break; sleep 0.1; done
seconds=$(python3 -c "print(max(5, int($keys * 3 / 100000)))")
# A loaded machine may take longer than the feed's default 1 s to ack a frame through JetStream.
"$eddy" feed "ws://127.0.0.1:$one_port" --rate max --batch 100 --keys "$keys" --duration "${seconds}s" \
  --timeout 30s --json > /dev/null
for _ in $(seq 1 600); do [ "$(metric "$one_port" eddy_cluster_consumer_lag)" = 0 ] && break; sleep 0.1; done
held="$(curl -s "http://127.0.0.1:$one_port/queries" | python3 -c 'import sys, json; q = json.load(sys.stdin); q = q if isinstance(q, list) else q["queries"]; print(sum(x["keys"] for x in q))')"
echo "keys held: $held"
t0="$(date +%s.%N)"
stop "$one_pid"
t1="$(date +%s.%N)"
serve --cluster "$nats_url" --node two --checkpoint-interval 1h
two_port="$port"
for _ in $(seq 1 1200); do
  if [ "$(owned "$two_port")" = 64 ] && [ "$(metric "$two_port" eddy_cluster_consumer_lag)" = 0 ]; then
    restored="$(metric "$two_port" eddy_cluster_restored_keys_total)"
    [ "${restored:-0}" -ge "$held" ] 2>/dev/null && break
  fi
  sleep 0.05
done
t2="$(date +%s.%N)"
echo "node one left (checkpoint of every partition, leases given up) in $(python3 -c "print(f'{$t1 - $t0:.2f}')") s;" \
  "node two, started then, owned every partition with $(metric "$two_port" eddy_cluster_restored_keys_total) keys restored" \
  "$(python3 -c "print(f'{$t2 - $t1:.2f}')") s later (of which 1 s is its settle time)"
grep -o 'partitions checkpointed.*' "$work/serve-$one_port.log" | sed 's/\x1b\[[0-9;]*m//g' || true
