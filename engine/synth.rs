//! Synthetic feeds: seeded generators of realistic events for the four use cases, shared by the
//! sample inputs (`eddy generate`), the demo feed and the load generator.
//!
//! Each [`Feed`] writes one JSON event at a time, given its event time, and owns all the state
//! it needs (prices, devices, players). The same seed gives the same events, byte for byte:
//! the generator is `fastrand`'s WyRand, and floats are rounded to fixed decimals.
//!
//! - `trades`: 50 symbols with random-walk prices, sizes in round lots with a heavy tail, and
//!   rare jumps of 4-8 % that trip `price_alerts`; the same feed also makes `quotes` (bid and
//!   ask around each symbol's current price, [`Feed::write_quote`]) for as-of joins.
//! - `sensors`: 200 devices on 5 sites reporting temperature and humidity; rare spikes, and
//!   device `dev-013` goes silent after the first 60 % of the feed.
//! - `social`: posts with hashtags and text drawn from positive, negative and neutral words.
//! - `games`: players starting and ending sessions, scoring, killing and dying.

use std::fmt;
use std::str::FromStr;

use crate::json::{write_float, write_int, write_str};

/// The use case a feed imitates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Trades,
    Sensors,
    Social,
    Games,
}

impl Scenario {
    pub const ALL: [Scenario; 4] = [
        Scenario::Trades,
        Scenario::Sensors,
        Scenario::Social,
        Scenario::Games,
    ];

    /// The stream its events are sent to.
    pub fn stream(self) -> &'static str {
        match self {
            Scenario::Trades => "trades",
            Scenario::Sensors => "sensors",
            Scenario::Social => "social",
            Scenario::Games => "games",
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.stream())
    }
}

impl FromStr for Scenario {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scenario::ALL
            .into_iter()
            .find(|c| c.stream() == s)
            .ok_or_else(|| format!("unknown scenario {s:?}: use trades, sensors, social or games"))
    }
}

pub const SYMBOLS: [&str; 50] = [
    "AAPL", "MSFT", "GOOG", "AMZN", "NVDA", "META", "TSLA", "BRK.B", "JPM", "V", "UNH", "XOM",
    "JNJ", "WMT", "MA", "PG", "HD", "CVX", "LLY", "ABBV", "MRK", "PEP", "KO", "AVGO", "COST",
    "BAC", "TMO", "MCD", "CSCO", "ABT", "CRM", "ACN", "DHR", "ADBE", "LIN", "NFLX", "AMD", "TXN",
    "NKE", "DIS", "WFC", "PM", "ORCL", "INTC", "UPS", "QCOM", "IBM", "CAT", "GS", "BA",
];

const POSITIVE: [&str; 12] = [
    "love",
    "great",
    "amazing",
    "happy",
    "excellent",
    "awesome",
    "good",
    "fantastic",
    "win",
    "beautiful",
    "fun",
    "best",
];
const NEGATIVE: [&str; 12] = [
    "hate", "terrible", "awful", "sad", "bad", "worst", "broken", "angry", "lose", "ugly",
    "boring", "horrible",
];
const NEUTRAL: [&str; 12] = [
    "today", "the", "new", "update", "people", "game", "city", "watching", "just", "about",
    "again", "this",
];
const HASHTAGS: [&str; 16] = [
    "rust", "ai", "worldcup", "music", "election", "crypto", "climate", "nba", "movies", "tech",
    "food", "travel", "gaming", "startup", "science", "weather",
];

/// The device that stops reporting after [`SILENT_AFTER`] of a sensors feed.
pub const SILENT_DEVICE: &str = "dev-013";
/// Fraction of a finite sensors feed after which [`SILENT_DEVICE`] is silent.
pub const SILENT_AFTER: f64 = 0.6;

/// A seeded generator of one scenario's events.
pub struct Feed {
    scenario: Scenario,
    rng: fastrand::Rng,
    keys: usize,
    prices: Vec<f64>,
    temps: Vec<f64>,
    sessions: Vec<bool>,
    /// Events written so far.
    pub count: u64,
    /// When set, the silent device stops after this many events.
    silent_from: Option<u64>,
    /// Whether to stamp each event with `"stream"`.
    with_stream: bool,
}

