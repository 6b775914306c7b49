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
}
