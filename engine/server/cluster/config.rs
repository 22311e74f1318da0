//! `[cluster]` in `eddy.toml` and `eddy serve --cluster`: raw → validated.
//!
//! Without it eddy runs alone. With it, the NATS servers to use, the credentials file, this
//! node's name (unique in the cluster; default: the host name and the listen port), the number
//! of partitions (fixed for the life of the cluster's streams; default 64) and the replicas of
//! the JetStream streams and buckets (1; 3 on a three-server NATS cluster).

use std::path::PathBuf;

use serde::Deserialize;

/// Partitions of the event stream when `partitions` is not given.
pub const DEFAULT_PARTITIONS: u32 = 64;

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
}

/// The cluster settings in use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    pub urls: Vec<String>,
    pub credentials: Option<PathBuf>,
    pub node: String,
    pub partitions: u32,
    pub replicas: usize,
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
        let node = self.node.unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_default();
            let host = if host.is_empty() { "eddy".into() } else { host };
            format!("{host}-{listen_port}")
        });
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
        })
    }
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
    }

    #[test]
    fn every_problem_is_reported() {
        let raw = RawCluster {
            urls: None,
            node: Some("a b".into()),
            partitions: Some(0),
            replicas: Some(9),
            ..Default::default()
        };
        let mut problems = Vec::new();
        raw.validate(8080, &mut problems);
        assert_eq!(problems.len(), 4, "{problems:?}");
    }
}
