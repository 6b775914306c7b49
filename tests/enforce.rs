//! Enforcement: in enforce mode a violation gets its intent's on_violation (deny in the
//! kernel before a packet leaves, EPERM on a secret open, kill), and none of the usual
//! ways around the agent work. Every test runs inside its own cgroup.
use std::process::{Command, Stdio};
use std::time::Duration;

use enforcer_tests::*;
use serde_json::Value;

struct Fixture {
    cg: TestCgroup,
    daemon: Daemon,
    secret: String,
    ok_port: u16,
    bad_port: u16,
    dir: tempfile::TempDir,
}

/// Enforce mode; intents: `strict` (deny), `lenient` (alert), `killer` (kill), `revoker`
/// (deny + revoke_on_violation), all covering the secret and `ok_port`.
fn fixture(name: &str, mode: &str, extra: &str) -> Option<Fixture> {
    if !root_or_skip(name) {
        return None;
    }
    let (dir, secret) = secret_file("key.json", "{\"k\": 1}");
    let (ok_port, bad_port) = (tcp_listener(), tcp_listener());
    let intent = |name: &str, secret: &str, on: &str, more: &str| {
        format!(
            "[[intent]]\nname = \"{name}\"\nagents = [{{ uid = 0 }}]\nsecrets = [\"{secret}\"]\ndestinations = [\"127.0.0.1/32:{ok_port}\"]\nmax_ttl = \"10m\"\non_violation = \"{on}\"\n{more}"
        )
    };
    // `killer` covers another secret: an ungranted read of `key` gets the strictest
    // on_violation of the intents covering `key`, which is then deny.
    let policy = format!(
        "mode = \"{mode}\"\n[[secret]]\nname = \"key\"\npaths = [\"{secret}\"]\n[[secret]]\nname = \"other\"\npaths = [\"{secret}.other\"]\n{}{}{}{}{extra}",
        intent("strict", "key", "deny", ""),
        intent("lenient", "key", "alert", ""),
        intent("killer", "other", "kill", ""),
        intent("revoker", "key", "deny", "revoke_on_violation = true\n"),
    );
    let cg = TestCgroup::new(name);
    let daemon = Daemon::start(&cg, &policy);
    Some(Fixture { cg, daemon, secret, ok_port, bad_port, dir })
}

/// A python snippet run in the cgroup, optionally under `enforcer run --intent`. Helpers
/// `conn(port)`, `udp(port)`, `mapped(port)` and `read()` print "ok" or the errno name.
const PRELUDE: &str = r#"
import errno, os, socket, sys
SECRET = sys.argv[1]
def report(f, *a):
    try:
        f(*a); print("ok", flush=True)
    except OSError as e:
        print(errno.errorcode.get(e.errno, str(e.errno)), flush=True)
def _conn(p): socket.create_connection(("127.0.0.1", p), timeout=3).close()
def _udp(p): socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", p))
def _mapped(p):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM); s.settimeout(3); s.connect(("::ffff:127.0.0.1", p)); s.close()
def _read(): open(SECRET).read()
conn = lambda p: report(_conn, p)
udp = lambda p: report(_udp, p)
mapped = lambda p: report(_mapped, p)
read = lambda: report(_read)
"#;

fn py_run(f: &Fixture, intent: Option<&str>, body: &str) -> (Option<i32>, Vec<String>) {
    let script = format!("{PRELUDE}\n{body}\n");
    let mut cmd = match intent {
        Some(i) => {
            let mut c = f.cg.command(enforcer_bin());
            c.args(["run", "--intent", i, "--", &python(), "-c", &script, &f.secret]);
            c
        }
        None => {
            let mut c = f.cg.command(python());
            c.args(["-c", &script, &f.secret]);
            c
        }
    };
    let out = cmd
        .env("ENFORCER_RUNTIME_DIR", f.daemon.runtime_dir())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let lines = String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
    (out.status.code(), lines)
}

fn conn_events(f: &Fixture, port: u16) -> Vec<Value> {
    f.daemon.wait_events("connect", move |e: &Value| {
        e["kind"] == "connect" && e["destination"]["port"] == port
    })
}

