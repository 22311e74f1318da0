//! A shard: the runtime of every query for the keys it owns.
//!
//! A `Shard` owns a Rhai engine, each deployed query compiled by that engine, the state of each
//! of its keys and the timers they set. It is driven by one thread and touched by no other: the
//! offline runner calls it directly; the server gives each shard an OS thread fed by a channel.
//! In: events already routed to this shard (key and watermark decided by the router), watermark
//! advances, deploys and removals. Out: [`Emitted`] items, encoded once, taken with
//! [`Shard::take_output`].
//!
//! Event time is owned here. Each query has a watermark per shard that only grows, moved by the
//! deliveries in the order they come (each carries the mark its input had reached when the
//! router stamped it, see [`Delivery`]) and by explicit advances. An event whose time is behind
//! the watermark, or behind its own source's mark, is late: it is not handled but becomes an item
//! on `<query>.late`, so no event is ever handled after a timer it belongs before has fired.
//!
//! Timers fire when the watermark rises to them, in (time, key) order, before the event that
//! raised it is handled, at most [`Limits::max_timers_per_advance`] per advance (the rest wait
//! for the next advance and are counted). A key's own timers also fire, before its event, up to
//! its source's mark, so a key fed by one producer sees its timers exactly where `eddy run`
//! would fire them even while a slower producer holds the query's watermark back. A timer set for
//! a time at or before the watermark fires once, at the next advance; one that `on_timer(T)` sets
//! for `T` or earlier likewise waits for the next advance, so a timer that sets itself again
//! never loops. [`Shard::finish`] is the last advance, to the end of time.
//!
//! A runtime error skips that call: the items it emitted and the timers it set are dropped, it is
//! counted and published on `<query>.errors`. State changes the call made before failing stay
//! (Rhai has no transactions, and copying every state before every call would cost more than the
//! call).
//!
//! Isolation: every deployment has a [`QueryControl`] shared with the catalog. A removed
//! deployment is skipped from the next call on, even while its events are still queued. With a
//! [`CpuBudget`], each query's script time is accounted per window; a query that takes more than
//! its share is quarantined (its events are counted and skipped, and an error says why) until an
//! admin resumes it. The state-size limit is checked after every call for small states and, for
//! large ones, at intervals that shrink as the state nears its limit, so a large state does not
//! cost a full walk per call.

use std::cell::RefCell;
use std::collections::BTreeSet;

use indexmap::IndexMap;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rhai::{CallFnOptions, Dynamic, Engine, EvalAltResult, Scope, AST, INT};

use crate::builtins::{self, CallCtx, Emitted, QueryTopics};
use crate::compiled::{self, Arg, Compiled, EngineMode, Rt, State};
use crate::durable::{KeyCheckpoint, ShardQueryCheckpoint, Stored};
use crate::event::Event;
use crate::key::{Key, Lookup};
use crate::query::{self, OnKeyLimit, QueryDef, QueryError};
use crate::sandbox::{self, Limits};

/// Identifies one deployment of a query; a replaced query gets a new id, so that work still in
/// flight for the old one is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueryId(pub u64);

/// One event for one query, bound for the shard that owns its key.
#[derive(Debug)]
pub struct Delivery {
    pub query: QueryId,
    pub key: Key,
    pub event: Event,
    /// The event's time: its `time_field`, or its arrival time.
    pub time: i64,
    /// The watermark the query's input had reached with this event, across every producer: the
    /// newest event time routed so far minus lateness. The shard moves its own watermark to it
    /// before handling the event, so that timers fire at the same point of the stream as they do
    /// offline, whichever shard saw the event that moved it.
    pub watermark: i64,
    /// The mark of the event's own source with this event (at least `watermark`): an event
    /// behind it is late, and the key's own timers up to it fire before the event, as they would
    /// offline, even while a slower source holds the input's mark back.
    pub source_mark: i64,
    /// Arrival time (`now()`).
    pub now: i64,
}

/// The switches of one deployment, shared by the catalog and every shard that runs it, so that
/// the control plane acts without waiting for a shard's queue.
#[derive(Debug, Default)]
pub struct QueryControl {
    removed: AtomicBool,
    quarantined: AtomicBool,
}

impl QueryControl {
    /// From now on, the deployment's events are skipped; its runtime goes when the shard hears.
    pub fn remove(&self) {
        self.removed.store(true, Ordering::Relaxed);
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }

    pub fn is_quarantined(&self) -> bool {
        self.quarantined.load(Ordering::Relaxed)
    }

    /// Lifts a quarantine; returns whether there was one.
    pub fn resume(&self) -> bool {
        self.quarantined.swap(false, Ordering::Relaxed)
    }

    /// Quarantines; returns whether this call did it (not already quarantined).
    fn quarantine(&self) -> bool {
        !self.quarantined.swap(true, Ordering::Relaxed)
    }
}

/// The script time one query may take on a shard: `share` of every `window`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuBudget {
    pub share: f64,
    pub window: Duration,
}

/// What a shard counted for one query.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueryStats {
    pub events: u64,
    pub emitted: u64,
    pub errors: u64,
    pub timers_fired: u64,
    pub keys: u64,
    /// Events behind the watermark, published on `<query>.late`.
    pub late: u64,
    /// Events skipped while the query was quarantined.
    pub skipped: u64,
    /// Due timers left for a later advance by `max_timers_per_advance`.
    pub timers_deferred: u64,
    /// Script time, in µs.
    pub cpu_us: u64,
    /// Keys dropped to make room for new ones (`max_keys_per_query`, `on_key_limit = "evict"`).
    pub keys_evicted: u64,
    /// Events of new keys not handled (`max_keys_per_query`, `on_key_limit = "reject"`).
    pub keys_refused: u64,
    /// Keys forgotten after `key_ttl` without an event.
    pub keys_expired: u64,
}

impl std::ops::AddAssign for QueryStats {
    fn add_assign(&mut self, o: Self) {
        self.events += o.events;
        self.emitted += o.emitted;
        self.errors += o.errors;
        self.timers_fired += o.timers_fired;
        self.keys += o.keys;
        self.late += o.late;
        self.skipped += o.skipped;
        self.timers_deferred += o.timers_deferred;
        self.cpu_us += o.cpu_us;
        self.keys_evicted += o.keys_evicted;
        self.keys_refused += o.keys_refused;
        self.keys_expired += o.keys_expired;
    }
}

struct KeyState {
    /// The key's state: a map, or the slots of a compiled query (see [`State::to_dynamic`]).
    state: State,
    /// Times of this key's pending timers (usually none, so no allocation).
    timers: Vec<i64>,
    /// Calls left before the state's size is measured again (0: after the next call).
    unmeasured: u32,
    /// The last checkpoint this key's state was copied for, or that began after it was made
    /// (see [`Shard::begin_export`]).
    exported: u64,
    /// The keys seen just before and just after this one, as indexes of its query's states, in
    /// its query's [`Recency`] list ([`NIL`]: none).
    prev: usize,
    next: usize,
    /// Whether the key is in the [`Recency`] list.
    linked: bool,
    /// The newest event time seen for the key, for `key_ttl`.
    seen_time: i64,
}

impl KeyState {
    fn new(state: State) -> Self {
        KeyState {
            state,
            timers: Vec::new(),
            unmeasured: 0,
            exported: 0,
            prev: NIL,
            next: NIL,
            linked: false,
            seen_time: i64::MIN,
        }
    }
}

/// The keys `max_keys_per_query` evicted or refused since the last report. One report per
/// query per hand-off of the output (with the count and the first keys), not one item per key:
/// a flood of new keys must not become a flood of error items.
#[derive(Default)]
struct KeyLimitReport {
    evicted: u64,
    refused: u64,
    /// The first keys evicted or refused (at most [`KeyLimitReport::LISTED`]).
    keys: Vec<Key>,
}

impl KeyLimitReport {
    const LISTED: usize = 10;

    fn note(&mut self, key: &Key) {
        if self.keys.len() < Self::LISTED {
            self.keys.push(key.clone());
        }
    }

