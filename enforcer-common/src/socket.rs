//! Socket creation: which sockets a judged process (an `[[agent]]`, a grant holder or a
//! tainted process) may create. Called by the kernel's `cgroup/sock_create` program and
//! table-tested here, so the tests cover the code the kernel runs.
//!
//! The policy is an allow list: exactly the sockets whose traffic the connect4/6 and
//! sendmsg4/6 hooks judge, plus local IPC that libc and iproute need.
//!
//! - `AF_INET`/`AF_INET6` `SOCK_STREAM` with TCP and `SOCK_DGRAM` with UDP: their connect(),
//!   sendto() and sendmsg() go through the sock_addr hooks.
//! - `AF_UNIX` (local IPC, the daemon's own API, NSS via nscd/systemd) and `AF_NETLINK`
//!   (getaddrinfo's interface lookup, iproute): they never leave the host. (A local relay
//!   reached over AF_UNIX is outside this hook: it is its own process, judged on its own.)
//! - Everything else is denied: `SOCK_RAW` (raw IP carries any payload), `SOCK_DGRAM` with
//!   ICMP/ICMPv6 (ping sockets, open to every user under the default `ping_group_range`),
//!   SCTP (its sendmsg to an explicit address and its multi-homing are not judged), UDP-Lite,
//!   MPTCP (the path manager opens extra subflows from kernel workers toward addresses the
//!   peer announces: those connects are never judged against the process; applications fall
//!   back to TCP when MPTCP is refused), IPPROTO_SMC, and every other family (`AF_PACKET`,
//!   `AF_XDP`, `AF_VSOCK`, `AF_BLUETOOTH`, `AF_CAN`, `AF_TIPC`, `AF_RDS`, `AF_ALG`, ...):
//!   none of them is judged by a connect hook, and an agent has no business with them.
//!
//! Only AF_INET/AF_INET6 sockets reach `cgroup/sock_create` (the kernel runs it from
//! inet_create/inet6_create): the other families are decided here for completeness and for
//! a future hook (BPF-LSM `socket_create`); docs/threat-model.md says what that leaves open.
use crate::{ProcGrants, action, proc_flags, reason, verdict};

/// Address families (`socket(2)` domain).
pub mod af {
    pub const UNIX: u32 = 1;
    pub const INET: u32 = 2;
    pub const INET6: u32 = 10;
    pub const KEY: u32 = 15;
    pub const NETLINK: u32 = 16;
    pub const PACKET: u32 = 17;
    pub const RDS: u32 = 21;
    pub const CAN: u32 = 29;
    pub const TIPC: u32 = 30;
    pub const BLUETOOTH: u32 = 31;
    pub const ALG: u32 = 38;
    pub const VSOCK: u32 = 40;
    pub const QIPCRTR: u32 = 42;
    pub const XDP: u32 = 44;
    pub const MCTP: u32 = 45;
}

/// Socket types (without SOCK_NONBLOCK/SOCK_CLOEXEC).
pub mod sock_type {
    pub const STREAM: u32 = 1;
    pub const DGRAM: u32 = 2;
    pub const RAW: u32 = 3;
    pub const RDM: u32 = 4;
    pub const SEQPACKET: u32 = 5;
    pub const DCCP: u32 = 6;
    pub const PACKET: u32 = 10;
}

/// IP protocols.
pub mod ipproto {
    pub const IP: u32 = 0;
    pub const ICMP: u32 = 1;
    pub const TCP: u32 = 6;
    pub const UDP: u32 = 17;
    pub const ICMPV6: u32 = 58;
    pub const SCTP: u32 = 132;
    pub const UDPLITE: u32 = 136;
    pub const RAW: u32 = 255;
    pub const SMC: u32 = 256;
    pub const MPTCP: u32 = 262;
}

