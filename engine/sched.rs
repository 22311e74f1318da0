//! Asks the kernel for a shorter time slice for the calling thread and the threads it starts.
//!
//! eddy's threads (the async runtime's workers and the shard threads) mostly run for a few
//! microseconds after a wake-up. When the cores are busy, a woken thread waits for the running
//! one to use up its slice before it is scheduled, which is what makes the latency tail: the
//! Linux scheduler (EEVDF) gives every thread the same default slice, 0.7 ms times a factor
//! that grows with the number of cores. Since Linux 6.12 a thread may ask for its own slice
//! (`sched_setattr` with `sched_runtime` on a normal thread, 0.1 to 100 ms, no privilege
//! needed): a shorter slice gives an earlier deadline, so a woken eddy thread runs sooner, in
//! exchange for more frequent switches. A new thread inherits its creator's slice, so setting
//! it on the main thread before the runtime and the shards start covers all of them.
//!
//! Older kernels accept the request and ignore it; other systems have no such call.

use std::io;

/// Shortest and longest slice the kernel takes, in microseconds.
pub const MIN_SLICE_US: u32 = 100;
pub const MAX_SLICE_US: u32 = 100_000;

/// Asks for a time slice of `us` microseconds for the calling thread and the threads it starts
/// from now on. `us` must be within [`MIN_SLICE_US`]..=[`MAX_SLICE_US`].
#[cfg(target_os = "linux")]
pub fn request_time_slice(us: u32) -> io::Result<()> {
    if !(MIN_SLICE_US..=MAX_SLICE_US).contains(&us) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a time slice must be {MIN_SLICE_US} to {MAX_SLICE_US} µs, found {us}"),
        ));
    }
    let attr = libc::sched_attr {
        size: std::mem::size_of::<libc::sched_attr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_flags: 0,
        sched_nice: current_nice(),
        sched_priority: 0,
        sched_runtime: u64::from(us) * 1_000,
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: `attr` is a valid, initialised `sched_attr` whose `size` field is its size, the
    // kernel only reads it, and pid 0 is the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const _, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
pub fn request_time_slice(_us: u32) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "time slices can be set on Linux only",
    ))
}

/// The calling thread's nice value, which `sched_setattr` would otherwise reset to 0.
#[cfg(target_os = "linux")]
fn current_nice() -> i32 {
    // SAFETY: getpriority has no memory effects; -1 is a valid answer, told apart by errno.
    unsafe {
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, 0);
        if nice == -1 && *libc::__errno_location() != 0 {
            0
        } else {
            nice
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The slice the kernel reports for the calling thread, in ns, where it reports one.
    fn reported_slice() -> Option<u64> {
        let text = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
        let line = text.lines().find(|l| l.starts_with("se.slice"))?;
        line.rsplit(':').next()?.trim().parse().ok()
    }

    #[test]
    fn a_thread_and_the_threads_it_starts_get_the_slice_asked_for() {
        std::thread::spawn(|| {
            let before = reported_slice();
            request_time_slice(250).expect("sched_setattr on a normal thread");
            let Some(before) = before else {
                eprintln!("this kernel does not report se.slice: only the call was checked");
                return;
            };
            let after = reported_slice().unwrap();
            if after == before {
                eprintln!("this kernel ignores custom slices (before Linux 6.12)");
                return;
            }
            assert_eq!(after, 250_000);
            let child = std::thread::spawn(reported_slice).join().unwrap();
            assert_eq!(child, Some(250_000), "a new thread inherits the slice");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_slice_out_of_the_kernels_range_is_refused() {
        for us in [0, 99, 100_001] {
            let e = request_time_slice(us).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{us}");
        }
    }
}
