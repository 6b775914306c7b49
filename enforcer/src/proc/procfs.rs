//! Reading one process from /proc. Every field can vanish mid-read (the process exits);
//! missing pieces become empty rather than errors.
use std::io::Read;
use std::path::Path;

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

/// What `/proc` says of a process without touching its memory: `status` (ppid, uid), the
/// `exe` link and the cgroup. None of these reads takes the target's `mmap_lock` or faults in
/// its pages, so a hostile process cannot make them wait (its command line and environment
/// are another matter: `argv_at`, `env::read_path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Basics {
    pub ppid: u32,
    pub uid: u32,
    pub exe: String,
    /// cgroup v2 path (`0::` line), when readable.
    pub cgroup: Option<String>,
}

/// `Basics` of `pid` under `root` (`/proc`; fixtures in tests); None when it is gone or not
/// a thread-group leader (only those are processes).
pub fn basics_at(root: &Path, pid: u32) -> Option<Basics> {
    let dir = root.join(pid.to_string());
    // One read of status for all three fields.
    let status = std::fs::read_to_string(dir.join("status")).ok()?;
    let field = |key: &str| {
        status.lines().find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
    };
    let tgid: u32 = field("Tgid:")?;
    if tgid != pid {
        return None;
    }
    let exe = std::fs::read_link(dir.join("exe"))
        .map(|p| p.to_string_lossy().trim_end_matches(" (deleted)").to_string())
        .unwrap_or_default();
    let cgroup = std::fs::read_to_string(dir.join("cgroup"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("0::").map(|p| p.trim().to_string())));
    Some(Basics { ppid: field("PPid:").unwrap_or(0), uid: field("Uid:").unwrap_or(0), exe, cgroup })
}

/// argv of `pid` (at most `ARGV_MAX` bytes; true when cut off). Reading
/// `/proc/PID/cmdline` copies the target's own pages under its `mmap_lock`, which the target
/// can hold for as long as it likes (a thread stuck in `mmap()` of a FUSE file while another
/// waits for a FUSE read the server never answers): call it only off the main loop.
pub fn argv_at(root: &Path, pid: u32) -> std::io::Result<(Vec<String>, bool)> {
    let mut buf = Vec::new();
    std::fs::File::open(root.join(pid.to_string()).join("cmdline"))?
        .take(ARGV_MAX as u64 + 1)
        .read_to_end(&mut buf)?;
    Ok(split_argv(&buf))
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
