//! Outbound connections: cgroup sock_addr hooks on `cgroup_root`.
//!
//! connect4/6 see TCP connect and UDP connect (also from io_uring, which goes through the
//! same kernel path); sendmsg4/6 see UDP sendto/sendmsg with an explicit address.
//! A dual-stack socket connecting to an IPv4-mapped address reaches connect6 only; it is
//! judged (and reported) as the IPv4 address.
//!
//! The verdict for a process holding grants, tainted by a secret or marked as an agent is
//! decided here, against the grant deadlines on the boot clock (a use one nanosecond late is
//! already expired), by the shared judge `enforcer_common::judge::judge`: the same function
//! the daemon's decide.rs calls, so its table tests cover this code.
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_ktime_get_boot_ns,
    },
    macros::cgroup_sock_addr,
    maps::RingBuf,
    programs::SockAddrContext,
};
use enforcer_common::{
    ConnectRecord, DestKey, GrantInfo, LearnedKey, MAX_PORT_RANGES, PortRanges, ProcGrants,
    SecretInfo, config, counter, grant_state,
    judge::{Facts, Judgement, Settings, judge},
    kind, op, verdict,
};

use crate::maps::{
    AGENT_TAINT, ALERTS, EVENTS, GRANT_DESTS, GRANT_TAINT, GRANTS, LEARNED, PROC_GRANTS, SECRETS,
    WAKEUP_NOW, config, count, inherited_entry, submit_flags,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// Verdicts for cgroup sock_addr programs: 1 lets the call proceed, 0 fails it with EPERM
/// before a packet leaves.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    record(&ctx, AF_INET, op::CONNECT)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    record(&ctx, AF_INET6, op::CONNECT)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    record(&ctx, AF_INET, op::SENDMSG)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    record(&ctx, AF_INET6, op::SENDMSG)
}

/// 1 when one of `ranges` holds `port`, else 0. Arithmetic, not branches: the judge runs this
/// inside its loops over held grants and tainting secrets, and every branch here multiplies
/// the states the verifier walks (the egress program outgrew the verifier's 1M-instruction
/// budget with the branchy form once learned addresses were judged too). `port - lo` and
/// `hi - port` wrap to values with bit 31 set exactly when the port is outside the range.
#[inline(always)]
fn in_ranges(ranges: &PortRanges, port: u16) -> u64 {
    let mut outside_all: u64 = 1;
    for j in 0..MAX_PORT_RANGES {
        let below = (port as u32).wrapping_sub(ranges.lo[j] as u32);
        let above = (ranges.hi[j] as u32).wrapping_sub(port as u32);
        outside_all &= ((below | above) >> 31) as u64;
    }
    outside_all ^ 1
}

/// The kernel maps as the shared judge's facts.
pub(crate) struct Maps;

impl Facts for Maps {
    #[inline(always)]
    fn grant(&self, slot: u32) -> Option<GrantInfo> {
        unsafe { GRANTS.get(slot) }.copied()
    }

    #[inline(always)]
    fn covers(&self, slot: u32, addr: &[u8; 16], port: u16) -> bool {
        let key = Key::new(32 + 128, DestKey { slot_be: slot.to_be(), addr: *addr });
        let Some(ports) = GRANT_DESTS.get(&key) else { return false };
        in_ranges(ports, port) != 0
    }

    #[inline(always)]
    fn learned(&self, slot: u32, addr: &[u8; 16], port: u16) -> u64 {
        let key = LearnedKey { slot, addr: *addr };
        let Some(l) = (unsafe { LEARNED.get(key) }) else { return 0 };
        // 0 or all ones: the deadline when a range holds the port, else 0, without a branch.
        l.deadline_ns & in_ranges(&l.ports, port).wrapping_neg()
    }

    #[inline(always)]
    fn grant_taint(&self, slot: u32) -> u64 {
        unsafe { GRANT_TAINT.get(slot) }.copied().unwrap_or(0)
    }

    #[inline(always)]
    fn tree_taint(&self, tree: u32) -> u64 {
        unsafe { AGENT_TAINT.get(tree) }.copied().unwrap_or(0)
    }

    #[inline(always)]
    fn secret(&self, index: u32) -> Option<SecretInfo> {
        SECRETS.get(index).copied()
    }

    #[inline(always)]
    fn dns_stub(&self) -> u32 {
        config(config::DNS_STUB_PORT)
    }
}

