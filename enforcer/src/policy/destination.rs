//! Destinations: where a secret may be sent. An IP network or a DNS name, plus a port range.
//!
//! Accepted forms:
//! `192.0.2.10/32:443`, `192.0.2.10:443` (= /32), `10.0.0.0/8:1000-2000`, `10.0.0.0/8` (any port),
//! `[2001:db8::/32]:443`, `[::1]:8080`, `::1` (any port), `deploy.internal:443`, `*.example.com:443`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// Inclusive port range; `PortRange::ANY` (0..=65535) is written by omitting the port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub const ANY: PortRange = PortRange { lo: 0, hi: u16::MAX };

    pub fn single(port: u16) -> Self {
        PortRange { lo: port, hi: port }
    }

    pub fn is_any(&self) -> bool {
        *self == Self::ANY
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_any() {
            f.write_str("any")
        } else if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

impl FromStr for PortRange {
    type Err = String;

    /// `443`, `1000-2000` or `any`.
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("missing port after `:`".into());
        }
        if s == "any" {
            return Ok(Self::ANY);
        }
        let (lo, hi) = match s.split_once('-') {
            Some((lo, hi)) => (parse_port(lo)?, parse_port(hi)?),
            None => {
                let p = parse_port(s)?;
                (p, p)
            }
        };
        if lo > hi {
            return Err(format!("port range `{s}` is reversed (low port above high port)"));
        }
        Ok(PortRange { lo, hi })
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "invalid port `{s}` (expected a number 1-65535, a range like 1000-2000, or `any`)"
        ));
    }
    // Parse wider than u16 so an out-of-range port gets its own message instead of "invalid".
    match s.parse::<u64>() {
        Ok(0) => Err("port 0 is not a valid destination port (use 1-65535)".into()),
        Ok(p) if p <= u16::MAX as u64 => Ok(p as u16),
        _ => Err(format!("port {s} is out of range (1-65535)")),
    }
}

/// Where a secret may be used.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    Cidr {
        net: IpNet,
        ports: PortRange,
    },
    /// Lower-case name without trailing dot, optionally starting with `*.` (any subdomain).
    /// Resolved and kept fresh by the daemon, never matched by IP here.
    Dns {
        name: String,
        ports: PortRange,
    },
}

impl Destination {
    pub fn ports(&self) -> PortRange {
        match self {
            Destination::Cidr { ports, .. } | Destination::Dns { ports, .. } => *ports,
        }
    }

    /// Whether a connection to `ip:port` falls inside this destination. An IPv4-mapped IPv6
    /// address counts as its IPv4 address: a dual-stack socket connecting to `::ffff:192.0.2.10`
    /// reaches exactly the same host as `192.0.2.10`.
    pub fn matches_ip(&self, ip: IpAddr, port: u16) -> bool {
        match self {
            Destination::Cidr { net, ports } => {
                ports.contains(port) && net.contains(&ip.to_canonical())
            }
            Destination::Dns { .. } => false,
        }
    }
}

