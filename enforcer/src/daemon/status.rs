//! The status document served at GET /v1/status and printed by `enforcer status`.
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde_json::{Value, json};

use super::{
    Setup,
    adopt::{Restored, SweepStats},
    engine::Engine,
};
use crate::file::SecretWatch;
use crate::kernel::Kernel;

pub struct Context<'a> {
    pub setup: &'a Setup,
    pub started: Instant,
    pub kernel: &'a Kernel,
    /// What a start without pins wrote back (agent flags, taint).
    pub rebuilt: &'a Restored,
    pub sweep: &'a SweepStats,
    /// The DNS stub, for its own section.
    pub dns: &'a crate::dns::stub::Stub,
}

impl Context<'_> {
    pub fn render(&self, engine: &Engine, watch: &SecretWatch) -> Value {
        let cfg = &self.setup.config;
        let k = self.kernel.counters();
        let lsm = self.kernel.file_backend == "bpf-lsm";
        let file_open = if lsm {
            "bpf-lsm (lsm/file_open: decided in the kernel by the shared open judge)".to_string()
        } else {
            format!(
                "fanotify (FAN_OPEN_PERM inode marks, decided by the daemon){}",
                match self.kernel.file_backend_note.as_str() {
                    "" => String::new(),
                    n => format!("; {n}"),
                }
            )
        };
        let file_fail_open = if lsm {
            "file_open: fails closed: the pinned lsm/file_open program keeps judging secret opens with no daemon (grants, expiry, taint, deny); records are queued or, when the ring is full, lost (counted); a secret path's new inode is judged by directory and name; fails open for secret paths whose file name is 64 bytes or longer when a new inode appears there, and for inodes the daemon has not found yet at start".to_string()
        } else {
            "file_open: fails open: with no daemon the kernel answers pending and new opens of secrets with allow, unrecorded (connect deny, expiry and taint of earlier reads keep working in the kernel)".to_string()
        };
        let egress = if self.kernel.egress_note.is_empty() {
            "cgroup_skb (egress: data of tainted writers and owners on established sockets; state in socket-local storage)".to_string()
        } else {
            format!(
                "cgroup_skb (egress_owner: data on established sockets judged by the socket's judged creator and the taint it carried, not the writer: this kernel refuses egress: {}; state in socket-local storage)",
                self.kernel.egress_note
            )
        };
        json!({
            "status": "running",
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "host": self.setup.host,
            "mode": engine.mode.to_string(),
            "config": cfg.source,
            "uptime_s": self.started.elapsed().as_secs(),
            "cgroup_root": self.setup.cgroup_root.display().to_string(),
            "file_backend": self.kernel.file_backend,
            "backends": {
                "process_lineage": "raw_tracepoint (task_newtask, sched_process_exec, sched_process_exit)",
                "connect": "cgroup_sock_addr (connect4, connect6, sendmsg4, sendmsg6; recvmsg4, recvmsg6 for DNS replies)",
                "socket_create": "cgroup_sock (sock_create: judged processes create only TCP, UDP, unix and netlink sockets)",
                "egress": egress,
                "file_open": file_open,
                "ipc": self.kernel.ipc.as_ref().map_or("none".to_string(), |h| h.describe()),
            },
            "fail_open": [
                file_fail_open,
                "connect and lineage: links and maps stay pinned when the daemon stops (SIGTERM, SIGINT, SIGKILL, crash): the kernel keeps enforcing connects, expiry, taint of earlier reads, agent flags and fork inheritance, and the next daemon adopts the pins; only `enforcer detach` (package removal) removes them",
            ],
            "programs": self.kernel.attached,
            "programs_missing": self.kernel.missing,
            "live_grants": engine.grants.view.load().live_count(),
            "secrets": {
                "defined": cfg.secrets.len(),
                "paths_watched": watch.stats().paths_watched,
                "paths_missing": watch.stats().paths_missing,
            },
            "processes_tracked": engine.table.len(),
            "events_total": engine.counts.events_total,
            "alerts_total": engine.counts.alerts_total,
            "counts": engine.counts,
            "kernel": {
                "ringbuf_drops": k.ringbuf_drops,
                "records": k.events,
                "state_full": k.state_full,
                "alert_drops": k.alert_drops,
                "adopted_pins": self.kernel.adopted,
                "proc_entries": self.sweep.proc_entries.load(Ordering::Relaxed),
                "stale_entries_removed": self.sweep.stale_entries_removed.load(Ordering::Relaxed),
                "agents_marked_at_start": self.rebuilt.agents_marked,
                "taint_restored_at_start": self.rebuilt.taint_restored,
            },
            "memory": memory(engine),
            "exe_hash": engine.exe_hashes.counts,
            "env_reads": engine.table.env_counts(),
            "env_wait": engine.env_stage.counts,

            "dns": self.dns.status(),
            "fanotify_overflows": watch.overflows,
            "file_decision_us": {
                "count": watch.latencies.count,
                "p50": watch.latencies.percentiles().0,
                "p99": watch.latencies.percentiles().1,
                "max": watch.latencies.max_us,
                "deadline_ms": super::FILE_DECISION_DEADLINE.as_millis() as u64,
                "over_deadline": engine.counts.file_opens_late,
            },
        })
    }
}

/// The daemon's resident and peak memory (VmRSS, VmHWM in KiB) with the sizes of its tables.
fn memory(engine: &Engine) -> Value {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |k: &str| -> Option<u64> {
        status.lines().find_map(|l| l.strip_prefix(k)?.split_whitespace().next()?.parse().ok())
    };
    let mut m = engine.memory();
    m["rss_kb"] = json!(kb("VmRSS:"));
    m["hwm_kb"] = json!(kb("VmHWM:"));
    m
}
