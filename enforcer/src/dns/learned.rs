//! Addresses learned by name: the kernel's LEARNED map, written by the stub before a reply
//! is released, and the daemon's memory of it. The memory keeps each (slot, address) entry's
//! recent versions with the boot time from which the kernel held each one, so the replay of
//! a kernel record judges on the entry exactly as the kernel's hook saw it, and events name
//! the DNS name an address was learned from.
//!
//! An address learned for a secret's own destinations (slot `SECRET_SLOT_BASE + i`) is also
//! a host entry of GRANT_DESTS under `SECRET_SEND_SLOT_BASE + i`, for as long as its LEARNED
//! entry lives: the send judge reads it there (one trie lookup per secret; see
//! `enforcer_common::SECRET_SEND_SLOT_BASE`).
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use anyhow::{Context, Result};
use aya::maps::lpm_trie::{Key as TrieKey, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, MapData};
use chrono::{DateTime, Utc};
use enforcer_common::{
    DestKey, Learned, LearnedKey, MAX_PORT_RANGES, MAX_SECRETS, PortRanges, SECRET_SEND_SLOT_BASE,
    SECRET_SLOT_BASE,
};

use crate::decide::LearnedAddr;
use crate::dest_table::DestTable;
use crate::kernel::grants::boot_now_ns;
use crate::sync::LockOrRecover;

/// How long an entry stays (in the kernel and here) after its deadline: late kernel records
/// are replayed against it, and events still name the address.
const GRACE_NS: u64 = 120_000_000_000;
/// Versions kept per entry (re-learned addresses).
const VERSIONS: usize = 8;

#[derive(Debug, Clone)]
struct Version {
    /// Boot time from which the kernel held this value (read after the map write).
    since_ns: u64,
    value: Learned,
    name: String,
}

type Key = (u32, [u8; 16]);

/// The LEARNED map and its memory.
pub struct LearnedTable {
    inner: Mutex<Inner>,
}

struct Inner {
    /// None when there is no kernel (unit tests).
    map: Option<BpfHashMap<MapData, LearnedKey, Learned>>,
    /// GRANT_DESTS, for secrets' send slots (None: unit tests).
    send_dests: Option<LpmTrie<MapData, DestKey, PortRanges>>,
    entries: HashMap<Key, Vec<Version>>,
}

/// The kernel's key form of an address: IPv4 as IPv4-mapped IPv6.
pub fn key_addr(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_ipv6_mapped().octets(),
            None => v6.octets(),
        },
    }
}

fn ranges_of(p: &enforcer_common::PortRanges) -> Vec<(u16, u16)> {
    (0..MAX_PORT_RANGES).filter(|i| p.lo[*i] <= p.hi[*i]).map(|i| (p.lo[i], p.hi[i])).collect()
}