impl FromStr for Destination {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t.is_empty() {
            return Err(
                "empty destination (expected e.g. `192.0.2.10/32:443` or `deploy.internal:443`)"
                    .into(),
            );
        }
        // `[v6]` or `[v6]:ports`: the only way to give a port with an IPv6 address.
        if let Some(rest) = t.strip_prefix('[') {
            let (inner, after) = rest.split_once(']').ok_or_else(|| {
                format!("invalid destination `{t}`: missing `]` after the IPv6 address")
            })?;
            let ports = match after {
                "" => PortRange::ANY,
                _ => after
                    .strip_prefix(':')
                    .ok_or_else(|| {
                        format!("invalid destination `{t}`: expected `:port` after `]`")
                    })?
                    .parse()
                    .map_err(|e| format!("invalid destination `{t}`: {e}"))?,
            };
            let net = parse_net(inner).map_err(|e| format!("invalid destination `{t}`: {e}"))?;
            return Ok(Destination::Cidr { net, ports });
        }
        let (host, ports) = match t.matches(':').count() {
            0 => (t, PortRange::ANY),
            1 => {
                let (host, ports) = t.split_once(':').expect("one colon");
                (host, ports.parse().map_err(|e| format!("invalid destination `{t}`: {e}"))?)
            }
            // Several colons and no brackets: a bare IPv6 address or network, any port.
            _ => {
                let net = parse_net(t).map_err(|e| {
                    format!("invalid destination `{t}`: {e} (write an IPv6 address with a port as `[2001:db8::1]:443`)")
                })?;
                return Ok(Destination::Cidr { net, ports: PortRange::ANY });
            }
        };
        if host.is_empty() {
            return Err(format!("invalid destination `{t}`: missing address or name before `:`"));
        }
        if host.contains('/') || host.parse::<IpAddr>().is_ok() {
            let net = parse_net(host).map_err(|e| format!("invalid destination `{t}`: {e}"))?;
            return Ok(Destination::Cidr { net, ports });
        }
        let name = parse_dns_name(host).map_err(|e| format!("invalid destination `{t}`: {e}"))?;
        Ok(Destination::Dns { name, ports })
    }
}

/// An address (a /32 or /128) or a network in CIDR form. Host bits must be clear: `10.0.0.1/8` is
/// almost always a typo for a narrower network, and silently widening it would over-grant.
fn parse_net(s: &str) -> Result<IpNet, String> {
    let net = match s.split_once('/') {
        Some((addr, prefix)) => {
            let ip: IpAddr = addr.parse().map_err(|_| format!("invalid IP address `{addr}`"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len: u8 = prefix.parse().ok().filter(|l| *l <= max).ok_or_else(|| {
                format!("invalid prefix length `/{prefix}` (0-{max} for this address)")
            })?;
            let net = IpNet::new(ip, len).expect("prefix length checked");
            if net.trunc() != net {
                return Err(format!("`{s}` has host bits set; the network is `{}`", net.trunc()));
            }
            net
        }
        None => IpNet::from(s.parse::<IpAddr>().map_err(|_| format!("invalid IP address `{s}`"))?),
    };
    Ok(canonical_net(net))
}

/// `::ffff:a.b.c.d/n` (n >= 96) is stored as the IPv4 network it denotes, so it matches the
/// canonicalised addresses `matches_ip` compares against.
fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.addr().to_ipv4_mapped()
    {
        return IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).expect("prefix <= 32");
    }
    net
}

fn parse_dns_name(host: &str) -> Result<String, String> {
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let rest = name.strip_prefix("*.").unwrap_or(&name);
    if rest.contains('*') {
        return Err(
            "a wildcard `*` is only allowed as the whole first label, e.g. `*.example.com`".into(),
        );
    }
    if rest.is_empty() || name.len() > 253 {
        return Err(format!("invalid DNS name `{host}`"));
    }
    for label in rest.split('.') {
        let ok = (1..=63).contains(&label.len())
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!("invalid DNS name `{host}` (bad label `{label}`)"));
        }
    }
    // An all-numeric last label is a mistyped IPv4 address (`300.1.1.1`, `10.0.0`), not a name.
    if rest.rsplit('.').next().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit())) {
        return Err(format!("invalid IP address `{host}`"));
    }
    Ok(name)
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Cidr { net: net @ IpNet::V6(_), ports } if !ports.is_any() => {
                write!(f, "[{net}]:{ports}")
            }
            Destination::Cidr { net, ports } if !ports.is_any() => write!(f, "{net}:{ports}"),
            Destination::Cidr { net, .. } => write!(f, "{net}"),
            Destination::Dns { name, ports } if !ports.is_any() => write!(f, "{name}:{ports}"),
            Destination::Dns { name, .. } => f.write_str(name),
        }
    }
}

