//! Worker `loop-blocks` of the guest bench (`guest.rs`): what a daemon adds to connect() and
//! fork+exec. Wall time under TCG is noise (a guest loop's mean moved by 1.3x between runs,
//! more than any program of ours costs), so this worker times by its own CPU time: a connect
//! by the thread's CPU time (CLOCK_THREAD_CPUTIME_ID: the syscalls, the cgroup hooks and the
//! loopback softirq that run in its context; not the daemon reading records), a fork+exec by
//! the parent's CPU time plus the child's (its rusage from wait4: exec, the dynamic loader's
//! opens, exit). On the bench's instruction-clocked guest (`qemu::Clock::Instructions`) these
//! are counts of the worker's own instructions. Blocks of connects, blocks of fork+execs and
//! blocks of a fixed userspace computation (the reference) rotate; each loop's block is
//! divided by the same block's reference, so phases minutes apart compare in the same units
//! even if the vCPU's speed changed meanwhile (it does on a host clock; on the instruction
//! clock the reference stays put, a check). Then, with `--bpf-stats-pid` (the daemon), its
//! CPU ticks during each loop's blocks, and blocks with `kernel.bpf_stats_enabled`: every
//! daemon program's run time and run count per connect and per fork+exec (the kernel's own
//! accounting). Prints `loops=<json>`.

use super::worker::{WorkerArgs, connect_one, fork_exec_wait};
use anyhow::{Context, Result};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::net::SocketAddr;
use std::time::Instant;

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// Iterations of the reference computation: about as long as a connect block under TCG.
const REF_ITERS: u64 = 400_000;
/// Blocks with bpf_stats on, of each loop (each daemon program's time per op).
const STATS_BLOCKS: u64 = 6;

/// This thread's CPU time, ns.
fn thread_cpu_ns() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime into a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// The reference: a fixed userspace computation (no syscalls), CPU ns.
fn reference() -> f64 {
    let c0 = thread_cpu_ns();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..REF_ITERS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x = std::hint::black_box(x);
    }
    std::hint::black_box(x);
    thread_cpu_ns().saturating_sub(c0) as f64
}

/// `n` connects: (wall ns, CPU ns) per connect.
fn connects(addr: SocketAddr, n: u64) -> Result<(f64, f64)> {
    let (c0, t0) = (thread_cpu_ns(), Instant::now());
    for i in 0..n {
        connect_one(addr, i, None)?;
    }
    let (wall, cpu) = (t0.elapsed().as_nanos() as f64, thread_cpu_ns().saturating_sub(c0) as f64);
    Ok((wall / n.max(1) as f64, cpu / n.max(1) as f64))
}

/// `n` fork+execs of `prog`, each reaped with its rusage: (wall ns, parent + child CPU ns,
/// child CPU ns) per fork+exec.
fn execs(prog: &CString, n: u64) -> Result<(f64, f64, f64)> {
    let (c0, t0) = (thread_cpu_ns(), Instant::now());
    let mut children = 0u64;
    for i in 0..n {
        let ru = fork_exec_wait(prog, i)?;
        let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
        children += (us(ru.ru_utime) + us(ru.ru_stime)) * 1_000;
    }
    let wall = t0.elapsed().as_nanos() as f64;
    let parent = thread_cpu_ns().saturating_sub(c0) as f64;
    let per = |x: f64| x / n.max(1) as f64;
    Ok((per(wall), per(parent + children as f64), per(children as f64)))
}

