//! A subscriber's mailbox: the bounded queue between the fan-out hub and one subscriber's
//! connection task.
//!
//! The hub puts, the connection task takes everything at once; the lock is held for a push or a
//! swap, and only these two ever touch it. Bounds, by mode:
//! - `all`: at most `limit` bytes of batches (or one batch, however large, when nothing else
//!   waits). When a batch does not fit, the oldest batches are
//!   dropped (their items counted per topic and reported to the client as `dropped`). A mailbox
//!   that stays full past the slow-consumer timeout is marked for closing with 4008.
//! - `latest`: at most one pending value per key and topic, the newest, within the same `limit`
//!   of bytes: a new key's value that does not fit is dropped (counted and reported as
//!   `dropped`), and a mailbox full past the slow-consumer timeout is closed with 4008.
//!
//! Control messages (`subscribed`, `snapshot`, `closed`, `topics`, `error`) are never dropped.
//! They count toward `limit` too: a subscriber whose requests would queue more than the limit of
//! answers it has not read (snapshots, most often) is closed with 4008 at once.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::{Key, Topic};

use super::deflate::Compressed;
use super::replay::Replayed;

/// Close code for a subscriber that stayed full too long.
pub const SLOW_CONSUMER: u16 = 4008;

/// A batch's items as the hub encoded them once: the JSON array, and its compressed form for
/// subscribers that negotiated permessage-deflate, made by the first of them that needs it.
pub struct Items {
    pub json: Bytes,
    compressed: Compressed,
}

impl Items {
    /// The elements of `json`, compressed (see [`Compressed`]).
    pub fn deflated(&self) -> &Bytes {
        self.compressed.get(&self.json)
    }

    /// [`Items::deflated`], made for `sharers` subscribers (see [`Compressed::get_for`]).
    pub fn deflated_for(&self, sharers: usize) -> &Bytes {
        self.compressed.get_for(&self.json, sharers)
    }

    /// Whether [`Items::deflated`] has been computed.
    pub fn is_deflated(&self) -> bool {
        self.compressed.is_done()
    }
}

impl From<Bytes> for Items {
    fn from(json: Bytes) -> Self {
        Items {
            json,
            compressed: Compressed::default(),
        }
    }
}

/// Something waiting to be written to a subscriber.
pub enum Outgoing {
    /// A whole JSON message.
    Control(Bytes),
    /// A batch of items (mode `all`): `items` is the encoded JSON array, shared with every other
    /// subscriber that takes this topic unfiltered.
    Batch {
        topic: Topic,
        items: Arc<Items>,
        count: u64,
        ingest: Option<Instant>,
        /// When the hub published it.
        published: Instant,
        /// The topic's position after it (none for the conflated mode `latest`).
        pos: Option<Arc<str>>,
    },
    /// Batches sent again to a resuming subscriber, in order. Never dropped, and not counted
    /// toward the limit: they are bounded by `replay_bytes` and share the hub's bytes.
    Replay {
        topic: Topic,
        batches: Vec<Replayed>,
    },
}

/// What the connection task takes out of the mailbox in one go.
#[derive(Default)]
pub struct Inbox {
    pub queue: VecDeque<Outgoing>,
    /// Mode `latest`: per topic, the newest `{"key":K,"value":V}` element per key.
    pub latest: BTreeMap<Topic, BTreeMap<Key, Bytes>>,
    /// Mode `latest`: when the oldest pending value was published, and the oldest ingest time
    /// among them (for the latency metrics).
    pub latest_since: Option<(Instant, Option<Instant>)>,
    /// Items dropped per topic since the last take.
    pub dropped: Vec<(Topic, u64)>,
    bytes: usize,
    full_since: Option<Instant>,
    /// Set when the subscriber must be closed, with the close code.
    pub close: Option<u16>,
}

pub struct Mailbox {
    inner: Mutex<Inbox>,
    /// Signalled on every put; one waiter (the connection task), so a signal is never lost.
    pub notify: Notify,
    limit: usize,
    slow_timeout: Duration,
    /// The subscriber negotiated permessage-deflate: its batches go out compressed.
    pub deflate: bool,
}

impl Mailbox {
    pub fn new(limit: usize, slow_timeout: Duration) -> Self {
        Mailbox {
            inner: Mutex::new(Inbox::default()),
            notify: Notify::new(),
            limit,
            slow_timeout,
            deflate: false,
        }
    }

