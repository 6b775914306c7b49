//! The per-grant DNS stub (issue 15): destinations given by name cover exactly the addresses
//! the daemon answered to the grant's holders, for as long as the answer lives.
//!
//! The connect/sendmsg hooks steer port-53 traffic of judged processes to the stub
//! (enforcer-ebpf/src/dns.rs); the stub attributes each query to the asking process by the
//! kernel's facts (`diag`: the socket's cookie; DNS_STEER: the process the hook saw), matches
//! the name against the destinations of the grants that process holds (`names`), forwards it
//! upstream (`resolv`: /etc/resolv.conf or systemd-resolved's upstreams by default), writes
//! the answered addresses into the kernel's LEARNED map (`learned`) and only then releases
//! the reply. Names outside every grant the asker holds are refused in enforce mode
//! (`[dns] refuse`) without being forwarded, and alerted in monitor mode.
pub mod diag;
pub mod learned;
pub mod names;
pub mod resolv;
pub mod stub;

use std::net::SocketAddr;

/// A query the stub refused or let through outside the asker's grants: the engine turns it
/// into a `dns` event.
#[derive(Debug, Clone)]
pub struct DnsNotice {
    pub tgid: u32,
    pub cgroup_id: u64,
    /// The name asked (normalized).
    pub name: String,
    /// The query type ("A", "AAAA", ...).
    pub qtype: String,
    /// The resolver the process addressed (before steering).
    pub resolver: SocketAddr,
    pub protocol: &'static str,
    /// True: refused (enforce); false: forwarded and alerted.
    pub refused: bool,
    /// What the process got: "REFUSED", "NXDOMAIN" or "forwarded".
    pub answer: &'static str,
    /// Grant ids the asker holds (none of which names it).
    pub grants: Vec<String>,
    /// boot-clock time of the query.
    pub boot_ns: u64,
}

/// Whether glibc on this host may resolve through systemd-resolved's varlink socket
/// (nss-resolve before `dns`, or without `dns`, on the `hosts:` line of nsswitch.conf): such
/// lookups send no packet the stub sees, so their addresses are never learned (connections
/// to them are out_of_intent). `dns` first: glibc asks over port 53 and the stub learns.
pub fn nss_resolve_in_use(nsswitch: &str) -> bool {
    nsswitch.lines().any(|l| {
        let l = l.split('#').next().unwrap_or("");
        let mut f = l.split_whitespace();
        if f.next() != Some("hosts:") {
            return false;
        }
        let sources: Vec<&str> = f.collect();
        let at = |name: &str| sources.iter().position(|s| *s == name);
        match (at("resolve"), at("dns")) {
            (Some(r), Some(d)) => r < d,
            (Some(_), None) => true,
            _ => false,
        }
    })
}

/// systemd-resolved's varlink socket, which nss-resolve talks to.
pub const RESOLVED_VARLINK: &str = "/run/systemd/resolve/io.systemd.Resolve";

/// What an operator must know about this host's resolution for destinations by name
/// (`doctor`; the daemon's `status.dns.notes` say the same): systemd-resolved answering
/// glibc over its varlink socket, and resolv.conf pointing at resolved's stub.
pub fn host_notes(nsswitch: &str, resolv_conf: &str, resolved_active: bool) -> Vec<String> {
    let mut notes = Vec::new();
    if nss_resolve_in_use(nsswitch) {
        notes.push(format!(
            "/etc/nsswitch.conf resolves hosts through nss-resolve before dns{}: glibc lookups then send no DNS packet, so their addresses are never learned and connections of granted processes to them are out_of_intent; put `dns` before `resolve` on the hosts: line (e.g. `hosts: files dns resolve [!UNAVAIL=return] myhostname`) or run granted workloads where nsswitch.conf does",
            if resolved_active { " and systemd-resolved is running" } else { " (systemd-resolved is not running now: glibc falls through to the next source)" }
        ));
    }
    if resolv::nameservers(resolv_conf).iter().any(resolv::is_resolved_stub) {
        notes.push("/etc/resolv.conf points at systemd-resolved's stub (127.0.0.53): granted processes' queries to it are steered to the daemon's stub, which forwards to resolved's upstreams (/run/systemd/resolve/resolv.conf) unless [dns] upstream is set".into());
    }
    notes
}

#[cfg(test)]
mod tests {
    #[test]
    fn nss_resolve_detected() {
        assert!(super::nss_resolve_in_use(
            "passwd: files\nhosts: mymachines resolve [!UNAVAIL=return] files myhostname dns\n"
        ));
        assert!(!super::nss_resolve_in_use("hosts: files dns\n# hosts: resolve\n"));
        // dns first: glibc asks over port 53, the stub learns.
        assert!(!super::nss_resolve_in_use("hosts: files dns resolve [!UNAVAIL=return]\n"));
        assert!(super::nss_resolve_in_use("hosts: files resolve\n"));
    }

    #[test]
    fn host_notes_name_what_to_configure() {
        let n = super::host_notes(
            "hosts: resolve [!UNAVAIL=return] files dns\n",
            "nameserver 127.0.0.53\n",
            true,
        );
        assert_eq!(n.len(), 2, "{n:?}");
        assert!(
            n[0].contains("systemd-resolved is running")
                && n[0].contains("put `dns` before `resolve`")
        );
        assert!(n[1].contains("127.0.0.53"));
        assert!(super::host_notes("hosts: files dns\n", "nameserver 10.0.0.2\n", true).is_empty());
    }
}