    /// `{"error":…,"function":"on_event","evicted"|"refused":N,"keys":[…]}` on
    /// `<query>.errors`, when there is anything to report.
    fn report(&mut self, topics: &QueryTopics, limit: usize, out: &mut Vec<Emitted>) {
        let (count, field, message) = if self.evicted > 0 {
            (
                self.evicted,
                "evicted",
                format!(
                    "{} least recently seen key(s) evicted, their state and timers dropped: the \
                     query holds {limit} keys on this shard, its share of the limit \
                     (max_keys_per_query), and on_key_limit is \"evict\"",
                    self.evicted
                ),
            )
        } else if self.refused > 0 {
            (
                self.refused,
                "refused",
                format!(
                    "{} event(s) of new keys not handled: the query holds {limit} keys on this \
                     shard, its share of the limit (max_keys_per_query), and on_key_limit is \
                     \"reject\"",
                    self.refused
                ),
            )
        } else {
            return;
        };
        let mut value = Vec::with_capacity(256);
        value.extend_from_slice(b"{\"error\":");
        crate::json::write_str(&mut value, &message);
        value.extend_from_slice(b",\"function\":\"on_event\",\"");
        value.extend_from_slice(field.as_bytes());
        value.extend_from_slice(b"\":");
        crate::json::write_int(&mut value, count as i64);
        value.extend_from_slice(b",\"keys\":[");
        for (i, key) in self.keys.iter().enumerate() {
            if i > 0 {
                value.push(b',');
            }
            key.write_json(&mut value);
        }
        value.extend_from_slice(b"]}");
        out.push(Emitted {
            topic: Arc::clone(&topics.errors),
            key: Key::None,
            value,
        });
        *self = KeyLimitReport::default();
    }
}

/// A query's key states on one shard, in an index map so that a checkpoint can walk them a few
/// keys at a time.
type States = IndexMap<Key, KeyState, foldhash::fast::RandomState>;

/// No key, in the links of [`Recency`].
const NIL: usize = usize::MAX;

/// The order in which a query's keys were last seen, for `max_keys_per_query` (the least
/// recently seen key is the one evicted) and `key_ttl` (keys are forgotten from the oldest on).
///
/// A doubly linked list through the key states themselves ([`KeyState::prev`] and
/// [`KeyState::next`] are indexes into the query's index map), from the least recently seen key
/// (`head`) to the most recent (`tail`). Seeing a key moves it to the tail by index, with no
/// hashing and no allocation; removing a key fixes the links of the key that
/// `swap_remove_index` moves into its place ([`Recency::remove`]).
struct Recency {
    head: usize,
    tail: usize,
}

impl Default for Recency {
    fn default() -> Self {
        Recency {
            head: NIL,
            tail: NIL,
        }
    }
}

impl Recency {
    /// The key at `index` was just seen, at event time `time`. (In line: it is on every
    /// event's path, and where the compiler splits the crate decides whether it is inlined.)
    #[inline]
    fn touch(&mut self, states: &mut States, index: usize, time: i64) {
        let entry = &mut states[index];
        entry.seen_time = entry.seen_time.max(time);
        if self.tail == index {
            return;
        }
        if entry.linked {
            self.unlink(states, index);
        }
        let tail = self.tail;
        let entry = &mut states[index];
        entry.prev = tail;
        entry.next = NIL;
        entry.linked = true;
        match tail {
            NIL => self.head = index,
            t => states[t].next = index,
        }
        self.tail = index;
    }

    /// `key` was just seen, at event time `time` (nothing if it has no state).
    fn touch_key(&mut self, states: &mut States, key: &Key, time: i64) {
        if let Some(index) = states.get_index_of(key) {
            self.touch(states, index, time);
        }
    }

    fn unlink(&mut self, states: &mut States, index: usize) {
        let entry = &mut states[index];
        let (prev, next) = (entry.prev, entry.next);
        entry.linked = false;
        entry.prev = NIL;
        entry.next = NIL;
        match prev {
            NIL => self.head = next,
            p => states[p].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => states[n].prev = prev,
        }
    }

    /// Before `states.swap_remove_index(index)`: takes the key out of the list, and points the
    /// links of the last key, which is about to move to `index`, there.
    fn remove(&mut self, states: &mut States, index: usize) {
        if states[index].linked {
            self.unlink(states, index);
        }
        let last = states.len() - 1;
        if last == index || !states[last].linked {
            return;
        }
        let (prev, next) = (states[last].prev, states[last].next);
        match prev {
            NIL => self.head = index,
            p => states[p].next = index,
        }
        match next {
            NIL => self.tail = index,
            n => states[n].prev = index,
        }
    }

    /// The least recently seen key still held.
    fn oldest<'a>(&self, states: &'a States) -> Option<&'a Key> {
        match self.head {
            NIL => None,
            h => states.get_index(h).map(|(k, _)| k),
        }
    }
}

/// States smaller than this are measured after every call.
const MEASURE_EVERY_CALL_BYTES: usize = 4096;

/// Most calls between two measurements of a large state.
const MAX_MEASURE_INTERVAL: u32 = 256;

/// The shard's script time in the current CPU window.
struct CpuClock {
    started: Instant,
    total: Duration,
    /// Counts windows, so that each query knows whether its own count is current.
    window: u64,
}

/// A query's script time on this shard in window `window`.
#[derive(Default)]
struct CpuUse {
    window: u64,
    used: Duration,
}

struct QueryRuntime {
    id: QueryId,
    def: Arc<QueryDef>,
    control: Arc<QueryControl>,
    cpu: CpuUse,
    ast: AST,
    /// The top-level constants its functions name where Rhai cannot put their values (see
    /// [`Shard::script`]).
    constants: Option<Constants>,
    /// The query compiled to closures, when all of it could be (see [`crate::compiled`]).
    compiled: Option<Compiled>,
    topics: Rc<QueryTopics>,
    /// In an index map, so that a checkpoint can walk it a few keys at a time.
    states: States,
    /// The order in which `states` were last seen (eviction and `key_ttl`).
    recency: Recency,
    /// Keys evicted or refused since the output was last taken, reported then.
    key_limit: KeyLimitReport,
    /// Late and error items since the output was last taken (`max_report_bytes`).
    reports: ReportBudget,
    timers: BTreeSet<(i64, Key)>,
    /// Timers an `on_timer(T)` set for a time at or before `T`: they wait for the next advance.
    deferred: Vec<(i64, Key)>,
    /// The time of the timer whose `on_timer` is running.
    firing: Option<i64>,
    watermark: i64,
    stats: QueryStats,
    /// Time per script call in ns, when the shard measures it.
    eval_ns: Option<hdrhistogram::Histogram<u64>>,
    /// The checkpoint copying this query's keys, while one is (see [`Shard::begin_export`]).
    export: Option<Export>,
}

impl QueryRuntime {
    /// Whether a timer is waiting to fire or to be moved at the watermark.
    #[inline]
    fn timers_due(&self) -> bool {
        !self.deferred.is_empty()
            || self
                .timers
                .first()
                .is_some_and(|(t, _)| *t <= self.watermark)
    }
}

/// A checkpoint's copy of one query on one shard, made a few keys at a time: the keys that
/// existed when it began, each copied before anything changes it.
struct Export {
    epoch: u64,
    /// Keys at indexes below this existed when the copy began (or moved there since).
    bound: usize,
    /// The next index to copy.
    next: usize,
    out: ShardQueryCheckpoint,
}

/// The runtime of the queries for the keys one shard owns.
pub struct Shard {
    engine: Engine,
    ctx: Rc<RefCell<CallCtx>>,
    scope: Scope<'static>,
    queries: Vec<QueryRuntime>,
    limits: Limits,
    timing: bool,
    budget: Option<CpuBudget>,
    clock: CpuClock,
    /// Field names with a property getter on the event type (see [`Shard::deploy`]).
    getters: std::collections::HashSet<String>,
    /// Counts checkpoints begun.
    export_epoch: u64,
    /// Whether queries are compiled when deployed.
    mode: EngineMode,
    /// The constants of the scripts deployed here, by the tag of their calls, for the engine's
    /// variable resolver (registered with the first).
    constants: ConstantTable,
    /// The tag of the next script with constants.
    next_tag: INT,
}

