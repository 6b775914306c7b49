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
use enforcer_common::{action, verdict};
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
    /// The secret's own destinations include names (then it has destinations even when
    /// `destinations`, its networks, is empty: the kernel's `has_dests`).
    pub named: bool,
    /// Addresses the DNS stub answered for the secret's own destinations by name.
    pub learned: Vec<LearnedAddr>,
}

/// An address the DNS stub answered for a destination given by name, as the kernel's
/// LEARNED entry for (slot, address) stood at the time of the use.
#[derive(Debug, Clone)]
pub struct LearnedAddr {
    pub ip: IpAddr,
    /// Inclusive port ranges (of the destinations whose names the answer matched).
    pub ports: Vec<(u16, u16)>,
    /// Until when it is covered (wall clock, for decisions made now).
    pub expires_at: DateTime<Utc>,
    /// The kernel's deadline on the boot clock (0: unknown), for exact replays.
    pub deadline_ns: u64,
    /// The name the address was answered for.
    pub name: String,
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
    /// Addresses learned by name for this grant (only those a decision needs).
    pub learned: Vec<LearnedAddr>,
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

impl Decision {
    /// What events that decide nothing carry (lifecycle, agent notices): allowed, no path.
    pub fn informational() -> Decision {
        decision(Verdict::Allowed, Action::Allowed, Vec::new(), None, Reason::None)
    }
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
            decide_open(secret, *without_grant, subject, mode, now)
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

fn late_ms(g: &HeldGrant, now: DateTime<Utc>) -> u64 {
    (now - g.expires_at).num_milliseconds().max(0) as u64
}

fn revoked_line(g: &HeldGrant, u: &Use) -> String {
    format!("grant {} (intent {}) covers {} but was revoked", g.id, g.intent, what(u))
}

fn expired_line(g: &HeldGrant, u: &Use, late: u64) -> String {
    format!("grant {} (intent {}) covers {} but expired {late} ms ago", g.id, g.intent, what(u))
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
        verdict::NO_GRANT => Verdict::NoGrant,
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

mod connect;
mod open;
#[cfg(test)]
mod tests;

use connect::decide_connect;
pub use connect::{explain, judge_connect, judge_send, set_dns_stub};
use open::decide_open;
pub use open::{explain_open, judge_secret_open};
