//! Destinations compiled to the kernel's form: one LPM-trie entry per network with the port
//! ranges allowed there.
//!
//! The kernel's trie answers a lookup with the longest matching prefix only. A destination
//! list where networks nest (`127.0.0.1/32:80` and `127.0.0.0/8:18081`) must still allow
//! 127.0.0.1:18081, so each entry carries the union of its own ranges and those of every
//! shorter network of the same list that contains it: the longest match then holds exactly
//! the union of everything that covers the address. decide.rs judges on this same compiled
//! form ([`DestTable::allows`]), so its table tests cover what the kernel will see.
use std::net::{IpAddr, Ipv6Addr};

use enforcer_common::{MAX_PORT_RANGES, PortRanges};
use ipnet::{IpNet, Ipv6Net};

/// A destination list as (network, first port, last port), ports inclusive.
pub type Destinations = [(IpNet, u16, u16)];

/// Why a destination list does not fit the kernel's form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DestTableError {
    #[error(
        "destination {net} needs {needed} port ranges after merging the networks that contain \
         it; the kernel holds at most {MAX_PORT_RANGES} per network"
    )]
    TooManyRanges { net: IpNet, needed: usize },
}

/// The compiled entries: (network as IPv6, IPv4 mapped; its merged port ranges).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DestTable {
    pub entries: Vec<(Ipv6Net, Vec<(u16, u16)>)>,
}

/// The network in the kernel's key space: IPv4 as IPv4-mapped IPv6.
pub fn kernel_net(net: &IpNet) -> Ipv6Net {
    match net {
        IpNet::V4(n) => Ipv6Net::new(n.network().to_ipv6_mapped(), 96 + n.prefix_len())
            .expect("an IPv4 prefix length plus 96 is a valid IPv6 prefix length"),
        IpNet::V6(n) => n.trunc(),
    }
}

fn kernel_ip(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Sorted, with overlapping and adjacent ranges joined.
fn merge(mut ranges: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    ranges.retain(|(lo, hi)| lo <= hi);
    ranges.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        match out.last_mut() {
            Some(last) if lo as u32 <= last.1 as u32 + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

impl DestTable {
    /// Compiles a destination list. Never widens: a network whose merged ranges do not fit
    /// the kernel's entry is an error, not a broader range.
    pub fn compile(dests: &Destinations) -> Result<DestTable, DestTableError> {
        let mut nets: Vec<Ipv6Net> = dests.iter().map(|(n, _, _)| kernel_net(n)).collect();
        nets.sort_unstable();
        nets.dedup();
        let mut entries = Vec::with_capacity(nets.len());
        for net in nets {
            let ranges = merge(
                dests
                    .iter()
                    .filter(|(n, _, _)| kernel_net(n).contains(&net))
                    .map(|(_, lo, hi)| (*lo, *hi))
                    .collect(),
            );
            if ranges.len() > MAX_PORT_RANGES {
                return Err(DestTableError::TooManyRanges {
                    net: IpNet::V6(net),
                    needed: ranges.len(),
                });
            }
            entries.push((net, ranges));
        }
        Ok(DestTable { entries })
    }

    /// The kernel's value for one entry: unused pairs are (1, 0), which match nothing.
    pub fn port_ranges(ranges: &[(u16, u16)]) -> PortRanges {
        let mut pr = PortRanges { lo: [1; MAX_PORT_RANGES], hi: [0; MAX_PORT_RANGES] };
        for (i, (lo, hi)) in ranges.iter().take(MAX_PORT_RANGES).enumerate() {
            pr.lo[i] = *lo;
            pr.hi[i] = *hi;
        }
        pr
    }

    /// What the kernel's lookup answers: the longest network holding `ip`, if any.
    pub fn longest_match(&self, ip: IpAddr) -> Option<&[(u16, u16)]> {
        let ip = kernel_ip(ip);
        self.entries
            .iter()
            .filter(|(net, _)| net.contains(&ip))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, r)| r.as_slice())
    }

    /// Whether (ip, port) is allowed, decided as the kernel decides it.
    pub fn allows(&self, ip: IpAddr, port: u16) -> bool {
        self.longest_match(ip).is_some_and(|r| r.iter().any(|(lo, hi)| *lo <= port && port <= *hi))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(list: &[(&str, u16, u16)]) -> Vec<(IpNet, u16, u16)> {
        list.iter().map(|(n, lo, hi)| (n.parse().unwrap(), *lo, *hi)).collect()
    }

    /// Every address and port is allowed by the compiled table exactly when some listed
    /// destination covers it (the union), for nested, disjoint and mixed-family lists.
    #[test]
    fn longest_match_answers_the_union() {
        let lists = [
            d(&[("127.0.0.1/32", 80, 80), ("127.0.0.0/8", 18081, 18081)]),
            d(&[("10.0.0.0/8", 443, 443), ("10.1.0.0/16", 22, 22), ("10.1.2.3/32", 8080, 8090)]),
            d(&[("::ffff:10.0.0.0/104", 53, 53), ("10.9.9.9/32", 443, 443)]),
            d(&[("2001:db8::/32", 1, 1024), ("2001:db8::1/128", 8443, 8443)]),
            d(&[("0.0.0.0/0", 443, 443), ("192.0.2.0/24", 80, 80)]),
        ];
        let ips = [
            "127.0.0.1",
            "127.0.0.2",
            "10.1.2.3",
            "10.1.9.9",
            "10.2.0.1",
            "10.9.9.9",
            "192.0.2.7",
            "198.51.100.1",
            "2001:db8::1",
            "2001:db8::2",
            "::ffff:10.1.2.3",
        ];
        let ports = [1, 22, 53, 80, 443, 1024, 1025, 8080, 8085, 8443, 18081, 65535];
        for list in &lists {
            let table = DestTable::compile(list).unwrap();
            for ip in ips {
                let ip: IpAddr = ip.parse().unwrap();
                for port in ports {
                    let canon = match ip {
                        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
                        v4 => v4,
                    };
                    let union = list.iter().any(|(n, lo, hi)| {
                        kernel_net(n).contains(&kernel_ip(canon)) && *lo <= port && port <= *hi
                    });
                    assert_eq!(table.allows(ip, port), union, "{list:?} {ip} {port}");
                }
            }
        }
    }

    #[test]
    fn ranges_merge_and_never_widen() {
        let t = DestTable::compile(&d(&[
            ("10.0.0.0/8", 80, 80),
            ("10.0.0.0/8", 81, 90),
            ("10.0.0.0/8", 85, 100),
            ("10.0.0.0/8", 443, 443),
        ]))
        .unwrap();
        assert_eq!(t.entries[0].1, vec![(80, 100), (443, 443)]);
        let n = MAX_PORT_RANGES as u16 + 1;
        let many: Vec<(&str, u16, u16)> =
            (0..n).map(|i| ("10.0.0.0/8", 1000 + 10 * i, 1000 + 10 * i)).collect();
        let err = DestTable::compile(&d(&many)).unwrap_err();
        assert!(
            matches!(err, DestTableError::TooManyRanges { needed, .. } if needed == n as usize),
            "{err}"
        );
        // Port 1005 lies between listed ports: a widened span would have let it through.
        let fits = DestTable::compile(&d(&many[..MAX_PORT_RANGES])).unwrap();
        assert!(!fits.allows("10.1.1.1".parse().unwrap(), 1005));
        assert!(fits.allows("10.1.1.1".parse().unwrap(), 1030));
    }
}
