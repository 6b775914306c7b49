//! Which socket sent a query to the stub: the kernel's answer through sock_diag
//! (NETLINK_SOCK_DIAG, an exact lookup by 4-tuple), read as the socket's cookie. The
//! connect/sendmsg hooks recorded the asking process under that cookie (DNS_STEER) when they
//! steered it, so attribution rests on what the kernel saw, never on the packet's content
//! and never on a pid a client could claim. A socket that sent to the stub without being
//! steered has no entry and is refused.
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDRLEN: usize = 16;
/// Every TCP state: the asking socket is established (or closing) by the time we look.
const ALL_STATES: u32 = !0;
const INET_DIAG_NOCOOKIE: u32 = !0;

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
}

/// A NETLINK_SOCK_DIAG socket, one per stub task (requests are answered in order).
pub struct Diag {
    fd: OwnedFd,
    seq: u32,
}

impl Diag {
    pub fn open() -> io::Result<Diag> {
        let fd = unsafe {
            libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // A lost answer must not stall the stub: bounded wait.
        let tv = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                size_of::<libc::timeval>() as u32,
            )
        };
        Ok(Diag { fd, seq: 0 })
    }

    /// The cookie of the socket whose own address is `peer` and whose remote end is
    /// `local` (the stub's address), as the kernel knows it. Tried as IPv4, then as the
    /// IPv4-mapped IPv6 form (a dual-stack socket steered to `::ffff:127.0.0.1`).
    pub fn cookie_of(&mut self, proto: Proto, peer: SocketAddr, local: SocketAddr) -> Option<u64> {
        let v4 = |a: IpAddr| match a {
            IpAddr::V4(v) => Some(v),
            IpAddr::V6(v) => v.to_ipv4_mapped(),
        };
        let (own, remote) = ((v4(peer.ip())?, peer.port()), (v4(local.ip())?, local.port()));
        // The kernel's UDP lookup reads the request's src/dst the other way round ("swapped
        // for historical reasons", net/ipv4/udp_diag.c): src is the remote end there.
        let (src, dst) = match proto {
            Proto::Tcp => (own, remote),
            Proto::Udp => (remote, own),
        };
        self.lookup(proto, libc::AF_INET as u8, src, dst)
            .or_else(|| self.lookup(proto, libc::AF_INET6 as u8, src, dst))
    }

    fn lookup(
        &mut self,
        proto: Proto,
        family: u8,
        src: (Ipv4Addr, u16),
        dst: (Ipv4Addr, u16),
    ) -> Option<u64> {
        self.seq = self.seq.wrapping_add(1);
        let mut req = [0u8; NLMSG_HDRLEN + 56];
        let len = req.len() as u32;
        req[0..4].copy_from_slice(&len.to_ne_bytes());
        req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        req[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        req[8..12].copy_from_slice(&self.seq.to_ne_bytes());
        let r = &mut req[NLMSG_HDRLEN..];
        r[0] = family;
        r[1] = match proto {
            Proto::Udp => libc::IPPROTO_UDP as u8,
            Proto::Tcp => libc::IPPROTO_TCP as u8,
        };
        r[4..8].copy_from_slice(&ALL_STATES.to_ne_bytes());
        // inet_diag_sockid: sport, dport (big endian), src[4], dst[4], if, cookie[2].
        let id = &mut r[8..];
        id[0..2].copy_from_slice(&src.1.to_be_bytes());
        id[2..4].copy_from_slice(&dst.1.to_be_bytes());
        let put = |buf: &mut [u8], ip: Ipv4Addr| {
            if family == libc::AF_INET as u8 {
                buf[0..4].copy_from_slice(&ip.octets());
            } else {
                buf.copy_from_slice(&ip.to_ipv6_mapped().octets());
            }
        };
        put(&mut id[4..20], src.0);
        put(&mut id[20..36], dst.0);
        id[40..44].copy_from_slice(&INET_DIAG_NOCOOKIE.to_ne_bytes());
        id[44..48].copy_from_slice(&INET_DIAG_NOCOOKIE.to_ne_bytes());
        let sent = unsafe {
            libc::send(self.fd.as_raw_fd(), req.as_ptr() as *const libc::c_void, req.len(), 0)
        };
        if sent < 0 {
            return None;
        }
        let mut buf = [0u8; 1024];
        // Answers to earlier requests that timed out may still be queued: skip them.
        for _ in 0..4 {
            let n = unsafe {
                libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0)
            };
            if n < NLMSG_HDRLEN as isize {
                return None;
            }
            let msg = &buf[..n as usize];
            let kind = u16::from_ne_bytes([msg[4], msg[5]]);
            let seq = u32::from_ne_bytes([msg[8], msg[9], msg[10], msg[11]]);
            if seq != self.seq {
                continue;
            }
            if kind == NLMSG_ERROR {
                return None;
            }
            // inet_diag_msg: family, state, timer, retrans, then the sockid (cookie at 40).
            let body = msg.get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4 + 48)?;
            let c = &body[4 + 40..4 + 48];
            let lo = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) as u64;
            let hi = u32::from_ne_bytes([c[4], c[5], c[6], c[7]]) as u64;
            return Some(hi << 32 | lo);
        }
        None
    }
}
