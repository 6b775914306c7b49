//! Data leaving on established sockets: a cgroup `skb/egress` hook on `cgroup_root`.
//!
//! The connect hooks judge a connection once, when it is made. Data written later can still
//! carry a secret where it is not valid: a socket connected before its process read the
//! secret, one received from another process over SCM_RIGHTS, a server's accepted socket.
//! This hook judges every outgoing IP packet of a socket whose writer or owner is judged
//! (grant holder, agent, tainted) with `judge::judge_send`: the history rule only.
//!
//! Who wrote the data: for UDP the packet leaves inside sendmsg(), so the current task is
//! the writer. For TCP the current task is the writer only while the socket is locked by a
//! process (`sk_lock.owned`): tcp_sendmsg transmits under that lock, and while it is held the
//! stack defers softirq transmits to the lock owner. A TCP packet sent from softirq (ACK
//! clocking, retransmit timers) is judged by the socket's recorded owner and taint only.
//!
//! In enforce mode a violating socket is blocked: this packet and every later one are
//! dropped (the writer's send fails with EPERM when it transmits itself), so queued data
//! never leaves. The record goes to ALERTS, once per blocked socket.
//!
//! What the hook knows about a socket lives in the socket itself (socket-local storage,
//! `SOCK_STORAGE`): it cannot be evicted by other sockets (a bounded map keyed by cookie
//! could: a process holding a blocked socket opened 65,536 others and the blocked one
//! started afresh), it lives as long as the kernel still sends for the socket (after
//! close() too, while queued data and retransmits remain), and it is freed with the socket,
//! so no hook has to forget it at release.
use aya_ebpf::{
    Global,
    bindings::{
        BPF_F_NO_PREALLOC, BPF_SK_STORAGE_GET_F_CREATE, bpf_map_def, bpf_map_type, bpf_sock,
    },
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_boot_ns, bpf_probe_read_kernel,
        generated::{bpf_sk_fullsock, bpf_sk_storage_get, bpf_skc_to_tcp_sock},
    },
    macros::{cgroup_skb, map},
    programs::SkBuffContext,
};
use core::{cell::UnsafeCell, ffi::c_void};
use enforcer_common::{
    ConnectRecord, MAX_PROC_GRANTS, ProcGrants, SockState, config, counter,
    judge::{Facts, Settings, judge_send},
    kind, op, reason, sock_flags, verdict,
};

use crate::connect::{Maps, emit};
use crate::maps::{ALERTS, PROC_GRANTS, WAKEUP_NOW, config, count, proc_entry};

/// cgroup_skb verdicts: 1 passes the packet, 0 drops it.
const PASS: i32 = 1;
const DROP: i32 = 0;

const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// Offset of `sock.sk_lock.owned`, from kernel BTF.
#[unsafe(no_mangle)]
static SK_LOCK_OWNED_OFF: Global<u32> = Global::new(0);

/// A map definition aya-ebpf has no legacy type for: socket-local storage.
#[repr(transparent)]
pub struct SockStorage(UnsafeCell<bpf_map_def>);

// SAFETY: the definition is only read, by the loader; programs pass its address to helpers.
unsafe impl Sync for SockStorage {}

/// Where the pin of this map is looked up: by name under the pin dir (aya's ByName).
const PIN_BY_NAME: u32 = 1;

/// socket -> `SockState`, in the socket's own storage (BPF_MAP_TYPE_SK_STORAGE). The kernel
/// creates such maps only with BTF naming key and value, which this object does not carry:
/// the daemon creates and pins it (enforcer/src/kernel/sock_storage.rs) before aya loads the
/// object, and aya reuses the pin like every other pinned map.
#[map]
pub static SOCK_STORAGE: SockStorage = SockStorage(UnsafeCell::new(bpf_map_def {
    type_: bpf_map_type::BPF_MAP_TYPE_SK_STORAGE,
    key_size: 4,
    value_size: size_of::<SockState>() as u32,
    max_entries: 0,
    map_flags: BPF_F_NO_PREALLOC,
    id: 0,
    pinning: PIN_BY_NAME,
}));

