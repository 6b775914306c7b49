//! The event stream record, `enforcer.event/v1` (docs/contracts.md, "Events"). Field names
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
    /// The socket a `socket` event is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<SocketRef>,
    /// The Unix socket an `ipc` event is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipc: Option<IpcRef>,
    #[serde(default)]
    pub decision_path: Vec<String>,
    /// Secret names a grant covers (grant lifecycle events).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// Brokered cloud credentials an event is about (issued, refused, outstanding at a
    /// grant's end): the access key id and expiry, never the secret key or session token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<CredentialRef>,
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
    /// Ancestors, parent first (alerts only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parent_chain: Vec<Ancestor>,
    /// sha256 of the executable: alerts only (absent on other events); `null` when it is
    /// not known, with `exe_sha256_unknown` saying why. Hashed off the decision path.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "double_option")]
    pub exe_sha256: Option<Option<String>>,
    /// Why an alert's `exe_sha256` is null (too large, not a regular file, process gone,
    /// not hashed in time, hash queue full).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe_sha256_unknown: Option<String>,
    /// systemd unit from the cgroup path (e.g. "ci-runner.service").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Container id (64 hex digits) from the cgroup path, where present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// The CI job this process belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<crate::proc::env::Job>,
    /// Static credentials in its environment at exec: names and fingerprints, never values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_credentials: Vec<crate::proc::env::EnvCredential>,
    /// Alerts only: why `job` and `env_credentials` are not this image's own (its
    /// environment was not read in time, or could not be read); they are then what the
    /// process inherited at fork, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_unknown: Option<String>,
    /// Why `ppid`, `exe` or `cmdline` are missing: the lineage records never showed this
    /// process (it ran before the daemon started, or its records were lost), so they are read
    /// from /proc off the main loop, and that read had not landed (alerts wait for it at
    /// most 200 ms) or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub facts_unknown: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Ancestor {
    pub pid: u32,
    pub exe: String,
}

/// (unit, container id) from a cgroup path such as
/// "/system.slice/docker-<64 hex>.scope" or "/kubepods/.../cri-containerd-<64 hex>.scope".
pub fn cgroup_facts(cgroup: &str) -> (Option<String>, Option<String>) {
    let mut unit = None;
    let mut container = None;
    for part in cgroup.split('/') {
        if part.ends_with(".service") || part.ends_with(".scope") {
            unit = Some(part.to_string());
        }
        let stem = part.trim_end_matches(".scope");
        let tail = stem.rsplit(['-', ':']).next().unwrap_or(stem);
        if tail.len() == 64 && tail.bytes().all(|b| b.is_ascii_hexdigit()) {
            container = Some(tail.to_string());
        }
    }
    (unit, container)
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
    /// The DNS name the address was learned from (a connect to an address the DNS stub
    /// answered), or the name asked (a `dns` event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// socket(2) arguments by name: family "AF_INET", type "SOCK_RAW", protocol "ICMP" (numbers
/// the agent has no name for read "AF_123", "SOCK_9", "123").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SocketRef {
    pub family: String,
    #[serde(rename = "type")]
    pub sock_type: String,
    pub protocol: String,
}

/// A Unix socket a process holding secrets named (`ipc` events).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IpcRef {
    /// "connect" or "sendto".
    pub op: String,
    /// The socket's path, or "@name" for an abstract socket.
    pub path: String,
    /// The process with a listening (or bound) socket of that name in the caller's network
    /// namespace, when found (by /proc, after the fact, off the decision path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<Ancestor>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GrantRef {
    pub id: String,
    pub intent: String,
    pub expires_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired_for_ms: Option<u64>,
}

/// A brokered credential, by its public identifier only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CredentialRef {
    /// `aws`.
    pub provider: String,
    pub access_key_id: String,
    pub expires_at: String,
    /// The role assumed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub role_arn: String,
}

/// RFC 3339 with nanoseconds, UTC.
pub fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// Joins argv for the `cmdline` field; arguments with spaces are quoted so the line reads back.
pub fn join_cmdline(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if a.is_empty() || a.contains(char::is_whitespace) {
                format!("{a:?}")
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `Option<Option<T>>` as absent / `null` / value (serde maps both absent and null to None
/// otherwise).
mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, T: Serialize>(
        v: &Option<Option<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(inner) => inner.serialize(s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}
