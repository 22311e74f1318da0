//! Queries at run time: the queries folder at start, and `GET|PUT|DELETE /queries[/NAME]`,
//! `POST /queries/NAME/resume`.
//!
//! The [`Catalog`] is the one owner of the list of deployed queries. Every deployment has a
//! version (its [`QueryId`], never reused) and everyone else follows the catalog by version: the
//! routing table is the catalog's published snapshot, the shards run the versions they are told
//! to deploy and drop the ones they are told to retire or remove, and the hub lists the topics of
//! what the catalog announces. The catalog lock serialises changes; the event path never takes
//! it.
//!
//! A deploy compiles and validates the script (on its own thread, since top-level statements
//! run), has every shard compile it under a new version (ahead of queued work), then publishes a
//! routing table with it: events routed from that moment go to the new version, which starts
//! with no state. A replaced version is retired only once no ingest still holds the old table,
//! by a message queued behind its events on every shard, so every acknowledged event is handled
//! by exactly one version: the one that was published when its frame was routed. A removal
//! takes effect at once: the version's switch is turned off (its queued events are skipped) and
//! the shards drop it ahead of queued work.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::oneshot;

use crate::json::Object;
use crate::query::valid_name;
use crate::router::{Deployed, Router};
use crate::sandbox::Limits;
use crate::shard::QueryId;
use crate::{QueryDef, QueryError};

use super::hub::{write_sources, HubControl, QueryInfo};
use super::pipeline::{Control, ShardMsg, ShardReport};
use super::{authorized, json_error, read_body, respond, Body, StartError, State};

/// Largest script accepted by `PUT /queries/NAME`.
const MAX_SCRIPT_BYTES: usize = 1 << 20;

/// The deployed queries, by name: the one list the routing table, the shards and the hub follow.
#[derive(Default)]
pub struct Catalog {
    queries: BTreeMap<String, Arc<Deployed>>,
}

impl Catalog {
    /// Publishes the catalog as the routing table; returns the table it replaced.
    fn publish(&self, state: &State) -> Arc<Router> {
        state.router.swap(Arc::new(Router::new(
            self.queries.values().cloned().collect(),
            state.config.time_policy(),
        )))
    }
}

/// Waits until no ingest holds `table` (each holds it until its frame's messages are queued),
/// then queues the retirement of version `id` behind them on every shard.
async fn retire_after(state: &State, table: Arc<Router>, id: QueryId) {
    while Arc::strong_count(&table) > 1 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    drop(table);
    for shard in 0..state.pipeline.shards() {
        let _ = state.pipeline.send(shard, ShardMsg::Retire { id }).await;
    }
}

/// Compiles a query on a thread with room for deep (but limited) recursion in its top-level
/// statements.
pub async fn compile(name: String, script: String, limits: Limits) -> Result<QueryDef, QueryError> {
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("eddy-compile".into())
        .stack_size(64 << 20)
        .spawn(move || {
            let _ = tx.send(QueryDef::compile(&name, &script, &limits));
        })
        .expect("spawn compile thread");
    rx.await.expect("the compile thread answers")
}

/// Deploys `def`, replacing a query of the same name. Returns whether one was replaced.
pub async fn deploy(state: &Arc<State>, def: QueryDef) -> Result<bool, String> {
    let mut catalog = state.catalog.lock().await;
    let id = QueryId(state.next_query.fetch_add(1, Ordering::Relaxed));
    let def = Arc::new(def);
    let deployed = Arc::new(Deployed::new(id, Arc::clone(&def)));
    let results = state
        .pipeline
        .control_all(|done| Control::Deploy {
            id,
            def: Arc::clone(&def),
            control: Arc::clone(&deployed.control),
            done,
        })
        .await
        .map_err(|e| e.to_string())?;
    if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
        let _ = state
            .pipeline
            .control_all(|done| Control::Remove { id, done })
            .await;
        return Err(e.to_string());
    }
    state.hub.control(HubControl::QueryDeployed(QueryInfo {
        name: def.name.clone(),
        sources: def.config.sources.clone(),
        key_by: def.config.key_by.as_ref().map(ToString::to_string),
        declared_topics: def.declared_topics.clone(),
    }));
    let old = catalog.queries.insert(def.name.clone(), deployed);
    let table = catalog.publish(state);
    drop(catalog);
    if let Some(old) = &old {
        // The PUT answers now; the old version finishes its queued events in the background.
        let state = Arc::clone(state);
        let old_id = old.id;
        tokio::spawn(async move { retire_after(&state, table, old_id).await });
    }
    tracing::info!("deployed {def}");
    Ok(old.is_some())
}

