//! Process lineage: new processes, exec and exit, from stable tracepoints.
//!
//! Tracepoint field offsets differ between kernels (6.18 moved sched_process_fork's comm to
//! __data_loc), so the daemon reads them from tracefs `format` files and sets these globals.
use aya_ebpf::{
    Global,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_current_uid_gid, bpf_ktime_get_boot_ns, bpf_probe_read_kernel, generated,
    },
    macros::tracepoint,
    programs::TracePointContext,
    EbpfContext,
};
use core::ffi::c_void;
use enforcer_common::{
    ARGS_LEN, ExecRecord, ExitRecord, FILENAME_LEN, ForkRecord, MAX_PROC_GRANTS, ProcGrants,
    counter, kind,
};

use crate::maps::{EVENTS, PROC_GRANTS, count, submit_flags};

const CLONE_THREAD: u64 = 0x0001_0000;

#[unsafe(no_mangle)]
static NEWTASK_PID_OFF: Global<u32> = Global::new(8);
#[unsafe(no_mangle)]
static NEWTASK_FLAGS_OFF: Global<u32> = Global::new(32);
#[unsafe(no_mangle)]
static EXEC_FILENAME_OFF: Global<u32> = Global::new(8);
#[unsafe(no_mangle)]
static EXEC_OLD_PID_OFF: Global<u32> = Global::new(16);
/// 0 when the kernel's sched_process_exit has no `group_dead` field.
#[unsafe(no_mangle)]
static EXIT_GROUP_DEAD_OFF: Global<u32> = Global::new(32);
/// task_struct.mm, mm_struct.arg_start and mm_struct.arg_end, from kernel BTF.
#[unsafe(no_mangle)]
static TASK_MM_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static MM_ARG_START_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static MM_ARG_END_OFF: Global<u32> = Global::new(0);

/// task/task_newtask runs in the parent inside copy_process, before the child can run,
/// and (unlike sched_process_fork) tells threads from processes by clone_flags.
#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    let flags: u64 = unsafe { ctx.read_at(NEWTASK_FLAGS_OFF.load() as usize) }.unwrap_or(0);
    if flags & CLONE_THREAD != 0 {
        return 0;
    }
    let child: i32 = match unsafe { ctx.read_at(NEWTASK_PID_OFF.load() as usize) } {
        Ok(v) => v,
        Err(_) => return 0,
    };
    let Some(mut entry) = EVENTS.reserve::<ForkRecord>(0) else {
        count(counter::RINGBUF_DROPS);
        return 0;
    };
    let ug = bpf_get_current_uid_gid();
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // Descendants forked after a grant inherit it; this runs before the child can run,
    // so the child never executes a single instruction without its grants.
    let mut grants = [0u32; MAX_PROC_GRANTS];
    if let Some(pg) = unsafe { PROC_GRANTS.get(&parent) } {
        grants = pg.grants;
        let inherited = ProcGrants { grants, start_ns: now };
        let _ = PROC_GRANTS.insert(&(child as u32), &inherited, 0);
    }
    entry.write(ForkRecord {
        kind: kind::FORK,
        parent_tgid: parent,
        child_tgid: child as u32,
        uid: ug as u32,
        gid: (ug >> 32) as u32,
        _pad: 0,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        boot_ns: now,
        grants,
    });
    entry.submit(submit_flags());
    count(counter::EVENTS);
    0
}

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let old_pid: i32 = unsafe { ctx.read_at(EXEC_OLD_PID_OFF.load() as usize) }.unwrap_or(0);
    let loc: u32 = unsafe { ctx.read_at(EXEC_FILENAME_OFF.load() as usize) }.unwrap_or(0);
    let Some(mut entry) = EVENTS.reserve::<ExecRecord>(0) else {
        count(counter::RINGBUF_DROPS);
        return 0;
    };
    let rec = entry.as_mut_ptr();
    let ug = bpf_get_current_uid_gid();
    unsafe {
        (*rec).kind = kind::EXEC;
        (*rec).tgid = tgid;
        (*rec).old_tid = old_pid as u32;
        (*rec).uid = ug as u32;
        (*rec).gid = (ug >> 32) as u32;
        (*rec).cgroup_id = bpf_get_current_cgroup_id();
        (*rec).boot_ns = bpf_ktime_get_boot_ns();
        let fname = (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize);
        let n = generated::bpf_probe_read_kernel_str(
            (*rec).filename.as_mut_ptr() as *mut c_void,
            FILENAME_LEN as u32,
            fname as *const c_void,
        );
        (*rec).filename_len = if n > 0 { (n - 1) as u32 } else { 0 };
        read_args(&mut *rec);
    }
    entry.submit(submit_flags());
    count(counter::EVENTS);
    0
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let off = EXIT_GROUP_DEAD_OFF.load() as usize;
    let last = if off != 0 {
        unsafe { ctx.read_at::<u8>(off) }.unwrap_or(0) != 0
    } else {
        pid_tgid as u32 == tgid
    };
    if !last {
        return 0;
    }
    let mut grants = [0u32; MAX_PROC_GRANTS];
    if let Some(pg) = unsafe { PROC_GRANTS.get(&tgid) } {
        grants = pg.grants;
        // A reused pid must never find this process's grants.
        let _ = PROC_GRANTS.remove(&tgid);
    }
    let Some(mut entry) = EVENTS.reserve::<ExitRecord>(0) else {
        count(counter::RINGBUF_DROPS);
        return 0;
    };
    entry.write(ExitRecord { kind: kind::EXIT, tgid, boot_ns: unsafe { bpf_ktime_get_boot_ns() }, grants });
    entry.submit(submit_flags());
    count(counter::EVENTS);
    0
}

/// Copies the new image's argv from its own memory (mm->arg_start..arg_end), where exec
/// has just placed it. Reading it here rather than at execve() entry keeps syscall
/// tracepoints off: attaching any of those slows every syscall of every process.
#[inline(always)]
unsafe fn read_args(rec: &mut ExecRecord) {
    rec.args_len = 0;
    rec.args_truncated = 0;
    rec.args[0] = 0;
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let mm: u64 = match unsafe { bpf_probe_read_kernel(task.add(TASK_MM_OFF.load() as usize) as *const u64) } {
        Ok(v) if v != 0 => v,
        _ => return,
    };
    let start: u64 = unsafe { bpf_probe_read_kernel((mm + MM_ARG_START_OFF.load() as u64) as *const u64) }.unwrap_or(0);
    let end: u64 = unsafe { bpf_probe_read_kernel((mm + MM_ARG_END_OFF.load() as u64) as *const u64) }.unwrap_or(0);
    if start == 0 || end <= start {
        return;
    }
    let mut len = end - start;
    if len > ARGS_LEN as u64 {
        len = ARGS_LEN as u64;
        rec.args_truncated = 1;
    }
    // Bounded for the verifier: 1..=ARGS_LEN.
    let len = (len as u32) & (2 * ARGS_LEN as u32 - 1);
    if len == 0 || len > ARGS_LEN as u32 {
        return;
    }
    let r = unsafe { generated::bpf_probe_read_user(rec.args.as_mut_ptr() as *mut c_void, len, start as *const c_void) };
    if r == 0 {
        rec.args_len = len;
    }
}
