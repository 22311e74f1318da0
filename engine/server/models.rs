//! Models at run time: the models folder at start, and `GET /models`, `PUT|DELETE /models/NAME`.
//!
//! `PUT /models/NAME` (admin token; the body is the `.onnx` file, at most `max_frame_bytes`)
//! loads and optimises the model on a blocking thread, writes it to the models folder as
//! `NAME.onnx` so a restart finds it, then swaps it into the catalog every shard reads
//! ([`crate::models::ModelCatalog`]): from then on `model("NAME")` gives the new version. A model
//! that does not load is answered 400 with the reason, and nothing changes. `DELETE` removes
//! it from the catalog and the folder; queries that call it then fail with a clear error.

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};

use crate::json::{write_int, write_str};
use crate::models::{Model, ModelError};
use crate::query::valid_name;

use super::{authorized, json_error, read_body, respond, Body, State};

/// Loads the models folder into the catalog at start.
pub fn load_folder(state: &State) -> Result<usize, ModelError> {
    let limits = &state.config.limits;
    limits.models.load_dir(&state.config.models, limits)
}

/// Routes `/models` and `/models/NAME`.
pub async fn route(state: &State, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let name = path
        .strip_prefix("/models")
        .unwrap_or("")
        .trim_start_matches('/')
        .to_owned();
    let method = req.method().clone();
    if name.is_empty() {
        return match method {
            Method::GET => list(state),
            _ => json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "use GET /models, or PUT/DELETE /models/NAME",
            ),
        };
    }
    if !valid_name(&name) {
        return json_error(
            StatusCode::BAD_REQUEST,
            &ModelError::BadName(name).to_string(),
        );
    }
    if !matches!(method, Method::PUT | Method::DELETE) {
        return json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "use PUT or DELETE /models/NAME",
        );
    }
    if !authorized(&req, &state.admin_token) {
        return json_error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token (Authorization: Bearer TOKEN)",
        );
    }
    let file = state.config.models.join(format!("{name}.onnx"));
    let catalog = &state.config.limits.models;
    if method == Method::DELETE {
        if !catalog.remove(&name) {
            return json_error(StatusCode::NOT_FOUND, &format!("no model named {name:?}"));
        }
        let _ = std::fs::remove_file(&file);
        return respond(StatusCode::NO_CONTENT, "application/json", "");
    }
    let body = match read_body(req, state.config.max_frame_bytes, "max_frame_bytes").await {
        Ok(b) => b,
        Err(response) => return response,
    };
    let limits = state.config.limits.clone();
    let loading = name.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        Model::load(&loading, &body, &limits).map(|m| (m, body))
    })
    .await;
    let (model, bytes) = match loaded {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => return json_error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e) => return json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    let saved =
        std::fs::create_dir_all(&state.config.models).and_then(|()| std::fs::write(&file, &bytes));
    if let Err(e) = saved {
        return json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot write {}: {e}", file.display()),
        );
    }
    let mut out = Vec::new();
    describe(&model, &mut out);
    let replaced = catalog.insert(model);
    let status = if replaced {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    respond(status, "application/json", out)
}

/// `{"name":N,"inputs":n,"features":[…]|null,"outputs":{"name":len,…},"bytes":b}`.
fn describe(m: &Model, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"name\":");
    write_str(out, &m.name);
    out.extend_from_slice(b",\"inputs\":");
    write_int(out, m.width as i64);
    out.extend_from_slice(b",\"features\":");
    match &m.features {
        None => out.extend_from_slice(b"null"),
        Some(f) => {
            out.push(b'[');
            for (i, name) in f.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, name);
            }
            out.push(b']');
        }
    }
    out.extend_from_slice(b",\"outputs\":{");
    for (i, (name, len)) in m.outputs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, name);
        out.push(b':');
        write_int(out, *len as i64);
    }
    out.extend_from_slice(b"},\"bytes\":");
    write_int(out, m.bytes as i64);
    out.push(b'}');
}

fn list(state: &State) -> Response<Body> {
    let mut out = b"{\"models\":[".to_vec();
    for (i, m) in state.config.limits.models.models().values().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        describe(m, &mut out);
    }
    out.extend_from_slice(b"]}");
    respond(StatusCode::OK, "application/json", out)
}
