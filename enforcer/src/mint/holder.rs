//! Which live grants a process holds, as the kernel says: its `PROC_GRANTS` entry (checked
//! against the process's start time, so a reused pid holds nothing) and each slot's `GRANTS`
//! state and deadline. Credentials and daemon-held secrets are served only on this answer;
//! a token or a claim of the caller never stands in for it.
use std::sync::Arc;

use enforcer_common::grant_state;

use super::view::{GrantFacts, GrantView};
use crate::kernel::grants::{ActMaps, boot_now_ns, id_hash};

/// The grants `pid` (started at `start_ns`, from /proc) holds that are active now: not
/// revoked, not past the kernel's deadline, and the slot still names the same grant.
pub fn live_grants(
    maps: &ActMaps,
    view: &GrantView,
    pid: u32,
    start_ns: u64,
) -> Vec<Arc<GrantFacts>> {
    let Some(pg) = maps.state_of(pid) else { return Vec::new() };
    if !crate::act::same_start(pg.start_ns, start_ns) {
        return Vec::new();
    }
    let now = boot_now_ns();
    pg.grants
        .iter()
        .filter(|s| **s != 0)
        .filter_map(|slot| {
            let info = maps.grant_info(*slot)?;
            if info.state != grant_state::ACTIVE || info.expires_ns <= now {
                return None;
            }
            let g = view.grants.get(slot)?;
            (id_hash(&g.id) == info.id_hash && !g.revoked).then(|| g.clone())
        })
        .collect()
}

/// Whether `pid` holds grant `id` live.
pub fn holds(maps: &ActMaps, view: &GrantView, pid: u32, start_ns: u64, id: &str) -> bool {
    live_grants(maps, view, pid, start_ns).iter().any(|g| g.id == id)
}
