//! The delivery loop of one sink: read the outbox from the sink's cursor, filter (severity,
//! verdicts) and rate-limit, render, send, and move the cursor once the sink acknowledged.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::Item;
use super::limit::{Limiter, Suppressed};
use super::metrics::Stats;
use super::ocsf;
use super::transport::Transport;
use crate::event::{self, Event, ProcessRef};
use crate::policy::{Severity, SinkConfig, SinkFormat};
use crate::store::{self, OutboxReader, Position};
use crate::sync::LockOrRecover;

const POLL: Duration = Duration::from_millis(100);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// What `<state_dir>/sinks/<name>.cursor` holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CursorFile {
    #[serde(flatten)]
    pos: Position,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    suppressed: Option<Suppressed>,
}

pub(super) struct Delivery {
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
    /// The delivery of sink `s`, resuming from its saved cursor (a new sink starts at the end
    /// of the outbox, and its cursor is written at once so a daemon killed before the first
    /// delivery resumes from there instead of from the end of the outbox at the next start).
    pub(super) fn start(
        s: &SinkConfig,
        state_dir: &Path,
        host: &str,
        transport: Transport,
    ) -> Result<Delivery> {
        let saved: Option<CursorFile> =
            std::fs::read_to_string(store::cursor_path(state_dir, &s.name))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok());
        let fresh = saved.is_none();
        let reader = OutboxReader::new(state_dir, saved.as_ref().map(|c| c.pos.clone()));
        let stats = Arc::new(Stats::new(&s.name, s.kind.type_name(), reader.pos.clone()));
        let mut d = Delivery {
            cfg: s.clone(),
            state_dir: state_dir.to_path_buf(),
            host: host.to_string(),
            transport,
            committed: reader.pos.clone(),
            reader,
            pending: vec![],
            limiter: Limiter::new(s.rate_limit_per_second, saved.and_then(|c| c.suppressed)),
            stats,
            last_mode: String::new(),
        };
        if fresh {
            let pos = d.committed.clone();
            d.save(pos).with_context(|| format!("sink {}: write its cursor", s.name))?;
        }
        Ok(d)
    }

    pub(super) fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

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
            socket: None,
            ipc: None,
            decision_path: vec![],
            secrets: vec![],
            credentials: vec![],
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
        *self.stats.committed.lock_or_recover() = pos.clone();
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
        // About 1 MB of lines per batch: each line is held as text and parsed at once, so the
        // batch, not the backlog, is what a sink costs in memory.
        let lines = self.reader.read(&self.cfg.name, self.transport.max_batch(), 1 << 20)?;
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

pub(super) async fn run(mut d: Delivery, mut stop: watch::Receiver<bool>) {
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
