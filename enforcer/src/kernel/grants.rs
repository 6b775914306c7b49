//! The kernel's grant maps, written by the daemon: which grants exist (deadline, state),
//! where each may connect, and which process holds which. The connect hooks and the fork
//! and exit hooks read and maintain them; userspace decisions read the same maps.
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    maps::{
        HashMap, IterableMap, Map, MapData,
        lpm_trie::{Key, LpmTrie},
    },
};
use enforcer_common::{
    DestKey, GrantInfo, MAX_PROC_GRANTS, PortRanges, ProcGrants, SECRET_SEND_SLOT_BASE,
    SECRET_SLOT_BASE, grant_state,
};
use ipnet::{IpNet, Ipv6Net};

use crate::dest_table::{DestTable, kernel_net};

/// What the kernel needs to know about a grant beyond its deadline and destinations.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrantKernel {
    /// Secrets covered (bit = secret index).
    pub secrets: u64,
    /// `enforcer_common::action` code of the intent's on_violation.
    pub action: u32,
    /// `enforcer_common::grant_flags`.
    pub flags: u32,
    pub id_hash: u64,
}

/// Stable 64-bit hash of a grant id (FNV-1a): identifies adopted kernel slots.
pub fn id_hash(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

type ProcMap = HashMap<MapData, u32, ProcGrants>;
type GrantMap = HashMap<MapData, u32, GrantInfo>;

/// PROC_GRANTS, shared by the registry (bind, unbind) and the enforcement side (taint): both
/// read-modify-write whole entries, so the two must not interleave. Held for one map
/// syscall or two, never across other I/O.
#[derive(Clone)]
struct SharedProcs(Arc<Mutex<ProcMap>>);

impl SharedProcs {
    fn lock(&self) -> MutexGuard<'_, ProcMap> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

type TaintMap = HashMap<MapData, u32, u64>;

/// GRANT_TAINT (slot -> secrets read within the grant's subtree), shared by the registry
/// (clears a slot it issues or removes) and the enforcement side (ORs in a holder's read).
#[derive(Clone)]
struct SharedTaint(Arc<Mutex<TaintMap>>);

impl SharedTaint {
    fn lock(&self) -> MutexGuard<'_, TaintMap> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// BPF_EXIST: update an entry only if it is still there (a revoke must not recreate a grant
/// the registry has just removed).
const BPF_EXIST: u64 = 2;

/// BPF_NOEXIST: create an entry only if there is none.
const BPF_NOEXIST: u64 = 1;

/// The errno of a failed map syscall.
fn errno(e: &aya::maps::MapError) -> Option<i32> {
    match e {
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}

pub struct GrantMaps {
    procs: SharedProcs,
    grant_taint: SharedTaint,
    tree_taint: SharedTaint,
    grants: GrantMap,
    dests: LpmTrie<MapData, DestKey, PortRanges>,
}

/// The kernel maps a decision acts on (`crate::act`): its own handle on GRANTS (to revoke)
/// and the shared PROC_GRANTS (to taint, and to read what a process holds).
pub struct ActMaps {
    procs: SharedProcs,
    grant_taint: SharedTaint,
    /// AGENT_TAINT: `[[agent]]` tree -> secrets read within it.
    tree_taint: SharedTaint,
    grants: GrantMap,
}

impl ActMaps {
    /// PROC_GRANTS and GRANTS as a daemon pinned them under `pin_dir` (for tools and tests
    /// that look at the kernel state from outside the daemon).
    pub fn open_pinned(pin_dir: &std::path::Path) -> Result<ActMaps> {
        let open = |name: &str| -> Result<Map> {
            let path = pin_dir.join(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("open pinned map {}", path.display()))?;
            Ok(Map::from_map_data(data)?)
        };
        Ok(ActMaps {
            procs: SharedProcs(Arc::new(Mutex::new(HashMap::try_from(open("PROC_GRANTS")?)?))),
            grant_taint: SharedTaint(Arc::new(Mutex::new(HashMap::try_from(open(
                "GRANT_TAINT",
            )?)?))),
            tree_taint: SharedTaint(Arc::new(Mutex::new(HashMap::try_from(open("AGENT_TAINT")?)?))),
            grants: HashMap::try_from(open("GRANTS")?)?,
        })
    }

    /// Taint follows the data within a subtree: ORs `bits` into the subtree taint of every
    /// grant in `slots` that still exists (the connect judge ORs it into each holder's).
    pub fn taint_grants(&self, slots: &[u32], bits: u64) -> Result<()> {
        let mut taint = self.grant_taint.lock();
        for &slot in slots.iter().filter(|s| **s != 0) {
            if self.grants.get(&slot, 0).is_err() {
                continue;
            }
            let old = taint.get(&slot, 0).unwrap_or(0);
            if old & bits != bits {
                taint
                    .insert(slot, old | bits, 0)
                    .with_context(|| format!("write GRANT_TAINT of slot {slot}"))?;
            }
        }
        Ok(())
    }

    /// Taint follows the data within an `[[agent]]` tree: ORs `bits` into the tree's taint
    /// (the connect judge ORs it into every member's).
    pub fn taint_tree(&self, tree: u32, bits: u64) -> Result<()> {
        let mut taint = self.tree_taint.lock();
        let old = taint.get(&tree, 0).unwrap_or(0);
        if old & bits != bits {
            taint
                .insert(tree, old | bits, 0)
                .with_context(|| format!("write AGENT_TAINT of tree {tree}"))?;
        }
        Ok(())
    }

    /// Removes the taint of `[[agent]]` trees no living process belongs to. How many.
    pub fn sweep_trees(&self) -> u64 {
        let live: std::collections::HashSet<u32> = {
            let procs = self.procs.lock();
            procs.iter().filter_map(|r| r.ok()).map(|(_, pg)| pg.tree).collect()
        };
        let mut taint = self.tree_taint.lock();
        let dead: Vec<u32> =
            taint.keys().filter_map(|k| k.ok()).filter(|t| !live.contains(t)).collect();
        dead.iter().filter(|t| taint.remove(t).is_ok()).count() as u64
    }

    /// What the kernel holds for `pid`: grants, taint, flags.
    pub fn state_of(&self, pid: u32) -> Option<ProcGrants> {
        self.procs.lock().get(&pid, 0).ok()
    }

    /// The processes holding grant `slot` (tgid, start time), in one pass over PROC_GRANTS.
    pub fn holders_of(&self, slot: u32) -> Vec<(u32, u64)> {
        let procs = self.procs.lock();
        procs
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, pg)| pg.grants.contains(&slot))
            .map(|(pid, pg)| (pid, pg.start_ns))
            .collect()
    }

    /// Grant `slot` as the kernel judges it now (state, deadline, id hash).
    pub fn grant_info(&self, slot: u32) -> Option<GrantInfo> {
        self.grants.get(&slot, 0).ok()
    }

    /// ORs `taint` and `flags` into `pid`'s existing entry (BPF_EXIST: an entry the exit hook
    /// removes meanwhile is not recreated). `Ok(false)` when there is no entry.
    pub fn merge_existing(&self, pid: u32, taint: u64, flags: u32) -> Result<bool> {
        let mut procs = self.procs.lock();
        let Ok(mut pg) = procs.get(&pid, 0) else { return Ok(false) };
        if pg.taint & taint == taint && pg.flags & flags == flags {
            return Ok(true);
        }
        pg.taint |= taint;
        pg.flags |= flags;
        match procs.insert(pid, pg, BPF_EXIST) {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("update PROC_GRANTS entry of pid {pid}")),
        }
    }

    /// Creates `pid`'s entry (BPF_NOEXIST). `Ok(false)` when one exists already (the fork
    /// hook or a bind got there first: merge into it instead). The caller has confirmed the
    /// process is the one meant, and re-checks after the write (`remove_if`).
    pub fn create(&self, pid: u32, start_ns: u64, taint: u64, flags: u32) -> Result<bool> {
        let pg = ProcGrants { grants: [0; MAX_PROC_GRANTS], start_ns, taint, flags, tree: 0 };
        match self.procs.lock().insert(pid, pg, BPF_NOEXIST) {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("create PROC_GRANTS entry of pid {pid}")),
        }
    }

    /// Removes `pid`'s entry if it still has start time `start_ns` (not one a successor's
    /// fork wrote since). Whether it removed one.
    pub fn remove_if(&self, pid: u32, start_ns: u64) -> bool {
        let mut procs = self.procs.lock();
        match procs.get(&pid, 0) {
            Ok(pg) if pg.start_ns == start_ns => procs.remove(&pid).is_ok(),
            _ => false,
        }
    }

    /// Every PROC_GRANTS entry (tgid, start time), read in one pass under the lock.
    pub fn entries(&self) -> Vec<(u32, u64)> {
        let procs = self.procs.lock();
        procs.iter().filter_map(|r| r.ok()).map(|(pid, pg)| (pid, pg.start_ns)).collect()
    }

    /// Flips grant `slot` to revoked: from this instant the kernel judges it so.
    pub fn revoke(&mut self, slot: u32) -> Result<()> {
        revoke_slot(&mut self.grants, slot)
    }
}

