//! Data on established sockets (issue 11, case 9 and "taint follows the data"): a process
//! that reads a secret after its socket was connected, or that receives an already connected
//! socket over SCM_RIGHTS from a process nobody judges, tries to send the secret where it is
//! not valid. The egress hook judges the data: in enforce mode nothing of it reaches the
//! receiver (TCP: the socket is blocked; UDP: send() fails with EPERM) and a `send` event names
//! the writer; in monitor mode the data passes with one alert per socket.
use std::io::Read;
use std::net::{TcpListener, UdpSocket};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use enforcer::event::Event;
use enforcer_tests::*;

const SECRET: &str = "{\"k\": \"s3cr3t-egress-value\"}";

/// Bytes received by a loopback TCP listener (every connection, up to 8).
fn tcp_sink() -> (u16, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for s in l.incoming().take(8) {
            let Ok(mut s) = s else { continue };
            let g = g.clone();
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    g.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    (port, got)
}

/// Datagrams received by a loopback UDP socket (for 30 s at most).
fn udp_sink() -> (u16, Arc<Mutex<Vec<u8>>>) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = s.local_addr().unwrap().port();
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 2048];
        while Instant::now() < end {
            if let Ok(n) = s.recv(&mut buf) {
                g.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        }
    });
    (port, got)
}

fn text(got: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&got.lock().unwrap()).into_owned()
}

/// Waits until the receiver holds `want`, or 5 s.
fn wait_for(got: &Arc<Mutex<Vec<u8>>>, want: &str) -> bool {
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        if text(got).contains(want) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

struct Fx {
    cg: TestCgroup,
    daemon: Daemon,
    secret: String,
    ok_port: u16,
    _dir: tempfile::TempDir,
}

/// The secret is valid only toward `ok_port`; intent `wide` covers all of loopback, so a
/// granted process may connect anywhere on it, but the secret's data may go only to `ok_port`.
fn fx(name: &str, mode: &str) -> Option<Fx> {
    if !root_or_skip(name) {
        return None;
    }
    let (dir, secret) = secret_file("key.json", SECRET);
    let ok_port = tcp_listener();
    let policy = format!(
        "mode = \"{mode}\"\n[[secret]]\nname = \"key\"\npaths = [\"{secret}\"]\n\
         destinations = [\"127.0.0.1/32:{ok_port}\"]\n\
         [[intent]]\nname = \"wide\"\nagents = [{{ uid = 0 }}]\nsecrets = [\"key\"]\n\
         destinations = [\"127.0.0.0/8:1-65535\"]\non_violation = \"deny\"\n"
    );
    let cg = TestCgroup::new(name);
    let daemon = Daemon::start(&cg, &policy);
    Some(Fx { cg, daemon, secret, ok_port, _dir: dir })
}

const PRELUDE: &str = r#"
import array, errno, os, socket, sys, time
SECRET = sys.argv[1]
def send(s, data):
    try:
        s.sendall(data); print("sent", flush=True)
    except OSError as e:
        print(errno.errorcode.get(e.errno, str(e.errno)), flush=True)
print("pid", os.getpid(), flush=True)
"#;

/// Runs `body` under `enforcer run --intent wide` in the cgroup; stdout lines.
fn granted(f: &Fx, body: &str) -> Vec<String> {
    let script = format!("{PRELUDE}\n{body}\n");
    let out =
        f.cg.command(enforcer_bin())
            .args(["run", "--intent", "wide", "--", &python(), "-c", &script, &f.secret])
            .env("ENFORCER_RUNTIME_DIR", f.daemon.runtime_dir())
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect()
}

fn pid_of(lines: &[String]) -> u32 {
    lines.iter().find_map(|l| l.strip_prefix("pid ")).and_then(|p| p.parse().ok()).unwrap()
}

fn send_events(f: &Fx, pid: u32) -> Vec<Event> {
    f.daemon.wait_events("send", move |e: &Event| e.kind == "send" && e.process.pid == pid)
}

fn assert_blocked_send(e: &Event, port: u16) {
    assert_eq!(e.verdict, "out_of_intent", "{e:?}");
    assert_eq!(e.action, "denied", "{e:?}");
    let d = e.destination.as_ref().expect("destination");
    assert_eq!((d.ip.as_str(), d.port), ("127.0.0.1", port), "{e:?}");
    assert!(e.message.as_deref().unwrap_or("").contains("\"key\""), "{e:?}");
    assert!(!serde_json::to_string(e).unwrap().contains("s3cr3t"), "secret value in an event");
}

#[test]
fn connect_then_read_cannot_send_where_the_secret_is_invalid() {
    let Some(f) = fx("egress_connect_then_read", "enforce") else { return };
    let (sink, got) = tcp_sink();
    let ok_sink_port = f.ok_port;
    // Connected while clean (allowed: `wide` covers the sink), then the secret is read.
    let lines = granted(
        &f,
        &format!(
            "s = socket.create_connection(('127.0.0.1', {sink}), timeout=5)\n\
             send(s, b'before-read;')\n\
             time.sleep(0.3)\n\
             data = open(SECRET).read().encode()\n\
             send(s, data)\n\
             time.sleep(0.5)\n\
             send(s, b'after;')\n\
             time.sleep(0.5)\n\
             s.close()\n"
        ),
    );
    let pid = pid_of(&lines);
    assert!(wait_for(&got, "before-read;"), "the clean connection must work: {}", text(&got));
    std::thread::sleep(Duration::from_millis(500));
    let received = text(&got);
    assert!(!received.contains("s3cr3t"), "the secret left: {received:?} ({lines:?})");
    assert!(!received.contains("after;"), "a blocked socket carried more data: {received:?}");
    let e = send_events(&f, pid);
    assert_blocked_send(&e[0], sink);
    assert_eq!(e.len(), 1, "one event per blocked socket: {e:?}");
    // The same data toward where the secret is valid goes through (the listener drops it).
    let lines = granted(
        &f,
        &format!(
            "data = open(SECRET).read().encode()\n\
             s = socket.create_connection(('127.0.0.1', {ok_sink_port}), timeout=5)\n\
             send(s, data)\n"
        ),
    );
    assert!(lines.iter().any(|l| l == "sent"), "{lines:?}");
    let pid = pid_of(&lines);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        f.daemon.events().iter().all(|e| !(e.kind == "send" && e.process.pid == pid)),
        "no send event toward a valid destination"
    );
}

