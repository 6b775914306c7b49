//! A full PROC_GRANTS map must not set a child free (issue 11: "fail closed for grant
//! holders, agents and tainted processes where any map is full"). The attacker fills the map
//! (here the test does, through the pinned map) so that the fork hook cannot write the
//! child's entry; the child of an `[[agent]]` then connects. Without a fallback the child
//! holds no entry and connects anywhere; with it, the kernel judges the child by its nearest
//! ancestor's entry: EPERM, a `connect` event naming the child, and the loss is counted and
//! reported (`state_full`, a critical `events_lost` event).
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

use enforcer::event::Event;
use enforcer::kernel::grants::ActMaps;
use enforcer_tests::*;

/// Fake tgids far above any pid_max, so no live process is shadowed.
const FAKE_BASE: u32 = 0x7000_0000;

/// Fills PROC_GRANTS until the kernel refuses an insert; the fake pids written.
fn fill(maps: &ActMaps) -> Vec<u32> {
    let mut fakes = Vec::new();
    for i in 0..70_000u32 {
        match maps.create(FAKE_BASE + i, 1, 0, 0) {
            Ok(true) => fakes.push(FAKE_BASE + i),
            Ok(false) => {}
            Err(_) => break,
        }
    }
    fakes
}

fn unfill(maps: &ActMaps, fakes: &[u32]) {
    for &pid in fakes {
        maps.remove_if(pid, 1);
    }
}

fn counter(d: &Daemon, name: &str) -> u64 {
    d.status_json()["kernel"][name].as_u64().unwrap_or(0)
}

#[test]
fn a_full_proc_map_does_not_free_an_agents_child() {
    if !root_or_skip("state_full") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("agent-py");
    std::fs::copy(python(), &agent).unwrap();
    let port = tcp_listener();
    let policy = format!(
        "mode = \"enforce\"\n[[agent]]\nexe = \"{}\"\n[[intent]]\nname = \"job\"\n\
         agents = [{{ uid = 0 }}]\ndestinations = [\"127.0.0.1/32:1\"]\n",
        agent.display()
    );
    let cg = TestCgroup::new("state_full");
    let daemon = Daemon::start(&cg, &policy);
    let maps = ActMaps::open_pinned(&daemon.pin_dir).unwrap();
    // The agent is marked at exec (its entry exists before the map fills); on each "go" it
    // forks a child that connects to the listener.
    let script = format!(
        "import errno, os, socket, sys\n\
         print('ready', flush=True)\n\
         for line in sys.stdin:\n\
         \x20   pid = os.fork()\n\
         \x20   if pid == 0:\n\
         \x20       try:\n\
         \x20           socket.create_connection(('127.0.0.1', {port}), timeout=3).close(); r = 'ok'\n\
         \x20       except OSError as e:\n\
         \x20           r = errno.errorcode.get(e.errno, str(e.errno))\n\
         \x20       print(os.getpid(), r, flush=True)\n\
         \x20       os._exit(0)\n\
         \x20   os.waitpid(pid, 0)\n"
    );
    let mut child = cg
        .command(&agent)
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    // The daemon's 30 s sweep removes entries of processes that are gone, fakes included: if
    // it empties the map between the fill and the fork, the fork succeeds and proves
    // nothing, so the round is repeated (at most 3 times).
    let mut verdict = None;
    for _ in 0..3 {
        let lost_before = counter(&daemon, "state_full");
        let fakes = fill(&maps);
        writeln!(stdin, "go").unwrap();
        line.clear();
        out.read_line(&mut line).unwrap();
        unfill(&maps, &fakes);
        let mut w = line.split_whitespace();
        let (pid, result): (u32, String) =
            (w.next().unwrap().parse().unwrap(), w.next().unwrap().to_string());
        // The status document is rendered once a second: wait for the counter to show.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(4);
        let mut lost = false;
        while !lost && std::time::Instant::now() < end {
            lost = counter(&daemon, "state_full") > lost_before;
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        if lost {
            verdict = Some((pid, result));
            break;
        }
    }
    drop(stdin);
    let _ = child.wait();
    let (pid, result) = verdict.expect("the fork hook never found the map full");
    assert_eq!(result, "EPERM", "the agent's child ran unjudged with no PROC_GRANTS entry");
    let e = daemon.one_event("the child's denied connect", move |e: &Event| {
        e.kind == "connect" && e.process.pid == pid && e.port() == Some(port)
    });
    assert_eq!((e.verdict.as_str(), e.action.as_str()), ("out_of_intent", "denied"), "{e:?}");
    daemon.one_event("events_lost for the lost entry", |e: &Event| {
        e.kind == "events_lost" && e.severity == "critical"
    });
}
