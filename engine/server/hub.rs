//! The fan-out hub: every topic and every subscription, behind one lock.
//!
//! In: the items a shard emitted, published by the shard's own thread ([`HubHandle::items`])
//! as it hands them on, and control requests from the async side ([`HubHandle::control`]). So
//! an item goes from the shard straight into its subscribers' mailboxes, with no hand-off to a
//! fan-out thread in between (one wake-up less per batch on the hot path; see the README's "How
//! it works"). Per call and topic, the hub encodes one batch (`[{"key":K,"value":V},…]`) once;
//! that `Bytes` is shared by every subscriber that takes the topic unfiltered. Filtered and
//! `latest` subscribers get slices of the same encoding. It also keeps the latest value of every
//! key of every topic (at most `snapshot_keys` per topic, and `snapshot_bytes` for all topics
//! together: past either, a new key's value is not kept, and a kept key whose new value would go
//! past the bytes is dropped from the snapshots; both are counted) for snapshots.
//!
//! Out: puts into subscriber [`Mailbox`]es, which never block: a slow subscriber loses its
//! oldest items, never anyone else's. Since a shard's items are in the mailboxes before the
//! shard goes on, a control request sees everything handed on before it: a `closed` follows the
//! last items of its query. The lock is held for one publish (encode, keep, push): shards that
//! emit at once take turns, which is the backpressure a fan-out thread's bounded queue gave.
//!
//! Positions: every item gets its topic's per-shard index ([`replay`]); each batch carries the
//! topic's position after it, and the newest batches stay in a per-topic ring (`replay_bytes`)
//! so that a subscriber that hands a position back gets exactly what came after it. A checkpoint
//! asks the hub, through each shard ([`HubHandle::mark`]), for the counts its state covers;
//! recovery gives them back ([`HubControl::Restore`]) before the log replays, so replayed items
//! get their old positions.
//!
//! Supervision: a panic while publishing is caught by the shard that published (and counted as
//! its panic); one while handling a control request is caught, logged and counted here
//! (`eddy_panics_total`). Either way the lock is taken again afterwards and the hub goes on with
//! its topics.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::durable::log::LogGate;
use crate::json::{self, write_str, Object};
use crate::{Emitted, Key, Topic};

use super::mailbox::{Items, Mailbox};
use super::replay::{Element, Position, Ring};

/// The maps an item passes through (its topic, its key's latest value, a subscriber's key
/// filter) hash with foldhash, seeded per process, as the shards' key states do: SipHash, the
/// standard one, cost about 1 % of a loaded server's CPU here (`perf`, vwap at 100 events per
/// frame).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// What a checkpoint held of a topic.
pub struct RestoredTopic {
    pub topic: String,
    pub position: Position,
    pub latest: Vec<(Key, Bytes, usize)>,
}

/// A topic's count for one shard at a checkpoint, and the latest values that came from it.
#[derive(Debug, Clone)]
pub struct ShardCount {
    pub topic: String,
    pub epoch: u64,
    pub count: u64,
    /// `{"key":K,"value":V}` per key.
    pub latest: Vec<(Key, Bytes)>,
}

/// How a subscriber takes a topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every item, in order; the oldest are dropped (and counted) when the subscriber is slow.
    All,
    /// At most one pending value per key, the newest.
    Latest,
}

/// What the topics listing says about a query.
#[derive(Clone, Debug)]
pub struct QueryInfo {
    pub name: String,
    pub sources: Vec<String>,
    pub key_by: Option<String>,
    /// Named topics the script spells out: they may be subscribed to before their first item.
    pub declared_topics: Vec<String>,
}

pub struct Subscribe {
    pub subscriber: u64,
    pub mailbox: Arc<Mailbox>,
    pub topic: String,
    pub keys: Option<Vec<Key>>,
    pub mode: Mode,
    pub snapshot: bool,
    /// Resume after this position (mode `all`).
    pub from: Option<Position>,
}

