//! Secret opens decided in the kernel: the BPF-LSM `file_open` hook (the BPF-LSM backend,
//! chosen where the kernel loads it; fanotify is the fallback).
//!
//! `security_file_open` runs in `do_dentry_open` for every open of a file (open, openat,
//! openat2, io_uring, open_by_handle_at, /proc/<pid>/fd reopen, exec), after path lookup,
//! so symlinks, hard links and relative paths all end at the inode judged here. O_PATH
//! opens are not checked by the kernel (they cannot read; reopening one through
//! /proc/self/fd is a full open and is judged).
//!
//! A secret is found by its inode (SECRET_INODES: the daemon adds every inode it finds at a
//! secret's path; a renamed or hard-linked secret is the same inode), or by the name it was
//! opened by (SECRET_NAMES: parent directory inode + file name), so a new inode created or
//! renamed onto a watched path is judged from its very first open, and is then added to
//! SECRET_INODES here (it stays the secret when renamed away).
//!
//! The decision is the shared open judge `enforcer_common::open::judge_open` (the function
//! the daemon's fanotify backend decides with) over PROC_GRANTS, GRANTS and SECRETS, with
//! the boot clock: expiry works with no daemon. State comes before records: the revoke and
//! the taint (PROC_GRANTS, GRANT_TAINT, AGENT_TAINT) are written before the open returns, the record is
//! best-effort (a full ring loses it, counted). Enforce-mode deny and kill fail the open
//! with EPERM; kill also sends SIGKILL to the opener.
use aya_ebpf::{
    Global,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_get_current_task_btf, bpf_get_current_uid_gid, bpf_ktime_get_boot_ns,
        bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes,
        generated::{bpf_probe_read_kernel_str, bpf_send_signal},
    },
    macros::{lsm, map},
    maps::{Array, HashMap},
    programs::LsmContext,
};
use enforcer_common::{
    FileOpenRecord, GrantInfo, InodeKey, NAME_LEN, NameKey, ProcGrants, SecretRef, action, config,
    counter, grant_state, kind, lsm_config,
    open::{OpenFacts, OpenJudgement, judge_open},
    open_flags, verdict,
};

use crate::maps::{
    AGENT_TAINT, ALERTS, EVENTS, GRANT_TAINT, GRANTS, PROC_GRANTS, SECRETS, WAKEUP_NOW, config,
    count, inherited_entry, submit_flags,
};

const EPERM: i32 = 1;
const SIGKILL: u32 = 9;

/// Secret inodes -> secret index. Written by the daemon; also by this program when a new
/// inode is found at a watched path.
#[map]
pub static SECRET_INODES: HashMap<InodeKey, SecretRef> = HashMap::pinned(16_384, 0);

/// (parent directory inode, file name) of every secret path -> secret index.
#[map]
pub static SECRET_NAMES: HashMap<NameKey, SecretRef> = HashMap::pinned(4096, 0);

/// Inodes of the directories SECRET_NAMES names: only opens there read the file name.
#[map]
pub static SECRET_DIRS: HashMap<InodeKey, u8> = HashMap::pinned(4096, 0);

/// `enforcer_common::lsm_config` values.
#[map]
pub static LSM_CONFIG: Array<u64> = Array::pinned(lsm_config::COUNT, 0);

/// file.f_path + path.dentry, dentry.d_parent, dentry.d_name + qstr.name, dentry.d_inode,
/// task_struct.group_leader and task_struct.start_boottime, from kernel BTF.
#[unsafe(no_mangle)]
static FILE_DENTRY_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static DENTRY_PARENT_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static DENTRY_NAME_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static DENTRY_INODE_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TASK_LEADER_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TASK_START_OFF: Global<u32> = Global::new(0);
/// Shared with lineage.rs (same BTF offsets).
#[unsafe(no_mangle)]
static LSM_FILE_INODE_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static LSM_INODE_INO_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static LSM_INODE_SB_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static LSM_SB_DEV_OFF: Global<u32> = Global::new(0);
/// inode.i_nlink (for `inode_free`).
#[unsafe(no_mangle)]
static LSM_INODE_NLINK_OFF: Global<u32> = Global::new(0);

