//! Decoding ring-buffer bytes into typed records. The kernel is trusted to write the
//! layout, but sizes and string lengths are still checked: a short or odd record is
//! reported as `Malformed`, never a panic.
//!
//! Depends on nothing but `enforcer_common`'s layouts, so `proc` (and the fuzz target) can use
//! records without depending on the kernel loader.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use enforcer_common::{
    ConnectRecord, ExecRecord, ExitRecord, FileOpenRecord, ForkRecord, IpcRecord, SocketRecord,
    UNIX_PATH_LEN, ipc_op, kind,
};

#[derive(Debug, Clone)]
pub enum Record {
    Fork {
        parent: u32,
        child: u32,
        uid: u32,
        cgroup_id: u64,
        boot_ns: u64,
        grants: Vec<u32>,
    },
    Exec {
        tgid: u32,
        uid: u32,
        cgroup_id: u64,
        filename: String,
        argv: Vec<String>,
        argv_truncated: bool,
    },
    Exit {
        tgid: u32,
        grants: Vec<u32>,
    },
    Connect(Connect),
    /// A socket() the kernel judged a violation (always on the ALERTS ring).
    Socket(SocketUse),
    /// A secret open judged by the BPF-LSM program (violations on the ALERTS ring).
    FileOpen(KernelOpen),
    /// A tainted process named a Unix socket (connect/sendto): an alert (ALERTS ring).
    Ipc(IpcUse),
    Malformed {
        len: usize,
        kind: u32,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Connect {
    pub tgid: u32,
    pub uid: u32,
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub sendmsg: bool,
    /// Data on an established socket, judged by the egress hook (`judge_send`); `tgid` is
    /// the writer, or the socket's owner when the packet left from softirq or the kernel
    /// lets cgroup_skb see no current task; uid and cgroup are 0 (the daemon resolves them).
    pub send: bool,
    /// `enforcer_common::action` the kernel applied.
    pub action: u8,
    /// The kernel's verdict (`enforcer_common::verdict`), and the grant slot it used.
    pub verdict: u8,
    pub grant_slot: u32,
    /// `enforcer_common::reason`, the tainting secret index + 1, and whether the kernel
    /// revoked the grant on this violation.
    pub reason: u8,
    pub taint_secret: u8,
    pub revoked_now: u8,
    pub cgroup_id: u64,
    pub boot_ns: u64,
    /// The process's kernel entry the verdict was judged on (grants, taint, flags).
    pub subject: enforcer_common::ProcGrants,
}

/// A judged socket creation (`cgroup/sock_create`): a family, type or protocol no connect
/// hook judges, created (monitor) or refused with EPERM (enforce).
#[derive(Debug, Clone, PartialEq)]
pub struct SocketUse {
    pub tgid: u32,
    pub uid: u32,
    pub family: u32,
    pub sock_type: u32,
    pub protocol: u32,
    /// `enforcer_common::action` the kernel applied (DENY or ALERT).
    pub action: u8,
    /// `enforcer_common::verdict` (OUT_OF_INTENT).
    pub verdict: u8,
    /// `enforcer_common::reason`: agent, grant holder or tainted.
    pub reason: u8,
    pub cgroup_id: u64,
    pub boot_ns: u64,
    pub subject: enforcer_common::ProcGrants,
}

/// A process holding secrets named an AF_UNIX socket in connect() or sendto().
#[derive(Debug, Clone, PartialEq)]
pub struct IpcUse {
    pub tgid: u32,
    pub tid: u32,
    pub uid: u32,
    pub cgroup_id: u64,
    pub boot_ns: u64,
    /// Secrets (bits) held: own, grants' subtrees, agent tree.
    pub taint: u64,
    /// "connect" or "sendto".
    pub op: &'static str,
    /// The socket's name as `ss` and /proc/net/unix show it: a path, or "@name" for an
    /// abstract socket (NUL bytes inside an abstract name read "@"); empty when unreadable.
    pub path: String,
    pub subject: enforcer_common::ProcGrants,
}

/// The name of a Unix socket from the `sun_path` bytes the caller gave.
pub fn unix_name(raw: &[u8]) -> String {
    match raw.split_first() {
        None => String::new(),
        Some((0, rest)) => {
            let name: Vec<u8> = rest.iter().map(|b| if *b == 0 { b'@' } else { *b }).collect();
            format!("@{}", String::from_utf8_lossy(&name))
        }
        Some(_) => {
            let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
            String::from_utf8_lossy(&raw[..end]).into_owned()
        }
    }
}

/// A secret open the kernel judged (BPF-LSM backend): the decision was already applied
/// (EPERM, taint, revoke, SIGKILL) before the open returned.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelOpen {
    pub tgid: u32,
    pub uid: u32,
    /// The secret's index.
    pub secret: u32,
    pub grant_slot: u32,
    /// `enforcer_common::verdict` and `action` as the kernel decided them.
    pub verdict: u8,
    pub action: u8,
    pub revoked_now: bool,
    /// Found by (directory, name): a new inode at a watched path.
    pub by_name: bool,
    /// (s_dev in the kernel's encoding, i_ino) of the file and of its directory.
    pub inode: (u64, u64),
    pub dir: (u64, u64),
    /// The name the file was opened by (last path component).
    pub name: String,
    pub cgroup_id: u64,
    pub boot_ns: u64,
    pub subject: enforcer_common::ProcGrants,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    Other(u8),
}

impl Protocol {
    pub fn name(self) -> String {
        match self {
            Protocol::Tcp => "tcp".into(),
            Protocol::Udp => "udp".into(),
            Protocol::Other(n) => format!("ip-proto-{n}"),
        }
    }
}

fn read<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // Unaligned read: ring-buffer items are 8-byte aligned, but do not depend on it.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const T) })
}

