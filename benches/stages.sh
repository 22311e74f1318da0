#!/usr/bin/env bash
# Where an event's latency goes inside eddy: one server (vwap), one `eddy probe` subscriber and
# `eddy feed` at a fixed rate, then the stage summaries from /metrics (received -> handed to the
# hub, published -> on the socket, received -> on the socket) beside the probe's end to end.
# usage: bash benches/stages.sh [RATE=10000] [PER_FRAME=10] [extra `eddy serve` arguments...]
# EDDY=path/to/eddy picks the build (default: target/release/eddy, built if missing).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
eddy="${EDDY:-$root/target/release/eddy}"
[ -x "$eddy" ] || (cd "$root" && cargo build --release --quiet --bin eddy)
rate="${1:-10000}"; per_frame="${2:-10}"; shift $(( $# < 2 ? $# : 2 ))
work="$(mktemp -d)"; trap 'kill "$server" 2>/dev/null; rm -rf "$work"' EXIT
mkdir "$work/q"; cp "$root/queries/vwap.rhai" "$work/q/"
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$eddy" serve --ephemeral --listen "127.0.0.1:$port" --queries "$work/q" --admin-token stages-token "$@" \
  >"$work/serve.log" 2>&1 &
server=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
"$eddy" probe "ws://127.0.0.1:$port" --topic vwap --duration 6s --json >"$work/probe.json" 2>/dev/null &
probe=$!
sleep 0.5
"$eddy" feed "ws://127.0.0.1:$port" --rate "$rate" --batch "$per_frame" --duration 5s --json >/dev/null
wait "$probe"
python3 - "$port" "$work/probe.json" <<'PY'
import json, sys, urllib.request
probe = json.load(open(sys.argv[2]))
print(f"probe (send -> receive): p50 {probe['p50_us']:.0f} us, p99 {probe['p99_us']:.0f} us")
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics").read().decode()
for line in text.splitlines():
    if line.startswith(("eddy_ingest_to_emit", "eddy_emit_to_socket", "eddy_ingest_to_socket", "eddy_socket_direct")):
        if "quantile" not in line or 'quantile="0.5"' in line or 'quantile="0.99"' in line:
            print(line)
PY
