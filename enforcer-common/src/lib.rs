//! Records shared by the kernel programs and the daemon.
//!
//! Every record is `repr(C)` with explicit padding fields so that no byte the kernel
//! copies into the ring buffer is uninitialised (the verifier rejects reads of
//! uninitialised stack, and userspace must never see stale kernel memory).
#![no_std]

pub mod judge;
pub mod open;

/// Ring-buffer record kinds; the first `u32` of every record.
pub mod kind {
    pub const FORK: u32 = 1;
    pub const EXEC: u32 = 2;
    pub const EXIT: u32 = 3;
    pub const CONNECT: u32 = 4;
    /// A judged socket() creation (`SocketRecord`), always on the ALERTS ring.
    pub const SOCKET: u32 = 5;
    /// A secret open judged by the BPF-LSM `file_open` program (`FileOpenRecord`).
    pub const FILE_OPEN: u32 = 6;
    /// A tainted process reaching a Unix socket by name (`IpcRecord`), on the ALERTS ring.
    pub const IPC: u32 = 7;
}

/// Maximum bytes of an exec'd filename kept by the kernel.
pub const FILENAME_LEN: usize = 256;
/// Maximum bytes of argv (NUL separated) kept by the kernel; longer ones are truncated.
pub const ARGS_LEN: usize = 2048;

/// Grants one process can hold at once (each a slot in `GRANTS`).
pub const MAX_PROC_GRANTS: usize = 4;

/// A new process (not a thread) was created: written in the parent, before the child runs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ForkRecord {
    pub kind: u32,
    pub parent_tgid: u32,
    pub child_tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub _pad: u32,
    pub cgroup_id: u64,
    pub boot_ns: u64,
    /// Grant slots the child inherited from the parent (0 = empty).
    pub grants: [u32; MAX_PROC_GRANTS],
}

/// PROC_GRANTS value: the grants a process (tgid) holds. Written by the daemon when it
/// binds a grant, copied to children by the fork hook, removed by the exit hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcGrants {
    pub grants: [u32; MAX_PROC_GRANTS],
    /// Boot-clock ns of the process start, for the daemon's PID-reuse checks.
    pub start_ns: u64,
    /// Secrets (bit = secret index) this process or an ancestor before the fork opened:
    /// its connections may go only where every one of them is valid.
    pub taint: u64,
    /// `proc_flags::*`.
    pub flags: u32,
    /// The `[[agent]]` process tree this process belongs to: the tgid of the process the
    /// exec hook marked first (0: none), inherited at fork; key of AGENT_TAINT.
    pub tree: u32,
}

/// `ProcGrants.flags`.
pub mod proc_flags {
    /// Selected by an `[[agent]]` selector (or descended from such a process): connections
    /// outside its grants are violations even when it holds none.
    pub const AGENT: u32 = 1;
}

/// Most secrets a policy may define (one taint bit each).
pub const MAX_SECRETS: usize = 64;

/// Index in the GRANT_DESTS trie's slot space where secrets' own destinations live:
/// secret i is stored under slot `SECRET_SLOT_BASE + i`.
pub const SECRET_SLOT_BASE: u32 = 0xF000_0000;

/// Where the send judge (`judge::judge_send`) finds secret i's own destinations, under slot
/// `SECRET_SEND_SLOT_BASE + i` of the GRANT_DESTS trie: its networks, and each address the
/// DNS stub learned for its names as a host entry (present as long as the LEARNED entry). One
/// trie lookup per tainting secret covers both, so the egress program judges names without a
/// second lookup in its loop over secrets (the verifier's budget).
pub const SECRET_SEND_SLOT_BASE: u32 = 0xF100_0000;

/// SECRETS value (array index = secret index).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SecretInfo {
    /// 1 when the secret lists destinations of its own.
    pub has_dests: u32,
    /// `action::*` for violations of this secret without a grant.
    pub action: u32,
}

/// Violation actions (GrantInfo.action, SecretInfo.action, ConnectRecord.action).
pub mod action {
    pub const ALLOWED: u8 = 0;
    pub const ALERT: u8 = 1;
    pub const DENY: u8 = 2;
    pub const KILL: u8 = 3;
}

