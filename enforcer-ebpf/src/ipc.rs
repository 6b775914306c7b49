//! Unix-socket IPC by processes holding secrets: an alert, never a verdict.
//!
//! Taint follows the data within a process subtree (fork inheritance, grant and agent-tree
//! taint). A process outside the subtree reached over a Unix socket (a daemon, a helper
//! started elsewhere) is not tainted by what it receives: the agent cannot see where the
//! data goes from there. What it can see is the tainted side naming the socket: a connect()
//! or a send with an AF_UNIX address. That is an alert (an `IpcRecord` on the ALERTS ring).
//!
//! Three hook sets, the first this kernel loads (enforcer/src/kernel/ipc.rs):
//! - `cgroup/connect_unix` + `cgroup/sendmsg_unix` (Linux 6.7+) on `cgroup_root`: run only
//!   for Unix connects and addressed sends inside it, on the kernel's copy of the address.
//!   Built in the `cgroup/connect4` / `cgroup/sendmsg4` sections (aya 0.14 has no Unix
//!   attach types) and loaded by the daemon with the Unix expected attach type.
//! - `lsm/unix_stream_connect` + `lsm/unix_may_send` where BPF-LSM loads: the address is the
//!   one the peer socket is bound to.
//! - `syscalls/sys_enter_connect` + `sys_enter_sendto` tracepoints, last resort: while one
//!   is attached every system call of every task on the host takes the kernel's tracing
//!   path (about +5-15% on a short syscall), and the address is read from user memory at
//!   syscall entry (the caller could change it before the kernel copies it).
//!
//! Every variant first looks up the caller (one PROC_GRANTS lookup): a process holding no
//! secret costs nothing more.
use aya_ebpf::{
    Global,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_ktime_get_boot_ns, bpf_probe_read_kernel, bpf_probe_read_user, generated,
    },
    macros::{cgroup_sock_addr, lsm, tracepoint},
    programs::{LsmContext, SockAddrContext, TracePointContext},
};
use core::ffi::c_void;
use enforcer_common::{IpcRecord, MAX_PROC_GRANTS, UNIX_PATH_LEN, counter, ipc_op, kind};

use crate::maps::{AGENT_TAINT, ALERTS, GRANT_TAINT, WAKEUP_NOW, count, proc_entry};

const AF_UNIX: u16 = 1;
/// cgroup sock_addr verdict: 1 lets the call proceed.
const PROCEED: i32 = 1;

/// Offsets of the address and its length in the two tracepoints' records, from their
/// tracefs `format` (0: unknown, the program does nothing).
#[unsafe(no_mangle)]
static CONNECT_ADDR_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static CONNECT_ADDRLEN_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SENDTO_ADDR_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SENDTO_ADDRLEN_OFF: Global<u32> = Global::new(0);

/// For the LSM variant, from kernel BTF: `socket.sk`, `unix_sock.addr` (a unix_sock starts
/// with its sock), and `unix_address.len` / `.name` (0: unknown, no path is reported).
#[unsafe(no_mangle)]
static SOCKET_SK_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static UNIX_SOCK_ADDR_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static UNIX_ADDRESS_LEN_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static UNIX_ADDRESS_NAME_OFF: Global<u32> = Global::new(0);

/// `cgroup/connect_unix` (loaded with BPF_CGROUP_UNIX_CONNECT).
#[cgroup_sock_addr(connect4)]
pub fn ipc_unix_connect(ctx: SockAddrContext) -> i32 {
    // A judged process's nss-resolve is sent back to DNS through the stub (dns.rs).
    if crate::dns::resolved_varlink(&ctx) {
        return 0;
    }
    sock_addr_seen(&ctx, ipc_op::CONNECT);
    PROCEED
}

/// `cgroup/sendmsg_unix` (loaded with BPF_CGROUP_UNIX_SENDMSG): a send with an address.
#[cgroup_sock_addr(sendmsg4)]
pub fn ipc_unix_sendmsg(ctx: SockAddrContext) -> i32 {
    sock_addr_seen(&ctx, ipc_op::SENDTO);
    PROCEED
}

