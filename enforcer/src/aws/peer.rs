//! Who is at the other end of a loopback TCP connection: the kernel's socket table of the
//! daemon's network namespace, the only one that can reach its loopback listener (sock_diag,
//! else `/proc/net/tcp`, `/proc/net/tcp6`), names the client socket's inode, and the processes
//! holding that inode as an open file are its owners. The endpoint looks among the grant's
//! holders first (`owners_among`: their fds only, so the answer costs the subtree, not the
//! host); only a refusal walks every process, to name who asked.
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use crate::netlink::sock_diag::{self, Proto, SockDiag};

/// Bounds the /proc walk: processes looked at, fds per process.
const MAX_PROCS: usize = 65_536;
const MAX_FDS: usize = 65_536;

/// The inode of the client socket whose local address is `client` and whose peer is
/// `server` (ESTABLISHED). None when no such socket exists. Asks sock_diag for exactly that
/// socket (a hash lookup, `crate::netlink::sock_diag`); `/proc/net/tcp` (which walks the whole
/// TCP hash table, milliseconds on a large host) only if sock_diag is unavailable.
pub fn client_inode(server: SocketAddr, client: SocketAddr) -> io::Result<Option<u64>> {
    match diag_inode(server, client) {
        Ok(found) => Ok(found),
        Err(e) => {
            tracing::debug!("sock_diag lookup failed ({e}); reading /proc/net/tcp");
            let file = if client.is_ipv4() { "/proc/net/tcp" } else { "/proc/net/tcp6" };
            let text = std::fs::read_to_string(file)?;
            Ok(find_inode(&text, server, client))
        }
    }
}

/// One sock_diag exact lookup of the client end of the connection.
fn diag_inode(server: SocketAddr, client: SocketAddr) -> io::Result<Option<u64>> {
    let mut diag = SockDiag::open(Duration::from_secs(1))?;
    let found = diag.find(Proto::Tcp, sock_diag::ESTABLISHED, client, server)?;
    Ok(found.map(|f| f.inode).filter(|i| *i != 0))
}

fn find_inode(table: &str, server: SocketAddr, client: SocketAddr) -> Option<u64> {
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        let (Some(local), Some(remote)) = (parse_addr(f[1]), parse_addr(f[2])) else { continue };
        // 01 = TCP_ESTABLISHED.
        if local == client && remote == server && f[3] == "01" {
            return f[9].parse().ok().filter(|i| *i != 0);
        }
    }
    None
}

/// `0100007F:1F90` (IPv4) or 32 hex digits + port (IPv6), as the kernel prints them: each
/// 32-bit word of the network-order address printed as a host-order integer.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            let v6 = Ipv6Addr::from(b);
            v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Whether process `pid` has `socket:[inode]` among its open files.
pub fn holds_inode(pid: u32, inode: u64) -> bool {
    let want = format!("socket:[{inode}]");
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.flatten()
        .take(MAX_FDS)
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str()))
}

/// The processes among `pids` holding the socket.
pub fn owners_among(inode: u64, pids: &[u32]) -> Vec<u32> {
    pids.iter().copied().filter(|p| holds_inode(*p, inode)).collect()
}

/// Every process with `socket:[inode]` among its open files (tgids, ascending).
pub fn owners_of_inode(inode: u64) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut out: Vec<u32> = procs
        .flatten()
        .take(MAX_PROCS)
        .filter_map(|p| p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|pid| holds_inode(*pid, inode))
        .collect();
    out.sort_unstable();
    out
}

/// The processes at the client end of a connection to our `server` address from `client`.
pub fn owners(server: SocketAddr, client: SocketAddr) -> io::Result<Vec<u32>> {
    Ok(match client_inode(server, client)? {
        Some(inode) => owners_of_inode(inode),
        None => Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1388 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1 0 100 0 0 10 0\n\
   1: 0100007F:C350 0100007F:1388 01 00000000:00000000 00:00000000 00000000  1000        0 2222 1 0 20 4 30 10 -1\n";
        let server: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let client: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        assert_eq!(find_inode(table, server, client), Some(2222));
        assert_eq!(find_inode(table, client, server), None);
        let v6 = parse_addr("00000000000000000000000001000000:1F90").unwrap();
        assert_eq!(v6, "[::1]:8080".parse().unwrap());
    }

    /// A real connection on loopback: its client end is found (sock_diag and the /proc
    /// table agree), and owned by this process.
    #[test]
    fn finds_a_real_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_s, peer) = l.accept().unwrap();
        let server = l.local_addr().unwrap();
        let diag = diag_inode(server, peer).unwrap().expect("sock_diag finds it");
        let table = find_inode(&std::fs::read_to_string("/proc/net/tcp").unwrap(), server, peer);
        assert_eq!(Some(diag), table);
        assert!(diag_inode(peer, server).unwrap().is_some(), "the server end exists too");
        let gone: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(diag_inode(server, gone).unwrap(), None);
        let owners = owners(server, peer).unwrap();
        assert_eq!(owners, vec![std::process::id()]);
        drop(c);
    }
}
