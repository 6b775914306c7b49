//! Enforcement: in enforce mode a violation gets its intent's on_violation (deny in the
//! kernel before a packet leaves, EPERM on a secret open, kill), and monitor mode never
//! blocks. Every test runs inside its own cgroup. The ways around the agent, and enforcement
//! without a daemon, are in enforce_resilience.rs.

use enforcer_tests::enforce_fixture::*;
use enforcer_tests::*;

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
    let denied: Vec<&Event> = ev.iter().filter(|e| e.action == "denied").collect();
    let alerted: Vec<&Event> = ev.iter().filter(|e| e.action == "alerted").collect();
    assert_eq!(denied.len(), 3, "{ev:#?}");
    assert_eq!(alerted.len(), 1, "{ev:#?}");
    for e in &denied {
        assert_eq!(e.verdict, "out_of_intent");
        assert_eq!(e.grant().intent, "strict");
    }
    let protos: Vec<&str> = denied.iter().map(|e| e.dest().protocol.as_str()).collect();
    assert!(protos.contains(&"udp"), "UDP sendto without connect is judged too: {protos:?}");
    assert!(denied.iter().all(|e| e.dest().ip == "127.0.0.1"), "mapped IPv6 reported as IPv4");
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
    assert!(ev.iter().all(|e| e.action == "alerted" && e.mode == "monitor"), "{ev:#?}");
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
    let late = ev.iter().find(|e| e.verdict == "expired").expect("expired event");
    assert_eq!(late.action, "denied");
    assert!(late.grant().expired_for_ms.unwrap() >= 200, "{late:?}");
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
    let ev = f
        .daemon
        .wait_events("denied opens", |e: &Event| e.kind == "file_open" && e.action == "denied");
    assert!(ev.len() >= 7, "{}", ev.len());
    assert!(ev.iter().all(|e| e.verdict == "no_grant"));
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
        .find(|e| e.action == "killed")
        .expect("killed event");
    assert!(e.path_has(|p| p.starts_with("killed process")), "{e:?}");
    f.daemon.one_event("grant_revoked", |e: &Event| {
        e.kind == "grant_revoked" && e.grant.as_ref().is_some_and(|g| g.intent == "killer")
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
    assert!(ev.iter().filter(|e| e.verdict == "revoked").count() >= 2, "{ev:#?}");
    f.daemon.one_event("grant_revoked", |e: &Event| {
        e.kind == "grant_revoked"
            && e.message.as_deref().unwrap_or("").contains("revoke_on_violation")
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
        .find(|e| e.action == "denied")
        .expect("denied exfiltration");
    assert_eq!(e.verdict, "out_of_intent");
    assert_eq!(e.mitre, ["T1041", "T1567"]);
    assert!(
        e.message.as_deref().unwrap().contains("possible exfiltration of secret \"key\""),
        "{e:?}"
    );
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
    let ev =
        daemon.wait_events("agent denial", |e: &Event| e.kind == "connect" && e.action == "denied");
    assert!(ev.iter().any(|e| e.path_has(|p| p.contains("agent process"))), "{ev:#?}");
}