/// The socket's state (null if it has none; with `create`, a zeroed one is made unless the
/// kernel cannot charge it to the socket's option memory). `sk`: a full socket (from
/// `bpf_sk_fullsock`) or a cgroup_sock program's context.
#[inline(always)]
fn sock_state(sk: *mut c_void, create: bool) -> *mut SockState {
    let flags = if create { BPF_SK_STORAGE_GET_F_CREATE as u64 } else { 0 };
    let map = SOCK_STORAGE.0.get() as *mut c_void;
    unsafe { bpf_sk_storage_get(map, sk, core::ptr::null_mut(), flags) as *mut SockState }
}

#[cgroup_skb(egress)]
pub fn egress(ctx: SkBuffContext) -> i32 {
    try_egress::<true>(&ctx).unwrap_or(PASS)
}

/// The same hook for kernels whose cgroup_skb programs may not look at the current task
/// (Debian's 6.1: "unknown func bpf_get_current_pid_tgid#14"): every packet is
/// judged by the socket's recorded owner (`sock_create` records a judged creator) and the
/// taint the socket accumulated, never by the writer.
#[cgroup_skb(egress)]
pub fn egress_owner(ctx: SkBuffContext) -> i32 {
    try_egress::<false>(&ctx).unwrap_or(PASS)
}

/// Records a judged process as the owner of the socket it creates (from `sock_create`), so
/// the owner-only variant judges its packets, and softirq packets of the full one are
/// judged before the owner's first locked send. Only judged creators pay (the storage is
/// allocated now, while the socket's option memory is still empty).
#[inline(always)]
pub fn record_owner(sk: *mut bpf_sock, tgid: u32, start_ns: u64) {
    let st = sock_state(sk as *mut c_void, true);
    if st.is_null() {
        count(counter::STATE_FULL);
        return;
    }
    let st = unsafe { &mut *st };
    st.owner = tgid;
    st.owner_start_ns = start_ns;
}

/// Whether anything taints `p`: its own taint (with the socket's, ORed in by the caller),
/// its `[[agent]]` tree's, or its grants' subtrees'. The same lookups the judge starts with,
/// a superset of its taint (a slot's taint counts here even if its grant is gone): when
/// this is false the judge's taint is 0 and no send can be a violation.
#[inline(always)]
fn possibly_tainted(p: &ProcGrants) -> bool {
    let mut taint = p.taint;
    if p.tree != 0 {
        taint |= Maps.tree_taint(p.tree);
    }
    for i in 0..MAX_PROC_GRANTS {
        let slot = p.grants[i];
        if slot != 0 {
            taint |= Maps.grant_taint(slot);
        }
    }
    taint != 0
}

/// Records the first judged writer of a socket as its owner (state made if needed).
#[inline(always)]
fn remember_owner(sk: *mut c_void, tgid: u32, start_ns: u64) {
    let st = sock_state(sk, true);
    if st.is_null() {
        count(counter::STATE_FULL);
        return;
    }
    let st = unsafe { &mut *st };
    if st.owner == 0 {
        st.owner = tgid;
        st.owner_start_ns = start_ns;
    }
}

/// Destination and transport of an IP packet, from its headers.
struct Packet {
    family: u16,
    protocol: u8,
    addr: [u8; 16],
    /// IPv6 form (IPv4 mapped), as the judge wants it.
    v6: [u8; 16],
    port: u16,
}

