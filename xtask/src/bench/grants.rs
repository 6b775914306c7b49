//! Grant measurements against the Mint API: holder processes, a minimal keep-alive HTTP/1.1
//! client over the Unix socket, and grant issuance at a paced, offered rate with per-request
//! latency.

use anyhow::{Context, Result, anyhow, bail};
use std::ffi::CString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Long-lived processes that grants are bound to.
pub const N_HOLDERS: usize = 2_500;
/// Grants per holder: the daemon binds at most 4 grants to one process.
pub const GRANTS_PER_HOLDER: usize = 4;
/// Grants issued per round.
pub const N_GRANTS: usize = N_HOLDERS * GRANTS_PER_HOLDER;
/// Client threads, each with one keep-alive connection and at most one request in flight.
pub const CLIENTS: usize = 8;
/// Requests per second offered over all clients (open loop: client `k` sends request `j` at
/// `(j * CLIENTS + k) / OFFERED_RATE` s, or at once when it is behind).
pub const OFFERED_RATE: f64 = 5_500.0;
/// The intent in the bench config.
pub const INTENT: &str = "bench";
const TTL: &str = "10m";
/// Per-request socket timeout: a hung daemon fails the request instead of the bench.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Factor on IO_TIMEOUT: the guest bench (`guest.rs`) runs under emulation, where a daemon
/// busy with the records of the previous loop answers a grant request in tens of seconds.
pub static IO_TIMEOUT_SCALE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// Spawns `n` `sleep 3600` processes, each placed in `cgroup` before it execs. Spawned children
/// are pushed to `out` as they start, so the caller can reap them even if this fails midway.
pub fn spawn_holders(
    n: usize,
    cgroup: &Path,
    out: &mut Vec<Child>,
    interrupted: impl Fn() -> Result<()>,
) -> Result<()> {
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())?;
    for i in 0..n {
        if i % 500 == 0 {
            interrupted()?;
        }
        let mut c = Command::new("sleep");
        c.arg("3600").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        join_before_exec(&mut c, procs.clone());
        out.push(c.spawn().with_context(|| {
            format!("bench: cannot start holder #{i} (`sleep 3600` in {})", cgroup.display())
        })?);
    }
    Ok(())
}

