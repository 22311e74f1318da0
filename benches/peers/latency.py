"""Latency only, eddy against Node `ws` (and other eddy builds), alternating for several rounds:
p50/p99 at a fixed rate in frames of 10, and optionally at a second rate in frames of 100. The
servers, feed and probe are compare.py's; the max-rate runs are left out, so a round takes
seconds. Run benches/peers/run.sh once first (it installs Node's `ws` and builds eddy).

usage: python3 benches/peers/latency.py ROUNDS RATE [RATE_AT_100]
  BASE=/path/to/old/eddy   also run that build, as `base`
  ONLY=eddy,node           which servers
"""
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import compare as c  # noqa: E402

rounds, rate = int(sys.argv[1]), int(sys.argv[2])
high = int(sys.argv[3]) if len(sys.argv) > 3 else 0
eddy = os.path.join(c.ROOT, "target", "release", "eddy")
queries = tempfile.mkdtemp(prefix="eddy-latency-queries-")
with open(os.path.join(c.ROOT, "queries", "vwap.rhai")) as src, open(os.path.join(queries, "vwap.rhai"), "w") as dst:
    dst.write(src.read())
serve = ["serve", "--ephemeral", "--queries", queries, "--admin-token", "peer-bench-token"]
servers = {
    "eddy": lambda port: [eddy, *serve, "--listen", f"127.0.0.1:{port}"],
    "node": lambda port: ["node", os.path.join(HERE, "node", "server.js"), str(port)],
}
if os.environ.get("BASE"):
    servers["base"] = lambda port: [os.environ["BASE"], *serve, "--listen", f"127.0.0.1:{port}"]
names = [n for n in os.environ.get("ONLY", ",".join(servers)).split(",") if n in servers]
results = {n: [] for n in names}
for r in range(rounds):
    for name in names:
        port = c.free_port()
        with c.Server(name, servers[name](port)):
            c.wait_port(port)
            _, lat = c.measure(eddy, port, rate, 10, 5)
            row = [lat["p50_us"], lat["p99_us"]]
            if high:
                fed, hl = c.measure(eddy, port, high, 100, 5)
                row += [hl["p50_us"], hl["p99_us"], c.acked_rate(fed)]
            results[name].append(row)
            print(f"round {r + 1} {name}: {row}", file=sys.stderr, flush=True)
cols = ["p50 µs", "p99 µs"] + ([f"p50 µs @{high}", f"p99 µs @{high}", "acked/s"] if high else [])
print(f"medians of {rounds} rounds, {rate}/s in frames of 10" + (f", {high}/s in frames of 100" if high else ""))
print("| server | " + " | ".join(cols) + " |")
for name in names:
    medians = [statistics.median(col) for col in zip(*results[name])]
    print(f"| {name} | " + " | ".join(f"{m:,.0f}" for m in medians) + " |")
