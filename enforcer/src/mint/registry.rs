//! Live grants: issue, revoke, expire, and the subtree membership that ends a grant when
//! every process holding it has exited. The kernel maps are the source of truth for who
//! holds what; the ledger is the durable record; this registry keeps them in step.
use std::collections::HashMap;
use std::net::ToSocketAddrs;

use anyhow::Result;
use chrono::{DateTime, Duration, Utc};
use ipnet::IpNet;
use tokio::sync::mpsc::UnboundedSender;

use super::error::MintError;
use super::ledger::Ledger;
use super::model::{Grant, GrantState, Subject};
use super::token::Signer;
use crate::decide::{HeldGrant, SubjectState, Taint};
use crate::kernel::grants::{GrantKernel, GrantMaps, boot_deadline, id_hash};
use crate::kernel::policy::{SecretIndex, action_code, without_grant};
use crate::policy::{Config, Destination, Intent, OnViolation};
use enforcer_common::{ProcGrants, grant_flags, proc_flags};
use std::sync::Arc;

/// A grant lifecycle change, for the event stream.
#[derive(Debug, Clone)]
pub enum GrantChange {
    Issued(Grant),
    Expired(Grant),
    Revoked(Grant, String),
    Ended(Grant),
}

pub struct Live {
    pub grant: Grant,
    pub slot: u32,
    pub nets: Vec<(IpNet, u16, u16)>,
    /// Live processes holding the grant (subject + descendants forked after binding).
    pub members: u32,
    pub on_violation: OnViolation,
    pub revoke_on_violation: bool,
}

pub struct Registry {
    maps: GrantMaps,
    pub ledger: Ledger,
    /// Shared so tokens are signed outside the registry lock.
    pub signer: Arc<Signer>,
    pub issuer: String,
    live: HashMap<String, Live>,
    by_slot: HashMap<u32, String>,
    /// Earliest deadline of an active grant, so the expiry check is cheap when nothing is due.
    next_deadline: Option<DateTime<Utc>>,
    /// The policy in force and what the kernel needs of it per secret.
    pub policy: Arc<Config>,
    pub index: SecretIndex,
    /// Secret name -> its own destinations, resolved.
    secret_nets: HashMap<String, Vec<(IpNet, u16, u16)>>,
    /// Last 'used' ledger entry per grant: uses are recorded at most once a second each,
    /// so a connect flood cannot turn into a write flood.
    last_use: HashMap<String, std::time::Instant>,
    next_slot: u32,
    changes: UnboundedSender<GrantChange>,
}

/// Concrete networks of a grant's destinations (DNS names resolved now; wildcards cannot
/// be resolved and are skipped with a warning).
pub fn resolve_destinations(dests: &[Destination]) -> Vec<(IpNet, u16, u16)> {
    let mut out = Vec::new();
    for d in dests {
        match d {
            Destination::Cidr { net, ports } => out.push((*net, ports.lo, ports.hi)),
            Destination::Dns { name, ports } => {
                if name.starts_with("*.") {
                    tracing::warn!(destination = %d, "wildcard DNS destinations cannot be matched by address yet; skipped");
                    continue;
                }
                match (name.as_str(), 0u16).to_socket_addrs() {
                    Ok(addrs) => {
                        for a in addrs {
                            out.push((IpNet::from(a.ip()), ports.lo, ports.hi));
                        }
                    }
                    Err(e) => tracing::warn!(destination = %d, "cannot resolve: {e}"),
                }
            }
        }
    }
    out
}

pub fn new_grant_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut raw = [0u8; 26];
    getrandom::fill(&mut raw).expect("kernel randomness");
    let s: String = raw.iter().map(|b| ALPHABET[(*b & 31) as usize] as char).collect();
    format!("g_{s}")
}

impl Registry {
    pub fn new(
        maps: GrantMaps,
        ledger: Ledger,
        signer: Signer,
        issuer: String,
        changes: UnboundedSender<GrantChange>,
        policy: Arc<Config>,
        index: SecretIndex,
    ) -> Self {
        Registry {
            maps,
            ledger,
            signer: Arc::new(signer),
            issuer,
            live: HashMap::new(),
            by_slot: HashMap::new(),
            next_deadline: None,
            next_slot: 1,
            changes,
            policy,
            index,
            secret_nets: HashMap::new(),
            last_use: HashMap::new(),
        }
    }

