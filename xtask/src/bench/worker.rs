//! The measured loops. Each runs in its own process that first moves itself into the bench
//! cgroup (the daemon watches only that subtree), then prints `ns=<elapsed> ops=<count>`
//! (and `p50=<ns>`, the median time of one call, with `--per-op`).

use anyhow::{Context, Result, bail};
use std::ffi::CString;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// Cgroup directory to join first.
    #[arg(long)]
    pub cgroup: PathBuf,
    #[arg(long, value_enum)]
    pub kind: Kind,
    /// Socket address (connect, flood) or file path (open, exec).
    #[arg(long)]
    pub target: String,
    /// Iterations (connect, open, exec).
    #[arg(long, default_value_t = 0)]
    pub n: u64,
    /// Flood: total sends per second over all threads.
    #[arg(long, default_value_t = 100_000)]
    pub rate: u64,
    /// Flood: seconds.
    #[arg(long, default_value_t = 3.0)]
    pub secs: f64,
    /// Flood: sending threads.
    #[arg(long, default_value_t = 2)]
    pub threads: u64,
    /// After joining the cgroup, print `pid=<pid>` and wait for a line on stdin before the
    /// loop (the bench binds a grant to this process meanwhile).
    #[arg(long)]
    pub wait_stdin: bool,
    /// Connect, open: every call must fail with this errno (e.g. 1 = EPERM, a denial);
    /// a call that succeeds or fails otherwise fails the worker.
    #[arg(long)]
    pub expect_errno: Option<i32>,
    /// Connect, open: time each call and print its median as `p50=<ns>`.
    #[arg(long)]
    pub per_op: bool,
    /// Dns-connect: the resolver (`dns.rs`).
    #[arg(long)]
    pub dns: Option<String>,
    /// Dns-connect: names resolved before the connect loop.
    #[arg(long, default_value_t = 0)]
    pub learn: u64,
    /// Open-pairs (guest.rs): the second file, opened in blocks of `--n` alternating with
    /// `--target`'s.
    #[arg(long)]
    pub pair_with: Option<String>,
    /// Open-pairs: blocks of each file.
    #[arg(long, default_value_t = 0)]
    pub blocks: u64,
    /// Open-pairs: then the same blocks with `kernel.bpf_stats_enabled`, reading the run time
    /// of the programs this process (the daemon) holds.
    #[arg(long)]
    pub bpf_stats_pid: Option<u32>,
    /// Loop-blocks (guest_loops.rs): fork+execs of `--pair-with` per block.
    #[arg(long, default_value_t = 0)]
    pub execs: u64,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// socket + connect + close (RST, so no TIME_WAIT piles up) to a loopback TCP listener.
    Connect,
    /// open + close of a file.
    Open,
    /// fork + execv of a program, waiting for it.
    Exec,
    /// Paced UDP sendto to a loopback socket from several threads (one connect event per send).
    Flood,
    /// socket(AF_INET, SOCK_DGRAM) + close: the cgroup sock_create hook's common path.
    Socket,
    /// send() of 64 bytes on one connected loopback UDP socket: every packet passes the
    /// egress hook (and no sock_addr hook: the socket is connected).
    Send,
    /// FetchJWTSVID on one HTTP/2 connection to the Workload API socket `--target`.
    Svid,
    /// GETs of the AWS container-credentials endpoint named on the go line (kept-alive, then
    /// a new connection each); `--n` kept-alive ones.
    Aws,
    /// DNS lookups, each on a new UDP socket, to the resolver at `--target` (`dns.rs`).
    Dns,
    /// `--learn` DNS lookups through `--dns` (not timed), then the connect loop to `--target`.
    DnsConnect,
    /// open + close of `--target` and of `--pair-with` in alternating blocks: wall and CPU
    /// time per block, per-call times, and with `--bpf-stats-pid` the programs' own time
    /// (`guest.rs`).
    OpenPairs,
    /// Blocks of connects to `--target`, of fork+execs of `--pair-with` and of a reference
    /// computation, rotating: CPU time per op, and with `--bpf-stats-pid` every daemon
    /// program's time per op (`guest_loops.rs`).
    LoopBlocks,
}

