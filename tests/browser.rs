//! Browser tier: the dashboard (`GET /`) in headless Chromium, driven through the DevTools
//! protocol (CDP over WebSocket with tokio-tungstenite), against the real `eddy serve --demo`
//! binary on 127.0.0.1.
//!
//! Every test is `#[ignore]`: it needs Debian's `chromium` at /usr/bin/chromium. Run with
//!
//! ```sh
//! cargo test --release --test browser -- --ignored --test-threads=1
//! ```
//!
//! Each test is bounded in time, kills the server and the browser when it ends (also on
//! failure), and saves a screenshot under `target/browser/` (`failure-<test>.png` when it fails).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::{sleep, timeout, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[path = "support/nats.rs"]
mod nats;

const CHROMIUM: &str = "/usr/bin/chromium";
/// Bound on one whole test.
const TEST_LIMIT: Duration = Duration::from_secs(60);
/// Bound on the whole tier, from the start of the first test (they run one at a time).
const TIER_LIMIT: Duration = Duration::from_secs(90);
static TIER_START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
/// Bound on one DevTools command.
const CALL_LIMIT: Duration = Duration::from_secs(15);
/// Bound on a process printing its start-up lines.
const START_LIMIT: Duration = Duration::from_secs(20);

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn out_dir() -> PathBuf {
    manifest().join("target/browser")
}

// ------------------------------------------------------------------------------------ processes

/// `eddy serve --demo` on 127.0.0.1; killed when dropped.
struct Eddy {
    child: Child,
    addr: String,
    token: String,
}

impl Eddy {
    async fn start(listen: &str) -> Result<Eddy> {
        Eddy::start_with(&[
            "--ephemeral",
            "--demo",
            "--demo-rate",
            "1000",
            "--listen",
            listen,
        ])
        .await
    }

    /// `eddy serve ARGS --queries queries/`.
    async fn start_with(args: &[&str]) -> Result<Eddy> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_eddy"))
            .arg("serve")
            .args(args)
            .arg("--queries")
            .arg(manifest().join("queries"))
            .env("EDDY_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the eddy binary")?;
        let stdout = child.stdout.take().context("eddy stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let (mut addr, mut token) = (None, None);
        let read = async {
            while addr.is_none() || token.is_none() {
                let Some(line) = lines.next_line().await? else {
                    bail!("eddy exited before printing its address and admin token");
                };
                if let Some(a) = line.strip_prefix("eddy listening on http://") {
                    addr = Some(a.trim().to_owned());
                } else if let Some(t) = line.strip_prefix("admin token: ") {
                    token = Some(t.trim().to_owned());
                }
            }
            Ok(())
        };
        timeout(START_LIMIT, read)
            .await
            .context("eddy printed no address and token in time")??;
        drain(lines.into_inner());
        let addr = addr.context("address")?;
        if !addr.starts_with("127.0.0.1:") {
            bail!("eddy listens on {addr}, expected 127.0.0.1");
        }
        Ok(Eddy {
            child,
            addr,
            token: token.context("token")?,
        })
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Reads and discards a child's output so it never blocks on a full pipe.
fn drain(reader: impl AsyncRead + Unpin + Send + 'static) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(_)) = lines.next_line().await {}
    });
}

/// Headless Chromium with a fresh profile; killed when dropped (the profile after it).
struct Chromium {
    child: Child,
    ws_url: String,
    _profile: tempfile::TempDir,
}