/// Makes the child of `c` join the cgroup whose `cgroup.procs` is `procs` before it execs, so
/// the daemon sees it in the bench cgroup from its first instruction (a process that moves
/// itself in after exec may stay attributed to the cgroup it was forked in).
pub fn join_before_exec(c: &mut Command, procs: CString) {
    // SAFETY: between fork and exec the closure only calls open/write/close on a path
    // prepared before the fork; no allocation, no locks.
    unsafe {
        c.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let r = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if r != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
}

/// SIGKILL every child, then reap them all.
pub fn kill_all(children: &mut Vec<Child>) {
    for c in children.iter() {
        // SAFETY: signalling our own (not yet reaped) child.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGKILL) };
    }
    for mut c in children.drain(..) {
        let _ = c.wait();
    }
}

/// A minimal HTTP/1.1 client on one keep-alive Unix-socket connection.
pub struct Client {
    path: PathBuf,
    conn: Option<BufReader<UnixStream>>,
}

pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client> {
        let mut c = Client { path: path.to_path_buf(), conn: None };
        c.reconnect()?;
        Ok(c)
    }

    fn reconnect(&mut self) -> Result<()> {
        self.conn = None;
        let s = UnixStream::connect(&self.path)
            .with_context(|| format!("bench: cannot connect to {}", self.path.display()))?;
        let timeout = IO_TIMEOUT * IO_TIMEOUT_SCALE.load(std::sync::atomic::Ordering::Relaxed);
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        self.conn = Some(BufReader::new(s));
        Ok(())
    }

    /// One request; on any I/O or protocol error the connection is dropped and the next
    /// request opens a new one.
    pub fn request(&mut self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Response> {
        if self.conn.is_none() {
            self.reconnect()?;
        }
        let r = self.exchange(method, path, body);
        if r.as_ref().map_or(true, |(_, close)| *close) {
            self.conn = None;
        }
        r.map(|(resp, _)| resp)
    }

    fn exchange(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(Response, bool)> {
        let conn = self.conn.as_mut().expect("connected");
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
        if let Some(b) = body {
            req += &format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len());
        }
        req += "\r\n";
        let mut buf = req.into_bytes();
        buf.extend_from_slice(body.unwrap_or_default());
        conn.get_mut().write_all(&buf).context("write request")?;

        let mut line = String::new();
        if conn.read_line(&mut line).context("read status line")? == 0 {
            bail!("connection closed before the status line");
        }
        let status = line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| anyhow!("bad status line {:?}", line.trim_end()))?;
        let (mut length, mut close) = (None, false);
        loop {
            line.clear();
            if conn.read_line(&mut line).context("read header")? == 0 {
                bail!("connection closed in the headers");
            }
            let h = line.trim_end();
            if h.is_empty() {
                break;
            }
            let Some((k, v)) = h.split_once(':') else { bail!("bad header line {h:?}") };
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                length =
                    Some(v.parse::<usize>().with_context(|| format!("bad content-length {v:?}"))?);
            } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
                close = true;
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                bail!("unsupported transfer-encoding {v:?}");
            }
        }
        let length =
            length.ok_or_else(|| anyhow!("response without content-length (status {status})"))?;
        let mut body = vec![0; length];
        conn.read_exact(&mut body).context("read body")?;
        Ok((Response { status, body }, close))
    }

    /// POST /v1/grants binding a grant to `pid`: the grant id, or why not.
    pub fn issue(&mut self, pid: u32) -> Result<String> {
        let v = self.issue_json(INTENT, pid)?;
        v["id"].as_str().map(String::from).ok_or_else(|| anyhow!("201 without an id: {v}"))
    }

    /// POST /v1/grants binding a grant of `intent` to `pid`: the answer, or why not.
    pub fn issue_json(&mut self, intent: &str, pid: u32) -> Result<serde_json::Value> {
        let body = format!(r#"{{"intent": "{intent}", "ttl": "{TTL}", "pid": {pid}}}"#);
        let r = self.request("POST", "/v1/grants", Some(body.as_bytes()))?;
        if r.status != 201 {
            bail!("status {}: {}", r.status, String::from_utf8_lossy(&r.body).trim());
        }
        serde_json::from_slice(&r.body).context("201 without a JSON body")
    }

    /// `live_grants` from GET /v1/status.
    pub fn live_grants(&mut self) -> Result<u64> {
        let r = self.request("GET", "/v1/status", None)?;
        if r.status != 200 {
            bail!(
                "GET /v1/status: status {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body).trim()
            );
        }
        let v: serde_json::Value =
            serde_json::from_slice(&r.body).context("GET /v1/status: not JSON")?;
        v["live_grants"].as_u64().ok_or_else(|| anyhow!("GET /v1/status has no live_grants"))
    }
}