/// The constants of a shard's scripts by the tag of their calls (weak: a script that is gone
/// leaves a dead entry, dropped at the next insert).
type ConstantTable = Rc<RefCell<Vec<(INT, Weak<query::Constants>)>>>;

/// The top-level constants a script's functions name where Rhai's constant propagation left the
/// name (see [`query::compile`]), and the tag its calls carry so that the resolver finds them.
struct Constants {
    tag: INT,
    /// Held for as long as the script runs; the shard's table holds a weak reference.
    values: Rc<query::Constants>,
}

impl Constants {
    /// The options of a call of the script: its tag when it has constants.
    fn options<'a>(this: &Option<Constants>) -> CallFnOptions<'a> {
        let options = CallFnOptions::new().eval_ast(false).rewind_scope(true);
        match this {
            Some(c) => options.with_tag(c.tag),
            None => options,
        }
    }
}

/// Most event field getters one shard registers; past this, fields are read through the
/// (slower) indexer fallback, with the same result.
const MAX_GETTERS: usize = 4096;

impl Shard {
    pub fn new(limits: &Limits) -> Self {
        let mut engine = sandbox::new_engine(limits);
        let ctx = Rc::new(RefCell::new(CallCtx::new(limits)));
        builtins::register(&mut engine, &ctx);
        Shard {
            engine,
            ctx,
            scope: Scope::new(),
            queries: Vec::new(),
            limits: limits.clone(),
            timing: false,
            budget: None,
            clock: CpuClock {
                started: Instant::now(),
                total: Duration::ZERO,
                window: 1,
            },
            getters: std::collections::HashSet::new(),
            export_epoch: 0,
            mode: EngineMode::Auto,
            constants: Rc::default(),
            next_tag: 0,
        }
    }

