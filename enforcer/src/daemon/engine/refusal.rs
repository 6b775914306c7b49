//! Refused grant requests and failed attestations as events (`mint_refused`): a mint refusal
//! is a security signal (a process asking for a credential it may not have), not only an API
//! answer. At most one event per (uid, code) per second; the next one counts those folded in.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::Engine;
use crate::api::mint::Refusal;
use crate::decide::{self, Action, Decision, Verdict};

/// One event per (uid, error code) per this interval.
const EVERY: Duration = Duration::from_secs(1);
/// (uid, code) pairs remembered for the summary.
const MAX_KEYS: usize = 4096;

#[derive(Default)]
pub struct RefusalLog {
    /// (uid, code) -> (last event, refusals folded since).
    last: HashMap<(u32, String), (Instant, u64)>,
    pub folded: u64,
}

impl Engine {
    pub fn on_refusal(&mut self, r: Refusal) {
        self.counts.grant_refusals += 1;
        let now = Instant::now();
        let key = (r.uid, r.code.clone());
        let log = &mut self.refusals;
        let folded = match log.last.get_mut(&key) {
            Some((at, n)) if now.duration_since(*at) < EVERY => {
                *n += 1;
                log.folded += 1;
                return;
            }
            Some((at, n)) => {
                *at = now;
                std::mem::take(n)
            }
            None => {
                if log.last.len() >= MAX_KEYS {
                    log.last.retain(|_, (at, _)| now.duration_since(*at) < EVERY);
                    if log.last.len() >= MAX_KEYS {
                        log.last.clear();
                    }
                }
                log.last.insert(key, (now, 0));
                0
            }
        };
        let (mut process, _) = self.process_ref(r.pid, None);
        if process.uid == 0 && r.uid != u32::MAX {
            process.uid = r.uid;
        }
        let mut path = vec![format!("POST /v1/grants refused: {}", r.code), r.message.clone()];
        if let Some(i) = &r.intent {
            path.insert(1, format!("intent {i}"));
        }
        if folded > 0 {
            path.push(format!(
                "{folded} more refusals ({}) from uid {} in the last second",
                r.code, r.uid
            ));
        }
        let d = Decision {
            verdict: Verdict::NoGrant,
            action: Action::Denied,
            decision_path: path,
            grant: None,
            expired_for_ms: None,
            reason: decide::Reason::Grant,
        };
        let mut e = self.event("mint_refused", &d, process);
        e.severity = match r.code.as_str() {
            "attestation_failed" | "not_your_process" | "subject_gone" | "agent_not_allowed" => {
                "high"
            }
            _ => "medium",
        }
        .into();
        e.message = Some(format!(
            "grant request{} by pid {} (uid {}) refused: {} ({})",
            r.intent.as_deref().map(|i| format!(" for intent {i}")).unwrap_or_default(),
            r.pid,
            r.uid,
            r.code,
            r.message
        ));
        self.emit(e);
    }
}
