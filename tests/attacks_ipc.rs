//! Issue 11, "alert where it can be seen": taint does not follow data into a process
//! outside the subtree. A process holding a secret that talks to another process's Unix
//! socket is an `ipc` alert (every mode; the call proceeds) naming the process, the socket
//! and the secret, and the process serving it; the same connect by a process holding no
//! secret is no event.
//!
//! The hooks: `cgroup/connect_unix` + `cgroup/sendmsg_unix` on kernels 6.7+ (this host), the
//! syscall tracepoints as last resort (forced here with `ENFORCER_IPC_HOOKS=tracepoint`, and
//! then named in `programs_missing`: they slow every system call on the host).
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

/// `hooks`: the IPC hook set forced on the daemon (`ENFORCER_IPC_HOOKS`); None: its own choice.
fn fx(name: &str, mode: &str, hooks: Option<&str>) -> Option<Fx> {
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
    let mut daemon = Daemon::configure(&cg, &policy);
    if let Some(h) = hooks {
        daemon.wrapper = vec!["env".into(), format!("ENFORCER_IPC_HOOKS={h}")];
    }
    let daemon = daemon.launch();
    Some(Fx { cg, daemon, secret, _dir: dir })
}

/// Whether this kernel has the cgroup Unix-socket hooks (Linux 6.7+).
fn has_cgroup_unix_hooks() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut v = release.trim().split(['.', '-']).map(|x| x.parse::<u32>().unwrap_or(0));
    (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (6, 7)
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
    let Some(f) = fx("ipc_enforce", "enforce", None) else { return };
    // The cheapest hooks this kernel loads, and nothing missing.
    let st = f.daemon.status_json();
    if has_cgroup_unix_hooks() {
        assert_eq!(
            st["backends"]["ipc"], "cgroup_sock_addr (connect_unix, sendmsg_unix)",
            "{st:#}"
        );
        assert!(st["programs"].to_string().contains("cgroup_sock_addr/connect_unix"), "{st:#}");
    }
    assert_eq!(st["programs_missing"].as_array().map(|m| m.len()), Some(0), "{st:#}");
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
    let Some(f) = fx("ipc_monitor", "monitor", None) else { return };
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

/// What the syscall tracepoints never saw: sendmsg() with an address, and a datagram
/// connect() followed by plain sends. The cgroup hooks see the address the kernel uses.
#[test]
fn sendmsg_with_an_address_and_a_datagram_connect_are_alerts() {
    let Some(f) = fx("ipc_sendmsg", "monitor", None) else { return };
    if !has_cgroup_unix_hooks() {
        println!("SKIP: sendmsg_with_an_address: no cgroup Unix-socket hooks before Linux 6.7");
        return;
    }
    let sock = f.daemon.runtime_dir().join("dgram.sock").display().to_string();
    let mut srv = server(&sock, true);
    let script = r#"
import os, socket, sys
print(os.getpid(), flush=True)
data = open(sys.argv[1]).read().encode()
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendmsg([data], [], 0, sys.argv[2])
c = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
c.connect(sys.argv[2]); c.send(data)
"#;
    let mut c = f.cg.command(enforcer_bin());
    c.args(["run", "--intent", "wide", "--", &python(), "-c", script, &f.secret, &sock]);
    let out = c.env("ENFORCER_RUNTIME_DIR", f.daemon.runtime_dir()).output().unwrap();
    assert!(out.status.success(), "client failed: {}", String::from_utf8_lossy(&out.stderr));
    let pid: u32 =
        String::from_utf8_lossy(&out.stdout).lines().next().unwrap().trim().parse().unwrap();
    f.daemon.wait_events("ipc", move |e: &Event| {
        e.kind == "ipc" && e.process.pid == pid && e.ipc.as_ref().is_some_and(|i| i.op == "connect")
    });
    let all = f.daemon.events();
    let mine: Vec<&Event> =
        all.iter().filter(|e| e.kind == "ipc" && e.process.pid == pid).collect();
    let mut ops: Vec<&str> = mine.iter().map(|e| e.ipc.as_ref().unwrap().op.as_str()).collect();
    ops.sort_unstable();
    // One each: the connected socket's later send names no address.
    assert_eq!(ops, ["connect", "sendto"], "{mine:#?}");
    for e in &mine {
        assert_alert(e, pid, &sock, e.ipc.as_ref().unwrap().op.as_str(), srv.id(), "monitor");
    }
    let _ = srv.kill();
    let _ = srv.wait();
}

/// The last resort still alerts, and says what it costs: forced onto the syscall
/// tracepoints, the daemon names them in `programs_missing`.
#[test]
fn tracepoint_fallback_alerts_and_is_named_in_programs_missing() {
    let Some(f) = fx("ipc_tracepoint", "monitor", Some("tracepoint")) else { return };
    let st = f.daemon.status_json();
    let missing = st["programs_missing"].to_string();
    assert!(missing.contains("every system call on the host"), "{st:#}");
    assert!(
        st["backends"]["ipc"].as_str().unwrap_or_default().starts_with("tracepoint (syscalls/"),
        "{st:#}"
    );
    assert!(st["programs"].to_string().contains("tracepoint/syscalls/sys_enter_connect"), "{st:#}");
    let sock = f.daemon.runtime_dir().join("helper.sock").display().to_string();
    let mut srv = server(&sock, false);
    let pid = run(&f, true, &client(true, &sock, false));
    let e = f.daemon.one_event("ipc", move |e: &Event| e.kind == "ipc" && e.process.pid == pid);
    assert_alert(&e, pid, &sock, "connect", srv.id(), "monitor");
    let _ = srv.kill();
    let _ = srv.wait();
}
