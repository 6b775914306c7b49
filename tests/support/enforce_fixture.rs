//! The enforce-mode fixture of the enforcement tests (enforce.rs, enforce_resilience.rs): a
//! secret, two loopback listeners (one inside the intents, one outside) and intents with each
//! on_violation; python snippets run in the cgroup, optionally under `enforcer run --intent`.
use std::process::Stdio;

use enforcer::event::Event;

use crate::cgroup::TestCgroup;
use crate::daemon::Daemon;
use crate::env::{enforcer_bin, python, root_or_skip, secret_file};
use crate::events::EventExt;
use crate::net::tcp_listener;

pub struct Fixture {
    pub cg: TestCgroup,
    pub daemon: Daemon,
    pub secret: String,
    pub ok_port: u16,
    pub bad_port: u16,
    pub dir: tempfile::TempDir,
}

/// Enforce mode; intents: `strict` (deny), `lenient` (alert), `killer` (kill), `revoker`
/// (deny + revoke_on_violation), all covering the secret and `ok_port`.
pub fn fixture(name: &str, mode: &str, extra: &str) -> Option<Fixture> {
    if !root_or_skip(name) {
        return None;
    }
    let (dir, secret) = secret_file("key.json", "{\"k\": 1}");
    let (ok_port, bad_port) = (tcp_listener(), tcp_listener());
    let intent = |name: &str, secret: &str, on: &str, more: &str| {
        format!(
            "[[intent]]\nname = \"{name}\"\nagents = [{{ uid = 0 }}]\nsecrets = [\"{secret}\"]\ndestinations = [\"127.0.0.1/32:{ok_port}\"]\nmax_ttl = \"10m\"\non_violation = \"{on}\"\n{more}"
        )
    };
    // `killer` covers another secret: an ungranted read of `key` gets the strictest
    // on_violation of the intents covering `key`, which is then deny.
    let policy = format!(
        "mode = \"{mode}\"\n[[secret]]\nname = \"key\"\npaths = [\"{secret}\"]\n[[secret]]\nname = \"other\"\npaths = [\"{secret}.other\"]\n{}{}{}{}{extra}",
        intent("strict", "key", "deny", ""),
        intent("lenient", "key", "alert", ""),
        intent("killer", "other", "kill", ""),
        intent("revoker", "key", "deny", "revoke_on_violation = true\n"),
    );
    let cg = TestCgroup::new(name);
    let daemon = Daemon::start(&cg, &policy);
    Some(Fixture { cg, daemon, secret, ok_port, bad_port, dir })
}

/// Enforce mode; the secret is valid only toward `ok_port`; intent `wide` covers every
/// loopback port.
pub fn fixture_with_secret_dest(name: &str) -> Option<Fixture> {
    if !root_or_skip(name) {
        return None;
    }
    let (dir, secret) = secret_file("key.json", "{\"k\": 1}");
    let (ok_port, bad_port) = (tcp_listener(), tcp_listener());
    let policy = format!(
        "mode = \"enforce\"\n[[secret]]\nname = \"key\"\npaths = [\"{secret}\"]\ndestinations = [\"127.0.0.1/32:{ok_port}\"]\n\
         [[intent]]\nname = \"wide\"\nagents = [{{ uid = 0 }}]\nsecrets = [\"key\"]\ndestinations = [\"127.0.0.0/8:1-65535\"]\non_violation = \"deny\"\n"
    );
    let cg = TestCgroup::new(name);
    let daemon = Daemon::start(&cg, &policy);
    Some(Fixture { cg, daemon, secret, ok_port, bad_port, dir })
}

/// A python prelude for snippets run in the cgroup. Helpers `conn(port)`, `udp(port)`,
/// `mapped(port)` and `read()` print "ok" or the errno name.
pub const PRELUDE: &str = r#"
import errno, os, socket, sys
SECRET = sys.argv[1]
def report(f, *a):
    try:
        f(*a); print("ok", flush=True)
    except OSError as e:
        print(errno.errorcode.get(e.errno, str(e.errno)), flush=True)
