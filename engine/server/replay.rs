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

/// A batch as the hub published it.
struct Kept {
    /// `[element,element,…]`.
    items: Bytes,
    elements: Vec<Element>,
    /// The topic's counts after it, and the same written out.
    end: Vec<u64>,
    pos: Arc<str>,
}

impl Kept {
    fn bytes(&self) -> usize {
        self.items.len() + self.elements.len() * std::mem::size_of::<Element>() + 64
    }
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

/// A topic's position and its newest batches.
pub struct Ring {
    epoch: u64,
    /// Items per shard so far.
    head: Vec<u64>,
    /// The counts before the oldest batch kept.
    start: Vec<u64>,
    kept: VecDeque<Kept>,
    bytes: usize,
    limit: usize,
}

impl Ring {
    pub fn new(shards: usize, limit: usize) -> Ring {
        Ring {
            epoch: new_epoch(),
            head: vec![0; shards],
            start: vec![0; shards],
            kept: VecDeque::new(),
            bytes: 0,
            limit,
        }
    }

    /// Continues from a position a checkpoint recorded (nothing before it is kept).
    pub fn restore(&mut self, position: Position) {
        self.epoch = position.epoch;
        self.start.clone_from(&position.counts);
        self.head = position.counts;
        self.kept.clear();
        self.bytes = 0;
    }

    /// The index of the next item `shard` emits, counted.
    pub fn next(&mut self, shard: usize) -> u64 {
        if shard >= self.head.len() {
            self.head.resize(shard + 1, 0);
            self.start.resize(shard + 1, 0);
        }
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
        self.bytes
    }

    /// Keeps a published batch (`pos` is [`Ring::pos`] after its items), dropping the oldest
    /// batches past the limit.
    pub fn keep(&mut self, items: Bytes, elements: Vec<Element>, pos: Arc<str>) {
        let kept = Kept {
            items,
            elements,
            end: self.head.clone(),
            pos,
        };
        self.bytes += kept.bytes();
        self.kept.push_back(kept);
        while self.bytes > self.limit {
            let Some(old) = self.kept.pop_front() else {
                break;
            };
            self.bytes -= old.bytes();
            self.start = old.end;
        }
    }

    /// The items after `from` that `wants` takes, batch by batch as they were published; the
    /// first may be cut (it held items from before `from` too).
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
        if from.counts.iter().zip(&self.start).any(|(f, s)| f < s) {
            return Err(Gone::TooOld);
        }
        let new = |e: &Element| e.index >= from.counts[e.shard];
        let mut out = Vec::new();
        for kept in &self.kept {
            if kept.end.iter().zip(&from.counts).all(|(e, f)| e <= f) {
                continue;
            }
            let whole = kept.elements.iter().all(|e| new(e) && wants(&e.key));
            if whole {
                out.push(Replayed {
                    items: kept.items.clone(),
                    count: kept.elements.len() as u64,
                    pos: Arc::clone(&kept.pos),
                });
                continue;
            }
            let mut items = Vec::new();
            let mut count = 0;
            for e in kept.elements.iter().filter(|e| new(e) && wants(&e.key)) {
                items.push(if count == 0 { b'[' } else { b',' });
                items.extend_from_slice(&kept.items[e.range.clone()]);
                count += 1;
            }
            if count > 0 {
                items.push(b']');
                out.push(Replayed {
                    items: items.into(),
                    count,
                    pos: Arc::clone(&kept.pos),
                });
            }
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

    /// Publishes one batch of `(shard, key)` items whose values are their `key:index`, the way
    /// the hub does; returns its position.
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
        let pos = ring.pos();
        ring.keep(buf.into(), elements, Arc::clone(&pos));
        pos
    }

    fn texts(replayed: &[Replayed]) -> Vec<String> {
        replayed
            .iter()
            .map(|r| String::from_utf8(r.items.to_vec()).unwrap())
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
        // Whole batches after the position are shared, not copied.
        assert_eq!(texts(&got), ["[\"c:1:1\",\"a:0:1\"]", "[\"d:0:2\"]"]);
        assert_eq!(got.iter().map(|r| r.count).sum::<u64>(), 3);
        assert_eq!(got[1].pos, ring.pos());
        // At the head: nothing to send, and that is a resume, not a gap.
        let head = ring.head();
        assert!(ring.since(&head, |_| true).unwrap().is_empty());
    }

    #[test]
    fn a_position_from_another_interleaving_cuts_batches_per_shard() {
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
        assert_eq!(texts(&got), ["[\"y:1:1\"]", "[\"c:0:2\"]"]);
    }

    #[test]
    fn key_filters_apply_to_what_is_replayed() {
        let mut ring = Ring::new(1, 1 << 20);
        let start = Position {
            epoch: ring.epoch(),
            counts: vec![0],
        };
        publish(&mut ring, &[(0, "a"), (0, "b"), (0, "a")]);
        let got = ring.since(&start, |k| *k == Key::Str("a".into())).unwrap();
        assert_eq!(texts(&got), ["[\"a:0:0\",\"a:0:2\"]"]);
        assert_eq!(got[0].count, 2);
    }

    #[test]
    fn gone_positions_say_why() {
        let mut ring = Ring::new(2, 300);
        let start = ring.head();
        let mut last = ring.pos();
        for _ in 0..20 {
            last = publish(&mut ring, &[(0, "a"), (1, "b")]);
        }
        // The limit keeps only the newest batches.
        assert!(ring.bytes() <= 300);
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
        assert_eq!(texts(&got), ["[\"z:1:7\"]"]);
        // Before the checkpoint, nothing is kept.
        let older = Position {
            epoch: 42,
            counts: vec![9, 7],
        };
        assert_eq!(ring.since(&older, |_| true).err(), Some(Gone::TooOld));
    }
}