impl Feed {
    /// A feed of `scenario` over `keys` keys (symbols, devices, hashtags, players; 0 means the
    /// scenario's default: 50, 200, 16, 100).
    pub fn new(scenario: Scenario, seed: u64, keys: usize) -> Self {
        let default = match scenario {
            Scenario::Trades => SYMBOLS.len(),
            Scenario::Sensors => 200,
            Scenario::Social => HASHTAGS.len(),
            Scenario::Games => 100,
        };
        let keys = if keys == 0 { default } else { keys };
        let mut rng = fastrand::Rng::with_seed(seed);
        let prices = (0..keys)
            .map(|_| round(rng.f64() * 490.0 + 10.0, 2))
            .collect();
        let temps = (0..keys)
            .map(|_| round(rng.f64() * 10.0 + 18.0, 2))
            .collect();
        Feed {
            scenario,
            rng,
            keys,
            prices,
            temps,
            sessions: vec![false; keys],
            count: 0,
            silent_from: None,
            with_stream: true,
        }
    }

    /// Makes the silent device stop after `fraction` of `total` events.
    pub fn silence_after(mut self, total: u64) -> Self {
        self.silent_from = Some((total as f64 * SILENT_AFTER) as u64);
        self
    }

    /// Leaves out the `"stream"` field (the stream is then given by the sender).
    pub fn without_stream(mut self) -> Self {
        self.with_stream = false;
        self
    }

    pub fn scenario(&self) -> Scenario {
        self.scenario
    }

    /// Appends one event with event time `ts` (epoch ms) to `out`, as one JSON object.
    pub fn write_event(&mut self, ts: i64, out: &mut Vec<u8>) {
        self.write(ts, None, out);
    }

    /// As [`Feed::write_event`], with `"sent_us"`: when the event was sent, epoch µs (for
    /// latency probes).
    pub fn write_event_stamped(&mut self, ts: i64, sent_us: i64, out: &mut Vec<u8>) {
        self.write(ts, Some(sent_us), out);
    }

    /// Appends one quote with event time `ts` to `out`: a symbol's bid and ask, 1 to 5 basis
    /// points apart (at least a cent) around its current trade price, on stream `quotes`. Made
    /// by the trades feed, so that quotes follow the prices trades are made at.
    pub fn write_quote(&mut self, ts: i64, out: &mut Vec<u8>) {
        let i = self.rng.usize(..self.keys);
        let price = self.prices[i];
        let bps = f64::from(self.rng.u32(1..=5));
        let spread = round(price * bps / 10_000.0, 2).max(0.01);
        let bid = round((price - spread / 2.0).max(0.01), 2);
        let ask = round(bid + spread, 2);
        out.push(b'{');
        if self.with_stream {
            out.extend_from_slice(b"\"stream\":\"quotes\",");
        }
        out.extend_from_slice(b"\"symbol\":");
        write_str(out, &symbol(i));
        out.extend_from_slice(b",\"bid\":");
        write_float(out, bid);
        out.extend_from_slice(b",\"ask\":");
        write_float(out, ask);
        out.extend_from_slice(b",\"ts\":");
        write_int(out, ts);
        out.push(b'}');
    }

    fn write(&mut self, ts: i64, sent_us: Option<i64>, out: &mut Vec<u8>) {
        self.write_body(out);
        write_times(ts, sent_us, out);
    }

    /// One event up to its times: `{` and every field before `"ts"` (closed by
    /// [`Rendered::times`]).
    pub fn write_body(&mut self, out: &mut Vec<u8>) {
        out.push(b'{');
        if self.with_stream {
            out.extend_from_slice(b"\"stream\":");
            write_str(out, self.scenario.stream());
            out.push(b',');
        }
        match self.scenario {
            Scenario::Trades => self.trade(out),
            Scenario::Sensors => self.reading(out),
            Scenario::Social => self.post(out),
            Scenario::Games => self.game(out),
        }
        self.count += 1;
    }

