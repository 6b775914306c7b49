//! The secret-open judge: the one decision for an open of a watched secret, compiled into the
//! BPF-LSM `file_open` program (`enforcer-ebpf/src/lsm.rs`) and called by the daemon's
//! `decide/` for the fanotify backend, so both backends follow the same rules and the
//! daemon's table tests exercise the code the kernel runs.
//!
//! Like [`crate::judge::judge`] it reads grants through [`OpenFacts`],
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
    GrantInfo, MAX_PROC_GRANTS, ProcGrants, action, grant_flags, grant_state, reason, verdict,
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

/// What the open judge reads: grants by slot. Each lookup is a map read in the kernel.
pub trait OpenFacts {
    /// The grant in `slot` (None: no such grant).
    fn grant(&self, slot: u32) -> Option<GrantInfo>;
    /// The same value: in the kernel, one the verifier cannot see through, so the paths
    /// that computed it merge and the rest of the judge is verified once per held slot
    /// rather than once per combination of earlier outcomes.
    #[inline(always)]
    fn settle(&self, v: u64) -> u64 {
        v
    }
}

/// Per held slot, the judge remembers only positions (0..MAX_PROC_GRANTS, or NONE), packed
/// in one u64: the first held grant, the first live covering one, the first revoked
/// covering one, the first expired covering one.
const NONE: u64 = 7;
const FIRST: u32 = 0;
const LIVE: u32 = 3;
const REVOKED: u32 = 6;
const EXPIRED: u32 = 9;

#[inline(always)]
fn pos(acc: u64, field: u32) -> u64 {
    (acc >> field) & 7
}

#[inline(always)]
fn set(acc: u64, field: u32, i: u64) -> u64 {
    if pos(acc, field) == NONE { (acc & !(7 << field)) | (i << field) } else { acc }
}

/// The verdict for the process with map entry `proc` (None: no entry, it holds nothing)
/// opening the secret with index `secret` (its taint bit) whose no-grant action is
/// `without_grant` (`action::*`), at `now_ns` (boot clock), in enforce mode or not.
#[inline(always)]
pub fn judge_open<F: OpenFacts>(
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
    let grants = match proc {
        Some(pg) => pg.grants,
        None => [0; MAX_PROC_GRANTS],
    };
    let mut acc: u64 = NONE << FIRST | NONE << LIVE | NONE << REVOKED | NONE << EXPIRED;
    for (i, &slot) in grants.iter().enumerate() {
        if slot == 0 {
            continue;
        }
        let Some(g) = facts.grant(slot) else { continue };
        acc = set(acc, FIRST, i as u64);
        if g.secrets & bit != 0 {
            let field = if g.state == grant_state::ACTIVE && now_ns < g.expires_ns {
                LIVE
            } else if g.state == grant_state::REVOKED {
                REVOKED
            } else {
                EXPIRED
            };
            acc = set(acc, field, i as u64);
        }
        acc = facts.settle(acc);
    }
    // Precedence: live > revoked > expired > out_of_intent against the first held grant.
    let (field, v) = if pos(acc, LIVE) != NONE {
        (LIVE, verdict::ALLOWED)
    } else if pos(acc, REVOKED) != NONE {
        (REVOKED, verdict::REVOKED)
    } else if pos(acc, EXPIRED) != NONE {
        (EXPIRED, verdict::EXPIRED)
    } else if pos(acc, FIRST) != NONE {
        (FIRST, verdict::OUT_OF_INTENT)
    } else {
        (FIRST, verdict::NO_GRANT)
    };
    let at = pos(acc, field) as usize;
    if v != verdict::NO_GRANT && at < MAX_PROC_GRANTS {
        let slot = grants[at];
        let Some(g) = facts.grant(slot) else {
            // Removed between the two reads: judged as holding nothing.
            return finish(j, bit, enforce);
        };
        j.verdict = v;
        j.slot = slot;
        if v == verdict::ALLOWED {
            j.action = action::ALLOWED;
            j.taint = bit;
            return j;
        }
        j.action = g.action as u8;
        j.revoke = revocable(&g);
    }
    finish(j, bit, enforce)
}

/// A violation's action is never "allowed"; monitor mode only alerts (a
/// revoke_on_violation still ends the grant, as for connects); an open that goes ahead
/// taints the opener.
#[inline(always)]
fn finish(mut j: OpenJudgement, bit: u64, enforce: bool) -> OpenJudgement {
    if j.action == action::ALLOWED || j.action > action::KILL {
        j.action = action::ALERT;
    }
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