/// Decides a connect by the process with map entry `subject` at `now` (boot clock) with the
/// shared judge (enforcer_common::judge, the code decide.rs runs too) and applies a
/// revoke-on-violation to the grant in the map. Returns the judgement, whether the grant was
/// revoked now, and the map entry it was judged on.
#[inline(always)]
fn judge_connect(
    subject: ProcGrants,
    addr: &[u8; 16],
    port: u16,
    now: u64,
) -> (Judgement, u8, ProcGrants) {
    let settings = Settings {
        enforce: config(config::ENFORCE) != 0,
        agent_action: config(config::AGENT_ACTION) as u8,
    };
    let j = judge(&Maps, &subject, addr, port, now, settings);
    let mut revoked_now = 0;
    if j.revoke
        && let Some(g) = GRANTS.get_ptr_mut(j.slot)
    {
        let g = unsafe { &mut *g };
        if g.state == grant_state::ACTIVE {
            g.state = grant_state::REVOKED;
            revoked_now = 1;
        }
    }
    // The record carries the taint judged (own and subtree), so the daemon replays on it.
    let mut judged = subject;
    judged.taint = j.taint;
    (j, revoked_now, judged)
}

#[inline(always)]
fn record(ctx: &SockAddrContext, family: u32, operation: u8) -> i32 {
    let sa = unsafe { &*ctx.sock_addr };
    let mut addr = [0u8; 16];
    if family == AF_INET {
        addr[..4].copy_from_slice(&sa.user_ip4.to_ne_bytes());
    } else {
        let w0 = sa.user_ip6[0].to_ne_bytes();
        let w1 = sa.user_ip6[1].to_ne_bytes();
        let w2 = sa.user_ip6[2].to_ne_bytes();
        let w3 = sa.user_ip6[3].to_ne_bytes();
        addr[0..4].copy_from_slice(&w0);
        addr[4..8].copy_from_slice(&w1);
        addr[8..12].copy_from_slice(&w2);
        addr[12..16].copy_from_slice(&w3);
    }
    // user_port holds the port in network byte order in its low 16 bits.
    let port = u16::from_be(sa.user_port as u16);
    let protocol = sa.protocol as u8;
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let mut v6 = addr;
    if family == AF_INET {
        v6 = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3]];
    }
    // The one PROC_GRANTS lookup of this hook: a process that holds no grant, is not an
    // agent and is not tainted (no entry) is recorded without judging.
    let own = unsafe { PROC_GRANTS.get(tgid) }.copied();
    // DNS of a judged process goes to the daemon's stub, which judges the query itself.
    if let Some(pg) = &own
        && (crate::dns::steer(ctx, family, pg, tgid, &v6, port) || crate::dns::to_stub(&v6, port))
    {
        return ALLOW;
    }
    // One clock reading for the judgement and the record: the daemon replays the judge at
    // the record's time.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let (j, revoked_now, subject) = match own.or_else(inherited_entry) {
        Some(entry) => judge_connect(entry, &v6, port, now),
        None => (Judgement::default(), 0, ProcGrants::default()),
    };
    let deny = !j.lets_through();
    let ug = bpf_get_current_uid_gid();
    let rec = ConnectRecord {
        kind: kind::CONNECT,
        tgid,
        tid: pid_tgid as u32,
        uid: ug as u32,
        family: family as u16,
        port,
        protocol,
        op: operation,
        action: j.action,
        verdict: j.verdict,
        addr,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        boot_ns: now,
        grant_slot: j.slot,
        reason: j.reason,
        taint_secret: j.taint_secret,
        revoked_now,
        _pad2: 0,
        subject,
    };
    // Violations have a ring of their own: a flood of routine records can fill EVENTS but
    // never displaces an alert. The decision stands even when it cannot be reported.
    if j.verdict == verdict::ALLOWED || j.verdict == verdict::NO_GRANT_HELD {
        emit(&EVENTS, &rec, submit_flags(), counter::RINGBUF_DROPS);
    } else {
        emit(&ALERTS, &rec, WAKEUP_NOW, counter::ALERT_DROPS);
    }
    if deny { DENY } else { ALLOW }
}

/// Writes `rec` to `ring` (two call sites, one map each, as the verifier wants), counting a
/// failed reservation under `drops`.
#[inline(always)]
pub(crate) fn emit(ring: &RingBuf, rec: &ConnectRecord, flags: u64, drops: u32) {
    match ring.reserve::<ConnectRecord>(0) {
        Some(mut entry) => {
            entry.write(*rec);
            entry.submit(flags);
            count(counter::EVENTS);
        }
        None => count(drops),
    }
}
