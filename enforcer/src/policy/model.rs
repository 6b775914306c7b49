//! The validated configuration the daemon runs on. Every value here has passed the checks in
//! `parse.rs`; nothing in this file needs to report positions.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::destination::Destination;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Never blocks: every violation is only alerted.
    #[default]
    Monitor,
    /// Applies each intent's `on_violation`.
    Enforce,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Monitor => "monitor",
            Mode::Enforce => "enforce",
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnViolation {
    /// Default: blocking has to be asked for explicitly.
    #[default]
    Alert,
    Deny,
    Kill,
}

impl OnViolation {
    /// The kernel's `enforcer_common::action::*` code for this on_violation.
    pub const fn action_code(self) -> u8 {
        match self {
            OnViolation::Alert => enforcer_common::action::ALERT,
            OnViolation::Deny => enforcer_common::action::DENY,
            OnViolation::Kill => enforcer_common::action::KILL,
        }
    }
}

/// What an `[[agent]]` process connecting outside any grant gets in enforce mode. One
/// definition: the daemon writes it to the kernel's CONFIG map and decide.rs reads it.
pub const AGENT_ON_VIOLATION: OnViolation = OnViolation::Deny;

impl fmt::Display for OnViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnViolation::Alert => "alert",
            OnViolation::Deny => "deny",
            OnViolation::Kill => "kill",
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretKind {
    #[default]
    CredentialsFile,
    PrivateKey,
    Token,
}

impl fmt::Display for SecretKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SecretKind::CredentialsFile => "credentials_file",
            SecretKind::PrivateKey => "private_key",
            SecretKind::Token => "token",
        })
    }
}

/// `file_backend`: which backend decides secret-file opens. `auto` loads the BPF-LSM
/// program and falls back to fanotify where the kernel refuses it; `bpf-lsm` refuses to
/// start without it; `fanotify` never tries it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FileBackend {
    #[default]
    Auto,
    BpfLsm,
    Fanotify,
}

impl fmt::Display for FileBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileBackend::Auto => "auto",
            FileBackend::BpfLsm => "bpf-lsm",
            FileBackend::Fanotify => "fanotify",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub mode: Mode,
    /// Name reported in events; None = the kernel hostname.
    pub host: Option<String>,
    /// None = the cgroup2 mount from /proc/mounts (resolved by the daemon).
    pub cgroup_root: Option<PathBuf>,
    pub runtime_dir: PathBuf,
    pub state_dir: PathBuf,
    pub pin_dir: PathBuf,
    /// Directory whose `*.toml` fragments were merged; None for the embedded default.
    pub policy_dir: Option<PathBuf>,
    pub socket_group: Option<String>,
    /// Grant requests per second allowed per requesting process (burst: twice that);
    /// 0 disables the limit.
    pub mint_rate_per_second: u32,
    /// Which backend decides secret-file opens (`file_backend`).
    pub file_backend: FileBackend,
    /// Where alerts are delivered (`[[sink]]`), each from its own cursor into the outbox.
    pub sinks: Vec<super::sink::SinkConfig>,
    /// Bounds of the durable outbox (`[outbox]`).
    pub outbox: super::sink::OutboxConfig,
    /// Workload identity (`[spiffe]`); None: no Workload API.
    pub spiffe: Option<super::spiffe::SpiffeConfig>,
    /// Resource bounds (`[limits]`).
    pub limits: super::limits::Limits,

    /// The DNS stub (`[dns]`).
    pub dns: super::dns::DnsConfig,
    pub secrets: Vec<Secret>,
    pub intents: Vec<Intent>,
    /// Processes whose connections are checked even before they hold any grant.
    pub agents: Vec<AgentSelector>,
    /// The daemon's AWS broker settings (`[aws]`).
    pub aws: super::aws::AwsSettings,
    /// "embedded default" or the config file path.
    pub source: String,
}

pub const DEFAULT_RUNTIME_DIR: &str = "/run/enforcer";
pub const DEFAULT_MINT_RATE_PER_SECOND: u32 = 50;
pub const DEFAULT_STATE_DIR: &str = "/var/lib/enforcer";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/enforcer";

impl Config {
    pub fn secret(&self, name: &str) -> Option<&Secret> {
        self.secrets.iter().find(|s| s.name == name)
    }