    /// The next `n` events rendered ahead of time, for a load generator ([`Rendered`]); `None`
    /// for the scenarios whose events must not repeat: a sensors feed whose device falls silent
    /// (from its count on), and players' sessions, which start and end in turn.
    pub fn render(&mut self, n: usize) -> Option<Rendered> {
        let repeatable = match self.scenario {
            Scenario::Trades | Scenario::Social => true,
            Scenario::Sensors => self.silent_from.is_none(),
            Scenario::Games => false,
        };
        if !repeatable || n == 0 {
            return None;
        }
        let mut bytes = Vec::with_capacity(n * 80);
        let mut ends = Vec::with_capacity(n);
        for _ in 0..n {
            self.write_body(&mut bytes);
            ends.push(bytes.len());
        }
        Some(Rendered {
            bytes,
            ends,
            next: 0,
        })
    }

    fn trade(&mut self, out: &mut Vec<u8>) {
        let i = self.rng.usize(..self.keys);
        let step = self.normal() * 0.0008;
        let jump = if self.rng.f64() < 0.002 {
            let size = 0.04 + self.rng.f64() * 0.04;
            if self.rng.bool() {
                size
            } else {
                -size
            }
        } else {
            0.0
        };
        let price = (self.prices[i] * (1.0 + step + jump)).max(0.01);
        self.prices[i] = round(price, 2);
        let lots = if self.rng.f64() < 0.05 {
            self.rng.u32(10..100)
        } else {
            self.rng.u32(1..10)
        };
        out.extend_from_slice(b"\"symbol\":");
        write_str(out, &symbol(i));
        out.extend_from_slice(b",\"price\":");
        write_float(out, self.prices[i]);
        out.extend_from_slice(b",\"size\":");
        write_int(out, i64::from(lots * 100));
    }

    fn reading(&mut self, out: &mut Vec<u8>) {
        let mut i = self.rng.usize(..self.keys);
        let silent =
            device(i) == SILENT_DEVICE && self.silent_from.is_some_and(|n| self.count >= n);
        if silent {
            i = (i + 1) % self.keys;
        }
        self.temps[i] = round(self.temps[i] + self.normal() * 0.05, 2);
        let spike = if self.rng.f64() < 0.003 { 15.0 } else { 0.0 };
        out.extend_from_slice(b"\"device\":{\"id\":");
        write_str(out, &device(i));
        out.extend_from_slice(b",\"site\":");
        write_str(out, &format!("site-{}", i % 5));
        out.extend_from_slice(b"},\"temp\":");
        write_float(out, round(self.temps[i] + spike + self.normal() * 0.1, 2));
        out.extend_from_slice(b",\"humidity\":");
        write_float(out, round(40.0 + self.rng.f64() * 20.0, 1));
    }

    fn post(&mut self, out: &mut Vec<u8>) {
        let tags = 1 + self.rng.usize(..2);
        let mood = self.rng.f64();
        let mut text = String::new();
        for w in 0..6 {
            if w > 0 {
                text.push(' ');
            }
            let pick = self.rng.f64();
            let word = if pick < 0.25 && mood > 0.4 {
                POSITIVE[self.rng.usize(..POSITIVE.len())]
            } else if pick < 0.25 {
                NEGATIVE[self.rng.usize(..NEGATIVE.len())]
            } else {
                NEUTRAL[self.rng.usize(..NEUTRAL.len())]
            };
            text.push_str(word);
        }
        out.extend_from_slice(b"\"user\":");
        write_str(out, &format!("u{}", self.rng.u32(1..5000)));
        out.extend_from_slice(b",\"text\":");
        write_str(out, &text);
        out.extend_from_slice(b",\"hashtags\":[");
        for t in 0..tags {
            if t > 0 {
                out.push(b',');
            }
            // A skewed pick so that some hashtags trend.
            let r = self.rng.f64();
            let i = ((r * r) * self.keys as f64) as usize;
            write_str(out, &hashtag(i.min(self.keys - 1)));
        }
        out.push(b']');
    }

