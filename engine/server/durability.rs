//! The server's side of durability (see [`crate::durable`]): the data directory, the order of
//! the ingest log, checkpoints on a timer and at shutdown, the durable query catalog, and
//! recovery at start.
//!
//! Layout of the data directory:
//! - `log/`: the ingest log's segments;
//! - `checkpoints/`: the newest two checkpoints;
//! - `catalog/`: queries deployed (`NAME.rhai`) and removed (`NAME.removed`) over the admin API.
//!   At start the queries folder is deployed first, then the catalog on top of it: a change made
//!   through the API wins over the folder until the name is deployed or removed again.
//!
//! One lock ([`Durability::order`]) orders the log: a frame is routed, queued for its shards and
//! appended under it, and so are a source's opening and closing, the idle advances of event time
//! and the position a checkpoint is taken at. The log's order is therefore the order the shards
//! saw, and a replay through the same code gives the same results.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::durable::log::{self, Fsync, Log, Opened};
use crate::durable::{
    read_latest, script_hash, write_checkpoint, Checkpoint, QueryCheckpoint, Record,
    ShardQueryCheckpoint, StoredKey, TopicCheckpoint, CHECKPOINT_FORMAT,
};
use crate::key::Key;
use crate::shard::QueryId;

use super::hub::{HubControl, RestoredTopic, ShardCount};
use super::pipeline::ShardMsg;
use super::replay::Position;
use super::{StartError, State};

