//! The event stream record, `enforcer.event/v1` (DESIGN.md "Event stream"). Field names
//! are a contract with SIEM pipelines: change them only together with the schema version.
use serde::{Deserialize, Serialize};

pub const SCHEMA: &str = "enforcer.event/v1";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub schema: String,
    /// Unique per event (boot-unique daemon instance + sequence) so receivers can de-duplicate.
    pub id: String,
    pub time: String,
    pub host: String,
    pub kind: String,
    pub verdict: String,
    pub action: String,
    pub mode: String,
    pub process: ProcessRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<DestinationRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<GrantRef>,
    #[serde(default)]
    pub decision_path: Vec<String>,
    /// Secret names a grant covers (grant lifecycle events).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    #[serde(default)]
    pub mitre: Vec<String>,
    pub severity: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProcessRef {
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub exe: String,
    pub cmdline: String,
    pub cgroup: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileRef {
    pub path: String,
    pub dev: u64,
    pub ino: u64,
    pub secret: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DestinationRef {
    pub ip: String,
    pub port: u16,
    pub protocol: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GrantRef {
    pub id: String,
    pub intent: String,
    pub expires_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired_for_ms: Option<u64>,
}

/// RFC 3339 with nanoseconds, UTC.
pub fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// Joins argv for the `cmdline` field; arguments with spaces are quoted so the line reads back.
pub fn join_cmdline(argv: &[String]) -> String {
    argv.iter()
        .map(|a| if a.is_empty() || a.contains(char::is_whitespace) { format!("{a:?}") } else { a.clone() })
        .collect::<Vec<_>>()
        .join(" ")
}
