//! Routine allowed connects are sampled so a flood cannot displace alerts: per process, the
//! first `PER_SECOND` allowed connects of each second are written as events, the rest are
//! counted and summarised once a second in one `connects_summarised` event per process.
//! Alerts (any verdict but `allowed`) are never sampled. The kernel's judgement is still
//! replayed on every record (decision mismatches are counted for all of them).
use std::collections::HashMap;

use super::Engine;
use crate::decide::Decision;

/// Allowed connect events written per process per second.
pub const PER_SECOND: u32 = 100;
/// Processes tracked per second; past it, further processes' routine connects are folded
/// into one host-wide count.
const MAX_PROCESSES: usize = 65_536;

#[derive(Default)]
pub struct Routine {
    /// tgid -> (written this second, folded this second).
    this_second: HashMap<u32, (u32, u64)>,
    /// Folded for processes past MAX_PROCESSES.
    overflow: u64,
}

impl Routine {
    /// Whether an allowed connect of `tgid` is written (else it is counted).
    pub fn admit(&mut self, tgid: u32) -> bool {
        if !self.this_second.contains_key(&tgid) && self.this_second.len() >= MAX_PROCESSES {
            self.overflow += 1;
            return false;
        }
        let e = self.this_second.entry(tgid).or_default();
        if e.0 < PER_SECOND {
            e.0 += 1;
            true
        } else {
            e.1 += 1;
            false
        }
    }
}

impl Engine {
    /// Once a second: one summary event per process whose allowed connects were folded.
    pub fn summarise_routine(&mut self) {
        let seen = std::mem::take(&mut self.routine.this_second);
        let overflow = std::mem::take(&mut self.routine.overflow);
        for (tgid, (written, folded)) in seen {
            if folded == 0 {
                continue;
            }
            let (process, _) = self.process_ref(tgid, None);
            let d = Decision::informational();
            let mut e = self.event("connects_summarised", &d, process);
            e.message = Some(format!(
                "{folded} further allowed connects by pid {tgid} in the last second not written \
                 one by one ({written} were; routine events are sampled, alerts never)"
            ));
            self.emit(e);
        }
        if overflow > 0 {
            let msg = format!(
                "{overflow} allowed connects by more than {MAX_PROCESSES} processes in the last \
                 second not written one by one (routine events are sampled, alerts never)"
            );
            self.agent_event("connects_summarised", "info", msg);
        }
    }
}