/// The worker: see the module comment. `--target` is the TCP listener, `--pair-with` the
/// program to exec; per block `--n` connects and `--execs` fork+execs; `--blocks` blocks.
pub fn loop_blocks(a: &WorkerArgs) -> Result<u64> {
    let addr: SocketAddr = a.target.parse().context("bench worker: bad address")?;
    let prog = CString::new(
        a.pair_with.as_deref().context("bench worker: loop-blocks needs --pair-with")?,
    )?;
    let (n, m, blocks) = (a.n.max(1), a.execs.max(1), a.blocks.max(1));
    // Warm-up: page cache, dentries, the daemon's maps, TCG's translations.
    connects(addr, n / 4 + 1)?;
    execs(&prog, m / 4 + 1)?;
    reference();
    // [block]: reference CPU ns; per loop (wall, CPU) per op; the exec children's CPU.
    let (mut refs, mut conn, mut exec, mut child) = (vec![], vec![], vec![], vec![]);
    // The daemon's CPU ticks during each loop's blocks.
    let mut daemon_ticks = [0u64; 2];
    let ticks = || a.bpf_stats_pid.map_or(0, process_ticks);
    for b in 0..blocks {
        // Rotate the order, so no loop always follows the same one.
        for k in 0..3 {
            match (b + k) % 3 {
                0 => refs.push(reference()),
                1 => {
                    let t0 = ticks();
                    conn.push(connects(addr, n)?);
                    daemon_ticks[0] += ticks().saturating_sub(t0);
                }
                _ => {
                    let t0 = ticks();
                    let (w, c, ch) = execs(&prog, m)?;
                    daemon_ticks[1] += ticks().saturating_sub(t0);
                    exec.push((w, c));
                    child.push(ch);
                }
            }
        }
    }
    // USER_HZ is 100: 10 ms a tick.
    let daemon_ns = |i: usize, per: u64| daemon_ticks[i] as f64 * 1e7 / (blocks * per) as f64;
    let stats = match a.bpf_stats_pid {
        Some(pid) => stats_blocks(pid, addr, &prog, n, m)?,
        None => Value::Null,
    };
    let col = |v: &[(f64, f64)], wall: bool| -> Vec<f64> {
        v.iter().map(|x| if wall { x.0 } else { x.1 }).collect()
    };
    println!(
        "loops={}",
        json!({
            "ref_cpu_ns": refs,
            "connect_cpu_ns": col(&conn, false),
            "connect_wall_ns": col(&conn, true),
            "exec_cpu_ns": col(&exec, false),
            "exec_wall_ns": col(&exec, true),
            "exec_child_cpu_ns": child,
            "daemon_cpu_ns": a.bpf_stats_pid.map(|_| [daemon_ns(0, n), daemon_ns(1, m)]),
            "stats": stats,
        })
    );
    Ok(blocks * (n + m))
}

/// utime + stime of process `pid` (all its threads), clock ticks.
fn process_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command's closing parenthesis: utime is the 12th field, stime the 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = after.split_whitespace().map(|w| w.parse().unwrap_or(0)).collect();
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

/// Per program id of the daemon `pid`: (prog_type, run_time_ns, run_cnt), from fdinfo.
fn programs(pid: u32) -> BTreeMap<u32, (u64, u64, u64)> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).into_iter().flatten().flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else { continue };
        let field = |k: &str| {
            text.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(ty), Some(ns), Some(cnt)) =
            (field("prog_id:"), field("prog_type:"), field("run_time_ns:"), field("run_cnt:"))
        {
            out.insert(id as u32, (ty, ns, cnt));
        }
    }
    out
}

/// A program's name (the kernel's 15-character copy of the function name), by the bpf(2)
/// syscall: fdinfo does not carry it and bpftool may be missing.
fn prog_name(id: u32) -> String {
    const BPF_PROG_GET_FD_BY_ID: i64 = 13;
    const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;
    let by_id: [u32; 4] = [id, 0, 0, 0];
    // SAFETY: bpf(2) with an attr buffer of the size passed; it returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_PROG_GET_FD_BY_ID, by_id.as_ptr(), size_of_val(&by_id))
    };
    if fd < 0 {
        return String::new();
    }
    // struct bpf_prog_info: name[16] at byte 64; the rest of the buffer stays zero.
    let mut info = [0u64; 32];
    let mut attr = [0u64; 2];
    attr[0] = fd as u64 | (size_of_val(&info) as u64) << 32;
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: `info` outlives the call and its size is the info_len passed.
    let r = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, attr.as_ptr(), size_of_val(&attr))
    };
    // SAFETY: fd is ours.
    unsafe { libc::close(fd as i32) };
    if r != 0 {
        return String::new();
    }
    let bytes: Vec<u8> = info[8..10].iter().flat_map(|w| w.to_ne_bytes()).collect();
    String::from_utf8_lossy(bytes.split(|&b| b == 0).next().unwrap_or_default()).into_owned()
}

