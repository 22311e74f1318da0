//! Cluster mode: many eddy nodes, one logical engine, on NATS JetStream (`--cluster`).
//!
//! What lives in NATS (names fixed; every node of a cluster uses the same):
//! - stream `EDDY_EVENTS`, subjects `eddy.ev.<partition>`: the ingest log. A producer's frame is
//!   routed on the node it reached, exactly as alone (bad events are rejected there), and every
//!   accepted event is published, grouped per partition into one NDJSON message, to each
//!   partition its keys fall in: `key.shard(partitions)` of each query's key. Queries of one
//!   stream keyed by different fields therefore get one copy of the event per distinct partition
//!   (as Kafka Streams repartitions, deduplicated when the keys land in one partition), and the
//!   owner of a partition applies only the deliveries whose key is in that partition. The
//!   producer's ack waits for JetStream's acks of every message of the frame (all published,
//!   then all awaited at once). Each message carries an id (`Nats-Msg-Id`): one that fails (no
//!   responders while NATS elects a new stream leader, an ack lost with the leader that died)
//!   is sent again with the same id, which JetStream stores once, for up to [`PUBLISH_RETRY`]
//!   after the frame came; only then are its events answered as rejected. An idempotent
//!   producer's frame (`producer=ID`) has the ids `ID/N/partition` on whichever node it
//!   arrives, so that a frame sent again to another node is stored once too
//!   ([`super::producer`]).
//!   With each event goes the producer's mark for each query on event time ([`MARKS_HEADER`]),
//!   and every [`MARKS_EVERY`] the marks a node's producers reached go to every partition
//!   ([`broadcast_marks`]), so that event time moves on in a partition as at the producer.
//! - bucket `eddy_nodes`: one key per live node, put every tick (with the catalog entries the
//!   node could not apply, for `GET /cluster`: [`Heartbeat`]), gone after the lease's life
//!   (`[cluster] lease`, [`config::DEFAULT_LEASE`]; the failover time is this plus up to one
//!   [`TICK`] and the replay of the partition).
//! - bucket `eddy_owners`: one key per owned partition, the owner's name: a lease, taken with
//!   compare-and-set (`create`), renewed with `update` on the revision the owner holds, deleted
//!   at that revision when handed over, and gone the lease's life after its owner stops
//!   renewing it.
//! - bucket `eddy_catalog`: deployed queries (`PUT`/`DELETE /queries`); every node watches it.
//! - object store `eddy_checkpoints`: one object per partition (`p<N>`), its keys' state and the
//!   stream sequence that state covers.
//! - subjects `eddy.out.<topic>`: emitted items, from the partition's owner to the hubs of the
//!   nodes that have a subscriber to the topic: a node subscribes to a topic's subject when its
//!   first local subscriber to the topic arrives and unsubscribes when the last one leaves.
//! - subjects `eddy.keep.<node>` and `eddy.keep.decide.<id>`: a replace that keeps state
//!   (`state=keep`), prepared on every live node before it is written to the catalog and
//!   committed, or given up everywhere ([`Cluster::replace_keeping`]).
//! - bucket `eddy_topics`: the named topics queries made at run time (a name built from the
//!   event: `emit("v_" + ev.venue, …)`), key [`named_topic_key`], value the topic's name. The
//!   owner that emits a topic's first item here puts it; every node watches the bucket and
//!   makes the topic known to its hub, so that it is listed (`{"op":"topics"}`) and can be
//!   subscribed to on every node before that node takes any item of it.
//! - stream `EDDY_LATEST`, subjects `eddy.last.<query>.<topic>.<key>` (each part one token, see
//!   [`latest_subject`]), one message kept per subject: each key's latest item per topic, for
//!   snapshots. The owner's forwarder publishes items on `eddy.out` at once and writes the keys
//!   that changed to this stream at most every `[cluster] latest_interval` (250 ms), each
//!   acknowledged by JetStream or kept for the next write, and before it answers a mark (a
//!   hand-over, a checkpoint, a removal). A node whose first subscriber to a topic arrives
//!   subscribes to `eddy.out.<topic>`, waits `latest_interval` and 100 ms (so that every value
//!   emitted before is in the stream), reads the topic's latest values (with batched direct
//!   gets, [`last_messages`], which any live server answers) into its hub's snapshot store
//!   (not items: not counted, not kept for resumes), then the items that came on `eddy.out`
//!   meanwhile (a key that came live keeps its live value, and a key's first live
//!   item equal to the value read is not taken twice), then lets the subscriber in: its
//!   snapshot holds every key the cluster ever emitted on the topic, also on a node started
//!   after the key's last item.
//!
//! Ownership: each partition has a preferred owner, the rendezvous-hash winner among the live
//! nodes; a free partition is taken by its preferred owner at once and by any node after
//! [`ORPHAN_GRACE`]. A node that sees a live node preferred for one of its partitions hands it
//! over: its consumer stops between two messages, the shards and this module's output finish,
//! its keys' state is dropped from the shards, the lease is deleted. The owner restores the
//! partition's checkpoint, reads the rest with an ordered consumer from the sequence after it,
//! and runs the events through the same router and shards as a node alone. Every
//! `checkpoint_interval` (and when leaving) it writes each partition's checkpoint and then
//! purges what it covers from the stream: the purge stands for the acknowledgement. A planned
//! hand-over (a node joined, or this one leaves) checkpoints the partitions it hands over first,
//! so their next owner replays only what came after.
//!
//! Output fence: items of keys whose partition this node does not own are not published, so a
//! handed-over partition's leftover state on its old owner never reaches a subscriber.
//!
//! NATS trouble (unreachable, a stream leader being elected, a server restarted): a lease whose
//! renewal NATS took is held from when its request was *sent* (NATS stored it later, so it
//! expires there a lease's life after that at the earliest). A lease that is lost
//! (`WrongLastRevision`) or not renewed for its life less a fifth ([`Cluster::lease_margin`],
//! 1 s of the default 5 s) is given up at once, without NATS ([`Cluster::give_up`]): the fence
//! closes (the forwarder drops the partition's items from then on, and its consumer stops
//! before its next message), the lease is no longer
//! renewed, no checkpoint of it is written (each write checks the lease is still certain), and
//! the ownership loop aborts its consumer and drops its state from the shards
//! (`ShardMsg::DropPartition`) before it may take the partition again. The node stays up
//! (`eddy_cluster_partitions_fenced_total` counts these) and, once NATS answers, takes partitions
//! as usual: the latest checkpoint, then the stream after it. Leases in its own name that it
//! does not run (a renewal NATS took after the node stopped waiting for it) are deleted at the
//! revision read, so that they are free at once.
//!
//! Why no event is counted twice: an owner's state is the checkpoint it loaded (covering stream
//! sequences up to S) plus the messages after S, each applied once (the consumer's own sequence
//! numbers have no gaps, and `seq < next` is skipped). Two nodes may hold state of one partition
//! at once only while the old one has not given it up; but its output stops when its fence
//! closes, at most [`TICK`] after its lease stopped being certain, which is a margin (1 s)
//! before NATS lets the lease expire, and a new owner can only take it after that and then
//! loads a checkpoint and replays before it emits anything. What reaches a subscriber of a key
//! therefore comes from one owner's state at a time, and the checkpoint (with its purge) is
//! written only by a node whose lease is certain: the old owner's state is dropped, never
//! written back. The assumption is that a node's own scheduling delays stay below the margin.
//! What is not fenced: messages already handed to the NATS client before the fence closed and
//! still in its buffer (a connection being re-established) go out when it reconnects: items on
//! `eddy.out` older than the new owner's (a value that steps back for a live subscriber), or a
//! checkpoint write that was under way (then its purge is not sent: the lease is checked again
//! after the write, see [`checkpoint`]). A write to `EDDY_LATEST` among them is refused by
//! JetStream if anyone wrote the key since: each is conditional on the subject's sequence, and
//! carries the lease revision it was emitted under, so a newer owner's value is never
//! overwritten by an older one ([`write_latest`]).
//!
//! Latest values and checkpoints: a checkpoint is written only after every value the shards
//! emitted before it was acknowledged in `EDDY_LATEST` (its marks pass through the forwarder,
//! which answers them only with nothing left to write). So a value the next owner will not emit
//! again (its events are covered by the checkpoint it loads) is already stored, and a value not
//! stored yet when the fence closes is dropped, not written late over a newer owner's: its
//! events come after the last checkpoint, and the next owner's replay emits it again.
//!
//! What clients see while NATS is away: a producer's frame waits for JetStream's acks, retried
//! with the same message id for up to [`PUBLISH_RETRY`], then its events are answered as
//! rejected (`JetStream did not acknowledge`); nothing acknowledged is lost. A subscriber keeps
//! its connection and gets no items (they cannot cross NATS); once the partitions are taken
//! again, each key's values resume from its checkpoint and climb back through the replay (a
//! value may step back to the checkpoint's before it comes back up), with `seq` without gaps.
//!
//! In: producers' frames (through `ingest`), NATS messages. Out: NATS publishes, the local hub's
//! input. The forwarder's channel from the shards is bounded ([`FORWARD_QUEUE`]): a full one
//! slows the shards, as the hub's lock does when alone.

pub mod config;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv, stream};
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use futures_util::StreamExt;

use crate::durable::{script_hash, ShardQueryCheckpoint, StoredKey};
use crate::event::{Frame, Parser, Position, Rejection};
use crate::json::Object;
use crate::router::{Clock, Delivery, RouteSink, Routed, SourceId, Unnamed};
use crate::shard::QueryId;
use crate::{Emitted, Key};
use serde::{Deserialize, Serialize};

use super::hub::HubHandle;
use super::pipeline::Forwarded;

/// Output messages the shards may queue for the forwarder before they wait.
const FORWARD_QUEUE: usize = 1024;
use super::pipeline::ShardMsg;
use super::producer::FrameId;
use super::State;

pub use config::{ClusterConfig, RawCluster};

/// How often a node heartbeats, renews its leases and looks for free partitions.
pub const TICK: Duration = Duration::from_millis(250);
/// Leases are renewed a fifth of their life apart (a loaded machine may miss a few).
const RENEWALS_PER_LEASE: u32 = 5;
/// A free partition whose preferred owner does not take it is taken by anyone after this.
const ORPHAN_GRACE: Duration = Duration::from_secs(2);
/// Partitions a node hands over to a node that joined, at most, per [`TICK`].
const HAND_OVER_PER_TICK: usize = 8;
/// A node starts taking partitions once it has seen its peers for this long.
const SETTLE: Duration = Duration::from_millis(1000);

