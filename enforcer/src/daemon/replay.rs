//! The cross-check of every connect: the kernel's judgement, read back from its record in
//! the layout `decide::explain` reads, against the daemon's replay of the shared judge on
//! the same facts.
use enforcer_common::judge::Judgement;

use crate::decide::SubjectState;
use crate::mint::view::GrantView;
use crate::records::Connect;

/// The kernel's judgement from its record, in the layout `decide::explain` reads: the grant
/// as an index (+1) into `subject.held`, the tainting secret as an index (+1) into
/// `subject.taint`.
pub(super) fn kernel_judgement(c: &Connect, subject: &SubjectState, view: &GrantView) -> Judgement {
    let slot = subject.held.iter().position(|g| g.slot == c.grant_slot && c.grant_slot != 0);
    let secret = (c.taint_secret as usize)
        .checked_sub(1)
        .and_then(|i| view.secret_name(i as u32))
        .and_then(|name| subject.taint.iter().position(|t| t.secret == name));
    Judgement {
        verdict: c.verdict,
        slot: slot.map_or(0, |i| i as u32 + 1),
        action: c.action,
        reason: c.reason,
        taint_secret: secret.map_or(0, |i| i as u8 + 1),
        revoke: c.revoked_now == 1,
        taint: c.subject.taint,
    }
}

/// Verdict, grant, action, reason and tainting secret all agree.
pub(super) fn same_judgement(a: &Judgement, b: &Judgement) -> bool {
    (a.verdict, a.slot, a.action, a.reason, a.taint_secret)
        == (b.verdict, b.slot, b.action, b.reason, b.taint_secret)
}

/// The kernel slot behind a judgement's grant index (0: none).
pub(super) fn slot_of(subject: &SubjectState, index: u32) -> u32 {
    (index as usize).checked_sub(1).and_then(|i| subject.held.get(i)).map_or(0, |g| g.slot)
}
