//! Destinations by name (issue 15): the daemon's per-grant DNS stub. A real DNS server
//! (tests/data/dns_server.py) on a host in a network namespace this test creates (veth pair,
//! 10.253.N.0/24) answers names whose addresses change between queries, with short TTLs, a
//! CNAME chain and a wildcard zone; a TCP echo listener there takes the connections. The
//! daemon's `[dns] upstream` is that server. Granted processes (python, in the test cgroup,
//! under `enforcer run --intent`) query 127.0.0.1:53 (no resolver listens there: only the
//! stub, through the kernel's steering, can answer) and connect.
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use enforcer::event::Event;
use enforcer_tests::cgroup::TestCgroup;
use enforcer_tests::daemon::Daemon;
use enforcer_tests::env::{enforcer_bin, python, root_or_skip};
use enforcer_tests::events::EventExt;

/// The echo listener's port inside the namespace (this suite's range: 19700-19799).
const ECHO_PORT: u16 = 19710;
static NET_SEQ: AtomicU32 = AtomicU32::new(0);

/// A network namespace with the DNS server and the echo listener; removed on drop.
struct TestNet {
    ns: String,
    host_if: String,
    /// The first three octets, e.g. "10.253.7".
    base: String,
    /// The IPv6 network's first groups, e.g. "fd53:7" (the namespace has `fd53:7::10` and
    /// `::11`, the host side `::1`).
    base6: String,
    server: Child,
    log: tempfile::NamedTempFile,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl TestNet {
    fn new() -> TestNet {
        let n = (std::process::id() % 200 + NET_SEQ.fetch_add(1, Ordering::SeqCst) * 7) % 250 + 1;
        let ns = format!("enfdns{}-{n}", std::process::id());
        let (host_if, ns_if) = (format!("edh{n}x{}", std::process::id() % 1000), format!("edn{n}"));
        let base = format!("10.253.{n}");
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if]);
        ip(&["link", "set", &ns_if, "netns", &ns]);
        ip(&["addr", "add", &format!("{base}.1/24"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "link", "set", &ns_if, "up"]);
        for last in [2, 10, 11, 12, 13, 14, 15, 16, 17] {
            ip(&["-n", &ns, "addr", "add", &format!("{base}.{last}/24"), "dev", &ns_if]);
        }
        let base6 = format!("fd53:{n}");
        ip(&["-6", "addr", "add", &format!("{base6}::1/64"), "dev", &host_if, "nodad"]);
        for last in [10, 11] {
            let a = format!("{base6}::{last}/64");
            ip(&["-6", "-n", &ns, "addr", "add", &a, "dev", &ns_if, "nodad"]);
        }
        let log = tempfile::NamedTempFile::new().unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/data/dns_server.py");
        let mut server = Command::new("ip")
            .args(["netns", "exec", &ns, &python(), script, &format!("{base}.2"), &base])
            .arg(ECHO_PORT.to_string())
            .arg(log.path())
            .arg(&base6)
            .stdout(Stdio::piped())
            .spawn()
            .expect("dns server");
        let mut line = String::new();
        BufReader::new(server.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "dns server did not start");
        TestNet { ns, host_if, base, base6, server, log }
    }

    fn addr(&self, last: u8) -> String {
        format!("{}.{last}", self.base)
    }

