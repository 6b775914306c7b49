//! `cargo xtask bench --kernel 6.1|6.12|all`: the secret-open cost of each file backend,
//! measured inside Debian's guest kernels (QEMU/TCG, booted by the kernel matrix's code) where
//! BPF-LSM loads. The host boots each guest with this xtask binary as the guest's program
//! (`bench-guest-inner`); inside, interleaved rounds (order rotating per round) run the same
//! loops with no daemon, with a daemon on the BPF-LSM backend and with one on the fanotify
//! backend: a plain open and an open of the watched secret by a process holding a grant
//! (their ratio is the secret-open cost), a loopback TCP connect and fork+exec (ratios to the
//! no-daemon round). Emulation makes absolute times meaningless: only ratios within one guest
//! are reported. Prints a table per kernel and writes target/bench-guest.md.

use super::VIOLATION_CONNECTS;
use super::harness::Bench;
use super::report::median;
use crate::matrix::kernels::{self, SERIES, Series};
use crate::matrix::{host, qemu};
use crate::{build, is_root, root};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Instant;

/// `--kernel` of `bench`: which guest kernels to measure in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GuestKernel {
    #[value(name = "6.1")]
    V6_1,
    #[value(name = "6.12")]
    V6_12,
    All,
}

impl GuestKernel {
    fn series(self) -> Vec<Series> {
        let named = |n: &str| SERIES.iter().copied().filter(|s| s.name == n).collect();
        match self {
            GuestKernel::V6_1 => named("6.1"),
            GuestKernel::V6_12 => named("6.12"),
            GuestKernel::All => SERIES.to_vec(),
        }
    }
}

/// `bench-guest-inner`: runs inside the guest.
#[derive(clap::Args, Debug)]
pub struct InnerArgs {
    /// The enforcer binary (the host's build, seen through the read-only host root).
    #[arg(long)]
    pub enforcer: PathBuf,
    #[arg(long)]
    pub iterations: usize,
}

/// Rounds per guest unless `--iterations` says otherwise: each costs two daemon starts, tens
/// of seconds each under emulation (the verifier).
pub const DEFAULT_ITERATIONS: usize = 3;
/// Target: a granted secret open judged by BPF-LSM costs at most this times a plain open.
const LSM_TARGET: f64 = 1.5;
/// The guest program's time limit (seconds).
const GUEST_LIMIT_S: u64 = 1800;
/// The marker of the guest's result line in its output.
const RESULT: &str = "bench-guest-result: ";

/// The phases of one round: no daemon, then the two file backends.
const PHASES: [(&str, Option<&str>); 3] =
    [("no daemon", None), ("bpf-lsm", Some("bpf-lsm")), ("fanotify", Some("fanotify"))];

/// The loops: (row name, worker kind, count, granted). The opens use the host bench's per-op
/// count (VIOLATION_CONNECTS), which makes the worker time each call and report its median
/// too: a median per call is robust to the guest's vCPU threads being descheduled on a busy
/// host, which a loop's mean is not. The other counts avoid the per-op counts.
const LOOPS: [(&str, &str, u64, bool); 4] = [
    ("open()+close() plain file, granted process", "open", VIOLATION_CONNECTS, true),
    ("open()+close() watched secret, granted process", "open", VIOLATION_CONNECTS, true),
    ("connect() loopback TCP", "connect", 1_000, false),
    ("fork+exec /bin/true", "exec", 100, false),
];

