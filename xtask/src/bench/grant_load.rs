//! Grant issuance at a paced, offered rate: ONE thread drives the `CLIENTS` keep-alive
//! connections non-blocking (epoll), each with at most one request in flight.
//!
//! Why one thread: the bench client shares the daemon's two cores. With a blocking thread per
//! connection, eight client threads woke and slept around every request and queued behind the
//! daemon's API workers (nice -10) for the CPU: their run-queue wait (about 1 s per round)
//! showed up as "client: behind schedule" in the slowest requests, load and latency a real
//! caller of the mint would not add. One thread sends whatever is due, reads whatever has
//! arrived, and sleeps in one `epoll_pwait2` until the next request is due or an answer comes.
//!
//! The schedule is open loop as before: request `j` of connection `k` is due at
//! `(j * CLIENTS + k) / OFFERED_RATE` s, and a request's latency runs from when it was due
//! (no coordinated omission) unless the thread was idle, waiting for it, at that instant: then
//! from the wake-up that sends it (the timer's own slack is not the daemon's), as the
//! per-thread sleep of the earlier client counted it.

use anyhow::{Context, Result, anyhow, bail};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::grants::{
    CLIENTS, INTENT, IO_TIMEOUT, IO_TIMEOUT_SCALE, OFFERED_RATE, Stamped, TIMING_ENV,
    TIMING_HEADER, TTL, breakdown, cpu_of, mono_ns,
};

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
    /// Per connection, its requests in order (empty unless the daemon's stamps are on).
    pub stamped: Vec<Vec<Stamped>>,
    /// Per-thread CPU and run-queue wait over the issuance: the daemon's, then the bench's.
    pub threads: String,
}

/// A request written (or being written) and not yet answered.
struct InFlight {
    pid: u32,
    /// When its latency clock started (CLOCK_MONOTONIC ns): due, or the wake that sent it.
    from: u64,
    /// When the client started writing it.
    sent: u64,
}

/// One keep-alive connection and its share of the schedule.
struct Conn {
    k: usize,
    stream: Option<UnixStream>,
    /// The pids this connection binds, in order (its holders, one pass per grant).
    pids: Vec<u32>,
    /// The next request to send (index into `pids`).
    next: usize,
    inflight: Option<InFlight>,
    /// The unwritten rest of the request in flight (a short write: rare on a Unix socket).
    out: Vec<u8>,
    /// Bytes of the answer read so far.
    input: Vec<u8>,
}

impl Conn {
    /// CLOCK_MONOTONIC ns at which request `next` is due.
    fn due(&self, t0: u64) -> u64 {
        let slot = (self.next * CLIENTS + self.k) as f64;
        t0 + (slot * 1e9 / OFFERED_RATE) as u64
    }

    fn waiting(&self) -> bool {
        self.inflight.is_none() && self.next < self.pids.len()
    }
}

/// An epoll instance over the connections (`data` = connection index).
struct Poller(OwnedFd);

impl Poller {
    fn new() -> Result<Poller> {
        // SAFETY: no pointers; the fd returned is ours.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("bench: epoll_create1");
        }
        // SAFETY: a fresh fd owned by nobody else.
        Ok(Poller(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// `op` (EPOLL_CTL_ADD/MOD/DEL) on `fd` with `events`, tagged `k`.
    fn ctl(&self, op: libc::c_int, fd: i32, events: u32, k: usize) -> Result<()> {
        let mut ev = libc::epoll_event { events, u64: k as u64 };
        // SAFETY: valid fds and a valid event to read.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) } < 0 {
            return Err(std::io::Error::last_os_error()).context("bench: epoll_ctl");
        }
        Ok(())
    }

    /// Waits up to `timeout_ns` (None: without limit) for events; their tags and masks.
    fn wait(&self, timeout_ns: Option<u64>, out: &mut Vec<(usize, u32)>) -> Result<()> {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; CLIENTS];
        let ts = timeout_ns.map(|ns| libc::timespec {
            tv_sec: (ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (ns % 1_000_000_000) as libc::c_long,
        });
        let tsp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: `evs` is valid for CLIENTS events, `tsp` null or a valid timespec.
        let n = unsafe {
            libc::epoll_pwait2(
                self.0.as_raw_fd(),
                evs.as_mut_ptr(),
                CLIENTS as i32,
                tsp,
                std::ptr::null(),
            )
        };
        out.clear();
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(e).context("bench: epoll_pwait2");
        }
        out.extend(evs[..n as usize].iter().map(|e| (e.u64 as usize, e.events)));
        Ok(())
    }
}