/// A process nobody judges connects, then hands the socket to a granted process over a unix
/// socket (SCM_RIGHTS). Returns the passer.
fn passer(f: &Fx, unix: &std::path::Path, kind: &str, port: u16) -> Child {
    let sock = if kind == "tcp" {
        format!("s = socket.create_connection(('127.0.0.1', {port}), timeout=5)\n")
    } else {
        format!(
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.connect(('127.0.0.1', {port}))\n"
        )
    };
    let script = format!(
        "{PRELUDE}\n{sock}\
         s.send(b'passer-before;')\n\
         u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
         u.bind('{path}'); u.listen(1)\n\
         print('ready', flush=True)\n\
         c, _ = u.accept()\n\
         socket.send_fds(c, [b'x'], [s.fileno()])\n\
         c.recv(1)\n\
         time.sleep(0.5)\n\
         send(s, b'passer-after;')\n",
        path = unix.display()
    );
    start_ready(f, &script)
}

/// Starts a python script in the cgroup (a process nobody judges) and waits until it prints
/// "ready".
fn start_ready(f: &Fx, script: &str) -> Child {
    let mut child =
        f.cg.command(python())
            .args(["-c", script, &f.secret])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
    // Wait for "ready" (bounded by the read timeout of the pipe: the script prints at once).
    let mut out = child.stdout.take().unwrap();
    let mut buf = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    let mut b = [0u8; 256];
    while !String::from_utf8_lossy(&buf).contains("ready") && Instant::now() < end {
        match out.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&b[..n]),
        }
    }
    assert!(String::from_utf8_lossy(&buf).contains("ready"), "helper did not start: {buf:?}");
    // Its later output is not needed; the pipe stays open until it exits.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    child
}

