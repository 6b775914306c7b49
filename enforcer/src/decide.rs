//! The decision: one pure function from a use (a secret-file open or a connection), the
//! grants the subject holds and the clock, to a verdict, an action and the ordered checks
//! that led there. No I/O: the caller passes `now`. The kernel's connect hook implements
//! the same rules (enforcer-ebpf/src/connect.rs); the engine checks they agree.
//!
//! Precedence when several grants are held: allowed (an active, unexpired grant covers the
//! use) > revoked (a covering grant was revoked) > expired (a covering grant expired) >
//! out_of_intent (grants are held, none covers the use). Holding no grant: a secret open is
//! `no_grant`; a plain connection is `allowed`.
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use ipnet::IpNet;

use crate::policy::Mode;

/// What was used.
#[derive(Debug, Clone, PartialEq)]
pub enum Use {
    SecretOpen { secret: String },
    Connect { ip: IpAddr, port: u16 },
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
}

fn covers(g: &HeldGrant, u: &Use) -> bool {
    match u {
        Use::SecretOpen { secret } => g.secrets.iter().any(|s| s == secret),
        Use::Connect { ip, port } => {
            let ip = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(*ip),
                v4 => *v4,
            };
            g.destinations.iter().any(|(net, lo, hi)| net.contains(&ip) && *lo <= *port && *port <= *hi)
        }
    }
}

fn what(u: &Use) -> String {
    match u {
        Use::SecretOpen { secret } => format!("secret {secret:?}"),
        Use::Connect { ip, port } => format!("destination {ip} port {port}"),
    }
}

pub fn decide(u: &Use, subject_known: bool, held: &[HeldGrant], mode: Mode, now: DateTime<Utc>) -> Decision {
    let mut path = vec![if subject_known { "subject resolved" } else { "subject unresolved (exited before attribution)" }.to_string()];
    let ids: Vec<&str> = held.iter().map(|g| g.id.as_str()).collect();
    path.push(format!("grants held: {}{}", held.len(), if ids.is_empty() { String::new() } else { format!(" ({})", ids.join(", ")) }));
    let alert = |path: &mut Vec<String>| {
        path.push(format!("mode {}: alert", mode));
        Action::Alerted
    };
    if held.is_empty() {
        return match u {
            Use::SecretOpen { .. } => {
                path.push(format!("{} requires a grant; none held", what(u)));
                let action = alert(&mut path);
                Decision { verdict: Verdict::NoGrant, action, decision_path: path, grant: None, expired_for_ms: None }
            }
            Use::Connect { .. } => {
                path.push("no grant held: plain connection".into());
                Decision { verdict: Verdict::Allowed, action: Action::Allowed, decision_path: path, grant: None, expired_for_ms: None }
            }
        };
    }
    let covering: Vec<usize> = (0..held.len()).filter(|i| covers(&held[*i], u)).collect();
    if covering.is_empty() {
        path.push(format!("no held grant covers {}", what(u)));
        let action = alert(&mut path);
        return Decision { verdict: Verdict::OutOfIntent, action, decision_path: path, grant: Some(0), expired_for_ms: None };
    }
    if let Some(&i) = covering.iter().find(|i| !held[**i].revoked && now < held[**i].expires_at) {
        let g = &held[i];
        path.push(format!("grant {} (intent {}) covers {}", g.id, g.intent, what(u)));
        path.push(format!("grant active until {}", g.expires_at.to_rfc3339()));
        return Decision { verdict: Verdict::Allowed, action: Action::Allowed, decision_path: path, grant: Some(i), expired_for_ms: None };
    }
    if let Some(&i) = covering.iter().find(|i| held[**i].revoked) {
        path.push(format!("grant {} (intent {}) covers {} but was revoked", held[i].id, held[i].intent, what(u)));
        let action = alert(&mut path);
        return Decision { verdict: Verdict::Revoked, action, decision_path: path, grant: Some(i), expired_for_ms: None };
    }
    let i = covering[0];
    let late = (now - held[i].expires_at).num_milliseconds().max(0) as u64;
    path.push(format!("grant {} (intent {}) covers {} but expired {late} ms ago", held[i].id, held[i].intent, what(u)));
    let action = alert(&mut path);
    Decision { verdict: Verdict::Expired, action, decision_path: path, grant: Some(i), expired_for_ms: Some(late) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn grant(id: &str, secrets: &[&str], dests: &[&str], expires_in_s: i64, revoked: bool, now: DateTime<Utc>) -> HeldGrant {
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
        }
    }

    #[test]
    fn table() {
        let now = Utc::now();
        let s = |n: &str| Use::SecretOpen { secret: n.into() };
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
            ("live grant, mapped v6", c("::ffff:10.1.1.1", 443), vec![live.clone()], Allowed, Some("a")),
            ("live grant, wrong port", c("10.1.1.1", 80), vec![live.clone()], OutOfIntent, Some("a")),
            ("live grant, wrong net", c("192.0.2.1", 443), vec![live.clone()], OutOfIntent, Some("a")),
            ("live grant, other secret", s("other"), vec![live.clone()], OutOfIntent, Some("a")),
            ("expired", s("key"), vec![expired.clone()], Expired, Some("b")),
            ("expired connect", c("10.0.0.1", 443), vec![expired.clone()], Expired, Some("b")),
            ("revoked", s("key"), vec![revoked.clone()], Revoked, Some("c")),
            ("revoked beats expired", c("10.0.0.1", 443), vec![expired.clone(), revoked.clone()], Revoked, Some("c")),
            ("live beats expired", s("key"), vec![expired.clone(), live.clone()], Allowed, Some("a")),
            ("second grant covers", s("other"), vec![live.clone(), other.clone()], Allowed, Some("d")),
            ("two grants, none covers", c("203.0.113.1", 443), vec![live.clone(), other.clone()], OutOfIntent, Some("a")),
        ];
        for (name, u, held, verdict, gid) in cases {
            let d = decide(&u, true, &held, Mode::Monitor, now);
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
        let d = decide(&Use::SecretOpen { secret: "key".into() }, true, std::slice::from_ref(&g), Mode::Monitor, now);
        assert_eq!(d.verdict, Verdict::Expired);
        assert_eq!(d.expired_for_ms, Some(0));
        let d = decide(&Use::SecretOpen { secret: "key".into() }, true, &[g], Mode::Monitor, now + Duration::milliseconds(1500));
        assert_eq!(d.expired_for_ms, Some(1500));
    }
}