    /// Queries the server saw ("name type proto" lines).
    fn queries(&self) -> Vec<String> {
        std::fs::read_to_string(self.log.path()).unwrap().lines().map(String::from).collect()
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// Config: `[dns]` toward the namespace's server, an intent naming hosts there.
fn start(name: &str, mode: &str, net: &TestNet, dns_extra: &str) -> (TestCgroup, Daemon) {
    start_with(name, mode, net, dns_extra, "", "")
}

/// `start` with `secrets` (TOML before the intent) and `intent_extra` (keys of the intent).
fn start_with(
    name: &str,
    mode: &str,
    net: &TestNet,
    dns_extra: &str,
    secrets: &str,
    intent_extra: &str,
) -> (TestCgroup, Daemon) {
    let p = ECHO_PORT;
    let policy = format!(
        "mode = \"{mode}\"\n\
         [dns]\nupstream = [\"{}:53\"]\nmin_ttl = \"1s\"\n{dns_extra}\n{secrets}\n\
         [[intent]]\nname = \"names\"\nagents = [{{ uid = 0 }}]\n{intent_extra}\n\
         destinations = [\"api.dns.test:{p}\", \"rot.dns.test:{p}\", \"alias.dns.test:{p}\", \"*.wild.test:{p}\", \"short.dns.test:{p}\"]\n\
         max_ttl = \"10m\"\non_violation = \"deny\"\n",
        net.addr(2)
    );
    let cg = TestCgroup::new(name);
    let daemon = Daemon::start(&cg, &policy);
    (cg, daemon)
}

/// Python helpers for the granted process: `q(name, tcp=False)` prints and returns
/// (rcode, [addresses], reply source); `conn(ip)` prints "ok" or the errno name and keeps
/// the socket; `echo(sock)` proves a kept connection still carries data.
const PRELUDE: &str = r#"
import errno, random, socket, struct, sys, time
PORT = int(sys.argv[1])
def recvn(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise EOFError
        b += c
    return b
def skip_name(d, o):
    while True:
        n = d[o]
        if n == 0: return o + 1
        if n & 0xC0 == 0xC0: return o + 2
        o += 1 + n
def q(name, tcp=False, server=("127.0.0.1", 53), qtype=1, connected=False):
    qid = random.randint(0, 65535)
    pkt = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    pkt += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0" + struct.pack(">HH", qtype, 1)
    fam = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    try:
        if tcp:
            s = socket.create_connection(server, timeout=5)
            s.sendall(struct.pack(">H", len(pkt)) + pkt)
            data = recvn(s, struct.unpack(">H", recvn(s, 2))[0]); src = server
        else:
            s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(5)
            if connected:
                s.connect(server); s.send(pkt)
            else:
                s.sendto(pkt, server)
            data, src = s.recvfrom(4096)
    except OSError as e:
        print(f"q {name} error {errno.errorcode.get(e.errno, str(e.errno))}", flush=True); return (None, [], None)
    assert struct.unpack(">H", data[:2])[0] == qid
    rcode = data[3] & 15
    an = struct.unpack(">H", data[6:8])[0]
    o = skip_name(data, 12) + 4
    addrs = []
    for _ in range(an):
        o = skip_name(data, o)
        t, _c, _ttl, ln = struct.unpack(">HHIH", data[o:o + 10]); o += 10
        if t == 1: addrs.append(socket.inet_ntoa(data[o:o + 4]))
        if t == 28: addrs.append(socket.inet_ntop(socket.AF_INET6, data[o:o + 16]))
        o += ln
    print(f"q {name} rcode={rcode} addrs={','.join(addrs)} from={src[0]}:{src[1]}", flush=True)
    return (rcode, addrs, src)
kept = []
def conn(ip):
    try:
        s = socket.create_connection((ip, PORT), timeout=3); kept.append(s); print(f"conn {ip} ok", flush=True); return s
    except OSError as e:
        print(f"conn {ip} {errno.errorcode.get(e.errno, str(e.errno))}", flush=True)
def echo(s):
    try:
        s.sendall(b"ping"); print("echo " + recvn(s, 4).decode(), flush=True)
    except OSError as e:
        print(f"echo {errno.errorcode.get(e.errno, str(e.errno))}", flush=True)
"#;

/// Runs `body` under `enforcer run --intent names` in the cgroup: (pid, stdout lines).
fn run_granted(cg: &TestCgroup, daemon: &Daemon, body: &str) -> (u32, Vec<String>) {
    let script =
        format!("{PRELUDE}\nprint('pid', __import__('os').getpid(), flush=True)\n{body}\n");
    let out = cg
        .command(enforcer_bin())
        .args(["run", "--intent", "names", "--", &python(), "-c", &script])
        .arg(ECHO_PORT.to_string())
        .env("ENFORCER_RUNTIME_DIR", daemon.runtime_dir())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let lines: Vec<String> =
        String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
    assert!(
        out.status.success(),
        "granted process failed: {lines:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid = lines
        .iter()
        .find_map(|l| l.strip_prefix("pid ").map(|p| p.parse().unwrap()))
        .expect("pid line");
    (pid, lines)
}

fn has(lines: &[String], want: &str) -> bool {
    lines.iter().any(|l| l == want)
}

fn connects(daemon: &Daemon, pid: u32, ip: String) -> Vec<Event> {
    daemon.wait_events("connect", move |e: &Event| {
        e.kind == "connect"
            && e.process.pid == pid
            && e.destination.as_ref().is_some_and(|d| d.ip == ip)
    })
}

#[test]
fn names_learned_per_grant_enforce() {
    if !root_or_skip("names_learned_per_grant_enforce") {
        return;
    }
    let net = TestNet::new();
    let (cg, daemon) = start("dns-enforce", "enforce", &net, "");
    let a = |n: u8| net.addr(n);
    let body = format!(
        r#"
r, addrs, src = q("api.dns.test")
assert src == ("127.0.0.1", 53), src   # the reply reads as coming from the resolver asked
conn(addrs[0])
conn("{hard}")                         # hard-coded, never answered
r, addrs, _ = q("alias.dns.test")       # CNAME chain: alias -> edge.cdn.test -> A
conn(addrs[0])
r, addrs, _ = q("x1.wild.test")         # wildcard destination
conn(addrs[0])
r, first, _ = q("rot.dns.test")        # the address changes with every query
conn(first[0])
conn("{rot2}")                          # not answered yet
r, second, _ = q("rot.dns.test")
conn(second[0])
q("outside.test")                       # no grant names it
r, addrs, _ = q("api.dns.test", tcp=True)
print("tcp", addrs, flush=True)
r, addrs, _ = q("short.dns.test")       # TTL 1 s, min_ttl 1 s
live = conn(addrs[0])
time.sleep(2.5)
echo(live)                              # opened in the window: still carries data
conn(addrs[0])                          # a new connect after the TTL
q("short.dns.test")
conn(addrs[0])                          # re-resolved: allowed again
"#,
        hard = a(17),
        rot2 = a(12),
    );
    let (pid, lines) = run_granted(&cg, &daemon, &body);
    let want = [
        format!("q api.dns.test rcode=0 addrs={} from=127.0.0.1:53", a(10)),
        format!("conn {} ok", a(10)),
        format!("conn {} EPERM", a(17)),
        format!("q alias.dns.test rcode=0 addrs={} from=127.0.0.1:53", a(13)),
        format!("conn {} ok", a(13)),
        format!("conn {} ok", a(14)),
        format!("q rot.dns.test rcode=0 addrs={} from=127.0.0.1:53", a(11)),
        format!("conn {} ok", a(11)),
        format!("conn {} EPERM", a(12)),
        format!("q rot.dns.test rcode=0 addrs={} from=127.0.0.1:53", a(12)),
        format!("conn {} ok", a(12)),
        "q outside.test rcode=5 addrs= from=127.0.0.1:53".to_string(),
        format!("tcp ['{}']", a(10)),
        "echo ping".to_string(),
    ];
    for w in &want {
        assert!(has(&lines, w), "missing {w:?} in {lines:#?}\nlog:\n{}", daemon.log());
    }
    // The short-TTL address: allowed, denied after the TTL, allowed after re-resolution.
    let short: Vec<&String> =
        lines.iter().filter(|l| l.starts_with(&format!("conn {} ", a(15)))).collect();
    assert_eq!(
        short,
        [
            &format!("conn {} ok", a(15)),
            &format!("conn {} EPERM", a(15)),
            &format!("conn {} ok", a(15))
        ],
        "{lines:#?}"
    );
    // The resolver never saw the refused name: refused without forwarding.
    let seen = net.queries();
    assert!(!seen.iter().any(|l| l.starts_with("outside.test")), "{seen:?}");
    assert!(
        seen.iter().any(|l| l == "api.dns.test 1 tcp"),
        "TCP query forwarded over TCP: {seen:?}"
    );

    // Events: allowed connects name the DNS name; the hard-coded address is out_of_intent.
    let ok = connects(&daemon, pid, a(10));
    assert!(
        ok.iter()
            .all(|e| e.verdict == "allowed" && e.dest().name.as_deref() == Some("api.dns.test")),
        "{ok:#?}"
    );
    let chain = connects(&daemon, pid, a(13));
    assert_eq!(chain[0].dest().name.as_deref(), Some("alias.dns.test"), "{chain:#?}");
    let hard = connects(&daemon, pid, a(17));
    assert_eq!((hard[0].verdict.as_str(), hard[0].action.as_str()), ("out_of_intent", "denied"));
    assert_eq!(hard[0].dest().name, None);
    let refused =
        daemon.one_event("dns refused", |e: &Event| e.kind == "dns" && e.process.pid == pid);
    assert_eq!((refused.verdict.as_str(), refused.action.as_str()), ("out_of_intent", "denied"));
    assert_eq!(refused.dest().name.as_deref(), Some("outside.test"));
    assert_eq!((refused.dest().ip.as_str(), refused.dest().port), ("127.0.0.1", 53));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let st = loop {
        let st = daemon.status_json();
        if st["dns"]["refused"].as_u64() >= Some(1) || std::time::Instant::now() > deadline {
            break st;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(st["dns"]["refused"].as_u64() >= Some(1), "{st:#}");
    assert_eq!(st["dns"]["upstream"][0], format!("{}:53", a(2)));
    daemon.assert_no_decision_mismatches();
}

#[test]
fn names_outside_grants_alerted_in_monitor() {
    if !root_or_skip("names_outside_grants_alerted_in_monitor") {
        return;
    }
    let net = TestNet::new();
    let (cg, daemon) = start("dns-monitor", "monitor", &net, "");
    let (pid, lines) = run_granted(&cg, &daemon, "r, addrs, _ = q('outside.test')\nconn(addrs[0])");
    let a16 = net.addr(16);
    assert!(
        has(&lines, &format!("q outside.test rcode=0 addrs={a16} from=127.0.0.1:53")),
        "{lines:?}"
    );
    assert!(has(&lines, &format!("conn {a16} ok")), "{lines:?}");
    let e = daemon.one_event("dns alert", |e: &Event| e.kind == "dns" && e.process.pid == pid);
    assert_eq!((e.verdict.as_str(), e.action.as_str()), ("out_of_intent", "alerted"));
    assert_eq!(e.dest().name.as_deref(), Some("outside.test"));
    let c = connects(&daemon, pid, a16);
    assert_eq!((c[0].verdict.as_str(), c[0].action.as_str()), ("out_of_intent", "alerted"));
}

/// The attacker's moves: ask the stub directly (not steered: no attribution), or get
/// answers for a name outside the grant with `refuse = "nxdomain"`.
#[test]
fn unsteered_queries_and_nxdomain() {
    if !root_or_skip("unsteered_queries_and_nxdomain") {
        return;
    }
    let net = TestNet::new();
    let (cg, daemon) = start("dns-unsteered", "enforce", &net, "refuse = \"nxdomain\"");
    let listen = daemon.status_json()["dns"]["listen"].as_str().unwrap().to_string();
    let (host, port) = listen.rsplit_once(':').unwrap();
    // A process of the test (no grant, outside the cgroup) sends straight to the stub.
    let script = format!(
        "{PRELUDE}\nq('api.dns.test', server=('{host}', {port}))\nq('api.dns.test', tcp=True, server=('{host}', {port}))"
    );
    let out = Command::new(python()).args(["-c", &script, "0"]).output().unwrap();
    let lines: Vec<String> =
        String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
    assert!(has(&lines, &format!("q api.dns.test rcode=5 addrs= from={host}:{port}")), "{lines:?}");
    assert_eq!(lines.iter().filter(|l| l.contains("rcode=5")).count(), 2, "{lines:?}");
    assert!(
        net.queries().is_empty(),
        "an unattributed query reached the resolver: {:?}",
        net.queries()
    );
    // A granted process: names outside its grant get NXDOMAIN.
    let (_, lines) = run_granted(&cg, &daemon, "q('outside.test')");
    assert!(has(&lines, "q outside.test rcode=3 addrs= from=127.0.0.1:53"), "{lines:?}");
    // The status is refreshed once a second.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let st = daemon.status_json();
        if st["dns"]["unattributed"].as_u64() >= Some(2) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "unattributed not counted: {st:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One daemon (enforce, `refuse = "off"`) for the rest of the contract:
/// - a secret whose own destinations are given by name: the process that read it resolves
///   (its queries reach the stub), connects and sends where the name was learned, with no
///   `send` violation (the false positive of issue 15's first landing);
/// - resolver addresses other than 127.0.0.1:53: the namespace server's own address (UDP and
///   TCP) and an address where nothing listens are answered by the stub;
/// - IPv6: an AAAA query over connected UDP and TCP to [::1]:53 (connect6 steering) is
///   answered by the stub, the answer is learned, a connection to it carries data, an
///   address never answered is EPERM; an unconnected sendto on an IPv6 socket (sendmsg6)
///   fails closed with the kernel's ENOTSUPP (it refuses a rewrite to an IPv4-mapped address);
/// - `refuse = "off"`: a name outside the grant is forwarded and answered, alerted as a
///   `dns` event naming it and the resolver asked, and its address is still not usable.
#[test]
fn secret_names_other_resolvers_ipv6_refuse_off() {
    if !root_or_skip("secret_names_other_resolvers_ipv6_refuse_off") {
        return;
    }
    let net = TestNet::new();
    // The secret's directory is watched: keep it apart from everything the process runs.
    let secret_dir = tempfile::tempdir().unwrap();
    let key = secret_dir.path().join("key");
    std::fs::write(&key, "named-secret-value\n").unwrap();
    let secrets = format!(
        "[[secret]]\nname = \"key\"\npaths = [\"{}\"]\ndestinations = [\"api.dns.test:{ECHO_PORT}\"]\n",
        key.display()
    );
    let (cg, daemon) = start_with(
        "dns-contract",
        "enforce",
        &net,
        "refuse = \"off\"",
        &secrets,
        "secrets = [\"key\"]",
    );
    let a = |n: u8| net.addr(n);
    let v6 = |last: u8| format!("{}::{last}", net.base6);
    let body = format!(
        r#"
open("{key}").read()                    # tainted by the secret from here on
r, addrs, _ = q("api.dns.test")
s = conn(addrs[0]); echo(s)
r, addrs, _ = q("api.dns.test", server=("{a2}", 53))
r, addrs, _ = q("api.dns.test", tcp=True, server=("{a2}", 53))
r, addrs, _ = q("api.dns.test", server=("{a99}", 53))
r, addrs, _ = q("api.dns.test", server=("::1", 53), qtype=28, connected=True)
s6 = conn(addrs[0]); echo(s6)
conn("{v6_11}")                          # never answered
r, addrs, _ = q("api.dns.test", tcp=True, server=("::1", 53), qtype=28)
q("api.dns.test", server=("::1", 53), qtype=28)   # unconnected sendto on IPv6: the limit
r, addrs, _ = q("outside.test", server=("{a2}", 53))
conn(addrs[0])
"#,
        key = key.display(),
        a2 = a(2),
        a99 = a(99),
        v6_11 = v6(11),
    );
    let (pid, lines) = run_granted(&cg, &daemon, &body);
    let (a2, a10, a16) = (a(2), a(10), a(16));
    let want = [
        format!("q api.dns.test rcode=0 addrs={a10} from=127.0.0.1:53"),
        format!("conn {a10} ok"),
        "echo ping".to_string(),
        format!("q api.dns.test rcode=0 addrs={a10} from={a2}:53"),
        format!("q api.dns.test rcode=0 addrs={a10} from={}:53", a(99)),
        format!("q api.dns.test rcode=0 addrs={} from=::1:53", v6(10)),
        format!("conn {} ok", v6(10)),
        format!("conn {} EPERM", v6(11)),
        format!("q outside.test rcode=0 addrs={a16} from={a2}:53"),
        format!("conn {a16} EPERM"),
        // The kernel refuses a sendmsg6 program's rewrite to an IPv4-mapped address
        // (ENOTSUPP, 524): unconnected IPv6 UDP queries fail closed (threat-model.md).
        "q api.dns.test error 524".to_string(),
    ];
    for w in &want {
        assert!(has(&lines, w), "missing {w:?} in {lines:#?}\nlog:\n{}", daemon.log());
    }
    assert_eq!(lines.iter().filter(|l| *l == "echo ping").count(), 2, "{lines:#?}");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("q api.dns.test rcode=0 addrs=") && l.contains("::1:53"))
            .count(),
        2,
        "AAAA over UDP and TCP: {lines:#?}"
    );
    let seen = net.queries();
    assert!(seen.iter().any(|l| l == "api.dns.test 28 udp"), "AAAA forwarded: {seen:?}");
    assert!(seen.iter().any(|l| l == "outside.test 1 udp"), "refuse off forwards: {seen:?}");
    // The name outside the grant: alerted (not refused), naming the resolver asked.
    let e = daemon.one_event("dns alert", |e: &Event| e.kind == "dns" && e.process.pid == pid);
    assert_eq!((e.verdict.as_str(), e.action.as_str()), ("out_of_intent", "alerted"));
    assert_eq!(e.dest().name.as_deref(), Some("outside.test"));
    assert_eq!((e.dest().ip.as_str(), e.dest().port), (a2.as_str(), 53));
    // Connects to learned addresses name the DNS name, over IPv6 too.
    let c6 = connects(&daemon, pid, v6(10));
    assert_eq!(
        (c6[0].verdict.as_str(), c6[0].dest().name.as_deref()),
        ("allowed", Some("api.dns.test"))
    );
    // No send of the tainted process was judged a violation (the DNS queries and the data
    // to the learned addresses), and the kernel and the daemon agree on every record.
    std::thread::sleep(Duration::from_millis(500));
    let sends: Vec<Event> =
        daemon.events().into_iter().filter(|e| e.kind == "send" && e.process.pid == pid).collect();
    assert!(sends.is_empty(), "send violations: {sends:#?}");
    daemon.assert_no_decision_mismatches();
}