/// The pointer or integer field at `off` of the kernel object `p` points to. `p` is the
/// hook's argument or a pointer read from one (or the current task from
/// bpf_get_current_task_btf): the verifier types it from kernel BTF, checks the access
/// against the field there (`off` comes from the frozen .rodata, so it is a known
/// constant) and makes it a load that reads 0 instead of faulting. A direct load instead
/// of a bpf_probe_read_kernel call: this runs on every open on the host, ten times.
#[inline(always)]
fn field<T: Copy>(p: u64, off: u32) -> T {
    unsafe { core::ptr::read_volatile((p as *const u8).wrapping_add(off as usize) as *const T) }
}

#[inline(always)]
fn read_u64(p: u64, off: u32) -> Option<u64> {
    if p == 0 {
        return None;
    }
    let v: u64 = field(p, off);
    (v != 0).then_some(v)
}

/// (s_dev, i_ino) of an inode.
#[inline(always)]
fn inode_key(inode: u64) -> Option<InodeKey> {
    let ino = read_u64(inode, LSM_INODE_INO_OFF.load())?;
    let sb = read_u64(inode, LSM_INODE_SB_OFF.load())?;
    let dev: u32 = field(sb, LSM_SB_DEV_OFF.load());
    Some(InodeKey { dev: dev as u64, ino })
}

/// The kernel maps as the open judge's facts.
struct Maps;

impl OpenFacts for Maps {
    #[inline(always)]
    fn grant(&self, slot: u32) -> Option<GrantInfo> {
        unsafe { GRANTS.get(slot) }.copied()
    }

    #[inline(always)]
    fn settle(&self, v: u64) -> u64 {
        opaque(v)
    }
}

#[lsm(hook = "file_open")]
pub fn file_open(ctx: LsmContext) -> i32 {
    // A previous BPF-LSM program's refusal stands.
    let previous: i32 = ctx.arg(1);
    if previous != 0 {
        return previous;
    }
    let file: u64 = ctx.arg(0);
    judge_file(file)
}

/// An inode is freed: when it was a deleted secret (no links left), its SECRET_INODES entry
/// goes with it, so a new file that gets the same inode number is not judged as the secret.
/// An inode merely evicted from the cache (links left: the file still exists, and is read
/// back with the same number) keeps its entry. Most inodes freed on a host (sockets, pipes,
/// evicted files) end at the link count.
#[lsm(hook = "inode_free_security")]
pub fn inode_free(ctx: LsmContext) -> i32 {
    let inode: u64 = ctx.arg(0);
    if inode == 0 {
        return 0;
    }
    let nlink: u32 = field(inode, LSM_INODE_NLINK_OFF.load());
    if nlink != 0 {
        return 0;
    }
    let Some(key) = inode_key(inode) else { return 0 };
    if unsafe { SECRET_INODES.get(key) }.is_some() {
        let _ = SECRET_INODES.remove(key);
    }
    0
}

