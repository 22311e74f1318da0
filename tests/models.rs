//! ONNX inference: tract's outputs against onnxruntime's for the committed churn model, and the
//! model as queries see it (`model("churn").predict(...)`) against the logistic formula with
//! the coefficients scikit-learn fitted. `tests/data/ml/make_churn_model.py` made the model, the
//! coefficients and onnxruntime's reference outputs (onnxruntime 1.32.0).

use std::path::Path;

use eddy::models::{Model, ModelCatalog};
use eddy::offline::{self, RunOptions};
use eddy::{Limits, QueryDef};
use serde_json::Value;

fn ml(file: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/ml")
            .join(file),
    )
    .unwrap()
}

fn churn() -> Model {
    Model::load("churn", &ml("churn.onnx"), &Limits::default()).unwrap()
}

#[test]
fn tract_equals_onnxruntime_on_1000_inputs() {
    let model = churn();
    let reference = String::from_utf8(ml("churn_reference.ndjson")).unwrap();
    let mut n = 0;
    for line in reference.lines() {
        let rec: Value = serde_json::from_str(line).unwrap();
        let input: Vec<f64> = rec["input"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let out = model.run(&input).unwrap();
        let label = out[0][0].as_int().unwrap();
        assert_eq!(label, rec["label"][0].as_i64().unwrap(), "{line}");
        for (k, want) in rec["probabilities"].as_array().unwrap().iter().enumerate() {
            let got = out[1][k].as_float().unwrap();
            let want = want.as_f64().unwrap();
            assert!((got - want).abs() <= 1e-5, "{got} vs {want} in {line}");
        }
        n += 1;
    }
    assert_eq!(n, 1000);
}

/// The churn probability by the logistic formula, from scikit-learn's coefficients.
fn by_formula(x: &[f64]) -> f64 {
    let c: Value = serde_json::from_slice(&ml("churn_coefficients.json")).unwrap();
    let z = c["intercept"].as_f64().unwrap()
        + c["coef"]
            .as_array()
            .unwrap()
            .iter()
            .zip(x)
            .map(|(w, x)| w.as_f64().unwrap() * x)
            .sum::<f64>();
    1.0 / (1.0 + (-z).exp())
}

fn run_with_models(script: &str, input: &str) -> (Vec<Value>, Vec<String>) {
    let limits = Limits::default();
    limits.models.insert(churn());
    let def = QueryDef::compile("q", script, &limits).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    offline::run(
        vec![def],
        input.as_bytes().to_vec(),
        &limits,
        &RunOptions::default(),
        &mut out,
        &mut err,
    )
    .unwrap();
    let items: Vec<Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let values = items
        .iter()
        .filter(|v| v["topic"] == "q")
        .map(|v| v["value"].clone())
        .collect();
    let errors = items
        .iter()
        .filter(|v| v["topic"] == "q.errors")
        .map(|v| v["value"].to_string())
        .collect();
    (values, errors)
}

#[test]
fn queries_call_models_with_maps_events_and_arrays() {
    let script = r#"let source = "s";
fn on_event(ev) {
    let m = model("churn");
    let a = m.predict(#{ session_minutes: ev.f.session_minutes, kills: ev.f.kills,
                         deaths: ev.f.deaths, score: ev.f.score, sessions: ev.f.sessions, extra: 1 });
    let b = m.predict(ev.f);
    let c = m.predict([ev.f.session_minutes, ev.f.kills, ev.f.deaths, ev.f.score, ev.f.sessions]);
    emit(#{ a: a.probabilities[1], b: b.probabilities[1], c: c.probabilities[1], label: a.label,
            features: m.features, outputs: m.outputs });
}"#;
    let rows = [
        [12.5, 8.0, 3.0, 80.0, 12.0],
        [1.0, 0.0, 6.0, 2.0, 1.0],
        [30.0, 25.0, 10.0, 200.0, 29.0],
    ];
    let input: String = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"f\":{{\"session_minutes\":{},\"kills\":{},\"deaths\":{},\"score\":{},\"sessions\":{}}}}}\n",
                r[0], r[1] as i64, r[2] as i64, r[3] as i64, r[4] as i64
            )
        })
        .collect();
    let (values, errors) = run_with_models(script, &input);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(values.len(), 3);
    for (v, r) in values.iter().zip(&rows) {
        let want = by_formula(r);
        for k in ["a", "b", "c"] {
            let got = v[k].as_f64().unwrap();
            // The model computes in f32.
            assert!((got - want).abs() < 1e-5, "{k}: {got} vs {want}");
        }
        assert_eq!(v["label"].as_i64().unwrap(), i64::from(want > 0.5));
        assert_eq!(v["features"][1], "kills");
        assert_eq!(v["outputs"], serde_json::json!(["label", "probabilities"]));
    }
}