pub enum HubControl {
    Subscribe(Subscribe),
    Unsubscribe {
        subscriber: u64,
        topic: String,
        mailbox: Arc<Mailbox>,
    },
    Disconnect {
        subscriber: u64,
    },
    /// Answers with the topics, and again whenever the list changes.
    Topics {
        subscriber: u64,
        mailbox: Arc<Mailbox>,
    },
    QueryDeployed(QueryInfo),
    /// The query's shards have stopped: close its topics.
    QueryRemoved {
        name: String,
    },
    Report {
        reply: oneshot::Sender<HubReport>,
    },
    /// Recovery: topics go on from the positions a checkpoint recorded, with the latest values
    /// it held (and the shard each came from); before the log replays, so that no replayed
    /// item is counted before it.
    Restore {
        topics: Vec<RestoredTopic>,
    },
}

/// Counters per topic, for `/metrics`.
#[derive(Debug, Default)]
pub struct HubReport {
    pub topics: Vec<TopicReport>,
    /// Bytes of the latest values kept for snapshots.
    pub snapshot_bytes: u64,
    /// Latest values not kept (or dropped) for `snapshot_keys` or `snapshot_bytes`.
    pub snapshot_skipped: u64,
}

#[derive(Debug)]
pub struct TopicReport {
    pub topic: Topic,
    pub emitted: u64,
    pub subscribers: usize,
    pub dropped: u64,
    /// Bytes kept for resuming subscribers.
    pub replay_bytes: u64,
}

/// The hub, shared by the shards (which publish into it) and the async side (which subscribes,
/// and asks for reports).
#[derive(Clone)]
pub struct HubHandle {
    hub: Arc<Mutex<Hub>>,
    panics: Arc<AtomicU64>,
}

impl HubHandle {
    /// The hub, also after a panic while it was held (the panic was counted where it happened).
    fn lock(&self) -> MutexGuard<'_, Hub> {
        self.hub.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A shard's items, in the order it produced them: in their subscribers' mailboxes when
    /// this returns. `ingest` is when the oldest frame among those that produced them arrived.
    ///
    /// The items' values stay in `items` (their keys are taken), for the shard to reuse their
    /// buffers ([`crate::shard::Shard::recycle`]).
    pub fn items(&self, shard: usize, items: &mut [Emitted], ingest: Option<Instant>) {
        let mut hub = self.lock();
        hub.take(shard, items, ingest);
        hub.publish();
    }

    /// `n` items of `topic` were lost on their way here (cluster mode: an `eddy.out` message
    /// NATS did not deliver to this node): every subscriber of the topic here is told `dropped`
    /// (their keys are unknown, so filtered subscribers too), before the items that follow.
    pub fn lost(&self, topic: &str, n: u64) {
        let mut hub = self.lock();
        let Some(name) = hub.topics.get_key_value(topic).map(|(t, _)| Arc::clone(t)) else {
            return;
        };
        if let Some(state) = hub.topics.get_mut(topic) {
            state.dropped += n;
            for sub in &state.subs {
                sub.mailbox.note_lost(&name, n);
            }
        }
    }

    /// Latest values kept elsewhere (cluster mode: the stream `EDDY_LATEST`), for snapshots
    /// only: they are not items here, so they are not counted, not kept for resumes and not
    /// sent to anyone.
    pub fn seed_latest(&self, values: Vec<Emitted>) {
        self.lock().seed_latest(values);
    }

    /// A named topic that a query made on another node (cluster mode): listed and subscribable
    /// here before its first item arrives. Only while its query is deployed here (a topic that
    /// comes after its query was removed must not outlive it); returns whether it is known now.
    pub fn declare_topic(&self, topic: &Topic) -> bool {
        let mut hub = self.lock();
        if !hub.queries.contains_key(query_of(topic)) {
            return false;
        }
        if !hub.topics.contains_key(topic) {
            let hub = &mut *hub;
            new_topic(
                &mut hub.topics,
                &mut hub.topics_changed,
                &hub.settings,
                topic,
            );
        }
        true
    }

    /// Whether a subscription to `topic` would be taken (see `Hub::accepts`): cluster mode asks
    /// before it takes the topic from NATS.
    pub fn accepts(&self, topic: &str) -> bool {
        self.lock().accepts(topic)
    }

    /// A checkpoint's place in the shard's output: per topic, its epoch and how many items the
    /// shard emitted to it so far, with the latest values that came from the shard.
    pub fn mark(&self, shard: usize) -> Vec<ShardCount> {
        self.lock().mark(shard)
    }

