//! Per-sink rate limit: at most N events a second reach the sink, the rest are counted and
//! reported in one summary event per burst.
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::event::Event;

/// Events held back by the rate limit and not yet reported in a summary. Kept in the cursor
/// file so a restart still reports them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct Suppressed {
    pub(super) count: u64,
    pub(super) first_id: String,
    pub(super) first_time: String,
    pub(super) last_time: String,
}

/// At most `per_second` events per one-second window; the rest counted for a summary.
pub(super) struct Limiter {
    per_second: u32,
    window: Instant,
    count: u32,
    pub(super) pending: Option<Suppressed>,
}

impl Limiter {
    /// A limiter starting now, still holding the summary a previous run had not reported.
    pub(super) fn new(per_second: u32, pending: Option<Suppressed>) -> Limiter {
        Limiter { per_second, window: Instant::now(), count: 0, pending }
    }

    pub(super) fn admit(&mut self, e: &Event, now: Instant) -> bool {
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
    pub(super) fn due(&mut self, now: Instant) -> Option<Suppressed> {
        if self.pending.is_some() && now.duration_since(self.window) >= Duration::from_secs(1) {
            return self.pending.take();
        }
        None
    }
}