#[test]
fn deny_intent_blocks_while_alert_intent_passes() {
    let Some(f) = fixture("denyalert", "enforce", "") else { return };
    let (_, strict) = py_run(
        &f,
        Some("strict"),
        &format!(
            "conn({}); conn({}); udp({}); mapped({})",
            f.ok_port, f.bad_port, f.bad_port, f.bad_port
        ),
    );
    assert_eq!(
        strict,
        ["ok", "EPERM", "EPERM", "EPERM"],
        "strict intent: in-intent connect ok, the rest denied"
    );
    let (_, lenient) = py_run(&f, Some("lenient"), &format!("conn({})", f.bad_port));
    assert_eq!(lenient, ["ok"], "alert intent must not block");
    let ev = conn_events(&f, f.bad_port);
    let denied: Vec<&Value> = ev.iter().filter(|e| e["action"] == "denied").collect();
    let alerted: Vec<&Value> = ev.iter().filter(|e| e["action"] == "alerted").collect();
    assert_eq!(denied.len(), 3, "{ev:#?}");
    assert_eq!(alerted.len(), 1, "{ev:#?}");
    for e in &denied {
        assert_eq!(e["verdict"], "out_of_intent");
        assert_eq!(e["grant"]["intent"], "strict");
    }
    let protos: Vec<&str> =
        denied.iter().map(|e| e["destination"]["protocol"].as_str().unwrap()).collect();
    assert!(protos.contains(&"udp"), "UDP sendto without connect is judged too: {protos:?}");
    assert!(
        denied.iter().all(|e| e["destination"]["ip"] == "127.0.0.1"),
        "mapped IPv6 reported as IPv4"
    );
}

#[test]
fn monitor_mode_never_blocks() {
    let Some(f) = fixture("monitor", "monitor", "") else { return };
    let (_, out) =
        py_run(&f, Some("killer"), &format!("conn({}); udp({}); read()", f.bad_port, f.bad_port));
    assert_eq!(out, ["ok", "ok", "ok"]);
    let (_, out) = py_run(&f, None, "read()");
    assert_eq!(out, ["ok"], "ungranted open is only alerted in monitor mode");
    let ev = conn_events(&f, f.bad_port);
    assert!(ev.iter().all(|e| e["action"] == "alerted" && e["mode"] == "monitor"), "{ev:#?}");
}

#[test]
fn expired_grant_is_denied_in_the_kernel() {
    let Some(f) = fixture("expired", "enforce", "") else { return };
    let script = format!("import time\nconn({p})\ntime.sleep(3.3)\nconn({p})", p = f.ok_port);
    let out =
        f.cg.command(enforcer_bin())
            .args([
                "run",
                "--intent",
                "strict",
                "--ttl",
                "3s",
                "--",
                &python(),
                "-c",
                &format!("{PRELUDE}\n{script}"),
                &f.secret,
            ])
            .env("ENFORCER_RUNTIME_DIR", f.daemon.runtime_dir())
            .output()
            .unwrap();
    let lines: Vec<String> =
        String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
    assert_eq!(lines, ["ok", "EPERM"], "a use after the deadline fails in the kernel");
    let ev = conn_events(&f, f.ok_port);
    let late = ev.iter().find(|e| e["verdict"] == "expired").expect("expired event");
    assert_eq!(late["action"], "denied");
    assert!(late["grant"]["expired_for_ms"].as_u64().unwrap() >= 200);
}

#[test]
fn ungranted_secret_open_fails_with_eperm() {
    let Some(f) = fixture("openperm", "enforce", "") else { return };
    let (_, out) = py_run(&f, None, "read()");
    assert_eq!(out, ["EPERM"]);
    let (_, out) = py_run(&f, Some("strict"), "read()");
    assert_eq!(out, ["ok"], "the grant holder may read it");
    // cat, a symlink, a hard link, /proc/self/fd, openat2, io_uring: all denied.
    let link = f.dir.path().join("link");
    std::os::unix::fs::symlink(&f.secret, &link).unwrap();
    let hard = f.dir.path().join("hard");
    std::fs::hard_link(&f.secret, &hard).unwrap();
    for p in [&f.secret, &link.display().to_string(), &hard.display().to_string()] {
        let out = f.cg.command("cat").arg(p).output().unwrap();
        assert!(!out.status.success(), "cat {p} succeeded");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (_, out) = py_run(
        &f,
        None,
        "fd = os.open(SECRET, os.O_PATH)\nreport(lambda: os.open('/proc/self/fd/%d' % fd, os.O_RDONLY))",
    );
    assert_eq!(out, ["EPERM"], "/proc/self/fd re-open");
    for how in ["openat2", "uring-open"] {
        let out = f.cg.command(helper_bin()).args([how, &f.secret]).output().unwrap();
        assert!(!out.status.success(), "{how} open succeeded");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
            "{how}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ev = f.daemon.wait_events("denied opens", |e: &Value| {
        e["kind"] == "file_open" && e["action"] == "denied"
    });
    assert!(ev.len() >= 7, "{}", ev.len());
    assert!(ev.iter().all(|e| e["verdict"] == "no_grant"));
}

