//! Workload identity: JWT-SVIDs over the SPIFFE Workload API on `<runtime_dir>/spiffe.sock`,
//! fetched and validated by an independent client (py-spiffe, the `spiffe` package from PyPI,
//! over grpcio), bundle rotation, and OIDC discovery verified with PyJWT.
//!
//! The client is a python process in the test cgroup that answers one command per line (a
//! JSON result per line), so one process can be granted, fetch, be revoked and fetch again.
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdout, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use enforcer_tests::*;
use serde_json::{Value, json};

const CLIENT: &str = r#"
import json, os, subprocess, sys
import grpc
from spiffe import WorkloadApiClient, JwtSvid, TrustDomain
from spiffe._proto import workload_pb2, workload_pb2_grpc

sock = os.environ["SPIFFE_ENDPOINT_SOCKET"]
client = WorkloadApiClient(socket_path=sock, default_timeout=10)
td = TrustDomain("example.org")

def err(e):
    return {"ok": False, "error": str(e)}

def fetch(auds, sid=None):
    try:
        from spiffe import SpiffeId
        svids = client.fetch_jwt_svids(set(auds.split(",")), SpiffeId(sid) if sid else None)
        return {"ok": True, "svids": [{"spiffe_id": str(s.spiffe_id), "token": s.token, "exp": s.expiry} for s in svids]}
    except Exception as e:
        return err(e)

def bundle():
    try:
        b = client.fetch_jwt_bundles().get_bundle_for_trust_domain(td)
        return {"ok": True, "kids": sorted(b.jwt_authorities.keys())}
    except Exception as e:
        return err(e)

def validate(token, aud):
    out = {}
    try:
        b = client.fetch_jwt_bundles().get_bundle_for_trust_domain(td)
        s = JwtSvid.parse_and_validate(token, b, {aud})
        out["local"] = {"ok": True, "spiffe_id": str(s.spiffe_id)}
    except Exception as e:
        out["local"] = err(e)
    try:
        s = client.validate_jwt_svid(token, aud)
        out["api"] = {"ok": True, "spiffe_id": str(s.spiffe_id)}
    except Exception as e:
        out["api"] = err(e)
    return out

def raw(method, req, meta):
    ch = grpc.insecure_channel("unix:" + sock.removeprefix("unix://"))
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(ch)
    try:
        r = getattr(stub, method)(req, metadata=meta, timeout=10)
        if method == "FetchX509SVID":
            next(iter(r))
        return {"ok": True}
    except grpc.RpcError as e:
        return {"ok": False, "code": e.code().name, "details": e.details()}

