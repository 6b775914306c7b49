//! Attacks on the daemon's lifecycle: a restart (SIGTERM, as `systemctl restart` and package
//! upgrades send) must not forget running agents; a start without pins must find them; pins
//! go only through `enforcer detach`; PROC_GRANTS entries never outlive their process.
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use enforcer::kernel::grants::ActMaps;
use enforcer_tests::*;

/// Enforce mode, a copy of python3 selected as an `[[agent]]` by its inode, no intent
/// covering `bad_port`.
fn agent_policy(dir: &std::path::Path, agent: &std::path::Path, ok_port: u16) -> String {
    format!(
        "mode = \"enforce\"\n[[secret]]\nname = \"key\"\npaths = [\"{}/nothing\"]\n\
         [[intent]]\nname = \"job\"\nagents = [{{ uid = 0 }}]\nsecrets = [\"key\"]\n\
         destinations = [\"127.0.0.1/32:{ok_port}\"]\non_violation = \"deny\"\n\
         [[agent]]\nexe = \"{}\"\n",
        dir.display(),
        agent.display()
    )
}

/// A long-running agent in the cgroup: connects to each port it reads on stdin, answers
/// "ok" or the errno name.
fn spawn_agent(cg: &TestCgroup, agent: &std::path::Path) -> Child {
    let script = r#"
import errno, socket, sys
for line in sys.stdin:
    try:
        socket.create_connection(("127.0.0.1", int(line)), timeout=3).close(); print("ok", flush=True)
    except OSError as e:
        print(errno.errorcode.get(e.errno, str(e.errno)), flush=True)
"#;
    let mut c = cg.command(agent);
    c.args(["-u", "-c", script]).stdin(Stdio::piped()).stdout(Stdio::piped());
    c.spawn().unwrap()
}

