//! Per-process kernel state a daemon must rebuild when it starts without pins (fresh boot,
//! or after `enforcer detach`), and the sweep that keeps PROC_GRANTS free of leftovers.
//!
//! Without pins PROC_GRANTS starts empty: processes already running are neither agents nor
//! tainted, and the exec hook marks agents only at their next exec. Before the daemon
//! reports ready, `restore_processes` walks /proc and writes back what can be known:
//! - the AGENT flag of every running process an `[[agent]]` selector matches (executable
//!   inode from `/proc/PID/exe`, real uid, exact cgroup: what the exec hook checks), and of
//!   its descendants (they would have inherited it at fork). The walk runs twice, so a child
//!   forked while its parent was being marked (and so not inheriting) is caught too;
//! - the taint of every live process whose secret open this boot was let through and
//!   recorded in the event store, and of its descendants forked after that open.
//!
//! Grants are written back and re-bound by the registry's restore (subject and descendants
//! started since the grant was issued). What cannot be known: secret reads made while no
//! daemon ran (the fanotify backend fails open, unrecorded), reads whose events were rotated
//! out of the store, and `exe_sha256`-only selectors (not checked in the kernel either).
use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use enforcer_common::proc_flags;
use serde::Deserialize;

use crate::act::{self, Written};
use crate::kernel::grants::{ActMaps, boot_now_ns};
use crate::policy::Config;

/// How often PROC_GRANTS is swept for entries that outlived their process.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// What the start-up walk wrote back (all zero when the pins were adopted).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Restored {
    /// Processes marked AGENT (selected ones and their descendants).
    pub agents_marked: u64,
    /// Processes whose taint was written back from recorded opens.
    pub taint_restored: u64,
}

/// Counters of the PROC_GRANTS sweep, for `status`.
#[derive(Debug, Default)]
pub struct SweepStats {
    pub proc_entries: AtomicU64,
    pub stale_entries_removed: AtomicU64,
}

/// One process as /proc shows it.
struct Proc {
    pid: u32,
    ppid: u32,
    start_ns: u64,
    uid: Option<u32>,
    exe: Option<(u64, u64)>,
    cgroup: Option<u64>,
}

fn scan(cgroup_mount: &Path) -> Vec<Proc> {
    let Ok(rd) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Some(start_ns) = crate::proc::start_ns(pid) else { continue };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse::<u32>().ok()))
        };
        let Some(ppid) = field("PPid:") else { continue };
        // Kernel threads have no executable and never exec: the exec hook never sees them.
        let exe = std::fs::metadata(format!("/proc/{pid}/exe")).ok().map(|m| (m.dev(), m.ino()));
        if exe.is_none() {
            continue;
        }
        let cgroup = crate::proc::current_cgroup(pid).and_then(|c| {
            std::fs::metadata(cgroup_mount.join(c.trim_start_matches('/'))).ok().map(|m| m.ino())
        });
        out.push(Proc { pid, ppid, start_ns, uid: field("Uid:"), exe, cgroup });
    }
    out
}

fn children_of(procs: &[Proc]) -> HashMap<u32, Vec<usize>> {
    let mut children: HashMap<u32, Vec<usize>> = HashMap::new();
    for (i, p) in procs.iter().enumerate() {
        children.entry(p.ppid).or_default().push(i);
    }
    children
}

/// Writes back the AGENT flags and the taint the daemon can know (see the module doc).
/// Runs before the daemon reports ready, after the policy (selectors) is in the kernel, so
/// a process that execs from here on is marked by the exec hook.
pub fn restore_processes(
    cfg: &Config,
    cgroup_mount: &Path,
    secret_bits: &BTreeMap<String, u32>,
    maps: &ActMaps,
) -> Restored {
    let mut out = Restored::default();
    let exes: HashSet<(u64, u64)> = cfg
        .agents
        .iter()
        .filter_map(|a| a.exe.as_ref())
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    let uids: HashSet<u32> = cfg.agents.iter().filter_map(|a| a.uid).collect();
    let cgroups: HashSet<u64> = cfg
        .agents
        .iter()
        .filter_map(|a| a.cgroup.as_ref())
        .filter_map(|c| std::fs::metadata(cgroup_mount.join(c.trim_start_matches('/'))).ok())
        .map(|m| m.ino())
        .collect();
    let selected = |p: &Proc| {
        p.exe.is_some_and(|e| exes.contains(&e))
            || p.uid.is_some_and(|u| uids.contains(&u))
            || p.cgroup.is_some_and(|c| cgroups.contains(&c))
    };
    if !(exes.is_empty() && uids.is_empty() && cgroups.is_empty()) {
        let mut marked: HashSet<(u32, u64)> = HashSet::new();
        for _pass in 0..2 {
            let procs = scan(cgroup_mount);
            let children = children_of(&procs);
            let mut stack: Vec<usize> = (0..procs.len()).filter(|&i| selected(&procs[i])).collect();
            let mut seen = HashSet::new();
            while let Some(i) = stack.pop() {
                let p = &procs[i];
                if !seen.insert(p.pid) {
                    continue;
                }
                stack.extend(children.get(&p.pid).into_iter().flatten().copied());
                if marked.contains(&(p.pid, p.start_ns)) {
                    continue;
                }
                match act::write_state(maps, p.pid, p.start_ns, 0, proc_flags::AGENT) {
                    Ok(Written::Gone) => {}
                    Ok(_) => {
                        marked.insert((p.pid, p.start_ns));
                    }
                    Err(e) => tracing::warn!("mark agent pid {}: {e:#}", p.pid),
                }
            }
        }
        out.agents_marked = marked.len() as u64;
    }
    out.taint_restored = restore_taint(&cfg.state_dir, cgroup_mount, secret_bits, maps);
    out
}

