"""Exports three of River's bundled datasets to NDJSON for eddy's tests, and prints River's
progressive-validation figures that tests/learners.rs compares eddy against.

Run once, from the repository root, in a virtualenv with River installed:

    python3 -m venv /tmp/river && /tmp/river/bin/pip install river==0.26.1 scikit-learn
    /tmp/river/bin/python tests/data/ml/make_river_refs.py

It writes tests/data/ml/{phishing,trump_approval,shuttle}.ndjson (each line
{"features": {...}, "y": ...}) and prints the figures. CI does not need River: the data and
the figures are committed.
"""

import json
import pathlib

import river
from river import anomaly, datasets, evaluate, linear_model, metrics, preprocessing
from sklearn.metrics import roc_auc_score

OUT = pathlib.Path(__file__).parent
SHUTTLE_EVENTS = 10_000


def export(name, rows):
    with open(OUT / f"{name}.ndjson", "w") as f:
        for x, y in rows:
            f.write(json.dumps({"features": x, "y": y}, separators=(",", ":")) + "\n")


def main():
    print("river", river.__version__)

    export("phishing", datasets.Phishing())
    model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    acc = evaluate.progressive_val_score(datasets.Phishing(), model, metrics.Accuracy())
    print("phishing StandardScaler | LogisticRegression()", acc, repr(acc.get()))

    export("trump_approval", datasets.TrumpApproval())
    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    mae = evaluate.progressive_val_score(datasets.TrumpApproval(), model, metrics.MAE())
    print("trump_approval StandardScaler | LinearRegression()", mae, repr(mae.get()))

    model = preprocessing.StandardScaler() | linear_model.LinearRegression(
        optimizer=__import__("river").optim.SGD(0.005), l2=0.01
    )
    mae = evaluate.progressive_val_score(datasets.TrumpApproval(), model, metrics.MAE())
    print("trump_approval StandardScaler | LinearRegression(SGD(0.005), l2=0.01)", repr(mae.get()))

    rows = list(datasets.Shuttle().take(SHUTTLE_EVENTS))
    export("shuttle", rows)
    model = preprocessing.MinMaxScaler() | anomaly.HalfSpaceTrees(seed=42)
    rolling = metrics.RollingROCAUC(window_size=SHUTTLE_EVENTS)
    ys, scores = [], []
    for x, y in rows:
        s = model.score_one(x)
        rolling.update(y, s)
        ys.append(y)
        scores.append(s)
        model.learn_one(x)
    print("shuttle MinMaxScaler | HalfSpaceTrees(seed=42)", rolling,
          "exact AUC", repr(roc_auc_score(ys, scores)),
          "score sum", repr(sum(scores)), "first nonzero", scores.index(next(s for s in scores if s)))


if __name__ == "__main__":
    main()
