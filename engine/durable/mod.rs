//! Durability: the ingest log, checkpoints of every key's state, and the formats they share.
//!
//! The server appends everything that changes what its queries compute to the ingest log
//! ([`log`]), in the order it routes it, before it acknowledges it: each accepted frame with its
//! source, stream and arrival time, each source's opening and closing, and each idle advance of
//! event time. Replaying those records through the same code reproduces the same deliveries in
//! the same order, so timers, watermarks and lateness come out as they did.
//!
//! A checkpoint ([`Checkpoint`]) is taken at a log position: under the same lock that orders the
//! log, the server notes the position and the router's marks and queues a checkpoint request
//! behind the work already queued for every shard; each shard copies its queries' state when it
//! reaches the request, so together they hold exactly the effect of the records before that
//! position. The copies are encoded (MessagePack) and written off the shard threads, to a
//! temporary file that is synced and renamed, so a crash mid-write leaves the previous
//! checkpoint whole. Recovery loads the newest checkpoint that reads back, then replays the log
//! from its position.
//!
//! State is stored as data ([`Stored`]): Rhai's values, with plugin objects by value.

pub mod log;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rhai::Dynamic;
use serde::{Deserialize, Serialize};

use crate::key::Key;

/// Version of the checkpoint format; a checkpoint of another version is not loaded.
pub const CHECKPOINT_FORMAT: u32 = 1;

/// One entry of the ingest log.
#[derive(Clone, Debug, PartialEq)]
pub enum Record<'a> {
    /// A frame (or `POST /ingest` body) as it arrived, before parsing; with the idempotent
    /// producer's id and frame number when it has them (see `server::producer`), in the same
    /// record, so that a torn tail keeps both or neither.
    Frame {
        source: u64,
        now: i64,
        stream: Option<&'a str>,
        producer: Option<(&'a str, u64)>,
        bytes: &'a [u8],
    },
    /// A source declared its stream before sending.
    Open {
        source: u64,
        wall: i64,
        stream: &'a str,
    },
    /// A source went away.
    Close { source: u64 },
    /// Idle inputs' marks moved on with processing time, as of `now`.
    Idle { now: i64 },
}

const FRAME: u8 = 1;
const OPEN: u8 = 2;
const CLOSE: u8 = 3;
const IDLE: u8 = 4;
/// A frame of an idempotent producer: [`FRAME`]'s fields with the producer's before the bytes.
const PRODUCED_FRAME: u8 = 5;

fn put_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        None => out.extend_from_slice(&u32::MAX.to_le_bytes()),
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("a log record is shorter than its fields".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn i64(&mut self) -> Result<i64, String> {
        Ok(self.u64()? as i64)
    }
    fn str(&mut self) -> Result<Option<&'a str>, String> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"));
        if len == u32::MAX {
            return Ok(None);
        }
        std::str::from_utf8(self.take(len as usize)?)
            .map(Some)
            .map_err(|_| "a log record holds a name that is not UTF-8".into())
    }
}

impl<'a> Record<'a> {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Record::Frame {
                source,
                now,
                stream,
                producer,
                bytes,
            } => {
                out.push(if producer.is_some() {
                    PRODUCED_FRAME
                } else {
                    FRAME
                });
                out.extend_from_slice(&source.to_le_bytes());
                out.extend_from_slice(&now.to_le_bytes());
                put_str(out, *stream);
                if let Some((id, frame)) = producer {
                    put_str(out, Some(id));
                    out.extend_from_slice(&frame.to_le_bytes());
                }
                out.extend_from_slice(bytes);
            }
            Record::Open {
                source,
                wall,
                stream,
            } => {
                out.push(OPEN);
                out.extend_from_slice(&source.to_le_bytes());
                out.extend_from_slice(&wall.to_le_bytes());
                put_str(out, Some(stream));
            }
            Record::Close { source } => {
                out.push(CLOSE);
                out.extend_from_slice(&source.to_le_bytes());
            }
            Record::Idle { now } => {
                out.push(IDLE);
                out.extend_from_slice(&now.to_le_bytes());
            }
        }
    }

    pub fn decode(payload: &'a [u8]) -> Result<Record<'a>, String> {
        let mut c = Cursor(payload);
        let kind = c.take(1)?[0];
        match kind {
            FRAME => Ok(Record::Frame {
                source: c.u64()?,
                now: c.i64()?,
                stream: c.str()?,
                producer: None,
                bytes: c.0,
            }),
            PRODUCED_FRAME => Ok(Record::Frame {
                source: c.u64()?,
                now: c.i64()?,
                stream: c.str()?,
                producer: Some((
                    c.str()?.ok_or("a producer's frame without the producer")?,
                    c.u64()?,
                )),
                bytes: c.0,
            }),
            OPEN => Ok(Record::Open {
                source: c.u64()?,
                wall: c.i64()?,
                stream: c.str()?.ok_or("an open record without a stream")?,
            }),
            CLOSE => Ok(Record::Close { source: c.u64()? }),
            IDLE => Ok(Record::Idle { now: c.i64()? }),
            other => Err(format!("unknown log record kind {other}")),
        }
    }
}

