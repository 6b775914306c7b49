//! The stub's servers (UDP and TCP on the loopback address the kernel steers to) and the
//! answer to one query: attribute, match, forward, learn, release.
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use aya::maps::{HashMap as BpfHashMap, MapData};
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::RData;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::timeout;

use super::DnsNotice;
use super::learned::LearnedTable;
use super::names::{matches, normalize, ports_for};
use crate::kernel::grants::{ActMaps, boot_now_ns};
use crate::mint::view::ViewCell;
use crate::netlink::sock_diag::{self, Proto, SockDiag};
use crate::policy::{Destination, Refuse};
use enforcer_common::{DnsSteer, ProcGrants, SECRET_SLOT_BASE};

/// How long one upstream may take before the next is asked.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a sock_diag answer may take (attribution).
const DIAG_TIMEOUT: Duration = Duration::from_millis(200);
/// Queries served on one TCP connection, and how long it may idle.
const TCP_QUERIES: usize = 32;
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Counters for `status`.
#[derive(Default)]
pub struct Stats {
    pub queries: AtomicU64,
    pub refused: AtomicU64,
    pub alerted: AtomicU64,
    /// Queries from sockets the kernel did not steer (or whose process is gone): refused.
    pub unattributed: AtomicU64,
    pub learned: AtomicU64,
    pub upstream_failures: AtomicU64,
    /// Answers withheld because LEARNED could not be written (SERVFAIL).
    pub learn_failures: AtomicU64,
}

/// A grant the asker holds that is live now.
struct LiveGrant {
    slot: u32,
    id: String,
    /// Its destinations by name: (name, first port, last port).
    names: Vec<(String, u16, u16)>,
    /// Its kernel deadline (boot clock; 0 unknown).
    expires_ns: u64,
}

/// Where an answer is learned: (slot, ports, cap on the deadline).
/// (slot, ports, cap on the deadline, for a secret: its own networks compiled).
type Target = (u32, Vec<(u16, u16)>, u64, Option<crate::dest_table::DestTable>);

/// Who asked: what the connect/sendmsg hook recorded when it steered the socket.
#[derive(Debug, Clone, Copy)]
pub struct Asker {
    pub steer: DnsSteer,
    pub pg: ProcGrants,
}

pub struct Stub {
    pub upstream: Vec<SocketAddr>,
    /// Where the upstream came from (`resolv::Upstream::source`).
    pub upstream_source: String,
    /// What the operator should know (systemd-resolved, nss-resolve).
    pub notes: Vec<String>,
    /// Judged processes' connects to systemd-resolved's varlink socket fail, so glibc falls
    /// back to `dns` (`[dns] nss_resolve = "fallback"` with the cgroup connect_unix hook).
    pub nss_fallback: bool,
    /// `status.dns.nss_resolve`: "fallback", "allow", or why the fallback is not in force.
    pub nss_resolve: String,
    pub min_ttl: Duration,
    pub refuse: Refuse,
    /// Mode in force (changes with a policy reload).
    pub enforce: AtomicBool,
    /// The address the stub serves on (the kernel steers IPv4 and IPv4-mapped queries to it).
    pub local: SocketAddr,
    /// `[::1]` on the same port, when this host has it: the kernel steers queries to IPv6
    /// resolvers there (`config::STUB_V6`).
    pub local6: Option<SocketAddr>,
    pub stats: Stats,
    pub learned: Arc<LearnedTable>,
    view: Arc<ViewCell>,
    steer: BpfHashMap<MapData, u64, DnsSteer>,
    procs: ActMaps,
    notices: UnboundedSender<DnsNotice>,
}

/// The bound sockets (UDP and TCP on one port, on `listen` and on `[::1]`), before the
/// tasks run.
pub struct Sockets {
    pub udp: UdpSocket,
    pub tcp: TcpListener,
    /// UDP and TCP on `[::1]` at the same port; None when this host has no IPv6 loopback.
    pub v6: Option<(UdpSocket, TcpListener)>,
    /// Why there is no IPv6 pair (for `status.dns.notes`).
    pub v6_error: Option<String>,
}

