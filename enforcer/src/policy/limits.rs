//! `[limits]`: the daemon's resource bounds against hostile local processes (issue 13). Every
//! key is optional; the defaults hold a busy CI host.
use serde::Deserialize;
use serde_spanned::Spanned;

use super::diag::Collector;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Executables larger than this are not hashed for alerts (`exe_sha256` null,
    /// `exe_sha256_unknown` says why).
    pub exe_hash_max_bytes: u64,
    /// Open connections to the API socket; past it new ones are closed at once (counted).
    pub api_max_connections: u32,
    /// Open API connections of one non-root uid (root is held only to the total).
    pub api_max_connections_per_uid: u32,
    /// A connection that sends no complete request for this long is closed.
    pub api_idle_timeout_seconds: u32,
    /// Live grants one uid may hold at once (root is not limited); 0 = no quota.
    pub mint_grants_per_uid: u32,
    /// Live grants the processes of one cgroup (subtree) may hold at once; 0 = no quota.
    pub mint_grants_per_cgroup: u32,
}

impl Limits {
    pub const DEFAULT_EXE_HASH_MAX_BYTES: u64 = 64 * 1024 * 1024;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            exe_hash_max_bytes: Limits::DEFAULT_EXE_HASH_MAX_BYTES,
            api_max_connections: 256,
            api_max_connections_per_uid: 64,
            api_idle_timeout_seconds: 10,
            mint_grants_per_uid: 256,
            mint_grants_per_cgroup: 256,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    exe_hash_max_bytes: Option<Spanned<u64>>,
    api_max_connections: Option<Spanned<u32>>,
    api_max_connections_per_uid: Option<Spanned<u32>>,
    api_idle_timeout_seconds: Option<Spanned<u32>>,
    mint_grants_per_uid: Option<Spanned<u32>>,
    mint_grants_per_cgroup: Option<Spanned<u32>>,
}

pub(crate) fn limits(diags: &mut Collector, file: usize, raw: Option<&RawLimits>) -> Limits {
    let mut l = Limits::default();
    let Some(raw) = raw else { return l };
    let mut at_least = |v: &Option<Spanned<u32>>, min: u32, key: &str, out: &mut u32| {
        if let Some(v) = v {
            if *v.get_ref() < min {
                diags.error(file, v.span(), format!("limits {key} must be at least {min}"));
            } else {
                *out = *v.get_ref();
            }
        }
    };
    at_least(&raw.api_max_connections, 1, "api_max_connections", &mut l.api_max_connections);
    at_least(
        &raw.api_max_connections_per_uid,
        1,
        "api_max_connections_per_uid",
        &mut l.api_max_connections_per_uid,
    );
    at_least(
        &raw.api_idle_timeout_seconds,
        1,
        "api_idle_timeout_seconds",
        &mut l.api_idle_timeout_seconds,
    );
    at_least(&raw.mint_grants_per_uid, 0, "mint_grants_per_uid", &mut l.mint_grants_per_uid);
    at_least(
        &raw.mint_grants_per_cgroup,
        0,
        "mint_grants_per_cgroup",
        &mut l.mint_grants_per_cgroup,
    );
    if let Some(v) = &raw.exe_hash_max_bytes {
        l.exe_hash_max_bytes = *v.get_ref();
    }
    l
}