    /// Records a use of grant `id` in the ledger (throttled to one entry a second).
    pub fn note_use(&mut self, id: &str, detail: &str) {
        let now = std::time::Instant::now();
        if self
            .last_use
            .get(id)
            .is_some_and(|t| now.duration_since(*t) < std::time::Duration::from_secs(1))
        {
            return;
        }
        if self.last_use.len() > 20_000 {
            self.last_use.clear();
        }
        self.last_use.insert(id.to_string(), now);
        if let Err(e) = self.ledger.record_use(id, detail) {
            tracing::warn!("ledger: record use of {id}: {e:#}");
        }
    }

    /// Installs a policy: secret indices (stable), each secret's own destinations in the
    /// kernel (new ones written before old ones are removed).
    pub fn set_policy(&mut self, policy: Arc<Config>) -> Result<()> {
        self.index.assign(&policy)?;
        let mut nets = HashMap::new();
        for s in &policy.secrets {
            let Some(i) = self.index.by_name.get(&s.name).copied() else { continue };
            let n = resolve_destinations(&s.destinations);
            self.maps.put_secret_dests(i, &n)?;
            nets.insert(s.name.clone(), n);
        }
        for (name, old) in &self.secret_nets {
            let Some(i) = self.index.by_name.get(name).copied() else { continue };
            let keep: Vec<IpNet> = nets
                .get(name)
                .map(|v: &Vec<(IpNet, u16, u16)>| v.iter().map(|n| n.0).collect())
                .unwrap_or_default();
            let stale: Vec<IpNet> = old.iter().map(|n| n.0).filter(|n| !keep.contains(n)).collect();
            self.maps.remove_dests(enforcer_common::SECRET_SLOT_BASE + i, &stale);
        }
        self.secret_nets = nets;
        self.policy = policy;
        Ok(())
    }

    /// Records that `pid` read `secret` (kernel taint bit; inherited by later children).
    pub fn taint(&mut self, pid: u32, start_ns: u64, secret: &str) -> Result<()> {
        let bits = self.index.bits(&[secret.to_string()]);
        if bits != 0 {
            self.maps.add_taint(pid, start_ns, bits)?;
        }
        Ok(())
    }

    /// The decision's view of a process, from the kernel's entry for it.
    pub fn subject_state(&self, pg: Option<ProcGrants>) -> SubjectState {
        let Some(pg) = pg else { return SubjectState { known: true, ..Default::default() } };
        let slots: Vec<u32> = pg.grants.iter().copied().filter(|s| *s != 0).collect();
        let taint = self
            .index
            .names(pg.taint)
            .into_iter()
            .map(|name| Taint {
                destinations: self.secret_nets.get(&name).cloned().unwrap_or_default(),
                on_violation: without_grant(&self.policy, &name),
                secret: name,
            })
            .collect();
        SubjectState {
            known: true,
            held: self.held_slots(&slots),
            taint,
            agent: pg.flags & proc_flags::AGENT != 0,
        }
    }

    pub fn state_of(&self, pid: u32) -> Option<ProcGrants> {
        self.maps.state_of(pid)
    }

    /// The grant id behind a kernel slot.
    pub fn id_of_slot(&self, slot: u32) -> Option<String> {
        self.by_slot.get(&slot).cloned()
    }

    /// Whether grant `id` asks to be revoked at its first violation.
    pub fn revokes_on_violation(&self, id: &str) -> bool {
        self.live.get(id).is_some_and(|l| l.revoke_on_violation)
    }

    fn alloc_slot(&mut self) -> u32 {
        loop {
            let s = self.next_slot;
            self.next_slot = self.next_slot.wrapping_add(1).max(1);
            if !self.by_slot.contains_key(&s) {
                return s;
            }
        }
    }

    pub fn live_count(&self) -> usize {
        self.live.values().filter(|l| l.grant.state == GrantState::Active).count()
    }