/// The receiver: sends once while clean, reads the secret, sends it, acknowledges.
fn receiver(unix: &std::path::Path) -> String {
    format!(
        "u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
         u.connect('{path}')\n\
         _, fds, _, _ = socket.recv_fds(u, 1, 1)\n\
         s = socket.socket(fileno=fds[0])\n\
         send(s, b'receiver-clean;')\n\
         time.sleep(0.3)\n\
         send(s, open(SECRET).read().encode())\n\
         time.sleep(0.3)\n\
         u.send(b'k')\n",
        path = unix.display()
    )
}

#[test]
fn a_passed_tcp_socket_cannot_carry_the_secret() {
    let Some(f) = fx("egress_passed_tcp", "enforce") else { return };
    let (sink, got) = tcp_sink();
    let unix = f.daemon.runtime_dir().join("pass-tcp.sock");
    let mut p = passer(&f, &unix, "tcp", sink);
    let lines = granted(&f, &receiver(&unix));
    let _ = p.wait();
    let pid = pid_of(&lines);
    assert!(wait_for(&got, "receiver-clean;"), "{}", text(&got));
    std::thread::sleep(Duration::from_millis(500));
    let received = text(&got);
    assert!(received.starts_with("passer-before;"), "{received:?}");
    assert!(!received.contains("s3cr3t"), "the secret left over a passed socket: {received:?}");
    assert!(!received.contains("passer-after;"), "the blocked socket carried more: {received:?}");
    let e = send_events(&f, pid);
    assert_blocked_send(&e[0], sink);
}

#[test]
fn a_passed_udp_socket_cannot_carry_the_secret() {
    let Some(f) = fx("egress_passed_udp", "enforce") else { return };
    let (sink, got) = udp_sink();
    let unix = f.daemon.runtime_dir().join("pass-udp.sock");
    let mut p = passer(&f, &unix, "udp", sink);
    let lines = granted(&f, &receiver(&unix));
    let _ = p.wait();
    let pid = pid_of(&lines);
    // The clean send went out; the secret's send failed with EPERM in the writer.
    let sends: Vec<&String> = lines.iter().filter(|l| *l == "sent" || *l == "EPERM").collect();
    assert_eq!(sends, ["sent", "EPERM"], "{lines:?}");
    assert!(wait_for(&got, "receiver-clean;"), "{}", text(&got));
    let received = text(&got);
    assert!(!received.contains("s3cr3t"), "{received:?}");
    assert!(!received.contains("passer-after;"), "{received:?}");
    let e = send_events(&f, pid);
    assert_blocked_send(&e[0], sink);
}

#[test]
fn monitor_mode_alerts_once_per_socket() {
    let Some(f) = fx("egress_monitor", "monitor") else { return };
    let (sink, got) = tcp_sink();
    let lines = granted(
        &f,
        &format!(
            "s = socket.create_connection(('127.0.0.1', {sink}), timeout=5)\n\
             data = open(SECRET).read().encode()\n\
             send(s, data)\n\
             time.sleep(0.2)\n\
             send(s, b'again;')\n\
             time.sleep(0.2)\n"
        ),
    );
    let pid = pid_of(&lines);
    assert!(wait_for(&got, "again;"), "monitor mode lets data through: {}", text(&got));
    let e = send_events(&f, pid);
    assert_eq!(e[0].verdict, "out_of_intent");
    assert_eq!(e[0].action, "alerted");
    std::thread::sleep(Duration::from_millis(500));
    let n = f.daemon.events().iter().filter(|e| e.kind == "send" && e.process.pid == pid).count();
    assert_eq!(n, 1, "one alert per socket");
}

