//! Socket creation: a cgroup `sock_create` hook on `cgroup_root`.
//!
//! The connect hooks judge only TCP and UDP. A judged process (an `[[agent]]`, a grant
//! holder, a tainted process) that opens a socket no connect hook sees (raw IP, an ICMP ping
//! socket, SCTP, MPTCP, ...) would carry data out unjudged: the shared
//! `enforcer_common::socket::judge_socket` decides which sockets it may create, and in
//! enforce mode socket() fails with EPERM. Every such creation is a violation record on
//! ALERTS. The kernel runs this hook for AF_INET/AF_INET6 sockets created by user space.
//!
//! The common path (a process with no PROC_GRANTS entry) costs one map lookup.
use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_ktime_get_boot_ns,
    },
    macros::cgroup_sock,
    programs::SockContext,
};
use enforcer_common::{SocketRecord, config, counter, kind, socket::judge_socket};

use crate::egress::record_owner;
use crate::maps::{ALERTS, WAKEUP_NOW, config, count, proc_entry};

/// Verdicts for cgroup sock programs: 1 lets socket() succeed, 0 fails it with EPERM.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(subject) = proc_entry(tgid) else { return ALLOW };
    let sk = unsafe { &*ctx.sock };
    let (family, sock_type, protocol) = (sk.family, sk.type_, sk.protocol);
    let j = judge_socket(family, sock_type, protocol, &subject, config(config::ENFORCE) != 0);
    if !j.is_violation() {
        record_owner(ctx.sock, tgid, subject.start_ns);
        return ALLOW;
    }
    let ug = bpf_get_current_uid_gid();
    let rec = SocketRecord {
        kind: kind::SOCKET,
        tgid,
        tid: pid_tgid as u32,
        uid: ug as u32,
        family,
        sock_type,
        protocol,
        action: j.action,
        verdict: j.verdict,
        reason: j.reason,
        _pad: 0,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        subject,
    };
    // A violation: on the ALERTS ring, which routine records never fill. The decision
    // stands even when it cannot be reported.
    match ALERTS.reserve::<SocketRecord>(0) {
        Some(mut entry) => {
            entry.write(rec);
            entry.submit(WAKEUP_NOW);
            count(counter::EVENTS);
        }
        None => count(counter::ALERT_DROPS),
    }
    if j.lets_through() { ALLOW } else { DENY }
}