    /// Compiles a query's script for this shard. The constants its functions name where Rhai
    /// cannot put their values are read, on a call with the script's tag, by a variable resolver
    /// registered with the first script that has any. (The resolver runs before every variable
    /// read of the interpreter: a shard without such a script does not pay for it.)
    fn script(&mut self, def: &QueryDef) -> Result<(AST, Option<Constants>), QueryError> {
        let (ast, values) = query::compile(&self.engine, &def.name, &def.script, &self.limits)?;
        if values.is_empty() {
            return Ok((ast, None));
        }
        if self.next_tag == 0 {
            let table = Rc::clone(&self.constants);
            // Marked volatile by Rhai (its signature may change), not deprecated.
            #[allow(deprecated)]
            self.engine.on_var(move |name, index, context| {
                // A variable of the function (index > 0), or a call without constants.
                if index > 0 {
                    return Ok(None);
                }
                let Ok(tag) = context.tag().as_int() else {
                    return Ok(None);
                };
                let table = table.borrow();
                let Some(values) = table.iter().find(|(t, _)| *t == tag) else {
                    return Ok(None);
                };
                Ok(values.1.upgrade().and_then(|values| {
                    values
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, v)| v.clone())
                }))
            });
        }
        self.next_tag += 1;
        let values = Rc::new(values);
        let mut table = self.constants.borrow_mut();
        table.retain(|(_, v)| v.strong_count() > 0);
        table.push((self.next_tag, Rc::downgrade(&values)));
        Ok((
            ast,
            Some(Constants {
                tag: self.next_tag,
                values,
            }),
        ))
    }

    /// Which engine runs the queries deployed from now on (`auto`: compiled where possible).
    pub fn set_engine(&mut self, mode: EngineMode) {
        self.mode = mode;
    }

    /// Whether query `id` runs compiled on this shard.
    pub fn is_compiled(&self, id: QueryId) -> bool {
        self.queries
            .iter()
            .any(|q| q.id == id && q.compiled.is_some())
    }

    /// Measure the time of every script call (two clock reads per call), for
    /// [`Shard::eval_histogram`].
    pub fn measure_calls(&mut self, on: bool) {
        self.timing = on;
    }

    /// Quarantine a query that takes more script time than `budget` allows (see the module
    /// documentation). Measures every call.
    pub fn set_cpu_budget(&mut self, budget: Option<CpuBudget>) {
        self.budget = budget;
    }

    /// Time per script call of a query, in ns, when measured.
    pub fn eval_histogram(&self, id: QueryId) -> Option<&hdrhistogram::Histogram<u64>> {
        let q = self.queries.iter().find(|q| q.id == id)?;
        q.eval_ns.as_ref()
    }

    /// Compiles `def` with this shard's engine and starts it with no state, beside any other
    /// deployment (an older version of the same query keeps running until it is removed).
    ///
    /// `ev.price` on an event works without help, through Rhai's indexer fallback, but a
    /// property getter per field name is found first and is faster (see `benches/script.rs`,
    /// `call_path`): so every `.name` the script mentions gets one, once per shard.
    pub fn deploy(&mut self, id: QueryId, def: Arc<QueryDef>) -> Result<(), QueryError> {
        self.deploy_controlled(id, def, Arc::default())
    }

    /// [`Shard::deploy`], with the switches the catalog holds for the deployment.
    pub fn deploy_controlled(
        &mut self,
        id: QueryId,
        def: Arc<QueryDef>,
        control: Arc<QueryControl>,
    ) -> Result<(), QueryError> {
        let (ast, constants) = self.script(&def)?;
        let compiled = match self.mode {
            EngineMode::Auto => {
                let values = constants.as_ref().map_or(&[][..], |c| &c.values[..]);
                compiled::compile(&self.engine, &ast, def.functions.init, values).0
            }
            EngineMode::Interpreter => None,
        };
        self.register_getters(&def.script);
        self.queries.push(QueryRuntime {
            id,
            control,
            cpu: CpuUse::default(),
            topics: Rc::new(QueryTopics::new(&def.name)),
            def,
            ast,
            constants,
            compiled,
            states: IndexMap::default(),
            recency: Recency::default(),
            key_limit: KeyLimitReport::default(),
            reports: ReportBudget::default(),
            timers: BTreeSet::new(),
            deferred: Vec::new(),
            firing: None,
            watermark: i64::MIN,
            stats: QueryStats::default(),
            eval_ns: self.timing.then(latency_histogram),
            export: None,
        });
        Ok(())
    }

    /// Registers a property getter on the event type for each field name the script reads.
    fn register_getters(&mut self, script: &str) {
        for field in property_names(script) {
            if self.getters.len() >= MAX_GETTERS || self.getters.contains(field) {
                continue;
            }
            let name = field.to_owned();
            self.engine
                .register_get(field, move |ev: &mut Event| ev.get(&name));
            self.getters.insert(field.to_owned());
        }
    }

    /// Drops a query and all its state, and gives the memory it held back to the system (the
    /// allocator would otherwise keep it for this thread's next allocations).
    pub fn remove(&mut self, id: QueryId) {
        let before = self.queries.len();
        self.queries.retain(|q| q.id != id);
        if self.queries.len() < before {
            collect_memory();
        }
    }

    /// Counters of a query on this shard.
    pub fn stats(&self, id: QueryId) -> Option<QueryStats> {
        self.queries
            .iter()
            .find(|q| q.id == id)
            .map(|q| QueryStats {
                keys: q.states.len() as u64,
                ..q.stats
            })
    }

    /// Whether query `id` is quarantined.
    pub fn is_quarantined(&self, id: QueryId) -> bool {
        self.queries
            .iter()
            .any(|q| q.id == id && q.control.is_quarantined())
    }

    /// Adds an item made outside the scripts (a late event) to the output, after what the
    /// scripts emitted so far.
    pub fn publish(&mut self, item: Emitted) {
        self.ctx.borrow_mut().out.push(item);
    }

    /// Whether [`Shard::take_output`] has anything to hand out (or a report batch to close):
    /// checked in line after every event, so that the common case (nothing emitted) costs a
    /// few comparisons, not a call.
    #[inline]
    pub fn has_output(&self) -> bool {
        !self.ctx.borrow().out.is_empty()
            || self.queries.iter().any(|q| {
                q.key_limit.evicted + q.key_limit.refused > 0
                    || q.reports.late + q.reports.errors + q.reports.bytes as u64 > 0
            })
    }

    /// Takes back the buffers of items written out (see [`Shard::take_output`]): `items` is
    /// left empty, and the next items' values are written into their buffers.
    pub fn recycle(&mut self, items: &mut Vec<Emitted>) {
        self.ctx
            .borrow_mut()
            .recycle(items.drain(..).map(|item| item.value));
    }

    /// Moves everything emitted since the last call into `out`, ending with a report per query
    /// of the keys `max_keys_per_query` evicted or refused meanwhile.
    pub fn take_output(&mut self, out: &mut Vec<Emitted>) {
        let mut ctx = self.ctx.borrow_mut();
        if out.is_empty() && out.capacity() >= ctx.out.len() {
            // The buffers trade places: nothing is copied, and the context gets one with room
            // for as many items (`eddy run` hands the same one back every time).
            std::mem::swap(out, &mut ctx.out);
        } else {
            out.append(&mut ctx.out);
        }
        for q in &mut self.queries {
            if q.key_limit.evicted + q.key_limit.refused > 0 {
                q.key_limit
                    .report(&q.topics, self.limits.max_keys_per_query, out);
            }
            if q.reports.late + q.reports.errors + q.reports.bytes as u64 > 0 {
                q.reports
                    .report(&q.topics, self.limits.max_report_bytes, out);
            }
        }
    }

    /// The runtime of query `id` and the parts of the shard a script call needs.
    fn query(&mut self, id: QueryId) -> Option<(&mut QueryRuntime, Call<'_>)> {
        // Only the CPU budget needs to know how many queries share the shard.
        let queries = match self.budget {
            Some(_) => self
                .queries
                .iter()
                .filter(|q| !q.control.is_removed() && !q.control.is_quarantined())
                .count(),
            None => 0,
        };
        let q = self.queries.iter_mut().find(|q| q.id == id)?;
        let call = Call {
            engine: &self.engine,
            scope: &mut self.scope,
            ctx: &self.ctx,
            limits: &self.limits,
            budget: self.budget,
            clock: &mut self.clock,
            queries,
        };
        Some((q, call))
    }

    /// Raises the watermark of a query; when it rises, the timers it reaches fire.
    pub fn advance(&mut self, id: QueryId, watermark: i64, now: i64) {
        let Some((q, mut call)) = self.query(id) else {
            return;
        };
        if q.control.is_removed() || watermark <= q.watermark {
            return;
        }
        export_due(q, watermark);
        q.watermark = watermark;
        call.fire_timers(q, now);
        call.expire_keys(q);
    }

    /// Raises every query's watermark to the end of time, firing every pending timer: the end
    /// of a finite input. This is the last advance: timers an `on_timer(T)` sets for `T` or
    /// earlier then never fire.
    pub fn finish(&mut self, now: i64) {
        let ids: Vec<QueryId> = self.queries.iter().map(|q| q.id).collect();
        for id in ids {
            self.advance(id, i64::MAX, now);
        }
    }

    /// Prepares replacing the script of query `id` with `def` while keeping every key's state:
    /// compiles it, and passes each key's state through its `fn migrate(old)` if it has one.
    /// Nothing changes until [`Shard::commit_replace`]; an error names the key that failed.
    pub fn prepare_replace(
        &mut self,
        id: QueryId,
        def: Arc<QueryDef>,
    ) -> Result<Migration, String> {
        let (ast, constants) = self.script(&def).map_err(|e| e.to_string())?;
        self.register_getters(&def.script);
        let q = self
            .queries
            .iter()
            .find(|q| q.id == id)
            .ok_or("the query is not running on this shard")?;
        let migrate = ast
            .iter_functions()
            .any(|f| f.name == "migrate" && f.params.len() == 1);
        let old_layout = q.compiled.as_ref().map(|c| Rc::clone(&c.layout));
        let mut maps = Vec::with_capacity(q.states.len());
        let mut migrated = 0;
        for (key, entry) in &q.states {
            let old = entry.state.to_dynamic(old_layout.as_deref());
            let new = if migrate {
                // Built-ins (emit, set_timer, forget) refuse to work outside an event or timer
                // call.
                migrated += 1;
                self.engine
                    .call_fn_with_options::<Dynamic>(
                        Constants::options(&constants),
                        &mut self.scope,
                        &ast,
                        "migrate",
                        (old,),
                    )
                    .map_err(|e| format!("migrate failed for key {key}: {}", error_message(&e)))?
            } else {
                old
            };
            maps.push((key.clone(), new));
        }
        // The new script's slots, if it compiles and every state fits them; otherwise it runs
        // on the interpreter, with the states as maps.
        let mut compiled = match self.mode {
            EngineMode::Auto => {
                let values = constants.as_ref().map_or(&[][..], |c| &c.values[..]);
                compiled::compile(&self.engine, &ast, def.functions.init, values).0
            }
            EngineMode::Interpreter => None,
        };
        let layout = compiled.as_ref().map(|c| Rc::clone(&c.layout));
        let fitted: Option<Vec<(Key, State)>> = maps
            .iter()
            .map(|(k, v)| {
                Some((
                    k.clone(),
                    State::from_dynamic(v.clone(), layout.as_deref()).ok()?,
                ))
            })
            .collect();
        let states = match fitted {
            Some(states) => states,
            None => {
                compiled = None;
                maps.into_iter().map(|(k, v)| (k, State::Map(v))).collect()
            }
        };
        Ok(Migration {
            ast,
            constants,
            def,
            compiled,
            states,
            migrated,
        })
    }

    /// Puts a prepared replacement in place (see [`Shard::prepare_replace`]).
    pub fn commit_replace(&mut self, id: QueryId, m: Migration) {
        let Some(q) = self.queries.iter_mut().find(|q| q.id == id) else {
            return;
        };
        // A checkpoint in progress copies the states as they were before.
        let pending: Vec<Key> = match &q.export {
            Some(e) => q
                .states
                .keys()
                .skip(e.next)
                .take(e.bound.saturating_sub(e.next))
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        for key in pending {
            export_key(q, &key);
        }
        q.ast = m.ast;
        q.constants = m.constants;
        q.def = m.def;
        q.compiled = m.compiled;
        for (key, state) in m.states {
            if let Some(entry) = q.states.get_mut(&key) {
                entry.state = state;
                entry.unmeasured = 0;
            }
        }
    }

    /// Begins copying what this shard holds of queries `ids` for a checkpoint, as of now: the
    /// watermark and deferred timers at once, the keys a few at a time ([`Shard::export_step`]),
    /// each copied before an event or timer changes it, so that the copy is the state at this
    /// point while the shard goes on. Queries it does not run are left out.
    pub fn begin_export(&mut self, ids: &[QueryId]) {
        self.export_epoch += 1;
        let epoch = self.export_epoch;
        for q in self.queries.iter_mut().filter(|q| ids.contains(&q.id)) {
            q.export = Some(Export {
                epoch,
                bound: q.states.len(),
                next: 0,
                out: ShardQueryCheckpoint {
                    watermark: q.watermark,
                    // Reserved now: growing it while copying would move it all at once.
                    keys: Vec::with_capacity(q.states.len()),
                    deferred: q.deferred.iter().map(|(t, k)| (*t, k.into())).collect(),
                },
            });
        }
    }

    /// Copies up to `budget` more keys of the export in progress. Returns the copies once every
    /// key is copied (and the export is over), `None` while keys remain.
    pub fn export_step(&mut self, budget: usize) -> Option<Vec<(QueryId, ShardQueryCheckpoint)>> {
        let mut left = budget;
        for q in &mut self.queries {
            while left > 0 {
                let Some(export) = q.export.as_mut() else {
                    break;
                };
                if export.next >= export.bound.min(q.states.len()) {
                    break;
                }
                let key = q.states.get_index(export.next).expect("in range").0.clone();
                export.next += 1;
                left -= 1;
                export_key(q, &key);
            }
            if q.export
                .as_ref()
                .is_some_and(|e| e.next < e.bound.min(q.states.len()))
            {
                return None;
            }
        }
        Some(
            self.queries
                .iter_mut()
                .filter_map(|q| Some((q.id, q.export.take()?.out)))
                .collect(),
        )
    }

    /// A copy of what this shard holds of query `id`, all at once (tests and small states).
    pub fn export(&mut self, id: QueryId) -> Option<ShardQueryCheckpoint> {
        self.begin_export(&[id]);
        loop {
            if let Some(mut done) = self.export_step(usize::MAX) {
                return done.pop().map(|(_, c)| c);
            }
        }
    }

    /// Drops every key of every query for which `drop` holds, with its timers (cluster mode: the
    /// keys of a partition handed over to another node). Returns the keys dropped.
    pub fn drop_keys(&mut self, drop: impl Fn(&Key) -> bool) -> usize {
        let mut dropped = 0;
        for q in &mut self.queries {
            let keys: Vec<Key> = q.states.keys().filter(|k| drop(k)).cloned().collect();
            for key in &keys {
                drop_key(q, key);
            }
            dropped += keys.len();
        }
        dropped
    }

    /// Puts back what [`Shard::export`] copied, into query `id` (deployed, and given no event
    /// yet). Returns the keys restored.
    pub fn import(&mut self, id: QueryId, data: ShardQueryCheckpoint) -> usize {
        let Some(q) = self.queries.iter_mut().find(|q| q.id == id) else {
            return 0;
        };
        q.watermark = q.watermark.max(data.watermark);
        let deferred: std::collections::HashSet<(i64, Key)> = data
            .deferred
            .into_iter()
            .map(|(t, k)| (t, Key::from(k)))
            .collect();
        let restored = data.keys.len();
        let layout = q.compiled.as_ref().map(|c| Rc::clone(&c.layout));
        let mut keys = data.keys;
        // Least recently seen first, so that eviction and `key_ttl` go on in the same order.
        keys.sort_by_key(|k| k.seen_time);
        for k in keys {
            let key = Key::from(k.key);
            for &t in &k.timers {
                if deferred.contains(&(t, key.clone())) {
                    q.deferred.push((t, key.clone()));
                } else {
                    q.timers.insert((t, key.clone()));
                }
            }
            let value = k.state.into_dynamic();
            let state = match State::from_dynamic(value.clone(), layout.as_deref()) {
                Ok(state) => state,
                Err(e) => {
                    // The same script makes the same slots; this would be a bug, not lost data.
                    tracing::warn!("checkpoint: key {key} of {} kept as a map: {e}", q.def.name);
                    State::Map(value)
                }
            };
            let mut entry = KeyState::new(state);
            entry.timers = k.timers;
            let (index, old) = q.states.insert_full(key.clone(), entry);
            if let Some(old) = old {
                // Held already: it keeps its place in the list until touched.
                let entry = &mut q.states[index];
                (entry.prev, entry.next, entry.linked) = (old.prev, old.next, old.linked);
            }
            q.recency.touch(&mut q.states, index, k.seen_time);
        }
        restored
    }

    /// Handles one delivery: late if its time is behind the watermark; otherwise the watermark
    /// moves to the delivery's, due timers fire, then the event is handled.
    pub fn event(&mut self, d: Delivery) {
        let Some((q, mut call)) = self.query(d.query) else {
            return;
        };
        if q.control.is_removed() {
            return;
        }
        if q.control.is_quarantined() {
            q.stats.skipped += 1;
            return;
        }
        let bar = q.watermark.max(d.source_mark);
        if q.def.config.time_field.is_some() && d.time < bar {
            q.stats.late += 1;
            let item = late_item(
                q,
                d.key,
                &d.event,
                (d.time, bar),
                call.limits.max_emit_bytes,
            );
            if q.reports
                .admit(item.value.len(), call.limits.max_report_bytes)
            {
                call.ctx.borrow_mut().out.push(item);
            } else {
                q.reports.late += 1;
            }
            return;
        }
        // (Each step below is skipped in line when it has nothing to do: this runs per event.)
        if q.export.is_some() {
            export_key(q, &d.key);
        }
        if d.watermark > q.watermark {
            if q.export.is_some() {
                export_due(q, d.watermark);
            }
            q.watermark = d.watermark;
            if q.timers_due() {
                call.fire_timers(q, d.now);
            }
            if q.def.config.key_ttl_ms.is_some() {
                call.expire_keys(q);
            }
        }
        if d.source_mark > q.watermark {
            call.fire_key_timers(q, &d.key, d.source_mark, d.now);
        }
        q.stats.events += 1;
        call.on_event(q, d.key, d.event, d.time, d.now);
    }
}

