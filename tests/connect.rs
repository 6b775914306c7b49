//! Outbound connections: TCP and UDP, IPv4 and IPv6, attributed to the process in the kernel.
use std::io::Read;
use std::net::UdpSocket;
use std::process::Command;

use enforcer_tests::*;

fn daemon(name: &str) -> Option<(TestCgroup, Daemon)> {
    if !root_or_skip(name) {
        return None;
    }
    let cg = TestCgroup::new(name);
    let d = Daemon::start(&cg, "");
    Some((cg, d))
}

fn assert_connect(d: &Daemon, pid: u32, exe: &str, ip: &str, port: u16, proto: &str) -> Event {
    let e =
        d.one_event("connect", move |e: &Event| by("connect", pid)(e) && e.port() == Some(port));
    assert_required_fields(&e);
    assert_eq!(e.dest().ip, ip, "{e:?}");
    assert_eq!(e.dest().protocol, proto, "{e:?}");
    assert_eq!(e.process.exe, exe, "{e:?}");
    assert_eq!(e.verdict, "allowed");
    assert_eq!(e.action, "allowed");
    e
}

fn py(cg: &TestCgroup, code: &str) -> u32 {
    let script = format!("import os, socket\n{code}\nprint(os.getpid())\n");
    let (pid, out) = cg.run(&python(), &["-c", &script]);
    assert_eq!(out.trim(), pid.to_string());
    pid
}

#[test]
fn tcp_ipv4_by_curl() {
    let Some((cg, d)) = daemon("tcp4") else { return };
    let port = http_listener("127.0.0.1:0");
    let url = format!("http://127.0.0.1:{port}/");
    let (pid, out) = cg.run("curl", &["-s", "-m", "5", &url]);
    assert_eq!(out, "ok");
    let e = assert_connect(&d, pid, &which("curl"), "127.0.0.1", port, "tcp");
    assert_eq!(e.process.cmdline, format!("curl -s -m 5 {url}"));
    assert_eq!(e.process.cgroup, cg.rel());
}

#[test]
fn tcp_ipv6() {
    let Some((cg, d)) = daemon("tcp6") else { return };
    let port = http_listener("[::1]:0");
    let pid = py(&cg, &format!("s = socket.create_connection(('::1', {port})); s.close()"));
    assert_connect(&d, pid, &python(), "::1", port, "tcp");
}

#[test]
fn udp_sendto_without_connect_ipv4() {
    let Some((cg, d)) = daemon("udp4") else { return };
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = rx.local_addr().unwrap().port();
    let pid = py(
        &cg,
        &format!(
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'x', ('127.0.0.1', {port}))"
        ),
    );
    assert_connect(&d, pid, &python(), "127.0.0.1", port, "udp");
    let mut buf = [0u8; 4];
    rx.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
    assert_eq!(rx.recv(&mut buf).unwrap(), 1, "the datagram itself must still arrive");
}

#[test]
fn udp_connect_ipv6() {
    let Some((cg, d)) = daemon("udp6") else { return };
    let rx = UdpSocket::bind("[::1]:0").unwrap();
    let port = rx.local_addr().unwrap().port();
    let pid = py(
        &cg,
        &format!(
            "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.connect(('::1', {port})); s.send(b'x')"
        ),
    );
    assert_connect(&d, pid, &python(), "::1", port, "udp");
}

#[test]
fn ipv4_mapped_ipv6_is_reported_as_ipv4() {
    let Some((cg, d)) = daemon("mapped") else { return };
    let port = http_listener("127.0.0.1:0");
    let pid = py(
        &cg,
        &format!(
            "s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM); s.connect(('::ffff:127.0.0.1', {port})); s.close()"
        ),
    );
    assert_connect(&d, pid, &python(), "127.0.0.1", port, "tcp");
}

