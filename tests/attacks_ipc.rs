//! Issue 11, "alert where it can be seen": taint does not follow data into a process
//! outside the subtree. A process holding a secret that talks to another process's Unix
//! socket is an `ipc` alert (every mode; the call proceeds) naming the process, the socket
//! and the secret, and the process serving it; the same connect by a process holding no
//! secret is no event.
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};

use enforcer::event::Event;
use enforcer_tests::*;

const SECRET: &str = "{\"k\": \"s3cr3t-ipc-value\"}";

struct Fx {
    cg: TestCgroup,
    daemon: Daemon,
    secret: String,
    _dir: tempfile::TempDir,
}

fn fx(name: &str, mode: &str) -> Option<Fx> {
    if !root_or_skip(name) {
        return None;
    }
    let (dir, secret) = secret_file("key.json", SECRET);
    let policy = format!(
        "mode = \"{mode}\"\n[[secret]]\nname = \"key\"\npaths = [\"{secret}\"]\n\
         destinations = [\"127.0.0.1/32:19101\"]\n\
         [[intent]]\nname = \"wide\"\nagents = [{{ uid = 0 }}]\nsecrets = [\"key\"]\n\
         destinations = [\"127.0.0.0/8:19100-19199\"]\non_violation = \"deny\"\n"
    );
    let cg = TestCgroup::new(name);
    let daemon = Daemon::start(&cg, &policy);
    Some(Fx { cg, daemon, secret, _dir: dir })
}

/// A process outside every judged subtree serving a Unix socket (`addr`: a path, or "@name"
/// for an abstract one; `dgram`: a bound datagram socket). Returns once it is bound.
fn server(addr: &str, dgram: bool) -> Child {
    let script = r#"
import socket, sys
a = sys.argv[1]
a = "\0" + a[1:] if a.startswith("@") else a
if sys.argv[2] == "dgram":
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.bind(a)
    print("ready", flush=True)
    for _ in range(4): s.recv(4096)
else:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.bind(a); s.listen(8)
    print("ready", flush=True)
    for _ in range(4):
        c, _ = s.accept(); c.recv(4096); c.close()
"#;
    let mut child = std::process::Command::new(python())
        .args(["-c", script, addr, if dgram { "dgram" } else { "stream" }])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "server did not start");
    child
}

/// The client: optionally reads the secret, then sends a line to the Unix socket.
fn client(read_secret: bool, addr: &str, dgram: bool) -> String {
    format!(
        r#"
import os, socket, sys
print(os.getpid(), flush=True)
data = open(sys.argv[1]).read().encode() if {read} else b"hello"
a = "{addr}"
a = "\0" + a[1:] if a.startswith("@") else a
if {dgram}:
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(data, a)
else:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(a); s.sendall(data); s.close()
"#,
        read = if read_secret { "True" } else { "False" },
        dgram = if dgram { "True" } else { "False" },
    )
}

/// Runs `script` under `enforcer run --intent wide` (granted) or plainly, in the cgroup.
fn run(f: &Fx, granted: bool, script: &str) -> u32 {
    let mut c = if granted {
        let mut c = f.cg.command(enforcer_bin());
        c.args(["run", "--intent", "wide", "--", &python(), "-c", script, &f.secret]);
        c
    } else {
        let mut c = f.cg.command(python());
        c.args(["-c", script, &f.secret]);
        c
    };
    let out = c.env("ENFORCER_RUNTIME_DIR", f.daemon.runtime_dir()).output().unwrap();
    assert!(out.status.success(), "client failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().next().unwrap().trim().parse().unwrap()
}

fn ipc_events(f: &Fx) -> Vec<Event> {
    f.daemon.events().into_iter().filter(|e| e.kind == "ipc").collect()
}

fn assert_alert(e: &Event, pid: u32, path: &str, op: &str, peer: u32, mode: &str) {
    assert_eq!(e.process.pid, pid, "{e:?}");
    assert_eq!(
        (e.verdict.as_str(), e.action.as_str(), e.mode.as_str()),
        ("out_of_intent", "alerted", mode)
    );
    let i = e.ipc.as_ref().expect("ipc object");
    assert_eq!((i.op.as_str(), i.path.as_str()), (op, path), "{e:?}");
    assert_eq!(i.peer.as_ref().map(|p| p.pid), Some(peer), "the serving process: {e:?}");
    assert_eq!(e.secrets, ["key"], "{e:?}");
    assert_eq!(e.process.exe, python(), "{e:?}");
    assert!(!serde_json::to_string(e).unwrap().contains("s3cr3t"), "secret value in an event");
}

#[test]
fn a_tainted_process_using_another_process_unix_socket_is_an_alert() {
    let Some(f) = fx("ipc_enforce", "enforce") else { return };
    let sock = f.daemon.runtime_dir().join("helper.sock").display().to_string();
    let mut srv = server(&sock, false);
    // Granted but holding no secret yet: nothing to say.
    let clean = run(&f, true, &client(false, &sock, false));
    // Not granted, not tainted: nothing either.
    let plain = run(&f, false, &client(false, &sock, false));
    // Read, then talk to the helper: one alert naming it all.
    let pid = run(&f, true, &client(true, &sock, false));
    let e = f.daemon.one_event("ipc", move |e: &Event| e.kind == "ipc" && e.process.pid == pid);
    assert_alert(&e, pid, &sock, "connect", srv.id(), "enforce");
    let all = ipc_events(&f);
    assert!(
        all.iter().all(|e| e.process.pid != clean && e.process.pid != plain),
        "no alert for processes holding no secret: {all:#?}"
    );
    assert_eq!(all.len(), 1, "{all:#?}");
    // The event as written validates against the published schema.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schema/enforcer.event.v1.json");
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let v =
        jsonschema::draft202012::options().should_validate_formats(true).build(&schema).unwrap();
    let raw = f.daemon.raw_events().into_iter().find(|e| e["kind"] == "ipc").unwrap();
    let errors: Vec<String> = v.iter_errors(&raw).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:?}: {raw:#}");
    let _ = srv.kill();
    let _ = srv.wait();
}

#[test]
fn monitor_mode_alerts_on_abstract_and_datagram_sockets() {
    let Some(f) = fx("ipc_monitor", "monitor") else { return };
    let name = format!("@enforcer-ipc-test-{}", std::process::id());
    let mut srv = server(&name, true);
    let plain = run(&f, false, &client(false, &name, true));
    let pid = run(&f, true, &client(true, &name, true));
    let e = f.daemon.one_event("ipc", move |e: &Event| e.kind == "ipc" && e.process.pid == pid);
    assert_alert(&e, pid, &name, "sendto", srv.id(), "monitor");
    assert!(ipc_events(&f).iter().all(|e| e.process.pid != plain), "{:#?}", ipc_events(&f));
    let _ = srv.kill();
    let _ = srv.wait();
}