/// An event behind the watermark, as an item for `<query>.late`. An event larger than
/// `max_emit_bytes` is not copied: the item says how large it was instead.
fn late_item(
    q: &QueryRuntime,
    key: Key,
    event: &Event,
    (time, watermark): (i64, i64),
    max_emit_bytes: usize,
) -> Emitted {
    let mut value = Vec::with_capacity(128);
    value.extend_from_slice(b"{\"event\":");
    event.write_json(&mut value);
    if value.len() > max_emit_bytes {
        let bytes = value.len() - b"{\"event\":".len();
        value.clear();
        value.extend_from_slice(b"{\"event\":null,\"event_bytes\":");
        crate::json::write_int(&mut value, bytes as i64);
        value.extend_from_slice(b",\"note\":\"not copied: larger than max_emit_bytes\"");
    }
    value.extend_from_slice(b",\"event_time\":");
    crate::json::write_int(&mut value, time);
    value.extend_from_slice(b",\"watermark\":");
    crate::json::write_int(&mut value, watermark);
    value.push(b'}');
    Emitted {
        topic: Arc::clone(&q.topics.late),
        key,
        value,
    }
}

/// The parts of a shard one script call needs, borrowed apart from the query it runs.
struct Call<'a> {
    engine: &'a Engine,
    scope: &'a mut Scope<'static>,
    ctx: &'a Rc<RefCell<CallCtx>>,
    limits: &'a Limits,
    budget: Option<CpuBudget>,
    clock: &'a mut CpuClock,
    /// Deployments running on the shard (neither removed nor quarantined).
    queries: usize,
}

/// How a call ended, for the shard to act on.
enum Outcome {
    Ok { timers: Vec<i64>, forget: bool },
    Failed,
}

