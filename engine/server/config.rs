//! Server configuration: `eddy.toml` and command-line flags, raw → validated.
//!
//! [`RawConfig`] is what the file holds (every field optional, unknown fields are errors);
//! flags override it; [`RawConfig::validate`] reports every problem at once and yields a
//! [`Config`] in which every default is filled in. Each default is written once, in
//! [`Config::default`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::durable::log::Fsync;
use crate::sandbox::Limits;

/// The data directory of `eddy serve` when neither `data_dir` nor `--ephemeral` is given.
pub const DEFAULT_DATA_DIR: &str = "eddy-data";

/// The validated configuration of `eddy serve`.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address for HTTP and WebSocket traffic.
    pub listen: SocketAddr,
    /// Shard threads; each owns the state of its keys.
    pub shards: usize,
    /// Threads of the async runtime (connections: parsing, routing, writing to subscribers).
    pub workers: usize,
    /// Time slice the server's threads ask the kernel for, in µs (see [`crate::sched`]);
    /// `None` keeps the kernel's default. Applied by `eddy serve` at start.
    pub time_slice_us: Option<u32>,
    /// Folder of `.rhai` queries loaded at start (a missing folder is fine: no queries).
    pub queries: PathBuf,
    /// Folder of `.onnx` models loaded at start and written by `PUT /models/NAME` (a missing
    /// folder is fine: no models).
    pub models: PathBuf,
    /// Bearer token for deploying and removing queries; generated at start when `None`.
    pub admin_token: Option<String>,
    /// When set, producers must present it (`Authorization: Bearer` or `?token=`).
    pub ingest_token: Option<String>,
    /// When set, subscribers must present it (`Authorization: Bearer` or `?token=`).
    pub subscribe_token: Option<String>,
    /// Browser origins allowed to open WebSockets; `*` allows any. Requests without an
    /// `Origin` header (non-browser clients) and same-origin requests are always allowed.
    pub allowed_origins: Vec<String>,
    /// Largest WebSocket message or HTTP body, in bytes.
    pub max_frame_bytes: usize,
    /// Memory the frames being parsed, routed and queued may hold, all connections together;
    /// past it, inputs wait (see `server::ingest`).
    pub max_ingest_bytes_in_flight: usize,
    /// Bytes of messages (one per frame per shard: its deliveries and marks) waiting for each
    /// shard before producers are slowed; a message always goes into an empty queue.
    pub shard_queue: usize,
    /// Bytes waiting for one subscriber before its oldest items are dropped.
    pub subscriber_queue_bytes: usize,
    /// How long a subscriber may stay full before it is closed (4008).
    pub slow_consumer_timeout: Duration,
    /// Idle connections are pinged this often and closed after two silent intervals.
    pub ping_interval: Duration,
    /// How long shutdown waits for queues to drain and connections to close.
    pub shutdown_timeout: Duration,
    /// How long a connection may take to send a request head (and stay idle between two).
    pub handshake_timeout: Duration,
    /// Open connections served in full; past it, `503` (see `server::accept`).
    pub max_connections: usize,
    /// Latest values kept per topic for snapshots.
    pub snapshot_keys: usize,
    /// Bytes of latest values kept for snapshots, all topics together.
    pub snapshot_bytes: usize,
    /// Bytes of the newest batches kept per topic for resuming subscribers.
    pub replay_bytes: usize,
    /// Script limits.
    pub limits: Limits,
    /// Which engine runs the queries: `auto` (compiled where possible) or `interpreter`.
    pub engine: crate::compiled::EngineMode,
    /// How far ahead of the wall clock an event time may be; later ones are rejected.
    pub max_event_time_skew_ms: i64,
    /// When a query's input is quiet this long, its watermark moves on with processing time, so
    /// that its last windows close. `None`: never (the watermark waits for events).
    pub idle_timeout: Option<Duration>,
    /// Share of one shard one query's scripts may take per `query_cpu_window` (of its wall time,
    /// and of the script time of every query on it, while others share it) before the query is
    /// quarantined (0 < share ≤ 1; 1 turns quarantine off).
    pub max_query_cpu: f64,
    pub query_cpu_window: Duration,
    /// Built-in synthetic feeds.
    pub demo: bool,
    /// Events per second of each demo feed.
    pub demo_rate: u32,
    /// Where the ingest log, checkpoints and the query catalog live; `None` runs in memory
    /// (`--ephemeral`). `eddy serve` defaults to `eddy-data` next to its config file (or in the
    /// working folder); a `Config` built in code defaults to memory.
    pub data_dir: Option<PathBuf>,
    /// When the ingest log reaches the disk (see [`crate::durable::log::Fsync`]).
    pub fsync: Fsync,
    /// How often every key's state is checkpointed (and at shutdown).
    pub checkpoint_interval: Duration,
    /// Cluster mode (`[cluster]`, `--cluster`); `None` runs alone.
    pub cluster: Option<super::cluster::ClusterConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            // Measured: no difference on a 2-core VM (BENCHMARKS.md), so the kernel decides.
            time_slice_us: None,
            queries: PathBuf::from("queries"),
            models: PathBuf::from("models"),
            admin_token: None,
            ingest_token: None,
            subscribe_token: None,
            allowed_origins: Vec::new(),
            max_frame_bytes: 16 << 20,
            max_ingest_bytes_in_flight: 256 << 20,
            shard_queue: 16 << 20,
            subscriber_queue_bytes: 8 << 20,
            slow_consumer_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(15),
            shutdown_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            max_connections: super::accept::default_max_connections(),
            snapshot_keys: 100_000,
            snapshot_bytes: 64 << 20,
            replay_bytes: 8 << 20,
            limits: Limits::default(),
            engine: crate::compiled::EngineMode::Auto,
            max_event_time_skew_ms: crate::router::DEFAULT_MAX_EVENT_TIME_SKEW_MS,
            idle_timeout: None,
            max_query_cpu: 0.8,
            query_cpu_window: Duration::from_secs(10),
            demo: false,
            demo_rate: 200,
            data_dir: None,
            fsync: Fsync::Always,
            checkpoint_interval: Duration::from_secs(10),
            cluster: None,
        }
    }
}

