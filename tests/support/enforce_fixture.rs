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
