//! Retry budget: retries may add at most `ratio` of the requests seen in
//! the last window, plus `min_per_second` regardless, so a failing upstream
//! is never hit with a multiple of the real load.

use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct RetryBudget {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    start: Instant,
    requests: u64,
    retries: u64,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                start: Instant::now(),
                requests: 0,
                retries: 0,
            }),
        }
    }
}

impl RetryBudget {
    fn roll(s: &mut State, now: Instant) {
        if now.duration_since(s.start) >= WINDOW {
            s.start = now;
            s.requests = 0;
            s.retries = 0;
        }
    }

    pub fn record_request(&self, now: Instant) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Self::roll(&mut s, now);
        s.requests += 1;
    }

    /// Takes one retry from the budget if there is room.
    pub fn try_retry(&self, ratio: f64, min_per_second: u32, now: Instant) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Self::roll(&mut s, now);
        let allowed =
            (ratio * s.requests as f64) as u64 + u64::from(min_per_second) * WINDOW.as_secs();
        if s.retries < allowed {
            s.retries += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_bounded_by_ratio_plus_floor() {
        let b = RetryBudget::default();
        let now = Instant::now();
        for _ in 0..100 {
            b.record_request(now);
        }
        let granted = (0..1000).filter(|_| b.try_retry(0.2, 1, now)).count();
        assert_eq!(granted, 20 + 10);
    }
}