/// A complete answer parsed off the front of `input`: (status, body, timing, close) and the
/// bytes it took, or None if more is needed.
type Parsed = (u16, Vec<u8>, Option<String>, bool);

fn parse_response(input: &[u8]) -> Result<Option<(Parsed, usize)>> {
    let Some(head_end) = input.windows(4).position(|w| w == b"\r\n\r\n") else {
        if input.len() > 64 * 1024 {
            bail!("response headers longer than 64 KiB");
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&input[..head_end]).context("response headers not UTF-8")?;
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let status = line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| anyhow!("bad status line {line:?}"))?;
    let (mut length, mut close, mut timing) = (None, false, None);
    for h in lines {
        let Some((k, v)) = h.split_once(':') else { bail!("bad header line {h:?}") };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("content-length") {
            length = Some(v.parse::<usize>().with_context(|| format!("bad content-length {v:?}"))?);
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
    let start = head_end + 4;
    if input.len() < start + length {
        return Ok(None);
    }
    Ok(Some(((status, input[start..start + length].to_vec(), timing, close), start + length)))
}

/// What the loop collects.
struct Tally {
    latencies: Vec<u64>,
    failures: usize,
    errors: Vec<String>,
    stamped: Vec<Vec<Stamped>>,
    timed: bool,
}

impl Tally {
    fn fail(&mut self, c: &mut Conn, poller: &Poller, why: String, now: u64) {
        if let Some(f) = c.inflight.take() {
            self.latencies.push(now.saturating_sub(f.from));
            self.failures += 1;
            if self.errors.len() < 5 {
                self.errors.push(format!("pid {}: {why}", f.pid));
            }
        }
        drop_conn(c, poller);
    }
}

fn drop_conn(c: &mut Conn, poller: &Poller) {
    if let Some(s) = c.stream.take() {
        let _ = poller.ctl(libc::EPOLL_CTL_DEL, s.as_raw_fd(), 0, c.k);
    }
    c.out.clear();
    c.input.clear();
}

/// Writes what is left of the request in flight; Ok(false) if the socket is full.
fn flush(c: &mut Conn) -> std::io::Result<bool> {
    let s = c.stream.as_mut().expect("connected");
    while !c.out.is_empty() {
        match s.write(&c.out) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                c.out.drain(..n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Sends connection `c`'s next request, clocked from `from`.
fn send(c: &mut Conn, poller: &Poller, from: u64, sock: &Path) -> Result<()> {
    let pid = c.pids[c.next];
    c.next += 1;
    if c.stream.is_none() {
        let s = UnixStream::connect(sock)
            .with_context(|| format!("bench: cannot connect to {}", sock.display()))?;
        s.set_nonblocking(true)?;
        poller.ctl(libc::EPOLL_CTL_ADD, s.as_raw_fd(), libc::EPOLLIN as u32, c.k)?;
        c.stream = Some(s);
    }
    let body = format!(r#"{{"intent": "{INTENT}", "ttl": "{TTL}", "pid": {pid}}}"#);
    c.out.clear();
    write!(
        c.out,
        "POST /v1/grants HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    c.input.clear();
    let sent = mono_ns();
    c.inflight = Some(InFlight { pid, from: from.min(sent), sent });
    if !flush(c).context("write request")? {
        // Socket full: wait for room as well as for the answer.
        let fd = c.stream.as_ref().expect("connected").as_raw_fd();
        poller.ctl(libc::EPOLL_CTL_MOD, fd, (libc::EPOLLIN | libc::EPOLLOUT) as u32, c.k)?;
    }
    Ok(())
}

/// Reads what connection `c` has; finishes its request if the answer is complete.
fn receive(c: &mut Conn, poller: &Poller, tally: &mut Tally) -> Result<()> {
    // One read per wake-up: an answer (about 1.5 KB) fits, and what does not is read at the
    // next (level-triggered) wake-up; reading on to EAGAIN cost a second syscall per answer.
    let mut buf = [0u8; 16 * 1024];
    let mut eof = false;
    loop {
        let s = c.stream.as_mut().expect("connected");
        match s.read(&mut buf) {
            Ok(0) => eof = true,
            Ok(n) => c.input.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("read answer"),
        }
        break;
    }
    if c.inflight.is_none() {
        if eof || !c.input.is_empty() {
            // Closed while idle (idle timeout), or bytes nobody asked for: start afresh.
            drop_conn(c, poller);
        }
        return Ok(());
    }
    let Some(((status, body, timing, close), used)) = parse_response(&c.input)? else {
        if eof {
            bail!("connection closed before the whole answer");
        }
        return Ok(());
    };
    let recv = mono_ns();
    c.input.drain(..used);
    let f = c.inflight.take().expect("in flight");
    tally.latencies.push(recv.saturating_sub(f.from));
    let why = if status != 201 {
        Some(format!("status {status}: {}", String::from_utf8_lossy(&body).trim()))
    } else if !body.windows(8).any(|w| w == br#""id":"g_"#) {
        Some(format!("201 without an id: {}", String::from_utf8_lossy(&body).trim()))
    } else {
        None
    };
    match why {
        Some(why) => {
            tally.failures += 1;
            if tally.errors.len() < 5 {
                tally.errors.push(format!("pid {}: {why}", f.pid));
            }
        }
        None if tally.timed => tally.stamped[c.k].push(Stamped {
            from: f.from,
            sent: f.sent,
            recv,
            server: timing.unwrap_or_default(),
        }),
        None => {}
    }
    if close || eof || !c.input.is_empty() {
        drop_conn(c, poller);
    }
    Ok(())
}

/// Issues `per_holder` grants to every pid in `pids` over `CLIENTS` keep-alive connections
/// driven by this one thread, at `OFFERED_RATE` in all; holder `i` goes to connection
/// `i % CLIENTS`, one pass over the holders per grant.
/// `daemon`: the daemon's pid, for its CPU time.
pub fn issue_all(sock: &Path, pids: &[u32], per_holder: usize, daemon: u32) -> Result<Issuance> {
    // Diagnostic only: the client thread at another nice value (the API workers run at
    // -10), to tell the client's own run-queue wait apart from the daemon's latency.
    let nice = std::env::var("ENFORCER_BENCH_CLIENT_NICE").ok().and_then(|v| v.parse().ok());
    let before = nice.map(|n: i32| {
        println!(
            "bench: grants: DIAGNOSTIC: client thread at nice {n} (ENFORCER_BENCH_CLIENT_NICE)"
        );
        set_own_nice(n)
    });
    let r = issue_paced(sock, pids, per_holder, daemon);
    if let Some(old) = before {
        set_own_nice(old);
    }
    r
}

/// Sets the calling thread's nice value; the previous one.
fn set_own_nice(n: i32) -> i32 {
    // SAFETY: plain syscalls on the calling thread.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        *libc::__errno_location() = 0;
        let old = libc::getpriority(libc::PRIO_PROCESS, tid);
        if libc::setpriority(libc::PRIO_PROCESS, tid, n) != 0 {
            println!("bench: grants: cannot set nice {n}: {}", std::io::Error::last_os_error());
        }
        old
    }
}

fn issue_paced(sock: &Path, pids: &[u32], per_holder: usize, daemon: u32) -> Result<Issuance> {
    let poller = Poller::new()?;
    let mut conns: Vec<Conn> = (0..CLIENTS)
        .map(|k| {
            let mine: Vec<u32> = pids.iter().skip(k).step_by(CLIENTS).copied().collect();
            Conn {
                k,
                stream: None,
                pids: (0..per_holder).flat_map(|_| mine.iter().copied()).collect(),
                next: 0,
                inflight: None,
                out: Vec::with_capacity(256),
                input: Vec::with_capacity(4096),
            }
        })
        .collect();
    // Connect before the clock starts, as the blocking clients did.
    for c in &mut conns {
        let s = UnixStream::connect(sock)
            .with_context(|| format!("bench: cannot connect to {}", sock.display()))?;
        s.set_nonblocking(true)?;
        poller.ctl(libc::EPOLL_CTL_ADD, s.as_raw_fd(), libc::EPOLLIN as u32, c.k)?;
        c.stream = Some(s);
    }
    let total: usize = conns.iter().map(|c| c.pids.len()).sum();
    let timed = daemon_env_has(daemon, TIMING_ENV, "1");
    let mut tally = Tally {
        latencies: Vec::with_capacity(total),
        failures: 0,
        errors: Vec::new(),
        stamped: (0..CLIENTS).map(|_| Vec::with_capacity(if timed { total } else { 0 })).collect(),
        timed,
    };
    let timeout = (IO_TIMEOUT * IO_TIMEOUT_SCALE.load(std::sync::atomic::Ordering::Relaxed))
        .as_nanos() as u64;
    let threads0 = thread_stats(daemon);
    let (daemon0, client0) = (cpu_of(daemon)?, cpu_of(std::process::id())?);
    let sched0 = own_schedstat();
    let t0 = mono_ns();
    // The last wait: (went to sleep, woke up). A request that fell due while the thread slept
    // is clocked from the wake-up; one due while it was busy, from when it was due.
    let mut idle = (t0, t0);
    let mut events = Vec::with_capacity(CLIENTS);
    loop {
        let now = mono_ns();
        for c in conns.iter_mut().filter(|c| c.waiting()) {
            let due = c.due(t0);
            if due > now {
                continue;
            }
            let from = if due > idle.0 { idle.1.max(due) } else { due };
            if let Err(e) = send(c, &poller, from, sock) {
                tally.fail(c, &poller, format!("{e:#}"), mono_ns());
            }
        }
        // Answers overdue by the I/O timeout fail (the connection is dropped).
        let now = mono_ns();
        for c in &mut conns {
            if c.inflight.as_ref().is_some_and(|f| now.saturating_sub(f.sent) > timeout) {
                tally.fail(c, &poller, format!("no answer within {} ms", timeout / 1_000_000), now);
            }
        }
        if conns.iter().all(|c| c.inflight.is_none() && c.next == c.pids.len()) {
            break;
        }
        let next_due = conns.iter().filter(|c| c.waiting()).map(|c| c.due(t0)).min();
        let next_timeout =
            conns.iter().filter_map(|c| c.inflight.as_ref()).map(|f| f.sent + timeout).min();
        let wake = next_due.into_iter().chain(next_timeout).min();
        let slept = mono_ns();
        poller.wait(wake.map(|w| w.saturating_sub(slept)), &mut events)?;
        idle = (slept, mono_ns());
        for &(k, ev) in &events {
            let c = &mut conns[k];
            if c.stream.is_none() {
                continue;
            }
            if ev & libc::EPOLLOUT as u32 != 0 && !c.out.is_empty() {
                match flush(c) {
                    Ok(true) => {
                        let fd = c.stream.as_ref().expect("connected").as_raw_fd();
                        poller.ctl(libc::EPOLL_CTL_MOD, fd, libc::EPOLLIN as u32, k)?;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tally.fail(c, &poller, format!("write request: {e}"), mono_ns());
                        continue;
                    }
                }
            }
            if ev & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
                && let Err(e) = receive(c, &poller, &mut tally)
            {
                tally.fail(c, &poller, format!("{e:#}"), mono_ns());
            }
        }
    }
    let wall = Duration::from_nanos(mono_ns() - t0);
    let sched1 = own_schedstat();
    let (daemon_cpu, client_cpu) = (
        cpu_of(daemon)?.saturating_sub(daemon0),
        cpu_of(std::process::id())?.saturating_sub(client0),
    );
    let mut out = Issuance {
        ok: tally.latencies.len() - tally.failures,
        failures: tally.failures,
        latencies: tally.latencies,
        wall,
        errors: tally.errors,
        daemon_cpu,
        client_cpu,
        stamped: tally.stamped,
        threads: format!("daemon threads: {}", thread_delta(&threads0, &thread_stats(daemon))),
    };
    out.threads += &format!(
        "\nbench client: 1 thread driving {CLIENTS} connections: cpu {:.0} ms, runqueue wait {:.0} ms",
        sched1.0.saturating_sub(sched0.0) as f64 / 1e6,
        sched1.1.saturating_sub(sched0.1) as f64 / 1e6
    );
    for line in out.threads.lines() {
        println!("bench: grants: {line}");
    }
    if let Some(b) = breakdown(&out.stamped) {
        print!("{b}");
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_answers_whole_or_in_pieces() {
        let a = b"HTTP/1.1 201 Created\r\ncontent-length: 12\r\nx-enforcer-timing: read=5\r\n\r\n{\"id\":\"g_a\"}";
        for cut in 0..a.len() {
            assert!(parse_response(&a[..cut]).unwrap().is_none(), "cut at {cut}");
        }
        let ((status, body, timing, close), used) = parse_response(a).unwrap().unwrap();
        assert_eq!(
            (status, body.as_slice(), timing.as_deref(), close, used),
            (201, &b"{\"id\":\"g_a\"}"[..], Some("read=5"), false, a.len())
        );
        let c =
            b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\ncontent-length: 0\r\n\r\nX";
        let ((status, _, _, close), used) = parse_response(c).unwrap().unwrap();
        assert_eq!((status, close, used), (503, true, c.len() - 1));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\n").is_err(), "no content-length");
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }
}
