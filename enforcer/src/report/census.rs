//! Credential census over the stored event stream: per credential (secret name, or
//! `env:<NAME>` for a static key carried in a process's environment), which jobs and
//! executables used it, where the same processes (and their descendants) connected
//! afterwards, first/last seen, whether a grant ever covered it, and a least-privilege
//! `[[intent]]` proposal built only from what was observed.
//!
//! A *job* is taken from `process.job` {`id`, `name`, `source`} when the event carries it
//! (exec-derived: GITHUB_JOB, CI_JOB_ID, ...), else from the nearest ancestor seen with one,
//! else the process's cgroup path (`source = "cgroup"`).
use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::event::Event;

pub const SCHEMA: &str = "enforcer.census/v1";

/// A file-open event is stamped when the daemon reads it, a connect with the kernel's clock:
/// a connect made right after the open can carry an earlier time. Connects this much before
/// the recorded open still count as "afterwards".
pub const CLOCK_SLACK_MS: i64 = 2_000;

/// Shortest proposed max_ttl, whatever the observed jobs took.
pub const MIN_TTL_MINUTES: i64 = 5;

/// Depth limit of the parent walk (descendants of a holder).
const MAX_ANCESTRY: usize = 64;

/// Optional, exec-derived process fields read from the raw event (absent in older streams).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct JobInfo {
    #[serde(default)]
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct EnvCredential {
    pub name: String,
    #[serde(default)]
    pub fingerprint: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ExtraProcess {
    #[serde(default)]
    job: Option<JobInfo>,
    #[serde(default)]
    env_credentials: Vec<EnvCredential>,
}

#[derive(Debug, Default, Deserialize)]
struct ExtraDestination {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Extra {
    #[serde(default)]
    process: ExtraProcess,
    #[serde(default)]
    destination: Option<ExtraDestination>,
}

/// One stored event plus the optional fields the typed `Event` does not carry (yet).
#[derive(Debug, Clone)]
pub struct Record {
    pub event: Event,
    pub time: DateTime<Utc>,
    pub job: Option<JobInfo>,
    pub env_credentials: Vec<EnvCredential>,
    /// `destination.name`: the DNS name the daemon resolved the address from, where known.
    pub destination_name: Option<String>,
}

impl Record {
    /// From a stored line; None when its time does not parse.
    pub fn from_line(line: &str, event: &Event) -> Option<Record> {
        let time = DateTime::parse_from_rfc3339(&event.time).ok()?.with_timezone(&Utc);
        let extra: Extra = serde_json::from_str(line).unwrap_or_default();
        let job = extra.process.job.filter(|j| !j.id.is_empty());
        Some(Record {
            event: event.clone(),
            time,
            job,
            env_credentials: extra.process.env_credentials,
            destination_name: extra.destination.and_then(|d| d.name).filter(|n| !n.is_empty()),
        })
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Census {
    pub schema: &'static str,
    pub generated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    pub hosts: Vec<String>,
    pub events_read: u64,
    pub jobs: Vec<JobReport>,
    pub credentials: Vec<CredentialReport>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct JobReport {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub source: String,
    pub cgroups: Vec<String>,
    pub first_seen: String,
    pub last_seen: String,
    pub duration_seconds: f64,
    pub credentials: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DestinationUse {
    /// As a policy destination: `name:port` for an address the DNS stub answered for a name
    /// (`destination.name`), else `ip/32:port` or `[ip6/128]:port`.
    pub destination: String,
    pub ip: String,
    /// DNS names this address was reached by (from `destination.name`), where known.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    pub port: u16,
    pub protocol: String,
    pub connects: u64,
    pub executables: Vec<String>,
    pub first_seen: String,
    pub last_seen: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct JobRef {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub source: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CredentialReport {
    /// The secret's name, or `env:<NAME>` for an environment-variable static key.
    pub name: String,
    /// `file` or `env`.
    pub kind: String,
    pub paths: Vec<String>,
    /// Keyed fingerprints of env values (never the values).
    pub fingerprints: Vec<String>,
    pub jobs: Vec<JobRef>,
    pub executables: Vec<String>,
    pub uids: Vec<u32>,
    pub destinations: Vec<DestinationUse>,
    pub first_seen: String,
    pub last_seen: String,
    /// File opens, or processes that carried the env credential.
    pub uses: u64,
    pub verdicts: BTreeMap<String, u64>,
    /// True when at least one use was allowed under a grant.
    pub covered_by_grant: bool,
    pub uses_without_grant: u64,
    pub grant_intents: Vec<String>,
    /// Longest observed duration of a job that used it.
    pub longest_job_seconds: f64,
    pub proposal: Proposal,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Proposal {
    pub intent_name: String,
    /// The policy secret the intent covers (for env keys: a file-backed secret to move it to).
    pub secret_name: String,
    pub destinations: Vec<String>,
    pub max_ttl: String,
    /// `[[secret]]` stanza to add (env keys only: move the key out of the environment).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_toml: Option<String>,
    /// The `[[intent]]` stanza.
    pub intent_toml: String,
    /// The credential source that replaces the static credential.
    pub credential_source: super::source::CredentialSource,
}

#[derive(Default)]
struct CredAcc {
    kind: &'static str,
    paths: BTreeSet<String>,
    fingerprints: BTreeSet<String>,
    jobs: BTreeSet<JobKey>,
    exes: BTreeSet<String>,
    uids: BTreeSet<u32>,
    /// Keyed by (policy destination, protocol): a mapped IPv6 address merges with its IPv4 one.
    dests: BTreeMap<(String, String), DestAcc>,
    first: Option<DateTime<Utc>>,
    last: Option<DateTime<Utc>>,
    uses: u64,
    verdicts: BTreeMap<String, u64>,
    covered: bool,
    uncovered: u64,
    intents: BTreeSet<String>,
    counted_procs: BTreeSet<ProcKey>,
}

struct DestAcc {
    ip: String,
    names: BTreeSet<String>,
    port: u16,
    connects: u64,
    exes: BTreeSet<String>,
    first: DateTime<Utc>,
    last: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct JobKey {
    id: String,
    name: Option<String>,
    source: String,
}

type ProcKey = (String, u32); // (host, pid)

struct JobAcc {
    cgroups: BTreeSet<String>,
    first: DateTime<Utc>,
    last: DateTime<Utc>,
    creds: BTreeSet<String>,
}

fn touch(first: &mut Option<DateTime<Utc>>, last: &mut Option<DateTime<Utc>>, t: DateTime<Utc>) {
    if first.is_none_or(|f| t < f) {
        *first = Some(t);
    }
    if last.is_none_or(|l| t > l) {
        *last = Some(t);
    }
}

/// Kinds about the agent itself, not about a job's processes.
fn is_agent_kind(kind: &str) -> bool {
    kind.starts_with("agent_")
        || kind.starts_with("policy_")
        || kind == "events_lost"
        || kind.starts_with("grant_")
}

/// Builds the census from records (any order). `since` is only echoed into the report.
pub fn build(mut records: Vec<Record>, since: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Census {
    records.sort_by_key(|r| r.time);
    let events_read = records.len() as u64;
    let records: Vec<Record> = records
        .into_iter()
        .filter(|r| !is_agent_kind(&r.event.kind) && r.event.process.pid != 0)
        .collect();
    let hosts: BTreeSet<String> = records.iter().map(|r| r.event.host.clone()).collect();

    // Pass 1: the process tree, each process's own job, and what each process holds since when.
    let mut parent: HashMap<ProcKey, ProcKey> = HashMap::new();
    let mut own_job: HashMap<ProcKey, JobInfo> = HashMap::new();
    let mut cgroup_of: HashMap<ProcKey, String> = HashMap::new();
    for r in &records {
        let p = &r.event.process;
        let key = (r.event.host.clone(), p.pid);
        if p.ppid != 0 && p.ppid != p.pid {
            parent.insert(key.clone(), (r.event.host.clone(), p.ppid));
        }
        if let Some(j) = &r.job {
            own_job.entry(key.clone()).or_insert_with(|| j.clone());
        }
        if !p.cgroup.is_empty() {
            cgroup_of.entry(key).or_insert_with(|| p.cgroup.clone());
        }
    }
    let ancestry = |key: &ProcKey| -> Vec<ProcKey> {
        let mut out = vec![key.clone()];
        let mut cur = key.clone();
        while let Some(p) = parent.get(&cur) {
            if out.len() >= MAX_ANCESTRY || out.contains(p) {
                break;
            }
            out.push(p.clone());
            cur = p.clone();
        }
        out
    };
    let job_of = |key: &ProcKey, cgroup: &str| -> JobKey {
        for a in ancestry(key) {
            if let Some(j) = own_job.get(&a) {
                return JobKey {
                    id: j.id.clone(),
                    name: j.name.clone(),
                    source: j.source.clone().unwrap_or_else(|| "job".into()),
                };
            }
        }
        let cg = if cgroup.is_empty() {
            cgroup_of.get(key).cloned().unwrap_or_else(|| "/".into())
        } else {
            cgroup.to_string()
        };
        JobKey { id: cg, name: None, source: "cgroup".into() }
    };

    let mut creds: BTreeMap<String, CredAcc> = BTreeMap::new();
    let mut jobs: BTreeMap<JobKey, JobAcc> = BTreeMap::new();
    // (host, pid) -> credential -> held since (None: from exec, the environment).
    let mut holdings: HashMap<ProcKey, BTreeMap<String, Option<DateTime<Utc>>>> = HashMap::new();
    // job -> credential file -> first read in the job: a file's content can reach any
    // process of the job (a shell variable, a config the next step reads), so the job's
    // later connects count too, not only the reader's subtree.
    let mut job_reads: HashMap<JobKey, BTreeMap<String, DateTime<Utc>>> = HashMap::new();

    for r in &records {
        let e = &r.event;
        let key = (e.host.clone(), e.process.pid);
        let job = job_of(&key, &e.process.cgroup);
        let ja = jobs.entry(job.clone()).or_insert_with(|| JobAcc {
            cgroups: BTreeSet::new(),
            first: r.time,
            last: r.time,
            creds: BTreeSet::new(),
        });
        if !e.process.cgroup.is_empty() {
            ja.cgroups.insert(e.process.cgroup.clone());
        }
        ja.first = ja.first.min(r.time);
        ja.last = ja.last.max(r.time);

        for env in &r.env_credentials {
            let name = format!("env:{}", env.name);
            let acc = creds
                .entry(name.clone())
                .or_insert_with(|| CredAcc { kind: "env", ..Default::default() });
            if let Some(f) = &env.fingerprint {
                acc.fingerprints.insert(f.clone());
            }
            holdings.entry(key.clone()).or_default().insert(name.clone(), None);
            if acc.counted_procs.insert(key.clone()) {
                acc.uses += 1;
                acc.uncovered += 1;
                *acc.verdicts.entry("no_grant".into()).or_default() += 1;
            }
            record_use(acc, &job, e, r.time);
            ja.creds.insert(name);
        }

        if e.kind == "file_open"
            && let Some(f) = e.file.as_ref().filter(|f| !f.secret.is_empty())
        {
            let acc = creds
                .entry(f.secret.clone())
                .or_insert_with(|| CredAcc { kind: "file", ..Default::default() });
            acc.paths.insert(f.path.clone());
            acc.uses += 1;
            *acc.verdicts.entry(e.verdict.clone()).or_default() += 1;
            match (&e.grant, e.verdict.as_str()) {
                (Some(g), "allowed") => {
                    acc.covered = true;
                    acc.intents.insert(g.intent.clone());
                }
                _ => acc.uncovered += 1,
            }
            record_use(acc, &job, e, r.time);
            ja.creds.insert(f.secret.clone());
            if !is_whole_host(&job) {
                let first = job_reads
                    .entry(job.clone())
                    .or_default()
                    .entry(f.secret.clone())
                    .or_insert(r.time);
                *first = (*first).min(r.time);
            }
            let since = holdings
                .entry(key.clone())
                .or_default()
                .entry(f.secret.clone())
                .or_insert(Some(r.time));
            if let Some(s) = since {
                *s = (*s).min(r.time);
            }
        }
    }

    // Pass 2: connects, attributed to every credential held by the connecting process or an ancestor.
    let slack = chrono::Duration::milliseconds(CLOCK_SLACK_MS);
    for r in records.iter().filter(|r| r.event.kind == "connect") {
        let e = &r.event;
        let Some(d) = &e.destination else { continue };
        let key = (e.host.clone(), e.process.pid);
        // Credentials this connect is attributed to: held by the process or an ancestor,
        // or read earlier by any process of its job.
        let mut seen = BTreeSet::new();
        for a in ancestry(&key) {
            let Some(held) = holdings.get(&a) else { continue };
            for (cred, since) in held {
                if since.is_none_or(|s| r.time >= s - slack) {
                    seen.insert(cred.clone());
                }
            }
        }
        if let Some(reads) = job_reads.get(&job_of(&key, &e.process.cgroup)) {
            for (cred, first) in reads {
                if r.time >= *first - slack {
                    seen.insert(cred.clone());
                }
            }
        }
        for cred in seen {
            let acc = creds.get_mut(&cred).expect("held credential has an accumulator");
            let da = acc
                .dests
                // An address learned from a name is reported (and proposed) by that name:
                // the addresses behind a name change.
                .entry((
                    match &r.destination_name {
                        Some(name) => format!("{name}:{}", d.port),
                        None => policy_destination(&d.ip, d.port),
                    },
                    d.protocol.clone(),
                ))
                .or_insert_with(|| DestAcc {
                    ip: canonical_ip(&d.ip),
                    names: BTreeSet::new(),
                    port: d.port,
                    connects: 0,
                    exes: BTreeSet::new(),
                    first: r.time,
                    last: r.time,
                });
            da.connects += 1;
            if let Some(n) = &r.destination_name {
                da.names.insert(n.clone());
            }
            if !e.process.exe.is_empty() {
                da.exes.insert(e.process.exe.clone());
            }
            da.first = da.first.min(r.time);
            da.last = da.last.max(r.time);
        }
    }

    let job_reports: Vec<JobReport> = jobs
        .iter()
        .map(|(k, a)| JobReport {
            id: k.id.clone(),
            name: k.name.clone(),
            source: k.source.clone(),
            cgroups: a.cgroups.iter().cloned().collect(),
            first_seen: crate::event::rfc3339(a.first),
            last_seen: crate::event::rfc3339(a.last),
            duration_seconds: secs(a.last - a.first),
            credentials: a.creds.iter().cloned().collect(),
        })
        .collect();

    let credentials = creds
        .into_iter()
        .map(|(name, a)| {
            let longest = a
                .jobs
                .iter()
                .filter_map(|j| jobs.get(j))
                .map(|j| secs(j.last - j.first))
                .fold(0.0, f64::max);
            let destinations: Vec<DestinationUse> = a
                .dests
                .iter()
                .map(|((dest, proto), d)| DestinationUse {
                    destination: dest.clone(),
                    ip: d.ip.clone(),
                    names: d.names.iter().cloned().collect(),
                    port: d.port,
                    protocol: proto.clone(),
                    connects: d.connects,
                    executables: d.exes.iter().cloned().collect(),
                    first_seen: crate::event::rfc3339(d.first),
                    last_seen: crate::event::rfc3339(d.last),
                })
                .collect();
            let exes: Vec<String> = a.exes.iter().cloned().collect();
            let uids: Vec<u32> = a.uids.iter().copied().collect();
            let proposal =
                propose(&name, a.kind, &destinations, &exes, &uids, longest, a.jobs.len());
            CredentialReport {
                kind: a.kind.to_string(),
                paths: a.paths.into_iter().collect(),
                fingerprints: a.fingerprints.into_iter().collect(),
                jobs: a
                    .jobs
                    .iter()
                    .map(|j| JobRef {
                        id: j.id.clone(),
                        name: j.name.clone(),
                        source: j.source.clone(),
                    })
                    .collect(),
                executables: exes,
                uids,
                destinations,
                first_seen: a.first.map(crate::event::rfc3339).unwrap_or_default(),
                last_seen: a.last.map(crate::event::rfc3339).unwrap_or_default(),
                uses: a.uses,
                verdicts: a.verdicts,
                covered_by_grant: a.covered,
                uses_without_grant: a.uncovered,
                grant_intents: a.intents.into_iter().collect(),
                longest_job_seconds: longest,
                proposal,
                name,
            }
        })
        .collect();

    Census {
        schema: SCHEMA,
        generated_at: crate::event::rfc3339(now),
        since: since.map(crate::event::rfc3339),
        hosts: hosts.into_iter().collect(),
        events_read,
        jobs: job_reports,
        credentials,
    }
}

/// A job known only by the root cgroup is the whole host, not a job.
fn is_whole_host(job: &JobKey) -> bool {
    job.source == "cgroup" && (job.id == "/" || job.id.is_empty())
}

fn record_use(acc: &mut CredAcc, job: &JobKey, e: &Event, t: DateTime<Utc>) {
    acc.jobs.insert(job.clone());
    if !e.process.exe.is_empty() {
        acc.exes.insert(e.process.exe.clone());
    }
    acc.uids.insert(e.process.uid);
    touch(&mut acc.first, &mut acc.last, t);
}

fn secs(d: chrono::Duration) -> f64 {
    d.num_milliseconds().max(0) as f64 / 1000.0
}

/// The address as written in reports: IPv4-mapped IPv6 as IPv4.
fn canonical_ip(ip: &str) -> String {
    match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) => {
            v6.to_ipv4_mapped().map(|v4| v4.to_string()).unwrap_or_else(|| v6.to_string())
        }
        Ok(a) => a.to_string(),
        Err(_) => ip.to_string(),
    }
}

/// `ip/32:port`, `[ip6/128]:port`; IPv4-mapped IPv6 addresses are written as IPv4.
pub fn policy_destination(ip: &str, port: u16) -> String {
    match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(v4)) => format!("{v4}/32:{port}"),
        Ok(std::net::IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("{v4}/32:{port}"),
            None => format!("[{v6}/128]:{port}"),
        },
        Err(_) => format!("{ip}:{port}"),
    }
}

/// Lowercase letters, digits and dashes, for intent and secret names.
pub fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    out.trim_end_matches('-').to_string()
}

/// max_ttl: the longest observed job, ceiled to whole minutes, at least MIN_TTL_MINUTES.
pub fn ttl_minutes(longest_job_seconds: f64) -> i64 {
    ((longest_job_seconds / 60.0).ceil() as i64).max(MIN_TTL_MINUTES)
}

/// A TOML basic string: `"` and `\` escaped, every control character (TOML allows none in
/// a basic string, DEL included) as `\b \t \n \f \r` or `\uXXXX`. Whatever an
/// attacker puts in a name stays inside the string: it cannot end it, the line, or open a table.
pub fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A name as a file name under /etc/enforcer/secrets: no separators, no dot-dot, no controls.
pub(crate) fn file_safe(s: &str) -> String {
    let out: String = s
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' })
        .collect();
    if out.trim_matches('_').is_empty() { "env".into() } else { out }
}

fn propose(
    name: &str,
    kind: &str,
    dests: &[DestinationUse],
    exes: &[String],
    uids: &[u32],
    longest: f64,
    njobs: usize,
) -> Proposal {
    let (secret_name, secret_toml) = match name.strip_prefix("env:") {
        Some(var) => {
            let s = format!("env-{}", slug(var));
            let toml = format!(
                "# {} is a static key in the job environment: move it into a file only the\n\
                 # agent-checked processes read, and let grants scope it.\n\
                 [[secret]]\nname = {}\nkind = \"token\"\npaths = [{}]\n",
                toml_str(var),
                toml_str(&s),
                toml_str(&format!("/etc/enforcer/secrets/{}", file_safe(var)))
            );
            (s, Some(toml))
        }
        None => (name.to_string(), None),
    };
    let intent_name = format!("{}-least-privilege", slug(&secret_name));
    let credential_source = super::source::propose(name, kind, &secret_name, &intent_name, dests);
    let destinations: Vec<String> = {
        let set: BTreeSet<String> = dests.iter().map(|d| d.destination.clone()).collect();
        set.into_iter().collect()
    };
    let mut agents: Vec<String> =
        exes.iter().map(|e| format!("{{ exe = {} }}", toml_str(e))).collect();
    if agents.is_empty() {
        agents = uids.iter().map(|u| format!("{{ uid = {u} }}")).collect();
    }
    let ttl = ttl_minutes(longest);
    let intent_toml = format!(
        "# Proposed by `enforcer report census` ({} credential {}, {njobs} job(s)): only the\n\
         # destinations actually used, a TTL from the longest observed job ({longest:.0} s).\n\
         [[intent]]\nname = {}\nagents = [{}]\nsecrets = [{}]\ndestinations = [{}]\nmax_ttl = \"{ttl}m\"\ndefault_ttl = \"{ttl}m\"\non_violation = \"alert\"\n",
        toml_str(kind),
        toml_str(name),
        toml_str(&intent_name),
        agents.join(", "),
        toml_str(&secret_name),
        destinations.iter().map(|d| toml_str(d)).collect::<Vec<_>>().join(", "),
    );
    Proposal {
        intent_name,
        secret_name,
        destinations,
        max_ttl: format!("{ttl}m"),
        secret_toml,
        intent_toml,
        credential_source,
    }
}