pub fn worker(a: &WorkerArgs) -> Result<()> {
    let procs = a.cgroup.join("cgroup.procs");
    let mut go = String::new();
    std::fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("bench worker: cannot join {}", procs.display()))?;
    if a.wait_stdin {
        use std::io::{BufRead, Write};
        let mut out = std::io::stdout().lock();
        writeln!(out, "pid={}", std::process::id())?;
        out.flush()?;
        if std::io::stdin().lock().read_line(&mut go)? == 0 {
            bail!("bench worker: stdin closed before the go line");
        }
    }
    if a.expect_errno.is_some() && !matches!(a.kind, Kind::Connect | Kind::Open) {
        bail!("bench worker: --expect-errno applies to connect and open only");
    }
    let mut fresh = Vec::new();
    let mut samples = if a.per_op { Vec::with_capacity(a.n as usize) } else { Vec::new() };
    if a.kind == Kind::DnsConnect {
        super::dns::learn(a)?;
        // The bench starts the kernel-cost window of the connect loop here.
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "learned")?;
        out.flush()?;
    }
    let t0 = Instant::now();
    let ops = match a.kind {
        Kind::Connect => {
            let addr = a.target.parse().context("bench worker: bad address")?;
            timed(a, &mut samples, |i| connect_one(addr, i, a.expect_errno))?
        }
        Kind::Open => timed(a, &mut samples, |i| open_one(&a.target, i, a.expect_errno))?,
        Kind::Exec => exec(&a.target, a.n, a.per_op.then_some(&mut samples))?,
        Kind::Flood => flood(a.target.parse().context("bench worker: bad address")?, a)?,
        Kind::Socket => timed(a, &mut samples, socket_one)?,
        Kind::Send => {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            s.connect(&a.target).context("bench worker: connect the UDP socket")?;
            let payload = [0x5au8; 64];
            timed(a, &mut samples, |i| {
                s.send(&payload).map(|_| ()).with_context(|| format!("bench worker: send #{i}"))
            })?
        }
        Kind::Svid => super::svid::fetch_loop(&a.target, a.n, &mut samples)?,
        Kind::Aws => {
            super::aws::get_loops(&go, a.n, super::aws::NEW_CONN, &mut samples, &mut fresh)?
        }
        Kind::Dns => super::dns::query_loop(a, &mut samples)?,
        Kind::DnsConnect => {
            let addr = a.target.parse().context("bench worker: bad address")?;
            timed(a, &mut samples, |i| connect_one(addr, i, None))?
        }
        Kind::OpenPairs => super::guest_pairs::open_pairs(a)?,
        Kind::LoopBlocks => super::guest_loops::loop_blocks(a)?,
    };
    let ns = t0.elapsed().as_nanos();
    if a.per_op && !samples.is_empty() {
        samples.sort_unstable();
        fresh.sort_unstable();
        let q = |v: &[u64], q: f64| super::grants::quantile(v, q);
        println!(
            "ns={ns} ops={ops} p50={} p99={} new_p50={} new_p99={}",
            samples[samples.len() / 2],
            q(&samples, 0.99),
            q(&fresh, 0.5),
            q(&fresh, 0.99)
        );
    } else {
        println!("ns={ns} ops={ops}");
    }
    Ok(())
}

/// `a.n` calls of `op`; with `--per-op`, each one timed into `samples` (the timing adds two
/// clock reads per call, so per-op runs are not compared with plain ones).
fn timed(
    a: &WorkerArgs,
    samples: &mut Vec<u64>,
    mut op: impl FnMut(u64) -> Result<()>,
) -> Result<u64> {
    for i in 0..a.n {
        if a.per_op {
            let t = Instant::now();
            op(i)?;
            samples.push(t.elapsed().as_nanos() as u64);
        } else {
            op(i)?;
        }
    }
    Ok(a.n)
}