fn revoke_slot(grants: &mut GrantMap, slot: u32) -> Result<()> {
    let mut info =
        grants.get(&slot, 0).with_context(|| format!("grant slot {slot} not in the kernel"))?;
    if info.state == grant_state::REVOKED {
        return Ok(());
    }
    info.state = grant_state::REVOKED;
    grants.insert(slot, info, BPF_EXIST).with_context(|| format!("revoke grant slot {slot}"))?;
    Ok(())
}

/// A second handle on the same kernel map (a duplicate of its fd).
fn reopen(map: &GrantMap) -> Result<GrantMap> {
    let fd = map.map().fd().as_fd().try_clone_to_owned().context("dup GRANTS fd")?;
    let data = MapData::from_fd(fd)?;
    Ok(HashMap::try_from(Map::from_map_data(data)?)?)
}

/// The trie key of a network (in the kernel's IPv6 form) for one slot.
fn trie_key(slot: u32, net: &Ipv6Net) -> Key<DestKey> {
    Key::new(
        32 + net.prefix_len() as u32,
        DestKey { slot_be: slot.to_be(), addr: net.network().octets() },
    )
}

/// The trie key of a network for one slot.
fn dest_key(slot: u32, net: &IpNet) -> Key<DestKey> {
    trie_key(slot, &kernel_net(net))
}