/// The kernel's context of a cgroup sock_addr program, `struct bpf_sock_addr_kern`: sk,
/// uaddr, tmp_reg, t_ctx, uaddrlen (u32). The loader checks these offsets (8 and 32) in
/// kernel BTF before it loads the programs.
pub(crate) type SockAddrKern = [u64; 5];

#[inline(always)]
fn sock_addr_seen(ctx: &SockAddrContext, op: u32) -> Option<()> {
    let (pid_tgid, subject, taint) = tainted_caller()?;
    // The context pointer is the kernel struct; its fields beyond the UAPI view are read
    // with a helper (the address is the kernel's copy: what connect() will use).
    let kern: SockAddrKern =
        unsafe { bpf_probe_read_kernel(ctx.sock_addr as *const SockAddrKern) }.ok()?;
    let (uaddr, uaddrlen) = (kern[1], kern[4] as u32);
    if uaddr == 0 {
        return None;
    }
    let path = (uaddr + 2, uaddrlen.saturating_sub(2));
    report(pid_tgid, subject, taint, op, path, false)
}

/// `lsm/unix_stream_connect(sock, other, newsk)`: a stream or seqpacket connect to `other`.
#[lsm(hook = "unix_stream_connect")]
pub fn ipc_lsm_connect(ctx: LsmContext) -> i32 {
    let other: u64 = ctx.arg(1);
    let _ = lsm_seen(other, ipc_op::CONNECT, false);
    // An alert only: the verdict of the BPF-LSM programs before this one stands.
    ctx.arg::<i32>(3)
}

/// `lsm/unix_may_send(sock, other)`: a datagram connect or send to `other` (struct socket).
#[lsm(hook = "unix_may_send")]
pub fn ipc_lsm_send(ctx: LsmContext) -> i32 {
    let other: u64 = ctx.arg(1);
    let _ = lsm_seen(other, ipc_op::SENDTO, true);
    ctx.arg::<i32>(2)
}

/// `other_is_socket`: `other` is a `struct socket` (its sock read first), else a `struct sock`.
#[inline(always)]
fn lsm_seen(other: u64, op: u32, other_is_socket: bool) -> Option<()> {
    let (pid_tgid, subject, taint) = tainted_caller()?;
    let mut sk = other;
    if other_is_socket {
        let off = SOCKET_SK_OFF.load() as u64;
        sk = unsafe { bpf_probe_read_kernel((other + off) as *const u64) }.ok()?;
    }
    // The address the peer is bound to: len counts the family and the path.
    let (addr_off, len_off, name_off) = (
        UNIX_SOCK_ADDR_OFF.load() as u64,
        UNIX_ADDRESS_LEN_OFF.load() as u64,
        UNIX_ADDRESS_NAME_OFF.load() as u64,
    );
    let mut path = (0u64, 0u32);
    if addr_off != 0 && sk != 0 {
        let addr: u64 =
            unsafe { bpf_probe_read_kernel((sk + addr_off) as *const u64) }.unwrap_or(0);
        if addr != 0 {
            let len: i32 =
                unsafe { bpf_probe_read_kernel((addr + len_off) as *const i32) }.unwrap_or(0);
            path = (addr + name_off + 2, (len as u32).saturating_sub(2));
        }
    }
    report(pid_tgid, subject, taint, op, path, false)
}

