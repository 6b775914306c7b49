//! Records shared by the kernel programs and the daemon.
//!
//! Every record is `repr(C)` with explicit padding fields so that no byte the kernel
//! copies into the ring buffer is uninitialised (the verifier rejects reads of
//! uninitialised stack, and userspace must never see stale kernel memory).
#![no_std]

/// Ring-buffer record kinds; the first `u32` of every record.
pub mod kind {
    pub const FORK: u32 = 1;
    pub const EXEC: u32 = 2;
    pub const EXIT: u32 = 3;
    pub const CONNECT: u32 = 4;
}

/// Maximum bytes of an exec'd filename kept by the kernel.
pub const FILENAME_LEN: usize = 256;
/// Maximum bytes of argv (NUL separated) kept by the kernel; longer ones are truncated.
pub const ARGS_LEN: usize = 2048;

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
}

/// Operation that produced a connect record.
pub mod op {
    pub const CONNECT: u8 = 1;
    pub const SENDMSG: u8 = 2;
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
    /// 1 when the kernel refused the operation.
    pub denied: u8,
    pub _pad: u8,
    /// IPv4 in the first 4 bytes (network order), or the IPv6 address.
    pub addr: [u8; 16],
    pub cgroup_id: u64,
    pub boot_ns: u64,
}

/// Index of counters in the per-CPU `COUNTERS` array.
pub mod counter {
    /// Ring-buffer reservations that failed (events lost).
    pub const RINGBUF_DROPS: u32 = 0;
    /// Events written.
    pub const EVENTS: u32 = 1;
    pub const COUNT: u32 = 2;
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for ForkRecord {}
    unsafe impl aya::Pod for ExecRecord {}
    unsafe impl aya::Pod for ExitRecord {}
    unsafe impl aya::Pod for ConnectRecord {}
}