    /// Handles a control request (its answer goes to the request's mailbox or reply).
    pub fn control(&self, msg: HubControl) {
        super::supervise::guarded("the hub", &self.panics, || {
            let mut hub = self.lock();
            hub.control(msg);
            hub.tell_watchers();
        });
    }

    /// Panics caught while handling control requests since start.
    pub fn panics(&self) -> u64 {
        self.panics.load(Ordering::Relaxed)
    }
}

/// What the hub keeps, and how much.
#[derive(Clone, Copy, Debug)]
pub struct HubSettings {
    pub shards: usize,
    pub snapshot_keys: usize,
    pub snapshot_bytes: usize,
    /// Per topic, for resuming subscribers.
    pub replay_bytes: usize,
}

/// The hub, with no topic yet. With a `gate` (durable mode), nothing is published before its
/// input is written to the log.
pub fn start(settings: HubSettings, gate: Option<LogGate>) -> HubHandle {
    HubHandle {
        hub: Arc::new(Mutex::new(Hub {
            settings,
            gate,
            topics: HashMap::default(),
            queries: BTreeMap::new(),
            touched: Vec::new(),
            latest_bytes: 0,
            snapshot_skipped: 0,
            watchers: Vec::new(),
            topics_changed: false,
        })),
        panics: Arc::new(AtomicU64::new(0)),
    }
}

/// What a kept latest value costs besides its bytes: its key and map slot, about.
const LATEST_OVERHEAD: usize = 64;

/// How long one publish may spend writing batches straight to idle subscribers' sockets (on
/// the shard's thread, holding the hub). Past it, the remaining subscribers' connection tasks
/// are woken to write theirs, in parallel on the runtime's workers, as under load. A loopback
/// write costs about 10 µs, so a handful of subscribers go straight.
const DIRECT_WRITES: Duration = Duration::from_micros(100);

/// Makes the state of `topic` on its first item (a named topic's; the others are listed from
/// the start), which changes the topic list. Callers look the topic up first, so an item of a
/// known topic costs one lookup and no reference count.
fn new_topic<'a>(
    topics: &'a mut HashMap<Topic, TopicState>,
    changed: &mut bool,
    settings: &HubSettings,
    topic: &Topic,
) -> &'a mut TopicState {
    *changed = true;
    topics
        .entry(Arc::clone(topic))
        .or_insert_with(|| TopicState::new(query_of(topic), settings))
}

/// Appends one item as a batch element, `{"key":K,"value":V}`.
fn write_element(out: &mut Vec<u8>, key: &Key, value: &[u8]) {
    out.extend_from_slice(b"{\"key\":");
    key.write_json(out);
    out.extend_from_slice(b",\"value\":");
    out.extend_from_slice(value);
    out.push(b'}');
}

/// Keeps `element` as `key`'s latest value on a topic, within `snapshot_keys` (per topic) and
/// `snapshot_bytes` (all topics: `used`). Returns 1 when it is not kept (or a kept value is
/// dropped), else 0.
fn keep_latest(
    latest: &mut HashMap<Key, (Bytes, usize)>,
    used: &mut usize,
    settings: &HubSettings,
    key: &Key,
    element: (Bytes, usize),
) -> u64 {
    let cost = element.0.len() + LATEST_OVERHEAD;
    let kept = latest.len();
    match latest.get_mut(key) {
        Some(old) => {
            let others = *used - (old.0.len() + LATEST_OVERHEAD);
            if others + cost <= settings.snapshot_bytes {
                *old = element;
                *used = others + cost;
                0
            } else {
                latest.remove(key);
                *used = others;
                1
            }
        }
        None if kept < settings.snapshot_keys && *used + cost <= settings.snapshot_bytes => {
            latest.insert(key.clone(), element);
            *used += cost;
            0
        }
        None => 1,
    }
}

/// A topic's batch is published once it holds this many bytes, even within one shard's hand-on:
/// so that batches stay a small part of `replay_bytes` (a resume can only start in a batch still
/// kept), as they would not in a recovery's replay or a burst.
const MAX_BATCH_BYTES: usize = 256 * 1024;

