//! Judged socket creations (`cgroup/sock_create`): the kernel decided, this explains. The
//! policy itself is `enforcer_common::socket::judge_socket`.
use enforcer_common::socket::{af, ipproto, sock_type};
use enforcer_common::{action, reason};

use crate::decide::{self, Action, Decision, Verdict};
use crate::event::SocketRef;
use crate::records::SocketUse;

pub fn family_name(family: u32) -> String {
    let name = match family {
        af::UNIX => "AF_UNIX",
        af::INET => "AF_INET",
        af::INET6 => "AF_INET6",
        af::KEY => "AF_KEY",
        af::NETLINK => "AF_NETLINK",
        af::PACKET => "AF_PACKET",
        af::RDS => "AF_RDS",
        af::CAN => "AF_CAN",
        af::TIPC => "AF_TIPC",
        af::BLUETOOTH => "AF_BLUETOOTH",
        af::ALG => "AF_ALG",
        af::VSOCK => "AF_VSOCK",
        af::QIPCRTR => "AF_QIPCRTR",
        af::XDP => "AF_XDP",
        af::MCTP => "AF_MCTP",
        n => return format!("AF_{n}"),
    };
    name.into()
}

pub fn type_name(ty: u32) -> String {
    let name = match ty {
        sock_type::STREAM => "SOCK_STREAM",
        sock_type::DGRAM => "SOCK_DGRAM",
        sock_type::RAW => "SOCK_RAW",
        sock_type::RDM => "SOCK_RDM",
        sock_type::SEQPACKET => "SOCK_SEQPACKET",
        sock_type::DCCP => "SOCK_DCCP",
        sock_type::PACKET => "SOCK_PACKET",
        n => return format!("SOCK_{n}"),
    };
    name.into()
}

/// IP protocol names for AF_INET/AF_INET6; other families' protocol numbers as they are.
pub fn protocol_name(family: u32, protocol: u32) -> String {
    if family != af::INET && family != af::INET6 {
        return protocol.to_string();
    }
    let name = match protocol {
        ipproto::IP => "IP",
        ipproto::ICMP => "ICMP",
        ipproto::TCP => "TCP",
        ipproto::UDP => "UDP",
        ipproto::ICMPV6 => "ICMPV6",
        ipproto::SCTP => "SCTP",
        ipproto::UDPLITE => "UDPLITE",
        ipproto::RAW => "RAW",
        ipproto::SMC => "SMC",
        ipproto::MPTCP => "MPTCP",
        n => return n.to_string(),
    };
    name.into()
}

/// The names of the secrets behind taint bits `bits`.
pub fn taint_names(view: &crate::mint::view::GrantView, bits: u64) -> Vec<String> {
    (0..64u32)
        .filter(|i| bits & (1 << i) != 0)
        .filter_map(|i| view.secret_name(i).map(String::from))
        .collect()
}

/// What this kind of socket is, and why no connect hook judges it.
fn what(s: &SocketUse) -> &'static str {
    match (s.family, s.sock_type, s.protocol) {
        (af::INET | af::INET6, sock_type::RAW, _) => {
            "a raw IP socket: carries any payload in hand-made packets"
        }
        (af::INET, sock_type::DGRAM, ipproto::ICMP)
        | (af::INET6, sock_type::DGRAM, ipproto::ICMPV6) => {
            "an ICMP ping socket: echo payloads leave the host"
        }
        (af::INET | af::INET6, _, ipproto::SCTP) => {
            "an SCTP socket: its sends and multi-homed paths are not judged"
        }
        (af::INET | af::INET6, _, ipproto::MPTCP) => {
            "an MPTCP socket: extra subflows are connected by the kernel, not judged"
        }
        (af::INET | af::INET6, _, _) => "an IP protocol other than TCP or UDP",
        (af::PACKET, _, _) => "a packet socket: raw link-layer frames",
        _ => "a socket family no connect hook sees",
    }
}

/// The event's decision, socket object and message for a kernel record.
pub fn explain(
    s: &SocketUse,
    mode: crate::policy::Mode,
    taint_names: &[String],
) -> (Decision, SocketRef, String) {
    let sref = SocketRef {
        family: family_name(s.family),
        sock_type: type_name(s.sock_type),
        protocol: protocol_name(s.family, s.protocol),
    };
    let call = format!("socket({}, {}, {})", sref.family, sref.sock_type, sref.protocol);
    let held: Vec<String> =
        s.subject.grants.iter().filter(|g| **g != 0).map(|g| g.to_string()).collect();
    let (subject, why) = match s.reason {
        reason::AGENT => ("an [[agent]] process".to_string(), decide::Reason::Agent),
        reason::TAINT => (
            format!(
                "tainted by {}",
                if taint_names.is_empty() {
                    format!("secret bits {:#x}", s.subject.taint)
                } else {
                    taint_names.join(", ")
                }
            ),
            decide::Reason::Taint(taint_names.first().cloned().unwrap_or_default()),
        ),
        _ => (format!("holds grant slot(s) {}", held.join(", ")), decide::Reason::Grant),
    };
    let act = decide::action_of(s.action);
    let outcome = if s.action == action::DENY {
        format!("mode {mode}: denied in the kernel, socket() failed with EPERM")
    } else {
        format!("mode {mode}: alert only, the socket was created")
    };
    let decision_path = vec![
        format!("subject judged: {subject}"),
        format!("{call}: {}", what(s)),
        "judged processes may create only TCP/UDP over AF_INET/AF_INET6 (judged by the connect hooks) and AF_UNIX/AF_NETLINK (local)".into(),
        "verdict out_of_intent".into(),
        outcome,
    ];
    let d = Decision {
        verdict: Verdict::OutOfIntent,
        action: if act == Action::Allowed { Action::Alerted } else { act },
        decision_path,
        grant: None,
        expired_for_ms: None,
        reason: why,
    };
    let message = format!(
        "{call} by a process that {}: a channel no connect hook judges ({})",
        match s.reason {
            reason::AGENT => "is an agent".to_string(),
            reason::TAINT => "read a secret".to_string(),
            _ => "holds a grant".to_string(),
        },
        d.action.as_str()
    );
    (d, sref, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(family_name(2), "AF_INET");
        assert_eq!(family_name(17), "AF_PACKET");
        assert_eq!(family_name(99), "AF_99");
        assert_eq!(type_name(3), "SOCK_RAW");
        assert_eq!(protocol_name(2, 1), "ICMP");
        assert_eq!(protocol_name(10, 58), "ICMPV6");
        assert_eq!(protocol_name(17, 768), "768");
    }

    #[test]
    fn explains_a_denied_ping_socket() {
        let s = SocketUse {
            tgid: 5,
            uid: 0,
            family: 2,
            sock_type: 2,
            protocol: 1,
            action: action::DENY,
            verdict: enforcer_common::verdict::OUT_OF_INTENT,
            reason: reason::AGENT,
            cgroup_id: 0,
            boot_ns: 0,
            subject: Default::default(),
        };
        let (d, sref, msg) = explain(&s, crate::policy::Mode::Enforce, &[]);
        assert_eq!(d.verdict, Verdict::OutOfIntent);
        assert_eq!(d.action, Action::Denied);
        assert_eq!((sref.family.as_str(), sref.sock_type.as_str()), ("AF_INET", "SOCK_DGRAM"));
        assert!(d.decision_path.iter().any(|p| p.contains("ICMP ping socket")), "{d:?}");
        assert!(msg.contains("socket(AF_INET, SOCK_DGRAM, ICMP)"), "{msg}");
    }
}
