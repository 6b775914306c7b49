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
/// (nss-resolve before `dns` in nsswitch.conf): such lookups send no packet the stub sees,
/// so their addresses are never learned (connections to them are out_of_intent).
pub fn nss_resolve_in_use(nsswitch: &str) -> bool {
    nsswitch.lines().any(|l| {
        let l = l.split('#').next().unwrap_or("");
        let mut f = l.split_whitespace();
        f.next() == Some("hosts:") && f.any(|s| s == "resolve")
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn nss_resolve_detected() {
        assert!(super::nss_resolve_in_use(
            "passwd: files\nhosts: mymachines resolve [!UNAVAIL=return] files myhostname dns\n"
        ));
        assert!(!super::nss_resolve_in_use("hosts: files dns\n# hosts: resolve\n"));
    }
}
