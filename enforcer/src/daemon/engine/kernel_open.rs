//! Secret opens judged by the BPF-LSM program: the decision was applied in the kernel
//! before the open returned (EPERM, taint, revoke-on-violation, SIGKILL); the daemon
//! attributes the record, explains the kernel's judgement, cross-checks it against its own
//! replay of the shared open judge on the same facts, and emits the `file_open` event.
use enforcer_common::{InodeKey, ProcGrants, open::OpenJudgement, reason};

use super::{Engine, grant_ref, wall_time_of};
use crate::decide::{self, Action, SubjectState, Verdict};
use crate::event::FileRef;
use crate::kernel::lsm::user_dev;
use crate::policy::SecretKind;
use crate::records::KernelOpen;

impl Engine {
    pub(super) fn on_kernel_open(&mut self, o: KernelOpen) {
        self.counts.file_opens += 1;
        let (process, known) = self.process_ref_with(o.tgid, Some(o.uid), Some(o.cgroup_id));
        let when = wall_time_of(o.boot_ns);
        let view = self.grants.view.load();
        let secret = view
            .secret_name(o.secret)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("secret-index-{}", o.secret));
        let mut subject = if o.subject == ProcGrants::default() {
            SubjectState::default()
        } else {
            view.subject_state(Some(o.subject), self.grants.act.revoked(&view), when)
        };
        subject.known = known;
        let without_grant = view.without_grant(&secret);
        let held = subject.held.iter().position(|g| g.slot == o.grant_slot && o.grant_slot != 0);
        let theirs = OpenJudgement {
            verdict: o.verdict,
            slot: held.map_or(0, |i| i as u32 + 1),
            action: o.action,
            reason: reason::GRANT,
            taint: 0,
            revoke: o.revoked_now,
        };
        let ours = decide::judge_secret_open(
            &secret,
            without_grant,
            &subject,
            self.mode,
            when,
            Some(o.boot_ns),
        );
        let mut d = decide::explain_open(&theirs, &secret, &subject, self.mode, when);
        if (ours.verdict, ours.slot, ours.action) != (theirs.verdict, theirs.slot, theirs.action) {
            self.counts.decision_mismatches += 1;
            tracing::warn!(pid = o.tgid, kernel = ?theirs, userspace = ?ours, "open judgement mismatch");
            d.decision_path.push(format!(
                "kernel judged {} (action {}); the daemon's replay: {} (action {})",
                d.verdict.as_str(),
                d.action.as_str(),
                decide::verdict_of(ours.verdict).map_or("unknown", |v| v.as_str()),
                decide::action_of(ours.action).as_str(),
            ));
        } else {
            d.decision_path
                .push("decided in the kernel (BPF-LSM); the daemon's replay agrees".into());
        }
        if o.by_name {
            d.decision_path.push(
                "a new inode at the secret's path: judged by directory and name, watched from now on"
                    .into(),
            );
        }
        if d.action == Action::Killed {
            d.decision_path.push("open refused and SIGKILL sent in the kernel".into());
        }
        if o.revoked_now {
            d.decision_path
                .push("grant revoked in the kernel on this violation (revoke_on_violation)".into());
        }
        let dir = InodeKey { dev: o.dir.0, ino: o.dir.1 };
        let path = match self.kernel_dirs.get(&dir) {
            Some(p) => p.join(&o.name).display().to_string(),
            None => o.name.clone(),
        };
        let kind = self.secret_kinds.get(&secret).copied().unwrap_or(SecretKind::CredentialsFile);
        let mut e = self.event("file_open", &d, process);
        e.time = crate::event::rfc3339(when);
        e.grant = grant_ref(&d, &subject.held);
        e.mitre = vec![match kind {
            SecretKind::PrivateKey => "T1552.004".into(),
            _ => "T1552.001".into(),
        }];
        e.file = Some(FileRef { path, dev: user_dev(o.inode.0), ino: o.inode.1, secret });
        self.emit(e);
        // Ending a misused grant: revoked in the kernel already, or its holder killed.
        let grant = d.grant.and_then(|i| subject.held.get(i)).filter(|g| g.slot != 0);
        if let Some(g) = grant.filter(|_| d.verdict != Verdict::Allowed) {
            if o.revoked_now {
                self.grants.act.revoke(&view, g.slot, "revoke_on_violation", when);
            } else if d.action == Action::Killed {
                let now = chrono::Utc::now();
                self.grants.act.revoke(&view, g.slot, "holder killed on violation", now);
            }
        }
    }
}
