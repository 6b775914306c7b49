//! Grants: minted over the socket, bound to a process subtree in the kernel, and every
//! later secret open and connection judged against them.
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::Duration;

use enforcer_tests::*;
use serde_json::Value;

struct Fixture {
    cg: TestCgroup,
    daemon: Daemon,
    secret: String,
    /// Port inside the intent, and one outside it.
    ok_port: u16,
    bad_port: u16,
    _dir: tempfile::TempDir,
}

fn policy(secret: &str, ok_port: u16, extra: &str) -> String {
    format!(
        "[[secret]]\nname = \"deploy-key\"\npaths = [\"{secret}\"]\n\
         [[intent]]\nname = \"deploy\"\nagents = [{{ uid = 0 }}]\nsecrets = [\"deploy-key\"]\n\
         destinations = [\"127.0.0.1/32:{ok_port}\"]\nmax_ttl = \"10m\"\ndefault_ttl = \"5m\"\n{extra}"
    )
}

fn fixture(name: &str, extra: &str) -> Option<Fixture> {
    fixture_with(name, "", extra)
}

/// `top`: daemon settings (must precede the policy tables); `extra`: more policy tables.
fn fixture_with(name: &str, top: &str, extra: &str) -> Option<Fixture> {
    if !root_or_skip(name) {
        return None;
    }
    let (dir, secret) = secret_file("deploy-key.json", "{\"k\": 1}");
    let (ok_port, bad_port) = (tcp_listener(), tcp_listener());
    let cg = TestCgroup::new(name);
    let daemon = Daemon::start(&cg, &format!("{top}{}", policy(&secret, ok_port, extra)));
    Some(Fixture { cg, daemon, secret, ok_port, bad_port, _dir: dir })
}