#[test]
fn wrong_inputs_and_unknown_models_are_clear_query_errors() {
    let script = r#"let source = "s";
fn on_event(ev) {
    switch ev.n {
        1 => model("churn").predict(#{ session_minutes: 1.0, kills: 1, deaths: 1, score: 1 }),
        2 => model("churn").predict([1, 2, 3]),
        3 => model("churn").predict([1, 2, "x", 4, 5]),
        4 => model("nope").predict([1]),
        _ => model("churn").predict(ev.f),
    }
    emit(ev.n);
}"#;
    let input = "{\"n\":1}\n{\"n\":2}\n{\"n\":3}\n{\"n\":4}\n{\"n\":5,\"f\":{\"kills\":\"many\"}}\n{\"n\":6,\"f\":{\"session_minutes\":1,\"kills\":1,\"deaths\":1,\"score\":1,\"sessions\":1}}\n";
    let (values, errors) = run_with_models(script, input);
    assert_eq!(values, vec![Value::from(6)], "{errors:?}");
    assert_eq!(errors.len(), 5, "{errors:?}");
    for (e, needle) in errors.iter().zip([
        "feature `sessions` is missing",
        "takes 5 numbers, got an array of 3",
        "feature `2` must be a number",
        "no model named `nope` (loaded: churn)",
        "feature `kills` must be a number",
    ]) {
        assert!(e.contains(needle), "{needle:?} not in {e}");
    }
}

#[test]
fn the_models_folder_is_loaded_once_and_shared() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("churn.onnx"), ml("churn.onnx")).unwrap();
    let catalog = ModelCatalog::default();
    let limits = Limits {
        models: catalog.clone(),
        ..Limits::default()
    };
    assert_eq!(catalog.load_dir(dir.path(), &limits).unwrap(), 1);
    // Every clone of the limits (one per shard) sees the same loaded model.
    let a = limits.clone().models.get("churn").unwrap();
    let b = limits.models.get("churn").unwrap();
    assert!(std::sync::Arc::ptr_eq(&a, &b));
}

mod server {
    //! `PUT|DELETE /models/NAME` and `GET /models` on a real server on 127.0.0.1:0, driven by
    //! the `eddy deploy --model` binary and plain HTTP.

    use super::ml;
    use eddy::server::{Config, Server};
    use std::process::Command;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const TOKEN: &str = "models-admin-token";

    async fn start(models: &std::path::Path) -> Server {
        let config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            shards: 2,
            queries: models.join("no-queries"),
            models: models.to_owned(),
            admin_token: Some(TOKEN.into()),
            ..Config::default()
        };
        Server::start(config).await.unwrap()
    }

    async fn http(server: &Server, method: &str, path: &str, token: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut resp = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut resp))
            .await
            .unwrap()
            .unwrap();
        let resp = String::from_utf8_lossy(&resp).into_owned();
        let status = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = resp
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned();
        (status, body)
    }

    /// `eddy deploy --model FILE` against `server`: exit success, and what it printed.
    async fn deploy(server: &Server, file: std::path::PathBuf, token: &str) -> (bool, String) {
        let url = format!("http://{}", server.addr);
        let token = token.to_owned();
        tokio::task::spawn_blocking(move || {
            let out = Command::new(env!("CARGO_BIN_EXE_eddy"))
                .args(["deploy", "--model"])
                .arg(&file)
                .args(["--server", &url, "--token", &token])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &*String::from_utf8_lossy(&out.stderr);
            (out.status.success(), text)
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn models_are_uploaded_listed_replaced_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let server = start(&dir.path().join("models")).await;
        let upload = tempfile::tempdir().unwrap();
        let file = upload.path().join("churn.onnx");
        std::fs::write(&file, ml("churn.onnx")).unwrap();

        let (ok, text) = deploy(&server, file.clone(), TOKEN).await;
        assert!(
            ok && text.contains("(201)") && text.contains("\"inputs\":5"),
            "{text}"
        );
        // Saved in the models folder, and in the catalog every shard reads.
        assert_eq!(
            std::fs::read(dir.path().join("models/churn.onnx")).unwrap(),
            ml("churn.onnx")
        );
        assert!(server.state.config.limits.models.get("churn").is_some());
        let (status, body) = http(&server, "GET", "/models", "").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(status, 200);
        assert_eq!(v["models"][0]["name"], "churn");
        assert_eq!(v["models"][0]["features"][4], "sessions");
        assert_eq!(v["models"][0]["outputs"]["probabilities"], 2);

        let (ok, text) = deploy(&server, file.clone(), TOKEN).await;
        assert!(ok && text.contains("(200)"), "replaced: {text}");

        let (ok, text) = deploy(&server, file.clone(), "wrong").await;
        assert!(!ok && text.contains("401"), "{text}");
        let broken = upload.path().join("broken.onnx");
        std::fs::write(&broken, b"not a model").unwrap();
        let (ok, text) = deploy(&server, broken, TOKEN).await;
        assert!(
            !ok && text.contains("400") && text.contains("not a model tract can load"),
            "{text}"
        );
        assert!(server.state.config.limits.models.get("broken").is_none());

        assert_eq!(http(&server, "DELETE", "/models/churn", TOKEN).await.0, 204);
        assert_eq!(http(&server, "DELETE", "/models/churn", TOKEN).await.0, 404);
        assert!(!dir.path().join("models/churn.onnx").exists());
        assert_eq!(http(&server, "DELETE", "/models/x.y", TOKEN).await.0, 400);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn the_models_folder_is_loaded_at_start_and_a_bad_model_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("churn.onnx"), ml("churn.onnx")).unwrap();
        let server = start(dir.path()).await;
        assert!(server.state.config.limits.models.get("churn").is_some());
        server.shutdown().await;
        std::fs::write(dir.path().join("bad.onnx"), b"x").unwrap();
        let config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            models: dir.path().to_owned(),
            queries: dir.path().join("none"),
            ..Config::default()
        };
        let e = Server::start(config).await.err().unwrap().to_string();
        assert!(e.contains("models folder") && e.contains("bad"), "{e}");
    }
}
