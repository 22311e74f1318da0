//! `[cluster]` in `eddy.toml` and `eddy serve --cluster`: raw → validated.
//!
//! Without it eddy runs alone. With it, the NATS servers to use, the credentials file, this
//! node's name (unique in the cluster; default: the host name and the port the node bound), the number
//! of partitions (fixed for the life of the cluster's streams; default 64) and the replicas of
//! the JetStream streams and buckets (1; 3 on a three-server NATS cluster), the life of a
//! partition's lease (5 s), the same on every node, and how often a partition's owner writes
//! its keys' latest values to `EDDY_LATEST` for snapshots (at most every 250 ms per key).

use std::path::PathBuf;

use std::time::Duration;

use serde::Deserialize;

use crate::server::config::RawDuration;

/// Partitions of the event stream when `partitions` is not given.
pub const DEFAULT_PARTITIONS: u32 = 64;
/// How long a lease lives without renewal when `lease` is not given: a dead node's partitions
/// move after this. NATS's own election of a new stream leader when a NATS server dies (4 to
/// 9 s in nats-server 2.10+) may outlast it: the nodes then give their partitions up and take
/// them again once NATS answers (they stay up).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(5);
/// How often an owner writes the latest values of the keys that changed to `EDDY_LATEST` when
/// `latest_interval` is not given: a snapshot read from the stream is at most this old for a key
/// (a node waits this long before reading it, so that its snapshot misses nothing).
pub const DEFAULT_LATEST_INTERVAL: Duration = Duration::from_millis(250);

/// `[cluster]` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    /// `nats://h1:4222` URLs (a single string may list several, comma-separated).
    pub urls: Option<Vec<String>>,
    /// A NATS `.creds` file (JWT and NKey seed).
    pub credentials: Option<PathBuf>,
    pub node: Option<String>,
    pub partitions: Option<u32>,
    pub replicas: Option<usize>,
    /// The life of a lease without renewal (`"5s"`, or milliseconds).
    pub lease: Option<RawDuration>,
    /// How often changed keys' latest values go to `EDDY_LATEST` (`"250ms"`, or milliseconds;
    /// 0: with every batch of items).
    pub latest_interval: Option<RawDuration>,
}

/// The cluster settings in use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    pub urls: Vec<String>,
    pub credentials: Option<PathBuf>,
    pub node: String,
    pub partitions: u32,
    pub replicas: usize,
    pub lease: Duration,
    pub latest_interval: Duration,
    /// No name was given: `node` is [`default_node_name`] of the port the server bound.
    pub default_node: bool,
}

impl RawCluster {
    /// Checks every value; problems are added to `problems`. `listen_port` names a node that
    /// was given no name.
    pub fn validate(self, listen_port: u16, problems: &mut Vec<String>) -> Option<ClusterConfig> {
        let urls: Vec<String> = self
            .urls
            .unwrap_or_default()
            .iter()
            .flat_map(|u| u.split(','))
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            problems.push("cluster.urls: give at least one NATS URL (nats://host:4222)".into());
        }
        for u in &urls {
            if u.parse::<async_nats::ServerAddr>().is_err() {
                problems.push(format!("cluster.urls: {u:?} is not a NATS URL"));
            }
        }
        let partitions = self.partitions.unwrap_or(DEFAULT_PARTITIONS);
        if !(1..=4096).contains(&partitions) {
            problems.push(format!(
                "cluster.partitions: {partitions} (expected 1 to 4096)"
            ));
        }
        let replicas = self.replicas.unwrap_or(1);
        if !(1..=5).contains(&replicas) {
            problems.push(format!("cluster.replicas: {replicas} (expected 1 to 5)"));
        }
        let lease = RawDuration::or_default(self.lease, "cluster.lease", DEFAULT_LEASE, problems);
        if !(Duration::from_secs(2)..=Duration::from_secs(60)).contains(&lease) {
            problems.push(format!("cluster.lease: {lease:?} (expected 2 s to 60 s)"));
        }
        let latest_interval = RawDuration::or_default(
            self.latest_interval,
            "cluster.latest_interval",
            DEFAULT_LATEST_INTERVAL,
            problems,
        );
        if latest_interval > Duration::from_secs(10) {
            problems.push(format!(
                "cluster.latest_interval: {latest_interval:?} (expected 0 to 10 s)"
            ));
        }
        let default_node = self.node.is_none();
        let node = self.node.unwrap_or_else(|| default_node_name(listen_port));
        if node.is_empty()
            || !node
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            problems.push(format!(
                "cluster.node: {node:?} (letters, digits, `-` and `_` only)"
            ));
        }
        Some(ClusterConfig {
            urls,
            credentials: self.credentials,
            node,
            partitions,
            replicas,
            lease,
            latest_interval,
            default_node,
        })
    }
}