/// Replaces a query's script and keeps every key's state, timers and watermark (`PUT
/// /queries/NAME?state=keep`): each shard prepares the new version (compiles it and passes each
/// state through `fn migrate(old)` if it has one) at a point of its queue, and all switch or, if
/// any fails, none does. The routing must not change: same `source`, `key_by` and
/// `time_field`. Returns the keys migrated, or why nothing changed. A query not deployed yet is
/// deployed as usual.
pub async fn replace_keeping(state: &Arc<State>, def: QueryDef) -> Result<usize, String> {
    match prepare_keeping(state, def).await? {
        Keeping::Prepared(prepared) => Ok(prepared.commit(state)),
        Keeping::New(def) => deploy(state, def).await.map(|_| 0),
    }
}

/// What [`prepare_keeping`] made of a replace that keeps state.
pub enum Keeping<'a> {
    /// Every shard has the new version ready and waits for [`Prepared::commit`] (or its drop).
    Prepared(Prepared<'a>),
    /// The query is not deployed here: a plain deploy.
    New(QueryDef),
}

/// A replace that keeps state, prepared on every shard: committed with [`Prepared::commit`],
/// given up when dropped (the shards go on with the old script). It holds the catalog, so no
/// other change comes in between; the shards wait at most [`super::pipeline::REPLACE_TIMEOUT`]
/// for the decision.
pub struct Prepared<'a> {
    catalog: tokio::sync::MutexGuard<'a, Catalog>,
    old: Arc<Deployed>,
    def: Arc<QueryDef>,
    decisions: Vec<std::sync::mpsc::Sender<bool>>,
    /// Keys whose state passed into the new script on this node.
    pub migrated: usize,
}

impl Prepared<'_> {
    /// Every shard switches to the new script; returns the keys migrated.
    pub fn commit(mut self, state: &State) -> usize {
        for d in self.decisions.drain(..) {
            let _ = d.send(true);
        }
        // The same version goes on with the new script: its marks, switches and id stay.
        let deployed =
            Arc::new(Deployed::new(self.old.id, Arc::clone(&self.def)).with_marks_of(&self.old));
        self.catalog.queries.insert(self.def.name.clone(), deployed);
        self.catalog.publish(state);
        tracing::info!(
            "replaced {}, keeping the state of its keys ({} migrated)",
            self.def,
            self.migrated
        );
        self.migrated
    }
}

impl Drop for Prepared<'_> {
    fn drop(&mut self) {
        for d in self.decisions.drain(..) {
            let _ = d.send(false);
        }
    }
}

/// Has every shard prepare a replace of `def`'s query that keeps each key's state (see
/// [`replace_keeping`]); the shards then wait for the decision. Fails, changing nothing, when the
/// routing would change or any shard cannot prepare (a `migrate` that throws for a key).
pub async fn prepare_keeping(state: &State, def: QueryDef) -> Result<Keeping<'_>, String> {
    let catalog = state.catalog.lock().await;
    let Some(old) = catalog.queries.get(&def.name).cloned() else {
        return Ok(Keeping::New(def));
    };
    let (a, b) = (&old.def.config, &def.config);
    if a.sources != b.sources || a.key_by != b.key_by || a.time_field != b.time_field {
        return Err(
            "state=keep needs the same source, key_by and time_field as the running version".into(),
        );
    }
    let def = Arc::new(def);
    let mut prepared = Prepared {
        catalog,
        old,
        def,
        decisions: Vec::new(),
        migrated: 0,
    };
    let mut readies = Vec::new();
    for shard in 0..state.pipeline.shards() {
        let (ready, ready_rx) = oneshot::channel();
        let (commit_tx, commit) = std::sync::mpsc::channel();
        let msg = ShardMsg::Replace {
            id: prepared.old.id,
            def: Arc::clone(&prepared.def),
            ready,
            commit,
        };
        prepared.decisions.push(commit_tx);
        if state.pipeline.send(shard, msg).await.is_err() {
            return Err(format!("shard {shard} is not running"));
        }
        readies.push(ready_rx);
    }
    let mut failure = None;
    for ready in readies {
        let answer = tokio::time::timeout(super::pipeline::REPLACE_TIMEOUT, ready).await;
        match answer {
            Ok(Ok(Ok(n))) => prepared.migrated += n,
            Ok(Ok(Err(e))) => failure = failure.or(Some(e)),
            _ => failure = failure.or(Some("a shard did not answer".to_owned())),
        }
    }
    match failure {
        // Dropped: every shard goes on with the old script.
        Some(e) => Err(format!("nothing was replaced: {e}")),
        None => Ok(Keeping::Prepared(prepared)),
    }
}

