//! `--only kernel`: what the kernel programs cost (issue 11), in interleaved rounds:
//! - A: no daemon;
//! - B: the daemon (monitor mode) with the IPC alert on the hooks this kernel loads first
//!   (`cgroup/connect_unix` + `cgroup/sendmsg_unix` on 6.7+);
//! - T: the same daemon with the IPC alert forced onto its last-resort syscall tracepoints
//!   (`ENFORCER_IPC_HOOKS=tracepoint`): while one is attached every system call on the host
//!   takes the kernel's tracing path, so T - B is that path's cost on each loop.
//!
//! Each loop runs twice per phase: timed as a whole (mean per operation, as the main table)
//! and call by call (the median call: robust to a loaded host, where preemptions land in a
//! minority of calls; it includes two clock reads per call in every phase).
//!
//! Then, once per round with the default daemon, the same loops with `kernel.bpf_stats_enabled`
//! on: each program attached to the bench cgroup (`bpftool cgroup show`) reports its runs and
//! run time, so the egress, sock_create and connect programs' costs are
//! separated (ns per run, runs per operation). bpf_stats adds two clock reads per run, so
//! those loops are not used for the ratios.
use super::harness::Bench;
use super::report::{Row, median};
use super::{SECRET_OPENS, Spec, VIOLATION_CONNECTS};
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::process::Command;

/// The loops measured, by spec name (harness.rs).
const LOOPS: [&str; 4] = [
    "connect() loopback TCP",
    "open()+close() non-secret",
    "socket()+close() UDP",
    "send() 64 B, connected UDP (cost of egress)",
];

/// Program name (as bpftool truncates it) -> (runs, run time ns).
type Stats = BTreeMap<String, (u64, u64)>;

