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
    /// The daemon's `x-enforcer-timing` header (stage=monotonic ns,...), when it sends one.
    pub timing: Option<String>,
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
        let (mut length, mut close, mut timing) = (None, false, None);
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
            } else if k.eq_ignore_ascii_case(TIMING_HEADER) {
                timing = Some(v.to_string());
            }
        }
        let length =
            length.ok_or_else(|| anyhow!("response without content-length (status {status})"))?;
        let mut body = vec![0; length];
        conn.read_exact(&mut body).context("read body")?;
        Ok((Response { status, body, timing }, close))
    }

    /// POST /v1/grants binding a grant to `pid`: the grant id, or why not.
    pub fn issue(&mut self, pid: u32) -> Result<String> {
        let v = self.issue_json(INTENT, pid)?;
        v["id"].as_str().map(String::from).ok_or_else(|| anyhow!("201 without an id: {v}"))
    }

    /// `issue` for the timed loop: the status is checked, the body is not parsed (the
    /// client's CPU is taken from the daemon's two cores). With the daemon's stamps on, the
    /// request's client and server timestamps.
    fn issue_timed(&mut self, pid: u32, timed: bool) -> Result<Option<Stamped>> {
        let body = format!(r#"{{"intent": "{INTENT}", "ttl": "{TTL}", "pid": {pid}}}"#);
        let sent = mono_ns();
        let r = self.request("POST", "/v1/grants", Some(body.as_bytes()))?;
        let recv = mono_ns();
        if r.status != 201 {
            bail!("status {}: {}", r.status, String::from_utf8_lossy(&r.body).trim());
        }
        if !r.body.windows(8).any(|w| w == br#""id":"g_"#) {
            bail!("201 without an id: {}", String::from_utf8_lossy(&r.body).trim());
        }
        Ok(timed.then(|| Stamped { from: 0, sent, recv, server: r.timing.unwrap_or_default() }))
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

/// The daemon's per-stage timestamps of a grant request (`enforcer::mint::timing`).
pub const TIMING_HEADER: &str = "x-enforcer-timing";
/// The daemon environment variable that turns them on.
pub const TIMING_ENV: &str = "ENFORCER_MINT_TIMING";

/// CLOCK_MONOTONIC ns, the clock of the daemon's stamps.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One timed request: when its latency clock started (`from`: sent, or due when the client
/// was behind), when the client wrote it and had the whole answer, and the daemon's stamps.
pub struct Stamped {
    pub from: u64,
    pub sent: u64,
    pub recv: u64,
    pub server: String,
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
    /// Per client, its requests in order (empty unless the daemon's stamps are on).
    pub stamped: Vec<Vec<Stamped>>,
    /// Per-thread CPU and run-queue wait over the issuance: the daemon's, then the bench's.
    pub threads: String,
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
    let timed = daemon_env_has(daemon, TIMING_ENV, "1");
    let threads0 = thread_stats(daemon);
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
                    let mut stamped = Vec::with_capacity(if timed { lat.capacity() } else { 0 });
                    let mut errors = Vec::new();
                    let mut failures = 0;
                    start.wait();
                    let sched0 = own_schedstat();
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
                            // `from` on the clock of the daemon's stamps.
                            let from_ns = mono_ns().saturating_sub(
                                Instant::now().saturating_duration_since(from).as_nanos() as u64,
                            );
                            let r = client.issue_timed(pid, timed);
                            lat.push(from.elapsed().as_nanos() as u64);
                            match r {
                                Ok(Some(mut st)) => {
                                    st.from = from_ns;
                                    stamped.push(st);
                                }
                                Ok(None) => {}
                                Err(e) => {
                                    failures += 1;
                                    if errors.len() < 5 {
                                        errors.push(format!("pid {pid}: {e:#}"));
                                    }
                                }
                            }
                        }
                    }
                    let sched1 = own_schedstat();
                    let sched =
                        (sched1.0.saturating_sub(sched0.0), sched1.1.saturating_sub(sched0.1));
                    (lat, failures, errors, stamped, sched)
                })
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        let results: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
        (results, t0.elapsed())
    });
    let (daemon_cpu, client_cpu) = (
        cpu_of(daemon)?.saturating_sub(daemon0),
        cpu_of(std::process::id())?.saturating_sub(client0),
    );
    let threads = format!("daemon threads: {}", thread_delta(&threads0, &thread_stats(daemon)),);
    let mut out = Issuance {
        latencies: Vec::new(),
        wall,
        ok: 0,
        failures: 0,
        errors: Vec::new(),
        daemon_cpu,
        client_cpu,
        stamped: Vec::new(),
        threads,
    };
    let (mut client_run, mut client_wait) = (0u64, 0u64);
    for r in results {
        let (lat, failures, errors, stamped, sched) =
            r.map_err(|_| anyhow!("bench: grant client thread panicked"))?;
        client_run += sched.0;
        client_wait += sched.1;
        out.ok += lat.len() - failures;
        out.failures += failures;
        out.latencies.extend(lat);
        out.errors.extend(errors);
        out.stamped.push(stamped);
    }
    out.errors.truncate(5);
    out.threads += &format!(
        "\nbench client threads x{CLIENTS} cpu {:.0} ms, runqueue wait {:.0} ms",
        client_run as f64 / 1e6,
        client_wait as f64 / 1e6
    );
    for line in out.threads.lines() {
        println!("bench: grants: {line}");
    }
    if let Some(b) = breakdown(&out.stamped) {
        print!("{b}");
    }
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
        // The daemon stamps each grant request's stages (`x-enforcer-timing`), for the
        // breakdown of the slowest requests; ENFORCER_BENCH_MINT_TIMING=0 leaves them off.
        let timed = std::env::var("ENFORCER_BENCH_MINT_TIMING").map_or(true, |v| v != "0");
        self.daemon_env.retain(|(k, _)| k != TIMING_ENV);
        if timed {
            self.daemon_env.push((TIMING_ENV.into(), "1".into()));
        }
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
        self.daemon_env.retain(|(k, _)| k != TIMING_ENV);
        Ok(super::report::grant_rows(&rounds, &loaded, &holder, self.specs[0].n))
    }
}

