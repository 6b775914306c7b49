//! Per-stage timestamps of one grant request, to find where the slowest requests spend their
//! time. Off unless the daemon runs with `ENFORCER_MINT_TIMING=1`; then every answer to
//! `POST /v1/grants` carries `x-enforcer-timing: stage=ns,...`: the CLOCK_MONOTONIC time at
//! which each stage ended, in order, so a client on the same host can put its own send and
//! receive times (the same clock) around them (`cargo xtask bench --only mint`). Off, a mark
//! costs one branch; on, one vDSO clock read.
use std::sync::OnceLock;

/// The environment variable that turns the stamps on.
pub const ENV: &str = "ENFORCER_MINT_TIMING";
/// The response header that carries them.
pub const HEADER: &str = "x-enforcer-timing";

/// Most stamps of one request (further marks are dropped).
const MAX: usize = 24;

/// Whether stamps are taken (read once).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var(ENV).is_ok_and(|v| v == "1"))
}

/// CLOCK_MONOTONIC in ns (what `std::time::Instant` reads on Linux).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to write; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The stamps of one request.
pub struct Stamps {
    on: bool,
    n: usize,
    marks: [(&'static str, u64); MAX],
}

impl Default for Stamps {
    fn default() -> Self {
        Stamps::new()
    }
}

impl Stamps {
    /// Taking stamps if `enabled()`.
    pub fn new() -> Self {
        Stamps { on: enabled(), n: 0, marks: [("", 0); MAX] }
    }

    /// Never taking stamps (callers that time nothing).
    pub fn off() -> Self {
        Stamps { on: false, n: 0, marks: [("", 0); MAX] }
    }

    pub fn on(&self) -> bool {
        self.on
    }

    /// Stage `name` ended now.
    pub fn mark(&mut self, name: &'static str) {
        if self.on {
            self.mark_at(name, now_ns());
        }
    }

    /// Stage `name` ended at `ns` (a time taken elsewhere, e.g. the socket read).
    pub fn mark_at(&mut self, name: &'static str, ns: u64) {
        if self.on && self.n < MAX {
            self.marks[self.n] = (name, ns);
            self.n += 1;
        }
    }

    /// Appends `other`'s stamps (taken on another thread, e.g. the blocking pool).
    pub fn extend(&mut self, other: &Stamps) {
        for (name, ns) in &other.marks[..other.n] {
            self.mark_at(name, *ns);
        }
    }

    /// `stage=ns,...` for the response header, or None when off.
    pub fn header(&self) -> Option<String> {
        if !self.on {
            return None;
        }
        let mut s = String::with_capacity(self.n * 24);
        for (i, (name, ns)) in self.marks[..self.n].iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(name);
            s.push('=');
            s.push_str(&ns.to_string());
        }
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_render_in_order_and_off_renders_nothing() {
        let mut s = Stamps { on: true, n: 0, marks: [("", 0); MAX] };
        s.mark_at("read", 5);
        s.mark_at("handler", 7);
        assert_eq!(s.header().as_deref(), Some("read=5,handler=7"));
        for _ in 0..2 * MAX {
            s.mark("x");
        }
        assert_eq!(s.header().unwrap().split(',').count(), MAX);
        let mut off = Stamps::off();
        off.mark("read");
        assert_eq!(off.header(), None);
        assert!(now_ns() > 0);
    }
}