// As a string in JSON (grant records, events) and anywhere else serde is used.
impl serde::Serialize for Destination {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Destination {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(net: &str, lo: u16, hi: u16) -> Destination {
        Destination::Cidr { net: net.parse().unwrap(), ports: PortRange { lo, hi } }
    }

    fn dns(name: &str, lo: u16, hi: u16) -> Destination {
        Destination::Dns { name: name.into(), ports: PortRange { lo, hi } }
    }

    #[test]
    fn good_destinations() {
        let cases = [
            ("192.0.2.10/32:443", cidr("192.0.2.10/32", 443, 443), "192.0.2.10/32:443"),
            ("192.0.2.10:443", cidr("192.0.2.10/32", 443, 443), "192.0.2.10/32:443"),
            ("10.0.0.0/8:1000-2000", cidr("10.0.0.0/8", 1000, 2000), "10.0.0.0/8:1000-2000"),
            ("10.0.0.0/8", cidr("10.0.0.0/8", 0, 65535), "10.0.0.0/8"),
            ("10.0.0.0/8:any", cidr("10.0.0.0/8", 0, 65535), "10.0.0.0/8"),
            ("0.0.0.0/0:53", cidr("0.0.0.0/0", 53, 53), "0.0.0.0/0:53"),
            ("192.0.2.10", cidr("192.0.2.10/32", 0, 65535), "192.0.2.10/32"),
            ("[2001:db8::/32]:443", cidr("2001:db8::/32", 443, 443), "[2001:db8::/32]:443"),
            ("[::1]:8080", cidr("::1/128", 8080, 8080), "[::1/128]:8080"),
            ("::1", cidr("::1/128", 0, 65535), "::1/128"),
            ("2001:db8::/32", cidr("2001:db8::/32", 0, 65535), "2001:db8::/32"),
            ("[2001:db8::1]", cidr("2001:db8::1/128", 0, 65535), "2001:db8::1/128"),
            ("[::ffff:192.0.2.10]:443", cidr("192.0.2.10/32", 443, 443), "192.0.2.10/32:443"),
            ("::ffff:10.0.0.0/104", cidr("10.0.0.0/8", 0, 65535), "10.0.0.0/8"),
            ("deploy.internal:443", dns("deploy.internal", 443, 443), "deploy.internal:443"),
            ("*.example.com:443", dns("*.example.com", 443, 443), "*.example.com:443"),
            (
                "API.Example.COM.:8000-8100",
                dns("api.example.com", 8000, 8100),
                "api.example.com:8000-8100",
            ),
            ("localhost", dns("localhost", 0, 65535), "localhost"),
            (
                " registry.npmjs.org:443 ",
                dns("registry.npmjs.org", 443, 443),
                "registry.npmjs.org:443",
            ),
            ("1.2.3.4:65535", cidr("1.2.3.4/32", 65535, 65535), "1.2.3.4/32:65535"),
        ];
        for (input, want, shown) in cases {
            let got: Destination = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(got, want, "{input}");
            assert_eq!(got.to_string(), shown, "{input}");
            // Display round-trips through FromStr.
            assert_eq!(shown.parse::<Destination>().unwrap(), want, "{shown}");
        }
    }

