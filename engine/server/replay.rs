//! Topic positions and the replay ring: what lets a subscriber resume where it stopped.
//!
//! A topic's position is not one counter but one per shard: the number of items each shard has
//! emitted to the topic so far, and the topic's `epoch` (which run of the topic the counts belong
//! to). A shard's items reach the hub in the order the shard made them, and in durable mode the
//! shard makes them in the order of the ingest log, so the item a shard emits `n`-th to a topic
//! is the same item in every run that starts from the same checkpoint. A replay after a crash
//! therefore gives every item the position it had before, whatever order the shards' outputs
//! interleave in at the hub. That is why positions are per shard: one counter over the
//! interleaving would change from run to run.
//!
//! Written as `"<epoch>:<count0>,<count1>,…"`, a position is opaque to clients: a batch carries
//! the topic's position after its last item, and a subscribe request may hand one back. The
//! [`Ring`] keeps the newest batches of a topic, within `replay_bytes`, each element tagged with
//! its shard and index, so a resume can start mid-batch and skip exactly what was seen.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use crate::Key;

/// A place in a topic: per shard, how many of its items came before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    pub epoch: u64,
    pub counts: Vec<u64>,
}

impl Position {
    /// Reads `"<epoch>:<count0>,<count1>,…"`.
    pub fn parse(text: &str) -> Result<Position, String> {
        let bad = || {
            format!(
                "bad position {text:?}: expected the \"pos\" of a batch, \"<epoch>:<count>,<count>,…\""
            )
        };
        let (epoch, counts) = text.split_once(':').ok_or_else(bad)?;
        let epoch = epoch.parse().map_err(|_| bad())?;
        let counts = counts
            .split(',')
            .map(|c| c.parse::<u64>())
            .collect::<Result<Vec<u64>, _>>()
            .map_err(|_| bad())?;
        Ok(Position { epoch, counts })
    }

    pub fn encode(&self) -> String {
        encode(self.epoch, &self.counts)
    }
}

fn encode(epoch: u64, counts: &[u64]) -> String {
    let mut out = String::with_capacity(24 + counts.len() * 8);
    let _ = write!(out, "{epoch}:");
    for (i, c) in counts.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{c}");
    }
    out
}

/// One item of a batch: its key, where it came from, and its bytes in the batch's array.
#[derive(Clone, Debug)]
pub struct Element {
    pub key: Key,
    pub shard: usize,
    /// How many items its shard emitted to the topic before it.
    pub index: u64,
    pub range: Range<usize>,
}

/// A shard's open chunk is sealed (and shared whole by resumes after it) before an element
/// would take it past this many bytes. Its buffer is allocated at this size and so never grows
/// (a grown `Vec` would hold up to twice its bytes), unless one element is larger.
const CHUNK_BYTES: usize = 64 * 1024;

/// What a kept element costs besides its bytes: its key, index and range, about.
const ELEMENT_OVERHEAD: usize = 48;

/// Consecutive items of one shard: `[` + elements joined by `,` (+ `]` once sealed).
struct Chunk {
    buf: Vec<u8>,
    /// The sealed bytes, shared by every resume that takes the chunk whole.
    sealed: Option<Bytes>,
    /// Each element's key, index, and place in `buf`.
    elements: Vec<(Key, u64, Range<usize>)>,
}

impl Chunk {
    fn new() -> Chunk {
        let mut buf = Vec::with_capacity(CHUNK_BYTES);
        buf.push(b'[');
        Chunk {
            buf,
            sealed: None,
            elements: Vec::new(),
        }
    }

    /// Closes the array: the chunk takes no more elements.
    fn seal(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        buf.push(b']');
        self.sealed = Some(Bytes::from(buf));
    }

    /// Its elements' bytes: the sealed array, or the array being filled.
    fn data(&self) -> &[u8] {
        self.sealed.as_deref().unwrap_or(&self.buf)
    }

    fn bytes(&self) -> usize {
        self.data().len() + self.elements.len() * ELEMENT_OVERHEAD
    }

    /// The index after its last element.
    fn end(&self) -> u64 {
        self.elements.last().map_or(0, |(_, i, _)| i + 1)
    }
}

