//! Maps shared by all hook families, and the helpers that write records.
use aya_ebpf::{
    macros::map,
    maps::{LruHashMap, PerCpuArray, RingBuf},
};
use enforcer_common::{PendingArgs, counter};

/// Every record for the daemon. 16 MiB holds well over a second of a 100k events/s burst.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

/// Per-CPU counters (`enforcer_common::counter`), summed by the daemon.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// argv captured at execve() entry, keyed by tid, consumed at sched_process_exec.
/// LRU so that failed execs cannot fill it.
#[map]
pub static PENDING_ARGS: LruHashMap<u32, PendingArgs> = LruHashMap::with_max_entries(4096, 0);

/// Scratch slot to build a `PendingArgs` off the 512-byte stack.
#[map]
pub static ARGS_SCRATCH: PerCpuArray<PendingArgs> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer on this CPU while we run.
        unsafe { *p += 1 };
    }
}
