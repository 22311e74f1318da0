//! Idempotent producers: a frame sent again is counted once.
//!
//! A producer that names itself (`producer=ID` on `/ingest`) numbers its frames: the first
//! frame of a connection is number `frame=N` (default 0), the next `N+1`, and so on; a `POST
//! /ingest` body is the one frame `frame=N`. After a lost connection, the producer sends every
//! frame it has no ack for again, numbered as before, on a new connection with `frame=` the
//! first of them: to the same node, or in a cluster to any node. Each frame's events are counted
//! once, and every frame gets its ack.
//!
//! **Alone** the node keeps, per producer id, the number after the highest frame it has taken
//! ([`Producer::next`]). A frame numbered below it is a duplicate: answered with
//! `"duplicate":true` and nothing accepted, without being parsed or applied. A frame is checked,
//! routed and recorded under its producer's turn ([`Producer::turn`]), so that two connections
//! sending the same frame at once (an old one not yet timed out, and its replacement) apply it
//! once. With a data directory the table is made durable with the frames: a
//! [`crate::durable::Record::Produced`] precedes each frame's record in the log, and every
//! checkpoint holds the table as of its log position, so it survives a crash, which is exactly
//! when a producer has frames in doubt. The table keeps at most [`MAX_PRODUCERS`] ids; past
//! that, the ids idle longest are forgotten (`eddy_ingest_producers_forgotten_total`), and a
//! frame of theirs sent again would be applied again.
//!
//! **In a cluster** the frame's messages to JetStream carry the id `ID/N/P` (producer, frame,
//! partition) as `Nats-Msg-Id`, whichever node publishes them: JetStream stores a message once
//! per id within the stream's duplicate window (60 s), so a frame sent again to any node within
//! that window is stored once (see `cluster::publish`).
//!
//! An id belongs to one producer: two producers that share one overwrite each other's frames.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Longest producer id, in bytes.
pub const MAX_PRODUCER_ID: usize = 64;
/// Most producer ids a node remembers.
pub const MAX_PRODUCERS: usize = 100_000;

/// A frame's identity: its producer and its number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameId {
    pub producer: Arc<str>,
    pub frame: u64,
}

/// The producer id and first frame number of an ingest request, from its `producer` and
/// `frame` parameters: `Ok(None)` without a producer; `Err` says what is wrong.
pub fn from_params(producer: Option<&str>, frame: Option<&str>) -> Result<Option<FrameId>, String> {
    let Some(producer) = producer else {
        return match frame {
            Some(_) => Err("frame= needs producer= (frames are numbered per producer)".into()),
            None => Ok(None),
        };
    };
    let valid = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.');
    if producer.is_empty() || producer.len() > MAX_PRODUCER_ID || !producer.bytes().all(valid) {
        return Err(format!(
            "producer={producer:?}: 1 to {MAX_PRODUCER_ID} characters of A-Z, a-z, 0-9, '-', '_' and '.'"
        ));
    }
    let frame = match frame {
        None => 0,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| format!("frame={text:?}: expected a frame number, 0 to 2^63-1"))?
            as u64,
    };
    Ok(Some(FrameId {
        producer: producer.into(),
        frame,
    }))
}

/// One producer's frames so far.
pub struct Producer {
    /// Held while one of its frames is checked, routed and recorded.
    pub turn: tokio::sync::Mutex<()>,
    /// The number after the highest frame taken (0: none yet).
    next: AtomicU64,
    /// When it was last used, in [`Producers`]' ticks.
    used: AtomicU64,
}

impl Producer {
    /// The number after the highest frame taken.
    pub fn next(&self) -> u64 {
        self.next.load(Ordering::Acquire)
    }

    /// Frame `frame` has been taken.
    pub fn took(&self, frame: u64) {
        self.next
            .fetch_max(frame.saturating_add(1), Ordering::AcqRel);
    }
}

/// Every producer id this node has taken frames from (see the module documentation).
pub struct Producers {
    table: Mutex<HashMap<Arc<str>, Arc<Producer>>>,
    limit: usize,
    tick: AtomicU64,
    /// Ids forgotten to make room.
    pub forgotten: AtomicU64,
    /// Frames answered as duplicates.
    pub duplicates: AtomicU64,
}

impl Default for Producers {
    fn default() -> Self {
        Producers::with_limit(MAX_PRODUCERS)
    }
}

