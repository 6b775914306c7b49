//! The policy as the kernel programs see it: enforce flag, per-secret facts (own
//! destinations, no-grant action), and the `[[agent]]` selectors they can check at exec.
//! Secret indices are stable across reloads and restarts (persisted), because taint bits
//! already set in processes refer to them.
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
};
use enforcer_common::{ExeKey, MAX_SECRETS, SecretInfo, config};

use crate::policy::{AGENT_ON_VIOLATION, Config, Mode, OnViolation};

pub fn action_code(o: OnViolation) -> u32 {
    o.action_code() as u32
}

fn strictness(o: OnViolation) -> u8 {
    match o {
        OnViolation::Alert => 0,
        OnViolation::Deny => 1,
        OnViolation::Kill => 2,
    }
}

/// What a use of `secret` without a grant gets: the strictest on_violation among the
/// intents that cover it (alert when none does).
pub fn without_grant(cfg: &Config, secret: &str) -> OnViolation {
    cfg.intents
        .iter()
        .filter(|i| i.secrets.iter().any(|s| s == secret))
        .map(|i| i.on_violation)
        .max_by_key(|o| strictness(*o))
        .unwrap_or(OnViolation::Alert)
}

/// Secret name -> taint bit, persisted under the state dir.
pub struct SecretIndex {
    path: PathBuf,
    pub by_name: BTreeMap<String, u32>,
}

impl SecretIndex {
    pub fn load(state_dir: &Path) -> Self {
        let path = state_dir.join("secret-index.json");
        let by_name = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        SecretIndex { path, by_name }
    }

    /// Gives every secret of `cfg` an index (existing ones keep theirs); secrets beyond
    /// MAX_SECRETS get none and are reported.
    pub fn assign(&mut self, cfg: &Config) -> Result<()> {
        for s in &cfg.secrets {
            if self.by_name.contains_key(&s.name) {
                continue;
            }
            let used: Vec<u32> = self.by_name.values().copied().collect();
            match (0..MAX_SECRETS as u32).find(|i| !used.contains(i)) {
                Some(i) => {
                    self.by_name.insert(s.name.clone(), i);
                }
                None => {
                    tracing::warn!(secret = %s.name, "more than {MAX_SECRETS} secrets: this one cannot taint processes")
                }
            }
        }
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&self.by_name)?)
            .with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path)?;
        Ok(())
    }

    pub fn bits(&self, names: &[String]) -> u64 {
        names.iter().filter_map(|n| self.by_name.get(n)).fold(0, |acc, i| acc | (1u64 << i))
    }

    pub fn names(&self, bits: u64) -> Vec<String> {
        self.by_name
            .iter()
            .filter(|(_, i)| bits & (1u64 << **i) != 0)
            .map(|(n, _)| n.clone())
            .collect()
    }
}

pub struct PolicyMaps {
    secrets: Array<MapData, SecretInfo>,
    config: Array<MapData, u32>,
    agent_exes: HashMap<MapData, ExeKey, u8>,
    agent_uids: HashMap<MapData, u32, u8>,
    agent_cgroups: HashMap<MapData, u64, u8>,
}

/// The kernel's encoding of a device number (MKDEV: major << 20 | minor), which is what
/// super_block.s_dev holds; stat(2) reports the userspace encoding.
fn kernel_dev(st_dev: u64) -> u64 {
    let major = libc::major(st_dev) as u64;
    let minor = libc::minor(st_dev) as u64;
    (major << 20) | minor
}