const EVENTS: &str = "EDDY_EVENTS";
/// The key of `EDDY_EVENTS`'s metadata that holds the cluster's partition count.
const PARTITIONS_METADATA: &str = "eddy_partitions";
const NODES: &str = "eddy_nodes";
const OWNERS: &str = "eddy_owners";
const CATALOG: &str = "eddy_catalog";
const CHECKPOINTS: &str = "eddy_checkpoints";
const LATEST: &str = "EDDY_LATEST";
const TOPICS: &str = "eddy_topics";
/// How long a node keeps trying to get an input's messages into JetStream (a new stream leader
/// is elected in 4 to 9 s when one dies, 20 s and more on a starved machine) before it answers the input's events as rejected.
pub const PUBLISH_RETRY: Duration = Duration::from_secs(30);
/// The longest wait for one publish's ack before the message is sent again.
const ACK_WAIT: Duration = Duration::from_secs(2);
/// How often a node tells, on a quiet topic it sent items on, how many it has sent (a message
/// of no items), so that a receiver that lost the last ones learns it ([`Tails`]).
const TAIL_EVERY: Duration = Duration::from_secs(1);
/// How long after a topic's last items the node keeps telling their count.
const TAIL_FOR: Duration = Duration::from_secs(60);
/// JetStream's duplicate window of the event stream: longer than [`PUBLISH_RETRY`], so that a
/// message sent again is stored once.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(60);
/// The longest wait for a consumer to be made (one placed on a server that died times out).
const CONSUMER_CREATE: Duration = Duration::from_secs(2);
/// How often an idle partition consumer hears from NATS: two missed beats and it is made again.
const CONSUMER_HEARTBEAT: Duration = Duration::from_secs(1);
/// What a node waits, besides `latest_interval`, before it reads `EDDY_LATEST` for a topic's
/// first subscriber: the owners' write and its ack.
const LATEST_SETTLE: Duration = Duration::from_millis(100);
/// How long a first subscriber to a topic waits, at most, for the topic's latest values.
const LATEST_READ: Duration = Duration::from_secs(5);
/// How long a node that takes a `state=keep` replace waits for every other node to prepare it.
const KEEP_PREPARE: Duration = Duration::from_secs(10);
/// How long a node that prepared a `state=keep` replace waits for the decision before it gives
/// the replace up (the catalog entry, if it was written, then replaces it as alone).
const KEEP_DECIDE: Duration = Duration::from_secs(20);
/// How long the catalog write that commits a `state=keep` replace may take: with
/// [`KEEP_PREPARE`], well within the time the shards wait for the decision
/// ([`super::pipeline::REPLACE_TIMEOUT`]).
const KEEP_WRITE: Duration = Duration::from_secs(5);

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster: cannot read credentials {path}: {source}")]
    Credentials {
        path: String,
        source: std::io::Error,
    },
    #[error("cluster: cannot connect to NATS {urls}: {source}")]
    Connect {
        urls: String,
        source: async_nats::ConnectError,
    },
    #[error(
        "cluster: this node has {ours} partitions but the cluster's stream EDDY_EVENTS was made \
         with {theirs}: set `[cluster] partitions = {theirs}` (the count is fixed for the life \
         of the cluster's streams)"
    )]
    Partitions { ours: u32, theirs: String },
    #[error("cluster: JetStream {what}: {source}")]
    JetStream {
        what: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn js_err(
    what: &'static str,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> ClusterError {
    move |source| ClusterError::JetStream { what, source }
}

/// The subject of partition `p` of the event stream.
fn event_subject(p: u32) -> String {
    format!("eddy.ev.{p}")
}

/// The subject of topic `topic`'s items: the topic as it is when it makes a valid subject, else
/// `x` and its bytes in hex.
fn topic_subject(topic: &str) -> String {
    let plain = !topic.starts_with('x')
        && !topic.is_empty()
        && topic.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
    if plain {
        format!("eddy.out.{topic}")
    } else {
        let mut s = String::from("eddy.out.x");
        for b in topic.bytes() {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

/// The topic a subject of [`topic_subject`] names.
fn subject_topic(subject: &str) -> Option<String> {
    let rest = subject.strip_prefix("eddy.out.")?;
    if let Some(hex) = rest.strip_prefix('x').filter(|h| !h.contains('.')) {
        if hex.len() % 2 == 0 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let bytes: Option<Vec<u8>> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
                .collect();
            return String::from_utf8(bytes?).ok();
        }
    }
    Some(rest.to_owned())
}

/// One subject token for `part`: itself when it is a plain token (letters, digits, `_`, `-`,
/// not starting with `x`), else `x` and its bytes in hex.
fn token(part: &[u8]) -> String {
    let plain = !part.is_empty()
        && part[0] != b'x'
        && part
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-');
    if plain {
        String::from_utf8_lossy(part).into_owned()
    } else {
        let mut s = String::with_capacity(1 + 2 * part.len());
        s.push('x');
        for b in part {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

/// `eddy.last.<query>.<rest>` of a topic: its query's token and the rest of its name as one
/// token (`_` for the query's own topic), so that a topic's filter matches no other topic's keys
/// and one query's topics share a prefix.
fn latest_topic(topic: &str) -> String {
    match topic.split_once('.') {
        Some((query, rest)) => format!(
            "eddy.last.{}.{}",
            token(query.as_bytes()),
            token(rest.as_bytes())
        ),
        None => format!("eddy.last.{}._", token(topic.as_bytes())),
    }
}

/// The key of named topic `topic` (`<query>.<name>`) in the bucket `eddy_topics`: both parts as
/// tokens ([`token`]), so that one query's topics share a prefix. `None` for a query's own topic
/// and its `.errors` and `.late`, which every node lists from the query alone.
fn named_topic_key(topic: &str) -> Option<String> {
    let (query, name) = topic.split_once('.')?;
    if name == "errors" || name == "late" {
        return None;
    }
    Some(format!(
        "{}.{}",
        token(query.as_bytes()),
        token(name.as_bytes())
    ))
}

/// The subject that keeps `key`'s latest item on `topic` in the stream `EDDY_LATEST`: the key
/// as a token of its JSON.
fn latest_subject(topic: &str, key: &Key) -> String {
    let mut json = Vec::new();
    key.write_json(&mut json);
    format!("{}.{}", latest_topic(topic), token(&json))
}

/// The rendezvous weight of `node` for partition `p`: the live node with the highest weight is
/// the partition's preferred owner.
fn weight(node: &str, p: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes().chain(p.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // A final mix, so that nodes whose names differ in one byte spread well.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// The preferred owner of `p` among `live`.
fn preferred(live: &[String], p: u32) -> Option<&str> {
    live.iter()
        .max_by_key(|n| (weight(n, p), n.as_str()))
        .map(String::as_str)
}

/// A node's membership in the cluster: its NATS connection, buckets and counters.
pub struct Cluster {
    pub config: ClusterConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    nodes: kv::Store,
    owners: kv::Store,
    catalog: kv::Store,
    /// Named topics made at run time, by their [`named_topic_key`].
    topics: kv::Store,
    /// Named topics this node put in `topics` (or saw there): not put again.
    announced: std::sync::Mutex<HashSet<crate::Topic>>,
    /// Checkpoints, one object per partition (`p<N>`).
    checkpoints: jetstream::object_store::ObjectStore,
    /// The topics this node's subscribers want: their subscribers here, and the task taking the
    /// topic's items from NATS into the hub (its NATS subscription ends with it).
    interest: tokio::sync::Mutex<HashMap<String, Interest>>,
    /// Topics this node takes from NATS now.
    pub topics_taken: AtomicU64,
    /// Items taken from NATS into the hub, and latest values read from `EDDY_LATEST` for
    /// snapshots.
    pub received_items: AtomicU64,
    pub latest_loaded: AtomicU64,
    /// Writes of changed keys' latest values to `EDDY_LATEST`.
    pub latest_written: AtomicU64,
    /// Latest values not written because `EDDY_LATEST` already held one from a newer lease of
    /// their partition (see [`write_latest`]).
    pub latest_superseded: AtomicU64,
    /// Per partition: the stream sequence of the last message queued for the shards.
    fed: Vec<AtomicU64>,
    /// Held while a message is routed and queued and `fed` moves, and while a checkpoint is
    /// queued on the shards: the checkpoint's state covers exactly the sequences it records.
    order: tokio::sync::Mutex<()>,
    /// Held while partitions are handed over and while checkpoints are written: a checkpoint is
    /// written only by the partition's owner.
    moves: tokio::sync::Mutex<()>,
    pub checkpoints_written: AtomicU64,
    pub last_checkpoint_bytes: AtomicU64,
    pub restored_keys: AtomicU64,
    /// Per partition: this node owns it, and its items may leave (the output fence).
    owned: Vec<AtomicBool>,
    /// Per partition: messages the owner's consumer has not delivered yet.
    pending: Vec<AtomicU64>,
    /// Partitions taken over from another node (one that died or left).
    pub failovers: AtomicU64,
    pub acquired: AtomicU64,
    pub released: AtomicU64,
    /// Frames and events published, and publishes JetStream did not acknowledge.
    pub published_messages: AtomicU64,
    pub publish_failures: AtomicU64,
    /// Items of topics taken here that never came from their sender (see [`ITEMS_FROM`]).
    pub lost_items: AtomicU64,
    /// Idempotent producers' frames some of whose events an earlier send had stored.
    pub duplicate_frames: AtomicU64,
    /// Messages sent again after a failed publish.
    pub publish_retries: AtomicU64,
    /// Mark messages sent to the partitions ([`broadcast_marks`]).
    pub mark_messages: AtomicU64,
    /// Catalog entries this node could not apply (query → why): sent with its heartbeat, so
    /// that `GET /cluster` on any node lists them.
    catalog_failures: std::sync::Mutex<BTreeMap<String, String>>,
    /// Per query with timers (by name): the newest mark this node's producers reached, not yet
    /// sent to every partition ([`broadcast_marks`]).
    marks_due: std::sync::Mutex<HashMap<String, i64>>,
    /// This process's prefix of message ids (node name and start time), and the next number.
    incarnation: String,
    next_message: AtomicU64,
    /// Openings of topics so far ([`Interest::Opening`]).
    openings: AtomicU64,
    /// The shards' output (the forwarder's input), for its marks.
    out: Sender<Forwarded>,
    out_rx: Receiver<Forwarded>,
    /// Where items from every node go: the local hub.
    hub: HubHandle,
    stopping: AtomicBool,
    tasks: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// This node's leases: partition → (revision held, when the request that got it was sent:
    /// NATS stored it later, so it expires there no sooner than a lease's life after this).
    /// Shared by the ownership loop (takes, hands over) and the renewer (off the event path).
    leases: std::sync::Mutex<HashMap<u32, (u64, Instant)>>,
    /// Partitions given up ([`Cluster::give_up`]) whose consumers and state the ownership loop
    /// has not cleared yet: not taken again before it has.
    lost: std::sync::Mutex<Vec<u32>>,
    /// Partitions this node gave up because their lease was lost or could not be renewed.
    pub fenced: AtomicU64,
    /// Events a partition's new owner read from the stream that were there when it took the
    /// partition (what its checkpoint did not cover).
    pub replayed_events: AtomicU64,
}

impl Cluster {
    /// Connects to NATS and makes sure the stream and buckets exist. `hub` is where
    /// every node's items go; [`Cluster::shard_output`] is what the shards must be given.
    pub async fn connect(
        config: &ClusterConfig,
        hub: HubHandle,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("eddy {}", config.node))
            .connection_timeout(Duration::from_secs(5));
        if let Some(path) = &config.credentials {
            options = options.credentials_file(path).await.map_err(|source| {
                ClusterError::Credentials {
                    path: path.display().to_string(),
                    source,
                }
            })?;
        }
        let addrs: Vec<async_nats::ServerAddr> =
            config.urls.iter().filter_map(|u| u.parse().ok()).collect();
        let client = tokio::time::timeout(Duration::from_secs(10), options.connect(addrs))
            .await
            .map_err(|_| ClusterError::Connect {
                urls: config.urls.join(","),
                source: async_nats::ConnectError::from(async_nats::ConnectErrorKind::TimedOut),
            })?
            .map_err(|source| ClusterError::Connect {
                urls: config.urls.join(","),
                source,
            })?;
        let js = jetstream::new(client.clone());
        // The stream records the cluster's partition count at its first start: a node with
        // another count would route events to partitions the others do not read as its.
        let partitions = config.partitions.to_string();
        let events = js
            .get_or_create_stream(stream::Config {
                name: EVENTS.into(),
                subjects: vec!["eddy.ev.*".into()],
                duplicate_window: DUPLICATE_WINDOW,
                num_replicas: config.replicas,
                storage: stream::StorageType::File,
                metadata: HashMap::from([(PARTITIONS_METADATA.to_owned(), partitions.clone())]),
                ..Default::default()
            })
            .await
            .map_err(|e| js_err("stream EDDY_EVENTS")(Box::new(e)))?;
        let recorded = events
            .cached_info()
            .config
            .metadata
            .get(PARTITIONS_METADATA);
        match recorded {
            Some(theirs) if *theirs != partitions => {
                return Err(ClusterError::Partitions {
                    ours: config.partitions,
                    theirs: theirs.clone(),
                })
            }
            Some(_) => {}
            // A stream made before the count was recorded: recorded now.
            None => {
                let mut updated = events.cached_info().config.clone();
                updated
                    .metadata
                    .insert(PARTITIONS_METADATA.to_owned(), partitions);
                js.update_stream(updated)
                    .await
                    .map_err(|e| js_err("stream EDDY_EVENTS")(Box::new(e)))?;
            }
        }
        // Made or updated: read with direct gets, which streams made by earlier versions did not
        // allow.
        js.create_or_update_stream(stream::Config {
            name: LATEST.into(),
            subjects: vec!["eddy.last.>".into()],
            max_messages_per_subject: 1,
            allow_direct: true,
            num_replicas: config.replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| js_err("stream EDDY_LATEST")(Box::new(e)))?;
        let bucket = |name: &'static str, ttl: Option<Duration>| kv::Config {
            bucket: name.into(),
            history: 1,
            max_age: ttl.unwrap_or_default(),
            num_replicas: config.replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        let nodes = js
            .create_key_value(bucket(NODES, Some(config.lease)))
            .await
            .map_err(|e| js_err("bucket eddy_nodes")(Box::new(e)))?;
        let owners = js
            .create_key_value(bucket(OWNERS, Some(config.lease)))
            .await
            .map_err(|e| js_err("bucket eddy_owners")(Box::new(e)))?;
        let catalog = js
            .create_key_value(bucket(CATALOG, None))
            .await
            .map_err(|e| js_err("bucket eddy_catalog")(Box::new(e)))?;
        let topics = js
            .create_key_value(bucket(TOPICS, None))
            .await
            .map_err(|e| js_err("bucket eddy_topics")(Box::new(e)))?;
        let checkpoints = js
            .create_object_store(jetstream::object_store::Config {
                bucket: CHECKPOINTS.into(),
                num_replicas: config.replicas,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| js_err("object store eddy_checkpoints")(Box::new(e)))?;
        let (out, out_rx) = crossbeam_channel::bounded(FORWARD_QUEUE);
        let n = config.partitions as usize;
        Ok(Arc::new(Cluster {
            config: config.clone(),
            client,
            js,
            nodes,
            owners,
            catalog,
            topics,
            announced: std::sync::Mutex::new(HashSet::new()),
            checkpoints,
            interest: tokio::sync::Mutex::new(HashMap::new()),
            topics_taken: AtomicU64::new(0),
            received_items: AtomicU64::new(0),
            latest_loaded: AtomicU64::new(0),
            latest_written: AtomicU64::new(0),
            latest_superseded: AtomicU64::new(0),
            fed: (0..n).map(|_| AtomicU64::new(0)).collect(),
            order: tokio::sync::Mutex::new(()),
            moves: tokio::sync::Mutex::new(()),
            checkpoints_written: AtomicU64::new(0),
            last_checkpoint_bytes: AtomicU64::new(0),
            restored_keys: AtomicU64::new(0),
            owned: (0..n).map(|_| AtomicBool::new(false)).collect(),
            pending: (0..n).map(|_| AtomicU64::new(0)).collect(),
            failovers: AtomicU64::new(0),
            acquired: AtomicU64::new(0),
            released: AtomicU64::new(0),
            published_messages: AtomicU64::new(0),
            publish_failures: AtomicU64::new(0),
            lost_items: AtomicU64::new(0),
            duplicate_frames: AtomicU64::new(0),
            publish_retries: AtomicU64::new(0),
            mark_messages: AtomicU64::new(0),
            catalog_failures: std::sync::Mutex::new(BTreeMap::new()),
            marks_due: std::sync::Mutex::new(HashMap::new()),
            incarnation: format!("{}.{}", config.node, crate::router::wall_ms()),
            next_message: AtomicU64::new(0),
            openings: AtomicU64::new(0),
            out,
            out_rx,
            hub,
            stopping: AtomicBool::new(false),
            tasks: tokio::sync::Mutex::new(None),
            leases: std::sync::Mutex::new(HashMap::new()),
            lost: std::sync::Mutex::new(Vec::new()),
            fenced: AtomicU64::new(0),
            replayed_events: AtomicU64::new(0),
        }))
    }

    fn lost(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        self.lost.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long before its lease would expire in NATS a lease not renewed is given up: a fifth
    /// of its life (1 s of the default 5 s), more than the renewer's check period ([`TICK`]).
    fn lease_margin(&self) -> Duration {
        self.config.lease / RENEWALS_PER_LEASE
    }

    /// Whether this node's lease of `p` is still certain: held, and renewed (or taken) recently
    /// enough that NATS cannot have let it expire yet.
    fn lease_certain(&self, p: u32) -> bool {
        let lease = self.config.lease;
        let margin = self.lease_margin();
        self.leases()
            .get(&p)
            .is_some_and(|(_, sent)| Instant::now() + margin < *sent + lease)
    }

    /// Gives partition `p` up at once, without NATS: closes its output fence (the forwarder
    /// drops its items from now on, and its consumer stops before its next message), stops
    /// renewing its lease, and leaves its consumer and state to the ownership loop to clear
    /// before it may take the partition again. The node itself stays up.
    /// Returns whether it held `p` (else nothing changed); the caller says why.
    fn give_up(&self, p: u32) -> bool {
        let held = self.leases().remove(&p).is_some();
        let was = self.owned[p as usize].swap(false, Ordering::Relaxed);
        if !held && !was {
            return false;
        }
        self.lost().push(p);
        self.fenced.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<u32, (u64, Instant)>> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the shards send their output to in cluster mode.
    pub fn shard_output(&self) -> Sender<Forwarded> {
        self.out.clone()
    }

    /// Partitions this node owns now.
    pub fn owned(&self) -> usize {
        self.owned
            .iter()
            .filter(|o| o.load(Ordering::Relaxed))
            .count()
    }

    /// Messages waiting in this node's partitions' consumers.
    pub fn lag(&self) -> u64 {
        self.pending.iter().map(|p| p.load(Ordering::Relaxed)).sum()
    }

    /// Records a deploy (`Some(script)`) or removal in the cluster's catalog, which every node
    /// (this one too) applies.
    pub async fn remember(&self, name: &str, script: Option<&str>) -> Result<(), String> {
        let done = match script {
            Some(script) => {
                let entry = CatalogEntry {
                    script: script.to_owned(),
                    state: None,
                    from: Some(self.config.node.clone()),
                };
                let value = serde_json::to_vec(&entry).map_err(|e| e.to_string())?;
                self.catalog
                    .put(name, value.into())
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            None => {
                self.purge_latest(name).await;
                self.catalog.delete(name).await.map_err(|e| e.to_string())
            }
        };
        done.map_err(|e| format!("the change is live on this node but not in the cluster: {e}"))
    }

    /// Records a replace that keeps each key's state (`PUT /queries/NAME?state=keep`) in the
    /// cluster's catalog: every node replaces its own shards' version the same way, so each key
    /// keeps its state on the node that owns it ([`CatalogEntry`]).
    pub async fn remember_keeping(&self, name: &str, script: &str) -> Result<(), String> {
        let entry = CatalogEntry {
            script: script.to_owned(),
            state: Some("keep".to_owned()),
            from: Some(self.config.node.clone()),
        };
        let value = serde_json::to_vec(&entry).map_err(|e| e.to_string())?;
        self.catalog
            .put(name, value.into())
            .await
            .map(|_| ())
            .map_err(|e| format!("the change is live on this node but not in the cluster: {e}"))
    }

    /// Removes query `name`'s latest values from `EDDY_LATEST`: a later query of the same name
    /// starts with an empty snapshot, as it does alone.
    /// Its named topics leave `eddy_topics` too (and this node forgets it saw them), so that
    /// they are listed again only once the new query emits to them.
    async fn purge_latest(&self, name: &str) {
        if let Ok(latest) = self.js.get_stream(LATEST).await {
            let filter = format!("eddy.last.{}.>", token(name.as_bytes()));
            if let Err(e) = latest.purge().filter(filter).await {
                tracing::warn!("cluster: latest values of {name} not purged: {e}");
            }
        }
        self.announced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|t| t.split_once('.').is_none_or(|(q, _)| q != name));
        if let Ok(topics) = self.js.get_stream(format!("KV_{TOPICS}")).await {
            let filter = format!("$KV.{TOPICS}.{}.>", token(name.as_bytes()));
            if let Err(e) = topics.purge().filter(filter).await {
                tracing::warn!("cluster: named topics of {name} not purged: {e}");
            }
        }
    }

    /// Subscriber `subscriber` here wants `topic`. The first one makes this node take the topic
    /// from NATS: subscribe to `eddy.out.<topic>`, wait until every value emitted before is in
    /// `EDDY_LATEST` (owners write there at most `latest_interval` after the item), read the
    /// topic's latest values from it into the hub's snapshot store, with the items that came on
    /// `eddy.out` meanwhile after them (a key that came live keeps its live value), then feed
    /// the hub with what arrives. Returns once the hub has them, so that the subscriber's
    /// snapshot holds them. Topics open independently: while one is being read, another topic's
    /// subscribers (new or not) are not held up; a second subscriber of a topic being opened
    /// waits for that opening.
    pub async fn want(self: &Arc<Self>, subscriber: u64, topic: &str) -> Result<(), String> {
        let (ready, generation) = {
            let mut interest = self.interest.lock().await;
            match interest.get_mut(topic) {
                Some(Interest::Taken { subscribers, .. }) => {
                    subscribers.insert(subscriber);
                    return Ok(());
                }
                Some(Interest::Opening {
                    subscribers, ready, ..
                }) => {
                    subscribers.insert(subscriber);
                    let mut ready = ready.clone();
                    drop(interest);
                    return match ready.wait_for(Option::is_some).await {
                        Ok(outcome) => outcome.clone().unwrap_or(Ok(())),
                        Err(_) => Err(format!("cluster: taking {topic} from NATS stopped")),
                    };
                }
                None => {}
            }
            // A topic the hub would refuse (it answers why): not taken from NATS at all.
            if !self.hub.accepts(topic) {
                return Ok(());
            }
            let (tx, rx) = tokio::sync::watch::channel(None);
            let generation = self.openings.fetch_add(1, Ordering::Relaxed);
            interest.insert(
                topic.to_owned(),
                Interest::Opening {
                    subscribers: HashSet::from([subscriber]),
                    ready: rx,
                    generation,
                },
            );
            (tx, generation)
        };
        let opened = self.open(topic).await;
        let mut interest = self.interest.lock().await;
        let ours = matches!(
            interest.get(topic),
            Some(Interest::Opening { generation: g, .. }) if *g == generation
        );
        let outcome = match opened {
            // Everyone here left, or the query went, meanwhile: not taken after all.
            Ok(_) if !ours => Ok(()),
            Ok((items, seeded)) => {
                if let Some(Interest::Opening { subscribers, .. }) = interest.remove(topic) {
                    let task = tokio::spawn(receive(Arc::clone(self), items, seeded));
                    interest.insert(topic.to_owned(), Interest::Taken { subscribers, task });
                }
                Ok(())
            }
            Err(e) => {
                if ours {
                    interest.remove(topic);
                }
                Err(e)
            }
        };
        self.count_taken(&interest);
        drop(interest);
        let _ = ready.send(Some(outcome.clone()));
        outcome
    }

    /// Subscribes to `topic`'s items and seeds the hub with its latest values and what came
    /// meanwhile (see [`Cluster::want`]); returns the subscription and the values seeded.
    async fn open(
        &self,
        topic: &str,
    ) -> Result<(async_nats::Subscriber, HashMap<Key, Vec<u8>>), String> {
        let subject = topic_subject(topic);
        let mut items = self
            .client
            .subscribe(subject.clone())
            .await
            .map_err(|e| format!("cluster: cannot subscribe to {subject}: {e}"))?;
        // The server has the subscription before the stream is read: nothing falls in between.
        self.client
            .flush()
            .await
            .map_err(|e| format!("cluster: cannot subscribe to {subject}: {e}"))?;
        tokio::time::sleep(self.config.latest_interval + LATEST_SETTLE).await;
        let mut seeded = HashMap::new();
        match self.read_latest(topic).await {
            Ok(latest) => {
                self.latest_loaded
                    .fetch_add(latest.len() as u64, Ordering::Relaxed);
                // What came live meanwhile is as new as the stream's values or newer.
                let mut live = Vec::new();
                while let Some(Some(message)) = futures_util::FutureExt::now_or_never(items.next())
                {
                    live.extend(decode_items(&message));
                }
                let came: HashSet<&Key> = live.iter().map(|item| &item.key).collect();
                let latest: Vec<Emitted> = latest
                    .into_iter()
                    .filter(|value| !came.contains(&value.key))
                    .collect();
                seeded = latest
                    .iter()
                    .map(|value| (value.key.clone(), value.value.clone()))
                    .collect();
                self.hub.seed_latest(latest);
                if !live.is_empty() {
                    self.received_items
                        .fetch_add(live.len() as u64, Ordering::Relaxed);
                    self.hub.items(0, &mut live, None);
                }
            }
            Err(e) => tracing::warn!("cluster: no snapshot of {topic} from NATS: {e}"),
        }
        Ok((items, seeded))
    }

    /// Sets `topics_taken` from the topics taken now.
    fn count_taken(&self, interest: &HashMap<String, Interest>) {
        let taken = interest
            .values()
            .filter(|i| matches!(i, Interest::Taken { .. }))
            .count();
        self.topics_taken.store(taken as u64, Ordering::Relaxed);
    }

    /// Subscriber `subscriber` no longer wants `topic` (`None`: any topic, it left). A topic
    /// nobody here wants any more is no longer taken from NATS (one being opened is dropped
    /// when its opening ends).
    pub async fn unwant(&self, subscriber: u64, topic: Option<&str>) {
        let mut interest = self.interest.lock().await;
        interest.retain(|t, i| {
            if topic.is_none_or(|want| want == t) {
                i.subscribers().remove(&subscriber);
            }
            if i.subscribers().is_empty() {
                i.stop();
                return false;
            }
            true
        });
        self.count_taken(&interest);
    }

    /// Query `name` was removed here (its topics are closed): its topics are no longer taken
    /// from NATS, whoever subscribed to them.
    async fn forget_query(&self, name: &str) {
        let mut interest = self.interest.lock().await;
        interest.retain(|t, i| {
            if query_of(t) != name {
                return true;
            }
            i.stop();
            false
        });
        self.count_taken(&interest);
    }

    /// Makes the named topics of query `name` that `eddy_topics` holds known to the hub, once
    /// the query is deployed here: an entry that came before the query reached this node was
    /// not taken then ([`follow_topics`]).
    async fn declare_named(&self, name: &str) {
        let prefix = format!("$KV.{TOPICS}.{}.", token(name.as_bytes()));
        let filter = format!("{prefix}>");
        let within = 2 * CONSUMER_CREATE;
        let messages = match last_messages(self, &format!("KV_{TOPICS}"), &filter, within).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("cluster: cannot read the named topics of {name}: {e}");
                return;
            }
        };
        for (_, message) in messages {
            if kv_removed(&message) {
                continue;
            }
            if let Ok(topic) = std::str::from_utf8(&message.payload) {
                self.declare(Arc::from(topic));
            }
        }
    }

    /// Makes named topic `topic` known to the hub if its query is deployed here.
    fn declare(&self, topic: crate::Topic) {
        if self.hub.declare_topic(&topic) {
            let mut announced = self.announced.lock().unwrap_or_else(|e| e.into_inner());
            announced.insert(topic);
        }
    }

    /// `topic`'s latest item per key, as `EDDY_LATEST` keeps them: read with batched direct
    /// gets ([`last_messages`]), which any live server answers, so that a server that died
    /// does not leave a snapshot empty.
    async fn read_latest(&self, topic: &str) -> Result<Vec<Emitted>, String> {
        let filter = format!("{}.*", latest_topic(topic));
        let messages = last_messages(self, LATEST, &filter, LATEST_READ).await?;
        let topic: crate::Topic = Arc::from(topic);
        let mut out = Vec::with_capacity(messages.len());
        for (subject, message) in messages {
            match rmp_serde::from_slice::<StoredLatest>(&message.payload) {
                Ok(StoredLatest(key, value)) => out.push(Emitted {
                    topic: Arc::clone(&topic),
                    key: Key::from(key),
                    value: value.into_bytes(),
                }),
                Err(e) => tracing::warn!("cluster: undecodable latest value on {subject}: {e}"),
            }
        }
        Ok(out)
    }
}

/// Why a `state=keep` replace in a cluster changed nothing.
pub enum KeepRefused {
    /// The nodes where it cannot be prepared, and why (a `migrate` that throws for one of
    /// their keys, a node that does not answer).
    Nodes(Vec<(String, String)>),
    /// Every node prepared it but the catalog could not be written.
    Catalog(String),
}

/// A request to prepare a `state=keep` replace, from the node that took it to every other.
#[derive(Serialize, Deserialize)]
struct KeepRequest {
    name: String,
    script: String,
    /// Where the decision comes: `commit`, or anything else to give it up.
    decide: String,
}

/// A node's answer to a [`KeepRequest`].
#[derive(Serialize, Deserialize)]
struct KeepAnswer {
    #[serde(default)]
    migrated: usize,
    #[serde(default)]
    error: Option<String>,
    /// The node prepared it and waits for the decision (not one where the query is not
    /// deployed, which the catalog entry deploys): it answers a commit once it switched.
    #[serde(default)]
    waits: bool,
}

/// The subject where node `node` takes [`KeepRequest`]s.
fn keep_subject(node: &str) -> String {
    format!("eddy.keep.{}", token(node.as_bytes()))
}

impl Cluster {
    /// A replace of `def`'s query that keeps each key's state, on every live node or on none:
    /// this node and every other prepare it (their shards compile it and migrate their keys,
    /// then wait); only when all succeeded is it written to the catalog and committed
    /// everywhere, else every node gives it up and the answer names the nodes where it failed.
    /// Returns the keys migrated per node.
    pub async fn replace_keeping(
        &self,
        state: &Arc<State>,
        def: crate::QueryDef,
    ) -> Result<Vec<(String, usize)>, KeepRefused> {
        let me = self.config.node.clone();
        let name = def.name.clone();
        let script = def.script.clone();
        let here = super::admin::prepare_keeping(state, def)
            .await
            .map_err(|e| KeepRefused::Nodes(vec![(me.clone(), e)]))?;
        let Some(live) = keys(self, NODES).await else {
            return Err(KeepRefused::Nodes(vec![(
                me,
                "the live nodes could not be read from NATS".to_owned(),
            )]));
        };
        let decide = format!(
            "eddy.keep.decide.{}",
            token(
                format!(
                    "{}.{}",
                    self.incarnation,
                    self.next_message.fetch_add(1, Ordering::Relaxed)
                )
                .as_bytes()
            )
        );
        let request = serde_json::to_vec(&KeepRequest {
            name: name.clone(),
            script: script.clone(),
            decide: decide.clone(),
        })
        .expect("a keep request serializes");
        let asks = live.iter().filter(|n| **n != me).map(|node| {
            let request = Bytes::from(request.clone());
            async move {
                let asked = tokio::time::timeout(
                    KEEP_PREPARE,
                    self.client.request(keep_subject(node), request),
                )
                .await;
                let answer = match asked {
                    Ok(Ok(reply)) => serde_json::from_slice::<KeepAnswer>(&reply.payload)
                        .map_err(|e| format!("an answer that does not parse: {e}")),
                    Ok(Err(e)) => Err(format!("did not answer: {e}")),
                    Err(_) => Err(format!("did not answer within {KEEP_PREPARE:?}")),
                };
                let answer = match answer {
                    Ok(KeepAnswer { error: Some(e), .. }) => Err(e),
                    Ok(KeepAnswer {
                        migrated, waits, ..
                    }) => Ok((migrated, waits)),
                    Err(e) => Err(e),
                };
                (node.clone(), answer)
            }
        });
        let answers = futures_util::future::join_all(asks).await;
        let failed: Vec<(String, String)> = answers
            .iter()
            .filter_map(|(node, a)| a.as_ref().err().map(|e| (node.clone(), e.clone())))
            .collect();
        let give_up = async || {
            let _ = self.client.publish(decide.clone(), "abort".into()).await;
            let _ = self.client.flush().await;
        };
        if !failed.is_empty() {
            give_up().await;
            return Err(KeepRefused::Nodes(failed));
        }
        // The commit point: once in the catalog, a node that misses the decision replaces its
        // version from there, as alone.
        let written = tokio::time::timeout(KEEP_WRITE, self.remember_keeping(&name, &script))
            .await
            .unwrap_or_else(|_| Err(format!("the catalog was not written within {KEEP_WRITE:?}")));
        if let Err(e) = written {
            give_up().await;
            return Err(KeepRefused::Catalog(e));
        }
        // Committed: every node that prepared it switches and says so; the answer waits for
        // them (bounded), so that once it comes every node serves the new version.
        let waiting = answers
            .iter()
            .filter(|(_, a)| a.as_ref().is_ok_and(|(_, waits)| *waits))
            .count();
        let inbox = self.client.new_inbox();
        let switched = self.client.subscribe(inbox.clone()).await.ok();
        let _ = self
            .client
            .publish_with_reply(decide, inbox, "commit".into())
            .await;
        let _ = self.client.flush().await;
        let migrated_here = match here {
            super::admin::Keeping::Prepared(prepared) => prepared.commit(state),
            super::admin::Keeping::New(def) => {
                if let Err(e) = super::admin::deploy(state, def).await {
                    tracing::error!("cluster: {name} not deployed on this node: {e}");
                }
                0
            }
        };
        if let Some(switched) = switched {
            let heard = switched.take(waiting).count();
            if tokio::time::timeout(KEEP_PREPARE, heard).await.is_err() {
                tracing::warn!(
                    "cluster: {name} replaced, but not every node said it switched within \
                     {KEEP_PREPARE:?} (the catalog entry replaces it there)"
                );
            }
        }
        let mut out = vec![(me, migrated_here)];
        out.extend(
            answers
                .into_iter()
                .filter_map(|(n, a)| Some((n, a.ok()?.0))),
        );
        out.sort();
        Ok(out)
    }
}

/// Prepares the `state=keep` replaces other nodes ask this one for ([`Cluster::replace_keeping`]),
/// each on its own task.
async fn serve_keeps(state: Arc<State>, mut requests: async_nats::Subscriber) {
    while let Some(message) = requests.next().await {
        tokio::spawn(prepare_for(Arc::clone(&state), message));
    }
}

/// Prepares one replace another node asked for, answers, and commits it if the decision says so
/// within [`KEEP_DECIDE`] (else the shards go on with the old script).
async fn prepare_for(state: Arc<State>, message: async_nats::Message) {
    let Some(cluster) = state.cluster.clone() else {
        return;
    };
    let Some(reply) = message.reply.clone() else {
        return;
    };
    let answer = |migrated, error| {
        let answer = KeepAnswer {
            migrated,
            error,
            waits: false,
        };
        Bytes::from(serde_json::to_vec(&answer).unwrap_or_default())
    };
    let request = match serde_json::from_slice::<KeepRequest>(&message.payload) {
        Ok(r) => r,
        Err(e) => {
            let _ = cluster
                .client
                .publish(
                    reply,
                    answer(0, Some(format!("a request that does not parse: {e}"))),
                )
                .await;
            return;
        }
    };
    let limits = state.config.limits.clone();
    let def = match super::admin::compile(request.name.clone(), request.script, limits).await {
        Ok(def) => def,
        Err(e) => {
            let _ = cluster
                .client
                .publish(reply, answer(0, Some(e.to_string())))
                .await;
            return;
        }
    };
    // Listening for the decision before answering: it cannot come before.
    let decision = cluster.client.subscribe(request.decide).await;
    let prepared = match super::admin::prepare_keeping(&state, def).await {
        Ok(super::admin::Keeping::Prepared(prepared)) => prepared,
        // Not deployed here: the catalog entry deploys it.
        Ok(super::admin::Keeping::New(_)) => {
            let _ = cluster.client.publish(reply, answer(0, None)).await;
            return;
        }
        Err(e) => {
            let _ = cluster.client.publish(reply, answer(0, Some(e))).await;
            return;
        }
    };
    let mut decision = match decision {
        Ok(d) => d,
        Err(e) => {
            let error = format!("cannot hear the decision: {e}");
            let _ = cluster.client.publish(reply, answer(0, Some(error))).await;
            return;
        }
    };
    let waiting = KeepAnswer {
        migrated: prepared.migrated,
        error: None,
        waits: true,
    };
    let waiting = Bytes::from(serde_json::to_vec(&waiting).unwrap_or_default());
    let _ = cluster.client.publish(reply, waiting).await;
    let _ = cluster.client.flush().await;
    match tokio::time::timeout(KEEP_DECIDE, decision.next()).await {
        Ok(Some(d)) if &d.payload[..] == b"commit" => {
            let n = prepared.commit(&state);
            tracing::info!(
                "cluster: {} replaced as another node asked, {n} keys' state kept here",
                request.name
            );
            if let Some(switched) = d.reply {
                let _ = cluster.client.publish(switched, Bytes::new()).await;
                let _ = cluster.client.flush().await;
            }
        }
        Ok(_) => tracing::info!("cluster: {} not replaced: given up", request.name),
        Err(_) => tracing::warn!(
            "cluster: no decision on replacing {} within {KEEP_DECIDE:?}: given up here \
             (the catalog replaces it if it was decided)",
            request.name
        ),
    }
}

/// What a node puts in `eddy_nodes` with every heartbeat: `{"at":MS,"failed":{QUERY:WHY}}`.
#[derive(Serialize, Deserialize, Default)]
struct Heartbeat {
    at: i64,
    #[serde(default)]
    failed: BTreeMap<String, String>,
}

impl Cluster {
    /// This node's [`Heartbeat`].
    fn heartbeat(&self) -> Bytes {
        let beat = Heartbeat {
            at: crate::router::wall_ms(),
            failed: self.failures().clone(),
        };
        serde_json::to_vec(&beat).unwrap_or_default().into()
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.catalog_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Records how applying query `name`'s catalog entry here ended (`Err`: why it failed).
    fn applied(&self, name: &str, outcome: Result<(), String>) {
        let mut failures = self.failures();
        match outcome {
            Ok(()) => failures.remove(name),
            Err(e) => failures.insert(name.to_owned(), e),
        };
    }
}

/// A topic this node takes from NATS.
enum Interest {
    /// Being taken (see [`Cluster::want`]): the subscribers who asked meanwhile wait for
    /// `ready`, which says how the opening went.
    Opening {
        subscribers: HashSet<u64>,
        ready: tokio::sync::watch::Receiver<Option<Result<(), String>>>,
        /// Which opening: one that ends after its entry was dropped (and maybe made again)
        /// leaves the entry alone.
        generation: u64,
    },
    /// Taken: `task` takes the topic's items from NATS into the hub.
    Taken {
        subscribers: HashSet<u64>,
        task: tokio::task::JoinHandle<()>,
    },
}

impl Interest {
    fn subscribers(&mut self) -> &mut HashSet<u64> {
        match self {
            Interest::Opening { subscribers, .. } | Interest::Taken { subscribers, .. } => {
                subscribers
            }
        }
    }

    /// No longer taken (an opening in progress finds its entry gone and drops what it made).
    fn stop(&self) {
        if let Interest::Taken { task, .. } = self {
            task.abort();
        }
    }
}

/// Starts the node's cluster tasks: the output forwarder, the catalog watcher and the ownership
/// loop (the items receivers start with each topic's first subscriber: [`Cluster::want`]).
pub async fn start(state: &Arc<State>) -> Result<(), ClusterError> {
    let Some(cluster) = state.cluster.clone() else {
        return Ok(());
    };
    let partitions = cluster.config.partitions;
    {
        let cluster = Arc::clone(&cluster);
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("eddy-cluster-out".into())
            .spawn(move || forward(&cluster, &runtime, partitions))
            .expect("spawn the cluster forwarder");
    }
    publish_folder(state, &cluster).await;
    // The catalog's revision before the watch: what came before is history (see
    // [`follow_catalog`]).
    let history = match cluster.catalog.status().await {
        Ok(status) => status.info.state.last_sequence,
        Err(e) => return Err(js_err("read eddy_catalog")(Box::new(e))),
    };
    let watch = cluster
        .catalog
        .watch_with_history(">")
        .await
        .map_err(|e| js_err("watch eddy_catalog")(Box::new(e)))?;
    tokio::spawn(follow_catalog(Arc::clone(state), watch, history));
    let watch = cluster
        .topics
        .watch_with_history(">")
        .await
        .map_err(|e| js_err("watch eddy_topics")(Box::new(e)))?;
    tokio::spawn(follow_topics(Arc::clone(&cluster), watch));
    let subject = keep_subject(&cluster.config.node);
    let keeps = cluster
        .client
        .subscribe(subject)
        .await
        .map_err(|e| js_err("subscribe to eddy.keep")(Box::new(e)))?;
    tokio::spawn(serve_keeps(Arc::clone(state), keeps));
    tokio::spawn(checkpointer(Arc::clone(state), Arc::clone(&cluster)));
    tokio::spawn(renew(Arc::clone(&cluster)));
    tokio::spawn(broadcast_marks(Arc::clone(&cluster)));
    let task = tokio::spawn(ownership(Arc::clone(state), Arc::clone(&cluster)));
    *cluster.tasks.lock().await = Some(task);
    Ok(())
}

/// Leaves the cluster at shutdown: stops consuming, lets the shards and the forwarder finish,
/// checkpoints, then gives every lease up so that the other nodes take the partitions at once.
pub async fn leave(state: &State) {
    let Some(cluster) = &state.cluster else {
        return;
    };
    cluster.stopping.store(true, Ordering::Relaxed);
    if let Some(task) = cluster.tasks.lock().await.take() {
        task.abort();
        let _ = task.await;
    }
    // The consumers stop before their next message (they check under this lock).
    drop(cluster.order.lock().await);
    drain(state, cluster).await;
    // The next owners start from here and replay nothing.
    match checkpoint(state, cluster).await {
        Ok(n) => tracing::info!("cluster: {n} partitions checkpointed before leaving"),
        Err(e) => tracing::warn!("cluster: checkpoint before leaving failed: {e}"),
    }
    let held: Vec<(u32, u64)> = cluster
        .leases()
        .drain()
        .map(|(p, (revision, _))| (p, revision))
        .collect();
    for owned in &cluster.owned {
        owned.store(false, Ordering::Relaxed);
    }
    // Only the leases this node still holds (not one taken since it lapsed).
    for (p, revision) in held {
        let key = p.to_string();
        let deleted = cluster
            .owners
            .delete_expect_revision(&key, Some(revision))
            .await;
        if deleted.is_err() {
            // A renewal the renewer stopped waiting for may have moved the revision on.
            let _ = delete_own(cluster, &key).await;
        }
    }
    let _ = cluster.nodes.delete(&cluster.config.node).await;
    let _ = cluster.client.flush().await;
}

/// Waits until every event queued for the shards is handled and its items are on their way to
/// NATS.
async fn drain(state: &State, cluster: &Cluster) {
    let _ = state
        .pipeline
        .ask_all(|done| ShardMsg::Flush { done })
        .await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    if cluster
        .out
        .send(Forwarded::Mark {
            shard: usize::MAX,
            reply: tx,
        })
        .is_ok()
    {
        let _ = rx.await;
    }
    let _ = cluster.client.flush().await;
}

// ---------------------------------------------------------------------------------------------
// Ingest: publish before the ack.

/// JetStream's acks of one input's messages: resolves to the events whose message was not
/// acknowledged (their index in the input, and why).
pub type Acks = std::pin::Pin<Box<dyn std::future::Future<Output = Published> + Send>>;

/// What JetStream said of an input's messages.
#[derive(Default)]
pub struct Published {
    /// The events whose messages were not stored, with why, by index.
    pub failed: Vec<(u32, String)>,
    /// Events whose messages an earlier send of the same idempotent producer's frame had
    /// stored (see [`super::producer`]): not added again.
    pub duplicates: u64,
}

/// Collects, per partition, the NDJSON of the accepted events whose keys fall in it, and the
/// producer's mark with each of them for the queries on event time ([`EventTimeQueries`]).
struct PartitionSink<'a> {
    messages: BTreeMap<usize, (Vec<u8>, Vec<u32>)>,
    /// Per partition: (line of its message, query's index in `timed`, the producer's mark).
    marks: BTreeMap<usize, Vec<(usize, usize, i64)>>,
    timed: &'a [QueryId],
    rejections: &'a mut Vec<Rejection>,
}

impl RouteSink for PartitionSink<'_> {
    fn deliver(&mut self, partition: usize, position: Position, delivery: Delivery) {
        let (ndjson, indexes) = self.messages.entry(partition).or_default();
        if indexes.last() != Some(&position.index) {
            delivery.event.write_json(ndjson);
            ndjson.push(b'\n');
            indexes.push(position.index);
        }
        if let Some(t) = self.timed.iter().position(|id| *id == delivery.query) {
            let line = indexes.len() - 1;
            self.marks
                .entry(partition)
                .or_default()
                .push((line, t, delivery.source_mark));
        }
    }
    fn advanced(&mut self, _: QueryId, _: i64) {}
    fn reject(&mut self, rejection: Rejection) {
        self.rejections.push(rejection);
    }
}

/// Where an input came from: its source, and its idempotent producer's frame id if it has one.
pub struct Origin<'a> {
    pub source: SourceId,
    pub id: Option<&'a FrameId>,
}

/// Routes a parsed input (rejecting what a node alone would reject) and publishes its accepted
/// events to their partitions. Returns what was routed and the acks to wait for.
pub async fn publish(
    state: &State,
    cluster: &Arc<Cluster>,
    Origin { source, id }: Origin<'_>,
    frame: &Arc<Frame>,
    stream: Option<&str>,
    now: i64,
    rejections: &mut Vec<Rejection>,
) -> (Routed, Acks) {
    let router = state.router.load_full();
    let timed = EventTimeQueries::of(&router);
    let mut sink = PartitionSink {
        messages: BTreeMap::new(),
        marks: BTreeMap::new(),
        timed: &timed.ids,
        rejections,
    };
    let routed = router.route(
        frame,
        source,
        stream,
        Unnamed::Reject,
        Clock::At(now),
        cluster.config.partitions as usize,
        &mut sink,
    );
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Eddy-Now", now.to_string().as_str());
    if let Some(stream) = stream {
        headers.insert("Eddy-Stream", stream);
    }
    let published = Instant::now();
    let mut sends = Vec::new();
    let mut marks = std::mem::take(&mut sink.marks);
    for (partition, (ndjson, indexes)) in std::mem::take(&mut sink.messages) {
        let mut headers = headers.clone();
        if let Some(marks) = marks.remove(&partition) {
            headers.insert(
                MARKS_HEADER,
                timed.encode_lines(indexes.len(), &marks).as_str(),
            );
        }
        // JetStream stores a message once per id within its duplicate window: a retry of a
        // message whose first ack was lost (a leader that died after storing it) is not stored
        // twice, and neither is an idempotent producer's frame sent again, to any node (its
        // messages' ids are the same wherever it is published; node ids have no `/`).
        let message_id = match id {
            Some(id) => format!("{}/{}/{partition}", id.producer, id.frame),
            None => {
                let n = cluster.next_message.fetch_add(1, Ordering::Relaxed);
                format!("{}.{n}", cluster.incarnation)
            }
        };
        headers.insert(async_nats::header::NATS_MESSAGE_ID, message_id.as_str());
        let message = Outgoing {
            subject: event_subject(partition as u32),
            headers,
            payload: Bytes::from(ndjson),
        };
        let first = cluster.send(&message).await;
        sends.push((message, first, indexes));
    }
    cluster
        .published_messages
        .fetch_add(sends.len() as u64, Ordering::Relaxed);
    // The producer's own marks go on from here with its next input (as alone: its events are
    // late against its own mark, and it holds this node's watermark back while connected).
    router.settle_at(source, &routed, now);
    // The marks this input took its timer queries to, for the partitions it sent nothing to
    // (published with the next tick of [`broadcast_marks`], after these messages).
    if timed.timers.iter().any(|t| *t) {
        let mut due = cluster.marks_due.lock().unwrap_or_else(|e| e.into_inner());
        for &(qi, own) in &routed.marks {
            let q = &router.queries()[qi];
            if let Some(t) = timed.ids.iter().position(|id| *id == q.id) {
                if timed.timers[t] {
                    let mark = due.entry(timed.names[t].clone()).or_insert(own);
                    *mark = (*mark).max(own);
                }
            }
        }
    }
    let counted = Arc::clone(cluster);
    let acks: Acks = Box::pin(async move {
        // All of the input's messages at once: one that waits for its ack (or for a new stream
        // leader) delays the others by nothing, and the deadline runs from the publish, so that
        // an input's answer never waits on an earlier input's.
        let deadline = published + PUBLISH_RETRY;
        let cluster = &counted;
        let results = futures_util::future::join_all(sends.into_iter().map(
            |(message, first, indexes)| async move {
                (
                    indexes,
                    cluster.acknowledged(message, first, deadline).await,
                )
            },
        ))
        .await;
        let mut failed = Vec::new();
        let mut stored_before: Vec<u32> = Vec::new();
        let mut added: HashSet<u32> = HashSet::new();
        for (indexes, result) in results {
            match result {
                Ok(Stored::New) => added.extend(indexes),
                Ok(Stored::Before) => stored_before.extend(indexes),
                Err(e) => {
                    let reason = format!("JetStream did not acknowledge the event: {e}");
                    failed.extend(indexes.into_iter().map(|i| (i, reason.clone())));
                }
            }
        }
        failed.sort_unstable();
        failed.dedup_by_key(|(i, _)| *i);
        if !failed.is_empty() {
            counted.publish_failures.fetch_add(1, Ordering::Relaxed);
        }
        // An event with keys in several partitions is in several messages: it was added by
        // this send if any of them was.
        stored_before.sort_unstable();
        stored_before.dedup();
        let duplicates = stored_before
            .iter()
            .filter(|i| !added.contains(i) && failed.binary_search_by_key(*i, |(f, _)| *f).is_err())
            .count() as u64;
        if duplicates > 0 {
            counted.duplicate_frames.fetch_add(1, Ordering::Relaxed);
        }
        Published { failed, duplicates }
    });
    (routed, acks)
}

/// The header of an event message that carries, per query on event time, the producer's mark
/// with each of its events: `NAME=M0,M1,…;NAME2=…` (one entry per line of the message, empty
/// where the query has no key of the line in the partition).
const MARKS_HEADER: &str = "Eddy-Marks";
/// The header of a marks message ([`broadcast_marks`]): `NAME=M;NAME2=M`.
const MARK_HEADER: &str = "Eddy-Mark";
/// How often a node sends the marks its producers reached to every partition.
const MARKS_EVERY: Duration = Duration::from_millis(100);

/// The deployed queries on event time (a `time_field`), whose marks travel with the events.
struct EventTimeQueries {
    ids: Vec<QueryId>,
    names: Vec<String>,
    /// Whether each has `on_timer` (its marks also go to partitions without its events).
    timers: Vec<bool>,
}

impl EventTimeQueries {
    fn of(router: &crate::router::Router) -> Self {
        let mut out = EventTimeQueries {
            ids: Vec::new(),
            names: Vec::new(),
            timers: Vec::new(),
        };
        for q in router.queries() {
            if q.def.config.time_field.is_some() {
                out.ids.push(q.id);
                out.names.push(q.def.name.clone());
                out.timers.push(q.def.functions.on_timer);
            }
        }
        out
    }

    /// The [`MARKS_HEADER`] of a message of `lines` lines with these marks.
    fn encode_lines(&self, lines: usize, marks: &[(usize, usize, i64)]) -> String {
        let mut per: BTreeMap<usize, Vec<Option<i64>>> = BTreeMap::new();
        for &(line, t, mark) in marks {
            per.entry(t).or_insert_with(|| vec![None; lines])[line] = Some(mark);
        }
        let mut out = String::new();
        for (t, marks) in per {
            if !out.is_empty() {
                out.push(';');
            }
            out.push_str(&self.names[t]);
            out.push('=');
            for (i, m) in marks.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                if let Some(m) = m {
                    out.push_str(&m.to_string());
                }
            }
        }
        out
    }
}

/// `NAME=M0,M1,…;…` ([`MARKS_HEADER`], [`MARK_HEADER`]) as query name → marks (`None` where
/// empty); parts that do not parse are left out.
fn decode_marks(header: &str) -> Vec<(&str, Vec<Option<i64>>)> {
    header
        .split(';')
        .filter_map(|part| {
            let (name, marks) = part.split_once('=')?;
            let marks = marks
                .split(',')
                .map(|m| m.parse().ok())
                .collect::<Vec<Option<i64>>>();
            Some((name, marks))
        })
        .collect()
}

/// Every [`MARKS_EVERY`], the marks this node's producers took queries with timers to, sent to
/// every partition: a partition none of whose keys a producer's recent events had still learns
/// how far event time went, so its keys' timers fire as `eddy run`'s do. Sent after the events
/// that reached them (on the same connection), so that none of those becomes late.
async fn broadcast_marks(cluster: Arc<Cluster>) {
    let mut tick = tokio::time::interval(MARKS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let due = std::mem::take(&mut *cluster.marks_due.lock().unwrap_or_else(|e| e.into_inner()));
        if due.is_empty() {
            continue;
        }
        let mark = due
            .iter()
            .map(|(name, m)| format!("{name}={m}"))
            .collect::<Vec<_>>()
            .join(";");
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(MARK_HEADER, mark.as_str());
        headers.insert("Eddy-Now", crate::router::wall_ms().to_string().as_str());
        let mut acks = Vec::new();
        for p in 0..cluster.config.partitions {
            let message = Outgoing {
                subject: event_subject(p),
                headers: headers.clone(),
                payload: Bytes::new(),
            };
            if let Ok(ack) = cluster.send(&message).await {
                acks.push(std::future::IntoFuture::into_future(ack));
            }
        }
        cluster
            .mark_messages
            .fetch_add(acks.len() as u64, Ordering::Relaxed);
        let acked = tokio::time::timeout(ACK_WAIT, futures_util::future::join_all(acks)).await;
        let lost = acked.map_or(cluster.config.partitions as usize, |a| {
            a.iter().filter(|r| r.is_err()).count()
        });
        if lost > 0 {
            // The next input's marks go out at the next tick; until then those partitions'
            // timers wait.
            tracing::warn!("cluster: marks not stored for {lost} partitions");
            let mut again = cluster.marks_due.lock().unwrap_or_else(|e| e.into_inner());
            for (name, m) in due {
                let mark = again.entry(name).or_insert(m);
                *mark = (*mark).max(m);
            }
        }
    }
}

/// One message of an input for the event stream, kept until JetStream acknowledges it.
struct Outgoing {
    subject: String,
    headers: async_nats::HeaderMap,
    payload: Bytes,
}

type SendResult = Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError>;

impl Cluster {
    /// Hands `message` to the NATS client; the future resolves with JetStream's ack.
    async fn send(&self, message: &Outgoing) -> SendResult {
        self.js
            .send_publish(
                message.subject.clone(),
                jetstream::message::PublishMessage::build()
                    .payload(message.payload.clone())
                    .headers(message.headers.clone()),
            )
            .await
    }

    /// Waits for JetStream's ack of `message`, sent once already (`sent`), and sends it again
    /// (with the same id) after a failure: no responders while a new stream leader is elected,
    /// an ack lost with the leader that died, no ack within [`ACK_WAIT`]. Retries back off from
    /// 50 ms to 1 s, until the message is acknowledged or `deadline` passes.
    async fn acknowledged(
        &self,
        message: Outgoing,
        mut sent: SendResult,
        deadline: Instant,
    ) -> Result<Stored, String> {
        let mut backoff = Duration::from_millis(50);
        let mut first = true;
        loop {
            let failure = match sent {
                Ok(ack) => {
                    let wait = (Instant::now() + ACK_WAIT).min(deadline);
                    match tokio::time::timeout_at(
                        wait.into(),
                        std::future::IntoFuture::into_future(ack),
                    )
                    .await
                    {
                        // Only the first answer tells: a retry's "duplicate" may be this node's
                        // own first send, stored with its ack lost.
                        Ok(Ok(ack)) if ack.duplicate && first => return Ok(Stored::Before),
                        Ok(Ok(_)) => return Ok(Stored::New),
                        Ok(Err(e)) => e,
                        Err(_) => jetstream::context::PublishError::new(
                            jetstream::context::PublishErrorKind::TimedOut,
                        ),
                    }
                }
                Err(e) => e,
            };
            let retry = failure.kind() != jetstream::context::PublishErrorKind::MaxPayloadExceeded;
            if !retry || Instant::now() + backoff >= deadline {
                return Err(failure.to_string());
            }
            first = false;
            self.publish_retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
            sent = self.send(&message).await;
        }
    }
}

/// Whether JetStream stored a message now, or already had it (its id was stored before).
enum Stored {
    New,
    Before,
}

/// Applies what JetStream said to an outcome: events it did not store were not accepted, and
/// events an earlier send of the frame had stored were not added by this one.
pub fn acknowledged(outcome: &mut super::ingest::Outcome, published: Published) {
    let Published { failed, duplicates } = published;
    if duplicates > 0 {
        outcome.duplicate = true;
        outcome.accepted = outcome.accepted.saturating_sub(duplicates);
    }
    if failed.is_empty() {
        return;
    }
    let n = failed.len() as u64;
    outcome.accepted = outcome.accepted.saturating_sub(n);
    outcome.rejected += n;
    outcome.errors.extend(failed);
    outcome.errors.sort_by_key(|(i, _)| *i);
    outcome.errors.truncate(super::ingest::MAX_LISTED_ERRORS);
}

// ---------------------------------------------------------------------------------------------
// Ownership.

/// Drops the state of partition `p` (of `n`) from every shard: its keys of every query.
async fn drop_partition(state: &State, n: u32, p: u32) {
    let _ = state
        .pipeline
        .ask_all(|done| ShardMsg::DropPartition {
            partitions: n as usize,
            partition: p as usize,
            done,
        })
        .await;
}

/// The ownership loop: heartbeat, renew, hand over, take.
async fn ownership(state: Arc<State>, cluster: Arc<Cluster>) {
    let me = cluster.config.node.clone();
    let n = cluster.config.partitions;
    let started = Instant::now();
    // Per partition this node owns: its consumer task (the leases are in `cluster.leases`).
    let mut mine: HashMap<u32, tokio::task::JoinHandle<()>> = HashMap::new();
    // When each partition was last seen owned, and by whom it was last seen owned at all.
    let mut free_since: HashMap<u32, Instant> = HashMap::new();
    let mut held_by_other: HashSet<u32> = HashSet::new();
    let mut first_seen: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if cluster.stopping.load(Ordering::Relaxed) {
            return;
        }
        // Partitions given up (their leases lost or not renewed): their consumers stop and
        // their state leaves the shards, before anything here may take them again. Needs no
        // NATS: done while it is away too.
        let lost: Vec<u32> = std::mem::take(&mut *cluster.lost());
        if !lost.is_empty() {
            {
                let _order = cluster.order.lock().await;
                for p in &lost {
                    if let Some(task) = mine.remove(p) {
                        task.abort();
                    }
                }
            }
            for p in lost {
                cluster.pending[p as usize].store(0, Ordering::Relaxed);
                drop_partition(&state, n, p).await;
            }
        }
        let now = Instant::now();
        if let Err(e) = cluster.nodes.put(&me, cluster.heartbeat()).await {
            tracing::warn!("cluster heartbeat failed: {e}");
            continue;
        }
        let Some(live) = keys(&cluster, NODES).await else {
            continue;
        };
        for node in &live {
            first_seen.entry(node.clone()).or_insert(now);
        }
        first_seen.retain(|n, _| live.contains(n));
        // Nodes this node has seen for a while: the ones partitions are handed to.
        let settled: Vec<String> = live
            .iter()
            .filter(|n| *n == &me || now.duration_since(first_seen[*n]) >= SETTLE)
            .cloned()
            .collect();
        let Some(taken) = entries(&cluster, OWNERS).await else {
            continue;
        };
        if now.duration_since(started) < SETTLE {
            continue;
        }
        // Leases in this node's name that it does not hold: given up (a renewal NATS took only
        // after this node stopped waiting for it, when NATS answered again), or left by an
        // earlier run of this node. Nothing runs them: deleted (at the revision read, so never
        // a lease taken since), they are free at once rather than after a lease's life.
        // All at once and bounded: while NATS has no leader for the bucket each would wait
        // for its request's timeout, one after the other.
        let stale = taken.iter().filter(|(key, owner)| {
            owner[..] == *me.as_bytes()
                && key
                    .parse::<u32>()
                    .is_ok_and(|p| !cluster.leases().contains_key(&p))
        });
        let deletes =
            futures_util::future::join_all(stale.map(|(key, _)| delete_own(&cluster, key)));
        let _ = tokio::time::timeout(CONSUMER_CREATE, deletes).await;
        let taken: HashSet<String> = taken.into_iter().map(|(key, _)| key).collect();
        // Hand over what a settled peer is preferred for, a few partitions a tick, so that the
        // cluster moves gradually: stop their consumers, let the shards and the forwarder
        // finish what they had of them, close the fence, give the leases up.
        // (Not those given up meanwhile: the loop clears them next tick.)
        let mut over: Vec<u32> = mine
            .keys()
            .copied()
            .filter(|p| preferred(&settled, *p).is_some_and(|w| w != me))
            .filter(|p| cluster.owned[*p as usize].load(Ordering::Relaxed))
            .collect();
        over.sort_unstable();
        over.truncate(HAND_OVER_PER_TICK);
        if !over.is_empty() {
            let _moves = cluster.moves.lock().await;
            // Their consumers stop before their next message (they check under this lock).
            {
                let _order = cluster.order.lock().await;
                for p in &over {
                    if let Some(task) = mine.remove(p) {
                        task.abort();
                    }
                }
            }
            // Their checkpoints first, while the fence is open and the leases held: the next
            // owner replays only what comes after (see `checkpoint_locked`).
            drain(&state, &cluster).await;
            match checkpoint_locked(&state, &cluster, Some(&over)).await {
                Ok(k) => tracing::debug!("{k} partitions checkpointed before their hand-over"),
                Err(e) => tracing::warn!("checkpoint before a hand-over failed: {e}"),
            }
            let revisions: HashMap<u32, u64> = {
                let mut leases = cluster.leases();
                over.iter()
                    .filter_map(|p| Some((*p, leases.remove(p)?.0)))
                    .collect()
            };
            for p in over {
                cluster.owned[p as usize].store(false, Ordering::Relaxed);
                cluster.pending[p as usize].store(0, Ordering::Relaxed);
                // Its state goes: a later owner replays it, and this node may own it again.
                drop_partition(&state, n, p).await;
                // Only the lease this node holds (not one taken since it lapsed).
                if let Some(revision) = revisions.get(&p) {
                    let key = p.to_string();
                    let deleted = cluster
                        .owners
                        .delete_expect_revision(&key, Some(*revision))
                        .await;
                    if deleted.is_err() {
                        // A renewal the renewer stopped waiting for may have moved it on.
                        delete_own(&cluster, &key).await;
                    }
                }
                cluster.released.fetch_add(1, Ordering::Relaxed);
                tracing::info!("partition {p} handed over");
            }
        }
        for p in 0..n {
            let key = p.to_string();
            if taken.contains(&key) {
                free_since.remove(&p);
                if !mine.contains_key(&p) {
                    held_by_other.insert(p);
                }
                continue;
            }
            if mine.contains_key(&p) || cluster.lost().contains(&p) {
                continue;
            }
            let since = *free_since.entry(p).or_insert(now);
            let ours = preferred(&settled, p) == Some(me.as_str());
            if !ours && now.duration_since(since) < ORPHAN_GRACE {
                continue;
            }
            // Given up by its owner (a hand-over, a shutdown) or expired (its owner died)?
            // Each request bounded, and none more this tick once one is not answered: while
            // NATS elects a leader for the bucket, 64 requests waiting out their timeouts one
            // after the other would hold the loop (and the given-up partitions) for minutes.
            let Ok(entry) =
                tokio::time::timeout(CONSUMER_CREATE, cluster.owners.entry(key.clone())).await
            else {
                break;
            };
            let released = matches!(
                entry,
                Ok(Some(kv::Entry {
                    operation: kv::Operation::Delete | kv::Operation::Purge,
                    ..
                }))
            );
            let sent = Instant::now();
            let created = tokio::time::timeout(
                CONSUMER_CREATE,
                cluster.owners.create(&key, Bytes::from(me.clone())),
            )
            .await;
            let revision = match created {
                Ok(Ok(revision)) => revision,
                // Taken meanwhile by another node.
                Ok(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                // Not answered (in time): maybe made all the same, a lease in this node's name
                // that it does not run, deleted next tick (above).
                Ok(Err(_)) | Err(_) => break,
            };
            free_since.remove(&p);
            let source = state.next_source.fetch_add(1, Ordering::Relaxed);
            // The lease first: the forwarder stamps the partition's values with its revision.
            cluster.leases().insert(p, (revision, sent));
            cluster.owned[p as usize].store(true, Ordering::Relaxed);
            let task = tokio::spawn(consume(Arc::clone(&state), Arc::clone(&cluster), p, source));
            mine.insert(p, task);
            cluster.acquired.fetch_add(1, Ordering::Relaxed);
            if held_by_other.remove(&p) && !released {
                cluster.failovers.fetch_add(1, Ordering::Relaxed);
                tracing::info!("partition {p} taken over");
            }
        }
    }
}

/// Deletes the lease `key` of `eddy_owners` if it is in this node's name, at the revision read
/// (never a lease another node took since). Only for a lease this node does not run.
async fn delete_own(cluster: &Cluster, key: &str) {
    let me = cluster.config.node.as_bytes();
    if let Ok(Some(entry)) = cluster.owners.entry(key).await {
        if entry.operation == kv::Operation::Put && entry.value[..] == *me {
            let _ = cluster
                .owners
                .delete_expect_revision(key, Some(entry.revision))
                .await;
        }
    }
}

/// How one lease's renewal ended.
enum Renewed {
    /// Renewed: the new revision.
    Yes(u64),
    /// Someone else holds it now (or it expired and was written since).
    Lost(String),
    /// NATS did not answer (in time): again next round, until the lease is no longer certain.
    Failed(String),
}

/// Renews this node's leases [`RENEWALS_PER_LEASE`] times per lease life, all at once, on its
/// own task: nothing else the node does (a hand-over waiting for busy shards, a checkpoint) may
/// delay it. Every [`TICK`], whatever NATS does, it gives up each lease that is no longer
/// certain ([`Cluster::lease_certain`]): not renewed for its life less [`Cluster::lease_margin`]
/// since the request that last renewed it was sent. NATS stored that renewal after it was
/// sent, so the lease expires there, and another node may take the partition, only after this
/// node closed the partition's output fence.
async fn renew(cluster: Arc<Cluster>) {
    let me = Bytes::from(cluster.config.node.clone());
    let every = cluster.config.lease / RENEWALS_PER_LEASE;
    let mut tick = tokio::time::interval(TICK.min(every));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    type Round = Vec<(u32, u64, Instant, Renewed)>;
    let mut round: Option<tokio::task::JoinHandle<Round>> = None;
    let mut next_round = Instant::now();
    loop {
        tick.tick().await;
        if cluster.stopping.load(Ordering::Relaxed) {
            return;
        }
        if round.as_ref().is_some_and(|r| r.is_finished()) {
            let results = round.take().expect("a round").await.unwrap_or_default();
            // Leaving: the leases are being given up.
            if cluster.stopping.load(Ordering::Relaxed) {
                return;
            }
            for (p, held, sent, result) in results {
                // Only for the lease renewed (not one given up, or taken again, since).
                let current = cluster.leases().get(&p).map(|(r, _)| *r) == Some(held);
                if !current {
                    continue;
                }
                match result {
                    Renewed::Yes(revision) => {
                        cluster.leases().insert(p, (revision, sent));
                    }
                    Renewed::Lost(e) => {
                        if cluster.give_up(p) {
                            tracing::warn!("partition {p} given up: its lease was lost: {e}");
                        }
                    }
                    Renewed::Failed(e) => {
                        tracing::warn!("partition {p}: lease not renewed this time: {e}")
                    }
                }
            }
        }
        let uncertain: Vec<u32> = {
            let leases = cluster.leases();
            leases.keys().copied().collect()
        };
        let given: Vec<u32> = uncertain
            .into_iter()
            .filter(|p| !cluster.lease_certain(*p) && cluster.give_up(*p))
            .collect();
        if !given.is_empty() {
            let lease = cluster.config.lease;
            let margin = cluster.lease_margin();
            tracing::warn!(
                "partitions {given:?} given up: their leases were not renewed for {:?}",
                lease - margin
            );
        }
        let now = Instant::now();
        if round.is_none() && now >= next_round {
            next_round = now + every;
            let held: Vec<(u32, u64)> = cluster
                .leases()
                .iter()
                .map(|(p, (revision, _))| (*p, *revision))
                .collect();
            let cluster = Arc::clone(&cluster);
            let me = me.clone();
            round = Some(tokio::spawn(async move {
                let sent = Instant::now();
                let updates = held.iter().map(|(p, revision)| {
                    let update = cluster.owners.update(p.to_string(), me.clone(), *revision);
                    async move {
                        match tokio::time::timeout(2 * every, update).await {
                            Ok(Ok(revision)) => Renewed::Yes(revision),
                            Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                                Renewed::Lost(e.to_string())
                            }
                            Ok(Err(e)) => Renewed::Failed(e.to_string()),
                            Err(_) => Renewed::Failed(format!("no answer within {:?}", 2 * every)),
                        }
                    }
                });
                let results = futures_util::future::join_all(updates).await;
                held.into_iter()
                    .zip(results)
                    .map(|((p, revision), r)| (p, revision, sent, r))
                    .collect()
            }));
        }
    }
}

/// The keys of bucket `bucket` (deleted or expired ones left out), `None` when NATS did not
/// answer in time.
async fn keys(cluster: &Cluster, bucket: &str) -> Option<Vec<String>> {
    let entries = entries(cluster, bucket).await?;
    Some(entries.into_iter().map(|(key, _)| key).collect())
}

/// The keys of bucket `bucket` with their values (deleted or expired ones left out), `None`
/// when NATS did not answer in time: read with [`last_messages`], not with `kv::Store::keys`,
/// which makes a consumer (see there).
async fn entries(cluster: &Cluster, bucket: &str) -> Option<Vec<(String, Bytes)>> {
    let prefix = format!("$KV.{bucket}.");
    let within = 2 * CONSUMER_CREATE;
    match last_messages(
        cluster,
        &format!("KV_{bucket}"),
        &format!("{prefix}>"),
        within,
    )
    .await
    {
        Ok(messages) => Some(
            messages
                .into_iter()
                .filter(|(_, m)| !kv_removed(m))
                .filter_map(|(subject, m)| {
                    Some((subject.strip_prefix(&prefix)?.to_owned(), m.payload))
                })
                .collect(),
        ),
        Err(e) => {
            tracing::warn!("cluster: cannot list the keys of {bucket}: {e}");
            None
        }
    }
}

/// A bucket's message that marks its key deleted or purged.
fn kv_removed(message: &async_nats::Message) -> bool {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get("KV-Operation"))
        .is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE")
}

/// Messages one batched direct get asks for: more come in further requests.
const DIRECT_PAGE: usize = 1_000;
/// The most bytes one page of direct gets brings (a checkpoint's chunks are 128 KiB each).
const DIRECT_PAGE_BYTES: usize = 8 << 20;
/// How long a node waits for the next answer of a direct get before it asks again (a server
/// that died while answering).
const DIRECT_WAIT: Duration = Duration::from_secs(1);

/// The newest message of each subject matching `filter` in stream `stream` (which keeps one
/// message per subject: `EDDY_LATEST`, and the buckets, whose history is 1), with its subject,
/// within `within`.
///
/// Read with batched direct gets (`$JS.API.DIRECT.GET`, NATS 2.11 and later), which any live
/// server of the stream's group answers, rather than with a consumer: NATS places a consumer on
/// a random server of the group, and for a minute or more after a server is SIGKILLed that may
/// be the dead one (NATS does not count it offline yet), so one read in three would wait for
/// nothing. Not with `multi_last` either: it answers `413 Too Many Results` when more than 1,024
/// subjects match (nats-server 2.14). Each request asks for the next [`DIRECT_PAGE`] messages
/// matching `filter` from a sequence on: with one message kept per subject, those are the
/// subjects' newest, and a subject written again while the pages are read comes again later
/// with its newer message, which wins.
async fn last_messages(
    cluster: &Cluster,
    stream: &str,
    filter: &str,
    within: Duration,
) -> Result<Vec<(String, async_nats::Message)>, String> {
    let mut newest: HashMap<String, (u64, async_nats::Message)> = HashMap::new();
    direct_pages(
        cluster,
        stream,
        filter,
        within,
        |subject, seq, message| match newest.get(&subject) {
            Some((had, _)) if *had > seq => {}
            _ => {
                newest.insert(subject, (seq, message));
            }
        },
    )
    .await?;
    let mut out: Vec<(u64, String, async_nats::Message)> = newest
        .into_iter()
        .map(|(subject, (seq, message))| (seq, subject, message))
        .collect();
    out.sort_unstable_by_key(|(seq, _, _)| *seq);
    Ok(out.into_iter().map(|(_, s, m)| (s, m)).collect())
}

/// Every message matching `filter` in stream `stream`, in sequence order, given to `each` with
/// its subject and sequence, within `within`: batched direct gets of [`DIRECT_PAGE`] messages
/// from a sequence on, which any live server of the stream's group answers (see
/// [`last_messages`]). A page not answered (the server asked died) is asked for again from
/// where it stopped.
async fn direct_pages(
    cluster: &Cluster,
    stream: &str,
    filter: &str,
    within: Duration,
    mut each: impl FnMut(String, u64, async_nats::Message),
) -> Result<(), String> {
    let read = async {
        let mut from = 1u64;
        'pages: loop {
            let inbox = cluster.client.new_inbox();
            let mut replies = cluster
                .client
                .subscribe(inbox.clone())
                .await
                .map_err(|e| e.to_string())?;
            let request = format!(
                r#"{{"next_by_subj":{},"seq":{from},"batch":{DIRECT_PAGE},"max_bytes":{DIRECT_PAGE_BYTES}}}"#,
                serde_json::Value::from(filter)
            );
            cluster
                .client
                .publish_with_reply(
                    format!("$JS.API.DIRECT.GET.{stream}"),
                    inbox,
                    request.into(),
                )
                .await
                .map_err(|e| e.to_string())?;
            let mut last = None;
            loop {
                let Ok(message) = tokio::time::timeout(DIRECT_WAIT, replies.next()).await else {
                    // No answer (the server asked died): ask again from where this page is.
                    if let Some(seq) = last {
                        from = seq + 1;
                    }
                    continue 'pages;
                };
                let Some(message) = message else {
                    return Err("the reply subscription ended".to_owned());
                };
                let header = |name: &str| header_of(&message, name);
                match message.status {
                    None => {}
                    // Nothing (more) matches.
                    Some(async_nats::StatusCode::NOT_FOUND) => break 'pages,
                    // The end of this page (204): more to come unless nothing is pending.
                    Some(code) if code.as_u16() == 204 => {
                        let pending: u64 = header("Nats-Num-Pending")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        match last {
                            Some(seq) if pending > 0 => {
                                from = seq + 1;
                                continue 'pages;
                            }
                            _ => break 'pages,
                        }
                    }
                    Some(code) => return Err(format!("status {code}: {:?}", message.description)),
                }
                let (Some(subject), Some(seq)) = (
                    header("Nats-Subject"),
                    header("Nats-Sequence").and_then(|v| v.parse::<u64>().ok()),
                ) else {
                    return Err("a direct get answer without its subject or sequence".to_owned());
                };
                last = Some(seq);
                each(subject, seq, message);
            }
        }
        Ok(())
    };
    tokio::time::timeout(within, read)
        .await
        .map_err(|_| format!("no answer within {within:?}"))?
}

/// The bytes of object `name` in the checkpoint store, or `None` if it has none: its info
/// and then its chunks read with direct gets ([`direct_pages`]), not through the object
/// store's reader, whose ordered consumer NATS may place on a server that died (then the read
/// waits for nothing, and the partition's restore with it).
async fn read_checkpoint_object(
    cluster: &Cluster,
    name: &str,
    within: Duration,
) -> Result<Option<Vec<u8>>, String> {
    use jetstream::object_store::InfoErrorKind;
    let info = match tokio::time::timeout(within, cluster.checkpoints.info(name)).await {
        Err(_) => return Err(format!("no answer within {within:?}")),
        Ok(Err(e)) if e.kind() == InfoErrorKind::NotFound => return Ok(None),
        Ok(Err(e)) => return Err(e.to_string()),
        Ok(Ok(info)) if info.deleted => return Ok(None),
        Ok(Ok(info)) => info,
    };
    let mut bytes = Vec::with_capacity(info.size);
    let mut chunks = 0;
    let filter = format!("$O.{CHECKPOINTS}.C.{}", info.nuid);
    direct_pages(
        cluster,
        &format!("OBJ_{CHECKPOINTS}"),
        &filter,
        within,
        |_, _, m| {
            chunks += 1;
            bytes.extend_from_slice(&m.payload);
        },
    )
    .await?;
    if chunks != info.chunks || bytes.len() != info.size {
        return Err(format!(
            "object {name}: {chunks} chunks and {} bytes read, {} and {} stored",
            bytes.len(),
            info.chunks,
            info.size
        ));
    }
    Ok(Some(bytes))
}

/// Collects one partition's deliveries for the local shards, dropping those of keys in other
/// partitions (an event published for another query's key).
struct OwnedSink<'a> {
    partition: usize,
    partitions: usize,
    /// Per query on event time: the producer's mark with each line ([`MARKS_HEADER`]).
    carried: &'a [(QueryId, usize, Vec<Option<i64>>)],
    deliveries: Vec<Vec<Delivery>>,
    watermarks: Vec<(QueryId, i64)>,
    rejected: &'a mut u64,
}

impl RouteSink for OwnedSink<'_> {
    fn deliver(&mut self, shard: usize, position: Position, mut delivery: Delivery) {
        if delivery.key.shard(self.partitions) == self.partition {
            // Late, and the key's own timers, as against the producer's mark with the event
            // (as alone), not only this partition's.
            let carried = self
                .carried
                .iter()
                .find(|(id, _, _)| *id == delivery.query)
                .and_then(|(_, _, marks)| marks.get(position.index as usize).copied().flatten());
            if let Some(mark) = carried {
                delivery.source_mark = delivery.source_mark.max(mark);
            }
            self.deliveries[shard].push(delivery);
        }
    }
    fn advanced(&mut self, query: QueryId, watermark: i64) {
        self.watermarks.push((query, watermark));
    }
    fn reject(&mut self, _: Rejection) {
        *self.rejected += 1;
    }
}

/// Runs partition `p` on this node: puts back its latest checkpoint, then reads the stream from
/// the sequence after it and feeds the local shards, as source `source`, whose mark goes as far
/// as the producers' marks its messages carry ([`MARKS_HEADER`], [`MARK_HEADER`]): events are
/// late, and timers fire, as they do in `eddy run` for a single producer.
async fn consume(state: Arc<State>, cluster: Arc<Cluster>, p: u32, source: SourceId) {
    let mut parser = Parser::default();
    let partitions = cluster.config.partitions as usize;
    // NATS may be briefly away (a leader election): try for as long as a lease lives, and at
    // least as long as a publish is retried.
    let mut loaded = load_checkpoint(&cluster, p).await;
    let trying = Instant::now();
    while loaded.is_err()
        && trying.elapsed() < cluster.config.lease.max(PUBLISH_RETRY)
        && cluster.owned[p as usize].load(Ordering::Relaxed)
    {
        tokio::time::sleep(TICK).await;
        loaded = load_checkpoint(&cluster, p).await;
    }
    let mut next = match loaded {
        Ok(Some(checkpoint)) => {
            let seq = checkpoint.seq;
            let keys = restore(&state, partitions, checkpoint).await;
            cluster
                .restored_keys
                .fetch_add(keys as u64, Ordering::Relaxed);
            tracing::info!("partition {p}: {keys} keys from its checkpoint at sequence {seq}");
            seq + 1
        }
        Ok(None) => 1,
        Err(e) => {
            // Without its checkpoint the partition cannot be rebuilt (what it covered may be
            // purged): this node gives it up rather than run it wrong (its lease lapses, and
            // the partition is taken again, here or elsewhere, once NATS answers).
            if cluster.give_up(p) {
                tracing::warn!("partition {p} given up: its checkpoint cannot be read: {e}");
            }
            return;
        }
    };
    cluster.fed[p as usize].store(next - 1, Ordering::Relaxed);
    // Messages that were in the stream when the first consumer started (what the checkpoint
    // did not cover): their events count as replayed.
    let mut backlog: Option<u64> = None;
    loop {
        // A consumer of our own (not the client's ordered consumer, whose recreation backs off
        // to 10 s between attempts): NATS places an R1 consumer on a random server of the
        // stream's group, which for a minute or more after a server is SIGKILLed may be the dead
        // one (NATS does not count it offline yet), and its creation then times out. So each
        // attempt is short and the next one follows a tick later.
        let messages = tokio::time::timeout(CONSUMER_CREATE, async {
            let stream = cluster.js.get_stream(EVENTS).await.ok()?;
            let consumer = stream
                .create_consumer(consumer::pull::Config {
                    filter_subject: event_subject(p),
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: next,
                    },
                    ack_policy: consumer::AckPolicy::None,
                    memory_storage: true,
                    num_replicas: 1,
                    inactive_threshold: Duration::from_secs(30),
                    ..Default::default()
                })
                .await
                .ok()?;
            let waiting = consumer.cached_info().num_pending;
            let messages = consumer
                .stream()
                .heartbeat(CONSUMER_HEARTBEAT)
                .expires(CONSUMER_HEARTBEAT * 10)
                .messages()
                .await
                .ok()?;
            Some((messages, waiting))
        })
        .await
        .ok()
        .flatten();
        let Some((mut messages, waiting)) = messages else {
            tokio::time::sleep(TICK).await;
            continue;
        };
        backlog.get_or_insert(waiting);
        // The consumer's own numbering has no gap unless a delivery was lost: then it is made
        // again from the sequence after the last one fed.
        let mut delivered = 0;
        while let Some(message) = messages.next().await {
            let Ok(message) = message else { break };
            let Ok(info) = message.info() else { break };
            if info.consumer_sequence != delivered + 1 {
                break;
            }
            delivered = info.consumer_sequence;
            let seq = info.stream_sequence;
            cluster.pending[p as usize].store(info.pending, Ordering::Relaxed);
            if seq < next {
                continue;
            }
            let header = |name: &str| header_of(&message, name);
            let now: i64 = header("Eddy-Now")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(crate::router::wall_ms);
            let stream = header("Eddy-Stream");
            let line_marks = header(MARKS_HEADER);
            let end_marks = header(MARK_HEADER);
            let parsed = parser.parse(message.payload.to_vec());
            let left = backlog.get_or_insert(0);
            if *left > 0 {
                *left -= 1;
                cluster
                    .replayed_events
                    .fetch_add(parsed.frame.len() as u64, Ordering::Relaxed);
            }
            let _order = cluster.order.lock().await;
            // Handed over or leaving: stop between messages, never within one.
            if !cluster.owned[p as usize].load(Ordering::Relaxed)
                || cluster.stopping.load(Ordering::Relaxed)
            {
                return;
            }
            let router = state.router.load_full();
            let shards = state.pipeline.shards();
            let deployed = |name: &str| {
                router
                    .queries()
                    .iter()
                    .enumerate()
                    .find(|(_, q)| q.def.name == name)
                    .map(|(qi, q)| (q.id, qi))
            };
            let carried: Vec<(QueryId, usize, Vec<Option<i64>>)> = line_marks
                .as_deref()
                .map(decode_marks)
                .unwrap_or_default()
                .into_iter()
                .chain(end_marks.as_deref().map(decode_marks).unwrap_or_default())
                .filter_map(|(name, marks)| deployed(name).map(|(id, qi)| (id, qi, marks)))
                .collect();
            let mut rejected = 0;
            let mut sink = OwnedSink {
                partition: p as usize,
                partitions,
                carried: &carried,
                deliveries: (0..shards).map(|_| Vec::new()).collect(),
                watermarks: Vec::new(),
                rejected: &mut rejected,
            };
            let routed = router.route(
                &parsed.frame,
                source,
                stream.as_deref(),
                Unnamed::Reject,
                Clock::At(now),
                shards,
                &mut sink,
            );
            let OwnedSink {
                deliveries,
                watermarks,
                ..
            } = sink;
            let timed: Vec<(QueryId, i64)> = watermarks
                .into_iter()
                .filter(|(id, _)| router.has_timers(*id))
                .collect();
            for (shard, deliveries) in deliveries.into_iter().enumerate() {
                if deliveries.is_empty() && timed.is_empty() {
                    continue;
                }
                let msg = ShardMsg::Batch {
                    deliveries,
                    watermarks: timed.clone(),
                    now,
                    received: Instant::now(),
                };
                if state.pipeline.send(shard, msg).await.is_err() {
                    return;
                }
            }
            // The partition's mark goes as far as the producers' marks it carried: event time
            // moves on here as it did at the producers' nodes, and the timers it reaches fire.
            let mut routed = routed;
            for (_, qi, marks) in &carried {
                if let Some(end) = marks.iter().flatten().max() {
                    match routed.marks.iter_mut().find(|(q, _)| q == qi) {
                        Some((_, own)) => *own = (*own).max(*end),
                        None => routed.marks.push((*qi, *end)),
                    }
                }
            }
            let rose: Vec<(QueryId, i64)> = router
                .settle_rising(source, &routed, now)
                .into_iter()
                .filter(|(id, _)| router.has_timers(*id))
                .collect();
            if !rose.is_empty() {
                for shard in 0..shards {
                    let msg = ShardMsg::Batch {
                        deliveries: Vec::new(),
                        watermarks: rose.clone(),
                        now,
                        received: Instant::now(),
                    };
                    if state.pipeline.send(shard, msg).await.is_err() {
                        return;
                    }
                }
            }
            cluster.fed[p as usize].store(seq, Ordering::Relaxed);
            next = seq + 1;
            if rejected > 0 {
                tracing::debug!("partition {p}: {rejected} events no longer routable");
            }
        }
        tokio::time::sleep(TICK).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Checkpoints per partition.

/// What a partition's checkpoint holds: the state of its keys, query by query, as the events up
/// to stream sequence `seq` left it.
#[derive(Debug, Default, Serialize, Deserialize)]
struct PartitionCheckpoint {
    format: u32,
    seq: u64,
    queries: Vec<PartitionQuery>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PartitionQuery {
    name: String,
    /// Restored only into the same script ([`crate::durable::script_hash`]).
    script_hash: u64,
    state: ShardQueryCheckpoint,
}

const PARTITION_CHECKPOINT_FORMAT: u32 = 1;

/// The latest checkpoint of partition `p`, if it has one.
async fn load_checkpoint(cluster: &Cluster, p: u32) -> Result<Option<PartitionCheckpoint>, String> {
    // Without a consumer (see `read_checkpoint_object`); a short wait, then the caller tries
    // again (NATS may be electing a leader for the store's stream).
    let Some(bytes) =
        read_checkpoint_object(cluster, &format!("p{p}"), 2 * CONSUMER_CREATE).await?
    else {
        return Ok(None);
    };
    let checkpoint: PartitionCheckpoint =
        rmp_serde::from_slice(&bytes).map_err(|e| e.to_string())?;
    if checkpoint.format != PARTITION_CHECKPOINT_FORMAT {
        return Err(format!("unknown checkpoint format {}", checkpoint.format));
    }
    Ok(Some(checkpoint))
}

/// Queues a checkpoint's keys for the local shards that own them, into the deployed queries of
/// the same name and script. Returns the keys restored.
async fn restore(state: &State, partitions: usize, checkpoint: PartitionCheckpoint) -> usize {
    let _ = partitions;
    let router = state.router.load_full();
    let shards = state.pipeline.shards();
    let mut restored = 0;
    for q in checkpoint.queries {
        let Some(deployed) = router
            .queries()
            .iter()
            .find(|d| d.def.name == q.name && script_hash(&d.def.script) == q.script_hash)
        else {
            tracing::warn!(
                "checkpoint: query {} is not deployed with the same script; its state is not \
                 restored",
                q.name
            );
            continue;
        };
        let mut per: Vec<ShardQueryCheckpoint> = (0..shards)
            .map(|_| ShardQueryCheckpoint {
                watermark: q.state.watermark,
                keys: Vec::new(),
                deferred: Vec::new(),
            })
            .collect();
        for k in q.state.keys {
            let shard = Key::from(k.key.clone()).shard(shards);
            per[shard].keys.push(k);
        }
        for (t, k) in q.state.deferred {
            let shard = Key::from(k.clone()).shard(shards);
            per[shard].deferred.push((t, k));
        }
        for (shard, data) in per.into_iter().enumerate() {
            restored += data.keys.len();
            let _ = state
                .pipeline
                .send(
                    shard,
                    ShardMsg::Restore {
                        id: deployed.id,
                        data,
                    },
                )
                .await;
        }
    }
    restored
}

/// The copy of query `id` in partition `p`'s checkpoint, if `p` is being checkpointed.
fn partition_query(
    per: &mut BTreeMap<usize, BTreeMap<QueryId, ShardQueryCheckpoint>>,
    p: usize,
    id: QueryId,
    watermark: i64,
) -> Option<&mut ShardQueryCheckpoint> {
    let e = per
        .get_mut(&p)?
        .entry(id)
        .or_insert_with(|| ShardQueryCheckpoint {
            watermark,
            keys: Vec::new(),
            deferred: Vec::new(),
        });
    e.watermark = e.watermark.max(watermark);
    Some(e)
}

/// Checkpoints this node's partitions every `checkpoint_interval`.
async fn checkpointer(state: Arc<State>, cluster: Arc<Cluster>) {
    let mut every = tokio::time::interval(state.config.checkpoint_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        if cluster.stopping.load(Ordering::Relaxed) {
            return;
        }
        if let Err(e) = checkpoint(&state, &cluster).await {
            tracing::warn!("cluster checkpoint failed: {e}");
        }
    }
}

/// Copies the state of every owned partition's keys, writes one checkpoint per partition, then
/// purges from the stream what each checkpoint covers (the equivalent of acknowledging those
/// messages: a later owner replays only what came after). Returns the partitions written.
async fn checkpoint(state: &State, cluster: &Cluster) -> Result<usize, String> {
    let _moves = cluster.moves.lock().await;
    checkpoint_locked(state, cluster, None).await
}

/// [`checkpoint`] of the owned partitions among `only` (all with `None`), by a caller that holds
/// `cluster.moves` (a hand-over checkpoints the partitions it hands over, so that their next
/// owner replays little). A partition is written only while this node's lease of it is certain
/// ([`Cluster::lease_certain`]).
async fn checkpoint_locked(
    state: &State,
    cluster: &Cluster,
    only: Option<&[u32]>,
) -> Result<usize, String> {
    let partitions = cluster.config.partitions as usize;
    let router = state.router.load_full();
    let queries: HashMap<QueryId, (String, u64)> = router
        .queries()
        .iter()
        .map(|q| (q.id, (q.def.name.clone(), script_hash(&q.def.script))))
        .collect();
    let ids: Vec<QueryId> = queries.keys().copied().collect();
    drop(router);
    let (covered, replies) = {
        let _order = cluster.order.lock().await;
        let covered: BTreeMap<usize, u64> = (0..partitions)
            .filter(|&p| cluster.owned[p].load(Ordering::Relaxed))
            .filter(|&p| only.is_none_or(|o| o.contains(&(p as u32))))
            .map(|p| (p, cluster.fed[p].load(Ordering::Relaxed)))
            .filter(|(_, seq)| *seq > 0)
            .collect();
        if covered.is_empty() {
            return Ok(0);
        }
        let mut replies = Vec::new();
        for shard in 0..state.pipeline.shards() {
            let (done, reply) = tokio::sync::oneshot::channel();
            let (hub_mark, stored) = tokio::sync::oneshot::channel();
            let msg = ShardMsg::Checkpoint {
                ids: ids.clone(),
                done,
                hub_mark,
            };
            state
                .pipeline
                .send(shard, msg)
                .await
                .map_err(|_| format!("shard {shard} is not running"))?;
            replies.push((reply, stored));
        }
        (covered, replies)
    };
    // Per partition, per query: the keys of that partition.
    let mut per: BTreeMap<usize, BTreeMap<QueryId, ShardQueryCheckpoint>> =
        covered.keys().map(|&p| (p, BTreeMap::new())).collect();
    let mut marks = Vec::with_capacity(replies.len());
    for (reply, stored) in replies {
        marks.push(stored);
        let (exports, _) = reply.await.map_err(|_| "a shard stopped".to_owned())?;
        for (id, data) in exports {
            let watermark = data.watermark;
            for k in data.keys {
                let p = Key::from(k.key.clone()).shard(partitions);
                if let Some(e) = partition_query(&mut per, p, id, watermark) {
                    e.keys.push(k);
                }
            }
            for (t, k) in data.deferred {
                let p = Key::from(k.clone()).shard(partitions);
                if let Some(e) = partition_query(&mut per, p, id, watermark) {
                    e.deferred.push((t, k));
                }
            }
        }
    }
    // Every value emitted before the copy is in `EDDY_LATEST` first: the next owner does not
    // emit again what this checkpoint covers (see the module's notes).
    for stored in marks {
        match tokio::time::timeout(ACK_WAIT * 3, stored).await {
            Ok(Ok(_)) => {}
            _ => {
                return Err("latest values not yet stored in EDDY_LATEST; again next time".into());
            }
        }
    }
    let stream = cluster
        .js
        .get_stream(EVENTS)
        .await
        .map_err(|e| e.to_string())?;
    let mut written = 0;
    let mut bytes_total = 0;
    for (p, states) in per {
        if !cluster.owned[p].load(Ordering::Relaxed) || !cluster.lease_certain(p as u32) {
            continue;
        }
        let seq = covered[&p];
        let checkpoint = PartitionCheckpoint {
            format: PARTITION_CHECKPOINT_FORMAT,
            seq,
            queries: states
                .into_iter()
                .filter_map(|(id, state)| {
                    let (name, script_hash) = queries.get(&id)?.clone();
                    Some(PartitionQuery {
                        name,
                        script_hash,
                        state,
                    })
                })
                .collect(),
        };
        let name = format!("p{p}");
        // Never over a newer checkpoint (one a later owner wrote while this node was paused and
        // lost its lease): what that one covers may already be purged.
        if let Ok(info) = cluster.checkpoints.info(&name).await {
            let newer = info
                .metadata
                .get("seq")
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|theirs| theirs > seq);
            if newer {
                continue;
            }
        }
        let bytes = rmp_serde::to_vec(&checkpoint).map_err(|e| e.to_string())?;
        bytes_total += bytes.len();
        let meta = jetstream::object_store::ObjectMetadata {
            name,
            metadata: HashMap::from([("seq".to_owned(), seq.to_string())]),
            ..Default::default()
        };
        cluster
            .checkpoints
            .put(meta, &mut bytes.as_slice())
            .await
            .map_err(|e| format!("partition {p}: {e}"))?;
        // The write may have waited for NATS (a connection being made again) past the lease's
        // certainty: then a new owner may have loaded the checkpoint before this one and not
        // yet read what this one covers, so nothing is purged. A purge sent while the lease is
        // certain is safe: a new owner takes the partition only after the lease expired, by
        // when this checkpoint, written before, is the one it loads.
        if !cluster.lease_certain(p as u32) {
            continue;
        }
        stream
            .purge()
            .filter(event_subject(p as u32))
            .sequence(seq + 1)
            .await
            .map_err(|e| format!("partition {p}: purge: {e}"))?;
        written += 1;
    }
    cluster
        .checkpoints_written
        .fetch_add(written as u64, Ordering::Relaxed);
    cluster
        .last_checkpoint_bytes
        .store(bytes_total as u64, Ordering::Relaxed);
    Ok(written)
}

// ---------------------------------------------------------------------------------------------
// Results: shards → NATS → every node's hub.

/// The forwarder thread: takes the shards' output, drops items of partitions this node does not
/// own (the fence), and publishes the rest per topic on `eddy.out.<topic>` at once. Each key's
/// newest value is also kept, and the values that changed go to their subjects of
/// `EDDY_LATEST` at most every `latest_interval` (and before a mark is answered: a partition
/// handed over leaves its newest values behind), each acknowledged by JetStream or kept for the
/// next write while its partition is owned. Marks are answered once everything before them is
/// handed to the NATS client and every value is acknowledged in `EDDY_LATEST`; else they are
/// dropped, and the checkpoint that sent them is not written.
fn forward(cluster: &Cluster, runtime: &tokio::runtime::Handle, partitions: u32) {
    let partitions = partitions as usize;
    let every = cluster.config.latest_interval;
    // Keys whose newest value is not in EDDY_LATEST yet, with their partition's lease revision
    // when it came; and the sequence of each key's value there, as far as this node knows.
    let mut changed: HashMap<(crate::Topic, Key), Stamped> = HashMap::new();
    let mut known = Known::default();
    let mut next_write = Instant::now();
    // Per topic, the items this node has sent on `eddy.out` so far (see [`ITEMS_FROM`]).
    let mut sent: HashMap<crate::Topic, u64> = HashMap::new();
    let mut tails = Tails::default();
    loop {
        let deadline = [(!changed.is_empty()).then_some(next_write), tails.due()]
            .into_iter()
            .flatten()
            .min();
        let first = match deadline {
            None => match cluster.out_rx.recv() {
                Ok(msg) => Some(msg),
                Err(_) => return,
            },
            Some(at) => match cluster.out_rx.recv_deadline(at) {
                Ok(msg) => Some(msg),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            },
        };
        let mut batch: Vec<Forwarded> = first.into_iter().collect();
        batch.extend(cluster.out_rx.try_iter());
        let mut topics: BTreeMap<crate::Topic, Vec<(Key, Stamped)>> = BTreeMap::new();
        let mut marks = Vec::new();
        let leases = cluster.leases();
        for msg in batch {
            match msg {
                Forwarded::Items { items, .. } => {
                    for item in items {
                        let p = item.key.shard(partitions);
                        if !cluster.owned[p].load(Ordering::Relaxed) {
                            continue;
                        }
                        let Some(&(lease, _)) = leases.get(&(p as u32)) else {
                            continue;
                        };
                        let value = String::from_utf8(item.value).unwrap_or_default();
                        topics
                            .entry(item.topic)
                            .or_default()
                            .push((item.key, Stamped { value, lease }));
                    }
                }
                Forwarded::Mark { reply, .. } => marks.push(reply),
            }
        }
        drop(leases);
        runtime.block_on(async {
            announce(cluster, topics.keys()).await;
            for (topic, items) in topics {
                let stored: Vec<(StoredKey, &String)> = items
                    .iter()
                    .map(|(key, stamped)| (StoredKey::from(key), &stamped.value))
                    .collect();
                // Counted whether or not the publish goes through: a receiver sees the gap.
                let before = sent.entry(Arc::clone(&topic)).or_default();
                let count = *before;
                *before += stored.len() as u64;
                tails.sent(&topic);
                if let Ok(payload) = rmp_serde::to_vec(&stored) {
                    publish_items(cluster, &topic, count, payload).await;
                }
                for (key, value) in items {
                    changed.insert((Arc::clone(&topic), key), value);
                }
            }
            if !changed.is_empty() && (!marks.is_empty() || Instant::now() >= next_write) {
                write_latest(cluster, &mut changed, &mut known, partitions).await;
                next_write = Instant::now() + every;
            }
            for topic in tails.quiet() {
                let count = sent.get(&topic).copied().unwrap_or(0);
                publish_items(cluster, &topic, count, NO_ITEMS.to_vec()).await;
            }
        });
        if changed.is_empty() {
            for reply in marks {
                let _ = reply.send(Vec::new());
            }
        }
    }
}

/// An `eddy.out` payload of no items (an empty MessagePack array): a [`Tails`] message.
const NO_ITEMS: &[u8] = &[0x90];

/// Publishes the items in `payload` on `topic`'s subject, after the `count` this node sent on it
/// before (see [`ITEMS_FROM`]).
async fn publish_items(cluster: &Cluster, topic: &crate::Topic, count: u64, payload: Vec<u8>) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(ITEMS_FROM, cluster.incarnation.as_str());
    headers.insert(ITEMS_BEFORE, count.to_string().as_str());
    if let Err(e) = cluster
        .client
        .publish_with_headers(topic_subject(topic), headers, payload.into())
        .await
    {
        tracing::warn!("cluster: items of {topic} not published: {e}");
    }
}

/// The topics this node sent items on lately. A receiver learns it lost items from the count in
/// the next message ([`Received`]); when the lost ones were a topic's last (NATS failing as they
/// went out), no next message would come. So while a topic is quiet, every [`TAIL_EVERY`] for
/// [`TAIL_FOR`] after its last items, the node sends a message of no items with its count.
#[derive(Default)]
struct Tails {
    /// When each topic's last items went out.
    last: HashMap<crate::Topic, Instant>,
    /// When the quiet ones are told next.
    next: Option<Instant>,
}

impl Tails {
    fn sent(&mut self, topic: &crate::Topic) {
        let now = Instant::now();
        match self.last.get_mut(topic) {
            Some(at) => *at = now,
            None => {
                self.last.insert(Arc::clone(topic), now);
            }
        }
        self.next.get_or_insert(now + TAIL_EVERY);
    }

    /// When the forwarder should wake to tell the quiet topics, if any may be.
    fn due(&self) -> Option<Instant> {
        self.next
    }

    /// The topics to tell now (quiet for [`TAIL_EVERY`]); none before [`Tails::due`].
    fn quiet(&mut self) -> Vec<crate::Topic> {
        let now = Instant::now();
        if self.next.is_none_or(|next| now < next) {
            return Vec::new();
        }
        self.last.retain(|_, at| now.duration_since(*at) < TAIL_FOR);
        self.next = (!self.last.is_empty()).then_some(now + TAIL_EVERY);
        self.last
            .iter()
            .filter(|(_, at)| now.duration_since(**at) >= TAIL_EVERY)
            .map(|(t, _)| Arc::clone(t))
            .collect()
    }
}

/// Puts the named topics among `topics` that this node has not seen in `eddy_topics` yet (once
/// per topic: a lookup per topic of a batch, not per item), each acknowledged by JetStream
/// before the topic counts as put (else it is put again with the next batch).
async fn announce<'a>(cluster: &Cluster, topics: impl Iterator<Item = &'a crate::Topic>) {
    let new: Vec<(&crate::Topic, String)> = {
        let announced = cluster.announced.lock().unwrap_or_else(|e| e.into_inner());
        topics
            .filter(|t| !announced.contains(*t))
            .filter_map(|t| named_topic_key(t).map(|key| (t, key)))
            .collect()
    };
    for (topic, key) in new {
        let put = tokio::time::timeout(
            ACK_WAIT,
            cluster
                .topics
                .put(key, Bytes::copy_from_slice(topic.as_bytes())),
        )
        .await;
        match put {
            Ok(Ok(_)) => {
                let mut announced = cluster.announced.lock().unwrap_or_else(|e| e.into_inner());
                announced.insert(Arc::clone(topic));
            }
            Ok(Err(e)) => tracing::warn!("cluster: topic {topic} not put in eddy_topics: {e}"),
            Err(_) => tracing::warn!("cluster: topic {topic} not put in eddy_topics in time"),
        }
    }
}