impl Call<'_> {
    fn rt(&self) -> Rt<'_> {
        Rt {
            engine: self.engine,
            ctx: self.ctx,
            max_operations: self.limits.max_operations,
        }
    }

    fn on_event(&mut self, q: &mut QueryRuntime, key: Key, event: Event, time: i64, now: i64) {
        let index = match q.states.get_index_of(&Lookup(&key)) {
            Some(index) => index,
            None => match self.new_key(q, &key, now) {
                Some(index) => index,
                None => return,
            },
        };
        q.recency.touch(&mut q.states, index, time);
        self.run_at(q, index, key, "on_event", Arg::Event(event), now);
    }

    /// Makes the state of a new key (room for it, then `init`): its index, or `None` when it
    /// was refused or `init` failed.
    fn new_key(&mut self, q: &mut QueryRuntime, key: &Key, now: i64) -> Option<usize> {
        if q.states.len() >= self.limits.max_keys_per_query && !self.make_room(q, key) {
            return None;
        }
        let state = if q.def.functions.init {
            self.init(q, key, now)?
        } else if q.compiled.is_some() {
            State::Slots(Box::new([]))
        } else {
            State::Map(Dynamic::from_map(rhai::Map::new()))
        };
        let mut entry = KeyState::new(state);
        // Made after a checkpoint in progress began: not part of it.
        entry.exported = q.export.as_ref().map_or(0, |e| e.epoch);
        Some(q.states.insert_full(key.clone(), entry).0)
    }

    /// The query holds `max_keys_per_query` keys and `key` is new: evicts the least recently
    /// seen key, or refuses `key`, as the query's `on_key_limit` says; either way it is counted
    /// and reported on `<query>.errors`. Returns whether `key` may have a state.
    fn make_room(&mut self, q: &mut QueryRuntime, key: &Key) -> bool {
        let limit = self.limits.max_keys_per_query;
        match q.def.config.on_key_limit {
            OnKeyLimit::Reject => {
                q.stats.keys_refused += 1;
                q.key_limit.refused += 1;
                q.key_limit.note(key);
                false
            }
            OnKeyLimit::Evict => {
                while q.states.len() >= limit {
                    let Some(oldest) = q.recency.oldest(&q.states).cloned() else {
                        break;
                    };
                    drop_key(q, &oldest);
                    q.stats.keys_evicted += 1;
                    q.key_limit.evicted += 1;
                    q.key_limit.note(&oldest);
                }
                true
            }
        }
    }

    /// Forgets the keys not seen for the query's `key_ttl` behind its watermark, oldest first.
    /// A key with pending timers is kept until they have fired.
    fn expire_keys(&mut self, q: &mut QueryRuntime) {
        let Some(ttl) = q.def.config.key_ttl_ms else {
            return;
        };
        let horizon = q.watermark.saturating_sub(ttl);
        let mut budget = q.states.len();
        while budget > 0 {
            budget -= 1;
            let Some(key) = q.recency.oldest(&q.states) else {
                return;
            };
            let entry = &q.states[key];
            if entry.seen_time >= horizon {
                return;
            }
            let (key, waiting) = (key.clone(), !entry.timers.is_empty());
            if waiting {
                // Behind the others it may expire later, once its timers have fired.
                q.recency.touch_key(&mut q.states, &key, i64::MIN);
            } else {
                drop_key(q, &key);
                q.stats.keys_expired += 1;
            }
        }
    }

    /// The first state of `key`, from the query's `init(key)`; `None` when it failed.
    fn init(&mut self, q: &mut QueryRuntime, key: &Key, now: i64) -> Option<State> {
        self.begin(q, key, now);
        let result = match &q.compiled {
            Some(c) => c.init(&self.rt(), key.to_dynamic()),
            None => self
                .engine
                .call_fn_with_options::<Dynamic>(
                    Constants::options(&q.constants),
                    self.scope,
                    &q.ast,
                    "init",
                    (key.to_dynamic(),),
                )
                .map(State::Map),
        };
        let state = match result {
            Ok(state) => state,
            Err(e) => {
                self.end(q, key, "init", Err(e), None);
                return None;
            }
        };
        let (forget, timers) = {
            let ctx = self.ctx.borrow();
            (ctx.forget, !ctx.timers.is_empty())
        };
        if forget || timers {
            self.discard();
            let msg = "`set_timer` and `forget` cannot be called from init";
            self.publish_error(q, key, "init", msg, None);
            return None;
        }
        match self.end(q, key, "init", Ok(()), None) {
            Outcome::Ok { .. } => Some(state),
            Outcome::Failed => None,
        }
    }

    /// Calls `function(arg)` with `this` bound to the state of `key`, then applies what the call
    /// asked for.
    fn run(
        &mut self,
        q: &mut QueryRuntime,
        key: Key,
        function: &'static str,
        arg: Dynamic,
        now: i64,
    ) {
        let Some(index) = q.states.get_index_of(&key) else {
            return;
        };
        self.run_at(q, index, key, function, Arg::Value(arg), now);
    }

    /// [`Call::run`] of the key at `index` of the query's states.
    fn run_at(
        &mut self,
        q: &mut QueryRuntime,
        index: usize,
        key: Key,
        function: &'static str,
        arg: Arg,
        now: i64,
    ) {
        let entry = &mut q.states[index];
        self.begin_raw(&q.topics, q.def.functions.on_timer, &key, q.watermark, now);
        let started = (q.eval_ns.is_some() || self.budget.is_some()).then(Instant::now);
        let result = match (&q.compiled, &mut entry.state) {
            (Some(c), State::Slots(slots)) => {
                let rt = Rt {
                    engine: self.engine,
                    ctx: self.ctx,
                    max_operations: self.limits.max_operations,
                };
                c.call(&rt, function, slots, arg)
            }
            (_, State::Map(state)) => self
                .engine
                .call_fn_with_options::<Dynamic>(
                    Constants::options(&q.constants).bind_this_ptr(state),
                    self.scope,
                    &q.ast,
                    function,
                    (arg.into_dynamic(),),
                )
                .map(|_| ()),
            (None, State::Slots(_)) => unreachable!("slot states belong to compiled queries"),
        };
        let finished = started.map(|s| (s, Instant::now()));
        let size = match &result {
            Ok(_) if entry.unmeasured == 0 => {
                let size = entry.state.bytes(q.compiled.as_ref().map(|c| &*c.layout));
                entry.unmeasured = measure_interval(size, self.limits.max_state_bytes);
                Some(size).filter(|&n| n > self.limits.max_state_bytes)
            }
            Ok(_) => {
                entry.unmeasured -= 1;
                None
            }
            Err(_) => None,
        };
        match self.end(q, &key, function, result, size) {
            Outcome::Failed => {
                if size.is_some() {
                    drop_key(q, &key);
                }
            }
            Outcome::Ok { timers, forget } => {
                if forget {
                    drop_key(q, &key);
                } else if !timers.is_empty() {
                    self.set_timers(q, &key, function, timers);
                }
            }
        }
        if let Some((started, finished)) = finished {
            self.account(q, &key, function, finished, finished - started);
        }
    }

    fn set_timers(&mut self, q: &mut QueryRuntime, key: &Key, function: &str, timers: Vec<i64>) {
        let Some(entry) = q.states.get_mut(key) else {
            return;
        };
        for t in timers {
            if entry.timers.contains(&t) {
                continue;
            }
            if entry.timers.len() >= self.limits.max_timers_per_key {
                let msg = format!(
                    "key {key} has {} pending timers, the limit (max_timers_per_key)",
                    entry.timers.len()
                );
                self.publish_error(q, key, function, &msg, None);
                break;
            }
            entry.timers.push(t);
            if q.firing.is_some_and(|now_firing| t <= now_firing) {
                q.deferred.push((t, key.clone()));
            } else {
                q.timers.insert((t, key.clone()));
            }
        }
    }

    /// Records the script time of one call; quarantines the query past its budget: more than
    /// `share` of the window's wall time, and more than `share` of all the script time the
    /// shard spent in it, while other queries run on the shard. (A query running alone on its
    /// shard is never quarantined: it slows nobody but its own producers, through backpressure.)
    fn account(
        &mut self,
        q: &mut QueryRuntime,
        key: &Key,
        function: &str,
        now: Instant,
        elapsed: Duration,
    ) {
        q.stats.cpu_us += elapsed.as_micros() as u64;
        if let Some(hist) = q.eval_ns.as_mut() {
            hist.saturating_record(elapsed.as_nanos() as u64);
        }
        let Some(budget) = self.budget else { return };
        let clock = &mut *self.clock;
        if now.duration_since(clock.started) >= budget.window {
            clock.started = now;
            clock.total = Duration::ZERO;
            clock.window += 1;
        }
        clock.total += elapsed;
        if q.cpu.window != clock.window {
            q.cpu = CpuUse {
                window: clock.window,
                used: Duration::ZERO,
            };
        }
        q.cpu.used += elapsed;
        let used = q.cpu.used;
        if self.queries < 2
            || used <= budget.window.mul_f64(budget.share)
            || used <= clock.total.mul_f64(budget.share)
        {
            return;
        }
        let total = clock.total;
        if q.control.quarantine() {
            let msg = format!(
                "query quarantined: its script took {} ms of the last {} ms on one shard ({:.0}% \
                 of the shard's script time), over its share (max_query_cpu = {}% per \
                 query_cpu_window); its events are counted and skipped until an admin resumes it \
                 (POST /queries/{}/resume)",
                used.as_millis(),
                budget.window.as_millis(),
                100.0 * used.as_secs_f64() / total.as_secs_f64(),
                budget.share * 100.0,
                q.def.name
            );
            tracing::warn!("{msg}");
            self.publish_error(q, key, function, &msg, None);
        }
    }

    /// Fires the timers the watermark reached, in (time, key) order, at most
    /// `max_timers_per_advance` (the rest wait for the next advance). Timers an `on_timer(T)` sets
    /// for `T` or earlier wait for the next advance too, so a timer that sets itself again does
    /// not loop.
    fn fire_timers(&mut self, q: &mut QueryRuntime, now: i64) {
        // Most advances reach no timer: nothing to move or fire.
        if !q.timers_due() {
            return;
        }
        for timer in q.deferred.drain(..) {
            q.timers.insert(timer);
        }
        let mut fired = 0;
        while let Some((t, _)) = q.timers.first() {
            if *t > q.watermark {
                break;
            }
            if q.control.is_removed() || q.control.is_quarantined() {
                return;
            }
            if fired >= self.limits.max_timers_per_advance {
                let left = q
                    .timers
                    .iter()
                    .take_while(|(t, _)| *t <= q.watermark)
                    .count();
                q.stats.timers_deferred += left as u64;
                return;
            }
            let (t, key) = q.timers.pop_first().expect("checked non-empty");
            if let Some(entry) = q.states.get_mut(&key) {
                entry.timers.retain(|&x| x != t);
                q.stats.timers_fired += 1;
                fired += 1;
                q.firing = Some(t);
                self.run(q, key, "on_timer", Dynamic::from_int(t), now);
                q.firing = None;
            }
        }
    }

    /// Fires the timers of `key` alone up to `mark` (its own source's mark, ahead of the
    /// input's), in time order, with the same rules as [`Call::fire_timers`].
    fn fire_key_timers(&mut self, q: &mut QueryRuntime, key: &Key, mark: i64, now: i64) {
        let mut fired = 0;
        loop {
            let Some(entry) = q.states.get_mut(key) else {
                return;
            };
            let Some(t) = entry.timers.iter().copied().filter(|&t| t <= mark).min() else {
                return;
            };
            if !q.timers.contains(&(t, key.clone())) {
                // Deferred by an on_timer at or after it: it waits for the next advance.
                return;
            }
            if fired >= self.limits.max_timers_per_advance
                || q.control.is_removed()
                || q.control.is_quarantined()
            {
                return;
            }
            q.timers.remove(&(t, key.clone()));
            entry.timers.retain(|&x| x != t);
            q.stats.timers_fired += 1;
            fired += 1;
            q.firing = Some(t);
            self.run(q, key.clone(), "on_timer", Dynamic::from_int(t), now);
            q.firing = None;
        }
    }

    fn begin(&mut self, q: &QueryRuntime, key: &Key, now: i64) {
        self.begin_raw(&q.topics, q.def.functions.on_timer, key, q.watermark, now);
    }

    #[inline(always)]
    fn begin_raw(
        &mut self,
        topics: &Rc<QueryTopics>,
        on_timer: bool,
        key: &Key,
        wm: i64,
        now: i64,
    ) {
        eddy_plugins::set_call_budget(self.limits.max_state_bytes);
        let mut ctx = self.ctx.borrow_mut();
        ctx.active = true;
        if !ctx.topics.as_ref().is_some_and(|t| Rc::ptr_eq(t, topics)) {
            ctx.topics = Some(Rc::clone(topics));
        }
        // Copied rather than compared first: a short key is three words, and a long one is
        // written into the buffer the last long key left (no allocation when it fits).
        match (&mut ctx.key, key) {
            (Key::Str(held), Key::Str(s)) => held.clone_from(s),
            (held, key) => *held = key.clone(),
        }
        ctx.now = now;
        ctx.watermark = wm;
        ctx.has_on_timer = on_timer;
        ctx.timers.clear();
        ctx.forget = false;
        ctx.emit_mark = ctx.out.len();
    }

    /// Closes the call: on failure (a script error, or a state grown past its limit) drops what
    /// the call emitted and publishes the error.
    ///
    /// (In line, as is [`Call::begin_raw`]: both are on every event's path; the failures are
    /// out of line, in [`Call::end_failed`].)
    #[inline]
    fn end(
        &mut self,
        q: &mut QueryRuntime,
        key: &Key,
        function: &str,
        result: Result<(), Box<EvalAltResult>>,
        oversized: Option<usize>,
    ) -> Outcome {
        let failure = match (result, oversized) {
            (Ok(()), None) => {
                let mut ctx = self.ctx.borrow_mut();
                ctx.active = false;
                q.stats.emitted += (ctx.out.len() - ctx.emit_mark) as u64;
                return Outcome::Ok {
                    timers: std::mem::take(&mut ctx.timers),
                    forget: ctx.forget,
                };
            }
            (Ok(()), Some(size)) => Ok(size),
            (Err(e), _) => Err(e),
        };
        self.end_failed(q, key, function, failure)
    }

    /// [`Call::end`] of a call that failed: with `Err`, a script error; with `Ok`, the size
    /// the key's state grew to, over `max_state_bytes`.
    #[cold]
    #[inline(never)]
    fn end_failed(
        &mut self,
        q: &mut QueryRuntime,
        key: &Key,
        function: &str,
        failure: Result<usize, Box<EvalAltResult>>,
    ) -> Outcome {
        let mut ctx = self.ctx.borrow_mut();
        ctx.active = false;
        let mark = ctx.emit_mark;
        match failure {
            Ok(size) => {
                ctx.out.truncate(mark);
                drop(ctx);
                let msg = format!(
                    "state of key {key} grew to about {size} bytes, over the limit of {} (max_state_bytes); the key's state was dropped",
                    self.limits.max_state_bytes
                );
                self.publish_error(q, key, function, &msg, None);
                Outcome::Failed
            }
            Err(e) => {
                ctx.out.truncate(mark);
                drop(ctx);
                self.fail(q, key, function, &e);
                Outcome::Failed
            }
        }
    }

    /// Ends the call in progress and drops what it emitted.
    fn discard(&mut self) {
        let mut ctx = self.ctx.borrow_mut();
        ctx.active = false;
        let mark = ctx.emit_mark;
        ctx.out.truncate(mark);
    }

    fn fail(&mut self, q: &mut QueryRuntime, key: &Key, function: &str, e: &EvalAltResult) {
        self.discard();
        let message = error_message(e);
        self.publish_error(q, key, function, &message, Some(e));
    }

    fn publish_error(
        &mut self,
        q: &mut QueryRuntime,
        key: &Key,
        function: &str,
        message: &str,
        e: Option<&EvalAltResult>,
    ) {
        q.stats.errors += 1;
        let mut value = Vec::with_capacity(128);
        value.extend_from_slice(b"{\"error\":");
        crate::json::write_str(&mut value, message);
        value.extend_from_slice(b",\"function\":");
        crate::json::write_str(&mut value, function);
        if let Some(e) = e {
            let (line, column) = query::line_column(innermost(e).position());
            if let (Some(line), Some(column)) = (line, column) {
                value.extend_from_slice(b",\"line\":");
                crate::json::write_int(&mut value, line as i64);
                value.extend_from_slice(b",\"column\":");
                crate::json::write_int(&mut value, column as i64);
            }
        }
        value.extend_from_slice(b",\"key\":");
        key.write_json(&mut value);
        value.push(b'}');
        if !q.reports.admit(value.len(), self.limits.max_report_bytes) {
            q.reports.errors += 1;
            return;
        }
        self.ctx.borrow_mut().out.push(Emitted {
            topic: Arc::clone(&q.topics.errors),
            key: key.clone(),
            value,
        });
    }
}

