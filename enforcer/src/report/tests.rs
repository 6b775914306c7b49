//! Census over a synthetic event stream: two jobs (one by `process.job`, one by cgroup
//! only), a file secret with a descendant connecting, an env key, a granted use.
use std::io::Write;

use chrono::{TimeZone, Utc};
use serde_json::{Value, json};

use super::census::{self, policy_destination, slug, ttl_minutes};
use super::{census_from_store, render};

fn ev(t: i64, kind: &str, pid: u32, ppid: u32, exe: &str, cgroup: &str, extra: Value) -> String {
    let time = crate::event::rfc3339(Utc.timestamp_opt(1_800_000_000 + t, 0).unwrap());
    let mut v = json!({
        "schema": "enforcer.event/v1", "id": format!("x-{t}-{pid}"), "time": time, "host": "runner-1",
        "kind": kind, "verdict": "no_grant", "action": "alerted", "mode": "monitor",
        "process": { "pid": pid, "ppid": ppid, "uid": 1001, "exe": exe, "cmdline": exe, "cgroup": cgroup },
        "decision_path": [], "mitre": [], "severity": "medium"
    });
    merge(&mut v, extra);
    v.to_string()
}

fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

fn file(secret: &str, path: &str) -> Value {
    json!({ "file": { "path": path, "dev": 1, "ino": 2, "secret": secret } })
}

fn dest(ip: &str, port: u16) -> Value {
    json!({ "destination": { "ip": ip, "port": port, "protocol": "tcp" } })
}

fn stream() -> Vec<String> {
    let job_a =
        json!({ "process": { "job": { "id": "4711", "name": "deploy", "source": "GITHUB_JOB" } } });
    let env_b = json!({ "process": { "env_credentials": [{ "name": "AWS_SECRET_ACCESS_KEY", "fingerprint": "hmac-sha256:abcd" }] } });
    let mut a_open = file("aws-credentials", "/home/runner/.aws/credentials");
    merge(&mut a_open, job_a.clone());
    let mut b_connect = dest("10.0.0.9", 443);
    merge(&mut b_connect, env_b.clone());
    vec![
        ev(
            0,
            "agent_started",
            1,
            0,
            "/usr/bin/enforcer",
            "/system.slice/enforcer.service",
            json!({"verdict": "allowed", "action": "allowed"}),
        ),
        // job A (GITHUB_JOB): python opens the broad credential file, connects twice to one
        // destination and once to another, then a child (curl) connects to a third.
        ev(10, "connect", 100, 1, "/usr/bin/python3", "/ci/job-a", dest("198.51.100.1", 80)), // before the open: not attributed
        ev(20, "file_open", 100, 1, "/usr/bin/python3", "/ci/job-a", a_open),
        ev(21, "connect", 100, 1, "/usr/bin/python3", "/ci/job-a", dest("127.0.0.1", 8443)),
        ev(22, "connect", 100, 1, "/usr/bin/python3", "/ci/job-a", dest("127.0.0.1", 8443)),
        ev(23, "connect", 101, 100, "/usr/bin/curl", "/ci/job-a", dest("::ffff:127.0.0.2", 9000)),
        ev(400, "connect", 102, 100, "/usr/bin/curl", "/ci/job-a", dest("2001:db8::1", 443)),
        // job B (cgroup only): a process carrying an env key connects.
        ev(30, "connect", 200, 1, "/usr/bin/aws", "/ci/job-b", b_connect),
        ev(40, "connect", 200, 1, "/usr/bin/aws", "/ci/job-b", dest("10.0.0.9", 443)),
        // unrelated process in job B, no credential: its connect is not attributed.
        ev(41, "connect", 201, 1, "/usr/bin/wget", "/ci/job-b", dest("192.0.2.77", 80)),
        // a granted use of another secret
        ev(
            50,
            "file_open",
            300,
            1,
            "/usr/local/bin/deploy",
            "/ci/job-c",
            json!({ "verdict": "allowed", "action": "allowed", "file": { "path": "/etc/ci/deploy-key.json", "dev": 1, "ino": 3, "secret": "deploy-key" },
                   "grant": { "id": "g1", "intent": "deploy", "expires_at": "2030-01-01T00:00:00Z" } }),
        ),
    ]
}

