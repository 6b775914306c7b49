//! The stub's default upstream: the host's resolvers from /etc/resolv.conf. A host whose
//! resolv.conf points at systemd-resolved's stub (127.0.0.53 / 127.0.0.54) resolves through
//! resolved: the stub then forwards to resolved's own upstreams, listed in
//! /run/systemd/resolve/resolv.conf (docs/contracts.md, "Destinations by name").
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

pub const RESOLV_CONF: &str = "/etc/resolv.conf";
pub const RESOLVED_UPSTREAM_CONF: &str = "/run/systemd/resolve/resolv.conf";

/// The upstream the stub uses and how it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub servers: Vec<SocketAddr>,
    /// "config", "/etc/resolv.conf" or "systemd-resolved (/run/systemd/resolve/resolv.conf)".
    pub source: String,
    /// /etc/resolv.conf points at systemd-resolved.
    pub resolved: bool,
}

/// `nameserver` lines of a resolv.conf text, port 53.
pub fn nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            (f.next()? == "nameserver").then_some(())?;
            // A scoped IPv6 address (fe80::1%eth0) is not an IpAddr; skipped.
            let ip: IpAddr = f.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

/// Whether `addr` is systemd-resolved's local stub.
pub fn is_resolved_stub(addr: &SocketAddr) -> bool {
    matches!(addr.ip(), IpAddr::V4(v4) if v4.octets() == [127, 0, 0, 53] || v4.octets() == [127, 0, 0, 54])
}

/// The upstream: `configured` when given, else the host's resolvers.
pub fn upstream(configured: Option<&[SocketAddr]>, etc: &Path, resolved_conf: &Path) -> Upstream {
    let host = nameservers(&std::fs::read_to_string(etc).unwrap_or_default());
    let resolved = host.iter().any(is_resolved_stub);
    if let Some(c) = configured {
        return Upstream { servers: c.to_vec(), source: "config".into(), resolved };
    }
    if resolved {
        let servers: Vec<SocketAddr> =
            nameservers(&std::fs::read_to_string(resolved_conf).unwrap_or_default())
                .into_iter()
                .filter(|a| !is_resolved_stub(a))
                .collect();
        if !servers.is_empty() {
            return Upstream {
                servers,
                source: format!("systemd-resolved ({})", resolved_conf.display()),
                resolved,
            };
        }
    }
    Upstream { servers: host, source: etc.display().to_string(), resolved }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_and_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("resolv.conf");
        let run = dir.path().join("resolved.conf");
        std::fs::write(&etc, "# c\nsearch x\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nnameserver 2001:db8::53\n").unwrap();
        let u = upstream(None, &etc, &run);
        assert_eq!(
            u.servers,
            vec!["10.0.0.2:53".parse().unwrap(), "[2001:db8::53]:53".parse().unwrap()]
        );
        assert!(!u.resolved);
        // resolved: its own upstreams, never its stub.
        std::fs::write(&etc, "nameserver 127.0.0.53\noptions edns0 trust-ad\n").unwrap();
        std::fs::write(&run, "nameserver 192.0.2.53\nnameserver 127.0.0.53\n").unwrap();
        let u = upstream(None, &etc, &run);
        assert!(u.resolved);
        assert_eq!(u.servers, vec!["192.0.2.53:53".parse().unwrap()]);
        assert!(u.source.starts_with("systemd-resolved"));
        // The config wins.
        let c: Vec<SocketAddr> = vec!["10.9.9.9:5353".parse().unwrap()];
        let u = upstream(Some(&c), &etc, &run);
        assert_eq!((u.servers, u.source.as_str(), u.resolved), (c, "config", true));
    }
}