impl Config {
    /// How the router treats event time under this configuration.
    pub fn time_policy(&self) -> crate::router::TimePolicy {
        crate::router::TimePolicy {
            max_skew_ms: self.max_event_time_skew_ms,
            idle_ms: self.idle_timeout.map(|d| d.as_millis() as i64),
            max_key_bytes: self.limits.max_key_bytes,
        }
    }
}

/// A duration written as milliseconds or as a string like `"10s"`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum RawDuration {
    Millis(u64),
    Text(String),
}

impl RawDuration {
    /// The setting `name` written as `raw`: `default` when not given, or (with the problem
    /// noted in `problems`) when it does not parse.
    pub fn or_default(
        raw: Option<RawDuration>,
        name: &str,
        default: Duration,
        problems: &mut Vec<String>,
    ) -> Duration {
        match raw {
            None => default,
            Some(RawDuration::Millis(ms)) => Duration::from_millis(ms),
            Some(RawDuration::Text(text)) => match eddy_plugins::parse_duration_ms(&text) {
                Ok(ms) => Duration::from_millis(ms.max(0) as u64),
                Err(e) => {
                    problems.push(format!("{name}: {e}"));
                    default
                }
            },
        }
    }
}

/// `eddy.toml` as written, before validation.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Option<String>,
    pub shards: Option<usize>,
    pub workers: Option<usize>,
    /// 0 keeps the kernel's default slice.
    pub time_slice_us: Option<u32>,
    pub queries: Option<PathBuf>,
    pub models: Option<PathBuf>,
    pub admin_token: Option<String>,
    pub ingest_token: Option<String>,
    pub subscribe_token: Option<String>,
    pub allowed_origins: Option<Vec<String>>,
    pub max_frame_bytes: Option<usize>,
    pub max_ingest_bytes_in_flight: Option<usize>,
    pub shard_queue: Option<usize>,
    /// No longer used: shards publish straight to the subscribers' mailboxes, with no queue in
    /// between. Still read, with a warning, so that older files load.
    pub hub_queue: Option<usize>,
    pub subscriber_queue_bytes: Option<usize>,
    pub slow_consumer_timeout: Option<RawDuration>,
    pub ping_interval: Option<RawDuration>,
    pub shutdown_timeout: Option<RawDuration>,
    pub handshake_timeout: Option<RawDuration>,
    pub max_connections: Option<usize>,
    pub snapshot_keys: Option<usize>,
    pub snapshot_bytes: Option<usize>,
    pub replay_bytes: Option<usize>,
    pub limits: Option<Limits>,
    pub engine: Option<crate::compiled::EngineMode>,
    pub max_event_time_skew: Option<RawDuration>,
    pub idle_timeout: Option<RawDuration>,
    pub max_query_cpu: Option<f64>,
    pub query_cpu_window: Option<RawDuration>,
    pub demo: Option<bool>,
    pub demo_rate: Option<u32>,
    pub data_dir: Option<PathBuf>,
    /// Run in memory: no data directory.
    pub ephemeral: Option<bool>,
    /// `always` (group commit), `never`, or an interval such as `10ms`.
    pub fsync: Option<String>,
    pub checkpoint_interval: Option<RawDuration>,
    /// Cluster mode on NATS JetStream.
    pub cluster: Option<super::cluster::RawCluster>,
}

