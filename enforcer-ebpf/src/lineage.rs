//! Process lineage: new processes, exec and exit, from raw tracepoints.
//!
//! Raw tracepoints (not perf-event tracepoints) because their links can be pinned: a
//! daemon killed with SIGKILL leaves fork inheritance and exit cleanup of grants running.
//! Their arguments are the TP_PROTO pointers; struct offsets come from kernel BTF via
//! globals set by the daemon (rustc emits no CO-RE relocations).
use aya_ebpf::{
    Global,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_current_uid_gid, bpf_ktime_get_boot_ns, bpf_probe_read_kernel, generated,
    },
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use core::ffi::c_void;
use enforcer_common::{
    ARGS_LEN, ExeKey, ExecRecord, ExitRecord, FILENAME_LEN, ForkRecord, MAX_PROC_GRANTS,
    ProcGrants, counter, kind, proc_flags,
};

use crate::maps::{
    AGENT_CGROUPS, AGENT_EXES, AGENT_UIDS, EVENTS, PROC_GRANTS, count, state_lost, submit_flags,
};

const CLONE_THREAD: u64 = 0x0001_0000;

/// task_struct.tgid and linux_binprm.filename, from kernel BTF.
#[unsafe(no_mangle)]
pub(crate) static TASK_TGID_OFF: Global<u32> = Global::new(0);
/// task_struct.real_parent, from kernel BTF (the degraded-mode ancestor walk).
#[unsafe(no_mangle)]
pub(crate) static TASK_REAL_PARENT_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static BPRM_FILENAME_OFF: Global<u32> = Global::new(0);
/// 1 when sched_process_exit carries `group_dead` (its second argument).
#[unsafe(no_mangle)]
static EXIT_HAS_GROUP_DEAD: Global<u32> = Global::new(1);

/// task_struct.mm -> mm_struct.exe_file -> file.f_inode -> inode.{i_ino, i_sb} ->
/// super_block.s_dev: the exec'd file's inode, to match `[[agent]]` executables.
#[unsafe(no_mangle)]
static MM_EXE_FILE_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static FILE_INODE_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static INODE_INO_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static INODE_SB_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SB_DEV_OFF: Global<u32> = Global::new(0);

/// task_struct.mm, mm_struct.arg_start and mm_struct.arg_end, from kernel BTF.
#[unsafe(no_mangle)]
static TASK_MM_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static MM_ARG_START_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static MM_ARG_END_OFF: Global<u32> = Global::new(0);

