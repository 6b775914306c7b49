//! The kernel-matrix suite: small and focused, because `cargo xtask test` also runs it inside
//! Debian's bookworm 6.1 and bookworm-backports 6.12 kernels under QEMU (TCG, where loading the
//! daemon's programs takes tens of seconds: one daemon for the whole suite), with the host root
//! read-only (xtask/src/matrix/). It passes on the host too. Each test prints the kernel it
//! ran on. What it proves on every kernel: doctor's probes (BPF-LSM included) agree with the
//! kernel, the daemon's programs load and attach, a secret open and a loopback connect are
//! attributed with exact fields, the ungranted open is denied (EPERM), and a grant is allowed
//! then, once expired, denied in the kernel (EPERM), also after SIGKILL of the daemon; the
//! default file backend (`auto`) is BPF-LSM exactly where the kernel runs it, in status and
//! doctor. tests/lsm.rs, also in the guest suite, covers the BPF-LSM backend in depth.
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use enforcer_tests::enforce_fixture::{Fixture, PRELUDE, fixture};
use enforcer_tests::*;
use serde_json::Value;

/// The guest series the matrix runner booted (`6.1`, `6.12`), None on the host.
fn guest_series() -> Option<String> {
    std::env::var("ENFORCER_MATRIX_KERNEL").ok().filter(|s| !s.is_empty())
}

/// `uname -r`, printed with the test's name so every result names its kernel.
fn kernel(test: &str) -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap().trim().to_string();
    let place = match guest_series() {
        Some(s) => format!("QEMU guest, matrix kernel {s}"),
        None => "host".to_string(),
    };
    println!("{test}: kernel {release} ({place})");
    release
}

/// Whether doctor's probe whose name starts with `name` loaded.
fn probe_ok(doc: &Value, name: &str) -> bool {
    let probes = doc["probes"].as_array().unwrap_or_else(|| panic!("doctor has no probes: {doc}"));
    let p = probes
        .iter()
        .find(|p| p["name"].as_str().is_some_and(|n| n.starts_with(name)))
        .unwrap_or_else(|| panic!("doctor has no probe {name}: {doc:#}"));
    p["ok"].as_bool().unwrap()
}

#[test]
fn doctor_reports_what_the_kernel_supports() {
    if !root_or_skip("doctor") {
        return;
    }
    let release = kernel("doctor_reports_what_the_kernel_supports");
    let out = enforcer(&["doctor", "--json"]);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("doctor --json ({e}): {}", String::from_utf8_lossy(&out.stderr))
    });
    assert!(out.status.success(), "doctor: not ready on {release}: {doc:#}");
    assert_eq!(doc["kernel"], release.as_str(), "{doc:#}");
    assert_eq!(doc["ready"], true, "{doc:#}");
    for p in ["raw_tracepoint", "cgroup_sock_addr", "cgroup_sock/sock_create", "fanotify"] {
        assert!(probe_ok(&doc, p), "probe {p} refused on {release}: {doc:#}");
    }
    // The active LSMs as the kernel lists them (securityfs; absent where it is not mounted).
    let lsms = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    let bpf_active = lsms.trim().split(',').any(|l| l == "bpf");
    if guest_series().is_some() {
        assert!(bpf_active, "Debian's {release} runs BPF-LSM by default; LSMs: {lsms:?}");
    }
    let loads = probe_ok(&doc, "lsm/file_open");
    println!("{release}: active LSMs {:?}; doctor: lsm/file_open loads: {loads}", lsms.trim());
    assert_eq!(
        loads, bpf_active,
        "the BPF-LSM probe disagrees with the kernel's LSM list: {doc:#}"
    );
    // The backend doctor names for secret opens follows the probe, and says what fails open.
    let backend = doc["backends"]["file_open"].as_str().unwrap_or_default();
    let note = doc["backends"]["file_open_note"].as_str().unwrap_or_default();
    if loads {
        assert!(backend.starts_with("bpf-lsm"), "{doc:#}");
        assert!(note.starts_with("fails closed"), "{doc:#}");
    } else {
        assert!(backend.starts_with("fanotify"), "{doc:#}");
        assert!(note.contains("fails open"), "{doc:#}");
        // The operator's hint: why BPF-LSM is refused, from the kernel's LSM list.
        let why = if lsms.is_empty() {
            "the active LSM list is unreadable"
        } else if bpf_active {
            "yet the load was refused"
        } else {
            "is not in the active LSM list"
        };
        assert!(note.contains(why), "{doc:#}");
    }
    println!("{release}: doctor: secret opens by {backend}");
}