/// A private directory removed on drop (no tempfile dev-dependency in this crate).
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write_store(lines: &[String]) -> TempDir {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = TempDir(
        std::env::temp_dir().join(format!("enforcer-census-unit-{}-{n}", std::process::id())),
    );
    let _ = std::fs::remove_dir_all(dir.path());
    std::fs::create_dir_all(dir.path()).unwrap();
    let mut f = std::fs::File::create(dir.path().join(crate::store::FILE_NAME)).unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
    dir
}

fn census() -> census::Census {
    let dir = write_store(&stream());
    census_from_store(dir.path(), None).unwrap()
}

fn cred<'a>(c: &'a census::Census, name: &str) -> &'a census::CredentialReport {
    c.credentials
        .iter()
        .find(|x| x.name == name)
        .unwrap_or_else(|| panic!("no {name} in {:#?}", c.credentials))
}

#[test]
fn file_secret_jobs_exes_and_destinations_after_the_open() {
    let c = census();
    let aws = cred(&c, "aws-credentials");
    assert_eq!(aws.kind, "file");
    assert_eq!(aws.paths, ["/home/runner/.aws/credentials"]);
    assert_eq!(aws.jobs.len(), 1);
    assert_eq!(aws.jobs[0].id, "4711");
    assert_eq!(aws.jobs[0].name.as_deref(), Some("deploy"));
    assert_eq!(aws.jobs[0].source, "GITHUB_JOB");
    assert_eq!(aws.executables, ["/usr/bin/python3"]);
    let d: Vec<&str> = aws.destinations.iter().map(|d| d.destination.as_str()).collect();
    // The connect before the open is not counted; descendants' are (mapped IPv6 as IPv4).
    assert_eq!(d, ["127.0.0.1/32:8443", "127.0.0.2/32:9000", "[2001:db8::1/128]:443"]);
    assert_eq!(aws.destinations[0].connects, 2);
    assert_eq!(aws.destinations[1].executables, ["/usr/bin/curl"]);
    assert!(!aws.covered_by_grant);
    assert_eq!(aws.uses, 1);
    assert_eq!(aws.uses_without_grant, 1);
    assert_eq!(aws.first_seen, aws.last_seen);
    // Job A ran from t=10 to t=400: 390 s -> 7 minutes.
    assert_eq!(aws.longest_job_seconds, 390.0);
    assert_eq!(aws.proposal.max_ttl, "7m");
    assert_eq!(aws.proposal.destinations, d);
}

#[test]
fn env_key_attributed_by_cgroup_job() {
    let c = census();
    let env = cred(&c, "env:AWS_SECRET_ACCESS_KEY");
    assert_eq!(env.kind, "env");
    assert_eq!(env.fingerprints, ["hmac-sha256:abcd"]);
    assert_eq!(env.jobs.len(), 1);
    assert_eq!(env.jobs[0].id, "/ci/job-b");
    assert_eq!(env.jobs[0].source, "cgroup");
    assert_eq!(env.executables, ["/usr/bin/aws"]);
    let d: Vec<&str> = env.destinations.iter().map(|d| d.destination.as_str()).collect();
    assert_eq!(d, ["10.0.0.9/32:443"]);
    assert_eq!(env.destinations[0].connects, 2);
    assert_eq!(env.uses, 1);
    assert_eq!(env.proposal.max_ttl, "5m");
    assert_eq!(env.proposal.secret_name, "env-aws-secret-access-key");
    assert!(
        env.proposal
            .secret_toml
            .as_deref()
            .unwrap()
            .contains("/etc/enforcer/secrets/AWS_SECRET_ACCESS_KEY")
    );
}

