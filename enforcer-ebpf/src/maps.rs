//! Maps shared by all hook families, and the helpers that write records.
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LpmTrie, PerCpuArray, RingBuf},
};
use enforcer_common::{DestKey, GrantInfo, PortRanges, ProcGrants, counter};

/// Every record for the daemon. 16 MiB holds well over a second of a 100k events/s burst.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

/// Per-CPU counters (`enforcer_common::counter`), summed by the daemon.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// tgid -> grants held. The one source of truth for who holds what (DESIGN.md): the fork
/// hook copies it to children before they run, the exit hook removes it.
#[map]
pub static PROC_GRANTS: HashMap<u32, ProcGrants> = HashMap::with_max_entries(65_536, 0);

/// grant slot -> deadline and state.
#[map]
pub static GRANTS: HashMap<u32, GrantInfo> = HashMap::with_max_entries(16_384, 0);

/// (grant slot, destination network) -> allowed ports.
#[map]
pub static GRANT_DESTS: LpmTrie<DestKey, PortRanges> = LpmTrie::with_max_entries(65_536, 1);

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
