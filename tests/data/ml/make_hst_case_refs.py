"""Computes, with River, the Half-Space Trees scores that the example cases of the shipped
queries sensor_failure and trade_anomaly must show, and writes them as data for tests/queries.rs.

Run once, from the repository root, in a virtualenv with River installed (the one
make_river_refs.py describes):

    python3 -m venv /tmp/river && /tmp/river/bin/pip install river==0.26.1
    /tmp/river/bin/python tests/data/ml/make_hst_case_refs.py

It reads tests/queries/{sensor_failure,trade_anomaly}/in.ndjson and writes
tests/data/ml/{sensor_failure,trade_anomaly}_hst.ndjson: one line per item the query emits, in
input order, {"key": ..., "ts": ..., "score": ...}. CI does not need River: the scores are
committed, and the Rust helpers in tests/queries.rs add the plain arithmetic (Holt, returns,
z-scores, gaps) around them.

Each query keeps one detector per key, scores a vector before learning it, and scales every
feature to [0, 1] before the trees see it, so River is driven the same way:
- sensor_failure: hst(#{ trees: 10, height: 6, window: 25, limits: #{ temp: [0, 60],
  humidity: [0, 100] } }) is HalfSpaceTrees(n_trees=10, height=6, window_size=25, seed=42) fed
  temp / 60 and humidity / 100. (River's own `limits=` argument is not the same thing: it sets
  the ranges the trees split, unscaled, so features would be drawn in proportion to 60 and 100;
  eddy's limits scale each feature to [0, 1] and the trees split [0, 1], River's default.)
- trade_anomaly: hst(#{ trees: 10, height: 6, window: 100 }) with no limits scales every
  feature by the range learned so far, River's MinMaxScaler: the score uses the scaler before
  the vector is learned; learning updates the scaler, then the trees learn the vector scaled by
  it. size_z is River's StandardScaler learned on the size, then applied to it.
eddy's default seed is 42; the features are given to River in sorted order (River sorts them
when it builds its trees).
"""

import json
import pathlib

import river
from river import anomaly, preprocessing

ROOT = pathlib.Path(__file__).resolve().parents[3]
CASES = ROOT / "tests" / "queries"
OUT = pathlib.Path(__file__).parent


def read(case):
    with open(CASES / case / "in.ndjson") as f:
        return [json.loads(line) for line in f if line.strip()]


def write(case, rows):
    with open(OUT / f"{case}_hst.ndjson", "w") as f:
        for row in rows:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")


def sensor_failure():
    trees = {}
    rows = []
    for ev in read("sensor_failure"):
        key = ev["device"]["id"]
        hst = trees.setdefault(
            key, anomaly.HalfSpaceTrees(n_trees=10, height=6, window_size=25, seed=42)
        )
        x = {"humidity": (ev["humidity"] - 0) / (100 - 0), "temp": (ev["temp"] - 0) / (60 - 0)}
        rows.append({"key": key, "ts": ev["ts"], "score": hst.score_one(x)})
        hst.learn_one(x)
    write("sensor_failure", rows)
    return rows


def trade_anomaly():
    state = {}
    rows = []
    for ev in read("trade_anomaly"):
        key = ev["symbol"]
        if key not in state:
            state[key] = {
                "sizes": preprocessing.StandardScaler(),
                "minmax": preprocessing.MinMaxScaler(),
                "hst": anomaly.HalfSpaceTrees(n_trees=10, height=6, window_size=100, seed=42),
                "last": None,
            }
        s = state[key]
        s["sizes"].learn_one({"size": ev["size"]})
        if s["last"] is None:
            s["last"] = (ev["price"], ev["ts"])
            continue
        last_price, last_ts = s["last"]
        x = {
            "gap_ms": ev["ts"] - last_ts,
            "ret": (ev["price"] - last_price) / last_price,
            "size_z": s["sizes"].transform_one({"size": ev["size"]})["size"],
        }
        # Before the first learn the scaler has no range; the trees score 0 then anyway.
        score = s["hst"].score_one(s["minmax"].transform_one(x)) if s["hst"].trees else 0
        rows.append({"key": key, "ts": ev["ts"], "score": score})
        s["minmax"].learn_one(x)
        s["hst"].learn_one(s["minmax"].transform_one(x))
        s["last"] = (ev["price"], ev["ts"])
    write("trade_anomaly", rows)
    return rows


def main():
    print("river", river.__version__)
    for name, rows in (("sensor_failure", sensor_failure()), ("trade_anomaly", trade_anomaly())):
        scored = [r["score"] for r in rows if r["score"]]
        print(name, len(rows), "items,", len(scored), "scored, max", max(scored))


if __name__ == "__main__":
    main()
