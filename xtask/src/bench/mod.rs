//! `cargo xtask bench`: overhead of the running daemon on the hooked syscalls, measured as
//! time-with-daemon / time-without over interleaved rounds (A = stopped, B = running), and
//! ring-buffer drops under a connect flood, and the Mint API: grant issuance latency and
//! throughput, and connect overhead with many live grants. A third daemon per round runs in
//! enforce mode: the same overhead loops (C vs A), then time from a violation to its denial:
//! connects outside a grant's intent (in-kernel, inside the syscall) and opens of a secret
//! (fanotify permission events: the daemon's decision latency from its status, and the open
//! call seen by the worker). Prints a table and writes target/bench.md.

mod alerts;
mod attack;
mod aws;
mod bpf_stats;
mod dns;
mod grant_load;
mod grants;
pub mod guest;
mod guest_loops;
mod guest_pairs;
mod harness;
mod kernel_costs;
mod report;
mod rounds;
mod svid;
mod worker;

pub use worker::{Kind, WorkerArgs, worker};

use crate::{build, is_root, root};
use anyhow::{Context, Result, bail};
use harness::Bench;
use report::{render, render_console};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const PIN_DIR: &str = "/sys/fs/bpf/enforcer-bench";
const FLOOD_RATE: u64 = 100_000;
const FLOOD_SECS: f64 = 3.0;
/// Grant issuance targets (issue 14): p99 at the offered rate, and the rate achieved.
const ISSUE_P99_MAX: Duration = Duration::from_millis(1);
const ISSUE_RATE_MIN: f64 = 5_000.0;
/// Enforce rounds: connects per worker for the per-call (denied / allowed) timings.
const VIOLATION_CONNECTS: u64 = 5_000;
/// Enforce rounds: opens of the secret per worker (denied without a grant, allowed with one).
const SECRET_OPENS: u64 = 20_000;
/// Fanotify permission-event decision latency target (p99, us).
const DECISION_P99_MAX_US: u64 = 200;
const EPERM: i32 = libc::EPERM;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("bench: interrupted");
    }
    Ok(())
}

/// One measured loop.
struct Spec {
    name: &'static str,
    kind: Kind,
    n: u64,
    target: String,
    /// Maximum ratio with/without, if this row has a target.
    limit: Option<f64>,
}

/// `only = Some("mint")`: only the Mint API rows (grant issuance, connects with the grants
/// live, JWT-SVID and AWS credential serving), with the daemon in monitor mode;
/// `Some("attack")`: only the daemon-under-attack rows (attack.rs, about 2 min);
/// `Some("dns")`: only the DNS stub rows (dns.rs, about 30 s a round);
/// `Some("kernel")`: only the kernel programs' costs (kernel_costs.rs, about 1 min a round);
/// `Some("alerts")`: only the alert-stream rows (alerts.rs: file and HEC sinks, daemon RSS
/// under that load; about 1 min a round).
pub fn run(iterations: usize, only: Option<&str>) -> Result<()> {
    if only.is_some_and(|o| !["mint", "attack", "dns", "kernel", "alerts"].contains(&o)) {
        bail!(
            "bench: --only takes `mint` (the Mint API rows), `attack` (the daemon under attack), `dns` (the DNS stub), `kernel` (the kernel programs' costs) or `alerts` (the alert stream), not {:?}",
            only.unwrap_or_default()
        );
    }
    if !is_root() {
        bail!(
            "bench: must run as root (creates a cgroup, loads kernel programs): run `sudo -E cargo xtask bench`"
        );
    }
    let iterations = iterations.max(1);
    let built = build::run(true)?;
    // Ctrl-C reaches the workers and the daemon too (same process group); we only note it and
    // unwind so the cleanup below runs. Handlers reset to default in exec'd children.
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let t0 = Instant::now();
    let mut bench = Bench::new(built.enforcer)?;
    let rows = match only {
        Some("mint") => bench.measure_mint(iterations),
        Some("dns") => bench.dns_rows(iterations),
        Some("kernel") => bench.kernel_cost_rows(iterations),
        Some("alerts") => bench.alert_rows(iterations),
        Some(_) => Ok(Vec::new()),
        None => bench.measure(iterations),
    };
    let rows = rows.and_then(|mut r| {
        if only == Some("dns") || only == Some("kernel") || only == Some("alerts") {
            return Ok(r);
        }
        if only != Some("attack") {
            r.extend(bench.identity_rows(iterations));
        }
        if only != Some("mint") {
            r.extend(attack::rows(&mut bench));
        }
        if only.is_none() {
            r.extend(bench.dns_rows(iterations)?);
            // The kernel programs' per-call ratios and their own time (bpf_stats).
            r.extend(bench.kernel_cost_rows(iterations)?);
        }
        Ok(r)
    });
    bench.cleanup();
    let rows = rows?;
    let md = render(&rows, iterations);
    println!("\n{}", render_console(&rows));
    let out = root().join("target").join("bench.md");
    std::fs::write(&out, md).with_context(|| format!("bench: cannot write {}", out.display()))?;
    println!("bench: wrote {} ({:.0}s)", out.display(), t0.elapsed().as_secs_f64());
    Ok(())
}