/// Makes every named topic of `eddy_topics` known to this node's hub (those put before the node
/// started too): listed and subscribable before any of its items arrives here. Only while its
/// query is deployed here: an entry that arrives after its query was removed (an owner's last
/// items were on their way) would otherwise bring the topic back, and one that arrives before
/// the query reached this node is read again once it has ([`Cluster::declare_named`]).
async fn follow_topics(cluster: Arc<Cluster>, mut watch: kv::Watch) {
    while let Some(entry) = watch.next().await {
        let Ok(entry) = entry else { continue };
        if entry.operation != kv::Operation::Put {
            continue;
        }
        let Ok(name) = std::str::from_utf8(&entry.value) else {
            continue;
        };
        cluster.declare(Arc::from(name));
    }
}

/// The query a topic belongs to: the part before the first dot.
fn query_of(topic: &str) -> &str {
    topic.split_once('.').map_or(topic, |(q, _)| q)
}

/// A key's newest value for `EDDY_LATEST`, with the revision of its partition's lease on this
/// node when the value came: the value's rank against other writers' (see [`write_latest`]).
struct Stamped {
    value: String,
    lease: u64,
}

/// What `EDDY_LATEST` keeps on a key's subject: the key and its newest value, as every eddy
/// version wrote and reads them (a node not yet upgraded reads them too); the lease revision
/// they were written under goes in the header [`LEASE_HEADER`].
#[derive(Deserialize)]
struct StoredLatest(StoredKey, String);