/// The judgement of one socket creation. `verdict::NO_GRANT_HELD`: the process is not judged
/// (no agent flag, no grant, no taint); `verdict::ALLOWED`: a socket the connect hooks judge
/// (or local IPC); `verdict::OUT_OF_INTENT`: a socket no hook judges, with `action::DENY`
/// (enforce) or `action::ALERT` (monitor). `reason` says why the process is judged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketJudgement {
    pub verdict: u8,
    pub action: u8,
    pub reason: u8,
}

impl SocketJudgement {
    /// Whether socket() may succeed.
    #[inline(always)]
    pub fn lets_through(&self) -> bool {
        self.action != action::DENY
    }

    /// Whether the creation is reported (every violation, never anything else).
    #[inline(always)]
    pub fn is_violation(&self) -> bool {
        self.verdict == verdict::OUT_OF_INTENT
    }
}

/// Whether a socket of this kind carries traffic only through the connect/sendmsg hooks (or
/// stays on the host). `protocol` 0 is the family's default (TCP for streams, UDP for
/// datagrams); the kernel resolves it before the hook runs.
#[inline(always)]
pub fn judged_elsewhere(family: u32, ty: u32, protocol: u32) -> bool {
    match family {
        af::UNIX | af::NETLINK => true,
        af::INET | af::INET6 => {
            (ty == sock_type::STREAM && (protocol == ipproto::IP || protocol == ipproto::TCP))
                || (ty == sock_type::DGRAM && (protocol == ipproto::IP || protocol == ipproto::UDP))
        }
        _ => false,
    }
}

