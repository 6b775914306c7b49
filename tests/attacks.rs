//! The attacker's procedures against the kernel side, each with its fixed outcome: a process
//! that actively tries to get a credential (or a connection) past the agent.
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use enforcer_tests::*;

/// A copy of python3 selected as an `[[agent]]` by its inode, an intent allowing only
/// `ok_port`, enforce mode.
struct AgentFixture {
    cg: TestCgroup,
    daemon: Daemon,
    agent: std::path::PathBuf,
    ok_port: u16,
    bad_port: u16,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

fn agent_fixture(name: &str) -> Option<AgentFixture> {
    if !root_or_skip(name) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    // The secret's directory is watched (every open in it waits for the daemon): keep the
    // agent's executable elsewhere, or stopping the daemon would stall the agent's exec.
    let secret_dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("agent-py");
    std::fs::copy(python(), &agent).unwrap();
    let (ok_port, bad_port) = (tcp_listener(), tcp_listener());
    let policy = format!(
        "mode = \"enforce\"\n[[secret]]\nname = \"key\"\npaths = [\"{}/nothing\"]\n\
         [[intent]]\nname = \"job\"\nagents = [{{ uid = 0 }}]\nsecrets = [\"key\"]\n\
         destinations = [\"127.0.0.1/32:{ok_port}\"]\non_violation = \"deny\"\n\
         [[agent]]\nexe = \"{}\"\n",
        secret_dir.path().display(),
        agent.display()
    );
    let cg = TestCgroup::new(name);
    let daemon = Daemon::start(&cg, &policy);
    Some(AgentFixture { cg, daemon, agent, ok_port, bad_port, _dirs: (dir, secret_dir) })
}

/// An agent that forks `children` children; each (and the agent itself) connects to
/// `port` and prints "ok" or the errno name, one line per process.
fn agent_forks_and_connects(f: &AgentFixture, port: u16, children: u32) -> Vec<String> {
    let script = format!(
        r#"
import errno, os, socket, sys
def conn():
    try:
        socket.create_connection(("127.0.0.1", {port}), timeout=3).close(); return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
for i in range({children}):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, (conn() + "\n").encode()); os._exit(0)
    os.close(w)
    print(os.read(r, 64).decode().strip(), flush=True)
    os.waitpid(pid, 0)
print(conn(), flush=True)
"#
    );
    let out =
        f.cg.command(&f.agent).args(["-c", &script]).stderr(Stdio::inherit()).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect()
}

