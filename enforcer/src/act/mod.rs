//! Applying a decision: deny, kill, revoke, taint, straight to the kernel. Nothing here
//! waits for the mint: a revoke flips the grant's state in the GRANTS map (the kernel judges
//! it revoked from that instant) and then tells the registry, which records it in the
//! ledger off the decision path.

use anyhow::Result;
use chrono::Utc;
use enforcer_common::ProcGrants;
use tokio::sync::mpsc::UnboundedSender;

use crate::decide::Action;
use crate::kernel::grants::ActMaps;
use crate::mint::registry::Notice;
use crate::mint::view::{GrantView, RevokedHere};

pub struct Actor {
    maps: ActMaps,
    notices: UnboundedSender<Notice>,
    /// Slots revoked here that the published view may not show yet; decisions treat them
    /// as revoked, as the kernel already does.
    revoked: RevokedHere,
}

impl Actor {
    pub fn new(maps: ActMaps, notices: UnboundedSender<Notice>) -> Self {
        Actor { maps, notices, revoked: RevokedHere::new() }
    }

    /// What the kernel holds for `pid` now.
    pub fn state_of(&self, pid: u32) -> Option<ProcGrants> {
        self.maps.state_of(pid)
    }

    /// Slots revoked by enforcement, for `GrantView::subject_state`. Entries the view
    /// has caught up with (revoked there, or gone) are dropped.
    pub fn revoked(&mut self, view: &GrantView) -> &RevokedHere {
        if !self.revoked.is_empty() {
            self.revoked.retain(|s, _| view.grant(*s).is_some_and(|g| !g.revoked));
        }
        &self.revoked
    }

    /// Taint: marks `pid` as having read the secrets in `bits`, before its open returns (the
    /// opener cannot connect before this lands).
    /// No entry is created for a process that is gone: see `write_state`.
    pub fn taint(&mut self, pid: u32, start_ns: u64, bits: u64) -> Result<()> {
        if bits != 0 {
            write_state(&self.maps, pid, start_ns, bits, 0)?;
            // Taint follows the data: every process of the subtrees of the grants the
            // opener holds is judged by this read too (siblings, a parent shell holding
            // `$(cat secret)`, children forked before the read).
            if let Some(pg) = self.maps.state_of(pid) {
                self.maps.taint_grants(&pg.grants, bits)?;
                // ... and every process of its `[[agent]]` tree, grants or not.
                if pg.tree != 0 {
                    self.maps.taint_tree(pg.tree, bits)?;
                }
            }
        }
        Ok(())
    }

    /// Revoke: an active grant `slot` is revoked in the kernel now; the registry and ledger
    /// learn it asynchronously. `reason` goes to the ledger and the grant_revoked event. A
    /// grant already ended (revoked, expired, or gone) is left as it is.
    /// `at`: when the kernel judges it revoked from (the violating record's time when the
    /// kernel flipped it itself; now otherwise).
    pub fn revoke(
        &mut self,
        view: &GrantView,
        slot: u32,
        reason: &'static str,
        at: chrono::DateTime<Utc>,
    ) {
        let active = view.grant(slot).is_some_and(|g| !g.revoked && g.expires_at > Utc::now());
        if !active || self.revoked.contains_key(&slot) {
            return;
        }
        match self.maps.revoke(slot) {
            Ok(()) => {
                self.revoked.insert(slot, at);
            }
            // Gone from the kernel: its last holder exited and the registry reaped it.
            Err(e) => tracing::warn!("revoke grant slot {slot}: {e:#}"),
        }
        let _ = self.notices.send(Notice::Revoked { slot, reason, at });
    }
}

/// Deny: whether the use is refused. For an open this is the answer to the waiting
/// process; for a connect the kernel has already refused it.
pub fn denies(action: Action) -> bool {
    matches!(action, Action::Denied | Action::Killed)
}

/// Kill: SIGKILL through a pidfd. For an open the process is still waiting in open(), so
/// the pid is certainly its; for a connect (already denied in the kernel) the kill follows
/// within milliseconds. What happened goes to the decision path; a kill that could not be
/// carried out (the process lives on) is returned, for an alert of its own.
pub fn kill(pid: u32, path: &mut Vec<String>) -> Option<std::io::Error> {
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            path.push(format!("kill: process {pid} already gone"));
            return None;
        }
        path.push(format!("kill of {pid} failed: {e}"));
        return Some(e);
    }
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd as libc::c_int,
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    let err = (r != 0).then(std::io::Error::last_os_error);
    unsafe { libc::close(fd as libc::c_int) };
    match err {
        None => {
            path.push(format!("killed process {pid} (SIGKILL)"));
            None
        }
        Some(e) if e.raw_os_error() == Some(libc::ESRCH) => {
            path.push(format!("kill: process {pid} exited first"));
            None
        }
        Some(e) => {
            path.push(format!("kill of {pid} failed: {e}"));
            Some(e)
        }
    }
}

/// What `write_state` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Merged into the entry the process already had.
    Merged,
    /// Created the process's entry (it had none).
    Created,
    /// The process is gone (or is not the one meant): nothing is left in the map.
    Gone,
}

