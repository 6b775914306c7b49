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
use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_ktime_get_boot_ns,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_ebpf::maps::lpm_trie::Key;
use enforcer_common::{
    ConnectRecord, DestKey, MAX_PORT_RANGES, MAX_PROC_GRANTS, counter, grant_state, kind, op,
    verdict,
};

use crate::maps::{EVENTS, GRANT_DESTS, GRANTS, PROC_GRANTS, count, submit_flags};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// Verdict for cgroup sock_addr programs: 1 lets the call proceed.
const ALLOW: i32 = 1;

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

/// Decides a connect by `tgid` to `addr` (IPv6 form, IPv4 mapped) and `port`.
/// Returns (verdict, grant slot decided against).
#[inline(always)]
fn judge(tgid: u32, addr: &[u8; 16], port: u16) -> (u8, u32) {
    let Some(pg) = (unsafe { PROC_GRANTS.get(&tgid) }) else {
        return (verdict::NO_GRANT_HELD, 0);
    };
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let mut best = verdict::OUT_OF_INTENT;
    let mut best_slot = 0u32;
    let mut any = false;
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
        let key = Key::new(32 + 128, DestKey { slot_be: slot.to_be(), addr: *addr });
        let Some(ports) = GRANT_DESTS.get(&key) else { continue };
        let mut port_ok = false;
        for j in 0..MAX_PORT_RANGES {
            if ports.lo[j] <= port && port <= ports.hi[j] {
                port_ok = true;
            }
        }
        if !port_ok {
            continue;
        }
        if g.state == grant_state::ACTIVE && now < g.expires_ns {
            return (verdict::ALLOWED, slot);
        }
        // Covered but unusable: revoked outranks expired (it is the stronger statement).
        let v = if g.state == grant_state::REVOKED { verdict::REVOKED } else { verdict::EXPIRED };
        if best == verdict::OUT_OF_INTENT || v == verdict::REVOKED {
            best = v;
            best_slot = slot;
        }
    }
    if !any {
        return (verdict::NO_GRANT_HELD, 0);
    }
    (best, best_slot)
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
    let (v, slot) = judge(tgid, &v6, port);
    let ug = bpf_get_current_uid_gid();
    let Some(mut entry) = EVENTS.reserve::<ConnectRecord>(0) else {
        count(counter::RINGBUF_DROPS);
        return ALLOW;
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
        denied: 0,
        verdict: v,
        addr,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        grant_slot: slot,
        _pad2: 0,
    });
    entry.submit(submit_flags());
    count(counter::EVENTS);
    ALLOW
}