impl GrantMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name).with_context(|| format!("map {name} missing from the eBPF object"))
        };
        Ok(GrantMaps {
            procs: SharedProcs(Arc::new(Mutex::new(HashMap::try_from(take(
                ebpf,
                "PROC_GRANTS",
            )?)?))),
            grant_taint: SharedTaint(Arc::new(Mutex::new(HashMap::try_from(take(
                ebpf,
                "GRANT_TAINT",
            )?)?))),
            tree_taint: SharedTaint(Arc::new(Mutex::new(HashMap::try_from(take(
                ebpf,
                "AGENT_TAINT",
            )?)?))),
            grants: HashMap::try_from(take(ebpf, "GRANTS")?)?,
            dests: LpmTrie::try_from(take(ebpf, "GRANT_DESTS")?)?,
        })
    }

    /// The maps decisions act on, for `crate::act`.
    pub fn act_maps(&self) -> Result<ActMaps> {
        Ok(ActMaps {
            procs: self.procs.clone(),
            grant_taint: self.grant_taint.clone(),
            tree_taint: self.tree_taint.clone(),
            grants: reopen(&self.grants)?,
        })
    }

    /// Writes a grant: destinations first, then the grant itself, so the connect hook never
    /// sees a grant without its destinations.
    pub fn put_grant(
        &mut self,
        slot: u32,
        expires_ns: u64,
        dests: &[(IpNet, u16, u16)],
        k: GrantKernel,
    ) -> Result<()> {
        self.put_dests(slot, dests)?;
        let info = GrantInfo {
            expires_ns,
            secrets: k.secrets,
            id_hash: k.id_hash,
            state: grant_state::ACTIVE,
            action: k.action,
            flags: k.flags,
            _pad: 0,
        };
        // A reused slot starts with no subtree taint.
        let _ = self.grant_taint.lock().remove(&slot);
        self.grants.insert(slot, info, 0).with_context(|| format!("write grant slot {slot}"))?;
        Ok(())
    }

    /// A secret's own destinations (where it is valid at all), under its slot namespace and
    /// its send namespace (`SECRET_SEND_SLOT_BASE`, where the DNS stub adds the addresses it
    /// learns for the secret's names).
    pub fn put_secret_dests(&mut self, index: u32, dests: &[(IpNet, u16, u16)]) -> Result<()> {
        self.put_dests(SECRET_SLOT_BASE + index, dests)?;
        self.put_dests(SECRET_SEND_SLOT_BASE + index, dests)
    }

    /// Removes networks of a secret's own destinations from both of its namespaces.
    pub fn remove_secret_dests(&mut self, index: u32, nets: &[IpNet]) {
        self.remove_dests(SECRET_SLOT_BASE + index, nets);
        self.remove_dests(SECRET_SEND_SLOT_BASE + index, nets);
    }

    /// Destinations compiled to the kernel's form (`crate::dest_table`): nested networks
    /// carry the ranges of those containing them, so the longest match answers the union.
    fn put_dests(&mut self, slot: u32, dests: &[(IpNet, u16, u16)]) -> Result<()> {
        let table =
            DestTable::compile(dests).with_context(|| format!("destinations of slot {slot}"))?;
        for (net, ranges) in &table.entries {
            self.dests
                .insert(&trie_key(slot, net), DestTable::port_ranges(ranges), 0)
                .with_context(|| format!("write destination {net} of slot {slot}"))?;
        }
        Ok(())
    }

    /// Removes destinations (of a grant slot, or a secret's namespace slot).
    pub fn remove_dests(&mut self, slot: u32, nets: &[IpNet]) {
        for n in nets {
            let _ = self.dests.remove(&dest_key(slot, n));
        }
    }

    /// The deadline the kernel holds for `slot` (boot clock; 0 if there is none).
    pub fn deadline_of(&self, slot: u32) -> u64 {
        self.grants.get(&slot, 0).map(|g| g.expires_ns).unwrap_or(0)
    }

    /// Every grant in the kernel map (after adopting a previous daemon's pins).
    pub fn grants_in_kernel(&self) -> Vec<(u32, GrantInfo)> {
        self.grants.iter().filter_map(|r| r.ok()).collect()
    }

    /// How many processes hold `slot` now.
    pub fn holders(&self, slot: u32) -> u32 {
        let procs = self.procs.lock();
        procs.iter().filter_map(|r| r.ok()).filter(|(_, pg)| pg.grants.contains(&slot)).count()
            as u32
    }

    pub fn revoke(&mut self, slot: u32) -> Result<()> {
        revoke_slot(&mut self.grants, slot)
    }

    /// Forgets a grant that can no longer be used by anyone (its subtree is gone).
    pub fn remove_grant(&mut self, slot: u32, nets: &[IpNet]) {
        let _ = self.grants.remove(&slot);
        let _ = self.grant_taint.lock().remove(&slot);
        self.remove_dests(slot, nets);
    }

    /// Adds `slot` to the grants process `pid` holds.
    pub fn bind(&mut self, pid: u32, start_ns: u64, slot: u32) -> Result<()> {
        let mut procs = self.procs.lock();
        let mut pg = procs.get(&pid, 0).unwrap_or(ProcGrants {
            grants: [0; MAX_PROC_GRANTS],
            start_ns,
            taint: 0,
            flags: 0,
            tree: 0,
        });
        if pg.grants.contains(&slot) {
            return Ok(());
        }
        let Some(free) = pg.grants.iter().position(|s| *s == 0) else {
            bail!("process {pid} already holds {MAX_PROC_GRANTS} grants");
        };
        pg.grants[free] = slot;
        procs.insert(pid, pg, 0).with_context(|| format!("bind grant slot {slot} to pid {pid}"))?;
        Ok(())
    }

    /// Removes `slot` from `pid` (undo of a bind whose subject turned out to be gone).
    pub fn unbind(&mut self, pid: u32, slot: u32) {
        let mut procs = self.procs.lock();
        if let Ok(mut pg) = procs.get(&pid, 0) {
            for s in pg.grants.iter_mut() {
                if *s == slot {
                    *s = 0;
                }
            }
            if pg.grants.iter().all(|s| *s == 0) && pg.taint == 0 && pg.flags == 0 {
                let _ = procs.remove(&pid);
            } else {
                let _ = procs.insert(pid, pg, 0);
            }
        }
    }
}

/// Boot-clock nanoseconds now (the clock bpf_ktime_get_boot_ns reads).
pub fn boot_now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// A wall-clock deadline on the boot clock.
pub fn boot_deadline(expires_at: chrono::DateTime<chrono::Utc>) -> u64 {
    let left = expires_at - chrono::Utc::now();
    let left_ns = left.num_nanoseconds().unwrap_or(i64::MAX);
    if left_ns <= 0 {
        boot_now_ns().saturating_sub((-left_ns) as u64)
    } else {
        boot_now_ns().saturating_add(left_ns as u64)
    }
}
