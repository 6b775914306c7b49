//! Outbound connections: cgroup sock_addr hooks on `cgroup_root`.
//!
//! connect4/6 see TCP connect and UDP connect (also from io_uring, which goes through the
//! same kernel path); sendmsg4/6 see UDP sendto/sendmsg with an explicit address.
//! A dual-stack socket connecting to an IPv4-mapped address reaches connect6 only; it is
//! judged (and reported) as the IPv4 address.
//!
//! The verdict for a process holding grants is decided here, against the grant deadlines on
//! the boot clock, so a use one nanosecond late is already expired. It follows decide.rs:
//! allowed if any active, unexpired grant covers the destination; otherwise revoked or
//! expired if such a grant covers it; otherwise out_of_intent.
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_ktime_get_boot_ns,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use enforcer_common::{
    ConnectRecord, DestKey, MAX_PORT_RANGES, MAX_PROC_GRANTS, MAX_SECRETS, SECRET_SLOT_BASE,
    action, config, counter, grant_flags, grant_state, kind, op, proc_flags, reason, verdict,
};

use crate::maps::{
    EVENTS, GRANT_DESTS, GRANTS, PROC_GRANTS, SECRETS, WAKEUP_NOW, config, count, submit_flags,
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

/// The kernel's decision for one connect.
struct Judgement {
    verdict: u8,
    slot: u32,
    action: u8,
    reason: u8,
    taint_secret: u8,
    revoked_now: u8,
}

/// Does grant `slot` cover (addr, port)?
#[inline(always)]
fn dest_allows(slot: u32, addr: &[u8; 16], port: u16) -> bool {
    let key = Key::new(32 + 128, DestKey { slot_be: slot.to_be(), addr: *addr });
    let Some(ports) = GRANT_DESTS.get(&key) else { return false };
    let mut ok = false;
    for j in 0..MAX_PORT_RANGES {
        if ports.lo[j] <= port && port <= ports.hi[j] {
            ok = true;
        }
    }
    ok
}

/// Decides a connect by `tgid` to `addr` (IPv6 form, IPv4 mapped) and `port`, following
/// decide.rs: grants first (allowed > revoked > expired > out_of_intent), then the taint of
/// secrets the process read (each must be valid toward the destination: its own
/// destinations if it has any, and a live grant covering it that covers the destination),
/// then `[[agent]]` processes without any grant.
#[inline(always)]
fn judge(tgid: u32, addr: &[u8; 16], port: u16) -> Judgement {
    let mut j = Judgement {
        verdict: verdict::NO_GRANT_HELD,
        slot: 0,
        action: action::ALLOWED,
        reason: reason::GRANT,
        taint_secret: 0,
        revoked_now: 0,
    };
    let Some(pg) = (unsafe { PROC_GRANTS.get(&tgid) }) else {
        return j;
    };
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let mut any = false;
    let mut best = verdict::OUT_OF_INTENT;
    let mut best_slot = 0u32;
    let mut live_slot = 0u32;
    // Secrets covered by live grants that also cover this destination.
    let mut live_secrets: u64 = 0;
    for i in 0..MAX_PROC_GRANTS {
        let slot = pg.grants[i];
        if slot == 0 {
            continue;
        }
        let Some(g) = (unsafe { GRANTS.get(&slot) }) else { continue };
        any = true;
        if best_slot == 0 {
            best_slot = slot;
        }
        if !dest_allows(slot, addr, port) {
            continue;
        }
        if g.state == grant_state::ACTIVE && now < g.expires_ns {
            if live_slot == 0 {
                live_slot = slot;
            }
            live_secrets |= g.secrets;
            continue;
        }
        // Covered but unusable: revoked outranks expired (it is the stronger statement).
        let v = if g.state == grant_state::REVOKED { verdict::REVOKED } else { verdict::EXPIRED };
        if best == verdict::OUT_OF_INTENT || v == verdict::REVOKED {
            best = v;
            best_slot = slot;
        }
    }
    if live_slot != 0 {
        j.verdict = verdict::ALLOWED;
        j.slot = live_slot;
    } else if any {
        j.verdict = best;
        j.slot = best_slot;
    } else if pg.flags & proc_flags::AGENT != 0 {
        j.verdict = verdict::OUT_OF_INTENT;
        j.reason = reason::AGENT;
    }
    // History counts: every secret this process read must be valid toward here.
    if pg.taint != 0 && (j.verdict == verdict::ALLOWED || j.verdict == verdict::NO_GRANT_HELD) {
        for i in 0..MAX_SECRETS {
            if pg.taint & (1u64 << i) == 0 {
                continue;
            }
            let Some(info) = SECRETS.get(i as u32) else { continue };
            let own_ok =
                info.has_dests == 0 || dest_allows(SECRET_SLOT_BASE + i as u32, addr, port);
            let granted = live_secrets & (1u64 << i) != 0;
            if !(own_ok && granted) {
                j.verdict = verdict::OUT_OF_INTENT;
                j.reason = reason::TAINT;
                j.taint_secret = (i + 1) as u8;
                if j.slot == 0 {
                    j.slot = best_slot;
                }
                j.action = info.action as u8;
                break;
            }
        }
    }
    if j.verdict == verdict::ALLOWED || j.verdict == verdict::NO_GRANT_HELD {
        j.action = action::ALLOWED;
        return j;
    }
    // A violation: the action comes from the grant's intent, the tainting secret, or
    // the agent setting; monitor mode only alerts.
    if j.reason == reason::GRANT && j.slot != 0 {
        if let Some(g) = GRANTS.get_ptr_mut(&j.slot) {
            let g = unsafe { &mut *g };
            j.action = g.action as u8;
            if g.flags & grant_flags::REVOKE_ON_VIOLATION != 0 && g.state == grant_state::ACTIVE {
                g.state = grant_state::REVOKED;
                j.revoked_now = 1;
            }
        }
    } else if j.reason == reason::AGENT {
        j.action = config(config::AGENT_ACTION) as u8;
    }
    if j.action == action::ALLOWED {
        j.action = action::ALERT;
    }
    if config(config::ENFORCE) == 0 {
        j.action = action::ALERT;
    }
    j
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
    let j = judge(tgid, &v6, port);
    let deny = j.action == action::DENY || j.action == action::KILL;
    let ug = bpf_get_current_uid_gid();
    let Some(mut entry) = EVENTS.reserve::<ConnectRecord>(0) else {
        count(counter::RINGBUF_DROPS);
        // The decision stands even when it cannot be reported.
        return if deny { DENY } else { ALLOW };
    };
    entry.write(ConnectRecord {
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
        boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        grant_slot: j.slot,
        reason: j.reason,
        taint_secret: j.taint_secret,
        revoked_now: j.revoked_now,
        _pad2: 0,
    });
    // A kill is carried out by the daemon: wake it now rather than at the next drain.
    entry.submit(if j.action == action::KILL { WAKEUP_NOW } else { submit_flags() });
    count(counter::EVENTS);
    if deny { DENY } else { ALLOW }
}