/// Why a configuration was refused: every problem found, one per line.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", problems.join("\n  "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl RawConfig {
    /// Parses the text of an `eddy.toml`.
    pub fn from_toml(text: &str) -> Result<RawConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError {
            problems: vec![e.to_string()],
        })
    }

    /// Fills in defaults and checks every value, reporting all problems at once.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let d = Config::default();
        let mut problems = Vec::new();
        let listen = match self.listen {
            None => d.listen,
            Some(text) => text.parse().unwrap_or_else(|e| {
                problems.push(format!("listen {text:?}: {e} (expected IP:PORT)"));
                d.listen
            }),
        };
        let mut duration = |name: &str, raw: Option<RawDuration>, default: Duration| {
            RawDuration::or_default(raw, name, default, &mut problems)
        };
        let slow_consumer_timeout = duration(
            "slow_consumer_timeout",
            self.slow_consumer_timeout,
            d.slow_consumer_timeout,
        );
        let ping_interval = duration("ping_interval", self.ping_interval, d.ping_interval);
        let shutdown_timeout = duration(
            "shutdown_timeout",
            self.shutdown_timeout,
            d.shutdown_timeout,
        );
        let handshake_timeout = duration(
            "handshake_timeout",
            self.handshake_timeout,
            d.handshake_timeout,
        );
        let max_event_time_skew = duration(
            "max_event_time_skew",
            self.max_event_time_skew,
            Duration::from_millis(d.max_event_time_skew_ms as u64),
        );
        let idle_timeout = self
            .idle_timeout
            .map(|raw| duration("idle_timeout", Some(raw), Duration::ZERO));
        let query_cpu_window = duration(
            "query_cpu_window",
            self.query_cpu_window,
            d.query_cpu_window,
        );
        let checkpoint_interval = duration(
            "checkpoint_interval",
            self.checkpoint_interval,
            d.checkpoint_interval,
        );
        let fsync = match self.fsync.as_deref() {
            None => d.fsync,
            Some(text) => Fsync::parse(text).unwrap_or_else(|e| {
                problems.push(e);
                d.fsync
            }),
        };
        let cluster = self
            .cluster
            .and_then(|c| c.validate(listen.port(), &mut problems));
        // In cluster mode JetStream holds the log, and the catalog: no data directory.
        if cluster.is_some() && self.data_dir.is_some() {
            problems.push(
                "data_dir: not used in cluster mode (JetStream holds the log, the checkpoints \
                 and the catalog): remove it, or run without [cluster]"
                    .into(),
            );
        }
        let data_dir = match self.ephemeral {
            _ if cluster.is_some() => None,
            Some(true) => None,
            _ => Some(
                self.data_dir
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            ),
        };
        if self.hub_queue.is_some() {
            tracing::warn!(
                "hub_queue is no longer used (shards publish to subscribers directly): remove it"
            );
        }
        let config = Config {
            cluster,
            data_dir,
            fsync,
            checkpoint_interval,
            listen,
            max_event_time_skew_ms: max_event_time_skew.as_millis() as i64,
            idle_timeout,
            max_query_cpu: self.max_query_cpu.unwrap_or(d.max_query_cpu),
            query_cpu_window,
            shards: self.shards.unwrap_or(d.shards),
            workers: self.workers.unwrap_or(d.workers),
            time_slice_us: match self.time_slice_us {
                None => d.time_slice_us,
                Some(0) => None,
                Some(us) => Some(us),
            },
            queries: self.queries.unwrap_or(d.queries),
            models: self.models.unwrap_or(d.models),
            admin_token: self.admin_token.or(d.admin_token),
            ingest_token: self.ingest_token.or(d.ingest_token),
            subscribe_token: self.subscribe_token.or(d.subscribe_token),
            allowed_origins: self.allowed_origins.unwrap_or(d.allowed_origins),
            max_frame_bytes: self.max_frame_bytes.unwrap_or(d.max_frame_bytes),
            max_ingest_bytes_in_flight: self
                .max_ingest_bytes_in_flight
                .unwrap_or(d.max_ingest_bytes_in_flight),
            shard_queue: self.shard_queue.unwrap_or(d.shard_queue),
            subscriber_queue_bytes: self
                .subscriber_queue_bytes
                .unwrap_or(d.subscriber_queue_bytes),
            slow_consumer_timeout,
            ping_interval,
            shutdown_timeout,
            handshake_timeout,
            max_connections: self.max_connections.unwrap_or(d.max_connections),
            snapshot_keys: self.snapshot_keys.unwrap_or(d.snapshot_keys),
            snapshot_bytes: self.snapshot_bytes.unwrap_or(d.snapshot_bytes),
            replay_bytes: self.replay_bytes.unwrap_or(d.replay_bytes),
            limits: self.limits.unwrap_or(d.limits),
            engine: self.engine.unwrap_or(d.engine),
            demo: self.demo.unwrap_or(d.demo),
            demo_rate: self.demo_rate.unwrap_or(d.demo_rate),
        };
        let positive = [
            ("shards", config.shards),
            ("workers", config.workers),
            ("max_frame_bytes", config.max_frame_bytes),
            ("shard_queue", config.shard_queue),
            ("subscriber_queue_bytes", config.subscriber_queue_bytes),
            ("max_connections", config.max_connections),
            ("snapshot_keys", config.snapshot_keys),
            ("snapshot_bytes", config.snapshot_bytes),
            (
                "max_ingest_bytes_in_flight",
                config.max_ingest_bytes_in_flight,
            ),
        ];
        for (name, value) in positive {
            if value == 0 {
                problems.push(format!("{name} must be at least 1"));
            }
        }
        for (name, value) in config.limits.named() {
            if value == 0 {
                problems.push(format!(
                    "[limits] {name} must be at least 1 (0 would mean no limit)"
                ));
            }
        }
        if let Some(us) = config.time_slice_us {
            let range = crate::sched::MIN_SLICE_US..=crate::sched::MAX_SLICE_US;
            if !range.contains(&us) {
                problems.push(format!(
                    "time_slice_us must be 0 (the kernel's default) or {} to {}, found {us}",
                    range.start(),
                    range.end()
                ));
            }
        }
        if config.shards > 256 {
            problems.push(format!(
                "shards must be at most 256, found {}",
                config.shards
            ));
        }
        for (name, value) in [
            ("ping_interval", config.ping_interval),
            ("query_cpu_window", config.query_cpu_window),
            ("checkpoint_interval", config.checkpoint_interval),
            ("handshake_timeout", config.handshake_timeout),
            ("idle_timeout", config.idle_timeout.unwrap_or(Duration::MAX)),
        ] {
            if value.is_zero() {
                problems.push(format!("{name} must be more than 0"));
            }
        }
        if config.max_event_time_skew_ms <= 0 {
            problems.push("max_event_time_skew must be more than 0".into());
        }
        if !(config.max_query_cpu > 0.0 && config.max_query_cpu <= 1.0) {
            problems.push(format!(
                "max_query_cpu must be a share of a shard, more than 0 and at most 1, found {}",
                config.max_query_cpu
            ));
        }
        for (name, token) in [
            ("admin_token", &config.admin_token),
            ("ingest_token", &config.ingest_token),
            ("subscribe_token", &config.subscribe_token),
        ] {
            if token.as_ref().is_some_and(|t| t.len() < 8) {
                problems.push(format!("{name} must be at least 8 characters"));
            }
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }
}