    fn game(&mut self, out: &mut Vec<u8>) {
        let i = self.rng.usize(..self.keys);
        let kind = if !self.sessions[i] {
            self.sessions[i] = true;
            "session_start"
        } else {
            match self.rng.u32(..20) {
                0 => {
                    self.sessions[i] = false;
                    "session_end"
                }
                1..=6 => "kill",
                7..=10 => "death",
                _ => "score",
            }
        };
        out.extend_from_slice(b"\"player\":");
        write_str(out, &format!("p{i:03}"));
        out.extend_from_slice(b",\"kind\":");
        write_str(out, kind);
        out.extend_from_slice(b",\"points\":");
        let points = if kind == "score" {
            self.rng.i64(1..=50)
        } else {
            0
        };
        write_int(out, points);
    }

    /// A standard normal sample (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u = self.rng.f64().max(f64::MIN_POSITIVE);
        let v = self.rng.f64();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

fn symbol(i: usize) -> String {
    match SYMBOLS.get(i) {
        Some(s) => (*s).to_owned(),
        None => format!("SYM{i}"),
    }
}

fn device(i: usize) -> String {
    format!("dev-{i:03}")
}

fn hashtag(i: usize) -> String {
    match HASHTAGS.get(i) {
        Some(s) => (*s).to_owned(),
        None => format!("tag{i}"),
    }
}

fn round(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

/// Appends an event's times and closes it: `,"ts":T`, then `,"sent_us":S` when given, and `}`.
fn write_times(ts: i64, sent_us: Option<i64>, out: &mut Vec<u8>) {
    out.extend_from_slice(b",\"ts\":");
    write_int(out, ts);
    if let Some(sent) = sent_us {
        out.extend_from_slice(b",\"sent_us\":");
        write_int(out, sent);
    }
    out.push(b'}');
}

/// A feed's events rendered ahead of time without their times ([`Feed::render`]), handed out
/// in turn and from the first again after the last, each closed with the times of its frame.
///
/// A load generator that renders every event as it sends it (a random walk, float formatting)
/// spends about 0.2 µs an event, which at a million events a second is a fifth of a core taken
/// from the server it measures on a shared machine; copying a rendered event costs a few
/// nanoseconds. The events sent are the feed's own, byte for byte, with the same times, until
/// they repeat.
pub struct Rendered {
    bytes: Vec<u8>,
    /// Where each event ends in `bytes`.
    ends: Vec<usize>,
    next: usize,
}

impl Rendered {
    /// The times every event of a frame ends with, after its body ([`Rendered::write_body`],
    /// [`Feed::write_body`]).
    pub fn times(ts: i64, sent_us: Option<i64>) -> Vec<u8> {
        let mut out = Vec::with_capacity(48);
        write_times(ts, sent_us, &mut out);
        out
    }

    /// Appends the next event's body, to be closed with [`Rendered::times`].
    pub fn write_body(&mut self, out: &mut Vec<u8>) {
        let start = match self.next {
            0 => 0,
            i => self.ends[i - 1],
        };
        out.extend_from_slice(&self.bytes[start..self.ends[self.next]]);
        self.next = (self.next + 1) % self.ends.len();
    }
}

/// Writes `count` events of `scenario` as NDJSON, event times from `start_ms`, `interval_ms`
/// apart on average (jittered, always increasing).
pub fn generate(
    scenario: Scenario,
    seed: u64,
    count: u64,
    start_ms: i64,
    interval_ms: u32,
) -> Vec<u8> {
    let mut feed = Feed::new(scenario, seed, 0).silence_after(count);
    let mut jitter = fastrand::Rng::with_seed(seed ^ 0x5eed);
    let mut out = Vec::with_capacity(count as usize * 96);
    let mut ts = start_ms;
    for _ in 0..count {
        feed.write_event(ts, &mut out);
        out.push(b'\n');
        ts += i64::from(jitter.u32(0..=interval_ms.saturating_mul(2)).max(1));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rendered events are the feed's own, byte for byte with the same times, then the same
    /// ones again from the first.
    #[test]
    fn rendered_events_are_the_feeds_and_then_repeat() {
        for scenario in [Scenario::Trades, Scenario::Social, Scenario::Sensors] {
            let (mut plain, mut ahead) = (Feed::new(scenario, 3, 0), Feed::new(scenario, 3, 0));
            let mut rendered = ahead.render(5).expect("repeatable");
            for i in 0..5 {
                let (ts, sent) = (1_000 + i, 1_000_000 + i);
                let mut want = Vec::new();
                plain.write_event_stamped(ts, sent, &mut want);
                let mut got = Vec::new();
                rendered.write_body(&mut got);
                got.extend_from_slice(&Rendered::times(ts, Some(sent)));
                assert_eq!(
                    String::from_utf8(got).unwrap(),
                    String::from_utf8(want).unwrap()
                );
            }
            // The sixth is the first again, with its own times.
            let mut sixth = Vec::new();
            rendered.write_body(&mut sixth);
            sixth.extend_from_slice(&Rendered::times(7, None));
            let mut want = Vec::new();
            Feed::new(scenario, 3, 0).write_event(7, &mut want);
            assert_eq!(
                String::from_utf8(sixth).unwrap(),
                String::from_utf8(want).unwrap()
            );
        }
        // Games' sessions start and end in turn, and a silent device must stay silent.
        assert!(Feed::new(Scenario::Games, 3, 0).render(5).is_none());
        assert!(Feed::new(Scenario::Sensors, 3, 0)
            .silence_after(10)
            .render(5)
            .is_none());
    }

    #[test]
    fn same_seed_same_bytes() {
        for scenario in Scenario::ALL {
            let a = generate(scenario, 7, 200, 0, 100);
            assert_eq!(a, generate(scenario, 7, 200, 0, 100));
            assert_ne!(a, generate(scenario, 8, 200, 0, 100));
            for line in a.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let v: serde_json::Value = serde_json::from_slice(line).unwrap();
                assert_eq!(v["stream"], scenario.stream());
                assert!(v["ts"].is_i64());
            }
        }
    }

    #[test]
    fn quotes_straddle_the_current_trade_price() {
        let mut feed = Feed::new(Scenario::Trades, 3, 0);
        let mut buf = Vec::new();
        for n in 0..2000 {
            buf.clear();
            feed.write_event(n, &mut buf);
            let trade: serde_json::Value = serde_json::from_slice(&buf).unwrap();
            buf.clear();
            feed.write_quote(n, &mut buf);
            let quote: serde_json::Value = serde_json::from_slice(&buf).unwrap();
            assert_eq!(quote["stream"], "quotes");
            assert_eq!(quote["ts"], n);
            let (bid, ask) = (
                quote["bid"].as_f64().unwrap(),
                quote["ask"].as_f64().unwrap(),
            );
            assert!(ask > bid && ask - bid <= 0.0005 * ask + 0.011, "{quote}");
            // The quoted symbol's price is the last one traded (or its start price): within the
            // spread of the mid, give or take a cent of rounding.
            let i = SYMBOLS
                .iter()
                .position(|s| *s == quote["symbol"].as_str().unwrap())
                .unwrap();
            let price = feed.prices[i];
            assert!(
                bid - 0.011 <= price && price <= ask + 0.011,
                "{price} vs {quote}"
            );
            if trade["symbol"] == quote["symbol"] {
                assert_eq!(trade["price"].as_f64().unwrap(), price);
            }
        }
    }

    #[test]
    fn silent_device_stops() {
        let input = generate(Scenario::Sensors, 1, 20_000, 0, 10);
        let lines: Vec<&[u8]> = input
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        let needle = format!("\"{SILENT_DEVICE}\"");
        let seen = |part: &[&[u8]]| {
            part.iter()
                .any(|l| String::from_utf8_lossy(l).contains(&needle))
        };
        let cut = (lines.len() as f64 * SILENT_AFTER) as usize;
        assert!(seen(&lines[..cut]));
        assert!(!seen(&lines[cut..]));
    }
}
