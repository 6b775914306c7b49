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
use std::time::{Duration, Instant};

pub use super::grant_load::{Issuance, issue_all};

/// Long-lived processes that grants are bound to.
pub const N_HOLDERS: usize = 2_500;
/// Grants per holder: the daemon binds at most 4 grants to one process.
pub const GRANTS_PER_HOLDER: usize = 4;
/// Grants issued per round.
pub const N_GRANTS: usize = N_HOLDERS * GRANTS_PER_HOLDER;
/// Keep-alive connections, each with at most one request in flight (all driven by one
/// thread: `super::grant_load`).
pub const CLIENTS: usize = 8;
/// Requests per second offered over all connections (open loop: connection `k` sends request
/// `j` at `(j * CLIENTS + k) / OFFERED_RATE` s, or at once when it is behind).
pub const OFFERED_RATE: f64 = 5_500.0;
/// The intent in the bench config.
pub const INTENT: &str = "bench";
pub(super) const TTL: &str = "10m";
/// Per-request socket timeout: a hung daemon fails the request instead of the bench.
pub(super) const IO_TIMEOUT: Duration = Duration::from_secs(10);
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
    // The slowest requests on the daemon's side, stage by stage (a stall shows where it was;
    // one that waited for the registry lock points at another one that held it).
    let mut by_server: Vec<&Timed> = rows.iter().collect();
    by_server.sort_by_key(|r| std::cmp::Reverse(r.2));
    for worst in by_server.iter().take(3) {
        let stages: Vec<String> = worst
            .3
            .iter()
            .filter(|(_, v)| *v >= 20_000)
            .map(|(k, v)| format!("{k} {}", fmt_ns(*v)))
            .collect();
        out += &format!(
            "bench: grants: slow on the daemon's side ({}): intervals >= 20 us: {}\n",
            fmt_ns(worst.2),
            stages.join(", ")
        );
    }
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