/// ORs taint bits and flags into `pid`'s PROC_GRANTS entry without ever leaving an entry for
/// a process that is gone (which a reused pid would inherit, and which fills the map):
/// an existing entry is updated in place (BPF_EXIST: if the exit hook removes it meanwhile
/// it stays removed); with none, the entry is created only once a pidfd shows the process
/// alive with the start time `start_ns` (0: whatever process holds the pid now), and is
/// removed again if the process exited meanwhile (its exit hook may have run before the
/// insert).
pub fn write_state(
    maps: &ActMaps,
    pid: u32,
    start_ns: u64,
    taint: u64,
    flags: u32,
) -> Result<Written> {
    for _ in 0..4 {
        if maps.merge_existing(pid, taint, flags)? {
            return Ok(Written::Merged);
        }
        let Some((pidfd, live_start)) = same_live_process(pid, start_ns) else {
            return Ok(Written::Gone);
        };
        let start = if start_ns != 0 { start_ns } else { live_start };
        if !maps.create(pid, start, taint, flags)? {
            // Created by the fork hook or a bind in between: merge into it.
            continue;
        }
        if gone_or_going(&pidfd, pid) {
            maps.remove_if(pid, start);
            return Ok(Written::Gone);
        }
        return Ok(Written::Created);
    }
    Ok(if maps.merge_existing(pid, taint, flags)? { Written::Merged } else { Written::Gone })
}

/// A pidfd on a process: it tells whether *that* process has exited, whatever reuses its pid.
pub struct Pidfd(std::os::fd::OwnedFd);

impl Pidfd {
    pub fn open(pid: u32) -> Option<Pidfd> {
        use std::os::fd::FromRawFd;
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
        // SAFETY: a fresh fd owned by nothing else.
        (fd >= 0).then(|| Pidfd(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// The whole process has exited (a zombie or reaped): its exit hook has run.
    pub fn exited(&self) -> bool {
        self.exits_within(0)
    }

    /// Waits up to `ms` for the process to exit; whether it did.
    pub fn exits_within(&self, ms: i32) -> bool {
        use std::os::fd::AsRawFd;
        let mut p = libc::pollfd { fd: self.0.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        r != 0
    }
}

/// PF_EXITING in /proc/<pid>/stat (field 9): the thread-group leader is in do_exit, where the
/// exit hook runs before the process shows as exited.
fn exiting(pid: u32) -> bool {
    const PF_EXITING: u64 = 0x4;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return true };
    let Some(close) = stat.rfind(')') else { return true };
    let flags = stat[close + 1..].split_whitespace().nth(9 - 3).and_then(|f| f.parse::<u64>().ok());
    flags.is_none_or(|f| f & PF_EXITING != 0)
}

/// The process has exited, or is exiting and does so within 100 ms (a leader that left
/// early while its threads run does not: it is kept as alive).
fn gone_or_going(pidfd: &Pidfd, pid: u32) -> bool {
    pidfd.exited() || (exiting(pid) && pidfd.exits_within(100))
}

/// Start times from /proc are in clock ticks, the kernel's in ns: equal within this.
fn start_tolerance_ns() -> u64 {
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    2 * (1_000_000_000 / hz)
}

/// Whether a start time (ns, boot clock) describes the process that started at `live_ns`
/// (from /proc, clock-tick precision).
pub fn same_start(start_ns: u64, live_ns: u64) -> bool {
    start_ns.abs_diff(live_ns) <= start_tolerance_ns()
}

/// `pid` is a live process (pidfd open, not exited after its /proc start time was read)
/// started at `start_ns` (unchecked when 0): its pidfd and its /proc start time.
pub fn same_live_process(pid: u32, start_ns: u64) -> Option<(Pidfd, u64)> {
    let pidfd = Pidfd::open(pid)?;
    let live = crate::proc::start_ns(pid)?;
    // Read while the pidfd showed it alive: the start time is that process's.
    if gone_or_going(&pidfd, pid) || (start_ns != 0 && !same_start(start_ns, live)) {
        return None;
    }
    Some((pidfd, live))
}

/// One pass of the PROC_GRANTS sweep: how many entries there were, how many were stale.
#[derive(Debug, Default, Clone, Copy)]
pub struct Swept {
    pub entries: u64,
    pub removed: u64,
}

/// Removes PROC_GRANTS entries that outlived their process: the tgid no longer exists, the
/// process there started after the entry was written (a reused pid), or the process has
/// exited (a zombie: its exit hook has run, so the entry is a leftover). The entry is
/// re-read before removal, so one a fork wrote since is kept.
pub fn sweep(maps: &ActMaps) -> Swept {
    let entries = maps.entries();
    let mut removed = 0;
    for &(pid, start) in &entries {
        let stale = match Pidfd::open(pid) {
            // No pidfd: gone, unless /proc still shows it (the open failed otherwise).
            None => crate::proc::start_ns(pid).is_none(),
            Some(fd) => match crate::proc::start_ns(pid) {
                None => true,
                Some(live) => fd.exited() || start.saturating_add(start_tolerance_ns()) < live,
            },
        };
        if stale && maps.remove_if(pid, start) {
            removed += 1;
        }
    }
    // Trees whose last member is gone: their taint can judge no one (a reused tgid that
    // roots a new tree starts clean).
    let _ = maps.sweep_trees();
    Swept { entries: entries.len() as u64 - removed, removed }
}