impl PolicyMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name).with_context(|| format!("map {name} missing from the eBPF object"))
        };
        Ok(PolicyMaps {
            secrets: Array::try_from(take(ebpf, "SECRETS")?)?,
            config: Array::try_from(take(ebpf, "CONFIG")?)?,
            agent_exes: HashMap::try_from(take(ebpf, "AGENT_EXES")?)?,
            agent_uids: HashMap::try_from(take(ebpf, "AGENT_UIDS")?)?,
            agent_cgroups: HashMap::try_from(take(ebpf, "AGENT_CGROUPS")?)?,
        })
    }

    /// Writes the policy. Order matters for a reload: per-secret facts and selectors first,
    /// the enforce switch last, so no use is decided against half of each.
    pub fn apply(
        &mut self,
        cfg: &Config,
        index: &SecretIndex,
        cgroups: &mut crate::cgroup::CgroupResolver,
    ) -> Result<()> {
        for s in &cfg.secrets {
            let Some(i) = index.by_name.get(&s.name) else { continue };
            let info = SecretInfo {
                has_dests: (!s.destinations.is_empty()) as u32,
                action: action_code(without_grant(cfg, &s.name)),
            };
            self.secrets.set(*i, info, 0).with_context(|| format!("write secret {}", s.name))?;
        }
        // Agent selectors the kernel can check at exec: executable inode, uid, cgroup.
        let mut exes = Vec::new();
        let mut uids = Vec::new();
        let mut cgs = Vec::new();
        for a in &cfg.agents {
            if let Some(exe) = &a.exe {
                match std::fs::metadata(exe) {
                    Ok(m) => exes.push(ExeKey { dev: kernel_dev(m.dev()), ino: m.ino() }),
                    Err(e) => {
                        tracing::warn!(exe = %exe.display(), "agent executable not found ({e}); selector inactive until reload")
                    }
                }
            }
            if let Some(u) = a.uid {
                uids.push(u);
            }
            if let Some(c) = &a.cgroup {
                match cgroups.id_of(c) {
                    Some(id) => cgs.push(id),
                    None => {
                        tracing::warn!(cgroup = %c, "agent cgroup not found; selector inactive until reload")
                    }
                }
            }
            if a.exe_sha256.is_some() && a.exe.is_none() {
                tracing::warn!(
                    "agent selector by exe_sha256 alone cannot be checked at exec in the kernel; it is not enforced for connections"
                );
            }
        }
        replace(&mut self.agent_exes, &exes)?;
        replace(&mut self.agent_uids, &uids)?;
        replace(&mut self.agent_cgroups, &cgs)?;
        self.config.set(config::AGENT_ACTION, action_code(AGENT_ON_VIOLATION), 0)?;
        self.config.set(config::ENFORCE, (cfg.mode == Mode::Enforce) as u32, 0)?;
        Ok(())
    }
}

impl PolicyMaps {
    /// Where the connect/sendmsg hooks steer port-53 traffic of judged processes (the DNS
    /// stub's port on 127.0.0.1; 0: not steered).
    /// The DNS stub's CONFIG word: its port (0: none) and `dns_stub::*` flags.
    pub fn set_dns_stub(&mut self, word: u32) -> Result<()> {
        self.config.set(config::DNS_STUB_PORT, word, 0)?;
        crate::decide::set_dns_stub(word);
        Ok(())
    }
}

/// Makes a set map hold exactly `keys` (adds first, then removes the rest).
fn replace<K: aya::Pod + PartialEq>(map: &mut HashMap<MapData, K, u8>, keys: &[K]) -> Result<()> {
    for k in keys {
        map.insert(*k, 1, 0)?;
    }
    let stale: Vec<K> = map.keys().filter_map(|k| k.ok()).filter(|k| !keys.contains(k)).collect();
    for k in stale {
        let _ = map.remove(&k);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strictest_intent_wins_for_ungranted_use() {
        let cfg = crate::policy::load_str(
            "t.toml",
            "[[secret]]\nname = \"k\"\npaths = [\"/k\"]\n[[intent]]\nname = \"a\"\nsecrets = [\"k\"]\non_violation = \"deny\"\n[[intent]]\nname = \"b\"\nsecrets = [\"k\"]\non_violation = \"kill\"\n",
        )
        .unwrap();
        assert_eq!(without_grant(&cfg, "k"), OnViolation::Kill);
        assert_eq!(without_grant(&cfg, "other"), OnViolation::Alert);
    }

    #[test]
    fn kernel_device_encoding() {
        // 8:1 (sda1) and 259:2 (nvme) in the kernel's MKDEV encoding.
        assert_eq!(kernel_dev(libc::makedev(8, 1)), (8 << 20) | 1);
        assert_eq!(kernel_dev(libc::makedev(259, 2)), (259 << 20) | 2);
    }
}