/// The name of a node that was given none: the host name (other characters than letters,
/// digits, `-` and `_` made `-`) and the port it listens on, so that two nodes on one host
/// differ. With port 0 the server renames the node once it knows the port it bound
/// ([`ClusterConfig::default_node`]).
pub fn default_node_name(port: u16) -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let host = if host.is_empty() { "eddy".into() } else { host };
    format!("{host}-{port}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_comma_separated_urls() {
        let raw = RawCluster {
            urls: Some(vec!["nats://127.0.0.1:4222, nats://127.0.0.1:4223".into()]),
            node: Some("a-1".into()),
            ..Default::default()
        };
        let mut problems = Vec::new();
        let c = raw.validate(8080, &mut problems).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(c.urls.len(), 2);
        assert_eq!(c.partitions, DEFAULT_PARTITIONS);
        assert_eq!(c.replicas, 1);
        assert_eq!(c.lease, DEFAULT_LEASE);
        assert_eq!(c.latest_interval, DEFAULT_LATEST_INTERVAL);
    }

    #[test]
    fn the_latest_interval_is_a_duration_up_to_ten_seconds() {
        let every = |raw: RawDuration| {
            let raw = RawCluster {
                urls: Some(vec!["nats://127.0.0.1:4222".into()]),
                node: Some("a".into()),
                latest_interval: Some(raw),
                ..Default::default()
            };
            let mut problems = Vec::new();
            let c = raw.validate(8080, &mut problems).unwrap();
            (c.latest_interval, problems)
        };
        assert_eq!(
            every(RawDuration::Text("100ms".into())),
            (Duration::from_millis(100), vec![])
        );
        assert_eq!(every(RawDuration::Millis(0)), (Duration::ZERO, vec![]));
        let (_, problems) = every(RawDuration::Text("11s".into()));
        assert_eq!(
            problems,
            ["cluster.latest_interval: 11s (expected 0 to 10 s)"]
        );
        let (_, problems) = every(RawDuration::Text("often".into()));
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].starts_with("cluster.latest_interval: "),
            "{problems:?}"
        );
    }

    #[test]
    fn a_lease_is_a_duration_within_bounds() {
        let lease = |raw: RawDuration| {
            let raw = RawCluster {
                urls: Some(vec!["nats://127.0.0.1:4222".into()]),
                node: Some("a".into()),
                lease: Some(raw),
                ..Default::default()
            };
            let mut problems = Vec::new();
            let c = raw.validate(8080, &mut problems).unwrap();
            (c.lease, problems)
        };
        assert_eq!(
            lease(RawDuration::Text("12s".into())),
            (Duration::from_secs(12), vec![])
        );
        assert_eq!(
            lease(RawDuration::Millis(2500)),
            (Duration::from_millis(2500), vec![])
        );
        let (_, problems) = lease(RawDuration::Millis(500));
        assert_eq!(problems, ["cluster.lease: 500ms (expected 2 s to 60 s)"]);
        let (_, problems) = lease(RawDuration::Text("soon".into()));
        assert_eq!(problems.len(), 1);
        assert!(problems[0].starts_with("cluster.lease: "), "{problems:?}");
    }

    #[test]
    fn a_default_name_is_a_valid_name_ending_with_the_port() {
        let name = default_node_name(8123);
        assert!(name.ends_with("-8123"), "{name}");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "{name}"
        );
        let raw = RawCluster {
            urls: Some(vec!["nats://127.0.0.1:4222".into()]),
            ..Default::default()
        };
        let mut problems = Vec::new();
        let c = raw.validate(0, &mut problems).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert!(c.default_node);
    }

    #[test]
    fn every_problem_is_reported() {
        let raw = RawCluster {
            urls: None,
            node: Some("a b".into()),
            partitions: Some(0),
            replicas: Some(9),
            lease: Some(RawDuration::Text("1h".into())),
            ..Default::default()
        };
        let mut problems = Vec::new();
        raw.validate(8080, &mut problems);
        assert_eq!(problems.len(), 5, "{problems:?}");
    }
}