def _conn(p): socket.create_connection(("127.0.0.1", p), timeout=3).close()
def _udp(p): socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", p))
def _mapped(p):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM); s.settimeout(3); s.connect(("::ffff:127.0.0.1", p)); s.close()
def _read(): open(SECRET).read()
conn = lambda p: report(_conn, p)
udp = lambda p: report(_udp, p)
mapped = lambda p: report(_mapped, p)
read = lambda: report(_read)
"#;

/// Runs `body` (after `PRELUDE`) in the cgroup, under `enforcer run --intent` when `intent`
/// is given: (exit code, stdout lines).
pub fn py_run(f: &Fixture, intent: Option<&str>, body: &str) -> (Option<i32>, Vec<String>) {
    let script = format!("{PRELUDE}\n{body}\n");
    let mut cmd = match intent {
        Some(i) => {
            let mut c = f.cg.command(enforcer_bin());
            c.args(["run", "--intent", i, "--", &python(), "-c", &script, &f.secret]);
            c
        }
        None => {
            let mut c = f.cg.command(python());
            c.args(["-c", &script, &f.secret]);
            c
        }
    };
    let out = cmd
        .env("ENFORCER_RUNTIME_DIR", f.daemon.runtime_dir())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let lines = String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
    (out.status.code(), lines)
}

/// The connect events to `port` (waits for at least one).
pub fn conn_events(f: &Fixture, port: u16) -> Vec<Event> {
    f.daemon.wait_events("connect", move |e: &Event| e.kind == "connect" && e.port() == Some(port))
}

/// Attacker procedures on secret files, shared by the fanotify backend's tests
/// (attacks_files.rs) and the BPF-LSM backend's (lsm.rs, also in the guest kernels): python
/// bodies for `py_run`, each printing its pid last.
pub mod file_attacks {
    /// `mv secret x; cat x; mv x secret`: prints the read's result.
    pub const RENAME_AWAY: &str = "
away = os.path.join(os.path.dirname(SECRET), 'renamed.txt')
os.rename(SECRET, away)
report(lambda: open(away).read())
os.rename(away, SECRET)
print(os.getpid())
";

    /// A credential tool's rotation (temp file + rename over the path) followed at once by a
    /// read, 200 times in one process: prints how many reads failed with EPERM and how many
    /// returned the new content.
    pub const REPLACE_THEN_READ: &str = "
d = os.path.dirname(SECRET)
denied = read_new = 0
for i in range(200):
    tmp = os.path.join(d, '.key.json.tmp%d' % i)
    with open(tmp, 'w') as t:
        t.write('new-%d' % i)
    os.rename(tmp, SECRET)
    try:
        if open(SECRET).read() == 'new-%d' % i:
            read_new += 1
    except PermissionError:
        denied += 1
print(denied, read_new)
print(os.getpid())
";

    /// 200 reads of the secret (while another process rotates it): prints how many read
    /// and how many failed with EPERM.
    pub const READ_200: &str = "
ok = denied = 0
for i in range(200):
    try:
        open(SECRET).read(); ok += 1
    except PermissionError:
        denied += 1
print(ok, denied)
print(os.getpid())
";

    /// Rotates `secret` (temp file + rename, from this process) until `stop` or 30 s;
    /// returns how many rotations it made.
    pub fn rotate_until(
        secret: String,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> std::thread::JoinHandle<u32> {
        std::thread::spawn(move || {
            let mut n = 0u32;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && std::time::Instant::now() < deadline
            {
                let tmp = format!("{secret}.tmp");
                std::fs::write(&tmp, format!("rotated-{n}")).unwrap();
                std::fs::rename(&tmp, &secret).unwrap();
                n += 1;
            }
            n
        })
    }
}
