//! The connect judge: the one decision for an outbound connection, compiled into the eBPF
//! connect hooks (`enforcer-ebpf/src/connect.rs`) and called by the daemon's `decide.rs`,
//! so the daemon's table tests exercise the very code the kernel runs.
//!
//! It reads its facts through [`Facts`] (the kernel maps in eBPF; an in-memory copy in the
//! daemon), takes the clock as an argument and writes nothing: applying a revoke-on-violation
//! is the caller's job ([`Judgement::revoke`]).
//!
//! Rules, in order:
//! 1. Grants: allowed if any active, unexpired grant covers the destination; otherwise the
//!    first covering grant that was revoked (revoked), else the first covering grant that
//!    expired (expired); otherwise, when grants are held, out_of_intent against the first
//!    held grant. A process holding no grant is not judged by grants (`NO_GRANT_HELD`),
//!    unless it is an `[[agent]]` process: then out_of_intent (reason AGENT).
//!    A destination given by name covers an address only while it is learned: the DNS stub
//!    answered it to a holder of that grant and the answer's deadline has not passed
//!    ([`Facts::learned`]); an address the grant never learned is out_of_intent.
//! 2. History counts: a connection that rule 1 lets through is out_of_intent (reason TAINT)
//!    when the process, any process of the subtree of a grant it holds (the grant's
//!    taint), or any process of its `[[agent]]` tree (the tree's taint) read a secret that is not valid there: outside the secret's own
//!    destinations (if it has any), or not covered by a live grant that covers the secret.
//! 3. The action of a violation: the grant's intent's on_violation (reason GRANT), the
//!    tainting secret's (TAINT) or the agent action (AGENT); never "allowed" for a violation;
//!    monitor mode only alerts.
use crate::{
    GrantInfo, MAX_PROC_GRANTS, MAX_SECRETS, ProcGrants, SECRET_SEND_SLOT_BASE, SECRET_SLOT_BASE,
    SecretInfo, action, grant_flags, grant_state, proc_flags, reason, verdict,
};

/// What the judge reads. Each lookup is a map read in the kernel.
pub trait Facts {
    /// The grant in `slot` (None: no such grant).
    fn grant(&self, slot: u32) -> Option<GrantInfo>;
    /// Whether the destinations stored under `slot` (a grant slot, `SECRET_SLOT_BASE + i`
    /// for secret i's own destinations, or `SECRET_SEND_SLOT_BASE + i` for the same plus the
    /// addresses learned for its names) include `addr` (IPv6 form, IPv4 mapped) and `port`.
    fn covers(&self, slot: u32, addr: &[u8; 16], port: u16) -> bool;
    /// The deadline (boot clock) until which `addr` is covered for `slot` (a grant slot, or
    /// `SECRET_SLOT_BASE + i`) on `port` because the DNS stub answered it for one of the
    /// slot's destinations by name (0: not learned, or not on this port).
    fn learned(&self, slot: u32, addr: &[u8; 16], port: u16) -> u64;
    /// Secret `index`'s facts (None: no such secret).
    fn secret(&self, index: u32) -> Option<SecretInfo>;
    /// Secrets read by any process of the subtree holding the grant in `slot` (the
    /// GRANT_TAINT map: kept apart from GRANTS so the daemon never rewrites a grant's state).
    fn grant_taint(&self, slot: u32) -> u64;
    /// Secrets read by any process of the `[[agent]]` tree `tree` (AGENT_TAINT).
    fn tree_taint(&self, tree: u32) -> u64;
    /// The DNS stub's CONFIG word: its port on 127.0.0.1 (0: no stub) and `dns_stub::*`
    /// flags (`config::DNS_STUB_PORT`).
    fn dns_stub(&self) -> u32;
}

/// Host-wide settings (the kernel's CONFIG map).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    pub enforce: bool,
    /// `action::*` for `[[agent]]` processes connecting outside any grant.
    pub agent_action: u8,
}

/// The judge's answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Judgement {
    /// `verdict::*`.
    pub verdict: u8,
    /// The grant slot decided against (0 = none).
    pub slot: u32,
    /// `action::*` to apply.
    pub action: u8,
    /// `reason::*`.
    pub reason: u8,
    /// For `reason::TAINT`: the secret index + 1 whose validity the destination broke.
    pub taint_secret: u8,
    /// The grant in `slot` is to be revoked now (revoke_on_violation on an active grant).
    pub revoke: bool,
    /// The taint judged: the process's own and that of every grant it holds (its subtree's).
    pub taint: u64,
}

impl Judgement {
    /// Whether the connection is let through (the action is not deny or kill).
    #[inline(always)]
    pub fn lets_through(&self) -> bool {
        self.action != action::DENY && self.action != action::KILL
    }
}

