//! Alert delivery: every configured `[[sink]]` reads the durable outbox (`events.jsonl` and its
//! backups, see `store`) from its own persisted cursor and delivers in order, at least once.
//!
//! Why a cursor per sink over the event store rather than an in-memory queue: an event is durable
//! once the engine flushed it, so a daemon killed at any point resends from the last cursor
//! written after an acknowledgement; a sink that is down only falls behind, it never makes the
//! engine wait or drop. Receivers de-duplicate by the event `id`.
// Until the daemon calls `spawn`, most of this is only reached from tests.
#![allow(dead_code)]

mod file;
mod hec;
mod http;
pub mod ocsf;
mod stdout;
mod syslog;
#[cfg(test)]
mod tests;
mod tls;
mod webhook;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::event::{self, Event, ProcessRef};
use crate::policy::{Config, Severity, SinkConfig, SinkFormat, SinkKind};
use crate::store::{self, OutboxReader, Position};

// The daemon polls this and turns each notice into an agent event.
#[allow(unused_imports)]
pub use store::take_notices;

const POLL: Duration = Duration::from_millis(100);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// One event on its way to a sink, rendered in the sink's format.
pub struct Item {
    pub event: Event,
    pub payload: String,
}

enum Transport {
    File(file::FileSink),
    Stdout,
    Syslog(syslog::SyslogSink),
    Webhook(webhook::WebhookSink),
    Hec(hec::HecSink),
}

impl Transport {
    fn new(s: &SinkConfig) -> Result<Transport> {
        let name = s.name.as_str();
        Ok(match &s.kind {
            SinkKind::File(f) => Transport::File(file::FileSink::new(f)),
            SinkKind::Stdout => Transport::Stdout,
            SinkKind::Syslog(c) => Transport::Syslog(syslog::SyslogSink::new(name, c)?),
            SinkKind::Webhook(c) => Transport::Webhook(webhook::WebhookSink::new(name, c)?),
            SinkKind::SplunkHec(c) => Transport::Hec(hec::HecSink::new(name, c)?),
        })
    }

    async fn send(&mut self, batch: &[Item]) -> Result<()> {
        match self {
            Transport::File(f) => f.send(batch),
            Transport::Stdout => stdout::send(batch),
            Transport::Syslog(s) => s.send(batch).await,
            Transport::Webhook(w) => w.send(batch).await,
            Transport::Hec(h) => h.send(batch).await,
        }
    }

    /// How long a sent batch must go without a connection failure before it counts as
    /// delivered: zero for transports with a real acknowledgement.
    fn grace(&self) -> Duration {
        match self {
            Transport::Syslog(_) => syslog::GRACE,
            _ => Duration::ZERO,
        }
    }

    async fn alive(&mut self) -> bool {
        match self {
            Transport::Syslog(s) => s.alive().await,
            _ => true,
        }
    }

    fn reset(&mut self) {
        match self {
            Transport::File(f) => f.reset(),
            Transport::Syslog(s) => s.reset(),
            _ => {}
        }
    }

    fn max_batch(&self) -> usize {
        match self {
            Transport::File(_) | Transport::Stdout => 4096,
            Transport::Syslog(_) => 1000,
            Transport::Webhook(_) | Transport::Hec(_) => 500,
        }
    }
}

/// Events held back by the rate limit and not yet reported in a summary. Kept in the cursor
/// file so a restart still reports them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Suppressed {
    count: u64,
    first_id: String,
    first_time: String,
    last_time: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CursorFile {
    #[serde(flatten)]
    pos: Position,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    suppressed: Option<Suppressed>,
}

/// At most `per_second` events per one-second window; the rest counted for a summary.
struct Limiter {
    per_second: u32,
    window: Instant,
    count: u32,
    pending: Option<Suppressed>,
}

