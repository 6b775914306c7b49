//! What a decision needs to know about grants and the policy, as one immutable snapshot. The
//! registry publishes a new `GrantView` on every change (issue, revoke, expiry, end, policy
//! reload); the engine reads the current one without waiting for the registry, whatever the
//! Mint API is doing with it.
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use enforcer_common::{ProcGrants, proc_flags};
use ipnet::IpNet;

use crate::decide::{HeldGrant, SubjectState, Taint};
use crate::kernel::policy::without_grant;
use crate::policy::{Config, OnViolation};

/// Concrete networks with inclusive port ranges (DNS names resolved).
pub type Nets = Vec<(IpNet, u16, u16)>;

/// One grant, as decisions see it.
#[derive(Debug, Clone)]
pub struct GrantFacts {
    pub id: String,
    pub intent: String,
    pub secrets: Vec<String>,
    pub destinations: Nets,
    /// Destinations given by name (`name` or `*.zone`, inclusive ports): covered by the
    /// addresses the DNS stub learns for the grant.
    pub names: Vec<(String, u16, u16)>,
    pub expires_at: DateTime<Utc>,
    pub revoked: bool,
    /// When it was revoked, if known (a grant revoked before a restart: not known).
    pub revoked_at: Option<DateTime<Utc>>,
    pub on_violation: OnViolation,
    pub revoke_on_violation: bool,
    /// The kernel's deadline on the boot clock (0: unknown), for exact replays.
    pub expires_ns: u64,
}

impl GrantFacts {
    /// Whether the grant was revoked at `at` (a use judged by the kernel before the revoke
    /// landed saw it unrevoked).
    pub fn revoked_at(&self, at: DateTime<Utc>) -> bool {
        self.revoked && self.revoked_at.is_none_or(|t| t <= at)
    }
}

/// Slots revoked by enforcement (and when) that the published view may not show yet.
pub type RevokedHere = HashMap<u32, DateTime<Utc>>;

/// The policy facts decisions need: the config in force, secret taint bits, and each
/// secret's own destinations (resolved).
#[derive(Clone)]
pub struct PolicyFacts {
    pub config: Arc<Config>,
    pub secret_bits: Arc<BTreeMap<String, u32>>,
    pub secret_nets: Arc<HashMap<String, Nets>>,
}

/// Shards of a `SlotMap`, in CHUNKS chunks of CHUNK.
const CHUNK: usize = 32;
const CHUNKS: usize = 32;
const SHARDS: usize = CHUNK * CHUNKS;

type Shard = Arc<HashMap<u32, Arc<GrantFacts>>>;

/// Kernel slot -> grant, copy-on-write in two levels: a snapshot is CHUNKS shared chunks of
/// CHUNK shared shards. The registry changes one grant by copying its chunk (CHUNK pointers)
/// and its shard (about live grants / SHARDS entries: 10 with 10,000 grants live), and a new
/// snapshot shares everything else with the previous one. A rebuilt map per change made
/// each issue cost O(live grants) under the registry lock; one level of 128 shards still
/// copied 128 pointers per snapshot and 80 entries per change at 10,000 grants.
#[derive(Clone)]
pub struct SlotMap {
    chunks: Vec<Arc<Vec<Shard>>>,
    len: usize,
}

impl Default for SlotMap {
    fn default() -> Self {
        let chunk: Arc<Vec<Shard>> = Arc::new(vec![Arc::default(); CHUNK]);
        SlotMap { chunks: vec![chunk; CHUNKS], len: 0 }
    }
}

impl SlotMap {
    /// (chunk, shard in the chunk) of `slot`.
    fn place(slot: u32) -> (usize, usize) {
        let i = slot as usize % SHARDS;
        (i / CHUNK, i % CHUNK)
    }

    fn shard(&self, slot: u32) -> &Shard {
        let (c, i) = Self::place(slot);
        &self.chunks[c][i]
    }