/// The verdict for a process with map entry `proc` connecting to (`addr`, `port`) at
/// `now_ns` (boot clock). A process without a map entry holds nothing: the caller answers
/// `NO_GRANT_HELD` without calling the judge.
#[inline(always)]
pub fn judge<F: Facts>(
    facts: &F,
    proc: &ProcGrants,
    addr: &[u8; 16],
    port: u16,
    now_ns: u64,
    settings: Settings,
) -> Judgement {
    let mut j = Judgement {
        verdict: verdict::NO_GRANT_HELD,
        slot: 0,
        action: action::ALLOWED,
        reason: reason::GRANT,
        taint_secret: 0,
        revoke: false,
        taint: proc.taint | tree_taint(facts, proc),
    };
    let mut any = false;
    let mut first_slot = 0u32;
    let mut best = verdict::OUT_OF_INTENT;
    let mut best_slot = 0u32;
    let mut live_slot = 0u32;
    // Secrets covered by live grants that also cover this destination.
    let mut live_secrets: u64 = 0;
    // (action, revocable) of the grants a violation may be decided against: kept small, as
    // the kernel's stack is 512 bytes.
    let mut chosen = (0u32, false);
    let mut best_info = (0u32, false);
    let mut first_info = (0u32, false);
    for i in 0..MAX_PROC_GRANTS {
        let slot = proc.grants[i];
        if slot == 0 {
            continue;
        }
        let Some(g) = facts.grant(slot) else { continue };
        let facts_of_g = (g.action, revocable(&g));
        // A secret read anywhere in this grant's subtree taints every holder.
        j.taint |= facts.grant_taint(slot);
        if !any {
            first_slot = slot;
            first_info = facts_of_g;
        }
        any = true;
        if !grant_covers(facts, &g, slot, addr, port, now_ns) {
            continue;
        }
        if g.state == grant_state::ACTIVE && now_ns < g.expires_ns {
            if live_slot == 0 {
                live_slot = slot;
            }
            live_secrets |= g.secrets;
            continue;
        }
        // Covered but unusable: the first revoked one outranks any expired one (it is the
        // stronger statement); among equals, the first held wins.
        let v = if g.state == grant_state::REVOKED { verdict::REVOKED } else { verdict::EXPIRED };
        if best == verdict::OUT_OF_INTENT || (v == verdict::REVOKED && best != verdict::REVOKED) {
            best = v;
            best_slot = slot;
            best_info = facts_of_g;
        }
    }
    if live_slot != 0 {
        j.verdict = verdict::ALLOWED;
        j.slot = live_slot;
    } else if best_slot != 0 {
        j.verdict = best;
        j.slot = best_slot;
        chosen = best_info;
    } else if any {
        j.verdict = verdict::OUT_OF_INTENT;
        j.slot = first_slot;
        chosen = first_info;
    } else if proc.flags & proc_flags::AGENT != 0 {
        j.verdict = verdict::OUT_OF_INTENT;
        j.reason = reason::AGENT;
    }
    // History counts: every secret this process (or its grants' subtrees) read must be
    // valid toward here.
    if j.taint != 0
        && (j.verdict == verdict::ALLOWED || j.verdict == verdict::NO_GRANT_HELD)
        && let Some((secret, act)) =
            taint_breach::<F, true>(facts, j.taint, live_secrets, addr, port, now_ns)
    {
        j.verdict = verdict::OUT_OF_INTENT;
        j.reason = reason::TAINT;
        j.taint_secret = secret;
        j.action = act;
    }
    if j.verdict == verdict::ALLOWED || j.verdict == verdict::NO_GRANT_HELD {
        j.action = action::ALLOWED;
        return j;
    }
    // A violation: the action comes from the grant's intent, the tainting secret or the
    // agent setting; monitor mode only alerts.
    if j.reason == reason::GRANT {
        j.action = chosen.0 as u8;
        j.revoke = chosen.1;
    } else if j.reason == reason::AGENT {
        j.action = settings.agent_action;
    }
    if j.action == action::ALLOWED {
        j.action = action::ALERT;
    }
    if !settings.enforce {
        j.action = action::ALERT;
    }
    j
}

/// What any process of the subject's `[[agent]]` tree read (a tree's processes exchange
/// data freely: pipes, files, the shell holding `$(cat secret)`).
#[inline(always)]
fn tree_taint<F: Facts>(facts: &F, proc: &ProcGrants) -> u64 {
    if proc.tree == 0 { 0 } else { facts.tree_taint(proc.tree) }
}

/// The first tainting secret (index + 1) not valid toward (`addr`, `port`) and its action:
/// outside the secret's own destinations (if it has any), or not covered by a live grant
/// that covers the secret (`live_secrets`).
#[inline(always)]
fn taint_breach<F: Facts, const NAMES: bool>(
    facts: &F,
    taint: u64,
    live_secrets: u64,
    addr: &[u8; 16],
    port: u16,
    now_ns: u64,
) -> Option<(u8, u8)> {
    for i in 0..MAX_SECRETS {
        if taint & (1u64 << i) == 0 {
            continue;
        }
        let Some(info) = facts.secret(i as u32) else { continue };
        // Sends (NAMES false) read the secret's send slot, where the addresses learned for
        // its names are host entries beside its networks: one lookup (one more map lookup
        // per secret puts the egress program past the verifier's budget).
        let own_ok = info.has_dests == 0
            || if NAMES {
                covered(facts, SECRET_SLOT_BASE + i as u32, addr, port, now_ns)
            } else {
                facts.covers(SECRET_SEND_SLOT_BASE + i as u32, addr, port)
            };
        let granted = live_secrets & (1u64 << i) != 0;
        if !(own_ok && granted) {
            return Some(((i + 1) as u8, info.action as u8));
        }
    }
    None
}