#[test]
fn kill_kills_only_the_offender_and_revokes() {
    let Some(f) = fixture("kill", "enforce", "") else { return };
    let bystander =
        f.cg.command(python()).args(["-c", "import time; time.sleep(20)"]).spawn().unwrap();
    let (code, out) = py_run(
        &f,
        Some("killer"),
        &format!(
            "conn({})\nconn({})\nimport time; time.sleep(5)\nprint('survived')",
            f.ok_port, f.bad_port
        ),
    );
    assert_eq!(out.first().map(String::as_str), Some("ok"));
    assert!(!out.iter().any(|l| l == "survived"), "offender survived: {out:?}");
    assert_eq!(code, Some(128 + 9), "enforcer run returns 128+SIGKILL");
    let mut bystander = bystander;
    assert!(bystander.try_wait().unwrap().is_none(), "bystander was killed");
    let _ = bystander.kill();
    let e = conn_events(&f, f.bad_port)
        .into_iter()
        .find(|e| e["action"] == "killed")
        .expect("killed event");
    assert!(
        e["decision_path"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().starts_with("killed process")),
        "{e}"
    );
    f.daemon.one_event("grant_revoked", |e: &Value| {
        e["kind"] == "grant_revoked" && e["grant"]["intent"] == "killer"
    });
}

#[test]
fn revoke_on_violation_ends_the_grant_for_the_subtree() {
    let Some(f) = fixture("revokeov", "enforce", "") else { return };
    let (_, out) = py_run(
        &f,
        Some("revoker"),
        &format!(
            "conn({ok})\nconn({bad})\nconn({ok})\nimport subprocess\nsubprocess.run([sys.executable, '-c', 'import socket\\ntry:\\n socket.create_connection((\"127.0.0.1\", {ok})).close(); print(\"ok\")\\nexcept OSError: print(\"EPERM\")'])",
            ok = f.ok_port,
            bad = f.bad_port
        ),
    );
    assert_eq!(
        out,
        ["ok", "EPERM", "EPERM", "EPERM"],
        "after the violation the grant is gone for the holder and its children"
    );
    let ev = conn_events(&f, f.ok_port);
    assert!(ev.iter().filter(|e| e["verdict"] == "revoked").count() >= 2, "{ev:#?}");
    f.daemon.one_event("grant_revoked", |e: &Value| {
        e["kind"] == "grant_revoked"
            && e["message"].as_str().unwrap_or("").contains("revoke_on_violation")
    });
}

#[test]
fn history_counts_a_secret_reader_may_not_exfiltrate() {
    // The secret itself is valid only toward ok_port: even a grant covering bad_port
    // cannot carry it there once read.
    let Some(g) = fixture(
        "taint2",
        "enforce",
        "[[intent]]\nname = \"wide\"\nagents = [{ uid = 0 }]\nsecrets = [\"key\"]\ndestinations = [\"127.0.0.0/8:1-65535\"]\non_violation = \"deny\"\n",
    ) else {
        return;
    };
    let body = format!(
        "conn({bad})\nread()\nconn({ok})\nconn({bad})\nimport subprocess\nsubprocess.run([sys.executable, '-c', 'import socket\\ntry:\\n socket.create_connection((\"127.0.0.1\", {bad})).close(); print(\"ok\")\\nexcept OSError: print(\"EPERM\")'])",
        ok = g.ok_port,
        bad = g.bad_port
    );
    // Before reading: the wide grant allows bad_port. After: only where the secret is valid
    // under a grant that covers it... the wide grant covers both, so the secret's own
    // destinations decide: none are set here, so it stays allowed.
    let (_, out) = py_run(&g, Some("wide"), &body);
    assert_eq!(out, ["ok", "ok", "ok", "ok", "ok"], "no secret destinations: the grant decides");
    // Now the same with the secret restricted to ok_port.
    drop(g);
    let Some(h) = fixture_with_secret_dest("taint3") else { return };
    let body = format!(
        "conn({bad})\nread()\nconn({ok})\nconn({bad})\nimport subprocess\nsubprocess.run([sys.executable, '-c', 'import socket\\ntry:\\n socket.create_connection((\"127.0.0.1\", {bad})).close(); print(\"ok\")\\nexcept OSError: print(\"EPERM\")'])",
        ok = h.ok_port,
        bad = h.bad_port
    );
    let (_, out) = py_run(&h, Some("wide"), &body);
    assert_eq!(
        out,
        ["ok", "ok", "ok", "EPERM", "EPERM"],
        "after reading, the secret may go only where it is valid; children inherit"
    );
    let e = conn_events(&h, h.bad_port)
        .into_iter()
        .find(|e| e["action"] == "denied")
        .expect("denied exfiltration");
    assert_eq!(e["verdict"], "out_of_intent");
    assert_eq!(e["mitre"], serde_json::json!(["T1041", "T1567"]));
    assert!(
        e["message"].as_str().unwrap().contains("possible exfiltration of secret \"key\""),
        "{e}"
    );
}

