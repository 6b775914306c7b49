//! Table tests of the decision. Connect cases run the shared judge (the kernel's code) on
//! the compiled destination form; each table row is a tuple by design.
#![allow(clippy::type_complexity)]

use super::*;
use chrono::Duration;
use enforcer_common::{action, reason, verdict};

use crate::policy::AGENT_ON_VIOLATION;

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
        ("live grant, wrong port", c("10.1.1.1", 80), vec![live.clone()], OutOfIntent, Some("a")),
        ("live grant, wrong net", c("192.0.2.1", 443), vec![live.clone()], OutOfIntent, Some("a")),
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
        ("live beats expired", s("key"), vec![expired.clone(), live.clone()], Allowed, Some("a")),
        ("second grant covers", s("other"), vec![live.clone(), other.clone()], Allowed, Some("d")),
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
        named: false,
        learned: vec![],
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
        named: false,
        learned: vec![],
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
    let nested =
        grant("a", &["key"], &["127.0.0.1/32 80-80", "127.0.0.0/8 18081-18081"], 60, false, now);
    let wide = grant("b", &["key"], &["10.0.0.0/8 443-443"], 60, false, now);
    let narrow = grant("c", &["key"], &["10.1.2.3/32 22-22"], 60, false, now);
    let taint = Taint {
        secret: "key".into(),
        destinations: vec![
            ("10.1.2.3/32".parse().unwrap(), 22, 22),
            ("10.0.0.0/8".parse().unwrap(), 443, 443),
        ],
        on_violation: OnViolation::Deny,
        named: false,
        learned: vec![],
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

/// The shared open judge (the code the BPF-LSM file_open program runs) on the kernel's own
/// layout: deadlines on the boot clock, revoke_on_violation, monitor mode, taint bits.
#[test]
fn open_judge_table() {
    use enforcer_common::open::{OpenFacts, judge_open};
    use enforcer_common::{GrantInfo, ProcGrants, grant_flags, grant_state};
    struct Slots(Vec<GrantInfo>);
    impl OpenFacts for Slots {
        fn grant(&self, slot: u32) -> Option<GrantInfo> {
            self.0.get((slot as usize).checked_sub(1)?).copied()
        }
    }
    let g = |secrets: u64, expires_ns: u64, state: u32, action: u32, flags: u32| GrantInfo {
        expires_ns,
        secrets,
        state,
        action,
        flags,
        ..Default::default()
    };
    let now = 1_000_000u64;
    let (live, ended, revoked) = (now + 1, now, grant_state::REVOKED);
    let act = grant_state::ACTIVE;
    let (deny, kill) = (action::DENY as u32, action::KILL as u32);
    let rov = grant_flags::REVOKE_ON_VIOLATION;
    // (name, grants, held slots, secret, without_grant, enforce,
    //  verdict, slot, action, taint, revoke)
    let cases: Vec<(&str, Vec<GrantInfo>, &[u32], u32, u8, bool, u8, u32, u8, u64, bool)> = vec![
        (
            "no entry",
            vec![],
            &[],
            3,
            action::DENY,
            true,
            verdict::NO_GRANT,
            0,
            action::DENY,
            0,
            false,
        ),
        (
            "no entry, alert",
            vec![],
            &[],
            3,
            action::ALERT,
            true,
            verdict::NO_GRANT,
            0,
            action::ALERT,
            8,
            false,
        ),
        (
            "no entry, kill",
            vec![],
            &[],
            0,
            action::KILL,
            true,
            verdict::NO_GRANT,
            0,
            action::KILL,
            0,
            false,
        ),
        (
            "no entry, monitor",
            vec![],
            &[],
            3,
            action::KILL,
            false,
            verdict::NO_GRANT,
            0,
            action::ALERT,
            8,
            false,
        ),
        (
            "live covers",
            vec![g(8, live, act, deny, 0)],
            &[1],
            3,
            action::DENY,
            true,
            verdict::ALLOWED,
            1,
            action::ALLOWED,
            8,
            false,
        ),
        (
            "deadline is exact",
            vec![g(8, ended, act, deny, 0)],
            &[1],
            3,
            action::ALERT,
            true,
            verdict::EXPIRED,
            1,
            action::DENY,
            0,
            false,
        ),
        (
            "expired, rov",
            vec![g(8, ended, act, kill, rov)],
            &[1],
            3,
            action::ALERT,
            true,
            verdict::EXPIRED,
            1,
            action::KILL,
            0,
            true,
        ),
        (
            "revoked",
            vec![g(8, live, revoked, deny, rov)],
            &[1],
            3,
            action::ALERT,
            true,
            verdict::REVOKED,
            1,
            action::DENY,
            0,
            false,
        ),
        (
            "revoked beats expired",
            vec![g(8, ended, act, deny, 0), g(8, live, revoked, kill, 0)],
            &[1, 2],
            3,
            action::ALERT,
            true,
            verdict::REVOKED,
            2,
            action::KILL,
            0,
            false,
        ),
        (
            "live beats revoked",
            vec![g(8, live, revoked, deny, 0), g(8, live, act, deny, 0)],
            &[1, 2],
            3,
            action::ALERT,
            true,
            verdict::ALLOWED,
            2,
            action::ALLOWED,
            8,
            false,
        ),
        (
            "other secret",
            vec![g(1, live, act, deny, rov)],
            &[1],
            3,
            action::ALERT,
            true,
            verdict::OUT_OF_INTENT,
            1,
            action::DENY,
            0,
            true,
        ),
        (
            "other secret, monitor",
            vec![g(1, live, act, deny, rov)],
            &[1],
            3,
            action::ALERT,
            false,
            verdict::OUT_OF_INTENT,
            1,
            action::ALERT,
            8,
            true,
        ),
        (
            "intent alerts",
            vec![g(1, live, act, action::ALERT as u32, 0)],
            &[1],
            3,
            action::DENY,
            true,
            verdict::OUT_OF_INTENT,
            1,
            action::ALERT,
            8,
            false,
        ),
        (
            "stale slot is no grant",
            vec![],
            &[7],
            3,
            action::DENY,
            true,
            verdict::NO_GRANT,
            0,
            action::DENY,
            0,
            false,
        ),
        (
            "secret 63",
            vec![g(1 << 63, live, act, deny, 0)],
            &[1],
            63,
            action::DENY,
            true,
            verdict::ALLOWED,
            1,
            action::ALLOWED,
            1 << 63,
            false,
        ),
    ];
    for (name, grants, slots, secret, without, enforce, v, slot, a, taint, revoke) in cases {
        let mut pg = ProcGrants::default();
        pg.grants[..slots.len()].copy_from_slice(slots);
        let proc = (!slots.is_empty()).then_some(&pg);
        let j = judge_open(&Slots(grants), proc, secret, without, now, enforce);
        assert_eq!(
            (j.verdict, j.slot, j.action, j.taint, j.revoke),
            (v, slot, a, taint, revoke),
            "{name}"
        );
        assert_eq!(j.lets_through(), a != action::DENY && a != action::KILL, "{name}");
    }
}

/// The fanotify backend's decision and the kernel's judge agree: the decision is read from
/// the same judgement (grant named, action, expired_for_ms).
#[test]
fn open_decisions_follow_the_shared_judge() {
    let now = Utc::now();
    let mut live = grant("a", &["key"], &[], 60, false, now);
    live.on_violation = OnViolation::Kill;
    let mut exp = grant("b", &["key"], &[], -3, false, now);
    exp.revoke_on_violation = true;
    let other = grant("c", &["other"], &[], 60, false, now);
    let subj = |held: Vec<HeldGrant>| SubjectState { known: true, held, ..Default::default() };
    for (held, mode, verdict, action, grant) in [
        (
            vec![other.clone(), exp.clone()],
            Mode::Enforce,
            Verdict::Expired,
            Action::Denied,
            Some(1),
        ),
        (vec![other.clone()], Mode::Enforce, Verdict::OutOfIntent, Action::Denied, Some(0)),
        (
            vec![exp.clone(), live.clone()],
            Mode::Enforce,
            Verdict::Allowed,
            Action::Allowed,
            Some(1),
        ),
        (vec![], Mode::Enforce, Verdict::NoGrant, Action::Killed, None),
        (vec![], Mode::Monitor, Verdict::NoGrant, Action::Alerted, None),
    ] {
        let s = subj(held);
        let u = Use::SecretOpen { secret: "key".into(), without_grant: OnViolation::Kill };
        let d = decide(&u, &s, mode, now);
        assert_eq!(
            (d.verdict, d.action, d.grant),
            (verdict, action, grant),
            "{:?}",
            d.decision_path
        );
        let j = judge_secret_open("key", OnViolation::Kill, &s, mode, now, None);
        assert_eq!(explain_open(&j, "key", &s, mode, now), d);
        if verdict == Verdict::Expired {
            assert_eq!(d.expired_for_ms, Some(3000));
            assert!(j.revoke, "revoke_on_violation asked for");
        }
    }
}

/// Data on an established socket (the egress hook): only the history rule applies. The held
/// grants' coverage of the destination matters only as what makes a secret valid there.
#[test]
fn sends_on_established_sockets_follow_the_taint_only() {
    let now = Utc::now();
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let t = |dests: Vec<(IpNet, u16, u16)>| Taint {
        secret: "key".into(),
        destinations: dests,
        on_violation: OnViolation::Deny,
        named: false,
        learned: vec![],
    };
    let wide = grant("w", &["key"], &["127.0.0.0/8 1-65535"], 60, false, now);
    let expired = grant("w", &["key"], &["127.0.0.0/8 1-65535"], -1, false, now);
    let own = vec![("127.0.0.1/32".parse().unwrap(), 8443, 8443)];
    let subject = |held: Vec<HeldGrant>, taint: Vec<Taint>| SubjectState {
        known: true,
        held,
        taint,
        agent: false,
    };
    let rows: Vec<(&str, SubjectState, &str, u16, Mode, (u8, u8, u8))> = vec![
        (
            "clean writer: nothing to judge",
            subject(vec![wide.clone()], vec![]),
            "10.9.9.9",
            80,
            Mode::Enforce,
            (verdict::NO_GRANT_HELD, reason::GRANT, action::ALLOWED),
        ),
        (
            "tainted, inside the secret's own destinations and the grant",
            subject(vec![wide.clone()], vec![t(own.clone())]),
            "127.0.0.1",
            8443,
            Mode::Enforce,
            (verdict::ALLOWED, reason::GRANT, action::ALLOWED),
        ),
        (
            "tainted, the grant covers it but the secret is not valid there",
            subject(vec![wide.clone()], vec![t(own.clone())]),
            "127.0.0.1",
            9000,
            Mode::Enforce,
            (verdict::OUT_OF_INTENT, reason::TAINT, action::DENY),
        ),
        (
            "tainted, a passed socket outside every grant",
            subject(vec![wide.clone()], vec![t(vec![])]),
            "10.9.9.9",
            443,
            Mode::Enforce,
            (verdict::OUT_OF_INTENT, reason::TAINT, action::DENY),
        ),
        (
            "tainted, the covering grant expired",
            subject(vec![expired], vec![t(vec![])]),
            "127.0.0.1",
            8443,
            Mode::Enforce,
            (verdict::OUT_OF_INTENT, reason::TAINT, action::DENY),
        ),
        (
            "tainted without any grant (monitor mode alerts)",
            subject(vec![], vec![t(vec![])]),
            "127.0.0.1",
            8443,
            Mode::Monitor,
            (verdict::OUT_OF_INTENT, reason::TAINT, action::ALERT),
        ),
    ];
    for (name, s, addr, port, mode, want) in rows {
        let j = judge_send(ip(addr), port, &s, mode, now, None);
        assert_eq!((j.verdict, j.reason, j.action), want, "{name}");
        assert!(!j.revoke, "{name}: a send never revokes");
    }
}

fn learned(
    ip: &str,
    ports: &[(u16, u16)],
    secs: i64,
    deadline_ns: u64,
    now: DateTime<Utc>,
) -> LearnedAddr {
    LearnedAddr {
        ip: ip.parse().unwrap(),
        ports: ports.to_vec(),
        expires_at: now + Duration::seconds(secs),
        deadline_ns,
        name: "api.example.com".into(),
    }
}

/// Destinations by name: an address covers a grant only while learned for that grant, on
/// the learned ports, before its deadline; an address never answered is out_of_intent; an
/// address learned for another grant covers only that grant; a learned address still needs
/// a live grant (expired and revoked grants say so); a tainting secret whose own
/// destinations name the host is valid at its learned addresses.
#[test]
fn learned_addresses_cover_names() {
    let now = Utc::now();
    use Verdict::*;
    let c = |ip: &str, port: u16| Use::Connect { ip: ip.parse().unwrap(), port };
    // A grant whose only destination is a name: no networks at all.
    let named = |id: &str, secs: i64, l: Vec<LearnedAddr>| {
        let mut g = grant(id, &["key"], &[], secs, false, now);
        g.learned = l;
        g
    };
    let s = |held: Vec<HeldGrant>, taint: Vec<Taint>| SubjectState {
        known: true,
        held,
        taint,
        agent: false,
    };
    let live = learned("192.0.2.7", &[(443, 443)], 30, 0, now);
    let stale = learned("192.0.2.7", &[(443, 443)], -1, 0, now);
    let mapped = learned("::ffff:192.0.2.8", &[(443, 443)], 30, 0, now);
    let mut revoked = named("r", 60, vec![live.clone()]);
    revoked.revoked = true;
    let secret = |l: Vec<LearnedAddr>| Taint {
        secret: "key".into(),
        // The secret's own destinations by name: no networks, so only learned ones.
        destinations: vec![],
        on_violation: OnViolation::Deny,
        named: true,
        learned: l,
    };
    let mut own = secret(vec![live.clone()]);
    own.destinations = vec![("203.0.113.0/24".parse().unwrap(), 1, 1)];
    let mut own_other = secret(vec![]);
    own_other.destinations = vec![("203.0.113.0/24".parse().unwrap(), 1, 1)];
    let cases: Vec<(&str, Use, SubjectState, Verdict)> = vec![
        (
            "learned, live",
            c("192.0.2.7", 443),
            s(vec![named("a", 60, vec![live.clone()])], vec![]),
            Allowed,
        ),
        (
            "learned, other port",
            c("192.0.2.7", 80),
            s(vec![named("a", 60, vec![live.clone()])], vec![]),
            OutOfIntent,
        ),
        (
            "never answered",
            c("192.0.2.99", 443),
            s(vec![named("a", 60, vec![live.clone()])], vec![]),
            OutOfIntent,
        ),
        (
            "past its TTL",
            c("192.0.2.7", 443),
            s(vec![named("a", 60, vec![stale.clone()])], vec![]),
            OutOfIntent,
        ),
        (
            "mapped v6 form learned, v4 used",
            c("192.0.2.8", 443),
            s(vec![named("a", 60, vec![mapped.clone()])], vec![]),
            Allowed,
        ),
        (
            "v4 learned, mapped used",
            c("::ffff:192.0.2.7", 443),
            s(vec![named("a", 60, vec![live.clone()])], vec![]),
            Allowed,
        ),
        (
            "learned for the other held grant",
            c("192.0.2.7", 443),
            s(vec![named("a", 60, vec![]), named("b", 60, vec![live.clone()])], vec![]),
            Allowed,
        ),
        (
            "grant expired",
            c("192.0.2.7", 443),
            s(vec![named("a", -1, vec![live.clone()])], vec![]),
            Expired,
        ),
        ("grant revoked", c("192.0.2.7", 443), s(vec![revoked], vec![]), Revoked),
        (
            "tainted, secret valid at its learned address",
            c("192.0.2.7", 443),
            s(vec![named("a", 60, vec![live.clone()])], vec![own]),
            Allowed,
        ),
        (
            "tainted, secret's names never answered this address",
            c("192.0.2.7", 443),
            s(vec![named("a", 60, vec![live.clone()])], vec![own_other]),
            OutOfIntent,
        ),
    ];
    for (name, u, subject, verdict) in cases {
        let d = decide(&u, &subject, Mode::Enforce, now);
        assert_eq!(d.verdict, verdict, "{name}: {:?}", d.decision_path);
    }
}

/// A replay judges a learned address on the kernel's deadline at the record's time: one
/// nanosecond before allowed, at it out_of_intent (the grant itself is still live).
#[test]
fn replay_uses_the_learned_deadline() {
    let now = Utc::now();
    let ip = "192.0.2.7".parse().unwrap();
    let mut g = grant("a", &["key"], &[], 60, false, now);
    g.expires_ns = 1_000_000;
    g.learned = vec![learned("192.0.2.7", &[(443, 443)], -3600, 5_000, now)];
    let s = SubjectState { known: true, held: vec![g], ..Default::default() };
    let at = |ns| judge_connect(ip, 443, &s, Mode::Enforce, now, Some(ns)).verdict;
    assert_eq!(at(4_999), verdict::ALLOWED);
    assert_eq!(at(5_000), verdict::OUT_OF_INTENT);
}

/// Data on an established socket to an address learned by name: covered while the learned
/// entry exists, past its TTL too (the connection was judged inside it), while a new connect
/// there after the TTL is out_of_intent; an address never answered stays a breach of the
/// taint rule.
#[test]
fn sends_to_learned_addresses_outlive_the_ttl() {
    let now = Utc::now();
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let mut g = grant("a", &["key"], &[], 60, false, now);
    g.learned = vec![learned("192.0.2.7", &[(443, 443)], -5, 0, now)];
    let t = Taint {
        secret: "key".into(),
        destinations: vec![],
        on_violation: OnViolation::Deny,
        named: false,
        learned: vec![],
    };
    let s = SubjectState { known: true, held: vec![g], taint: vec![t], agent: false };
    let j = judge_send(ip("192.0.2.7"), 443, &s, Mode::Enforce, now, None);
    assert_eq!((j.verdict, j.action), (verdict::ALLOWED, action::ALLOWED));
    let j = judge_send(ip("192.0.2.7"), 80, &s, Mode::Enforce, now, None);
    assert_eq!(
        (j.verdict, j.reason, j.action),
        (verdict::OUT_OF_INTENT, reason::TAINT, action::DENY)
    );
    let j = judge_send(ip("192.0.2.99"), 443, &s, Mode::Enforce, now, None);
    assert_eq!(
        (j.verdict, j.reason, j.action),
        (verdict::OUT_OF_INTENT, reason::TAINT, action::DENY)
    );
    let c = judge_connect(ip("192.0.2.7"), 443, &s, Mode::Enforce, now, None);
    assert_eq!(c.verdict, verdict::OUT_OF_INTENT);
}

/// A secret whose own destinations are given by name (no networks): data sent where the stub
/// learned the name for it is valid there (the send judge reads the secret's send slot, where
/// learned addresses are host entries), past the TTL too while the entry lives; an address
/// its names never answered is a breach; and the same secret with a network keeps the
/// network's ports at a learned address (the host entry holds the union).
#[test]
fn sends_where_a_secrets_names_were_learned() {
    let now = Utc::now();
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let mut g = grant("a", &["key"], &[], 60, false, now);
    g.learned = vec![
        learned("192.0.2.7", &[(443, 443)], -5, 0, now),
        learned("192.0.2.8", &[(443, 443)], 30, 0, now),
    ];
    let t = |nets: Vec<(IpNet, u16, u16)>, l: Vec<LearnedAddr>| Taint {
        secret: "key".into(),
        destinations: nets,
        on_violation: OnViolation::Deny,
        named: true,
        learned: l,
    };
    let subject = |t: Taint| SubjectState {
        known: true,
        held: vec![g.clone()],
        taint: vec![t],
        agent: false,
    };
    let breach = (verdict::OUT_OF_INTENT, reason::TAINT, action::DENY);
    let send = |s: &SubjectState, a: &str, port: u16| {
        let j = judge_send(ip(a), port, s, Mode::Enforce, now, None);
        (j.verdict, j.reason, j.action)
    };
    let named = subject(t(vec![], vec![learned("192.0.2.7", &[(443, 443)], -5, 0, now)]));
    assert_eq!(send(&named, "192.0.2.7", 443).0, verdict::ALLOWED, "learned, past its TTL");
    assert_eq!(send(&named, "192.0.2.8", 443), breach, "the secret's names never answered it");
    assert_eq!(send(&named, "192.0.2.7", 80), breach, "learned on another port");
    // A connect there after the TTL is judged on the deadline (the grant's and the secret's).
    let c = judge_connect(ip("192.0.2.7"), 443, &named, Mode::Enforce, now, None);
    assert_eq!(c.verdict, verdict::OUT_OF_INTENT);
    // Before the fix, the same subject's secret counted as having no destination anywhere.
    let unlearned = subject(t(vec![], vec![]));
    assert_eq!(send(&unlearned, "192.0.2.7", 443), breach, "named secret, nothing learned");
    // A network of the secret around the learned address: its ports stay valid there.
    let mut both = subject(t(
        vec![("192.0.2.0/24".parse().unwrap(), 80, 80)],
        vec![learned("192.0.2.7", &[(443, 443)], 30, 0, now)],
    ));
    both.held[0].destinations = vec![("192.0.2.0/24".parse().unwrap(), 80, 80)];
    assert_eq!(send(&both, "192.0.2.7", 443).0, verdict::ALLOWED, "learned port");
    assert_eq!(send(&both, "192.0.2.7", 80).0, verdict::ALLOWED, "the network's port");
    // The tainted process's DNS queries, steered to the stub: the stub judges their names.
    super::set_dns_stub(45353);
    assert_eq!(send(&unlearned, "127.0.0.1", 45353).0, verdict::ALLOWED, "query to the stub");
    assert_eq!(send(&unlearned, "::ffff:127.0.0.1", 45353).0, verdict::ALLOWED, "mapped form");
    assert_eq!(send(&unlearned, "127.0.0.1", 45354), breach, "another loopback port");
    assert_eq!(send(&unlearned, "127.0.0.2", 45353), breach, "another loopback address");
    // `[::1]` is the stub only while it serves there (dns_stub::V6): otherwise another
    // process may hold that port.
    assert_eq!(send(&unlearned, "::1", 45353), breach, "::1 without the IPv6 stub");
    super::set_dns_stub(45353 | enforcer_common::dns_stub::V6);
    assert_eq!(send(&unlearned, "::1", 45353).0, verdict::ALLOWED, "the IPv6 stub");
    assert_eq!(send(&unlearned, "127.0.0.1", 45353).0, verdict::ALLOWED, "flags keep the port");
    assert_eq!(send(&unlearned, "::2", 45353), breach, "another IPv6 address");
}