/// The header of an `EDDY_LATEST` message with the lease revision its value was written under
/// (none, read as 0, in what an older eddy wrote).
const LEASE_HEADER: &str = "Eddy-Lease";

fn latest_payload(key: &Key, stamped: &Stamped) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    rmp_serde::to_vec(&(StoredKey::from(key), &stamped.value))
}

/// Writes `changed` keys' newest values to their subjects of `EDDY_LATEST`, all at once; those
/// JetStream did not acknowledge within [`ACK_WAIT`] stay in `changed` (unless a newer value
/// came meanwhile) for the next write. Values of partitions this node no longer owns are
/// dropped unwritten: no checkpoint covers their events (it waits for them), so the next owner
/// emits them again.
///
/// Each write is conditional (`Nats-Expected-Last-Subject-Sequence`, with the subject's
/// sequence as this node last saw it in `known`, 0 for none) and carries its value's lease
/// revision ([`LEASE_HEADER`]): a write that was handed to the NATS client before the fence
/// closed, and goes out late (a connection re-established after a newer owner wrote), is
/// refused by JetStream rather than stepping the key back. A write
/// refused so reads what the subject holds (from the stream's leader): a value written under a
/// newer lease of the partition (a newer owner's) wins and this one is dropped; else (this
/// node's own older write, stored after its ack was given up, or an older owner's) this one is
/// written again at the sequence read, at once.
async fn write_latest(
    cluster: &Cluster,
    changed: &mut HashMap<(crate::Topic, Key), Stamped>,
    known: &mut Known,
    partitions: usize,
) {
    changed.retain(|(_, key), _| cluster.owned[key.shard(partitions)].load(Ordering::Relaxed));
    let mut round: Vec<((crate::Topic, Key), Stamped)> = changed.drain().collect();
    let (mut written, mut failed) = (0, 0);
    for attempt in 0..2 {
        let mut sent = Vec::with_capacity(round.len());
        for (at, stamped) in round.drain(..) {
            let Ok(payload) = latest_payload(&at.1, &stamped) else {
                continue;
            };
            let mut headers = async_nats::HeaderMap::new();
            let expected = known.get(&at);
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                expected.to_string().as_str(),
            );
            headers.insert(LEASE_HEADER, stamped.lease.to_string().as_str());
            let subject = latest_subject(&at.0, &at.1);
            let ack = cluster
                .js
                .publish_with_headers(subject, headers, payload.into())
                .await;
            sent.push((at, stamped, ack));
        }
        let waits = sent.into_iter().map(|(at, stamped, ack)| async move {
            let outcome = match ack {
                Ok(ack) => {
                    match tokio::time::timeout(ACK_WAIT, std::future::IntoFuture::into_future(ack))
                        .await
                    {
                        Ok(Ok(ack)) => Written::Stored(ack.sequence),
                        Ok(Err(e))
                            if e.kind()
                                == jetstream::context::PublishErrorKind::WrongLastSequence =>
                        {
                            Written::Refused
                        }
                        _ => Written::Failed,
                    }
                }
                // Larger than NATS takes: never stored, so not tried again (a checkpoint waits
                // for the values before it, and would wait for ever).
                Err(e) if e.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded => {
                    tracing::warn!(
                        "cluster: the latest value of key {} on {} is larger than NATS takes \
                         (max_payload): not stored in EDDY_LATEST",
                        at.1,
                        at.0
                    );
                    Written::Dropped
                }
                Err(_) => Written::Failed,
            };
            (at, stamped, outcome)
        });
        let mut refused = Vec::new();
        for (at, stamped, outcome) in futures_util::future::join_all(waits).await {
            match outcome {
                Written::Stored(seq) => {
                    written += 1;
                    known.set(&at, seq);
                }
                Written::Refused if attempt == 0 => refused.push((at, stamped)),
                Written::Refused | Written::Failed => {
                    failed += 1;
                    changed.entry(at).or_insert(stamped);
                }
                Written::Dropped => {}
            }
        }
        if refused.is_empty() {
            break;
        }
        let stream = cluster.js.get_stream_no_info(LATEST).await.ok();
        let stream = stream.as_ref();
        let reads = refused.into_iter().map(|(at, stamped)| async move {
            let subject = latest_subject(&at.0, &at.1);
            let read = match stream {
                Some(stream) => {
                    tokio::time::timeout(ACK_WAIT, stream.get_last_raw_message_by_subject(&subject))
                        .await
                        .ok()
                }
                None => None,
            };
            let holds = match read {
                Some(Ok(message)) => Some(Some((
                    message.sequence,
                    message
                        .headers
                        .get(LEASE_HEADER)
                        .and_then(|v| v.as_str().parse::<u64>().ok())
                        .unwrap_or(0),
                ))),
                // Purged since this node's last write.
                Some(Err(e))
                    if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
                {
                    Some(None)
                }
                _ => None,
            };
            (at, stamped, holds)
        });
        for (at, stamped, holds) in futures_util::future::join_all(reads).await {
            match holds {
                Some(Some((_, lease))) if lease > stamped.lease => {
                    cluster.latest_superseded.fetch_add(1, Ordering::Relaxed);
                    known.set(&at, 0);
                }
                Some(Some((seq, _))) => {
                    known.set(&at, seq);
                    round.push((at, stamped));
                }
                Some(None) => {
                    known.set(&at, 0);
                    round.push((at, stamped));
                }
                // Not read: refused again next time, and read then.
                None => {
                    failed += 1;
                    changed.entry(at).or_insert(stamped);
                }
            }
        }
        if round.is_empty() {
            break;
        }
    }
    cluster.latest_written.fetch_add(written, Ordering::Relaxed);
    if failed > 0 {
        tracing::warn!(
            "cluster: {failed} latest values not stored in EDDY_LATEST; again next time"
        );
    }
}