/// Host side: boot each guest, run the inner bench there, print and write the table.
pub fn run(kernel: GuestKernel, iterations: usize) -> Result<()> {
    if !is_root() {
        bail!("bench: must run as root (boots guests whose bench loads kernel programs)");
    }
    let t0 = Instant::now();
    let built = build::run(true)?;
    host::ensure()?;
    let qemu_bin = host::qemu().context("bench: qemu-system-x86_64 not found")?;
    let exe = std::env::current_exe().context("bench: where is this xtask binary")?;
    let mut md = String::from(
        "# enforcer bench inside guest kernels\n\nEach kernel boots under QEMU with TCG (emulation, no KVM): absolute times are many \
         times the hardware's, so only ratios measured within one guest mean anything. Rounds interleave no daemon, a \
         daemon on the BPF-LSM backend and one on the fanotify backend (order rotating); medians over the rounds. \
         The secret-open cost is the granted secret open / the plain open by the same kind of granted process under the \
         same daemon; the other ratios are with the daemon / without.\n",
    );
    let mut failed = Vec::new();
    for series in kernel.series() {
        let k = kernels::ensure(series)?;
        let prog = qemu::GuestTest {
            name: "bench".into(),
            exe: exe.clone(),
            args: vec![
                "bench-guest-inner".into(),
                "--enforcer".into(),
                built.enforcer.display().to_string(),
                "--iterations".into(),
                iterations.max(1).to_string(),
            ],
            limit_s: GUEST_LIMIT_S,
        };
        println!("bench: kernel {} = {} {}: booting the guest", series.name, k.package, k.version);
        let out_dir = root().join("target").join("bench-guest").join(&k.release);
        let g = qemu::run(&qemu_bin, &k, std::slice::from_ref(&prog), &[], &out_dir)?;
        let r = &g.runs[0];
        let result = r
            .log
            .lines()
            .find_map(|l| l.strip_prefix(RESULT))
            .and_then(|j| serde_json::from_str::<Value>(j).ok());
        let Some(result) = result.filter(|_| r.code == Some(0)) else {
            let tail: Vec<&str> = r.log.lines().rev().take(40).collect();
            println!(
                "bench: kernel {}: the guest bench failed (exit {:?}, hung {}); its output's tail:\n{}\nconsole tail:\n{}",
                k.release,
                r.code,
                g.hung,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
                g.console_tail(20)
            );
            failed.push(k.release.clone());
            continue;
        };
        let table = render(&result, &k.release, &k.package, &k.version, g.total_s);
        println!("\n{table}");
        md += &format!("\n{table}");
    }
    let out = root().join("target").join("bench-guest.md");
    std::fs::write(&out, &md).with_context(|| format!("bench: cannot write {}", out.display()))?;
    println!("bench: wrote {} ({:.0}s)", out.display(), t0.elapsed().as_secs_f64());
    if !failed.is_empty() {
        bail!("bench: the guest bench failed on {}", failed.join(", "));
    }
    Ok(())
}

/// One kernel's table (markdown, readable on a console too).
fn render(r: &Value, release: &str, package: &str, version: &str, total_s: f64) -> String {
    let cell = |phase: &str, row: usize| -> (f64, f64) {
        let us = r["median_us"][phase][row].as_f64().unwrap_or(f64::NAN);
        let ratio = r["median_ratio"][phase][row].as_f64().unwrap_or(f64::NAN);
        (us, ratio)
    };
    let mut t = format!(
        "## Kernel {release} ({package} {version})\n\n{} rounds; active LSMs `{}`; guest total {total_s:.0} s.\n\n\
         | measurement | no daemon | bpf-lsm | fanotify |\n|---|---|---|---|\n",
        r["iterations"],
        r["lsm"].as_str().unwrap_or("?"),
    );
    for (i, (name, ..)) in LOOPS.iter().enumerate() {
        let (none_us, _) = cell(PHASES[0].0, i);
        t += &format!("| {name} | {none_us:.1} us |");
        for (phase, _) in &PHASES[1..] {
            let (us, ratio) = cell(phase, i);
            t += &format!(" {us:.1} us ({ratio:.2}x) |");
        }
        t += "\n";
    }
    let p50 = |phase: &str, i: usize| r["open_p50_us"][phase][i].as_f64().unwrap_or(f64::NAN);
    for (i, what) in ["plain file", "watched secret"].iter().enumerate() {
        t += &format!(
            "| open()+close() {what}, per-call median | {:.1} us | {:.1} us | {:.1} us |\n",
            p50(PHASES[0].0, i),
            p50(PHASES[1].0, i),
            p50(PHASES[2].0, i)
        );
    }
    let cost = |phase: &str| r["secret_cost"][phase].as_f64().unwrap_or(f64::NAN);
    let lsm = cost("bpf-lsm");
    t += &format!(
        "| **secret open / plain open** (per-call medians; median of rounds) | {:.2}x | **{lsm:.2}x** (target <= {LSM_TARGET}x: {}) | {:.2}x |\n",
        cost("no daemon"),
        if lsm <= LSM_TARGET { "PASS" } else { "MISS" },
        cost("fanotify"),
    );
    let mean = |phase: &str| r["secret_cost_mean"][phase].as_f64().unwrap_or(f64::NAN);
    t += &format!(
        "| secret / plain, loop means (daemon and host noise included) | {:.2}x | {:.2}x | {:.2}x |\n",
        mean(PHASES[0].0),
        mean(PHASES[1].0),
        mean(PHASES[2].0)
    );
    let spread = |phase: &str| {
        let s = &r["secret_cost_spread"][phase];
        format!(
            "{:.2}-{:.2}x",
            s[0].as_f64().unwrap_or(f64::NAN),
            s[1].as_f64().unwrap_or(f64::NAN)
        )
    };
    t += &format!(
        "| secret / plain per-call medians, range over rounds | {} | {} | {} |\n",
        spread(PHASES[0].0),
        spread(PHASES[1].0),
        spread(PHASES[2].0)
    );
    // bpf_stats: the programs' own time (under emulation: only comparable within a guest).
    for (i, what) in ["plain", "secret"].iter().enumerate() {
        let ns = |phase: &str, k: &str| r["program_ns"][phase][i][k].as_f64().unwrap_or(f64::NAN);
        t += &format!(
            "| bpf_stats, {what} open: lsm/file_open ns per run; all daemon programs ns per open | | {:.0} ns; {:.0} ns | -; {:.0} ns |\n",
            ns("bpf-lsm", "lsm_ns_per_run"),
            ns("bpf-lsm", "bpf_ns_per_op"),
            ns("fanotify", "bpf_ns_per_op"),
        );
    }
    t
}