/// A random token for the admin API: 32 hex digits from the operating system's generator.
pub fn generate_token() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the operating system has a random generator");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let config = RawConfig::from_toml(
            "listen = \"127.0.0.1:0\"\nshards = 3\nslow_consumer_timeout = \"2s\"\nping_interval = 500\n[limits]\nmax_operations = 5000\n",
        )
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(config.shards, 3);
        assert_eq!(config.slow_consumer_timeout, Duration::from_secs(2));
        assert_eq!(config.ping_interval, Duration::from_millis(500));
        assert_eq!(config.limits.max_operations, 5000);
        assert_eq!(
            config.limits.max_call_levels,
            Limits::default().max_call_levels
        );
        assert_eq!(config.max_frame_bytes, 16 << 20);
        assert_eq!(config.max_event_time_skew_ms, 24 * 3600 * 1000);
        assert_eq!(config.idle_timeout, None);
        let config = RawConfig::from_toml(
            "max_event_time_skew = \"1h\"\nidle_timeout = \"30s\"\nmax_query_cpu = 0.25\nquery_cpu_window = 2000",
        )
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(config.max_event_time_skew_ms, 3_600_000);
        assert_eq!(config.idle_timeout, Some(Duration::from_secs(30)));
        assert_eq!(config.max_query_cpu, 0.25);
        assert_eq!(config.query_cpu_window, Duration::from_secs(2));
    }

    #[test]
    fn the_time_slice_is_the_kernels_unless_set_within_its_range() {
        let slice = |toml: &str| RawConfig::from_toml(toml).unwrap().validate();
        assert_eq!(slice("").unwrap().time_slice_us, None);
        assert_eq!(slice("time_slice_us = 0").unwrap().time_slice_us, None);
        assert_eq!(
            slice("time_slice_us = 1000").unwrap().time_slice_us,
            Some(1000)
        );
        for bad in [50, 100_001] {
            let err = slice(&format!("time_slice_us = {bad}")).unwrap_err();
            assert!(
                err.to_string().contains(&format!(
                    "time_slice_us must be 0 (the kernel's default) or 100 to 100000, found {bad}"
                )),
                "{err}"
            );
        }
    }

    #[test]
    fn unknown_fields_are_errors() {
        assert!(RawConfig::from_toml("shard = 3").is_err());
        assert!(RawConfig::from_toml("[limits]\nmax_ops = 3").is_err());
    }

    #[test]
    fn every_problem_is_reported() {
        let err = RawConfig::from_toml(
            "listen = \"nowhere\"\nshards = 0\nping_interval = \"1y\"\nadmin_token = \"short\"\nmax_query_cpu = 1.5\nidle_timeout = 0",
        )
        .unwrap()
        .validate()
        .unwrap_err();
        assert_eq!(err.problems.len(), 6, "{err}");
    }

    #[test]
    fn zero_limits_are_refused_with_the_setting_named() {
        let err = RawConfig::from_toml("[limits]\nmax_operations = 0\nmax_keys_per_query = 0\n")
            .unwrap()
            .validate()
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("[limits] max_operations must be at least 1"),
            "{text}"
        );
        assert!(
            text.contains("[limits] max_keys_per_query must be at least 1"),
            "{text}"
        );
        assert_eq!(err.problems.len(), 2, "{text}");
    }

    #[test]
    fn tokens_are_random_hex() {
        let (a, b) = (generate_token(), generate_token());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    }
}