    fn shard_mut(&mut self, slot: u32) -> &mut HashMap<u32, Arc<GrantFacts>> {
        let (c, i) = Self::place(slot);
        Arc::make_mut(&mut Arc::make_mut(&mut self.chunks[c])[i])
    }

    pub fn get(&self, slot: &u32) -> Option<&Arc<GrantFacts>> {
        self.shard(*slot).get(slot)
    }

    pub fn insert(&mut self, slot: u32, g: Arc<GrantFacts>) {
        if self.shard_mut(slot).insert(slot, g).is_none() {
            self.len += 1;
        }
    }

    pub fn remove(&mut self, slot: &u32) {
        if self.shard(*slot).contains_key(slot) {
            self.shard_mut(*slot).remove(slot);
            self.len -= 1;
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&u32, &Arc<GrantFacts>)> {
        self.chunks.iter().flat_map(|c| c.iter()).flat_map(|s| s.iter())
    }

    pub fn values(&self) -> impl Iterator<Item = &Arc<GrantFacts>> {
        self.chunks.iter().flat_map(|c| c.iter()).flat_map(|s| s.values())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

pub struct GrantView {
    /// Kernel slot -> grant, for every grant the kernel still has.
    pub grants: SlotMap,
    /// Grants that ended recently (bounded): a kernel record judged while one was still
    /// held can arrive after it is gone, and is replayed against it.
    pub ended: Arc<HashMap<u32, Arc<GrantFacts>>>,
    pub policy: PolicyFacts,
}

impl GrantView {
    pub fn new(policy: PolicyFacts) -> Self {
        GrantView { grants: SlotMap::default(), ended: Default::default(), policy }
    }

    /// The decision's view of a process at `at`, from the kernel's entry for it. `revoked`:
    /// slots revoked by enforcement that this snapshot may not show yet.
    pub fn subject_state(
        &self,
        pg: Option<ProcGrants>,
        revoked: &RevokedHere,
        at: DateTime<Utc>,
    ) -> SubjectState {
        let Some(pg) = pg else { return SubjectState { known: true, ..Default::default() } };
        let slots: Vec<u32> = pg.grants.iter().copied().filter(|s| *s != 0).collect();
        let taint = self
            .secret_names(pg.taint)
            .into_iter()
            .map(|name| Taint {
                destinations: self.policy.secret_nets.get(&name).cloned().unwrap_or_default(),
                on_violation: without_grant(&self.policy.config, &name),
                named: self.policy.config.secrets.iter().any(|s| {
                    s.name == name
                        && s.destinations
                            .iter()
                            .any(|d| matches!(d, crate::policy::Destination::Dns { .. }))
                }),
                learned: Vec::new(),
                secret: name,
            })
            .collect();
        SubjectState {
            known: true,
            held: self.held(&slots, revoked, at),
            taint,
            agent: pg.flags & proc_flags::AGENT != 0,
        }
    }

    /// The grants behind kernel slots at `at` (unknown slots are skipped).
    pub fn held(&self, slots: &[u32], revoked: &RevokedHere, at: DateTime<Utc>) -> Vec<HeldGrant> {
        slots
            .iter()
            .filter_map(|s| {
                let g = self.grants.get(s).or_else(|| self.ended.get(s))?;
                let here = revoked.get(s).is_some_and(|t| *t <= at);
                Some(held_grant(*s, g, g.revoked_at(at) || here))
            })
            .collect()
    }

    pub fn grant(&self, slot: u32) -> Option<&GrantFacts> {
        self.grants.get(&slot).map(|g| g.as_ref())
    }

    /// Taint bits of `secret` (0 if it has no index).
    pub fn secret_bits(&self, secret: &str) -> u64 {
        self.policy.secret_bits.get(secret).map_or(0, |i| 1u64 << i)
    }

    /// The secret with taint index `index`.
    pub fn secret_name(&self, index: u32) -> Option<&str> {
        self.policy.secret_bits.iter().find(|(_, i)| **i == index).map(|(n, _)| n.as_str())
    }

    /// The secrets in `bits`, in taint-index order: the order the kernel's judge checks
    /// them in, so both name the same first invalid secret.
    fn secret_names(&self, bits: u64) -> Vec<String> {
        let mut named: Vec<(u32, &String)> = self
            .policy
            .secret_bits
            .iter()
            .filter(|(_, i)| bits & (1u64 << **i) != 0)
            .map(|(n, i)| (*i, n))
            .collect();
        named.sort_unstable();
        named.into_iter().map(|(_, n)| n.clone()).collect()
    }

    /// What a use of `secret` without a grant gets under the policy in force.
    pub fn without_grant(&self, secret: &str) -> OnViolation {
        without_grant(&self.policy.config, secret)
    }

    /// Active grants: neither revoked nor past their deadline.
    pub fn live_count(&self) -> usize {
        let now = Utc::now();
        self.grants.values().filter(|g| !g.revoked && g.expires_at > now).count()
    }
}

fn held_grant(slot: u32, g: &GrantFacts, revoked: bool) -> HeldGrant {
    HeldGrant {
        slot,
        id: g.id.clone(),
        intent: g.intent.clone(),
        secrets: g.secrets.clone(),
        destinations: g.destinations.clone(),
        expires_at: g.expires_at,
        revoked,
        on_violation: g.on_violation,
        revoke_on_violation: g.revoke_on_violation,
        expires_ns: g.expires_ns,
        learned: Vec::new(),
    }
}

/// The current snapshot. The lock is held only to clone or replace the `Arc`.
pub struct ViewCell(RwLock<Arc<GrantView>>);

impl ViewCell {
    pub fn new(view: GrantView) -> Self {
        ViewCell(RwLock::new(Arc::new(view)))
    }

    pub fn load(&self) -> Arc<GrantView> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn store(&self, view: GrantView) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(view);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(id: &str) -> Arc<GrantFacts> {
        Arc::new(GrantFacts {
            id: id.into(),
            intent: "deploy".into(),
            secrets: Vec::new(),
            destinations: Vec::new(),
            names: Vec::new(),
            expires_at: Utc::now(),
            revoked: false,
            revoked_at: None,
            on_violation: OnViolation::default(),
            revoke_on_violation: false,
            expires_ns: 0,
        })
    }

    /// A published snapshot never changes: the registry's next change copies the shard it
    /// touches and shares the others.
    #[test]
    fn slot_map_snapshots_are_copy_on_write() {
        let mut m = SlotMap::default();
        for slot in 1..=1000 {
            m.insert(slot, facts(&format!("g_{slot}")));
        }
        let before = m.clone();
        m.insert(7, facts("g_new"));
        m.remove(&8);
        m.remove(&5000);
        m.insert(1001, facts("g_1001"));
        assert_eq!((before.len(), m.len()), (1000, 1000));
        assert_eq!(before.get(&7).unwrap().id, "g_7");
        assert_eq!(m.get(&7).unwrap().id, "g_new");
        assert!(before.get(&8).is_some() && m.get(&8).is_none());
        assert_eq!(m.values().count(), 1000);
        assert!(m.iter().all(|(s, g)| m.get(s).is_some_and(|x| Arc::ptr_eq(x, g))));
        // Chunks and shards the change did not touch are shared, not copied.
        let chunks = (0..CHUNKS).filter(|&c| Arc::ptr_eq(&before.chunks[c], &m.chunks[c])).count();
        assert!(chunks >= CHUNKS - 3, "{chunks} of {CHUNKS} chunks shared");
        let shards = (0..SHARDS)
            .filter(|&i| {
                Arc::ptr_eq(&before.chunks[i / CHUNK][i % CHUNK], &m.chunks[i / CHUNK][i % CHUNK])
            })
            .count();
        assert!(shards >= SHARDS - 3, "{shards} of {SHARDS} shards shared");
    }
}
