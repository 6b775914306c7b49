//! Brokered AWS credentials with real clients and a real local STS: moto's server mode on
//! loopback plays STS (and every other AWS API), boto3 is the client. A job wrapped in
//! `enforcer run --intent deploy` gets credentials minted by STS AssumeRole with the
//! intent's session policy and `RoleSessionName` = the grant id, through the SDK's container
//! provider and through `credential_process`. Without a live grant, or after a revoke, the
//! answer is no: the kernel attests who is asking, a stolen token is not enough.
//!
//! No SDK ever reaches a non-loopback address: every endpoint is set to moto on 127.0.0.1,
//! instance metadata is disabled, and the shared config/credentials files are empty.
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use enforcer_tests::*;
use serde_json::Value;

/// Test ports of this suite: 19500-19599.
fn free_port(from: u16) -> u16 {
    (from..19600)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port in 19500-19599")
}

/// moto in server mode on 127.0.0.1, killed (by pid) when dropped.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start() -> Option<Moto> {
        let port = free_port(19500);
        let child = Command::new(python())
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut m = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if m.child.try_wait().ok().flatten().is_some() || Instant::now() > deadline {
                eprintln!("SKIP: moto server did not start (pip install 'moto[server]' boto3)");
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(m)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What moto's STS recorded: every AssumeRole (session name, policy, ...).
    fn assumed_roles(&self) -> Vec<Value> {
        let out = Command::new("curl")
            .args(["-s", "-m", "10", &format!("{}/moto-api/data.json", self.url())])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["sts"]["AssumedRole"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SESSION_POLICY: &str = r#"{
  "Version": "2012-10-17",
  "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": "arn:aws:s3:::deploy-artifacts/*"}]
}"#;

struct Fixture {
    cg: TestCgroup,
    daemon: Daemon,
    moto: Moto,
    endpoint_port: u16,
    dir: tempfile::TempDir,
}

fn fixture(name: &str) -> Option<Fixture> {
    if !root_or_skip(name) {
        return None;
    }
    let moto = Moto::start()?;
    let dir = tempfile::Builder::new().prefix("enforcer-aws-").tempdir().unwrap();
    let creds = dir.path().join("base-credentials");
    // The daemon's own base credentials (moto accepts any): a root-only file, not an agent's.
    std::fs::write(
        &creds,
        "[broker]\naws_access_key_id = AKIDBROKER\naws_secret_access_key = brokersecret\n",
    )
    .unwrap();
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    let policy = dir.path().join("deploy.json");
    std::fs::write(&policy, SESSION_POLICY).unwrap();
    // An empty AWS config for the clients: nothing but what the test sets.
    std::fs::write(dir.path().join("empty"), "").unwrap();
    let endpoint_port = free_port(moto.port + 1);
    let cg = TestCgroup::new(name);
    let daemon = Daemon::start(
        &cg,
        &format!(
            "mode = \"enforce\"\n[aws]\ncredentials_file = \"{}\"\nprofile = \"broker\"\nlisten = \"127.0.0.1:{endpoint_port}\"\n\
             [[intent]]\nname = \"deploy\"\nagents = [{{ uid = 0 }}]\ndestinations = [\"127.0.0.1/32:{}\"]\n\
             on_violation = \"deny\"\nmax_ttl = \"10m\"\ndefault_ttl = \"5m\"\n\
             [intent.aws]\nrole_arn = \"arn:aws:iam::123456789012:role/deploy\"\nsts_endpoint = \"{}\"\nregion = \"us-east-1\"\nsession_policy = \"{}\"\n\
             [[intent]]\nname = \"plain\"\nagents = [{{ uid = 0 }}]\n",
            creds.display(),
            moto.port,
            moto.url(),
            policy.display()
        ),
    );
    Some(Fixture { cg, daemon, moto, endpoint_port, dir })
}

