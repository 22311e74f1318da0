//! The ingest log: a segmented, checksummed, append-only file of what entered the server, in the
//! order it was routed.
//!
//! A record is `[len: u32][crc32 of the payload: u32][payload]`, little-endian; its position
//! (LSN) is its number in the log, counted from 0 and never reused. Segments are files named by
//! the LSN of their first record (`00000000000000000042.log`); a new one starts once the current
//! one passes [`SEGMENT_BYTES`], and whole segments are deleted once a checkpoint covers them.
//!
//! Appends go to a buffer in memory; a writer thread takes whatever is waiting and writes it with
//! one system call, at once ([`LogGate`] tells the hub when it is written). Beside it, a syncer
//! thread runs `fsync` under [`Fsync::Always`] whenever something is unsynced: every frame
//! written during the previous `fsync` shares the next one (group commit), so throughput holds
//! while each acknowledgement still waits for the disk, and no write waits for an `fsync`.
//! [`Log::durable`] tells how far acknowledgements may go.
//!
//! At open, every segment is read and checked. The first record that is cut short or fails its
//! checksum ends the log: the segment is truncated there, later segments are deleted, and the
//! loss is reported, so garbage is never replayed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// A segment is closed once it passes this size.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// Largest record accepted when reading: a longer length field is corruption.
const MAX_RECORD_BYTES: u32 = 1 << 30;

/// When appended records reach the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// Before any of them is acknowledged, one `fsync` for everything waiting (group commit).
    Always,
    /// At most this long after they are written; an acknowledgement waits only for the write, so
    /// a machine crash may lose what was acknowledged within this window (a killed process loses
    /// nothing: the operating system has it).
    Interval(Duration),
    /// Never explicitly: the operating system decides.
    Never,
}