/// Script for a python holder: reads commands from stdin, one per line:
/// "open", "connect PORT", "spawn-grandchild", "exit"; answers each with its result.
const HOLDER: &str = r#"
import os, socket, subprocess, sys
secret = sys.argv[1]
print(os.getpid(), flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "open":
        open(secret).read(); print("opened", flush=True)
    elif cmd[0] == "connect":
        s = socket.create_connection(("127.0.0.1", int(cmd[1]))); s.close(); print("connected", flush=True)
    elif cmd[0] == "grandchild":
        # child -> grandchild: reads the secret and connects, prints its pid
        out = subprocess.check_output([sys.executable, "-c",
            "import os, subprocess, sys; p = subprocess.run([sys.executable, '-c', 'import os, socket, sys; open(sys.argv[1]).read(); socket.create_connection((\"127.0.0.1\", int(sys.argv[2]))).close(); print(os.getpid())', sys.argv[1], sys.argv[2]], capture_output=True, text=True); print(p.stdout.strip())",
            secret, cmd[1]], text=True)
        print(out.strip(), flush=True)
    elif cmd[0] == "exit":
        break
"#;

struct Holder {
    child: std::process::Child,
    out: std::io::Lines<BufReader<std::process::ChildStdout>>,
    pid: u32,
}

impl Holder {
    fn start(f: &Fixture) -> Holder {
        let mut child =
            f.cg.command(python())
                .args(["-c", HOLDER, &f.secret])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let pid: u32 = out.next().unwrap().unwrap().trim().parse().unwrap();
        assert_eq!(pid, child.id());
        Holder { child, out, pid }
    }

    fn ask(&mut self, cmd: &str) -> String {
        writeln!(self.child.stdin.as_mut().unwrap(), "{cmd}").unwrap();
        self.out.next().expect("holder answered").unwrap()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn grant_for(f: &Fixture, pid: u32, ttl: &str) -> Value {
    let out = f.daemon.cli(&[
        "grant",
        "request",
        "--intent",
        "deploy",
        "--ttl",
        ttl,
        "--pid",
        &pid.to_string(),
        "--json",
    ]);
    assert!(out.status.success(), "grant request failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn connect_event(f: &Fixture, pid: u32, port: u16) -> Event {
    f.daemon.one_event("connect", move |e: &Event| by("connect", pid)(e) && e.port() == Some(port))
}

/// The id of a grant as the CLI or API returned it.
fn gid(g: &Value) -> &str {
    g["id"].as_str().unwrap_or_else(|| panic!("grant without id: {g}"))
}

/// Whether `e` names the grant `id`.
fn names_grant(e: &Event, id: &str) -> bool {
    e.grant.as_ref().is_some_and(|g| g.id == id)
}

#[test]
fn holder_and_grandchild_allowed_unrelated_process_not() {
    let Some(f) = fixture("allowed", "") else { return };
    let mut h = Holder::start(&f);
    let g = grant_for(&f, h.pid, "5m");
    let id = g["id"].as_str().unwrap().to_string();
    assert_eq!(g["state"], "active");
    assert_eq!(g["subject"]["pid"], h.pid);
    assert_eq!(g["subject"]["exe"], python());
    assert_eq!(g["secrets"], serde_json::json!(["deploy-key"]));
    assert_eq!(h.ask("open"), "opened");
    assert_eq!(h.ask(&format!("connect {}", f.ok_port)), "connected");
    let gc: u32 = h.ask(&format!("grandchild {}", f.ok_port)).parse().unwrap();

    let e = f.daemon.one_event("holder open", by("file_open", h.pid));
    assert_eq!((e.verdict.as_str(), e.action.as_str()), ("allowed", "allowed"), "{e:?}");
    assert_eq!(e.grant().id, id);
    let e = connect_event(&f, h.pid, f.ok_port);
    assert_eq!(e.verdict, "allowed", "{e:?}");
    assert_eq!(e.grant().id, id);
    assert!(e.path_has(|p| p == "kernel verdict agrees"), "{e:?}");
    // The grandchild was forked after the grant: it inherits.
    let e = f.daemon.one_event("grandchild open", by("file_open", gc));
    assert_eq!(e.verdict, "allowed", "{e:?}");
    assert_eq!(e.grant().id, id);
    let e = connect_event(&f, gc, f.ok_port);
    assert_eq!(e.verdict, "allowed", "{e:?}");

    // An unrelated process (same exe) holds nothing.
    let (other, _) = f.cg.run(&python(), &["-c", &format!("open({:?}).read()", f.secret)]);
    let e = f.daemon.one_event("unrelated open", by("file_open", other));
    assert_eq!(e.verdict, "no_grant", "{e:?}");
    assert!(e.grant.is_none());
    let issued = f.daemon.one_event("grant_issued", |e: &Event| e.kind == "grant_issued");
    assert_eq!(issued.grant().id, id);
    assert_eq!(issued.process.pid, h.pid);
    // The ledger records the grant's life: issued, then its use.
    let (code, one) = f.daemon.curl("GET", &format!("/v1/grants/{id}"), None);
    assert_eq!(code, 200);
    let kinds: Vec<&str> =
        one["history"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"issued"), "{one}");
    assert!(kinds.contains(&"used"), "{one}");
}

#[test]
fn out_of_intent_connection() {
    let Some(f) = fixture("ooi", "") else { return };
    let mut h = Holder::start(&f);
    let g = grant_for(&f, h.pid, "5m");
    assert_eq!(h.ask(&format!("connect {}", f.bad_port)), "connected");
    let e = connect_event(&f, h.pid, f.bad_port);
    assert_eq!(e.verdict, "out_of_intent", "{e:?}");
    assert_eq!(e.action, "alerted");
    assert_eq!(e.grant().id, gid(&g));
    assert_eq!(e.severity, "high");
}

#[test]
fn expiry_is_decided_in_the_kernel() {
    let Some(f) = fixture("expiry", "") else { return };
    let mut h = Holder::start(&f);
    let g = grant_for(&f, h.pid, "2s");
    assert_eq!(h.ask(&format!("connect {}", f.ok_port)), "connected");
    std::thread::sleep(Duration::from_millis(2300));
    assert_eq!(h.ask(&format!("connect {}", f.ok_port)), "connected");
    assert_eq!(h.ask("open"), "opened");
    let ok_port = f.ok_port;
    let conns = f.daemon.wait_events("two connects", move |e: &Event| {
        by("connect", h.pid)(e) && e.port() == Some(ok_port)
    });
    let conns: Vec<Event> = if conns.len() < 2 {
        f.daemon.wait_events("second", |_| true);
        f.daemon.events().into_iter().filter(by("connect", h.pid)).collect()
    } else {
        conns
    };
    assert_eq!(conns.len(), 2, "{conns:#?}");
    assert_eq!(conns[0].verdict, "allowed");
    let late = &conns[1];
    assert_eq!(late.verdict, "expired", "{late:?}");
    assert!(late.grant().expired_for_ms.unwrap() >= 200, "{late:?}");
    assert!(
        late.path_has(|p| p == "kernel verdict agrees"),
        "kernel and decide.rs must agree: {late:?}"
    );
    let e = f.daemon.one_event("open after expiry", by("file_open", h.pid));
    assert_eq!(e.verdict, "expired", "{e:?}");
    let exp = f.daemon.one_event("grant_expired", |e: &Event| e.kind == "grant_expired");
    assert_eq!(exp.grant().id, gid(&g));
    let list = f.daemon.cli(&["grant", "list", "--all", "--json"]);
    let v: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(v["grants"][0]["state"], "expired");
}

#[test]
fn revoked_grant_is_refused_for_the_whole_subtree() {
    let Some(f) = fixture("revoke", "") else { return };
    let mut h = Holder::start(&f);
    let g = grant_for(&f, h.pid, "5m");
    let id = g["id"].as_str().unwrap();
    let out = f.daemon.cli(&["grant", "revoke", id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(h.ask(&format!("connect {}", f.ok_port)), "connected");
    assert_eq!(h.ask("open"), "opened");
    let gc: u32 = h.ask(&format!("grandchild {}", f.ok_port)).parse().unwrap();
    assert_eq!(connect_event(&f, h.pid, f.ok_port).verdict, "revoked");
    assert_eq!(f.daemon.one_event("open", by("file_open", h.pid)).verdict, "revoked");
    assert_eq!(connect_event(&f, gc, f.ok_port).verdict, "revoked");
    f.daemon
        .one_event("grant_revoked", |e: &Event| e.kind == "grant_revoked" && names_grant(e, id));
    // Revoking twice is a conflict, not a crash.
    let (code, v) = f.daemon.curl("DELETE", &format!("/v1/grants/{id}"), None);
    assert_eq!(code, 409, "{v}");
    assert_eq!(v["error"]["code"], "not_active");
}

#[test]
fn grant_via_curl_and_token_verifies() {
    let Some(f) = fixture("curl", "") else { return };
    // curl itself is the requester: the grant is bound to curl's pid (and ends with it).
    let (code, g) =
        f.daemon.curl("POST", "/v1/grants", Some(r#"{"intent": "deploy", "ttl": "2h"}"#));
    assert_eq!(code, 201, "{g}");
    assert_eq!(g["subject"]["exe"], which("curl"));
    assert_eq!(g["ttl_clamped"], "requested 2h, clamped to intent max_ttl 10m", "{g}");
    let issued = chrono_secs(&g["issued_at"]);
    let expires = chrono_secs(&g["expires_at"]);
    assert!((expires - issued - 600.0).abs() < 1.0, "{g}");
    let token = g["token"].as_str().unwrap();
    assert_eq!(token.split('.').count(), 3);
    let out = f.daemon.cli(&["grant", "verify", token]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let claims: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(claims["jti"], g["id"]);
    assert_eq!(claims["intent"], "deploy");
    // A tampered token fails.
    let mut parts: Vec<String> = token.split('.').map(String::from).collect();
    parts[1] = parts[1].chars().rev().collect();
    let out = f.daemon.cli(&["grant", "verify", &parts.join(".")]);
    assert!(!out.status.success());
    let (code, keys) = f.daemon.curl("GET", "/v1/keys", None);
    assert_eq!(code, 200);
    assert_eq!(keys["keys"][0]["crv"], "Ed25519");
    // GET one grant, and 404 for an unknown one.
    let (code, one) =
        f.daemon.curl("GET", &format!("/v1/grants/{}", g["id"].as_str().unwrap()), None);
    assert_eq!(code, 200);
    assert_eq!(one["id"], g["id"]);
    assert_eq!(f.daemon.curl("GET", "/v1/grants/g_nope", None).0, 404);
}

fn chrono_secs(v: &Value) -> f64 {
    // RFC 3339 -> seconds since the epoch (a grant issued before midnight expires after it).
    let t = chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    t.timestamp() as f64 + f64::from(t.timestamp_subsec_nanos()) / 1e9
}

#[test]
fn bad_requests_get_json_errors_and_change_nothing() {
    let Some(f) = fixture(
        "badreq",
        "[[intent]]\nname = \"nobody\"\nagents = [{ uid = 4242 }]\nsecrets = [\"deploy-key\"]\n",
    ) else {
        return;
    };
    let cases: &[(&str, u16, &str)] = &[
        (r#"{"intent": "deploy""#, 400, "malformed_json"),
        (r#"["deploy"]"#, 400, "malformed_json"),
        (r#"{"intent": "nope"}"#, 404, "unknown_intent"),
        (r#"{"intent": "deploy", "ttl": "soon"}"#, 400, "invalid_ttl"),
        (r#"{"intent": "deploy", "ttl": "0s"}"#, 400, "invalid_ttl"),
        (r#"{"intent": "deploy", "pid": 0}"#, 400, "invalid_pid"),
        (r#"{"intent": "deploy", "extra": 1}"#, 400, "invalid_request"),
        (r#"{"intent": "nobody"}"#, 403, "agent_not_allowed"),
        (r#"{"intent": "deploy", "pid": 1}"#, 0, ""),
    ];
    for (body, code, err) in cases {
        let (got, v) = f.daemon.curl("POST", "/v1/grants", Some(body));
        if *code == 0 {
            // pid 1 is not curl's descendant; as root the bind is allowed, so only check no crash.
            assert!(got == 201 || got == 403, "{body}: {got} {v}");
            continue;
        }
        assert_eq!(got, *code, "{body}: {v}");
        assert_eq!(v["error"]["code"], *err, "{body}: {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let big = format!(r#"{{"intent": "deploy", "pad": "{}"}}"#, "x".repeat(70 * 1024));
    let (got, v) = f.daemon.curl("POST", "/v1/grants", Some(&big));
    assert_eq!(got, 413, "{v}");
    assert_eq!(v["error"]["code"], "body_too_large");
    oversized_body_sent_slowly_still_gets_its_413(&f.daemon.runtime_dir().join("mint.sock"));
    let (got, _) = f.daemon.curl("PUT", "/v1/grants", Some("{}"));
    assert_eq!(got, 405);
    // Nothing but (at most) the pid-1 grant was issued.
    let out = f.daemon.cli(&["grant", "list", "--all", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["grants"].as_array().unwrap().len() <= 1, "{v}");
    assert!(f.daemon.status_ok(), "daemon must survive bad input");
}

#[test]
fn request_flood_is_rate_limited() {
    let Some(f) = fixture_with("flood", "mint_rate_per_second = 5\n", "") else { return };
    // One python process sends 40 requests on separate connections, as fast as it can.
    let sock = f.daemon.runtime_dir().join("mint.sock");
    let script = format!(
        "import socket, json\ncodes = []\nfor i in range(40):\n    s = socket.socket(socket.AF_UNIX); s.connect({:?})\n    b = b'{{\"intent\": \"deploy\", \"ttl\": \"1m\"}}'\n    s.sendall(b'POST /v1/grants HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n' % len(b) + b)\n    r = b''\n    while True:\n        c = s.recv(65536)\n        if not c: break\n        r += c\n    codes.append(int(r.split()[1]))\nprint(json.dumps(codes))\n",
        sock.display().to_string()
    );
    let (_, out) = f.cg.run(&python(), &["-c", &script]);
    let codes: Vec<u16> = serde_json::from_str(out.trim()).unwrap();
    let ok = codes.iter().filter(|c| **c == 201).count();
    let full = codes.iter().filter(|c| **c == 409).count();
    let limited = codes.iter().filter(|c| **c == 429).count();
    assert_eq!(ok + full + limited, 40, "{codes:?}");
    // One process holds at most 4 grants (409 too_many_grants after that); the limiter
    // lets a burst of 10 through, then about 5/s.
    assert_eq!(ok, 4, "{codes:?}");
    assert!(codes[..10].iter().all(|c| *c != 429), "burst refused: {codes:?}");
    // At most 5/s refill on top of the burst: even a slow host sees most of the rest refused.
    assert!(limited >= 15, "flood not limited: {codes:?}");
    // Every 201 is in the ledger: nothing lost, nothing extra.
    let out = f.daemon.cli(&["grant", "list", "--all", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["grants"].as_array().unwrap().len(), ok);
}

#[test]
fn run_binds_the_subtree_returns_status_and_revokes() {
    let Some(f) = fixture("run", "") else { return };
    let script = format!(
        "import os, socket, sys\nopen({:?}).read()\nsocket.create_connection(('127.0.0.1', {})).close()\nprint(os.getpid())\nsys.exit(7)\n",
        f.secret, f.ok_port
    );
    let out =
        f.cg.command(enforcer_bin())
            .args(["run", "--intent", "deploy", "--ttl", "1m", "--", &python(), "-c", &script])
            .env("ENFORCER_RUNTIME_DIR", f.daemon.runtime_dir())
            .output()
            .unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", String::from_utf8_lossy(&out.stderr));
    let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_eq!(f.daemon.one_event("open", by("file_open", pid)).verdict, "allowed");
    assert_eq!(connect_event(&f, pid, f.ok_port).verdict, "allowed");
    // After CMD exits the grant is over (revoked by run, or ended with its subtree).
    std::thread::sleep(Duration::from_millis(300));
    let v: Value =
        serde_json::from_slice(&f.daemon.cli(&["grant", "list", "--all", "--json"]).stdout)
            .unwrap();
    let state = v["grants"][0]["state"].as_str().unwrap().to_string();
    assert!(state == "revoked" || state == "ended", "{v}");
    // An intent that does not exist: CMD never runs.
    let out =
        f.cg.command(enforcer_bin())
            .args(["run", "--intent", "nope", "--", "sh", "-c", "echo ran"])
            .env("ENFORCER_RUNTIME_DIR", f.daemon.runtime_dir())
            .output()
            .unwrap();
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ran"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown_intent"));
}

#[test]
fn run_forwards_signals() {
    let Some(f) = fixture("runsig", "") else { return };
    let mut child = f.cg.command(enforcer_bin())
        .args(["run", "--intent", "deploy", "--", &python(), "-c", "import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(42))\nprint('up', flush=True)\ntime.sleep(30)\n"])
        .env("ENFORCER_RUNTIME_DIR", f.daemon.runtime_dir())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line, "up\n");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(42), "SIGTERM must reach CMD and its status come back");
}

#[test]
fn daemon_restart_keeps_live_and_expired_grants() {
    let Some(mut f) = fixture("restart", "") else { return };
    let mut h = Holder::start(&f);
    let live = grant_for(&f, h.pid, "5m");
    let mut h2 = Holder::start(&f);
    let short = grant_for(&f, h2.pid, "1s");
    assert!(f.daemon.stop().success());
    std::thread::sleep(Duration::from_millis(1200));
    f.daemon.relaunch();
    assert_eq!(h.ask(&format!("connect {}", f.ok_port)), "connected");
    let e = connect_event(&f, h.pid, f.ok_port);
    assert_eq!(e.verdict, "allowed", "{e:?}");
    assert_eq!(e.grant().id, gid(&live));
    assert_eq!(h2.ask(&format!("connect {}", f.ok_port)), "connected");
    let v: Value =
        serde_json::from_slice(&f.daemon.cli(&["grant", "list", "--all", "--json"]).stdout)
            .unwrap();
    let state_of = |id: &Value| {
        v["grants"].as_array().unwrap().iter().find(|g| g["id"] == *id).unwrap()["state"].clone()
    };
    assert_eq!(state_of(&live["id"]), "active");
    assert_eq!(state_of(&short["id"]), "expired");
    assert_eq!(f.daemon.status_json()["live_grants"], 1);
}

#[test]
fn pid_reuse_cannot_inherit_a_grant() {
    let Some(f) = fixture("pidreuse", "") else { return };
    let h = Holder::start(&f);
    let old = h.pid;
    let g = grant_for(&f, old, "5m");
    drop(h); // killed and reaped: the pid is free
    f.daemon
        .one_event("grant_ended", |e: &Event| e.kind == "grant_ended" && names_grant(e, gid(&g)));
    // Make the kernel hand out the same pid again: write ns_last_pid and fork right away,
    // from one process so nothing else on the host slips in between (bounded attempts).
    let script = format!(
        "import os, socket\nold = {old}\nfor _ in range(200):\n    with open('/proc/sys/kernel/ns_last_pid', 'w') as f: f.write(str(old - 1))\n    pid = os.fork()\n    if pid == 0:\n        if os.getpid() == old:\n            open({:?}).read(); socket.create_connection(('127.0.0.1', {})).close()\n        os._exit(0)\n    os.waitpid(pid, 0)\n    if pid == old:\n        print(pid); break\n",
        f.secret, f.ok_port
    );
    let (_, out) = f.cg.run(&python(), &["-c", &script]);
    let reused: Option<u32> = out.trim().parse().ok();
    let Some(pid) = reused else {
        eprintln!("SKIP pid_reuse: could not get pid {old} reused in 200 forks (busy host)");
        return;
    };
    let e = f.daemon.one_event("open by reused pid", by("file_open", pid));
    assert_eq!(e.verdict, "no_grant", "a reused pid inherited a grant: {e:?}");
    let e = connect_event(&f, pid, f.ok_port);
    assert!(e.grant.is_none(), "{e:?}");
    // And a request naming an exited pid is refused.
    let (code, v) = f.daemon.curl(
        "POST",
        "/v1/grants",
        Some(&format!(r#"{{"intent": "deploy", "pid": {}}}"#, 4_000_000)),
    );
    assert!(code == 404 || code == 400, "{code} {v}");
}

/// A daemon killed the instant it answered 201 (inside the ledger writer's group window, so
/// before SQLite has the grant) keeps the grant: the journal has it, the next start puts it
/// into the ledger and binds it again to its still-running subject.
#[test]
fn grant_answered_201_survives_a_kill_right_after() {
    let Some(mut f) = fixture("journal", "") else { return };
    let mut h = Holder::start(&f);
    let daemon_pid = f.daemon.child.as_ref().unwrap().id();
    let state = f.daemon.state_dir();
    // One process sends the request, reads the whole 201 and SIGKILLs the daemon at once,
    // then reports whether SQLite had the grant (it should not: the group commits 5 ms later).
    let script = format!(
        r#"
import json, os, signal, socket, sqlite3, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
body = json.dumps({{"intent": "deploy", "ttl": "5m", "pid": {hp}}}).encode()
s.sendall(b"POST /v1/grants HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
buf = b""
while b"\r\n\r\n" not in buf:
    buf += s.recv(65536)
head, rest = buf.split(b"\r\n\r\n", 1)
n = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
while len(rest) < n:
    rest += s.recv(65536)
os.kill({daemon_pid}, signal.SIGKILL)
assert head.startswith(b"HTTP/1.1 201"), head
gid = json.loads(rest)["id"]
rows = sqlite3.connect(sys.argv[2]).execute("SELECT COUNT(*) FROM grants WHERE id = ?", (gid,)).fetchone()[0]
print(gid, rows)
"#,
        hp = h.pid
    );
    let sock = f.daemon.runtime_dir().join("mint.sock");
    let out = std::process::Command::new(python())
        .args(["-c", &script])
        .arg(&sock)
        .arg(state.join("ledger.sqlite3"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = f.daemon.child.take().map(|mut c| c.wait());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (id, in_sqlite) = stdout.trim().split_once(' ').unwrap();
    let journal = std::fs::read_to_string(state.join("ledger.journal")).unwrap();
    assert!(journal.contains(id), "the 201 grant {id} is not in the journal");
    if in_sqlite != "0" {
        eprintln!(
            "note: the writer committed {id} before the kill (busy host); replay not exercised"
        );
    }
    f.daemon.relaunch();
    let v: Value =
        serde_json::from_slice(&f.daemon.cli(&["grant", "list", "--all", "--json"]).stdout)
            .unwrap();
    let g = v["grants"].as_array().unwrap().iter().find(|g| g["id"] == id);
    assert_eq!(g.map(|g| g["state"].clone()), Some(Value::from("active")), "{v}");
    assert_eq!(h.ask(&format!("connect {}", f.ok_port)), "connected");
    let e = connect_event(&f, h.pid, f.ok_port);
    assert_eq!((e.verdict.as_str(), e.grant().id.as_str()), ("allowed", id), "{e:?}");
    assert_eq!(std::fs::metadata(state.join("ledger.journal")).unwrap().len(), 0);
}

/// A client still writing an oversized body when the 413 is ready must be able to finish
/// writing and read it: a server that answered and closed with the body unread made the
/// client's next write fail (EPIPE), so curl reported no answer at all (a flake on a loaded
/// host). Writes the body in pauses, so the answer is always ready before the body ends.
fn oversized_body_sent_slowly_still_gets_its_413(sock: &std::path::Path) {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect to mint.sock");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let len = 70 * 1024;
    write!(
        s,
        "POST /v1/grants HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {len}\r\n\r\n"
    )
    .unwrap();
    let chunk = vec![b'x'; len / 8];
    for i in 0..8 {
        std::thread::sleep(Duration::from_millis(30));
        if let Err(e) = s.write_all(&chunk) {
            panic!("write {i} of the oversized body failed before the whole body was sent: {e}");
        }
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&answer);
    assert!(head.starts_with("HTTP/1.1 413"), "answer to a slow oversized body: {head:?}");
}

/// Nice value (field 19 of /proc/PID/task/TID/stat) of each thread of `pid`, by name.
fn thread_nices(pid: u32) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        if let Some(nice) = rest.split_whitespace().nth(19 - 3).and_then(|v| v.parse().ok()) {
            out.push((comm.trim().to_string(), nice));
        }
    }
    out
}

/// One POST /v1/grants on a fresh connection: the status line and the raw header block.
fn post_grant_raw(f: &Fixture) -> (String, String) {
    use std::io::Read;
    let mut s =
        std::os::unix::net::UnixStream::connect(f.daemon.runtime_dir().join("mint.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = r#"{"intent": "deploy", "ttl": "1m"}"#;
    write!(
        s,
        "POST /v1/grants HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let head = resp.split("\r\n\r\n").next().unwrap_or_default().to_string();
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, head)
}

/// The mint API's workers run at nice -10 and the ledger's writer and checkpointer at +10
/// (the slowest grants waited in the run queue behind the writer's group commits); the
/// per-stage timestamps are off unless ENFORCER_MINT_TIMING=1, and then name every stage of
/// an issue in time order.
#[test]
fn api_workers_outrank_ledger_threads_and_timing_stamps_are_opt_in() {
    let Some(f) = fixture("prio", "") else { return };
    let pid = f.daemon.child.as_ref().unwrap().id();
    let nices = thread_nices(pid);
    let of = |name: &str| -> Vec<i64> {
        nices.iter().filter(|(n, _)| n == name).map(|(_, v)| *v).collect()
    };
    assert_eq!(of("api"), [-10, -10], "{nices:?}");
    assert_eq!(of("ledger-writer"), [10], "{nices:?}");
    assert_eq!(of("ledger-checkpoi"), [10], "{nices:?}");
    // Everything else (the daemon loop, decisions, the blocking pools) keeps the default.
    let others = nices.iter().filter(|(n, _)| n != "api" && !n.starts_with("ledger-"));
    assert!(others.clone().count() > 0 && others.clone().all(|(_, v)| *v == 0), "{nices:?}");
    let (status, head) = post_grant_raw(&f);
    assert!(status.contains(" 201 "), "{head}");
    assert!(!head.to_ascii_lowercase().contains("x-enforcer-timing"), "{head}");
    drop(f);

    let Some(mut f) = fixture("timing", "") else { return };
    // Restarted under `env`, which execs the daemon with the variable set.
    f.daemon.stop();
    f.daemon.wrapper = vec!["env".into(), "ENFORCER_MINT_TIMING=1".into()];
    f.daemon.relaunch();
    let (status, head) = post_grant_raw(&f);
    assert!(status.contains(" 201 "), "{head}");
    let stamps = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("x-enforcer-timing:").map(String::from))
        .unwrap_or_else(|| panic!("no timing header: {head}"));
    let stages: Vec<(String, u64)> = stamps
        .trim()
        .split(',')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect();
    let names: Vec<&str> = stages.iter().map(|(k, _)| k.as_str()).collect();
    for want in
        ["read", "attest", "sign", "lock", "kernel_bind", "journal_write", "publish", "respond"]
    {
        assert!(names.contains(&want), "{want} missing: {names:?}");
    }
    // From the request's read on, in time order.
    let from_read: Vec<u64> =
        stages.iter().skip_while(|(k, _)| k != "read").map(|(_, v)| *v).collect();
    assert!(from_read.windows(2).all(|w| w[0] <= w[1]), "{stages:?}");
}