impl Fixture {
    /// A command in the test cgroup with an SDK environment that can only reach moto.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = self.cg.command(program);
        let empty = self.dir.path().join("empty");
        c.env("ENFORCER_RUNTIME_DIR", self.daemon.runtime_dir())
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_ENDPOINT_URL", self.moto.url())
            .env("AWS_ENDPOINT_URL_STS", self.moto.url())
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_CONFIG_FILE", &empty)
            .env("AWS_SHARED_CREDENTIALS_FILE", &empty)
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_CONTAINER_CREDENTIALS_FULL_URI")
            .env_remove("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE");
        c
    }

    fn grant_of(&self, intent: &str) -> String {
        let e = self.daemon.wait_events("grant_issued", |e| {
            e.kind == "grant_issued" && e.grant.as_ref().is_some_and(|g| g.intent == intent)
        });
        e.last().unwrap().grant.as_ref().unwrap().id.clone()
    }
}

/// boto3 in the job: who am I (STS GetCallerIdentity with the credentials the SDK found),
/// which provider found them, and the access key id.
const WHOAMI: &str = r#"
import boto3, json, sys
s = boto3.Session(profile_name=sys.argv[1]) if len(sys.argv) > 1 else boto3.Session()
c = s.get_credentials()
arn = s.client("sts").get_caller_identity()["Arn"]
print(json.dumps({"arn": arn, "method": c.method, "key": c.get_frozen_credentials().access_key}))
"#;

fn json_line(out: &std::process::Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("no JSON from the job ({e}): {out:?}"))
}

/// An unmodified SDK inside `enforcer run` gets credentials from the container endpoint;
/// STS received the session name (the grant id) and the intent's session policy.
#[test]
fn boto3_gets_credentials_from_the_container_endpoint() {
    let Some(f) = fixture("aws-container") else { return };
    let out = f
        .command(enforcer_bin())
        .args(["run", "--intent", "deploy", "--"])
        .args([&python(), "-c", WHOAMI])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}\n{}", f.daemon.log());
    let who = json_line(&out);
    let grant = f.grant_of("deploy");
    assert_eq!(who["method"], "container-role", "{who}");
    assert_eq!(who["arn"], format!("arn:aws:sts::123456789012:assumed-role/deploy/{grant}"));
    // What STS received.
    let roles = f.moto.assumed_roles();
    let ours: Vec<&Value> = roles.iter().filter(|r| r["session_name"] == grant.as_str()).collect();
    assert_eq!(ours.len(), 1, "one AssumeRole per grant (cached after): {roles:#?}");
    assert_eq!(ours[0]["role_arn"], "arn:aws:iam::123456789012:role/deploy");
    assert_eq!(ours[0]["access_key_id"], who["key"]);
    let sent: Value = serde_json::from_str(ours[0]["policy"].as_str().unwrap()).unwrap();
    assert_eq!(sent, serde_json::from_str::<Value>(SESSION_POLICY).unwrap());
    // The event names the key id, never the secret.
    let issued =
        f.daemon.one_event("aws_credentials_issued", |e| e.kind == "aws_credentials_issued");
    assert_eq!(issued.grant.as_ref().unwrap().id, grant);
    assert_eq!(issued.credentials[0].access_key_id, who["key"].as_str().unwrap());
    assert!(issued.decision_path.iter().any(|p| p.contains("for 900 s")), "{issued:#?}");
    let secret = ours[0]["secret_access_key"].as_str().unwrap();
    let token = ours[0]["session_token"].as_str().unwrap();
    let stored = f.daemon.dump();
    assert!(!stored.contains(secret) && !stored.contains(token), "secret material in events");
    assert!(!f.daemon.log().contains(secret), "secret material in the log");
    // Revoked at the job's end: the token file is gone.
    let token_file = f.daemon.runtime_dir().join("aws").join(format!("{grant}.token"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while token_file.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!token_file.exists(), "token file of an ended grant removed");
}