    /// The mailbox of a subscriber that negotiated permessage-deflate (or not).
    pub fn compressing(mut self, deflate: bool) -> Self {
        self.deflate = deflate;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inbox> {
        // A panic while holding this lock cannot leave the inbox inconsistent in a way that
        // matters more than losing the subscriber, so a poisoned lock is simply taken.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push_control(&self, message: Bytes) {
        let mut inbox = self.lock();
        if inbox.bytes > 0 && inbox.bytes + message.len() > self.limit {
            inbox.close = Some(SLOW_CONSUMER);
            drop(inbox);
            self.notify.notify_one();
            return;
        }
        inbox.bytes += message.len();
        inbox.queue.push_back(Outgoing::Control(message));
        drop(inbox);
        self.notify.notify_one();
    }

    /// Queues a batch of `count` items; returns how many items were dropped to make room.
    pub fn push_batch(
        &self,
        topic: &Topic,
        items: &Arc<Items>,
        count: u64,
        ingest: Option<Instant>,
        pos: Option<&Arc<str>>,
    ) -> u64 {
        let mut inbox = self.lock();
        let mut dropped = 0;
        let size = items.json.len();
        if inbox.bytes + size > self.limit {
            let now = Instant::now();
            let since = *inbox.full_since.get_or_insert(now);
            if now.duration_since(since) > self.slow_timeout {
                inbox.close = Some(SLOW_CONSUMER);
            }
            // Drop the oldest batches until the new one fits.
            let mut kept = VecDeque::with_capacity(inbox.queue.len());
            let mut queue = std::mem::take(&mut inbox.queue);
            while let Some(item) = queue.pop_front() {
                match item {
                    Outgoing::Batch {
                        topic,
                        items,
                        count,
                        ..
                    } if inbox.bytes + size > self.limit => {
                        inbox.bytes -= items.json.len();
                        let n = count;
                        dropped += n;
                        add_dropped(&mut inbox.dropped, &topic, n);
                    }
                    other => kept.push_back(other),
                }
            }
            inbox.queue = kept;
        }
        if inbox.bytes + size > self.limit && inbox.bytes > 0 {
            // Still no room (what is left cannot be dropped): drop the new batch too. A batch
            // larger than the whole limit is still taken when nothing else waits.
            dropped += count;
            add_dropped(&mut inbox.dropped, topic, count);
        } else {
            inbox.bytes += size;
            inbox.queue.push_back(Outgoing::Batch {
                topic: topic.clone(),
                items: Arc::clone(items),
                count,
                ingest,
                published: Instant::now(),
                pos: pos.cloned(),
            });
        }
        drop(inbox);
        self.notify.notify_one();
        dropped
    }

    /// Queues the batches a resume sends again (see [`Outgoing::Replay`]).
    pub fn push_replay(&self, topic: &Topic, batches: Vec<Replayed>) {
        let mut inbox = self.lock();
        inbox.queue.push_back(Outgoing::Replay {
            topic: topic.clone(),
            batches,
        });
        drop(inbox);
        self.notify.notify_one();
    }

    /// Mode `latest`: replaces the pending value of `key` on `topic`.
    pub fn push_latest(&self, topic: &Topic, key: &Key, element: Bytes, ingest: Option<Instant>) {
        let mut inbox = self.lock();
        match &mut inbox.latest_since {
            None => inbox.latest_since = Some((Instant::now(), ingest)),
            Some((_, oldest)) => {
                *oldest = match (*oldest, ingest) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
        }
        let size = element.len();
        let pending = inbox.latest.get(topic).and_then(|keys| keys.get(key));
        let old_size = pending.map_or(0, Bytes::len);
        if pending.is_none() && inbox.bytes > 0 && inbox.bytes + size > self.limit {
            let now = Instant::now();
            let since = *inbox.full_since.get_or_insert(now);
            if now.duration_since(since) > self.slow_timeout {
                inbox.close = Some(SLOW_CONSUMER);
            }
            add_dropped(&mut inbox.dropped, topic, 1);
            drop(inbox);
            self.notify.notify_one();
            return;
        }
        inbox
            .latest
            .entry(topic.clone())
            .or_default()
            .insert(key.clone(), element);
        inbox.bytes = inbox.bytes + size - old_size;
        drop(inbox);
        self.notify.notify_one();
    }

    /// `n` items of `topic` were lost before they reached the hub (cluster mode: on their way
    /// over NATS): reported to the subscriber as `dropped`, like items its mailbox dropped.
    pub fn note_lost(&self, topic: &Topic, n: u64) {
        let mut inbox = self.lock();
        add_dropped(&mut inbox.dropped, topic, n);
        drop(inbox);
        self.notify.notify_one();
    }

    /// Takes everything waiting. A mailbox that has been full for longer than the slow-consumer
    /// timeout is marked for closing here too, so a stall is caught even when nothing more
    /// arrives.
    pub fn take(&self) -> Inbox {
        let mut inbox = self.lock();
        if inbox
            .full_since
            .is_some_and(|since| since.elapsed() > self.slow_timeout)
        {
            inbox.close = Some(SLOW_CONSUMER);
        }
        let close = inbox.close;
        let taken = std::mem::take(&mut *inbox);
        inbox.close = close;
        taken
    }

    /// Whether the subscriber must be closed (and with which code).
    pub fn close_code(&self) -> Option<u16> {
        self.lock().close
    }
}

fn add_dropped(dropped: &mut Vec<(Topic, u64)>, topic: &Topic, n: u64) {
    match dropped.iter_mut().find(|(t, _)| t == topic) {
        Some((_, total)) => *total += n,
        None => dropped.push((topic.clone(), n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic() -> Topic {
        "t".into()
    }

    /// Queues `batch` of `n` items on topic `t`; how many items were dropped for it.
    fn push(mb: &Mailbox, batch: &Bytes, n: u64) -> u64 {
        mb.push_batch(
            &topic(),
            &Arc::new(Items::from(batch.clone())),
            n,
            None,
            None,
        )
    }

    #[test]
    fn oldest_batches_are_dropped_and_counted() {
        let mb = Mailbox::new(100, Duration::from_secs(60));
        let batch = Bytes::from_static(br#"[{"key":1,"value":"a]{"},{"key":2,"value":2}]"#);
        assert_eq!(push(&mb, &batch, 2), 0);
        assert_eq!(push(&mb, &batch, 2), 0);
        // The third does not fit: the first is dropped.
        assert_eq!(push(&mb, &batch, 2), 2);
        let inbox = mb.take();
        assert_eq!(inbox.queue.len(), 2);
        assert_eq!(inbox.dropped, vec![(topic(), 2)]);
        assert!(inbox.close.is_none());
    }

    #[test]
    fn latest_values_and_answers_stay_within_the_limit() {
        let mb = Mailbox::new(50, Duration::from_secs(60));
        let value = Bytes::from_static(b"{\"key\":1,\"value\":12345}");
        for k in 0..10 {
            mb.push_latest(&topic(), &Key::Int(k), value.clone(), None);
        }
        // Two fit in 50 bytes; the other eight new keys are dropped and counted.
        let inbox = mb.take();
        assert_eq!(inbox.latest[&topic()].len(), 2);
        assert_eq!(inbox.dropped, vec![(topic(), 8)]);
        // Answers a subscriber asks for and does not read: past the limit it is closed.
        let answer = Bytes::from(vec![b' '; 30]);
        mb.push_control(answer.clone());
        assert!(mb.close_code().is_none());
        mb.push_control(answer);
        assert_eq!(mb.close_code(), Some(SLOW_CONSUMER));
    }

    #[test]
    fn staying_full_past_the_timeout_closes() {
        let mb = Mailbox::new(10, Duration::ZERO);
        let batch = Bytes::from_static(b"[{\"key\":1,\"value\":1}]");
        push(&mb, &batch, 1);
        std::thread::sleep(Duration::from_millis(2));
        push(&mb, &batch, 1);
        assert_eq!(mb.close_code(), Some(SLOW_CONSUMER));
    }

    #[test]
    fn latest_keeps_one_value_per_key() {
        let mb = Mailbox::new(1 << 20, Duration::from_secs(1));
        for v in 0..100 {
            mb.push_latest(
                &topic(),
                &Key::Int(v % 3),
                Bytes::from(format!("{v}")),
                None,
            );
        }
        let inbox = mb.take();
        let pending = &inbox.latest[&topic()];
        assert_eq!(pending.len(), 3);
        assert_eq!(pending[&Key::Int(0)], Bytes::from("99"));
    }
}