/// Sends `count` UDP datagrams to a closed loopback port from a plain process in the
/// cgroup: every sendto is a kernel record, so this fills the ring buffer when nothing
/// drains it. Bounded in count and time.
fn udp_flood(cg: &TestCgroup, count: u32, seconds: u32) -> std::process::Child {
    let script = format!(
        "import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         end = time.time() + {seconds}\nfor i in range({count}):\n    s.sendto(b'', ('127.0.0.1', 9))\n    \
         if i % 4096 == 0 and time.time() > end: break\n"
    );
    cg.command(python()).args(["-c", &script]).stdout(Stdio::null()).spawn().unwrap()
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

fn kernel_counter(d: &Daemon, name: &str) -> u64 {
    d.status_json()["kernel"][name].as_u64().unwrap_or_else(|| panic!("status kernel.{name}"))
}

/// Attack: stop the daemon (nothing drains the ring buffer), fill the buffer with a UDP
/// flood, then start an agent and fork children. Before the fix the agent's exec and its
/// children's forks returned at the failed ring-buffer reservation, before marking the
/// agent or copying its state: they connected anywhere. Now every connect is EPERM and the
/// lost records surface as an `events_lost` alert once the daemon runs again.
#[test]
fn full_ring_buffer_with_the_daemon_stopped_keeps_agents_and_children_confined() {
    let Some(f) = agent_fixture("ringfull-stopped") else { return };
    let pid = f.daemon.child.as_ref().unwrap().id();
    signal(pid, "-STOP");
    // 4 MiB of ~120-byte records is ~35k records: 400k sends fill it with margin.
    let mut flood = udp_flood(&f.cg, 400_000, 60);
    assert!(flood.wait().unwrap().success(), "flood");
    let lines = agent_forks_and_connects(&f, f.bad_port, 5);
    signal(pid, "-CONT");
    assert_eq!(lines, vec!["EPERM"; 6], "agent and each child, with the ring buffer full");
    // The status is rendered once a second: wait for one made after the daemon resumed.
    let t0 = Instant::now();
    while kernel_counter(&f.daemon, "ringbuf_drops") == 0 && t0.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let drops = kernel_counter(&f.daemon, "ringbuf_drops");
    assert!(drops > 0, "the flood did not fill the buffer: {}", f.daemon.status_json());
    assert_eq!(kernel_counter(&f.daemon, "state_full"), 0);
    // Violations have their own ring: every denial is recorded although EVENTS overflowed.
    // The daemon first works through the ~150k flood records it finds on resuming.
    let denied = |e: &Event| e.kind == "connect" && e.action == "denied";
    let lost = |e: &Event| e.kind == "events_lost";
    let t0 = Instant::now();
    let events = loop {
        // ~150k routine records make ~120 MB of events: the outbox rotates on the way.
        let state = f.daemon.state_dir();
        let text = ["events.jsonl.1", "events.jsonl"]
            .iter()
            .map(|n| std::fs::read_to_string(state.join(n)).unwrap_or_default())
            .collect::<String>();
        let events = parse_events(&text);
        let done = events.iter().filter(|e| denied(e)).count() >= 6 && events.iter().any(lost);
        if done || t0.elapsed() > Duration::from_secs(90) {
            break events;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let denials: Vec<&Event> = events.iter().filter(|e| denied(e)).collect();
    assert_eq!(denials.len(), 6, "one alert per denied connect: {denials:#?}");
    assert!(denials.iter().all(|e| e.verdict == "out_of_intent"
        && e.port() == Some(f.bad_port)
        && e.process.pid > 0));
    let lost: Vec<&Event> = events.iter().filter(|e| lost(e)).collect();
    assert!(
        lost.iter().any(|e| e.severity == "high"
            && e.message.as_deref().is_some_and(|m| m.contains("ring buffer full"))),
        "{lost:#?}\n{}\n{}",
        f.daemon.status_json(),
        f.daemon.log().lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    // Allowed destinations still work for the agent once it holds a grant: the denial
    // above is the agent rule, not a broken socket layer.
    let ok = f.cg.command(enforcer_bin())
        .args(["run", "--intent", "job", "--"])
        .arg(&f.agent)
        .args(["-c", &format!("import socket; socket.create_connection(('127.0.0.1', {}), timeout=3).close(); print('ok')", f.ok_port)])
        .env("ENFORCER_RUNTIME_DIR", f.daemon.runtime_dir())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "ok", "{ok:?}");
}

/// Attack, live variant: the daemon runs while a flood competes for the ring buffer; an
/// agent forks children throughout. Every one of them is confined.
#[test]
fn live_flood_does_not_free_an_agents_children() {
    let Some(f) = agent_fixture("ringfull-live") else { return };
    let t0 = Instant::now();
    let mut flood = udp_flood(&f.cg, 2_000_000, 20);
    let mut lines = Vec::new();
    while t0.elapsed() < Duration::from_secs(8) && lines.len() < 200 {
        lines.extend(agent_forks_and_connects(&f, f.bad_port, 10));
    }
    let _ = flood.kill();
    let _ = flood.wait();
    assert!(lines.len() >= 11, "the agent ran: {lines:?}");
    assert!(lines.iter().all(|l| l == "EPERM"), "every agent process denied: {lines:?}");
}

/// Attack: the secret leaves through a process of the granted subtree that never opened it.
/// A shell captures `$(cat secret)` (cat reads, the shell holds the data) and hands it to a
/// new process; a child forked before the read is told to send it. The intent allows every
/// loopback port, the secret is valid only toward `ok_port`: before, both sends to
/// `bad_port` went through (only the opener was tainted); now the grant's subtree is tainted
/// by the read and both are EPERM, with an exfiltration alert naming the process.
#[test]
fn taint_follows_the_data_within_the_granted_subtree() {
    use enforcer_tests::enforce_fixture::*;
    let Some(f) = fixture_with_secret_dest("taint-subtree") else { return };
    // 1. Shell capture: cat reads, the shell keeps the value, python sends it.
    let send = |p: u16| {
        format!(
            "{} -c \"import socket; socket.create_connection(('127.0.0.1', {p}), timeout=3).close()\" \
             && echo ok || echo denied",
            python()
        )
    };
    let script = format!("x=$(cat '{}'); {}; {}", f.secret, send(f.bad_port), send(f.ok_port));
    let out =
        f.cg.command(enforcer_bin())
            .args(["run", "--intent", "wide", "--", "sh", "-c", &script])
            .env("ENFORCER_RUNTIME_DIR", f.daemon.runtime_dir())
            .output()
            .unwrap();
    let lines: Vec<String> =
        String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
    assert_eq!(lines, ["denied", "ok"], "{}", String::from_utf8_lossy(&out.stderr));
    // 2. A child forked before the read, told to connect after it.
    let body = format!(
        "r, w = os.pipe()\npid = os.fork()\nif pid == 0:\n    os.read(r, 1)\n    conn({bad})\n    conn({ok})\n    os._exit(0)\n\
         read()\nos.write(w, b'x')\nos.waitpid(pid, 0)\n",
        bad = f.bad_port,
        ok = f.ok_port
    );
    let (_, lines) = py_run(&f, Some("wide"), &body);
    assert_eq!(lines, ["ok", "EPERM", "ok"], "read, then the child's two connects");
    // 3. Control: no read in the subtree, the same child may use bad_port (the intent allows).
    let body = format!(
        "pid = os.fork()\nif pid == 0:\n    conn({bad})\n    os._exit(0)\nos.waitpid(pid, 0)\n",
        bad = f.bad_port
    );
    let (_, lines) = py_run(&f, Some("wide"), &body);
    assert_eq!(lines, ["ok"], "an untainted subtree keeps the intent's destinations");
    let ev = f.daemon.wait_events("exfiltration alerts", |e: &Event| {
        e.kind == "connect" && e.port() == Some(f.bad_port) && e.action == "denied"
    });
    assert!(ev.len() >= 2, "{ev:#?}");
    for e in &ev {
        assert_eq!(e.verdict, "out_of_intent");
        assert!(e.message.as_deref().unwrap_or("").contains("possible exfiltration"), "{e:#?}");
        assert!(e.process.pid > 0);
    }
}

/// Overlapping destinations are the union of everything covering the address: with
/// `127.0.0.1/32:<a>` and `127.0.0.0/8:<b>` in one intent, 127.0.0.1:<b> was denied (the
/// kernel's trie answers with the longest prefix only, whose ports lacked <b>). Destinations
/// are now written in compiled form; what no destination covers stays denied.
#[test]
fn overlapping_destinations_allow_their_union_in_the_kernel() {
    if !root_or_skip("overlap") {
        return;
    }
    let (a, b, c) = (tcp_listener(), tcp_listener(), tcp_listener());
    let policy = format!(
        "mode = \"enforce\"\n[[secret]]\nname = \"key\"\npaths = [\"/nonexistent/enforcer-overlap\"]\n\
         [[intent]]\nname = \"nested\"\nagents = [{{ uid = 0 }}]\nsecrets = [\"key\"]\n\
         destinations = [\"127.0.0.1/32:{a}\", \"127.0.0.0/8:{b}\"]\non_violation = \"deny\"\n"
    );
    let cg = TestCgroup::new("overlap");
    let daemon = Daemon::start(&cg, &policy);
    let script = format!(
        "import errno, socket\nfor p in ({a}, {b}, {c}):\n    try:\n        \
         socket.create_connection(('127.0.0.1', p), timeout=3).close(); print('ok')\n    \
         except OSError as e:\n        print(errno.errorcode.get(e.errno, e.errno))\n"
    );
    let out = cg
        .command(enforcer_bin())
        .args(["run", "--intent", "nested", "--", &python(), "-c", &script])
        .env("ENFORCER_RUNTIME_DIR", daemon.runtime_dir())
        .output()
        .unwrap();
    let lines: Vec<String> =
        String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
    assert_eq!(lines, ["ok", "ok", "EPERM"], "{}", String::from_utf8_lossy(&out.stderr));
    let ev = daemon.wait_events("the denial", |e: &Event| {
        e.kind == "connect" && e.port() == Some(c) && e.action == "denied"
    });
    assert_eq!(ev[0].verdict, "out_of_intent");
    let allowed = daemon.events();
    assert!(
        allowed
            .iter()
            .any(|e| e.kind == "connect" && e.port() == Some(b) && e.verdict == "allowed"),
        "the wider network's port on the host is allowed and recorded"
    );
}

/// Attack: pass a secret's value on a command line (`sh -c 'tool "$(cat secret)"'`), so
/// that it lands in every event naming the process. The value has no credential-like
/// shape; the daemon knows it because it watches the file, and replaces it with its
/// fingerprint. The raw outbox never contains it.
#[test]
fn a_secret_value_on_a_command_line_never_reaches_the_outbox() {
    if !root_or_skip("cmdline-secret") {
        return;
    }
    let value = "correct horse battery staple 9";
    let (_dir, secret) = secret_file("db-password", value);
    let port = tcp_listener();
    let cg = TestCgroup::new("cmdline-secret");
    let daemon = Daemon::start(&cg, &secret_toml("db", &secret));
    let tool = format!(
        "import socket, sys; socket.create_connection(('127.0.0.1', {port}), timeout=3).close()"
    );
    let script = format!("{} -c \"{tool}\" \"$(cat '{secret}')\"", python());
    let out = cg.command("sh").args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let ev = daemon.wait_events("the tool's connect", |e: &Event| {
        e.kind == "connect" && e.port() == Some(port)
    });
    assert!(ev[0].process.cmdline.contains("[redacted:"), "{:?}", ev[0].process.cmdline);
    let raw = std::fs::read_to_string(daemon.state_dir().join("events.jsonl")).unwrap();
    assert!(!raw.contains(value), "the secret's value reached the outbox");
    assert!(!raw.contains("correct horse"), "part of the value reached the outbox");
}

/// on_violation = "kill" that cannot kill (a daemon without CAP_KILL, a violator of another
/// uid): the use is still denied, the event says `denied` (not `killed`), and a critical
/// `kill_failed` alert names the process that runs on.
#[test]
fn a_kill_that_fails_is_an_alert_of_its_own() {
    if !root_or_skip("kill-failed") {
        return;
    }
    // A secret another uid can reach: world-readable, in a traversable directory.
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("token");
    std::fs::write(&secret, "k").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let policy = format!(
        "mode = \"enforce\"\n[[secret]]\nname = \"key\"\npaths = [\"{}\"]\n\
         [[intent]]\nname = \"killer\"\nagents = [{{ uid = 0 }}]\nsecrets = [\"key\"]\non_violation = \"kill\"\n",
        secret.display()
    );
    let cg = TestCgroup::new("kill-failed");
    let mut daemon = Daemon::configure(&cg, &policy);
    daemon.wrapper =
        ["setpriv", "--bounding-set=-kill", "--inh-caps=-kill", "--"].map(String::from).to_vec();
    let daemon = daemon.launch();
    let out = cg
        .command("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", "cat"])
        .arg(&secret)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the open is denied");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"), "{out:?}");
    let failed = daemon.one_event("kill_failed", |e: &Event| e.kind == "kill_failed");
    assert_eq!((failed.severity.as_str(), failed.action.as_str()), ("critical", "denied"));
    assert_eq!(failed.process.uid, 65534);
    assert!(failed.message.as_deref().unwrap_or("").contains("kill failed"), "{failed:#?}");
    let open = daemon.one_event("the open", |e: &Event| e.kind == "file_open");
    assert_eq!((open.verdict.as_str(), open.action.as_str()), ("no_grant", "denied"));
    assert!(open.path_has(|p| p.contains("kill of") && p.contains("failed")), "{open:#?}");
}
