//! Which SVIDs a caller may have right now: the live grants the kernel says its process holds,
//! whose intents name audiences. Read per request, so a revoke, an expiry or the end of a grant
//! refuses the next fetch.
use chrono::{DateTime, Utc};
use enforcer_common::grant_state;

use super::Spiffe;
use crate::decide::Verdict;
use crate::kernel::grants::boot_now_ns;
use crate::mint::attest::Requester;
use crate::policy::render_spiffe_id;

/// A grant the caller holds that entitles it to JWT-SVIDs.
#[derive(Debug, Clone, PartialEq)]
pub struct Entitlement {
    pub grant_id: String,
    pub intent: String,
    pub spiffe_id: String,
    /// The intent's `audiences`: what this grant may request.
    pub audiences: Vec<String>,
    pub expires_at: DateTime<Utc>,
}

/// A held grant that entitles to nothing now, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub grant_id: String,
    pub intent: String,
    pub expires_at: DateTime<Utc>,
    pub verdict: Verdict,
    pub why: String,
}

#[derive(Debug, Default)]
pub struct Holdings {
    pub entitled: Vec<Entitlement>,
    pub refused: Vec<Refused>,
}

/// The caller's holdings, from its `PROC_GRANTS` entry and the kernel's `GRANTS` map; the
/// grant facts (intent, expiry) from the published view. Empty when the caller has exited
/// (its pid may already name someone else).
pub fn holdings(sp: &Spiffe, peer: &Requester) -> Holdings {
    let mut out = Holdings::default();
    let Some(pg) = sp.maps.state_of(peer.pid) else { return out };
    // An entry left by an earlier process with this pid is not the caller's.
    if !crate::act::same_start(pg.start_ns, peer.start_ns) {
        return out;
    }
    let view = sp.view.load();
    let config = view.policy.config.clone();
    let now = Utc::now();
    let boot_now = boot_now_ns();
    for slot in pg.grants.iter().copied().filter(|s| *s != 0) {
        let Some(g) = view.grants.get(&slot) else { continue };
        let refuse = |verdict, why: String| Refused {
            grant_id: g.id.clone(),
            intent: g.intent.clone(),
            expires_at: g.expires_at,
            verdict,
            why,
        };
        // The kernel's record first: a revoke by enforcement lands there before the view.
        let kernel = sp.maps.grant_info(slot);
        if g.revoked || kernel.is_none_or(|k| k.state == grant_state::REVOKED) {
            out.refused.push(refuse(Verdict::Revoked, format!("grant {} is revoked", g.id)));
            continue;
        }
        if g.expires_at <= now || kernel.is_some_and(|k| k.expires_ns <= boot_now) {
            out.refused.push(refuse(Verdict::Expired, format!("grant {} has expired", g.id)));
            continue;
        }
        let Some(intent) = config.intent(&g.intent) else {
            let why = format!("intent {} of grant {} is no longer in the policy", g.intent, g.id);
            out.refused.push(refuse(Verdict::OutOfIntent, why));
            continue;
        };
        if intent.audiences.is_empty() {
            let why = format!("intent {} names no audiences: it issues no SVIDs", intent.name);
            out.refused.push(refuse(Verdict::OutOfIntent, why));
            continue;
        }
        let needs_subject =
            intent.spiffe_id.as_deref().is_some_and(|t| t.contains("{uid}") || t.contains("{gid}"));
        let (uid, gid) = if needs_subject {
            let reg = sp.registry.lock().unwrap_or_else(|e| e.into_inner());
            match reg.live_grant(&g.id) {
                Some(live) => (live.subject.uid, live.subject.gid),
                None => continue,
            }
        } else {
            (0, 0)
        };
        out.entitled.push(Entitlement {
            grant_id: g.id.clone(),
            intent: g.intent.clone(),
            spiffe_id: render_spiffe_id(
                &sp.cfg.trust_domain,
                intent.spiffe_id.as_deref(),
                &intent.name,
                uid,
                gid,
            ),
            audiences: intent.audiences.clone(),
            expires_at: g.expires_at,
        });
    }
    // Only a still-live caller proves the entry read was its own.
    if peer.is_gone() {
        return Holdings::default();
    }
    out
}

/// The entitlements that may carry every requested audience (and the requested SPIFFE ID if
/// one was asked for); one per SPIFFE ID, the longest-lived grant's.
pub fn choose<'a>(
    entitled: &'a [Entitlement],
    audiences: &[String],
    spiffe_id: Option<&str>,
) -> Vec<&'a Entitlement> {
    let mut out: Vec<&Entitlement> = Vec::new();
    for e in entitled {
        if spiffe_id.is_some_and(|id| id != e.spiffe_id)
            || !audiences.iter().all(|a| e.audiences.contains(a))
        {
            continue;
        }
        match out.iter_mut().find(|o| o.spiffe_id == e.spiffe_id) {
            Some(o) if o.expires_at < e.expires_at => *o = e,
            Some(_) => {}
            None => out.push(e),
        }
    }
    out
}