/// Judges socket(`family`, `ty`, `protocol`) by a process with PROC_GRANTS entry `subject`.
#[inline(always)]
pub fn judge_socket(
    family: u32,
    ty: u32,
    protocol: u32,
    subject: &ProcGrants,
    enforce: bool,
) -> SocketJudgement {
    let mut holds = false;
    for slot in subject.grants {
        if slot != 0 {
            holds = true;
        }
    }
    let why = if subject.flags & proc_flags::AGENT != 0 {
        reason::AGENT
    } else if holds {
        reason::GRANT
    } else if subject.taint != 0 {
        reason::TAINT
    } else {
        return SocketJudgement {
            verdict: verdict::NO_GRANT_HELD,
            action: action::ALLOWED,
            reason: reason::GRANT,
        };
    };
    if judged_elsewhere(family, ty, protocol) {
        return SocketJudgement { verdict: verdict::ALLOWED, action: action::ALLOWED, reason: why };
    }
    SocketJudgement {
        verdict: verdict::OUT_OF_INTENT,
        action: if enforce { action::DENY } else { action::ALERT },
        reason: why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(kind: &str) -> ProcGrants {
        let mut pg = ProcGrants::default();
        match kind {
            "agent" => pg.flags = proc_flags::AGENT,
            "holder" => pg.grants[2] = 7,
            "tainted" => pg.taint = 1 << 5,
            "plain" => {}
            _ => unreachable!(),
        }
        pg
    }

    /// (family, type, protocol, allowed for a judged process).
    const TABLE: &[(u32, u32, u32, bool)] = &[
        (af::INET, sock_type::STREAM, ipproto::TCP, true),
        (af::INET, sock_type::STREAM, ipproto::IP, true),
        (af::INET6, sock_type::STREAM, ipproto::TCP, true),
        (af::INET, sock_type::DGRAM, ipproto::UDP, true),
        (af::INET6, sock_type::DGRAM, ipproto::IP, true),
        (af::UNIX, sock_type::STREAM, 0, true),
        (af::UNIX, sock_type::DGRAM, 0, true),
        (af::UNIX, sock_type::SEQPACKET, 0, true),
        (af::NETLINK, sock_type::RAW, 0, true),
        (af::NETLINK, sock_type::DGRAM, 0, true),
        // ping sockets
        (af::INET, sock_type::DGRAM, ipproto::ICMP, false),
        (af::INET6, sock_type::DGRAM, ipproto::ICMPV6, false),
        // raw
        (af::INET, sock_type::RAW, ipproto::ICMP, false),
        (af::INET, sock_type::RAW, ipproto::RAW, false),
        (af::INET6, sock_type::RAW, ipproto::TCP, false),
        (af::INET, sock_type::RAW, ipproto::UDP, false),
        // SCTP, UDP-Lite, MPTCP, SMC
        (af::INET, sock_type::STREAM, ipproto::SCTP, false),
        (af::INET6, sock_type::SEQPACKET, ipproto::SCTP, false),
        (af::INET, sock_type::DGRAM, ipproto::UDPLITE, false),
        (af::INET, sock_type::STREAM, ipproto::MPTCP, false),
        (af::INET, sock_type::STREAM, ipproto::SMC, false),
        // wrong protocol for the type
        (af::INET, sock_type::STREAM, ipproto::UDP, false),
        (af::INET, sock_type::DGRAM, ipproto::TCP, false),
        (af::INET, sock_type::DCCP, 33, false),
        // other families
        (af::PACKET, sock_type::RAW, 0x0300, false),
        (af::PACKET, sock_type::DGRAM, 0, false),
        (af::XDP, sock_type::RAW, 0, false),
        (af::VSOCK, sock_type::STREAM, 0, false),
        (af::BLUETOOTH, sock_type::SEQPACKET, 0, false),
        (af::ALG, sock_type::SEQPACKET, 0, false),
        (af::CAN, sock_type::RAW, 1, false),
        (af::TIPC, sock_type::RDM, 0, false),
        (af::RDS, sock_type::SEQPACKET, 0, false),
        (af::KEY, sock_type::RAW, 2, false),
        (af::QIPCRTR, sock_type::DGRAM, 0, false),
        (af::MCTP, sock_type::DGRAM, 0, false),
        (af::PACKET, sock_type::PACKET, 0, false),
    ];

    #[test]
    fn table() {
        for &(family, ty, protocol, ok) in TABLE {
            for who in ["agent", "holder", "tainted", "plain"] {
                for enforce in [true, false] {
                    let j = judge_socket(family, ty, protocol, &subject(who), enforce);
                    let case = (family, ty, protocol, who, enforce);
                    if who == "plain" {
                        assert_eq!(j.verdict, verdict::NO_GRANT_HELD, "{case:?}");
                        assert!(j.lets_through() && !j.is_violation(), "{case:?}");
                        continue;
                    }
                    let why = match who {
                        "agent" => reason::AGENT,
                        "holder" => reason::GRANT,
                        _ => reason::TAINT,
                    };
                    assert_eq!(j.reason, why, "{case:?}");
                    if ok {
                        assert_eq!(j.verdict, verdict::ALLOWED, "{case:?}");
                        assert_eq!(j.action, action::ALLOWED, "{case:?}");
                        assert!(j.lets_through() && !j.is_violation(), "{case:?}");
                    } else {
                        assert_eq!(j.verdict, verdict::OUT_OF_INTENT, "{case:?}");
                        assert!(j.is_violation(), "{case:?}");
                        let want = if enforce { action::DENY } else { action::ALERT };
                        assert_eq!(j.action, want, "{case:?}");
                        assert_eq!(j.lets_through(), !enforce, "{case:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn agent_flag_wins_over_grant_and_taint() {
        let pg = ProcGrants {
            grants: [0, 3, 0, 0],
            taint: 1,
            flags: proc_flags::AGENT,
            ..Default::default()
        };
        let j = judge_socket(af::INET, sock_type::RAW, ipproto::ICMP, &pg, true);
        assert_eq!(j.reason, reason::AGENT);
        let pg = ProcGrants { flags: 0, ..pg };
        assert_eq!(judge_socket(af::INET, sock_type::RAW, 1, &pg, true).reason, reason::GRANT);
    }

    #[test]
    fn an_empty_entry_is_not_judged() {
        // An entry left with no grant, no taint and no flag (its grants ended) judges nothing.
        let pg = ProcGrants { start_ns: 42, ..Default::default() };
        let j = judge_socket(af::PACKET, sock_type::RAW, 0, &pg, true);
        assert_eq!(j.verdict, verdict::NO_GRANT_HELD);
        assert!(j.lets_through());
    }
}