/// Polls `live_grants` until `want(n)` holds or `timeout` passes; the last value read.
pub fn wait_live(sock: &Path, timeout: Duration, want: impl Fn(u64) -> bool) -> Result<u64> {
    let mut c = Client::connect(sock)?;
    let t0 = Instant::now();
    loop {
        let n = c.live_grants()?;
        if want(n) || t0.elapsed() > timeout {
            return Ok(n);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub struct Issuance {
    /// Per-request latency of every request, successful or not (ns), from the time it was
    /// due (so a client that fell behind counts its wait: no coordinated omission).
    pub latencies: Vec<u64>,
    pub wall: Duration,
    pub ok: usize,
    pub failures: usize,
    /// The first few failures, verbatim.
    pub errors: Vec<String>,
    /// CPU time (user + system) the daemon and the bench client (this process) spent during
    /// the issuance: both share the host's cores, so the client's share is load the daemon
    /// would not see in production.
    pub daemon_cpu: Duration,
    pub client_cpu: Duration,
}

/// User + system CPU time of process `pid` so far (/proc/<pid>/stat, clock ticks).
pub fn cpu_of(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("bench: cannot read /proc/{pid}/stat"))?;
    // Fields after the parenthesised comm: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos((ticks(14) + ticks(15)) * 1_000_000_000 / hz))
}

/// Issues `per_holder` grants to every pid in `pids` from `CLIENTS` threads, each on its own
/// keep-alive connection, at `OFFERED_RATE` in all; holder `i` goes to client `i % CLIENTS`,
/// one pass over the holders per grant.
/// `daemon`: the daemon's pid, for its CPU time.
pub fn issue_all(sock: &Path, pids: &[u32], per_holder: usize, daemon: u32) -> Result<Issuance> {
    let clients = (0..CLIENTS).map(|_| Client::connect(sock)).collect::<Result<Vec<_>>>()?;
    let (daemon0, client0) = (cpu_of(daemon)?, cpu_of(std::process::id())?);
    let start = Barrier::new(CLIENTS + 1);
    let (results, wall) = std::thread::scope(|s| {
        let handles: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(k, mut client)| {
                let mine: Vec<u32> = pids.iter().skip(k).step_by(CLIENTS).copied().collect();
                let start = &start;
                s.spawn(move || {
                    let mut lat = Vec::with_capacity(mine.len() * per_holder);
                    let mut errors = Vec::new();
                    let mut failures = 0;
                    start.wait();
                    let t0 = Instant::now();
                    let mut j = 0u64;
                    for _ in 0..per_holder {
                        for &pid in &mine {
                            let due = t0
                                + Duration::from_secs_f64(
                                    (j as f64 * CLIENTS as f64 + k as f64) / OFFERED_RATE,
                                );
                            j += 1;
                            let now = Instant::now();
                            // On time: the clock starts when the request goes out (after the
                            // sleep's own slack); behind: when it was due.
                            let from = if due > now {
                                std::thread::sleep(due - now);
                                Instant::now()
                            } else {
                                due
                            };
                            let r = client.issue(pid);
                            lat.push(from.elapsed().as_nanos() as u64);
                            if let Err(e) = r {
                                failures += 1;
                                if errors.len() < 5 {
                                    errors.push(format!("pid {pid}: {e:#}"));
                                }
                            }
                        }
                    }
                    (lat, failures, errors)
                })
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        let results: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
        (results, t0.elapsed())
    });
    let mut out = Issuance {
        latencies: Vec::new(),
        wall,
        ok: 0,
        failures: 0,
        errors: Vec::new(),
        daemon_cpu: cpu_of(daemon)?.saturating_sub(daemon0),
        client_cpu: cpu_of(std::process::id())?.saturating_sub(client0),
    };
    for r in results {
        let (lat, failures, errors) =
            r.map_err(|_| anyhow!("bench: grant client thread panicked"))?;
        out.ok += lat.len() - failures;
        out.failures += failures;
        out.latencies.extend(lat);
        out.errors.extend(errors);
    }
    out.errors.truncate(5);
    Ok(out)
}

/// The `q` quantile (nearest rank) of sorted values.
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// 412 us, 1.31 ms.
pub fn fmt_ns(ns: u64) -> String {
    if ns < 1_000_000 {
        format!("{:.0} us", ns as f64 / 1e3)
    } else {
        format!("{:.2} ms", ns as f64 / 1e6)
    }
}

impl super::harness::Bench {
    /// `cargo xtask bench --only mint`: grant rounds with the daemon in monitor mode (the
    /// connect rows then have no run without the daemon to compare with, and are left out).
    pub(super) fn measure_mint(&mut self, iterations: usize) -> Result<Vec<super::report::Row>> {
        let mut rounds = Vec::new();
        let mut loaded = [Vec::new(), Vec::new()];
        let mut holder = [Vec::new(), Vec::new()];
        for round in 0..iterations {
            self.start_daemon(false)?;
            let r = self.grant_round();
            self.release_holders();
            self.stop_daemon()?;
            super::check_interrupted()?;
            match &r {
                Ok(g) => {
                    loaded[1].push(g.loaded_ns);
                    holder[1].push(g.holder_ns);
                }
                Err(e) => println!("bench: round {}/{iterations} grants: error: {e:#}", round + 1),
            }
            rounds.push(r);
        }
        Ok(super::report::grant_rows(&rounds, &loaded, &holder, self.specs[0].n))
    }
}