/// Blocks with the kernel's per-program accounting on (two clock reads per program run, so
/// it is off during the timed blocks): per daemon program, its run time and runs per connect
/// and per fork+exec, summed over the blocks.
fn stats_blocks(pid: u32, addr: SocketAddr, prog: &CString, n: u64, m: u64) -> Result<Value> {
    let old = std::fs::read_to_string(SYSCTL).unwrap_or_else(|_| "0".into());
    std::fs::write(SYSCTL, "1").context("bench worker: cannot enable kernel.bpf_stats_enabled")?;
    let r = (|| -> Result<Value> {
        // id -> [loop] (ns, runs)
        let mut sums: BTreeMap<u32, (u64, [(u64, u64); 2])> = BTreeMap::new();
        for b in 0..STATS_BLOCKS {
            for k in 0..2 {
                let which = (b + k) as usize % 2;
                let s0 = programs(pid);
                if which == 0 {
                    connects(addr, n)?;
                } else {
                    execs(prog, m)?;
                }
                for (id, (ty, ns, cnt)) in programs(pid) {
                    let Some((_, ns0, cnt0)) = s0.get(&id) else { continue };
                    let e = sums.entry(id).or_insert((ty, [(0, 0); 2]));
                    e.1[which].0 += ns.saturating_sub(*ns0);
                    e.1[which].1 += cnt.saturating_sub(*cnt0);
                }
            }
        }
        let ops = [(STATS_BLOCKS * n) as f64, (STATS_BLOCKS * m) as f64];
        let progs: Vec<Value> = sums
            .into_iter()
            .map(|(id, (ty, s))| {
                json!({
                    "name": prog_name(id),
                    "lsm": ty == super::guest_pairs::BPF_PROG_TYPE_LSM,
                    "connect_ns": s[0].0 as f64 / ops[0],
                    "connect_runs": s[0].1 as f64 / ops[0],
                    "exec_ns": s[1].0 as f64 / ops[1],
                    "exec_runs": s[1].1 as f64 / ops[1],
                })
            })
            .collect();
        Ok(json!(progs))
    })();
    let _ = std::fs::write(SYSCTL, old.trim());
    r
}

// ---- The guest bench's side (runs the worker once per phase and round; the table rows).

/// Per block: connects, fork+execs, and one reference computation.
const LOOP_BLOCKS: u64 = 24;
const CONNECTS_PER_BLOCK: u64 = 100;
const EXECS_PER_BLOCK: u64 = 8;
/// What is exec'd.
const EXEC_PROGRAM: &str = "/bin/true";
/// (row name, JSON key, unit of one op in the bpf_stats rows).
const LOOPS: [(&str, &str, &str); 2] = [
    ("connect() loopback TCP", "connect", "connect"),
    ("fork+exec /bin/true", "exec", "fork+exec"),
];
/// "Unchanged": with the BPF-LSM backend a connect or a fork+exec costs the worker at most
/// this times what it costs with the fanotify backend (CPU time over the reference).
const UNCHANGED_TOLERANCE: f64 = 1.05;
/// The BPF-LSM file backend's own programs; every other program loads with either backend.
const BACKEND_PROGRAMS: [&str; 2] = ["file_open", "inode_free"];
/// Phases in `guest.rs`'s order: no daemon, bpf-lsm, fanotify.
const NO_DAEMON: usize = 0;
const LSM: usize = 1;
const FAN: usize = 2;

/// One loop-blocks worker in the bench cgroup (no grant), with bpf_stats when a daemon runs.
pub(super) fn run(b: &super::harness::Bench, tcp: &str, daemon: Option<u32>) -> Result<Value> {
    let mut extra: Vec<String> = [
        "--pair-with",
        EXEC_PROGRAM,
        "--execs",
        &EXECS_PER_BLOCK.to_string(),
        "--blocks",
        &LOOP_BLOCKS.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(pid) = daemon {
        extra.extend(["--bpf-stats-pid".to_string(), pid.to_string()]);
    }
    let w = b.bound_worker_with(
        "loop blocks",
        "loop-blocks",
        tcp,
        CONNECTS_PER_BLOCK,
        false,
        None,
        &extra,
    )?;
    w.text
        .lines()
        .find_map(|l| l.strip_prefix("loops="))
        .and_then(|j| serde_json::from_str(j).ok())
        .with_context(|| format!("bench: loop-blocks worker printed no result: {}", w.text))
}

fn arr(v: &Value) -> Vec<f64> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default()
}

fn med(v: &[f64]) -> f64 {
    if v.is_empty() { f64::NAN } else { super::report::median(v) }
}

/// A loop's blocks of one worker: CPU per op over the same block's reference.
fn normalised(l: &Value, key: &str) -> Vec<f64> {
    arr(&l[format!("{key}_cpu_ns")]).iter().zip(arr(&l["ref_cpu_ns"])).map(|(c, r)| c / r).collect()
}

/// The daemon's programs' ns per op of one worker, by group: (the BPF-LSM backend's, the
/// other BPF-LSM programs', the rest's, file_open runs per op). None without bpf_stats.
fn groups(l: &Value, key: &str) -> Option<[f64; 4]> {
    let progs = l["stats"].as_array()?;
    let mut g = [0.0; 4];
    for p in progs {
        let name = p["name"].as_str().unwrap_or("");
        let ns = p[format!("{key}_ns")].as_f64().unwrap_or(0.0);
        let backend = p["lsm"].as_bool() == Some(true) && BACKEND_PROGRAMS.contains(&name);
        match (backend, p["lsm"].as_bool() == Some(true)) {
            (true, _) => g[0] += ns,
            (false, true) => g[1] += ns,
            _ => g[2] += ns,
        }
        if backend && name == "file_open" {
            g[3] += p[format!("{key}_runs")].as_f64().unwrap_or(0.0);
        }
    }
    Some(g)
}