/// The secret path. What it does per open of a watched secret, cheapest first: the inode
/// lookup (every open), the name only for an inode not known yet (a new inode at a watched
/// path), the scope checks, one PROC_GRANTS lookup (its pointer also takes the taint), the
/// judge's GRANTS reads, taint writes only for bits not yet set, and the record written in
/// place in the ring buffer (no copy of it on the stack).
#[inline(always)]
fn judge_file(file: u64) -> i32 {
    let Some(inode) = read_u64(file, LSM_FILE_INODE_OFF.load()) else { return 0 };
    let Some(key) = inode_key(inode) else { return 0 };
    let mut name = NameKey { dir: InodeKey::default(), name: [0; NAME_LEN] };
    let dentry = read_u64(file, FILE_DENTRY_OFF.load()).unwrap_or(0);
    if let Some(parent) = read_u64(dentry, DENTRY_PARENT_OFF.load())
        && let Some(dir_inode) = read_u64(parent, DENTRY_INODE_OFF.load())
        && let Some(dir) = inode_key(dir_inode)
    {
        name.dir = dir;
    }
    let known = unsafe { SECRET_INODES.get(key) }.map(|r| r.index);
    // Only opens of a known secret, or in a secret's directory, go further: every other
    // open on the host ends here.
    if known.is_none() && unsafe { SECRET_DIRS.get(name.dir) }.is_none() {
        return 0;
    }
    let name_ptr = read_u64(dentry, DENTRY_NAME_OFF.load()).unwrap_or(0);
    let (secret, flags) = match known {
        // A known inode is judged without its name (the record reads it, in place).
        Some(i) => (i, 0u8),
        None => {
            if name_ptr == 0
                || unsafe { bpf_probe_read_kernel_str_bytes(name_ptr as *const u8, &mut name.name) }
                    .is_err()
            {
                return 0;
            }
            // By reference: a copy of the 80-byte key would cost scarce stack.
            #[allow(clippy::needless_borrows_for_generic_args)]
            let Some(r) = (unsafe { SECRET_NAMES.get(&name) }) else { return 0 };
            let r = *r;
            // A new inode at a watched path is that secret from now on, whatever it is
            // renamed to; state before the decision.
            let _ = SECRET_INODES.insert(key, r, 0);
            (r.index, open_flags::BY_NAME)
        }
    };
    let found = opaque(secret as u64 | (flags as u64) << 32);
    let (secret, flags) = (found as u32, (found >> 32) as u8);
    // Opens by processes outside cgroup_root are not judged (as with fanotify).
    let level = lsm_setting(lsm_config::CGROUP_ROOT_LEVEL);
    if level != 0
        && unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) }
            != lsm_setting(lsm_config::CGROUP_ROOT_ID)
    {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let start = leader_start();
    // The daemon's start time is known to it in clock ticks (USER_HZ 100): /proc's unit.
    if tgid as u64 == lsm_setting(lsm_config::DAEMON_TGID)
        && start / 10_000_000 == lsm_setting(lsm_config::DAEMON_START_NS)
    {
        return 0;
    }
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // Its own entry (one lookup: the pointer also takes the taint), or (once an entry could
    // not be written) its nearest ancestor's.
    let own = PROC_GRANTS.get_ptr_mut(tgid);
    let entry = match own {
        Some(p) => Some(unsafe { *p }),
        None => inherited_entry(),
    };
    let held = entry.is_some();
    let subject = entry.unwrap_or_default();
    let without_grant = SECRETS.get(secret).map_or(action::ALERT, |s| s.action as u8);
    let enforce = config(config::ENFORCE) != 0;
    let j = judge_open(&Maps, held.then_some(&subject), secret, without_grant, now, enforce);
    // What follows is verified once, not once per way the judge got its answer.
    let packed = opaque(
        j.verdict as u64 | (j.action as u64) << 8 | (j.revoke as u64) << 16 | (j.slot as u64) << 32,
    );
    let j = OpenJudgement {
        verdict: packed as u8,
        action: (packed >> 8) as u8,
        revoke: (packed >> 16) as u8 & 1 == 1,
        slot: (packed >> 32) as u32,
        reason: enforcer_common::reason::GRANT,
        taint: 0,
    };
    let taint = if j.lets_through() { 1u64 << (secret & 63) } else { 0 };
    let revoked_now = apply(&j, taint, tgid, start, &subject, own);
    if j.action == action::KILL {
        unsafe { bpf_send_signal(SIGKILL) };
    }
    // The record, written in place: allowed opens to EVENTS (batched wakeups), violations to
    // ALERTS (the daemon is woken now).
    let (reserved, wake, drops) = if j.verdict == verdict::ALLOWED {
        (EVENTS.reserve::<FileOpenRecord>(0), submit_flags(), counter::RINGBUF_DROPS)
    } else {
        (ALERTS.reserve::<FileOpenRecord>(0), WAKEUP_NOW, counter::ALERT_DROPS)
    };
    match reserved {
        Some(mut entry) => {
            let r = entry.as_mut_ptr();
            let ug = bpf_get_current_uid_gid();
            // SAFETY: `r` is this program's reserved, exclusively owned ring-buffer record;
            // every field is written before it is submitted.
            unsafe {
                (*r).kind = kind::FILE_OPEN;
                (*r).tgid = tgid;
                (*r).tid = pid_tgid as u32;
                (*r).uid = ug as u32;
                (*r).secret = secret;
                (*r).grant_slot = j.slot;
                (*r).verdict = j.verdict;
                (*r).action = j.action;
                (*r).revoked_now = revoked_now;
                (*r).flags = flags;
                (*r)._pad = 0;
                (*r).inode = key;
                (*r).dir = name.dir;
                (*r).cgroup_id = bpf_get_current_cgroup_id();
                (*r).boot_ns = now;
                (*r).subject = subject;
                let dst = core::ptr::addr_of_mut!((*r).name) as *mut u8;
                if flags & open_flags::BY_NAME != 0 {
                    core::ptr::copy_nonoverlapping(name.name.as_ptr(), dst, NAME_LEN);
                } else if name_ptr == 0
                    || bpf_probe_read_kernel_str(dst.cast(), NAME_LEN as u32, name_ptr as *const _)
                        < 0
                {
                    *dst = 0;
                }
            }
            entry.submit(wake);
            count(counter::EVENTS);
        }
        None => count(drops),
    }
    if j.lets_through() { 0 } else { -EPERM }
}