impl Chromium {
    async fn start() -> Result<Chromium> {
        if !Path::new(CHROMIUM).exists() {
            bail!(
                "{CHROMIUM} is missing: the browser tests need Debian's chromium \
                 (apt-get install -y chromium)"
            );
        }
        let profile = tempfile::tempdir()?;
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
                "--window-size=1280,800",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {CHROMIUM}"))?;
        let stderr = child.stderr.take().context("chromium stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let mut seen = Vec::new();
        let find = async {
            while let Some(line) = lines.next_line().await? {
                if let Some(at) = line.find("ws://") {
                    if line.contains("DevTools listening on") {
                        return Ok(line[at..].trim().to_owned());
                    }
                }
                seen.push(line);
            }
            bail!("chromium exited: {}", seen.join("\n"))
        };
        let ws_url = timeout(START_LIMIT, find)
            .await
            .context("chromium printed no `DevTools listening on` line in time")??;
        drain(lines.into_inner());
        if !ws_url.starts_with("ws://127.0.0.1:") {
            bail!("DevTools endpoint {ws_url} is not on 127.0.0.1");
        }
        Ok(Chromium {
            child,
            ws_url,
            _profile: profile,
        })
    }
}

// ------------------------------------------------------------------------------------ CDP

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A sequential DevTools client attached to one page (flattened session on the browser
/// endpoint). Events are read and ignored.
struct Cdp {
    ws: Ws,
    next_id: u64,
    session: Option<String>,
}

impl Cdp {
    async fn connect(browser: &Chromium) -> Result<Cdp> {
        let (ws, _) = timeout(
            CALL_LIMIT,
            tokio_tungstenite::connect_async(&browser.ws_url),
        )
        .await
        .context("DevTools connect timed out")??;
        let mut cdp = Cdp {
            ws,
            next_id: 0,
            session: None,
        };
        let targets = cdp.call("Target.getTargets", json!({})).await?;
        let page = targets["targetInfos"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["targetId"].as_str())
            .map(str::to_owned);
        let target = match page {
            Some(id) => id,
            None => cdp
                .call("Target.createTarget", json!({"url": "about:blank"}))
                .await?["targetId"]
                .as_str()
                .context("targetId")?
                .to_owned(),
        };
        let attached = cdp
            .call(
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
            )
            .await?;
        cdp.session = Some(attached["sessionId"].as_str().context("sessionId")?.into());
        cdp.call("Page.enable", json!({})).await?;
        cdp.call("Runtime.enable", json!({})).await?;
        cdp.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await?;
        cdp.call("Page.bringToFront", json!({})).await?;
        Ok(cdp)
    }

    async fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::Text(msg.to_string().into())).await?;
        let deadline = Instant::now() + CALL_LIMIT;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .with_context(|| format!("{method}: no answer within {CALL_LIMIT:?}"))?
                .ok_or_else(|| anyhow!("{method}: DevTools connection closed"))??;
            let text = match frame {
                Message::Text(t) => t.to_string(),
                Message::Binary(b) => String::from_utf8_lossy(&b).into_owned(),
                Message::Close(c) => bail!("{method}: DevTools connection closed: {c:?}"),
                _ => continue,
            };
            let v: Value = serde_json::from_str(&text)?;
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    bail!("{method} failed: {e}");
                }
                return Ok(v["result"].clone());
            }
        }
    }

    /// Evaluates `expr` in the page (promises awaited) and returns its JSON value.
    async fn eval(&mut self, expr: &str) -> Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            let text = e["exception"]["description"]
                .as_str()
                .or_else(|| e["text"].as_str())
                .unwrap_or("exception");
            bail!("page threw evaluating `{expr}`: {text}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Polls `expr` until it is truthy; returns its value.
    async fn wait_for(&mut self, what: &str, expr: &str, within: Duration) -> Result<Value> {
        let deadline = Instant::now() + within;
        loop {
            let v = self.eval(expr).await?;
            if truthy(&v) {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                bail!("timed out after {within:?} waiting for {what} (last value: {v})");
            }
            sleep(Duration::from_millis(100)).await;
        }
    }

    async fn navigate(&mut self, url: &str) -> Result<()> {
        let r = self.call("Page.navigate", json!({"url": url})).await?;
        if let Some(e) = r.get("errorText") {
            bail!("cannot load {url}: {e}");
        }
        self.wait_for(
            "the page to load",
            "document.readyState === 'complete'",
            Duration::from_secs(10),
        )
        .await?;
        Ok(())
    }

    /// A real mouse click in the middle of the element `selector` (scrolled into view).
    async fn click(&mut self, selector: &str) -> Result<()> {
        let expr = format!(
            "(() => {{ const e = document.querySelector({sel}); if (!e) return null; \
             e.scrollIntoView({{block: 'nearest'}}); const r = e.getBoundingClientRect(); \
             return r.width && r.height ? [r.x + r.width / 2, r.y + r.height / 2] : null; }})()",
            sel = json!(selector)
        );
        let at = self
            .wait_for(
                &format!("`{selector}` to be visible"),
                &expr,
                Duration::from_secs(5),
            )
            .await?;
        let (x, y) = (at[0].as_f64().unwrap_or(0.0), at[1].as_f64().unwrap_or(0.0));
        for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            )
            .await?;
        }
        Ok(())
    }

    /// Focuses the input or textarea `selector`, selects its content and types `text` over it.
    async fn type_into(&mut self, selector: &str, text: &str) -> Result<()> {
        self.click(selector).await?;
        self.eval(&format!(
            "(() => {{ const e = document.querySelector({}); e.focus(); e.select(); }})()",
            json!(selector)
        ))
        .await?;
        self.call("Input.insertText", json!({"text": text})).await?;
        let value = self
            .eval(&format!(
                "document.querySelector({}).value",
                json!(selector)
            ))
            .await?;
        if value != text {
            bail!("typed {text:?} into {selector}, it holds {value}");
        }
        Ok(())
    }

    async fn screenshot(&mut self, name: &str) -> Result<PathBuf> {
        let r = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await?;
        let png = base64_decode(r["data"].as_str().context("screenshot data")?)?;
        if !png.starts_with(b"\x89PNG") {
            bail!("the screenshot is not a PNG");
        }
        std::fs::create_dir_all(out_dir())?;
        let path = out_dir().join(name);
        std::fs::write(&path, png)?;
        Ok(path)
    }

    async fn close_browser(&mut self) {
        self.session = None;
        let _ = timeout(
            Duration::from_secs(3),
            self.call("Browser.close", json!({})),
        )
        .await;
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        _ => true,
    }
}

