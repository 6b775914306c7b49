//! Live grants: issue, revoke, expire, and the subtree membership that ends a grant when
//! every process holding it has exited. The kernel maps are the source of truth for who
//! holds what; the ledger is the durable record; this registry keeps them in step.
//!
//! The registry sits behind the Mint API's lock, so it does no slow I/O: DNS names are
//! resolved before the lock is taken, and ledger records go to the writer thread
//! (`super::writer`) in the order they are made. Decisions never take the lock: every
//! change publishes a new `GrantView` (`super::view`), and enforcement reports what it did
//! to the kernel maps through `Notice`s that `apply` drains.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use anyhow::Result;
use chrono::{DateTime, Duration, Utc};
use ipnet::IpNet;

use super::error::MintError;
use super::ledger::{Ledger, ListFilter};
use super::model::{Grant, GrantState, Subject};
use super::timing::Stamps;
use super::token::Signer;
use super::view::{GrantFacts, GrantView, Nets, PolicyFacts, SlotMap, ViewCell};
use super::writer::LedgerTx;
use crate::kernel::grants::{GrantKernel, GrantMaps, boot_deadline, id_hash};
use crate::kernel::policy::action_code;
use crate::policy::{Config, Destination, Intent, OnViolation};
use enforcer_common::grant_flags;

/// A grant lifecycle change, for the event stream.
#[derive(Debug, Clone)]
pub enum GrantChange {
    Issued(Grant),
    Expired(Grant),
    Revoked(Grant, String),
    Ended(Grant),
}

