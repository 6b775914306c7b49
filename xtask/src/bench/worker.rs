//! The measured loops. Each runs in its own process that first moves itself into the bench
//! cgroup (the daemon watches only that subtree), then prints `ns=<elapsed> ops=<count>`.

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
}

pub fn worker(a: &WorkerArgs) -> Result<()> {
    let procs = a.cgroup.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("bench worker: cannot join {}", procs.display()))?;
    if a.wait_stdin {
        use std::io::{BufRead, Write};
        let mut out = std::io::stdout().lock();
        writeln!(out, "pid={}", std::process::id())?;
        out.flush()?;
        let mut line = String::new();
        if std::io::stdin().lock().read_line(&mut line)? == 0 {
            bail!("bench worker: stdin closed before the go line");
        }
    }
    let t0 = Instant::now();
    let ops = match a.kind {
        Kind::Connect => connect(a.target.parse().context("bench worker: bad address")?, a.n)?,
        Kind::Open => open(&a.target, a.n)?,
        Kind::Exec => exec(&a.target, a.n)?,
        Kind::Flood => flood(a.target.parse().context("bench worker: bad address")?, a)?,
    };
    println!("ns={} ops={ops}", t0.elapsed().as_nanos());
    Ok(())
}

fn connect(addr: SocketAddr, n: u64) -> Result<u64> {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    for i in 0..n {
        let s = TcpStream::connect(addr).with_context(|| format!("bench worker: connect #{i} to {addr}"))?;
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
    }
    Ok(n)
}

fn open(path: &str, n: u64) -> Result<u64> {
    for i in 0..n {
        drop(std::fs::File::open(path).with_context(|| format!("bench worker: open #{i} of {path}"))?);
    }
    Ok(n)
}

fn exec(prog: &str, n: u64) -> Result<u64> {
    let prog = CString::new(prog)?;
    let argv = [prog.as_ptr(), std::ptr::null()];
    for i in 0..n {
        // SAFETY: the child only calls async-signal-safe execv/_exit; this process is single-threaded.
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
        // SAFETY: waiting for our own child.
        if unsafe { libc::waitpid(pid, &mut status, 0) } != pid || status != 0 {
            bail!("bench worker: exec #{i} of {prog:?} failed (wait status {status})");
        }
    }
    Ok(n)
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