fn base64_decode(s: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\n' | b'\r' => continue,
            _ => bail!("bad base64 byte {c}"),
        };
        acc = acc << 6 | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

// ------------------------------------------------------------------------------------ harness

/// One server, one browser, one page on the dashboard, connected and live.
struct Harness {
    cdp: Cdp,
    eddy: Eddy,
    browser: Chromium,
}

impl Harness {
    async fn start() -> Result<Harness> {
        let browser = Chromium::start().await?;
        let eddy = Eddy::start("127.0.0.1:0").await?;
        let mut cdp = Cdp::connect(&browser).await?;
        cdp.navigate(&format!("http://{}/", eddy.addr)).await?;
        cdp.wait_for(
            "the connection state to show live",
            "(() => { const s = document.querySelector('#conn-state'); \
             return s.dataset.state === 'live' && s.textContent.trim() === 'live'; })()",
            Duration::from_secs(10),
        )
        .await?;
        Ok(Harness { cdp, eddy, browser })
    }

    async fn finish(mut self) {
        self.cdp.close_browser().await;
        let _ = timeout(Duration::from_secs(2), self.browser.child.wait()).await;
        let _ = self.browser.child.kill().await;
        self.eddy.stop().await;
    }
}

/// Runs `scenario` under the test bound; on failure saves a screenshot and panics with the
/// reason. The server and the browser are stopped either way.
async fn run<F>(name: &str, scenario: F)
where
    F: for<'a> FnOnce(&'a mut Harness) -> futures_util::future::BoxFuture<'a, Result<()>>,
{
    let started = std::time::Instant::now();
    let tier_left = TIER_LIMIT.saturating_sub(TIER_START.get_or_init(|| started).elapsed());
    let limit = TEST_LIMIT.min(tier_left);
    let outcome = timeout(limit, async {
        let mut h = Harness::start().await?;
        let result = scenario(&mut h).await;
        if result.is_err() {
            let _ = h.cdp.screenshot(&format!("failure-{name}.png")).await;
        }
        h.finish().await;
        result
    })
    .await;
    match outcome {
        Err(_) => panic!(
            "{name}: did not finish within {limit:?} (each test has {TEST_LIMIT:?}, the tier \
             {TIER_LIMIT:?})"
        ),
        Ok(Err(e)) => panic!(
            "{name}: {e:#}\n(screenshot: {})",
            out_dir().join(format!("failure-{name}.png")).display()
        ),
        Ok(Ok(())) => eprintln!("{name}: passed in {:.1?}", started.elapsed()),
    }
}

