//! A budget for warnings that strangers can trigger (refused relay headers): at most `max` lines
//! per window, then one summary of how many were left out, so a flood of bad connections cannot
//! flood the journal.
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct LogBudget {
    window: Duration,
    max: u32,
    state: Mutex<State>,
}

struct State {
    started: Option<Instant>,
    used: u32,
    suppressed: u64,
}

/// What to do with one event.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` events were left out in the window before.
    Log { suppressed: u64 },
    /// Leave it out (counted for the next summary).
    Skip,
}

impl LogBudget {
    pub const fn new(max: u32, window: Duration) -> Self {
        Self { window, max, state: Mutex::new(State { started: None, used: 0, suppressed: 0 }) }
    }

    pub fn check(&self) -> Verdict {
        self.check_at(Instant::now())
    }

    pub fn check_at(&self, now: Instant) -> Verdict {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.started.is_none_or(|t| now.saturating_duration_since(t) >= self.window) {
            s.started = Some(now);
            s.used = 0;
        }
        if s.used < self.max {
            s.used += 1;
            Verdict::Log { suppressed: std::mem::take(&mut s.suppressed) }
        } else {
            s.suppressed += 1;
            Verdict::Skip
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_up_to_the_budget_then_summarises_what_it_left_out() {
        let b = LogBudget::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(b.check_at(t0), Verdict::Log { suppressed: 0 });
        }
        for _ in 0..5 {
            assert_eq!(b.check_at(t0 + Duration::from_secs(9)), Verdict::Skip);
        }
        // A new window: the first line carries the count of the ones left out.
        assert_eq!(b.check_at(t0 + Duration::from_secs(10)), Verdict::Log { suppressed: 5 });
        assert_eq!(b.check_at(t0 + Duration::from_secs(11)), Verdict::Log { suppressed: 0 });
    }
}