/// Binds UDP and TCP on `listen` and on `[::1]` at the same port; with port 0, a port free
/// for all four. A host without an IPv6 loopback gets the IPv4 pair only.
pub async fn bind(listen: SocketAddr) -> std::io::Result<Sockets> {
    let mut last = None;
    for _ in 0..16 {
        let udp = UdpSocket::bind(listen).await?;
        let addr = udp.local_addr()?;
        let tcp = match TcpListener::bind(addr).await {
            Ok(tcp) => tcp,
            Err(e) if listen.port() == 0 => {
                last = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        let at6 = SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), addr.port());
        let v6 = match UdpSocket::bind(at6).await {
            Ok(u) => TcpListener::bind(at6).await.map(|t| (u, t)),
            Err(e) => Err(e),
        };
        return match v6 {
            Ok(pair) => Ok(Sockets { udp, tcp, v6: Some(pair), v6_error: None }),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && listen.port() == 0 => {
                last = Some(e);
                continue;
            }
            Err(e) => Ok(Sockets { udp, tcp, v6: None, v6_error: Some(format!("{at6}: {e}")) }),
        };
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no port free for both UDP and TCP")))
}

#[allow(clippy::too_many_arguments)]
impl Stub {
    pub fn new(
        upstream: Vec<SocketAddr>,
        cfg: &crate::policy::DnsConfig,
        enforce: bool,
        local: SocketAddr,
        learned: Arc<LearnedTable>,
        view: Arc<ViewCell>,
        steer: BpfHashMap<MapData, u64, DnsSteer>,
        procs: ActMaps,
        notices: UnboundedSender<DnsNotice>,
    ) -> Stub {
        Stub {
            upstream,
            upstream_source: String::new(),
            notes: Vec::new(),
            nss_fallback: false,
            nss_resolve: String::new(),
            min_ttl: cfg.min_ttl,
            refuse: cfg.refuse,
            enforce: AtomicBool::new(enforce),
            local,
            local6: None,
            stats: Stats::default(),
            learned,
            view,
            steer,
            procs,
            notices,
        }
    }

    /// The `dns` section of `status`.
    pub fn status(&self) -> serde_json::Value {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let s = &self.stats;
        serde_json::json!({
            "listen": self.local.to_string(),
            "listen_v6": self.local6.map(|a| a.to_string()),
            "upstream": self.upstream.iter().map(|u| u.to_string()).collect::<Vec<_>>(),
            "upstream_source": self.upstream_source,
            "min_ttl_s": self.min_ttl.as_secs_f64(),
            "refuse": self.refuse.as_str(),
            "queries": n(&s.queries),
            "refused": n(&s.refused),
            "alerted": n(&s.alerted),
            "unattributed": n(&s.unattributed),
            "upstream_failures": n(&s.upstream_failures),
            "learn_failures": n(&s.learn_failures),
            "addresses_learned": n(&s.learned),
            "learned_entries": self.learned.len(),
            "nss_resolve": self.nss_resolve,
            "notes": self.notes,
        })
    }

    /// The kernel's CONFIG word for the stub: its port and `dns_stub::*` flags.
    pub fn config_word(&self) -> u32 {
        let mut w = self.local.port() as u32;
        if self.local6.is_some() {
            w |= enforcer_common::dns_stub::V6;
        }
        if self.nss_fallback {
            w |= enforcer_common::dns_stub::NSS_RESOLVE_FALLBACK;
        }
        w
    }

    /// Serves every socket until the task is aborted.
    pub async fn serve(self: Arc<Self>, sockets: Sockets) {
        let mut tasks = vec![tokio::spawn(self.clone().serve_tcp(sockets.tcp))];
        if let Some((udp6, tcp6)) = sockets.v6 {
            tasks.push(tokio::spawn(self.clone().serve_tcp(tcp6)));
            tasks.push(tokio::spawn(self.clone().serve_udp(Arc::new(udp6))));
        }
        self.serve_udp(Arc::new(sockets.udp)).await;
        for t in tasks {
            t.abort();
        }
    }

    async fn serve_udp(self: Arc<Self>, sock: Arc<UdpSocket>) {
        let mut diag = match SockDiag::open(DIAG_TIMEOUT) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!("dns stub: sock_diag unavailable, every query is refused: {e}");
                return;
            }
        };
        let Ok(local) = sock.local_addr() else { return };
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else { continue };
            // Attribute now: the asking socket may be gone once the answer is ready.
            let who = self.attribute(&mut diag, Proto::Udp, peer, local);
            let query = buf[..n].to_vec();
            let (me, sock) = (self.clone(), sock.clone());
            tokio::spawn(async move {
                if let Some(reply) = me.answer(&query, who, Proto::Udp).await {
                    let _ = sock.send_to(&reply, peer).await;
                }
            });
        }
    }

    async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        let Ok(local) = listener.local_addr() else { return };
        loop {
            let Ok((stream, peer)) = listener.accept().await else { continue };
            let me = self.clone();
            tokio::spawn(async move { me.serve_conn(stream, peer, local).await });
        }
    }

    async fn serve_conn(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
    ) {
        let who = match SockDiag::open(DIAG_TIMEOUT) {
            Ok(mut d) => self.attribute(&mut d, Proto::Tcp, peer, local),
            Err(_) => None,
        };
        for _ in 0..TCP_QUERIES {
            let mut len = [0u8; 2];
            if !matches!(timeout(TCP_IDLE, stream.read_exact(&mut len)).await, Ok(Ok(_))) {
                return;
            }
            let mut query = vec![0u8; u16::from_be_bytes(len) as usize];
            if !matches!(timeout(TCP_IDLE, stream.read_exact(&mut query)).await, Ok(Ok(_))) {
                return;
            }
            let Some(reply) = self.answer(&query, who, Proto::Tcp).await else { return };
            let mut out = Vec::with_capacity(reply.len() + 2);
            out.extend_from_slice(&(reply.len() as u16).to_be_bytes());
            out.extend_from_slice(&reply);
            if stream.write_all(&out).await.is_err() {
                return;
            }
        }
    }

    /// The process behind the socket at `peer` (which sent to the stub's `local`), by the
    /// kernel's facts: the socket's cookie (sock_diag), the steering record under it, and
    /// that process's PROC_GRANTS entry (same start time: not a successor reusing the pid).
    fn attribute(
        &self,
        diag: &mut SockDiag,
        proto: Proto,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Option<Asker> {
        let cookie = diag.find(proto, sock_diag::ANY_STATE, peer, local).ok()??.cookie;
        let steer = self.steer.get(&cookie, 0).ok()?;
        let pg = self.procs.state_of(steer.tgid)?;
        if pg.start_ns != steer.start_ns {
            return None;
        }
        Some(Asker { steer, pg })
    }

    /// The reply to one query (None: nothing to send).
    pub async fn answer(&self, query: &[u8], who: Option<Asker>, proto: Proto) -> Option<Vec<u8>> {
        let msg = Message::from_vec(query).ok()?;
        if msg.metadata.message_type != MessageType::Query {
            return None;
        }
        self.stats.queries.fetch_add(1, Ordering::Relaxed);
        if msg.queries.len() != 1 {
            return error_reply(&msg, ResponseCode::FormErr);
        }
        let Some(who) = who else {
            self.stats.unattributed.fetch_add(1, Ordering::Relaxed);
            return error_reply(&msg, ResponseCode::Refused);
        };
        let q = &msg.queries[0];
        let qname = normalize(&q.name.to_ascii());
        let now_ns = boot_now_ns();
        let view = self.view.load();
        // The asker's live grants.
        let grants: Vec<LiveGrant> = who
            .pg
            .grants
            .iter()
            .filter(|s| **s != 0)
            .filter_map(|s| {
                let g = view.grant(*s)?;
                let live = !g.revoked && (g.expires_ns == 0 || g.expires_ns > now_ns);
                live.then(|| LiveGrant {
                    slot: *s,
                    id: g.id.clone(),
                    names: g.names.clone(),
                    expires_ns: g.expires_ns,
                })
            })
            .collect();
        let named = grants.iter().any(|g| g.names.iter().any(|(p, _, _)| matches(p, &qname)));
        if !named {
            let refuse = self.enforce.load(Ordering::Relaxed) && self.refuse != Refuse::Off;
            let (answer, rcode) = match self.refuse {
                Refuse::Nxdomain => ("NXDOMAIN", ResponseCode::NXDomain),
                _ => ("REFUSED", ResponseCode::Refused),
            };
            let notice = DnsNotice {
                tgid: who.steer.tgid,
                cgroup_id: 0,
                name: qname,
                qtype: q.query_type.to_string(),
                resolver: resolver_of(&who.steer),
                protocol: proto.name(),
                refused: refuse,
                answer: if refuse { answer } else { "forwarded" },
                grants: grants.iter().map(|g| g.id.clone()).collect(),
                boot_ns: now_ns,
            };
            let _ = self.notices.send(notice);
            if refuse {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                return error_reply(&msg, rcode);
            }
            self.stats.alerted.fetch_add(1, Ordering::Relaxed);
            return match self.forward(query, proto).await {
                Some(r) => Some(r),
                None => error_reply(&msg, ResponseCode::ServFail),
            };
        }
        let Some(raw) = self.forward(query, proto).await else {
            self.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
            return error_reply(&msg, ResponseCode::ServFail);
        };
        let Ok(reply) = Message::from_vec(&raw) else {
            self.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
            return error_reply(&msg, ResponseCode::ServFail);
        };
        if reply.metadata.id != msg.metadata.id || reply.queries != msg.queries {
            self.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
            return error_reply(&msg, ResponseCode::ServFail);
        }
        // Learn before releasing: the asker cannot connect before the kernel knows.
        if let Err(e) = self.learn(&qname, &reply, &grants, &view, now_ns) {
            self.stats.learn_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(name = %qname, "dns stub: answer withheld: {e:#}");
            return error_reply(&msg, ResponseCode::ServFail);
        }
        Some(raw)
    }

    /// Writes every address of `reply` reached from `qname` (directly or through the CNAME
    /// chain) for each grant whose destinations name a name of that chain, and for each
    /// secret whose own destinations do.
    fn learn(
        &self,
        qname: &str,
        reply: &Message,
        grants: &[LiveGrant],
        view: &crate::mint::view::GrantView,
        now_ns: u64,
    ) -> anyhow::Result<()> {
        let (chain, addrs, chain_ttl) = walk(qname, reply);
        if addrs.is_empty() {
            return Ok(());
        }
        let floor = self.min_ttl.as_nanos() as u64;
        let mut targets: Vec<Target> = grants
            .iter()
            .map(|g| {
                let cap = if g.expires_ns == 0 { u64::MAX } else { g.expires_ns };
                (g.slot, ports_for(&g.names, &chain), cap, None)
            })
            .filter(|t| !t.1.is_empty())
            .collect();
        for s in &view.policy.config.secrets {
            let Some(i) = view.policy.secret_bits.get(&s.name) else { continue };
            let ports = ports_for(&names_of_dests(&s.destinations), &chain);
            if !ports.is_empty() {
                let nets = view.policy.secret_nets.get(&s.name);
                let table = nets.and_then(|n| crate::dest_table::DestTable::compile(n).ok());
                targets.push((SECRET_SLOT_BASE + i, ports, u64::MAX, table));
            }
        }
        for (ip, ttl) in addrs {
            let life = (ttl.min(chain_ttl) as u64 * 1_000_000_000).max(floor);
            for (slot, ports, cap, nets) in &targets {
                let deadline = now_ns.saturating_add(life).min(*cap);
                let net_ports = nets.as_ref().and_then(|t| t.longest_match(ip)).unwrap_or(&[]);
                self.learned.learn(*slot, ip, ports, net_ports, deadline, qname)?;
                self.stats.learned.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// The upstream's reply (UDP for UDP queries, retried over TCP when truncated; TCP for
    /// TCP queries), from the first upstream that answers.
    async fn forward(&self, query: &[u8], proto: Proto) -> Option<Vec<u8>> {
        for up in &self.upstream {
            let r = match proto {
                Proto::Udp => match forward_udp(*up, query).await {
                    Some(r) if truncated(&r) => forward_tcp(*up, query).await.or(Some(r)),
                    r => r,
                },
                Proto::Tcp => forward_tcp(*up, query).await,
            };
            if r.is_some() {
                return r;
            }
        }
        None
    }
}

fn names_of_dests(dests: &[Destination]) -> Vec<(String, u16, u16)> {
    dests
        .iter()
        .filter_map(|d| match d {
            Destination::Dns { name, ports } => Some((name.clone(), ports.lo, ports.hi)),
            Destination::Cidr { .. } => None,
        })
        .collect()
}

/// (the CNAME chain from `qname`, the A/AAAA addresses of its names with their TTLs, the
/// smallest CNAME TTL along it).
fn walk(qname: &str, reply: &Message) -> (Vec<String>, Vec<(IpAddr, u32)>, u32) {
    let mut chain = vec![qname.to_string()];
    let mut chain_ttl = u32::MAX;
    // Bounded: each round adds at most one name; a loop ends when nothing new is added.
    for _ in 0..16 {
        let mut added = false;
        for r in &reply.answers {
            if let RData::CNAME(target) = &r.data {
                let owner = normalize(&r.name.to_ascii());
                let target = normalize(&target.0.to_ascii());
                if chain.contains(&owner) && !chain.contains(&target) {
                    chain.push(target);
                    chain_ttl = chain_ttl.min(r.ttl);
                    added = true;
                }
            }
        }
        if !added {
            break;
        }
    }
    let addrs = reply
        .answers
        .iter()
        .filter(|r| chain.contains(&normalize(&r.name.to_ascii())))
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((IpAddr::V4(a.0), r.ttl)),
            RData::AAAA(a) => Some((IpAddr::V6(a.0), r.ttl)),
            _ => None,
        })
        .collect();
    (chain, addrs, chain_ttl)
}

fn resolver_of(s: &DnsSteer) -> SocketAddr {
    let ip = std::net::Ipv6Addr::from(s.addr);
    let ip = ip.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(ip));
    SocketAddr::new(ip, s.port)
}

