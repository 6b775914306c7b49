//! Per-subject token buckets for the mint API, so one looping caller cannot flood the ledger,
//! the kernel maps or the alert stream. The mint keys them by the kernel-attested uid (a
//! fork per request gets no fresh bucket), never by anything the caller says.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What the daemon uses per subject.
pub const DEFAULT_PER_SECOND: f64 = 50.0;
pub const DEFAULT_BURST: u32 = 100;
/// Memory bound: at most this many buckets are kept.
pub const MAX_KEYS: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Debug)]
pub struct RateLimiter<K = (u32, u32)> {
    per_second: f64,
    burst: f64,
    buckets: HashMap<K, Bucket>,
}

impl<K: std::hash::Hash + Eq + Copy + Ord> Default for RateLimiter<K> {
    fn default() -> Self {
        Self::new(DEFAULT_PER_SECOND, DEFAULT_BURST)
    }
}

impl<K: std::hash::Hash + Eq + Copy + Ord> RateLimiter<K> {
    /// `per_second = f64::INFINITY` disables limiting. Panics on a non-positive (or NaN) rate or
    /// a zero burst: those are programming errors, not input.
    pub fn new(per_second: f64, burst: u32) -> Self {
        assert!(per_second > 0.0 && burst >= 1, "invalid rate limit");
        RateLimiter { per_second, burst: burst as f64, buckets: HashMap::new() }
    }

    /// Takes one token for `key`. Err carries how long until a token is available.
    pub fn check(&mut self, key: K, now: Instant) -> Result<(), Duration> {
        if self.per_second.is_infinite() {
            return Ok(()); // unlimited: keep no state at all
        }
        if !self.buckets.contains_key(&key) && self.buckets.len() >= MAX_KEYS {
            self.evict(now);
        }
        let (rate, burst) = (self.per_second, self.burst);
        let b = self.buckets.entry(key).or_insert(Bucket { tokens: burst, last: now });
        b.tokens = refill(b, rate, burst, now);
        // `last` never moves backwards, so an out-of-order `now` cannot mint tokens.
        b.last = b.last.max(now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            // try_: a tiny rate can make the wait overflow Duration.
            Err(Duration::try_from_secs_f64((1.0 - b.tokens) / rate).unwrap_or(Duration::MAX))
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Drops buckets that have refilled completely: a fresh bucket would be identical, so
    /// nothing is lost. If every bucket is still draining (10,000 busy subjects), the eighth idle
    /// longest goes, which only lets those subjects start over with a full burst; freeing a batch
    /// keeps a flood of new keys from paying a full sweep each.
    fn evict(&mut self, now: Instant) {
        let (rate, burst) = (self.per_second, self.burst);
        self.buckets.retain(|_, b| refill(b, rate, burst, now) < burst);
        if self.buckets.len() >= MAX_KEYS {
            let mut by_age: Vec<(Instant, K)> =
                self.buckets.iter().map(|(k, b)| (b.last, *k)).collect();
            let n = (MAX_KEYS / 8).max(1);
            by_age.select_nth_unstable(n - 1);
            for (_, k) in &by_age[..n] {
                self.buckets.remove(k);
            }
        }
    }
}

fn refill(b: &Bucket, rate: f64, burst: f64, now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
    (b.tokens + elapsed * rate).min(burst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_steady_rate() {
        let mut rl = RateLimiter::new(10.0, 5);
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(rl.check((1000, 42), t0).is_ok());
        }
        let retry = rl.check((1000, 42), t0).unwrap_err();
        assert!(
            retry > Duration::from_millis(90) && retry <= Duration::from_millis(100),
            "{retry:?}"
        );
        // Another subject has its own bucket.
        assert!(rl.check((1000, 43), t0).is_ok());
        assert!(rl.check((0, 42), t0).is_ok());
        // One token per 100 ms.
        let t1 = t0 + Duration::from_millis(100);
        assert!(rl.check((1000, 42), t1).is_ok());
        assert!(rl.check((1000, 42), t1).is_err());
        // Refill caps at burst.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..5 {
            assert!(rl.check((1000, 42), t2).is_ok());
        }
        assert!(rl.check((1000, 42), t2).is_err());
    }

    #[test]
    fn unlimited_and_extreme_rates() {
        let mut rl = RateLimiter::new(f64::INFINITY, u32::MAX);
        let t0 = Instant::now();
        for pid in 0..(MAX_KEYS as u32 * 2) {
            assert!(rl.check((1, pid), t0).is_ok());
        }
        assert_eq!(rl.len(), 0);
        let mut slow = RateLimiter::new(1e-300, 1);
        assert!(slow.check((1, 1), t0).is_ok());
        assert_eq!(slow.check((1, 1), t0), Err(Duration::MAX));
    }

    #[test]
    fn time_going_backwards_mints_nothing() {
        let mut rl = RateLimiter::new(1.0, 1);
        let t0 = Instant::now() + Duration::from_secs(10);
        assert!(rl.check((1, 1), t0).is_ok());
        assert!(rl.check((1, 1), t0 - Duration::from_secs(5)).is_err());
        assert!(rl.check((1, 1), t0).is_err());
        assert!(rl.check((1, 1), t0 + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn memory_is_bounded() {
        let mut rl = RateLimiter::default();
        let t0 = Instant::now();
        for pid in 0..(MAX_KEYS as u32 + 500) {
            assert!(rl.check((1, pid), t0).is_ok());
            assert!(rl.len() <= MAX_KEYS);
        }
        // Once the map is full again, a new key sweeps every bucket that has refilled.
        let later = t0 + Duration::from_secs(60);
        let mut fresh = 0;
        while rl.len() < MAX_KEYS {
            assert!(rl.check((2, fresh), later).is_ok());
            fresh += 1;
        }
        assert!(rl.check((2, fresh), later).is_ok());
        assert_eq!(rl.len(), fresh as usize + 1);
    }

    #[test]
    fn drained_subject_survives_eviction() {
        let mut rl = RateLimiter::default();
        let t0 = Instant::now();
        for pid in 0..(MAX_KEYS as u32 - 1) {
            assert!(rl.check((1, pid), t0).is_ok());
        }
        let t1 = t0 + Duration::from_secs(1);
        let hot = (7, 7);
        while rl.check(hot, t1).is_ok() {}
        // The map is full; a new key sweeps the refilled buckets but keeps the drained one.
        assert!(rl.check((2, 2), t1).is_ok());
        assert_eq!(rl.len(), 2);
        assert!(rl.check(hot, t1).is_err());
    }
}