/// What the rest of the daemon tells the registry: enforcement acted on a grant in the
/// kernel, or processes holding grants forked or exited.
#[derive(Debug, Clone)]
pub enum Notice {
    /// The kernel already judges grant `slot` revoked (flipped by enforcement, or by the
    /// kernel itself on a revoke_on_violation); record it.
    /// `at`: when the kernel started judging it revoked (a record's time for a
    /// revoke_on_violation), so late records are replayed as the kernel judged them.
    Revoked { slot: u32, reason: &'static str, at: DateTime<Utc> },
    /// A process holding these slots forked (the kernel already copied them to the child).
    Fork(Vec<u32>),
    /// A process holding these slots exited.
    Exit(Vec<u32>),
}

pub struct Live {
    pub grant: Grant,
    pub slot: u32,
    pub nets: Nets,
    /// Live processes holding the grant (subject + descendants forked after binding).
    pub members: u32,
    pub on_violation: OnViolation,
    pub revoke_on_violation: bool,
    /// When this daemon revoked it.
    pub revoked_at: Option<DateTime<Utc>>,
    /// The deadline written to the kernel (boot clock).
    pub expires_ns: u64,
    /// `facts()` as last published; None after a change (rebuilt at the next publish), so a
    /// publish costs an `Arc` clone per unchanged grant, not a deep copy of every grant.
    pub cached: Option<Arc<GrantFacts>>,
}

impl Live {
    fn facts(&self) -> GrantFacts {
        GrantFacts {
            id: self.grant.id.clone(),
            intent: self.grant.intent.clone(),
            secrets: self.grant.secrets.clone(),
            destinations: self.nets.clone(),
            names: dns_names(&self.grant.destinations),
            expires_at: self.grant.expires_at,
            revoked: self.grant.state == GrantState::Revoked,
            revoked_at: self.revoked_at,
            on_violation: self.on_violation,
            revoke_on_violation: self.revoke_on_violation,
            expires_ns: self.expires_ns,
        }
    }
}

/// Grants the kernel holds at most (the `GRANTS` map's size in enforcer-ebpf/src/maps.rs):
/// the registry's tables are made this large at start so no issue grows them.
const GRANT_SLOTS: usize = 16_384;

/// How many ended grants the view keeps for late kernel records.
const ENDED_KEPT: usize = 1024;

/// An issued grant and its kernel slot.
pub type Issued = (Grant, u32);

pub struct Registry {
    maps: GrantMaps,
    ledger: LedgerTx,
    /// Shared so tokens are signed outside the registry lock.
    pub signer: Arc<Signer>,
    pub issuer: String,
    /// Boxed and sized for GRANT_SLOTS up front: growing a table of 8,192 inline `Live`s
    /// (a few hundred bytes each) into fresh, page-faulted buckets held the registry lock,
    /// and with it every issue, for 3.4-4.9 ms once per doubling (2 ms still with boxes).
    live: HashMap<String, Box<Live>>,
    by_slot: HashMap<u32, String>,
    /// Earliest deadline of an active grant, so the expiry check is cheap when nothing is due.
    next_deadline: Option<DateTime<Utc>>,
    /// The policy in force, secret taint bits and each secret's own destinations.
    policy: PolicyFacts,
    next_slot: u32,
    view: Arc<ViewCell>,
    /// Recently ended grants, oldest first (at most ENDED_KEPT), for the view.
    ended: std::collections::VecDeque<(u32, Arc<GrantFacts>)>,
    /// The view's slot map, changed in place for the slots in `dirty` at each publish.
    published: SlotMap,
    /// Slots whose grant was added, changed or removed since the last publish.
    dirty: Vec<u32>,
    /// `ended` as the view's map; None after it changed (rebuilt at the next publish).
    ended_view: Option<Arc<HashMap<u32, Arc<GrantFacts>>>>,
    /// Active grants per subject uid and per subject cgroup (the quotas), kept as grants
    /// become active and stop being so, so a quota check does not walk every grant.
    active_by_uid: HashMap<u32, usize>,
    active_by_cgroup: HashMap<String, usize>,
}

/// Concrete networks of a grant's destinations. Names are not resolved here: a name covers
/// only the addresses the DNS stub answers to the grant's holders (`crate::dns`), learned
/// per grant with the answer's lifetime.
pub fn resolve_destinations(dests: &[Destination]) -> Nets {
    dests
        .iter()
        .filter_map(|d| match d {
            Destination::Cidr { net, ports } => Some((*net, ports.lo, ports.hi)),
            Destination::Dns { .. } => None,
        })
        .collect()
}

/// The destinations given by name among a grant's destination strings, with their ports.
pub fn dns_names(dests: &[String]) -> Vec<(String, u16, u16)> {
    dests
        .iter()
        .filter_map(|d| match d.parse::<Destination>().ok()? {
            Destination::Dns { name, ports } => Some((name, ports.lo, ports.hi)),
            Destination::Cidr { .. } => None,
        })
        .collect()
}

/// Each secret's own destinations, resolved (blocking: call without the registry lock).
pub fn resolve_secret_nets(policy: &Config) -> HashMap<String, Nets> {
    policy.secrets.iter().map(|s| (s.name.clone(), resolve_destinations(&s.destinations))).collect()
}

/// Resolves a stored grant's destination strings again (for restore).
pub fn nets_of(grant: &Grant) -> Nets {
    let dests: Vec<Destination> =
        grant.destinations.iter().filter_map(|d| d.parse().ok()).collect();
    resolve_destinations(&dests)
}

pub fn new_grant_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut raw = [0u8; 26];
    getrandom::fill(&mut raw).expect("kernel randomness");
    let s: String = raw.iter().map(|b| ALPHABET[(*b & 31) as usize] as char).collect();
    format!("g_{s}")
}

/// The judge's lookup hints (`grant_flags::NO_NETWORKS`, `NO_NAMES`) for a grant with
/// networks `nets` (as written to GRANT_DESTS) and `destinations` (names learned by the stub).
fn dest_flags(nets: &Nets, destinations: &[String]) -> u32 {
    let mut f = 0;
    if nets.is_empty() {
        f |= grant_flags::NO_NETWORKS;
    }
    if dns_names(destinations).is_empty() {
        f |= grant_flags::NO_NAMES;
    }
    f
}

fn bits_of(by_name: &BTreeMap<String, u32>, names: &[String]) -> u64 {
    names.iter().filter_map(|n| by_name.get(n)).fold(0, |acc, i| acc | (1u64 << i))
}

/// What a restart needs from the ledger, read (and the expired recorded) before the
/// registry lock is taken, with every grant's destinations resolved.
pub struct RestoreInput {
    expired: Vec<Grant>,
    all: Vec<Grant>,
    active: Vec<Grant>,
    nets: HashMap<String, Nets>,
}