fn truncated(raw: &[u8]) -> bool {
    raw.get(2).is_some_and(|b| b & 0x02 != 0)
}

/// An answer with `code` and the question, to the query `msg`.
fn error_reply(msg: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    let mut r = Message::error_msg(msg.metadata.id, msg.metadata.op_code, code);
    r.metadata.recursion_desired = msg.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    r.add_queries(msg.queries.iter().cloned());
    r.to_vec().ok()
}

async fn forward_udp(up: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let bind: SocketAddr = if up.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    // A fresh socket (and port) per query, connected: only the upstream's datagrams arrive.
    let s = UdpSocket::bind(bind).await.ok()?;
    s.connect(up).await.ok()?;
    s.send(query).await.ok()?;
    let mut buf = vec![0u8; 65_535];
    let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
    for _ in 0..8 {
        let n = tokio::time::timeout_at(deadline, s.recv(&mut buf)).await.ok()?.ok()?;
        // The reply to this query (same id), not a stray datagram.
        if n >= 2 && buf[..2] == query[..2] {
            buf.truncate(n);
            return Some(buf);
        }
    }
    None
}

async fn forward_tcp(up: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let work = async {
        let mut s = TcpStream::connect(up).await.ok()?;
        let mut out = Vec::with_capacity(query.len() + 2);
        out.extend_from_slice(&(query.len() as u16).to_be_bytes());
        out.extend_from_slice(query);
        s.write_all(&out).await.ok()?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.ok()?;
        let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut buf).await.ok()?;
        Some(buf)
    };
    timeout(UPSTREAM_TIMEOUT, work).await.ok()?
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, CNAME};
    use hickory_proto::rr::{Name, Record};

    #[test]
    fn chain_and_addresses() {
        let mut m = Message::response(1, hickory_proto::op::OpCode::Query);
        let n = |s: &str| Name::from_ascii(s).unwrap();
        m.add_answer(Record::from_rdata(
            n("Alias.example.com."),
            300,
            RData::CNAME(CNAME(n("edge.cdn.example.net."))),
        ));
        m.add_answer(Record::from_rdata(
            n("edge.cdn.example.net."),
            30,
            RData::A(A("192.0.2.7".parse().unwrap())),
        ));
        // Not on the chain: never learned.
        m.add_answer(Record::from_rdata(
            n("unrelated.example.org."),
            30,
            RData::A(A("198.51.100.1".parse().unwrap())),
        ));
        let (chain, addrs, ttl) = walk("alias.example.com", &m);
        assert_eq!(chain, vec!["alias.example.com", "edge.cdn.example.net"]);
        assert_eq!(addrs, vec![("192.0.2.7".parse().unwrap(), 30)]);
        assert_eq!(ttl, 300);
    }
}