    /// Issues a grant for `intent` bound to `subject` (already attested, its pidfd checked
    /// by the caller after this returns). Kernel maps first, ledger second: a grant is
    /// never recorded as issued without being enforceable.
    /// Builds and signs a grant; needs no lock (signing is the slowest step of an issue).
    pub fn prepare(
        signer: &Signer,
        issuer: &str,
        intent: &Intent,
        subject: Subject,
        ttl: std::time::Duration,
        clamped: Option<String>,
    ) -> Result<Grant, MintError> {
        let now = Utc::now();
        let expires_at = now
            + Duration::from_std(ttl)
                .map_err(|_| MintError::InvalidTtl("ttl out of range".into()))?;
        let mut grant = Grant {
            id: new_grant_id(),
            intent: intent.name.clone(),
            subject,
            secrets: intent.secrets.clone(),
            destinations: intent.destinations.iter().map(|d| d.to_string()).collect(),
            issued_at: now,
            expires_at,
            state: GrantState::Active,
            token: String::new(),
            ttl_clamped_from: clamped,
        };
        grant.token = signer
            .sign(&grant, issuer)
            .map_err(|e| MintError::internal(format!("sign token: {e:#}")))?;
        Ok(grant)
    }

    /// Makes a prepared grant live: kernel maps first, ledger second.
    pub fn issue(
        &mut self,
        grant: Grant,
        intent: &Intent,
        nets: Vec<(IpNet, u16, u16)>,
    ) -> Result<(Grant, u32), MintError> {
        let expires_at = grant.expires_at;
        let slot = self.alloc_slot();
        let k = GrantKernel {
            secrets: self.index.bits(&intent.secrets),
            action: action_code(intent.on_violation),
            flags: if intent.revoke_on_violation { grant_flags::REVOKE_ON_VIOLATION } else { 0 },
            id_hash: id_hash(&grant.id),
        };
        self.maps
            .put_grant(slot, boot_deadline(expires_at), &nets, k)
            .map_err(|e| MintError::internal(format!("{e:#}")))?;
        if let Err(e) = self.maps.bind(grant.subject.pid, grant.subject.start_ns, slot) {
            self.maps.remove_grant(slot, &nets.iter().map(|n| n.0).collect::<Vec<_>>());
            return Err(MintError::TooManyGrants(format!("{e:#}")));
        }
        if let Err(e) = self.ledger.insert(&grant) {
            self.maps.unbind(grant.subject.pid, slot);
            self.maps.remove_grant(slot, &nets.iter().map(|n| n.0).collect::<Vec<_>>());
            return Err(MintError::internal(format!("ledger: {e:#}")));
        }
        self.by_slot.insert(slot, grant.id.clone());
        self.live.insert(
            grant.id.clone(),
            Live {
                grant: grant.clone(),
                slot,
                nets,
                members: 1,
                on_violation: intent.on_violation,
                revoke_on_violation: intent.revoke_on_violation,
            },
        );
        self.next_deadline = Some(self.next_deadline.map_or(expires_at, |d| d.min(expires_at)));
        let _ = self.changes.send(GrantChange::Issued(grant.clone()));
        Ok((grant, slot))
    }

    /// Undoes an issue whose subject vanished before binding completed.
    pub fn abort(&mut self, id: &str) {
        if let Some(l) = self.live.remove(id) {
            self.maps.unbind(l.grant.subject.pid, l.slot);
            self.maps.remove_grant(l.slot, &l.nets.iter().map(|n| n.0).collect::<Vec<_>>());
            self.by_slot.remove(&l.slot);
            let _ = self.ledger.set_state(
                id,
                GrantState::Revoked,
                "subject exited before binding completed",
                Utc::now(),
            );
        }
    }

    pub fn revoke(&mut self, id: &str, reason: &str) -> Result<Grant, MintError> {
        let Some(l) = self.live.get_mut(id) else {
            return match self.ledger.get(id) {
                Ok(Some(g)) => Err(MintError::NotActive { id: id.to_string(), state: g.state }),
                _ => Err(MintError::UnknownGrant(id.to_string())),
            };
        };
        if l.grant.state != GrantState::Active {
            return Err(MintError::NotActive { id: id.to_string(), state: l.grant.state });
        }
        // Kernel first: from this instant no connect is allowed under it.
        self.maps.revoke(l.slot).map_err(|e| MintError::internal(format!("{e:#}")))?;
        l.grant.state = GrantState::Revoked;
        let g = l.grant.clone();
        if let Err(e) = self.ledger.set_state(id, GrantState::Revoked, reason, Utc::now()) {
            tracing::error!("ledger: revoke {id}: {e:#}");
        }
        let _ = self.changes.send(GrantChange::Revoked(g.clone(), reason.to_string()));
        self.reap(id);
        Ok(g)
    }

