//! Secret opens through the shared open judge `enforcer_common::open::judge_open` (the code
//! the BPF-LSM `file_open` program runs): the subject's grants laid out as the kernel maps
//! hold them, the judge run on them, and the judgement explained in words. The fanotify
//! backend decides with this; kernel records of the BPF-LSM backend are explained with it.
use chrono::{DateTime, Utc};
use enforcer_common::open::{OpenFacts, OpenJudgement, judge_open};
use enforcer_common::{GrantInfo, MAX_PROC_GRANTS, ProcGrants, grant_flags, grant_state, verdict};

use super::{
    Decision, Reason, SubjectState, Use, Verdict, action_of, decision, expired_line, late_ms,
    on_violation_of, revoked_line, subject_lines, what,
};
use crate::policy::{Mode, OnViolation};

/// The boot-clock instant that stands for `now` when the judge runs in userspace.
const NOW_NS: u64 = 1 << 62;

/// Held grant `i` in slot `i + 1`; the opened secret is secret index 0.
struct HeldFacts(Vec<GrantInfo>);

impl OpenFacts for HeldFacts {
    fn grant(&self, slot: u32) -> Option<GrantInfo> {
        self.0.get((slot as usize).checked_sub(1)?).copied()
    }
}

/// The shared judge's answer for `subject` opening `secret` at `now`; `now_ns`: the kernel
/// record's boot time when explaining one (grants' kernel deadlines are then compared with
/// it directly). The judgement's slot is an index (+1) into `subject.held`.
pub fn judge_secret_open(
    secret: &str,
    without_grant: OnViolation,
    subject: &SubjectState,
    mode: Mode,
    now: DateTime<Utc>,
    now_ns: Option<u64>,
) -> OpenJudgement {
    let base = now_ns.unwrap_or(NOW_NS);
    let mut proc = ProcGrants::default();
    let mut grants = Vec::new();
    for (i, g) in subject.held.iter().take(MAX_PROC_GRANTS).enumerate() {
        proc.grants[i] = i as u32 + 1;
        let left = (g.expires_at - now).num_nanoseconds().unwrap_or(if g.expires_at > now {
            i64::MAX
        } else {
            i64::MIN
        });
        grants.push(GrantInfo {
            expires_ns: match now_ns {
                Some(_) if g.expires_ns != 0 => g.expires_ns,
                _ => (base as i128 + left as i128).clamp(0, u64::MAX as i128) as u64,
            },
            secrets: g.secrets.iter().any(|s| s == secret) as u64,
            state: if g.revoked { grant_state::REVOKED } else { grant_state::ACTIVE },
            action: g.on_violation.action_code() as u32,
            flags: if g.revoke_on_violation { grant_flags::REVOKE_ON_VIOLATION } else { 0 },
            ..Default::default()
        });
    }
    let held = (!grants.is_empty()).then_some(&proc);
    judge_open(
        &HeldFacts(grants),
        held,
        0,
        without_grant.action_code(),
        now_ns.unwrap_or(NOW_NS),
        mode == Mode::Enforce,
    )
}

/// Decides a secret open with the shared judge and explains it.
pub(super) fn decide_open(
    secret: &str,
    without_grant: OnViolation,
    subject: &SubjectState,
    mode: Mode,
    now: DateTime<Utc>,
) -> Decision {
    let j = judge_secret_open(secret, without_grant, subject, mode, now, None);
    explain_open(&j, secret, subject, mode, now)
}

/// The decision (and its path, in words) for an open judgement whose slot is an index (+1)
/// into `subject.held`.
pub fn explain_open(
    j: &OpenJudgement,
    secret: &str,
    subject: &SubjectState,
    mode: Mode,
    now: DateTime<Utc>,
) -> Decision {
    let u = Use::SecretOpen { secret: secret.to_string(), without_grant: OnViolation::Alert };
    let held = &subject.held;
    let mut path = subject_lines(subject);
    let grant = (j.slot as usize).checked_sub(1).filter(|i| *i < held.len());
    let verdict = match j.verdict {
        verdict::ALLOWED => Verdict::Allowed,
        verdict::EXPIRED => Verdict::Expired,
        verdict::REVOKED => Verdict::Revoked,
        verdict::OUT_OF_INTENT => Verdict::OutOfIntent,
        _ => Verdict::NoGrant,
    };
    let mut d = decision(verdict, action_of(j.action), Vec::new(), grant, Reason::Grant);
    match (verdict, grant) {
        (Verdict::Allowed, Some(i)) => {
            let g = &held[i];
            path.push(format!("grant {} (intent {}) covers {}", g.id, g.intent, what(&u)));
            path.push(format!("grant active until {}", g.expires_at.to_rfc3339()));
            d.reason = Reason::None;
        }
        (Verdict::Revoked, Some(i)) => path.push(revoked_line(&held[i], &u)),
        (Verdict::Expired, Some(i)) => {
            let late = late_ms(&held[i], now);
            path.push(expired_line(&held[i], &u, late));
            d.expired_for_ms = Some(late);
        }
        (Verdict::OutOfIntent, _) => path.push(format!("no held grant covers {}", what(&u))),
        _ => path.push(format!("{} requires a grant; none held", what(&u))),
    }
    if verdict != Verdict::Allowed {
        match mode {
            Mode::Monitor => path.push("mode monitor: alert".into()),
            Mode::Enforce => {
                path.push(format!("mode enforce: on_violation {}", on_violation_of(j.action)));
            }
        }
    }
    d.decision_path = path;
    d
}
