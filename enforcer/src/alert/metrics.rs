//! Prometheus exposition of the sinks' state: per-sink counters and the outbox backlog.
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::store::{self, Position};
use crate::sync::LockOrRecover;

/// Per-sink counters for `metrics_text`.
pub(super) struct Stats {
    pub(super) name: String,
    pub(super) kind: &'static str,
    pub(super) delivered: AtomicU64,
    pub(super) failures: AtomicU64,
    pub(super) suppressed: AtomicU64,
    pub(super) filtered: AtomicU64,
    pub(super) up: AtomicBool,
    pub(super) last_success: AtomicU64,
    pub(super) committed: Mutex<Position>,
}

impl Stats {
    pub(super) fn new(name: &str, kind: &'static str, committed: Position) -> Stats {
        Stats {
            name: name.to_string(),
            kind,
            delivered: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            filtered: AtomicU64::new(0),
            up: AtomicBool::new(true),
            last_success: AtomicU64::new(0),
            committed: Mutex::new(committed),
        }
    }
}

#[derive(Clone)]
pub struct SinkMetrics {
    pub(super) stats: Vec<Arc<Stats>>,
    pub(super) state_dir: PathBuf,
}

impl SinkMetrics {
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        let gens: Vec<(u64, u64)> = store::generations(&self.state_dir)
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.ino(), m.len())
            })
            .collect();
        let total: u64 = gens.iter().map(|g| g.1).sum();
        let _ = writeln!(
            out,
            "# HELP enforcer_outbox_bytes Bytes held in the alert outbox (events.jsonl and its backups)."
        );
        let _ = writeln!(out, "# TYPE enforcer_outbox_bytes gauge");
        let _ = writeln!(out, "enforcer_outbox_bytes {total}");
        type Metric = (&'static str, &'static str, &'static str, fn(&Stats, &[(u64, u64)]) -> u64);
        let metrics: [Metric; 7] = [
            (
                "enforcer_sink_up",
                "gauge",
                "1 while the sink's last delivery attempt succeeded.",
                |s, _| s.up.load(Ordering::Relaxed) as u64,
            ),
            (
                "enforcer_sink_backlog_bytes",
                "gauge",
                "Outbox bytes not yet delivered to the sink.",
                |s, g| backlog(&s.committed.lock_or_recover(), g),
            ),
            (
                "enforcer_sink_delivered_total",
                "counter",
                "Events delivered to the sink (since start).",
                |s, _| s.delivered.load(Ordering::Relaxed),
            ),
            (
                "enforcer_sink_delivery_failures_total",
                "counter",
                "Failed delivery attempts (each is retried).",
                |s, _| s.failures.load(Ordering::Relaxed),
            ),
            (
                "enforcer_sink_suppressed_total",
                "counter",
                "Events held back by the sink's rate limit (reported in summary events).",
                |s, _| s.suppressed.load(Ordering::Relaxed),
            ),
            (
                "enforcer_sink_filtered_total",
                "counter",
                "Events not sent because of the sink's severity/verdict filter.",
                |s, _| s.filtered.load(Ordering::Relaxed),
            ),
            (
                "enforcer_sink_last_success_timestamp_seconds",
                "gauge",
                "Unix time of the last successful delivery.",
                |s, _| s.last_success.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, get) in metrics {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for s in &self.stats {
                let _ = writeln!(
                    out,
                    "{name}{{sink=\"{}\",type=\"{}\"}} {}",
                    s.name,
                    s.kind,
                    get(s, &gens)
                );
            }
        }
        out
    }
}

/// Bytes after `pos` in the outbox: the rest of its file plus every newer file.
fn backlog(pos: &Position, gens: &[(u64, u64)]) -> u64 {
    match gens.iter().position(|g| g.0 == pos.ino) {
        Some(i) => {
            gens[i].1.saturating_sub(pos.offset) + gens[i + 1..].iter().map(|g| g.1).sum::<u64>()
        }
        None => gens.iter().map(|g| g.1).sum(),
    }
}