/// CONFIG array indices.
pub mod config {
    /// 1 = enforce, 0 = monitor.
    pub const ENFORCE: u32 = 0;
    /// Action for `[[agent]]` processes connecting outside any grant.
    pub const AGENT_ACTION: u32 = 1;
    /// Set by the kernel (never cleared while the pins live) when a child's PROC_GRANTS
    /// entry could not be written: from then on a process without an entry is judged by
    /// its nearest ancestor's entry (`maps::proc_entry`), so no child of a grant holder,
    /// agent or tainted process runs unjudged.
    pub const STATE_LOST: u32 = 2;
    /// The daemon's DNS stub: its port on 127.0.0.1 in the low 16 bits (0: no stub, port 53
    /// is not steered), `dns_stub::*` flags above.
    pub const DNS_STUB_PORT: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// Flags in `CONFIG[DNS_STUB_PORT]` above the port.
pub mod dns_stub {
    /// The stub also serves on `[::1]` (same port): queries to IPv6 resolvers are steered
    /// there (queries to IPv4-mapped ones still go to `::ffff:127.0.0.1`).
    pub const V6: u32 = 1 << 16;
    /// A judged process's connect to systemd-resolved's varlink socket fails (EPERM), so
    /// glibc's nss-resolve reports UNAVAIL and the `dns` source asks port 53: the stub.
    pub const NSS_RESOLVE_FALLBACK: u32 = 1 << 17;
    /// The port in the CONFIG word.
    #[inline(always)]
    pub fn port(word: u32) -> u16 {
        word as u16
    }
}

/// AGENT_EXES key: the executable's inode, with the kernel's own device encoding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExeKey {
    pub dev: u64,
    pub ino: u64,
}

/// Grant states in `GrantInfo.state`.
pub mod grant_state {
    pub const ACTIVE: u32 = 1;
    pub const REVOKED: u32 = 2;
}

/// GRANTS value, keyed by slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GrantInfo {
    /// Deadline on the boot clock (bpf_ktime_get_boot_ns): a use at or after it is expired.
    pub expires_ns: u64,
    /// Secrets the grant covers (bit = secret index).
    pub secrets: u64,
    /// Hash of the grant id, so a restarted daemon can match adopted slots to its ledger.
    pub id_hash: u64,
    pub state: u32,
    /// `action::*` of the grant's intent on a violation.
    pub action: u32,
    /// `grant_flags::*`.
    pub flags: u32,
    pub _pad: u32,
}

pub mod grant_flags {
    /// End the grant at the first violation (the kernel flips it to revoked itself).
    pub const REVOKE_ON_VIOLATION: u32 = 1;
    /// The grant names no network (only names): the judge skips its GRANT_DESTS lookup.
    pub const NO_NETWORKS: u32 = 2;
    /// The grant names no host (only networks): the judge skips its LEARNED lookup.
    pub const NO_NAMES: u32 = 4;
}

/// GRANT_DESTS key: an LPM-trie key over (slot, IPv6 address); IPv4 is stored as
/// IPv4-mapped IPv6. `prefix_len` counts the 32 slot bits plus the address prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DestKey {
    /// Slot, big-endian so that it forms the leading prefix bits.
    pub slot_be: u32,
    pub addr: [u8; 16],
}

/// Port ranges allowed for one (slot, network) entry.
pub const MAX_PORT_RANGES: usize = 8;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRanges {
    /// Inclusive (lo, hi) pairs; an unused pair is (1, 0), which matches nothing.
    pub lo: [u16; MAX_PORT_RANGES],
    pub hi: [u16; MAX_PORT_RANGES],
}

/// LEARNED key: an address the DNS stub answered to a process holding grant `slot` (or
/// `SECRET_SLOT_BASE + i` for secret i's own destinations by name). IPv4 as IPv4-mapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LearnedKey {
    pub slot: u32,
    pub addr: [u8; 16],
}

/// LEARNED value: until when (boot clock) and on which ports the learned address is covered:
/// min(record TTL floored by `[dns] min_ttl`, grant expiry); the ports of the destinations
/// whose names the answer matched.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Learned {
    pub deadline_ns: u64,
    pub ports: PortRanges,
}