/// A process nobody judges that receives sockets (one or two) over `unix` and writes
/// `clean-writer;` on each, then acknowledges.
fn clean_writer(f: &Fx, unix: &std::path::Path) -> Child {
    start_ready(
        f,
        &format!(
            "{PRELUDE}\n\
             u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
             u.bind('{path}'); u.listen(1); u.settimeout(60)\n\
             print('ready', flush=True)\n\
             c, _ = u.accept()\n\
             _, fds, _, _ = socket.recv_fds(c, 1, 2)\n\
             for fd in fds: send(socket.socket(fileno=fd), b'clean-writer;')\n\
             time.sleep(0.5)\n\
             c.send(b'k')\n",
            path = unix.display()
        ),
    )
}

/// Sockets the attacker creates to push a blocked socket's state out of a bounded map keyed
/// by socket cookie (the egress hook's state was an LRU map of 65,536 sockets): twice that.
const FLOOD: usize = 131_072;

/// Python: children of the attacker (they inherit its grant and taint) create and hold
/// `{FLOOD}` UDP sockets between them (one process may hold only the file limit), report
/// how many on `ready_r` ("n," each), and exit when `hold_w` closes.
const HOLD_SOCKETS: &str = r#"
ready_r, ready_w = os.pipe(); hold_r, hold_w = os.pipe()
kids = 0; left = FLOOD
while left > 0:
    n = min(per, left); left -= n; kids += 1
    if os.fork() == 0:
        os.close(hold_w)
        held = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
        os.write(ready_w, b'%d,' % len(held))
        os.read(hold_r, 1)
        os._exit(0)
os.close(hold_r)
got = b''
while got.count(b',') < kids:
    got += os.read(ready_r, 4096)
"#;

/// The attacker's next move against a blocked socket: it writes the secret into a connected
/// TCP socket (blocked: the data stays queued), creates twice as many sockets as a bounded
/// socket map holds (each one a judged creator's socket, so each one gets state), writes
/// again, and hands the socket to a process nobody judges, which writes too: with the blocked
/// socket's state evicted, that clean write (or the next retransmit) would carry the queued
/// secret out. The state lives in the socket: nothing of it leaves, and the one `send` event
/// is the first block.
#[test]
fn a_flood_of_sockets_does_not_unblock_a_blocked_one() {
    let Some(f) = fx("egress_evict", "enforce") else { return };
    let (sink, got) = tcp_sink();
    let (udp, udp_got) = udp_sink();
    let unix = f.daemon.runtime_dir().join("evict.sock");
    let mut clean = clean_writer(&f, &unix);
    let t0 = Instant::now();
    let lines = granted(
        &f,
        &format!(
            "import resource\n\
             soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n\
             resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n\
             per = hard - 64\n\
             s = socket.create_connection(('127.0.0.1', {sink}), timeout=5)\n\
             d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             d.connect(('127.0.0.1', {udp}))\n\
             send(s, b'before-read;')\n\
             send(d, b'before-read;')\n\
             time.sleep(0.3)\n\
             secret = open(SECRET).read().encode()\n\
             send(s, secret)\n\
             send(d, secret)\n\
             time.sleep(0.3)\n\
             {HOLD_SOCKETS}\n\
             print('flooded', sum(int(x) for x in got.split(b',') if x), flush=True)\n\
             send(s, b'after-flood;')\n\
             u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
             u.connect('{path}')\n\
             socket.send_fds(u, [b'x'], [s.fileno(), d.fileno()])\n\
             u.recv(1)\n\
             os.close(hold_w)\n",
            path = unix.display(),
            HOLD_SOCKETS = HOLD_SOCKETS.replace("FLOOD", &FLOOD.to_string()),
        ),
    );
    let _ = clean.wait();
    println!("attacker and clean writer done in {:.1}s", t0.elapsed().as_secs_f64());
    assert!(lines.iter().any(|l| *l == format!("flooded {FLOOD}")), "{lines:?}");
    let pid = pid_of(&lines);
    assert!(wait_for(&got, "before-read;"), "the clean connection must work: {}", text(&got));
    assert!(wait_for(&udp_got, "before-read;"), "{}", text(&udp_got));
    // The UDP socket sees no retransmit (nothing touches its state during the flood): a
    // clean datagram after it shows whether the block outlived the flood. The TCP socket's
    // queued secret would leave with the next retransmit (3 s after the block at the latest).
    let received = text(&udp_got);
    assert!(
        !received.contains("clean-writer;"),
        "the flood unblocked the UDP socket: {received:?}"
    );
    assert!(!received.contains("s3cr3t"), "{received:?}");
    std::thread::sleep(Duration::from_millis(3000).saturating_sub(t0.elapsed()));
    std::thread::sleep(Duration::from_millis(1000));
    let received = text(&got);
    assert!(!received.contains("s3cr3t"), "the secret left after the flood: {received:?}");
    assert!(!received.contains("after-flood;"), "the blocked socket carried more: {received:?}");
    assert!(!received.contains("clean-writer;"), "a clean writer unblocked it: {received:?}");
    let e = send_events(&f, pid);
    assert!(e.iter().any(|e| e.destination.as_ref().is_some_and(|d| d.port == sink)), "{e:?}");
    assert!(e.iter().any(|e| e.destination.as_ref().is_some_and(|d| d.port == udp)), "{e:?}");
    std::thread::sleep(Duration::from_millis(300));
    let n = f.daemon.events().iter().filter(|e| e.kind == "send" && e.process.pid == pid).count();
    assert_eq!(n, 2, "each socket stayed blocked: no second judgement, no second event");
}

