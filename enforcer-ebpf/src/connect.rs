//! Outbound connections: cgroup sock_addr hooks on `cgroup_root`.
//!
//! connect4/6 see TCP connect and UDP connect (also from io_uring, which goes through the
//! same kernel path); sendmsg4/6 see UDP sendto/sendmsg with an explicit address.
//! A dual-stack socket connecting to an IPv4-mapped address reaches connect6 only, so the
//! daemon folds ::ffff:a.b.c.d back to IPv4.
use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_ktime_get_boot_ns,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use enforcer_common::{ConnectRecord, counter, kind, op};

use crate::maps::{EVENTS, count, submit_flags};

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
    let ug = bpf_get_current_uid_gid();
    let Some(mut entry) = EVENTS.reserve::<ConnectRecord>(0) else {
        count(counter::RINGBUF_DROPS);
        return ALLOW;
    };
    entry.write(ConnectRecord {
        kind: kind::CONNECT,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        uid: ug as u32,
        family: family as u16,
        port,
        protocol,
        op: operation,
        denied: 0,
        _pad: 0,
        addr,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        boot_ns: unsafe { bpf_ktime_get_boot_ns() },
    });
    entry.submit(submit_flags());
    count(counter::EVENTS);
    ALLOW
}