    /// `expire_due` when the earliest deadline has passed; otherwise nothing.
    pub fn expire_if_due(&mut self, now: DateTime<Utc>) {
        if self.next_deadline.is_some_and(|d| d <= now) {
            self.next_deadline = self.expire_due(now);
        }
    }

    /// Marks every active grant past its deadline as expired (the kernel already treats
    /// it so; this records it and tells the event stream). Returns the next deadline.
    pub fn expire_due(&mut self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let due: Vec<String> = self
            .live
            .values()
            .filter(|l| l.grant.state == GrantState::Active && l.grant.expires_at <= now)
            .map(|l| l.grant.id.clone())
            .collect();
        for id in due {
            if let Some(l) = self.live.get_mut(&id) {
                l.grant.state = GrantState::Expired;
                let g = l.grant.clone();
                if let Err(e) = self.ledger.set_state(&id, GrantState::Expired, "ttl elapsed", now)
                {
                    tracing::error!("ledger: expire {id}: {e:#}");
                }
                let _ = self.changes.send(GrantChange::Expired(g));
            }
            self.reap(&id);
        }
        self.live
            .values()
            .filter(|l| l.grant.state == GrantState::Active)
            .map(|l| l.grant.expires_at)
            .min()
    }

    /// A process holding `slots` forked (the kernel already copied them to the child).
    pub fn on_fork(&mut self, slots: &[u32]) {
        for s in slots {
            if let Some(l) = self.by_slot.get(s).and_then(|id| self.live.get_mut(id)) {
                l.members += 1;
            }
        }
    }

    /// A process holding `slots` exited.
    pub fn on_exit(&mut self, slots: &[u32]) {
        for s in slots {
            let Some(id) = self.by_slot.get(s).cloned() else { continue };
            let Some(l) = self.live.get_mut(&id) else { continue };
            l.members = l.members.saturating_sub(1);
            if l.members == 0 {
                if l.grant.state == GrantState::Active {
                    l.grant.state = GrantState::Ended;
                    let g = l.grant.clone();
                    if let Err(e) = self.ledger.set_state(
                        &id,
                        GrantState::Ended,
                        "subject subtree exited",
                        Utc::now(),
                    ) {
                        tracing::error!("ledger: end {id}: {e:#}");
                    }
                    let _ = self.changes.send(GrantChange::Ended(g));
                }
                self.reap(&id);
            }
        }
    }

    /// Drops a grant from memory and the kernel once nobody can use it any more: not
    /// active, and no live process holds it (holders keep getting expired/revoked verdicts).
    fn reap(&mut self, id: &str) {
        let done = self
            .live
            .get(id)
            .is_some_and(|l| l.grant.state != GrantState::Active && l.members == 0);
        if done && let Some(l) = self.live.remove(id) {
            self.maps.remove_grant(l.slot, &l.nets.iter().map(|n| n.0).collect::<Vec<_>>());
            self.by_slot.remove(&l.slot);
        }
    }

    pub fn held_slots(&self, slots: &[u32]) -> Vec<HeldGrant> {
        slots
            .iter()
            .filter_map(|s| self.by_slot.get(s).and_then(|id| self.live.get(id)))
            .map(|l| HeldGrant {
                slot: l.slot,
                id: l.grant.id.clone(),
                intent: l.grant.intent.clone(),
                secrets: l.grant.secrets.clone(),
                destinations: l.nets.clone(),
                expires_at: l.grant.expires_at,
                revoked: l.grant.state == GrantState::Revoked,
                on_violation: l.on_violation,
                revoke_on_violation: l.revoke_on_violation,
            })
            .collect()
    }

    pub fn get(&self, id: &str) -> Option<Grant> {
        match self.live.get(id) {
            Some(l) => Some(l.grant.clone()),
            None => self.ledger.get(id).ok().flatten(),
        }
    }