/// The socket state is pinned with the maps: a daemon stopped (SIGTERM, as for an upgrade)
/// and started again adopts it, so a socket blocked before the restart stays blocked after
/// it, also for a writer nobody judges (the queued secret never leaves).
#[test]
fn a_blocked_socket_stays_blocked_across_a_daemon_restart() {
    use std::io::{BufRead, BufReader, Write};
    let Some(mut f) = fx("egress_restart", "enforce") else { return };
    let (sink, got) = tcp_sink();
    let unix = f.daemon.runtime_dir().join("restart.sock");
    let mut clean = clean_writer(&f, &unix);
    let script = format!(
        "{PRELUDE}\n\
         s = socket.create_connection(('127.0.0.1', {sink}), timeout=5)\n\
         send(s, b'before-read;')\n\
         time.sleep(0.3)\n\
         send(s, open(SECRET).read().encode())\n\
         print('blocked', flush=True)\n\
         sys.stdin.readline()\n\
         u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
         u.connect('{path}')\n\
         socket.send_fds(u, [b'x'], [s.fileno()])\n\
         u.recv(1)\n",
        path = unix.display()
    );
    let mut attacker =
        f.cg.command(enforcer_bin())
            .args(["run", "--intent", "wide", "--", &python(), "-c", &script, &f.secret])
            .env("ENFORCER_RUNTIME_DIR", f.daemon.runtime_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
    let mut out = BufReader::new(attacker.stdout.take().unwrap());
    let mut lines = Vec::new();
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end && !lines.iter().any(|l: &String| l == "blocked") {
        let mut l = String::new();
        if out.read_line(&mut l).unwrap_or(0) == 0 {
            break;
        }
        lines.push(l.trim_end().to_string());
    }
    assert!(lines.iter().any(|l| l == "blocked"), "attacker did not get to its send: {lines:?}");
    let pid = pid_of(&lines);
    let e = send_events(&f, pid);
    assert_blocked_send(&e[0], sink);
    assert!(f.daemon.stop().success());
    f.daemon.relaunch();
    assert!(f.daemon.log().contains("adopted the previous daemon's pinned maps"));
    attacker.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let _ = attacker.wait();
    let _ = clean.wait();
    assert!(wait_for(&got, "before-read;"), "{}", text(&got));
    std::thread::sleep(Duration::from_millis(1000));
    let received = text(&got);
    assert!(!received.contains("s3cr3t"), "the secret left after the restart: {received:?}");
    assert!(!received.contains("clean-writer;"), "unblocked by the restart: {received:?}");
}