impl RestoreInput {
    pub fn load(ledger: &mut Ledger, adopted: bool) -> Result<Self> {
        let expired = ledger.expire_due(Utc::now())?;
        let all = if adopted {
            ledger.list(ListFilter { state: None, intent: None, limit: 0 })?
        } else {
            Vec::new()
        };
        let active = ledger.active()?;
        let mut nets = HashMap::new();
        for g in all.iter().chain(&active) {
            if !nets.contains_key(&g.id) {
                nets.insert(g.id.clone(), nets_of(g));
            }
        }
        Ok(RestoreInput { expired, all, active, nets })
    }
}

impl Registry {
    pub fn new(
        maps: GrantMaps,
        ledger: LedgerTx,
        signer: Signer,
        issuer: String,
        policy: PolicyFacts,
        view: Arc<ViewCell>,
    ) -> Self {
        let mut reg = Registry {
            maps,
            ledger,
            signer: Arc::new(signer),
            issuer,
            live: HashMap::with_capacity(GRANT_SLOTS),
            by_slot: HashMap::with_capacity(GRANT_SLOTS),
            next_deadline: None,
            next_slot: 1,
            policy,
            view,
            ended: Default::default(),
            published: SlotMap::default(),
            dirty: Vec::new(),
            ended_view: None,
            active_by_uid: HashMap::new(),
            active_by_cgroup: HashMap::new(),
        };
        reg.publish();
        reg
    }

    /// Replaces the decisions' snapshot with the current state.
    /// Costs the changed grants (and one shard copy each), not the live ones.
    fn publish(&mut self) {
        for slot in std::mem::take(&mut self.dirty) {
            match self.by_slot.get(&slot).and_then(|id| self.live.get_mut(id)) {
                Some(l) => {
                    if l.cached.is_none() {
                        l.cached = Some(Arc::new(l.facts()));
                    }
                    let facts = l.cached.clone().expect("just set");
                    self.published.insert(slot, facts);
                }
                None => self.published.remove(&slot),
            }
        }
        let ended = self
            .ended_view
            .get_or_insert_with(|| Arc::new(self.ended.iter().cloned().collect()))
            .clone();
        self.view.store(GrantView {
            grants: self.published.clone(),
            ended,
            policy: self.policy.clone(),
        });
    }

    /// Counts a grant that became active (quotas).
    fn count_active(&mut self, g: &Grant, up: bool) {
        let step = |n: &mut usize| *n = if up { *n + 1 } else { n.saturating_sub(1) };
        step(self.active_by_uid.entry(g.subject.uid).or_default());
        step(self.active_by_cgroup.entry(g.subject.cgroup.clone()).or_default());
        if !up {
            self.active_by_uid.retain(|_, n| *n > 0);
            if self.active_by_cgroup.get(&g.subject.cgroup) == Some(&0) {
                self.active_by_cgroup.remove(&g.subject.cgroup);
            }
        }
    }

    pub fn policy(&self) -> Arc<Config> {
        self.policy.config.clone()
    }

