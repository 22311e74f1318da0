//! Append-workload benchmark: a plain segment log (like eddy's engine/durable/log.rs) vs fjall
//! vs redb, with group commit.
//!
//! Usage: storage-bench <plain|fjall|redb> <record_bytes> <seconds> <data_dir> [window_bytes] [rate]
//! (rate: total records/s offered by the 4 producers together; 0 or absent = as fast as possible)
//! Prints one line of `key=value` results.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const PRODUCERS: usize = 4;
const SEGMENT_BYTES: u64 = 64 << 20;
static RATE: AtomicU64 = AtomicU64::new(0);

// ---------------------------------------------------------------------------------------------
// Payloads: JSON-like event text (what an ingest log holds), 1 or 100 events per frame.

fn make_payloads(record_bytes: usize, n: usize) -> Vec<Vec<u8>> {
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    (0..n)
        .map(|_| {
            let mut s = String::with_capacity(record_bytes + 128);
            while s.len() < record_bytes {
                let r = rnd();
                s.push_str(&format!(
                    "{{\"ts\":{},\"host\":\"h{}\",\"k\":\"user-{}\",\"v\":{}.{}}}\n",
                    1_700_000_000_000u64 + (r % 1_000_000),
                    r % 97,
                    (r >> 8) % 10_000,
                    (r >> 20) % 100_000,
                    (r >> 40) % 1000
                ));
            }
            let mut v = s.into_bytes();
            v.truncate(record_bytes);
            v
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Shared harness: LSN counter, in-flight window (backpressure), latency recording.

struct Flow {
    appended: AtomicU64,
    durable: AtomicU64,
    window: u64,
    lock: Mutex<()>,
    cv: Condvar,
    stop: AtomicBool,
}

impl Flow {
    fn new(window: u64) -> Arc<Flow> {
        Arc::new(Flow {
            appended: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            window,
            lock: Mutex::new(()),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
        })
    }
    /// Blocks while more than `window` records are appended but not durable.
    fn wait_room(&self) {
        if self.appended.load(Ordering::Acquire) - self.durable.load(Ordering::Acquire)
            < self.window
        {
            return;
        }
        let mut g = self.lock.lock().unwrap();
        while self.appended.load(Ordering::Acquire) - self.durable.load(Ordering::Acquire)
            >= self.window
            && !self.stop.load(Ordering::Relaxed)
        {
            g = self.cv.wait_timeout(g, Duration::from_millis(5)).unwrap().0;
        }
    }
    fn set_durable(&self, to: u64) {
        self.durable.store(to, Ordering::Release);
        let _g = self.lock.lock().unwrap();
        self.cv.notify_all();
    }
}

struct Stats {
    lat_us: Vec<u32>,
    groups: u64,
    durable_records: u64,
    durable_bytes: u64,
    last_durable: Option<Instant>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            lat_us: Vec::with_capacity(1 << 22),
            groups: 0,
            durable_records: 0,
            durable_bytes: 0,
            last_durable: None,
        }
    }
    fn record(&mut self, now: Instant, times: impl Iterator<Item = Instant>, bytes: u64) {
        let mut n = 0;
        for t in times {
            self.lat_us.push(now.duration_since(t).as_micros().min(u32::MAX as u128) as u32);
            n += 1;
        }
        self.groups += 1;
        self.durable_records += n;
        self.durable_bytes += bytes;
        self.last_durable = Some(now);
    }
}

// ---------------------------------------------------------------------------------------------
// (a) Plain segment log: writer thread writes the whole pending buffer with one write_all,
// syncer thread fsyncs (sync_data) whatever was written meanwhile (group commit).

fn frame_record(buf: &mut Vec<u8>, payload: &[u8]) {
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    buf.extend_from_slice(payload);
}

struct PlainPending {
    buf: Vec<u8>,
    times: Vec<Instant>,
    end: u64,
    closed: bool,
}

struct PlainShared {
    pending: Mutex<PlainPending>,
    wake: Condvar,
    /// (lsn_end, times of the records written in that write) not yet synced
    written_q: Mutex<(u64, VecDeque<Instant>, u64)>, // (written_end, times, written bytes)
    written_cv: Condvar,
    segment: Mutex<Option<File>>,
    writer_done: AtomicBool,
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.log")
}

fn run_plain(dir: &Path, flow: Arc<Flow>, payloads: Arc<Vec<Vec<u8>>>, secs: f64) -> Stats {
    let shared = Arc::new(PlainShared {
        pending: Mutex::new(PlainPending {
            buf: Vec::with_capacity(8 << 20),
            times: Vec::new(),
            end: 0,
            closed: false,
        }),
        wake: Condvar::new(),
        written_q: Mutex::new((0, VecDeque::new(), 0)),
        written_cv: Condvar::new(),
        segment: Mutex::new(None),
        writer_done: AtomicBool::new(false),
    });

    // Writer.
    let w = {
        let shared = shared.clone();
        let dir = dir.to_path_buf();
        std::thread::spawn(move || {
            let mut file: Option<(File, u64)> = None;
            let mut spare: Vec<u8> = Vec::with_capacity(8 << 20);
            let mut spare_t: Vec<Instant> = Vec::new();
            loop {
                let (first, end, closed) = {
                    let mut p = shared.pending.lock().unwrap();
                    while p.buf.is_empty() && !p.closed {
                        p = shared.wake.wait(p).unwrap();
                    }
                    std::mem::swap(&mut p.buf, &mut spare);
                    std::mem::swap(&mut p.times, &mut spare_t);
                    let n = spare_t.len() as u64;
                    (p.end - n, p.end, p.closed)
                };
                if !spare.is_empty() {
                    if file.as_ref().is_some_and(|(_, s)| *s >= SEGMENT_BYTES) {
                        let (f, _) = file.take().unwrap();
                        f.sync_data().unwrap();
                    }
                    if file.is_none() {
                        let path = dir.join(segment_name(first));
                        let f = OpenOptions::new().create(true).append(true).open(&path).unwrap();
                        File::open(&dir).unwrap().sync_all().unwrap();
                        *shared.segment.lock().unwrap() = f.try_clone().ok();
                        file = Some((f, 0));
                    }
                    let (f, size) = file.as_mut().unwrap();
                    f.write_all(&spare).unwrap();
                    *size += spare.len() as u64;
                    let mut q = shared.written_q.lock().unwrap();
                    q.0 = end;
                    q.1.extend(spare_t.drain(..));
                    q.2 += spare.len() as u64;
                    shared.written_cv.notify_all();
                    spare.clear();
                }
                if closed && shared.pending.lock().unwrap().buf.is_empty() {
                    shared.writer_done.store(true, Ordering::Release);
                    let _q = shared.written_q.lock().unwrap();
                    shared.written_cv.notify_all();
                    return;
                }
            }
        })
    };

    // Syncer.
    let s = {
        let shared = shared.clone();
        let flow = flow.clone();
        std::thread::spawn(move || {
            let mut stats = Stats::new();
            let mut synced = 0u64;
            loop {
                let (target, times, bytes, file) = {
                    let mut q = shared.written_q.lock().unwrap();
                    while q.0 <= synced {
                        if shared.writer_done.load(Ordering::Acquire) {
                            return stats;
                        }
                        q = shared
                            .written_cv
                            .wait_timeout(q, Duration::from_millis(100))
                            .unwrap()
                            .0;
                    }
                    let times: Vec<Instant> = q.1.drain(..).collect();
                    let bytes = std::mem::take(&mut q.2);
                    let file = shared.segment.lock().unwrap().as_ref().and_then(|f| f.try_clone().ok());
                    (q.0, times, bytes, file)
                };
                if let Some(f) = file {
                    f.sync_data().unwrap();
                }
                let now = Instant::now();
                stats.record(now, times.into_iter(), bytes);
                synced = target;
                flow.set_durable(target);
            }
        })
    };

    let producers = spawn_producers(flow.clone(), payloads, secs, {
        let shared = shared.clone();
        move |payload: &[u8], flow: &Flow| {
            let mut p = shared.pending.lock().unwrap();
            frame_record(&mut p.buf, payload);
            p.times.push(Instant::now());
            p.end += 1;
            flow.appended.store(p.end, Ordering::Release);
            drop(p);
            shared.wake.notify_one();
        }
    });
    for p in producers {
        p.join().unwrap();
    }
    shared.pending.lock().unwrap().closed = true;
    shared.wake.notify_one();
    w.join().unwrap();
    s.join().unwrap()
}

fn replay_plain(dir: &Path) -> (u64, u64) {
    let mut segs: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segs.sort();
    let (mut n, mut bytes) = (0u64, 0u64);
    for path in segs {
        let mut r = BufReader::with_capacity(1 << 20, File::open(&path).unwrap());
        let mut hdr = [0u8; 8];
        loop {
            if r.read_exact(&mut hdr).is_err() {
                break;
            }
            let len = u32::from_le_bytes(hdr[0..4].try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
            let mut payload = vec![0u8; len];
            r.read_exact(&mut payload).unwrap();
            assert_eq!(crc32fast::hash(&payload), crc, "crc mismatch");
            n += 1;
            bytes += len as u64;
            std::hint::black_box(&payload);
        }
    }
    (n, bytes)
}

// ---------------------------------------------------------------------------------------------
// Channel-fed single writer for fjall and redb: drain everything pending, insert it as one
// batch / transaction, then persist / commit.

type Item = (Vec<u8>, Instant);

fn run_channel<S: FnMut(u64, &[Item]) + Send + 'static>(
    flow: Arc<Flow>,
    payloads: Arc<Vec<Vec<u8>>>,
    secs: f64,
    mut sink: S,
) -> Stats {
    let (tx, rx) = crossbeam_channel::unbounded::<Item>();
    let writer = {
        let flow = flow.clone();
        std::thread::spawn(move || {
            let mut stats = Stats::new();
            let mut lsn = 0u64;
            let mut group: Vec<Item> = Vec::new();
            while let Ok(first) = rx.recv() {
                group.push(first);
                while let Ok(it) = rx.try_recv() {
                    group.push(it);
                }
                sink(lsn, &group); // inserts + durable commit
                let now = Instant::now();
                let bytes: u64 = group.iter().map(|(p, _)| p.len() as u64).sum();
                stats.record(now, group.iter().map(|(_, t)| *t), bytes);
                lsn += group.len() as u64;
                flow.set_durable(lsn);
                group.clear();
            }
            stats
        })
    };
    let producers = spawn_producers(flow.clone(), payloads, secs, {
        let tx = tx.clone();
        // The channel send and the appended counter are kept in one order by a lock (eddy's
        // append also runs under the caller's lock).
        let order = Arc::new(Mutex::new(()));
        move |payload: &[u8], flow: &Flow| {
            let v = payload.to_vec();
            let _g = order.lock().unwrap();
            tx.send((v, Instant::now())).unwrap();
            flow.appended.fetch_add(1, Ordering::AcqRel);
        }
    });
    for p in producers {
        p.join().unwrap();
    }
    drop(tx);
    writer.join().unwrap()
}

fn spawn_producers<F: Fn(&[u8], &Flow) + Clone + Send + 'static>(
    flow: Arc<Flow>,
    payloads: Arc<Vec<Vec<u8>>>,
    secs: f64,
    append: F,
) -> Vec<std::thread::JoinHandle<()>> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let rate = RATE.load(Ordering::Relaxed); // total records/s; 0 = as fast as possible
    (0..PRODUCERS)
        .map(|i| {
            let flow = flow.clone();
            let payloads = payloads.clone();
            let append = append.clone();
            std::thread::spawn(move || {
                let mut k = i;
                let mut j = 0u64;
                loop {
                    if rate > 0 {
                        let due = start
                            + Duration::from_secs_f64(j as f64 * PRODUCERS as f64 / rate as f64);
                        let now = Instant::now();
                        if now < due {
                            std::thread::sleep(due - now);
                        }
                        j += 1;
                        if Instant::now() >= deadline {
                            break;
                        }
                    } else if k % 64 == 0 && Instant::now() >= deadline {
                        break;
                    }
                    flow.wait_room();
                    append(&payloads[k % payloads.len()], &flow);
                    k += 1;
                }
                flow.stop.store(true, Ordering::Relaxed);
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------

fn dir_size(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let (mut len, mut alloc) = (0, 0);
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = fs::symlink_metadata(e.path()).unwrap();
        if m.is_dir() {
            let (l, a) = dir_size(&e.path());
            len += l;
            alloc += a;
        } else {
            len += m.len();
            alloc += m.blocks() * 512;
        }
    }
    (len, alloc)
}

/// Drops this benchmark's own files from the page cache (fadvise DONTNEED; files are synced),
/// so replay reads from disk without touching anyone else's cache.
fn evict(dir: &Path) {
    use std::os::unix::io::AsRawFd;
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            evict(&p);
        } else if let Ok(f) = File::open(&p) {
            let _ = f.sync_all();
            unsafe {
                libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
        }
    }
}

const REDB_TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("log");

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let store = args[1].clone();
    let record_bytes: usize = args[2].parse().unwrap();
    let secs: f64 = args[3].parse().unwrap();
    let dir = PathBuf::from(&args[4]);
    let window_bytes: u64 = args.get(5).map(|s| s.parse().unwrap()).unwrap_or(8 << 20);
    if let Some(r) = args.get(6) {
        RATE.store(r.parse().unwrap(), Ordering::Relaxed);
    }
    let window = (window_bytes / record_bytes as u64).max(PRODUCERS as u64);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();

    let payloads = Arc::new(make_payloads(record_bytes, 256));
    let flow = Flow::new(window);
    let t0 = Instant::now();

    let mut stats = match store.as_str() {
        "plain" => run_plain(&dir, flow.clone(), payloads.clone(), secs),
        "fjall" => {
            use fjall::{Database, KeyspaceCreateOptions, PersistMode};
            let db = Database::builder(&dir).open().unwrap();
            let ks = db.keyspace("log", KeyspaceCreateOptions::default).unwrap();
            let st = run_channel(flow.clone(), payloads.clone(), secs, move |lsn, group| {
                let mut b = db.batch();
                for (i, (p, _)) in group.iter().enumerate() {
                    b.insert(&ks, (lsn + i as u64).to_be_bytes(), p.as_slice());
                }
                b.commit().unwrap();
                db.persist(PersistMode::SyncData).unwrap();
            });
            st
        }
        "redb" => {
            let db = redb::Database::create(dir.join("log.redb")).unwrap();
            let st = run_channel(flow.clone(), payloads.clone(), secs, move |lsn, group| {
                let tx = db.begin_write().unwrap(); // Durability::Immediate is the default
                {
                    let mut t = tx.open_table(REDB_TABLE).unwrap();
                    for (i, (p, _)) in group.iter().enumerate() {
                        t.insert(lsn + i as u64, p.as_slice()).unwrap();
                    }
                }
                tx.commit().unwrap();
            });
            st
        }
        _ => panic!("unknown store"),
    };
    // Up to the last group made durable (includes draining the tail after producers stop, not
    // closing the store); the store was dropped (closed) with its writer thread.
    let close_s = stats.last_durable.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let elapsed = stats.last_durable.unwrap_or(t0).duration_since(t0).as_secs_f64();

    let (len, alloc) = dir_size(&dir);
    let n = stats.durable_records;

    // Replay: cold (our files evicted from page cache) then warm. Includes opening the store.
    let replay = |dir: &Path| -> (f64, u64, u64, f64) {
        let t = Instant::now();
        let (cnt, bytes, open_s) = match store.as_str() {
            "plain" => {
                let (c, b) = replay_plain(dir);
                (c, b, 0.0)
            }
            "fjall" => {
                use fjall::{Database, KeyspaceCreateOptions};
                let db = Database::builder(dir).open().unwrap();
                let ks = db.keyspace("log", KeyspaceCreateOptions::default).unwrap();
                let open_s = t.elapsed().as_secs_f64();
                let (mut c, mut b, mut expect) = (0u64, 0u64, 0u64);
                for g in ks.iter() {
                    let (k, v) = g.into_inner().unwrap();
                    assert_eq!(u64::from_be_bytes(k.as_ref().try_into().unwrap()), expect);
                    expect += 1;
                    c += 1;
                    b += v.len() as u64;
                    std::hint::black_box(&v);
                }
                (c, b, open_s)
            }
            "redb" => {
                use redb::{ReadableDatabase, ReadableTable};
                let db = redb::Database::create(dir.join("log.redb")).unwrap();
                let open_s = t.elapsed().as_secs_f64();
                let rt = db.begin_read().unwrap();
                let table = rt.open_table(REDB_TABLE).unwrap();
                let (mut c, mut b, mut expect) = (0u64, 0u64, 0u64);
                for e in table.iter().unwrap() {
                    let (k, v) = e.unwrap();
                    assert_eq!(k.value(), expect);
                    expect += 1;
                    c += 1;
                    b += v.value().len() as u64;
                    std::hint::black_box(v.value());
                }
                (c, b, open_s)
            }
            _ => unreachable!(),
        };
        (t.elapsed().as_secs_f64(), cnt, bytes, open_s)
    };
    evict(&dir);
    let (cold_s, cold_n, cold_b, cold_open) = replay(&dir);
    let (warm_s, warm_n, _, _) = replay(&dir);
    assert_eq!(cold_n, n, "replayed count differs from durable count");
    assert_eq!(warm_n, n);

    stats.lat_us.sort_unstable();
    let pct = |q: f64| -> f64 {
        if stats.lat_us.is_empty() {
            return 0.0;
        }
        let i = ((stats.lat_us.len() as f64 - 1.0) * q).round() as usize;
        stats.lat_us[i] as f64 / 1000.0
    };
    println!(
        "store={} rec={} rate={} secs={:.2} close_s={:.3} records={} rec_s={:.0} mb_s={:.1} groups={} avg_group={:.1} \
         p50_ms={:.2} p99_ms={:.2} max_ms={:.2} disk_len={} disk_alloc={} alloc_per_rec={:.1} \
         cold_replay_s={:.3} cold_open_s={:.3} cold_rec_s={:.0} cold_mb_s={:.1} warm_replay_s={:.3} warm_rec_s={:.0} warm_mb_s={:.1}",
        store,
        record_bytes,
        match RATE.load(Ordering::Relaxed) { 0 => "max".to_string(), r => r.to_string() },
        elapsed,
        close_s,
        n,
        n as f64 / elapsed,
        (n * record_bytes as u64) as f64 / elapsed / 1e6,
        stats.groups,
        n as f64 / stats.groups.max(1) as f64,
        pct(0.5),
        pct(0.99),
        pct(1.0),
        len,
        alloc,
        alloc as f64 / n.max(1) as f64,
        cold_s,
        cold_open,
        n as f64 / cold_s,
        cold_b as f64 / cold_s / 1e6,
        warm_s,
        n as f64 / warm_s,
        cold_b as f64 / warm_s / 1e6,
    );
    let _ = fs::remove_dir_all(&dir);
}
