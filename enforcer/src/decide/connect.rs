//! Connections through the shared judge: the subject's state laid out as the kernel maps
//! hold it, `enforcer_common::judge::judge` run on it, and the judgement explained in words.
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};

use chrono::{DateTime, Utc};
use enforcer_common::judge::{Facts, Judgement, Settings, judge};
use enforcer_common::{
    GrantInfo, MAX_PROC_GRANTS, MAX_SECRETS, ProcGrants, SECRET_SEND_SLOT_BASE, SECRET_SLOT_BASE,
    SecretInfo, grant_flags, grant_state, proc_flags, reason, verdict,
};

use super::{
    Decision, LearnedAddr, Reason, SubjectState, Use, Verdict, action_of, canonical, decision,
    expired_line, in_nets, late_ms, on_violation_of, revoked_line, subject_lines, verdict_of, what,
};
use crate::dest_table::DestTable;
use crate::policy::{AGENT_ON_VIOLATION, Mode};

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
    /// Held grant `i`'s learned addresses, then taint entry `i`'s: (address, ports,
    /// deadline on the judge's clock).
    grant_learned: Vec<OnClock>,
    secret_learned: Vec<OnClock>,
}

/// Learned addresses as the judge reads them: (address, port ranges, deadline on its clock).
type OnClock = Vec<(IpAddr, Vec<(u16, u16)>, u64)>;

/// A deadline on the judge's clock: the kernel's own when replaying a record, otherwise
/// placed relative to `base` as far from it as `at` is from `now`.
fn on_clock(at: DateTime<Utc>, kernel_ns: u64, now: DateTime<Utc>, base: u64, replay: bool) -> u64 {
    if replay && kernel_ns != 0 {
        return kernel_ns;
    }
    let left = (at - now).num_nanoseconds().unwrap_or(if at > now { i64::MAX } else { i64::MIN });
    (base as i128 + left as i128).clamp(0, u64::MAX as i128) as u64
}

fn learned_on_clock(l: &[LearnedAddr], now: DateTime<Utc>, base: u64, replay: bool) -> OnClock {
    l.iter()
        .map(|a| {
            (
                canonical(a.ip),
                a.ports.clone(),
                on_clock(a.expires_at, a.deadline_ns, now, base, replay),
            )
        })
        .collect()
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
                    has_dests: (!t.destinations.is_empty() || t.named) as u32,
                    action: t.on_violation.action_code() as u32,
                };
                (info, DestTable::compile(&t.destinations).ok())
            })
            .collect();
        let replay = now_ns.is_some();
        let grant_learned = subject
            .held
            .iter()
            .take(MAX_PROC_GRANTS)
            .map(|g| learned_on_clock(&g.learned, now, base, replay))
            .collect();
        let secret_learned =
            taint.iter().map(|t| learned_on_clock(&t.learned, now, base, replay)).collect();
        (SubjectFacts { grants, grant_dests, secrets, grant_learned, secret_learned }, proc)
    }
}

impl Facts for SubjectFacts {
    fn grant(&self, slot: u32) -> Option<GrantInfo> {
        self.grants.get((slot as usize).checked_sub(1)?).copied()
    }

    /// A secret's send slot holds its networks and, as host entries, the addresses learned
    /// for its names for as long as their LEARNED entries live (deadline or not).
    fn covers(&self, slot: u32, addr: &[u8; 16], port: u16) -> bool {
        if let Some(i) = slot.checked_sub(SECRET_SEND_SLOT_BASE) {
            let learned = self.secret_learned.get(i as usize).and_then(|l| {
                let ip = canonical(IpAddr::from(*addr));
                l.iter().find(|(a, _, _)| *a == ip)
            });
            return match learned {
                // The host entry shadows the network's: it holds the union of both.
                Some((_, ports, _)) => {
                    ports.iter().any(|(lo, hi)| *lo <= port && port <= *hi)
                        || self.covers(SECRET_SLOT_BASE + i, addr, port)
                }
                None => self.covers(SECRET_SLOT_BASE + i, addr, port),
            };
        }
        let ip = IpAddr::from(*addr);
        let table = if slot >= SECRET_SLOT_BASE {
            self.secrets.get((slot - SECRET_SLOT_BASE) as usize).and_then(|s| s.1.as_ref())
        } else {
            (slot as usize).checked_sub(1).and_then(|i| self.grant_dests.get(i)?.as_ref())
        };
        table.is_some_and(|t| t.allows(ip, port))
    }

    /// The kernel holds one LEARNED entry per (slot, address): the first one listed for the
    /// address stands for it.
    fn learned(&self, slot: u32, addr: &[u8; 16], port: u16) -> u64 {
        let list = if slot >= SECRET_SLOT_BASE {
            self.secret_learned.get((slot - SECRET_SLOT_BASE) as usize)
        } else {
            (slot as usize).checked_sub(1).and_then(|i| self.grant_learned.get(i))
        };
        let ip = canonical(IpAddr::from(*addr));
        let Some((_, ports, deadline)) = list.and_then(|l| l.iter().find(|(a, _, _)| *a == ip))
        else {
            return 0;
        };
        if ports.iter().any(|(lo, hi)| *lo <= port && port <= *hi) { *deadline } else { 0 }
    }

    /// The subject's taint list already holds its grants' subtree taint (the kernel record
    /// carries the taint it judged).
    fn grant_taint(&self, _slot: u32) -> u64 {
        0
    }

    /// Likewise the agent tree's taint.
    fn tree_taint(&self, _tree: u32) -> u64 {
        0
    }

    fn secret(&self, index: u32) -> Option<SecretInfo> {
        self.secrets.get(index as usize).map(|s| s.0)
    }

    fn dns_stub(&self) -> u32 {
        DNS_STUB.load(Ordering::Relaxed)
    }
}

/// The DNS stub's CONFIG word (port and `dns_stub::*` flags) as the kernel's CONFIG map
/// holds it (set with it: `set_dns_stub`).
static DNS_STUB: AtomicU32 = AtomicU32::new(0);

/// Records the stub's CONFIG word for the judge's replay (the kernel's
/// `config::DNS_STUB_PORT`).
pub fn set_dns_stub(word: u32) {
    DNS_STUB.store(word, Ordering::Relaxed);
}

/// The IPv6 form the kernel judges (IPv4 as IPv4-mapped).
fn kernel_addr(ip: IpAddr) -> [u8; 16] {
    match canonical(ip) {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The CONFIG map's settings for `mode`, as the daemon writes them.
fn kernel_settings(mode: Mode) -> Settings {
    Settings { enforce: mode == Mode::Enforce, agent_action: AGENT_ON_VIOLATION.action_code() }
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
    let settings = kernel_settings(mode);
    judge(&facts, &proc, &kernel_addr(ip), port, now_ns.unwrap_or(NOW_NS), settings)
}

/// The egress hook's judgement of data sent on an established socket (`judge::judge_send`:
/// the history rule only), replayed on the facts its record carries.
pub fn judge_send(
    ip: IpAddr,
    port: u16,
    subject: &SubjectState,
    mode: Mode,
    now: DateTime<Utc>,
    now_ns: Option<u64>,
) -> Judgement {
    let (facts, proc) = SubjectFacts::new(subject, now, now_ns);
    let now_ns = now_ns.unwrap_or(NOW_NS);
    let settings = kernel_settings(mode);
    enforcer_common::judge::judge_send(&facts, &proc, &kernel_addr(ip), port, now_ns, settings)
}

/// Judges a connection with the kernel's judge and explains the judgement.
pub(super) fn decide_connect(
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
