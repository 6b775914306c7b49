//! Who is at the other end of a loopback TCP connection: the kernel's socket table
//! (`/proc/net/tcp`, `/proc/net/tcp6` of the daemon's network namespace, the only one that
//! can reach its loopback listener) names the client socket's inode, and the processes
//! holding that inode as an open file are its owners. Every owner must hold the grant: a
//! socket passed to a granted process by one outside the grant is refused.
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Bounds the /proc walk: processes looked at, fds per process.
const MAX_PROCS: usize = 65_536;
const MAX_FDS: usize = 65_536;

/// The inode of the client socket whose local address is `client` and whose peer is
/// `server` (ESTABLISHED). None when no such socket is in the table.
pub fn client_inode(server: SocketAddr, client: SocketAddr) -> io::Result<Option<u64>> {
    let file = if client.is_ipv4() { "/proc/net/tcp" } else { "/proc/net/tcp6" };
    let text = std::fs::read_to_string(file)?;
    Ok(find_inode(&text, server, client))
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

/// Every process with `socket:[inode]` among its open files (tgids, ascending).
pub fn owners_of_inode(inode: u64) -> Vec<u32> {
    let want = format!("socket:[{inode}]");
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return out };
    for p in procs.flatten().take(MAX_PROCS) {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for fd in fds.flatten().take(MAX_FDS) {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str()) {
                out.push(pid);
                break;
            }
        }
    }
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

    /// A real connection on loopback: its client end is found, and owned by this process.
    #[test]
    fn finds_a_real_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_s, peer) = l.accept().unwrap();
        let owners = owners(l.local_addr().unwrap(), peer).unwrap();
        assert_eq!(owners, vec![std::process::id()]);
        drop(c);
    }
}
