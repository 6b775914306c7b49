//! The decision: one pure function from a use (a secret-file open or a connection) and
//! the policy state to a verdict, an action and the path of checks that led there.
//! No I/O, no clock: the caller passes `now`. The kernel fast path must agree with it.
use crate::policy::Mode;

/// What was used.
#[derive(Debug, Clone, PartialEq)]
pub enum Use {
    /// Open of a file that resolves to a watched secret.
    SecretOpen { secret: String },
    /// Outbound connection or datagram.
    Connect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
// Expired, Revoked and OutOfIntent are decided once grants exist (mint issue).
#[allow(dead_code)]
pub enum Verdict {
    Allowed,
    NoGrant,
    Expired,
    Revoked,
    OutOfIntent,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::NoGrant => "no_grant",
            Verdict::Expired => "expired",
            Verdict::Revoked => "revoked",
            Verdict::OutOfIntent => "out_of_intent",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
// Denied and Killed are applied by enforcement (enforce issue).
#[allow(dead_code)]
pub enum Action {
    Allowed,
    Alerted,
    Denied,
    Killed,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allowed => "allowed",
            Action::Alerted => "alerted",
            Action::Denied => "denied",
            Action::Killed => "killed",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub verdict: Verdict,
    pub action: Action,
    pub decision_path: Vec<String>,
}

/// Decides one use by a process that holds no grant (grants arrive with the mint issue;
/// until then a subject never holds one). A secret used without a grant is `no_grant`;
/// a plain connection of an unselected process is `allowed`.
pub fn decide(u: &Use, subject_known: bool, mode: Mode) -> Decision {
    let mut path = vec![if subject_known { "subject resolved" } else { "subject unresolved (exited before attribution)" }.to_string()];
    path.push("grants considered: 0".into());
    match u {
        Use::SecretOpen { secret } => {
            path.push(format!("secret {secret:?} requires a grant"));
            path.push("no grant covers it".into());
            // Inline denial needs an intent's on_violation; without one the use is alerted.
            path.push(format!("mode {}: alert", mode_name(mode)));
            Decision { verdict: Verdict::NoGrant, action: Action::Alerted, decision_path: path }
        }
        Use::Connect => {
            path.push("no secret held and process not under an agent selector".into());
            Decision { verdict: Verdict::Allowed, action: Action::Allowed, decision_path: path }
        }
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Monitor => "monitor",
        Mode::Enforce => "enforce",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let secret = Use::SecretOpen { secret: "deploy-key".into() };
        let cases: &[(&Use, bool, Mode, Verdict, Action)] = &[
            (&secret, true, Mode::Monitor, Verdict::NoGrant, Action::Alerted),
            (&secret, false, Mode::Monitor, Verdict::NoGrant, Action::Alerted),
            (&secret, true, Mode::Enforce, Verdict::NoGrant, Action::Alerted),
            (&Use::Connect, true, Mode::Monitor, Verdict::Allowed, Action::Allowed),
            (&Use::Connect, true, Mode::Enforce, Verdict::Allowed, Action::Allowed),
        ];
        for (u, known, mode, verdict, action) in cases {
            let d = decide(u, *known, *mode);
            assert_eq!((d.verdict, d.action), (*verdict, *action), "{u:?} known={known} {mode:?}");
            assert!(!d.decision_path.is_empty());
        }
    }

    #[test]
    fn path_names_the_secret_and_unresolved_subject() {
        let d = decide(&Use::SecretOpen { secret: "k".into() }, false, Mode::Monitor);
        assert!(d.decision_path[0].starts_with("subject unresolved"));
        assert!(d.decision_path.iter().any(|s| s.contains("\"k\"")));
    }
}