/// What one query may publish on `<query>.late` and `<query>.errors` from one shard per batch
/// (`max_report_bytes`): a flood of late events or failing calls must not become a flood of
/// items. What does not fit is counted, and one item on `<query>.errors` says how many.
#[derive(Default)]
struct ReportBudget {
    bytes: usize,
    late: u64,
    errors: u64,
}

impl ReportBudget {
    /// Whether an item of `len` bytes fits; counts it if so.
    fn admit(&mut self, len: usize, limit: usize) -> bool {
        if self.bytes + len > limit {
            return false;
        }
        self.bytes += len;
        true
    }

    /// Adds the summary of what did not fit to `out`, and starts a new batch.
    fn report(&mut self, topics: &QueryTopics, limit: usize, out: &mut Vec<Emitted>) {
        if self.late + self.errors > 0 {
            let mut value = Vec::with_capacity(160);
            let text = format!(
                "{} late items and {} error items were not published: more than \
                 max_report_bytes ({limit}) in one batch",
                self.late, self.errors
            );
            crate::json::Object::new(&mut value)
                .str("error", &text)
                .int("late_not_published", self.late as i64)
                .int("errors_not_published", self.errors as i64)
                .end();
            out.push(Emitted {
                topic: Arc::clone(&topics.errors),
                key: Key::None,
                value,
            });
        }
        *self = ReportBudget::default();
    }
}

