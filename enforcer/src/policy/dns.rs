//! `[dns]`: the daemon's DNS stub, through which the DNS queries of judged processes
//! (grant holders, tainted and `[[agent]]` processes) pass, so destinations given by name
//! cover exactly the addresses the stub answered (docs/contracts.md, "Destinations by name").
//!
//! ```toml
//! [dns]
//! upstream = ["10.0.0.2:53"]   # default: the nameservers of /etc/resolv.conf
//! min_ttl = "5s"               # floor of a learned address's lifetime (default 5s)
//! refuse = "refused"           # names outside the asker's grants: "refused" | "nxdomain" | "off"
//! listen = "127.0.0.1:0"       # the stub's own address (port 0: any free port)
//! nss_resolve = "fallback"     # judged processes' glibc skips systemd-resolved's varlink
//! ```
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;
use serde_spanned::Spanned;

use super::diag::Collector;
use super::duration::parse_duration;

/// What the stub answers, in enforce mode, for a name outside every grant the asking
/// process holds. Monitor mode (and `off`) forwards the query and alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Refuse {
    /// RCODE 5 (REFUSED): the query is not forwarded.
    #[default]
    Refused,
    /// RCODE 3 (NXDOMAIN): the query is not forwarded.
    Nxdomain,
    /// Forwarded and answered; an alert is still raised.
    Off,
}

impl Refuse {
    pub fn as_str(self) -> &'static str {
        match self {
            Refuse::Refused => "refused",
            Refuse::Nxdomain => "nxdomain",
            Refuse::Off => "off",
        }
    }
}

/// What a judged process's connect to systemd-resolved's varlink socket (glibc's
/// nss-resolve) meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NssResolve {
    /// Fails with EPERM (both modes): nss-resolve answers UNAVAIL and glibc's next source,
    /// `dns`, asks port 53, which the kernel steers to the stub. The process resolves as
    /// before; the answers are learned.
    #[default]
    Fallback,
    /// Let through: those lookups send no DNS packet and are never learned.
    Allow,
}

impl NssResolve {
    pub fn as_str(self) -> &'static str {
        match self {
            NssResolve::Fallback => "fallback",
            NssResolve::Allow => "allow",
        }
    }
}

/// The default floor of a learned address's lifetime: an answer with TTL 0 would otherwise
/// be unusable by the time the process connects.
pub const DEFAULT_MIN_TTL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Where the stub forwards; None: the nameservers of /etc/resolv.conf (or of
    /// /run/systemd/resolve/resolv.conf when resolv.conf points at systemd-resolved),
    /// read when the daemon starts.
    pub upstream: Option<Vec<SocketAddr>>,
    pub min_ttl: Duration,
    pub refuse: Refuse,
    /// The stub's UDP and TCP address: loopback IPv4 only (the kernel steers to 127.0.0.1;
    /// the stub also serves `[::1]` on the same port).
    pub listen: SocketAddr,
    pub nss_resolve: NssResolve,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            upstream: None,
            min_ttl: DEFAULT_MIN_TTL,
            refuse: Refuse::default(),
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            nss_resolve: NssResolve::default(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDns {
    upstream: Option<Vec<Spanned<String>>>,
    min_ttl: Option<Spanned<String>>,
    refuse: Option<Spanned<String>>,
    listen: Option<Spanned<String>>,
    nss_resolve: Option<Spanned<String>>,
}

pub(crate) fn dns(diags: &mut Collector, file: usize, raw: Option<&RawDns>) -> DnsConfig {
    let mut d = DnsConfig::default();
    let Some(raw) = raw else { return d };
    if let Some(list) = &raw.upstream {
        let mut out = Vec::new();
        for u in list {
            match u.get_ref().trim().parse::<SocketAddr>() {
                Ok(a) if a.port() != 0 && !a.ip().is_unspecified() => out.push(a),
                _ => diags.error(
                    file,
                    u.span(),
                    format!(
                        "dns upstream `{}` is not an `IP:port` address (e.g. \"10.0.0.2:53\" or \"[2001:db8::53]:53\")",
                        u.get_ref()
                    ),
                ),
            }
        }
        d.upstream = Some(out);
    }
    if let Some(v) = &raw.min_ttl {
        match parse_duration(v.get_ref()) {
            Ok(t) if t <= Duration::from_secs(86_400) => d.min_ttl = t,
            Ok(_) => diags.error(file, v.span(), "dns min_ttl must be at most 24h"),
            Err(e) => diags.error(file, v.span(), format!("dns min_ttl: {e}")),
        }
    }
    if let Some(v) = &raw.refuse {
        match v.get_ref().as_str() {
            "refused" => d.refuse = Refuse::Refused,
            "nxdomain" => d.refuse = Refuse::Nxdomain,
            "off" => d.refuse = Refuse::Off,
            other => diags.error(
                file,
                v.span(),
                format!("dns refuse `{other}` is not one of \"refused\", \"nxdomain\", \"off\""),
            ),
        }
    }
    if let Some(v) = &raw.listen {
        match v.get_ref().trim().parse::<SocketAddr>() {
            Ok(a) if a.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST) => d.listen = a,
            _ => diags.error(
                file,
                v.span(),
                format!(
                    "dns listen `{}` must be 127.0.0.1:PORT (the kernel steers DNS queries to 127.0.0.1; port 0 picks a free one)",
                    v.get_ref()
                ),
            ),
        }
    }
    if let Some(v) = &raw.nss_resolve {
        match v.get_ref().as_str() {
            "fallback" => d.nss_resolve = NssResolve::Fallback,
            "allow" => d.nss_resolve = NssResolve::Allow,
            other => diags.error(
                file,
                v.span(),
                format!("dns nss_resolve `{other}` is not one of \"fallback\", \"allow\""),
            ),
        }
    }
    d
}