/// DNS_STEER value, keyed by the asking socket's cookie: where a process addressed its DNS
/// query before the connect/sendmsg hook steered it to the daemon's stub. The stub reads
/// it to attribute the query; the recvmsg hooks restore the resolver as the reply's source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsSteer {
    /// The resolver address the process asked (IPv6 form; IPv4 mapped).
    pub addr: [u8; 16],
    /// The resolver port (53), host order.
    pub port: u16,
    /// AF_INET or AF_INET6: the family of the asking socket.
    pub family: u16,
    pub tgid: u32,
    pub start_ns: u64,
}

/// Connect verdicts decided in the kernel (`ConnectRecord.verdict`), mirroring decide.rs.
pub mod verdict {
    /// The process holds no grant: nothing to judge.
    pub const NO_GRANT_HELD: u8 = 0;
    pub const ALLOWED: u8 = 1;
    pub const EXPIRED: u8 = 2;
    pub const REVOKED: u8 = 3;
    pub const OUT_OF_INTENT: u8 = 4;
    /// A secret opened by a process holding no grant (secret opens only, `open::judge_open`).
    pub const NO_GRANT: u8 = 5;
}

/// A process image was replaced (successful execve/execveat).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecRecord {
    pub kind: u32,
    pub tgid: u32,
    pub old_tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub args_len: u32,
    pub args_truncated: u32,
    pub filename_len: u32,
    pub cgroup_id: u64,
    pub boot_ns: u64,
    pub filename: [u8; FILENAME_LEN],
    pub args: [u8; ARGS_LEN],
}

/// The last thread of a process exited.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ExitRecord {
    pub kind: u32,
    pub tgid: u32,
    pub boot_ns: u64,
    /// Grant slots the process held when it exited.
    pub grants: [u32; MAX_PROC_GRANTS],
}

/// Operation that produced a connect record.
pub mod op {
    pub const CONNECT: u8 = 1;
    pub const SENDMSG: u8 = 2;
    /// Data on an established socket, judged by the egress hook (`judge::judge_send`).
    pub const SEND: u8 = 3;
}

/// SOCK_STORAGE value, in the socket's own storage: what the egress hook knows about a socket
/// that a judged process (grant holder, agent, tainted) created or wrote to. Freed with the
/// socket. Its layout is also described in BTF by `enforcer/src/kernel/sock_storage.rs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SockState {
    /// tgid of the first judged process that sent on it (usually its connect's SYN).
    pub owner: u32,
    /// `sock_flags::*`.
    pub flags: u32,
    /// The owner's PROC_GRANTS start_ns: a reused tgid is not the owner.
    pub owner_start_ns: u64,
    /// Secrets whose readers wrote to this socket: data already queued in it may carry them.
    pub taint: u64,
}

/// `SockState.flags`.
pub mod sock_flags {
    /// A send broke a secret's validity in enforce mode: every further packet is dropped.
    pub const BLOCKED: u32 = 1;
    /// A monitor-mode violation on this socket was already reported.
    pub const ALERTED: u32 = 2;
}

/// An outbound connect()/sendmsg() seen by a cgroup sock_addr hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnectRecord {
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    pub uid: u32,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u16,
    /// Destination port, host byte order.
    pub port: u16,
    /// IPPROTO_TCP (6) or IPPROTO_UDP (17).
    pub protocol: u8,
    /// `op::CONNECT` or `op::SENDMSG`.
    pub op: u8,
    /// `action::*` the kernel applied (DENY: the call failed with EPERM; KILL: denied, and
    /// the daemon kills the process).
    pub action: u8,
    /// `verdict::*` as decided in the kernel.
    pub verdict: u8,
    /// IPv4 in the first 4 bytes (network order), or the IPv6 address.
    pub addr: [u8; 16],
    pub cgroup_id: u64,
    pub boot_ns: u64,
    /// The grant slot the verdict was decided against (0 = none).
    pub grant_slot: u32,
    /// `reason::*`: what made it a violation.
    pub reason: u8,
    /// For `reason::TAINT`: the secret index + 1 whose validity the destination broke.
    pub taint_secret: u8,
    /// 1 when the kernel revoked the grant on this violation.
    pub revoked_now: u8,
    pub _pad2: u8,
    /// The process's PROC_GRANTS entry the verdict was judged on (all zero: none), so the
    /// daemon replays the judge on the same facts, however late it reads the record.
    pub subject: ProcGrants,
}