impl Fsync {
    /// `always`, `never`, or a duration such as `10ms`.
    pub fn parse(text: &str) -> Result<Fsync, String> {
        match text {
            "always" => Ok(Fsync::Always),
            "never" => Ok(Fsync::Never),
            other => match eddy_plugins::parse_duration_ms(other) {
                Ok(ms) if ms > 0 => Ok(Fsync::Interval(Duration::from_millis(ms as u64))),
                _ => Err(format!(
                    "fsync must be \"always\", \"never\" or an interval such as \"10ms\", found {other:?}"
                )),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("ingest log {path}: {source}")]
    Io { path: String, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What opening the log found.
#[derive(Debug, Default, Clone)]
pub struct Opened {
    /// LSN of the first record still on disk.
    pub first: u64,
    /// LSN the next append gets.
    pub end: u64,
    /// Bytes cut off a torn or corrupt tail (0 when the log was whole).
    pub truncated_bytes: u64,
    /// Why the tail was cut, when it was.
    pub truncated_because: Option<String>,
}

struct Pending {
    buf: Vec<u8>,
    /// LSN after the last record in `buf` (or written).
    end: u64,
    closed: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Records before these LSNs were appended, and written to the file (handed to the
    /// operating system, which keeps them through a crash of the process).
    appended: AtomicU64,
    written: AtomicU64,
    /// The writer has stopped (a write failed, or the log closed).
    stopped: AtomicBool,
    /// Signalled when `written` moves.
    written_lock: Mutex<()>,
    written_moved: Condvar,
    /// A handle on the segment being written, for the syncer.
    segment: Mutex<Option<File>>,
}

/// Lets a reader of the shards' output wait until every record appended so far is written
/// (see [`LogGate::wait_written`]).
#[derive(Clone)]
pub struct LogGate {
    shared: Arc<Shared>,
}

impl LogGate {
    /// Waits until every record appended before the call is written to the file, or the
    /// writer has stopped. The hub calls it before it publishes: an item whose input is not in
    /// the log could otherwise reach a subscriber and then, after a crash, not be replayed.
    pub fn wait_written(&self) {
        let s = &self.shared;
        let target = s.appended.load(Ordering::Acquire);
        if s.written.load(Ordering::Acquire) >= target {
            return;
        }
        let mut guard = s.written_lock.lock().unwrap_or_else(|e| e.into_inner());
        while s.written.load(Ordering::Acquire) < target && !s.stopped.load(Ordering::Acquire) {
            guard = s
                .written_moved
                .wait_timeout(guard, Duration::from_millis(1))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The appending side of the log; its owner decides the order of records.
pub struct Log {
    dir: PathBuf,
    shared: Arc<Shared>,
    durable: watch::Receiver<u64>,
    writer: Option<std::thread::JoinHandle<()>>,
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.log")
}

/// The segments in `dir`, by first LSN.
fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LogError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        let first = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(first) = first {
            out.push((first, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Reads records one by one from a segment file.
struct SegmentReader {
    file: BufReader<File>,
    offset: u64,
}

enum Next {
    Record(Vec<u8>),
    End,
    /// Cut short or corrupt at this offset, and why.
    Bad(String),
}

impl SegmentReader {
    fn open(path: &Path) -> Result<SegmentReader, LogError> {
        let file = File::open(path).map_err(io_err(path))?;
        Ok(SegmentReader {
            file: BufReader::with_capacity(1 << 20, file),
            offset: 0,
        })
    }

    fn next(&mut self) -> Next {
        let mut head = [0u8; 8];
        let mut got = 0;
        while got < head.len() {
            match self.file.read(&mut head[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => return Next::Bad(e.to_string()),
            }
        }
        if got == 0 {
            return Next::End;
        }
        if got < head.len() {
            return Next::Bad(format!("a record header cut short at byte {}", self.offset));
        }
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
        if len > MAX_RECORD_BYTES {
            return Next::Bad(format!("a record length of {len} at byte {}", self.offset));
        }
        let mut payload = vec![0u8; len as usize];
        if self.file.read_exact(&mut payload).is_err() {
            return Next::Bad(format!("a record cut short at byte {}", self.offset));
        }
        if crc32fast::hash(&payload) != crc {
            return Next::Bad(format!("a checksum mismatch at byte {}", self.offset));
        }
        self.offset += 8 + u64::from(len);
        Next::Record(payload)
    }
}

/// Appends one record (`len`, `crc`, payload) to `out`.
pub fn frame_record(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

impl Log {
    /// Opens (or creates) the log in `dir`, checking every record and cutting a bad tail, and
    /// starts its writer. `floor` is the least LSN the next append may get (a checkpoint may
    /// cover records a crash took from the tail).
    pub fn open(dir: &Path, fsync: Fsync, floor: u64) -> Result<(Log, Opened), LogError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut opened = Opened::default();
        let segs = segments(dir)?;
        opened.first = segs.first().map_or(floor, |(f, _)| *f);
        let mut end = opened.first;
        let mut cut_at: Option<usize> = None;
        for (i, (first, path)) in segs.iter().enumerate() {
            if *first != end && i > 0 {
                opened.truncated_because = Some(format!(
                    "segment {} starts at record {first}, expected {end}",
                    path.display()
                ));
                cut_at = Some(i);
                break;
            }
            end = *first;
            let mut reader = SegmentReader::open(path)?;
            loop {
                match reader.next() {
                    Next::Record(_) => end += 1,
                    Next::End => break,
                    Next::Bad(why) => {
                        let len = fs::metadata(path).map_err(io_err(path))?.len();
                        opened.truncated_bytes += len - reader.offset;
                        opened.truncated_because = Some(format!("{} in {}", why, path.display()));
                        let file = OpenOptions::new()
                            .write(true)
                            .open(path)
                            .map_err(io_err(path))?;
                        file.set_len(reader.offset).map_err(io_err(path))?;
                        file.sync_all().map_err(io_err(path))?;
                        cut_at = Some(i + 1);
                        break;
                    }
                }
            }
            if cut_at.is_some() {
                break;
            }
        }
        if let Some(from) = cut_at {
            for (_, path) in &segs[from..] {
                opened.truncated_bytes += fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                fs::remove_file(path).map_err(io_err(path))?;
            }
        }
        // Appends go on in the last segment only if its records end where the log goes on.
        let reuse = segments(dir)?
            .pop()
            .filter(|_| end >= floor)
            .map(|(_, path)| path)
            .filter(|p| fs::metadata(p).is_ok_and(|m| m.len() < SEGMENT_BYTES));
        let end = end.max(floor);
        opened.end = end;
        let (durable_tx, durable) = watch::channel(end);
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                buf: Vec::new(),
                end,
                closed: false,
            }),
            wake: Condvar::new(),
            appended: AtomicU64::new(end),
            written: AtomicU64::new(end),
            stopped: AtomicBool::new(false),
            written_lock: Mutex::new(()),
            written_moved: Condvar::new(),
            segment: Mutex::new(None),
        });
        let writer = Writer {
            dir: dir.to_path_buf(),
            fsync,
            shared: Arc::clone(&shared),
            durable: Arc::new(durable_tx),
            file: None,
            reuse,
            written_end: end,
        };
        let writer = std::thread::Builder::new()
            .name("eddy-log".into())
            .spawn(move || writer.run())
            .map_err(io_err(dir))?;
        Ok((
            Log {
                dir: dir.to_path_buf(),
                shared,
                durable,
                writer: Some(writer),
            },
            opened,
        ))
    }

    /// Appends one record; returns its LSN. The caller's lock decides the order of records.
    pub fn append(&self, payload: &[u8]) -> u64 {
        let mut p = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        frame_record(&mut p.buf, payload);
        let lsn = p.end;
        p.end += 1;
        self.shared.appended.store(p.end, Ordering::Release);
        drop(p);
        self.shared.wake.notify_one();
        lsn
    }

    /// See [`LogGate`].
    pub fn gate(&self) -> LogGate {
        LogGate {
            shared: Arc::clone(&self.shared),
        }
    }

    /// The LSN the next append gets.
    pub fn end(&self) -> u64 {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .end
    }

    /// Records before the returned LSN are durable (under the fsync policy).
    pub fn durable(&self) -> watch::Receiver<u64> {
        self.durable.clone()
    }

    /// Waits until record `lsn` is durable. Returns false if the writer has stopped (a write
    /// failed): the record may be lost, and must not be acknowledged.
    pub async fn wait_durable(&self, lsn: u64) -> bool {
        let mut rx = self.durable.clone();
        let ok = rx.wait_for(|&d| d > lsn).await.is_ok();
        ok
    }

    /// Deletes the segments whose records all come before `lsn` (a checkpoint covers them).
    /// Returns how many were deleted.
    pub fn delete_before(&self, lsn: u64) -> Result<usize, LogError> {
        let segs = segments(&self.dir)?;
        let mut deleted = 0;
        for pair in segs.windows(2) {
            let ((_, path), (next_first, _)) = (&pair[0], &pair[1]);
            if *next_first <= lsn {
                fs::remove_file(path).map_err(io_err(path))?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Bytes of the segments on disk.
    pub fn disk_bytes(&self) -> u64 {
        segments(&self.dir)
            .map(|s| {
                s.iter()
                    .filter_map(|(_, p)| fs::metadata(p).ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Writes and syncs what is waiting, and stops the writer.
    pub fn close(&mut self) {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed = true;
        self.shared.wake.notify_one();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        self.close();
    }
}

/// Moves the durable position to `to`, never back (the writer and the syncer both move it).
fn advance(durable: &watch::Sender<u64>, to: u64) {
    durable.send_if_modified(|at| {
        let moved = to > *at;
        if moved {
            *at = to;
        }
        moved
    });
}

/// Flushes what the writer wrote to disk, and moves the durable position (`always`: as soon as
/// there is something unsynced, so one fsync covers everything written while the previous one
/// ran; an interval: at most that often).
struct Syncer {
    fsync: Fsync,
    shared: Arc<Shared>,
    durable: Arc<watch::Sender<u64>>,
    synced: u64,
}

impl Syncer {
    fn run(mut self) {
        let mut last_sync = Instant::now();
        loop {
            // What is written, and the segment it is in, read together (see `write_until_closed`).
            let (target, file) = {
                let mut guard = self
                    .shared
                    .written_lock
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                while self.shared.written.load(Ordering::Acquire) <= self.synced {
                    if self.shared.stopped.load(Ordering::Acquire) {
                        return;
                    }
                    guard = self
                        .shared
                        .written_moved
                        .wait_timeout(guard, Duration::from_millis(100))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                let file = self
                    .shared
                    .segment
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .and_then(|f| f.try_clone().ok());
                (self.shared.written.load(Ordering::Acquire), file)
            };
            if let Fsync::Interval(every) = self.fsync {
                let wait = every.saturating_sub(last_sync.elapsed());
                if !wait.is_zero() {
                    std::thread::sleep(wait);
                }
            }
            if let Some(file) = file {
                if let Err(e) = file.sync_data() {
                    tracing::error!("ingest log fsync failed, acknowledgements stop: {e}");
                    return;
                }
            }
            last_sync = Instant::now();
            self.synced = target;
            if self.fsync == Fsync::Always {
                advance(&self.durable, target);
            }
        }
    }
}

/// Reads the records of the log in `dir` from LSN `from` on, calling `each(lsn, payload)`. Run
/// after [`Log::open`], which has cut any bad tail.
pub fn read_from(
    dir: &Path,
    from: u64,
    mut each: impl FnMut(u64, Vec<u8>) -> Result<(), String>,
) -> Result<u64, String> {
    let segs = segments(dir).map_err(|e| e.to_string())?;
    let mut count = 0;
    for (i, (first, path)) in segs.iter().enumerate() {
        if segs.get(i + 1).is_some_and(|(next, _)| *next <= from) {
            continue;
        }
        let mut reader = SegmentReader::open(path).map_err(|e| e.to_string())?;
        let mut lsn = *first;
        loop {
            match reader.next() {
                Next::Record(payload) => {
                    if lsn >= from {
                        each(lsn, payload)?;
                        count += 1;
                    }
                    lsn += 1;
                }
                Next::End => break,
                Next::Bad(why) => return Err(format!("{why} in {}", path.display())),
            }
        }
    }
    Ok(count)
}

/// The writer thread: takes what is waiting, writes it, syncs per the policy, and publishes how
/// far the log is durable.
struct Writer {
    dir: PathBuf,
    fsync: Fsync,
    shared: Arc<Shared>,
    durable: Arc<watch::Sender<u64>>,
    /// The open segment and its size.
    file: Option<(File, u64)>,
    /// The segment the log ended in at open, to go on in.
    reuse: Option<PathBuf>,
    written_end: u64,
}

impl Writer {
    fn run(mut self) {
        let shared = Arc::clone(&self.shared);
        // Writes go to the file as soon as they are appended; fsyncs run beside them, on a
        // second thread, so that a write never waits behind an fsync (the hub publishes once a
        // record is written, and should not wait for a disk flush to do so).
        let syncer = match self.fsync {
            Fsync::Never => None,
            fsync => {
                let syncer = Syncer {
                    fsync,
                    shared: Arc::clone(&shared),
                    durable: Arc::clone(&self.durable),
                    synced: self.written_end,
                };
                std::thread::Builder::new()
                    .name("eddy-log-sync".into())
                    .spawn(move || syncer.run())
                    .ok()
            }
        };
        if let Err(e) = self.write_until_closed() {
            tracing::error!("ingest log write failed, acknowledgements stop: {e}");
        }
        shared.stopped.store(true, Ordering::Release);
        {
            let _guard = shared.written_lock.lock();
            shared.written_moved.notify_all();
        }
        if let Some(syncer) = syncer {
            let _ = syncer.join();
        }
    }

    /// Writes what is appended until the log closes; then syncs it all.
    fn write_until_closed(&mut self) -> io::Result<()> {
        loop {
            let (buf, end, closed) = {
                let mut p = self
                    .shared
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                while p.buf.is_empty() && !p.closed {
                    p = self.shared.wake.wait(p).unwrap_or_else(|e| e.into_inner());
                }
                (std::mem::take(&mut p.buf), p.end, p.closed)
            };
            if !buf.is_empty() {
                let first = self.written_end;
                self.write(first, &buf)?;
                self.written_end = end;
                {
                    // Under the lock the syncer reads the file and `written` together.
                    let _guard = self
                        .shared
                        .written_lock
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    self.shared.written.store(end, Ordering::Release);
                    self.shared.written_moved.notify_all();
                }
                // `never` and an interval: an acknowledgement waits for the write only.
                if self.fsync != Fsync::Always {
                    advance(&self.durable, end);
                }
            }
            if closed
                && self
                    .shared
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .buf
                    .is_empty()
            {
                if let Some((file, _)) = &self.file {
                    file.sync_data()?;
                }
                advance(&self.durable, self.written_end);
                return Ok(());
            }
        }
    }

    fn write(&mut self, first: u64, buf: &[u8]) -> io::Result<()> {
        let full = self
            .file
            .as_ref()
            .is_some_and(|(_, size)| *size >= SEGMENT_BYTES);
        if full {
            if let Some((file, _)) = self.file.take() {
                file.sync_data()?;
            }
        }
        if self.file.is_none() {
            // Go on in the segment the log ended in at open, else start one named by `first`.
            let path = self
                .reuse
                .take()
                .unwrap_or_else(|| self.dir.join(segment_name(first)));
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            let size = file.metadata()?.len();
            if size == 0 {
                // A new file: make its name durable too.
                if let Ok(d) = File::open(&self.dir) {
                    let _ = d.sync_all();
                }
            }
            // The syncer flushes this segment from now on (the previous one is synced above).
            *self
                .shared
                .segment
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = file.try_clone().ok();
            self.file = Some((file, size));
        }
        let (file, size) = self.file.as_mut().expect("a segment is open");
        file.write_all(buf)?;
        *size += buf.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(dir: &Path, from: u64) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        read_from(dir, from, |lsn, p| {
            out.push((lsn, p));
            Ok(())
        })
        .unwrap();
        out
    }

    async fn append_all(log: &Log, n: u64, tag: u8) -> u64 {
        let mut last = 0;
        for i in 0..n {
            last = log.append(&[tag, i as u8, 0xAB]);
        }
        assert!(log.wait_durable(last).await);
        last
    }

    #[tokio::test]
    async fn appends_read_back_in_order_across_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, opened) = Log::open(dir.path(), Fsync::Always, 0).unwrap();
        assert_eq!((opened.first, opened.end), (0, 0));
        assert_eq!(append_all(&log, 5, 1).await, 4);
        log.close();
        drop(log);
        let (log, opened) =
            Log::open(dir.path(), Fsync::Interval(Duration::from_millis(5)), 0).unwrap();
        assert_eq!(opened.end, 5);
        assert_eq!(opened.truncated_bytes, 0);
        assert_eq!(append_all(&log, 3, 2).await, 7);
        drop(log);
        let got = records(dir.path(), 3);
        let lsns: Vec<u64> = got.iter().map(|(l, _)| *l).collect();
        assert_eq!(lsns, vec![3, 4, 5, 6, 7]);
        assert_eq!(got[0].1, vec![1, 3, 0xAB]);
        assert_eq!(got[2].1, vec![2, 0, 0xAB]);
    }

    #[tokio::test]
    async fn a_torn_tail_and_a_flipped_byte_are_cut_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = Log::open(dir.path(), Fsync::Never, 0).unwrap();
        append_all(&log, 4, 1).await;
        drop(log);
        let (_, seg) = segments(dir.path()).unwrap().pop().unwrap();
        let len = fs::metadata(&seg).unwrap().len();
        // Each record is 8 + 3 bytes: cut the last one in half.
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 5)
            .unwrap();
        let (log, opened) = Log::open(dir.path(), Fsync::Never, 0).unwrap();
        assert_eq!(opened.end, 3);
        assert_eq!(opened.truncated_bytes, 6);
        assert!(opened.truncated_because.unwrap().contains("cut short"));
        // The log goes on after the cut, with no hole in the numbering.
        assert_eq!(append_all(&log, 1, 9).await, 3);
        drop(log);
        assert_eq!(records(dir.path(), 0).len(), 4);
        // Flip a byte in the second record's payload.
        let mut bytes = fs::read(&seg).unwrap();
        bytes[11 + 9] ^= 0xFF;
        fs::write(&seg, &bytes).unwrap();
        let (_, opened) = Log::open(dir.path(), Fsync::Never, 0).unwrap();
        assert_eq!(opened.end, 1);
        assert!(opened.truncated_because.unwrap().contains("checksum"));
        assert_eq!(records(dir.path(), 0).len(), 1);
    }

    #[tokio::test]
    async fn a_checkpoint_floor_starts_a_new_segment_and_old_ones_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = Log::open(dir.path(), Fsync::Never, 0).unwrap();
        append_all(&log, 2, 1).await;
        drop(log);
        // A checkpoint covered records up to 10 that a crash took from the tail.
        let (log, opened) = Log::open(dir.path(), Fsync::Never, 10).unwrap();
        assert_eq!(opened.end, 10);
        assert_eq!(append_all(&log, 2, 2).await, 11);
        let names: Vec<u64> = segments(dir.path()).unwrap().iter().map(|s| s.0).collect();
        assert_eq!(names, vec![0, 10]);
        assert_eq!(records(dir.path(), 10).len(), 2);
        assert_eq!(log.delete_before(10).unwrap(), 1);
        assert_eq!(log.delete_before(100).unwrap(), 0, "the open segment stays");
        drop(log);
        let (_, opened) = Log::open(dir.path(), Fsync::Never, 0).unwrap();
        assert_eq!((opened.first, opened.end), (10, 12));
    }
}
