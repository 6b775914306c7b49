//! The egress hook on every kernel of the matrix (this file runs on the host and inside the
//! Debian 6.1 and 6.12 guests): the variant the kernel accepts is the one attached, `status`
//! says which and why, and a granted process that connects while clean, then reads the
//! secret, cannot send it where it is not valid (TCP: no byte of it arrives; UDP: EPERM).
//!
//! Debian 6.1 refuses `egress` ("unknown func bpf_get_current_pid_tgid#14": cgroup_skb may
//! not read the current task there) and runs `egress_owner`, judging by the socket's judged
//! creator; 6.12 and this host load `egress` (the writer is judged). The IPC alert's hooks
//! are checked too: never the syscall tracepoints on these kernels.
use std::io::Read;
use std::net::{TcpListener, UdpSocket};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use enforcer::event::Event;
use enforcer_tests::*;

const SECRET: &str = "{\"k\": \"s3cr3t-egress-kernels\"}";

/// Bytes received by a loopback listener (TCP: up to 4 connections; UDP: 30 s).
fn sink(udp: bool) -> (u16, Arc<Mutex<Vec<u8>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    if udp {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = s.local_addr().unwrap().port();
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(30) * time_scale();
            let mut buf = [0u8; 2048];
            while Instant::now() < end {
                if let Ok(n) = s.recv(&mut buf) {
                    g.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            }
        });
        return (port, got);
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().take(4) {
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

fn text(got: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&got.lock().unwrap()).into_owned()
}

const SCRIPT: &str = r#"
import errno, os, socket, sys, time
SECRET, PORT, KIND = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def send(s, data):
    try:
        s.send(data); print("sent", flush=True)
    except OSError as e:
        print(errno.errorcode.get(e.errno, str(e.errno)), flush=True)
print("pid", os.getpid(), flush=True)
if KIND == "tcp":
    s = socket.create_connection(("127.0.0.1", PORT), timeout=10)
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", PORT))
send(s, b"clean;")
time.sleep(0.3)
send(s, open(SECRET).read().encode())
time.sleep(0.5)
send(s, b"after;")
time.sleep(0.5)
"#;

#[test]
fn egress_loads_and_blocks_connect_then_read_then_send() {
    let name = "egress_kernels";
    if !root_or_skip(name) {
        return;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let series = std::env::var("ENFORCER_MATRIX_KERNEL").ok().filter(|s| !s.is_empty());
    println!("{name}: kernel {} ({})", release.trim(), series.as_deref().unwrap_or("host"));
    let (_dir, secret) = secret_file("key.json", SECRET);
    let ok_port = tcp_listener();
    let policy = format!(
        "mode = \"enforce\"\n[[secret]]\nname = \"key\"\npaths = [\"{secret}\"]\n\
         destinations = [\"127.0.0.1/32:{ok_port}\"]\n\
         [[intent]]\nname = \"wide\"\nagents = [{{ uid = 0 }}]\nsecrets = [\"key\"]\n\
         destinations = [\"127.0.0.0/8:1-65535\"]\non_violation = \"deny\"\n"
    );
    let cg = TestCgroup::new(name);
    let daemon = Daemon::start(&cg, &policy);

    // The variant this kernel accepts, named in status.
    let st = daemon.status_json();
    let programs = st["programs"].to_string();
    let egress = st["backends"]["egress"].as_str().unwrap_or_default().to_string();
    let expect_owner = series.as_deref() == Some("6.1");
    if expect_owner {
        assert!(programs.contains("cgroup_skb/egress_owner"), "{st:#}");
        assert!(egress.contains("unknown func bpf_get_current_pid_tgid"), "{egress}");
    } else {
        assert!(programs.contains("\"cgroup_skb/egress\""), "{st:#}");
        assert!(!egress.contains("egress_owner"), "{egress}");
    }
    // Socket state lives in the socket: nothing to forget at release.
    assert!(!programs.contains("sock_release"), "{st:#}");
    // The IPC alert never needs the syscall tracepoints on the matrix: the cgroup Unix-socket
    // hooks on 6.7+ (6.12, this host), BPF-LSM on 6.1.
    let ipc = st["backends"]["ipc"].as_str().unwrap_or_default().to_string();
    if expect_owner {
        assert!(ipc.starts_with("lsm (unix_stream_connect, unix_may_send)"), "{st:#}");
        assert!(programs.contains("lsm/unix_stream_connect"), "{st:#}");
    } else {
        assert_eq!(ipc, "cgroup_sock_addr (connect_unix, sendmsg_unix)", "{st:#}");
        assert!(programs.contains("cgroup_sock_addr/sendmsg_unix"), "{st:#}");
    }
    assert!(!programs.contains("tracepoint/syscalls"), "{st:#}");
    println!("{name}: ipc {ipc}");
    assert_eq!(st["programs_missing"].as_array().map(|a| a.len()), Some(0), "{st:#}");
    println!("{name}: {egress}");

    for kind in ["tcp", "udp"] {
        let (port, got) = sink(kind == "udp");
        let out = cg
            .command(enforcer_bin())
            .args(["run", "--intent", "wide", "--", &python(), "-c", SCRIPT, &secret])
            .args([&port.to_string(), kind])
            .env("ENFORCER_RUNTIME_DIR", daemon.runtime_dir())
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        let lines: Vec<String> =
            String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
        let pid: u32 = lines
            .iter()
            .find_map(|l| l.strip_prefix("pid "))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{kind}: {lines:?}"));
        let end = Instant::now() + Duration::from_secs(5) * time_scale();
        while !text(&got).contains("clean;") && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(500));
        let received = text(&got);
        assert!(received.contains("clean;"), "{kind}: the clean send must arrive: {received:?}");
        assert!(!received.contains("s3cr3t"), "{kind}: the secret left: {received:?} {lines:?}");
        assert!(!received.contains("after;"), "{kind}: the blocked socket carried more");
        if kind == "udp" {
            let sends: Vec<&String> =
                lines.iter().filter(|l| *l == "sent" || *l == "EPERM").collect();
            assert_eq!(sends, ["sent", "EPERM", "EPERM"], "{lines:?}");
        }
        let e = daemon.one_event("send", move |e: &Event| e.kind == "send" && e.process.pid == pid);
        assert_eq!((e.verdict.as_str(), e.action.as_str()), ("out_of_intent", "denied"), "{e:?}");
        let d = e.destination.as_ref().expect("destination");
        assert_eq!(
            (d.ip.as_str(), d.port, d.protocol.as_str()),
            ("127.0.0.1", port, kind),
            "{e:?}"
        );
        println!(
            "{name}: {kind}: connect, read, send: nothing of the secret arrived; event {}",
            e.action
        );
    }
}
