//! What a process carries in its environment, read once at exec: the CI job it belongs to
//! (GitHub Actions, GitLab CI, or ENFORCER_JOB_ID) and static credentials, reported by name
//! and a keyed fingerprint only. Values never leave this function.
use std::io::Read;
use std::path::Path;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Environments larger than this are read only this far.
const MAX_ENVIRON: u64 = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Which variable named it (GITHUB_JOB, CI_JOB_ID, ENFORCER_JOB_ID).
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EnvCredential {
    pub name: String,
    /// HMAC-SHA256 of the value under the host's fingerprint key, first 16 hex digits:
    /// the same key on the same host gives the same fingerprint, and the value cannot be
    /// recovered from it.
    pub fingerprint: String,
}

#[derive(Debug, Clone, Default)]
pub struct EnvInfo {
    pub job: Option<Job>,
    pub credentials: Vec<EnvCredential>,
}

/// Variable names that hold credentials by convention.
fn is_credential(name: &str) -> bool {
    const EXACT: [&str; 12] = [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "GITHUB_TOKEN",
        "GH_TOKEN",
        "GITLAB_TOKEN",
        "NPM_TOKEN",
        "VAULT_TOKEN",
        "AZURE_CLIENT_SECRET",
        "DOCKER_PASSWORD",
        "OPENAI_API_KEY",
        "ANTHROPIC_API_KEY",
    ];
    const SUFFIXES: [&str; 9] = [
        "_TOKEN",
        "_SECRET",
        "_SECRET_KEY",
        "_PASSWORD",
        "_PASSWD",
        "_API_KEY",
        "_ACCESS_KEY",
        "_PRIVATE_KEY",
        "_CREDENTIALS",
    ];
    // CI systems' own per-job tokens are short-lived by design: not legacy static keys.
    const IGNORE: [&str; 3] =
        ["CI_JOB_TOKEN", "ACTIONS_RUNTIME_TOKEN", "ACTIONS_ID_TOKEN_REQUEST_TOKEN"];
    let upper = name.to_ascii_uppercase();
    !IGNORE.contains(&upper.as_str())
        && (EXACT.contains(&upper.as_str()) || SUFFIXES.iter().any(|s| upper.ends_with(s)))
}

/// Reads /proc/<pid>/environ; None when the process is gone or unreadable.
pub fn read(pid: u32, key: &[u8]) -> Option<EnvInfo> {
    read_path(Path::new(&format!("/proc/{pid}/environ")), key).ok()
}

/// Reads an environ file (at most `MAX_ENVIRON` bytes of it).
pub fn read_path(path: &Path, key: &[u8]) -> std::io::Result<EnvInfo> {
    let mut buf = Vec::new();
    std::fs::File::open(path)?.take(MAX_ENVIRON).read_to_end(&mut buf)?;
    Ok(parse(&buf, key))
}

pub fn parse(environ: &[u8], key: &[u8]) -> EnvInfo {
    let mut vars = std::collections::HashMap::new();
    for kv in environ.split(|b| *b == 0) {
        let Some(eq) = kv.iter().position(|b| *b == b'=') else { continue };
        let name = String::from_utf8_lossy(&kv[..eq]).into_owned();
        vars.insert(name, &kv[eq + 1..]);
    }
    let get = |n: &str| {
        vars.get(n).map(|v| String::from_utf8_lossy(v).into_owned()).filter(|v| !v.is_empty())
    };
    let job = if let Some(id) = get("ENFORCER_JOB_ID") {
        Some(Job { id, name: get("ENFORCER_JOB_NAME"), source: "ENFORCER_JOB_ID".into() })
    } else if let (Some(run), Some(job)) = (get("GITHUB_RUN_ID"), get("GITHUB_JOB")) {
        Some(Job {
            id: format!("{run}/{job}/{}", get("GITHUB_RUN_ATTEMPT").unwrap_or_else(|| "1".into())),
            name: Some(job),
            source: "GITHUB_JOB".into(),
        })
    } else {
        get("CI_JOB_ID").map(|id| Job { id, name: get("CI_JOB_NAME"), source: "CI_JOB_ID".into() })
    };
    let mut credentials: Vec<EnvCredential> = vars
        .iter()
        .filter(|(n, v)| !v.is_empty() && is_credential(n))
        .map(|(n, v)| EnvCredential { name: n.clone(), fingerprint: fingerprint(key, v) })
        .collect();
    credentials.sort_by(|a, b| a.name.cmp(&b.name));
    EnvInfo { job, credentials }
}

fn fingerprint(key: &[u8], value: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(value);
    hex::encode(&mac.finalize().into_bytes()[..8])
}

/// The host's fingerprint key (32 random bytes, 0600), created on first use.
pub fn load_key(state_dir: &Path) -> anyhow::Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.join("fingerprint.key");
    if let Ok(k) = std::fs::read(&path)
        && k.len() == 32
    {
        return Ok(k);
    }
    let mut k = vec![0u8; 32];
    getrandom::fill(&mut k).map_err(|e| anyhow::anyhow!("randomness: {e}"))?;
    let tmp = state_dir.join("fingerprint.key.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    std::io::Write::write_all(&mut f, &k)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_jobs_and_credentials_without_values() {
        let env = b"PATH=/bin\0AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI\0DEPLOY_API_KEY=abc\0EMPTY_TOKEN=\0CI_JOB_TOKEN=x\0GITHUB_RUN_ID=77\0GITHUB_JOB=deploy\0HOME=/root\0";
        let info = parse(env, b"k");
        assert_eq!(
            info.job,
            Some(Job {
                id: "77/deploy/1".into(),
                name: Some("deploy".into()),
                source: "GITHUB_JOB".into()
            })
        );
        let names: Vec<&str> = info.credentials.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["AWS_SECRET_ACCESS_KEY", "DEPLOY_API_KEY"]);
        let debug = format!("{info:?}");
        assert!(
            !debug.contains("wJalrXUtnFEMI") && !debug.contains("abc\""),
            "a value leaked: {debug}"
        );
        // Same value, same key: same fingerprint; other key: different.
        assert_eq!(parse(env, b"k").credentials, info.credentials);
        assert_ne!(
            parse(env, b"other").credentials[0].fingerprint,
            info.credentials[0].fingerprint
        );
        assert_eq!(info.credentials[0].fingerprint.len(), 16);
    }

    #[test]
    fn gitlab_and_explicit_jobs() {
        let g = parse(b"CI_JOB_ID=991\0CI_JOB_NAME=build\0", b"k");
        assert_eq!(g.job.unwrap().source, "CI_JOB_ID");
        let e = parse(b"ENFORCER_JOB_ID=j1\0CI_JOB_ID=5\0", b"k");
        assert_eq!(e.job.unwrap().id, "j1");
        assert!(parse(b"PATH=/bin\0", b"k").job.is_none());
    }
}