/// Waits (bounded) for at least `n` events matching `pred`; returns them all.
fn at_least(f: &Fixture, n: usize, what: &str, pred: impl Fn(&Event) -> bool + Copy) -> Vec<Event> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10) * time_scale();
    loop {
        let ev = f.daemon.wait_events(what, pred);
        if ev.len() >= n || std::time::Instant::now() > deadline {
            return ev;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// One enforce-mode daemon (loading it is what takes time in an emulated guest) for: the
/// programs it reports, an ungranted secret open (EPERM, attributed), a loopback connect of an
/// ungranted process (allowed, attributed), a grant allowed then denied expired, and the same
/// expiry enforced by the pinned programs after the daemon is SIGKILLed.
#[test]
fn programs_attribute_opens_and_connects_and_expire_grants_in_the_kernel() {
    let Some(mut f) = fixture("mx", "enforce", "") else { return };
    let release = kernel("programs_attribute_opens_and_connects_and_expire_grants_in_the_kernel");

    // Programs: loaded, attached, reported.
    let st = f.daemon.status_json();
    assert_eq!((st["status"].as_str(), st["mode"].as_str()), (Some("running"), Some("enforce")));
    let programs = st["programs"].as_array().unwrap_or_else(|| panic!("no programs: {st:#}"));
    let attached = programs.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" ");
    for hook in ["task_newtask", "sched_process_exec", "sched_process_exit", "connect4", "connect6"]
        .into_iter()
        .chain(["sendmsg4", "sendmsg6", "sock_create"])
    {
        assert!(attached.contains(hook), "{hook} not attached on {release}: {st:#}");
    }
    // `key` exists; `other` (a path nobody created) is watched for when it appears.
    assert_eq!(
        (st["secrets"]["paths_watched"].as_u64(), st["secrets"]["paths_missing"].as_u64()),
        (Some(1), Some(1)),
        "{st:#}"
    );
    assert!(st["backends"]["file_open"].is_string(), "{st:#}");
    // file_backend = "auto" (the default): BPF-LSM wherever the kernel runs it.
    let lsms = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    let bpf_lsm = lsms.trim().split(',').any(|l| l == "bpf");
    let want = if bpf_lsm { "bpf-lsm" } else { "fanotify" };
    assert_eq!(st["file_backend"].as_str(), Some(want), "LSMs {lsms:?}: {st:#}");
    let out = f.daemon.cli(&["status"]);
    assert!(out.status.success(), "enforcer status: {}", String::from_utf8_lossy(&out.stderr));
    println!("{release}: attached {attached}");

    // An ungranted open of the secret: denied, attributed to cat with the secret's inode.
    let out = f.cg.command("cat").arg(&f.secret).output().unwrap();
    assert!(!out.status.success(), "cat of the secret succeeded without a grant");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Operation not permitted"), "{stderr}");
    let secret = f.secret.clone();
    let e = f.daemon.one_event("file_open", move |e: &Event| {
        e.kind == "file_open" && e.file.as_ref().is_some_and(|x| x.path == secret)
    });
    assert_required_fields(&e);
    let (dev, ino) = dev_ino(Path::new(&f.secret));
    assert_eq!((e.file().dev, e.file().ino), (dev, ino), "{e:?}");
    assert_eq!(e.file().secret, "key", "{e:?}");
    assert_eq!(e.process.exe, which("cat"), "{e:?}");
    assert_eq!(e.process.cmdline, format!("cat {}", f.secret), "{e:?}");
    assert_eq!((e.process.ppid, e.process.uid), (std::process::id(), 0), "{e:?}");
    assert_eq!(e.process.cgroup, f.cg.rel(), "{e:?}");
    assert_eq!(
        (e.verdict.as_str(), e.action.as_str(), e.mode.as_str()),
        ("no_grant", "denied", "enforce")
    );

    // A connect of an ungranted process to a loopback listener: allowed, attributed.
    let port = tcp_listener();
    let script = format!(
        "import os, socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=10); s.close()\nprint(os.getpid())\n"
    );
    let (pid, out) = f.cg.run(&python(), &["-c", &script]);
    assert_eq!(out.trim(), pid.to_string());
    let e = f
        .daemon
        .one_event("connect", move |e: &Event| by("connect", pid)(e) && e.port() == Some(port));
    assert_required_fields(&e);
    assert_eq!(
        (e.dest().ip.as_str(), e.dest().port, e.dest().protocol.as_str()),
        ("127.0.0.1", port, "tcp")
    );
    assert_eq!(e.process.exe, python(), "{e:?}");
    assert_eq!(e.process.ppid, std::process::id(), "{e:?}");
    assert_eq!(e.process.cgroup, f.cg.rel(), "{e:?}");
    assert_eq!(
        (e.verdict.as_str(), e.action.as_str(), e.mode.as_str()),
        ("allowed", "allowed", "enforce")
    );

    // A grant: allowed within its deadline, denied by the kernel after it. The grant is issued
    // before python starts, so sleeping until 6.5 s after python's own start is past the 6 s
    // deadline however slow the (emulated) machine; the first connect runs right at start.
    let script = format!(
        "import time\nt0 = time.time()\nconn({p})\ntime.sleep(max(0.0, 6.5 - (time.time() - t0)))\nconn({p})",
        p = f.ok_port
    );
    let out =
        f.cg.command(enforcer_bin())
            .args(["run", "--intent", "strict", "--ttl", "6s", "--", &python(), "-c"])
            .arg(format!("{PRELUDE}\n{script}"))
            .arg(&f.secret)
            .env("ENFORCER_RUNTIME_DIR", f.daemon.runtime_dir())
            .output()
            .unwrap();
    let lines: Vec<String> =
        String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
    assert_eq!(
        lines,
        ["ok", "EPERM"],
        "granted, then expired: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ok_port = f.ok_port;
    let ev = at_least(&f, 2, "grant connects", move |e: &Event| {
        e.kind == "connect" && e.port() == Some(ok_port)
    });
    assert_eq!(ev.len(), 2, "{ev:#?}");
    assert_eq!((ev[0].verdict.as_str(), ev[0].action.as_str()), ("allowed", "allowed"), "{ev:#?}");
    assert_eq!(ev[0].grant().intent, "strict");
    assert_eq!((ev[1].verdict.as_str(), ev[1].action.as_str()), ("expired", "denied"), "{ev:#?}");
    assert!(ev[1].grant().expired_for_ms.unwrap() >= 200, "{:?}", ev[1]);
    assert!(ev.iter().all(|e| e.path_has(|p| p == "kernel verdict agrees")), "{ev:#?}");
    println!("{release}: open denied, connect attributed, grant allowed then denied expired");

    // Fail closed: the daemon is SIGKILLed while a grant is live; its pinned programs alone
    // deny the holder's connect once the deadline has passed.
    let mut holder =
        f.cg.command(enforcer_bin())
            .args(["run", "--intent", "strict", "--ttl", "6s", "--", &python(), "-c"])
            .arg(format!("{PRELUDE}\n{script}"))
            .arg(&f.secret)
            .env("ENFORCER_RUNTIME_DIR", f.daemon.runtime_dir())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = holder.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wait = Duration::from_secs(10) * time_scale();
    assert_eq!(rx.recv_timeout(wait).as_deref(), Ok("ok"), "the holder's first connect");
    f.daemon.kill9();
    assert_eq!(
        rx.recv_timeout(wait).as_deref(),
        Ok("EPERM"),
        "after SIGKILL of the daemon, the kernel still denies the expired grant"
    );
    let _ = holder.wait();
    println!(
        "{release}: with the daemon killed, the expired grant was denied by the pinned programs"
    );
}

/// The runner's own check: the suite runs on the kernel the matrix booted (not the host's).
#[test]
fn runs_on_the_kernel_the_matrix_booted() {
    let release = kernel("runs_on_the_kernel_the_matrix_booted");
    let out = Command::new("uname").arg("-r").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), release);
    if let Some(series) = guest_series() {
        assert!(release.starts_with(&format!("{series}.")), "booted {release} for series {series}");
    }
}
