//! Unix-socket use by processes holding secrets (the `ipc_connect`/`ipc_sendto` tracepoint
//! programs): an alert in every mode, never a verdict. Taint does not follow data into a
//! process outside the subtree; this names where it may have gone.
use std::time::{Duration, Instant};

use crate::decide::{Action, Decision, Reason, Verdict};
use crate::event::{Ancestor, IpcRef};
use crate::records::IpcUse;

/// How long the peer search over /proc may take per alert (it runs after the fact).
const PEER_SEARCH: Duration = Duration::from_millis(200);
/// `__SO_ACCEPTCON` in /proc/net/unix's Flags: a listening socket.
const LISTENING: u32 = 0x10000;

/// The event's decision, socket object and message.
pub fn explain(
    i: &IpcUse,
    mode: crate::policy::Mode,
    secrets: &[String],
) -> (Decision, IpcRef, String) {
    let held =
        if secrets.is_empty() { format!("secret bits {:#x}", i.taint) } else { secrets.join(", ") };
    let peer = peer_of(i.tgid, &i.path);
    let peer_text = match &peer {
        Some(p) => format!("served by pid {} ({})", p.pid, p.exe),
        None => "its server was not found in /proc (gone, or in another network namespace)".into(),
    };
    let name = if i.path.is_empty() {
        "an unreadable Unix socket address".to_string()
    } else {
        i.path.clone()
    };
    let decision_path = vec![
        format!("subject holds secrets: {held} (own, grant subtree or agent tree taint)"),
        format!("{}() to AF_UNIX {name}: {peer_text}", i.op),
        "taint does not follow data into a process outside the subtree: alert only".into(),
        format!("mode {mode}: alerted, the call proceeded"),
    ];
    let d = Decision {
        verdict: Verdict::OutOfIntent,
        action: Action::Alerted,
        decision_path,
        grant: None,
        expired_for_ms: None,
        reason: Reason::Taint(secrets.first().cloned().unwrap_or_default()),
    };
    let message = format!(
        "a process holding {held} used the Unix socket {name} ({}): the data may leave its subtree unjudged",
        i.op
    );
    (d, IpcRef { op: i.op.into(), path: i.path.clone(), peer }, message)
}

/// The process holding the (listening, else any) socket named `path` in `pid`'s network
/// namespace: inode from /proc/<pid>/net/unix, then the fd that names it.
fn peer_of(pid: u32, path: &str) -> Option<Ancestor> {
    if path.is_empty() {
        return None;
    }
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/unix"))
        .or_else(|_| std::fs::read_to_string("/proc/net/unix"))
        .ok()?;
    let mut inodes: Vec<(bool, String)> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Num RefCount Protocol Flags Type St Inode Path
            (f.len() >= 8 && f[7] == path).then(|| {
                let flags = u32::from_str_radix(f[3], 16).unwrap_or(0);
                (flags & LISTENING != 0, f[6].to_string())
            })
        })
        .collect();
    inodes.sort_by_key(|(listening, _)| !*listening);
    let want: Vec<String> = inodes.iter().map(|(_, ino)| format!("socket:[{ino}]")).collect();
    if want.is_empty() {
        return None;
    }
    let end = Instant::now() + PEER_SEARCH;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        if Instant::now() > end {
            return None;
        }
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if p == pid {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && want.iter().any(|w| target.as_os_str() == w.as_str())
            {
                let exe = std::fs::read_link(e.path().join("exe"))
                    .map(|x| x.display().to_string())
                    .unwrap_or_default();
                return Some(Ancestor { pid: p, exe });
            }
        }
    }
    None
}
