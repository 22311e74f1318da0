#!/usr/bin/env python3
"""Soak and chaos runner for eddy: a long run at a steady load that shows whether anything leaks
or is lost. Use soak.sh, which builds eddy (release) and the chart's venv first.

What it does, on loopback only and bounded by --duration:
  1. Measures the maximum rate: `eddy feed --rate max` (trades, --batch events per frame) for
     --measure seconds against a throwaway server with the shipped queries.
  2. Starts `eddy serve` with the shipped queries (and models), two `eddy probe --reconnect` on
     vwap (mode `all` and mode `latest`, both checking vwap's per-key `trades` count), a trades
     feed at --fraction of the maximum and small feeds of the other scenarios (sensors, social,
     games), all with `--reconnect`.
  3. Every --sample seconds records the server's resident memory, open file descriptors and
     threads (/proc), its shard queue depths and counters (/metrics), and the probes' p50/p99
     over the interval.
  4. With --chaos, stops the server with SIGTERM (with --durable: SIGTERM or, --kill-share of
     the time, SIGKILL) at random intervals and starts a new one on the same port (and data
     directory); records each restart's shutdown time and recovery time (signal to the new
     server ingesting again).
  5. At the end prints a table, draws a PNG chart (memory, p99, queue depth over time) and checks:
     - nothing lost. Without --chaos: every event a feed sent was acknowledged as accepted; each
       query handled (events + late + skipped) exactly the events accepted on its sources; the
       `all` probe received every vwap item the server emitted, with no seq gap, no drop, no count
       gap or repeat, and vwap's counts add up to the trades accepted. With --chaos, the loss the
       current guarantees allow: a SIGTERM hands every acknowledged event's results to the
       subscribers before the server exits, and state starts afresh after a restart (no
       durability yet). So vwap's counts, summed over the server lifetimes, lie between the trades
       acknowledged and the trades sent (events in flight at a restart, sent but never
       acknowledged, may or may not have been handled); no count repeats within a lifetime.
       With --durable (ephemeral otherwise) a restart, even a SIGKILL, resumes every key's state
       and the `all` probe resumes its stream from its last position: every reconnect must
       resume (none `gone`), and vwap's counts, rising by one per trade through every restart,
       must end between the trades acknowledged and sent;
     - memory: the least-squares slope of resident memory after warm-up, less the bytes the
       topics keep for resuming subscribers (`eddy_replay_bytes`: bounded by replay_bytes a topic,
       and filling over minutes on a slow topic), times the time it spans, is at most
       max(--rss-noise MiB, --max-slope MiB/hour x span) (without --chaos);
     - file descriptors and threads at the end are no more than after warm-up (+2) (without
       --chaos).
Exit status 0 when every check passes, 1 otherwise. Results go to --out (results.json,
samples.csv, soak.png).
"""
import argparse
import csv
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOKEN = "soak-admin-token"
OTHER_FEEDS = ["sensors", "social", "games"]


def parse_duration(text):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"duration {text!r}: e.g. 90s, 10m, 1h")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    return float(m.group(1)) * scale


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
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port}")


def http_get(port, path, timeout=5):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return r.read().decode()


def metrics(port):
    """/metrics as {sample name with labels: value}."""
    out = {}
    for line in http_get(port, "/metrics").splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def proc_stats(pid):
    rss = threads = None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds, threads


class Server:
    """`eddy serve` on a fixed port with the shipped queries; restartable."""

    def __init__(self, eddy, port, queries, models, log, data=None):
        # In memory, or (`data`) durable with a data directory: then a restart resumes every
        # key's state, and the probes resume their streams from their positions.
        store = ["--data-dir", data] if data else ["--ephemeral"]
        self.argv = [eddy, "serve", *store, "--listen", f"127.0.0.1:{port}", "--queries",
                     queries, "--models", models, "--admin-token", TOKEN]
        self.port, self.log, self.proc = port, log, None

    def start(self):
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=self.log)
        wait_port(self.port)

    def stop(self, timeout=60):
        """SIGTERM; returns (seconds to exit, exit code)."""
        t0 = time.time()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        return time.time() - t0, code

    def kill(self):
        """SIGKILL; returns (seconds to exit, exit code)."""
        t0 = time.time()
        self.proc.kill()
        code = self.proc.wait()
        return time.time() - t0, code


