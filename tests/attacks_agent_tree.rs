//! Taint follows the data within an `[[agent]]` tree (issue 11): an agent process starts two
//! jobs, C (holding a grant for intent `two`) before B (holding `one`, which covers secret
//! `s1`) reads s1. B and C are siblings, neither a descendant of the other and not in one
//! grant's subtree, but they share the agent tree, so data can pass between them (a pipe,
//! a file). After B's read, C is held to where s1 is valid: its connect inside its own
//! intent is denied with a `connect` event naming s1. Without the read, the same connect
//! goes through.
use std::process::Stdio;

use enforcer::event::Event;
use enforcer_tests::*;

struct Fx {
    cg: TestCgroup,
    daemon: Daemon,
    agent: std::path::PathBuf,
    secret: String,
    two_port: u16,
    _dir: tempfile::TempDir,
}

fn fx(name: &str) -> Option<Fx> {
    if !root_or_skip(name) {
        return None;
    }
    let (dir, secret) = secret_file("s1.json", "{\"k\": \"tree-secret\"}");
    let other = dir.path().join("t2.json");
    std::fs::write(&other, "{\"t\": 2}").unwrap();
    let agent = dir.path().join("agent-py");
    std::fs::copy(python(), &agent).unwrap();
    let (one_port, two_port) = (tcp_listener(), tcp_listener());
    let policy = format!(
        "mode = \"enforce\"\n\
         [[secret]]\nname = \"s1\"\npaths = [\"{secret}\"]\n\
         [[secret]]\nname = \"t2\"\npaths = [\"{}\"]\n\
         [[intent]]\nname = \"one\"\nagents = [{{ uid = 0 }}]\nsecrets = [\"s1\"]\n\
         destinations = [\"127.0.0.1/32:{one_port}\"]\non_violation = \"deny\"\n\
         [[intent]]\nname = \"two\"\nagents = [{{ uid = 0 }}]\nsecrets = [\"t2\"]\n\
         destinations = [\"127.0.0.1/32:{two_port}\"]\non_violation = \"deny\"\n\
         [[agent]]\nexe = \"{}\"\n",
        other.display(),
        agent.display()
    );
    let cg = TestCgroup::new(name);
    let daemon = Daemon::start(&cg, &policy);
    Some(Fx { cg, daemon, agent, secret, two_port, _dir: dir })
}

/// The agent: starts C under intent `two` (waits for its grant), then B under intent
/// `one` (reads s1 when `read`), then lets C connect. Prints C's lines.
fn agent_script(f: &Fx, read: bool) -> String {
    let enforcer = enforcer_bin();
    let py = python();
    let c_script = format!(
        "import errno, os, socket, sys\n\
         print('pid', os.getpid(), flush=True)\n\
         print('ready', flush=True)\n\
         sys.stdin.readline()\n\
         try:\n    socket.create_connection(('127.0.0.1', {}), timeout=3).close(); print('ok', flush=True)\n\
         except OSError as e:\n    print(errno.errorcode.get(e.errno, str(e.errno)), flush=True)\n",
        f.two_port
    );
    let b_body = if read { "open(sys.argv[1]).read()" } else { "pass" };
    format!(
        "import subprocess, sys\n\
         c = subprocess.Popen([{enforcer:?}, 'run', '--intent', 'two', '--', {py:?}, '-c', {c_script:?}],\n\
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)\n\
         pid = c.stdout.readline(); ready = c.stdout.readline()\n\
         subprocess.run([{enforcer:?}, 'run', '--intent', 'one', '--', {py:?}, '-c', 'import sys; {b_body}', {secret:?}], check=True)\n\
         c.stdin.write(b'go\\n'); c.stdin.flush()\n\
         sys.stdout.write(pid.decode() + c.stdout.read().decode())\n\
         c.wait()\n",
        secret = f.secret
    )
}

fn run_agent(f: &Fx, read: bool) -> (u32, String) {
    let out =
        f.cg.command(&f.agent)
            .args(["-c", &agent_script(f, read)])
            .env("ENFORCER_RUNTIME_DIR", f.daemon.runtime_dir())
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let pid = text
        .lines()
        .find_map(|l| l.strip_prefix("pid "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid from C: {text:?}"));
    let result = text.lines().last().unwrap_or("").to_string();
    (pid, result)
}

#[test]
fn a_sibling_job_is_held_to_where_the_trees_secret_is_valid() {
    let Some(f) = fx("agent_tree_taint") else { return };
    // Control: nobody in the tree read s1; C's connect inside its intent goes through.
    let (clean_pid, result) = run_agent(&f, false);
    assert_eq!(result, "ok", "a clean tree's job connects inside its intent");
    // The attack: B reads s1, then C (started before the read) connects.
    let (pid, result) = run_agent(&f, true);
    assert_eq!(result, "EPERM", "C carried the tree's secret out");
    let port = f.two_port;
    let e = f.daemon.one_event("denied connect of C", move |e: &Event| {
        e.kind == "connect" && e.process.pid == pid && e.port() == Some(port)
    });
    assert_eq!((e.verdict.as_str(), e.action.as_str()), ("out_of_intent", "denied"), "{e:?}");
    assert!(e.message.as_deref().unwrap_or("").contains("\"s1\""), "{e:?}");
    let clean: Vec<Event> = f
        .daemon
        .events()
        .into_iter()
        .filter(|e| e.kind == "connect" && e.process.pid == clean_pid)
        .collect();
    assert!(clean.iter().all(|e| e.verdict == "allowed"), "{clean:?}");
}