/// Why a connect verdict is what it is.
pub mod reason {
    pub const GRANT: u8 = 0;
    /// The process is tainted by a secret not valid toward this destination.
    pub const TAINT: u8 = 1;
    /// An `[[agent]]` process holding no grant.
    pub const AGENT: u8 = 2;
}

/// Index of counters in the per-CPU `COUNTERS` array.
pub mod counter {
    /// Ring-buffer reservations that failed (events lost).
    pub const RINGBUF_DROPS: u32 = 0;
    /// Events written.
    pub const EVENTS: u32 = 1;
    /// Per-process state that could not be written (PROC_GRANTS full): a child of a grant
    /// holder, agent or tainted process ran without its inherited state.
    pub const STATE_FULL: u32 = 2;
    /// ALERTS ring-buffer reservations that failed (violation records lost).
    pub const ALERT_DROPS: u32 = 3;
    pub const COUNT: u32 = 4;
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for ForkRecord {}
    unsafe impl aya::Pod for ExecRecord {}
    unsafe impl aya::Pod for ExitRecord {}
    unsafe impl aya::Pod for ConnectRecord {}
    unsafe impl aya::Pod for ProcGrants {}
    unsafe impl aya::Pod for GrantInfo {}
    unsafe impl aya::Pod for DestKey {}
    unsafe impl aya::Pod for PortRanges {}
    unsafe impl aya::Pod for LearnedKey {}
    unsafe impl aya::Pod for Learned {}
    unsafe impl aya::Pod for DnsSteer {}
    unsafe impl aya::Pod for SecretInfo {}
    unsafe impl aya::Pod for ExeKey {}
    unsafe impl aya::Pod for SockState {}
}

pub mod socket;

/// Bytes of `sockaddr_un.sun_path`.
pub const UNIX_PATH_LEN: usize = 108;

/// `IpcRecord.op`: the system call that named the Unix socket.
pub mod ipc_op {
    pub const CONNECT: u32 = 1;
    pub const SENDTO: u32 = 2;
}

/// A process holding secrets (its own taint, its grants' subtree taint, its `[[agent]]`
/// tree's taint) named an AF_UNIX socket in connect() or sendto(): data may reach a process
/// outside its subtree, where taint does not follow. Seen at syscall entry (a tracepoint),
/// so an alert, never a verdict; always on the ALERTS ring.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IpcRecord {
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    pub uid: u32,
    pub cgroup_id: u64,
    pub boot_ns: u64,
    /// Secrets (bit = index) the process held: own, grants' subtrees, agent tree.
    pub taint: u64,
    /// `ipc_op::*`.
    pub op: u32,
    /// Bytes of `path` the caller gave (addrlen - 2, at most `UNIX_PATH_LEN`). A leading
    /// NUL byte names an abstract socket.
    pub path_len: u32,
    pub path: [u8; UNIX_PATH_LEN],
    pub _pad: u32,
    /// The PROC_GRANTS entry it was seen with.
    pub subject: ProcGrants,
}

