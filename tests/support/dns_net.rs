//! The DNS tests' network (tests/dns.rs, tests/dns_resolved.rs): a network namespace with a
//! real DNS server (tests/data/dns_server.py) and a TCP echo listener, reached over a veth
//! pair (10.253.N.0/24, fd53:N::/64); a daemon whose `[dns] upstream` is that server and whose
//! intent `names` names hosts there; granted python processes with query and connect helpers.
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::cgroup::TestCgroup;
use crate::daemon::Daemon;
use crate::env::{enforcer_bin, python};
use enforcer::event::Event;

/// The echo listener's port inside the namespace (this suite's range: 19700-19799).
pub const ECHO_PORT: u16 = 19710;
static NET_SEQ: AtomicU32 = AtomicU32::new(0);

/// A network namespace with the DNS server and the echo listener; removed on drop.
pub struct TestNet {
    pub ns: String,
    pub host_if: String,
    /// The first three octets, e.g. "10.253.7".
    pub base: String,
    /// The IPv6 network's first groups, e.g. "fd53:7" (the namespace has `fd53:7::10`,
    /// `::11` and `::53`, the host side `::1`).
    pub base6: String,
    server: Child,
    log: tempfile::NamedTempFile,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl TestNet {
    pub fn create() -> TestNet {
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
        // ::53: an IPv6 resolver address inside the namespace (the stub answers it).
        for last in [10, 11, 53] {
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

    pub fn addr(&self, last: u8) -> String {
        format!("{}.{last}", self.base)
    }

    /// Queries the server saw ("name type proto" lines).
    pub fn queries(&self) -> Vec<String> {
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
pub fn start(name: &str, mode: &str, net: &TestNet, dns_extra: &str) -> (TestCgroup, Daemon) {
    start_with(name, mode, net, dns_extra, "", "")
}

/// `start` with `secrets` (TOML before the intent) and `intent_extra` (keys of the intent).
pub fn start_with(
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
pub const PRELUDE: &str = r#"
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
def q(name, tcp=False, server=("127.0.0.1", 53), qtype=1, connected=False, v6only=False):
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
            if v6only: s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
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
pub fn run_granted(cg: &TestCgroup, daemon: &Daemon, body: &str) -> (u32, Vec<String>) {
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

pub fn has(lines: &[String], want: &str) -> bool {
    lines.iter().any(|l| l == want)
}

pub fn connects(daemon: &Daemon, pid: u32, ip: String) -> Vec<Event> {
    daemon.wait_events("connect", move |e: &Event| {
        e.kind == "connect"
            && e.process.pid == pid
            && e.destination.as_ref().is_some_and(|d| d.ip == ip)
    })
}