/// The verdict for data sent on an established socket, seen by the egress hook: the
/// connection itself was judged when it was made (or accepted, or it was received from
/// another process over SCM_RIGHTS), so only the history rule applies: data of a process
/// tainted by secret S (its own taint, its grants' subtrees', the socket's) leaves only
/// where S is valid: inside S's own destinations and covered by a live held grant that
/// covers S. Whether the held grants cover the destination otherwise does not matter (a
/// server answering clients, a connection older than its grant). Never revokes.
/// An address learned by name covers a send while its LEARNED entry exists, past its
/// deadline too: the connection was judged inside the deadline, and a connection opened in
/// that window keeps working after the TTL passes.
#[inline(always)]
pub fn judge_send<F: Facts>(
    facts: &F,
    proc: &ProcGrants,
    addr: &[u8; 16],
    port: u16,
    now_ns: u64,
    settings: Settings,
) -> Judgement {
    let mut taint = proc.taint | tree_taint(facts, proc);
    let mut live_secrets: u64 = 0;
    let mut live_slot = 0u32;
    for i in 0..MAX_PROC_GRANTS {
        let slot = proc.grants[i];
        if slot == 0 {
            continue;
        }
        let Some(g) = facts.grant(slot) else { continue };
        taint |= facts.grant_taint(slot);
        if g.state == grant_state::ACTIVE
            && now_ns < g.expires_ns
            && grant_covers(facts, &g, slot, addr, port, ESTABLISHED)
        {
            if live_slot == 0 {
                live_slot = slot;
            }
            live_secrets |= g.secrets;
        }
    }
    let mut j = Judgement {
        verdict: if taint == 0 { verdict::NO_GRANT_HELD } else { verdict::ALLOWED },
        slot: live_slot,
        action: action::ALLOWED,
        reason: reason::GRANT,
        taint_secret: 0,
        revoke: false,
        taint,
    };
    // A tainted process's DNS queries reach the stub (steered there by the connect hooks):
    // the stub judges each query's name against the asker's grants itself.
    if taint == 0 || is_stub(addr, port, facts.dns_stub()) {
        return j;
    }
    if let Some((secret, act)) =
        taint_breach::<F, false>(facts, taint, live_secrets, addr, port, ESTABLISHED)
    {
        j.verdict = verdict::OUT_OF_INTENT;
        j.reason = reason::TAINT;
        j.taint_secret = secret;
        j.action = if act == action::ALLOWED || !settings.enforce { action::ALERT } else { act };
    }
    j
}

/// `::ffff:127.0.0.1`, where the stub listens (IPv4 and IPv4-mapped queries are steered
/// there).
const STUB_ADDR: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1];
/// `::1`, where the stub listens too when `dns_stub::V6` is set (IPv6 queries).
const STUB_ADDR6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// Whether (addr, port) is the DNS stub, given the stub's CONFIG word `stub`.
#[inline(always)]
pub fn is_stub(addr: &[u8; 16], port: u16, stub: u32) -> bool {
    port != 0
        && port == crate::dns_stub::port(stub)
        && (*addr == STUB_ADDR || (stub & crate::dns_stub::V6 != 0 && *addr == STUB_ADDR6))
}

/// The `now_ns` for `covered` under which any LEARNED entry still present counts (sends on
/// established sockets).
const ESTABLISHED: u64 = 0;

/// Whether `slot`'s destinations cover (addr, port) at `now_ns`: by network, or by an
/// address learned from a name whose deadline has not passed (a use one nanosecond late is
/// past it).
#[inline(always)]
fn covered<F: Facts>(facts: &F, slot: u32, addr: &[u8; 16], port: u16, now_ns: u64) -> bool {
    facts.covers(slot, addr, port) || now_ns < facts.learned(slot, addr, port)
}

/// `covered` for grant `g` in `slot`, skipping the lookup its flags say cannot match (a
/// grant with names only has nothing in GRANT_DESTS, one with networks only nothing in
/// LEARNED): one map lookup per held grant instead of two on a connect.
#[inline(always)]
fn grant_covers<F: Facts>(
    facts: &F,
    g: &GrantInfo,
    slot: u32,
    addr: &[u8; 16],
    port: u16,
    now_ns: u64,
) -> bool {
    (g.flags & grant_flags::NO_NETWORKS == 0 && facts.covers(slot, addr, port))
        || (g.flags & grant_flags::NO_NAMES == 0 && now_ns < facts.learned(slot, addr, port))
}

/// Whether a violation against `g` ends it now (revoke_on_violation on an active grant).
#[inline(always)]
fn revocable(g: &GrantInfo) -> bool {
    g.flags & grant_flags::REVOKE_ON_VIOLATION != 0 && g.state == grant_state::ACTIVE
}
