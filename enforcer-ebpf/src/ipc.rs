//! Unix-socket IPC by processes holding secrets: `syscalls/sys_enter_connect` and
//! `syscalls/sys_enter_sendto` tracepoints.
//!
//! Taint follows the data within a process subtree (fork inheritance, grant and agent-tree
//! taint). A process outside the subtree reached over a Unix socket (a daemon, a helper
//! started elsewhere) is not tainted by what it receives: the agent cannot see where the
//! data goes from there. What it can see is the tainted side naming the socket: a
//! connect() or sendto() with an AF_UNIX address. That is an alert (an `IpcRecord` on the
//! ALERTS ring), never a verdict: the address is read from user memory at syscall entry,
//! and the caller could change it before the kernel copies it (see docs/threat-model.md).
//!
//! Cost: every connect()/sendto() on the host runs this. The common path is one read of
//! the address family from user memory (or none: sendto on a connected socket has no
//! address), then one PROC_GRANTS lookup for AF_UNIX only.
use aya_ebpf::{
    Global,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_ktime_get_boot_ns, bpf_probe_read_user, generated,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use core::ffi::c_void;
use enforcer_common::{IpcRecord, MAX_PROC_GRANTS, UNIX_PATH_LEN, counter, ipc_op, kind};

use crate::maps::{AGENT_TAINT, ALERTS, GRANT_TAINT, WAKEUP_NOW, count, proc_entry};

const AF_UNIX: u16 = 1;

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

#[tracepoint(category = "syscalls", name = "sys_enter_connect")]
pub fn ipc_connect(ctx: TracePointContext) -> u32 {
    let (a, l) = (CONNECT_ADDR_OFF.load(), CONNECT_ADDRLEN_OFF.load());
    seen(&ctx, a as usize, l as usize, ipc_op::CONNECT);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_sendto")]
pub fn ipc_sendto(ctx: TracePointContext) -> u32 {
    let (a, l) = (SENDTO_ADDR_OFF.load(), SENDTO_ADDRLEN_OFF.load());
    seen(&ctx, a as usize, l as usize, ipc_op::SENDTO);
    0
}

#[inline(always)]
fn seen(ctx: &TracePointContext, addr_off: usize, len_off: usize, op: u32) -> Option<()> {
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
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let subject = proc_entry(tgid)?;
    // The same taint the connect judge holds the process to.
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
    let addrlen: u64 = unsafe { ctx.read_at(len_off) }.unwrap_or(0);
    let mut n = (addrlen as u32).saturating_sub(2);
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
        (*rec).tgid = tgid;
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
        let path = (*rec).path.as_mut_ptr() as *mut c_void;
        let mut got = 0u32;
        if n > 0 && n <= UNIX_PATH_LEN as u32 {
            let src = (addr + 2) as *const c_void;
            if generated::bpf_probe_read_user(path, n, src) == 0 {
                got = n;
            }
        }
        (*rec).path_len = got;
    }
    entry.submit(WAKEUP_NOW);
    count(counter::EVENTS);
    Some(())
}
