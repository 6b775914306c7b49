//! Worker `open-pairs` of the guest bench (`guest.rs`): the secret-open cost measured so that
//! a loaded host does not decide it. Under TCG the guest's vCPUs are host threads competing
//! with every other build on the host, so one loop's wall time moves by 2-5x between runs.
//! Here one granted process opens the plain file and the secret in alternating blocks (the
//! order flips each block), timing each block by wall clock and by its own CPU time
//! (CLOCK_THREAD_CPUTIME_ID: what the kernel charged the opener, which excludes the daemon
//! reading the records on the other vCPU); the ratio is taken per adjacent pair of blocks, so
//! a load change between blocks moves both sides. Then blocks with per-call wall times (their
//! medians), then, with `--bpf-stats-pid`, blocks with `kernel.bpf_stats_enabled` (the
//! programs' own run time per open, from the daemon's program fds: the kernel's accounting,
//! independent of what else the host runs except for the vCPU being descheduled inside a
//! program run). Prints `pairs=<json>`.

use super::worker::WorkerArgs;
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::ffi::{CStr, CString};
use std::time::Instant;

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// `prog_type` of BPF-LSM programs in fdinfo.
pub(super) const BPF_PROG_TYPE_LSM: u64 = 29;

/// This thread's CPU time, ns.
fn thread_cpu_ns() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime into a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// open(2) + close(2) of `path`, the raw calls (no allocation in the loop: the userspace part
/// of the cost stays as small as the program can make it).
fn open_close(path: &CStr) -> Result<()> {
    // SAFETY: a NUL-terminated path; the fd is closed right away.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        bail!("bench worker: open {path:?}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by open(2) and is owned here.
    unsafe { libc::close(fd) };
    Ok(())
}

/// `n` opens of `path`: (wall ns, CPU ns) per open.
fn block(path: &CStr, n: u64) -> Result<(f64, f64)> {
    let (c0, t0) = (thread_cpu_ns(), Instant::now());
    for _ in 0..n {
        open_close(path)?;
    }
    let wall = t0.elapsed().as_nanos() as f64;
    let cpu = thread_cpu_ns().saturating_sub(c0) as f64;
    Ok((wall / n.max(1) as f64, cpu / n.max(1) as f64))
}

/// Sums over the programs `pid` holds: (BPF-LSM run ns, BPF-LSM runs, all programs' run ns).
fn prog_totals(pid: u32) -> (u64, u64, u64) {
    let (mut lsm_ns, mut lsm_cnt, mut all_ns) = (0, 0, 0);
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else { continue };
        let field = |k: &str| {
            text.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.trim().parse::<u64>().ok())
        };
        let (Some(ty), Some(ns), Some(cnt)) =
            (field("prog_type:"), field("run_time_ns:"), field("run_cnt:"))
        else {
            continue;
        };
        all_ns += ns;
        if ty == BPF_PROG_TYPE_LSM {
            lsm_ns += ns;
            lsm_cnt += cnt;
        }
    }
    (lsm_ns, lsm_cnt, all_ns)
}

/// The worker: see the module comment. `--target` is the plain file, `--pair-with` the
/// secret; `--n` opens per block, `--blocks` blocks of each.
pub fn open_pairs(a: &WorkerArgs) -> Result<u64> {
    let other = a.pair_with.as_deref().context("bench worker: open-pairs needs --pair-with")?;
    let paths = [CString::new(a.target.as_str())?, CString::new(other)?];
    let (n, blocks) = (a.n.max(1), a.blocks.max(1));
    // Warm-up: page cache, dentries, the program's maps.
    for p in &paths {
        block(p, n.min(50))?;
    }
    // [file][block]
    let mut wall = [Vec::new(), Vec::new()];
    let mut cpu = [Vec::new(), Vec::new()];
    for b in 0..blocks {
        for k in 0..2 {
            let which = if b % 2 == 0 { k } else { 1 - k };
            let (w, c) = block(&paths[which], n)?;
            wall[which].push(w);
            cpu[which].push(c);
        }
    }
    // Per-call wall times (two clock reads each, so apart from the CPU blocks).
    let mut calls = [Vec::new(), Vec::new()];
    for b in 0..blocks {
        for k in 0..2 {
            let which = if b % 2 == 0 { k } else { 1 - k };
            for _ in 0..n {
                let t = Instant::now();
                open_close(&paths[which])?;
                calls[which].push(t.elapsed().as_nanos() as u64);
            }
        }
    }
    for c in &mut calls {
        c.sort_unstable();
    }
    let stats = match a.bpf_stats_pid {
        Some(pid) => stats_blocks(pid, &paths, n, blocks)?,
        None => Value::Null,
    };
    println!(
        "pairs={}",
        json!({
            "wall_ns": wall,
            "cpu_ns": cpu,
            "call_p50_ns": [calls[0][calls[0].len() / 2], calls[1][calls[1].len() / 2]],
            "stats": stats,
        })
    );
    Ok(3 * 2 * blocks * n)
}

/// Blocks with the kernel's per-program accounting on (it adds two clock reads to every
/// program run, so it is off during the timed blocks): per block, the BPF-LSM programs' and
/// all the daemon's programs' ns per open, and LSM runs per open.
fn stats_blocks(pid: u32, paths: &[CString; 2], n: u64, blocks: u64) -> Result<Value> {
    let old = std::fs::read_to_string(SYSCTL).unwrap_or_else(|_| "0".into());
    std::fs::write(SYSCTL, "1").context("bench worker: cannot enable kernel.bpf_stats_enabled")?;
    let r = (|| -> Result<Value> {
        // [file][block]
        let (mut lsm, mut all, mut runs) =
            ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
        for b in 0..blocks {
            for k in 0..2 {
                let which = if b % 2 == 0 { k } else { 1 - k };
                let s0 = prog_totals(pid);
                block(&paths[which], n)?;
                let s1 = prog_totals(pid);
                let per = |x: u64| x as f64 / n as f64;
                lsm[which].push(per(s1.0.saturating_sub(s0.0)));
                runs[which].push(per(s1.1.saturating_sub(s0.1)));
                all[which].push(per(s1.2.saturating_sub(s0.2)));
            }
        }
        Ok(json!({ "lsm_ns": lsm, "lsm_runs": runs, "all_ns": all }))
    })();
    let _ = std::fs::write(SYSCTL, old.trim());
    r
}
