//! Failed enrollment attempts are rate-limited per source address (a token bucket each): a
//! client guessing tokens, or flooding the unauthenticated port with bad requests, is told to
//! come back later, while successful enrollments (bounded by their tokens' uses) never are.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug)]
pub struct FailureLimit {
    burst: f64,
    per_sec: f64,
    max_sources: usize,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl Default for FailureLimit {
    fn default() -> Self {
        Self::new(30, 1.0, 65_536)
    }
}

impl FailureLimit {
    pub fn new(burst: u32, per_sec: f64, max_sources: usize) -> Self {
        Self { burst: f64::from(burst), per_sec, max_sources, buckets: Mutex::new(HashMap::new()) }
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.per_sec).min(self.burst);
        b.at = now;
    }

    /// May `ip` try now? `Err(wait)` says how long until it may.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut m = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let Some(b) = m.get_mut(&ip) else { return Ok(()) };
        self.refill(b, now);
        if b.tokens >= 1.0 {
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.per_sec))
        }
    }

    /// Count a failed attempt from `ip`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let mut m = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= self.max_sources && !m.contains_key(&ip) {
            // Forget the sources that are back to a full bucket; if none are, the oldest.
            let (burst, per_sec) = (self.burst, self.per_sec);
            m.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * per_sec < burst);
            if m.len() >= self.max_sources {
                if let Some(oldest) = m.iter().min_by_key(|(_, b)| b.at).map(|(k, _)| *k) {
                    m.remove(&oldest);
                }
            }
        }
        let b = m.entry(ip).or_insert(Bucket { tokens: self.burst, at: now });
        self.refill(b, now);
        b.tokens = (b.tokens - 1.0).max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_beyond_the_burst_wait_and_the_table_stays_bounded() {
        let l = FailureLimit::new(3, 1.0, 2);
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(l.check(a, t0).is_ok());
            l.failed(a, t0);
        }
        let wait = l.check(a, t0).unwrap_err();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1), "{wait:?}");
        assert!(l.check(b, t0).is_ok(), "other sources are not affected");
        assert!(l.check(a, t0 + Duration::from_secs(1)).is_ok(), "refilled");
        // Many sources: the table never grows past its bound.
        for i in 0..100u8 {
            l.failed(IpAddr::from([10, 1, 0, i]), t0);
        }
        assert!(l.buckets.lock().unwrap().len() <= 2);
    }
}
