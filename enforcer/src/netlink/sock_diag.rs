//! Which socket is at the other end of a local connection, by the kernel's word:
//! NETLINK_SOCK_DIAG exact lookups (`SOCK_DIAG_BY_FAMILY` with a full 4-tuple, a hash lookup
//! in the kernel, never a walk of the socket table). The one client of it in the daemon:
//! the DNS stub reads the asking socket's cookie (under which the kernel's steering recorded
//! the process), the AWS credentials endpoint the client socket's inode (whose holders it
//! then finds in `/proc/<pid>/fd`). A socket's own word about who it is never counts.
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_req_v2` after the header.
const REQ_LEN: usize = NLMSG_HDRLEN + 56;
/// `struct inet_diag_msg` after the header: family, state, timer, retrans, the sockid (48),
/// expires, rqueue, wqueue, uid, inode.
const MSG_LEN: usize = NLMSG_HDRLEN + 72;
const INET_DIAG_NOCOOKIE: u32 = !0;
/// `states` for any TCP state.
pub const ANY_STATE: u32 = !0;
/// `states` for TCP_ESTABLISHED only.
pub const ESTABLISHED: u32 = 1 << 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Udp,
    Tcp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
        }
    }

    fn number(self) -> u8 {
        match self {
            Proto::Udp => libc::IPPROTO_UDP as u8,
            Proto::Tcp => libc::IPPROTO_TCP as u8,
        }
    }
}

/// What the kernel says about the socket found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// The socket's cookie (`SO_COOKIE`, `bpf_get_socket_cookie`).
    pub cookie: u64,
    /// The socket's inode (`socket:[inode]` in `/proc/<pid>/fd`); 0 when it has no file.
    pub inode: u64,
}

/// One NETLINK_SOCK_DIAG socket; requests are answered in order (keep one per task, or open
/// one per lookup).
pub struct SockDiag {
    fd: OwnedFd,
    seq: u32,
}

impl SockDiag {
    /// `timeout` bounds each answer's wait: a lost answer must not stall the caller.
    pub fn open(timeout: Duration) -> io::Result<SockDiag> {
        let fd = unsafe {
            libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                size_of::<libc::timeval>() as u32,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(SockDiag { fd, seq: 0 })
    }

    /// The `proto` socket whose own end is `own` and whose other end is `remote` (for TCP
    /// in one of `states`, a bit per TCP state). IPv4 ends (or IPv4-mapped IPv6 ones) are
    /// looked up as IPv4 first, then as IPv4-mapped on an IPv6 socket (a dual-stack socket
    /// talking to an IPv4 address); IPv6 ends as IPv6. Ok(None): no such socket.
    pub fn find(
        &mut self,
        proto: Proto,
        states: u32,
        own: SocketAddr,
        remote: SocketAddr,
    ) -> io::Result<Option<Found>> {
        let v4 = |a: SocketAddr| match a.ip() {
            IpAddr::V4(v) => Some(v),
            IpAddr::V6(v) => v.to_ipv4_mapped(),
        };
        match (v4(own), v4(remote)) {
            (Some(o), Some(r)) => {
                let o4 = SocketAddr::new(o.into(), own.port());
                let r4 = SocketAddr::new(r.into(), remote.port());
                if let Some(f) = self.lookup(proto, states, libc::AF_INET as u8, o4, r4)? {
                    return Ok(Some(f));
                }
                let mapped = |a: SocketAddr| match a.ip() {
                    IpAddr::V4(v) => SocketAddr::new(v.to_ipv6_mapped().into(), a.port()),
                    IpAddr::V6(_) => a,
                };
                self.lookup(proto, states, libc::AF_INET6 as u8, mapped(o4), mapped(r4))
            }
            _ => self.lookup(proto, states, libc::AF_INET6 as u8, own, remote),
        }
    }

    fn lookup(
        &mut self,
        proto: Proto,
        states: u32,
        family: u8,
        own: SocketAddr,
        remote: SocketAddr,
    ) -> io::Result<Option<Found>> {
        self.seq = self.seq.wrapping_add(1);
        // The kernel's UDP lookup finds the socket that would receive a datagram from src to
        // dst (net/ipv4/udp_diag.c, "swapped for historical reasons"): src is the remote end
        // there; TCP's takes src as the socket's own end.
        let (src, dst) = match proto {
            Proto::Tcp => (own, remote),
            Proto::Udp => (remote, own),
        };
        let id = sockid(family, src, dst);
        let mut req = [0u8; REQ_LEN];
        req[0..4].copy_from_slice(&(REQ_LEN as u32).to_ne_bytes());
        req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        req[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        req[8..12].copy_from_slice(&self.seq.to_ne_bytes());
        req[16] = family;
        req[17] = proto.number();
        req[20..24].copy_from_slice(&states.to_ne_bytes());
        req[24..72].copy_from_slice(&id);
        let fd = self.fd.as_raw_fd();
        let n = unsafe { libc::send(fd, req.as_ptr() as *const libc::c_void, REQ_LEN, 0) };
        if n != REQ_LEN as isize {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 1024];
        // Answers to earlier requests that timed out may still be queued: skip them.
        for _ in 0..4 {
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let msg = &buf[..n as usize];
            if msg.len() < NLMSG_HDRLEN + 4 {
                return Err(io::Error::other(format!("short sock_diag answer ({n} bytes)")));
            }
            let kind = u16::from_ne_bytes([msg[4], msg[5]]);
            if u32::from_ne_bytes([msg[8], msg[9], msg[10], msg[11]]) != self.seq {
                continue;
            }
            if kind == NLMSG_ERROR {
                let errno = i32::from_ne_bytes([msg[16], msg[17], msg[18], msg[19]]);
                return match -errno {
                    libc::ENOENT => Ok(None),
                    e => Err(io::Error::from_raw_os_error(e)),
                };
            }
            if kind != SOCK_DIAG_BY_FAMILY || msg.len() < MSG_LEN {
                return Err(io::Error::other(format!(
                    "unexpected sock_diag answer (type {kind}, {n} bytes)"
                )));
            }
            // The answer's sockid is the socket's own view: (own, remote), in the found
            // socket's family (an IPv4 lookup finds a dual-stack IPv6 socket too). It must be
            // the socket asked for: TCP by the whole 4-tuple; UDP by its own port (an
            // unconnected socket bound to the wildcard address shows no remote end).
            let got = &msg[20..68];
            let want = sockid(msg[16], own, remote);
            let same = match proto {
                Proto::Tcp => got[..36] == want[..36],
                Proto::Udp => got[..2] == want[..2],
            };
            if !same {
                return Err(io::Error::other("sock_diag answered about another socket"));
            }
            let c = &got[40..48];
            let lo = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) as u64;
            let hi = u32::from_ne_bytes([c[4], c[5], c[6], c[7]]) as u64;
            let inode = u32::from_ne_bytes([msg[84], msg[85], msg[86], msg[87]]) as u64;
            return Ok(Some(Found { cookie: hi << 32 | lo, inode }));
        }
        Err(io::Error::other("no sock_diag answer to this request"))
    }
}

/// `struct inet_diag_sockid` (sport, dport big endian, src[16], dst[16], if, cookie[2]) in
/// `family`'s form: an IPv4 address in the first 4 bytes, or the IPv6 (or IPv4-mapped) one.
fn sockid(family: u8, src: SocketAddr, dst: SocketAddr) -> [u8; 48] {
    let mut id = [0u8; 48];
    id[0..2].copy_from_slice(&src.port().to_be_bytes());
    id[2..4].copy_from_slice(&dst.port().to_be_bytes());
    let put = |buf: &mut [u8], ip: IpAddr| match (family == libc::AF_INET as u8, ip) {
        (true, IpAddr::V4(v4)) => buf[..4].copy_from_slice(&v4.octets()),
        (true, IpAddr::V6(v6)) => {
            buf[..4].copy_from_slice(&v6.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED).octets())
        }
        (false, IpAddr::V4(v4)) => buf.copy_from_slice(&v4.to_ipv6_mapped().octets()),
        (false, IpAddr::V6(v6)) => buf.copy_from_slice(&v6.octets()),
    };
    put(&mut id[4..20], src.ip());
    put(&mut id[20..36], dst.ip());
    id[40..44].copy_from_slice(&INET_DIAG_NOCOOKIE.to_ne_bytes());
    id[44..48].copy_from_slice(&INET_DIAG_NOCOOKIE.to_ne_bytes());
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::os::fd::AsFd;

    /// The socket's cookie as the kernel gives it to its owner (SO_COOKIE).
    fn cookie(s: &impl AsFd) -> u64 {
        let mut c = 0u64;
        let mut len = size_of::<u64>() as libc::socklen_t;
        let r = unsafe {
            libc::getsockopt(
                s.as_fd().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                &mut c as *mut u64 as *mut libc::c_void,
                &mut len,
            )
        };
        assert_eq!(r, 0, "SO_COOKIE: {}", io::Error::last_os_error());
        c
    }

    fn diag() -> SockDiag {
        SockDiag::open(Duration::from_millis(500)).unwrap()
    }

    /// TCP over IPv4 and IPv6: the client end is found by its 4-tuple (cookie and inode
    /// agree with the kernel's own answers), the server end too, a missing one is None.
    #[test]
    fn finds_tcp_sockets() {
        for host in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(l) = TcpListener::bind(host) else { continue };
            let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (s, peer) = l.accept().unwrap();
            let server = l.local_addr().unwrap();
            let mut d = diag();
            let f = d.find(Proto::Tcp, ESTABLISHED, peer, server).unwrap().expect("client end");
            assert_eq!(f.cookie, cookie(&c), "{host}");
            assert!(f.inode != 0);
            let back = d.find(Proto::Tcp, ANY_STATE, server, peer).unwrap().expect("server end");
            assert_eq!(back.cookie, cookie(&s));
            let gone = SocketAddr::new(server.ip(), 1);
            assert_eq!(d.find(Proto::Tcp, ANY_STATE, gone, server).unwrap(), None);
        }
        // A dual-stack IPv6 client of an IPv4 listener (::ffff:127.0.0.1): the server sees
        // IPv4 ends, the kernel finds the IPv6 socket.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let Ok(c) = TcpStream::connect(("::ffff:127.0.0.1", port)) else { return };
        let (_s, peer) = l.accept().unwrap();
        let f = diag().find(Proto::Tcp, ESTABLISHED, peer, l.local_addr().unwrap()).unwrap();
        assert_eq!(f.map(|f| f.cookie), Some(cookie(&c)));
    }

    /// UDP: an unconnected socket on the wildcard address that sent to a loopback server is
    /// found from the server's side (the datagram's source), over IPv4, IPv6, and a
    /// dual-stack socket sending to an IPv4 address (the IPv4-mapped retry).
    #[test]
    fn finds_udp_senders() {
        let mut d = diag();
        let cases: [(&str, &str); 3] =
            [("127.0.0.1:0", "0.0.0.0:0"), ("[::1]:0", "[::]:0"), ("127.0.0.1:0", "[::]:0")];
        for (server, client) in cases {
            let (Ok(srv), Ok(cli)) = (UdpSocket::bind(server), UdpSocket::bind(client)) else {
                continue;
            };
            let to = srv.local_addr().unwrap();
            let to = match (to.ip(), client.starts_with('[')) {
                (IpAddr::V4(v4), true) => SocketAddr::new(v4.to_ipv6_mapped().into(), to.port()),
                _ => to,
            };
            cli.send_to(b"q", to).unwrap();
            let mut buf = [0u8; 4];
            srv.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let (_, from) = srv.recv_from(&mut buf).unwrap();
            let f = d
                .find(Proto::Udp, ANY_STATE, from, srv.local_addr().unwrap())
                .unwrap()
                .unwrap_or_else(|| panic!("{client} -> {server} not found"));
            assert_eq!(f.cookie, cookie(&cli), "{client} -> {server}");
        }
    }
}