/// Per key and topic, the sequence of its subject in `EDDY_LATEST` as this node last saw it (0:
/// none). Kept under a 64-bit hash of the two, 16 bytes a key for every key the node ever
/// wrote: two that share a hash only cost a refused write and a read now and then (a subject's
/// sequence is no other subject's, so a wrong expectation is always refused, never taken).
#[derive(Default)]
struct Known(HashMap<u64, u64>);

impl Known {
    fn slot((topic, key): &(crate::Topic, Key)) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        topic.hash(&mut h);
        key.hash(&mut h);
        h.finish()
    }

    fn get(&self, at: &(crate::Topic, Key)) -> u64 {
        self.0.get(&Self::slot(at)).copied().unwrap_or(0)
    }

    fn set(&mut self, at: &(crate::Topic, Key), seq: u64) {
        if seq == 0 {
            self.0.remove(&Self::slot(at));
        } else {
            self.0.insert(Self::slot(at), seq);
        }
    }
}

/// How a conditional write to `EDDY_LATEST` went.
enum Written {
    /// Stored at this sequence of the stream.
    Stored(u64),
    /// Refused: the subject's sequence is not the one expected.
    Refused,
    /// Not acknowledged (in time): tried again next time.
    Failed,
    /// Never to be stored (larger than NATS takes).
    Dropped,
}

