//! The bench's fixture: its cgroup, temporary files and daemon configs, starting and stopping
//! the daemon, its status, worker processes inside the cgroup, and cleanup on every path.

use super::grants;
use super::{Kind, PIN_DIR, SECRET_OPENS, Spec, VIOLATION_CONNECTS, check_interrupted};
use crate::show;
use anyhow::{Context, Result, anyhow, bail};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(super) struct Bench {
    pub(super) enforcer: PathBuf,
    pub(super) tmp: PathBuf,
    pub(super) cgroup: PathBuf,
    pub(super) cgroup_mount: PathBuf,
    /// Monitor mode (rounds B).
    pub(super) config: PathBuf,
    /// Enforce mode, on_violation = "deny", destinations = the `tcp` listener only (rounds C).
    pub(super) config_enforce: PathBuf,
    pub(super) run_dir: PathBuf,
    pub(super) daemon: Option<Child>,
    /// Grant holders (`sleep 3600`) of the current round; killed and reaped on every path.
    pub(super) holders: Vec<Child>,
    pub(super) starts: usize,
    pub(super) tcp: SocketAddr,
    /// A second listener: outside the enforce config's intent.
    pub(super) tcp_out: SocketAddr,
    pub(super) udp: UdpSocket,
    pub(super) specs: Vec<Spec>,
    /// Factor on the daemon's start and stop limits (an emulated guest is many times slower).
    pub(super) time_scale: u32,
    /// Environment of the next daemons started (e.g. `ENFORCER_IPC_HOOKS`, kernel_costs.rs).
    pub(super) daemon_env: Vec<(String, String)>,
    /// Held for the bench's life: one bench per host at a time (see `host_lock`).
    _host_lock: std::fs::File,
}

impl Bench {
    pub(super) fn new(enforcer: PathBuf) -> Result<Self> {
        let cgroup_mount = cgroup2_mount()?;
        let id = std::process::id();
        let host_lock = host_lock()?;
        // Leftovers of an earlier bench killed before it could clean up.
        remove_pins();
        if let Ok(entries) = std::fs::read_dir(&cgroup_mount) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("enforcer-bench-") {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        let tmp = std::env::temp_dir().join(format!("enforcer-bench-{id}"));
        let cgroup = cgroup_mount.join(format!("enforcer-bench-{id}"));
        let run_dir = tmp.join("run");
        let config = tmp.join("enforcer.toml");
        let config_enforce = tmp.join("enforcer-enforce.toml");
        // Listeners first: nothing to clean up if they fail.
        let tcp = tcp_listener()?;
        let tcp_out = tcp_listener()?;
        let udp = UdpSocket::bind("127.0.0.1:0").context("bench: cannot bind a UDP socket")?;
        let mut b = Bench {
            enforcer,
            tmp,
            cgroup,
            cgroup_mount,
            config,
            config_enforce,
            run_dir,
            daemon: None,
            holders: Vec::new(),
            starts: 0,
            tcp,
            tcp_out,
            udp,
            specs: Vec::new(),
            time_scale: 1,
            daemon_env: Vec::new(),
            _host_lock: host_lock,
        };
        b.prepare().inspect_err(|_| b.cleanup())?;
        Ok(b)
    }

    pub(super) fn prepare(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.tmp)
            .with_context(|| format!("bench: cannot create {}", self.tmp.display()))?;
        std::fs::create_dir(&self.cgroup)
            .with_context(|| format!("bench: cannot create cgroup {}", self.cgroup.display()))?;
        // The secret lives in a directory of its own: every open in a secret's directory
        // waits for the daemon (directory marks close the replace window), and the non-secret
        // row measures an ordinary open, not a secret's neighbour.
        let plain = self.tmp.join("plain.txt");
        let secret_dir = self.tmp.join("secrets");
        std::fs::create_dir_all(&secret_dir)?;
        let secret = secret_dir.join("secret.txt");
        std::fs::write(&plain, "not a secret\n")?;
        std::fs::write(&secret, "bench-secret-value\n")?;
        let q = |p: &Path| {
            format!("\"{}\"", p.display().to_string().replace('\\', "\\\\").replace('"', "\\\""))
        };
        // Top-level keys before the first table; no mint rate limit (the bench issues grants
        // as fast as the daemon answers).
        let config = |mode: &str, destination: &str, extra: &str| {
            format!(
                "mode = \"{mode}\"\ncgroup_root = {}\nruntime_dir = {}\nstate_dir = {}\npin_dir = {}\n\
                 mint_rate_per_second = 0\n\n\
                 [[secret]]\nname = \"bench-secret\"\npaths = [{}]\n\n\
                 [[intent]]\nname = \"{}\"\nagents = [{{ uid = 0 }}]\nsecrets = [\"bench-secret\"]\n\
                 destinations = [\"{destination}\"]\nmax_ttl = \"1h\"\n{extra}",
                q(&self.cgroup),
                q(&self.run_dir),
                q(&self.tmp.join("state")),
                q(Path::new(PIN_DIR)),
                q(&secret),
                grants::INTENT,
            )
        };
        std::fs::write(&self.config, config("monitor", "127.0.0.1/32:1-65535", ""))?;
        // Enforce: only the `tcp` listener is inside the intent; `tcp_out` is a violation, and
        // an open of the secret without a grant is one too (denied: the intent covering the
        // secret says deny).
        std::fs::write(
            &self.config_enforce,
            config(
                "enforce",
                &format!("127.0.0.1/32:{}", self.tcp.port()),
                "on_violation = \"deny\"\n",
            ),
        )?;
        let s = |p: &Path| p.display().to_string();
        self.specs = vec![
            Spec {
                name: "connect() loopback TCP",
                kind: Kind::Connect,
                n: 20_000,
                target: self.tcp.to_string(),
                limit: Some(1.05),
            },
            Spec {
                name: "open()+close() non-secret",
                kind: Kind::Open,
                n: 50_000,
                target: s(&plain),
                limit: Some(1.05),
            },
            Spec {
                name: "open()+close() watched secret",
                kind: Kind::Open,
                n: 20_000,
                target: s(&secret),
                limit: None,
            },
            Spec {
                name: "socket()+close() UDP",
                kind: Kind::Socket,
                n: 50_000,
                target: String::new(),
                limit: Some(1.05),
            },
            Spec {
                name: "send() 64 B, connected UDP (cost of egress)",
                kind: Kind::Send,
                n: 100_000,
                target: self.udp.local_addr()?.to_string(),
                limit: Some(1.05),
            },
            Spec {
                name: "fork+exec /bin/true",
                kind: Kind::Exec,
                n: 1_000,
                target: "/bin/true".into(),
                limit: Some(1.10),
            },
        ];
        Ok(())
    }

