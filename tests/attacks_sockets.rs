//! Sockets no connect hook judges (ICMP ping, raw IP, packet, SCTP, MPTCP): an agent, a grant
//! holder or a tainted process tries to carry data out through them. In enforce mode
//! socket() fails with EPERM and a `socket` event names the process; a plain process in the
//! same cgroup is not judged; TCP, UDP, unix and netlink sockets keep working; monitor mode
//! lets them through with an alert.
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;

use enforcer_tests::*;
use serde_json::Value;

/// (name, family, type, protocol) as python expressions.
const CASES: &[(&str, &str, &str, &str)] = &[
    ("ping", "AF_INET", "SOCK_DGRAM", "socket.IPPROTO_ICMP"),
    ("ping6", "AF_INET6", "SOCK_DGRAM", "socket.IPPROTO_ICMPV6"),
    ("raw", "AF_INET", "SOCK_RAW", "socket.IPPROTO_ICMP"),
    ("raw6", "AF_INET6", "SOCK_RAW", "socket.IPPROTO_RAW"),
    ("sctp", "AF_INET", "SOCK_STREAM", "132"),
    ("mptcp", "AF_INET", "SOCK_STREAM", "262"),
    ("packet", "AF_PACKET", "SOCK_RAW", "socket.htons(3)"),
    ("tcp", "AF_INET", "SOCK_STREAM", "0"),
    ("tcp6", "AF_INET6", "SOCK_STREAM", "socket.IPPROTO_TCP"),
    ("udp", "AF_INET", "SOCK_DGRAM", "0"),
    ("udp6", "AF_INET6", "SOCK_DGRAM", "socket.IPPROTO_UDP"),
    ("unix", "AF_UNIX", "SOCK_STREAM", "0"),
    ("netlink", "AF_NETLINK", "SOCK_RAW", "0"),
];

/// Denied to judged processes, with the event's (family, type, protocol) names.
const DENIED: &[(&str, &str, &str, &str)] = &[
    ("ping", "AF_INET", "SOCK_DGRAM", "ICMP"),
    ("ping6", "AF_INET6", "SOCK_DGRAM", "ICMPV6"),
    ("raw", "AF_INET", "SOCK_RAW", "ICMP"),
    ("raw6", "AF_INET6", "SOCK_RAW", "RAW"),
    ("sctp", "AF_INET", "SOCK_STREAM", "SCTP"),
    ("mptcp", "AF_INET", "SOCK_STREAM", "MPTCP"),
];
const ALLOWED: &[&str] = &["tcp", "tcp6", "udp", "udp6", "unix", "netlink"];

/// A python script: optionally reads `secret` first (taint), prints "pid <pid>", then one
/// "<case> ok|<errno name>" line per case.
fn script(read_secret: bool) -> String {
    let mut s = String::from(
        "import errno, os, socket, sys\n\
         def try_(name, f, t, p):\n    try:\n        socket.socket(f, t, p).close(); r = 'ok'\n    \
         except OSError as e:\n        r = errno.errorcode.get(e.errno, str(e.errno))\n    \
         print(name, r, flush=True)\n",
    );
    if read_secret {
        s.push_str("open(sys.argv[1]).read()\n");
    }
    s.push_str("print('pid', os.getpid(), flush=True)\n");
    for (name, fam, ty, proto) in CASES {
        s.push_str(&format!("try_('{name}', socket.{fam}, socket.{ty}, {proto})\n"));
    }
    s
}

struct Run {
    pid: u32,
    results: BTreeMap<String, String>,
}

fn parse(out: std::process::Output) -> Run {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut pid = 0;
    let mut results = BTreeMap::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        match (w.next(), w.next()) {
            (Some("pid"), Some(p)) => pid = p.parse().unwrap(),
            (Some(k), Some(v)) => {
                results.insert(k.to_string(), v.to_string());
            }
            _ => {}
        }
    }
    assert!(pid != 0 && results.len() == CASES.len(), "{out:?}");
    Run { pid, results }
}

/// Opens ICMP ping sockets to every group (systemd's default `ping_group_range`, which this
/// host may not have) for the fixture's life; the previous range is restored on drop.
struct PingRange(Option<String>);

const PING_RANGE: &str = "/proc/sys/net/ipv4/ping_group_range";

impl PingRange {
    fn open() -> PingRange {
        let old = std::fs::read_to_string(PING_RANGE).ok();
        if std::fs::write(PING_RANGE, "0 2147483647").is_err() {
            eprintln!("cannot widen {PING_RANGE}: ping cases may be skipped");
        }
        PingRange(old)
    }
}

impl Drop for PingRange {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = std::fs::write(PING_RANGE, old.trim());
        }
    }
}

struct Fx {
    _ping: PingRange,
    cg: TestCgroup,
    daemon: Daemon,
    agent: std::path::PathBuf,
    secret: String,
    _dir: tempfile::TempDir,
}

fn fx(name: &str, mode: &str) -> Option<Fx> {
    if !root_or_skip(name) {
        return None;
    }
    let (dir, secret) = secret_file("key.json", "{\"k\": 1}");
    let agent = dir.path().join("agent-py");
    std::fs::copy(python(), &agent).unwrap();
    let port = tcp_listener();
    let policy = format!(
        "mode = \"{mode}\"\n[[secret]]\nname = \"key\"\npaths = [\"{secret}\"]\n\
         [[intent]]\nname = \"job\"\nagents = [{{ uid = 0 }}]\nsecrets = [\"key\"]\n\
         destinations = [\"127.0.0.1/32:{port}\"]\non_violation = \"deny\"\n\
         [[agent]]\nexe = \"{}\"\n",
        agent.display()
    );
    let cg = TestCgroup::new(name);
    let daemon = Daemon::start(&cg, &policy);
    Some(Fx { _ping: PingRange::open(), cg, daemon, agent, secret, _dir: dir })
}

