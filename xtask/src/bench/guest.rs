//! `cargo xtask bench --kernel 6.1|6.12|all`: the secret-open cost of each file backend,
//! measured inside Debian's guest kernels (QEMU/TCG, booted by the kernel matrix's code) where
//! BPF-LSM loads. The host boots each guest on one vCPU whose clock counts the instructions
//! it executed (`qemu::Clock::Instructions`), with this xtask binary as the guest's program
//! (`bench-guest-inner`); inside, interleaved rounds (order rotating per round) run with no
//! daemon, with a daemon on the BPF-LSM backend and with one on the fanotify backend: one
//! process holding a grant opens a plain file and the watched secret in alternating blocks
//! (`guest_pairs.rs`: the opener's CPU time and wall time per block, per-call wall medians,
//! and the programs' own time from bpf_stats), then blocks of loopback TCP connects and of
//! fork+execs rotating with a reference computation (`guest_loops.rs`: the worker's CPU per
//! op over the reference, ratios to the no-daemon phase and bpf-lsm / fanotify, and every
//! daemon program's time per op from bpf_stats). The headline is the secret/plain ratio of
//! the opener's CPU time over adjacent block pairs: an instruction count, which a loaded host
//! does not move; the wall ratio is reported next to it. Emulation makes absolute times
//! meaningless: only ratios within one guest are reported. Prints a table per kernel and
//! writes target/bench-guest.md.

use super::guest_loops;
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

/// Rounds per guest unless `--iterations` says otherwise. Each costs two daemon starts (the
/// verifier: 16-17 s of guest time on 6.1, a minute or more of the host's on one emulated
/// vCPU). One: on the instruction clock the rounds agree within 1-2% (3-round runs), and
/// `bench --kernel all` stays within about 6 minutes.
pub const DEFAULT_ITERATIONS: usize = 1;
/// Target: a granted secret open judged by BPF-LSM costs at most this times a plain open.
const LSM_TARGET: f64 = 1.5;
/// The guest program's time limit (seconds).
const GUEST_LIMIT_S: u64 = 1800;
/// The marker of the guest's result line in its output.
const RESULT: &str = "bench-guest-result: ";

/// The phases of one round: no daemon, then the two file backends.
const PHASES: [(&str, Option<&str>); 3] =
    [("no daemon", None), ("bpf-lsm", Some("bpf-lsm")), ("fanotify", Some("fanotify"))];