/// Removes a query; its topics are closed. Returns whether it existed.
pub async fn remove(state: &State, name: &str) -> bool {
    let mut catalog = state.catalog.lock().await;
    let Some(old) = catalog.queries.remove(name) else {
        return false;
    };
    old.control.remove();
    catalog.publish(state);
    let id = old.id;
    let _ = state
        .pipeline
        .control_all(|done| Control::Remove { id, done })
        .await;
    state.hub.control(HubControl::QueryRemoved {
        name: name.to_owned(),
    });
    // The topics' memory was allocated on the shard threads, which publish; the keys' and
    // events' on the async workers, which collect when they next go idle.
    crate::shard::ask_threads_to_collect();
    let _ = state
        .pipeline
        .control_all(|done| Control::Collect { done })
        .await;
    tracing::info!("removed query {name}");
    true
}

/// The script of the deployed query `name` (the cluster's catalog skips what is already live).
pub async fn deployed_script(state: &State, name: &str) -> Option<String> {
    let catalog = state.catalog.lock().await;
    Some(catalog.queries.get(name)?.def.script.clone())
}

/// Lifts the quarantine of a query. Returns whether it exists.
pub async fn resume(state: &State, name: &str) -> Option<bool> {
    let catalog = state.catalog.lock().await;
    let q = catalog.queries.get(name)?;
    let was = q.control.resume();
    if was {
        tracing::info!("resumed query {name}");
    }
    Some(was)
}

/// Deploys every `*.rhai` file of the queries folder, in name order.
pub async fn load_folder(state: &Arc<State>) -> Result<(), StartError> {
    let dir = &state.config.queries;
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(
                "queries folder {} does not exist: starting with no queries",
                dir.display()
            );
            return Ok(());
        }
        Err(source) => {
            return Err(StartError::Queries {
                path: dir.display().to_string(),
                source,
            })
        }
    };
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "rhai"))
        .collect();
    files.sort();
    for path in files {
        let file = path.display().to_string();
        let script = std::fs::read_to_string(&path).map_err(|source| StartError::Queries {
            path: file.clone(),
            source,
        })?;
        let name = crate::query::name_of_file(&path)
            .unwrap_or_default()
            .to_owned();
        let def = compile(name, script, state.config.limits.clone())
            .await
            .map_err(|source| StartError::Query {
                file: file.clone(),
                source,
            })?;
        deploy(state, def).await.map_err(|e| StartError::Query {
            file: file.clone(),
            source: QueryError::Invalid {
                query: file.clone(),
                problems: vec![e],
            },
        })?;
    }
    Ok(())
}

