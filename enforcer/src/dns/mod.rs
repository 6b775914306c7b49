//! The per-grant DNS stub (issue 15): destinations given by name cover exactly the addresses
//! the daemon answered to the grant's holders, for as long as the answer lives.
//!
//! The connect/sendmsg hooks steer port-53 traffic of judged processes to the stub
//! (enforcer-ebpf/src/dns.rs); the stub attributes each query to the asking process by the
//! kernel's facts (`crate::netlink::sock_diag`: the socket's cookie; DNS_STEER: the process the hook saw), matches
//! the name against the destinations of the grants that process holds (`names`), forwards it
//! upstream (`resolv`: /etc/resolv.conf or systemd-resolved's upstreams by default), writes
//! the answered addresses into the kernel's LEARNED map (`learned`) and only then releases
//! the reply. Names outside every grant the asker holds are refused in enforce mode
//! (`[dns] refuse`) without being forwarded, and alerted in monitor mode.
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

/// The sources of the `hosts:` line of nsswitch.conf, with their `[...]` actions as separate
/// items (empty when there is no such line).
fn hosts_sources(nsswitch: &str) -> Vec<String> {
    for l in nsswitch.lines() {
        let l = l.split('#').next().unwrap_or("");
        let Some(rest) = l.trim_start().strip_prefix("hosts:") else { continue };
        // `[!UNAVAIL=return]` may be written with spaces inside the brackets.
        let mut out = Vec::new();
        let mut action: Option<String> = None;
        for w in rest.split_whitespace() {
            match action.as_mut() {
                Some(a) => {
                    a.push(' ');
                    a.push_str(w);
                }
                None if w.starts_with('[') => action = Some(w.to_string()),
                None => out.push(w.to_string()),
            }
            if action.as_ref().is_some_and(|a| a.ends_with(']')) {
                out.push(action.take().unwrap_or_default());
            }
        }
        return out;
    }
    Vec::new()
}

/// Whether glibc on this host may resolve through systemd-resolved's varlink socket
/// (nss-resolve before `dns`, or without `dns`, on the `hosts:` line of nsswitch.conf): such
/// lookups send no packet the stub sees.
pub fn nss_resolve_in_use(nsswitch: &str) -> bool {
    let sources = hosts_sources(nsswitch);
    let at = |name: &str| sources.iter().position(|s| s == name);
    match (at("resolve"), at("dns")) {
        (Some(r), Some(d)) => r < d,
        (Some(_), None) => true,
        _ => false,
    }
}

/// Whether a lookup that nss-resolve answers UNAVAIL (its connect to resolved failed: the
/// `nss_resolve = "fallback"` steering) goes on to the `dns` source: `dns` comes after
/// `resolve` and the actions between them do not return on UNAVAIL (`[!UNAVAIL=return]`,
/// the Debian/Ubuntu default, continues).
pub fn fallback_reaches_dns(nsswitch: &str) -> bool {
    let sources = hosts_sources(nsswitch);
    let Some(r) = sources.iter().position(|s| s == "resolve") else { return true };
    if sources[..r].iter().any(|s| s == "dns") {
        return true;
    }
    for s in &sources[r + 1..] {
        if s == "dns" {
            return true;
        }
        if s.starts_with('[') {
            let a = s.to_ascii_lowercase();
            let returns = a
                .trim_matches(|c| c == '[' || c == ']')
                .split_whitespace()
                .any(|x| x == "unavail=return");
            if returns {
                return false;
            }
        }
        // Another source may answer first; `dns` can still follow it.
    }
    false
}

/// systemd-resolved's varlink socket, which nss-resolve talks to.
pub const RESOLVED_VARLINK: &str = "/run/systemd/resolve/io.systemd.Resolve";

/// What an operator must know about this host's resolution for destinations by name
/// (`doctor`; the daemon's `status.dns.notes` say the same): systemd-resolved answering
/// glibc over its varlink socket, and resolv.conf pointing at resolved's stub. `fallback`:
/// judged processes' connects to resolved's varlink socket fail (`nss_resolve =
/// "fallback"` with the `cgroup/connect_unix` hook).
pub fn host_notes(
    nsswitch: &str,
    resolv_conf: &str,
    resolved_active: bool,
    fallback: bool,
) -> Vec<String> {
    let mut notes = Vec::new();
    let running = if resolved_active {
        " and systemd-resolved is running"
    } else {
        " (systemd-resolved is not running now: glibc falls through to the next source)"
    };
    if nss_resolve_in_use(nsswitch) && !fallback {
        notes.push(format!(
            "/etc/nsswitch.conf resolves hosts through nss-resolve before dns{running}, and judged processes may use it (nss_resolve = \"allow\", or this kernel has no cgroup/connect_unix hook): their glibc lookups then send no DNS packet, so the addresses are never learned and connections to them are out_of_intent; set [dns] nss_resolve = \"fallback\" on Linux 6.7+, or put `dns` before `resolve` on the hosts: line (e.g. `hosts: files dns resolve [!UNAVAIL=return] myhostname`), or run granted workloads where nsswitch.conf does"
        ));
    } else if nss_resolve_in_use(nsswitch) && !fallback_reaches_dns(nsswitch) {
        notes.push(format!(
            "/etc/nsswitch.conf resolves hosts through nss-resolve{running}, but no `dns` source follows it for a lookup nss-resolve answers UNAVAIL: judged processes (whose connect to resolved's varlink socket fails, nss_resolve = \"fallback\") cannot resolve with glibc; add `dns` after `resolve [!UNAVAIL=return]` on the hosts: line"
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
    fn fallback_reaches_dns_after_unavail() {
        let reaches = super::fallback_reaches_dns;
        // Debian/Ubuntu with libnss-resolve: UNAVAIL continues to dns.
        assert!(reaches("hosts: files resolve [!UNAVAIL=return] dns myhostname\n"));
        assert!(reaches("hosts: files resolve [ !UNAVAIL=return ] myhostname dns\n"));
        assert!(reaches("hosts: files resolve dns\n"));
        assert!(reaches("hosts: files dns\n"), "no resolve: nothing to fall back from");
        // No dns after resolve, or UNAVAIL returns: the lookup ends there.
        assert!(!reaches("hosts: files resolve [!UNAVAIL=return] myhostname\n"));
        assert!(!reaches("hosts: files resolve [UNAVAIL=return] dns\n"));
        assert!(!reaches("hosts: files resolve [NOTFOUND=return UNAVAIL=return] dns\n"));
        assert!(reaches("hosts: dns resolve\n"), "dns asked first");
    }

    #[test]
    fn host_notes_name_what_to_configure() {
        let nss = "hosts: resolve [!UNAVAIL=return] files dns\n";
        let n = super::host_notes(nss, "nameserver 127.0.0.53\n", true, false);
        assert_eq!(n.len(), 2, "{n:?}");
        assert!(
            n[0].contains("systemd-resolved is running")
                && n[0].contains("put `dns` before `resolve`")
                && n[0].contains("nss_resolve = \"fallback\"")
        );
        assert!(n[1].contains("127.0.0.53"));
        // The fallback in force and reaching dns: nothing to configure.
        assert!(super::host_notes(nss, "nameserver 10.0.0.2\n", true, true).is_empty());
        // The fallback in force but no dns after resolve: lookups of judged processes fail.
        let n = super::host_notes("hosts: files resolve\n", "", true, true);
        assert!(n.len() == 1 && n[0].contains("add `dns` after"), "{n:?}");
        assert!(
            super::host_notes("hosts: files dns\n", "nameserver 10.0.0.2\n", true, false)
                .is_empty()
        );
    }
}
