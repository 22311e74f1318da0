//! The server the end-to-end benches measure: `eddy serve` on 127.0.0.1:0 with `vwap.rhai` alone,
//! every other setting at its default (shards: one per core).

use std::path::Path;

use eddy::server::{Config, Server};

/// Starts the server on `rt`; the folder holds its queries and must outlive it.
pub fn vwap(rt: &tokio::runtime::Runtime) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("queries/vwap.rhai"),
        dir.path().join("vwap.rhai"),
    )
    .unwrap();
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        queries: dir.path().to_owned(),
        admin_token: Some("bench-token".into()),
        ..Config::default()
    };
    (rt.block_on(Server::start(config)).unwrap(), dir)
}
