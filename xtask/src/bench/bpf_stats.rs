//! Kernel-side cost of the daemon's programs during a measured loop, from the kernel's own
//! accounting (`kernel.bpf_stats_enabled`: run_time_ns and run_cnt per program, read from
//! the daemon's `/proc/<pid>/fdinfo`), and the daemon's CPU time over the same window. On a
//! shared host the wall-clock ratios move by several percent between rounds; these do not.
use std::collections::BTreeMap;
use std::path::Path;

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Per program id: (name, run_time_ns, run_cnt); and the daemon's CPU ticks (utime + stime).
pub(super) struct Snapshot {
    progs: BTreeMap<u32, (String, u64, u64)>,
    ticks: u64,
}

/// Turns the kernel's per-program accounting on; the previous value is restored on drop.
pub(super) struct Enabled(Option<String>);

impl Enabled {
    pub(super) fn on() -> Self {
        let old = std::fs::read_to_string(SYSCTL).ok();
        if std::fs::write(SYSCTL, "1").is_err() {
            return Enabled(None);
        }
        Enabled(old)
    }
}

impl Drop for Enabled {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = std::fs::write(SYSCTL, old.trim());
        }
    }
}

fn field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_string())
}

/// The programs the daemon `pid` holds open and its CPU time, now.
pub(super) fn snapshot(pid: u32) -> Snapshot {
    let mut progs = BTreeMap::new();
    let dir = Path::new("/proc").join(pid.to_string()).join("fdinfo");
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else { continue };
        let (Some(id), Some(t), Some(c)) = (
            field(&text, "prog_id:").and_then(|v| v.parse().ok()),
            field(&text, "run_time_ns:").and_then(|v| v.parse().ok()),
            field(&text, "run_cnt:").and_then(|v| v.parse().ok()),
        ) else {
            continue;
        };
        progs.insert(id, (prog_name(id), t, c));
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis: utime is the 12th, stime the 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = after.split_whitespace().map(|w| w.parse().unwrap_or(0)).collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Snapshot { progs, ticks }
}

/// A program's name as bpftool shows it (empty when bpftool is missing).
fn prog_name(id: u32) -> String {
    std::process::Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .ok()
        .and_then(|o| {
            let s = String::from_utf8_lossy(&o.stdout).to_string();
            s.split_whitespace().skip_while(|w| *w != "name").nth(1).map(str::to_string)
        })
        .unwrap_or_default()
}

/// One line per program that ran between `a` and `b` (runs, ns per run), and the daemon's
/// CPU per `ops` operations of the loop.
pub(super) fn report(a: &Snapshot, b: &Snapshot, ops: u64) -> String {
    let mut out = Vec::new();
    for (id, (name, t1, c1)) in &b.progs {
        let Some((_, t0, c0)) = a.progs.get(id) else { continue };
        let runs = c1.saturating_sub(*c0);
        if runs == 0 {
            continue;
        }
        out.push(format!("{name} {runs} runs {} ns/run", t1.saturating_sub(*t0) / runs));
    }
    let ticks = b.ticks.saturating_sub(a.ticks);
    // 100 ticks a second (USER_HZ).
    let us = ticks as f64 * 10_000.0 / ops.max(1) as f64;
    out.push(format!("daemon CPU {us:.2} us per op"));
    out.join("; ")
}