#[inline(always)]
fn parse(ctx: &SkBuffContext) -> Option<Packet> {
    let skb = unsafe { &*ctx.skb.skb };
    let proto = u16::from_be(skb.protocol as u16) as u32;
    let mut addr = [0u8; 16];
    let (family, protocol, l4) = if proto == ETH_P_IP {
        let vihl: u8 = ctx.load(0).ok()?;
        let protocol: u8 = ctx.load(9).ok()?;
        let daddr: [u8; 4] = ctx.load(16).ok()?;
        addr[..4].copy_from_slice(&daddr);
        (2u16, protocol, ((vihl & 0x0f) as usize) * 4)
    } else if proto == ETH_P_IPV6 {
        // Extension headers are not walked: their packets are judged without a port.
        let protocol: u8 = ctx.load(6).ok()?;
        addr = ctx.load(24).ok()?;
        (10u16, protocol, 40usize)
    } else {
        return None;
    };
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return None;
    }
    let port = u16::from_be(ctx.load::<u16>(l4 + 2).unwrap_or(0));
    let v6 = if family == 2 {
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3]]
    } else {
        addr
    };
    Some(Packet { family, protocol, addr, v6, port })
}

/// Whether a process holds the socket's lock: then the current task is the one sending.
#[inline(always)]
fn locked_by_process(sk: *mut bpf_sock) -> bool {
    let off = SK_LOCK_OWNED_OFF.load() as usize;
    if off == 0 {
        return false;
    }
    // The verifier forbids arithmetic on a socket pointer, but not on the BTF-typed
    // tcp_sock pointer this helper returns for the same socket.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk as *mut c_void) };
    if tp.is_null() {
        return false;
    }
    let owned: i32 =
        unsafe { bpf_probe_read_kernel((tp as *const u8).wrapping_add(off) as *const i32) }
            .unwrap_or(0);
    owned != 0
}

