//! The offline runner behind `eddy run`: queries over a finite input, through the same router
//! and shard code the server uses, on one thread, deterministically.
//!
//! The input (one JSON object, an array, or NDJSON) is parsed in frames of about
//! [`FRAME_BYTES`] (NDJSON is cut at line boundaries), routed with one shard, and every item
//! emitted is written as one JSON line, in the order it was produced. Arrival time is logical:
//! the event's index in the input, in milliseconds, so that runs repeat exactly. At the end of the
//! input the watermark of every query goes to the end of time, so every pending timer fires.
//! Event times further ahead of the wall clock than the default `max_event_time_skew` (one day)
//! are rejected, as the server does.
//! Rejected events go to the error writer with their position and reason.

use std::io::Write;
use std::sync::Arc;

use crate::builtins::{Emitted, LineWriter};
use crate::event::{Format, Parser, Position, Rejection};
use crate::router::{Clock, Delivery, Deployed, RouteSink, Router, TimePolicy, Unnamed};
use crate::sandbox::Limits;
use crate::shard::{QueryId, QueryStats, Shard};
use crate::QueryDef;

/// Size of the frames a large NDJSON input is cut into: under the size up to which the parser
/// keeps its scratch buffers, so that every frame after the first reuses them.
pub const FRAME_BYTES: usize = 1 << 19;

/// Options of one offline run.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Stream of the events that carry no `"stream"` field; when `None` they feed every query.
    pub stream: Option<String>,
    /// Which engine runs the queries (compiled where possible, or the interpreter alone).
    pub engine: crate::compiled::EngineMode,
}

/// What a run counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunSummary {
    pub items: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub late: u64,
    pub emitted: u64,
    pub errors: u64,
    pub timers_fired: u64,
}

/// Runs `queries` over `input`, writing emitted items to `out` and rejections to `err`.
pub fn run(
    queries: Vec<QueryDef>,
    input: Vec<u8>,
    limits: &Limits,
    options: &RunOptions,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<RunSummary> {
    let mut shard = Shard::new(limits);
    shard.set_engine(options.engine);
    let mut deployed = Vec::new();
    for (i, def) in queries.into_iter().enumerate() {
        let id = QueryId(i as u64);
        let def = Arc::new(def);
        shard
            .deploy(id, Arc::clone(&def))
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        deployed.push(Arc::new(Deployed::new(id, def)));
    }
    let policy = TimePolicy {
        max_key_bytes: limits.max_key_bytes,
        ..TimePolicy::default()
    };
    let router = Router::new(deployed, policy);
    let unnamed = if options.stream.is_some() {
        Unnamed::Reject
    } else {
        Unnamed::AllQueries
    };
    let mut sink = Sink {
        shard: &mut shard,
        out,
        err,
        line: Vec::with_capacity(LINES_BYTES + 4096),
        lines: LineWriter::default(),
        io: Ok(()),
        emitted: 0,
        items: Vec::new(),
    };
    // (Room for a frame and a long last line.)
    let mut parser = Parser::for_frames(FRAME_BYTES + FRAME_BYTES / 8);
    let mut summary = RunSummary::default();
    let format = Format::detect(&input);
    let mut base = crate::event::Position {
        index: 0,
        line: Some(0),
    };
    for range in chunks(&input, format) {
        let chunk = &input[range];
        let parsed = parser.parse_slice_with(chunk, format, base);
        let lines = parsed
            .newlines
            .unwrap_or_else(|| memchr::memchr_iter(b'\n', chunk).count() as u32);
        summary.items += u64::from(parsed.items);
        for rejection in parsed.rejections {
            summary.rejected += 1;
            sink.reject(rejection);
        }
        let stream = options.stream.as_deref();
        let routed = router.route(
            &parsed.frame,
            0,
            stream,
            unnamed,
            Clock::Position,
            1,
            &mut sink,
        );
        router.settle(0, &routed);
        summary.accepted += routed.accepted;
        summary.rejected += routed.rejected;
        base.index += parsed.items;
        base.line = base.line.map(|l| l + lines);
        sink.write_lines();
        // Stop at the first write error, keeping it as it came.
        std::mem::replace(&mut sink.io, Ok(()))?;
    }
    let end = i64::from(base.index);
    sink.shard.finish(end);
    sink.flush_shard();
    sink.write_lines();
    sink.io?;
    sink.out.flush()?;
    let emitted = sink.emitted;
    let mut stats = QueryStats::default();
    for q in router.queries() {
        stats += shard.stats(q.id).unwrap_or_default();
    }
    summary.emitted = emitted;
    summary.errors = stats.errors;
    summary.timers_fired = stats.timers_fired;
    summary.late = stats.late;
    Ok(summary)
}

/// Cuts NDJSON input at line boundaries into frames of about [`FRAME_BYTES`]; other input is
/// one frame.
fn chunks(input: &[u8], format: Format) -> Vec<std::ops::Range<usize>> {
    if format != Format::Ndjson || input.len() <= FRAME_BYTES {
        return std::iter::once(0..input.len()).collect();
    }
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < input.len() {
        let mut end = (start + FRAME_BYTES).min(input.len());
        if end < input.len() {
            end = input[end..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(input.len(), |p| end + p + 1);
        }
        chunks.push(start..end);
        start = end;
    }
    chunks
}

/// How many bytes of output lines [`Sink`] gathers before it writes them.
const LINES_BYTES: usize = 1 << 16;

struct Sink<'a> {
    shard: &'a mut Shard,
    out: &'a mut dyn Write,
    err: &'a mut dyn Write,
    /// Output lines not written yet: one write of many lines costs less than one per line.
    line: Vec<u8>,
    /// Writes each item into `line`.
    lines: LineWriter,
    io: std::io::Result<()>,
    emitted: u64,
    items: Vec<Emitted>,
}

impl Sink<'_> {
    fn write(&mut self, item: &Emitted) {
        self.lines.write(item, &mut self.line);
        self.emitted += 1;
        if self.line.len() >= LINES_BYTES {
            self.write_lines();
        }
    }

    /// Writes the lines gathered so far (nothing after a write error).
    fn write_lines(&mut self) {
        if self.io.is_ok() && !self.line.is_empty() {
            self.io = self.out.write_all(&self.line);
        }
        self.line.clear();
    }

    fn flush_shard(&mut self) {
        // Most events emit nothing: then there is nothing to take (see `Shard::has_output`).
        if !self.shard.has_output() {
            return;
        }
        // One buffer for every event's items: no allocation per event.
        let mut items = std::mem::take(&mut self.items);
        self.shard.take_output(&mut items);
        for item in &items {
            self.write(item);
        }
        self.shard.recycle(&mut items);
        self.items = items;
    }
}