    /// After a restart. With adopted pins, the kernel still holds every grant and who holds
    /// it: slots are matched to the ledger by id hash and kept as they are (no window in
    /// which a grant disappears). Without pins, grants past their deadline become expired
    /// and the others are written back and bound again to their subject if it is still the
    /// same process (pid and start time), together with its descendants started since.
    pub fn restore(&mut self, adopted: bool) -> Result<(usize, usize)> {
        let now = Utc::now();
        let expired = self.ledger.expire_due(now)?;
        for g in &expired {
            let _ = self.changes.send(GrantChange::Expired(g.clone()));
        }
        let mut restored = 0;
        if adopted {
            let all = self.ledger.list(super::ledger::ListFilter {
                state: None,
                intent: None,
                limit: 0,
            })?;
            let by_hash: HashMap<u64, Grant> =
                all.into_iter().map(|g| (id_hash(&g.id), g)).collect();
            for (slot, info) in self.maps.grants_in_kernel() {
                self.next_slot = self.next_slot.max(slot.wrapping_add(1));
                let Some(grant) = by_hash.get(&info.id_hash).cloned() else { continue };
                let members = self.maps.holders(slot);
                if grant.state == GrantState::Active && members == 0 {
                    let _ = self.ledger.set_state(
                        &grant.id,
                        GrantState::Ended,
                        "subject subtree exited while the daemon was down",
                        now,
                    );
                    let _ = self.changes.send(GrantChange::Ended(grant));
                    continue;
                }
                let intent = self.policy.intent(&grant.intent).cloned();
                let nets = nets_of(&grant);
                if grant.state == GrantState::Active {
                    restored += 1;
                    self.next_deadline = Some(
                        self.next_deadline.map_or(grant.expires_at, |d| d.min(grant.expires_at)),
                    );
                }
                self.track(grant, slot, nets, members, intent.as_ref());
            }
        }
        for grant in self.ledger.active()? {
            if self.live.contains_key(&grant.id) {
                continue;
            }
            let alive = crate::proc::start_ns(grant.subject.pid) == Some(grant.subject.start_ns);
            if !alive {
                let _ = self.ledger.set_state(
                    &grant.id,
                    GrantState::Ended,
                    "subject exited while the daemon was down",
                    now,
                );
                let _ = self.changes.send(GrantChange::Ended(grant));
                continue;
            }
            let nets = nets_of(&grant);
            let slot = self.alloc_slot();
            let intent = self.policy.intent(&grant.intent).cloned();
            let k = GrantKernel {
                secrets: self.index.bits(&grant.secrets),
                action: action_code(intent.as_ref().map(|i| i.on_violation).unwrap_or_default()),
                flags: if intent.as_ref().is_some_and(|i| i.revoke_on_violation) {
                    grant_flags::REVOKE_ON_VIOLATION
                } else {
                    0
                },
                id_hash: id_hash(&grant.id),
            };
            self.maps.put_grant(slot, boot_deadline(grant.expires_at), &nets, k)?;
            let mut members = 0;
            for pid in crate::proc::subtree_since(grant.subject.pid, grant.issued_at) {
                let start = crate::proc::start_ns(pid).unwrap_or(0);
                if self.maps.bind(pid, start, slot).is_ok() {
                    members += 1;
                }
            }
            self.next_deadline =
                Some(self.next_deadline.map_or(grant.expires_at, |d| d.min(grant.expires_at)));
            self.track(grant, slot, nets, members, intent.as_ref());
            restored += 1;
        }
        Ok((restored, expired.len()))
    }
}

impl Registry {
    /// Keeps a restored grant in memory under its kernel slot.
    fn track(
        &mut self,
        grant: Grant,
        slot: u32,
        nets: Vec<(IpNet, u16, u16)>,
        members: u32,
        intent: Option<&Intent>,
    ) {
        self.by_slot.insert(slot, grant.id.clone());
        let live = Live {
            on_violation: intent.map(|i| i.on_violation).unwrap_or_default(),
            revoke_on_violation: intent.is_some_and(|i| i.revoke_on_violation),
            grant,
            slot,
            nets,
            members,
        };
        self.live.insert(live.grant.id.clone(), live);
    }
}

/// Resolves a stored grant's destination strings again (for restore).
pub fn nets_of(grant: &Grant) -> Vec<(IpNet, u16, u16)> {
    let dests: Vec<Destination> =
        grant.destinations.iter().filter_map(|d| d.parse().ok()).collect();
    resolve_destinations(&dests)
}