/// Sorted, overlapping and adjacent ranges joined; None when more than the kernel holds.
fn union(a: &[(u16, u16)], b: &[(u16, u16)]) -> Option<Vec<(u16, u16)>> {
    let mut all: Vec<(u16, u16)> = a.iter().chain(b).copied().collect();
    all.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::new();
    for (lo, hi) in all {
        match out.last_mut() {
            Some(last) if lo as u32 <= last.1 as u32 + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    (out.len() <= MAX_PORT_RANGES).then_some(out)
}

/// Secret i for a slot in the secrets' namespace.
fn secret_index(slot: u32) -> Option<u32> {
    slot.checked_sub(SECRET_SLOT_BASE).filter(|i| (*i as usize) < MAX_SECRETS)
}

/// The GRANT_DESTS host key of `addr` in secret i's send slot.
fn send_key(i: u32, addr: [u8; 16]) -> TrieKey<DestKey> {
    TrieKey::new(32 + 128, DestKey { slot_be: (SECRET_SEND_SLOT_BASE + i).to_be(), addr })
}

impl LearnedTable {
    /// Entries already in the map (pins adopted from a previous daemon) are taken over as
    /// held since boot, their names unknown.
    pub fn new(map: Option<BpfHashMap<MapData, LearnedKey, Learned>>) -> Self {
        let mut entries: HashMap<Key, Vec<Version>> = HashMap::new();
        if let Some(m) = &map {
            for (k, value) in m.iter().flatten() {
                entries.insert(
                    (k.slot, k.addr),
                    vec![Version { since_ns: 0, value, name: String::new() }],
                );
            }
        }
        LearnedTable { inner: Mutex::new(Inner { map, send_dests: None, entries }) }
    }

    /// The table writing secrets' learned addresses into `dests` (GRANT_DESTS) too.
    pub fn with_send_dests(self, dests: LpmTrie<MapData, DestKey, PortRanges>) -> Self {
        self.inner.lock_or_recover().send_dests = Some(dests);
        self
    }

    /// Records that `ip` was answered for `name`, usable for `slot` on `ports` until
    /// `deadline_ns` (boot clock). An entry still live keeps the later deadline and the union
    /// of both port sets (when it fits the kernel's form; else the new ports alone, never a
    /// widened range). The kernel map is written first; `Err` when it is full or refuses.
    /// `net_ports`: for a secret's slot, the ports its own networks give `ip` (the longest
    /// match's), kept in the send slot's host entry, which shadows the network's.
    pub fn learn(
        &self,
        slot: u32,
        ip: IpAddr,
        ports: &[(u16, u16)],
        net_ports: &[(u16, u16)],
        deadline_ns: u64,
        name: &str,
    ) -> Result<()> {
        let addr = key_addr(ip);
        let now = boot_now_ns();
        let mut inner = self.inner.lock_or_recover();
        let current = inner.entries.get(&(slot, addr)).and_then(|v| v.last()).cloned();
        let (ports, deadline_ns) = match current {
            Some(c) if c.value.deadline_ns > now => {
                let old = ranges_of(&c.value.ports);
                (
                    union(&old, ports).unwrap_or_else(|| ports.to_vec()),
                    deadline_ns.max(c.value.deadline_ns),
                )
            }
            _ => (ports.to_vec(), deadline_ns),
        };
        let value = Learned { deadline_ns, ports: DestTable::port_ranges(&ports) };
        if let (Some(i), Some(dests)) = (secret_index(slot), inner.send_dests.as_mut()) {
            // Never wider than both: when the union does not fit the kernel's form, the
            // learned ports alone (a send to the network's other ports is then judged
            // outside: a false alarm, never a bypass).
            let send = union(&ports, net_ports).unwrap_or_else(|| ports.clone());
            dests
                .insert(&send_key(i, addr), DestTable::port_ranges(&send), 0)
                .with_context(|| format!("write GRANT_DESTS (secret {i} send slot, {ip})"))?;
        }
        if let Some(map) = inner.map.as_mut() {
            map.insert(LearnedKey { slot, addr }, value, 0)
                .with_context(|| format!("write LEARNED ({slot}, {ip})"))?;
        }
        let since_ns = boot_now_ns();
        let versions = inner.entries.entry((slot, addr)).or_default();
        versions.push(Version { since_ns, value, name: name.to_string() });
        if versions.len() > VERSIONS {
            versions.remove(0);
        }
        Ok(())
    }

    /// The entry for (slot, ip) as the kernel held it at `at_ns` (boot clock), as the
    /// decision's `LearnedAddr` (wall-clock deadline relative to `now`/`now_ns`).
    /// An adopted entry's name is unknown (empty).
    pub fn at(&self, slot: u32, ip: IpAddr, at_ns: u64) -> Option<LearnedAddr> {
        let inner = self.inner.lock_or_recover();
        let versions = inner.entries.get(&(slot, key_addr(ip)))?;
        let v = versions.iter().rev().find(|v| v.since_ns <= at_ns)?;
        let now_ns = boot_now_ns();
        let left = v.value.deadline_ns as i128 - now_ns as i128;
        let expires_at: DateTime<Utc> = Utc::now()
            + chrono::Duration::nanoseconds(left.clamp(i64::MIN as i128, i64::MAX as i128) as i64);
        Some(LearnedAddr {
            ip,
            ports: ranges_of(&v.value.ports),
            expires_at,
            deadline_ns: v.value.deadline_ns,
            name: v.name.clone(),
        })
    }

    /// Entries held now (for status and the bench).
    pub fn len(&self) -> usize {
        self.inner.lock_or_recover().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes entries whose deadline passed more than the grace period ago, from the kernel
    /// first. Returns how many went.
    pub fn prune(&self, now_ns: u64) -> usize {
        let mut inner = self.inner.lock_or_recover();
        let gone: Vec<Key> = inner
            .entries
            .iter()
            .filter(|(_, v)| {
                v.last().is_none_or(|l| l.value.deadline_ns.saturating_add(GRACE_NS) < now_ns)
            })
            .map(|(k, _)| *k)
            .collect();
        for k in &gone {
            if let Some(map) = inner.map.as_mut() {
                let _ = map.remove(&LearnedKey { slot: k.0, addr: k.1 });
            }
            if let (Some(i), Some(dests)) = (secret_index(k.0), inner.send_dests.as_mut()) {
                let _ = dests.remove(&send_key(i, k.1));
            }
            inner.entries.remove(k);
        }
        gone.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_answer_as_the_kernel_held_them() {
        let t = LearnedTable::new(None);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        assert!(t.at(1, ip, u64::MAX).is_none());
        let now = boot_now_ns();
        t.learn(1, ip, &[(443, 443)], &[], now + 1_000_000_000, "api.example.com").unwrap();
        let first = t.at(1, ip, u64::MAX).unwrap();
        assert_eq!(first.ports, vec![(443, 443)]);
        assert_eq!(first.name, "api.example.com");
        // Before it was learned: nothing.
        assert!(t.at(1, ip, now.saturating_sub(1)).is_none());
        // Re-learned while live: later deadline, union of ports; the older version stays
        // for replays of earlier records.
        let mid = boot_now_ns();
        t.learn(1, ip, &[(80, 80)], &[], now + 5_000_000_000, "api.example.com").unwrap();
        let second = t.at(1, ip, u64::MAX).unwrap();
        assert_eq!(second.ports, vec![(80, 80), (443, 443)]);
        assert_eq!(second.deadline_ns, now + 5_000_000_000);
        assert_eq!(t.at(1, ip, mid).unwrap().deadline_ns, now + 1_000_000_000);
        // A mapped IPv6 form is the same entry; another slot is not.
        assert!(t.at(1, "::ffff:192.0.2.7".parse().unwrap(), u64::MAX).is_some());
        assert!(t.at(2, ip, u64::MAX).is_none());
        // Pruned only after deadline + grace.
        assert_eq!(t.prune(now + 5_000_000_000 + GRACE_NS - 1), 0);
        assert_eq!(t.prune(now + 5_000_000_000 + GRACE_NS + 1), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn ports_never_widen() {
        let many: Vec<(u16, u16)> = (0..8).map(|i| (1000 + 10 * i, 1000 + 10 * i)).collect();
        assert!(union(&many, &[(2000, 2000)]).is_none());
        assert_eq!(union(&[(80, 90)], &[(91, 95)]).unwrap(), vec![(80, 95)]);
    }
}
