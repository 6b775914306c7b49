//! Process lineage: every event names the right pid, ppid, exe and cmdline, for
//! grandchildren, short-lived and daemonized processes, and for ones older than the daemon.
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

use enforcer_tests::*;

struct Fixture {
    cg: TestCgroup,
    daemon: Daemon,
    secret: String,
    _dir: tempfile::TempDir,
}

fn config(secret: &str) -> String {
    format!("[[secret]]\nname = \"token\"\nkind = \"token\"\npaths = [\"{secret}\"]\n")
}

fn token_file() -> (tempfile::TempDir, String) {
    secret_file("token", "t0k3n")
}

fn fixture(name: &str) -> Option<Fixture> {
    if !root_or_skip(name) {
        return None;
    }
    let (dir, secret) = token_file();
    let cg = TestCgroup::new(name);
    let daemon = Daemon::start(&cg, &config(&secret));
    Some(Fixture { cg, daemon, secret, _dir: dir })
}

#[test]
fn grandchild_is_attributed_with_its_parent() {
    let Some(f) = fixture("grandchild") else { return };
    // python (child) starts cat (grandchild) and reports both pids.
    let script = format!(
        "import os, subprocess\np = subprocess.Popen(['cat', {:?}], stdout=subprocess.DEVNULL)\np.wait()\nprint(os.getpid(), p.pid)\n",
        f.secret
    );
    let (child, out) = f.cg.run(&python(), &["-c", &script]);
    let pids: Vec<u32> = out.split_whitespace().map(|s| s.parse().unwrap()).collect();
    assert_eq!(pids[0], child);
    let e = f.daemon.one_event("file_open of grandchild", by("file_open", pids[1]));
    assert_eq!(e.process.ppid, child);
    assert_eq!(e.process.exe, which("cat"));
    // An alert carries the ancestry and what exactly ran.
    let chain = &e.process.parent_chain;
    assert!(chain.len() >= 2, "{e:?}");
    assert_eq!(chain[0].pid, child, "{e:?}");
    assert_eq!(chain[0].exe, python());
    assert_eq!(chain[1].pid, std::process::id());
    let sum = std::process::Command::new("sha256sum").arg(which("cat")).output().unwrap();
    let sum = String::from_utf8_lossy(&sum.stdout).split_whitespace().next().unwrap().to_string();
    assert_eq!(e.process.exe_sha256.clone().flatten().as_deref(), Some(sum.as_str()));
    assert_eq!(e.process.cmdline, format!("cat {}", f.secret));
    assert_eq!(e.process.cgroup, f.cg.rel());
    assert_eq!(e.file().secret, "token");
}

#[test]
fn exec_into_another_binary_reports_the_new_image() {
    let Some(f) = fixture("exec") else { return };
    // sh execs cat: same pid, new exe and cmdline.
    let (pid, _) = f.cg.run("sh", &["-c", &format!("exec cat '{}'", f.secret)]);
    let e = f.daemon.one_event("file_open after exec", by("file_open", pid));
    assert_eq!(e.process.exe, which("cat"));
    assert_eq!(e.process.cmdline, format!("cat {}", f.secret));
}

#[test]
fn daemonized_grandchild_double_fork_setsid() {
    let Some(f) = fixture("daemonize") else { return };
    let script = format!(
        "import os, sys, time\nr, w = os.pipe()\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        open({:?}).read()\n        os.write(w, str(os.getpid()).encode())\n        os._exit(0)\n    os._exit(0)\nos.close(w)\nprint(os.read(r, 32).decode())\n",
        f.secret
    );
    let (_, out) = f.cg.run(&python(), &["-c", &script]);
    let pid: u32 = out.trim().parse().unwrap();
    let e = f.daemon.one_event("file_open of daemonized grandchild", by("file_open", pid));
    assert_eq!(e.process.exe, python());
    assert_eq!(e.process.cgroup, f.cg.rel());
}

#[test]
fn thread_is_attributed_to_its_process() {
    let Some(f) = fixture("thread") else { return };
    let script = format!(
        "import os, threading\nt = threading.Thread(target=lambda: open({:?}).read())\nt.start(); t.join()\nprint(os.getpid())\n",
        f.secret
    );
    let (pid, out) = f.cg.run(&python(), &["-c", &script]);
    assert_eq!(out.trim(), pid.to_string());
    let e = f.daemon.one_event("file_open from a thread", by("file_open", pid));
    assert_eq!(e.process.exe, python());
}

#[test]
fn cmdline_arguments_with_spaces_are_quoted() {
    let Some(f) = fixture("argv") else { return };
    let script = "import os, sys\nopen(sys.argv[1]).read()\nprint(os.getpid())";
    let (pid, _) = f.cg.run(&python(), &["-c", script, &f.secret, "two words"]);
    let e = f.daemon.one_event("file_open", by("file_open", pid));
    assert_eq!(e.process.cmdline, format!("{} -c {script:?} {} \"two words\"", python(), f.secret));
}

#[test]
fn process_started_before_the_daemon() {
    if !root_or_skip("before_daemon") {
        return;
    }
    let (_dir, secret) = token_file();
    let cg = TestCgroup::new("before");
    let script = format!(
        "import os, sys\nsys.stdout.write('ready\\n'); sys.stdout.flush()\nsys.stdin.readline()\nopen({secret:?}).read()\nprint(os.getpid())\n"
    );
    let mut child = cg
        .command(python())
        .args(["-c", &script, "--marker"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    let daemon = Daemon::start(&cg, &config(&secret));
    child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), pid.to_string());
    child.wait().unwrap();
    let e = daemon.one_event("file_open by pre-existing process", by("file_open", pid));
    assert_eq!(e.process.exe, python());
    assert_eq!(e.process.ppid, std::process::id());
    assert!(e.process.cmdline.ends_with("--marker"), "{e:?}");
    assert_eq!(e.process.cgroup, cg.rel());
}

#[test]
fn environment_static_keys_are_reported_by_name_and_fingerprint_only() {
    let Some(f) = fixture("envkey") else { return };
    let value = "AKIAvalue-that-must-never-appear-0123456789";
    let out =
        f.cg.command("sh")
            .args(["-c", "exec sleep 0.2"])
            .env("DEPLOY_API_KEY", value)
            .env("ENFORCER_JOB_ID", "job-7")
            .env("ENFORCER_JOB_NAME", "deploy")
            .output()
            .unwrap();
    assert!(out.status.success());
    let e = f.daemon.one_event("env_credential", |e: &Event| e.kind == "env_credential");
    assert_eq!(e.verdict, "no_grant");
    assert_eq!(e.mitre, ["T1078"]);
    let job = e.process.job.as_ref().unwrap_or_else(|| panic!("no job: {e:?}"));
    assert_eq!(job.id, "job-7");
    assert_eq!(job.name.as_deref(), Some("deploy"));
    let creds = &e.process.env_credentials;
    assert_eq!(creds.len(), 1, "{e:?}");
    assert_eq!(creds[0].name, "DEPLOY_API_KEY");
    assert_eq!(creds[0].fingerprint.len(), 16);
    let stored = std::fs::read_to_string(f.daemon.state_dir().join("events.jsonl")).unwrap();
    assert!(!stored.contains(value), "a credential value reached the event store");
    assert!(!f.daemon.log().contains(value), "a credential value reached the log");
}