/// `/queries` and `/queries/NAME`.
pub async fn route(state: &Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let name = path
        .strip_prefix("/queries")
        .unwrap_or("")
        .trim_start_matches('/')
        .to_owned();
    let method = req.method().clone();
    if let Some(name) = name.strip_suffix("/resume") {
        if method != Method::POST {
            return json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "use POST /queries/NAME/resume",
            );
        }
        if !authorized(&req, &state.admin_token) {
            return json_error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong admin token (Authorization: Bearer TOKEN)",
            );
        }
        return match resume(state, name).await {
            None => json_error(StatusCode::NOT_FOUND, &format!("no query named {name:?}")),
            Some(was) => {
                let mut body = Vec::new();
                let mut object = Object::new(&mut body);
                object
                    .str("name", name)
                    .raw("resumed", if was { b"true" } else { b"false" });
                object.end();
                respond(StatusCode::OK, "application/json", body)
            }
        };
    }
    if name.is_empty() {
        return match method {
            Method::GET => list(state).await,
            _ => json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "use GET /queries, or PUT/DELETE /queries/NAME",
            ),
        };
    }
    if !valid_name(&name) {
        return json_error(
            StatusCode::BAD_REQUEST,
            &QueryError::BadName(name).to_string(),
        );
    }
    match method {
        Method::GET => show(state, &name).await,
        Method::PUT | Method::DELETE => {
            if !authorized(&req, &state.admin_token) {
                return json_error(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong admin token (Authorization: Bearer TOKEN)",
                );
            }
            if method == Method::DELETE {
                return if remove(state, &name).await {
                    if let Err(e) = remember(state, &name, None).await {
                        return json_error(StatusCode::INTERNAL_SERVER_ERROR, &e);
                    }
                    respond(StatusCode::NO_CONTENT, "application/json", "")
                } else {
                    json_error(StatusCode::NOT_FOUND, &format!("no query named {name:?}"))
                };
            }
            let keep_state = match super::query_params(&req).get("state").map(String::as_str) {
                None | Some("fresh") => false,
                Some("keep") => true,
                Some(other) => {
                    return json_error(
                        StatusCode::BAD_REQUEST,
                        &format!("state must be \"keep\" or \"fresh\", found {other:?}"),
                    )
                }
            };
            let body = match read_body(req, MAX_SCRIPT_BYTES, "the limit on a script, 1 MiB").await
            {
                Ok(b) => b,
                Err(response) => return response,
            };
            let Ok(script) = String::from_utf8(body) else {
                return json_error(StatusCode::BAD_REQUEST, "the script is not UTF-8");
            };
            let def = match compile(name.clone(), script, state.config.limits.clone()).await {
                Ok(def) => def,
                Err(e) => return compile_error(&e),
            };
            let script = def.script.clone();
            if keep_state {
                if let Some(cluster) = &state.cluster {
                    return keep_in_cluster(state, cluster, def).await;
                }
                return match replace_keeping(state, def).await {
                    Ok(migrated) => {
                        if let Err(e) = remember(state, &name, Some(&script)).await {
                            return json_error(StatusCode::INTERNAL_SERVER_ERROR, &e);
                        }
                        let mut body = Vec::new();
                        Object::new(&mut body)
                            .str("name", &name)
                            .raw("replaced", b"true")
                            .raw("state_kept", b"true")
                            .int("migrated", migrated as i64)
                            .end();
                        respond(StatusCode::OK, "application/json", body)
                    }
                    Err(e) => json_error(StatusCode::CONFLICT, &e),
                };
            }
            match deploy(state, def).await {
                Ok(replaced) => {
                    if let Err(e) = remember(state, &name, Some(&script)).await {
                        return json_error(StatusCode::INTERNAL_SERVER_ERROR, &e);
                    }
                    let mut body = Vec::new();
                    Object::new(&mut body)
                        .str("name", &name)
                        .raw("replaced", if replaced { b"true" } else { b"false" })
                        .end();
                    let status = if replaced {
                        StatusCode::OK
                    } else {
                        StatusCode::CREATED
                    };
                    respond(status, "application/json", body)
                }
                Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, &e),
            }
        }
        _ => json_error(StatusCode::METHOD_NOT_ALLOWED, "use GET, PUT or DELETE"),
    }
}

/// `PUT /queries/NAME?state=keep` in cluster mode: on every live node or none
/// ([`super::cluster::Cluster::replace_keeping`]). 200 with the keys migrated in all and per
/// node; 409 naming each node where it failed, and why, when nothing changed.
async fn keep_in_cluster(
    state: &Arc<State>,
    cluster: &super::cluster::Cluster,
    def: QueryDef,
) -> Response<Body> {
    let name = def.name.clone();
    match cluster.replace_keeping(state, def).await {
        Ok(nodes) => {
            let mut body = Vec::new();
            let mut object = Object::new(&mut body);
            object
                .str("name", &name)
                .raw("replaced", b"true")
                .raw("state_kept", b"true")
                .int("migrated", nodes.iter().map(|(_, n)| *n as i64).sum());
            let mut per_node = Object::new(object.key("nodes"));
            for (node, n) in &nodes {
                per_node.int(node, *n as i64);
            }
            per_node.end();
            object.end();
            respond(StatusCode::OK, "application/json", body)
        }
        Err(super::cluster::KeepRefused::Catalog(e)) => json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("nothing was replaced: {e}"),
        ),
        Err(super::cluster::KeepRefused::Nodes(failed)) => {
            // Each node's own reason, without the prefix a node alone answers with.
            let failed: Vec<(String, &str)> = failed
                .iter()
                .map(|(node, e)| {
                    let e = e.strip_prefix("nothing was replaced: ").unwrap_or(e);
                    (node.clone(), e)
                })
                .collect();
            let why: Vec<String> = failed
                .iter()
                .map(|(node, e)| format!("on node {node}: {e}"))
                .collect();
            let mut body = Vec::new();
            let mut object = Object::new(&mut body);
            object.str(
                "error",
                &format!("nothing was replaced on any node: {}", why.join("; ")),
            );
            let mut per_node = Object::new(object.key("nodes"));
            for (node, e) in &failed {
                per_node.str(node, e);
            }
            per_node.end();
            object.end();
            respond(StatusCode::CONFLICT, "application/json", body)
        }
    }
}

