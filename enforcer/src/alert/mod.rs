//! Alert delivery: every configured `[[sink]]` reads the durable outbox (`events.jsonl` and its
//! backups, see `store`) from its own persisted cursor and delivers in order, at least once.
//!
//! Why a cursor per sink over the event store rather than an in-memory queue: an event is durable
//! once the engine flushed it, so a daemon killed at any point resends from the last cursor
//! written after an acknowledgement; a sink that is down only falls behind, it never makes the
//! engine wait or drop. Receivers de-duplicate by the event `id`.
// Until the daemon calls `spawn`, most of this is only reached from tests.
#![allow(dead_code)]

mod delivery;
mod file;
mod hec;
mod http;
mod limit;
mod metrics;
pub mod ocsf;
mod stdout;
mod syslog;
#[cfg(test)]
mod tests;
mod tls;
mod transport;
mod webhook;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::event::Event;
use crate::policy::Config;
use crate::store;
use delivery::Delivery;
pub use metrics::SinkMetrics;
use metrics::Stats;
use transport::Transport;

// The daemon polls this and turns each notice into an agent event.
#[allow(unused_imports)]
pub use store::take_notices;

/// One event on its way to a sink, rendered in the sink's format.
pub struct Item {
    pub event: Event,
    pub payload: String,
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
        let d = Delivery::start(s, state_dir, host, transport)?;
        sinks.stats.push(d.stats());
        sinks.tasks.push(tokio::spawn(delivery::run(d, stop_rx.clone())));
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