#[test]
fn granted_use_is_covered_and_agent_events_are_not_jobs() {
    let c = census();
    let dk = cred(&c, "deploy-key");
    assert!(dk.covered_by_grant);
    assert_eq!(dk.grant_intents, ["deploy"]);
    assert_eq!(dk.uses_without_grant, 0);
    assert!(dk.destinations.is_empty());
    assert_eq!(c.credentials.len(), 3);
    assert!(c.jobs.iter().all(|j| j.id != "/system.slice/enforcer.service"), "{:#?}", c.jobs);
    assert_eq!(c.hosts, ["runner-1"]);
    assert_eq!(c.events_read, 11);
}

#[test]
fn proposals_are_valid_policy() {
    let c = census();
    let mut text = String::from("mode = \"monitor\"\n");
    for cr in &c.credentials {
        if cr.proposal.secret_toml.is_none() {
            text.push_str(&format!(
                "[[secret]]\nname = \"{}\"\npaths = [\"/tmp/{}\"]\n",
                cr.name, cr.name
            ));
        }
    }
    for cr in &c.credentials {
        if let Some(s) = &cr.proposal.secret_toml {
            text.push_str(s);
        }
        text.push_str(&cr.proposal.intent_toml);
    }
    let cfg =
        crate::policy::load_str("proposal.toml", &text).unwrap_or_else(|d| panic!("{d}\n{text}"));
    assert_eq!(cfg.intents.len(), 3);
    let aws = cfg.intents.iter().find(|i| i.name == "aws-credentials-least-privilege").unwrap();
    assert_eq!(aws.destinations.len(), 3);
}

#[test]
fn since_filters_and_missing_fields_fall_back() {
    let dir = write_store(&stream());
    let since = Utc.timestamp_opt(1_800_000_000 + 35, 0).unwrap();
    let c = census_from_store(dir.path(), Some(since)).unwrap();
    // Only t >= 35: the env carrier's first event (t=30) and the aws open (t=20) are gone.
    assert!(c.credentials.iter().all(|x| x.name == "deploy-key"), "{:#?}", c.credentials);
    assert!(c.since.is_some());
}

#[test]
fn clock_slack_lets_a_kernel_stamped_connect_precede_the_open_stamp() {
    let lines = vec![
        ev(100, "file_open", 7, 1, "/bin/sh", "/j", file("s", "/s")),
        ev(99, "connect", 7, 1, "/bin/sh", "/j", dest("127.0.0.1", 1)), // 1 s earlier: within slack
        ev(90, "connect", 7, 1, "/bin/sh", "/j", dest("127.0.0.1", 2)), // 10 s earlier: not
    ];
    let dir = write_store(&lines);
    let c = census_from_store(dir.path(), None).unwrap();
    let d: Vec<&str> =
        c.credentials[0].destinations.iter().map(|d| d.destination.as_str()).collect();
    assert_eq!(d, ["127.0.0.1/32:1"]);
}

