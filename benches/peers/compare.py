#!/usr/bin/env python3
"""Runs eddy and its peers (Node.js `ws`, Python `websockets`) under the same `eddy feed` load,
alternating, for several rounds, and prints one table of medians with the ratio to eddy.

Every server runs the same job: per-symbol VWAP over trade events, acks for every frame, results
pushed to one subscriber (`eddy probe`, which also measures latency from send to receive).
Measurements per server and round:
  - max events/s with 1 event per frame and with 100 events per frame (acked events / s);
  - latency p50/p99 at a fixed rate (default 10 000 events/s, 10 events per frame);
  - latency p50/p99 at eddy's half maximum sustained rate of the round (100 events per frame),
    the same absolute rate for every server;
and for eddy alone, fan-out runs: 1,000 and 10,000 subscribers (--fanout) on vwap in mode `all`
at fixed rates, with the CPU seconds the server, the feed and the probe used; a run spelled
`SUBSCRIBERS@RATE+deflate` has the probe offer permessage-deflate, as browsers do.
The probe samples (the first item of each batch), so that it is not the bottleneck.

Only loopback addresses are used; every run is bounded in time. Use run.sh, which installs the
peers' packages and builds eddy first.
"""
import argparse
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


class Server:
    def __init__(self, name, argv):
        self.name, self.argv, self.proc = name, argv, None

    def __enter__(self):
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE)
        return self

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def eddy_cmd(eddy, *args):
    return [eddy, *args]


def feed(eddy, port, rate, batch, seconds, timeout="1s"):
    out = subprocess.run(
        eddy_cmd(eddy, "feed", f"ws://127.0.0.1:{port}", "--rate", str(rate), "--batch", str(batch),
                 "--duration", f"{seconds}s", "--json", "--timeout", timeout),
        capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"feed failed: {out.stderr}")
    return json.loads(out.stdout)