/// `credential_process = enforcer credential aws --intent deploy` in an AWS config profile.
#[test]
fn boto3_gets_credentials_from_credential_process() {
    let Some(f) = fixture("aws-process") else { return };
    let config = f.dir.path().join("aws-config");
    std::fs::write(
        &config,
        format!(
            "[profile brokered]\ncredential_process = {} credential aws --intent deploy\n",
            enforcer_bin().display()
        ),
    )
    .unwrap();
    let out = f
        .command(enforcer_bin())
        .env("AWS_CONFIG_FILE", &config)
        .args(["run", "--intent", "deploy", "--"])
        .args([&python(), "-c", WHOAMI, "brokered"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}\n{}", f.daemon.log());
    let who = json_line(&out);
    let grant = f.grant_of("deploy");
    assert_eq!(who["method"], "custom-process", "{who}");
    assert_eq!(who["arn"], format!("arn:aws:sts::123456789012:assumed-role/deploy/{grant}"));
    // The raw command prints the credential_process JSON (Version 1).
    let out = f
        .command(enforcer_bin())
        .args(["run", "--intent", "deploy", "--"])
        .args([enforcer_bin().to_str().unwrap(), "credential", "aws", "--intent", "deploy"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["Version"], 1);
    for k in ["AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration"] {
        assert!(v[k].as_str().is_some_and(|s| !s.is_empty()), "{k} in {v}");
    }
}

/// Without a grant: credential_process is refused, and a process that steals a live
/// grant's token (root can read the file) is refused by the container endpoint, because
/// the kernel says it does not hold the grant. A grant of an intent without [intent.aws]
/// gets nothing either.
#[test]
fn refused_without_a_grant_even_with_a_stolen_token() {
    let Some(f) = fixture("aws-refused") else { return };
    let out = f
        .command(enforcer_bin())
        .args(["credential", "aws", "--intent", "deploy"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "nothing on stdout: {out:?}");
    let err: Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(err["error"]["code"], "no_grant", "{err}");
    f.daemon.wait_events("aws_credentials_refused", |e| {
        e.kind == "aws_credentials_refused" && e.verdict == "no_grant" && e.action == "denied"
    });
    // A holder that waits; the thief reads its token file and calls the endpoint itself.
    let mut holder = f
        .command(enforcer_bin())
        .args(["run", "--intent", "deploy", "--"])
        .args([&python(), "-c", "import os, sys; print(os.environ['AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE'], os.environ['AWS_CONTAINER_CREDENTIALS_FULL_URI'], flush=True); sys.stdin.read()"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let mut parts = line.split_whitespace();
    let (token_file, uri) = (parts.next().unwrap().to_string(), parts.next().unwrap().to_string());
    assert!(uri.ends_with(&format!(":{}/v1/aws/credentials", f.endpoint_port)), "{uri}");
    let md = std::fs::metadata(&token_file).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::mode(&md) & 0o777, 0o600);
    let steal = format!(
        "import urllib.request, urllib.error\nreq = urllib.request.Request({uri:?}, headers={{'Authorization': open({token_file:?}).read()}})\ntry:\n    urllib.request.urlopen(req, timeout=5); print('served')\nexcept urllib.error.HTTPError as e:\n    print(e.code, e.read().decode())\n"
    );
    let out = f.command(python()).args(["-c", &steal]).output().unwrap();
    let got = String::from_utf8_lossy(&out.stdout);
    assert!(got.starts_with("403") && got.contains("no_grant"), "thief refused: {out:?}");
    // The same request from inside the grant is served.
    let _ = holder.stdin.take().unwrap().write_all(b"");
    let out = f
        .command(enforcer_bin())
        .args(["run", "--intent", "plain", "--"])
        .args([enforcer_bin().to_str().unwrap(), "credential", "aws", "--intent", "deploy"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "a grant of another intent gets nothing: {out:?}");
    let _ = holder.wait();
    assert!(f.moto.assumed_roles().is_empty(), "STS was never called");
}

/// After a revoke the endpoint stops serving, the job's connections to the provider are
/// denied in the kernel, and the event names the credentials still outstanding.
#[test]
fn revoke_stops_serving_and_the_kernel_denies_the_provider() {
    let Some(f) = fixture("aws-revoke") else { return };
    let job = r#"
import boto3, json, os, socket, sys, urllib.request, urllib.error
def fetch():
    req = urllib.request.Request(os.environ["AWS_CONTAINER_CREDENTIALS_FULL_URI"],
        headers={"Authorization": open(os.environ["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"]).read()})
    try:
        return json.loads(urllib.request.urlopen(req, timeout=5).read())["AccessKeyId"]
    except urllib.error.HTTPError as e:
        return "HTTP %d" % e.code
    except urllib.error.URLError as e:
        return "error %s" % getattr(e.reason, "errno", e.reason)
def connect():
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5).close(); return "connected"
    except OSError as e:
        return "errno %d" % e.errno
for line in sys.stdin:
    print(json.dumps({"fetch": fetch(), "connect": connect()}), flush=True)
"#;
    let mut child = f
        .command(enforcer_bin())
        .args(["run", "--intent", "deploy", "--"])
        .args([&python(), "-c", job, &f.moto.port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut ask = |stdin: &mut std::process::ChildStdin| -> Value {
        stdin.write_all(b"go\n").unwrap();
        serde_json::from_str(&out.next().unwrap().unwrap()).unwrap()
    };
    let before = ask(&mut stdin);
    let key = before["fetch"].as_str().unwrap().to_string();
    assert!(key.starts_with("ASIA"), "served while granted: {before}");
    assert_eq!(before["connect"], "connected", "{before}");
    let grant = f.grant_of("deploy");
    let r = f.daemon.cli(&["grant", "revoke", &grant]);
    assert!(r.status.success(), "{r:?}");
    let after = ask(&mut stdin);
    // The endpoint is now a destination of a revoked grant: the kernel refuses the
    // connect (EPERM), or, had it got through, the broker would answer 403.
    let fetch = after["fetch"].as_str().unwrap();
    assert!(fetch == "error 1" || fetch == "HTTP 403", "not served after revoke: {after}");
    assert_eq!(after["connect"], "errno 1", "provider denied in the kernel: {after}");
    let e = f
        .daemon
        .one_event("aws_credentials_outstanding", |e| e.kind == "aws_credentials_outstanding");
    assert_eq!(e.verdict, "revoked");
    assert_eq!(e.grant.as_ref().unwrap().id, grant);
    assert_eq!(e.credentials.len(), 1);
    assert_eq!(e.credentials[0].access_key_id, key);
    drop(stdin);
    let _ = child.wait();
    let denied = f.daemon.wait_events("denied connect to moto", |e| {
        e.kind == "connect"
            && e.action == "denied"
            && e.verdict == "revoked"
            && e.destination.as_ref().is_some_and(|d| d.port == f.moto.port)
    });
    assert!(!denied.is_empty());
    // Every event, the new kinds included, is valid enforcer.event/v1.
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schema/enforcer.event.v1.json");
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let v =
        jsonschema::draft202012::options().should_validate_formats(true).build(&schema).unwrap();
    let raw = f.daemon.raw_events();
    for kind in ["aws_credentials_issued", "aws_credentials_outstanding", "grant_revoked"] {
        assert!(raw.iter().any(|e| e["kind"] == kind), "no {kind}");
    }
    for e in &raw {
        let errors: Vec<String> =
            v.iter_errors(e).map(|err| format!("{err} at {}", err.instance_path())).collect();
        assert!(errors.is_empty(), "{errors:?}\n{e}");
    }
}

/// A broken session policy is refused at load with the JSON file's line and column.
#[test]
fn session_policy_errors_name_file_line_col() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("bad.json");
    std::fs::write(
        &policy,
        "{\n  \"Version\": \"2012-10-17\",\n  \"Statement\": [\n    {\"Effect\": Allow}\n  ]\n}\n",
    )
    .unwrap();
    let cfg = dir.path().join("enforcer.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[intent]]\nname = \"deploy\"\n[intent.aws]\nrole_arn = \"arn:aws:iam::123456789012:role/deploy\"\nsession_policy = \"{}\"\n",
            policy.display()
        ),
    )
    .unwrap();
    let out = enforcer(&["policy", "check", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:4:16:", policy.display())), "{err}");
    std::fs::write(
        &cfg,
        "[[intent]]\nname = \"deploy\"\n[intent.aws]\nrole_arn = \"arn:aws:iam::123:role/x\"\nsts_endpoint = \"http://sts.example.com\"\n",
    )
    .unwrap();
    let out = enforcer(&["policy", "check", cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("enforcer.toml:4:12: role_arn"), "{err}");
    assert!(err.contains("enforcer.toml:5:16: invalid sts_endpoint"), "{err}");
}

/// Serving latency from the local endpoint, as a client in the granted subtree sees it
/// (python's http.client included, so an upper bound): cached credentials on a kept-alive
/// connection, and on a new connection each time (socket-table lookup + /proc walk + pidfd
/// attestation). Printed for the README; bounded loosely so a regression shows.
#[test]
fn credential_serving_latency() {
    let Some(f) = fixture("aws-latency") else { return };
    let bench = r#"
import http.client, json, os, time, urllib.parse
u = urllib.parse.urlparse(os.environ["AWS_CONTAINER_CREDENTIALS_FULL_URI"])
tok = open(os.environ["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"]).read()
def get(c):
    c.request("GET", u.path, headers={"Authorization": tok}); r = c.getresponse(); body = r.read()
    assert r.status == 200, body
c = http.client.HTTPConnection(u.hostname, u.port); get(c)
keep = []
for _ in range(2000):
    t = time.perf_counter(); get(c); keep.append(time.perf_counter() - t)
fresh = []
for _ in range(200):
    t = time.perf_counter(); n = http.client.HTTPConnection(u.hostname, u.port); get(n); n.close(); fresh.append(time.perf_counter() - t)
def pct(v, p): v = sorted(v); return v[min(len(v) - 1, int(len(v) * p))] * 1e6
print(json.dumps({"keepalive_p50_us": pct(keep, .5), "keepalive_p99_us": pct(keep, .99), "new_conn_p50_us": pct(fresh, .5), "new_conn_p99_us": pct(fresh, .99)}))
"#;
    let out = f
        .command(enforcer_bin())
        .args(["run", "--intent", "deploy", "--"])
        .args([&python(), "-c", bench])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = json_line(&out);
    eprintln!("AWS credential serving from the local endpoint: {v}");
    let procs = std::fs::read_dir("/proc")
        .unwrap()
        .filter(|e| {
            e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        })
        .count();
    eprintln!("({procs} processes on the host during the run)");
    // With ENFORCER_LOG=enforcer=debug the daemon logs what attestation cost.
    for l in f.daemon.log().lines().filter(|l| l.contains("AWS endpoint:")).take(6) {
        eprintln!("{l}");
    }
    assert!(v["keepalive_p99_us"].as_f64().unwrap() < 20_000.0, "{v}");
    assert!(v["new_conn_p99_us"].as_f64().unwrap() < 200_000.0, "{v}");
    assert_eq!(f.moto.assumed_roles().len(), 1, "every answer but the first from the cache");
}

/// A daemon restart (SIGTERM, then a new daemon adopting the pins) in the middle of a job:
/// the job's token file and grant carry over, and the SDK keeps getting credentials.
#[test]
fn restart_keeps_serving_a_running_job() {
    let Some(mut f) = fixture("aws-restart") else { return };
    let job = r#"
import boto3, json, sys
s = boto3.Session()
for line in sys.stdin:
    c = s.get_credentials().get_frozen_credentials()
    arn = s.client("sts").get_caller_identity()["Arn"]
    print(json.dumps({"key": c.access_key, "arn": arn}), flush=True)
    s = boto3.Session()  # a fresh provider chain: the next line fetches again
"#;
    let mut child = f
        .command(enforcer_bin())
        .args(["run", "--intent", "deploy", "--"])
        .args([&python(), "-c", job])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    stdin.write_all(b"go\n").unwrap();
    let before: Value = serde_json::from_str(&out.next().unwrap().unwrap()).unwrap();
    let grant = f.grant_of("deploy");
    assert!(before["arn"].as_str().unwrap().ends_with(&grant), "{before}");
    f.daemon.stop();
    f.daemon.relaunch();
    stdin.write_all(b"go\n").unwrap();
    let after: Value = serde_json::from_str(&out.next().unwrap().unwrap()).unwrap();
    assert!(after["arn"].as_str().unwrap().ends_with(&grant), "same grant after restart: {after}");
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

/// A grant shorter than STS's 900 s minimum: the credentials are minted for 900 s, but the
/// broker serves them only while the grant lives; after its end the kernel refuses the job's
/// connects (expired), and the event names the credentials that outlive it.
#[test]
fn short_grant_stops_serving_at_its_end() {
    let Some(f) = fixture("aws-short") else { return };
    let job = r#"
import json, os, socket, sys, time, urllib.request, urllib.error
# Kept: the token file itself is removed when the grant ends.
token = open(os.environ["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"]).read()
def fetch():
    req = urllib.request.Request(os.environ["AWS_CONTAINER_CREDENTIALS_FULL_URI"], headers={"Authorization": token})
    try:
        return json.loads(urllib.request.urlopen(req, timeout=5).read())
    except urllib.error.HTTPError as e:
        return "HTTP %d" % e.code
    except urllib.error.URLError as e:
        return "error %s" % getattr(e.reason, "errno", e.reason)
from datetime import datetime, timezone
first = fetch()
left = (datetime.fromisoformat(first["Expiration"].replace("Z", "+00:00")) - datetime.now(timezone.utc)).total_seconds()
time.sleep(float(sys.argv[1]))
gone = not os.path.exists(os.environ["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"])
print(json.dumps({"first": first, "left": left, "after": fetch(), "token_file_gone": gone}), flush=True)
"#;
    let out = f
        .command(enforcer_bin())
        .args(["run", "--intent", "deploy", "--ttl", "3s", "--"])
        .args([&python(), "-c", job, "4"])
        .output()
        .unwrap();
    let v = json_line(&out);
    let first = &v["first"];
    assert!(first["AccessKeyId"].as_str().is_some_and(|k| k.starts_with("ASIA")), "{v}");
    // Minted for STS's minimum, well past the grant's 3 s.
    let left = v["left"].as_f64().unwrap();
    assert!((800.0..=900.0).contains(&left), "{left} s left: {v}");
    assert_eq!(v["token_file_gone"], true, "{v}");
    assert_eq!(
        v["after"], "error 1",
        "connect to the endpoint refused in the kernel (expired grant): {v}"
    );
    let issued = f.daemon.one_event("issued", |e| e.kind == "aws_credentials_issued");
    assert!(issued.decision_path.iter().any(|p| p.contains("outlives the grant")), "{issued:#?}");
    let e = f.daemon.one_event("outstanding", |e| e.kind == "aws_credentials_outstanding");
    assert_eq!(e.verdict, "expired");
    assert_eq!(e.credentials[0].access_key_id, first["AccessKeyId"].as_str().unwrap());
    f.daemon.wait_events("expired connect denied", |e| {
        e.kind == "connect" && e.verdict == "expired" && e.action == "denied"
    });
}

/// An `[intent.aws]` added by a policy reload: the endpoint starts then, and serves; a
/// reload that changes `[aws]` (fixed at start) is refused and changes nothing.
#[test]
fn reload_adding_an_aws_intent_starts_the_endpoint() {
    let Some(f) = fixture("aws-reload") else { return };
    // A second daemon that starts without any [intent.aws].
    let cg = TestCgroup::new("aws-reload-2");
    let d = Daemon::start(&cg, "[[intent]]\nname = \"later\"\nagents = [{ uid = 0 }]\n");
    let base = std::fs::read_to_string(&d.config).unwrap();
    let aws_intent = format!(
        "[intent.aws]\nrole_arn = \"arn:aws:iam::123456789012:role/later\"\nsts_endpoint = \"{}\"\n",
        f.moto.url()
    );
    // (Tables after the top-level keys.)
    let changed_aws = base.replacen(
        "[[intent]]",
        &format!("[aws]\nlisten = \"127.0.0.1:{}\"\n[[intent]]", free_port(f.endpoint_port + 1)),
        1,
    ) + &aws_intent;
    std::fs::write(&d.config, changed_aws).unwrap();
    let r = d.cli(&["policy", "reload"]);
    assert!(!r.status.success(), "[aws] is fixed at start: {r:?}");
    assert!(String::from_utf8_lossy(&r.stderr).contains("[aws] applies only at start"), "{r:?}");
    // The same intent without touching [aws]: the default listener (a free loopback port).
    std::fs::write(&d.config, format!("{base}{aws_intent}")).unwrap();
    let r = d.cli(&["policy", "reload"]);
    assert!(r.status.success(), "{r:?}\n{}", d.log());
    let out = cg
        .command(enforcer_bin())
        .env("ENFORCER_RUNTIME_DIR", d.runtime_dir())
        .args(["run", "--intent", "later", "--"])
        .args(["sh", "-c", "echo $AWS_CONTAINER_CREDENTIALS_FULL_URI"])
        .output()
        .unwrap();
    let uri = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        uri.starts_with("http://127.0.0.1:") && uri.ends_with("/v1/aws/credentials"),
        "{out:?}"
    );
    let port: u16 = uri["http://127.0.0.1:".len()..].split('/').next().unwrap().parse().unwrap();
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok(), "the endpoint listens on {port}");
}