#[tracepoint(category = "syscalls", name = "sys_enter_connect")]
pub fn ipc_connect(ctx: TracePointContext) -> u32 {
    let (a, l) = (CONNECT_ADDR_OFF.load(), CONNECT_ADDRLEN_OFF.load());
    tracepoint_seen(&ctx, a as usize, l as usize, ipc_op::CONNECT);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_sendto")]
pub fn ipc_sendto(ctx: TracePointContext) -> u32 {
    let (a, l) = (SENDTO_ADDR_OFF.load(), SENDTO_ADDRLEN_OFF.load());
    tracepoint_seen(&ctx, a as usize, l as usize, ipc_op::SENDTO);
    0
}

#[inline(always)]
fn tracepoint_seen(
    ctx: &TracePointContext,
    addr_off: usize,
    len_off: usize,
    op: u32,
) -> Option<()> {
    if addr_off == 0 {
        return None;
    }
    let addr: u64 = unsafe { ctx.read_at(addr_off) }.ok()?;
    if addr == 0 {
        return None;
    }
    let family: u16 = unsafe { bpf_probe_read_user(addr as *const u16) }.ok()?;
    if family != AF_UNIX {
        return None;
    }
    let (pid_tgid, subject, taint) = tainted_caller()?;
    let addrlen: u64 = unsafe { ctx.read_at(len_off) }.unwrap_or(0);
    report(pid_tgid, subject, taint, op, (addr + 2, (addrlen as u32).saturating_sub(2)), true)
}

/// The current process if it holds a secret (the same taint the connect judge holds it
/// to): its pid_tgid, entry and taint. The common path is one PROC_GRANTS lookup.
#[inline(always)]
fn tainted_caller() -> Option<(u64, enforcer_common::ProcGrants, u64)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let subject = proc_entry((pid_tgid >> 32) as u32)?;
    let mut taint = subject.taint;
    if subject.tree != 0
        && let Some(t) = unsafe { AGENT_TAINT.get(subject.tree) }
    {
        taint |= *t;
    }
    for i in 0..MAX_PROC_GRANTS {
        let slot = subject.grants[i];
        if slot != 0
            && let Some(t) = unsafe { GRANT_TAINT.get(slot) }
        {
            taint |= *t;
        }
    }
    if taint == 0 {
        return None;
    }
    Some((pid_tgid, subject, taint))
}

/// Writes the alert. `path`: address of the socket path and its length (0: none known);
/// `user`: whether it is in user memory.
#[inline(always)]
fn report(
    pid_tgid: u64,
    subject: enforcer_common::ProcGrants,
    taint: u64,
    op: u32,
    path: (u64, u32),
    user: bool,
) -> Option<()> {
    let mut n = path.1;
    if n > UNIX_PATH_LEN as u32 {
        n = UNIX_PATH_LEN as u32;
    }
    let Some(mut entry) = ALERTS.reserve::<IpcRecord>(0) else {
        count(counter::ALERT_DROPS);
        return None;
    };
    let rec = entry.as_mut_ptr();
    let ug = bpf_get_current_uid_gid();
    unsafe {
        (*rec).kind = kind::IPC;
        (*rec).tgid = (pid_tgid >> 32) as u32;
        (*rec).tid = pid_tgid as u32;
        (*rec).uid = ug as u32;
        (*rec).cgroup_id = bpf_get_current_cgroup_id();
        (*rec).boot_ns = bpf_ktime_get_boot_ns();
        (*rec).taint = taint;
        (*rec).op = op;
        (*rec)._pad = 0;
        (*rec).subject = subject;
        // Zeroed first: a short or failed read leaves no ring memory uninitialised.
        core::ptr::write_bytes((*rec).path.as_mut_ptr(), 0, UNIX_PATH_LEN);
        let dst = (*rec).path.as_mut_ptr() as *mut c_void;
        let src = path.0 as *const c_void;
        let mut got = 0u32;
        if path.0 != 0 && n > 0 && n <= UNIX_PATH_LEN as u32 {
            let r = if user {
                generated::bpf_probe_read_user(dst, n, src)
            } else {
                generated::bpf_probe_read_kernel(dst, n, src)
            };
            if r == 0 {
                got = n;
            }
        }
        (*rec).path_len = got;
    }
    entry.submit(WAKEUP_NOW);
    count(counter::EVENTS);
    Some(())
}