/// Guest side: the interleaved rounds; prints one result line of JSON.
pub fn inner(a: &InnerArgs) -> Result<()> {
    let mut b = Bench::new(a.enforcer.clone())?;
    b.time_scale = 10;
    let r = measure(&mut b, a.iterations.max(1));
    b.cleanup();
    let r = r?;
    println!("{RESULT}{r}");
    Ok(())
}

fn measure(b: &mut Bench, iterations: usize) -> Result<Value> {
    let plain = b.tmp.join("plain.txt").display().to_string();
    let secret = b.tmp.join("secrets").join("secret.txt").display().to_string();
    let tcp = b.tcp.to_string();
    let targets = [plain.as_str(), secret.as_str(), tcp.as_str(), "/bin/true"];
    // The bench's monitor config (every loopback port in the intent), in enforce mode, with
    // the backend named: a backend the kernel refuses fails the start instead of measuring
    // the other one.
    let base =
        std::fs::read_to_string(&b.config)?.replace("mode = \"monitor\"", "mode = \"enforce\"");
    let mut configs = Vec::new();
    for (name, backend) in PHASES {
        let config = backend.map(|backend| {
            let p = b.tmp.join(format!("enforcer-{name}.toml"));
            std::fs::write(&p, format!("file_backend = \"{backend}\"\n{base}")).map(|_| p)
        });
        configs.push(config.transpose()?);
    }
    // us[phase][round][loop]
    let mut us = vec![Vec::new(); PHASES.len()];
    // p50s[phase][round]: per-call medians of the plain and the secret open.
    let mut p50s: Vec<Vec<[f64; 2]>> = vec![Vec::new(); PHASES.len()];
    // stats[phase][round]: program_costs.
    let mut stats: Vec<Vec<Value>> = vec![Vec::new(); PHASES.len()];
    for round in 0..iterations {
        for k in 0..PHASES.len() {
            let p = (round + k) % PHASES.len();
            let (name, backend) = PHASES[p];
            if let Some(config) = &configs[p] {
                b.start_daemon_with(config)?;
                let st = b.status_json()?;
                if st["file_backend"].as_str() != backend {
                    bail!("bench: asked for file_backend {backend:?}, status says {st}");
                }
            }
            let mut row = Vec::new();
            let mut p50 = [0.0f64; 2];
            for (i, (what, kind, n, granted)) in LOOPS.iter().enumerate() {
                let grant = *granted && backend.is_some();
                let w = b.bound_worker(what, kind, targets[i], *n, grant, None)?;
                row.push(w.ns as f64 / w.ops.max(1) as f64 / 1e3);
                if i < 2 {
                    p50[i] = w.p50()? as f64 / 1e3;
                }
            }
            println!(
                "bench: round {}/{iterations} {name}: per-call medians plain {:.1}us secret {:.1}us",
                round + 1,
                p50[0],
                p50[1]
            );
            p50s[p].push(p50);
            println!(
                "bench: round {}/{iterations} {name}: {}",
                round + 1,
                row.iter().map(|u| format!("{u:.1}us")).collect::<Vec<_>>().join(" ")
            );
            us[p].push(row);
            // The programs' own time per open, in loops of their own: bpf_stats adds two
            // clock reads to every program run, so it is off during the timed loops.
            if backend.is_some() {
                let costs = program_costs(b, &targets)?;
                println!("bench: round {}/{iterations} {name}: bpf_stats {costs}", round + 1);
                stats[p].push(costs);
            }
            b.stop_daemon()?;
        }
    }
    let mut median_us = serde_json::Map::new();
    let mut median_ratio = serde_json::Map::new();
    let mut secret_cost = serde_json::Map::new();
    let mut spread = serde_json::Map::new();
    let mut secret_cost_mean = serde_json::Map::new();
    let mut open_p50_us = serde_json::Map::new();
    let mut program_ns = serde_json::Map::new();
    for (p, (name, _)) in PHASES.iter().enumerate() {
        let col = |i: usize| us[p].iter().map(|r| r[i]).collect::<Vec<f64>>();
        median_us.insert(
            name.to_string(),
            json!((0..LOOPS.len()).map(|i| median(&col(i))).collect::<Vec<_>>()),
        );
        // Ratios per round (adjacent phases), then their median.
        let ratio = |i: usize| {
            median(&(0..iterations).map(|r| us[p][r][i] / us[0][r][i]).collect::<Vec<_>>())
        };
        median_ratio
            .insert(name.to_string(), json!((0..LOOPS.len()).map(ratio).collect::<Vec<_>>()));
        let means: Vec<f64> = (0..iterations).map(|r| us[p][r][1] / us[p][r][0]).collect();
        secret_cost_mean.insert(name.to_string(), json!(median(&means)));
        let costs: Vec<f64> = p50s[p].iter().map(|m| m[1] / m[0]).collect();
        secret_cost.insert(name.to_string(), json!(median(&costs)));
        open_p50_us.insert(
            name.to_string(),
            json!([
                median(&p50s[p].iter().map(|m| m[0]).collect::<Vec<_>>()),
                median(&p50s[p].iter().map(|m| m[1]).collect::<Vec<_>>())
            ]),
        );
        spread.insert(
            name.to_string(),
            json!([
                costs.iter().copied().fold(f64::INFINITY, f64::min),
                costs.iter().copied().fold(0.0, f64::max)
            ]),
        );
        if !stats[p].is_empty() {
            let med = |i: usize, k: &str| {
                median(
                    &stats[p].iter().map(|s| s[i][k].as_f64().unwrap_or(0.0)).collect::<Vec<_>>(),
                )
            };
            program_ns.insert(
                name.to_string(),
                json!(
                    (0..2)
                        .map(|i| json!({
                            "lsm_ns_per_run": med(i, "lsm_ns_per_run"),
                            "bpf_ns_per_op": med(i, "bpf_ns_per_op"),
                        }))
                        .collect::<Vec<_>>()
                ),
            );
        }
    }
    let lsm = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    Ok(json!({
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "lsm": lsm.trim(),
        "iterations": iterations,
        "median_us": median_us,
        "median_ratio": median_ratio,
        "secret_cost": secret_cost,
        "secret_cost_spread": spread,
        "secret_cost_mean": secret_cost_mean,
        "open_p50_us": open_p50_us,
        "program_ns": program_ns,
    }))
}