/// The text of the table row of `key` (every cell but the sparkline), or null.
fn row_text(key: &str) -> String {
    format!(
        "(() => {{ const r = document.querySelector('#table tbody tr[data-key=\"' + CSS.escape({}) + '\"]'); \
         return r ? [...r.cells].slice(0, -1).map(c => c.textContent).join('|') : null; }})()",
        json!(key)
    )
}

/// Counts chart pixels in saturated colour (the series; the grid and labels are grey).
const CHART_PIXELS: &str = "(() => { const c = document.querySelector('#chart'); \
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0; \
    for (let i = 0; i < d.length; i += 4) { \
      const hi = Math.max(d[i], d[i + 1], d[i + 2]), lo = Math.min(d[i], d[i + 1], d[i + 2]); \
      if (hi - lo > 80) n++; } \
    return n; })()";

async fn open_topic(cdp: &mut Cdp, topic: &str, min_rows: u64) -> Result<()> {
    cdp.click(&format!("#topics [data-topic=\"{topic}\"]"))
        .await?;
    cdp.wait_for(
        &format!("{min_rows} rows of {topic}"),
        &format!(
            "document.querySelector('#title').textContent === {} && \
             document.querySelectorAll('#table tbody tr[data-key]').length >= {min_rows}",
            json!(topic)
        ),
        Duration::from_secs(8),
    )
    .await?;
    Ok(())
}

// ------------------------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs /usr/bin/chromium: cargo test --release --test browser -- --ignored --test-threads=1"]
async fn live_table_chart_health_and_alerts() {
    run("live", |h| Box::pin(live(h))).await;
}