/// What a topic keeps of one shard's items.
struct ShardRing {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    /// The index of the oldest item kept (the head when none is).
    start: u64,
}

/// A batch to send again to a resuming subscriber.
pub struct Replayed {
    pub items: Bytes,
    pub count: u64,
    pub pos: Arc<str>,
}

/// Why a position cannot be resumed from.
#[derive(Debug, PartialEq, Eq)]
pub enum Gone {
    /// Another run of the topic (the query was removed and deployed again, the server restarted
    /// without its data, or the number of shards changed).
    Epoch,
    /// Older than the oldest item kept.
    TooOld,
    /// Beyond what the topic has: items lost in a crash before they were in the log.
    Ahead,
}

impl Gone {
    pub fn reason(&self) -> &'static str {
        match self {
            Gone::Epoch => {
                "the position belongs to another run of the topic (redeployed, restarted \
                 without its data directory, or a different number of shards)"
            }
            Gone::TooOld => "items after the position are no longer kept (replay_bytes)",
            Gone::Ahead => {
                "the position is ahead of the topic: items it counts were lost before they \
                 were logged"
            }
        }
    }
}

/// A topic's position and its newest items, kept per shard: the shards' outputs interleave
/// unevenly (in a recovery's replay one shard may finish long before another), and one ring
/// over the interleaving could keep none of a shard's recent items. Each shard keeps its share
/// of `replay_bytes`.
pub struct Ring {
    epoch: u64,
    /// Items per shard so far.
    head: Vec<u64>,
    shards: Vec<ShardRing>,
    limit: usize,
}

impl Ring {
    pub fn new(shards: usize, limit: usize) -> Ring {
        let mut ring = Ring {
            epoch: new_epoch(),
            head: Vec::new(),
            shards: Vec::new(),
            limit,
        };
        ring.grow(shards);
        ring
    }

    fn grow(&mut self, shards: usize) {
        while self.head.len() < shards {
            let start = 0;
            self.head.push(start);
            self.shards.push(ShardRing {
                chunks: VecDeque::new(),
                bytes: 0,
                start,
            });
        }
    }

    /// Continues from a position a checkpoint recorded (nothing before it is kept).
    pub fn restore(&mut self, position: Position) {
        self.epoch = position.epoch;
        self.head = Vec::new();
        self.shards = Vec::new();
        self.grow(position.counts.len());
        for (s, count) in position.counts.into_iter().enumerate() {
            self.head[s] = count;
            self.shards[s].start = count;
        }
    }

