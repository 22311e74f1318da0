"""Trains the small churn model of queries/player_churn.rhai and writes what eddy's tests
compare against.

Run once, from the repository root, in a virtualenv:

    python3 -m venv /tmp/onnx && /tmp/onnx/bin/pip install scikit-learn==1.9.1 skl2onnx==1.20.0 onnx==1.23.2 onnxruntime==1.32.0
    /tmp/onnx/bin/python tests/data/ml/make_churn_model.py

Writes, in tests/data/ml/:
  churn.onnx              scikit-learn LogisticRegression converted by skl2onnx (no ZipMap),
                          with the feature names in the model's metadata ("features")
  churn_coefficients.json the fitted coefficients and intercept, for an independent check
  churn_reference.ndjson  1,000 inputs and onnxruntime's outputs for them

The training data is synthetic: a player who plays short sessions with more deaths than kills
and little score churns more often. CI does not need any of these packages.
"""

import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
from skl2onnx import to_onnx
from sklearn.linear_model import LogisticRegression

OUT = pathlib.Path(__file__).parent
FEATURES = ["session_minutes", "kills", "deaths", "score", "sessions"]


def synthetic(rng, n):
    minutes = rng.gamma(2.0, 4.0, n)
    kills = rng.poisson(minutes * 0.8)
    deaths = rng.poisson(minutes * 0.6)
    score = rng.poisson(minutes * 6.0)
    sessions = rng.integers(1, 30, n)
    x = np.column_stack([minutes, kills, deaths, score, sessions]).astype(np.float32)
    logit = 1.5 - 0.25 * minutes + 0.35 * (deaths - kills) - 0.01 * score - 0.05 * sessions
    y = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
    return x, y.astype(np.int64)


def main():
    rng = np.random.default_rng(42)
    x, y = synthetic(rng, 5000)
    clf = LogisticRegression(max_iter=1000).fit(x, y)
    model = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    model.metadata_props.add(key="features", value=",".join(FEATURES))
    onnx.checker.check_model(model)
    onnx.save(model, OUT / "churn.onnx")
    with open(OUT / "churn_coefficients.json", "w") as f:
        json.dump({"features": FEATURES, "coef": clf.coef_[0].tolist(),
                   "intercept": float(clf.intercept_[0])}, f, indent=1)

    session = ort.InferenceSession(str(OUT / "churn.onnx"))
    inputs, _ = synthetic(np.random.default_rng(7), 1000)
    names = [o.name for o in session.get_outputs()]
    with open(OUT / "churn_reference.ndjson", "w") as f:
        for row in inputs:
            out = session.run(None, {session.get_inputs()[0].name: row[None, :]})
            rec = {"input": [float(v) for v in row]}
            for name, value in zip(names, out):
                rec[name] = np.asarray(value).ravel().tolist()
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")
    print("inputs", [(i.name, i.shape, i.type) for i in session.get_inputs()])
    print("outputs", [(o.name, o.shape, o.type) for o in session.get_outputs()])
    print("ops", sorted({n.op_type for n in model.graph.node}))


if __name__ == "__main__":
    main()