print(json.dumps({"pid": os.getpid()}), flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "fetch":
        r = fetch(cmd[1], cmd[2] if len(cmd) > 2 else None)
    elif cmd[0] == "child":
        # A process forked after the grant: it holds the grant too.
        p = subprocess.run([sys.executable, "-c", "import json, sys\nfrom spiffe import WorkloadApiClient\nc = WorkloadApiClient(default_timeout=10)\ntry:\n    s = c.fetch_jwt_svid({sys.argv[1]})\n    print(json.dumps({'ok': True, 'spiffe_id': str(s.spiffe_id)}))\nexcept Exception as e:\n    print(json.dumps({'ok': False, 'error': str(e)}))\n", cmd[1]], capture_output=True, text=True)
        r = json.loads(p.stdout or '{"ok": false, "error": "no output"}')
    elif cmd[0] == "bundle":
        r = bundle()
    elif cmd[0] == "validate":
        r = validate(cmd[1], cmd[2])
    elif cmd[0] == "nometa":
        r = raw("FetchJWTSVID", workload_pb2.JWTSVIDRequest(audience=["sts.example.test"]), [])
    elif cmd[0] == "x509":
        r = raw("FetchX509SVID", workload_pb2.X509SVIDRequest(), [("workload.spiffe.io", "true")])
    elif cmd[0] == "exit":
        break
    print(json.dumps(r), flush=True)
"#;

/// Verifies a token with PyJWT against the JWKS and issuer served by OIDC discovery.
const OIDC_VERIFY: &str = r#"
import json, sys, jwt
disco, jwks, token, aud = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
kid = jwt.get_unverified_header(token)["kid"]
key = [k for k in jwks["keys"] if k["kid"] == kid][0]
claims = jwt.decode(token, key=jwt.PyJWK(key).key, algorithms=disco["id_token_signing_alg_values_supported"],
                    audience=aud, issuer=disco["issuer"])
print(json.dumps(claims))
"#;

struct Client {
    child: Child,
    out: std::io::Lines<BufReader<ChildStdout>>,
    pid: u32,
}

impl Client {
    /// The client in the test cgroup, talking to `sock`.
    fn start(cg: &TestCgroup, sock: &Path) -> Client {
        let mut child = cg
            .command(python())
            .args(["-c", CLIENT])
            .env("SPIFFE_ENDPOINT_SOCKET", format!("unix://{}", sock.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let first: Value = serde_json::from_str(&out.next().unwrap().unwrap()).unwrap();
        let pid = first["pid"].as_u64().unwrap() as u32;
        Client { child, out, pid }
    }

    fn ask(&mut self, cmd: &str) -> Value {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{cmd}").unwrap();
        let line = self.out.next().expect("client answered").unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have_py_spiffe(test: &str) -> bool {
    let ok = std::process::Command::new(python())
        .args(["-c", "import spiffe, grpc, jwt"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        // CI installs them (`cargo xtask setup`); a developer machine may not have them.
        assert!(
            std::env::var_os("CI").is_none_or(|v| v.is_empty()),
            "{test}: python packages spiffe, grpcio, pyjwt missing in CI"
        );
        eprintln!("SKIP {test}: pip install spiffe pyjwt (the py-spiffe client is missing)");
    }
    ok
}

fn claims(token: &str) -> Value {
    serde_json::from_slice(&B64.decode(token.split('.').nth(1).unwrap()).unwrap()).unwrap()
}

fn header(token: &str) -> Value {
    serde_json::from_slice(&B64.decode(token.split('.').next().unwrap()).unwrap()).unwrap()
}

const POLICY: &str = r#"
[[intent]]
name = "deploy"
agents = [{ uid = 0 }]
audiences = ["sts.example.test", "vault.example.test"]
max_ttl = "10m"
[[intent]]
name = "ci"
agents = [{ uid = 0 }]
audiences = ["ci.example.test"]
spiffe_id = "/ci/{intent}/uid/{uid}"
[[intent]]
name = "plain"
agents = [{ uid = 0 }]
"#;

fn grant(d: &Daemon, intent: &str, pid: u32, ttl: &str) -> Value {
    let out = d.cli(&[
        "grant",
        "request",
        "--intent",
        intent,
        "--pid",
        &pid.to_string(),
        "--ttl",
        ttl,
        "--json",
    ]);
    assert!(out.status.success(), "grant request: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn svids(r: &Value) -> &Vec<Value> {
    assert_eq!(r["ok"], true, "fetch failed: {r}");
    r["svids"].as_array().unwrap()
}

/// py-spiffe fetches and validates JWT-SVIDs and bundles; a process without a grant, a grant
/// whose intent names no audiences, and an audience outside the intent are refused with
/// PermissionDenied; a child forked in the subtree gets an SVID; after `enforcer grant revoke`
/// the next fetch is refused; exp never passes the grant's expiry; the security header is
/// required; X.509 is Unimplemented; OIDC discovery + JWKS verify the token (PyJWT); events
/// say issued / refused and never carry a token.
#[test]
fn jwt_svids_follow_the_grant() {
    if !root_or_skip("jwt_svids_follow_the_grant") || !have_py_spiffe("jwt_svids_follow_the_grant")
    {
        return;
    }
    let cg = TestCgroup::new("spiffe");
    let d = Daemon::start(
        &cg,
        &format!(
            "[spiffe]\ntrust_domain = \"example.org\"\nsvid_ttl = \"5m\"\nissuer = \"https://oidc.example.org\"\n{POLICY}"
        ),
    );
    let sock = d.runtime_dir().join("spiffe.sock");
    let mode =
        std::fs::metadata(&sock).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
    assert_eq!(mode.ok().map(|m| m & 0o777), Some(0o666), "every process may ask; grants decide");

    // No grant: refused.
    let mut c = Client::start(&cg, &sock);
    let r = c.ask("fetch sts.example.test");
    assert_eq!(r["ok"], false);
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("PERMISSION_DENIED") && e.contains("holds no live grant"), "{e}");
    // Bundles are public keys: served to any caller carrying the header.
    let b = c.ask("bundle");
    assert_eq!(b["ok"], true, "{b}");
    assert_eq!(b["kids"].as_array().unwrap().len(), 1);
    // The security header is required (InvalidArgument), checked before anything else.
    let r = c.ask("nometa");
    assert_eq!(
        (r["code"].as_str(), r["details"].as_str()),
        (Some("INVALID_ARGUMENT"), Some("security header missing from request")),
        "{r}"
    );
    let r = c.ask("x509");
    assert_eq!(r["code"], "UNIMPLEMENTED", "{r}");

    // Granted: an SVID whose exp is no later than the grant's (grant 20 s, svid_ttl 5 m).
    let g = grant(&d, "deploy", c.pid, "20s");
    let gid = g["id"].as_str().unwrap().to_string();
    let grant_exp =
        chrono::DateTime::parse_from_rfc3339(g["expires_at"].as_str().unwrap()).unwrap();
    let r = c.ask("fetch sts.example.test");
    let s = &svids(&r)[0];
    assert_eq!(s["spiffe_id"], "spiffe://example.org/intent/deploy");
    let token = s["token"].as_str().unwrap().to_string();
    let (h, cl) = (header(&token), claims(&token));
    assert_eq!((h["alg"].as_str(), h["typ"].as_str()), (Some("ES256"), Some("JWT")));
    assert_eq!(b["kids"][0], h["kid"]);
    assert_eq!(cl["sub"], "spiffe://example.org/intent/deploy");
    assert_eq!(cl["aud"], json!(["sts.example.test"]));
    assert_eq!(cl["iss"], "https://oidc.example.org");
    assert_eq!(cl["grant_id"], gid.as_str());
    let exp = cl["exp"].as_i64().unwrap();
    assert!(exp <= grant_exp.timestamp(), "exp {exp} after the grant's expiry {grant_exp}");
    assert!(exp >= grant_exp.timestamp() - 1, "exp {exp} is the grant's expiry {grant_exp}");
    assert!(cl["iat"].as_i64().unwrap() <= exp && !cl["jti"].as_str().unwrap().is_empty());

    // Validated by py-spiffe against the fetched bundle, and by the agent (ValidateJWTSVID).
    let v = c.ask(&format!("validate {token} sts.example.test"));
    assert_eq!(v["local"]["ok"], true, "{v}");
    assert_eq!(v["api"]["ok"], true, "{v}");
    assert_eq!(v["local"]["spiffe_id"], "spiffe://example.org/intent/deploy");
    let v = c.ask(&format!("validate {token} vault.example.test"));
    assert_eq!(
        (v["local"]["ok"].as_bool(), v["api"]["ok"].as_bool()),
        (Some(false), Some(false)),
        "{v}"
    );
    assert!(v["api"]["error"].as_str().unwrap().contains("INVALID_ARGUMENT"), "{v}");

    // Both allowed audiences at once; an audience outside the intent is refused.
    let r = c.ask("fetch sts.example.test,vault.example.test");
    assert_eq!(claims(svids(&r)[0]["token"].as_str().unwrap())["aud"].as_array().unwrap().len(), 2);
    let r = c.ask("fetch sts.amazonaws.com");
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("PERMISSION_DENIED") && e.contains("not allowed"), "{e}");
    let r = c.ask("fetch sts.example.test spiffe://example.org/intent/other");
    assert!(r["error"].as_str().unwrap().contains("PERMISSION_DENIED"), "{r}");

    // A child forked in the granted subtree holds the grant, finds the socket by
    // SPIFFE_ENDPOINT_SOCKET, and gets the SVID.
    let r = c.ask("child sts.example.test");
    assert_eq!(
        (r["ok"].as_bool(), r["spiffe_id"].as_str()),
        (Some(true), Some("spiffe://example.org/intent/deploy")),
        "{r}"
    );

    // A second grant (templated id with the subject's uid): both SVIDs when no id is asked for.
    let g2 = grant(&d, "ci", c.pid, "1m");
    let r = c.ask("fetch ci.example.test");
    let got: Vec<&str> = svids(&r).iter().map(|s| s["spiffe_id"].as_str().unwrap()).collect();
    assert_eq!(got, ["spiffe://example.org/ci/ci/uid/0"]);

    // OIDC discovery on the mint socket; PyJWT verifies the token with its JWKS and issuer.
    let (code, disco) = d.curl("GET", "/.well-known/openid-configuration", None);
    assert_eq!(code, 200, "{disco}");
    assert_eq!(disco["issuer"], "https://oidc.example.org");
    assert_eq!(disco["jwks_uri"], "https://oidc.example.org/keys");
    let (code, jwks) = d.curl("GET", "/keys", None);
    assert_eq!(code, 200);
    assert_eq!(jwks["keys"][0]["use"], "jwt-svid");
    let out = std::process::Command::new(python())
        .args([
            "-c",
            OIDC_VERIFY,
            &disco.to_string(),
            &jwks.to_string(),
            &token,
            "sts.example.test",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "PyJWT: {}", String::from_utf8_lossy(&out.stderr));
    let verified: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verified["grant_id"], gid.as_str());

    // Revoked: the next fetch is refused; the other grant still gives its own SVID.
    let out = d.cli(&["grant", "revoke", &gid]);
    assert!(out.status.success(), "revoke: {}", String::from_utf8_lossy(&out.stderr));
    let r = c.ask("fetch sts.example.test");
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("PERMISSION_DENIED"), "{e}");
    let r = c.ask("fetch ci.example.test");
    assert_eq!(svids(&r).len(), 1);
    let out = d.cli(&["grant", "revoke", g2["id"].as_str().unwrap()]);
    assert!(out.status.success());
    let r = c.ask("fetch ci.example.test");
    assert!(r["error"].as_str().unwrap().contains("is revoked"), "{r}");

    // A grant of an intent without audiences gives no SVID.
    let g3 = grant(&d, "plain", c.pid, "1m");
    let r = c.ask("fetch sts.example.test");
    assert!(r["error"].as_str().unwrap().contains("names no audiences"), "{r}");

    // Events: issued (with the grant) and refused; never the token.
    let issued =
        d.wait_events("svid_issued", |e| e.kind == "svid_issued" && e.process.pid == c.pid);
    assert!(issued.iter().any(|e| e.grant.as_ref().is_some_and(|g| g.id == gid)));
    for e in &issued {
        assert_required_fields(e);
        assert_eq!((e.verdict.as_str(), e.action.as_str()), ("allowed", "allowed"));
    }
    let refused =
        d.wait_events("svid_refused", |e| e.kind == "svid_refused" && e.process.pid == c.pid);
    assert!(refused.iter().any(|e| e.verdict == "no_grant"), "{refused:?}");
    assert!(refused.iter().any(|e| e.verdict == "revoked"), "{refused:?}");
    assert!(refused.iter().any(|e| e.verdict == "out_of_intent"
        && e.grant.as_ref().is_some_and(|g| g.id == g3["id"].as_str().unwrap())));
    assert!(refused.iter().all(|e| e.action == "denied" && e.severity == "medium"));
    let store = std::fs::read_to_string(d.state_dir().join("events.jsonl")).unwrap();
    let sig = token.rsplit('.').next().unwrap();
    assert!(!store.contains(sig) && !d.log().contains(sig), "a token reached the events or log");
}

/// `enforcer run` exports SPIFFE_ENDPOINT_SOCKET; the job's SVID dies with the run's grant.
#[test]
fn enforcer_run_exports_the_socket() {
    if !root_or_skip("enforcer_run_exports_the_socket")
        || !have_py_spiffe("enforcer_run_exports_the_socket")
    {
        return;
    }
    let cg = TestCgroup::new("spiffe-run");
    let d = Daemon::start(&cg, &format!("[spiffe]\ntrust_domain = \"example.org\"\n{POLICY}"));
    let script = "import json, os\nfrom spiffe import WorkloadApiClient\ns = WorkloadApiClient(default_timeout=10).fetch_jwt_svid({'sts.example.test'})\nprint(json.dumps({'socket': os.environ['SPIFFE_ENDPOINT_SOCKET'], 'id': str(s.spiffe_id), 'token': s.token}))\n";
    let out = cg
        .command(enforcer_bin())
        .args(["run", "--intent", "deploy", "--ttl", "1m", "--", &python(), "-c", script])
        .env("ENFORCER_RUNTIME_DIR", d.runtime_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "run: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["socket"].as_str().unwrap(),
        format!("unix://{}", d.runtime_dir().join("spiffe.sock").display())
    );
    assert_eq!(v["id"], "spiffe://example.org/intent/deploy");
    let c = claims(v["token"].as_str().unwrap());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(c["grant_id"].as_str().unwrap()),
        "token's grant is the run's: {stderr}"
    );
    assert_eq!(c["iss"], "https://example.org");
}

/// Keys rotate every `key_rotation`; the bundle keeps the previous key, so a token signed
/// before a rotation still verifies after it (py-spiffe and ValidateJWTSVID) until its exp;
/// one rotation later that key has left the bundle.
#[test]
fn bundle_rotation_keeps_old_tokens_valid_until_exp() {
    if !root_or_skip("bundle_rotation_keeps_old_tokens_valid_until_exp")
        || !have_py_spiffe("bundle_rotation_keeps_old_tokens_valid_until_exp")
    {
        return;
    }
    let cg = TestCgroup::new("spiffe-rot");
    let d = Daemon::start(
        &cg,
        &format!(
            "[spiffe]\ntrust_domain = \"example.org\"\nkey_rotation = \"4s\"\nsvid_ttl = \"4s\"\n{POLICY}"
        ),
    );
    let mut c = Client::start(&cg, &d.runtime_dir().join("spiffe.sock"));
    grant(&d, "deploy", c.pid, "1m");
    let kids = |c: &mut Client| -> Vec<String> {
        let b = c.ask("bundle");
        assert_eq!(b["ok"], true, "{b}");
        b["kids"].as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_string()).collect()
    };
    // Waits (bounded) until the bundle differs from `before`.
    let rotated = |c: &mut Client, before: &[String]| -> Vec<String> {
        let t = Instant::now();
        loop {
            let now = kids(c);
            if now != before {
                return now;
            }
            assert!(t.elapsed() < Duration::from_secs(12), "no rotation within 12 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let first = kids(&mut c);
    let after_r1 = rotated(&mut c, &first);
    assert_eq!(after_r1.len(), 2, "current + previous: {after_r1:?}");
    // Mid-period: a token signed by the current key.
    std::thread::sleep(Duration::from_millis(1500));
    let r = c.ask("fetch sts.example.test");
    let token = svids(&r)[0]["token"].as_str().unwrap().to_string();
    let kid = header(&token)["kid"].as_str().unwrap().to_string();
    let exp = claims(&token)["exp"].as_i64().unwrap();
    // Next rotation: the signing key is now the previous one, still in the bundle.
    let after_r2 = rotated(&mut c, &after_r1);
    assert!(after_r2.contains(&kid), "{kid} kept as previous: {after_r2:?}");
    assert!(chrono::Utc::now().timestamp() < exp, "test timing: token already expired");
    let v = c.ask(&format!("validate {token} sts.example.test"));
    assert_eq!(
        (v["local"]["ok"].as_bool(), v["api"]["ok"].as_bool()),
        (Some(true), Some(true)),
        "{v}"
    );
    // One more rotation: the key leaves; the token had expired by then anyway.
    let after_r3 = rotated(&mut c, &after_r2);
    assert!(!after_r3.contains(&kid), "{after_r3:?}");
    let v = c.ask(&format!("validate {token} sts.example.test"));
    assert_eq!(
        (v["local"]["ok"].as_bool(), v["api"]["ok"].as_bool()),
        (Some(false), Some(false)),
        "{v}"
    );
    let keyfile = d.state_dir().join("spiffe-jwt-keys.json");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(keyfile).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
}

/// A free loopback port in this test file's range (19450-19499 of the `spiffe` helper's
/// 19400-19599): the daemon's config names the port, so it is found here first.
fn free_port() -> u16 {
    (19450..19500)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port in 19450-19499")
}

/// GET `url` with curl (a real HTTP client over TCP): (status, content type, body).
fn http_get(method: &str, url: &str) -> (u16, String, String) {
    let out = std::process::Command::new("curl")
        .args(["-s", "-m", "10", "-o", "-", "-w", "\n%{http_code} %{content_type}", "-X", method])
        .arg(url)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    let (code, ctype) = tail.split_once(' ').unwrap_or((tail, ""));
    (code.parse().unwrap_or(0), ctype.to_string(), body.to_string())
}

/// The optional OIDC discovery listener (`[spiffe] oidc_listen`, loopback, plain HTTP): curl
/// gets the discovery document and the JWKS over TCP, both exactly as specified, with the
/// issuer defaulting to `http://<oidc_listen>`; the JWKS is the Workload API's bundle (the
/// same kids py-spiffe fetches) and holds public keys only; a JWT-SVID fetched by py-spiffe
/// over the Workload API verifies against it with PyJWT (signature, `iss` = the discovery
/// issuer, `aud`), and a token altered after signing does not; only GET is served.
#[test]
fn oidc_listener_serves_discovery_and_a_jwks_that_verifies_svids() {
    if !root_or_skip("oidc_listener_serves_discovery_and_a_jwks_that_verifies_svids")
        || !have_py_spiffe("oidc_listener_serves_discovery_and_a_jwks_that_verifies_svids")
    {
        return;
    }
    let cg = TestCgroup::new("spiffe-oidc");
    let port = free_port();
    let d = Daemon::start(
        &cg,
        &format!(
            "[spiffe]\ntrust_domain = \"example.org\"\noidc_listen = \"127.0.0.1:{port}\"\n{POLICY}"
        ),
    );
    let iss = format!("http://127.0.0.1:{port}");

    let (code, ctype, body) = http_get("GET", &format!("{iss}/.well-known/openid-configuration"));
    assert_eq!((code, ctype.as_str()), (200, "application/json"), "{body}");
    let disco: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        disco,
        json!({
            "issuer": iss,
            "jwks_uri": format!("{iss}/keys"),
            "authorization_endpoint": format!("{iss}/authorize"),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "claims_supported": ["sub", "aud", "exp", "iat", "iss", "jti", "grant_id", "intent"],
        })
    );
    // The mint socket serves the same document.
    assert_eq!(d.curl("GET", "/.well-known/openid-configuration", None), (200, disco.clone()));

    let (code, ctype, body) = http_get("GET", disco["jwks_uri"].as_str().unwrap());
    assert_eq!((code, ctype.as_str()), (200, "application/json"), "{body}");
    let jwks: Value = serde_json::from_str(&body).unwrap();
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{jwks}");
    let k = keys[0].as_object().unwrap();
    let mut fields: Vec<&str> = k.keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(fields, ["alg", "crv", "kid", "kty", "use", "x", "y"], "public members only");
    assert_eq!(
        (k["kty"].as_str(), k["crv"].as_str(), k["alg"].as_str(), k["use"].as_str()),
        (Some("EC"), Some("P-256"), Some("ES256"), Some("jwt-svid"))
    );
    for c in ["x", "y"] {
        assert_eq!(B64.decode(k[c].as_str().unwrap()).unwrap().len(), 32, "{c}");
    }
    assert_eq!(d.curl("GET", "/keys", None), (200, jwks.clone()));

    // A JWT-SVID from the Workload API, with the bundle the client sees.
    let mut c = Client::start(&cg, &d.runtime_dir().join("spiffe.sock"));
    let b = c.ask("bundle");
    assert_eq!(b["kids"], json!([k["kid"]]), "{b}");
    let g = grant(&d, "deploy", c.pid, "1m");
    let r = c.ask("fetch sts.example.test");
    let token = svids(&r)[0]["token"].as_str().unwrap().to_string();
    assert_eq!(header(&token)["kid"], k["kid"]);
    assert_eq!(claims(&token)["iss"], iss.as_str());
    let verify = |token: &str, aud: &str| {
        std::process::Command::new(python())
            .args(["-c", OIDC_VERIFY, &disco.to_string(), &jwks.to_string(), token, aud])
            .output()
            .unwrap()
    };
    let out = verify(&token, "sts.example.test");
    assert!(out.status.success(), "PyJWT: {}", String::from_utf8_lossy(&out.stderr));
    let verified: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verified["grant_id"], g["id"]);
    assert_eq!(verified["sub"], "spiffe://example.org/intent/deploy");
    assert_eq!(verified["iss"], iss.as_str());
    // Wrong audience, and a payload altered after signing: refused by the same verifier.
    let out = verify(&token, "vault.example.test");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("InvalidAudienceError"));
    let mut cl = claims(&token);
    cl["sub"] = json!("spiffe://example.org/intent/admin");
    let parts: Vec<&str> = token.split('.').collect();
    let forged = format!("{}.{}.{}", parts[0], B64.encode(cl.to_string()), parts[2]);
    let out = verify(&forged, "sts.example.test");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("InvalidSignatureError"));

    // GET only; nothing else is routed.
    let (code, _, body) = http_get("POST", &format!("{iss}/keys"));
    assert_eq!(code, 405, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"]["code"],
        "method_not_allowed"
    );
    let (code, _, body) = http_get("GET", &format!("{iss}/v1/grants"));
    assert_eq!(code, 404, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"]["code"], "not_found");
}