/// The calling thread's (CPU ns, run-queue wait ns) so far.
fn own_schedstat() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let f: Vec<u64> = s.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    (f.first().copied().unwrap_or(0), f.get(1).copied().unwrap_or(0))
}

/// Whether process `pid` was started with `key=value` in its environment.
fn daemon_env_has(pid: u32, key: &str, value: &str) -> bool {
    let want = format!("{key}={value}");
    std::fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == want.as_bytes()))
}

/// Per thread of `pid`: (tid, name, CPU ns, run-queue wait ns, time slices), from
/// /proc/<pid>/task/<tid>/schedstat.
type ThreadStat = (u32, String, u64, u64, u64);

fn thread_stats(pid: u32) -> Vec<ThreadStat> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let sched = std::fs::read_to_string(e.path().join("schedstat")).unwrap_or_default();
        let f: Vec<u64> = sched.split_whitespace().filter_map(|v| v.parse().ok()).collect();
        if f.len() == 3 {
            out.push((tid, comm.trim().to_string(), f[0], f[1], f[2]));
        }
    }
    out
}

/// CPU and run-queue wait per thread name between two samples (threads that ran).
fn thread_delta(before: &[ThreadStat], after: &[ThreadStat]) -> String {
    let mut by_name: std::collections::BTreeMap<&str, (u32, u64, u64, u64)> = Default::default();
    for (tid, name, cpu, wait, slices) in after {
        let (c0, w0, s0) =
            before.iter().find(|b| b.0 == *tid).map_or((0, 0, 0), |b| (b.2, b.3, b.4));
        if cpu.saturating_sub(c0) == 0 {
            continue;
        }
        let e = by_name.entry(name).or_default();
        e.0 += 1;
        e.1 += cpu.saturating_sub(c0);
        e.2 += wait.saturating_sub(w0);
        e.3 += slices.saturating_sub(s0);
    }
    by_name
        .iter()
        .map(|(name, (n, cpu, wait, slices))| {
            format!(
                "{name} x{n} cpu {:.0} ms, runqueue wait {:.0} ms, {slices} slices",
                *cpu as f64 / 1e6,
                *wait as f64 / 1e6
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// One request's intervals, in order: (name, ns).
fn intervals(reqs: &[Stamped], i: usize) -> Option<Vec<(String, u64)>> {
    let r = &reqs[i];
    let stamps: Vec<(&str, u64)> = r
        .server
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
        .collect();
    let read = stamps.iter().find(|(k, _)| *k == "read")?.1;
    // The answer's last write is stamped into the next request on the connection.
    let written = reqs.get(i + 1).and_then(|n| {
        n.server.split(',').find_map(|kv| kv.strip_prefix("prev_write=")?.parse::<u64>().ok())
    });
    let d = |a: u64, b: u64| b.saturating_sub(a);
    let mut out = vec![
        ("client: behind schedule".to_string(), d(r.from, r.sent)),
        ("sent -> daemon read it".to_string(), d(r.sent, read)),
    ];
    let mut prev = read;
    for (k, v) in stamps.iter().filter(|(k, _)| *k != "prev_write" && *k != "read") {
        out.push((format!("daemon: {k}"), d(prev, *v)));
        prev = *v;
    }
    match written {
        Some(w) if w >= prev => {
            out.push(("daemon: response written".into(), d(prev, w)));
            out.push(("written -> client has it".into(), d(w, r.recv)));
        }
        _ => out.push(("respond -> client has it".into(), d(prev, r.recv))),
    }
    Some(out)
}

/// A timed request: client-observed, own and server-side latency (ns), and its intervals.
type Timed = (u64, u64, u64, Vec<(String, u64)>);

/// Where the time of the slowest requests went: per interval, the median over all requests
/// and the mean over the slowest 1%, and the server-side latency (daemon read to answer
/// written) beside the client-observed one. Ranked twice: by client-observed latency (from
/// when the request was due: a client still waiting for an earlier slow answer counts its
/// wait, so one stall makes the next few requests of that client slow too), and by the
/// request's own time (client write to client read), which shows what made the first of
/// them slow.
pub fn breakdown(stamped: &[Vec<Stamped>]) -> Option<String> {
    let mut rows: Vec<Timed> = Vec::new();
    for reqs in stamped {
        for i in 0..reqs.len() {
            let Some(iv) = intervals(reqs, i) else { continue };
            let r = &reqs[i];
            // Server side: from the read of the request to the answer's write (or its being
            // ready, for the last request of a connection).
            let server: u64 =
                iv.iter().filter(|(k, _)| k.starts_with("daemon:")).map(|(_, v)| *v).sum();
            rows.push((r.recv.saturating_sub(r.from), r.recv.saturating_sub(r.sent), server, iv));
        }
    }
    if rows.len() < 100 {
        return None;
    }
    let n = rows.len();
    let sorted = |f: fn(&Timed) -> u64| {
        let mut v: Vec<u64> = rows.iter().map(f).collect();
        v.sort_unstable();
        v
    };
    let (total, own, server) = (sorted(|r| r.0), sorted(|r| r.1), sorted(|r| r.2));
    let q = |v: &[u64]| {
        format!(
            "p50 {}, p99 {}, max {}",
            fmt_ns(quantile(v, 0.5)),
            fmt_ns(quantile(v, 0.99)),
            fmt_ns(*v.last().unwrap_or(&0))
        )
    };
    let mut out = format!(
        "bench: grants: timing of {n} requests: client-observed {}; own (client write to client read) {}; daemon (read to answer written) {}\n",
        q(&total),
        q(&own),
        q(&server)
    );
    // Every stage name, in order of first appearance (a first issue for an executable has
    // extra stages, and `attest` twice).
    let mut names: Vec<String> = Vec::new();
    for r in &rows {
        for (k, _) in &r.3 {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
    }
    for (label, key) in [("client-observed", 0usize), ("own", 1)] {
        rows.sort_by_key(|r| if key == 0 { r.0 } else { r.1 });
        let slow = &rows[n - n / 100..];
        let first = if key == 0 { slow[0].0 } else { slow[0].1 };
        out += &format!(
            "bench: grants: interval: median of all | mean of the slowest 1% by {label} latency ({} requests, >= {}) | of those, where it is the largest interval\n",
            slow.len(),
            fmt_ns(first)
        );
        for name in &names {
            let get =
                |iv: &[(String, u64)]| iv.iter().find(|(k, _)| k == name).map_or(0, |(_, v)| *v);
            let mut all: Vec<u64> = rows.iter().map(|r| get(&r.3)).collect();
            all.sort_unstable();
            let mean = slow.iter().map(|r| get(&r.3)).sum::<u64>() / slow.len() as u64;
            let largest = slow
                .iter()
                .filter(|r| r.3.iter().max_by_key(|(_, v)| *v).is_some_and(|(k, _)| k == name))
                .count();
            out += &format!(
                "bench: grants:   {name:<28} {:>9} | {:>9} | {largest}\n",
                fmt_ns(quantile(&all, 0.5)),
                fmt_ns(mean)
            );
        }
    }
    Some(out)
}
