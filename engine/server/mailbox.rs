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
//! **Writing straight to an idle socket.** When the connection task has written everything and
//! waits (it said so with [`Mailbox::idle`]) and nothing is queued, a batch put here is written
//! at once to the subscriber's socket by the thread that puts it (a shard publishing through
//! the hub), without a wake-up of the connection task: one hand-off fewer on the way out, which
//! is most of an idle subscriber's latency. The write never waits: what the socket does not
//! take at once stays here, and the connection task, woken, writes it first. The connection
//! task takes the socket back with [`Mailbox::busy`] before it writes anything itself, so
//! frames never interleave; the batch sequence numbers go with whoever may write.
//!
//! Control messages (`subscribed`, `snapshot`, `closed`, `topics`, `error`) are never dropped.
//! They count toward `limit` too: a subscriber whose requests would queue more than the limit of
//! answers it has not read (snapshots, most often) is closed with 4008 at once.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::{Key, Topic};

use super::deflate::Compressed;
use super::metrics::SocketRecorder;
use super::replay::Replayed;
use super::ws::Gather;

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
    /// The socket, while it may be written to straight from here (never part of a take).
    direct: Option<Direct>,
}

/// What writing straight to a subscriber's socket needs (see the module docs).
struct Direct {
    /// The subscriber's socket (a duplicate of the connection's descriptor).
    socket: OwnedFd,
    /// The connection task is waiting with everything written: a batch may be written here.
    idle: bool,
    /// The batch sequence numbers per topic while `idle` (the connection task holds them
    /// otherwise).
    seqs: Seqs,
    /// The end of a frame written here in part, for the connection task to write first.
    rest: Option<Bytes>,
    socket_latency: SocketRecorder,
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

/// Sequence numbers of batch frames per topic (see [`super::subscribe`]), looked up for every
/// batch written to a subscriber: hashed with foldhash, seeded per process, as the hub's maps.
pub type Seqs = HashMap<Topic, u64, foldhash::fast::RandomState>;

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

    /// Lets batches be written straight to `socket` while the connection task is idle (see
    /// the module docs); their socket latencies go to `socket_latency`.
    pub fn writing_to(self, socket: OwnedFd, socket_latency: SocketRecorder) -> Self {
        self.lock().direct = Some(Direct {
            socket,
            idle: false,
            seqs: Seqs::default(),
            rest: None,
            socket_latency,
        });
        self
    }

    /// The connection task is about to write: batches wait here from now on. Hands over the
    /// sequence numbers (into `seqs`) and the end of a frame written in part, to write first.
    pub fn busy(&self, seqs: &mut Seqs) -> Option<Bytes> {
        let mut inbox = self.lock();
        let direct = inbox.direct.as_mut()?;
        if direct.idle {
            direct.idle = false;
            *seqs = std::mem::take(&mut direct.seqs);
        }
        direct.rest.take()
    }

    /// The connection task wrote and flushed everything it took: batches may be written
    /// straight to the socket again. Takes back the sequence numbers.
    pub fn idle(&self, seqs: &mut Seqs) {
        let mut inbox = self.lock();
        if let Some(direct) = inbox.direct.as_mut() {
            if !direct.idle && direct.rest.is_none() {
                direct.idle = true;
                direct.seqs = std::mem::take(seqs);
            }
        }
    }

    /// The connection task is gone: nothing is written to the socket from here any more.
    pub fn detach(&self) {
        let direct = self.lock().direct.take();
        drop(direct);
    }

    /// Writes a batch straight to the socket when the connection task is idle and nothing
    /// waits before it. Returns false when the batch must be queued instead.
    fn write_direct(
        &self,
        inbox: &mut Inbox,
        topic: &Topic,
        items: &Arc<Items>,
        count: u64,
        (published, ingest): (Instant, Option<Instant>),
        pos: Option<&Arc<str>>,
    ) -> bool {
        let waiting = !inbox.queue.is_empty()
            || !inbox.dropped.is_empty()
            || !inbox.latest.is_empty()
            || inbox.close.is_some();
        let Some(direct) = inbox
            .direct
            .as_mut()
            .filter(|d| d.idle && d.rest.is_none() && !waiting)
        else {
            return false;
        };
        let mut frame = Gather::default();
        super::subscribe::batch_frame(
            &mut frame,
            &mut direct.seqs,
            topic,
            &[&**items],
            count,
            pos.map(|p| &**p),
            self.deflate,
        );
        let len = frame.len();
        match super::ws::write_now(direct.socket.as_fd(), &frame) {
            Ok(n) if n == len => {
                let now = Instant::now();
                let us = |t: Instant| now.duration_since(t).as_micros() as u64;
                direct
                    .socket_latency
                    .record_direct((us(published), ingest.map(us), count));
            }
            // The socket took part of it, or none, or failed: the connection task writes the
            // rest (or meets the error) before anything else.
            written => {
                direct.rest = Some(frame.rest_after(*written.as_ref().unwrap_or(&0)));
                self.notify.notify_one();
            }
        }
        true
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

    /// Queues a batch of `count` items (published at `published`, received at `ingest`, the
    /// topic at `pos` after it), or with `direct`, writes it straight to an idle subscriber's
    /// socket (see the module docs); returns how many items were dropped to make room.
    ///
    /// `published` is read once per batch by the publisher, not here: a batch shared by a
    /// thousand subscribers would read the clock a thousand times on the shard's thread.
    pub fn push_batch(
        &self,
        topic: &Topic,
        items: &Arc<Items>,
        count: u64,
        (published, ingest, pos): (Instant, Option<Instant>, Option<&Arc<str>>),
        direct: bool,
    ) -> u64 {
        let mut inbox = self.lock();
        if direct && self.write_direct(&mut inbox, topic, items, count, (published, ingest), pos) {
            return 0;
        }
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
                published,
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
        let direct = inbox.direct.take();
        let taken = std::mem::take(&mut *inbox);
        inbox.close = close;
        inbox.direct = direct;
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
            (Instant::now(), None, None),
            false,
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