fn fixture_with_secret_dest(name: &str) -> Option<Fixture> {
    if !root_or_skip(name) {
        return None;
    }
    let (dir, secret) = secret_file("key.json", "{\"k\": 1}");
    let (ok_port, bad_port) = (tcp_listener(), tcp_listener());
    let policy = format!(
        "mode = \"enforce\"\n[[secret]]\nname = \"key\"\npaths = [\"{secret}\"]\ndestinations = [\"127.0.0.1/32:{ok_port}\"]\n\
         [[intent]]\nname = \"wide\"\nagents = [{{ uid = 0 }}]\nsecrets = [\"key\"]\ndestinations = [\"127.0.0.0/8:1-65535\"]\non_violation = \"deny\"\n"
    );
    let cg = TestCgroup::new(name);
    let daemon = Daemon::start(&cg, &policy);
    Some(Fixture { cg, daemon, secret, ok_port, bad_port, dir })
}

#[test]
fn agents_are_checked_from_their_first_instruction() {
    if !root_or_skip("agents") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A copy of curl is "the agent": selected by its executable's inode.
    let agent = dir.path().join("agent-curl");
    std::fs::copy(which("curl"), &agent).unwrap();
    let (ok_port, bad_port) = (tcp_listener(), tcp_listener());
    let policy = format!(
        "mode = \"enforce\"\n[[secret]]\nname = \"key\"\npaths = [\"{}/nothing\"]\n[[intent]]\nname = \"agent-job\"\nagents = [{{ uid = 0 }}]\nsecrets = [\"key\"]\ndestinations = [\"127.0.0.1/32:{ok_port}\"]\non_violation = \"deny\"\n[[agent]]\nexe = \"{}\"\n",
        dir.path().display(),
        agent.display()
    );
    let cg = TestCgroup::new("agents");
    let daemon = Daemon::start(&cg, &policy);
    let url = |p: u16| format!("http://127.0.0.1:{p}/");
    // Without any grant: denied from the first connect; plain curl is not an agent.
    let out = cg.command(&agent).args(["-s", "-m", "3", &url(ok_port)]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "agent without grant must fail to connect (curl exit 7)"
    );
    let out = cg
        .command("curl")
        .args(["-s", "-m", "3", "-o", "/dev/null", &url(bad_port)])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(7), "an unselected curl is not an agent");
    // With a grant (via run): inside the intent allowed, outside denied.
    let run = |p: u16| {
        cg.command(enforcer_bin())
            .args(["run", "--intent", "agent-job", "--"])
            .arg(&agent)
            .args(["-s", "-m", "3", "-o", "/dev/null", &url(p)])
            .env("ENFORCER_RUNTIME_DIR", daemon.runtime_dir())
            .output()
            .unwrap()
    };
    assert_ne!(run(ok_port).status.code(), Some(7));
    assert_eq!(run(bad_port).status.code(), Some(7));
    let ev = daemon
        .wait_events("agent denial", |e: &Value| e["kind"] == "connect" && e["action"] == "denied");
    assert!(
        ev.iter().any(|e| e["decision_path"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().contains("agent process"))),
        "{ev:#?}"
    );
}