def probe_start(eddy, port, seconds, subscribers=1, deflate=False):
    args = ["probe", f"ws://127.0.0.1:{port}", "--topic", "vwap", "--duration", f"{seconds}s", "--json"]
    if subscribers > 1:
        args += ["--subscribers", str(subscribers)]
    if deflate:
        args += ["--deflate"]
    proc = subprocess.Popen(eddy_cmd(eddy, *args), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if subscribers == 1:
        time.sleep(0.5)
    else:
        wait_subscribed(port, subscribers, proc)
    return proc


def metric(port, name):
    """A sample's value from eddy's /metrics (summed over labels), or None."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := c.recv(65536):
            data += chunk
    values = [float(line.split()[-1]) for line in data.decode().splitlines()
              if line.startswith(name) and not line.startswith("#")]
    return sum(values) if values else None


def wait_subscribed(port, subscribers, proc, timeout=120):
    """Until eddy counts `subscribers` subscriptions (every probe connection has subscribed)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (metric(port, "eddy_subscribers") or 0) >= subscribers:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{subscribers} subscribers did not all subscribe within {timeout} s")


def probe_result(proc, timeout):
    out, _ = proc.communicate(timeout=timeout)
    return json.loads(out)


def cpu_seconds(pid):
    """User + system CPU seconds a running process has used (/proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(eddy, port, rate, batch, seconds):
    """One feed run with a probe subscribed; returns (feed report, probe report)."""
    probe = probe_start(eddy, port, seconds + 1)
    report = feed(eddy, port, rate, batch, seconds)
    return report, probe_result(probe, seconds + 90)


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def fan_out(eddy, server, port, subscribers, rate, seconds, deflate=False):
    """`subscribers` probe connections on vwap while the feed sends at `rate`; with the CPU
    seconds the server, the feed and the probe each used during the run."""
    server_cpu = cpu_seconds(server.proc.pid)
    before = children_cpu()
    probe = probe_start(eddy, port, seconds + 1, subscribers=subscribers, deflate=deflate)
    server_cpu_connected = cpu_seconds(server.proc.pid)
    # Thousands of subscribers can hold acks back longer than the feed's usual 1 s of silence.
    sent = feed(eddy, port, rate, 100, seconds, timeout="30s")
    feed_cpu = children_cpu() - before
    fan = probe_result(probe, seconds + 300)
    probe_cpu = children_cpu() - before - feed_cpu
    fan["events_sent"] = sent["events"]
    fan["events_per_second"] = acked_rate(sent)
    fan["cpu_seconds"] = {"server": round(cpu_seconds(server.proc.pid) - server_cpu_connected, 2),
                          "server_while_connecting": round(server_cpu_connected - server_cpu, 2),
                          "feed": round(feed_cpu, 2), "probe": round(probe_cpu, 2)}
    return fan


def acked_rate(report):
    return report["accepted"] / report["seconds"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eddy", default=os.path.join(ROOT, "target", "release", "eddy"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--latency-rate", type=int, default=10_000)
    ap.add_argument("--fanout", default="1000@50000,1000@5000,1000@5000+deflate,10000@500",
                    help="eddy's fan-out runs, comma-separated: SUBSCRIBERS[@EVENTS_PER_S][+deflate] (the rate defaults "
                         "to --fanout-rate; 0: skip)")
    ap.add_argument("--fanout-rate", type=int, default=50_000)
    ap.add_argument("--only", default="eddy,node,python")
    ap.add_argument("--baseline", help="another eddy binary to run as a server too (`eddy-base`), alternating with "
                                       "the others in every round, for before/after ratios from the same run; "
                                       "the feed and the probe are always --eddy's")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "latest.json"))
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                    help="another eddy server, with extra `eddy serve` arguments (e.g. 'w1=--workers 1'), "
                         "alternating with the others in every round; repeatable")
    args = ap.parse_args()

    queries = tempfile.mkdtemp(prefix="eddy-peer-queries-")
    with open(os.path.join(ROOT, "queries", "vwap.rhai")) as src, open(os.path.join(queries, "vwap.rhai"), "w") as dst:
        dst.write(src.read())
    python = os.path.join(HERE, ".venv", "bin", "python")
    servers = {
        "eddy": lambda port: [args.eddy, "serve", "--ephemeral", "--listen", f"127.0.0.1:{port}", "--queries", queries,
                              "--admin-token", "peer-bench-token"],
        "node": lambda port: ["node", os.path.join(HERE, "node", "server.js"), str(port)],
        "python": lambda port: [python, os.path.join(HERE, "python", "server.py"), str(port)],
    }
    if args.baseline:
        servers["eddy-base"] = lambda port: [args.baseline, *servers["eddy"](port)[1:]]
    variants = []
    for v in args.variant:
        name, extra = v.split("=", 1)
        servers[name] = lambda port, extra=extra: [*servers["eddy"](port), *extra.split()]
        variants.append(name)
    names = [n for n in args.only.split(",") if n in servers]
    for extra_name in reversed((["eddy-base"] if args.baseline else []) + variants):
        if extra_name not in names:
            names.insert(1, extra_name)
    results = {n: {"max_1": [], "max_100": [], "p50_us": [], "p99_us": []} for n in names}
    extra = {"half_max_p50_us": [], "half_max_p99_us": [], "half_max_rate": []}
    # Every server at eddy's half-max rate of the same round (eddy runs first in a round).
    at_half = {n: {"p50_us": [], "p99_us": [], "acked_per_s": []} for n in names}
    s = args.seconds
    for r in range(args.rounds):
        for name in names:
            port = free_port()
            with Server(name, servers[name](port)):
                wait_port(port)
                one, _ = measure(args.eddy, port, "max", 1, s)
                hundred, _ = measure(args.eddy, port, "max", 100, s)
                _, lat = measure(args.eddy, port, args.latency_rate, 10, s)
                res = results[name]
                res["max_1"].append(acked_rate(one))
                res["max_100"].append(acked_rate(hundred))
                res["p50_us"].append(lat["p50_us"])
                res["p99_us"].append(lat["p99_us"])
                line = (f"round {r + 1} {name:>6}: {acked_rate(one):>9.0f} ev/s @1, {acked_rate(hundred):>9.0f} ev/s @100, "
                        f"p50 {lat['p50_us'] / 1000:.3f} ms p99 {lat['p99_us'] / 1000:.3f} ms @{args.latency_rate}/s")
                if name == "eddy":
                    half = int(acked_rate(hundred) / 2)
                    extra["half_max_rate"].append(half)
                if extra["half_max_rate"]:
                    half = extra["half_max_rate"][-1]
                    fed, hl = measure(args.eddy, port, half, 100, s)
                    at_half[name]["p50_us"].append(hl["p50_us"])
                    at_half[name]["p99_us"].append(hl["p99_us"])
                    at_half[name]["acked_per_s"].append(acked_rate(fed))
                    if name == "eddy":
                        extra["half_max_p50_us"].append(hl["p50_us"])
                        extra["half_max_p99_us"].append(hl["p99_us"])
                    line += (f"; at {half}/s (eddy's half max, @100): {acked_rate(fed):.0f} acked/s, "
                             f"p50 {hl['p50_us'] / 1000:.3f} ms p99 {hl['p99_us'] / 1000:.3f} ms")
                print(line, file=sys.stderr, flush=True)

    fans = []
    for run in str(args.fanout).split(","):
        run, _, extension = run.partition("+")
        subscribers, _, rate = run.partition("@")
        subscribers, rate = int(subscribers), int(rate or args.fanout_rate)
        deflate = extension == "deflate"
        if subscribers <= 0 or "eddy" not in names:
            continue
        port = free_port()
        with Server("eddy", servers["eddy"](port)) as server:
            wait_port(port)
            fan = fan_out(args.eddy, server, port, subscribers, rate, s, deflate)
            fan["rate_asked"] = rate
            fan["deflate"] = deflate
            fans.append(fan)
            print(f"fan-out {subscribers}: {json.dumps(fan)}", file=sys.stderr, flush=True)

    med = lambda xs: statistics.median(xs) if xs else float("nan")
    table = {n: {k: med(v) for k, v in res.items()} for n, res in results.items()}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"rounds": args.rounds, "seconds": s, "results": results, "medians": table,
                   "eddy_half_max": extra, "at_eddy_half_max": at_half, "fanout": fans}, f, indent=2)

    base = table.get("eddy")
    print(f"Medians of {args.rounds} rounds, {s} s each; latency at {args.latency_rate} events/s (10 per frame).\n")
    print("| server | events/s, 1 per frame | events/s, 100 per frame | p50 latency | p99 latency |")
    print("|---|---|---|---|---|")
    for n, t in table.items():
        def ratio(k, higher_better=True):
            if not base or n == "eddy" or not t[k]:
                return ""
            x = base[k] / t[k] if higher_better else t[k] / base[k]
            return f" (eddy {x:.1f}x)"
        print(f"| {n} | {t['max_1']:,.0f}{ratio('max_1')} | {t['max_100']:,.0f}{ratio('max_100')} | "
              f"{t['p50_us'] / 1000:.3f} ms{ratio('p50_us', False)} | {t['p99_us'] / 1000:.3f} ms{ratio('p99_us', False)} |")
    if extra["half_max_rate"]:
        print(f"\nAt eddy's half maximum sustained rate (median {med(extra['half_max_rate']):,.0f} events/s, "
              f"100 per frame), every server at the same rate:\n")
        print("| server | acked events/s | p50 latency | p99 latency |")
        print("|---|---|---|---|")
        for n, t in at_half.items():
            if t["p99_us"]:
                print(f"| {n} | {med(t['acked_per_s']):,.0f} | {med(t['p50_us']) / 1000:.3f} ms | "
                      f"{med(t['p99_us']) / 1000:.3f} ms |")
    for fan in fans:
        cpu = fan["cpu_seconds"]
        how = " with permessage-deflate" if fan.get("deflate") else ""
        print(f"\neddy fan-out{how}: {fan['subscribers']:,} subscribers on vwap, asked {fan['rate_asked']:,} events/s, "
              f"acked {fan['events_per_second']:,.0f} events/s "
              f"for {s} s: each received {fan['min_items']:,}..{fan['max_items']:,} of {fan['events_sent']:,} items, "
              f"{fan['dropped']} dropped, {fan['seq_gaps']} seq gaps; latency p50 {fan['p50_us'] / 1000:.1f} ms, "
              f"p99 {fan['p99_us'] / 1000:.1f} ms; {fan['wire_bytes'] / 1e6:,.0f} MB over the sockets; "
              f"CPU seconds: server {cpu['server']} "
              f"(+{cpu['server_while_connecting']} connecting), feed {cpu['feed']}, probe {cpu['probe']}")


if __name__ == "__main__":
    main()
