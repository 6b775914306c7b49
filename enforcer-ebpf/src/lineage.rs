//! Process lineage: new processes, exec and exit, from stable tracepoints.
//!
//! Tracepoint field offsets differ between kernels (6.18 moved sched_process_fork's comm to
//! __data_loc), so the daemon reads them from tracefs `format` files and sets these globals.
use aya_ebpf::{
    Global,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_ktime_get_boot_ns, generated,
    },
    macros::tracepoint,
    programs::TracePointContext,
    EbpfContext,
};
use core::ffi::c_void;
use enforcer_common::{
    ARG_MAX_LEN, ARGS_LEN, ExecRecord, ExitRecord, FILENAME_LEN, ForkRecord, MAX_ARGS, counter,
    kind,
};

use crate::maps::{ARGS_SCRATCH, EVENTS, PENDING_ARGS, count};

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
#[unsafe(no_mangle)]
static EXECVE_ARGV_OFF: Global<u32> = Global::new(24);
#[unsafe(no_mangle)]
static EXECVEAT_ARGV_OFF: Global<u32> = Global::new(32);

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
    entry.write(ForkRecord {
        kind: kind::FORK,
        parent_tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        child_tgid: child as u32,
        uid: ug as u32,
        gid: (ug >> 32) as u32,
        _pad: 0,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        boot_ns: unsafe { bpf_ktime_get_boot_ns() },
    });
    entry.submit(0);
    count(counter::EVENTS);
    0
}

#[tracepoint]
pub fn sys_enter_execve(ctx: TracePointContext) -> u32 {
    capture_args(&ctx, EXECVE_ARGV_OFF.load() as usize);
    0
}

#[tracepoint]
pub fn sys_enter_execveat(ctx: TracePointContext) -> u32 {
    capture_args(&ctx, EXECVEAT_ARGV_OFF.load() as usize);
    0
}

/// Copies argv (NUL separated, bounded) into PENDING_ARGS[tid]. Done at syscall entry
/// because the new image's argv is then still the caller's memory; short-lived processes
/// that exit right after exec keep their cmdline this way.
#[inline(always)]
fn capture_args(ctx: &TracePointContext, argv_off: usize) {
    let argv: u64 = match unsafe { ctx.read_at(argv_off) } {
        Ok(v) => v,
        Err(_) => return,
    };
    let Some(scratch) = ARGS_SCRATCH.get_ptr_mut(0) else { return };
    let scratch = unsafe { &mut *scratch };
    scratch.len = 0;
    scratch.truncated = 0;
    let mut off: usize = 0;
    for i in 0..MAX_ARGS {
        let p: u64 = match unsafe {
            aya_ebpf::helpers::bpf_probe_read_user((argv as *const u64).wrapping_add(i))
        } {
            Ok(p) => p,
            Err(_) => break,
        };
        if p == 0 {
            break;
        }
        if off >= ARGS_LEN {
            scratch.truncated = 1;
            break;
        }
        // `off & (ARGS_LEN - 1)` proves to the verifier that one argument of at most
        // ARG_MAX_LEN bytes stays inside the ARGS_LEN + ARG_MAX_LEN buffer.
        let bounded = off & (ARGS_LEN - 1);
        let n = unsafe {
            generated::bpf_probe_read_user_str(
                scratch.buf.as_mut_ptr().add(bounded) as *mut c_void,
                ARG_MAX_LEN as u32,
                p as *const c_void,
            )
        };
        if n <= 0 {
            break;
        }
        off = bounded + n as usize;
        if n as usize == ARG_MAX_LEN {
            scratch.truncated = 1;
        }
    }
    scratch.len = off as u32;
    let tid = bpf_get_current_pid_tgid() as u32;
    let _ = PENDING_ARGS.insert(&tid, scratch, 0);
}

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // A non-leader thread that execs takes the leader's tid: argv was stored under old_pid.
    let old_pid: i32 = unsafe { ctx.read_at(EXEC_OLD_PID_OFF.load() as usize) }.unwrap_or(0);
    let loc: u32 = unsafe { ctx.read_at(EXEC_FILENAME_OFF.load() as usize) }.unwrap_or(0);
    let Some(mut entry) = EVENTS.reserve::<ExecRecord>(0) else {
        count(counter::RINGBUF_DROPS);
        let _ = PENDING_ARGS.remove(&(old_pid as u32));
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
        let key = old_pid as u32;
        match PENDING_ARGS.get_ptr(&key) {
            Some(args) => {
                generated::bpf_probe_read_kernel(
                    (*rec).args.as_mut_ptr() as *mut c_void,
                    (ARGS_LEN + ARG_MAX_LEN) as u32,
                    (*args).buf.as_ptr() as *const c_void,
                );
                (*rec).args_len = (*args).len;
                (*rec).args_truncated = (*args).truncated;
                let _ = PENDING_ARGS.remove(&key);
            }
            None => {
                (*rec).args_len = 0;
                (*rec).args_truncated = 0;
                (*rec).args[0] = 0;
            }
        }
    }
    entry.submit(0);
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
    let Some(mut entry) = EVENTS.reserve::<ExitRecord>(0) else {
        count(counter::RINGBUF_DROPS);
        return 0;
    };
    entry.write(ExitRecord { kind: kind::EXIT, tgid, boot_ns: unsafe { bpf_ktime_get_boot_ns() } });
    entry.submit(0);
    count(counter::EVENTS);
    0
}