impl Producers {
    pub fn with_limit(limit: usize) -> Self {
        Producers {
            table: Mutex::new(HashMap::new()),
            limit: limit.max(1),
            tick: AtomicU64::new(0),
            forgotten: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Producer>>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Producer `id`, made (with no frame taken) if it is new.
    pub fn get(&self, id: &Arc<str>) -> Arc<Producer> {
        let now = self.tick.fetch_add(1, Ordering::Relaxed);
        let mut table = self.table();
        if let Some(p) = table.get(id) {
            p.used.store(now, Ordering::Relaxed);
            return Arc::clone(p);
        }
        if table.len() >= self.limit {
            self.make_room(&mut table);
        }
        let p = Arc::new(Producer {
            turn: tokio::sync::Mutex::new(()),
            next: AtomicU64::new(0),
            used: AtomicU64::new(now),
        });
        table.insert(Arc::clone(id), Arc::clone(&p));
        p
    }

    /// Forgets the idle eighth of the ids used longest ago (an id in use by a connection is
    /// kept), so that room is made once per many new ids, not for each.
    fn make_room(&self, table: &mut HashMap<Arc<str>, Arc<Producer>>) {
        let mut idle: Vec<(u64, Arc<str>)> = table
            .iter()
            .filter(|(_, p)| Arc::strong_count(p) == 1)
            .map(|(id, p)| (p.used.load(Ordering::Relaxed), Arc::clone(id)))
            .collect();
        idle.sort_unstable();
        let n = (self.limit / 8).max(1).min(idle.len());
        for (_, id) in idle.into_iter().take(n) {
            table.remove(&id);
        }
        self.forgotten.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Every producer with a frame taken, and the number after its highest (for a checkpoint),
    /// sorted by id.
    pub fn export(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .table()
            .iter()
            .map(|(id, p)| (id.to_string(), p.next()))
            .filter(|(_, next)| *next > 0)
            .collect();
        out.sort_unstable();
        out
    }

    /// Producer `id` had taken frames below `next` (a checkpoint, or a record of the log).
    pub fn restore(&self, id: &str, next: u64) {
        if next > 0 {
            self.get(&Arc::from(id)).took(next - 1);
        }
    }

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        self.table().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_name_a_producer_and_its_first_frame() {
        let id = from_params(Some("feed-1.eu_west"), Some("42"))
            .unwrap()
            .unwrap();
        assert_eq!(&*id.producer, "feed-1.eu_west");
        assert_eq!(id.frame, 42);
        assert_eq!(from_params(Some("p"), None).unwrap().unwrap().frame, 0);
        assert_eq!(from_params(None, None).unwrap(), None);
        let long = "x".repeat(MAX_PRODUCER_ID);
        assert!(from_params(Some(&long), None).is_ok());
        for bad in ["", "a b", "a/b", "é", &"x".repeat(MAX_PRODUCER_ID + 1)] {
            let e = from_params(Some(bad), None).unwrap_err();
            assert!(e.starts_with("producer="), "{bad:?}: {e}");
        }
        for bad in ["-1", "x", "", "9223372036854775808"] {
            let e = from_params(Some("p"), Some(bad)).unwrap_err();
            assert!(e.starts_with("frame="), "{bad:?}: {e}");
        }
        let e = from_params(None, Some("3")).unwrap_err();
        assert!(e.contains("needs producer="), "{e}");
    }

    #[test]
    fn a_frame_below_the_next_is_a_duplicate_and_next_only_rises() {
        let producers = Producers::default();
        let p = producers.get(&Arc::from("p"));
        assert_eq!(p.next(), 0);
        p.took(0);
        p.took(1);
        assert_eq!(p.next(), 2);
        // A frame taken late (numbered below what was taken) does not lower it.
        p.took(0);
        assert_eq!(p.next(), 2);
        // A gap in the numbers is allowed: the producer may skip numbers.
        p.took(9);
        assert_eq!(p.next(), 10);
        assert!(Arc::ptr_eq(&p, &producers.get(&Arc::from("p"))));
        assert_eq!(producers.export(), vec![("p".to_owned(), 10)]);
    }

    #[test]
    fn export_and_restore_round_trip_and_skip_unused_ids() {
        let a = Producers::default();
        a.get(&Arc::from("b")).took(4);
        a.get(&Arc::from("a")).took(0);
        a.get(&Arc::from("unused"));
        let exported = a.export();
        assert_eq!(exported, vec![("a".to_owned(), 1), ("b".to_owned(), 5)]);
        let b = Producers::default();
        for (id, next) in &exported {
            b.restore(id, *next);
        }
        b.restore("zero", 0);
        assert_eq!(b.export(), exported);
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn past_the_limit_the_longest_idle_ids_are_forgotten_and_ids_in_use_kept() {
        let producers = Producers::with_limit(16);
        let held = producers.get(&Arc::from("held"));
        held.took(0);
        for i in 0..15 {
            producers.get(&Arc::from(format!("p{i}").as_str())).took(0);
        }
        assert_eq!(producers.len(), 16);
        // "held" is the oldest but in use; p0 and p1 are the oldest idle ones (16 / 8 = 2).
        producers.get(&Arc::from("new"));
        assert_eq!(producers.len(), 15);
        assert_eq!(producers.forgotten.load(Ordering::Relaxed), 2);
        let ids: Vec<String> = producers.export().into_iter().map(|(id, _)| id).collect();
        assert!(ids.contains(&"held".to_owned()));
        assert!(!ids.contains(&"p0".to_owned()) && !ids.contains(&"p1".to_owned()));
        assert!(ids.contains(&"p2".to_owned()));
    }
}