/// Opens per bpf_stats loop.
const STATS_OPENS: u64 = 2_000;

/// With bpf_stats on, a plain and a secret open loop by granted workers: per loop, the
/// BPF-LSM program's own ns per run and every daemon program's ns per open (run_time_ns
/// and run_cnt from the daemon's program fds).
fn program_costs(b: &Bench, targets: &[&str]) -> Result<Value> {
    let pid = b.daemon.as_ref().map(|d| d.id()).context("bench: no daemon")?;
    let set = |on: &str| std::fs::write("/proc/sys/kernel/bpf_stats_enabled", on);
    set("1").context("bench: cannot enable kernel.bpf_stats_enabled")?;
    let mut out = Vec::new();
    let r = (|| -> Result<()> {
        for (what, target) in [("plain", targets[0]), ("secret", targets[1])] {
            let before = program_stats(pid);
            let w = b.bound_worker(what, "open", target, STATS_OPENS, true, None)?;
            let after = program_stats(pid);
            let (mut lsm, mut all_ns) = ((0u64, 0u64), 0u64);
            for (id, (ty, ns, cnt)) in &after {
                let (b_ns, b_cnt) = before.get(id).map_or((0, 0), |(_, n, c)| (*n, *c));
                all_ns += ns - b_ns;
                if *ty == BPF_PROG_TYPE_LSM {
                    lsm = (lsm.0 + ns - b_ns, lsm.1 + cnt - b_cnt);
                }
            }
            out.push(json!({
                "loop": what,
                "lsm_ns_per_run": lsm.0 as f64 / lsm.1.max(1) as f64,
                "lsm_runs_per_op": lsm.1 as f64 / w.ops.max(1) as f64,
                "bpf_ns_per_op": all_ns as f64 / w.ops.max(1) as f64,
            }));
        }
        Ok(())
    })();
    let _ = set("0");
    r.map(|_| json!(out))
}

const BPF_PROG_TYPE_LSM: u32 = 29;

/// prog_id -> (prog_type, run_time_ns, run_cnt) of every program `pid` holds an fd of.
fn program_stats(pid: u32) -> std::collections::BTreeMap<u64, (u32, u64, u64)> {
    let mut m = std::collections::BTreeMap::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return m };
    for fd in fds.flatten() {
        let Ok(text) = std::fs::read_to_string(fd.path()) else { continue };
        let field = |k: &str| {
            text.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(ty), Some(id), Some(ns), Some(cnt)) =
            (field("prog_type:"), field("prog_id:"), field("run_time_ns:"), field("run_cnt:"))
        {
            m.insert(id, (ty as u32, ns, cnt));
        }
    }
    m
}