/// The data directory in use.
pub struct Durability {
    dir: PathBuf,
    pub log: Log,
    /// Held while one record is routed, queued and appended (see the module documentation).
    pub order: tokio::sync::Mutex<()>,
    /// What opening found, and the newest checkpoint, until recovery has used them.
    pending: std::sync::Mutex<Option<(Opened, Option<Checkpoint>)>>,
    pub checkpoints: AtomicU64,
    pub last_checkpoint_us: AtomicU64,
    pub last_checkpoint_bytes: AtomicU64,
    /// The longest a shard spent copying its state for the last checkpoint.
    pub last_pause_us: AtomicU64,
    pub replayed_records: AtomicU64,
    pub truncated_bytes: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum DurabilityError {
    #[error("data directory {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Log(#[from] log::LogError),
    #[error("recovery: {0}")]
    Recovery(String),
}

impl Durability {
    /// Opens the data directory: reads the newest checkpoint and opens the log after it.
    pub fn open(dir: &Path, fsync: Fsync) -> Result<Durability, DurabilityError> {
        for sub in ["log", "checkpoints", "catalog"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(|source| DurabilityError::Io {
                path: path.display().to_string(),
                source,
            })?;
        }
        let (checkpoint, problems) = read_latest(&dir.join("checkpoints"));
        for p in &problems {
            tracing::warn!("checkpoint not used: {p}");
        }
        let floor = checkpoint.as_ref().map_or(0, |c| c.lsn);
        let (log, opened) = Log::open(&dir.join("log"), fsync, floor)?;
        if let Some(why) = &opened.truncated_because {
            tracing::warn!(
                "ingest log: cut {} bytes at its tail ({why}); what they held was never \
                 acknowledged and is not replayed",
                opened.truncated_bytes
            );
        }
        Ok(Durability {
            dir: dir.to_path_buf(),
            log,
            order: tokio::sync::Mutex::new(()),
            truncated_bytes: AtomicU64::new(opened.truncated_bytes),
            pending: std::sync::Mutex::new(Some((opened, checkpoint))),
            checkpoints: AtomicU64::new(0),
            last_checkpoint_us: AtomicU64::new(0),
            last_checkpoint_bytes: AtomicU64::new(0),
            last_pause_us: AtomicU64::new(0),
            replayed_records: AtomicU64::new(0),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `record` (call with [`Durability::order`] held); returns its position.
    pub fn append(&self, record: &Record<'_>) -> u64 {
        let mut payload = Vec::new();
        record.encode(&mut payload);
        self.log.append(&payload)
    }

    fn catalog_dir(&self) -> PathBuf {
        self.dir.join("catalog")
    }

    /// Records that `name` was deployed with `script` over the admin API.
    pub fn catalog_deployed(&self, name: &str, script: &str) -> std::io::Result<()> {
        let dir = self.catalog_dir();
        write_atomically(&dir, &format!("{name}.rhai"), script.as_bytes())?;
        remove_if_there(&dir.join(format!("{name}.removed")))
    }

    /// Records that `name` was removed over the admin API.
    pub fn catalog_removed(&self, name: &str) -> std::io::Result<()> {
        let dir = self.catalog_dir();
        write_atomically(&dir, &format!("{name}.removed"), b"")?;
        remove_if_there(&dir.join(format!("{name}.rhai")))
    }

    /// The catalog's entries: `(name, Some(script))` for a deploy, `(name, None)` for a removal.
    fn catalog(&self) -> Vec<(String, Option<String>)> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.catalog_dir()) else {
            return out;
        };
        for path in entries.filter_map(Result::ok).map(|e| e.path()) {
            let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            match path.extension().and_then(|x| x.to_str()) {
                Some("rhai") => {
                    if let Ok(script) = std::fs::read_to_string(&path) {
                        out.push((name.to_owned(), Some(script)));
                    }
                }
                Some("removed") => out.push((name.to_owned(), None)),
                _ => {}
            }
        }
        out.sort();
        out
    }
}

fn remove_if_there(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Deploys and removes what the durable catalog says, after the queries folder.
pub async fn apply_catalog(state: &Arc<State>) {
    let Some(d) = &state.durable else { return };
    for (name, script) in d.catalog() {
        match script {
            Some(script) => {
                match super::admin::compile(name.clone(), script, state.config.limits.clone()).await
                {
                    Ok(def) => {
                        if let Err(e) = super::admin::deploy(state, def).await {
                            tracing::warn!("catalog: query {name} not deployed: {e}");
                        }
                    }
                    Err(e) => tracing::warn!("catalog: query {name} does not compile: {e}"),
                }
            }
            None => {
                super::admin::remove(state, &name).await;
            }
        }
    }
}

/// What recovery did, for the log line and the tests.
#[derive(Debug, Default, Clone)]
pub struct Recovered {
    pub queries: usize,
    pub keys: usize,
    pub records: u64,
    pub elapsed: Duration,
}

/// Loads the newest checkpoint into the deployed queries, then replays the ingest log after
/// it. Runs at start, before any connection is accepted.
pub async fn recover(state: &Arc<State>) -> Result<Recovered, StartError> {
    let Some(d) = &state.durable else {
        return Ok(Recovered::default());
    };
    let started = Instant::now();
    let Some((opened, checkpoint)) = d.pending.lock().unwrap_or_else(|e| e.into_inner()).take()
    else {
        return Ok(Recovered::default());
    };
    let mut recovered = Recovered::default();
    let mut open_sources: HashSet<u64> = HashSet::new();
    let mut next_source = 1;
    let from = checkpoint.as_ref().map_or(opened.first, |c| c.lsn);
    if let Some(c) = checkpoint {
        next_source = c.next_source;
        for (producer, next) in &c.producers {
            state.producers_seen.restore(producer, *next);
        }
        let router = state.router.load_full();
        let shards = state.pipeline.shards();
        // Topics go on from their positions, so that replayed items get the same ones; with
        // another number of shards the positions mean nothing and topics start afresh.
        let topics: Vec<RestoredTopic> = c
            .topics
            .into_iter()
            .filter(|t| t.counts.len() == shards)
            .map(|t| RestoredTopic {
                topic: t.topic,
                position: Position {
                    epoch: t.epoch,
                    counts: t.counts,
                },
                latest: t
                    .latest
                    .into_iter()
                    .map(|(k, v, shard)| (Key::from(k), v.into(), shard as usize))
                    .collect(),
            })
            .collect();
        for t in &topics {
            tracing::debug!("topic {} goes on from {}", t.topic, t.position.encode());
        }
        state.hub.control(HubControl::Restore { topics });
        for qc in c.queries {
            let Some(q) = router.queries().iter().find(|q| q.def.name == qc.name) else {
                tracing::info!("checkpoint: query {} is no longer deployed", qc.name);
                continue;
            };
            if script_hash(&q.def.script) != qc.script_hash {
                tracing::warn!(
                    "checkpoint: query {} has another script now: it starts with no state",
                    qc.name
                );
                continue;
            }
            q.import_marks(&qc.marks);
            open_sources.extend(qc.marks.sources.iter().map(|s| s.0));
            recovered.queries += 1;
            for (shard, data) in split(qc.shards, shards).into_iter().enumerate() {
                recovered.keys += data.keys.len();
                let msg = ShardMsg::Restore { id: q.id, data };
                state.pipeline.send(shard, msg).await.map_err(|e| {
                    StartError::Durability(DurabilityError::Recovery(e.to_string()))
                })?;
            }
        }
    }
    // Replay: the log is read on a blocking thread, record by record, with a bounded queue.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(256);
    let dir = d.dir.join("log");
    let reader = tokio::task::spawn_blocking(move || {
        log::read_from(&dir, from, |_, payload| {
            tx.blocking_send(payload)
                .map_err(|_| "replay stopped".to_owned())
        })
    });
    let mut parser = crate::event::Parser::default();
    while let Some(payload) = rx.recv().await {
        let record = Record::decode(&payload)
            .map_err(|e| StartError::Durability(DurabilityError::Recovery(e)))?;
        recovered.records += 1;
        match record {
            Record::Frame {
                source,
                now,
                stream,
                producer,
                bytes,
            } => {
                next_source = next_source.max(source + 1);
                if let Some((id, frame)) = producer {
                    state.producers_seen.restore(id, frame.saturating_add(1));
                }
                let parsed = parser.parse(bytes.to_vec());
                let mut rejections = parsed.rejections;
                super::ingest::apply(
                    state,
                    source,
                    &parsed.frame,
                    stream,
                    now,
                    Instant::now(),
                    &mut rejections,
                )
                .await;
            }
            Record::Open {
                source,
                wall,
                stream,
            } => {
                next_source = next_source.max(source + 1);
                open_sources.insert(source);
                super::ingest::open_source(state, source, stream, wall);
            }
            Record::Close { source } => {
                open_sources.remove(&source);
                super::ingest::close_source(state, source).await;
            }
            Record::Idle { now } => {
                if let Some(idle) = state.config.idle_timeout {
                    super::advance_idle(state, now, idle.as_millis() as i64).await;
                }
            }
        }
    }
    match reader.await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            return Err(StartError::Durability(DurabilityError::Recovery(e)));
        }
        Err(e) => {
            return Err(StartError::Durability(DurabilityError::Recovery(
                e.to_string(),
            )))
        }
    }
    state.next_source.fetch_max(next_source, Ordering::Relaxed);
    // The sources that were open when the server stopped are gone: they stop holding marks,
    // and the log says so for the next recovery.
    let mut left: Vec<u64> = open_sources.into_iter().collect();
    left.sort_unstable();
    for source in left {
        let _guard = d.order.lock().await;
        d.append(&Record::Close { source });
        super::ingest::close_source(state, source).await;
    }
    // Everything replayed is handled and its items are in the hub (at their old positions)
    // before the first subscriber can ask to resume from one.
    state
        .pipeline
        .ask_all(|done| ShardMsg::Flush { done })
        .await
        .map_err(|e| StartError::Durability(DurabilityError::Recovery(e.to_string())))?;
    d.replayed_records
        .store(recovered.records, Ordering::Relaxed);
    recovered.elapsed = started.elapsed();
    tracing::info!(
        "recovered {} queries with {} keys from the checkpoint, replayed {} log records, in {:.1} ms",
        recovered.queries,
        recovered.keys,
        recovered.records,
        recovered.elapsed.as_secs_f64() * 1e3
    );
    Ok(recovered)
}

/// Spreads what the shards held of one query over `shards` shards by key (the number of shards
/// may have changed since the checkpoint); each shard starts from the least watermark.
fn split(parts: Vec<ShardQueryCheckpoint>, shards: usize) -> Vec<ShardQueryCheckpoint> {
    let watermark = parts.iter().map(|p| p.watermark).min().unwrap_or(i64::MIN);
    let mut out: Vec<ShardQueryCheckpoint> = (0..shards)
        .map(|_| ShardQueryCheckpoint {
            watermark,
            ..Default::default()
        })
        .collect();
    for part in parts {
        for k in part.keys {
            let shard = Key::from(k.key.clone()).shard(shards);
            out[shard].keys.push(k);
        }
        for (t, k) in part.deferred {
            let shard = Key::from(k.clone()).shard(shards);
            out[shard].deferred.push((t, k));
        }
    }
    out
}

/// Takes a checkpoint now: see [`crate::durable`]. Returns its size in bytes.
pub async fn checkpoint(state: &State) -> Result<u64, String> {
    let Some(d) = &state.durable else {
        return Ok(0);
    };
    let started = Instant::now();
    let guard = d.order.lock().await;
    let lsn = d.log.end();
    let router = state.router.load_full();
    let mut queries: Vec<(QueryId, QueryCheckpoint)> = router
        .queries()
        .iter()
        .map(|q| {
            (
                q.id,
                QueryCheckpoint {
                    name: q.def.name.clone(),
                    script_hash: script_hash(&q.def.script),
                    marks: q.export_marks(),
                    shards: Vec::new(),
                },
            )
        })
        .collect();
    drop(router);
    let next_source = state.next_source.load(Ordering::Relaxed);
    // Frames are recorded in the table under the same lock as their log records.
    let producers = state.producers_seen.export();
    let ids: Vec<QueryId> = queries.iter().map(|(id, _)| *id).collect();
    let mut replies = Vec::new();
    let mut marks = Vec::new();
    let shards = state.pipeline.shards();
    for shard in 0..shards {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (mark_tx, mark_rx) = tokio::sync::oneshot::channel();
        let msg = ShardMsg::Checkpoint {
            ids: ids.clone(),
            done: tx,
            hub_mark: mark_tx,
        };
        state
            .pipeline
            .send(shard, msg)
            .await
            .map_err(|e| e.to_string())?;
        replies.push(rx);
        marks.push(mark_rx);
    }
    drop(guard);
    let mut pause = Duration::ZERO;
    for rx in replies {
        let (copies, copying) = rx.await.map_err(|_| "a shard stopped".to_owned())?;
        pause = pause.max(copying);
        for (id, data) in copies {
            if let Some((_, q)) = queries.iter_mut().find(|(q, _)| *q == id) {
                q.shards.push(data);
            }
        }
    }
    let mut counts: Vec<Vec<ShardCount>> = Vec::with_capacity(shards);
    for rx in marks {
        counts.push(rx.await.map_err(|_| "the hub stopped".to_owned())?);
    }
    let topics = topic_positions(counts);
    for t in &topics {
        tracing::debug!("checkpoint at {lsn}: topic {} at {:?}", t.topic, t.counts);
    }
    // Everything the checkpoint holds must be in the log first.
    if lsn > 0 && !d.log.wait_durable(lsn - 1).await {
        return Err("the ingest log has stopped".into());
    }
    let keys: usize = queries
        .iter()
        .flat_map(|(_, q)| &q.shards)
        .map(|s| s.keys.len())
        .sum();
    let checkpoint = Checkpoint {
        format: CHECKPOINT_FORMAT,
        lsn,
        next_source,
        taken_ms: crate::router::wall_ms(),
        queries: queries.into_iter().map(|(_, q)| q).collect(),
        topics,
        producers,
    };
    let dir = d.dir.join("checkpoints");
    let bytes = tokio::task::spawn_blocking(move || write_checkpoint(&dir, &checkpoint))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    d.log.delete_before(lsn).map_err(|e| e.to_string())?;
    d.checkpoints.fetch_add(1, Ordering::Relaxed);
    let elapsed = started.elapsed();
    d.last_checkpoint_us
        .store(elapsed.as_micros() as u64, Ordering::Relaxed);
    d.last_pause_us
        .store(pause.as_micros() as u64, Ordering::Relaxed);
    tracing::debug!(
        "checkpoint at log record {lsn}: {keys} keys, {bytes} bytes, {:.1} ms (shards paused at \
         most {:.1} ms to copy)",
        elapsed.as_secs_f64() * 1e3,
        pause.as_secs_f64() * 1e3
    );
    d.last_checkpoint_bytes.store(bytes, Ordering::Relaxed);
    Ok(bytes)
}

/// Puts the shards' counts together: per topic, its epoch and one count per shard (0 where a
/// shard had not emitted to it yet).
fn topic_positions(per_shard: Vec<Vec<ShardCount>>) -> Vec<TopicCheckpoint> {
    let shards = per_shard.len();
    let mut topics: std::collections::BTreeMap<String, TopicCheckpoint> = Default::default();
    for (shard, counts) in per_shard.into_iter().enumerate() {
        for c in counts {
            let t = topics
                .entry(c.topic.clone())
                .or_insert_with(|| TopicCheckpoint {
                    topic: c.topic,
                    epoch: c.epoch,
                    counts: vec![0; shards],
                    latest: Vec::new(),
                });
            // A topic made again between two shards' marks: the newer run.
            if c.epoch != t.epoch {
                t.epoch = t.epoch.max(c.epoch);
            }
            t.counts[shard] = c.count;
            t.latest.extend(c.latest.into_iter().map(|(k, v)| {
                // The hub encoded the element as JSON: UTF-8.
                let text = String::from_utf8_lossy(&v).into_owned();
                (StoredKey::from(&k), text, shard as u32)
            }));
        }
    }
    topics.into_values().collect()
}

/// Checkpoints every `checkpoint_interval` until shutdown begins.
pub async fn checkpointer(state: Arc<State>) {
    let every = state.config.checkpoint_interval;
    let mut shutdown = state.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = checkpoint(&state).await {
            tracing::error!("checkpoint failed: {e}");
        }
    }
}