/// A Rhai value as data.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Stored {
    Unit,
    Bool(bool),
    Int(i64),
    Float(f64),
    Char(char),
    Str(String),
    Array(Vec<Stored>),
    Map(Vec<(String, Stored)>),
    Blob(Vec<u8>),
    Plugin(eddy_plugins::PluginObject),
    /// A value of a type that cannot be stored (a function pointer, say): restored as `()`.
    Other(String),
}

impl Stored {
    pub fn of(value: &Dynamic) -> Stored {
        if value.is_unit() {
            Stored::Unit
        } else if let Ok(b) = value.as_bool() {
            Stored::Bool(b)
        } else if let Ok(n) = value.as_int() {
            Stored::Int(n)
        } else if let Ok(x) = value.as_float() {
            Stored::Float(x)
        } else if let Ok(c) = value.as_char() {
            Stored::Char(c)
        } else if let Ok(s) = value.as_immutable_string_ref() {
            Stored::Str(s.to_string())
        } else if value.is_array() {
            let a = value.as_array_ref().expect("checked is_array");
            Stored::Array(a.iter().map(Stored::of).collect())
        } else if value.is_map() {
            let m = value.as_map_ref().expect("checked is_map");
            Stored::Map(
                m.iter()
                    .map(|(k, v)| (k.to_string(), Stored::of(v)))
                    .collect(),
            )
        } else if value.is_blob() {
            Stored::Blob(value.as_blob_ref().expect("checked is_blob").clone())
        } else if let Some(p) = eddy_plugins::PluginObject::of(value) {
            Stored::Plugin(p)
        } else {
            Stored::Other(value.type_name().to_owned())
        }
    }

    pub fn into_dynamic(self) -> Dynamic {
        match self {
            Stored::Unit | Stored::Other(_) => Dynamic::UNIT,
            Stored::Bool(b) => b.into(),
            Stored::Int(n) => n.into(),
            Stored::Float(x) => x.into(),
            Stored::Char(c) => c.into(),
            Stored::Str(s) => s.into(),
            Stored::Array(a) => {
                Dynamic::from_array(a.into_iter().map(Stored::into_dynamic).collect())
            }
            Stored::Map(m) => Dynamic::from_map(
                m.into_iter()
                    .map(|(k, v)| (k.into(), v.into_dynamic()))
                    .collect(),
            ),
            Stored::Blob(b) => Dynamic::from_blob(b),
            Stored::Plugin(p) => p.into_dynamic(),
        }
    }
}

/// A key as data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredKey {
    None,
    Bool(bool),
    Int(i64),
    Str(String),
}

impl From<&Key> for StoredKey {
    fn from(key: &Key) -> Self {
        match key {
            Key::None => StoredKey::None,
            Key::Bool(b) => StoredKey::Bool(*b),
            Key::Int(n) => StoredKey::Int(*n),
            Key::Str(s) => StoredKey::Str(s.to_string()),
        }
    }
}

impl From<StoredKey> for Key {
    fn from(key: StoredKey) -> Self {
        match key {
            StoredKey::None => Key::None,
            StoredKey::Bool(b) => Key::Bool(b),
            StoredKey::Int(n) => Key::Int(n),
            StoredKey::Str(s) => Key::Str(s.into()),
        }
    }
}

/// One key of one query, as a shard held it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyCheckpoint {
    pub key: StoredKey,
    pub state: Stored,
    /// Its pending timers.
    pub timers: Vec<i64>,
    /// The newest event time seen for it (`key_ttl`, and the order of eviction).
    pub seen_time: i64,
}

/// What one shard held of one query.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ShardQueryCheckpoint {
    pub watermark: i64,
    pub keys: Vec<KeyCheckpoint>,
    /// Timers set by `on_timer` for a time already reached, waiting for the next advance.
    pub deferred: Vec<(i64, StoredKey)>,
}

/// The router's marks of one query's input (see [`crate::router`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MarksCheckpoint {
    pub watermark: i64,
    /// `(source, mark, last seen wall ms)`.
    pub sources: Vec<(u64, i64, i64)>,
    pub last_arrival: i64,
    pub event_mark: i64,
}

/// Everything about one query.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QueryCheckpoint {
    pub name: String,
    /// Of the script the state belongs to: another script starts fresh.
    pub script_hash: u64,
    pub marks: MarksCheckpoint,
    /// One entry per shard, in shard order.
    pub shards: Vec<ShardQueryCheckpoint>,
}

