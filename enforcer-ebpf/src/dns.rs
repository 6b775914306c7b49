//! Port-53 steering to the daemon's DNS stub (issue 15, docs/architecture.md "Destinations
//! by name").
//!
//! A process the connect hooks judge (it has a PROC_GRANTS entry: grants, taint or the
//! `[[agent]]` flag) that connects or sends to any address on port 53 is steered to the stub
//! on 127.0.0.1 (IPv4, or `::ffff:127.0.0.1` on an IPv6 socket): the stub answers every DNS
//! query of judged processes, learns the answers for their grants and refuses names outside
//! them. The resolver the process asked is kept under the socket's cookie (DNS_STEER): the
//! stub reads it to attribute the query to the process, and the recvmsg hooks give replies
//! the resolver's address as their source, so resolvers that check where a reply came from
//! (glibc, musl) accept it.
use aya_ebpf::{
    EbpfContext, helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use enforcer_common::{DnsSteer, ProcGrants, config};

use crate::maps::{DNS_STEER, config};

const AF_INET: u32 = 2;
const DNS_PORT: u16 = 53;
/// 127.0.0.1 as the kernel's `user_ip4` holds it (network byte order in memory).
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// `::ffff:127.0.0.1` as four `user_ip6` words (network byte order in memory).
const MAPPED_LOOPBACK6: [u32; 4] =
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), u32::from_ne_bytes([127, 0, 0, 1])];

/// Steers a port-53 connect/sendmsg of a judged process to the stub; true when it did (the
/// caller then lets the call through without judging: the stub judges the query).
#[inline(always)]
pub fn steer(
    ctx: &SockAddrContext,
    family: u32,
    proc: &ProcGrants,
    tgid: u32,
    addr: &[u8; 16],
    port: u16,
) -> bool {
    if port != DNS_PORT {
        return false;
    }
    let stub = config(config::DNS_STUB_PORT) as u16;
    if stub == 0 {
        return false;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = DnsSteer { addr: *addr, port, family: family as u16, tgid, start_ns: proc.start_ns };
    // No entry, no steering: the connect is then judged like any other (a resolver outside
    // the grants is out_of_intent).
    if DNS_STEER.insert(cookie, orig, 0).is_err() {
        return false;
    }
    let sa = ctx.sock_addr;
    if family == AF_INET {
        set(unsafe { &raw mut (*sa).user_ip4 }, LOOPBACK4);
    } else {
        set_ip6(sa, MAPPED_LOOPBACK6);
    }
    set(unsafe { &raw mut (*sa).user_port }, stub.to_be() as u32);
    true
}

/// `::ffff:127.0.0.1` as the judge's 16-byte address.
const STUB_ADDR: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1];

/// Whether (`addr`, `port`) is the stub itself. A steered IPv6 UDP socket (connected to
/// `::ffff:127.0.0.1`) reaches sendmsg4 on every send with the stub as the address (the
/// kernel hands IPv4-mapped sends to the IPv4 path with an explicit address): those sends are
/// the steered queries, let through unjudged like the steering itself (the stub judges them).
#[inline(always)]
pub fn to_stub(addr: &[u8; 16], port: u16) -> bool {
    if *addr != STUB_ADDR {
        return false;
    }
    let stub = config(config::DNS_STUB_PORT) as u16;
    stub != 0 && port == stub
}

/// One 32-bit store into the context at a constant offset: the verifier refuses stores
/// through a context pointer the compiler has moved (as a whole-array copy would).
#[inline(always)]
fn set(field: *mut u32, value: u32) {
    unsafe { core::ptr::write_volatile(field, value) };
}

#[inline(always)]
fn set_ip6(sa: *mut aya_ebpf::bindings::bpf_sock_addr, w: [u32; 4]) {
    set(unsafe { &raw mut (*sa).user_ip6[0] }, w[0]);
    set(unsafe { &raw mut (*sa).user_ip6[1] }, w[1]);
    set(unsafe { &raw mut (*sa).user_ip6[2] }, w[2]);
    set(unsafe { &raw mut (*sa).user_ip6[3] }, w[3]);
}

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_source(&ctx, true);
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_source(&ctx, false);
    1
}

/// A datagram from the stub to a steered socket reads as coming from the resolver asked.
#[inline(always)]
fn restore_source(ctx: &SockAddrContext, v4: bool) {
    let stub = config(config::DNS_STUB_PORT) as u16;
    if stub == 0 {
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = (unsafe { DNS_STEER.get(cookie) }) else { return };
    let orig = *orig;
    let sa = ctx.sock_addr;
    let r = unsafe { &*sa };
    if u16::from_be(r.user_port as u16) != stub {
        return;
    }
    let a = orig.addr;
    if v4 {
        if r.user_ip4 != LOOPBACK4 {
            return;
        }
        set(unsafe { &raw mut (*sa).user_ip4 }, u32::from_ne_bytes([a[12], a[13], a[14], a[15]]));
    } else {
        let cur = [r.user_ip6[0], r.user_ip6[1], r.user_ip6[2], r.user_ip6[3]];
        if cur != MAPPED_LOOPBACK6 {
            return;
        }
        set_ip6(
            sa,
            [
                u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
                u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
                u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
                u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
            ],
        );
    }
    set(unsafe { &raw mut (*sa).user_port }, orig.port.to_be() as u32);
}
