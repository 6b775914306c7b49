//! The DNS side of the engine: connect decisions judged on the addresses the stub learned,
//! events that name them, and `dns` events for queries outside the asker's grants.
use std::net::IpAddr;

use enforcer_common::SECRET_SLOT_BASE;

use super::{Engine, wall_time_of};
use crate::decide::{Action, Decision, Reason, SubjectState, Verdict};
use crate::dns::DnsNotice;
use crate::event::{self, DestinationRef};
use crate::mint::view::GrantView;

impl Engine {
    /// Adds to each held grant (and each tainting secret) the LEARNED entry for `ip` as the
    /// kernel held it at `at_ns`: the replay judges on what the hook saw.
    pub(super) fn fill_learned(
        &self,
        subject: &mut SubjectState,
        view: &GrantView,
        ip: IpAddr,
        at_ns: u64,
    ) {
        for g in subject.held.iter_mut().filter(|g| g.slot != 0) {
            if let Some(l) = self.learned.at(g.slot, ip, at_ns) {
                g.learned.push(l);
            }
        }
        for t in subject.taint.iter_mut() {
            let Some(i) = view.policy.secret_bits.get(&t.secret) else { continue };
            if let Some(l) = self.learned.at(SECRET_SLOT_BASE + i, ip, at_ns) {
                t.learned.push(l);
            }
        }
    }

    /// A query the stub refused (enforce) or forwarded outside the asker's grants (monitor,
    /// or `refuse = "off"`): a `dns` event with the name asked.
    pub fn on_dns(&mut self, n: DnsNotice) {
        let (process, _) = self.process_ref(n.tgid, None);
        let held = if n.grants.is_empty() {
            "holds no grant".to_string()
        } else {
            format!("holds grants {}, none of which names it", n.grants.join(", "))
        };
        let mut path = vec![
            format!(
                "DNS query {} {} to {} ({}) answered by the daemon's stub",
                n.qtype, n.name, n.resolver, n.protocol
            ),
            format!("asking process {held}"),
        ];
        path.push(if n.refused {
            format!("mode enforce: answered {} without asking upstream", n.answer)
        } else {
            format!("mode {}: forwarded, alert", self.mode)
        });
        let d = Decision {
            verdict: Verdict::OutOfIntent,
            action: if n.refused { Action::Denied } else { Action::Alerted },
            decision_path: path,
            grant: None,
            expired_for_ms: None,
            reason: Reason::Grant,
        };
        let mut e = self.event("dns", &d, process);
        e.time = event::rfc3339(wall_time_of(n.boot_ns));
        e.severity = "medium".into();
        // Exfiltration over an alternative protocol; DNS as the application protocol.
        e.mitre = vec!["T1071.004".into(), "T1048".into()];
        e.destination = Some(DestinationRef {
            ip: n.resolver.ip().to_canonical().to_string(),
            port: n.resolver.port(),
            protocol: n.protocol.into(),
            name: Some(n.name.clone()),
        });
        e.message = Some(format!(
            "DNS query for {} outside the grants of pid {}: {}",
            n.name,
            n.tgid,
            if n.refused { n.answer } else { "alerted" }
        ));
        self.emit(e);
    }
}

/// The name a connect's address was learned from: for the grant decided on (index + 1 into
/// `held`), else any held grant or tainting secret that learned it.
pub(super) fn learned_name(subject: &SubjectState, index: u32, ip: IpAddr) -> Option<String> {
    let ip = ip.to_canonical();
    let judged = (index as usize).checked_sub(1).and_then(|i| subject.held.get(i));
    let hit = |l: &&crate::decide::LearnedAddr| l.ip.to_canonical() == ip && !l.name.is_empty();
    judged
        .and_then(|g| g.learned.iter().find(hit))
        .or_else(|| subject.held.iter().flat_map(|g| g.learned.iter()).find(hit))
        .or_else(|| subject.taint.iter().flat_map(|t| t.learned.iter()).find(hit))
        .map(|l| l.name.clone())
}
