//! The decision: one pure function from a use (a secret-file open or a connection), the
//! grants the subject holds and the clock, to a verdict, an action and the ordered checks
//! that led there. No I/O: the caller passes `now`. Connections are judged by the shared
//! judge `enforcer_common::judge::judge`, the very function the kernel's connect hook runs
//! (enforcer-ebpf/src/connect.rs), over an in-memory copy of the facts the kernel maps hold;
//! the engine checks the kernel's verdict, grant and action against this one.
//!
//! Precedence when several grants are held: allowed (an active, unexpired grant covers the
//! use) > revoked (a covering grant was revoked) > expired (a covering grant expired) >
//! out_of_intent (grants are held, none covers the use). Holding no grant: a secret open is
//! `no_grant`; a connection is `allowed` unless the process is an `[[agent]]` (then
//! `out_of_intent`). History counts: a connection otherwise allowed is `out_of_intent` when
//! the process read a secret that is not valid toward it (possible exfiltration).
//!
//! The action of a violation: monitor mode alerts; enforce mode applies the on_violation of
//! the grant's intent, of the tainting secret's strictest intent, or `AGENT_ON_VIOLATION`
//! for agents.
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use enforcer_common::judge::{Facts, Judgement, Settings, judge};
use enforcer_common::{
    GrantInfo, MAX_PROC_GRANTS, MAX_SECRETS, ProcGrants, SECRET_SLOT_BASE, SecretInfo, action,
    grant_flags, grant_state, proc_flags, reason, verdict,
};
use ipnet::IpNet;