pub fn decode(bytes: &[u8]) -> Record {
    let k = read::<u32>(bytes).unwrap_or(0);
    let malformed = Record::Malformed { len: bytes.len(), kind: k };
    match k {
        kind::FORK => match read::<ForkRecord>(bytes) {
            Some(r) => Record::Fork {
                parent: r.parent_tgid,
                child: r.child_tgid,
                uid: r.uid,
                cgroup_id: r.cgroup_id,
                boot_ns: r.boot_ns,
                grants: slots(&r.grants),
            },
            None => malformed,
        },
        kind::EXEC => match read::<ExecRecord>(bytes) {
            Some(r) => {
                let flen = (r.filename_len as usize).min(r.filename.len());
                let filename = c_string(&r.filename[..flen]);
                let alen = (r.args_len as usize).min(r.args.len());
                let argv = r.args[..alen]
                    .split(|b| *b == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect();
                Record::Exec {
                    tgid: r.tgid,
                    uid: r.uid,
                    cgroup_id: r.cgroup_id,
                    filename,
                    argv,
                    argv_truncated: r.args_truncated != 0,
                }
            }
            None => malformed,
        },
        kind::EXIT => match read::<ExitRecord>(bytes) {
            Some(r) => Record::Exit { tgid: r.tgid, grants: slots(&r.grants) },
            None => malformed,
        },
        kind::CONNECT => match read::<ConnectRecord>(bytes) {
            Some(r) => match connect(&r) {
                Some(c) => Record::Connect(c),
                None => malformed,
            },
            None => malformed,
        },
        kind::SOCKET => match read::<SocketRecord>(bytes) {
            Some(r) => Record::Socket(SocketUse {
                tgid: r.tgid,
                uid: r.uid,
                family: r.family,
                sock_type: r.sock_type,
                protocol: r.protocol,
                action: r.action,
                verdict: r.verdict,
                reason: r.reason,
                cgroup_id: r.cgroup_id,
                boot_ns: r.boot_ns,
                subject: r.subject,
            }),
            None => malformed,
        },
        kind::FILE_OPEN => match read::<FileOpenRecord>(bytes) {
            Some(r) => Record::FileOpen(KernelOpen {
                tgid: r.tgid,
                uid: r.uid,
                secret: r.secret,
                grant_slot: r.grant_slot,
                verdict: r.verdict,
                action: r.action,
                revoked_now: r.revoked_now == 1,
                by_name: r.flags & enforcer_common::open_flags::BY_NAME != 0,
                inode: (r.inode.dev, r.inode.ino),
                dir: (r.dir.dev, r.dir.ino),
                name: c_string(&r.name),
                cgroup_id: r.cgroup_id,
                boot_ns: r.boot_ns,
                subject: r.subject,
            }),
            None => malformed,
        },
        kind::IPC => match read::<IpcRecord>(bytes) {
            Some(r) => Record::Ipc(IpcUse {
                tgid: r.tgid,
                tid: r.tid,
                uid: r.uid,
                cgroup_id: r.cgroup_id,
                boot_ns: r.boot_ns,
                taint: r.taint,
                op: if r.op == ipc_op::SENDTO { "sendto" } else { "connect" },
                path: unix_name(&r.path[..(r.path_len as usize).min(UNIX_PATH_LEN)]),
                subject: r.subject,
            }),
            None => malformed,
        },
        _ => malformed,
    }
}

fn slots(g: &[u32]) -> Vec<u32> {
    g.iter().copied().filter(|s| *s != 0).collect()
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn connect(r: &ConnectRecord) -> Option<Connect> {
    let ip = match r.family {
        2 => IpAddr::V4(Ipv4Addr::new(r.addr[0], r.addr[1], r.addr[2], r.addr[3])),
        // IPv4-mapped IPv6 counts as its IPv4 address everywhere.
        10 => {
            let v6 = Ipv6Addr::from(r.addr);
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
        _ => return None,
    };
    let protocol = match r.protocol {
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        n => Protocol::Other(n),
    };
    Some(Connect {
        tgid: r.tgid,
        uid: r.uid,
        ip,
        port: r.port,
        protocol,
        sendmsg: r.op == enforcer_common::op::SENDMSG,
        send: r.op == enforcer_common::op::SEND,
        action: r.action,
        verdict: r.verdict,
        grant_slot: r.grant_slot,
        reason: r.reason,
        taint_secret: r.taint_secret,
        revoked_now: r.revoked_now,
        cgroup_id: r.cgroup_id,
        boot_ns: r.boot_ns,
        subject: r.subject,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes<T>(v: &T) -> Vec<u8> {
        unsafe { std::slice::from_raw_parts(v as *const T as *const u8, size_of::<T>()) }.to_vec()
    }

    #[test]
    fn mapped_ipv6_becomes_ipv4() {
        let mut r = ConnectRecord {
            kind: kind::CONNECT,
            tgid: 7,
            family: 10,
            port: 443,
            protocol: 6,
            op: 1,
            ..Default::default()
        };
        r.addr = Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped().octets();
        let Record::Connect(c) = decode(&bytes(&r)) else { panic!() };
        assert_eq!(c.ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(c.protocol, Protocol::Tcp);
        assert!(!c.sendmsg);
    }

    #[test]
    fn ipv6_stays_ipv6() {
        let mut r = ConnectRecord {
            kind: kind::CONNECT,
            family: 10,
            port: 53,
            protocol: 17,
            op: 2,
            ..Default::default()
        };
        r.addr = Ipv6Addr::LOCALHOST.octets();
        let Record::Connect(c) = decode(&bytes(&r)) else { panic!() };
        assert_eq!(c.ip, IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert!(c.sendmsg);
    }

    #[test]
    fn short_and_unknown_records_are_malformed() {
        assert!(matches!(decode(&[1, 0]), Record::Malformed { .. }));
        assert_eq!(unix_name(b"/run/a.sock\0\0"), "/run/a.sock");
        assert_eq!(unix_name(b"\0abs\0x"), "@abs@x");
        assert_eq!(unix_name(b""), "");
        let mut r =
            IpcRecord { kind: kind::IPC, tgid: 7, op: ipc_op::CONNECT, ..Default::default() };
        r.path[..4].copy_from_slice(b"/s\0\0");
        r.path_len = 4;
        let Record::Ipc(i) = decode(&bytes(&r)) else { panic!() };
        assert_eq!((i.tgid, i.op, i.path.as_str()), (7, "connect", "/s"));
        assert!(matches!(decode(&[99, 0, 0, 0, 0, 0, 0, 0]), Record::Malformed { kind: 99, .. }));
        let r = ConnectRecord { kind: kind::CONNECT, family: 99, ..Default::default() };
        assert!(matches!(decode(&bytes(&r)), Record::Malformed { .. }));
    }

    #[test]
    fn socket_record_decodes() {
        let r = SocketRecord {
            kind: kind::SOCKET,
            tgid: 9,
            family: 2,
            sock_type: 2,
            protocol: 1,
            action: enforcer_common::action::DENY,
            verdict: enforcer_common::verdict::OUT_OF_INTENT,
            reason: enforcer_common::reason::AGENT,
            ..Default::default()
        };
        let Record::Socket(s) = decode(&bytes(&r)) else { panic!() };
        assert_eq!((s.tgid, s.family, s.sock_type, s.protocol), (9, 2, 2, 1));
        assert_eq!(s.reason, enforcer_common::reason::AGENT);
        let b = bytes(&r);
        assert!(matches!(decode(&b[..b.len() - 1]), Record::Malformed { kind: 5, .. }));
    }

    #[test]
    fn exec_lengths_are_clamped() {
        let mut r: ExecRecord = unsafe { std::mem::zeroed() };
        r.kind = kind::EXEC;
        r.filename_len = 10_000;
        r.args_len = 10_000;
        r.filename[..8].copy_from_slice(b"/bin/ls\0");
        r.args[..9].copy_from_slice(b"ls\0-l\0/x\0");
        let Record::Exec { filename, argv, .. } = decode(&bytes(&r)) else { panic!() };
        assert_eq!(filename, "/bin/ls");
        assert_eq!(argv, vec!["ls", "-l", "/x"]);
    }
}