/// `BY_WRITER`: whether this kernel lets the program read the current task (the writer).
///
/// Cost: most packets belong to sockets no judged process wrote or owns. For them the
/// program reads the socket's own storage (a pointer walk, no hash) and the current
/// process's entry (one hash lookup; none in `egress_owner`), and returns before it reads a
/// packet header or reserves any record. A judged process's socket that nothing tainted adds
/// the taint lookups of the current process and of the owner (none when the owner is the
/// current process), and also returns before the headers.
#[inline(always)]
fn try_egress<const BY_WRITER: bool>(ctx: &SkBuffContext) -> Option<i32> {
    let skb = unsafe { &*ctx.skb.skb };
    let sk = unsafe { skb.__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    let sk = unsafe { bpf_sk_fullsock(sk) };
    if sk.is_null() {
        return None;
    }
    let state = sock_state(sk as *mut c_void, false);
    // Read the state into scalars at once: the verifier refuses arithmetic that mixes map
    // pointers (which the optimizer may emit for combined null checks).
    let (has_state, st_flags, st_owner, st_start, st_taint) = if state.is_null() {
        (false, 0, 0, 0, 0)
    } else {
        let st = unsafe { &*state };
        (true, st.flags, st.owner, st.owner_start_ns, st.taint)
    };
    if st_flags & sock_flags::BLOCKED != 0 {
        return Some(DROP);
    }
    // The current task's entry, if it has one: it may be the writer (checked below, once
    // the packet is known to need judging).
    let pid_tgid = if BY_WRITER { bpf_get_current_pid_tgid() } else { 0 };
    let current = if BY_WRITER { proc_entry((pid_tgid >> 32) as u32) } else { None };
    if current.is_none() && !has_state {
        return None;
    }
    // A socket with recorded state whose taint, current process and owner (with their trees
    // and grants' subtrees) are all clean cannot breach a secret's validity, whoever writes:
    // the common case for a judged process's sockets returns here, before any header is read.
    // Equivalent to the full path's own `possibly_tainted` exit (a superset of its subject).
    if has_state && st_taint == 0 && !current.as_ref().is_some_and(possibly_tainted) {
        let cur_tgid = (pid_tgid >> 32) as u32;
        let owner_is_current =
            BY_WRITER && st_owner == cur_tgid && current.is_some_and(|c| c.start_ns == st_start);
        let owner_tainted = !owner_is_current
            && unsafe { PROC_GRANTS.get(st_owner) }
                .is_some_and(|o| o.start_ns == st_start && possibly_tainted(o));
        if !owner_tainted {
            return None;
        }
    }
    let pkt = parse(ctx)?;
    // The writer: the current task, when it is provably the one sending.
    let by_writer = current.is_some() && (pkt.protocol == IPPROTO_UDP || locked_by_process(sk));
    let writer_tgid = if by_writer { (pid_tgid >> 32) as u32 } else { 0 };
    let mut subject = ProcGrants::default();
    let mut tgid = 0u32;
    let mut writer_start = 0u64;
    if by_writer && let Some(w) = current {
        subject = w;
        tgid = writer_tgid;
        writer_start = w.start_ns;
    }
    let has_writer = tgid != 0;
    if !has_writer && !has_state {
        return None;
    }
    // The owner's current state counts for what it queued (it may have read a secret after
    // connecting), unless its tgid was reused.
    if has_state
        && let Some(o) = unsafe { PROC_GRANTS.get(st_owner) }
        && o.start_ns == st_start
    {
        if !has_writer {
            subject = *o;
            tgid = st_owner;
        } else if st_owner != writer_tgid {
            subject.taint |= o.taint;
        }
    }
    subject.taint |= st_taint;
    if !possibly_tainted(&subject) {
        // Nothing tainted the writer, its subtree or the socket: no send can breach a
        // secret's validity, and the judge's lookups (grants, destination tries, learned
        // addresses) are skipped. A new socket is remembered with its writer as owner, so
        // packets sent for it later from softirq are judged by the owner's state.
        if !has_state {
            remember_owner(sk as *mut c_void, writer_tgid, writer_start);
        }
        return None;
    }
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let settings = Settings {
        enforce: config(config::ENFORCE) != 0,
        agent_action: config(config::AGENT_ACTION) as u8,
    };
    let j = judge_send(&Maps, &subject, &pkt.v6, pkt.port, now, settings);
    let violation = j.verdict == verdict::OUT_OF_INTENT && j.reason == reason::TAINT;
    let deny = violation && !j.lets_through();
    let mut report = violation;
    // Remember who sent and what it carried, so packets sent later from softirq (queued
    // data, retransmits) are judged too: the state is made on the first judged packet.
    let st = sock_state(sk as *mut c_void, true);
    if st.is_null() {
        // The kernel could not charge the state to the socket (its option memory is full):
        // this packet is still judged; later ones by an unjudged sender are not (Known limits).
        count(counter::STATE_FULL);
    } else {
        let st = unsafe { &mut *st };
        if !has_state {
            st.owner = writer_tgid;
            st.owner_start_ns = writer_start;
        }
        st.taint |= j.taint;
        if violation {
            if !deny && st.flags & sock_flags::ALERTED != 0 {
                report = false;
            }
            st.flags |= if deny { sock_flags::BLOCKED } else { sock_flags::ALERTED };
        }
    }
    if !report {
        return None;
    }
    let by_writer = BY_WRITER && tgid == writer_tgid;
    let mut judged = subject;
    judged.taint = j.taint;
    let rec = ConnectRecord {
        kind: kind::CONNECT,
        tgid,
        tid: if by_writer { pid_tgid as u32 } else { 0 },
        // cgroup_skb may not read the current task's uid or cgroup on Debian's 6.12
        // ("cannot use helper bpf_get_current_uid_gid#15"): the daemon resolves both.
        uid: 0,
        family: pkt.family,
        port: pkt.port,
        protocol: pkt.protocol,
        op: op::SEND,
        action: j.action,
        verdict: j.verdict,
        addr: pkt.addr,
        cgroup_id: 0,
        boot_ns: now,
        grant_slot: j.slot,
        reason: j.reason,
        taint_secret: j.taint_secret,
        revoked_now: 0,
        _pad2: 0,
        subject: judged,
    };
    emit(&ALERTS, &rec, WAKEUP_NOW, counter::ALERT_DROPS);
    Some(if deny { DROP } else { PASS })
}