/// task_newtask(struct task_struct *task, u64 clone_flags) runs in the parent inside
/// copy_process, before the child can run, and (unlike sched_process_fork) tells threads
/// from processes by clone_flags.
#[raw_tracepoint(tracepoint = "task_newtask")]
pub fn task_newtask(ctx: RawTracePointContext) -> i32 {
    let task: u64 = ctx.arg(0);
    let flags: u64 = ctx.arg(1);
    if flags & CLONE_THREAD != 0 || task == 0 {
        return 0;
    }
    let child: i32 = match unsafe {
        bpf_probe_read_kernel((task + TASK_TGID_OFF.load() as u64) as *const i32)
    } {
        Ok(v) => v,
        Err(_) => return 0,
    };
    let ug = bpf_get_current_uid_gid();
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // Descendants forked after a grant inherit it; this runs before the child can run,
    // so the child never executes a single instruction without its grants. The state is
    // written first and unconditionally: the record below is best-effort (a full ring
    // buffer loses the record, never the inheritance).
    let mut grants = [0u32; MAX_PROC_GRANTS];
    if let Some(pg) = unsafe { PROC_GRANTS.get(parent) } {
        grants = pg.grants;
        let inherited =
            ProcGrants { grants, start_ns: now, taint: pg.taint, flags: pg.flags, tree: pg.tree };
        if PROC_GRANTS.insert(child as u32, inherited, 0).is_err() {
            state_lost();
        }
    }
    let Some(mut entry) = EVENTS.reserve::<ForkRecord>(0) else {
        count(counter::RINGBUF_DROPS);
        return 0;
    };
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

/// sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm).
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(ctx: RawTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let old_pid: u64 = ctx.arg(1);
    let old_pid = old_pid as i32;
    let bprm: u64 = ctx.arg(2);
    let fname_ptr: u64 = if bprm == 0 {
        0
    } else {
        unsafe { bpf_probe_read_kernel((bprm + BPRM_FILENAME_OFF.load() as u64) as *const u64) }
            .unwrap_or(0)
    };
    let ug = bpf_get_current_uid_gid();
    // State first, record after: an `[[agent]]` exec is marked even when the ring buffer
    // is full.
    mark_agent(tgid, (ug & 0xffff_ffff) as u32);
    let Some(mut entry) = EVENTS.reserve::<ExecRecord>(0) else {
        count(counter::RINGBUF_DROPS);
        return 0;
    };
    let rec = entry.as_mut_ptr();
    unsafe {
        (*rec).kind = kind::EXEC;
        (*rec).tgid = tgid;
        (*rec).old_tid = old_pid as u32;
        (*rec).uid = ug as u32;
        (*rec).gid = (ug >> 32) as u32;
        (*rec).cgroup_id = bpf_get_current_cgroup_id();
        (*rec).boot_ns = bpf_ktime_get_boot_ns();
        let fname = fname_ptr as *const u8;
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

/// sched_process_exit(struct task_struct *p, bool group_dead): group_dead marks the
/// last thread of the process.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit(ctx: RawTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let last = if EXIT_HAS_GROUP_DEAD.load() != 0 {
        let gd: u64 = ctx.arg(1);
        gd & 0xff != 0
    } else {
        pid_tgid as u32 == tgid
    };
    if !last {
        return 0;
    }
    let mut grants = [0u32; MAX_PROC_GRANTS];
    if let Some(pg) = unsafe { PROC_GRANTS.get(tgid) } {
        grants = pg.grants;
        // A reused pid must never find this process's grants.
        let _ = PROC_GRANTS.remove(tgid);
    }
    let Some(mut entry) = EVENTS.reserve::<ExitRecord>(0) else {
        count(counter::RINGBUF_DROPS);
        return 0;
    };
    entry.write(ExitRecord {
        kind: kind::EXIT,
        tgid,
        boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        grants,
    });
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
    let mm: u64 =
        match unsafe { bpf_probe_read_kernel(task.add(TASK_MM_OFF.load() as usize) as *const u64) }
        {
            Ok(v) if v != 0 => v,
            _ => return,
        };
    let start: u64 =
        unsafe { bpf_probe_read_kernel((mm + MM_ARG_START_OFF.load() as u64) as *const u64) }
            .unwrap_or(0);
    let end: u64 =
        unsafe { bpf_probe_read_kernel((mm + MM_ARG_END_OFF.load() as u64) as *const u64) }
            .unwrap_or(0);
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
    let r = unsafe {
        generated::bpf_probe_read_user(
            rec.args.as_mut_ptr() as *mut c_void,
            len,
            start as *const c_void,
        )
    };
    if r == 0 {
        rec.args_len = len;
    }
}

/// Flags an `[[agent]]` process (by executable inode or uid) at exec, before its first
/// instruction runs; descendants inherit the flag through the fork hook.
#[inline(always)]
fn mark_agent(tgid: u32, uid: u32) {
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    let mut agent =
        unsafe { AGENT_UIDS.get(uid) }.is_some() || unsafe { AGENT_CGROUPS.get(cgroup) }.is_some();
    if !agent && let Some(key) = exe_key() {
        agent = unsafe { AGENT_EXES.get(key) }.is_some();
    }
    if !agent {
        return;
    }
    let mut pg = match unsafe { PROC_GRANTS.get(tgid) } {
        Some(p) => *p,
        None => ProcGrants {
            grants: [0; MAX_PROC_GRANTS],
            start_ns: unsafe { bpf_ktime_get_boot_ns() },
            taint: 0,
            flags: 0,
            tree: 0,
        },
    };
    pg.flags |= proc_flags::AGENT;
    // The first marked process roots the tree; a nested agent stays in its ancestor's.
    if pg.tree == 0 {
        pg.tree = tgid;
    }
    if PROC_GRANTS.insert(tgid, pg, 0).is_err() {
        state_lost();
    }
}

/// (s_dev, i_ino) of the current process's executable.
#[inline(always)]
fn exe_key() -> Option<ExeKey> {
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let read = |p: u64, off: u32| -> Option<u64> {
        if p == 0 {
            return None;
        }
        unsafe { bpf_probe_read_kernel((p + off as u64) as *const u64) }.ok()
    };
    let mm = read(task as u64, TASK_MM_OFF.load())?;
    let file = read(mm, MM_EXE_FILE_OFF.load())?;
    let inode = read(file, FILE_INODE_OFF.load())?;
    let ino = read(inode, INODE_INO_OFF.load())?;
    let sb = read(inode, INODE_SB_OFF.load())?;
    if sb == 0 {
        return None;
    }
    let dev: u32 =
        unsafe { bpf_probe_read_kernel((sb + SB_DEV_OFF.load() as u64) as *const u32) }.ok()?;
    Some(ExeKey { dev: dev as u64, ino })
}