#[test]
fn renderings() {
    let c = census();
    let j: Value = serde_json::from_str(&render::json(&c)).unwrap();
    assert_eq!(j["schema"], "enforcer.census/v1");
    let md = render::markdown(&c);
    assert!(md.contains("## `env:AWS_SECRET_ACCESS_KEY`"));
    assert!(md.contains("```toml\n"));
    let s: Value = serde_json::from_str(&render::sarif(&c)).unwrap();
    assert_eq!(s["version"], "2.1.0");
    let results = s["runs"][0]["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    let rules: Vec<&str> = results.iter().map(|r| r["ruleId"].as_str().unwrap()).collect();
    assert_eq!(rules, ["ENF001", "ENF003", "ENF002"]);
    for r in results {
        let idx = r["ruleIndex"].as_u64().unwrap() as usize;
        assert_eq!(s["runs"][0]["tool"]["driver"]["rules"][idx]["id"], r["ruleId"]);
        assert!(
            r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
                .as_str()
                .unwrap()
                .starts_with("file:///")
        );
    }
}

#[test]
fn helpers() {
    assert_eq!(policy_destination("10.1.2.3", 443), "10.1.2.3/32:443");
    assert_eq!(policy_destination("::1", 80), "[::1/128]:80");
    assert_eq!(policy_destination("::ffff:10.0.0.1", 80), "10.0.0.1/32:80");
    assert_eq!(slug("AWS_SECRET__KEY!"), "aws-secret-key");
    assert_eq!(ttl_minutes(0.0), 5);
    assert_eq!(ttl_minutes(301.0), 6);
    assert_eq!(ttl_minutes(3600.0), 60);
}

/// Names an attacker controls (environment variable names, job names, exe paths, secret
/// names) with newlines, quotes, table headers, pipes, backticks and control characters.
const EVIL: &[&str] = &[
    "EVIL\n[[intent]]\nname = \"pwned\"\nagents = [{ uid = 0 }]\n#",
    "Q\"UOTE]]\\\"\n[secret]",
    "PIPE|`code`*_[x](y)<b>&amp;",
    "CTRL\u{0}\u{1b}\u{7f}\r\t\u{85}",
    "LS\u{2028}PS\u{2029}",
    "``` \n# heading\n```",
];

fn evil_census() -> census::Census {
    let mut lines = Vec::new();
    for (i, name) in EVIL.iter().enumerate() {
        let pid = 500 + i as u32;
        let extra = json!({ "process": {
            "env_credentials": [{ "name": name, "fingerprint": "00" }],
            "job": { "id": format!("{i}|`x`\n"), "name": name, "source": "ENFORCER_JOB_ID" }
        } });
        lines.push(ev(i as i64, "connect", pid, 1, &format!("/tmp/{name}"), "/evil", extra));
        let mut d = dest("10.9.9.9", 443);
        merge(
            &mut d,
            json!({ "process": { "job": { "id": format!("{i}|`x`\n"), "name": name, "source": "ENFORCER_JOB_ID" } } }),
        );
        lines.push(ev(i as i64 + 1, "connect", pid, 1, &format!("/tmp/{name}"), "/evil", d));
        // A file secret with a hostile name too (the event stream is only as trusted as
        // whoever could write it).
        lines.push(ev(
            i as i64 + 2,
            "file_open",
            pid,
            1,
            &format!("/tmp/{name}"),
            "/evil",
            file(&format!("file{name}"), &format!("/x/{name}")),
        ));
    }
    let dir = write_store(&lines);
    census_from_store(dir.path(), None).unwrap()
}

#[test]
fn hostile_names_stay_inside_toml_strings() {
    let c = evil_census();
    assert_eq!(c.credentials.len(), 2 * EVIL.len(), "{:#?}", c.credentials);
    for cr in &c.credentials {
        let mut text = cr.proposal.secret_toml.clone().unwrap_or_default();
        text.push('\n');
        text.push_str(&cr.proposal.intent_toml);
        let doc: toml::Table =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n--- proposal:\n{text}"));
        let env = cr.name.starts_with("env:");
        let want: Vec<&str> = if env { vec!["intent", "secret"] } else { vec!["intent"] };
        assert_eq!(doc.keys().map(String::as_str).collect::<Vec<_>>(), want, "{text}");
        let intents = doc["intent"].as_array().unwrap();
        assert_eq!(intents.len(), 1, "{text}");
        let intent = intents[0].as_table().unwrap();
        let mut keys: Vec<&str> = intent.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            ["agents", "default_ttl", "destinations", "max_ttl", "name", "on_violation", "secrets"]
        );
        assert_eq!(intent["name"].as_str().unwrap(), cr.proposal.intent_name);
        assert_eq!(intent["secrets"][0].as_str().unwrap(), cr.proposal.secret_name);
        assert_eq!(intent["on_violation"].as_str(), Some("alert"));
        // The exe path (attacker-named) round-trips exactly.
        let exe = intent["agents"][0]["exe"].as_str().unwrap();
        assert!(EVIL.iter().any(|n| exe == format!("/tmp/{n}")), "{exe:?}");
        if env {
            let secrets = doc["secret"].as_array().unwrap();
            assert_eq!(secrets.len(), 1);
            let s = secrets[0].as_table().unwrap();
            assert_eq!(s["name"].as_str().unwrap(), cr.proposal.secret_name);
            let path = s["paths"][0].as_str().unwrap();
            let file = path.strip_prefix("/etc/enforcer/secrets/").unwrap();
            assert!(
                file.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                "{path:?}"
            );
        } else {
            // A file secret keeps its (hostile) name exactly, as a string.
            assert!(EVIL.iter().any(|n| cr.proposal.secret_name == format!("file{n}")));
        }
        assert!(!text.contains("\"pwned\"\n"), "{text}");
    }
}