/// The outcome of one call against `--expect-errno`.
fn check(r: std::io::Result<()>, what: impl Fn() -> String, expect: Option<i32>) -> Result<()> {
    match (r, expect) {
        (Ok(()), None) => Ok(()),
        (Err(e), None) => Err(anyhow::Error::new(e).context(what())),
        (Err(e), Some(want)) if e.raw_os_error() == Some(want) => Ok(()),
        (Err(e), Some(want)) => bail!(
            "{}: expected errno {want} ({}), got: {e}",
            what(),
            std::io::Error::from_raw_os_error(want)
        ),
        (Ok(()), Some(want)) => bail!(
            "{}: succeeded, expected errno {want} ({})",
            what(),
            std::io::Error::from_raw_os_error(want)
        ),
    }
}

pub(super) fn connect_one(addr: SocketAddr, i: u64, expect: Option<i32>) -> Result<()> {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    let r = TcpStream::connect(addr).map(|s| {
        // SAFETY: valid socket fd and a correctly sized option value.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    });
    check(r, || format!("bench worker: connect #{i} to {addr}"), expect)
}

fn open_one(path: &str, i: u64, expect: Option<i32>) -> Result<()> {
    check(
        std::fs::File::open(path).map(drop),
        || format!("bench worker: open #{i} of {path}"),
        expect,
    )
}

fn socket_one(i: u64) -> Result<()> {
    // SAFETY: plain socket(2); the fd is closed right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        bail!("bench worker: socket #{i}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is owned here.
    unsafe { libc::close(fd) };
    Ok(())
}

/// `n` fork+exec+wait of `prog`; with `samples`, each one timed.
fn exec(prog: &str, n: u64, mut samples: Option<&mut Vec<u64>>) -> Result<u64> {
    let prog = CString::new(prog)?;
    for i in 0..n {
        let t = Instant::now();
        fork_exec_wait(&prog, i)?;
        if let Some(s) = samples.as_deref_mut() {
            s.push(t.elapsed().as_nanos() as u64);
        }
    }
    Ok(n)
}

/// One fork+exec of `prog` (no arguments) and the wait for it: the child's resource usage.
/// Fails unless the child exits 0. `i` numbers the call in errors. The caller must be
/// single-threaded (the child only calls async-signal-safe execv/_exit).
pub fn fork_exec_wait(prog: &CString, i: u64) -> Result<libc::rusage> {
    let argv = [prog.as_ptr(), std::ptr::null()];
    // SAFETY: see above; the child calls only execv and _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("bench worker: fork #{i}: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        unsafe {
            libc::execv(prog.as_ptr(), argv.as_ptr());
            libc::_exit(127);
        }
    }
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid value; wait4 for our own child fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::wait4(pid, &mut status, 0, &mut ru) } != pid || status != 0 {
        bail!("bench worker: exec #{i} of {prog:?} failed (wait status {status})");
    }
    Ok(ru)
}

fn flood(addr: SocketAddr, a: &WorkerArgs) -> Result<u64> {
    let per_thread = (a.rate / a.threads.max(1)).max(1) as f64;
    let dur = Duration::from_secs_f64(a.secs);
    let handles: Vec<_> = (0..a.threads.max(1))
        .map(|_| {
            std::thread::spawn(move || -> Result<u64> {
                let s = UdpSocket::bind("127.0.0.1:0")?;
                let t0 = Instant::now();
                let mut sent = 0u64;
                while t0.elapsed() < dur {
                    for _ in 0..32 {
                        // Errors (ENOBUFS under pressure) still produced the event: count the call.
                        let _ = s.send_to(b"x", addr);
                        sent += 1;
                    }
                    let ahead = sent as f64 / per_thread - t0.elapsed().as_secs_f64();
                    if ahead > 0.0 {
                        std::thread::sleep(Duration::from_secs_f64(ahead));
                    }
                }
                Ok(sent)
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        total += h.join().map_err(|_| anyhow::anyhow!("bench worker: flood thread panicked"))??;
    }
    Ok(total)
}