    #[test]
    fn bad_destinations() {
        let cases = [
            ("", "empty destination"),
            ("   ", "empty destination"),
            ("192.0.2.10:0", "port 0"),
            ("192.0.2.10:65536", "out of range"),
            ("192.0.2.10:99999999999999999999999", "out of range"),
            ("192.0.2.10:", "missing port"),
            ("192.0.2.10:https", "invalid port `https`"),
            ("10.0.0.0/8:2000-1000", "reversed"),
            ("10.0.0.0/8:0-100", "port 0"),
            ("10.0.0.0/8:100-", "invalid port ``"),
            ("10.0.0.0/33:443", "invalid prefix length `/33`"),
            ("10.0.0.0/:443", "invalid prefix length"),
            ("10.0.0.0/x", "invalid prefix length"),
            ("[2001:db8::/129]:443", "invalid prefix length `/129`"),
            ("10.0.0.1/8", "host bits set; the network is `10.0.0.0/8`"),
            ("300.1.1.1:443", "invalid IP address"),
            ("10.0.0:443", "invalid IP address"),
            ("10.0.0.300/24", "invalid IP address"),
            ("[2001:db8::1:443", "missing `]`"),
            ("[2001:db8::1]443", "expected `:port`"),
            ("[nothost]:443", "invalid IP address"),
            ("2001:db8::1:443:", "write an IPv6 address with a port"),
            ("gggg::1", "invalid IP address"),
            (":443", "missing address"),
            ("foo..bar:443", "bad label"),
            ("-foo.com:443", "bad label"),
            ("a*.example.com:443", "wildcard"),
            ("*.*.example.com:443", "wildcard"),
            ("*.:443", "wildcard"),
            ("*.com.:443x", "invalid port"),
            ("exa mple.com:443", "bad label"),
            ("deploy.internal/24", "invalid IP address"),
        ];
        for (input, want) in cases {
            match input.parse::<Destination>() {
                Ok(d) => panic!("{input:?} parsed as {d:?}"),
                Err(e) => assert!(e.contains(want), "{input:?}: {e:?} lacks {want:?}"),
            }
        }
    }

    #[test]
    fn matches_ip_and_ports() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let d: Destination = "192.0.2.10/32:443".parse().unwrap();
        assert!(d.matches_ip(ip("192.0.2.10"), 443));
        assert!(!d.matches_ip(ip("192.0.2.10"), 444));
        assert!(!d.matches_ip(ip("192.0.2.11"), 443));
        // IPv4-mapped IPv6 counts as the IPv4 address.
        assert!(d.matches_ip(ip("::ffff:192.0.2.10"), 443));
        assert!(!d.matches_ip(ip("::ffff:192.0.2.11"), 443));
        // ... but an IPv4-compatible or unrelated v6 address does not.
        assert!(!d.matches_ip(ip("::192.0.2.10"), 443));
        assert!(!d.matches_ip(ip("2001:db8::1"), 443));

        let r: Destination = "10.0.0.0/8:1000-2000".parse().unwrap();
        assert!(r.matches_ip(ip("10.1.2.3"), 1000));
        assert!(r.matches_ip(ip("10.255.255.255"), 2000));
        assert!(r.matches_ip(ip("::ffff:10.9.9.9"), 1500));
        assert!(!r.matches_ip(ip("10.1.2.3"), 999));
        assert!(!r.matches_ip(ip("10.1.2.3"), 2001));
        assert!(!r.matches_ip(ip("11.0.0.1"), 1500));

        let any: Destination = "10.0.0.0/8".parse().unwrap();
        assert!(any.matches_ip(ip("10.0.0.1"), 1));
        assert!(any.matches_ip(ip("10.0.0.1"), 65535));

        let v6: Destination = "[2001:db8::/32]:443".parse().unwrap();
        assert!(v6.matches_ip(ip("2001:db8:1::5"), 443));
        assert!(!v6.matches_ip(ip("2001:db9::5"), 443));
        assert!(!v6.matches_ip(ip("192.0.2.10"), 443));

        // A destination written as mapped v6 matches plain v4 too.
        let mapped: Destination = "[::ffff:192.0.2.10]:443".parse().unwrap();
        assert!(mapped.matches_ip(ip("192.0.2.10"), 443));

        // DNS destinations are resolved by the daemon, never matched here.
        let name: Destination = "deploy.internal:443".parse().unwrap();
        assert!(!name.matches_ip(ip("192.0.2.10"), 443));
    }

    #[test]
    fn serde_as_string() {
        let d: Destination = "[::1]:8080".parse().unwrap();
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"[::1/128]:8080\"");
        let back: Destination = serde_json::from_str("\"[::1/128]:8080\"").unwrap();
        assert_eq!(back, d);
        assert!(serde_json::from_str::<Destination>("\"1.2.3.4:0\"").is_err());
    }
}