    /// Installs a policy: `secret_bits` are the (stable) secret indices already assigned,
    /// `secret_nets` each secret's own destinations already resolved. Writes them to the
    /// kernel (new ones before old ones are removed).
    pub fn set_policy(
        &mut self,
        config: Arc<Config>,
        secret_bits: BTreeMap<String, u32>,
        mut secret_nets: HashMap<String, Nets>,
    ) -> Result<()> {
        secret_nets.retain(|name, _| secret_bits.contains_key(name));
        for (name, n) in &secret_nets {
            self.maps.put_secret_dests(secret_bits[name], n)?;
        }
        for (name, old) in self.policy.secret_nets.iter() {
            let Some(i) = secret_bits.get(name).copied() else { continue };
            let keep: Vec<IpNet> =
                secret_nets.get(name).map(|v| v.iter().map(|n| n.0).collect()).unwrap_or_default();
            let stale: Vec<IpNet> = old.iter().map(|n| n.0).filter(|n| !keep.contains(n)).collect();
            self.maps.remove_secret_dests(i, &stale);
        }
        self.policy = PolicyFacts {
            config,
            secret_bits: Arc::new(secret_bits),
            secret_nets: Arc::new(secret_nets),
        };
        self.publish();
        Ok(())
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

    /// Active grants whose subject has `uid`, and those whose subject is in `cgroup` (quotas).
    pub fn held_by(&self, uid: u32, cgroup: &str) -> (usize, usize) {
        (
            self.active_by_uid.get(&uid).copied().unwrap_or(0),
            self.active_by_cgroup.get(cgroup).copied().unwrap_or(0),
        )
    }

    pub fn live_count(&self) -> usize {
        self.live.values().filter(|l| l.grant.state == GrantState::Active).count()
    }

    /// Builds and signs a grant for `intent` bound to `subject` (already attested, its
    /// pidfd checked by the caller after the issue); needs no lock (signing is the slowest
    /// step of an issue).
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

    /// Makes a prepared grant live: kernel maps first, ledger second (a grant is never
    /// recorded as issued without being enforceable). Once this returns, the grant's record
    /// survives a crash of the daemon (the ledger journal); a grant that could not be
    /// recorded is undone in the kernel and refused.
    pub fn issue(
        &mut self,
        grant: Grant,
        intent: &Intent,
        nets: Nets,
        stamps: &mut Stamps,
    ) -> Result<Issued, MintError> {
        let expires_at = grant.expires_at;
        let expires_ns = boot_deadline(expires_at);
        let slot = self.alloc_slot();
        let k = GrantKernel {
            secrets: bits_of(&self.policy.secret_bits, &intent.secrets),
            action: action_code(intent.on_violation),
            flags: if intent.revoke_on_violation { grant_flags::REVOKE_ON_VIOLATION } else { 0 }
                | dest_flags(&nets, &grant.destinations),
            id_hash: id_hash(&grant.id),
        };
        self.maps
            .put_grant(slot, expires_ns, &nets, k)
            .map_err(|e| MintError::internal(format!("{e:#}")))?;
        stamps.mark("kernel_grant");
        if let Err(e) = self.maps.bind(grant.subject.pid, grant.subject.start_ns, slot) {
            self.maps.remove_grant(slot, &nets.iter().map(|n| n.0).collect::<Vec<_>>());
            return Err(MintError::TooManyGrants(format!("{e:#}")));
        }
        stamps.mark("kernel_bind");
        if let Err(e) = self.ledger.insert_stamped(grant.clone(), stamps) {
            self.maps.unbind(grant.subject.pid, slot);
            self.maps.remove_grant(slot, &nets.iter().map(|n| n.0).collect::<Vec<_>>());
            return Err(MintError::internal(e));
        }
        self.by_slot.insert(slot, grant.id.clone());
        self.count_active(&grant, true);
        self.dirty.push(slot);
        self.live.insert(
            grant.id.clone(),
            Box::new(Live {
                grant: grant.clone(),
                slot,
                nets,
                members: 1,
                on_violation: intent.on_violation,
                revoke_on_violation: intent.revoke_on_violation,
                revoked_at: None,
                expires_ns,
                cached: None,
            }),
        );
        self.next_deadline = Some(self.next_deadline.map_or(expires_at, |d| d.min(expires_at)));
        stamps.mark("live");
        self.publish();
        stamps.mark("publish");
        Ok((grant, slot))
    }

    /// Undoes an issue whose subject vanished before binding completed (the ledger has it:
    /// it is recorded as revoked).
    pub fn abort(&mut self, id: &str) {
        if let Some(l) = self.live.remove(id) {
            if l.grant.state == GrantState::Active {
                self.count_active(&l.grant, false);
            }
            self.dirty.push(l.slot);
            self.maps.unbind(l.grant.subject.pid, l.slot);
            self.maps.remove_grant(l.slot, &l.nets.iter().map(|n| n.0).collect::<Vec<_>>());
            self.by_slot.remove(&l.slot);
            self.ledger.set_state(
                id,
                GrantState::Revoked,
                "subject exited before binding completed",
                Utc::now(),
                None,
            );
            self.publish();
        }
    }

    /// Revokes a live, active grant (the Mint API's DELETE). `UnknownGrant` if it is not
    /// live: the caller may find it ended in the ledger.
    pub fn revoke(&mut self, id: &str, reason: &str) -> Result<Grant, MintError> {
        let Some(l) = self.live.get(id) else {
            return Err(MintError::UnknownGrant(id.to_string()));
        };
        if l.grant.state != GrantState::Active {
            return Err(MintError::NotActive { id: id.to_string(), state: l.grant.state });
        }
        // Kernel first: from this instant no connect is allowed under it.
        self.maps.revoke(l.slot).map_err(|e| MintError::internal(format!("{e:#}")))?;
        Ok(self.mark_revoked(id, reason, Utc::now()).expect("live and active"))
    }

    /// Records a revoke the kernel already applied.
    fn mark_revoked(&mut self, id: &str, reason: &str, at: DateTime<Utc>) -> Option<Grant> {
        let l = self.live.get_mut(id).filter(|l| l.grant.state == GrantState::Active)?;
        l.grant.state = GrantState::Revoked;
        l.revoked_at = Some(at);
        l.cached = None;
        self.dirty.push(l.slot);
        let g = l.grant.clone();
        self.count_active(&g, false);
        self.ledger.set_state(
            id,
            GrantState::Revoked,
            reason,
            Utc::now(),
            Some(GrantChange::Revoked(g.clone(), reason.to_string())),
        );
        self.reap(id);
        self.publish();
        Some(g)
    }

    /// Applies what the rest of the daemon reports.
    pub fn apply(&mut self, notice: Notice) {
        match notice {
            Notice::Revoked { slot, reason, at } => {
                if let Some(id) = self.by_slot.get(&slot).cloned() {
                    self.mark_revoked(&id, reason, at);
                }
            }
            Notice::Fork(slots) => self.on_fork(&slots),
            Notice::Exit(slots) => self.on_exit(&slots),
        }
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
        for id in &due {
            if let Some(l) = self.live.get_mut(id) {
                l.grant.state = GrantState::Expired;
                l.cached = None;
                self.dirty.push(l.slot);
                let g = l.grant.clone();
                self.count_active(&g, false);
                self.ledger.set_state(
                    id,
                    GrantState::Expired,
                    "ttl elapsed",
                    now,
                    Some(GrantChange::Expired(g)),
                );
            }
            self.reap(id);
        }
        if !due.is_empty() {
            self.publish();
        }
        self.live
            .values()
            .filter(|l| l.grant.state == GrantState::Active)
            .map(|l| l.grant.expires_at)
            .min()
    }

    fn on_fork(&mut self, slots: &[u32]) {
        for s in slots {
            if let Some(l) = self.by_slot.get(s).and_then(|id| self.live.get_mut(id)) {
                l.members += 1;
            }
        }
    }

    fn on_exit(&mut self, slots: &[u32]) {
        let mut changed = false;
        for s in slots {
            let Some(id) = self.by_slot.get(s).cloned() else { continue };
            let Some(l) = self.live.get_mut(&id) else { continue };
            l.members = l.members.saturating_sub(1);
            if l.members == 0 {
                if l.grant.state == GrantState::Active {
                    l.grant.state = GrantState::Ended;
                    l.cached = None;
                    self.dirty.push(l.slot);
                    let g = l.grant.clone();
                    self.count_active(&g, false);
                    self.ledger.set_state(
                        &id,
                        GrantState::Ended,
                        "subject subtree exited",
                        Utc::now(),
                        Some(GrantChange::Ended(g)),
                    );
                }
                self.reap(&id);
                changed = true;
            }
        }
        if changed {
            self.publish();
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
            self.dirty.push(l.slot);
            self.ended.push_back((l.slot, Arc::new(l.facts())));
            if self.ended.len() > ENDED_KEPT {
                self.ended.pop_front();
            }
            self.ended_view = None;
        }
    }

    /// A grant still in memory (newer than the ledger while it changes).
    pub fn live_grant(&self, id: &str) -> Option<Grant> {
        self.live.get(id).map(|l| l.grant.clone())
    }

    /// After a restart. With adopted pins, the kernel still holds every grant and who holds
    /// it: slots are matched to the ledger by id hash and kept as they are (no window in
    /// which a grant disappears). Without pins, grants past their deadline become expired
    /// and the others are written back and bound again to their subject if it is still the
    /// same process (pid and start time), together with its descendants started since.
    pub fn restore(&mut self, adopted: bool, input: RestoreInput) -> Result<(usize, usize)> {
        let RestoreInput { expired, all, active, mut nets } = input;
        let now = Utc::now();
        for g in &expired {
            self.ledger.announce(GrantChange::Expired(g.clone()));
        }
        let mut restored = 0;
        // Grants settled by the adopted pass (kept, or ended while the daemon was down).
        let mut settled = HashSet::new();
        if adopted {
            let by_hash: HashMap<u64, Grant> =
                all.into_iter().map(|g| (id_hash(&g.id), g)).collect();
            for (slot, info) in self.maps.grants_in_kernel() {
                self.next_slot = self.next_slot.max(slot.wrapping_add(1));
                let Some(grant) = by_hash.get(&info.id_hash).cloned() else { continue };
                settled.insert(grant.id.clone());
                let members = self.maps.holders(slot);
                if grant.state == GrantState::Active && members == 0 {
                    self.ledger.set_state(
                        &grant.id.clone(),
                        GrantState::Ended,
                        "subject subtree exited while the daemon was down",
                        now,
                        Some(GrantChange::Ended(grant)),
                    );
                    continue;
                }
                let intent = self.policy.config.intent(&grant.intent).cloned();
                let n = nets.remove(&grant.id).unwrap_or_default();
                if grant.state == GrantState::Active {
                    restored += 1;
                    self.next_deadline = Some(
                        self.next_deadline.map_or(grant.expires_at, |d| d.min(grant.expires_at)),
                    );
                }
                self.track(grant, slot, n, members, intent.as_ref());
            }
        }
        for grant in active {
            if self.live.contains_key(&grant.id) || settled.contains(&grant.id) {
                continue;
            }
            let alive = crate::proc::start_ns(grant.subject.pid) == Some(grant.subject.start_ns);
            if !alive {
                self.ledger.set_state(
                    &grant.id.clone(),
                    GrantState::Ended,
                    "subject exited while the daemon was down",
                    now,
                    Some(GrantChange::Ended(grant)),
                );
                continue;
            }
            let n = nets.remove(&grant.id).unwrap_or_default();
            let slot = self.alloc_slot();
            let intent = self.policy.config.intent(&grant.intent).cloned();
            let k = GrantKernel {
                secrets: bits_of(&self.policy.secret_bits, &grant.secrets),
                action: action_code(intent.as_ref().map(|i| i.on_violation).unwrap_or_default()),
                flags: if intent.as_ref().is_some_and(|i| i.revoke_on_violation) {
                    grant_flags::REVOKE_ON_VIOLATION
                } else {
                    0
                } | dest_flags(&n, &grant.destinations),
                id_hash: id_hash(&grant.id),
            };
            self.maps.put_grant(slot, boot_deadline(grant.expires_at), &n, k)?;
            let mut members = 0;
            for pid in crate::proc::subtree_since(grant.subject.pid, grant.issued_at) {
                let start = crate::proc::start_ns(pid).unwrap_or(0);
                if self.maps.bind(pid, start, slot).is_ok() {
                    members += 1;
                }
            }
            self.next_deadline =
                Some(self.next_deadline.map_or(grant.expires_at, |d| d.min(grant.expires_at)));
            self.track(grant, slot, n, members, intent.as_ref());
            restored += 1;
        }
        self.publish();
        Ok((restored, expired.len()))
    }

    /// Keeps a restored grant in memory under its kernel slot.
    fn track(
        &mut self,
        grant: Grant,
        slot: u32,
        nets: Nets,
        members: u32,
        intent: Option<&Intent>,
    ) {
        self.by_slot.insert(slot, grant.id.clone());
        self.dirty.push(slot);
        if grant.state == GrantState::Active {
            self.count_active(&grant, true);
        }
        let live = Live {
            on_violation: intent.map(|i| i.on_violation).unwrap_or_default(),
            revoke_on_violation: intent.is_some_and(|i| i.revoke_on_violation),
            revoked_at: None,
            expires_ns: self.maps.deadline_of(slot),
            cached: None,
            grant,
            slot,
            nets,
            members,
        };
        self.live.insert(live.grant.id.clone(), Box::new(live));
    }
}