impl RouteSink for Sink<'_> {
    fn deliver(&mut self, _shard: usize, _position: Position, d: Delivery) {
        self.shard.event(d);
        self.flush_shard();
    }

    fn advanced(&mut self, _query: QueryId, _watermark: i64) {
        // One shard: it already saw the watermark with the event that raised it.
    }

    fn reject(&mut self, rejection: Rejection) {
        if self.io.is_ok() {
            self.io = writeln!(self.err, "rejected: {rejection}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file cut into frames numbers its lines on from one frame to the next, whether a frame
    /// was parsed at once (the parser counted its newlines), line by line (a broken line), or
    /// with blank lines: a rejection in each names the line it is on in the file.
    #[test]
    fn line_numbers_run_on_across_frames() {
        let limits = Limits::default();
        let script = r#"let source = "s"; let key_by = "k"; fn on_event(ev) { }"#;
        let def = QueryDef::compile("q", script, &limits).unwrap();
        let line = |i: usize| {
            format!(
                "{{\"stream\":\"s\",\"k\":\"key{}\",\"pad\":\"{}\"}}",
                i % 7,
                "x".repeat(40)
            )
        };
        let per_frame = FRAME_BYTES / line(0).len() + 1;
        let mut lines: Vec<String> = (0..4 * per_frame).map(line).collect();
        // Frame 2, parsed at once: a key of the wrong kind (valid JSON, rejected by routing).
        let bad_key = per_frame + per_frame / 2;
        lines[bad_key] = r#"{"stream":"s","k":1.5}"#.to_owned();
        // Frame 3: blank lines, then a broken line.
        let blank = 2 * per_frame + 10;
        lines[blank] = String::new();
        lines[blank + 1] = "   ".to_owned();
        let broken = 2 * per_frame + per_frame / 2;
        lines[broken] = r#"{"stream":"s","k":"#.to_owned();
        // Frame 4, parsed at once after both: another wrong key.
        let last = 3 * per_frame + per_frame / 2;
        lines[last] = r#"{"stream":"s","k":2.5}"#.to_owned();
        let input = lines.join("\n") + "\n";
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let summary = run(
            vec![def],
            input.into_bytes(),
            &limits,
            &RunOptions::default(),
            &mut out,
            &mut err,
        )
        .unwrap();
        assert_eq!(summary.rejected, 3);
        let err = String::from_utf8(err).unwrap();
        let named: Vec<&str> = err
            .lines()
            .map(|l| l.split("(line ").nth(1).unwrap().split(')').next().unwrap())
            .collect();
        let want: Vec<String> = [bad_key, broken, last]
            .iter()
            .map(|i| (i + 1).to_string())
            .collect();
        assert_eq!(named, want, "{err}");
    }
}