impl Limiter {
    fn admit(&mut self, e: &Event, now: Instant) -> bool {
        if self.per_second == 0 {
            return true;
        }
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.count = 0;
        }
        if self.count < self.per_second {
            self.count += 1;
            return true;
        }
        let s = self.pending.get_or_insert_with(|| Suppressed {
            first_id: e.id.clone(),
            first_time: e.time.clone(),
            ..Default::default()
        });
        s.count += 1;
        s.last_time = e.time.clone();
        false
    }

    /// The pending summary once its window is over (so one summary covers a whole burst).
    fn due(&mut self, now: Instant) -> Option<Suppressed> {
        if self.pending.is_some() && now.duration_since(self.window) >= Duration::from_secs(1) {
            return self.pending.take();
        }
        None
    }
}

/// Per-sink counters for `metrics_text`.
struct Stats {
    name: String,
    kind: &'static str,
    delivered: AtomicU64,
    failures: AtomicU64,
    suppressed: AtomicU64,
    filtered: AtomicU64,
    up: AtomicBool,
    last_success: AtomicU64,
    committed: Mutex<Position>,
}

struct Delivery {
    cfg: SinkConfig,
    state_dir: PathBuf,
    host: String,
    transport: Transport,
    reader: OutboxReader,
    /// Last position written to the cursor file.
    committed: Position,
    /// Sent but not yet counted as delivered (grace-period transports), oldest first.
    pending: Vec<(Position, Instant)>,
    limiter: Limiter,
    stats: Arc<Stats>,
    last_mode: String,
}

impl Delivery {
    /// Filters: minimum severity for every event; the verdict list only for uses (file_open,
    /// connect), so alerts about the agent itself (lost events, a full outbox) still reach a
    /// sink that asked only for violations. An unknown severity is never hidden by a threshold.
    fn passes(&self, e: &Event) -> bool {
        let sev = Severity::parse(&e.severity).unwrap_or(Severity::Critical);
        if sev < self.cfg.min_severity {
            return false;
        }
        let is_use = matches!(e.kind.as_str(), "file_open" | "connect");
        !(is_use && !self.cfg.verdicts.is_empty() && !self.cfg.verdicts.contains(&e.verdict))
    }

    fn render(&self, e: Event, line: Option<String>) -> Item {
        let payload = match (self.cfg.format, line) {
            (SinkFormat::Json, Some(l)) => l,
            (SinkFormat::Json, None) => serde_json::to_string(&e).unwrap_or_default(),
            (SinkFormat::Ocsf, _) => ocsf::to_ocsf(&e).to_string(),
        };
        Item { event: e, payload }
    }

    /// The event that reports a rate-limited stretch; its id is derived from the first
    /// suppressed event so a resent summary de-duplicates like any other event.
    fn summary(&self, s: &Suppressed) -> Item {
        let e = Event {
            schema: event::SCHEMA.into(),
            id: format!("{}-suppressed-{}", self.cfg.name, s.first_id),
            time: event::rfc3339(chrono::Utc::now()),
            host: self.host.clone(),
            kind: "alerts_suppressed".into(),
            verdict: "allowed".into(),
            action: "allowed".into(),
            mode: if self.last_mode.is_empty() { "monitor".into() } else { self.last_mode.clone() },
            process: own_process(),
            file: None,
            destination: None,
            grant: None,
            decision_path: vec![],
            secrets: vec![],
            mitre: vec![],
            severity: "medium".into(),
            message: Some(format!(
                "sink {}: rate limit of {}/s suppressed {} events between {} and {} (first id {}); they remain in the outbox and in `enforcer events`",
                self.cfg.name,
                self.cfg.rate_limit_per_second,
                s.count,
                s.first_time,
                s.last_time,
                s.first_id
            )),
        };
        self.render(e, None)
    }

    fn save(&mut self, pos: Position) -> Result<()> {
        let file = CursorFile { pos: pos.clone(), suppressed: self.limiter.pending.clone() };
        store::save_cursor(&self.state_dir, &self.cfg.name, &file)?;
        *self.stats.committed.lock().unwrap() = pos.clone();
        self.committed = pos;
        Ok(())
    }

    /// Commits sent batches whose grace period passed with the connection still up. Err when
    /// the connection dropped: everything after the committed cursor must be sent again.
    async fn commit_due(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let grace = self.transport.grace();
        let now = Instant::now();
        let due = self.pending.iter().take_while(|(_, t)| now.duration_since(*t) >= grace).count();
        if due == 0 {
            return Ok(());
        }
        if !grace.is_zero() && !self.transport.alive().await {
            anyhow::bail!("connection lost before delivery was confirmed");
        }
        let pos = self.pending[due - 1].0.clone();
        self.pending.drain(..due);
        self.save(pos)
    }