    /// The index of the next item `shard` emits, counted.
    pub fn next(&mut self, shard: usize) -> u64 {
        self.grow(shard + 1);
        let n = self.head[shard];
        self.head[shard] += 1;
        n
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// How many items `shard` has emitted to the topic.
    pub fn count(&self, shard: usize) -> u64 {
        self.head.get(shard).copied().unwrap_or(0)
    }

    pub fn head(&self) -> Position {
        Position {
            epoch: self.epoch,
            counts: self.head.clone(),
        }
    }

    /// The position now, written out (after every item counted by [`Ring::next`]).
    pub fn pos(&self) -> Arc<str> {
        encode(self.epoch, &self.head).into()
    }

    /// Bytes kept for replay.
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.bytes).sum()
    }

    /// Keeps the elements of a published batch (`items`), each with its shard's items; drops a
    /// shard's oldest chunks past its share of the limit (never the chunk being filled).
    pub fn keep(&mut self, items: &[u8], elements: &[Element]) {
        if self.limit == 0 {
            for ring in &mut self.shards {
                ring.chunks.clear();
                ring.bytes = 0;
            }
            for (s, ring) in self.shards.iter_mut().enumerate() {
                ring.start = self.head[s];
            }
            return;
        }
        let share = (self.limit / self.shards.len().max(1)).max(1);
        for e in elements {
            self.grow(e.shard + 1);
            let element = &items[e.range.clone()];
            let ring = &mut self.shards[e.shard];
            if let Some(open) = ring.chunks.back_mut().filter(|c| c.sealed.is_none()) {
                // `,` + the element + the closing `]` would not fit.
                if !open.elements.is_empty() && open.buf.len() + element.len() + 2 > CHUNK_BYTES {
                    let before = open.bytes();
                    open.seal();
                    ring.bytes = ring.bytes + open.bytes() - before;
                }
            }
            if ring.chunks.back().is_none_or(|c| c.sealed.is_some()) {
                if ring.chunks.is_empty() {
                    ring.start = e.index;
                }
                ring.chunks.push_back(Chunk::new());
            }
            let chunk = ring.chunks.back_mut().expect("an open chunk");
            let before = chunk.bytes();
            if !chunk.elements.is_empty() {
                chunk.buf.push(b',');
            }
            let at = chunk.buf.len();
            chunk.buf.extend_from_slice(element);
            let range = at..chunk.buf.len();
            chunk.elements.push((e.key.clone(), e.index, range));
            if chunk.buf.len() + 1 >= CHUNK_BYTES {
                chunk.seal();
            }
            ring.bytes += chunk.bytes() - before;
            while ring.bytes > share && ring.chunks.len() > 1 {
                let Some(old) = ring.chunks.pop_front() else {
                    break;
                };
                ring.bytes -= old.bytes();
                ring.start = old.end();
            }
        }
    }

    /// The items after `from` that `wants` takes, shard by shard, in chunks; each carries the
    /// position after it (a subscriber cut off in the middle of a replay resumes from there).
    pub fn since(
        &self,
        from: &Position,
        wants: impl Fn(&Key) -> bool,
    ) -> Result<Vec<Replayed>, Gone> {
        if from.epoch != self.epoch || from.counts.len() != self.head.len() {
            return Err(Gone::Epoch);
        }
        if from.counts.iter().zip(&self.head).any(|(f, h)| f > h) {
            return Err(Gone::Ahead);
        }
        if from
            .counts
            .iter()
            .zip(&self.shards)
            .any(|(f, ring)| *f < ring.start)
        {
            return Err(Gone::TooOld);
        }
        let mut out = Vec::new();
        let mut pos = from.counts.clone();
        for (s, ring) in self.shards.iter().enumerate() {
            let after = from.counts[s];
            for chunk in ring.chunks.iter().filter(|c| c.end() > after) {
                pos[s] = chunk.end();
                let first = chunk.elements.first().map_or(0, |(_, i, _)| *i);
                let whole = first >= after && chunk.elements.iter().all(|(k, _, _)| wants(k));
                if let (true, Some(sealed)) = (whole, &chunk.sealed) {
                    out.push(Replayed {
                        items: sealed.clone(),
                        count: chunk.elements.len() as u64,
                        pos: encode(self.epoch, &pos).into(),
                    });
                    continue;
                }
                let mut items = Vec::new();
                let mut count = 0;
                for (_, _, range) in chunk
                    .elements
                    .iter()
                    .filter(|(k, i, _)| *i >= after && wants(k))
                {
                    items.push(if count == 0 { b'[' } else { b',' });
                    items.extend_from_slice(&chunk.data()[range.clone()]);
                    count += 1;
                }
                if count > 0 {
                    items.push(b']');
                    out.push(Replayed {
                        items: items.into(),
                        count,
                        pos: encode(self.epoch, &pos).into(),
                    });
                }
            }
            pos[s] = self.head[s];
        }
        Ok(out)
    }
}