struct Subscription {
    id: u64,
    mailbox: Arc<Mailbox>,
    keys: Option<HashSet<Key>>,
    mode: Mode,
}

impl Subscription {
    fn wants(&self, key: &Key) -> bool {
        self.keys.as_ref().is_none_or(|keys| keys.contains(key))
    }
}

struct TopicState {
    query: String,
    /// Each key's newest element, and the shard it came from.
    latest: HashMap<Key, (Bytes, usize)>,
    subs: Vec<Subscription>,
    emitted: u64,
    dropped: u64,
    /// Elements of the batch being gathered: `[` + elements joined by `,`.
    pending: Vec<u8>,
    pending_keys: Vec<Element>,
    pending_ingest: Option<Instant>,
    /// Positions, and the newest batches for resuming subscribers.
    ring: Ring,
}

impl TopicState {
    fn new(query: &str, settings: &HubSettings) -> TopicState {
        TopicState {
            query: query.to_owned(),
            latest: HashMap::default(),
            subs: Vec::new(),
            emitted: 0,
            dropped: 0,
            pending: Vec::new(),
            pending_keys: Vec::new(),
            pending_ingest: None,
            ring: Ring::new(settings.shards, settings.replay_bytes),
        }
    }
}

struct Hub {
    settings: HubSettings,
    gate: Option<LogGate>,
    topics: HashMap<Topic, TopicState>,
    queries: BTreeMap<String, QueryInfo>,
    touched: Vec<Topic>,
    /// Bytes of latest values kept now, all topics together (at most `snapshot_bytes`).
    latest_bytes: usize,
    snapshot_skipped: u64,
    /// Subscribers that asked for the topics: told again when the list changes.
    watchers: Vec<(u64, Arc<Mailbox>)>,
    /// The list changed since the watchers were last told.
    topics_changed: bool,
}

impl Hub {
    /// What a shard emitted before a checkpoint's mark, and the latest values from it.
    fn mark(&mut self, shard: usize) -> Vec<ShardCount> {
        self.topics
            .iter()
            .map(|(topic, state)| ShardCount {
                topic: topic.to_string(),
                epoch: state.ring.epoch(),
                count: state.ring.count(shard),
                latest: state
                    .latest
                    .iter()
                    .filter(|(_, (_, from))| *from == shard)
                    .map(|(k, (v, _))| (k.clone(), v.clone()))
                    .collect(),
            })
            .collect()
    }

    /// See [`HubHandle::seed_latest`].
    fn seed_latest(&mut self, values: Vec<Emitted>) {
        for value in values {
            let settings = &self.settings;
            let state = match self.topics.get_mut(&value.topic) {
                Some(state) => state,
                None => new_topic(
                    &mut self.topics,
                    &mut self.topics_changed,
                    settings,
                    &value.topic,
                ),
            };
            let mut element = Vec::new();
            write_element(&mut element, &value.key, &value.value);
            self.snapshot_skipped += keep_latest(
                &mut state.latest,
                &mut self.latest_bytes,
                settings,
                &value.key,
                (Bytes::from(element), 0),
            );
        }
    }

