//! The secret-open judge: the one decision for an open of a watched secret, compiled into the
//! BPF-LSM `file_open` program (`enforcer-ebpf/src/lsm.rs`) and called by the daemon's
//! `decide/` for the fanotify backend, so both backends follow the same rules and the
//! daemon's table tests exercise the code the kernel runs.
//!
//! Like [`crate::judge::judge`] it reads grants through [`Facts`] (only `grant` is used),
//! takes the clock as an argument (boot clock, compared with each grant's deadline: an open
//! one nanosecond late is expired) and writes nothing; the caller applies the taint and a
//! revoke it asks for.
//!
//! Rules, in order:
//! 1. No grant held (no map entry, or none of its slots is a grant): `NO_GRANT`, with the
//!    secret's own no-grant action (the strictest on_violation among the intents covering it).
//! 2. An active, unexpired held grant covers the secret: `ALLOWED`.
//! 3. Else the first covering grant that was revoked: `REVOKED`; else the first covering one
//!    (expired): `EXPIRED`; the action is that grant's intent's on_violation.
//! 4. Else (grants held, none covers the secret): `OUT_OF_INTENT` against the first held
//!    grant, with its on_violation.
//!
//! A violation's action is never "allowed"; monitor mode only alerts. Unless the open is
//! refused (deny, kill), the opener is tainted by the secret (`taint`).
use crate::{
    GrantInfo, MAX_PROC_GRANTS, ProcGrants, action, grant_flags, grant_state, judge::Facts, reason,
    verdict,
};

/// The open judge's answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenJudgement {
    /// `verdict::ALLOWED`, `NO_GRANT`, `EXPIRED`, `REVOKED` or `OUT_OF_INTENT`.
    pub verdict: u8,
    /// The grant slot decided against (0 = none).
    pub slot: u32,
    /// `action::*` to apply.
    pub action: u8,
    /// `reason::GRANT` for every violation (opens are judged by grants only).
    pub reason: u8,
    /// Taint bits to OR into the opener (0 when the open is refused).
    pub taint: u64,
    /// The grant in `slot` ends now (revoke_on_violation on an active grant).
    pub revoke: bool,
}

impl OpenJudgement {
    /// Whether the open goes ahead (allowed, or a violation that only alerts).
    #[inline(always)]
    pub fn lets_through(&self) -> bool {
        self.action != action::DENY && self.action != action::KILL
    }
}

/// The verdict for the process with map entry `proc` (None: no entry, it holds nothing)
/// opening the secret with index `secret` (its taint bit) whose no-grant action is
/// `without_grant` (`action::*`), at `now_ns` (boot clock), in enforce mode or not.
#[inline(always)]
pub fn judge_open<F: Facts>(
    facts: &F,
    proc: Option<&ProcGrants>,
    secret: u32,
    without_grant: u8,
    now_ns: u64,
    enforce: bool,
) -> OpenJudgement {
    let bit = if secret < 64 { 1u64 << secret } else { 0 };
    let mut j = OpenJudgement {
        verdict: verdict::NO_GRANT,
        slot: 0,
        action: without_grant,
        reason: reason::GRANT,
        taint: 0,
        revoke: false,
    };
    let mut first_slot = 0u32;
    let mut first_info = (0u32, false);
    let mut live_slot = 0u32;
    let mut revoked_slot = 0u32;
    let mut revoked_info = (0u32, false);
    let mut expired_slot = 0u32;
    let mut expired_info = (0u32, false);
    if let Some(pg) = proc {
        for i in 0..MAX_PROC_GRANTS {
            let slot = pg.grants[i];
            if slot == 0 {
                continue;
            }
            let Some(g) = facts.grant(slot) else { continue };
            if first_slot == 0 {
                first_slot = slot;
                first_info = (g.action, revocable(&g));
            }
            if g.secrets & bit == 0 {
                continue;
            }
            if g.state == grant_state::ACTIVE && now_ns < g.expires_ns {
                if live_slot == 0 {
                    live_slot = slot;
                }
            } else if g.state == grant_state::REVOKED {
                if revoked_slot == 0 {
                    revoked_slot = slot;
                    revoked_info = (g.action, false);
                }
            } else if expired_slot == 0 {
                expired_slot = slot;
                expired_info = (g.action, revocable(&g));
            }
        }
    }
    if live_slot != 0 {
        j.verdict = verdict::ALLOWED;
        j.slot = live_slot;
        j.action = action::ALLOWED;
        j.taint = bit;
        return j;
    }
    if revoked_slot != 0 {
        j.verdict = verdict::REVOKED;
        j.slot = revoked_slot;
        j.action = revoked_info.0 as u8;
        j.revoke = revoked_info.1;
    } else if expired_slot != 0 {
        j.verdict = verdict::EXPIRED;
        j.slot = expired_slot;
        j.action = expired_info.0 as u8;
        j.revoke = expired_info.1;
    } else if first_slot != 0 {
        j.verdict = verdict::OUT_OF_INTENT;
        j.slot = first_slot;
        j.action = first_info.0 as u8;
        j.revoke = first_info.1;
    }
    if j.action == action::ALLOWED || j.action > action::KILL {
        j.action = action::ALERT;
    }
    // Monitor mode only alerts (a revoke_on_violation still ends the grant, as for connects).
    if !enforce {
        j.action = action::ALERT;
    }
    if j.lets_through() {
        j.taint = bit;
    }
    j
}

/// Whether a violation against `g` ends it now (revoke_on_violation on an active grant).
#[inline(always)]
fn revocable(g: &GrantInfo) -> bool {
    g.flags & grant_flags::REVOKE_ON_VIOLATION != 0 && g.state == grant_state::ACTIVE
}