/// The open pairs (`guest_pairs.rs`): blocks of each file per round, and opens per block per
/// phase (a fanotify secret open waits for the daemon: milliseconds under emulation).
const PAIR_BLOCKS: u64 = 15;
const PAIR_OPENS: [u64; 3] = [200, 200, 20];

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
        "# enforcer bench inside guest kernels\n\nEach kernel boots under QEMU with TCG (emulation, no KVM) on one vCPU \
         whose clock counts the instructions it executed (`-icount shift=0,sleep=off`: 1 ns per guest instruction; \
         an idle guest skips to its next timer): every CPU time below is a count of the measured process's own \
         instructions, which the host's load does not move, and says nothing of cache misses or of what an \
         instruction costs on hardware. Wall times also count idle skips (a wait for 9p I/O ends at the next \
         timer), so only CPU-time ratios are judged. Rounds interleave no daemon, a daemon on the BPF-LSM backend \
         and one on the fanotify backend (order rotating). The secret-open cost is a granted process's open of the \
         watched secret / its open of a plain file under the same daemon, in alternating blocks: the opener's CPU \
         time per adjacent block pair (the headline), and the wall clock (per-call medians). bpf_stats rows are the \
         kernel's own accounting of the programs' run time, in blocks of their own (it adds two clock reads per \
         run). Connect and fork+exec (`guest_loops.rs`) are timed by the worker's own CPU time (a fork+exec: the \
         parent's plus the reaped child's), in blocks rotating with a fixed userspace computation, the reference, \
         by which each block is divided. \"Unchanged\" is judged by the BPF-LSM backend's CPU/reference over the \
         fanotify backend's: within 1.05x; beside it the kernel's own accounting of what the BPF-LSM backend's \
         programs (file_open, inode_free) cost per op, counted over every process during the blocks (the \
         daemon's /proc reads included), as a share of the op.\n",
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
        let load_start = loadavg();
        // The instruction clock: every time the guest measures is a count of its own
        // instructions, which a loaded host does not move (see `qemu::Clock`).
        let g = qemu::run_with(
            &qemu_bin,
            &k,
            std::slice::from_ref(&prog),
            &[],
            &out_dir,
            qemu::Clock::Instructions,
        )?;
        let load_end = loadavg();
        let r = &g.runs[0];
        let result = r
            .log
            .lines()
            .find_map(|l| l.strip_prefix(RESULT))
            .and_then(|j| serde_json::from_str::<Value>(j).ok());
        let Some(mut result) = result.filter(|_| r.code == Some(0)) else {
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
        result["load_start"] = json!(load_start);
        result["load_end"] = json!(load_end);
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
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let mut t = format!(
        "## Kernel {release} ({package} {version})\n\n{} rounds of {PAIR_BLOCKS} block pairs; active LSMs `{}`; guest total {total_s:.0} s; \
         host load average {} at the start, {} at the end.\n\n\
         | measurement | no daemon | bpf-lsm | fanotify |\n|---|---|---|---|\n",
        r["iterations"],
        r["lsm"].as_str().unwrap_or("?"),
        r["load_start"].as_str().unwrap_or("?"),
        r["load_end"].as_str().unwrap_or("?"),
    );
    let row3 = |t: &mut String, name: &str, cell: &dyn Fn(&str) -> String| {
        *t += &format!("| {name} |");
        for (phase, _) in &PHASES {
            *t += &format!(" {} |", cell(phase));
        }
        *t += "\n";
    };
    let cpu = |phase: &str| f(&r["cpu_cost"][phase]);
    let lsm_cpu = cpu("bpf-lsm");
    let verdict = |x: f64| if x <= LSM_TARGET { "PASS" } else { "MISS" };
    t += &format!(
        "| **secret open / plain open, the opener's CPU time** (median of the block pairs of all rounds) | {:.2}x | **{lsm_cpu:.2}x** (target <= {LSM_TARGET}x: {}) | {:.2}x (excludes the wait for the daemon) |\n",
        cpu("no daemon"),
        verdict(lsm_cpu),
        cpu("fanotify"),
    );
    let wall = |phase: &str| f(&r["secret_cost"][phase]);
    let lsm_wall = wall("bpf-lsm");
    t += &format!(
        "| **secret open / plain open, wall clock** (per-call medians; median of rounds) | {:.2}x | **{lsm_wall:.2}x** ({}) | {:.2}x |\n",
        wall("no daemon"),
        verdict(lsm_wall),
        wall("fanotify"),
    );
    let spread = |key: &str, phase: &str| {
        let s = &r[key][phase];
        format!("{:.2}-{:.2}x", f(&s[0]), f(&s[1]))
    };
    row3(&mut t, "CPU-time ratio, range of the rounds' medians", &|p| spread("cpu_cost_spread", p));
    row3(&mut t, "wall ratio (per-call medians), range over rounds", &|p| {
        spread("secret_cost_spread", p)
    });
    row3(&mut t, "wall ratio of block means (daemon and host noise included)", &|p| {
        format!("{:.2}x", f(&r["secret_cost_mean"][p]))
    });
    for (i, what) in ["plain file", "watched secret"].iter().enumerate() {
        row3(&mut t, &format!("open()+close() {what}, opener CPU per call"), &|p| {
            format!("{:.1} us", f(&r["cpu_us"][p][i]))
        });
        row3(&mut t, &format!("open()+close() {what}, per-call wall median"), &|p| {
            format!("{:.1} us", f(&r["open_p50_us"][p][i]))
        });
    }
    // bpf_stats: the programs' own time (under emulation: only comparable within a guest).
    for (i, what) in ["plain", "secret"].iter().enumerate() {
        row3(
            &mut t,
            &format!(
                "bpf_stats, {what} open: BPF-LSM programs ns per open; all daemon programs ns per open"
            ),
            &|p| match &r["program_ns"][p] {
                Value::Null => "-".into(),
                v => format!("{:.0} ns; {:.0} ns", f(&v[i]["lsm_ns"]), f(&v[i]["all_ns"])),
            },
        );
    }
    row3(
        &mut t,
        "secret / plain from bpf_stats: (plain CPU + secret-path program time - plain-path program time) / plain CPU",
        &|p| match &r["model_cost"][p] {
            Value::Null => "-".into(),
            v => format!("{:.2}x", f(v)),
        },
    );
    for (name, cells) in guest_loops::rows(&r["loops"]) {
        t += &format!("| {name} | {} |\n", cells.join(" | "));
    }
    t
}

