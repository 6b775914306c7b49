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
    pub fn taint(&mut self, pid: u32, start_ns: u64, bits: u64) -> Result<()> {
        if bits != 0 {
            self.maps.add_taint(pid, start_ns, bits)?;
        }
        Ok(())
    }

    /// Revoke: an active grant `slot` is revoked in the kernel now; the registry and ledger
    /// learn it asynchronously. `reason` goes to the ledger and the grant_revoked event. A
    /// grant already ended (revoked, expired, or gone) is left as it is.
    pub fn revoke(&mut self, view: &GrantView, slot: u32, reason: &'static str) {
        let active = view.grant(slot).is_some_and(|g| !g.revoked && g.expires_at > Utc::now());
        if !active || self.revoked.contains_key(&slot) {
            return;
        }
        match self.maps.revoke(slot) {
            Ok(()) => {
                self.revoked.insert(slot, Utc::now());
            }
            // Gone from the kernel: its last holder exited and the registry reaped it.
            Err(e) => tracing::warn!("revoke grant slot {slot}: {e:#}"),
        }
        let _ = self.notices.send(Notice::Revoked { slot, reason });
    }
}

/// Deny: whether the use is refused. For an open this is the answer to the waiting
/// process; for a connect the kernel has already refused it.
pub fn denies(action: Action) -> bool {
    matches!(action, Action::Denied | Action::Killed)
}

/// Kill: SIGKILL through a pidfd. For an open the process is still waiting in open(), so
/// the pid is certainly its; for a connect (already denied in the kernel) the kill follows
/// within milliseconds. What happened goes to the decision path (a failed kill included).
pub fn kill(pid: u32, path: &mut Vec<String>) {
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if fd < 0 {
        path.push(format!("kill: process {pid} already gone"));
        return;
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
    unsafe { libc::close(fd as libc::c_int) };
    path.push(if r == 0 {
        format!("killed process {pid} (SIGKILL)")
    } else {
        format!("kill of {pid} failed: {}", std::io::Error::last_os_error())
    });
}
