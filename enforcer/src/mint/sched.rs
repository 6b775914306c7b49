//! Nice values of the mint's threads. On a small host the Mint API's workers share the cores
//! with batch work that comes in bursts: the ledger writer commits a group of grants every
//! 10 ms (milliseconds of CPU each), the checkpointer copies the WAL once a second, and the
//! callers themselves run there too. At equal priority a grant request that arrives during
//! such a burst waits in the run queue for the burst's time slice (the slowest 1% of grants
//! at 5,500/s waited milliseconds there; `cargo xtask bench --only mint` shows the threads'
//! run-queue wait). The API workers run at API_NICE, so the kernel switches to them as soon
//! as a request arrives, and the batch threads at BACKGROUND_NICE, so they use what the
//! requests leave. Each request's work is bounded (body size, per-uid rate limit and
//! connection caps), so the raised priority cannot be turned into more CPU than the API
//! already allows; hashing an executable runs on the blocking pool at the normal priority.

/// The API runtime's worker threads.
pub const API_NICE: i32 = -10;
/// The API workers' time slice (ns); 0 leaves the kernel's default. A short slice (100 µs,
/// the shortest the kernel allows) lets a worker woken by a request preempt a thread running
/// a longer one instead of waiting for its end; measured at 5,500 grants/s it did not move
/// the p99 beyond the run-to-run noise (docs/benchmarks.md), so it is off by default and
/// ENFORCER_API_SLICE_US sets it for measurements.
pub const API_SLICE_NS: u64 = 0;
/// The ledger writer and checkpointer.
pub const BACKGROUND_NICE: i32 = 10;

/// Sets the calling thread's nice value (Linux: per thread). A failure (no CAP_SYS_NICE
/// for a negative value) is logged once per thread and changes nothing else.
pub fn set_thread_nice(nice: i32) {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: plain syscall on our own thread id.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::debug!("cannot set thread {tid} to nice {nice}: {e}");
    }
}

/// `struct sched_attr` (include/uapi/linux/sched/types.h), the 56-byte version with the
/// utilization clamps.
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
    sched_util_min: u32,
    sched_util_max: u32,
}

/// Sets the calling thread's nice value and its time slice (`sched_runtime` of a
/// SCHED_OTHER thread, Linux 6.12+, 100 µs to 100 ms). Under EEVDF a thread that wakes with
/// a shorter slice than the running one preempts it at once; with the default slice a
/// woken API worker could wait for the running thread's whole slice (1-2 ms) before it read
/// the request. Where the kernel refuses the slice, only the nice value is set.
pub fn set_thread_nice_and_slice(nice: i32, slice_ns: u64) {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_nice: nice,
        sched_runtime: slice_ns,
        ..Default::default()
    };
    // SAFETY: a valid sched_attr of the size it states, for our own thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, tid, &attr as *const SchedAttr, 0) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        tracing::debug!("cannot set thread {tid} to a {slice_ns} ns slice: {e}");
        set_thread_nice(nice);
    }
}

/// The calling thread's time slice (`sched_runtime`, ns), if the kernel reports one.
pub fn thread_slice() -> Option<u64> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let mut attr = SchedAttr::default();
    let size = std::mem::size_of::<SchedAttr>() as u32;
    // SAFETY: a writable sched_attr of `size` bytes.
    let rc = unsafe {
        libc::syscall(libc::SYS_sched_getattr, tid, &mut attr as *mut SchedAttr, size, 0)
    };
    (rc == 0).then_some(attr.sched_runtime)
}

/// The calling thread's nice value.
pub fn thread_nice() -> i32 {
    // SAFETY: as above.
    let tid = unsafe { libc::gettid() };
    // getpriority may legitimately return -1: clear errno first.
    // SAFETY: errno is thread-local; plain syscall.
    unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_applies_to_the_calling_thread_only() {
        let main_before = thread_nice();
        let got = std::thread::spawn(|| {
            set_thread_nice(BACKGROUND_NICE);
            thread_nice()
        })
        .join()
        .unwrap();
        assert_eq!(got, BACKGROUND_NICE);
        assert_eq!(thread_nice(), main_before);
    }

    #[test]
    fn slice_and_nice_apply_to_the_calling_thread_only() {
        let (nice, slice) = std::thread::spawn(|| {
            set_thread_nice_and_slice(BACKGROUND_NICE, 200_000);
            (thread_nice(), thread_slice())
        })
        .join()
        .unwrap();
        assert_eq!(nice, BACKGROUND_NICE);
        // Before Linux 6.12 the slice is refused (and the nice value still set).
        if let Some(ns) = slice.filter(|ns| *ns != 0) {
            assert_eq!(ns, 200_000);
        }
        assert_ne!(thread_slice(), Some(200_000));
    }
}
