//! Daemon lifecycle and CLI contracts: bad config changes nothing, one daemon at a time,
//! clean SIGTERM, status exit codes, stored events readable after the fact.
use std::process::Command;

use enforcer_tests::*;
use serde_json::Value;

#[test]
fn invalid_config_names_file_line_col_and_touches_nothing() {
    if !root_or_skip("invalid_config") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    let run = dir.path().join("run");
    std::fs::write(
        &cfg,
        format!("mode = \"monitor\"\nruntime_dir = \"{}\"\n[[intent]]\nname = \"deploy\"\nsecrets = [\"nope\"]\non_violation = \"explode\"\n", run.display()),
    )
    .unwrap();
    let out = enforcer(&["daemon", "--config", cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let c = cfg.display();
    assert!(err.contains(&format!("{c}:6:16:")), "on_violation position missing:\n{err}");
    assert!(err.contains(&format!("{c}:5:")), "undefined secret position missing:\n{err}");
    assert!(!run.exists(), "daemon created its runtime dir despite an invalid config");
}

#[test]
fn policy_check_reports_and_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[[secret]]\nname = \"k\"\npaths = [\"/etc/k\"]\n[[intent]]\nname = \"i\"\nsecrets = [\"k\"]\ndestinations = [\"127.0.0.1/32:443\"]\n").unwrap();
    let out = enforcer(&["policy", "check", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[secret]]\nname = \"k\"\npaths = [\"/etc/k\"]\ndestinations = [\"10.0.0.0/33:443\"]\n",
    )
    .unwrap();
    let out = enforcer(&["policy", "check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with(&format!("{}:4:17:", bad.display())), "{err}");
}

#[test]
fn second_daemon_refuses_while_one_runs() {
    if !root_or_skip("second_daemon") {
        return;
    }
    let cg = TestCgroup::new("second");
    let d = Daemon::start(&cg, "");
    let out = enforcer(&["daemon", "--config", d.config.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another enforcer daemon is running"), "{err}");
    assert!(d.status_ok(), "first daemon must keep running");
}

#[test]
fn sigterm_detaches_cleanly_and_events_stay_readable() {
    if !root_or_skip("sigterm") {
        return;
    }
    let cg = TestCgroup::new("sigterm");
    let mut d = Daemon::start(&cg, "");
    let status = d.status_json();
    assert_eq!(status["mode"], "monitor");
    assert_eq!(status["cgroup_root"], cg.path.display().to_string());
    // 10 always (3 lineage, connect4/6, sendmsg4/6, recvmsg4/6 for DNS replies, sock_create);
    // egress (or egress_owner) and the two IPC hooks.
    assert_eq!(status["programs_missing"].as_array().map(|m| m.len()), Some(0), "{status}");
    assert_eq!(status["programs"].as_array().unwrap().len(), 13, "{status}");
    for prog in ["cgroup_sock/sock_create", "cgroup_sock_addr/recvmsg4"] {
        assert!(status["programs"].as_array().unwrap().iter().any(|p| p == prog), "{status}");
    }
    assert_eq!(status["kernel"]["ringbuf_drops"], 0);
    // This host refuses BPF-LSM: fanotify decides, and the status says why.
    assert_eq!(status["file_backend"], "fanotify", "{status}");
    assert!(
        status["backends"]["file_open"]
            .as_str()
            .unwrap_or("")
            .starts_with("fanotify (FAN_OPEN_PERM inode marks, decided by the daemon)"),
        "{status}"
    );
    let st = d.stop();
    assert!(st.success(), "daemon exit on SIGTERM: {st}\n{}", d.log());
    assert!(!d.runtime_dir().join("mint.sock").exists(), "socket left behind");
    // No daemon: status must say so with a non-zero exit.
    let out = enforcer(&["status", "--runtime-dir", d.runtime_dir().to_str().unwrap()]);
    assert!(!out.status.success());
    // Stored events outlive the daemon.
    let out =
        enforcer(&["events", "--since", "10m", "--state-dir", d.state_dir().to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let events = parse_events(&String::from_utf8_lossy(&out.stdout));
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"agent_started"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"agent_stopped"), "{kinds:?}");
    for e in &events {
        assert_required_fields(e);
    }
    // After the stop the daemon must not come back by itself; restart works with the same dirs.
    d.relaunch();
    assert!(d.status_ok());
}

#[test]
fn status_fails_without_daemon_and_bad_cli_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = enforcer(&["status", "--runtime-dir", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no daemon answering"));
    let out = enforcer(&[
        "events",
        "--since",
        "yesterday-ish",
        "--state-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--since"));
    let out = enforcer(&["events", "--format", "xml", "--state-dir", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let out = enforcer(&["no-such-command"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn events_since_filters_and_follow_tails() {
    if !root_or_skip("follow") {
        return;
    }
    let cg = TestCgroup::new("follow");
    let d = Daemon::start(&cg, "");
    let mut follow = Command::new(enforcer_bin())
        .args(["events", "--follow", "--state-dir", d.state_dir().to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let port = tcp_listener();
    let (pid, _) = cg.run(
        &python(),
        &["-c", &format!("import socket; socket.create_connection(('127.0.0.1', {port})).close()")],
    );
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(follow.stdout.take().unwrap()).lines();
    let mut seen = false;
    for _ in 0..20 {
        let Some(Ok(line)) = lines.next() else { break };
        let e: Event = serde_json::from_str(&line).unwrap();
        if by("connect", pid)(&e) {
            seen = true;
            break;
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(seen, "--follow did not show the connect of {pid}");
    // --since 0s excludes everything older than now.
    let out =
        enforcer(&["events", "--since", "1ns", "--state-dir", d.state_dir().to_str().unwrap()]);
    std::thread::sleep(std::time::Duration::from_millis(10));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).lines().count() <= 1);
}

#[test]
fn doctor_reports_backends_from_real_loads() {
    if !root_or_skip("doctor") {
        return;
    }
    let out = enforcer(&["doctor", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let probe = |n: &str| {
        v["probes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"].as_str().unwrap().starts_with(n))
            .cloned()
            .unwrap()
    };
    assert_eq!(probe("raw_tracepoint")["ok"], true);
    assert_eq!(probe("cgroup_sock_addr")["ok"], true);
    assert_eq!(probe("fanotify")["ok"], true);
    // This kind of host refuses BPF-LSM (PLATFORM.md); where it loads, say so instead.
    let lsm = probe("lsm/file_open");
    if lsm["ok"] == false {
        assert!(lsm["detail"].as_str().unwrap().contains("Operation not permitted"), "{lsm}");
        assert!(v["backends"]["file_open"].as_str().unwrap().starts_with("fanotify"));
    } else {
        eprintln!("note: BPF-LSM loads on this host");
    }
    assert_eq!(v["ready"], true);
}

#[test]
fn shipped_example_policy_is_valid() {
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/enforcer.toml");
    let out = enforcer(&["policy", "check", example.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok: 2 secrets, 2 intents, 1 agents"));
}

#[test]
fn metrics_and_sighup_reload() {
    if !root_or_skip("metrics") {
        return;
    }
    let cg = TestCgroup::new("metrics");
    let d = Daemon::start(&cg, "");
    // Prometheus text on the socket.
    let out = Command::new("curl")
        .args(["-s", "-m", "5", "--unix-socket"])
        .arg(d.runtime_dir().join("mint.sock"))
        .arg("http://localhost/v1/metrics")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("# TYPE enforcer_events_total counter"), "{text}");
    assert!(text.contains("enforcer_kernel_ringbuf_drops_total 0"), "{text}");
    assert!(text.contains("enforcer_live_grants 0"), "{text}");
    // SIGHUP re-reads the config: here it switches the mode.
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, cfg.replace("mode = \"monitor\"", "mode = \"enforce\"")).unwrap();
    unsafe { libc::kill(d.child.as_ref().unwrap().id() as i32, libc::SIGHUP) };
    d.one_event("policy_reloaded", |e: &Event| e.kind == "policy_reloaded");
    assert_eq!(d.status_json()["mode"], "enforce");
}