/// Pipes that are not backslash-escaped, i.e. cell separators.
fn cells(row: &str) -> usize {
    let mut n = 0;
    let mut esc = false;
    for c in row.chars() {
        if esc {
            esc = false;
        } else if c == '\\' {
            esc = true;
        } else if c == '|' {
            n += 1;
        }
    }
    n
}

#[test]
fn hostile_names_stay_inert_in_markdown() {
    let c = evil_census();
    let md = render::markdown(&c);
    let lines: Vec<&str> = md.lines().collect();
    let header = lines.iter().position(|l| l.starts_with("| credential |")).unwrap();
    let rows: Vec<&str> =
        lines[header..].iter().take_while(|l| l.starts_with('|')).copied().collect();
    assert_eq!(rows.len(), 2 + c.credentials.len(), "{md}");
    for r in &rows {
        assert_eq!(cells(r), 9, "row split or merged: {r:?}");
    }
    // One heading per credential, nothing else at heading level (outside the fences).
    let mut in_fence: Option<String> = None;
    let mut headings = 0;
    let mut fences = 0;
    for l in &lines {
        match &in_fence {
            Some(f) => {
                if l.trim_end() == f {
                    in_fence = None;
                }
                continue;
            }
            None => {
                let opening = l.strip_suffix("toml").or_else(|| l.strip_suffix("json"));
                if let Some(f) = opening.filter(|f| f.chars().all(|c| c == '`')) {
                    assert!(f.len() >= 3);
                    in_fence = Some(f.to_string());
                    fences += 1;
                    continue;
                }
            }
        }
        if l.starts_with('#') {
            assert!(l.starts_with("# Credential census") || l.starts_with("## "), "{l:?}");
            if l.starts_with("## ") {
                headings += 1;
            }
        }
        assert!(!l.starts_with("[["), "TOML outside a fence: {l:?}\n{md}");
        let b: Vec<char> = l.chars().collect();
        for (i, c) in b.iter().enumerate() {
            // Code spans hold only names without `|`, backticks or controls, and none of
            // the hostile names has such a name: every `<`, `&`, `[` must be escaped.
            if matches!(c, '<' | '&' | '[') {
                assert!(i > 0 && b[i - 1] == '\\', "unescaped {c:?} in {l:?}");
            }
        }
    }
    assert!(in_fence.is_none(), "an unclosed fence:\n{md}");
    assert_eq!(headings, c.credentials.len(), "{md}");
    // Per credential: the intent, and the credential source replacing it (plus a session
    // policy where one was derived).
    let policies = c
        .credentials
        .iter()
        .filter(|x| x.proposal.credential_source.session_policy.is_some())
        .count();
    assert_eq!(fences, 2 * c.credentials.len() + policies, "{md}");
    // SARIF and JSON: serde escapes; both parse and keep the names exactly.
    let s: Value = serde_json::from_str(&render::sarif(&c)).unwrap();
    let names: Vec<&str> = s["runs"][0]["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["properties"]["credential"].as_str().unwrap())
        .collect();
    for n in EVIL {
        assert!(names.contains(&format!("env:{n}").as_str()), "{names:?}");
    }
    let j: Value = serde_json::from_str(&render::json(&c)).unwrap();
    assert_eq!(j["credentials"].as_array().unwrap().len(), c.credentials.len());
}

#[test]
fn toml_and_markdown_escapers() {
    use census::toml_str;
    for s in ["", "a\"b", "\\", "\u{0}\u{1f}\u{7f}\u{9f}", "line\nbreak\r", "日本 🦀", "]]\n[[x]]"]
    {
        let doc: toml::Table = toml::from_str(&format!("k = {}", toml_str(s))).unwrap();
        assert_eq!(doc["k"].as_str(), Some(s));
    }
    assert_eq!(render::md_text("a|b`c\nd"), "a\\|b\\`c\\\\u{a}d");
    assert_eq!(render::md_code("env:AWS_KEY"), "`env:AWS_KEY`");
    assert_eq!(render::md_code("a|b"), "a\\|b");
}

/// A job where one process reads the AWS credentials file and another, not its descendant,
/// connects afterwards: both destinations are the job's, the source proposed is an AWS role
/// with a session policy from the service names reached.
#[test]
fn a_jobs_later_connects_count_for_the_credential_it_read() {
    let job =
        json!({ "process": { "job": { "id": "77", "name": "deploy", "source": "GITHUB_JOB" } } });
    let with_job = |mut v: Value| {
        merge(&mut v, job.clone());
        v
    };
    let mut named = dest("127.0.0.1", 9002);
    merge(&mut named, json!({"destination": {"name": "my-bucket.s3.us-west-2.amazonaws.com"}}));
    let lines = vec![
        ev(5, "connect", 12, 1, "/usr/bin/curl", "/ci/j", with_job(dest("127.0.0.1", 9000))),
        ev(
            10,
            "file_open",
            10,
            1,
            "/bin/cat",
            "/ci/j",
            with_job(file("aws-credentials", "/home/r/.aws/credentials")),
        ),
        ev(11, "connect", 10, 1, "/bin/cat", "/ci/j", with_job(dest("127.0.0.1", 9001))),
        ev(20, "connect", 11, 1, "/usr/bin/aws", "/ci/j", with_job(named)),
        ev(21, "connect", 30, 1, "/usr/bin/wget", "/other", dest("127.0.0.1", 9003)),
    ];
    let dir = write_store(&lines);
    let c = census_from_store(dir.path(), None).unwrap();
    let cr = c.credentials.iter().find(|x| x.name == "aws-credentials").unwrap();
    // The address learned from a name is proposed by the name (issue 15).
    assert_eq!(
        cr.proposal.destinations,
        vec!["127.0.0.1/32:9001", "my-bucket.s3.us-west-2.amazonaws.com:9002"],
        "{cr:#?}"
    );
    let d = cr.destinations.iter().find(|d| d.port == 9002).unwrap();
    assert_eq!(d.names, vec!["my-bucket.s3.us-west-2.amazonaws.com"]);
    assert_eq!(d.executables, vec!["/usr/bin/aws"], "the sibling that connected");
    let src = &cr.proposal.credential_source;
    assert_eq!(src.kind, "aws_role");
    assert!(
        src.toml.contains("[intent.aws]") && src.toml.contains("region = \"us-west-2\""),
        "{}",
        src.toml
    );
    let policy = src.session_policy.as_ref().unwrap();
    assert_eq!(policy["Statement"][0]["Action"][0], "s3:*");
    assert_eq!(policy["Statement"][0]["Resource"][1], "arn:aws:s3:::my-bucket/*");
    // Valid policy once the session policy is written where the proposal says.
    let pdir = write_store(&[]);
    let pfile = pdir.path().join("session.json");
    std::fs::write(&pfile, policy.to_string()).unwrap();
    let mut text = String::from(
        "mode = \"monitor\"\n[[secret]]\nname = \"aws-credentials\"\npaths = [\"/tmp/x\"]\n",
    );
    text.push_str(&cr.proposal.intent_toml);
    let re = src.toml.replace("/etc/enforcer/policies/", &format!("{}/", pdir.path().display()));
    text.push_str(&re.replace(&format!("{}.json", cr.proposal.intent_name), "session.json"));
    let cfg =
        crate::policy::load_str("proposal.toml", &text).unwrap_or_else(|d| panic!("{d}\n{text}"));
    let aws = cfg.intents[0].aws.as_ref().expect("[intent.aws] parsed");
    assert!(aws.session_policy_json.as_deref().is_some_and(|j| j.contains("my-bucket")));
}

/// A non-AWS credential is proposed as a daemon-held secret; valid policy with its intent.
#[test]
fn other_credentials_become_daemon_held_secrets() {
    let c = census();
    let cr = c.credentials.iter().find(|x| x.name == "deploy-key").unwrap();
    let src = &cr.proposal.credential_source;
    assert_eq!(src.kind, "daemon_held_secret");
    assert!(src.usage.contains("enforcer secret get deploy-key"), "{}", src.usage);
    let text = format!("mode = \"monitor\"\n{}{}", src.toml, cr.proposal.intent_toml);
    let cfg =
        crate::policy::load_str("proposal.toml", &text).unwrap_or_else(|d| panic!("{d}\n{text}"));
    assert_eq!(
        cfg.secrets[0].value_file.as_deref(),
        Some(std::path::Path::new("/etc/enforcer/secrets/deploy-key"))
    );
    let env = c.credentials.iter().find(|x| x.name == "env:AWS_SECRET_ACCESS_KEY").unwrap();
    assert_eq!(env.proposal.credential_source.kind, "aws_role");
    assert!(env.proposal.credential_source.session_policy.is_none(), "addresses only");
    assert!(!env.proposal.credential_source.toml.lines().any(|l| l.starts_with("session_policy")));
}

/// Connects to addresses learned from a name are reported and proposed by the name: the
/// addresses behind it change, the name does not.
#[test]
fn learned_addresses_are_reported_by_name() {
    let named = |ip: &str| json!({ "destination": { "ip": ip, "port": 443, "protocol": "tcp", "name": "api.example.com" } });
    let lines = vec![
        ev(
            1,
            "file_open",
            500,
            1,
            "/usr/bin/python3",
            "/ci/job-n",
            file("gh-token", "/home/r/.gh"),
        ),
        ev(2, "connect", 500, 1, "/usr/bin/python3", "/ci/job-n", named("192.0.2.7")),
        ev(3, "connect", 500, 1, "/usr/bin/python3", "/ci/job-n", named("192.0.2.8")),
        ev(4, "connect", 500, 1, "/usr/bin/python3", "/ci/job-n", dest("198.51.100.9", 22)),
    ];
    let dir = write_store(&lines);
    let c = census_from_store(dir.path(), None).unwrap();
    let r = cred(&c, "gh-token");
    let dests: Vec<(&str, u64)> =
        r.destinations.iter().map(|d| (d.destination.as_str(), d.connects)).collect();
    assert_eq!(dests, vec![("198.51.100.9/32:22", 1), ("api.example.com:443", 2)], "{r:#?}");
    assert!(r.proposal.destinations.contains(&"api.example.com:443".to_string()), "{r:#?}");
    assert!(
        r.proposal.intent_toml.contains("\"api.example.com:443\""),
        "{}",
        r.proposal.intent_toml
    );
}