/// The header of an `eddy.out` message that names the node run that sent it, and the one with
/// how many items of the topic that run sent before this message. Core NATS delivers at most
/// once (a node cut off from NATS for a moment misses what was sent meanwhile, and a publish
/// may fail): a receiver that sees a sender's count jump past what it received tells the
/// topic's subscribers here how many items they lost (`dropped`), as a full mailbox does; a
/// quiet topic's count comes again in messages of no items ([`Tails`]).
const ITEMS_FROM: &str = "Eddy-From";
const ITEMS_BEFORE: &str = "Eddy-Before";

/// Per sending node run, the count of a topic's items a receiver expects next; `Some(lost)`
/// when a message shows items it never got.
#[derive(Default)]
struct Received {
    next: HashMap<String, u64>,
}

impl Received {
    /// A message from `from` of `n` items, sent after `before` others.
    fn message(&mut self, from: &str, before: u64, n: u64) -> Option<u64> {
        let next = self.next.entry(from.to_owned()).or_insert(before);
        let lost = before.saturating_sub(*next);
        *next = (*next).max(before + n);
        (lost > 0).then_some(lost)
    }
}

/// Items of one topic from every node's shards into the local hub, while a subscriber here wants
/// the topic ([`Cluster::want`]). `seeded`: the values the topic's snapshot store got from
/// `EDDY_LATEST`; a key's first live item equal to its seeded value was already there (it came
/// on `eddy.out` before the read, and arrived after) and is not taken twice. Items lost on the
/// way are reported as `dropped` ([`ITEMS_FROM`]).
async fn receive(
    cluster: Arc<Cluster>,
    mut items: async_nats::Subscriber,
    mut seeded: HashMap<Key, Vec<u8>>,
) {
    let mut received = Received::default();
    while let Some(message) = items.next().await {
        let mut items = decode_items(&message);
        let from = header_of(&message, ITEMS_FROM);
        let before = header_of(&message, ITEMS_BEFORE).and_then(|v| v.parse::<u64>().ok());
        if let (Some(from), Some(before), Some(topic)) =
            (from, before, subject_topic(&message.subject))
        {
            if let Some(lost) = received.message(&from, before, items.len() as u64) {
                cluster.lost_items.fetch_add(lost, Ordering::Relaxed);
                tracing::warn!("cluster: {lost} items of {topic} from {from} never came");
                cluster.hub.lost(&topic, lost);
            }
        }
        if !seeded.is_empty() {
            items.retain(|item| seeded.remove(&item.key).is_none_or(|v| v != item.value));
        }
        if items.is_empty() {
            continue;
        }
        cluster
            .received_items
            .fetch_add(items.len() as u64, Ordering::Relaxed);
        // Into the mailboxes (waiting, briefly, while a local publish holds the hub).
        cluster.hub.items(0, &mut items, None);
    }
}