class Tool:
    """An `eddy feed` or `eddy probe` with --json; collects its interval lines and its report."""

    def __init__(self, name, argv):
        self.name, self.intervals, self.report = name, [], None
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.errors = []
        threading.Thread(target=self._stderr, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "interval" in msg:
                self.intervals.append(msg["interval"])
            else:
                self.report = msg

    def _stderr(self):
        for line in self.proc.stderr:
            self.errors.append(line.rstrip())

    def latest(self):
        return self.intervals[-1] if self.intervals else None

    def finish(self, timeout, term=False):
        if term and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
            self.errors.append(f"{self.name}: killed after {timeout} s")
        self.reader.join(timeout=5)
        return code


def slope_per_hour(points):
    """Least-squares slope of (seconds, value) points, per hour."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return 0.0
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx * 3600


def chart(path, samples, restarts, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is missing: no chart; soak.sh installs it in a venv)")
        return False
    t = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    axes[0].plot(t, [s["rss_mib"] for s in samples], marker=".", color="tab:blue", label="resident")
    axes[0].plot(t, [s["replay_mib"] for s in samples], marker=".", color="tab:gray", label="replay rings")
    axes[0].set_ylabel("memory (MiB)")
    axes[0].legend(loc="lower right")
    axes[0].set_ylim(bottom=0)
    axes[1].plot(t, [s["p99_all_ms"] for s in samples], marker=".", label="p99, mode all")
    axes[1].plot(t, [s["p99_latest_ms"] for s in samples], marker=".", label="p99, mode latest")
    axes[1].plot(t, [s["p50_all_ms"] for s in samples], marker=".", label="p50, mode all")
    axes[1].set_ylabel("send → receive (ms)")
    axes[1].set_ylim(bottom=0)
    axes[1].legend(loc="upper right")
    axes[2].plot(t, [s["queue_max"] for s in samples], marker=".", color="tab:red", label="max shard queue")
    ax2 = axes[2].twinx()
    ax2.plot(t, [s["ingest_per_s"] for s in samples], marker=".", color="tab:green", label="events/s ingested")
    axes[2].set_ylabel("queue depth")
    ax2.set_ylabel("events/s")
    ax2.set_ylim(bottom=0)
    axes[2].set_xlabel("minutes")
    axes[2].legend(loc="upper left")
    ax2.legend(loc="upper right")
    for r in restarts:
        for ax in axes:
            ax.axvline(r["t"] / 60, color="grey", linestyle=":", linewidth=1)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eddy", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "eddy"))
    ap.add_argument("--duration", type=parse_duration, default=parse_duration("10m"), help="e.g. 5m, 1h [10m]")
    ap.add_argument("--fraction", type=float, default=0.5, help="of the measured maximum rate [0.5]")
    ap.add_argument("--rate", type=int, help="feed this many trades/s instead of measuring the maximum")
    ap.add_argument("--batch", type=int, default=100, help="events per frame [100]")
    ap.add_argument("--other-rate", type=int, default=200, help="events/s of each other scenario's feed [200]")
    ap.add_argument("--measure", type=parse_duration, default=5.0, help="how long to measure the maximum [5s]")
    ap.add_argument("--sample", type=parse_duration, default=10.0, help="sampling interval [10s]")
    ap.add_argument("--warmup", type=parse_duration, help="ignored by the memory check [20%% of the run, at least 30s]")
    ap.add_argument("--max-slope", type=float, default=10.0, help="allowed memory growth after warm-up, MiB/hour [10]")
    ap.add_argument("--rss-noise", type=float, default=32.0, help="growth always allowed, MiB [32]")
    ap.add_argument("--chaos", action="store_true", help="restart the server at random intervals (SIGTERM; with --durable, SIGTERM or SIGKILL)")
    ap.add_argument("--durable", action="store_true",
                    help="run the server with a data directory (in --out) instead of --ephemeral: restarts resume state and streams")
    ap.add_argument("--kill-share", type=float, default=0.5, help="with --chaos --durable: share of restarts by SIGKILL [0.5]")
    ap.add_argument("--chaos-min", type=parse_duration, default=20.0, help="shortest time between restarts [20s]")
    ap.add_argument("--chaos-max", type=parse_duration, default=60.0, help="longest time between restarts [60s]")
    ap.add_argument("--tool-timeout", default="10s",
                    help="--timeout of the feeds and probes: silence before they give a connection up [10s]; "
                         "long, as a shared host can stall the server for seconds, and a SIGTERM closes at once")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "soak"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = random.Random(args.seed)
    warmup = args.warmup if args.warmup is not None else max(30.0, 0.2 * args.duration)

    queries = tempfile.mkdtemp(prefix="eddy-soak-queries-")
    for name in sorted(os.listdir(os.path.join(ROOT, "queries"))):
        if name.endswith(".rhai"):
            with open(os.path.join(ROOT, "queries", name)) as src, open(os.path.join(queries, name), "w") as dst:
                dst.write(src.read())
    models = os.path.join(ROOT, "models")
    log = open(os.path.join(args.out, "server.log"), "w")
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    eddy = args.eddy
    data = None
    if args.durable:
        data = os.path.join(args.out, "data")
        shutil.rmtree(data, ignore_errors=True)

    # 1. The maximum rate, on a throwaway server.
    if args.rate:
        max_rate, rate = None, args.rate
    else:
        measured = os.path.join(args.out, "data-measure") if data else None
        if measured:
            shutil.rmtree(measured, ignore_errors=True)
        probe_server = Server(eddy, port, queries, models, log, measured)
        probe_server.start()
        out = subprocess.run([eddy, "feed", url, "--rate", "max", "--batch", str(args.batch),
                              "--duration", f"{args.measure}s", "--json"],
                             capture_output=True, text=True, timeout=args.measure + 60)
        probe_server.stop()
        if measured:
            shutil.rmtree(measured, ignore_errors=True)
        report = json.loads(out.stdout.strip().splitlines()[-1])
        max_rate = report["accepted"] / report["seconds"]
        rate = max(1, int(max_rate * args.fraction))
    print(f"soak: {args.duration:.0f} s, trades at {rate} events/s"
          + (f" ({args.fraction:.0%} of the measured maximum {max_rate:.0f}/s)" if max_rate else "")
          + f", {args.batch} per frame; {', '.join(OTHER_FEEDS)} at {args.other_rate}/s each"
          + ("; durable (data directory, fsync always)" if data else "; ephemeral")
          + (f"; chaos: {'SIGTERM or SIGKILL' if data else 'SIGTERM'} every {args.chaos_min:.0f}-{args.chaos_max:.0f} s"
             if args.chaos else ""),
          flush=True)

    # 2. The server, the probes, the feeds.
    server = Server(eddy, port, queries, models, log, data)
    server.start()
    probe_args = ["--timeout", args.tool_timeout, "--topic", "vwap", "--count-field", "trades", "--reconnect", "--interval", f"{args.sample}s",
                  "--duration", f"{args.duration + 3600}s", "--json"]
    probes = {mode: Tool(f"probe {mode}", [eddy, "probe", url, "--mode", mode, *probe_args]) for mode in ("all", "latest")}
    time.sleep(1.0)
    start = time.time()
    feeds = {"trades": Tool("feed trades", [eddy, "feed", url, "--scenario", "trades", "--rate", str(rate),
                                            "--batch", str(args.batch), "--duration", f"{args.duration}s",
                                            "--reconnect", "--timeout", args.tool_timeout, "--json"])}
    for scenario in OTHER_FEEDS:
        feeds[scenario] = Tool(f"feed {scenario}", [eddy, "feed", url, "--scenario", scenario, "--rate",
                                                    str(args.other_rate), "--batch", "10",
                                                    "--duration", f"{args.duration}s", "--reconnect",
                                                    "--timeout", args.tool_timeout, "--json"])

    samples, restarts, lock = [], [], threading.Lock()
    stop_chaos = threading.Event()

    def chaos():
        while True:
            wait = rng.uniform(args.chaos_min, args.chaos_max)
            if stop_chaos.wait(wait) or time.time() - start + 5 > args.duration:
                return
            kill = data is not None and rng.random() < args.kill_share
            with lock:
                t0 = time.time()
                shutdown_s, code = server.kill() if kill else server.stop()
                server.start()
                listening = time.time()
            # Recovered when the new server ingests again.
            recovered = None
            while time.time() - t0 < 30 and not stop_chaos.is_set():
                try:
                    if metrics(port).get('eddy_events_ingested_total{stream="trades"}', 0) > 0:
                        recovered = time.time()
                        break
                except OSError:
                    pass
                time.sleep(0.02)
            restarts.append({"t": t0 - start, "signal": "KILL" if kill else "TERM",
                             "shutdown_s": round(shutdown_s, 3), "exit_code": code,
                             "down_s": round(listening - t0, 3),
                             "recovery_s": round(recovered - t0, 3) if recovered else None})
            print(f"  restart at {t0 - start:6.1f} s: SIG{restarts[-1]['signal']}, shutdown {shutdown_s:.2f} s (exit {code}), "
                  f"recovered in {restarts[-1]['recovery_s']} s", flush=True)

    chaos_thread = threading.Thread(target=chaos, daemon=True) if args.chaos else None
    if chaos_thread:
        chaos_thread.start()

    # 3. Samples.
    last_ingested, last_t = 0.0, start
    next_sample = start + args.sample
    print(f"{'t (s)':>7} {'RSS MiB':>8} {'fds':>5} {'thr':>4} {'queue':>6} {'ev/s':>8} "
          f"{'p50 all':>8} {'p99 all':>8} {'p99 lat':>8}", flush=True)
    while time.time() - start < args.duration:
        time.sleep(max(0.0, next_sample - time.time()))
        next_sample += args.sample
        with lock:
            try:
                rss, fds, threads = proc_stats(server.proc.pid)
                m = metrics(port)
            except OSError:
                continue
        now = time.time()
        depths = [v for k, v in m.items() if k.startswith("eddy_shard_queue_depth")]
        replay = sum(v for k, v in m.items() if k.startswith("eddy_replay_bytes")) / (1 << 20)
        ingested = sum(v for k, v in m.items() if k.startswith("eddy_events_ingested_total"))
        rate_now = (ingested - last_ingested) / (now - last_t) if ingested >= last_ingested else ingested / (now - last_t)
        last_ingested, last_t = ingested, now
        pa, pl = probes["all"].latest() or {}, probes["latest"].latest() or {}
        s = {"t": round(now - start, 1), "rss_mib": round(rss, 1), "replay_mib": round(replay, 1),
             "fds": fds, "threads": threads,
             "queue_max": max(depths, default=0), "queue_sum": sum(depths), "ingest_per_s": round(rate_now),
             "p50_all_ms": pa.get("p50_us", 0) / 1000, "p99_all_ms": pa.get("p99_us", 0) / 1000,
             "p99_latest_ms": pl.get("p99_us", 0) / 1000, "restarts": len(restarts)}
        samples.append(s)
        print(f"{s['t']:>7.0f} {s['rss_mib']:>8.1f} {fds:>5} {threads:>4} {s['queue_max']:>6.0f} "
              f"{s['ingest_per_s']:>8} {s['p50_all_ms']:>8.2f} {s['p99_all_ms']:>8.2f} {s['p99_latest_ms']:>8.2f}",
              flush=True)

    # 4. The end: feeds finish, the server drains, then stops (handing everything to the
    # probes), then the probes report.
    stop_chaos.set()
    if chaos_thread:
        chaos_thread.join(timeout=120)
    fed = {}
    for name, tool in feeds.items():
        tool.finish(timeout=120)
        fed[name] = tool.report or {}
    time.sleep(2.0)
    final = {}
    try:
        final = metrics(port)
        listed = json.loads(http_get(port, "/queries"))
    except OSError:
        listed = []
    if isinstance(listed, dict):
        listed = listed.get("queries", [])
    shutdown_s, code = server.stop()
    time.sleep(0.5)
    probed = {}
    for mode, tool in probes.items():
        tool.finish(timeout=60, term=True)
        probed[mode] = tool.report or {}

    # 5. Checks.
    failures = []
    accepted = {name: r.get("accepted", 0) for name, r in fed.items()}
    for name, r in fed.items():
        if r.get("error"):
            failures.append(f"feed {name}: {r['error']}")
        if r.get("rejected"):
            failures.append(f"feed {name}: {r['rejected']} events rejected")
        if r.get("ack_gaps") or r.get("ack_duplicates"):
            failures.append(f"feed {name}: {r['ack_gaps']} ack gaps, {r['ack_duplicates']} duplicate acks")
    for mode, r in probed.items():
        if r.get("error"):
            failures.append(f"probe {mode}: {r['error']}")
        if r.get("count_duplicates") or r.get("seq_duplicates"):
            failures.append(f"probe {mode}: {r['count_duplicates']} repeated counts, {r['seq_duplicates']} repeated seqs")
    trades_sent = fed["trades"].get("events", 0)
    trades_acked = accepted["trades"]
    trades_unacked = fed["trades"].get("unacked", 0)
    pa = probed["all"]
    counted = pa.get("counted", 0)
    per_query = []
    if not args.chaos:
        for name, r in fed.items():
            if r.get("lost") or r.get("unacked"):
                failures.append(f"feed {name}: {r.get('lost')} connections lost (server silent for "
                                f"{args.tool_timeout}?), {r.get('unacked')} events unacknowledged")
            elif r.get("events") != r.get("accepted"):
                failures.append(f"feed {name}: {r.get('events')} sent but {r.get('accepted')} accepted")
        sent = {name: r.get("events", 0) for name, r in fed.items()}
        for q in listed:
            sources = q["source"] if isinstance(q["source"], list) else [q["source"]]
            want = sum(accepted.get(s, 0) for s in sources)
            most = sum(sent.get(s, 0) for s in sources)
            handled = q.get("events", 0) + q.get("late", 0) + q.get("skipped", 0)
            per_query.append({"query": q["name"], "sources": sources, "acked": want, "sent": most,
                              "handled": handled, "emitted": q.get("emitted")})
            if not want <= handled <= most:
                failures.append(f"query {q['name']}: handled {handled} events, {want} were accepted "
                                f"and {most} sent on {sources}")
        emitted = final.get('eddy_items_emitted_total{topic="vwap"}', -1)
        if pa.get("items") != emitted:
            failures.append(f"probe all: received {pa.get('items')} vwap items, the server emitted {emitted:.0f}")
        if pa.get("dropped") or pa.get("seq_gaps") or pa.get("count_gaps"):
            failures.append(f"probe all: {pa.get('dropped')} dropped, {pa.get('seq_gaps')} seq gaps, "
                            f"{pa.get('count_gaps')} count gaps")
        if not trades_acked <= counted <= trades_sent:
            failures.append(f"vwap counted {counted} trades; {trades_acked} were accepted, {trades_sent} sent")
    else:
        if not trades_acked <= counted <= trades_acked + trades_unacked:
            failures.append(f"vwap counted {counted} trades over the server lifetimes: not between the "
                            f"{trades_acked} acknowledged and the {trades_acked + trades_unacked} sent")
        if pa.get("dropped") or pa.get("count_gaps"):
            failures.append(f"probe all: {pa.get('dropped')} dropped, {pa.get('count_gaps')} count gaps "
                            f"within a server lifetime")
        if data:
            # Durable: every reconnect of the `all` probe resumes the same stream, unless the
            # server says the items after its position are no longer kept (replay_bytes: a probe
            # that lagged by more than that, or a graceful restart, whose ring is not kept
            # across it). Any other reason (ahead of the topic, another run) is a failure.
            reasons = pa.get("gone_reasons") or []
            other = [r for r in reasons if "no longer kept" not in r]
            if other or pa.get("resumed", 0) + pa.get("gone", 0) < len(restarts):
                failures.append(f"probe all: {pa.get('resumed')} reconnects resumed, {pa.get('gone')} positions "
                                f"gone, over {len(restarts)} restarts: {reasons}")
        for r in restarts:
            if r["exit_code"] != 0 and r["signal"] == "TERM":
                failures.append(f"restart at {r['t']:.0f} s: the server exited with {r['exit_code']}")
            if r["recovery_s"] is None:
                failures.append(f"restart at {r['t']:.0f} s: no recovery within 30 s")
    if code != 0:
        failures.append(f"the server exited with {code} at the end")

    after = [s for s in samples if s["t"] >= warmup]
    memory = {}
    if len(after) >= 2:
        slope = slope_per_hour([(s["t"], s["rss_mib"] - s["replay_mib"]) for s in after])
        span_h = (after[-1]["t"] - after[0]["t"]) / 3600
        growth = slope * span_h
        allowed = max(args.rss_noise, args.max_slope * span_h)
        memory = {"slope_mib_per_hour": round(slope, 2), "fitted_growth_mib": round(growth, 2),
                  "allowed_mib": round(allowed, 2), "first_mib": after[0]["rss_mib"], "last_mib": after[-1]["rss_mib"],
                  "max_mib": max(s["rss_mib"] for s in samples),
                  "replay_first_mib": after[0]["replay_mib"], "replay_last_mib": after[-1]["replay_mib"]}
        if not args.chaos:
            if growth > allowed:
                failures.append(f"memory grew {growth:.1f} MiB after warm-up ({slope:.1f} MiB/hour); "
                                f"allowed {allowed:.1f} MiB")
            if after[-1]["fds"] > after[0]["fds"] + 2:
                failures.append(f"file descriptors {after[0]['fds']} after warm-up, {after[-1]['fds']} at the end")
            if after[-1]["threads"] > after[0]["threads"] + 2:
                failures.append(f"threads {after[0]['threads']} after warm-up, {after[-1]['threads']} at the end")
    elif not args.chaos:
        failures.append(f"fewer than 2 samples after the {warmup:.0f} s warm-up: run longer")

    p99s = [s["p99_all_ms"] for s in after if s["p99_all_ms"] > 0]
    half = len(p99s) // 2
    p99_halves = (sorted(p99s[:half])[half // 2] if half else None,
                  sorted(p99s[half:])[(len(p99s) - half) // 2] if p99s else None)

    results = {"duration_s": args.duration, "chaos": args.chaos, "max_rate": max_rate, "rate": rate,
               "batch": args.batch, "warmup_s": warmup, "feeds": fed, "probes": probed, "per_query": per_query,
               "restarts": restarts, "memory": memory, "p99_all_ms_median_first_half": p99_halves[0],
               "p99_all_ms_median_second_half": p99_halves[1], "final_shutdown_s": round(shutdown_s, 3),
               "samples": samples, "failures": failures}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "samples.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(samples[0].keys()) if samples else ["t"])
        w.writeheader()
        w.writerows(samples)
    length = f"{args.duration / 60:.0f} min" if args.duration >= 600 else f"{args.duration:.0f} s"
    title = (f"eddy {'chaos ' if args.chaos else ''}soak: {length}, trades at {rate}/s"
             + (f" ({args.fraction:.0%} of max)" if max_rate else "")
             + (f", {len(restarts)} restarts" if args.chaos else ""))
    png = os.path.join(args.out, "soak.png")
    drew = chart(png, samples, restarts, title)

    print()
    print("feeds:")
    for name, r in fed.items():
        print(f"  {name:>8}: {r.get('events', 0):>11} sent {r.get('accepted', 0):>11} acked "
              f"{r.get('unacked', 0):>7} in doubt  {r.get('lost', 0)} lost connections, {r.get('reconnects', 0)} reconnects")
    print("probes on vwap:")
    for mode, r in probed.items():
        print(f"  {mode:>8}: {r.get('items', 0):>11} items, p50 {r.get('p50_us', 0) / 1000:.2f} ms, "
              f"p99 {r.get('p99_us', 0) / 1000:.2f} ms, max {r.get('max_us', 0) / 1000:.1f} ms; "
              f"{r.get('dropped', 0)} dropped, {r.get('seq_gaps', 0)} seq gaps, {r.get('count_gaps', 0)} count gaps, "
              f"{r.get('count_duplicates', 0)} repeats, {r.get('reconnects', 0)} reconnects "
              f"({r.get('resumed', 0)} resumed, {r.get('gone', 0)} gone)")
    print(f"  vwap's counts over the server lifetimes: {counted} trades handled; "
          f"{trades_acked} acknowledged, {trades_unacked} in doubt")
    if per_query:
        print("per query (events accepted on its sources vs handled):")
        for q in per_query:
            print(f"  {q['query']:>18}: {q['acked']:>11} acked {q['handled']:>11} handled {q['emitted']:>11} emitted")
    if memory:
        print(f"memory after warm-up ({warmup:.0f} s): {memory['first_mib']} → {memory['last_mib']} MiB, "
              f"slope {memory['slope_mib_per_hour']} MiB/hour (fitted growth {memory['fitted_growth_mib']} MiB, "
              f"allowed {memory['allowed_mib']} MiB, after the replay rings' "
              f"{memory['replay_first_mib']} → {memory['replay_last_mib']} MiB); peak {memory['max_mib']} MiB")
    if p99_halves[0] is not None:
        print(f"p99 (mode all), median of the samples: first half {p99_halves[0]:.2f} ms, "
              f"second half {p99_halves[1]:.2f} ms")
    if args.chaos:
        rec = [r["recovery_s"] for r in restarts if r["recovery_s"] is not None]
        kills = sum(1 for r in restarts if r["signal"] == "KILL")
        print(f"restarts: {len(restarts)} ({kills} by SIGKILL)" + (f"; recovery (signal to ingesting again) min {min(rec):.2f} s, "
                                              f"median {sorted(rec)[len(rec) // 2]:.2f} s, max {max(rec):.2f} s" if rec else ""))
    print(f"results: {args.out}/results.json" + (f", chart: {png}" if drew else ""))
    if failures:
        print("FAILED:")
        for f in failures:
            print(f"  - {f}")
        return 1
    print("OK: nothing lost" + ("" if args.chaos else ", memory, file descriptors and threads flat after warm-up"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