fn ask(c: &mut Child, port: u16) -> String {
    writeln!(c.stdin.as_mut().unwrap(), "{port}").unwrap();
    let mut line = String::new();
    BufReader::new(c.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    line.trim().to_string()
}

struct Setup {
    cg: TestCgroup,
    dir: tempfile::TempDir,
    agent: std::path::PathBuf,
    ok_port: u16,
    bad_port: u16,
}

fn setup(name: &str) -> Option<Setup> {
    if !root_or_skip(name) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("agent-py");
    std::fs::copy(python(), &agent).unwrap();
    let (ok_port, bad_port) = (tcp_listener(), tcp_listener());
    Some(Setup { cg: TestCgroup::new(name), dir, agent, ok_port, bad_port })
}

#[test]
fn sigterm_keeps_a_running_agent_constrained_and_restart_adopts() {
    let Some(s) = setup("restart-agent") else { return };
    let mut daemon = Daemon::start(&s.cg, &agent_policy(s.dir.path(), &s.agent, s.ok_port));
    let mut agent = spawn_agent(&s.cg, &s.agent);
    assert_eq!(ask(&mut agent, s.bad_port), "EPERM", "agent without a grant is denied");
    assert!(daemon.stop().success());
    assert!(daemon.pin_dir.join("PROC_GRANTS").exists(), "SIGTERM must leave the pins");
    let stopped = daemon.one_event("agent_stopped", |e| e.kind == "agent_stopped");
    assert!(stopped.message.unwrap_or_default().contains("enforcer detach"));
    // No daemon: the kernel still judges the agent, no new exec needed.
    assert_eq!(ask(&mut agent, s.bad_port), "EPERM", "denied while no daemon runs");
    daemon.relaunch();
    assert!(daemon.log().contains("adopted the previous daemon's pinned maps"), "{}", daemon.log());
    assert_eq!(ask(&mut agent, s.bad_port), "EPERM", "denied after the restart");
    let st = daemon.status_json();
    assert!(st["fail_open"].to_string().contains("enforcer detach"), "{st}");
    let _ = agent.kill();
    let _ = agent.wait();
}

#[test]
fn an_agent_started_before_any_daemon_is_denied_once_ready() {
    let Some(s) = setup("restart-before") else { return };
    let daemon = Daemon::configure(&s.cg, &agent_policy(s.dir.path(), &s.agent, s.ok_port));
    assert!(!daemon.pin_dir.exists(), "fresh pin dir");
    let mut agent = spawn_agent(&s.cg, &s.agent);
    // Its fork below happens before the daemon too: a child of a running agent.
    assert_eq!(ask(&mut agent, s.bad_port), "ok", "no daemon, no pins: not judged");
    let daemon = daemon.launch();
    // Ready (status answers): the running agent is marked without a new exec.
    assert_eq!(ask(&mut agent, s.bad_port), "EPERM", "{}", daemon.log());
    let st = daemon.status_json();
    assert!(st["kernel"]["agents_marked_at_start"].as_u64().unwrap_or(0) >= 1, "{st}");
    let _ = agent.kill();
    let _ = agent.wait();
}

#[test]
fn detach_refuses_while_the_daemon_runs_then_removes_the_pins() {
    let Some(s) = setup("restart-detach") else { return };
    let mut daemon = Daemon::start(&s.cg, &agent_policy(s.dir.path(), &s.agent, s.ok_port));
    let mut agent = spawn_agent(&s.cg, &s.agent);
    assert_eq!(ask(&mut agent, s.bad_port), "EPERM");
    let config = daemon.config.display().to_string();
    let out = daemon.cli(&["detach", "--config", &config]);
    assert!(!out.status.success(), "detach must refuse while a daemon runs");
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing"), "{out:?}");
    assert!(daemon.pin_dir.join("PROC_GRANTS").exists());
    assert_eq!(ask(&mut agent, s.bad_port), "EPERM");
    assert!(daemon.stop().success());
    let out = daemon.cli(&["detach", "--config", &config]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("link-connect4") && text.contains("PROC_GRANTS"), "{text}");
    assert!(!daemon.pin_dir.exists(), "pin dir left after detach");
    assert_eq!(ask(&mut agent, s.bad_port), "ok", "after detach connects are not judged");
    let _ = agent.kill();
    let _ = agent.wait();
}

/// A pid that no longer exists (a reaped child).
fn dead_pid() -> u32 {
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

#[test]
fn no_entry_outlives_its_process_and_leftovers_are_swept() {
    let Some(s) = setup("restart-leak") else { return };
    let (_sdir, secret) = secret_file("key.json", "{\"k\": 1}");
    // Monitor mode: opens are let through and taint the opener.
    let daemon =
        Daemon::start(&s.cg, &format!("[[secret]]\nname = \"key\"\npaths = [\"{secret}\"]\n"));
    let maps = ActMaps::open_pinned(&daemon.pin_dir).unwrap();
    let before = maps.entries().len();

    // Openers SIGKILLed while their opens wait (or just after): none leaves an entry.
    let mut killed = Vec::new();
    for i in 0..40u64 {
        let mut c = s.cg.command(python());
        c.args(["-c", "import sys\nwhile True: open(sys.argv[1]).read()", &secret]);
        let mut child = c.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(30 + (i * 7) % 40));
        let _ = child.kill();
        let _ = child.wait();
        killed.push(child.id());
    }
    std::thread::sleep(Duration::from_millis(500));
    let leaked: Vec<u32> =
        maps.entries().into_iter().map(|(p, _)| p).filter(|p| killed.contains(p)).collect();
    assert!(leaked.is_empty(), "entries of killed openers left: {leaked:?}");
    assert!(maps.entries().len() <= before, "PROC_GRANTS grew");
    assert!(daemon.events().iter().any(|e| e.kind == "file_open"), "no open was judged");

    // The taint path on a process that exited (reaped, or a zombie) writes nothing.
    let gone = dead_pid();
    let w = enforcer::act::write_state(&maps, gone, 0, 1, 0).unwrap();
    assert_eq!(w, enforcer::act::Written::Gone);
    let mut zombie = std::process::Command::new("true").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let w = enforcer::act::write_state(&maps, zombie.id(), 0, 1, 0).unwrap();
    assert_eq!(w, enforcer::act::Written::Gone, "a zombie is gone");
    zombie.wait().unwrap();
    assert!(!maps.entries().iter().any(|(p, _)| *p == gone || *p == zombie.id()));

    // Leftovers planted as an old daemon would have: a dead pid, and a live pid whose entry
    // predates the process (a reused pid). The sweep removes both.
    let planted_dead = dead_pid();
    assert!(maps.create(planted_dead, 1, 1, 0).unwrap());
    let mut live = std::process::Command::new("sleep").arg("120").spawn().unwrap();
    assert!(maps.create(live.id(), 1, 1, 0).unwrap());
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let pids: Vec<u32> = maps.entries().into_iter().map(|(p, _)| p).collect();
        if !pids.contains(&planted_dead) && !pids.contains(&live.id()) {
            break;
        }
        assert!(Instant::now() < deadline, "stale entries not swept: {pids:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = live.kill();
    let _ = live.wait();
    // The status document is refreshed every second.
    let deadline = Instant::now() + Duration::from_secs(5);
    let st = loop {
        let st = daemon.status_json();
        if st["kernel"]["stale_entries_removed"].as_u64().unwrap_or(0) >= 2 {
            break st;
        }
        assert!(Instant::now() < deadline, "{st}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(st["kernel"]["proc_entries"].is_u64(), "{st}");
}