/// Guest side: the interleaved rounds; prints one result line of JSON.
pub fn inner(a: &InnerArgs) -> Result<()> {
    let mut b = Bench::new(a.enforcer.clone())?;
    b.time_scale = 10;
    // A daemon still reading the previous loop's records answers a grant request late.
    super::grants::IO_TIMEOUT_SCALE.store(10, std::sync::atomic::Ordering::Relaxed);
    let r = measure(&mut b, a.iterations.max(1));
    b.cleanup();
    let r = r?;
    println!("{RESULT}{r}");
    Ok(())
}

/// The host's 1-minute load average (what the guest's vCPU threads compete with).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

/// min and max of `v` (NaN for none).
fn range(v: &[f64]) -> [f64; 2] {
    if v.is_empty() {
        return [f64::NAN, f64::NAN];
    }
    [v.iter().copied().fold(f64::INFINITY, f64::min), v.iter().copied().fold(0.0, f64::max)]
}

fn med(v: &[f64]) -> f64 {
    if v.is_empty() { f64::NAN } else { median(v) }
}

/// One open-pairs worker's result, per file (0 plain, 1 secret).
struct Pairs {
    wall: [Vec<f64>; 2],
    cpu: [Vec<f64>; 2],
    p50: [f64; 2],
    /// With bpf_stats: per file, per block, (BPF-LSM ns, all programs ns) per open.
    stats: Option<[Vec<(f64, f64)>; 2]>,
}

fn parse_pairs(text: &str) -> Result<Pairs> {
    let j: Value = text
        .lines()
        .find_map(|l| l.strip_prefix("pairs="))
        .and_then(|j| serde_json::from_str(j).ok())
        .with_context(|| format!("bench: open-pairs worker printed no result: {text}"))?;
    let arr = |v: &Value| -> Vec<f64> {
        v.as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default()
    };
    let two = |k: &str| [arr(&j[k][0]), arr(&j[k][1])];
    let stats = (!j["stats"].is_null()).then(|| {
        let per = |i: usize| -> Vec<(f64, f64)> {
            arr(&j["stats"]["lsm_ns"][i]).into_iter().zip(arr(&j["stats"]["all_ns"][i])).collect()
        };
        [per(0), per(1)]
    });
    Ok(Pairs {
        wall: two("wall_ns"),
        cpu: two("cpu_ns"),
        p50: [
            j["call_p50_ns"][0].as_f64().unwrap_or(f64::NAN),
            j["call_p50_ns"][1].as_f64().unwrap_or(f64::NAN),
        ],
        stats,
    })
}