/// Calls until a state of `size` bytes is measured again: every call while it is small, then
/// less often as it grows (a walk costs in proportion to its size), and more often again as it
/// nears `limit`.
fn measure_interval(size: usize, limit: usize) -> u32 {
    if size < MEASURE_EVERY_CALL_BYTES {
        return 0;
    }
    let headroom = limit.saturating_sub(size) / MEASURE_EVERY_CALL_BYTES;
    let by_size = size / MEASURE_EVERY_CALL_BYTES;
    by_size.min(headroom).min(MAX_MEASURE_INTERVAL as usize) as u32
}

/// Copies `key`'s state into the export in progress, if it is part of it and not copied yet.
fn export_key(q: &mut QueryRuntime, key: &Key) {
    let Some(export) = q.export.as_mut() else {
        return;
    };
    let Some(entry) = q.states.get_mut(key) else {
        return;
    };
    if entry.exported >= export.epoch {
        return;
    }
    entry.exported = export.epoch;
    let state = match &entry.state {
        State::Map(map) => Stored::of(map),
        slots => Stored::of(&slots.to_dynamic(q.compiled.as_ref().map(|c| &*c.layout))),
    };
    export.out.keys.push(KeyCheckpoint {
        key: key.into(),
        state,
        timers: entry.timers.clone(),
        seen_time: entry.seen_time,
    });
}

/// Before the watermark rises to `watermark`: copies the keys whose timers that fires.
fn export_due(q: &mut QueryRuntime, watermark: i64) {
    if q.export.is_none() {
        return;
    }
    let due: Vec<Key> = q
        .timers
        .iter()
        .take_while(|(t, _)| *t <= watermark)
        .chain(q.deferred.iter())
        .map(|(_, k)| k.clone())
        .collect();
    for key in due {
        export_key(q, &key);
    }
}

fn drop_key(q: &mut QueryRuntime, key: &Key) {
    // A checkpoint in progress copies the key first (evictions and expiry are not calls on it).
    export_key(q, key);
    // The last key moves into the place of the one removed: a checkpoint walking the keys by
    // index must copy it now if its walk has passed that place.
    if let (Some(export), Some(index)) = (&q.export, q.states.get_index_of(key)) {
        let last = q.states.len() - 1;
        if index < export.next && last >= export.next {
            let moved = q.states.get_index(last).expect("in range").0.clone();
            export_key(q, &moved);
        }
    }
    if let Some(index) = q.states.get_index_of(key) {
        q.recency.remove(&mut q.states, index);
        let (_, entry) = q.states.swap_remove_index(index).expect("held");
        for t in entry.timers {
            q.timers.remove(&(t, key.clone()));
        }
        q.deferred.retain(|(_, k)| k != key);
    }
}

/// Every `name` in `.name` that is not a method call (`.name(`) in a script's text. It may
/// include names that are not event fields (map properties, text in strings): a getter for them
/// on the event type is harmless.
fn property_names(script: &str) -> impl Iterator<Item = &str> {
    let bytes = script.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut at = 0;
    std::iter::from_fn(move || {
        while at < bytes.len() {
            let dot = at;
            at += 1;
            if bytes[dot] != b'.'
                || !bytes
                    .get(at)
                    .is_some_and(|&b| b.is_ascii_alphabetic() || b == b'_')
            {
                continue;
            }
            let start = at;
            while at < bytes.len() && ident(bytes[at]) {
                at += 1;
            }
            let next = bytes[at..].iter().find(|b| !b.is_ascii_whitespace());
            if next != Some(&b'(') {
                return Some(&script[start..at]);
            }
        }
        None
    })
}

/// The error that caused `e`, through the layers of function calls around it.
fn innermost(e: &EvalAltResult) -> &EvalAltResult {
    match e {
        EvalAltResult::ErrorInFunctionCall(_, _, inner, _) => innermost(inner),
        other => other,
    }
}

/// A script error's message without Rhai's position suffix (the position is reported apart).
pub(crate) fn error_message(e: &EvalAltResult) -> String {
    let inner = innermost(e);
    match inner {
        EvalAltResult::ErrorTooManyOperations(_) => {
            "script ran too long: it used more operations than the limit (max_operations)".into()
        }
        EvalAltResult::ErrorStackOverflow(_) => {
            "script recursed too deep: more nested calls than the limit (max_call_levels)".into()
        }
        EvalAltResult::ErrorDataTooLarge(what, _) => {
            format!("script built a value too large: {what} over its limit")
        }
        other => {
            let text = other.to_string();
            let suffix = format!(" ({})", other.position());
            match text.strip_suffix(&suffix) {
                Some(stripped) if !other.position().is_none() => stripped.to_owned(),
                _ => text,
            }
        }
    }
}

/// A replacement script compiled for one shard, with the states of its keys as it will hold
/// them.
pub struct Migration {
    ast: AST,
    constants: Option<Constants>,
    def: Arc<QueryDef>,
    compiled: Option<Compiled>,
    states: Vec<(Key, State)>,
    migrated: usize,
}

impl Migration {
    /// Keys whose state `migrate` rewrote.
    pub fn migrated(&self) -> usize {
        self.migrated
    }
}

/// A histogram for times and latencies: 3 significant digits from 1 to 2^40 units (18 minutes
/// in ns, 12 days in µs); larger values are recorded as the maximum.
pub fn latency_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 1 << 40, 3).expect("valid histogram bounds")
}

/// An estimate of the memory a state holds, in bytes: cheap for the small states most queries
/// keep, and bounded by Rhai's own size limits for the rest.
pub fn state_bytes(value: &Dynamic) -> usize {
    const SLOT: usize = 16;
    if value.is_int() || value.is_float() || value.is_bool() || value.is_unit() || value.is_char() {
        SLOT
    } else if let Ok(s) = value.as_immutable_string_ref() {
        SLOT + s.len()
    } else if value.is_map() {
        let map = value.as_map_ref().expect("checked is_map");
        SLOT + map
            .iter()
            .map(|(k, v)| k.len() + SLOT + state_bytes(v))
            .sum::<usize>()
    } else if value.is_array() {
        let array = value.as_array_ref().expect("checked is_array");
        SLOT + array.iter().map(state_bytes).sum::<usize>()
    } else if value.is_blob() {
        SLOT + value.as_blob_ref().expect("checked is_blob").len()
    } else if let Some(n) = eddy_plugins::approx_bytes(value) {
        SLOT + n
    } else {
        SLOT * 4
    }
}

#[cfg(test)]
#[path = "shard_tests.rs"]
mod tests;

/// Returns the memory this thread's heap no longer uses to the system at once, including what
/// other threads freed of it (mimalloc takes that back only when the owner collects).
pub fn collect_memory() {
    // SAFETY: mi_collect only walks the calling thread's heap and the segments it may reclaim;
    // it takes no pointer from us.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Bumped when much memory has just been freed (a query removed): every thread that calls
/// [`collect_if_asked`] then collects once. A query's keys and events are allocated on the
/// async workers that parse them and freed on its shard; mimalloc gives such memory back only
/// when the thread that allocated it collects, and nothing else tells the workers to.
static COLLECT_EPOCH: AtomicU64 = AtomicU64::new(0);

/// Asks every thread that checks [`collect_if_asked`] to collect its heap once.
pub fn ask_threads_to_collect() {
    COLLECT_EPOCH.fetch_add(1, Ordering::Relaxed);
}

/// Collects this thread's heap if [`ask_threads_to_collect`] was called since it last did:
/// meant for idle moments (an async worker about to park), where it costs one atomic load.
pub fn collect_if_asked() {
    thread_local! {
        static SEEN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    let epoch = COLLECT_EPOCH.load(Ordering::Relaxed);
    if SEEN.get() != epoch {
        SEEN.set(epoch);
        collect_memory();
    }
}