/// The state of every query at one log position.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Checkpoint {
    pub format: u32,
    /// Replay the log from this record on.
    pub lsn: u64,
    /// Source ids below this were used before.
    pub next_source: u64,
    /// Wall-clock ms when it was taken.
    pub taken_ms: i64,
    pub queries: Vec<QueryCheckpoint>,
    /// The position of every topic the state covers (absent from checkpoints written before
    /// positions existed: their topics start afresh).
    #[serde(default)]
    pub topics: Vec<TopicCheckpoint>,
    /// Per idempotent producer, the number after the highest frame taken (absent from
    /// checkpoints written before producers were numbered).
    #[serde(default)]
    pub producers: Vec<(String, u64)>,
}

/// A topic's position at a checkpoint: its epoch and, per shard, the items emitted before it
/// (see `server::replay`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicCheckpoint {
    pub topic: String,
    pub epoch: u64,
    pub counts: Vec<u64>,
    /// The latest value of each key, for snapshots: the key, its `{"key":K,"value":V}` element
    /// (JSON text) and the shard it came from.
    #[serde(default)]
    pub latest: Vec<(StoredKey, String, u32)>,
}

impl Checkpoint {
    /// Keys held, over every query.
    pub fn keys(&self) -> usize {
        self.queries
            .iter()
            .flat_map(|q| &q.shards)
            .map(|s| s.keys.len())
            .sum()
    }
}

/// A stable fingerprint of a script's text.
pub fn script_hash(script: &str) -> u64 {
    (u64::from(crc32fast::hash(script.as_bytes())) << 32) | (script.len() as u64 & 0xffff_ffff)
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("checkpoint {path} does not decode: {message}")]
    Decode { path: String, message: String },
}

fn checkpoint_name(lsn: u64) -> String {
    format!("checkpoint-{lsn:020}.msgpack")
}

/// The checkpoint files in `dir`, newest first.
fn checkpoint_files(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter_map(|p| {
            let lsn = p
                .file_name()?
                .to_str()?
                .strip_prefix("checkpoint-")?
                .strip_suffix(".msgpack")?
                .parse()
                .ok()?;
            Some((lsn, p))
        })
        .collect();
    out.sort_by_key(|c| std::cmp::Reverse(c.0));
    out
}

/// Writes `checkpoint` into `dir` atomically (temporary file, sync, rename, sync of the folder),
/// then deletes all but the newest two. Returns the bytes written.
pub fn write_checkpoint(dir: &Path, checkpoint: &Checkpoint) -> Result<u64, CheckpointError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| CheckpointError::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    let bytes = rmp_serde::to_vec(checkpoint).map_err(|e| CheckpointError::Decode {
        path: dir.display().to_string(),
        message: e.to_string(),
    })?;
    let path = dir.join(checkpoint_name(checkpoint.lsn));
    let tmp = dir.join(format!("{}.tmp", checkpoint_name(checkpoint.lsn)));
    {
        let mut file = fs::File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(&bytes).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
    }
    fs::rename(&tmp, &path).map_err(io(&path))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    for (_, old) in checkpoint_files(dir).into_iter().skip(2) {
        let _ = fs::remove_file(old);
    }
    Ok(bytes.len() as u64)
}