#[test]
fn bypass_attempts_are_still_judged() {
    let Some(f) = fixture("bypass", "enforce", "") else { return };
    // io_uring connect, as a grant holder, outside the intent.
    let out =
        f.cg.command(enforcer_bin())
            .args(["run", "--intent", "strict", "--"])
            .arg(helper_bin())
            .args(["uring-connect", "127.0.0.1", &f.bad_port.to_string()])
            .env("ENFORCER_RUNTIME_DIR", f.daemon.runtime_dir())
            .output()
            .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "io_uring connect: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A daemonized grandchild (double fork + setsid) still holds the grant and its limits.
    let (_, out) = py_run(
        &f,
        Some("strict"),
        &format!(
            "r, w = os.pipe()\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        try:\n            _conn({})\n            os.write(w, b'ok')\n        except OSError as e:\n            os.write(w, errno.errorcode[e.errno].encode())\n        os._exit(0)\n    os._exit(0)\nos.close(w)\nprint(os.read(r, 16).decode())",
            f.bad_port
        ),
    );
    assert_eq!(out, ["EPERM"], "daemonized grandchild");
    // exec into another binary (curl) keeps the grant's limits.
    let out =
        f.cg.command(enforcer_bin())
            .args([
                "run",
                "--intent",
                "strict",
                "--",
                "sh",
                "-c",
                &format!("exec curl -s -m 3 http://127.0.0.1:{}/", f.bad_port),
            ])
            .env("ENFORCER_RUNTIME_DIR", f.daemon.runtime_dir())
            .output()
            .unwrap();
    assert_eq!(out.status.code(), Some(7), "exec'd curl must be denied");
    // A socket passed over a Unix socket to an ungranted process: its connect is judged by
    // that process's own state. Here the receiver read the secret under no grant... it
    // cannot (enforce), so make it an ungranted reader in a lenient sibling: use the
    // granted sender's socket in an ungranted child of a fresh python (no grant).
    let (_, out) = py_run(
        &f,
        None,
        &format!(
            "import array\na, b = socket.socketpair()\ns = socket.socket()\nif os.fork() == 0:\n    msg, anc, fl, ad = b.recvmsg(1, socket.CMSG_LEN(4))\n    fd = array.array('i', anc[0][2])[0]\n    t = socket.socket(fileno=fd)\n    try:\n        t.connect(('127.0.0.1', {}))\n        os.write(1, b'ok\\n')\n    except OSError as e:\n        os.write(1, (errno.errorcode[e.errno] + '\\n').encode())\n    os._exit(0)\na.sendmsg([b'x'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', [s.fileno()]))])\nos.wait()",
            f.ok_port
        ),
    );
    assert_eq!(out, ["ok"], "an ungranted, untainted receiver makes a plain connection");
    let e = conn_events(&f, f.ok_port)
        .into_iter()
        .find(|e| e["grant"].is_null())
        .expect("receiver's connect");
    assert_eq!(e["verdict"], "allowed", "judged by the receiver's own (empty) grants: {e}");
    // A new network namespace does not escape the cgroup hooks.
    let ns = format!("enf-b-{}", std::process::id() % 10_000);
    let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
    assert!(Command::new("ip").args(["netns", "add", &ns]).status().unwrap().success());
    let _ = Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]).status();
    let out =
        f.cg.command(enforcer_bin())
            .args([
                "run",
                "--intent",
                "strict",
                "--",
                "ip",
                "netns",
                "exec",
                &ns,
                &python(),
                "-c",
                &format!("{PRELUDE}\nconn({})", f.bad_port),
                &f.secret,
            ])
            .env("ENFORCER_RUNTIME_DIR", f.daemon.runtime_dir())
            .output()
            .unwrap();
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    // Inside the new namespace nothing listens; the kernel must refuse before trying.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "EPERM",
        "netns: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn process_started_before_the_daemon_is_enforced() {
    if !root_or_skip("before") {
        return;
    }
    let (_dir, secret) = secret_file("key", "k");
    let cg = TestCgroup::new("before-enf");
    let mut child = cg
        .command(python())
        .args(["-c", &format!("{PRELUDE}\ninput()\nread()"), &secret])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let policy = format!(
        "mode = \"enforce\"\n[[secret]]\nname = \"key\"\npaths = [\"{secret}\"]\n[[intent]]\nname = \"i\"\nsecrets = [\"key\"]\non_violation = \"deny\"\n"
    );
    let _daemon = Daemon::start(&cg, &policy);
    use std::io::Write;
    child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "EPERM");
}

