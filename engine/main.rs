//! The `eddy` command line: `serve`, `deploy` to a server, `run`, `check` and `test` queries
//! offline, `generate` sample inputs.
//!
//! Errors become `anyhow` here and only here; each carries the file it is about.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use eddy::compiled::EngineMode;
use eddy::offline::{self, RunOptions};
use eddy::server::{RawConfig, Server};
use eddy::synth::{self, Scenario};
use eddy::{Limits, QueryDef};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Where `eddy test` looks for cases when given no path.
const DEFAULT_CASES: &str = "tests/queries";

/// Stack of the thread that runs scripts: deep (but limited) Rhai recursion needs room.
const SCRIPT_STACK_BYTES: usize = 64 << 20;

#[derive(Parser)]
#[command(
    name = "eddy",
    version,
    about = "Real-time analytics: JSON events in, Rhai queries with per-key state, results out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run queries over a file of events and print every emitted item as one JSON line:
    /// {"topic": T, "key": K, "value": V}.
    Run {
        /// Query files (`.rhai`); a query's name is its file stem.
        #[arg(required = true)]
        queries: Vec<PathBuf>,
        /// Input file (one JSON object, an array of objects, or NDJSON), or `-` for stdin.
        #[arg(long, short)]
        input: PathBuf,
        /// Stream of events without a "stream" field; by default they feed every query.
        #[arg(long)]
        stream: Option<String>,
        /// Folder of `.onnx` models the queries may call [default: models, if it exists].
        #[arg(long)]
        models: Option<PathBuf>,
        /// `auto`: compile each query to native closures where possible and interpret the
        /// rest; `interpreter`: interpret everything.
        #[arg(long, value_enum, default_value_t = EngineMode::Auto)]
        engine: EngineMode,
    },
    /// Run query test cases (folders of query, in.ndjson, out.ndjson) and report each as ok or
    /// FAIL with its first difference. Exit status 0 only if every case passes.
    Test {
        /// Case folders, or folders to search for cases [default: tests/queries].
        paths: Vec<PathBuf>,
        /// Write each case's out.ndjson from the current output instead of comparing: a first
        /// draft, only as right as the person who reads and checks it.
        #[arg(long)]
        bless: bool,
        /// Folder of `.onnx` models the cases' queries may call [default: models, if it exists].
        #[arg(long)]
        models: Option<PathBuf>,
    },
    /// Compile and validate queries without running them.
    Check {
        #[arg(required = true)]
        queries: Vec<PathBuf>,
    },
    /// Run the server: WebSocket/HTTP ingest, sharded queries, batched subscriptions.
    Serve {
        /// Configuration file (TOML); flags override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen address [default: 127.0.0.1:8080].
        #[arg(long)]
        listen: Option<String>,
        /// Shard threads [default: the number of cores].
        #[arg(long)]
        shards: Option<usize>,
        /// Async runtime threads (connections) [default: the number of cores].
        #[arg(long)]
        workers: Option<usize>,
        /// Time slice the server's threads ask the kernel for, in µs (100 to 100000); 0 keeps
        /// the kernel's [default: 0].
        #[arg(long)]
        time_slice_us: Option<u32>,
        /// Folder of queries loaded at start [default: queries].
        #[arg(long)]
        queries: Option<PathBuf>,
        /// Folder of `.onnx` models loaded at start [default: models].
        #[arg(long)]
        models: Option<PathBuf>,
        /// Token for deploying queries [default: generated and printed at start].
        #[arg(long)]
        admin_token: Option<String>,
        /// Also run the built-in synthetic feeds (trades, sensors, social, games).
        #[arg(long)]
        demo: bool,
        /// Events per second of each demo feed [default: 200].
        #[arg(long)]
        demo_rate: Option<u32>,
        /// Folder for the ingest log, checkpoints and deployed queries [default: eddy-data next
        /// to the config file, or in the working folder].
        #[arg(long, conflicts_with = "ephemeral")]
        data_dir: Option<PathBuf>,
        /// Keep everything in memory: a restart starts empty.
        #[arg(long)]
        ephemeral: bool,
        /// When the ingest log is synced: always (group commit), never, or an interval (10ms).
        #[arg(long)]
        fsync: Option<String>,
        /// How often every key's state is checkpointed [default: 10s].
        #[arg(long)]
        checkpoint_interval: Option<String>,
        /// `auto`: compile each query where possible; `interpreter`: interpret everything
        /// [default: auto].
        #[arg(long, value_enum)]
        engine: Option<EngineMode>,
        /// Run as one node of a cluster on NATS JetStream: its URLs, comma-separated
        /// (nats://h1:4222,nats://h2:4222). The rest of `[cluster]` comes from the config file.
        #[arg(long)]
        cluster: Option<String>,
        /// This node's name in the cluster [default: host name and the port it listens on];
        /// with the NATS URLs from `--cluster` or from `[cluster]` in the config file.
        #[arg(long)]
        node: Option<String>,
    },
    /// Deploy (or replace) a query, or with --model an ONNX model, on a running server.
    Deploy {
        /// The query file; its stem is the query's name.
        #[arg(required_unless_present = "model", conflicts_with = "model")]
        file: Option<PathBuf>,
        /// An ONNX model file to upload instead; its stem is the model's name.
        #[arg(long)]
        model: Option<PathBuf>,
        /// The server's base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        server: String,
        /// The server's admin token.
        #[arg(long, env = "EDDY_ADMIN_TOKEN")]
        token: String,
        /// Replace the running version keeping every key's state (through the new script's
        /// `fn migrate(old)` if it has one).
        #[arg(long, conflicts_with = "model")]
        keep_state: bool,
    },
    /// Load generator: send synthetic events with acks, paced or as fast as acks allow.
    Feed {
        /// The server, e.g. ws://127.0.0.1:8080.
        url: String,
        #[arg(long, default_value = "trades")]
        scenario: Scenario,
        /// Events per second over all connections, or `max`.
        #[arg(long, default_value = "max")]
        rate: String,
        /// Events per frame.
        #[arg(long, default_value_t = 100)]
        batch: usize,
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// How long to send, e.g. 10s.
        #[arg(long, default_value = "10s")]
        duration: String,
        /// Distinct keys [default: the scenario's].
        #[arg(long, default_value_t = 0)]
        keys: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Connect again (with backoff) when the server goes away, until the duration is over.
        #[arg(long)]
        reconnect: bool,
        /// How long the server may stay silent (no ack, no pong) before the connection is lost.
        #[arg(long, default_value = "1s")]
        timeout: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Subscribe to a topic and report end-to-end latency of items stamped by `eddy feed`.
    Probe {
        /// The server, e.g. ws://127.0.0.1:8080.
        url: String,
        #[arg(long)]
        topic: String,
        /// How long to listen after the first item, e.g. 10s.
        #[arg(long, default_value = "10s")]
        duration: String,
        /// Subscribers to open (fan-out); their latencies are merged.
        #[arg(long, default_value_t = 1)]
        subscribers: usize,
        /// Subscription mode.
        #[arg(long, value_enum, default_value = "all")]
        mode: eddy::probe::Mode,
        /// Connect and subscribe again (with backoff) when the server goes away.
        #[arg(long)]
        reconnect: bool,
        /// How long the server may stay silent (no frame, no pong) before the connection is lost.
        #[arg(long, default_value = "1s")]
        timeout: String,
        /// A field of the items' values that counts each key's items from 1 (e.g. `trades` of
        /// vwap): checked per key for gaps and repeats, and each key's last count is summed.
        #[arg(long)]
        count_field: Option<String>,
        /// Also print latency and items every this long (e.g. 10s).
        #[arg(long)]
        interval: Option<String>,
        /// Offer permessage-deflate, as browsers do: batch frames then come compressed, and
        /// without --count-field only each batch's head and first item are inflated.
        #[arg(long)]
        deflate: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write seeded synthetic events as NDJSON to stdout.
    Generate {
        /// trades, sensors, social or games.
        #[arg(long)]
        scenario: Scenario,
        /// Number of events.
        #[arg(long, default_value_t = 1000)]
        count: u64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Event time of the first event, epoch ms.
        #[arg(long, default_value_t = 1_700_000_000_000)]
        start_ms: i64,
        /// Mean gap between event times, ms.
        #[arg(long, default_value_t = 100)]
        interval_ms: u32,
    },
}

/// `println!` for what a command prints as its result, to stdout: a closed pipe (`eddy check
/// q.rhai | head -1`) is an error ("writing output: Broken pipe"), not a panic.
macro_rules! say {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout().lock(), $($arg)*).context("writing output")?
    };
}