    pub(super) fn mint_sock(&self) -> PathBuf {
        self.run_dir.join("mint.sock")
    }

    /// A worker that stops before its loop; with `grant`, a grant of the bench intent is bound
    /// to it meanwhile. With `expect_errno`, every call must fail with it; calls are timed
    /// one by one (`--per-op`) when they may be denied or `n` is one of the per-call counts.
    pub(super) fn bound_worker(
        &self,
        name: &str,
        kind: &str,
        target: &str,
        n: u64,
        grant: bool,
        expect_errno: Option<i32>,
    ) -> Result<WorkerOut> {
        self.bound_worker_with(name, kind, target, n, grant, expect_errno, &[])
    }

    /// `bound_worker` with more worker arguments (`extra`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn bound_worker_with(
        &self,
        name: &str,
        kind: &str,
        target: &str,
        n: u64,
        grant: bool,
        expect_errno: Option<i32>,
        extra: &[String],
    ) -> Result<WorkerOut> {
        let mut c = self.worker_cmd()?;
        c.arg("bench-worker")
            .arg("--cgroup")
            .arg(&self.cgroup)
            .args(["--kind", kind, "--target", target, "--n", &n.to_string(), "--wait-stdin"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if expect_errno.is_some() || n == VIOLATION_CONNECTS || n == SECRET_OPENS {
            c.arg("--per-op");
        }
        if let Some(e) = expect_errno {
            c.args(["--expect-errno", &e.to_string()]);
        }
        let mut child =
            c.spawn().with_context(|| format!("bench: cannot start worker `{}`", show(&c)))?;
        let mut run = || -> Result<WorkerOut> {
            let mut out = BufReader::new(child.stdout.take().expect("piped"));
            let mut line = String::new();
            out.read_line(&mut line)?;
            let pid: u32 =
                line.trim().strip_prefix("pid=").and_then(|p| p.parse().ok()).ok_or_else(|| {
                    anyhow!("bench: {name}: worker printed {line:?} instead of its pid")
                })?;
            if grant {
                let id =
                    grants::Client::connect(&self.mint_sock())?.issue(pid).with_context(|| {
                        format!("bench: {name}: cannot bind a grant to the worker (pid {pid})")
                    })?;
                println!("bench: grants: {name}: worker {pid} holds grant {id}");
            }
            // Dropping stdin after the line: the worker never waits on it again.
            child.stdin.take().expect("piped").write_all(b"go\n")?;
            let mut text = String::new();
            out.read_to_string(&mut text)?;
            let status = child.wait()?;
            check_interrupted()?;
            if !status.success() {
                bail!("bench: {name}: worker failed ({status}): `{}`", show(&c));
            }
            let (ns, ops) = parse_worker(name, &text)?;
            let p50 = text
                .split_whitespace()
                .find_map(|w| w.strip_prefix("p50="))
                .and_then(|v| v.parse().ok());
            Ok(WorkerOut { name: name.to_string(), ns, ops, p50, text })
        };
        let r = run();
        if r.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        r
    }

    /// The bench worker command; the child joins the bench cgroup before exec (and the worker
    /// joins it again itself, a no-op then).
    pub(super) fn worker_cmd(&self) -> Result<Command> {
        let mut c = Command::new(std::env::current_exe()?);
        grants::join_before_exec(
            &mut c,
            std::ffi::CString::new(
                self.cgroup.join("cgroup.procs").as_os_str().as_encoded_bytes(),
            )?,
        );
        Ok(c)
    }

    /// Run spec `i` in a worker process inside the bench cgroup: (elapsed ns, ops).
    pub(super) fn worker(&self, i: usize, n: Option<u64>) -> Result<(u128, u64)> {
        let s = &self.specs[i];
        let mut c = self.worker_cmd()?;
        c.arg("bench-worker")
            .arg("--cgroup")
            .arg(&self.cgroup)
            .args(["--kind", &format!("{:?}", s.kind).to_lowercase(), "--target", &s.target])
            .args(["--n", &n.unwrap_or(s.n).to_string()]);
        run_worker(s.name, &mut c)
    }

    pub(super) fn status_json(&self) -> Result<serde_json::Value> {
        let mut c = Command::new(&self.enforcer);
        c.args(["status", "--json", "--runtime-dir"]).arg(&self.run_dir);
        let out = c.output().with_context(|| format!("bench: cannot run `{}`", show(&c)))?;
        if !out.status.success() {
            bail!(
                "bench: `{}` failed ({}): {}",
                show(&c),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("bench: `{}` printed no JSON", show(&c)))
    }

    /// Starts the daemon with the monitor config, or with `enforce` the enforce config.
    pub(super) fn start_daemon(&mut self, enforce: bool) -> Result<()> {
        let config = if enforce { self.config_enforce.clone() } else { self.config.clone() };
        self.start_daemon_with(&config)
    }

    pub(super) fn start_daemon_with(&mut self, config: &Path) -> Result<()> {
        self.starts += 1;
        let log_path = self.tmp.join(format!("daemon-{}.log", self.starts));
        let log = std::fs::File::create(&log_path)?;
        let mut c = Command::new(&self.enforcer);
        c.arg("daemon")
            .arg("--config")
            .arg(config)
            .envs(self.daemon_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        println!("$ {}  (log: {})", show(&c), log_path.display());
        self.daemon =
            Some(c.spawn().with_context(|| format!("bench: cannot start `{}`", show(&c)))?);
        let t0 = Instant::now();
        loop {
            check_interrupted()?;
            if let Some(st) = self.daemon.as_mut().and_then(|d| d.try_wait().ok().flatten()) {
                self.daemon = None;
                bail!(
                    "bench: daemon exited during startup ({st}); log {}:\n{}",
                    log_path.display(),
                    tail(&log_path)
                );
            }
            let ready = Command::new(&self.enforcer)
                .args(["status", "--runtime-dir"])
                .arg(&self.run_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) * self.time_scale {
                bail!(
                    "bench: daemon not ready after {} s; log {}:\n{}",
                    30 * self.time_scale,
                    log_path.display(),
                    tail(&log_path)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        println!("bench: daemon ready in {:.2}s", t0.elapsed().as_secs_f64());
        // Startup work after readiness (e.g. a /proc scan) must not land in the measurement.
        std::thread::sleep(Duration::from_millis(500) * self.time_scale);
        Ok(())
    }

    /// SIGTERM and wait (SIGKILL after 15 s); then remove the pins so programs are detached.
    pub(super) fn stop_daemon(&mut self) -> Result<()> {
        let Some(mut d) = self.daemon.take() else { return Ok(()) };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(d.id() as libc::pid_t, libc::SIGTERM) };
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = d.try_wait()? {
                break st;
            }
            if t0.elapsed() > Duration::from_secs(15) * self.time_scale {
                let _ = d.kill();
                let _ = d.wait();
                remove_pins();
                bail!("bench: daemon ignored SIGTERM for 15 s (killed)");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        remove_pins();
        if !status.success() {
            println!("bench: warning: daemon exited with {status} after SIGTERM");
        }
        // The log goes away with the temporary directory: show its warnings and errors now.
        let log_path = self.tmp.join(format!("daemon-{}.log", self.starts));
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let bad: Vec<&str> =
            log.lines().filter(|l| l.contains("ERROR") || l.contains("WARN")).collect();
        if !bad.is_empty() {
            println!(
                "bench: warning: {} WARN/ERROR lines in {}; first ones:",
                bad.len(),
                log_path.display()
            );
            for l in bad.iter().take(5) {
                println!("bench:   {l}");
            }
        }
        Ok(())
    }

    /// Stop the daemon, remove pins, cgroup and temporary files. Safe to call twice.
    pub(super) fn cleanup(&mut self) {
        grants::kill_all(&mut self.holders);
        if let Err(e) = self.stop_daemon() {
            eprintln!("bench: cleanup: {e:#}");
        }
        remove_pins();
        if self.cgroup.exists() {
            // Anything left inside (a worker killed mid-loop) goes back to the root cgroup.
            if let Ok(pids) = std::fs::read_to_string(self.cgroup.join("cgroup.procs")) {
                for pid in pids.lines() {
                    let _ = std::fs::write(self.cgroup_mount.join("cgroup.procs"), pid);
                }
            }
            let mut ok = false;
            for _ in 0..50 {
                if std::fs::remove_dir(&self.cgroup).is_ok() {
                    ok = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !ok {
                eprintln!("bench: cleanup: cannot remove cgroup {}", self.cgroup.display());
            }
        }
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.cleanup();
    }
}

pub(super) struct WorkerOut {
    pub(super) name: String,
    pub(super) ns: u128,
    pub(super) ops: u64,
    /// Median ns of one call (`--per-op`).
    pub(super) p50: Option<u64>,
    /// Everything the worker printed after its pid line.
    pub(super) text: String,
}

impl WorkerOut {
    pub(super) fn p50(&self) -> Result<u64> {
        self.p50.ok_or_else(|| anyhow!("bench: {}: worker printed no p50", self.name))
    }
}

pub(super) fn run_worker(name: &str, c: &mut Command) -> Result<(u128, u64)> {
    let out = c
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("bench: cannot start worker `{}`", show(c)))?;
    check_interrupted()?;
    if !out.status.success() {
        bail!("bench: {name}: worker failed ({}): `{}`", out.status, show(c));
    }
    parse_worker(name, &String::from_utf8_lossy(&out.stdout))
}

/// The worker's `ns=<elapsed> ops=<count>` line.
pub(super) fn parse_worker(name: &str, text: &str) -> Result<(u128, u64)> {
    let field = |k: &str| {
        text.split_whitespace().find_map(|w| w.strip_prefix(k)).and_then(|v| v.parse::<u128>().ok())
    };
    match (field("ns="), field("ops=")) {
        (Some(ns), Some(ops)) => Ok((ns, ops as u64)),
        _ => bail!("bench: {name}: worker printed {text:?}"),
    }
}

/// A loopback TCP listener that accepts and drops connections on its own thread.
pub(super) fn tcp_listener() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bench: cannot bind a TCP listener")?;
    // Deeper accept queue than std's 128, so the connect loop never waits on the acceptor.
    // SAFETY: re-listening on a listening socket only resizes its backlog.
    unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    Ok(addr)
}

pub(super) fn remove_pins() {
    if let Err(e) = std::fs::remove_dir_all(PIN_DIR)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        eprintln!("bench: cannot remove {PIN_DIR}: {e}");
    }
}

/// Serialises benches on this host: they share the pin directory, remove each other's
/// leftovers at start, and would measure each other's load. Waits (bounded) for a bench
/// that holds it; the lock goes with the process, however it ends.
fn host_lock() -> Result<std::fs::File> {
    const LOCK: &str = "/run/enforcer-bench.lock";
    const WAIT: Duration = Duration::from_secs(1800);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK)
        .with_context(|| format!("bench: cannot open {LOCK}"))?;
    let t0 = Instant::now();
    loop {
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(f);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e).with_context(|| format!("bench: cannot lock {LOCK}"));
        }
        if t0.elapsed() > WAIT {
            bail!("bench: another bench held {LOCK} for {} s", WAIT.as_secs());
        }
        if t0.elapsed() < Duration::from_secs(1) {
            println!("bench: waiting for another bench on this host ({LOCK})");
        }
        check_interrupted()?;
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The cgroup2 mount point from /proc/mounts.
pub(super) fn cgroup2_mount() -> Result<PathBuf> {
    let mounts =
        std::fs::read_to_string("/proc/mounts").context("bench: cannot read /proc/mounts")?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| PathBuf::from(f[1].replace("\\040", " ")))
        .context("bench: no cgroup2 mount in /proc/mounts")
}

pub(super) fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<_> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
