//! Maps shared by all hook families, and the helpers that write records.
//!
//! Every map is pinned by name under the daemon's pin dir: a daemon killed with SIGKILL
//! leaves the programs enforcing against these maps, and a restarted daemon adopts them.
use crate::lineage::{TASK_REAL_PARENT_OFF, TASK_TGID_OFF};
use aya_ebpf::{
    helpers::{bpf_get_current_task, bpf_probe_read_kernel},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use enforcer_common::{
    DestKey, DnsSteer, ExeKey, GrantInfo, Learned, LearnedKey, MAX_SECRETS, PortRanges, ProcGrants,
    SecretInfo, config, counter,
};

/// Every record for the daemon. 4 MiB holds ~30,000 connect records: over 300 ms of a 100k
/// events/s burst, which the daemon drains at several times that rate. Its user mapping
/// counts twice in the daemon's RSS (the data pages are mapped twice so records never wrap),
/// so 16 MiB cost 32 MB of the daemon's RSS.
#[map]
pub static EVENTS: RingBuf = RingBuf::pinned(4 * 1024 * 1024, 0);

/// Violations only (denied, alerted, killed connects): a flood of routine records in EVENTS
/// never displaces an alert. 1 MiB holds ~10,000 alert records.
#[map]
pub static ALERTS: RingBuf = RingBuf::pinned(1024 * 1024, 0);

/// Per-CPU counters (`enforcer_common::counter`), summed by the daemon.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::COUNT, 0);

/// tgid -> grants held, taint, flags. The one source of truth for who holds what
/// (docs/architecture.md): the fork hook copies it to children before they run, the exit hook
/// removes it.
#[map]
pub static PROC_GRANTS: HashMap<u32, ProcGrants> = HashMap::pinned(65_536, 0);

/// grant slot -> deadline, state, covered secrets, violation action.
#[map]
pub static GRANTS: HashMap<u32, GrantInfo> = HashMap::pinned(16_384, 0);

/// grant slot -> secrets read by any process of the grant's subtree (taint follows the data
/// within the subtree). Written by the daemon when a holder opens a secret.
#[map]
pub static GRANT_TAINT: HashMap<u32, u64> = HashMap::pinned(16_384, 0);

/// `[[agent]]` tree (tgid of its first marked process) -> secrets read by any process of
/// the tree. Written by the daemon when a tree member opens a secret; the daemon's sweep
/// removes trees with no living member.
#[map]
pub static AGENT_TAINT: HashMap<u32, u64> = HashMap::pinned(16_384, 0);

/// (grant slot | SECRET_SLOT_BASE + secret index, destination network) -> allowed ports.
#[map]
pub static GRANT_DESTS: LpmTrie<DestKey, PortRanges> = LpmTrie::pinned(65_536, 1);

/// (grant slot | SECRET_SLOT_BASE + secret index, address) -> deadline and ports: addresses
/// the daemon's DNS stub answered for destinations given by name, written before the reply
/// is released. Removed by the daemon some time after the deadline.
#[map]
pub static LEARNED: HashMap<LearnedKey, Learned> = HashMap::pinned(65_536, 0);

/// socket cookie -> the resolver a judged process addressed before its port-53 connect or
/// sendmsg was steered to the DNS stub (read by the stub and the recvmsg hooks). LRU: a
/// query socket needs its entry for one round trip.
#[map]
pub static DNS_STEER: LruHashMap<u64, DnsSteer> = LruHashMap::pinned(16_384, 0);

/// secret index -> whether it has destinations of its own, and its no-grant action.
#[map]
pub static SECRETS: Array<SecretInfo> = Array::pinned(MAX_SECRETS as u32, 0);

/// `enforcer_common::config` values written by the daemon (mode, agent action).
#[map]
pub static CONFIG: Array<u32> = Array::pinned(config::COUNT, 0);

/// Executables named by `[[agent]]` selectors, by inode.
#[map]
pub static AGENT_EXES: HashMap<ExeKey, u8> = HashMap::pinned(1024, 0);

/// uids named by `[[agent]]` selectors.
#[map]
pub static AGENT_UIDS: HashMap<u32, u8> = HashMap::pinned(1024, 0);

/// cgroup ids named by `[[agent]]` selectors (exact cgroup).
#[map]
pub static AGENT_CGROUPS: HashMap<u64, u8> = HashMap::pinned(1024, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer on this CPU while we run.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn config(index: u32) -> u32 {
    CONFIG.get(index).copied().unwrap_or(0)
}

/// A per-process entry could not be written (PROC_GRANTS full): counted, and the degraded
/// mode of `proc_entry` switched on for good.
#[inline(always)]
pub fn state_lost() {
    count(counter::STATE_FULL);
    if let Some(p) = CONFIG.get_ptr_mut(config::STATE_LOST) {
        unsafe { *p = 1 };
    }
}

/// Ancestors `proc_entry` looks at in degraded mode.
const ANCESTOR_WALK: usize = 8;

/// The PROC_GRANTS entry that judges the current process `tgid`: its own; or, once an entry
/// could not be written (`config::STATE_LOST`), that of its nearest ancestor (up to 8 levels)
/// that has one: what the child would have inherited. The common path (no entry, nothing
/// lost) costs one lookup.
#[inline(always)]
pub fn proc_entry(tgid: u32) -> Option<ProcGrants> {
    if let Some(pg) = unsafe { PROC_GRANTS.get(tgid) } {
        return Some(*pg);
    }
    inherited_entry()
}

/// The degraded-mode half of `proc_entry`, for a caller that already looked up the current
/// process's own entry and found none: the nearest ancestor's entry once an entry could not
/// be written, else None (one CONFIG read).
#[inline(always)]
pub fn inherited_entry() -> Option<ProcGrants> {
    if config(config::STATE_LOST) == 0 {
        return None;
    }
    let parent_off = TASK_REAL_PARENT_OFF.load() as u64;
    let tgid_off = TASK_TGID_OFF.load() as u64;
    let mut task = unsafe { bpf_get_current_task() };
    for _ in 0..ANCESTOR_WALK {
        task = unsafe { bpf_probe_read_kernel((task + parent_off) as *const u64) }.ok()?;
        if task == 0 {
            return None;
        }
        let t: i32 = unsafe { bpf_probe_read_kernel((task + tgid_off) as *const i32) }.ok()?;
        if t <= 1 {
            return None;
        }
        if let Some(pg) = unsafe { PROC_GRANTS.get(t as u32) } {
            return Some(*pg);
        }
    }
    None
}

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;
/// Wake the daemon only once this much is pending; it also drains on a 20 ms timer.
/// One wakeup per record would cost a context switch per connect on a busy host.
const WAKEUP_BYTES: u64 = 256 * 1024;
/// Past WAKEUP_BYTES, only the records that land in this window wake the daemon.
const WAKEUP_WINDOW: u64 = 8 * 1024;

/// The wakeup flag of a routine record: the daemon is woken when the pending data crosses
/// WAKEUP_BYTES, not by every record past it. A wakeup is an irq_work (a self-IPI) in the
/// caller's syscall and may preempt it for the daemon; once the daemon is behind, a wakeup
/// per record added about 100 us per granted open under emulation (guest bench: wall ratio
/// 7.2x with the opener's CPU time at 1.3x), while one wakeup (or the 20 ms drain) is all
/// the daemon needs. Records from other CPUs can skip the window: the drain timer remains.
#[inline(always)]
pub fn submit_flags() -> u64 {
    let pending = EVENTS.query(BPF_RB_AVAIL_DATA);
    if (WAKEUP_BYTES..WAKEUP_BYTES + WAKEUP_WINDOW).contains(&pending) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// Forces a wakeup: for records the daemon must act on now (a kill).
pub const WAKEUP_NOW: u64 = BPF_RB_FORCE_WAKEUP;
