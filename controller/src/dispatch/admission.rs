//! Load shedding for session opens. After a controller restart every agent reconnects within
//! seconds; opening a session costs store writes and task replays, so opens are admitted at a
//! steady rate (a token bucket) and the rest are refused with `RESOURCE_EXHAUSTED` and a
//! `fleetadm-retry-after-ms` hint. Each refused caller is given its own future slot (one per
//! 1/rate, with jitter inside it), so the herd comes back spread out at the rate the controller
//! admits, instead of all at once on the next backoff step.
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The longest wait a hint asks for; beyond it the slot is drawn at random below it.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

#[derive(Debug)]
pub struct Admission {
    per_sec: f64,
    burst: f64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    tokens: f64,
    refilled: Option<Instant>,
    /// The next free slot handed out to a refused caller.
    next_slot: Option<Instant>,
}

impl Admission {
    /// Admit `per_sec` opens a second, with bursts of as many.
    pub fn new(per_sec: u32) -> Self {
        let per_sec = f64::from(per_sec.max(1));
        Self { per_sec, burst: per_sec, state: Mutex::new(State { tokens: per_sec, refilled: None, next_slot: None }) }
    }

    /// `Ok` to admit now, or how long the caller should wait.
    pub fn admit(&self) -> Result<(), Duration> {
        self.admit_at(Instant::now(), rand::random::<f64>())
    }

    /// [`Admission::admit`] at `now`, with `jitter` in [0, 1) placing the caller inside its slot.
    pub fn admit_at(&self, now: Instant, jitter: f64) -> Result<(), Duration> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = s.refilled {
            let add = now.saturating_duration_since(t).as_secs_f64() * self.per_sec;
            s.tokens = (s.tokens + add).min(self.burst);
        }
        s.refilled = Some(now);
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            return Ok(());
        }
        let slot = Duration::from_secs_f64(1.0 / self.per_sec);
        let start = s.next_slot.filter(|t| *t > now).unwrap_or(now) + slot;
        let wait = start.saturating_duration_since(now);
        if wait + slot > MAX_RETRY_AFTER {
            // The schedule is full: spread the rest at random over the longest wait.
            return Err(MAX_RETRY_AFTER.mul_f64(0.5 + jitter.clamp(0.0, 1.0) / 2.0));
        }
        s.next_slot = Some(start);
        Err(wait + slot.mul_f64(jitter.clamp(0.0, 1.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_a_burst_then_hands_out_spread_future_slots() {
        let a = Admission::new(10);
        let t0 = Instant::now();
        for _ in 0..10 {
            assert!(a.admit_at(t0, 0.5).is_ok());
        }
        // The eleventh and later callers get successive 100 ms slots.
        let waits: Vec<Duration> = (0..5).map(|_| a.admit_at(t0, 0.0).unwrap_err()).collect();
        for (i, w) in waits.iter().enumerate() {
            let want = Duration::from_millis(100 * (i as u64 + 1));
            assert!(w.abs_diff(want) < Duration::from_millis(2), "slot {i}: {w:?} vs {want:?}");
        }
        // Jitter places a caller inside its slot, never past it.
        let w = a.admit_at(t0, 0.99).unwrap_err();
        assert!(w > Duration::from_millis(600) && w < Duration::from_millis(700), "{w:?}");
        // Time refills the bucket: a caller coming back at its slot is admitted.
        assert!(a.admit_at(t0 + Duration::from_millis(150), 0.0).is_ok());
    }

    #[test]
    fn a_quiet_spell_forgets_the_schedule_and_waits_are_capped() {
        let a = Admission::new(1);
        let t0 = Instant::now();
        assert!(a.admit_at(t0, 0.0).is_ok());
        for _ in 0..200 {
            let w = a.admit_at(t0, 0.3).unwrap_err();
            assert!(w <= MAX_RETRY_AFTER, "{w:?}");
        }
        // Well after the last slot, a refused caller starts a fresh schedule: one slot away.
        let later = t0 + Duration::from_secs(600);
        assert!(a.admit_at(later, 0.0).is_ok(), "the bucket refilled");
        let w = a.admit_at(later, 0.0).unwrap_err();
        assert!(w.abs_diff(Duration::from_secs(1)) < Duration::from_millis(2), "{w:?}");
    }
}