use crate::dest_table::DestTable;
use crate::policy::{AGENT_ON_VIOLATION, Mode, OnViolation};

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
#[derive(Debug, Clone, Default)]
pub struct HeldGrant {
    /// The grant's slot in the kernel maps (0: not known to the kernel).
    pub slot: u32,
    pub id: String,
    pub intent: String,
    pub secrets: Vec<String>,
    pub destinations: Vec<(IpNet, u16, u16)>,
    pub expires_at: DateTime<Utc>,
    pub revoked: bool,
    pub on_violation: OnViolation,
    /// The grant ends at its first violation.
    pub revoke_on_violation: bool,
    /// The kernel's deadline on the boot clock (0: unknown). A replay of the judge at a
    /// kernel record's boot time compares exactly what the kernel compared.
    pub expires_ns: u64,
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

/// The action a violation gets.
fn act(mode: Mode, on_violation: OnViolation, path: &mut Vec<String>) -> Action {
    match mode {
        Mode::Monitor => {
            path.push("mode monitor: alert".into());
            Action::Alerted
        }
        Mode::Enforce => {
            path.push(format!("mode enforce: on_violation {on_violation}"));
            action_of(on_violation.action_code())
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
    match u {
        Use::Connect { ip, port } => decide_connect(*ip, *port, subject, mode, now),
        Use::SecretOpen { secret, without_grant } => {
            decide_open(u, secret, *without_grant, subject, mode, now)
        }
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

/// The first lines of every decision path: who, and what they hold.
fn subject_lines(subject: &SubjectState) -> Vec<String> {
    let held = &subject.held;
    let who = if subject.known {
        "subject resolved"
    } else {
        "subject unresolved (exited before attribution)"
    };
    let ids: Vec<&str> = held.iter().map(|g| g.id.as_str()).collect();
    vec![
        who.to_string(),
        format!(
            "grants held: {}{}",
            held.len(),
            if ids.is_empty() { String::new() } else { format!(" ({})", ids.join(", ")) }
        ),
    ]
}

/// A secret open, with the connect judge's precedence: allowed (an active, unexpired grant
/// covers the secret) > the first covering grant revoked > the first covering grant expired
/// > out_of_intent against the first held grant; holding none is `no_grant`.
fn decide_open(
    u: &Use,
    secret: &str,
    without_grant: OnViolation,
    subject: &SubjectState,
    mode: Mode,
    now: DateTime<Utc>,
) -> Decision {
    let held = &subject.held;
    let mut path = subject_lines(subject);
    if held.is_empty() {
        path.push(format!("{} requires a grant; none held", what(u)));
        let action = act(mode, without_grant, &mut path);
        return decision(Verdict::NoGrant, action, path, None, Reason::Grant);
    }
    let covering: Vec<usize> =
        (0..held.len()).filter(|i| held[*i].secrets.iter().any(|s| s == secret)).collect();
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
        path.push(revoked_line(&held[i], u));
        let action = act(mode, held[i].on_violation, &mut path);
        return decision(Verdict::Revoked, action, path, Some(i), Reason::Grant);
    }
    let i = covering[0];
    let late = late_ms(&held[i], now);
    path.push(expired_line(&held[i], u, late));
    let action = act(mode, held[i].on_violation, &mut path);
    let mut d = decision(Verdict::Expired, action, path, Some(i), Reason::Grant);
    d.expired_for_ms = Some(late);
    d
}

fn late_ms(g: &HeldGrant, now: DateTime<Utc>) -> u64 {
    (now - g.expires_at).num_milliseconds().max(0) as u64
}

fn revoked_line(g: &HeldGrant, u: &Use) -> String {
    format!("grant {} (intent {}) covers {} but was revoked", g.id, g.intent, what(u))
}

fn expired_line(g: &HeldGrant, u: &Use, late: u64) -> String {
    format!("grant {} (intent {}) covers {} but expired {late} ms ago", g.id, g.intent, what(u))
}

/// The boot-clock instant that stands for `now` when the judge runs in userspace: grant
/// deadlines are placed relative to it, so the judge compares exactly what the kernel does.
const NOW_NS: u64 = 1 << 62;

/// A subject's grants and taint laid out as the kernel maps hold them: held grant `i` in
/// slot `i + 1`, taint entry `i` as secret index `i`.
struct SubjectFacts {
    grants: Vec<GrantInfo>,
    /// Held grant `i`'s destinations in the kernel's compiled form (None: they do not
    /// compile, so the kernel holds no entry for them either).
    grant_dests: Vec<Option<DestTable>>,
    /// Taint entry `i`: its secret's facts and own destinations, compiled.
    secrets: Vec<(SecretInfo, Option<DestTable>)>,
}

impl SubjectFacts {
    /// `now_ns`: the boot-clock time of the use when replaying a kernel record; grants'
    /// own kernel deadlines are then compared with it directly.
    fn new(subject: &SubjectState, now: DateTime<Utc>, now_ns: Option<u64>) -> (Self, ProcGrants) {
        let base = now_ns.unwrap_or(NOW_NS);
        let mut proc = ProcGrants::default();
        let taint = &subject.taint[..subject.taint.len().min(MAX_SECRETS)];
        for i in 0..taint.len() {
            proc.taint |= 1u64 << i;
        }
        if subject.agent {
            proc.flags |= proc_flags::AGENT;
        }
        let mut grants = Vec::new();
        for (i, g) in subject.held.iter().take(MAX_PROC_GRANTS).enumerate() {
            proc.grants[i] = i as u32 + 1;
            let left = (g.expires_at - now).num_nanoseconds().unwrap_or(if g.expires_at > now {
                i64::MAX
            } else {
                i64::MIN
            });
            let secrets = taint
                .iter()
                .enumerate()
                .filter(|(_, t)| g.secrets.contains(&t.secret))
                .fold(0u64, |bits, (k, _)| bits | 1u64 << k);
            grants.push(GrantInfo {
                expires_ns: match now_ns {
                    Some(_) if g.expires_ns != 0 => g.expires_ns,
                    _ => (base as i128 + left as i128).clamp(0, u64::MAX as i128) as u64,
                },
                secrets,
                state: if g.revoked { grant_state::REVOKED } else { grant_state::ACTIVE },
                action: g.on_violation.action_code() as u32,
                flags: if g.revoke_on_violation { grant_flags::REVOKE_ON_VIOLATION } else { 0 },
                ..Default::default()
            });
        }
        let grant_dests = subject
            .held
            .iter()
            .take(MAX_PROC_GRANTS)
            .map(|g| DestTable::compile(&g.destinations).ok())
            .collect();
        let secrets = taint
            .iter()
            .map(|t| {
                let info = SecretInfo {
                    has_dests: !t.destinations.is_empty() as u32,
                    action: t.on_violation.action_code() as u32,
                };
                (info, DestTable::compile(&t.destinations).ok())
            })
            .collect();
        (SubjectFacts { grants, grant_dests, secrets }, proc)
    }
}

impl Facts for SubjectFacts {
    fn grant(&self, slot: u32) -> Option<GrantInfo> {
        self.grants.get((slot as usize).checked_sub(1)?).copied()
    }

    fn covers(&self, slot: u32, addr: &[u8; 16], port: u16) -> bool {
        let ip = IpAddr::from(*addr);
        let table = if slot >= SECRET_SLOT_BASE {
            self.secrets.get((slot - SECRET_SLOT_BASE) as usize).and_then(|s| s.1.as_ref())
        } else {
            (slot as usize).checked_sub(1).and_then(|i| self.grant_dests.get(i)?.as_ref())
        };
        table.is_some_and(|t| t.allows(ip, port))
    }

    fn secret(&self, index: u32) -> Option<SecretInfo> {
        self.secrets.get(index as usize).map(|s| s.0)
    }
}

/// The IPv6 form the kernel judges (IPv4 as IPv4-mapped).
fn kernel_addr(ip: IpAddr) -> [u8; 16] {
    match canonical(ip) {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The `Action` an `action::*` code stands for.
pub fn action_of(code: u8) -> Action {
    match code {
        action::ALLOWED => Action::Allowed,
        action::DENY => Action::Denied,
        action::KILL => Action::Killed,
        _ => Action::Alerted,
    }
}

/// The `Verdict` a kernel `verdict::*` code stands for (NO_GRANT_HELD is a plain connection,
/// which is allowed); None for a code the kernel never writes.
pub fn verdict_of(code: u8) -> Option<Verdict> {
    Some(match code {
        verdict::NO_GRANT_HELD | verdict::ALLOWED => Verdict::Allowed,
        verdict::EXPIRED => Verdict::Expired,
        verdict::REVOKED => Verdict::Revoked,
        verdict::OUT_OF_INTENT => Verdict::OutOfIntent,
        _ => return None,
    })
}

/// The on_violation an action code came from, for the decision path.
fn on_violation_of(code: u8) -> OnViolation {
    match code {
        action::DENY => OnViolation::Deny,
        action::KILL => OnViolation::Kill,
        _ => OnViolation::Alert,
    }
}

/// The kernel's judgement of a connection, from the subject's state as decide.rs sees it.
/// `now_ns`: the kernel record's boot time, when replaying one (see `HeldGrant::expires_ns`).
pub fn judge_connect(
    ip: IpAddr,
    port: u16,
    subject: &SubjectState,
    mode: Mode,
    now: DateTime<Utc>,
    now_ns: Option<u64>,
) -> Judgement {
    if subject.held.is_empty() && subject.taint.is_empty() && !subject.agent {
        // No map entry in the kernel: the hook answers without judging.
        return Judgement::default();
    }
    let (facts, proc) = SubjectFacts::new(subject, now, now_ns);
    let settings =
        Settings { enforce: mode == Mode::Enforce, agent_action: AGENT_ON_VIOLATION.action_code() };
    judge(&facts, &proc, &kernel_addr(ip), port, now_ns.unwrap_or(NOW_NS), settings)
}

/// Judges a connection with the kernel's judge and explains the judgement.
fn decide_connect(
    ip: IpAddr,
    port: u16,
    subject: &SubjectState,
    mode: Mode,
    now: DateTime<Utc>,
) -> Decision {
    let j = judge_connect(ip, port, subject, mode, now, None);
    explain(&j, ip, port, subject, mode, now)
}

/// The decision (and its path, in words) for a connect judgement.
pub fn explain(
    j: &Judgement,
    ip: IpAddr,
    port: u16,
    subject: &SubjectState,
    mode: Mode,
    now: DateTime<Utc>,
) -> Decision {
    let u = Use::Connect { ip, port };
    let held = &subject.held;
    let mut path = subject_lines(subject);
    let grant = (j.slot as usize).checked_sub(1).filter(|i| *i < held.len());
    let verdict = verdict_of(j.verdict).unwrap_or(Verdict::OutOfIntent);
    let mut d = decision(verdict, action_of(j.action), Vec::new(), grant, Reason::None);
    match (j.reason, grant) {
        (reason::AGENT, _) => {
            path.push("agent process (selected by [[agent]]) holds no grant".into());
            d.reason = Reason::Agent;
        }
        (_, None) => path.push("no grant held: plain connection".into()),
        (_, Some(i)) => {
            let g = &held[i];
            // A taint violation overrides what the grants allowed.
            let by_grants = if j.reason == reason::TAINT { verdict::ALLOWED } else { j.verdict };
            match by_grants {
                verdict::ALLOWED => {
                    path.push(format!("grant {} (intent {}) covers {}", g.id, g.intent, what(&u)));
                    path.push(format!("grant active until {}", g.expires_at.to_rfc3339()));
                }
                verdict::REVOKED => path.push(revoked_line(g, &u)),
                verdict::EXPIRED => {
                    let late = late_ms(g, now);
                    path.push(expired_line(g, &u, late));
                    d.expired_for_ms = Some(late);
                }
                _ => path.push(format!("no held grant covers {}", what(&u))),
            }
            if j.reason == reason::GRANT && verdict != Verdict::Allowed {
                d.reason = Reason::Grant;
            }
        }
    }
    let taint = (j.taint_secret as usize).checked_sub(1).and_then(|i| subject.taint.get(i));
    if let (reason::TAINT, Some(t)) = (j.reason, taint) {
        let own_ok = t.destinations.is_empty() || in_nets(&t.destinations, ip, port);
        path.push(format!(
            "process read secret {:?}, which is not valid toward {} port {port}{}: possible \
             exfiltration",
            t.secret,
            canonical(ip),
            if own_ok {
                " (no live grant covers it there)"
            } else {
                " (outside the secret's destinations)"
            }
        ));
        d.reason = Reason::Taint(t.secret.clone());
    }
    if d.verdict != Verdict::Allowed {
        match mode {
            Mode::Monitor => path.push("mode monitor: alert".into()),
            Mode::Enforce => {
                let on = match d.reason {
                    Reason::Agent => AGENT_ON_VIOLATION,
                    _ => on_violation_of(j.action),
                };
                path.push(format!("mode enforce: on_violation {on}"));
            }
        }
    }
    d.decision_path = path;
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
            ..Default::default()
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

    /// Cases where the kernel and decide.rs once disagreed, now one judge: the grant named
    /// and the action are asserted, not only the verdict.
    #[test]
    fn drift_cases_name_the_same_grant_and_action() {
        let now = Utc::now();
        let c = |ip: &str, port: u16| Use::Connect { ip: ip.parse().unwrap(), port };
        let net = &["10.0.0.0/8 443-443"];
        let rev1 = grant("r1", &["key"], net, 60, true, now);
        let rev2 = grant("r2", &["key"], net, 60, true, now);
        let exp1 = grant("e1", &["key"], net, -5, false, now);
        let exp2 = grant("e2", &["key"], net, -5, false, now);
        let mut kill = grant("k", &["key"], &["192.0.2.0/24 1-65535"], 60, false, now);
        kill.on_violation = OnViolation::Kill;
        let subj = |held: Vec<HeldGrant>, agent: bool| SubjectState {
            known: true,
            held,
            agent,
            ..Default::default()
        };
        use Verdict::*;
        let cases: Vec<(&str, SubjectState, Mode, Verdict, Option<&str>, Action)> = vec![
            // The kernel used to name the last revoked grant, decide.rs the first.
            (
                "two revoked: the first",
                subj(vec![rev1.clone(), rev2.clone()], false),
                Mode::Enforce,
                Revoked,
                Some("r1"),
                Action::Denied,
            ),
            (
                "two expired: the first",
                subj(vec![exp1.clone(), exp2.clone()], false),
                Mode::Enforce,
                Expired,
                Some("e1"),
                Action::Denied,
            ),
            (
                "expired then revoked: the revoked",
                subj(vec![exp1.clone(), rev2.clone()], false),
                Mode::Enforce,
                Revoked,
                Some("r2"),
                Action::Denied,
            ),
            (
                "revoked then expired: the revoked",
                subj(vec![rev1.clone(), exp2.clone()], false),
                Mode::Enforce,
                Revoked,
                Some("r1"),
                Action::Denied,
            ),
            (
                "none covers: the first held, its action",
                subj(vec![kill.clone(), rev1.clone()], false),
                Mode::Enforce,
                Revoked,
                Some("r1"),
                Action::Denied,
            ),
            (
                "none covers: first held kills",
                subj(vec![kill.clone()], false),
                Mode::Enforce,
                OutOfIntent,
                Some("k"),
                Action::Killed,
            ),
            // The agent action was hard-coded twice; now AGENT_ON_VIOLATION feeds both.
            (
                "agent without grant",
                subj(vec![], true),
                Mode::Enforce,
                OutOfIntent,
                None,
                action_of(AGENT_ON_VIOLATION.action_code()),
            ),
            (
                "agent without grant, monitor",
                subj(vec![], true),
                Mode::Monitor,
                OutOfIntent,
                None,
                Action::Alerted,
            ),
        ];
        for (name, s, mode, verdict, gid, action) in cases {
            let d = decide(&c("10.1.2.3", 443), &s, mode, now);
            assert_eq!(d.verdict, verdict, "{name}: {:?}", d.decision_path);
            assert_eq!(d.grant.map(|i| s.held[i].id.as_str()), gid, "{name}");
            assert_eq!(d.action, action, "{name}: {:?}", d.decision_path);
        }
    }

    /// revoke_on_violation: the judge asks for the revoke only for an active grant decided
    /// against (what the kernel applies to the map), never for an allowed use.
    #[test]
    fn revoke_on_violation_is_asked_for_active_grants_only() {
        let now = Utc::now();
        let ip = "10.1.2.3".parse().unwrap();
        let mut g = grant("a", &["key"], &["10.0.0.0/8 443-443"], 60, false, now);
        g.revoke_on_violation = true;
        let s = |g: HeldGrant| SubjectState { known: true, held: vec![g], ..Default::default() };
        let j = judge_connect(ip, 80, &s(g.clone()), Mode::Enforce, now, None);
        assert_eq!((j.verdict, j.slot, j.revoke), (verdict::OUT_OF_INTENT, 1, true));
        let j = judge_connect(ip, 443, &s(g.clone()), Mode::Enforce, now, None);
        assert_eq!((j.verdict, j.revoke), (verdict::ALLOWED, false));
        let mut revoked = g.clone();
        revoked.revoked = true;
        let j = judge_connect(ip, 443, &s(revoked), Mode::Enforce, now, None);
        assert_eq!((j.verdict, j.revoke), (verdict::REVOKED, false));
        // Monitor mode still revokes (the grant's own setting), but only alerts.
        let j = judge_connect(ip, 80, &s(g), Mode::Monitor, now, None);
        assert_eq!((j.action, j.revoke), (action::ALERT, true));
    }

    /// Taint: the tainting secret is named by its index, its action applies, and a secret
    /// the live grant does not cover breaks validity even where the grant allows.
    #[test]
    fn taint_names_the_first_invalid_secret() {
        let now = Utc::now();
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let live = grant("a", &["b"], &["10.0.0.0/8 443-443"], 60, false, now);
        let t = |name: &str, on: OnViolation| Taint {
            secret: name.into(),
            destinations: vec![],
            on_violation: on,
        };
        let s = SubjectState {
            known: true,
            held: vec![live],
            taint: vec![t("a", OnViolation::Kill), t("b", OnViolation::Deny)],
            agent: false,
        };
        let j = judge_connect(ip, 443, &s, Mode::Enforce, now, None);
        assert_eq!(
            (j.verdict, j.reason, j.taint_secret, j.action, j.slot),
            (verdict::OUT_OF_INTENT, reason::TAINT, 1, action::KILL, 1)
        );
        let d = decide(&Use::Connect { ip, port: 443 }, &s, Mode::Enforce, now);
        assert_eq!((d.reason, d.action), (Reason::Taint("a".into()), Action::Killed));
    }

    /// Overlapping destinations are the union of everything that covers the address, both
    /// within one grant (nested networks) and across grants and a secret's own list.
    #[test]
    fn overlapping_destinations_are_a_union() {
        let now = Utc::now();
        let c = |ip: &str, port: u16| Use::Connect { ip: ip.parse().unwrap(), port };
        let nested = grant(
            "a",
            &["key"],
            &["127.0.0.1/32 80-80", "127.0.0.0/8 18081-18081"],
            60,
            false,
            now,
        );
        let wide = grant("b", &["key"], &["10.0.0.0/8 443-443"], 60, false, now);
        let narrow = grant("c", &["key"], &["10.1.2.3/32 22-22"], 60, false, now);
        let taint = Taint {
            secret: "key".into(),
            destinations: vec![
                ("10.1.2.3/32".parse().unwrap(), 22, 22),
                ("10.0.0.0/8".parse().unwrap(), 443, 443),
            ],
            on_violation: OnViolation::Deny,
        };
        let s = |held: Vec<HeldGrant>, taint: Vec<Taint>| SubjectState {
            known: true,
            held,
            taint,
            agent: false,
        };
        use Verdict::*;
        let cases: Vec<(&str, Use, SubjectState, Verdict)> = vec![
            ("nested, host port", c("127.0.0.1", 80), s(vec![nested.clone()], vec![]), Allowed),
            (
                "nested, wider net's port on the host",
                c("127.0.0.1", 18081),
                s(vec![nested.clone()], vec![]),
                Allowed,
            ),
            (
                "nested, wider net's port elsewhere",
                c("127.0.0.9", 18081),
                s(vec![nested.clone()], vec![]),
                Allowed,
            ),
            (
                "nested, host port elsewhere",
                c("127.0.0.9", 80),
                s(vec![nested.clone()], vec![]),
                OutOfIntent,
            ),
            (
                "two grants, host inside the other's net",
                c("10.1.2.3", 443),
                s(vec![narrow.clone(), wide.clone()], vec![]),
                Allowed,
            ),
            (
                "two grants, narrow port",
                c("10.1.2.3", 22),
                s(vec![wide.clone(), narrow.clone()], vec![]),
                Allowed,
            ),
            (
                "tainted, secret's nested list",
                c("10.1.2.3", 443),
                s(vec![wide.clone()], vec![taint.clone()]),
                Allowed,
            ),
            (
                "tainted, secret's host port, grant lacks it",
                c("10.1.2.3", 22),
                s(vec![wide.clone()], vec![taint.clone()]),
                OutOfIntent,
            ),
        ];
        for (name, u, subject, verdict) in cases {
            let d = decide(&u, &subject, Mode::Enforce, now);
            assert_eq!(d.verdict, verdict, "{name}: {:?}", d.decision_path);
        }
    }

    /// A replay at a kernel record's boot time uses the grants' kernel deadlines: one
    /// nanosecond before is allowed, at the deadline expired, whatever the wall clock says.
    #[test]
    fn replay_uses_the_kernel_deadline() {
        let now = Utc::now();
        let ip = "10.1.2.3".parse().unwrap();
        let mut g = grant("a", &["key"], &["10.0.0.0/8 443-443"], -3600, false, now);
        g.expires_ns = 5_000;
        let s = SubjectState { known: true, held: vec![g], ..Default::default() };
        let at = |ns| judge_connect(ip, 443, &s, Mode::Enforce, now, Some(ns)).verdict;
        assert_eq!(at(4_999), verdict::ALLOWED);
        assert_eq!(at(5_000), verdict::EXPIRED);
        // Without a replay time the wall-clock deadline counts (expired an hour ago).
        assert_eq!(judge_connect(ip, 443, &s, Mode::Enforce, now, None).verdict, verdict::EXPIRED);
    }
}