/// The newest checkpoint in `dir` that reads back whole, and the problems of newer ones that did
/// not.
pub fn read_latest(dir: &Path) -> (Option<Checkpoint>, Vec<String>) {
    let mut problems = Vec::new();
    for (_, path) in checkpoint_files(dir) {
        let decoded = fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| rmp_serde::from_slice::<Checkpoint>(&b).map_err(|e| e.to_string()));
        match decoded {
            Ok(c) if c.format == CHECKPOINT_FORMAT => return (Some(c), problems),
            Ok(c) => problems.push(format!(
                "{}: format {} (this eddy reads {CHECKPOINT_FORMAT})",
                path.display(),
                c.format
            )),
            Err(e) => problems.push(format!("{}: {e}", path.display())),
        }
    }
    (None, problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use eddy_plugins::Package;

    #[test]
    fn records_round_trip() {
        let records = [
            Record::Frame {
                source: 7,
                now: -3,
                stream: Some("trades"),
                producer: None,
                bytes: b"{\"a\":1}",
            },
            Record::Frame {
                source: 8,
                now: 4,
                stream: Some("trades"),
                producer: Some(("desk-7", u64::MAX)),
                bytes: b"{\"a\":2}",
            },
            Record::Frame {
                source: 1,
                now: 5,
                stream: None,
                producer: None,
                bytes: b"",
            },
            Record::Open {
                source: 2,
                wall: 99,
                stream: "s",
            },
            Record::Close { source: 3 },
            Record::Idle { now: 12 },
        ];
        for r in records {
            let mut out = Vec::new();
            r.encode(&mut out);
            assert_eq!(Record::decode(&out).unwrap(), r);
        }
        assert!(Record::decode(&[9]).is_err());
        assert!(Record::decode(&[FRAME, 1, 2]).is_err());
    }

    #[test]
    fn state_with_plugin_objects_round_trips_through_msgpack() {
        let mut engine = rhai::Engine::new();
        engine.register_global_module(eddy_plugins::EddyPackage::new().as_shared_module());
        let state: Dynamic = engine
            .eval(
                r#"let o = ohlc(); o.add(2, 3); o.add(5, 1);
                   let r = ring(3); r.push(1); r.push(2.5);
                   #{ n: 3, sum: 1.5, name: "x", flag: true, list: [1, "a", ()], bar: o, r: r }"#,
            )
            .unwrap();
        let stored = Stored::of(&state);
        let bytes = rmp_serde::to_vec(&stored).unwrap();
        let back = rmp_serde::from_slice::<Stored>(&bytes)
            .unwrap()
            .into_dynamic();
        // Compared through each value's own rendering, plugin objects by their summaries.
        let map = back.as_map_ref().unwrap();
        assert_eq!(map["n"].as_int().unwrap(), 3);
        assert_eq!(map["sum"].as_float().unwrap(), 1.5);
        assert_eq!(map["name"].clone().into_string().unwrap(), "x");
        assert!(map["flag"].as_bool().unwrap());
        assert_eq!(map["list"].as_array_ref().unwrap().len(), 3);
        let bar = eddy_plugins::summary(&map["bar"]).unwrap();
        assert_eq!(bar["high"].as_float().unwrap(), 5.0);
        assert_eq!(bar["low"].as_float().unwrap(), 2.0);
        let ring = eddy_plugins::summary(&map["r"]).unwrap();
        let before = eddy_plugins::summary(&state.as_map_ref().unwrap()["r"]).unwrap();
        assert_eq!(format!("{ring:?}"), format!("{before:?}"));
    }

    #[test]
    fn a_torn_checkpoint_falls_back_to_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Checkpoint {
            format: CHECKPOINT_FORMAT,
            lsn: 10,
            next_source: 3,
            taken_ms: 0,
            queries: Vec::new(),
            topics: Vec::new(),
            producers: Vec::new(),
        };
        write_checkpoint(dir.path(), &c).unwrap();
        c.lsn = 20;
        write_checkpoint(dir.path(), &c).unwrap();
        let newest = dir.path().join(checkpoint_name(20));
        let bytes = fs::read(&newest).unwrap();
        fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
        let (found, problems) = read_latest(dir.path());
        assert_eq!(found.unwrap().lsn, 10);
        assert_eq!(problems.len(), 1, "{problems:?}");
        c.lsn = 30;
        write_checkpoint(dir.path(), &c).unwrap();
        c.lsn = 40;
        write_checkpoint(dir.path(), &c).unwrap();
        assert_eq!(
            checkpoint_files(dir.path()).len(),
            2,
            "only the newest two are kept"
        );
    }

    #[test]
    fn topic_positions_round_trip_and_older_checkpoints_still_read() {
        let c = Checkpoint {
            format: CHECKPOINT_FORMAT,
            lsn: 7,
            next_source: 2,
            taken_ms: 5,
            queries: Vec::new(),
            topics: vec![TopicCheckpoint {
                topic: "vwap".into(),
                epoch: 99,
                counts: vec![4, 0],
                latest: vec![(
                    StoredKey::Str("AAPL".into()),
                    r#"{"key":"AAPL","value":1}"#.into(),
                    0,
                )],
            }],
            producers: vec![("desk-7".into(), 12), ("feed".into(), u64::MAX)],
        };
        let back: Checkpoint = rmp_serde::from_slice(&rmp_serde::to_vec(&c).unwrap()).unwrap();
        assert_eq!(back.topics, c.topics);
        assert_eq!(back.producers, c.producers);
        // A checkpoint written before topics had positions: the same fields, without the last.
        #[derive(Serialize)]
        struct Before {
            format: u32,
            lsn: u64,
            next_source: u64,
            taken_ms: i64,
            queries: Vec<QueryCheckpoint>,
        }
        let old = Before {
            format: CHECKPOINT_FORMAT,
            lsn: 7,
            next_source: 2,
            taken_ms: 5,
            queries: Vec::new(),
        };
        let back: Checkpoint = rmp_serde::from_slice(&rmp_serde::to_vec(&old).unwrap()).unwrap();
        assert_eq!(
            (back.lsn, back.topics.len(), back.producers.len()),
            (7, 0, 0)
        );
    }
}