    /// Adds a shard's items to their topics' pending batches (publishing a batch that got full).
    fn take(&mut self, shard: usize, items: &mut [Emitted], ingest: Option<Instant>) {
        let mut items = items.iter_mut().peekable();
        while items.peek().is_some() {
            let settings = &self.settings;
            let mut full = false;
            for item in items.by_ref() {
                let state = match self.topics.get_mut(&item.topic) {
                    Some(state) => state,
                    None => new_topic(
                        &mut self.topics,
                        &mut self.topics_changed,
                        settings,
                        &item.topic,
                    ),
                };
                state.emitted += 1;
                if state.pending.is_empty() {
                    self.touched.push(Arc::clone(&item.topic));
                    state.pending.push(b'[');
                    state.pending_ingest = ingest;
                } else {
                    state.pending.push(b',');
                    state.pending_ingest = match (state.pending_ingest, ingest) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
                let start = state.pending.len();
                write_element(&mut state.pending, &item.key, &item.value);
                let end = state.pending.len();
                full = end >= MAX_BATCH_BYTES;
                let index = state.ring.next(shard);
                state.pending_keys.push(Element {
                    key: std::mem::replace(&mut item.key, Key::None),
                    shard,
                    index,
                    range: start..end,
                });
                if full {
                    break;
                }
            }
            if full {
                self.publish();
            }
        }
    }

    /// Encodes the batch of every topic that got items and puts it in its subscribers'
    /// mailboxes; tells the watchers when the topics changed.
    fn publish(&mut self) {
        if !self.touched.is_empty() {
            if let Some(gate) = &self.gate {
                gate.wait_written();
            }
        }
        self.tell_watchers();
        // Idle subscribers get their batches written straight to their sockets, on this
        // thread, until the publish has spent DIRECT_WRITES on that; the rest are woken.
        let started = Instant::now();
        let mut direct = true;
        for topic in std::mem::take(&mut self.touched) {
            let Some(state) = self.topics.get_mut(&topic) else {
                continue;
            };
            let mut buf = std::mem::take(&mut state.pending);
            buf.push(b']');
            let items = Bytes::from(buf);
            let shared = Arc::new(Items::from(items.clone()));
            let keys = std::mem::take(&mut state.pending_keys);
            let ingest = state.pending_ingest.take();
            // Written out only for mode `all` subscribers, which carry it.
            let pos = (state.subs.iter().any(|s| s.mode == Mode::All)).then(|| state.ring.pos());
            for Element {
                key, range, shard, ..
            } in &keys
            {
                let element = Bytes::copy_from_slice(&items[range.clone()]);
                self.snapshot_skipped += keep_latest(
                    &mut state.latest,
                    &mut self.latest_bytes,
                    &self.settings,
                    key,
                    (element, *shard),
                );
            }
            for sub in &state.subs {
                match (sub.mode, &sub.keys) {
                    (Mode::All, None) => {
                        // Compressed here, once, before the first subscriber that sends it
                        // compressed gets it: left to that subscriber's writer, it would hold
                        // up every other writer of the batch, blocked on the same piece.
                        if sub.mailbox.deflate && !shared.is_deflated() {
                            let sharers = state
                                .subs
                                .iter()
                                .filter(|s| s.mode == Mode::All && s.keys.is_none())
                                .filter(|s| s.mailbox.deflate)
                                .take(super::deflate::WIDE)
                                .count();
                            shared.deflated_for(sharers);
                        }
                        let n = keys.len() as u64;
                        state.dropped += sub.mailbox.push_batch(
                            &topic,
                            &shared,
                            n,
                            (started, ingest, pos.as_ref()),
                            direct,
                        );
                        direct = direct && started.elapsed() < DIRECT_WRITES;
                    }
                    (Mode::All, Some(_)) => {
                        let mut filtered = Vec::with_capacity(items.len());
                        let mut n = 0;
                        for e in keys.iter().filter(|e| sub.wants(&e.key)) {
                            filtered.push(if n == 0 { b'[' } else { b',' });
                            filtered.extend_from_slice(&items[e.range.clone()]);
                            n += 1;
                        }
                        if n > 0 {
                            filtered.push(b']');
                            let filtered = Arc::new(Items::from(Bytes::from(filtered)));
                            state.dropped += sub.mailbox.push_batch(
                                &topic,
                                &filtered,
                                n,
                                (started, ingest, pos.as_ref()),
                                direct,
                            );
                            direct = direct && started.elapsed() < DIRECT_WRITES;
                        }
                    }
                    (Mode::Latest, _) => {
                        for e in keys.iter().filter(|e| sub.wants(&e.key)) {
                            sub.mailbox.push_latest(
                                &topic,
                                &e.key,
                                items.slice(e.range.clone()),
                                ingest,
                            );
                        }
                    }
                }
            }
            state.ring.keep(&items, &keys);
        }
    }

    /// Sends the topics to the subscribers that asked for them, when the list changed.
    fn tell_watchers(&mut self) {
        if std::mem::take(&mut self.topics_changed) && !self.watchers.is_empty() {
            let msg = self.topics_message();
            for (_, mailbox) in &self.watchers {
                mailbox.push_control(msg.clone());
            }
        }
    }

    fn control(&mut self, msg: HubControl) {
        match msg {
            HubControl::Subscribe(req) => self.subscribe(req),
            HubControl::Unsubscribe {
                subscriber,
                topic,
                mailbox,
            } => {
                let found = self.topics.get_mut(topic.as_str()).is_some_and(|state| {
                    let before = state.subs.len();
                    state.subs.retain(|s| s.id != subscriber);
                    before != state.subs.len()
                });
                let msg = if found {
                    json::message("unsubscribed", |o| {
                        o.str("topic", &topic);
                    })
                } else {
                    error_message(&format!("not subscribed to topic {topic:?}"))
                };
                mailbox.push_control(msg.into());
            }
            HubControl::Disconnect { subscriber } => {
                for state in self.topics.values_mut() {
                    state.subs.retain(|s| s.id != subscriber);
                }
                self.watchers.retain(|(id, _)| *id != subscriber);
            }
            HubControl::Topics {
                subscriber,
                mailbox,
            } => {
                mailbox.push_control(self.topics_message());
                if !self.watchers.iter().any(|(id, _)| *id == subscriber) {
                    self.watchers.push((subscriber, mailbox));
                }
            }
            HubControl::QueryDeployed(info) => {
                self.queries.insert(info.name.clone(), info);
                self.topics_changed = true;
            }
            HubControl::QueryRemoved { name } => {
                self.queries.remove(&name);
                self.topics_changed = true;
                let gone: Vec<Topic> = self
                    .topics
                    .iter()
                    .filter(|(_, s)| s.query == name)
                    .map(|(t, _)| Arc::clone(t))
                    .collect();
                for topic in gone {
                    let Some(state) = self.topics.remove(&topic) else {
                        continue;
                    };
                    self.latest_bytes -= state
                        .latest
                        .values()
                        .map(|(v, _)| v.len() + LATEST_OVERHEAD)
                        .sum::<usize>();
                    let msg = Bytes::from(json::message("closed", |o| {
                        o.str("topic", &topic);
                    }));
                    for sub in state.subs {
                        sub.mailbox.push_control(msg.clone());
                    }
                }
            }
            HubControl::Report { reply } => {
                let mut topics: Vec<TopicReport> = self
                    .topics
                    .iter()
                    .map(|(topic, s)| TopicReport {
                        topic: Arc::clone(topic),
                        emitted: s.emitted,
                        subscribers: s.subs.len(),
                        dropped: s.dropped,
                        replay_bytes: s.ring.bytes() as u64,
                    })
                    .collect();
                topics.sort_by(|a, b| a.topic.cmp(&b.topic));
                let _ = reply.send(HubReport {
                    topics,
                    snapshot_bytes: self.latest_bytes as u64,
                    snapshot_skipped: self.snapshot_skipped,
                });
            }
            HubControl::Restore { topics } => {
                for t in topics {
                    // Only the topics of queries still deployed: no other is known.
                    let query = query_of(&t.topic);
                    if !self.queries.contains_key(query) {
                        continue;
                    }
                    let settings = &self.settings;
                    let state = self
                        .topics
                        .entry(t.topic.as_str().into())
                        .or_insert_with(|| TopicState::new(query, settings));
                    state.ring.restore(t.position);
                    for (key, element, shard) in t.latest {
                        self.snapshot_skipped += keep_latest(
                            &mut state.latest,
                            &mut self.latest_bytes,
                            settings,
                            &key,
                            (element, shard),
                        );
                    }
                }
            }
        }
    }

    /// A topic that exists, or one a deployed query is sure to have (its own, `.errors`,
    /// `.late`) or spells out (`emit("name", …)`): a subscriber creates no other topic, so
    /// that names no query emits cannot pile up.
    fn accepts(&self, topic: &str) -> bool {
        let declared =
            self.queries
                .get(query_of(topic))
                .is_some_and(|info| match topic.split_once('.') {
                    None => true,
                    Some((_, "errors" | "late")) => true,
                    Some((_, sub)) => info.declared_topics.iter().any(|t| t == sub),
                });
        self.topics.contains_key(topic) || declared
    }

    fn subscribe(&mut self, req: Subscribe) {
        let query = query_of(&req.topic);
        if !self.accepts(&req.topic) {
            let msg = error_message(&format!(
                "unknown topic {:?}: no query emits it yet (a named topic can be subscribed to \
                 before its first item when the query names it literally, `emit(\"name\", \
                 value)`); ask {{\"op\":\"topics\"}} for the list",
                req.topic
            ));
            req.mailbox.push_control(msg.into());
            return;
        }
        let topic: Topic = req.topic.as_str().into();
        let settings = &self.settings;
        let state = self
            .topics
            .entry(Arc::clone(&topic))
            .or_insert_with(|| TopicState::new(query, settings));
        state.subs.retain(|s| s.id != req.subscriber);
        let sub = Subscription {
            id: req.subscriber,
            mailbox: Arc::clone(&req.mailbox),
            keys: req.keys.map(|k| k.into_iter().collect()),
            mode: req.mode,
        };
        let head = state.ring.pos();
        // With a position: what came after it, or why that is gone (and then the snapshot,
        // when asked for). The replay goes in order before any new batch.
        let resumed = req.from.as_ref().map(|from| {
            state
                .ring
                .since(from, |k| sub.wants(k))
                .map_err(|gone| (from.encode(), gone))
        });
        let msg = json::message("subscribed", |o| {
            o.str("topic", &topic).str("pos", &head);
            if let Some(Ok(replayed)) = &resumed {
                o.int(
                    "replayed",
                    replayed.iter().map(|r| r.count).sum::<u64>() as i64,
                );
            }
        });
        req.mailbox.push_control(msg.into());
        let mut snapshot = req.snapshot;
        match resumed {
            Some(Ok(replayed)) => {
                snapshot = false;
                if !replayed.is_empty() {
                    req.mailbox.push_replay(&topic, replayed);
                }
            }
            Some(Err((from, gone))) => {
                let msg = json::message("gone", |o| {
                    o.str("topic", &topic)
                        .str("from", &from)
                        .str("pos", &head)
                        .str("reason", gone.reason());
                });
                req.mailbox.push_control(msg.into());
            }
            None => {}
        }
        if snapshot {
            let mut latest: Vec<(&Key, &Bytes)> = state
                .latest
                .iter()
                .filter(|(k, _)| sub.wants(k))
                .map(|(k, (v, _))| (k, v))
                .collect();
            latest.sort_by(|a, b| a.0.cmp(b.0));
            let msg = json::message("snapshot", |o| {
                o.str("topic", &topic).str("pos", &head).array(
                    "items",
                    &latest,
                    |out, (_, element)| out.extend_from_slice(element),
                );
            });
            req.mailbox.push_control(msg.into());
        }
        state.subs.push(sub);
    }

    fn topics_message(&self) -> Bytes {
        let mut names: BTreeMap<String, &QueryInfo> = BTreeMap::new();
        for info in self.queries.values() {
            for topic in [
                info.name.clone(),
                format!("{}.errors", info.name),
                format!("{}.late", info.name),
            ] {
                names.insert(topic, info);
            }
        }
        for (topic, state) in &self.topics {
            if let Some(info) = self.queries.get(&state.query) {
                names.insert(topic.to_string(), info);
            }
        }
        let msg = json::message("topics", |o| {
            o.array("topics", &names, |out, (name, info)| {
                let mut topic = Object::new(out);
                topic.str("name", name).str("query", &info.name);
                write_sources(topic.key("source"), &info.sources);
                topic.opt_str("key_by", info.key_by.as_deref()).end();
            });
        });
        msg.into()
    }
}

/// The query a topic belongs to: the part before the first dot.
fn query_of(topic: &str) -> &str {
    topic.split_once('.').map_or(topic, |(q, _)| q)
}

/// `"trades"` for one source, `["a","b"]` for several.
pub fn write_sources(out: &mut Vec<u8>, sources: &[String]) {
    if let [one] = sources {
        write_str(out, one);
        return;
    }
    out.push(b'[');
    for (i, s) in sources.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, s);
    }
    out.push(b']');
}

/// `{"type":"error","error":…}`.
pub fn error_message(text: &str) -> Vec<u8> {
    json::message("error", |o| {
        o.str("error", text);
    })
}