#[derive(Deserialize)]
struct StoredOpen {
    kind: String,
    time: String,
    action: String,
    process: StoredPid,
    file: Option<StoredFile>,
}

#[derive(Deserialize)]
struct StoredPid {
    pid: u32,
}

#[derive(Deserialize)]
struct StoredFile {
    secret: String,
}

/// Event times and /proc start times agree within this (event written just after the taint).
const TIME_SLACK_NS: i64 = 50_000_000;

/// Taint from the secret opens recorded this boot that were let through: the opener, if
/// still the same process (it started before the open), and its descendants forked after
/// the open (which inherited it), through descendants that themselves inherited it.
fn restore_taint(
    state_dir: &Path,
    cgroup_mount: &Path,
    secret_bits: &BTreeMap<String, u32>,
    maps: &ActMaps,
) -> u64 {
    // Wall clock of boot, in ns: /proc start times are boot-clock offsets from it.
    let wall_now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
    let boot_wall = wall_now - boot_now_ns() as i64;
    // pid -> (open time, bits), earliest first per pid.
    let mut opens: HashMap<u32, Vec<(i64, u64)>> = HashMap::new();
    for file in crate::store::generations(state_dir) {
        let modified = std::fs::metadata(&file)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as i64);
        if modified < boot_wall {
            continue; // written before this boot: none of its processes is alive
        }
        let Ok(text) = std::fs::read_to_string(&file) else { continue };
        for line in text.lines().filter(|l| l.contains("\"file_open\"")) {
            let Ok(e) = serde_json::from_str::<StoredOpen>(line) else { continue };
            if e.kind != "file_open" || !(e.action == "allowed" || e.action == "alerted") {
                continue;
            }
            let Some(secret) = e.file.map(|f| f.secret) else { continue };
            let Some(bit) = secret_bits.get(&secret) else { continue };
            let Ok(t) = chrono::DateTime::parse_from_rfc3339(&e.time) else { continue };
            let t = t.timestamp_nanos_opt().unwrap_or(0);
            if t < boot_wall {
                continue;
            }
            opens.entry(e.process.pid).or_default().push((t, 1u64 << bit));
        }
    }
    if opens.is_empty() {
        return 0;
    }
    let procs = scan(cgroup_mount);
    let children = children_of(&procs);
    let index: HashMap<u32, usize> = procs.iter().enumerate().map(|(i, p)| (p.pid, i)).collect();
    let start_wall = |p: &Proc| boot_wall + p.start_ns as i64;
    // (process index) -> bits to write.
    let mut taint: HashMap<usize, u64> = HashMap::new();
    for (pid, list) in &opens {
        let Some(&root) = index.get(pid) else { continue };
        for &(t, bits) in list {
            // A process that started after the open reuses the pid: not the reader.
            if start_wall(&procs[root]) > t + TIME_SLACK_NS {
                continue;
            }
            let mut stack = vec![root];
            while let Some(i) = stack.pop() {
                *taint.entry(i).or_default() |= bits;
                for &c in children.get(&procs[i].pid).into_iter().flatten() {
                    if start_wall(&procs[c]) >= t - TIME_SLACK_NS {
                        stack.push(c);
                    }
                }
            }
        }
    }
    let mut restored = 0;
    for (i, bits) in taint {
        let p = &procs[i];
        match act::write_state(maps, p.pid, p.start_ns, bits, 0) {
            Ok(Written::Gone) => {}
            Ok(_) => restored += 1,
            Err(e) => tracing::warn!("restore taint of pid {}: {e:#}", p.pid),
        }
    }
    restored
}

/// Sweeps PROC_GRANTS now and then every `SWEEP_INTERVAL`, off the event loop (a full map
/// is 65,536 entries, each checked against /proc).
pub fn spawn_sweeper(maps: ActMaps) -> (Arc<SweepStats>, tokio::task::JoinHandle<()>) {
    let stats = Arc::new(SweepStats::default());
    let out = stats.clone();
    let maps = Arc::new(maps);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let m = maps.clone();
            let Ok(swept) = tokio::task::spawn_blocking(move || act::sweep(&m)).await else {
                continue;
            };
            if swept.removed > 0 {
                tracing::info!(
                    removed = swept.removed,
                    "removed PROC_GRANTS entries that outlived their process"
                );
            }
            stats.proc_entries.store(swept.entries, Ordering::Relaxed);
            stats.stale_entries_removed.fetch_add(swept.removed, Ordering::Relaxed);
        }
    });
    (out, task)
}
