//! Harness for the integration tests: a cgroup the test owns, a real daemon confined to it,
//! real processes started inside it, and the daemon's stored events to assert on.
//!
//! Every test that needs the kernel calls `root_or_skip()` first: without root the kernel
//! programs cannot load, and the test says so instead of passing silently.
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn enforcer_bin() -> PathBuf {
    match std::env::var_os("ENFORCER_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/enforcer"),
    }
}

/// The helper binary cargo builds next to the test binaries (target/<profile>/).
pub fn helper_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    profile_dir.join("enforcer-test-helper")
}

/// True when the kernel programs can be loaded; otherwise prints why the test is skipped.
pub fn root_or_skip(test: &str) -> bool {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP {test}: needs root (CAP_BPF, CAP_SYS_ADMIN) to load kernel programs");
        return false;
    }
    let bin = enforcer_bin();
    assert!(
        bin.exists(),
        "{} missing: run `cargo xtask test` (it builds the daemon with its eBPF object)",
        bin.display()
    );
    true
}

pub fn cgroup2_mount() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 2 && f[2] == "cgroup2" {
            return PathBuf::from(f[1]);
        }
    }
    panic!("no cgroup2 mount");
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A cgroup created for one test; processes started through it run inside it. On drop
/// every process left in it is killed and the cgroup removed.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(name: &str) -> Self {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let path = cgroup2_mount().join(format!("enforcer-test-{name}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TestCgroup { path }
    }

    /// The cgroup path as the daemon reports it (relative to the cgroup2 mount).
    pub fn rel(&self) -> String {
        format!("/{}", self.path.strip_prefix(cgroup2_mount()).unwrap().display())
    }

    /// A command whose process joins this cgroup between fork and exec.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let procs = File::options()
            .write(true)
            .open(self.path.join("cgroup.procs"))
            .expect("open cgroup.procs");
        let mut cmd = Command::new(program);
        unsafe {
            cmd.pre_exec(move || {
                // Only async-signal-safe calls here: write(2) of "0" moves the caller.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr() as *const libc::c_void, 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs a command in the cgroup to completion; returns (pid, stdout).
    pub fn run(&self, program: &str, args: &[&str]) -> (u32, String) {
        let child = self
            .command(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (pid, String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // cgroup.kill covers the whole subtree; then child cgroups go first (a cgroup with
        // children cannot be removed), deepest first.
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        let mut dirs = vec![self.path.clone()];
        let mut i = 0;
        while i < dirs.len() {
            if let Ok(rd) = std::fs::read_dir(&dirs[i]) {
                dirs.extend(
                    rd.flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
            i += 1;
        }
        for dir in dirs.iter().rev() {
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A running daemon with its own config, runtime and state directories.
pub struct Daemon {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// bpffs pin dir of this daemon; removed when the test is done, so programs of a
    /// daemon killed with SIGKILL never outlive the test.
    pub pin_dir: PathBuf,
}

impl Daemon {
    /// Writes a config (cgroup_root = the test cgroup, private dirs) plus `extra`
    /// (secrets etc.), starts the daemon and waits until `enforcer status` answers.
    pub fn start(cgroup: &TestCgroup, extra: &str) -> Daemon {
        let d = Daemon::configure(cgroup, extra);
        d.launch()
    }

    pub fn configure(cgroup: &TestCgroup, extra: &str) -> Daemon {
        let dir = tempfile::Builder::new().prefix("enforcer-test-").tempdir().unwrap();
        let config = dir.path().join("enforcer.toml");
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/enforcer-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        // `mode` may be set by `extra` (it must then come first in it).
        let mode = if extra.trim_start().starts_with("mode") { "" } else { "mode = \"monitor\"\n" };
        let text = format!(
            "{mode}host = \"test-host\"\ncgroup_root = \"{}\"\nruntime_dir = \"{}\"\nstate_dir = \"{}\"\npin_dir = \"{}\"\n{extra}\n",
            cgroup.path.display(),
            dir.path().join("run").display(),
            dir.path().join("state").display(),
            pin_dir.display(),
        );
        std::fs::write(&config, text).unwrap();
        Daemon { child: None, dir, config, pin_dir }
    }

    pub fn launch(mut self) -> Daemon {
        let log = File::create(self.dir.path().join("daemon.log")).unwrap();
        let child = Command::new(enforcer_bin())
            .args(["daemon", "--config"])
            .arg(&self.config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn enforcer daemon");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.status_ok() {
                return self;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited early ({st}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "daemon not ready after 30 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn status_ok(&self) -> bool {
        Command::new(enforcer_bin())
            .args(["status", "--runtime-dir"])
            .arg(self.runtime_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    pub fn status_json(&self) -> Value {
        let out = Command::new(enforcer_bin())
            .args(["status", "--json", "--runtime-dir"])
            .arg(self.runtime_dir())
            .output()
            .unwrap();
        assert!(out.status.success(), "status failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Every stored event, parsed.
    pub fn events(&self) -> Vec<Value> {
        let Ok(f) = File::open(self.state_dir().join("events.jsonl")) else { return Vec::new() };
        BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(&l).unwrap())
            .collect()
    }

    /// Waits (up to 10 s) for events matching `pred`; returns them all once at least one
    /// is there, after a short settle so duplicates would show.
    pub fn wait_events(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found: Vec<Value> = self.events().into_iter().filter(|e| pred(e)).collect();
            if !found.is_empty() {
                std::thread::sleep(Duration::from_millis(300));
                return self.events().into_iter().filter(|e| pred(e)).collect();
            }
            assert!(
                Instant::now() < deadline,
                "no event {what} within 10 s; events:\n{}\nlog:\n{}",
                self.dump(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Exactly one event matching `pred`.
    pub fn one_event(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let mut v = self.wait_events(what, pred);
        assert_eq!(v.len(), 1, "expected exactly one event {what}, got {}:\n{v:#?}", v.len());
        v.remove(0)
    }

    pub fn dump(&self) -> String {
        self.events().iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n")
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("daemon running");
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return st;
            }
            assert!(Instant::now() < deadline, "daemon ignored SIGTERM for 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Daemon {
    /// SIGKILL: no cleanup by the daemon; its pins stay and keep enforcing.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Removes the pins (detaching any programs a killed daemon left).
    pub fn remove_pins(&self) {
        if let Ok(rd) = std::fs::read_dir(&self.pin_dir) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.pin_dir);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        self.remove_pins();
    }
}

/// Events of `kind` from process `pid`.
pub fn by(kind: &'static str, pid: u32) -> impl Fn(&Value) -> bool {
    move |e| e["kind"] == kind && e["process"]["pid"] == pid
}

/// Fields every event must carry (docs/contracts.md, "Events").
pub fn assert_required_fields(e: &Value) {
    for f in ["schema", "time", "host", "kind", "verdict", "action", "mode", "process"] {
        assert!(!e[f].is_null(), "event lacks {f}: {e}");
    }
    assert_eq!(e["schema"], "enforcer.event/v1");
    for f in ["pid", "ppid", "uid", "exe", "cmdline", "cgroup"] {
        assert!(!e["process"][f].is_null(), "event lacks process.{f}: {e}");
    }
}

/// (dev, ino) as the kernel reports them for `path`.
pub fn dev_ino(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap();
    (m.dev(), m.ino())
}

/// Canonical path of a program found on PATH (what the daemon reports as exe).
pub fn which(prog: &str) -> String {
    let out = Command::new("sh").args(["-c", &format!("command -v {prog}")]).output().unwrap();
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    std::fs::canonicalize(&p)
        .unwrap_or_else(|e| panic!("{prog} not found ({p}): {e}"))
        .display()
        .to_string()
}

/// The python3 interpreter's real path (not a pyenv shim), for commands and exe assertions.
pub fn python() -> String {
    let out = Command::new("python3")
        .args(["-c", "import os, sys; print(os.path.realpath(sys.executable))"])
        .output()
        .expect("python3");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Daemon {
    /// Runs `enforcer ARGS` against this daemon (its runtime dir via ENFORCER_RUNTIME_DIR).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(enforcer_bin())
            .args(args)
            .env("ENFORCER_RUNTIME_DIR", self.runtime_dir())
            .output()
            .expect("run enforcer")
    }

    /// `curl --unix-socket` against the API: (HTTP status, parsed JSON body).
    pub fn curl(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let sock = self.runtime_dir().join("mint.sock");
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-m", "10", "-o", "-", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(&sock)
            .args(["-X", method]);
        if let Some(b) = body {
            cmd.args(["-H", "content-type: application/json", "--data-binary", b]);
        }
        cmd.arg(format!("http://localhost{path}"));
        let out = cmd.output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), serde_json::from_str(body).unwrap_or(Value::Null))
    }
}

/// A loopback TCP listener that accepts and drops connections (up to 64), on a free port.
pub fn tcp_listener() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().take(64) {
            drop(s);
        }
    });
    port
}

/// A secret file `name` with `content` in a fresh temp dir: (dir guard, path).
pub fn secret_file(name: &str, content: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name).display().to_string();
    std::fs::write(&path, content).unwrap();
    (dir, path)
}