fn measure(b: &mut Bench, iterations: usize) -> Result<Value> {
    let plain = b.tmp.join("plain.txt").display().to_string();
    let secret = b.tmp.join("secrets").join("secret.txt").display().to_string();
    let tcp = b.tcp.to_string();
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
    // loops[phase][round]: the loop-blocks worker's result.
    let mut loops = vec![Vec::new(); PHASES.len()];
    // pairs[phase][round]
    let mut pairs: Vec<Vec<Pairs>> = (0..PHASES.len()).map(|_| Vec::new()).collect();
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
            let daemon = b.daemon.as_ref().map(|d| d.id());
            let mut extra = vec![
                "--pair-with".to_string(),
                secret.clone(),
                "--blocks".into(),
                PAIR_BLOCKS.to_string(),
            ];
            if let Some(pid) = daemon {
                extra.extend(["--bpf-stats-pid".to_string(), pid.to_string()]);
            }
            let w = b.bound_worker_with(
                "open pairs",
                "open-pairs",
                &plain,
                PAIR_OPENS[p],
                daemon.is_some(),
                None,
                &extra,
            )?;
            let pr = parse_pairs(&w.text)?;
            let ratios: Vec<f64> = pr.cpu[1].iter().zip(&pr.cpu[0]).map(|(s, p)| s / p).collect();
            println!(
                "bench: round {}/{iterations} {name}: secret/plain CPU {:.2}x (blocks {:.2}-{:.2}), per-call wall medians plain {:.1}us secret {:.1}us ({:.2}x)",
                round + 1,
                med(&ratios),
                range(&ratios)[0],
                range(&ratios)[1],
                pr.p50[0] / 1e3,
                pr.p50[1] / 1e3,
                pr.p50[1] / pr.p50[0]
            );
            if let Some(st) = &pr.stats {
                println!(
                    "bench: round {}/{iterations} {name}: bpf_stats BPF-LSM ns per open plain {:.0} secret {:.0}; all programs {:.0} / {:.0}",
                    round + 1,
                    med(&st[0].iter().map(|x| x.0).collect::<Vec<_>>()),
                    med(&st[1].iter().map(|x| x.0).collect::<Vec<_>>()),
                    med(&st[0].iter().map(|x| x.1).collect::<Vec<_>>()),
                    med(&st[1].iter().map(|x| x.1).collect::<Vec<_>>()),
                );
            }
            pairs[p].push(pr);
            let lv = guest_loops::run(b, &tcp, daemon)?;
            println!(
                "bench: round {}/{iterations} {name}: {}",
                round + 1,
                guest_loops::summary(&lv)
            );
            loops[p].push(lv);
            b.stop_daemon()?;
        }
    }
    let mut out = serde_json::Map::new();
    let mut put = |key: &str, phase: &str, v: Value| {
        out.entry(key.to_string())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("object")
            .insert(phase.to_string(), v);
    };
    for (p, (name, _)) in PHASES.iter().enumerate() {
        let rounds = &pairs[p];
        // CPU: every adjacent block pair of every round, pooled; and each round's median.
        let pair_ratios = |pr: &Pairs| -> Vec<f64> {
            pr.cpu[1].iter().zip(&pr.cpu[0]).map(|(s, p)| s / p).collect()
        };
        let pooled: Vec<f64> = rounds.iter().flat_map(pair_ratios).collect();
        let per_round: Vec<f64> = rounds.iter().map(|pr| med(&pair_ratios(pr))).collect();
        put("cpu_cost", name, json!(med(&pooled)));
        put("cpu_cost_spread", name, json!(range(&per_round)));
        let all = |f: &dyn Fn(&Pairs) -> &Vec<f64>| -> f64 {
            med(&rounds.iter().flat_map(|pr| f(pr).iter().copied()).collect::<Vec<_>>())
        };
        let (plain_cpu, secret_cpu) = (all(&|pr| &pr.cpu[0]), all(&|pr| &pr.cpu[1]));
        put("cpu_us", name, json!([plain_cpu / 1e3, secret_cpu / 1e3]));
        let wall_means: Vec<f64> = rounds
            .iter()
            .flat_map(|pr| pr.wall[1].iter().zip(&pr.wall[0]).map(|(s, p)| s / p))
            .collect();
        put("secret_cost_mean", name, json!(med(&wall_means)));
        let call_ratios: Vec<f64> = rounds.iter().map(|pr| pr.p50[1] / pr.p50[0]).collect();
        put("secret_cost", name, json!(med(&call_ratios)));
        put("secret_cost_spread", name, json!(range(&call_ratios)));
        put(
            "open_p50_us",
            name,
            json!([
                med(&rounds.iter().map(|pr| pr.p50[0] / 1e3).collect::<Vec<_>>()),
                med(&rounds.iter().map(|pr| pr.p50[1] / 1e3).collect::<Vec<_>>())
            ]),
        );
        let stats: Vec<&[Vec<(f64, f64)>; 2]> =
            rounds.iter().filter_map(|pr| pr.stats.as_ref()).collect();
        if stats.is_empty() {
            put("program_ns", name, Value::Null);
            put("model_cost", name, Value::Null);
            continue;
        }
        let stat = |i: usize, f: &dyn Fn(&(f64, f64)) -> f64| {
            med(&stats.iter().flat_map(|s| s[i].iter().map(f)).collect::<Vec<_>>())
        };
        let (lsm_plain, lsm_secret) = (stat(0, &|x| x.0), stat(1, &|x| x.0));
        put(
            "program_ns",
            name,
            json!([
                {"lsm_ns": lsm_plain, "all_ns": stat(0, &|x| x.1)},
                {"lsm_ns": lsm_secret, "all_ns": stat(1, &|x| x.1)},
            ]),
        );
        put("model_cost", name, json!((plain_cpu + lsm_secret - lsm_plain) / plain_cpu));
    }
    out.insert("loops".into(), guest_loops::figures(&loops));
    let lsm = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    out.insert(
        "kernel".into(),
        json!(std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()),
    );
    out.insert("lsm".into(), json!(lsm.trim()));
    out.insert("iterations".into(), json!(iterations));
    Ok(Value::Object(out))
}
