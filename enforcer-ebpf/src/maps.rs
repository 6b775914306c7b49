//! Maps shared by all hook families, and the helpers that write records.
use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use enforcer_common::counter;

/// Every record for the daemon. 16 MiB holds well over a second of a 100k events/s burst.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

/// Per-CPU counters (`enforcer_common::counter`), summed by the daemon.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer on this CPU while we run.
        unsafe { *p += 1 };
    }
}

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;
/// Wake the daemon only once this much is pending; it also drains on a short timer.
/// One wakeup per record would cost a context switch per connect on a busy host.
const WAKEUP_BYTES: u64 = 256 * 1024;

#[inline(always)]
pub fn submit_flags() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKEUP_BYTES { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP }
}