async fn live(h: &mut Harness) -> Result<()> {
    let cdp = &mut h.cdp;
    // Topics, grouped by query.
    cdp.wait_for(
        "the topics of every shipped query",
        "['vwap', 'ohlc_1m', 'price_alerts', 'sensor_anomaly', 'hashtag_sentiment', 'player_stats', 'asof_join']\
         .every(q => document.querySelector('#topics .group[data-query=\"' + q + '\"] [data-topic=\"' + q + '\"]'))",
        Duration::from_secs(5),
    )
    .await?;

    // The vwap table: 50 symbols, a row per key, live values.
    open_topic(cdp, "vwap", 20).await?;
    let headers = cdp
        .eval("[...document.querySelectorAll('#table thead th')].map(t => t.dataset.col)")
        .await?;
    for col in ["#key", "vwap", "volume", "trades", "last"] {
        if !headers.as_array().is_some_and(|h| h.contains(&json!(col))) {
            bail!("the vwap table has no column {col}: {headers}");
        }
    }
    let first = cdp
        .eval("document.querySelector('#table tbody tr[data-key]').dataset.key")
        .await?;
    let key = first.as_str().context("a row key")?.to_owned();
    let before = cdp.eval(&row_text(&key)).await?;
    cdp.wait_for(
        &format!("row {key} to change (was {before})"),
        &format!("(v => v !== null && v !== {before})({})", row_text(&key)),
        Duration::from_secs(5),
    )
    .await?;

    // The chart: field `vwap` by default, the first keys selected, lines drawn.
    let field = cdp.eval("document.querySelector('#field').value").await?;
    if field != "vwap" {
        bail!("the chart field is {field}, expected vwap");
    }
    cdp.wait_for(
        "the chart legend to list the default keys",
        "document.querySelectorAll('#legend span').length >= 3",
        Duration::from_secs(5),
    )
    .await?;
    let drawn = cdp
        .wait_for(
            "coloured series pixels on #chart",
            &format!("(n => n > 150 ? n : 0)({CHART_PIXELS})"),
            Duration::from_secs(5),
        )
        .await?;
    eprintln!("chart: {drawn} series pixels");
    cdp.wait_for(
        "sparklines drawn in the rows",
        "(() => { const c = document.querySelector('#table tbody tr[data-key] td.spark canvas'); \
         const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; \
         for (let i = 3; i < d.length; i += 4) if (d[i]) return true; return false; })()",
        Duration::from_secs(5),
    )
    .await?;

    // Selecting a row adds it to the chart.
    let unselected = cdp
        .eval("document.querySelector('#table tbody tr[data-key]:not(.sel)').dataset.key")
        .await?;
    let unselected = unselected.as_str().context("an unselected row")?.to_owned();
    let legend = cdp
        .eval("document.querySelectorAll('#legend span').length")
        .await?;
    cdp.click(&format!("#table tbody tr[data-key=\"{unselected}\"] td.k"))
        .await?;
    cdp.wait_for(
        "the clicked row to be charted",
        &format!(
            "document.querySelector('#table tbody tr[data-key=\"{unselected}\"]').classList.contains('sel') && \
             document.querySelectorAll('#legend span').length === {legend} + 1"
        ),
        Duration::from_secs(3),
    )
    .await?;

    // Sorting by the key column (descending, then back), and the key filter.
    let keys_js =
        "[...document.querySelectorAll('#table tbody tr[data-key]')].map(r => r.dataset.key)";
    cdp.click("#table thead th[data-col=\"#key\"]").await?;
    cdp.wait_for(
        "rows sorted by key, descending",
        &format!(
            "(k => k.length > 1 && k.every((x, i) => i === 0 || k[i - 1].localeCompare(x, undefined, {{numeric: true}}) >= 0))({keys_js})"
        ),
        Duration::from_secs(3),
    )
    .await?;
    cdp.click("#table thead th[data-col=\"vwap\"]").await?;
    cdp.wait_for(
        "the vwap header marked as the sort column",
        "document.querySelector('#table thead th[data-col=\"vwap\"]').classList.contains('sorted')",
        Duration::from_secs(3),
    )
    .await?;
    cdp.type_into("#filter", &key).await?;
    cdp.wait_for(
        &format!("the filter to keep only keys containing {key}"),
        &format!(
            "(k => k.length >= 1 && k.every(x => x.includes({})))({keys_js})",
            json!(key)
        ),
        Duration::from_secs(3),
    )
    .await?;
    cdp.eval(
        "(() => { const f = document.querySelector('#filter'); f.value = ''; \
         f.dispatchEvent(new Event('input')); })()",
    )
    .await?;
    cdp.click("#table thead th[data-col=\"#key\"]").await?;
    cdp.wait_for(
        "all rows back",
        &format!("{keys_js}.length >= 20"),
        Duration::from_secs(3),
    )
    .await?;

    // A query without key_by whose items carry their own key (emit_to): a row per hashtag,
    // keyed by the hashtag the item is about.
    open_topic(cdp, "hashtag_sentiment", 10).await?;
    cdp.wait_for(
        "a row per hashtag, keyed by its hashtag",
        "(() => { const cols = [...document.querySelectorAll('#table thead th')].map(t => t.dataset.col); \
         const h = cols.indexOf('hashtag'); if (h < 0) return null; \
         const rows = [...document.querySelectorAll('#table tbody tr[data-key]')]; \
         const keys = new Set(rows.map(r => r.dataset.key)); \
         const ok = rows.every(r => r.cells[0].textContent === r.dataset.key && \
           r.cells[h].textContent.replace(/\"/g, '') === r.dataset.key); \
         return rows.length >= 10 && keys.size === rows.length && ok ? rows.length : null; })()",
        Duration::from_secs(5),
    )
    .await?;
    // The as-of join of the demo's trades and quotes, live.
    open_topic(cdp, "asof_join", 10).await?;
    let headers = cdp
        .eval("[...document.querySelectorAll('#table thead th')].map(t => t.dataset.col)")
        .await?;
    for col in ["bid", "ask", "mid", "side", "quote_age_ms"] {
        if !headers.as_array().is_some_and(|h| h.contains(&json!(col))) {
            bail!("the asof_join table has no column {col}: {headers}");
        }
    }

    // The health strip.
    let health = cdp
        .wait_for(
            "the health strip to show rates",
            "(() => { const t = id => document.getElementById(id).textContent; \
             const n = s => parseFloat(s) * (s.endsWith('k') ? 1000 : 1); \
             return n(t('h-events')) > 100 && n(t('h-items')) > 100 && /ms$/.test(t('h-p99')) && \
               Number(t('h-subs')) >= 1 ? [t('h-events'), t('h-items'), t('h-p99'), t('h-subs')] : null; })()",
            Duration::from_secs(6),
        )
        .await?;
    eprintln!("health strip: in/s, out/s, p99, subscribers = {health}");
    // A server alone has no cluster figures: that part of the strip stays hidden.
    if cdp
        .eval("document.getElementById('h-cluster').hidden")
        .await?
        != json!(true)
    {
        bail!("the health strip shows cluster figures on a server that runs alone");
    }

    // Alerts from price_alerts (a topic that only exists once it has emitted: the page finds
    // it by re-asking for the topics).
    cdp.wait_for(
        "a price_alerts alert in the feed",
        "document.querySelector('#alerts .alert[data-topic=\"price_alerts.alerts\"]') !== null",
        Duration::from_secs(20),
    )
    .await?;
    let alert = cdp
        .eval("document.querySelector('#alerts .alert[data-topic=\"price_alerts.alerts\"]').textContent")
        .await?;
    if !alert.as_str().is_some_and(|a| a.contains("zscore")) {
        bail!("the alert does not show its fields: {alert}");
    }
    cdp.wait_for(
        "price_alerts.alerts in the topics list",
        "document.querySelector('#topics [data-topic=\"price_alerts.alerts\"]') !== null",
        Duration::from_secs(6),
    )
    .await?;
    let feed = cdp
        .eval("document.querySelectorAll('#alerts .alert').length")
        .await?;
    if feed.as_u64().is_none_or(|n| n > 200) {
        bail!("the alerts feed holds {feed} entries, at most 200 expected");
    }
    // Chromium offers permessage-deflate and the server takes it: the alerts above came in
    // compressed batch frames (mode `all`), inflated by the browser's own implementation.
    let extensions = cdp.eval("ws ? ws.extensions : null").await?;
    if !extensions
        .as_str()
        .is_some_and(|e| e.starts_with("permessage-deflate"))
    {
        bail!("the page's socket did not negotiate permessage-deflate: {extensions}");
    }

    sleep(Duration::from_millis(600)).await;
    let path = cdp.screenshot("dashboard.png").await?;
    eprintln!("screenshot: {}", path.display());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs /usr/bin/chromium: cargo test --release --test browser -- --ignored --test-threads=1"]
async fn query_editor_shows_errors_and_deploys() {
    run("editor", |h| Box::pin(editor(h))).await;
}

const BROKEN: &str = "let source = \"trades\";\nlet key_by = \"symbol\";\n\
    fn on_event(ev) { emit(#{ price: ev.price ); }\n";

const PROBE: &str = "// deployed by the browser test\nlet source = \"trades\";\n\
    let key_by = \"symbol\";\n\nfn on_event(ev) {\n    emit(#{ price: ev.price, size: ev.size });\n}\n";

async fn editor(h: &mut Harness) -> Result<()> {
    let token = h.eddy.token.clone();
    let cdp = &mut h.cdp;
    cdp.click("#tab-queries").await?;
    cdp.wait_for(
        "the query list",
        "document.querySelector('#query-list .q[data-query=\"vwap\"]') !== null",
        Duration::from_secs(5),
    )
    .await?;
    // Viewing a query's source.
    cdp.click("#query-list .q[data-query=\"price_alerts\"]")
        .await?;
    cdp.wait_for(
        "the source of price_alerts in the editor",
        "document.querySelector('#query-name').value === 'price_alerts' && \
         document.querySelector('#editor').value.includes('fn threshold()')",
        Duration::from_secs(5),
    )
    .await?;

    // The admin token is kept in localStorage.
    cdp.type_into("#token", &token).await?;
    let stored = cdp.eval("localStorage.getItem('eddy.adminToken')").await?;
    if stored != json!(token) {
        bail!("the token is not kept in localStorage: {stored}");
    }

    // A new query with a syntax error on line 3.
    cdp.click("#new-query").await?;
    cdp.type_into("#query-name", "broken").await?;
    cdp.type_into("#editor", BROKEN).await?;
    cdp.click("#deploy").await?;
    let error = cdp
        .wait_for(
            "the deploy error with its line",
            "(() => { const e = document.querySelector('#deploy-error'); \
             return !e.hidden && e.dataset.line === '3' ? e.textContent : null; })()",
            Duration::from_secs(5),
        )
        .await?;
    if !error.as_str().is_some_and(|e| e.contains("line 3")) {
        bail!("the deploy error does not name line 3: {error}");
    }
    cdp.wait_for(
        "line 3 highlighted",
        "(() => { const g = [...document.querySelectorAll('#gutter .err')].map(d => d.dataset.line); \
         return g.length === 1 && g[0] === '3' && !document.querySelector('#err-line').hidden; })()",
        Duration::from_secs(2),
    )
    .await?;
    cdp.screenshot("editor-error.png").await?;
    if cdp
        .eval("document.querySelector('#topics [data-topic=\"broken\"]') !== null")
        .await?
        == json!(true)
    {
        bail!("the broken query shows up among the topics");
    }

    // A valid new query: its topics appear without reloading the page.
    cdp.eval("window.__notReloaded = 42").await?;
    cdp.type_into("#query-name", "browser_probe").await?;
    cdp.type_into("#editor", PROBE).await?;
    cdp.click("#deploy").await?;
    cdp.wait_for(
        "the deploy to succeed",
        "(() => { const ok = document.querySelector('#deploy-ok'); \
         return !ok.hidden && document.querySelector('#deploy-error').hidden && \
           document.querySelectorAll('#gutter .err').length === 0; })()",
        Duration::from_secs(5),
    )
    .await?;
    // The page re-asks for the topics every 4 s anyway; the deploy must do it at once.
    cdp.wait_for(
        "browser_probe in the topics list",
        "document.querySelector('#topics .group[data-query=\"browser_probe\"] [data-topic=\"browser_probe\"]') !== null",
        Duration::from_millis(2500),
    )
    .await?;
    cdp.wait_for(
        "browser_probe in the query list",
        "document.querySelector('#query-list .q[data-query=\"browser_probe\"]') !== null",
        Duration::from_secs(3),
    )
    .await?;
    if cdp.eval("window.__notReloaded").await? != json!(42) {
        bail!("the page was reloaded");
    }
    // And it runs: its topic fills the table.
    open_topic(cdp, "browser_probe", 5).await?;
    let visible = cdp
        .eval("!document.querySelector('#live-view').hidden")
        .await?;
    if visible != json!(true) {
        bail!("opening a topic does not show the live view");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs /usr/bin/chromium: cargo test --release --test browser -- --ignored --test-threads=1"]
async fn reconnects_and_resubscribes_after_a_restart() {
    run("reconnect", |h| Box::pin(reconnect(h))).await;
}

async fn reconnect(h: &mut Harness) -> Result<()> {
    open_topic(&mut h.cdp, "vwap", 20).await?;
    // The connection drops, the server stays: the alert feeds resume from their positions
    // (nothing sent meanwhile is missed), none is gone.
    h.cdp
        .wait_for(
            "positions for the alert feeds",
            "feedPos.size > 0",
            Duration::from_secs(5),
        )
        .await?;
    // Every feed with a position asks to resume from it; a feed whose first answer had not
    // come yet when the socket closed has none and starts anew, which is right.
    let asked_before = h.cdp.eval("resumes.asked").await?;
    h.cdp.eval("ws.close()").await?;
    let resumed = h
        .cdp
        .wait_for(
            "the alert feeds to resume after the socket closed",
            &format!(
                "resumes.asked > {asked_before} && resumes.resumed >= resumes.asked && \
                 resumes.gone === 0 && \
                 document.querySelector('#conn-state').dataset.state === 'live'"
            ),
            Duration::from_secs(10),
        )
        .await;
    if let Err(e) = resumed {
        let state = h
            .cdp
            .eval("JSON.stringify({resumes, subs: [...feedSubs], pos: [...feedPos.keys()]})")
            .await
            .unwrap_or_default();
        return Err(e.context(format!("dashboard state: {state}")));
    }
    let addr = h.eddy.addr.clone();
    // Kill the server: the page shows it is reconnecting.
    h.eddy.child.kill().await?;
    h.cdp
        .wait_for(
            "the connection state to show reconnecting",
            "document.querySelector('#conn-state').dataset.state === 'reconnecting'",
            Duration::from_secs(5),
        )
        .await?;
    // A new server on the same address (the port may linger briefly).
    let mut restarted = None;
    for _ in 0..20 {
        match Eddy::start(&addr).await {
            Ok(e) => {
                restarted = Some(e);
                break;
            }
            Err(_) => sleep(Duration::from_millis(250)).await,
        }
    }
    let restarted = restarted.with_context(|| format!("cannot restart eddy on {addr}"))?;
    h.eddy = restarted;
    let cdp = &mut h.cdp;
    cdp.wait_for(
        "the connection state to show live again",
        "document.querySelector('#conn-state').dataset.state === 'live'",
        Duration::from_secs(15),
    )
    .await?;
    // A new server without the old one's data: the positions are gone, and the page says so.
    cdp.wait_for(
        "the old positions to be reported gone",
        "resumes.gone > 0 && !document.querySelector('#notice').hidden && \
         document.querySelector('#notice').textContent.includes('gone')",
        Duration::from_secs(5),
    )
    .await?;
    // Resubscribed: the new server counts the page on vwap and on the alert topics, and the
    // table moves again.
    cdp.wait_for(
        "the new server to see the page's subscriptions",
        "fetch('/metrics').then(r => r.text()).then(t => \
           /^eddy_subscribers\\{topic=\"vwap\"\\} 1$/m.test(t) && \
           /^eddy_subscribers\\{topic=\"sensor_anomaly.errors\"\\} 1$/m.test(t))",
        Duration::from_secs(5),
    )
    .await?;
    let key = cdp
        .eval("document.querySelector('#table tbody tr[data-key]').dataset.key")
        .await?;
    let key = key.as_str().context("a row key")?.to_owned();
    let before = cdp.eval(&row_text(&key)).await?;
    cdp.wait_for(
        &format!("row {key} to change after the reconnect"),
        &format!("(v => v !== null && v !== {before})({})", row_text(&key)),
        Duration::from_secs(5),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs /usr/bin/chromium: cargo test --release --test browser -- --ignored --test-threads=1"]
async fn cluster_partitions_lag_and_failovers_on_the_health_strip() {
    // Two cluster nodes on a real nats-server; the page is on a. Once b is killed, a takes its
    // partitions over and the strip shows all of them and the failovers.
    let Some(nats) = nats::start_nats() else {
        return;
    };
    let scenario = async {
        let node = |name: &'static str| {
            let url = nats.url.clone();
            async move {
                let args = ["--listen", "127.0.0.1:0", "--cluster", &url, "--node", name];
                Eddy::start_with(&args).await
            }
        };
        let a = node("a").await?;
        let b = node("b").await?;
        let browser = Chromium::start().await?;
        let mut cdp = Cdp::connect(&browser).await?;
        cdp.navigate(&format!("http://{}/", a.addr)).await?;
        let strip = "(() => { const t = id => document.getElementById(id).textContent; \
                     return document.getElementById('h-cluster').hidden ? null : \
                     [Number(t('h-parts')), Number(t('h-lag')), Number(t('h-failovers'))]; })()";
        // Both nodes own some of the 64 partitions.
        let shared = format!("(() => {{ const v = {strip}; return v && v[0] > 0 && v[0] < 64 && v[2] === 0 ? v : null; }})()");
        // Hand-overs to b go a few partitions at a time: wait until the count holds still.
        let mut before = Value::Null;
        loop {
            let now = cdp
                .wait_for("a to own some partitions", &shared, Duration::from_secs(20))
                .await?;
            if now == before {
                break;
            }
            before = now;
            sleep(Duration::from_millis(1500)).await;
        }
        let owned_by_a = before[0].as_u64().context("partitions")?;
        eprintln!("strip on a before the kill: {before}");
        drop(b);
        let all = format!(
            "(() => {{ const v = {strip}; return v && v[0] === 64 && v[2] === {} ? v : null; }})()",
            64 - owned_by_a
        );
        let after = cdp
            .wait_for(
                "a to take b's partitions over",
                &all,
                Duration::from_secs(20),
            )
            .await?;
        eprintln!("strip on a after the kill: {after}");
        cdp.close_browser().await;
        a.stop().await;
        anyhow::Ok(())
    };
    match timeout(TEST_LIMIT, scenario).await {
        Err(_) => panic!("the cluster strip test took more than {TEST_LIMIT:?}"),
        Ok(Err(e)) => panic!("cluster strip: {e:#}"),
        Ok(Ok(())) => {}
    }
}