    fn rewind(&mut self) {
        self.pending.clear();
        self.reader.rewind(self.committed.clone());
    }

    fn failed(&self, e: &anyhow::Error) {
        let first = self.stats.up.swap(false, Ordering::Relaxed);
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        if first {
            // Once per outage: a down SIEM must not flood the daemon's own log.
            tracing::warn!("sink {}: delivery failed, retrying with backoff: {e:#}", self.cfg.name);
        }
    }

    /// Reads and renders the next batch. None when nothing new is in the outbox.
    fn next_batch(&mut self) -> Result<Option<(Vec<Item>, Position)>> {
        let lines = self.reader.read(&self.cfg.name, self.transport.max_batch(), 4 << 20)?;
        let Some(last) = lines.last() else { return Ok(None) };
        let end = last.after.clone();
        let now = Instant::now();
        let mut items = Vec::with_capacity(lines.len());
        for line in lines {
            let e: Event = match serde_json::from_str(&line.text) {
                Ok(e) => e,
                Err(err) => {
                    store::notice(format!(
                        "sink {}: skipping an unreadable outbox line: {err}",
                        self.cfg.name
                    ));
                    continue;
                }
            };
            self.last_mode.clone_from(&e.mode);
            if !self.passes(&e) {
                self.stats.filtered.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if let Some(s) = self.limiter.due(now) {
                items.push(self.summary(&s));
            }
            if self.limiter.admit(&e, now) {
                items.push(self.render(e, Some(line.text)));
            } else {
                self.stats.suppressed.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(Some((items, end)))
    }
}

/// The daemon itself, as the subject of events it makes about its own delivery.
fn own_process() -> ProcessRef {
    ProcessRef {
        pid: std::process::id(),
        ppid: std::os::unix::process::parent_id(),
        uid: nix::unistd::geteuid().as_raw(),
        exe: std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default(),
        cmdline: std::env::args().collect::<Vec<_>>().join(" "),
        cgroup: std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("0::").map(str::to_owned)))
            .unwrap_or_default(),
        ..Default::default()
    }
}

/// Sleeps `d` unless asked to stop; true when stopping.
async fn pause(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

async fn run(mut d: Delivery, mut stop: watch::Receiver<bool>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let stopping = *stop.borrow();
        if let Err(e) = d.commit_due().await {
            d.failed(&e);
            d.rewind();
            if pause(backoff, &mut stop).await && stopping {
                return;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            continue;
        }
        let batch = match d.next_batch() {
            Ok(b) => b,
            Err(e) => {
                d.failed(&e.context("read the outbox"));
                if pause(backoff, &mut stop).await && stopping {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let (items, end) = match batch {
            Some(b) => b,
            None => match d.limiter.due(Instant::now()) {
                // Idle after a burst: report the suppressed count now, not at the next event.
                Some(s) => (vec![d.summary(&s)], d.reader.pos.clone()),
                None => {
                    if stopping {
                        if !d.pending.is_empty() {
                            tokio::time::sleep(d.transport.grace()).await;
                            let _ = d.commit_due().await;
                        }
                        return;
                    }
                    pause(POLL, &mut stop).await;
                    continue;
                }
            },
        };
        if !items.is_empty() {
            let res = match tokio::time::timeout(SEND_TIMEOUT, d.transport.send(&items)).await {
                Ok(r) => r,
                Err(_) => Err(anyhow::anyhow!("send timed out after {SEND_TIMEOUT:?}")),
            };
            if let Err(e) = res {
                d.failed(&e);
                d.transport.reset();
                // Resend from the committed cursor: this batch, and for grace transports also
                // whatever was written on the connection that just failed.
                d.rewind();
                if pause(backoff, &mut stop).await && stopping {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            d.stats.delivered.fetch_add(items.len() as u64, Ordering::Relaxed);
            d.stats.last_success.store(chrono::Utc::now().timestamp() as u64, Ordering::Relaxed);
            d.stats.up.store(true, Ordering::Relaxed);
        }
        backoff = BACKOFF_MIN;
        d.pending.push((end, Instant::now()));
        if let Err(e) = d.commit_due().await {
            d.failed(&e);
            d.rewind();
        }
    }
}

/// The running sinks. Dropping it leaves the tasks running; call `shutdown`.
pub struct Sinks {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    stats: Vec<Arc<Stats>>,
    reopen: Vec<Arc<AtomicBool>>,
    state_dir: PathBuf,
}

/// Starts one delivery task per `[[sink]]` on the current tokio runtime. Call after the event
/// store is open (a new sink starts at the end of the outbox) and before the first event that
/// must reach the sinks. Sinks are fixed for the daemon's life: a reload does not change them.
pub fn spawn(config: &Config, state_dir: &Path, host: &str) -> Result<Sinks> {
    let o = config.outbox;
    store::set_limits(state_dir, o.rotate_bytes, o.max_backups, o.max_bytes);
    let dir = state_dir.join(store::CURSOR_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let (stop, stop_rx) = watch::channel(false);
    let mut sinks = Sinks {
        stop,
        tasks: vec![],
        stats: vec![],
        reopen: vec![],
        state_dir: state_dir.to_path_buf(),
    };
    for s in &config.sinks {
        let transport = Transport::new(s).with_context(|| format!("sink {}", s.name))?;
        if let Transport::File(f) = &transport {
            sinks.reopen.push(f.reopen.clone());
        }
        let saved: Option<CursorFile> =
            std::fs::read_to_string(store::cursor_path(state_dir, &s.name))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok());
        let fresh = saved.is_none();
        let reader = OutboxReader::new(state_dir, saved.as_ref().map(|c| c.pos.clone()));
        let stats = Arc::new(Stats {
            name: s.name.clone(),
            kind: s.kind.type_name(),
            delivered: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            filtered: AtomicU64::new(0),
            up: AtomicBool::new(true),
            last_success: AtomicU64::new(0),
            committed: Mutex::new(reader.pos.clone()),
        });
        let mut d = Delivery {
            cfg: s.clone(),
            state_dir: state_dir.to_path_buf(),
            host: host.to_string(),
            transport,
            committed: reader.pos.clone(),
            reader,
            pending: vec![],
            limiter: Limiter {
                per_second: s.rate_limit_per_second,
                window: Instant::now(),
                count: 0,
                pending: saved.and_then(|c| c.suppressed),
            },
            stats: stats.clone(),
            last_mode: String::new(),
        };
        if fresh {
            // Written now, so a daemon killed before the first delivery resumes from here
            // instead of from whatever the end of the outbox is at the next start.
            let pos = d.committed.clone();
            d.save(pos).with_context(|| format!("sink {}: write its cursor", s.name))?;
        }
        sinks.stats.push(stats);
        sinks.tasks.push(tokio::spawn(run(d, stop_rx.clone())));
    }
    Ok(sinks)
}

impl Sinks {
    /// Reopens file sinks' files at their next write (SIGHUP, after logrotate moved them).
    pub fn reopen_files(&self) {
        for r in &self.reopen {
            r.store(true, Ordering::Relaxed);
        }
    }

    /// Stops every delivery task after what it can deliver now (at most a few seconds);
    /// whatever is left stays in the outbox for the next start.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        for t in self.tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                abort.abort();
            }
        }
    }

    /// Prometheus text exposition of the sinks' state.
    pub fn metrics_text(&self) -> String {
        self.metrics().metrics_text()
    }

    /// A cheap, cloneable handle for the API server to render metrics from (Sinks itself is
    /// consumed by `shutdown`).
    pub fn metrics(&self) -> SinkMetrics {
        SinkMetrics { stats: self.stats.clone(), state_dir: self.state_dir.clone() }
    }
}

#[derive(Clone)]
pub struct SinkMetrics {
    stats: Vec<Arc<Stats>>,
    state_dir: PathBuf,
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
                |s, g| backlog(&s.committed.lock().unwrap(), g),
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