/// A fresh epoch: the wall clock in microseconds, so a later run of a topic has a larger one.
fn new_epoch() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Publishes one batch of `(shard, key)` items whose values are `"key:shard:index"`, the
    /// way the hub does; returns its position.
    fn publish(ring: &mut Ring, items: &[(usize, &str)]) -> Arc<str> {
        let mut buf = vec![b'['];
        let mut elements = Vec::new();
        for (i, (shard, key)) in items.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            let index = ring.next(*shard);
            let start = buf.len();
            buf.extend_from_slice(format!("\"{key}:{shard}:{index}\"").as_bytes());
            elements.push(Element {
                key: Key::Str((*key).into()),
                shard: *shard,
                index,
                range: start..buf.len(),
            });
        }
        buf.push(b']');
        ring.keep(&buf, &elements);
        ring.pos()
    }

    /// The replayed items, each as its value.
    fn values(replayed: &[Replayed]) -> Vec<String> {
        replayed
            .iter()
            .flat_map(|r| {
                let items: Vec<String> = serde_json::from_slice(&r.items).unwrap();
                assert_eq!(items.len() as u64, r.count);
                items
            })
            .collect()
    }

    #[test]
    fn positions_round_trip_and_bad_ones_are_refused() {
        let p = Position {
            epoch: 17,
            counts: vec![3, 0, 12],
        };
        assert_eq!(p.encode(), "17:3,0,12");
        assert_eq!(Position::parse("17:3,0,12").unwrap(), p);
        for bad in ["", "17", "17:", "x:1", "17:1,,2", "17:-1", "17:1;2"] {
            let e = Position::parse(bad).unwrap_err();
            assert!(e.contains("bad position"), "{bad}: {e}");
        }
    }

    #[test]
    fn resumes_after_a_batch_with_exactly_what_came_later() {
        let mut ring = Ring::new(2, 1 << 20);
        let first = publish(&mut ring, &[(0, "a"), (1, "b")]);
        publish(&mut ring, &[(1, "c"), (0, "a")]);
        publish(&mut ring, &[(0, "d")]);
        let from = Position::parse(&first).unwrap();
        let got = ring.since(&from, |_| true).unwrap();
        // Shard by shard, each in its order.
        assert_eq!(values(&got), ["a:0:1", "d:0:2", "c:1:1"]);
        // Each replayed batch carries the position after it; the last is the head.
        assert_eq!(&*got[0].pos, format!("{}:3,1", ring.epoch()));
        assert_eq!(got.last().unwrap().pos, ring.pos());
        // At the head: nothing to send, and that is a resume, not a gap.
        let head = ring.head();
        assert!(ring.since(&head, |_| true).unwrap().is_empty());
    }

    #[test]
    fn a_position_from_another_interleaving_resumes_per_shard() {
        // Before a crash the subscriber saw shard 0's first two items and shard 1's first one;
        // the replay interleaves the same items differently.
        let mut ring = Ring::new(2, 1 << 20);
        publish(&mut ring, &[(1, "x"), (0, "a"), (0, "b"), (1, "y")]);
        publish(&mut ring, &[(0, "c")]);
        let from = Position {
            epoch: ring.epoch(),
            counts: vec![2, 1],
        };
        let got = ring.since(&from, |_| true).unwrap();
        assert_eq!(values(&got), ["c:0:2", "y:1:1"]);
    }

    #[test]
    fn key_filters_apply_to_what_is_replayed() {
        let mut ring = Ring::new(1, 1 << 20);
        let start = ring.head();
        publish(&mut ring, &[(0, "a"), (0, "b"), (0, "a")]);
        let got = ring.since(&start, |k| *k == Key::Str("a".into())).unwrap();
        assert_eq!(values(&got), ["a:0:0", "a:0:2"]);
    }

    #[test]
    fn whole_sealed_chunks_are_shared_and_cut_ones_copied() {
        let mut ring = Ring::new(1, 64 << 20);
        let start = ring.head();
        let key = "k".repeat(1000);
        // About 1 KiB an item: a chunk seals after some 64 items.
        let batch: Vec<(usize, &str)> = (0..200).map(|_| (0, key.as_str())).collect();
        publish(&mut ring, &batch);
        let all = ring.since(&start, |_| true).unwrap();
        assert!(all.len() >= 3, "{} chunks", all.len());
        assert_eq!(all.iter().map(|r| r.count).sum::<u64>(), 200);
        let again = ring.since(&start, |_| true).unwrap();
        assert_eq!(
            all[0].items.as_ptr(),
            again[0].items.as_ptr(),
            "a sealed chunk is shared"
        );
        let mid = Position {
            epoch: ring.epoch(),
            counts: vec![10],
        };
        let cut = ring.since(&mid, |_| true).unwrap();
        assert_eq!(cut.iter().map(|r| r.count).sum::<u64>(), 190);
        assert_eq!(values(&cut)[0], format!("{key}:0:10"));
    }

    #[test]
    fn chunks_are_sealed_before_they_would_outgrow_their_buffer() {
        let mut ring = Ring::new(1, 64 << 20);
        // Items of about 1 KiB that do not divide 64 KiB evenly.
        let key = "k".repeat(1000);
        let batch: Vec<(usize, &str)> = (0..300).map(|_| (0, key.as_str())).collect();
        publish(&mut ring, &batch);
        let chunks = &ring.shards[0].chunks;
        assert!(chunks.len() >= 4, "{} chunks", chunks.len());
        for chunk in chunks {
            match &chunk.sealed {
                // The closing `]` fit in the buffer allocated at CHUNK_BYTES.
                Some(sealed) => assert!(sealed.len() <= CHUNK_BYTES, "{}", sealed.len()),
                None => assert_eq!(chunk.buf.capacity(), CHUNK_BYTES),
            }
        }
        assert_eq!(chunks.iter().map(|c| c.elements.len()).sum::<usize>(), 300);
    }

    #[test]
    fn gone_positions_say_why() {
        let mut ring = Ring::new(2, 2 * 64 * 1024);
        let start = ring.head();
        let key = "k".repeat(500);
        let mut last = ring.pos();
        for _ in 0..400 {
            last = publish(&mut ring, &[(0, key.as_str()), (1, key.as_str())]);
        }
        // Each shard keeps its share of the limit, and at least the chunk being filled.
        assert!(ring.bytes() <= 4 * 64 * 1024, "{}", ring.bytes());
        assert_eq!(ring.since(&start, |_| true).err(), Some(Gone::TooOld));
        let last = Position::parse(&last).unwrap();
        assert!(ring.since(&last, |_| true).unwrap().is_empty());
        let mut ahead = last.clone();
        ahead.counts[1] += 1;
        assert_eq!(ring.since(&ahead, |_| true).err(), Some(Gone::Ahead));
        let mut other = last.clone();
        other.epoch += 1;
        assert_eq!(ring.since(&other, |_| true).err(), Some(Gone::Epoch));
        let mut fewer = last;
        fewer.counts.pop();
        assert_eq!(ring.since(&fewer, |_| true).err(), Some(Gone::Epoch));
    }

    #[test]
    fn one_shard_racing_ahead_does_not_push_out_the_others_items() {
        // A recovery's replay: shard 0's items all come first, then shard 1's.
        let mut ring = Ring::new(2, 4 * 64 * 1024);
        let key = "k".repeat(500);
        for _ in 0..2000 {
            publish(&mut ring, &[(0, key.as_str())]);
        }
        for _ in 0..2000 {
            publish(&mut ring, &[(1, key.as_str())]);
        }
        // A subscriber a few items behind on both shards resumes.
        let mut near = ring.head();
        near.counts[0] -= 5;
        near.counts[1] -= 5;
        let got = ring.since(&near, |_| true).unwrap();
        assert_eq!(got.iter().map(|r| r.count).sum::<u64>(), 10);
    }

    #[test]
    fn a_limit_of_zero_keeps_nothing_and_only_the_head_resumes() {
        let mut ring = Ring::new(1, 0);
        let before = ring.head();
        publish(&mut ring, &[(0, "k")]);
        assert_eq!(ring.bytes(), 0);
        assert_eq!(ring.since(&before, |_| true).err(), Some(Gone::TooOld));
        let head = ring.head();
        assert!(ring.since(&head, |_| true).unwrap().is_empty());
    }

    #[test]
    fn a_restored_ring_goes_on_counting_from_the_checkpoint() {
        let mut ring = Ring::new(2, 1 << 20);
        let before = Position {
            epoch: 42,
            counts: vec![10, 7],
        };
        ring.restore(before.clone());
        assert_eq!(ring.head(), before);
        publish(&mut ring, &[(1, "z")]);
        let got = ring.since(&before, |_| true).unwrap();
        assert_eq!(values(&got), ["z:1:7"]);
        // Before the checkpoint, nothing is kept.
        let older = Position {
            epoch: 42,
            counts: vec![9, 7],
        };
        assert_eq!(ring.since(&older, |_| true).err(), Some(Gone::TooOld));
    }
}