/// With a data directory, records a deploy (`Some(script)`) or removal in the durable catalog
/// and checkpoints at once, so that a restart neither loses the change nor replays the events
/// before it through the new version.
async fn remember(state: &State, name: &str, script: Option<&str>) -> Result<(), String> {
    if let Some(cluster) = &state.cluster {
        return cluster.remember(name, script).await;
    }
    let Some(d) = &state.durable else {
        return Ok(());
    };
    let written = match script {
        Some(script) => d.catalog_deployed(name, script),
        None => d.catalog_removed(name),
    };
    written
        .map_err(|e| format!("the change is live but was not saved to the data directory: {e}"))?;
    super::durability::checkpoint(state)
        .await
        .map(|_| ())
        .map_err(|e| {
            format!("the change is live and saved, but the checkpoint after it failed: {e}")
        })
}

/// 400 `{"error","line","column"}`.
fn compile_error(e: &QueryError) -> Response<Body> {
    let (line, column) = e.line_column();
    let mut body = Vec::new();
    let mut object = Object::new(&mut body);
    object.str("error", &e.to_string());
    for (name, value) in [("line", line), ("column", column)] {
        match value {
            Some(v) => object.int(name, v as i64),
            None => object.raw(name, b"null"),
        };
    }
    object.end();
    respond(StatusCode::BAD_REQUEST, "application/json", body)
}

/// The fields every description of a query starts with.
fn write_info(object: &mut Object<'_>, q: &Deployed) {
    let config = &q.def.config;
    object.str("name", &q.def.name);
    write_sources(object.key("source"), &config.sources);
    object
        .opt_str(
            "key_by",
            config.key_by.as_ref().map(|k| k.to_string()).as_deref(),
        )
        .opt_str(
            "time_field",
            config.time_field.as_ref().map(|k| k.to_string()).as_deref(),
        )
        .int("lateness_ms", config.lateness_ms)
        // What `--engine auto` makes of it (under `--engine interpreter` all is interpreted).
        .str("engine", &q.def.engine.summary())
        .array("functions", q.def.engine.function_lines(), |out, line| {
            crate::json::write_str(out, &line)
        })
        .int("version", q.id.0 as i64)
        .raw(
            "quarantined",
            if q.control.is_quarantined() {
                b"true"
            } else {
                b"false"
            },
        );
}

async fn show(state: &State, name: &str) -> Response<Body> {
    let router = state.router.load();
    let Some(q) = router.queries().iter().find(|q| q.def.name == name) else {
        return json_error(StatusCode::NOT_FOUND, &format!("no query named {name:?}"));
    };
    let mut body = Vec::new();
    let mut object = Object::new(&mut body);
    write_info(&mut object, q);
    object.str("script", &q.def.script).end();
    respond(StatusCode::OK, "application/json", body)
}

async fn list(state: &State) -> Response<Body> {
    let reports = state.pipeline.reports();
    let router = state.router.load();
    let mut body = b"[".to_vec();
    for (i, q) in router.queries().iter().enumerate() {
        let (stats, eval) = ShardReport::totals(&reports, q.id);
        if i > 0 {
            body.push(b',');
        }
        let mut object = Object::new(&mut body);
        write_info(&mut object, q);
        for (field, value) in [
            ("keys", stats.keys),
            ("events", stats.events),
            ("emitted", stats.emitted),
            ("errors", stats.errors),
            ("late", stats.late),
            ("timers_fired", stats.timers_fired),
            ("timers_deferred", stats.timers_deferred),
            ("skipped", stats.skipped),
            ("keys_evicted", stats.keys_evicted),
            ("keys_refused", stats.keys_refused),
            ("keys_expired", stats.keys_expired),
            ("cpu_us", stats.cpu_us),
        ] {
            object.int(field, value as i64);
        }
        let us = |q: f64| eval.value_at_quantile(q) as f64 / 1000.0;
        Object::new(object.key("eval_us"))
            .float("p50", us(0.5))
            .float("p99", us(0.99))
            .end();
        object.end();
    }
    body.push(b']');
    respond(StatusCode::OK, "application/json", body)
}
