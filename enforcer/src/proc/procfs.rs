//! Reading one process from /proc. Every field can vanish mid-read (the process exits);
//! missing pieces become empty rather than errors.
use super::Process;
use crate::cgroup::CgroupResolver;

pub fn pids() -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else { return Vec::new() };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

fn ppid(pid: u32) -> Option<u32> {
    status_field(pid, "PPid:")?.split_whitespace().next()?.parse().ok()
}

fn status_field(pid: u32, key: &str) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
}

/// At most this many bytes of argv are kept, as the kernel's exec record does.
pub const ARGV_MAX: usize = 2048;

/// The process, and whether its argv was cut off at `ARGV_MAX` bytes (the caller redacts the
/// command line and marks the cut).
pub fn read(pid: u32, cgroups: &mut CgroupResolver) -> Option<(Process, bool)> {
    // One read of status for all three fields. Only thread-group leaders are processes.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |key: &str| {
        status.lines().find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
    };
    let tgid: u32 = field("Tgid:")?;
    if tgid != pid {
        return None;
    }
    let ppid = field("PPid:").unwrap_or(0);
    let uid = field("Uid:").unwrap_or(0);
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.to_string_lossy().trim_end_matches(" (deleted)").to_string())
        .unwrap_or_default();
    let (cmdline, truncated) =
        std::fs::read(format!("/proc/{pid}/cmdline")).map(|b| split_argv(&b)).unwrap_or_default();
    let cgroup_id = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("0::").map(str::to_string)))
        .and_then(|path| cgroups.id_of(&path))
        .unwrap_or(0);
    Some((
        Process {
            pid,
            ppid,
            uid,
            exe,
            cmdline,
            cgroup_id,
            start_ns: 0,
            grants: Vec::new(),
            job: None,
            env_credentials: Vec::new(),
            env: Default::default(),
            exec_seq: 0,
            exited_at: None,
        },
        truncated,
    ))
}

/// NUL-separated argv, at most `ARGV_MAX` bytes of it; true when cut off.
pub fn split_argv(b: &[u8]) -> (Vec<String>, bool) {
    let truncated = b.len() > ARGV_MAX;
    let b = &b[..b.len().min(ARGV_MAX)];
    let argv = b
        .split(|c| *c == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    (argv, truncated)
}

/// The cgroup v2 path a process is in right now (the `0::` line of /proc/<pid>/cgroup).
pub fn current_cgroup(pid: u32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("0::").map(|p| p.trim().to_string()))
}

/// Process start time in ns since boot, from /proc/<pid>/stat (field 22, clock ticks).
/// The comm field may hold spaces and parentheses: fields are counted after the last ')'.
pub fn start_ns(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ')' come fields 3.. ; starttime is field 22.
    let ticks: u64 = rest.split_whitespace().nth(22 - 3)?.parse().ok()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(ticks * (1_000_000_000 / hz))
}

/// `root` and its descendants that started at or after `since` (wall clock), from /proc.
pub fn subtree_since(root: u32, since: chrono::DateTime<chrono::Utc>) -> Vec<u32> {
    let btime: i64 = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse().ok()))
        })
        .unwrap_or(0);
    let mut children: std::collections::HashMap<u32, Vec<u32>> = std::collections::HashMap::new();
    for pid in pids() {
        if let Some(pp) = ppid(pid) {
            children.entry(pp).or_default().push(pid);
        }
    }
    let mut out = vec![root];
    let mut stack = children.get(&root).cloned().unwrap_or_default();
    while let Some(p) = stack.pop() {
        if out.len() > 100_000 {
            break;
        }
        let started = start_ns(p).map(|ns| btime * 1_000_000_000 + ns as i64).unwrap_or(i64::MAX);
        if started >= since.timestamp_nanos_opt().unwrap_or(0) {
            out.push(p);
        }
        stack.extend(children.get(&p).cloned().unwrap_or_default());
    }
    out
}