#[test]
fn io_uring_connect() {
    let Some((cg, d)) = daemon("uringconn") else { return };
    let port = http_listener("127.0.0.1:0");
    let (pid, out) =
        cg.run(helper_bin().to_str().unwrap(), &["uring-connect", "127.0.0.1", &port.to_string()]);
    assert_eq!(out.trim(), format!("ok {pid}"));
    assert_connect(
        &d,
        pid,
        &helper_bin().canonicalize().unwrap().display().to_string(),
        "127.0.0.1",
        port,
        "tcp",
    );
}

#[test]
fn connections_outside_cgroup_root_are_not_seen() {
    let Some((cg, d)) = daemon("outside") else { return };
    let port = http_listener("127.0.0.1:0");
    let outside = Command::new("curl")
        .args(["-s", "-m", "5", &format!("http://127.0.0.1:{port}/")])
        .output()
        .unwrap();
    assert!(outside.status.success());
    let marker =
        py(&cg, &format!("s = socket.create_connection(('127.0.0.1', {port})); s.close()"));
    d.one_event("marker", move |e: &Event| by("connect", marker)(e) && e.port() == Some(port));
    let from_outside: Vec<Event> =
        d.events().into_iter().filter(|e| e.kind == "connect" && e.process.pid != marker).collect();
    assert!(from_outside.is_empty(), "connects outside cgroup_root reported: {from_outside:?}");
}

/// A test host in a network namespace the test creates (veth pair, private /30).
struct NetNs {
    name: String,
}

impl NetNs {
    fn new() -> NetNs {
        let id = std::process::id() % 10_000;
        let name = format!("enf-t-{id}");
        let (host_if, ns_if) = (format!("enfh{id}"), format!("enfn{id}"));
        let sh = |c: &str| {
            let st = Command::new("sh").args(["-c", c]).status().unwrap();
            assert!(st.success(), "{c}");
        };
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        sh(&format!("ip netns add {name}"));
        sh(&format!("ip link add {host_if} type veth peer name {ns_if}"));
        sh(&format!("ip link set {ns_if} netns {name}"));
        sh(&format!("ip addr add 10.231.77.1/30 dev {host_if} && ip link set {host_if} up"));
        sh(&format!(
            "ip -n {name} addr add 10.231.77.2/30 dev {ns_if} && ip -n {name} link set {ns_if} up && ip -n {name} link set lo up"
        ));
        NetNs { name }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace destroys the veth pair with it.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

#[test]
fn connect_to_a_host_in_a_network_namespace() {
    let Some((cg, d)) = daemon("netns") else { return };
    let ns = NetNs::new();
    // The listener runs inside the namespace; it serves one connection then exits.
    let mut server = Command::new("ip")
        .args(["netns", "exec", &ns.name, &python(), "-c",
            "import socket\ns = socket.socket(); s.bind(('10.231.77.2', 18443)); s.listen(4)\nprint('ready', flush=True)\nc, _ = s.accept(); c.close()\n"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = [0u8; 6];
    server.stdout.as_mut().unwrap().read_exact(&mut ready).unwrap();
    let pid = py(&cg, "s = socket.create_connection(('10.231.77.2', 18443), timeout=5); s.close()");
    assert_connect(&d, pid, &python(), "10.231.77.2", 18443, "tcp");
    let _ = server.wait();
}

#[test]
fn process_inside_a_new_network_namespace_is_still_attributed() {
    let Some((cg, d)) = daemon("inns") else { return };
    let ns = NetNs::new();
    let script = "import os, socket\nl = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen(1)\ns = socket.create_connection(l.getsockname()); print(os.getpid(), l.getsockname()[1])\n";
    let (_, out) = cg.run("ip", &["netns", "exec", &ns.name, &python(), "-c", script]);
    let mut it = out.split_whitespace();
    let pid: u32 = it.next().unwrap().parse().unwrap();
    let port: u16 = it.next().unwrap().parse().unwrap();
    assert_connect(&d, pid, &python(), "127.0.0.1", port, "tcp");
}