impl Bench {
    pub(super) fn kernel_cost_rows(&mut self, iterations: usize) -> Result<Vec<Row>> {
        let specs: Vec<usize> = LOOPS
            .iter()
            .map(|n| self.specs.iter().position(|s| s.name == *n).context("bench: spec missing"))
            .collect::<Result<_>>()?;
        println!("bench: kernel: warm-up");
        for &i in &specs {
            self.worker(i, Some((self.specs[i].n / 10).max(1)))?;
        }
        // [A, B, T] ns per op, per loop, per round.
        let mut per_op = vec![[Vec::new(), Vec::new(), Vec::new()]; specs.len()];
        // [A, B, T] median call (ns), per loop, per round.
        let mut p50 = vec![[Vec::new(), Vec::new(), Vec::new()]; specs.len()];
        // Per loop: program -> (runs, ns), summed over rounds.
        let mut stats: Vec<Stats> = vec![Stats::new(); specs.len()];
        let mut ops = vec![0u64; specs.len()];
        let mut ipc_programs = Vec::new();
        for round in 0..iterations {
            let mut phases = [0usize, 1, 2];
            phases.rotate_left(round % 3);
            for phase in phases {
                self.daemon_env.clear();
                if phase == 2 {
                    self.daemon_env.push(("ENFORCER_IPC_HOOKS".into(), "tracepoint".into()));
                }
                if phase > 0 {
                    self.start_daemon(false)?;
                }
                let r =
                    self.kernel_phase(&specs, phase, [&mut per_op, &mut p50], &mut stats, &mut ops);
                if phase > 0 {
                    if let Ok(st) = self.status_json() {
                        ipc_programs.push((phase, st["backends"]["ipc"].to_string()));
                    }
                    self.stop_daemon()?;
                }
                r?;
                println!(
                    "bench: kernel round {}/{iterations} {}: {}",
                    round + 1,
                    ["without", "with (default hooks)", "with (IPC on tracepoints)"][phase],
                    per_op
                        .iter()
                        .zip(&p50)
                        .map(|(v, m)| format!(
                            "{:.2}us (p50 {:.2}us)",
                            v[phase][round] / 1e3,
                            m[phase][round] / 1e3
                        ))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
            }
        }
        self.daemon_env.clear();
        let hooks = |p: usize| {
            ipc_programs.iter().find(|(ph, _)| *ph == p).map_or("?".into(), |(_, s)| s.clone())
        };
        let mut rows = Vec::new();
        // Blocks of rows (figures, per-call, the "with" column, judged against the target,
        // label): the per-call medians first, since a loaded host's preemptions land in a
        // minority of calls, so these move less between rounds than the whole-loop means.
        let blocks = [
            (&p50, true, 1, true, "median call, default hooks"),
            (&per_op, false, 1, true, "loop mean, default hooks"),
            (&per_op, false, 2, false, "IPC alert forced onto the syscall tracepoints"),
        ];
        for (data, per_call, with, judged, label) in blocks {
            for (k, &i) in specs.iter().enumerate() {
                let s = &self.specs[i];
                let n = if per_call { per_call_n(s) } else { s.n };
                let limit = if judged { s.limit } else { None };
                rows.push(ratio_row(s, n, &data[k][0], &data[k][with], limit, label));
            }
        }
        rows.push(Row {
            name: "IPC alert hooks in the two daemons (status backends.ipc)".into(),
            without: "-".into(),
            with: format!("default: {}; forced: {}", hooks(1), hooks(2)),
            ratio: "-".into(),
            target: "-".into(),
            pass: None,
        });
        for (k, &i) in specs.iter().enumerate() {
            let s = &self.specs[i];
            let per: Vec<String> = stats[k]
                .iter()
                .filter(|(_, (runs, _))| *runs as f64 / ops[k].max(1) as f64 >= 0.01)
                .map(|(name, (runs, ns))| {
                    format!(
                        "{name} {:.0} ns/run x {:.2} runs/op",
                        *ns as f64 / *runs as f64,
                        *runs as f64 / ops[k].max(1) as f64
                    )
                })
                .collect();
            let total: u64 = stats[k].values().map(|(_, ns)| ns).sum();
            rows.push(Row {
                name: format!(
                    "kernel programs' own time (bpf_stats) during {} (N={})",
                    s.name, s.n
                ),
                without: "-".into(),
                with: if per.is_empty() { "no program ran".into() } else { per.join("; ") },
                ratio: format!("{:.0} ns/op", total as f64 / ops[k].max(1) as f64),
                target: "-".into(),
                pass: None,
            });
        }
        Ok(rows)
    }

    /// One phase's loops; with the default daemon (phase 1), then again with bpf_stats on.
    fn kernel_phase(
        &mut self,
        specs: &[usize],
        phase: usize,
        [per_op, p50]: [&mut [[Vec<f64>; 3]]; 2],
        stats: &mut [Stats],
        ops: &mut [u64],
    ) -> Result<()> {
        for (k, &i) in specs.iter().enumerate() {
            per_op[k][phase].push(self.worker(i, None)?.0 as f64 / self.specs[i].n as f64);
            let s = &self.specs[i];
            let n = per_call_n(s);
            let kind = format!("{:?}", s.kind).to_lowercase();
            let w = self.bound_worker(s.name, &kind, &s.target, n, false, None)?;
            p50[k][phase].push(w.p50()? as f64);
        }
        if phase != 1 {
            return Ok(());
        }
        let _on = StatsOn::enable()?;
        for (k, &i) in specs.iter().enumerate() {
            let before = cgroup_stats(&self.cgroup)?;
            let (_, n) = self.worker(i, None)?;
            let after = cgroup_stats(&self.cgroup)?;
            ops[k] += n;
            for (name, (runs, ns)) in after {
                let (r0, n0) = before.get(&name).copied().unwrap_or((0, 0));
                let e = stats[k].entry(name).or_default();
                e.0 += runs.saturating_sub(r0);
                e.1 += ns.saturating_sub(n0);
            }
        }
        Ok(())
    }
}

/// How many calls the harness times one by one for `s`.
fn per_call_n(s: &Spec) -> u64 {
    if s.kind == super::Kind::Connect { VIOLATION_CONNECTS } else { SECRET_OPENS }
}

fn ratio_row(s: &Spec, n: u64, a: &[f64], b: &[f64], limit: Option<f64>, what: &str) -> Row {
    let (a, b) = (median(a), median(b));
    let ratio = b / a;
    Row {
        name: format!("{} (N={n}), {what}", s.name),
        without: format!("{:.2} us", a / 1e3),
        with: format!("{:.2} us", b / 1e3),
        ratio: format!("{ratio:.3}"),
        target: limit.map_or("-".into(), |l| format!("<= {l:.2}")),
        pass: limit.map(|l| ratio <= l),
    }
}

/// `kernel.bpf_stats_enabled` on while this lives; the previous value after.
struct StatsOn(String);

const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl StatsOn {
    fn enable() -> Result<StatsOn> {
        let old = std::fs::read_to_string(STATS).with_context(|| format!("bench: read {STATS}"))?;
        std::fs::write(STATS, "1").with_context(|| format!("bench: write {STATS}"))?;
        Ok(StatsOn(old.trim().to_string()))
    }
}

impl Drop for StatsOn {
    fn drop(&mut self) {
        let _ = std::fs::write(STATS, &self.0);
    }
}

fn bpftool(args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("bench: kernel: cannot run bpftool (needed for the bpf_stats rows)")?;
    if !out.status.success() {
        bail!("bench: bpftool {args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("bench: bpftool {args:?}: no JSON"))
}

/// Runs and run time of every program attached to `cgroup`, by name (attach type when two
/// programs share a name).
fn cgroup_stats(cgroup: &std::path::Path) -> Result<Stats> {
    let path = cgroup.display().to_string();
    let attached = bpftool(&["cgroup", "show", &path])?;
    let mut out = Stats::new();
    for p in attached.as_array().into_iter().flatten() {
        let (Some(id), Some(name)) = (p["id"].as_u64(), p["name"].as_str()) else { continue };
        let prog = bpftool(&["prog", "show", "id", &id.to_string()])?;
        let runs = prog["run_cnt"].as_u64().unwrap_or(0);
        let ns = prog["run_time_ns"].as_u64().unwrap_or(0);
        let e = out.entry(name.to_string()).or_default();
        e.0 += runs;
        e.1 += ns;
    }
    Ok(out)
}