/// Runs the script as `prog` in the cgroup (under `enforcer run --intent job` when `grant`).
fn run(f: &Fx, prog: &Path, grant: bool, read_secret: bool) -> Run {
    let s = script(read_secret);
    let mut c = if grant {
        let mut c = f.cg.command(enforcer_bin());
        c.args(["run", "--intent", "job", "--"]).arg(prog);
        c
    } else {
        f.cg.command(prog)
    };
    c.args(["-c", &s, &f.secret]).env("ENFORCER_RUNTIME_DIR", f.daemon.runtime_dir());
    parse(c.stderr(Stdio::inherit()).output().unwrap())
}

/// The cases this kernel supports for a process nobody judges (its result for each case):
/// the others are skipped with the reason printed.
fn supported(plain: &Run) -> Vec<&'static str> {
    let mut out = Vec::new();
    for (name, ..) in CASES {
        match plain.results[*name].as_str() {
            "ok" => out.push(*name),
            other => eprintln!("skipping case {name}: a plain process gets {other} on this host"),
        }
    }
    out
}

fn schema_validator() -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schema/enforcer.event.v1.json");
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    jsonschema::draft202012::options().should_validate_formats(true).build(&schema).unwrap()
}

/// Checks the judged run: denied cases `want` (EPERM or ok), allowed ones ok, one `socket`
/// event per denied case naming the process, none for the allowed ones.
fn check_judged(f: &Fx, run: &Run, ok_cases: &[&str], want: &str, action: &str, why: &str) {
    let denied: Vec<_> = DENIED.iter().filter(|d| ok_cases.contains(&d.0)).collect();
    for (name, ..) in &denied {
        assert_eq!(run.results[*name], want, "{name}: {:?}", run.results);
    }
    for name in ALLOWED.iter().filter(|n| ok_cases.contains(n)) {
        assert_eq!(run.results[*name], "ok", "{name} must keep working: {:?}", run.results);
    }
    let n = denied.len();
    let events = f
        .daemon
        .wait_events("socket events", |e: &Event| e.kind == "socket" && e.process.pid == run.pid);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut events = events;
    while events.len() < n && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        events = f.daemon.events().into_iter().filter(by("socket", run.pid)).collect();
    }
    assert_eq!(events.len(), n, "one event per refused socket: {events:#?}");
    let v = schema_validator();
    let raw: Vec<Value> = f
        .daemon
        .raw_events()
        .into_iter()
        .filter(|e| e["kind"] == "socket" && e["process"]["pid"] == run.pid)
        .collect();
    for e in &raw {
        let errors: Vec<String> = v.iter_errors(e).map(|x| x.to_string()).collect();
        assert!(errors.is_empty(), "{errors:?}\n{e}");
    }
    for (name, fam, ty, proto) in denied {
        let e = events
            .iter()
            .find(|e| {
                e.socket.as_ref().is_some_and(|s| {
                    (s.family.as_str(), s.sock_type.as_str(), s.protocol.as_str())
                        == (*fam, *ty, *proto)
                })
            })
            .unwrap_or_else(|| panic!("no event for {name}: {events:#?}"));
        assert_eq!(e.verdict, "out_of_intent", "{e:?}");
        assert_eq!(e.action, action, "{e:?}");
        assert!(e.mitre.iter().any(|m| m == "T1095"), "{e:?}");
        assert!(!e.process.exe.is_empty(), "the event names the process: {e:?}");
        assert!(e.decision_path.iter().any(|p| p.contains(why)), "{name}: {e:?}");
    }
}

fn plain_is_not_judged(f: &Fx) -> Vec<&'static str> {
    let plain = run(f, Path::new(&python()), false, false);
    let ok = supported(&plain);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let ev: Vec<Event> = f.daemon.events().into_iter().filter(by("socket", plain.pid)).collect();
    assert!(ev.is_empty(), "a plain process is not judged: {ev:#?}");
    ok
}

#[test]
fn enforce_agent_and_grant_holder_cannot_open_unjudged_sockets() {
    let Some(f) = fx("sock-enforce", "enforce") else { return };
    let ok = plain_is_not_judged(&f);
    let agent = run(&f, &f.agent, false, false);
    eprintln!("agent: {:?}", agent.results);
    check_judged(&f, &agent, &ok, "EPERM", "denied", "an [[agent]] process");
    let holder = run(&f, Path::new(&python()), true, false);
    eprintln!("grant holder: {:?}", holder.results);
    check_judged(&f, &holder, &ok, "EPERM", "denied", "holds grant slot");
    report_packet(&agent);
    f.daemon.assert_no_decision_mismatches();
}

#[test]
fn monitor_agent_and_tainted_process_are_alerted_not_blocked() {
    let Some(f) = fx("sock-monitor", "monitor") else { return };
    let ok = plain_is_not_judged(&f);
    let agent = run(&f, &f.agent, false, false);
    check_judged(&f, &agent, &ok, "ok", "alerted", "an [[agent]] process");
    // Monitor mode lets a plain process read the secret: it is tainted from then on.
    let tainted = run(&f, Path::new(&python()), false, true);
    check_judged(&f, &tainted, &ok, "ok", "alerted", "tainted by key");
}

/// AF_PACKET sockets never reach `cgroup/sock_create` (the kernel runs it for AF_INET and
/// AF_INET6 only): creating one needs CAP_NET_RAW in the host's network namespace, see
/// docs/threat-model.md. Printed, so a kernel that starts calling the hook is noticed.
fn report_packet(agent: &Run) {
    eprintln!("AF_PACKET for an agent (not seen by sock_create): {}", agent.results["packet"]);
}