/// One worker's line for the guest's log.
pub(super) fn summary(l: &Value) -> String {
    let mut parts = Vec::new();
    for (i, (_, key, unit)) in LOOPS.iter().enumerate() {
        let cpu = med(&arr(&l[format!("{key}_cpu_ns")])) / 1e3;
        let wall = med(&arr(&l[format!("{key}_wall_ns")])) / 1e3;
        let blocks = normalised(l, key);
        let (lo, hi) = (
            blocks.iter().copied().fold(f64::INFINITY, f64::min),
            blocks.iter().copied().fold(0.0, f64::max),
        );
        let mut s = format!(
            "{unit} CPU {cpu:.1}us wall {wall:.1}us CPU/ref {:.4} (blocks {lo:.4}-{hi:.4})",
            med(&blocks)
        );
        if let Some(d) = l["daemon_cpu_ns"][i].as_f64() {
            s += &format!(" daemon CPU {:.1}us", d / 1e3);
        }
        if let Some(g) = groups(l, key) {
            s += &format!(
                " bpf_stats ns/op backend {:.0} (file_open runs {:.2}) other-lsm {:.0} rest {:.0}",
                g[0], g[3], g[1], g[2]
            );
        }
        // Every program that ran: runs per op, ns per run.
        for p in l["stats"].as_array().into_iter().flatten() {
            let runs = p[format!("{key}_runs")].as_f64().unwrap_or(0.0);
            if runs > 0.0 {
                let ns = p[format!("{key}_ns")].as_f64().unwrap_or(0.0);
                s += &format!(
                    " [{} {runs:.2} runs/op {:.0} ns/run]",
                    p["name"].as_str().unwrap_or("?"),
                    ns / runs
                );
            }
        }
        parts.push(s);
    }
    parts.join("; ")
}

/// The figures of all phases and rounds (`loops[phase][round]`): per loop and phase, pooled
/// block medians, ratios to no daemon and bpf-lsm / fanotify, per-round ranges, bpf_stats.
pub(super) fn figures(loops: &[Vec<Value>]) -> Value {
    let mut out = serde_json::Map::new();
    for (i, (_, key, _)) in LOOPS.iter().enumerate() {
        let pooled = |p: usize, f: &dyn Fn(&Value) -> Vec<f64>| -> f64 {
            med(&loops[p].iter().flat_map(f).collect::<Vec<_>>())
        };
        let field = |k: String| move |l: &Value| arr(&l[k.as_str()]);
        let norm: Vec<f64> = (0..3).map(|p| pooled(p, &|l| normalised(l, key))).collect();
        let cpu: Vec<f64> = (0..3).map(|p| pooled(p, &field(format!("{key}_cpu_ns")))).collect();
        let wall: Vec<f64> = (0..3).map(|p| pooled(p, &field(format!("{key}_wall_ns")))).collect();
        let child: Vec<f64> =
            (0..3).map(|p| pooled(p, &field(format!("{key}_child_cpu_ns")))).collect();
        // Per round (its phases minutes apart, not hours): the normalised ratio's range.
        let rounds = loops.iter().map(Vec::len).min().unwrap_or(0);
        let round_ratio = |p: usize, q: usize| -> Vec<f64> {
            (0..rounds)
                .map(|r| med(&normalised(&loops[p][r], key)) / med(&normalised(&loops[q][r], key)))
                .collect()
        };
        let range = |v: Vec<f64>| {
            [v.iter().copied().fold(f64::INFINITY, f64::min), v.iter().copied().fold(0.0, f64::max)]
        };
        let stats: Vec<Value> = (0..3)
            .map(|p| {
                let g: Vec<[f64; 4]> = loops[p].iter().filter_map(|l| groups(l, key)).collect();
                if g.is_empty() {
                    return Value::Null;
                }
                json!(
                    (0..4)
                        .map(|i| med(&g.iter().map(|x| x[i]).collect::<Vec<_>>()))
                        .collect::<Vec<_>>()
                )
            })
            .collect();
        out.insert(
            key.to_string(),
            json!({
                "norm": norm,
                "cpu_ns": cpu,
                "wall_ns": wall,
                "child_cpu_ns": child,
                "norm_ratio_range": (0..3).map(|p| range(round_ratio(p, NO_DAEMON))).collect::<Vec<_>>(),
                "lsm_vs_fan_range": range(round_ratio(LSM, FAN)),
                "stats": stats,
                "daemon_cpu_ns": (0..3).map(|p| {
                    let d: Vec<f64> =
                        loops[p].iter().filter_map(|l| l["daemon_cpu_ns"][i].as_f64()).collect();
                    if d.is_empty() { Value::Null } else { json!(med(&d)) }
                }).collect::<Vec<_>>(),
            }),
        );
    }
    Value::Object(out)
}