    pub fn intent(&self, name: &str) -> Option<&Intent> {
        self.intents.iter().find(|i| i.name == name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    pub name: String,
    /// As written: absolute paths or `~/` paths, possibly with glob characters.
    pub paths: Vec<String>,
    /// Where this secret is valid at all; empty = no restriction beyond the intent's.
    pub destinations: Vec<Destination>,
    pub kind: SecretKind,
    /// A secret held only by the daemon: this root-only file's content is delivered to
    /// processes holding a grant that covers the secret (`enforcer secret get`).
    pub value_file: Option<PathBuf>,
}

impl Secret {
    /// The concrete files this secret covers on this host: `~/` becomes /root/ and every
    /// /home/*/ directory, then glob patterns are matched against the filesystem. Paths without
    /// glob characters are kept even when missing, so the daemon can watch for them to appear.
    pub fn expand_paths(&self) -> Vec<PathBuf> {
        expand_paths_with_homes(&self.paths, &home_dirs())
    }
}

/// /root plus every directory under /home (sorted, so results are stable).
fn home_dirs() -> Vec<PathBuf> {
    let mut homes = vec![PathBuf::from("/root")];
    if let Ok(entries) = std::fs::read_dir("/home") {
        let mut users: Vec<PathBuf> =
            entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
        users.sort();
        homes.extend(users);
    }
    homes
}

pub(crate) fn has_glob_chars(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

pub(crate) fn expand_paths_with_homes(patterns: &[String], homes: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = BTreeSet::new();
    for pattern in patterns {
        let glob = has_glob_chars(pattern);
        let candidates: Vec<String> = match pattern.strip_prefix("~/") {
            Some(rest) => homes
                .iter()
                .filter_map(|h| h.to_str())
                // The home part is literal even if a user name contains glob characters.
                .map(|h| {
                    if glob {
                        format!("{}/{rest}", glob::Pattern::escape(h))
                    } else {
                        format!("{h}/{rest}")
                    }
                })
                .collect(),
            None => vec![pattern.clone()],
        };
        for c in candidates {
            if glob {
                out.extend(glob_files(&c));
            } else {
                out.insert(PathBuf::from(c));
            }
        }
    }
    out.into_iter().collect()
}

/// Existing non-directory matches; unreadable directories are skipped rather than failing the
/// whole expansion (a locked-down home must not hide every other match).
fn glob_files(pattern: &str) -> Vec<PathBuf> {
    let opts = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };
    match glob::glob_with(pattern, opts) {
        Ok(paths) => paths.flatten().filter(|p| !p.is_dir()).collect(),
        Err(_) => Vec::new(), // patterns are validated at load time
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    pub name: String,
    /// Who may request a grant for this intent.
    pub agents: Vec<AgentSelector>,
    /// Secret names, all defined in the same config.
    pub secrets: Vec<String>,
    pub destinations: Vec<Destination>,
    pub max_ttl: Duration,
    pub default_ttl: Duration,
    pub on_violation: OnViolation,
    pub revoke_on_violation: bool,
    /// Brokered AWS credentials for grants of this intent (`[intent.aws]`).
    pub aws: Option<super::aws::AwsIntent>,
    /// JWT-SVID audiences a holder of this intent's grant may request (`[spiffe]`); empty:
    /// the intent issues no SVIDs.
    pub audiences: Vec<String>,
    /// SPIFFE ID template (path or full ID; `{intent}`, `{uid}`, `{gid}`); None: the default
    /// `spiffe://<trust_domain>/intent/<name>`.
    pub spiffe_id: Option<String>,
}

pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(15 * 60);
pub const DEFAULT_TTL: Duration = Duration::from_secs(5 * 60);

/// Matches a process when every given field matches (at least one is always given).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct AgentSelector {
    pub exe: Option<PathBuf>,
    /// Lower-case hex.
    pub exe_sha256: Option<String>,
    pub cgroup: Option<String>,
    pub uid: Option<u32>,
}

impl AgentSelector {
    pub fn is_empty(&self) -> bool {
        self.exe.is_none()
            && self.exe_sha256.is_none()
            && self.cgroup.is_none()
            && self.uid.is_none()
    }

    /// Whether a process matches. `cgroup` matches the selector's cgroup or any cgroup below it
    /// (a runner's job cgroups live under it); `exe_sha256` is only computed when a selector needs it.
    pub fn matches(
        &self,
        exe: &Path,
        uid: u32,
        cgroup: &str,
        exe_sha256: impl FnOnce() -> Option<String>,
    ) -> bool {
        self.exe.as_deref().is_none_or(|e| e == exe)
            && self.uid.is_none_or(|u| u == uid)
            && self.cgroup.as_deref().is_none_or(|c| Path::new(cgroup).starts_with(c))
            && self
                .exe_sha256
                .as_deref()
                .is_none_or(|want| exe_sha256().is_some_and(|got| got.eq_ignore_ascii_case(want)))
    }
}