fn main() -> ExitCode {
    // Before any Rhai engine is made: the interpreter's work then repeats from run to run.
    eddy::sandbox::fix_hashing_seed();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDDY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = std::thread::Builder::new()
        .name("eddy-main".into())
        .stack_size(SCRIPT_STACK_BYTES)
        .spawn(move || dispatch(cli))
        .expect("spawn main thread")
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("internal error: the command panicked")));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("eddy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    let limits = Limits::default();
    match cli.command {
        Command::Run {
            queries,
            input,
            stream,
            models,
            engine,
        } => {
            load_models(models, &limits)?;
            let defs = load_queries(&queries, &limits)?;
            let data = read_input(&input)?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
            let mut err = std::io::stderr();
            let summary = offline::run(
                defs,
                data,
                &limits,
                &RunOptions { stream, engine },
                &mut out,
                &mut err,
            )
            .context("writing output")?;
            out.flush().context("writing output")?;
            eprintln!(
                "eddy run: {} items, {} accepted, {} rejected, {} late, {} emitted, {} script errors, {} timers fired",
                summary.items,
                summary.accepted,
                summary.rejected,
                summary.late,
                summary.emitted,
                summary.errors,
                summary.timers_fired
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            config,
            listen,
            shards,
            workers,
            time_slice_us,
            queries,
            models,
            admin_token,
            demo,
            demo_rate,
            data_dir,
            ephemeral,
            fsync,
            checkpoint_interval,
            engine,
            cluster,
            node,
        } => {
            let mut raw = match &config {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("{}: cannot read config", path.display()))?;
                    RawConfig::from_toml(&text).with_context(|| path.display().to_string())?
                }
                None => RawConfig::default(),
            };
            raw.listen = listen.or(raw.listen);
            raw.shards = shards.or(raw.shards);
            raw.workers = workers.or(raw.workers);
            raw.time_slice_us = time_slice_us.or(raw.time_slice_us);
            raw.queries = queries.or(raw.queries);
            raw.models = models.or(raw.models);
            raw.admin_token = admin_token.or(raw.admin_token);
            raw.demo = Some(demo || raw.demo.unwrap_or(false));
            raw.demo_rate = demo_rate.or(raw.demo_rate);
            raw.fsync = fsync.or(raw.fsync);
            raw.checkpoint_interval = checkpoint_interval
                .map(eddy::server::config::RawDuration::Text)
                .or(raw.checkpoint_interval);
            if ephemeral {
                raw.ephemeral = Some(true);
            }
            // The data directory of a config file is found next to it (a cluster has none).
            let clustered = cluster.is_some() || raw.cluster.is_some();
            raw.data_dir = data_dir.or(raw.data_dir).or_else(|| {
                if clustered {
                    return None;
                }
                let dir = config.as_ref()?.parent()?;
                Some(dir.join(eddy::server::config::DEFAULT_DATA_DIR))
            });
            raw.engine = engine.or(raw.engine);
            if let Some(urls) = cluster {
                let c = raw.cluster.get_or_insert_with(Default::default);
                c.urls = Some(vec![urls]);
            }
            if let Some(node) = node {
                raw.cluster.get_or_insert_with(Default::default).node = Some(node);
            }
            let config = raw.validate()?;
            let generated = config.admin_token.is_none();
            // Before any other thread starts: the runtime's workers and the shards inherit it.
            if let Some(us) = config.time_slice_us {
                if let Err(e) = eddy::sched::request_time_slice(us) {
                    tracing::warn!(
                        "time_slice_us = {us}: the kernel refused it ({e}); using its default"
                    );
                }
            }
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.workers)
                .on_thread_park(eddy::shard::collect_if_asked)
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(async move {
                    let server = Server::start(config).await?;
                    say!("eddy listening on http://{}", server.addr);
                    if generated {
                        say!("admin token: {}", server.state.admin_token);
                    }
                    eddy::server::run(server).await;
                    anyhow::Ok(())
                })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Deploy {
            file: _,
            model: Some(model),
            server,
            token,
            ..
        } => {
            let bytes = std::fs::read(&model)
                .with_context(|| format!("{}: cannot read model", model.display()))?;
            let name = model
                .file_stem()
                .and_then(|s| s.to_str())
                .with_context(|| {
                    format!("{}: no file name to name the model by", model.display())
                })?;
            let (status, body) = http_put(&server, &format!("/models/{name}"), &token, &bytes)?;
            if (200..300).contains(&status) {
                say!("{name}: model loaded ({status}) {body}");
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("{name}: {status} {body}");
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Deploy {
            file,
            model: None,
            server,
            token,
            keep_state,
        } => {
            let file = file.context("a query file or --model FILE is needed")?;
            let script = std::fs::read_to_string(&file)
                .with_context(|| format!("{}: cannot read query", file.display()))?;
            let name = eddy::query::name_of_file(&file).with_context(|| {
                format!("{}: no file name to name the query by", file.display())
            })?;
            let keep = if keep_state { "?state=keep" } else { "" };
            let (status, body) = http_put(
                &server,
                &format!("/queries/{name}{keep}"),
                &token,
                script.as_bytes(),
            )?;
            if (200..300).contains(&status) {
                say!("{name}: deployed ({status}) {body}");
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("{name}: {status} {body}");
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Feed {
            url,
            scenario,
            rate,
            batch,
            connections,
            duration,
            keys,
            seed,
            reconnect,
            timeout,
            json,
        } => {
            let rate = match rate.as_str() {
                "max" => None,
                n => Some(
                    n.parse::<u64>()
                        .with_context(|| format!("--rate {n:?}: a number or `max`"))?,
                ),
            };
            if batch == 0 {
                bail!("--batch must be at least 1");
            }
            let options = eddy::feed::FeedOptions {
                url,
                scenario,
                rate,
                batch,
                connections,
                duration: parse_duration(&duration)?,
                keys,
                seed,
                reconnect,
                timeout: parse_duration(&timeout)?,
            };
            let rt = runtime()?;
            let stop = rt.block_on(async { stop_on_signal() });
            let report = rt.block_on(eddy::feed::run_until(options, !json, stop))?;
            if json {
                say!("{}", serde_json::to_string(&report)?);
            } else {
                say!(
                    "sent {} events in {} frames in {:.1} s: {:.0} events/s, {:.0} frames/s; {} accepted, {} rejected",
                    report.events,
                    report.frames,
                    report.seconds,
                    report.events_per_second,
                    report.frames_per_second,
                    report.accepted,
                    report.rejected
                );
                if report.lost + report.connect_failures + report.ack_gaps + report.ack_duplicates
                    > 0
                {
                    say!(
                        "{} connections lost, {} reconnects, {} failed connects, {} events unacknowledged, {} ack gaps, {} duplicate acks",
                        report.lost,
                        report.reconnects,
                        report.connect_failures,
                        report.unacked,
                        report.ack_gaps,
                        report.ack_duplicates
                    );
                }
            }
            if let Some(error) = &report.error {
                eprintln!("feed stopped: {error}");
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Probe {
            url,
            topic,
            duration,
            subscribers,
            mode,
            reconnect,
            timeout,
            count_field,
            interval,
            deflate,
            json,
        } => {
            let duration = parse_duration(&duration)?;
            if subscribers > 1 {
                let report = runtime()?.block_on(eddy::probe::fan_out(
                    &url,
                    &topic,
                    duration,
                    subscribers,
                    deflate,
                ))?;
                if json {
                    say!("{}", serde_json::to_string(&report)?);
                } else {
                    say!(
                        "probe {topic} x{}: items per subscriber {}..{}, {} dropped, {} seq gaps; latency p50 {:.3} ms  p99 {:.3} ms  p999 {:.3} ms  max {:.3} ms",
                        report.subscribers,
                        report.min_items,
                        report.max_items,
                        report.dropped,
                        report.seq_gaps,
                        report.p50_us as f64 / 1000.0,
                        report.p99_us as f64 / 1000.0,
                        report.p999_us as f64 / 1000.0,
                        report.max_us as f64 / 1000.0
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            let options = eddy::probe::ProbeOptions {
                mode,
                reconnect,
                timeout: parse_duration(&timeout)?,
                count_field,
                interval: interval.as_deref().map(parse_duration).transpose()?,
                deflate,
                ..eddy::probe::ProbeOptions::new(&url, &topic, duration)
            };
            let rt = runtime()?;
            let stop = rt.block_on(async { stop_on_signal() });
            let report = rt.block_on(eddy::probe::run_with(&options, stop, |one| {
                if json {
                    if let Ok(line) = serde_json::to_string(one) {
                        let _ = writeln!(std::io::stdout().lock(), "{{\"interval\":{line}}}");
                    }
                } else {
                    let _ = writeln!(
                        std::io::stdout().lock(),
                        "{:>7.1}s  {:>8} items  p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms{}",
                        one.t,
                        one.items,
                        one.p50_us as f64 / 1000.0,
                        one.p99_us as f64 / 1000.0,
                        one.max_us as f64 / 1000.0,
                        if one.connected {
                            ""
                        } else {
                            "  (disconnected)"
                        }
                    );
                }
                let _ = std::io::stdout().flush();
            }))?;
            if json {
                say!("{}", serde_json::to_string(&report)?);
            } else {
                eddy::probe::print(&report, &topic);
            }
            if let Some(error) = &report.error {
                eprintln!("probe stopped: {error}");
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Test {
            paths,
            bless,
            models,
        } => {
            load_models(models, &limits)?;
            let paths = if paths.is_empty() {
                vec![PathBuf::from(DEFAULT_CASES)]
            } else {
                paths
            };
            // The error names its path and carries its cause in its message: print it once.
            let cases = match eddy::casetest::discover(&paths) {
                Ok(cases) => cases,
                Err(e) => {
                    eprintln!("eddy test: {e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let mut failed = 0;
            for dir in &cases {
                let report = eddy::casetest::run_case(dir, &limits, bless);
                if !report.passed() {
                    failed += 1;
                }
                say!("{report}");
            }
            let passed = cases.len() - failed;
            let what = if bless { "blessed" } else { "passed" };
            say!("eddy test: {passed} {what}, {failed} failed");
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Check { queries } => {
            let mut failed = false;
            for path in &queries {
                match load_query(path, &limits) {
                    Ok(def) => {
                        say!("{}: ok: {def}: {}", path.display(), def.engine.summary());
                        for line in def.engine.function_lines() {
                            say!("  {line}");
                        }
                    }
                    Err(e) => {
                        failed = true;
                        eprintln!("{e:#}");
                    }
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Generate {
            scenario,
            count,
            seed,
            start_ms,
            interval_ms,
        } => {
            let data = synth::generate(scenario, seed, count, start_ms, interval_ms);
            std::io::stdout()
                .lock()
                .write_all(&data)
                .context("writing output")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// A token cancelled at Ctrl-C or SIGTERM, so a client can print its report and exit.
fn stop_on_signal() -> tokio_util::sync::CancellationToken {
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match &mut term { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        token.cancel();
    });
    stop
}

fn parse_duration(text: &str) -> Result<std::time::Duration> {
    let ms = eddy_plugins::parse_duration_ms(text).with_context(|| format!("duration {text:?}"))?;
    Ok(std::time::Duration::from_millis(ms.max(0) as u64))
}

/// Loads the `.onnx` models of `--models`, or of `./models` if it exists (`eddy run`, `eddy test`).
fn load_models(models: Option<PathBuf>, limits: &Limits) -> Result<()> {
    let explicit = models.is_some();
    let folder = models.unwrap_or_else(|| PathBuf::from("models"));
    if explicit && !folder.is_dir() {
        bail!("--models {}: not a folder", folder.display());
    }
    limits
        .models
        .load_dir(&folder, limits)
        .with_context(|| format!("loading models from {}", folder.display()))?;
    Ok(())
}

fn load_queries(paths: &[PathBuf], limits: &Limits) -> Result<Vec<QueryDef>> {
    let defs = paths
        .iter()
        .map(|p| load_query(p, limits))
        .collect::<Result<Vec<_>>>()?;
    for (i, def) in defs.iter().enumerate() {
        if defs[..i].iter().any(|d| d.name == def.name) {
            bail!("two queries are named `{}`", def.name);
        }
    }
    Ok(defs)
}

fn load_query(path: &Path, limits: &Limits) -> Result<QueryDef> {
    let script = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read query", path.display()))?;
    let name = eddy::query::name_of_file(path)
        .with_context(|| format!("{}: no file name to name the query by", path.display()))?;
    QueryDef::compile(name, &script, limits).with_context(|| path.display().to_string())
}

fn read_input(path: &Path) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    if path == Path::new("-") {
        std::io::stdin()
            .lock()
            .read_to_end(&mut data)
            .context("reading stdin")?;
    } else {
        data = std::fs::read(path)
            .with_context(|| format!("{}: cannot read input", path.display()))?;
    }
    Ok(data)
}

/// A minimal HTTP/1.1 PUT over plain TCP, for `eddy deploy`: returns status and body.
fn http_put(base: &str, path: &str, token: &str, body: &[u8]) -> Result<(u16, String)> {
    let host = base
        .strip_prefix("http://")
        .with_context(|| format!("server URL {base:?} must start with http://"))?
        .trim_end_matches('/');
    let mut stream =
        std::net::TcpStream::connect(host).with_context(|| format!("connecting to {host}"))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    let request = format!(
        "PUT {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .and_then(|()| stream.write_all(body))
        .context("sending the file")?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .context("reading the answer")?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP answer: {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .trim()
        .to_owned();
    Ok((status, body))
}
