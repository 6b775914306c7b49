//! Port-53 steering to the daemon's DNS stub (issue 15, docs/architecture.md "Destinations
//! by name").
//!
//! A process the connect hooks judge (it has a PROC_GRANTS entry: grants, taint or the
//! `[[agent]]` flag) that connects or sends to any address on port 53 is steered to the stub
//! on 127.0.0.1 (IPv4; `::ffff:127.0.0.1` on an IPv6 socket asking an IPv4-mapped address;
//! `[::1]` on an IPv6 socket asking an IPv6 resolver, when the stub serves there): the stub
//! answers every DNS query of judged processes, learns the answers for their grants and
//! refuses names outside them.
//!
//! glibc's nss-resolve asks systemd-resolved over its varlink Unix socket and sends no DNS
//! packet at all. With `[dns] nss_resolve = "fallback"` a judged process's connect to that
//! socket fails (`resolved_varlink`, called by the IPC hooks' `cgroup/connect_unix`
//! program): nss-resolve answers UNAVAIL and glibc goes on to the `dns` source, whose port-53
//! query is steered here like any other. The resolver the process asked is kept under the socket's cookie (DNS_STEER): the
//! stub reads it to attribute the query to the process, and the recvmsg hooks give replies
//! the resolver's address as their source, so resolvers that check where a reply came from
//! (glibc, musl) accept it.
use aya_ebpf::{
    EbpfContext, helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use enforcer_common::{DnsSteer, ProcGrants, config, dns_stub};

use crate::maps::{DNS_STEER, config, proc_entry};

const AF_INET: u32 = 2;
const DNS_PORT: u16 = 53;
/// 127.0.0.1 as the kernel's `user_ip4` holds it (network byte order in memory).
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// `::ffff:127.0.0.1` as four `user_ip6` words (network byte order in memory).
const MAPPED_LOOPBACK6: [u32; 4] =
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), u32::from_ne_bytes([127, 0, 0, 1])];
/// `::1` as four `user_ip6` words.
const LOOPBACK6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

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
    let word = config(config::DNS_STUB_PORT);
    let stub = dns_stub::port(word);
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
    } else if word & dns_stub::V6 != 0 && !v4_mapped(addr) {
        // An IPv6 resolver: the stub's IPv6 socket. The kernel refuses a sendmsg6 rewrite
        // to an IPv4-mapped address (ENOTSUPP), and an IPV6_V6ONLY socket cannot reach one.
        set_ip6(sa, LOOPBACK6);
    } else {
        set_ip6(sa, MAPPED_LOOPBACK6);
    }
    set(unsafe { &raw mut (*sa).user_port }, stub.to_be() as u32);
    true
}

#[inline(always)]
fn v4_mapped(a: &[u8; 16]) -> bool {
    a[0] | a[1] | a[2] | a[3] | a[4] | a[5] | a[6] | a[7] | a[8] | a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
}

/// Whether (`addr`, `port`) is the stub itself (`::ffff:127.0.0.1` or, when it serves there,
/// `::1`). A steered IPv6 UDP socket (connected to `::ffff:127.0.0.1`) reaches sendmsg4 on
/// every send with the stub as the address (the kernel hands IPv4-mapped sends to the IPv4
/// path with an explicit address): those sends are the steered queries, let through
/// unjudged like the steering itself (the stub judges them).
#[inline(always)]
pub fn to_stub(addr: &[u8; 16], port: u16) -> bool {
    enforcer_common::judge::is_stub(addr, port, config(config::DNS_STUB_PORT))
}

/// systemd-resolved's varlink socket, where glibc's nss-resolve connects.
const RESOLVED_VARLINK: &[u8; 39] = b"/run/systemd/resolve/io.systemd.Resolve";

/// Whether this Unix connect (`cgroup/connect_unix`) is a judged process connecting to
/// systemd-resolved's varlink socket while `dns_stub::NSS_RESOLVE_FALLBACK` is set: the
/// caller then fails it (EPERM), so nss-resolve reports UNAVAIL and glibc's `dns` source
/// asks port 53, which is steered to the stub. The path is the kernel's copy of the address
/// the caller passed (a path naming the socket another way, e.g. through /var/run, is not
/// matched: that process's lookups then go unlearned and its connects fail closed).
#[inline(always)]
pub fn resolved_varlink(ctx: &SockAddrContext) -> bool {
    let word = config(config::DNS_STUB_PORT);
    if word & dns_stub::NSS_RESOLVE_FALLBACK == 0 || dns_stub::port(word) == 0 {
        return false;
    }
    let tgid = (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32;
    if proc_entry(tgid).is_none() {
        return false;
    }
    let Ok(kern) = (unsafe {
        aya_ebpf::helpers::bpf_probe_read_kernel(ctx.sock_addr as *const crate::ipc::SockAddrKern)
    }) else {
        return false;
    };
    let (uaddr, len) = (kern[1], (kern[4] as u32).saturating_sub(2));
    let want = RESOLVED_VARLINK.len() as u32;
    if uaddr == 0 || len < want {
        return false;
    }
    let Ok(path) =
        (unsafe { aya_ebpf::helpers::bpf_probe_read_kernel((uaddr + 2) as *const [u8; 40]) })
    else {
        return false;
    };
    let mut differ = 0u8;
    for i in 0..RESOLVED_VARLINK.len() {
        differ |= path[i] ^ RESOLVED_VARLINK[i];
    }
    // Exactly the path: the address ends there, or a NUL ends it.
    differ == 0 && (len == want || path[RESOLVED_VARLINK.len()] == 0)
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
    let stub = dns_stub::port(config(config::DNS_STUB_PORT));
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
        if cur != MAPPED_LOOPBACK6 && cur != LOOPBACK6 {
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
