//! Supervision of the server's own threads (shards and the hub): a panic while one message is
//! handled is caught, logged and counted, and the thread goes on; a thread that ends anyway
//! clears its liveness flag, which `/healthz` and ingest read.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Runs `f` for thread `thread`; a panic in it is logged and counted in `panics`, and the
/// thread goes on (the message in hand is lost).
pub fn guarded(thread: &str, panics: &AtomicU64, f: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(f)) {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        panics.fetch_add(1, Ordering::Relaxed);
        tracing::error!("{thread} panicked; the message in hand is lost, it goes on: {what}");
    }
}

/// Holds a thread's liveness flag: set while the guard lives, cleared when the thread that holds
/// it ends, by return or by panic.
pub struct Alive(Arc<AtomicBool>);

impl Alive {
    /// A guard for a new thread, and the flag the rest of the server reads.
    pub fn new() -> (Alive, Arc<AtomicBool>) {
        let flag = Arc::new(AtomicBool::new(true));
        (Alive(Arc::clone(&flag)), flag)
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}