impl Default for IpcRecord {
    fn default() -> Self {
        IpcRecord {
            kind: 0,
            tgid: 0,
            tid: 0,
            uid: 0,
            cgroup_id: 0,
            boot_ns: 0,
            taint: 0,
            op: 0,
            path_len: 0,
            path: [0; UNIX_PATH_LEN],
            _pad: 0,
            subject: ProcGrants::default(),
        }
    }
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for IpcRecord {}

/// A socket() that a judged process (agent, grant holder or tainted) may not create: a
/// family, type or protocol whose traffic no connect/sendmsg hook judges (raw, ping, SCTP,
/// MPTCP, ...). Seen by the cgroup `sock_create` hook; always a violation, so always on the
/// ALERTS ring.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketRecord {
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    pub uid: u32,
    /// `socket::af::*` (AF_INET, AF_INET6, ...).
    pub family: u32,
    /// `socket::sock_type::*` (without SOCK_NONBLOCK/SOCK_CLOEXEC).
    pub sock_type: u32,
    /// The protocol as the kernel resolved it (0 already replaced by TCP/UDP).
    pub protocol: u32,
    /// `action::DENY` (enforce: socket() failed with EPERM) or `action::ALERT` (monitor).
    pub action: u8,
    /// `verdict::OUT_OF_INTENT`.
    pub verdict: u8,
    /// `reason::AGENT`, `reason::GRANT` (holds a grant) or `reason::TAINT`.
    pub reason: u8,
    pub _pad: u8,
    pub cgroup_id: u64,
    pub boot_ns: u64,
    /// The PROC_GRANTS entry the creation was judged on.
    pub subject: ProcGrants,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for SocketRecord {}

/// Bytes of a file name the BPF-LSM backend keys secrets' paths by (NUL padded); a longer
/// name is watched by inode only.
pub const NAME_LEN: usize = 64;

/// SECRET_INODES key: a secret's inode as the kernel names it (`inode->i_sb->s_dev`, the
/// kernel's MKDEV encoding, and `i_ino`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InodeKey {
    pub dev: u64,
    pub ino: u64,
}

/// SECRET_NAMES key: a secret's path as (parent directory inode, file name): a new inode
/// at a watched path is judged from its first open.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NameKey {
    pub dir: InodeKey,
    pub name: [u8; NAME_LEN],
}

/// SECRET_INODES / SECRET_NAMES value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SecretRef {
    /// The secret's index (taint bit, SECRETS slot).
    pub index: u32,
    pub _pad: u32,
}

/// LSM_CONFIG array indices (u64 values), written by the daemon.
pub mod lsm_config {
    /// The cgroup id of `cgroup_root`: opens by processes outside it are not judged.
    pub const CGROUP_ROOT_ID: u32 = 0;
    /// Its level below the cgroup2 root (0: the whole host, nothing is outside).
    pub const CGROUP_ROOT_LEVEL: u32 = 1;
    /// The daemon's tgid and start time (clock ticks since boot, as /proc/<pid>/stat shows
    /// it): its own opens (reading the secrets' values for the redactor) are not judged. A
    /// reused pid has another start time.
    pub const DAEMON_TGID: u32 = 2;
    pub const DAEMON_START_NS: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// `FileOpenRecord.flags`.
pub mod open_flags {
    /// The inode was found by (directory, name): a new inode at a watched path, added to
    /// SECRET_INODES by the kernel at this open.
    pub const BY_NAME: u8 = 1;
}

/// A secret open judged in the kernel (BPF-LSM backend). Violations go to ALERTS.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FileOpenRecord {
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    pub uid: u32,
    /// The secret's index.
    pub secret: u32,
    /// The grant slot decided against (0 = none).
    pub grant_slot: u32,
    /// `verdict::*` (NO_GRANT for a process holding none).
    pub verdict: u8,
    /// `action::*` the kernel applied (DENY/KILL: the open failed with EPERM).
    pub action: u8,
    /// 1 when the kernel revoked the grant on this violation.
    pub revoked_now: u8,
    /// `open_flags::*`.
    pub flags: u8,
    pub _pad: u32,
    pub inode: InodeKey,
    /// The parent directory of the name the file was opened by.
    pub dir: InodeKey,
    pub cgroup_id: u64,
    pub boot_ns: u64,
    /// The opener's PROC_GRANTS entry the open was judged on (before the taint it adds).
    pub subject: ProcGrants,
    /// The name (last path component) the file was opened by, NUL padded.
    pub name: [u8; NAME_LEN],
}

#[cfg(feature = "user")]
mod pod_lsm {
    use super::*;
    unsafe impl aya::Pod for InodeKey {}
    unsafe impl aya::Pod for NameKey {}
    unsafe impl aya::Pod for SecretRef {}
    unsafe impl aya::Pod for FileOpenRecord {}
}