#[test]
fn sigkill_keeps_kernel_enforcement_and_restart_adopts_pins() {
    let Some(mut f) = fixture("failclosed", "enforce", "") else { return };
    // A holder with a live grant and one whose grant will expire while no daemon runs.
    let holder = |ttl: &str| {
        let mut c = f.cg.command(enforcer_bin());
        c.args([
            "run",
            "--intent",
            "strict",
            "--ttl",
            ttl,
            "--",
            &python(),
            "-u",
            "-c",
            &format!("{PRELUDE}\nfor line in sys.stdin: conn(int(line))"),
            &f.secret,
        ])
        .env("ENFORCER_RUNTIME_DIR", f.daemon.runtime_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
        c.spawn().unwrap()
    };
    let mut live = holder("10m");
    let mut short = holder("4s");
    let ask = |c: &mut std::process::Child, port: u16| -> String {
        use std::io::{BufRead, Write};
        writeln!(c.stdin.as_mut().unwrap(), "{port}").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(c.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        line.trim().to_string()
    };
    assert_eq!(ask(&mut live, f.ok_port), "ok");
    assert_eq!(ask(&mut short, f.ok_port), "ok");
    f.daemon.kill9();
    std::thread::sleep(Duration::from_millis(4300));
    // No daemon: the kernel still decides, with expiry.
    assert_eq!(ask(&mut live, f.ok_port), "ok");
    assert_eq!(ask(&mut live, f.bad_port), "EPERM", "deny continues without the daemon");
    assert_eq!(ask(&mut short, f.ok_port), "EPERM", "expiry continues without the daemon");
    // Restart on the same pins: adopted, no window.
    f.daemon.child = None;
    let d = std::mem::replace(&mut f.daemon, Daemon::configure(&f.cg, ""));
    f.daemon = d.launch();
    assert!(
        f.daemon.log().contains("adopted the previous daemon's pinned maps"),
        "{}",
        f.daemon.log()
    );
    assert_eq!(ask(&mut live, f.ok_port), "ok");
    assert_eq!(ask(&mut short, f.ok_port), "EPERM");
    assert_eq!(f.daemon.status_json()["live_grants"], 1);
    let _ = live.kill();
    let _ = short.kill();
    // SIGTERM removes the pins.
    let _ = live.wait();
    let _ = short.wait();
    assert!(f.daemon.stop().success());
    assert!(!f.daemon.pin_dir.exists(), "pins left after SIGTERM");
}

#[test]
fn policy_reload_is_atomic_and_refuses_bad_policy() {
    let Some(f) = fixture("reload", "monitor", "") else { return };
    let (_, out) = py_run(&f, None, "read()");
    assert_eq!(out, ["ok"], "monitor: allowed");
    // An invalid policy is refused; the old one stays.
    let good = std::fs::read_to_string(&f.daemon.config).unwrap();
    std::fs::write(
        &f.daemon.config,
        good.replace("mode = \"monitor\"", "mode = \"enforce\"\nbogus = 1"),
    )
    .unwrap();
    let out = f.daemon.cli(&["policy", "reload"]);
    assert!(!out.status.success(), "bad policy accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bogus"), "{err}");
    let (_, out) = py_run(&f, None, "read()");
    assert_eq!(out, ["ok"], "old (monitor) policy still in force");
    // A valid one applies.
    std::fs::write(&f.daemon.config, good.replace("mode = \"monitor\"", "mode = \"enforce\""))
        .unwrap();
    let out = f.daemon.cli(&["policy", "reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, out) = py_run(&f, None, "read()");
    assert_eq!(out, ["EPERM"], "enforce applied");
    assert_eq!(f.daemon.status_json()["mode"], "enforce");
}

#[test]
fn a_process_that_moves_into_the_cgroup_after_exec_is_judged() {
    let Some(f) = fixture("moved", "enforce", "") else { return };
    // Started outside cgroup_root, joins it, then reads: it is inside when it opens.
    let script = format!(
        "{PRELUDE}\nopen({:?}, 'w').write(str(os.getpid()))\nread()",
        f.cg.path.join("cgroup.procs").display().to_string()
    );
    let out = Command::new(python()).args(["-c", &script, &f.secret]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "EPERM",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_replaced_secret_is_re_marked_at_once() {
    let Some(f) = fixture("replaced", "enforce", "") else { return };
    // Rotation by rename: a new inode at the secret's path.
    let tmp = format!("{}.rotating", f.secret);
    std::fs::write(&tmp, "{\"k\": 2}").unwrap();
    std::fs::rename(&tmp, &f.secret).unwrap();
    // The directory watch re-resolves within milliseconds (the 1 s sweep is only a fallback).
    std::thread::sleep(Duration::from_millis(150));
    let (_, out) = py_run(&f, None, "read()");
    assert_eq!(out, ["EPERM"], "the new inode must be watched at once");
}