/// The judgement's state changes, before the open returns: a revoke-on-violation flips the
/// grant, an open that goes ahead taints the opener (creating its entry; `own` is its
/// entry when it has one) and every grant it holds (the grant's whole subtree). Bits already
/// set are not written again. Returns 1 when the grant was revoked now.
#[inline(always)]
fn apply(
    j: &OpenJudgement,
    taint: u64,
    tgid: u32,
    start: u64,
    pg: &ProcGrants,
    own: Option<*mut ProcGrants>,
) -> u8 {
    let mut revoked_now = 0;
    if j.revoke
        && let Some(g) = GRANTS.get_ptr_mut(j.slot)
    {
        let g = unsafe { &mut *g };
        if g.state == grant_state::ACTIVE {
            g.state = grant_state::REVOKED;
            revoked_now = 1;
        }
    }
    if taint == 0 {
        return revoked_now;
    }
    match own {
        Some(p) => unsafe {
            if (*p).taint & taint != taint {
                (*p).taint |= taint;
            }
        },
        None => {
            let entry = ProcGrants { start_ns: start, taint, ..Default::default() };
            if PROC_GRANTS.insert(tgid, entry, 0).is_err() {
                count(counter::STATE_FULL);
            }
        }
    }
    for i in 0..enforcer_common::MAX_PROC_GRANTS {
        let slot = pg.grants[i];
        if slot == 0 {
            continue;
        }
        add_taint(&GRANT_TAINT, slot, taint);
    }
    // ... and every process of its `[[agent]]` tree.
    if pg.tree != 0 {
        add_taint(&AGENT_TAINT, pg.tree, taint);
    }
    revoked_now
}

/// ORs `taint` into `map[key]` (creating it), writing only when a bit is missing.
#[inline(always)]
fn add_taint(map: &HashMap<u32, u64>, key: u32, taint: u64) {
    match map.get_ptr_mut(key) {
        Some(t) => unsafe {
            if *t & taint != taint {
                *t |= taint;
            }
        },
        None => {
            if map.insert(key, taint, 0).is_err() {
                count(counter::STATE_FULL);
            }
        }
    }
}

/// `v`, unknown to the verifier (read back through a helper): the paths that computed it
/// join into one state, so the code after is verified once instead of once per path. A
/// read of our own stack cannot fail; if it did, the answer is a denial.
#[inline(always)]
fn opaque(v: u64) -> u64 {
    unsafe { bpf_probe_read_kernel(&v as *const u64) }.unwrap_or(OPAQUE_FAILED)
}

/// `opaque`'s answer when the read fails: verdict OUT_OF_INTENT, action DENY, no slot (and,
/// as a secret index, one no secret has).
const OPAQUE_FAILED: u64 =
    (verdict::OUT_OF_INTENT as u64) | (action::DENY as u64) << 8 | 0xFFFF << 16;

#[inline(always)]
fn lsm_setting(index: u32) -> u64 {
    LSM_CONFIG.get(index).copied().unwrap_or(0)
}

/// Boot-clock start time of the current process (its thread-group leader).
#[inline(always)]
fn leader_start() -> u64 {
    let task = unsafe { bpf_get_current_task_btf() } as u64;
    let leader = read_u64(task, TASK_LEADER_OFF.load()).unwrap_or(0);
    read_u64(leader, TASK_START_OFF.load()).unwrap_or(0)
}
