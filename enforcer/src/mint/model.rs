//! The grant: "this process subtree may use secrets S, toward destinations D, until T, for
//! intent I". Serialized exactly as the Mint API's grant JSON (docs/contracts.md).
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The process a grant is bound to, as attested by the kernel (never by the caller).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Subject {
    pub pid: u32,
    /// Boot-clock ns of the process start (/proc/<pid>/stat starttime in ns): with the pid,
    /// the identity, so a reused pid is a different subject.
    pub start_ns: u64,
    pub exe: String,
    #[serde(default)]
    pub exe_sha256: String,
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    #[serde(default)]
    pub cgroup: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GrantState {
    Active,
    Expired,
    Revoked,
    /// The whole subject subtree exited.
    Ended,
}

impl GrantState {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantState::Active => "active",
            GrantState::Expired => "expired",
            GrantState::Revoked => "revoked",
            GrantState::Ended => "ended",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "active" => GrantState::Active,
            "expired" => GrantState::Expired,
            "revoked" => GrantState::Revoked,
            "ended" => GrantState::Ended,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Grant {
    /// "g_" + 26 lowercase base32 chars of randomness.
    pub id: String,
    pub intent: String,
    pub subject: Subject,
    pub secrets: Vec<String>,
    /// Destination strings as in the policy ("192.0.2.10/32:443", "deploy.internal:443").
    pub destinations: Vec<String>,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub state: GrantState,
    /// Compact JWS (EdDSA) whose claims mirror this grant.
    pub token: String,
    /// Set when the requested TTL was above the intent's max_ttl and was clamped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_clamped_from: Option<String>,
}