/// The items of one `eddy.out.<topic>` message.
fn decode_items(message: &async_nats::Message) -> Vec<Emitted> {
    let Some(topic) = subject_topic(&message.subject) else {
        return Vec::new();
    };
    let Ok(decoded) = rmp_serde::from_slice::<Vec<(StoredKey, String)>>(&message.payload) else {
        tracing::warn!("cluster: undecodable items on {}", message.subject);
        return Vec::new();
    };
    let topic: crate::Topic = Arc::from(topic.as_str());
    decoded
        .into_iter()
        .map(|(key, value)| Emitted {
            topic: Arc::clone(&topic),
            key: Key::from(key),
            value: value.into_bytes(),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The catalog.

/// Puts the queries this node loaded from its queries folder into the catalog, each that the
/// catalog has never held (a name deployed or removed over the API before keeps that): so a
/// node started without the folder, or with another, runs them too, and no partition it owns
/// drops their events. A name the catalog holds already is left to it: the catalog's version
/// is applied here when it differs ([`follow_catalog`]).
async fn publish_folder(state: &State, cluster: &Cluster) {
    let router = state.router.load_full();
    for q in router.queries() {
        let name = &q.def.name;
        if !matches!(cluster.catalog.entry(name.as_str()).await, Ok(None)) {
            continue;
        }
        // Without `from`: a node that loaded the same script from its own folder keeps its
        // state (see [`follow_catalog`]).
        let entry = CatalogEntry {
            script: q.def.script.clone(),
            state: None,
            from: None,
        };
        let Ok(value) = serde_json::to_vec(&entry) else {
            continue;
        };
        // `create`: only if no other node put it meanwhile.
        match cluster.catalog.create(name.as_str(), value.into()).await {
            Ok(_) => tracing::info!("cluster catalog: {name} from the queries folder"),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => {
                tracing::warn!("cluster catalog: {name} from the queries folder not put: {e}")
            }
        }
    }
}

/// A deploy as `eddy_catalog` holds it: JSON `{"script":…,"state":"keep","from":NODE}` (`state`
/// only for a replace that keeps each key's state; `from`, the node that took the request, none
/// for a query put there from a queries folder at start). A
/// catalog written before these fields holds the plain script, which is still read.
#[derive(Serialize, Deserialize)]
struct CatalogEntry {
    script: String,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    from: Option<String>,
}

/// Applies every change of the cluster's catalog to this node. Entries from before this node
/// started (up to revision `history`) and its own changes coming back are applied only when the
/// script deployed here differs; a later deploy from another node is applied even with the
/// same script, since a deploy starts the query afresh (each key's state reset), as it did on
/// the node that took it. A replace that keeps state replaces this node's version the same way
/// (its keys keep their state here), then checkpoints: a partition that moves later restores
/// its keys' state into the new script.
async fn follow_catalog(state: Arc<State>, mut watch: kv::Watch, history: u64) {
    let me = state
        .cluster
        .as_ref()
        .map(|c| c.config.node.clone())
        .unwrap_or_default();
    while let Some(entry) = watch.next().await {
        let Ok(entry) = entry else { continue };
        let name = entry.key.clone();
        match entry.operation {
            kv::Operation::Put => {
                let (script, keep, from) =
                    match serde_json::from_slice::<CatalogEntry>(&entry.value) {
                        Ok(e) => (e.script, e.state.as_deref() == Some("keep"), e.from),
                        Err(_) => (
                            String::from_utf8_lossy(&entry.value).into_owned(),
                            false,
                            None,
                        ),
                    };
                let here = super::admin::deployed_script(&state, &name).await;
                let afresh = !keep
                    && entry.revision > history
                    && from.as_deref().is_some_and(|from| from != me);
                let mut outcome = Ok(());
                if here.as_deref() != Some(script.as_str()) || afresh {
                    let limits = state.config.limits.clone();
                    outcome = match super::admin::compile(name.clone(), script, limits).await {
                        Ok(def) if keep => match super::admin::replace_keeping(&state, def).await {
                            Ok(n) => {
                                tracing::info!(
                                    "cluster catalog: {name} replaced, {n} keys' state kept here"
                                );
                                Ok(())
                            }
                            Err(e) => {
                                tracing::error!(
                                    "cluster catalog: {name} not replaced on this node: {e}"
                                );
                                Err(e)
                            }
                        },
                        Ok(def) => match super::admin::deploy(&state, def).await {
                            Ok(_) => {
                                if let Some(cluster) = &state.cluster {
                                    cluster.declare_named(&name).await;
                                }
                                Ok(())
                            }
                            Err(e) => {
                                tracing::error!("cluster catalog: {name}: {e}");
                                Err(e)
                            }
                        },
                        Err(e) => {
                            tracing::error!("cluster catalog: {name}: {e}");
                            Err(e.to_string())
                        }
                    };
                }
                if let Some(cluster) = &state.cluster {
                    cluster.applied(&name, outcome);
                }
                if keep && here.is_some() {
                    if let Some(cluster) = &state.cluster {
                        if let Err(e) = checkpoint(&state, cluster).await {
                            tracing::warn!("cluster: checkpoint after replacing {name}: {e}");
                        }
                    }
                }
            }
            kv::Operation::Delete | kv::Operation::Purge => {
                super::admin::remove(&state, &name).await;
                // Every node that owned some of its keys purges their latest values again once
                // its forwarder has written what it kept of them (a mark writes them): none is
                // left for a later query of the same name.
                if let Some(cluster) = &state.cluster {
                    cluster.applied(&name, Ok(()));
                    cluster.forget_query(&name).await;
                    drain(&state, cluster).await;
                    cluster.purge_latest(&name).await;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// `GET /cluster` and metrics.

/// `GET /cluster`: this node, the live nodes and each partition's owner.
pub async fn describe(state: &State) -> Option<Vec<u8>> {
    let cluster = state.cluster.as_ref()?;
    let mut nodes = entries(cluster, NODES).await.unwrap_or_default();
    nodes.sort();
    let live: Vec<&String> = nodes.iter().map(|(name, _)| name).collect();
    let mut owners = Vec::new();
    for p in 0..cluster.config.partitions {
        let owner = match cluster.owners.get(p.to_string()).await {
            Ok(Some(v)) => Some(String::from_utf8_lossy(&v).into_owned()),
            _ => None,
        };
        owners.push(owner);
    }
    let mut body = Vec::new();
    let mut o = Object::new(&mut body);
    o.str("node", &cluster.config.node)
        .int("partitions", i64::from(cluster.config.partitions))
        .int("owned", cluster.owned() as i64)
        .int("lag", cluster.lag() as i64)
        .int(
            "failovers",
            cluster.failovers.load(Ordering::Relaxed) as i64,
        )
        .int("given_up", cluster.fenced.load(Ordering::Relaxed) as i64);
    o.raw("nodes", &{
        let mut a = b"[".to_vec();
        for (i, n) in live.iter().enumerate() {
            if i > 0 {
                a.push(b',');
            }
            crate::json::write_str(&mut a, n);
        }
        a.push(b']');
        a
    });
    // Per node, the catalog entries it could not apply (only nodes with some).
    let mut failed = Vec::new();
    let mut per_node = Object::new(&mut failed);
    for (node, value) in &nodes {
        let Ok(beat) = serde_json::from_slice::<Heartbeat>(value) else {
            continue;
        };
        if beat.failed.is_empty() {
            continue;
        }
        let mut queries = Object::new(per_node.key(node));
        for (query, why) in &beat.failed {
            queries.str(query, why);
        }
        queries.end();
    }
    per_node.end();
    o.raw("failed", &failed);
    o.raw("owners", &{
        let mut a = b"[".to_vec();
        for (i, owner) in owners.iter().enumerate() {
            if i > 0 {
                a.push(b',');
            }
            match owner {
                Some(n) => crate::json::write_str(&mut a, n),
                None => a.extend_from_slice(b"null"),
            }
        }
        a.push(b']');
        a
    });
    o.end();
    Some(body)
}

/// The cluster's lines of `/metrics`.
pub fn write_metrics(state: &State, out: &mut String) {
    use std::fmt::Write;
    let Some(c) = &state.cluster else { return };
    for (name, kind, help, value) in [
        (
            "eddy_cluster_partitions_owned",
            "gauge",
            "Partitions of the event stream this node owns.",
            c.owned() as u64,
        ),
        (
            "eddy_cluster_consumer_lag",
            "gauge",
            "Messages of this node's partitions not yet delivered to it.",
            c.lag(),
        ),
        (
            "eddy_cluster_failovers_total",
            "counter",
            "Partitions this node took over from a node that died (its lease expired).",
            c.failovers.load(Ordering::Relaxed),
        ),
        (
            "eddy_cluster_partitions_acquired_total",
            "counter",
            "Partitions this node took (at start, on failover, on hand-over).",
            c.acquired.load(Ordering::Relaxed),
        ),
        (
            "eddy_cluster_partitions_fenced_total",
            "counter",
            "Partitions this node gave up because their lease was lost or could not be renewed in time (NATS unreachable); it stays up and takes partitions again once NATS answers.",
            c.fenced.load(Ordering::Relaxed),
        ),
        (
            "eddy_cluster_replayed_events_total",
            "counter",
            "Events this node read from the stream when it took a partition, beyond what the partition's checkpoint covered.",
            c.replayed_events.load(Ordering::Relaxed),
        ),
        (
            "eddy_cluster_partitions_released_total",
            "counter",
            "Partitions this node handed over to a node that joined.",
            c.released.load(Ordering::Relaxed),
        ),
        (
            "eddy_cluster_published_messages_total",
            "counter",
            "Messages (one per frame and partition) published to JetStream and acknowledged or awaited.",
            c.published_messages.load(Ordering::Relaxed),
        ),
        (
            "eddy_cluster_mark_messages_total",
            "counter",
            "Mark messages (event time moving on) sent to the partitions, 100 ms apart while timer queries get events.",
            c.mark_messages.load(Ordering::Relaxed),
        ),
        (
            "eddy_cluster_checkpoints_total",
            "counter",
            "Partition checkpoints this node wrote (each purges what it covers from the stream).",
            c.checkpoints_written.load(Ordering::Relaxed),
        ),
        (
            "eddy_cluster_last_checkpoint_bytes",
            "gauge",
            "Bytes of the partition checkpoints this node wrote last time.",
            c.last_checkpoint_bytes.load(Ordering::Relaxed),
        ),
        (
            "eddy_cluster_restored_keys_total",
            "counter",
            "Keys put back from partition checkpoints when this node took partitions.",
            c.restored_keys.load(Ordering::Relaxed),
        ),
        (
            "eddy_cluster_topics_taken",
            "gauge",
            "Topics this node takes from NATS (those its own subscribers want).",
            c.topics_taken.load(Ordering::Relaxed),
        ),
        (
            "eddy_cluster_received_items_total",
            "counter",
            "Items taken from NATS into this node's hub (only topics its subscribers want).",
            c.received_items.load(Ordering::Relaxed),
        ),
        (
            "eddy_cluster_snapshot_values_loaded_total",
            "counter",
            "Latest values read from the stream EDDY_LATEST when a topic's first subscriber came.",
            c.latest_loaded.load(Ordering::Relaxed),
        ),
        (
            "eddy_cluster_publish_retries_total",
            "counter",
            "Messages sent to JetStream again after a failed publish (no responders, no ack).",
            c.publish_retries.load(Ordering::Relaxed),
        ),
        (
            "eddy_cluster_latest_values_written_total",
            "counter",
            "Keys' latest values this node wrote to EDDY_LATEST (at most one per key per latest_interval).",
            c.latest_written.load(Ordering::Relaxed),
        ),
        (
            "eddy_cluster_latest_values_superseded_total",
            "counter",
            "Latest values not written because EDDY_LATEST held one written under a newer lease of their partition.",
            c.latest_superseded.load(Ordering::Relaxed),
        ),
        (
            "eddy_cluster_items_lost_total",
            "counter",
            "Items of topics taken here that never came over NATS (reported to subscribers as dropped).",
            c.lost_items.load(Ordering::Relaxed),
        ),
        (
            "eddy_cluster_publish_failures_total",
            "counter",
            "Inputs some of whose events JetStream did not acknowledge (answered as rejected).",
            c.publish_failures.load(Ordering::Relaxed),
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    }
}

/// The value of header `name` of a NATS message, if it has one.
fn header_of(message: &async_nats::Message, name: &str) -> Option<String> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_subjects_round_trip() {
        for topic in ["vwap", "vwap.alerts", "a b", "x41", "é", "a..b", "*"] {
            let s = topic_subject(topic);
            assert!(
                !s.contains(' ') && !s.contains('*') && !s.contains(".."),
                "{s}"
            );
            assert_eq!(subject_topic(&s).as_deref(), Some(topic), "{s}");
        }
    }

    #[test]
    fn rendezvous_spreads_and_moves_little() {
        let two: Vec<String> = vec!["a".into(), "b".into()];
        let three: Vec<String> = vec!["a".into(), "b".into(), "c".into()];
        let mut per = HashMap::new();
        let mut moved = 0;
        for p in 0..64 {
            let w3 = preferred(&three, p).unwrap();
            *per.entry(w3).or_insert(0) += 1;
            if preferred(&two, p).unwrap() != w3 {
                moved += 1;
                assert_eq!(w3, "c", "a partition moves only to the node that joined");
            }
        }
        assert!(per.values().all(|&n| n >= 10), "{per:?}");
        assert_eq!(moved, per["c"]);
    }

    #[test]
    fn a_senders_count_that_jumps_is_items_lost_and_each_sender_counts_alone() {
        let mut r = Received::default();
        // The first message of a sender sets where it is: nothing known lost before it.
        assert_eq!(r.message("a.1", 100, 3), None);
        assert_eq!(r.message("a.1", 103, 2), None);
        // 105..110 never came.
        assert_eq!(r.message("a.1", 110, 1), Some(5));
        assert_eq!(r.message("a.1", 111, 4), None);
        // Another sender, and a new run of the first one, start afresh.
        assert_eq!(r.message("b.1", 0, 1), None);
        assert_eq!(r.message("a.2", 7, 1), None);
        assert_eq!(r.message("b.1", 3, 1), Some(2));
        // A message from before what was already counted (never in core NATS from one sender,
        // but harmless): nothing lost, and the count does not go back.
        assert_eq!(r.message("a.1", 112, 1), None);
        assert_eq!(r.message("a.1", 115, 1), None);
    }
}