/// The table rows for the loops: (measurement, [no daemon, bpf-lsm, fanotify] cells).
pub(super) fn rows(f: &Value) -> Vec<(String, [String; 3])> {
    let n = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let mut rows = Vec::new();
    for (name, key, unit) in LOOPS {
        let l = &f[key];
        let at = |k: &str, p: usize| n(&l[k][p]);
        let ratio = |k: &str, p: usize| at(k, p) / at(k, NO_DAEMON);
        let vs_fan = |k: &str| at(k, LSM) / at(k, FAN);
        let verdict = if vs_fan("norm") <= UNCHANGED_TOLERANCE { "PASS" } else { "MISS" };
        rows.push((
            format!(
                "**{name}: the worker's CPU per op / the reference's** (median of {LOOP_BLOCKS} blocks x rounds; ratio to no daemon)"
            ),
            [
                format!("{:.2}x", ratio("norm", NO_DAEMON)),
                format!(
                    "**{:.2}x; bpf-lsm / fanotify {:.3}x** (unchanged within {UNCHANGED_TOLERANCE}x: {verdict})",
                    ratio("norm", LSM),
                    vs_fan("norm")
                ),
                format!("{:.2}x", ratio("norm", FAN)),
            ],
        ));
        let rr = |p: usize| {
            let r = &l["norm_ratio_range"][p];
            format!("{:.2}-{:.2}x", n(&r[0]), n(&r[1]))
        };
        let lf = &l["lsm_vs_fan_range"];
        rows.push((
            format!("{name}: CPU/reference ratio to no daemon, range of the rounds"),
            [
                rr(NO_DAEMON),
                format!("{}; / fanotify {:.2}-{:.2}x", rr(LSM), n(&lf[0]), n(&lf[1])),
                rr(FAN),
            ],
        ));
        let us = |k: &str, p: usize| {
            let tail =
                if p == LSM { format!("; / fanotify {:.2}x", vs_fan(k)) } else { String::new() };
            format!("{:.1} us ({:.2}x{tail})", at(k, p) / 1e3, ratio(k, p))
        };
        let what = if key == "exec" { "parent + child CPU" } else { "the worker's CPU" };
        rows.push((
            format!("{name}: {what} per op, median of blocks (ratio to no daemon)"),
            [us("cpu_ns", 0), us("cpu_ns", 1), us("cpu_ns", 2)],
        ));
        if key == "exec" {
            rows.push((
                format!("{name}: of which the child's (exec, loader, exit), median of blocks"),
                [0, 1, 2].map(|p| format!("{:.1} us", at("child_cpu_ns", p) / 1e3)),
            ));
        }
        rows.push((
            format!(
                "{name}: wall per op, median of blocks (ratio to no daemon; counts idle skips to the next timer: not judged)"
            ),
            [us("wall_ns", 0), us("wall_ns", 1), us("wall_ns", 2)],
        ));
        rows.push((
            format!("the daemon's CPU per {unit} (its records and timers; not in the worker's)"),
            [0, 1, 2].map(|p| match l["daemon_cpu_ns"][p].as_f64() {
                Some(d) => format!("{:.1} us", d / 1e3),
                None => "-".into(),
            }),
        ));
        let st = |p: usize, i: usize| n(&l["stats"][p][i]);
        let none = |p: usize| l["stats"][p].is_null();
        rows.push((
            format!(
                "bpf_stats per {unit}: the BPF-LSM backend's programs (file_open, inode_free) ns (file_open runs); the other BPF-LSM programs; the rest"
            ),
            [0, 1, 2].map(|p| {
                if none(p) {
                    "-".into()
                } else {
                    format!("{:.0} ns ({:.1}); {:.0} ns; {:.0} ns", st(p, 0), st(p, 3), st(p, 1), st(p, 2))
                }
            }),
        ));
        rows.push((
            format!("the BPF-LSM backend's programs per {unit} / the worker's CPU per {unit} under fanotify"),
            ["-".into(), format!("{:.2}%", 100.0 * st(LSM, 0) / at("cpu_ns", FAN)), "-".into()],
        ));
    }
    rows
}
