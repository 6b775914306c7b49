//! The decision: one pure function from a use (a secret-file open or a connection), the
//! grants the subject holds and the clock, to a verdict, an action and the ordered checks
//! that led there. No I/O: the caller passes `now`. The kernel's connect hook implements
//! the same rules (enforcer-ebpf/src/connect.rs); the engine checks they agree.
//!
//! Precedence when several grants are held: allowed (an active, unexpired grant covers the
//! use) > revoked (a covering grant was revoked) > expired (a covering grant expired) >
//! out_of_intent (grants are held, none covers the use). Holding no grant: a secret open is
//! `no_grant`; a connection is `allowed` unless the process is an `[[agent]]` (then
//! `out_of_intent`). History counts: a connection otherwise allowed is `out_of_intent` when
//! the process read a secret that is not valid toward it (possible exfiltration).
//!
//! The action of a violation: monitor mode alerts; enforce mode applies the on_violation of
//! the grant's intent, of the tainting secret's strictest intent, or `deny` for agents.
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use ipnet::IpNet;

use crate::policy::{Mode, OnViolation};

/// What was used.
#[derive(Debug, Clone, PartialEq)]
pub enum Use {
    /// `without_grant`: the strictest on_violation among intents covering the secret.
    SecretOpen {
        secret: String,
        without_grant: OnViolation,
    },
    Connect {
        ip: IpAddr,
        port: u16,
    },
}

/// A secret the process (or an ancestor before forking it) opened.
#[derive(Debug, Clone)]
pub struct Taint {
    pub secret: String,
    /// The secret's own destinations (empty: valid wherever a grant covering it is).
    pub destinations: Vec<(IpNet, u16, u16)>,
    pub on_violation: OnViolation,
}

/// Who is using: what the kernel maps say about the process.
#[derive(Debug, Clone, Default)]
pub struct SubjectState {
    pub known: bool,
    pub held: Vec<HeldGrant>,
    pub taint: Vec<Taint>,
    pub agent: bool,
}

/// Why a use is a violation.
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    None,
    Grant,
    /// Tainted by this secret.
    Taint(String),
    Agent,
}

/// A grant as the decision sees it. `destinations` are concrete networks with inclusive
/// port ranges (DNS names already resolved): exactly what the kernel map holds.
#[derive(Debug, Clone)]
pub struct HeldGrant {
    pub id: String,
    pub intent: String,
    pub secrets: Vec<String>,
    pub destinations: Vec<(IpNet, u16, u16)>,
    pub expires_at: DateTime<Utc>,
    pub revoked: bool,
    pub on_violation: OnViolation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
// Denied and Killed are applied by enforcement (the enforce issue).
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
    /// The grant decided against (index into `held`), if any.
    pub grant: Option<usize>,
    /// For `expired`: how long after the deadline the use came.
    pub expired_for_ms: Option<u64>,
    pub reason: Reason,
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn in_nets(nets: &[(IpNet, u16, u16)], ip: IpAddr, port: u16) -> bool {
    let ip = canonical(ip);
    nets.iter().any(|(net, lo, hi)| net.contains(&ip) && *lo <= port && port <= *hi)
}

fn covers(g: &HeldGrant, u: &Use) -> bool {
    match u {
        Use::SecretOpen { secret, .. } => g.secrets.iter().any(|s| s == secret),
        Use::Connect { ip, port } => in_nets(&g.destinations, *ip, *port),
    }
}

/// The action a violation gets.
fn act(mode: Mode, on_violation: OnViolation, path: &mut Vec<String>) -> Action {
    match mode {
        Mode::Monitor => {
            path.push("mode monitor: alert".into());
            Action::Alerted
        }
        Mode::Enforce => {
            path.push(format!("mode enforce: on_violation {on_violation}"));
            match on_violation {
                OnViolation::Alert => Action::Alerted,
                OnViolation::Deny => Action::Denied,
                OnViolation::Kill => Action::Killed,
            }
        }
    }
}

fn what(u: &Use) -> String {
    match u {
        Use::SecretOpen { secret, .. } => format!("secret {secret:?}"),
        Use::Connect { ip, port } => format!("destination {ip} port {port}"),
    }
}

pub fn decide(u: &Use, subject: &SubjectState, mode: Mode, now: DateTime<Utc>) -> Decision {
    let d = decide_grants(u, subject, mode, now);
    match (u, d.verdict) {
        (Use::Connect { ip, port }, Verdict::Allowed) => {
            check_taint(d, *ip, *port, subject, mode, now)
        }
        _ => d,
    }
}

fn decision(
    verdict: Verdict,
    action: Action,
    path: Vec<String>,
    grant: Option<usize>,
    reason: Reason,
) -> Decision {
    Decision { verdict, action, decision_path: path, grant, expired_for_ms: None, reason }
}

fn decide_grants(u: &Use, subject: &SubjectState, mode: Mode, now: DateTime<Utc>) -> Decision {
    let held = &subject.held;
    let mut path = vec![
        if subject.known {
            "subject resolved"
        } else {
            "subject unresolved (exited before attribution)"
        }
        .to_string(),
    ];
    let ids: Vec<&str> = held.iter().map(|g| g.id.as_str()).collect();
    path.push(format!(
        "grants held: {}{}",
        held.len(),
        if ids.is_empty() { String::new() } else { format!(" ({})", ids.join(", ")) }
    ));
    if held.is_empty() {
        return match u {
            Use::SecretOpen { without_grant, .. } => {
                path.push(format!("{} requires a grant; none held", what(u)));
                let action = act(mode, *without_grant, &mut path);
                decision(Verdict::NoGrant, action, path, None, Reason::Grant)
            }
            Use::Connect { .. } if subject.agent => {
                path.push("agent process (selected by [[agent]]) holds no grant".into());
                let action = act(mode, OnViolation::Deny, &mut path);
                decision(Verdict::OutOfIntent, action, path, None, Reason::Agent)
            }
            Use::Connect { .. } => {
                path.push("no grant held: plain connection".into());
                decision(Verdict::Allowed, Action::Allowed, path, None, Reason::None)
            }
        };
    }
    let covering: Vec<usize> = (0..held.len()).filter(|i| covers(&held[*i], u)).collect();
    if covering.is_empty() {
        path.push(format!("no held grant covers {}", what(u)));
        let action = act(mode, held[0].on_violation, &mut path);
        return decision(Verdict::OutOfIntent, action, path, Some(0), Reason::Grant);
    }
    if let Some(&i) = covering.iter().find(|i| !held[**i].revoked && now < held[**i].expires_at) {
        let g = &held[i];
        path.push(format!("grant {} (intent {}) covers {}", g.id, g.intent, what(u)));
        path.push(format!("grant active until {}", g.expires_at.to_rfc3339()));
        return decision(Verdict::Allowed, Action::Allowed, path, Some(i), Reason::None);
    }
    if let Some(&i) = covering.iter().find(|i| held[**i].revoked) {
        path.push(format!(
            "grant {} (intent {}) covers {} but was revoked",
            held[i].id,
            held[i].intent,
            what(u)
        ));
        let action = act(mode, held[i].on_violation, &mut path);
        return decision(Verdict::Revoked, action, path, Some(i), Reason::Grant);
    }
    let i = covering[0];
    let late = (now - held[i].expires_at).num_milliseconds().max(0) as u64;
    path.push(format!(
        "grant {} (intent {}) covers {} but expired {late} ms ago",
        held[i].id,
        held[i].intent,
        what(u)
    ));
    let action = act(mode, held[i].on_violation, &mut path);
    let mut d = decision(Verdict::Expired, action, path, Some(i), Reason::Grant);
    d.expired_for_ms = Some(late);
    d
}

/// A connection allowed by the grants is still a violation if a secret the process read
/// is not valid toward it: its own destinations (when it has any) and a live grant that
/// covers both the secret and the destination.
fn check_taint(
    mut d: Decision,
    ip: IpAddr,
    port: u16,
    subject: &SubjectState,
    mode: Mode,
    now: DateTime<Utc>,
) -> Decision {
    for t in &subject.taint {
        let own_ok = t.destinations.is_empty() || in_nets(&t.destinations, ip, port);
        let granted = subject.held.iter().any(|g| {
            !g.revoked
                && now < g.expires_at
                && g.secrets.contains(&t.secret)
                && in_nets(&g.destinations, ip, port)
        });
        if own_ok && granted {
            continue;
        }
        d.decision_path.push(format!(
            "process read secret {:?}, which is not valid toward {} port {port}{}: possible exfiltration",
            t.secret,
            canonical(ip),
            if !own_ok { " (outside the secret's destinations)" } else { " (no live grant covers it there)" }
        ));
        d.verdict = Verdict::OutOfIntent;
        d.action = act(mode, t.on_violation, &mut d.decision_path);
        d.reason = Reason::Taint(t.secret.clone());
        return d;
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn grant(
        id: &str,
        secrets: &[&str],
        dests: &[&str],
        expires_in_s: i64,
        revoked: bool,
        now: DateTime<Utc>,
    ) -> HeldGrant {
        HeldGrant {
            id: id.into(),
            intent: format!("intent-{id}"),
            secrets: secrets.iter().map(|s| s.to_string()).collect(),
            destinations: dests
                .iter()
                .map(|d| {
                    let (net, ports) = d.split_once(' ').unwrap();
                    let (lo, hi) = ports.split_once('-').unwrap();
                    (net.parse().unwrap(), lo.parse().unwrap(), hi.parse().unwrap())
                })
                .collect(),
            expires_at: now + Duration::seconds(expires_in_s),
            revoked,
            on_violation: OnViolation::Deny,
        }
    }

    #[test]
    fn table() {
        let now = Utc::now();
        let s = |n: &str| Use::SecretOpen { secret: n.into(), without_grant: OnViolation::Alert };
        let c = |ip: &str, port: u16| Use::Connect { ip: ip.parse().unwrap(), port };
        let live = grant("a", &["key"], &["10.0.0.0/8 443-443"], 60, false, now);
        let expired = grant("b", &["key"], &["10.0.0.0/8 443-443"], -2, false, now);
        let revoked = grant("c", &["key"], &["10.0.0.0/8 443-443"], 60, true, now);
        let other = grant("d", &["other"], &["192.0.2.0/24 1-65535"], 60, false, now);
        use Verdict::*;
        let cases: Vec<(&str, Use, Vec<HeldGrant>, Verdict, Option<&str>)> = vec![
            ("no grant, secret", s("key"), vec![], NoGrant, None),
            ("no grant, connect", c("10.1.1.1", 443), vec![], Allowed, None),
            ("live grant, secret", s("key"), vec![live.clone()], Allowed, Some("a")),
            ("live grant, connect", c("10.1.1.1", 443), vec![live.clone()], Allowed, Some("a")),
            (
                "live grant, mapped v6",
                c("::ffff:10.1.1.1", 443),
                vec![live.clone()],
                Allowed,
                Some("a"),
            ),
            (
                "live grant, wrong port",
                c("10.1.1.1", 80),
                vec![live.clone()],
                OutOfIntent,
                Some("a"),
            ),
            (
                "live grant, wrong net",
                c("192.0.2.1", 443),
                vec![live.clone()],
                OutOfIntent,
                Some("a"),
            ),
            ("live grant, other secret", s("other"), vec![live.clone()], OutOfIntent, Some("a")),
            ("expired", s("key"), vec![expired.clone()], Expired, Some("b")),
            ("expired connect", c("10.0.0.1", 443), vec![expired.clone()], Expired, Some("b")),
            ("revoked", s("key"), vec![revoked.clone()], Revoked, Some("c")),
            (
                "revoked beats expired",
                c("10.0.0.1", 443),
                vec![expired.clone(), revoked.clone()],
                Revoked,
                Some("c"),
            ),
            (
                "live beats expired",
                s("key"),
                vec![expired.clone(), live.clone()],
                Allowed,
                Some("a"),
            ),
            (
                "second grant covers",
                s("other"),
                vec![live.clone(), other.clone()],
                Allowed,
                Some("d"),
            ),
            (
                "two grants, none covers",
                c("203.0.113.1", 443),
                vec![live.clone(), other.clone()],
                OutOfIntent,
                Some("a"),
            ),
        ];
        for (name, u, held, verdict, gid) in cases {
            let d = decide(
                &u,
                &SubjectState { known: true, held: held.clone(), ..Default::default() },
                Mode::Monitor,
                now,
            );
            assert_eq!(d.verdict, verdict, "{name}: {:?}", d.decision_path);
            assert_eq!(d.grant.map(|i| held[i].id.as_str()), gid, "{name}");
            let expect_action = if verdict == Allowed { Action::Allowed } else { Action::Alerted };
            assert_eq!(d.action, expect_action, "{name}");
            assert!(d.decision_path.len() >= 3, "{name}: {:?}", d.decision_path);
        }
    }

    #[test]
    fn expiry_is_exact_and_late_ms_reported() {
        let now = Utc::now();
        let mut g = grant("x", &["key"], &[], 0, false, now);
        g.expires_at = now;
        // At the deadline the grant is already expired.
        let key = Use::SecretOpen { secret: "key".into(), without_grant: OnViolation::Alert };
        let subj = SubjectState { known: true, held: vec![g.clone()], ..Default::default() };
        let d = decide(&key, &subj, Mode::Monitor, now);
        assert_eq!(d.verdict, Verdict::Expired);
        assert_eq!(d.expired_for_ms, Some(0));
        let d = decide(&key, &subj, Mode::Monitor, now + Duration::milliseconds(1500));
        assert_eq!(d.expired_for_ms, Some(1500));
    }

    #[test]
    fn enforce_actions_taint_and_agents() {
        let now = Utc::now();
        let c = |ip: &str, port: u16| Use::Connect { ip: ip.parse().unwrap(), port };
        let mut live = grant("a", &["key"], &["10.0.0.0/8 443-443"], 60, false, now);
        live.on_violation = OnViolation::Kill;
        let taint = |dests: &[&str], on: OnViolation| Taint {
            secret: "key".into(),
            destinations: dests.iter().map(|d| (d.parse().unwrap(), 443, 443)).collect(),
            on_violation: on,
        };
        let subj = |held: Vec<HeldGrant>, taint: Vec<Taint>, agent: bool| SubjectState {
            known: true,
            held,
            taint,
            agent,
        };
        use Verdict::*;
        let cases: Vec<(&str, Use, SubjectState, Mode, Verdict, Action, Reason)> = vec![
            (
                "grant violation, enforce kill",
                c("192.0.2.1", 443),
                subj(vec![live.clone()], vec![], false),
                Mode::Enforce,
                OutOfIntent,
                Action::Killed,
                Reason::Grant,
            ),
            (
                "grant violation, monitor",
                c("192.0.2.1", 443),
                subj(vec![live.clone()], vec![], false),
                Mode::Monitor,
                OutOfIntent,
                Action::Alerted,
                Reason::Grant,
            ),
            (
                "no grant open, enforce deny",
                Use::SecretOpen { secret: "key".into(), without_grant: OnViolation::Deny },
                subj(vec![], vec![], false),
                Mode::Enforce,
                NoGrant,
                Action::Denied,
                Reason::Grant,
            ),
            (
                "agent without grant",
                c("10.0.0.1", 443),
                subj(vec![], vec![], true),
                Mode::Enforce,
                OutOfIntent,
                Action::Denied,
                Reason::Agent,
            ),
            (
                "agent with covering grant",
                c("10.0.0.1", 443),
                subj(vec![live.clone()], vec![], true),
                Mode::Enforce,
                Allowed,
                Action::Allowed,
                Reason::None,
            ),
            (
                "tainted, no grant: nowhere",
                c("10.0.0.1", 443),
                subj(vec![], vec![taint(&[], OnViolation::Deny)], false),
                Mode::Enforce,
                OutOfIntent,
                Action::Denied,
                Reason::Taint("key".into()),
            ),
            (
                "tainted, grant covers secret and dest",
                c("10.0.0.1", 443),
                subj(vec![live.clone()], vec![taint(&[], OnViolation::Deny)], false),
                Mode::Enforce,
                Allowed,
                Action::Allowed,
                Reason::None,
            ),
            (
                "tainted, dest outside secret's own",
                c("10.0.0.1", 443),
                subj(vec![live.clone()], vec![taint(&["10.9.0.0/16"], OnViolation::Deny)], false),
                Mode::Enforce,
                OutOfIntent,
                Action::Denied,
                Reason::Taint("key".into()),
            ),
            (
                "tainted, inside both",
                c("10.9.1.1", 443),
                subj(vec![live.clone()], vec![taint(&["10.9.0.0/16"], OnViolation::Deny)], false),
                Mode::Enforce,
                Allowed,
                Action::Allowed,
                Reason::None,
            ),
            (
                "tainted, monitor alerts",
                c("10.0.0.1", 443),
                subj(vec![], vec![taint(&[], OnViolation::Kill)], false),
                Mode::Monitor,
                OutOfIntent,
                Action::Alerted,
                Reason::Taint("key".into()),
            ),
        ];
        for (name, u, s, mode, verdict, action, reason) in cases {
            let d = decide(&u, &s, mode, now);
            assert_eq!(
                (d.verdict, d.action, d.reason.clone()),
                (verdict, action, reason),
                "{name}: {:?}",
                d.decision_path
            );
        }
    }
}
