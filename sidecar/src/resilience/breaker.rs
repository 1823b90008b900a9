//! Circuit breaker: closed → open after consecutive failures or a failure
//! ratio over a window; open → half-open after the open duration; a few
//! half-open probes decide between closed and open again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bulwark_proto::config::v1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

#[derive(Debug, Clone)]
pub struct BreakerConfig {
    pub consecutive_failures: u32,
    pub failure_ratio: f64,
    pub min_requests: u32,
    pub window: Duration,
    pub open: Duration,
    pub half_open_requests: u32,
}

impl BreakerConfig {
    pub fn from_proto(c: &v1::CircuitBreaker) -> Self {
        Self {
            consecutive_failures: c.consecutive_failures,
            failure_ratio: c.failure_ratio,
            min_requests: c.min_requests.max(1),
            window: Duration::from_millis(c.window_ms.max(1)),
            open: Duration::from_millis(c.open_ms.max(1)),
            half_open_requests: c.half_open_requests.max(1),
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: State,
    consecutive: u32,
    window_start: Instant,
    window_total: u32,
    window_failed: u32,
    opened_at: Instant,
    probes_in_flight: u32,
    probes_ok: u32,
    transitions: u64,
}

#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    inner: Mutex<Inner>,
}

/// Permission to send one request; report its outcome.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// Allowed as a half-open probe.
    Probe,
    No,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Self {
        let now = Instant::now();
        Self {
            cfg,
            inner: Mutex::new(Inner {
                state: State::Closed,
                consecutive: 0,
                window_start: now,
                window_total: 0,
                window_failed: 0,
                opened_at: now,
                probes_in_flight: 0,
                probes_ok: 0,
                transitions: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> State {
        self.lock().state
    }

    pub fn transitions(&self) -> u64 {
        self.lock().transitions
    }

    pub fn admit(&self, now: Instant) -> Admit {
        let mut s = self.lock();
        match s.state {
            State::Closed => Admit::Yes,
            State::Open if now.duration_since(s.opened_at) >= self.cfg.open => {
                s.state = State::HalfOpen;
                s.transitions += 1;
                s.probes_in_flight = 1;
                s.probes_ok = 0;
                Admit::Probe
            }
            State::Open => Admit::No,
            State::HalfOpen if s.probes_in_flight < self.cfg.half_open_requests => {
                s.probes_in_flight += 1;
                Admit::Probe
            }
            State::HalfOpen => Admit::No,
        }
    }

    /// Gives back an admission whose request says nothing about the
    /// upstream (it was never processed): a probe's place is freed for the
    /// next request, and nothing is counted.
    pub fn release(&self, admit: &Admit) {
        let mut s = self.lock();
        if *admit == Admit::Probe && s.state == State::HalfOpen {
            s.probes_in_flight = s.probes_in_flight.saturating_sub(1);
        }
    }

    pub fn record(&self, admit: &Admit, success: bool, now: Instant) {
        let mut s = self.lock();
        if *admit == Admit::Probe && s.state == State::HalfOpen {
            s.probes_in_flight = s.probes_in_flight.saturating_sub(1);
            if success {
                s.probes_ok += 1;
                if s.probes_ok >= self.cfg.half_open_requests {
                    s.state = State::Closed;
                    s.transitions += 1;
                    s.consecutive = 0;
                    s.window_start = now;
                    s.window_total = 0;
                    s.window_failed = 0;
                }
            } else {
                s.state = State::Open;
                s.transitions += 1;
                s.opened_at = now;
            }
            return;
        }
        if s.state != State::Closed {
            return;
        }
        if now.duration_since(s.window_start) > self.cfg.window {
            s.window_start = now;
            s.window_total = 0;
            s.window_failed = 0;
        }
        s.window_total += 1;
        if success {
            s.consecutive = 0;
        } else {
            s.consecutive += 1;
            s.window_failed += 1;
        }
        let by_count =
            self.cfg.consecutive_failures > 0 && s.consecutive >= self.cfg.consecutive_failures;
        let by_ratio = self.cfg.failure_ratio > 0.0
            && s.window_total >= self.cfg.min_requests
            && f64::from(s.window_failed) / f64::from(s.window_total) >= self.cfg.failure_ratio;
        if by_count || by_ratio {
            s.state = State::Open;
            s.transitions += 1;
            s.opened_at = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            failure_ratio: 0.0,
            min_requests: 1,
            window: Duration::from_secs(10),
            open: Duration::from_secs(5),
            half_open_requests: 1,
        }
    }

    #[test]
    fn a_released_probe_frees_its_place_and_counts_for_nothing() {
        let b = Breaker::new(cfg());
        let t = Instant::now();
        for _ in 0..3 {
            let a = b.admit(t);
            b.record(&a, false, t);
        }
        let probe = b.admit(t + Duration::from_secs(5));
        assert_eq!(probe, Admit::Probe);
        b.release(&probe);
        assert_eq!(b.state(), State::HalfOpen);
        let again = b.admit(t + Duration::from_secs(5));
        assert_eq!(again, Admit::Probe, "the place came back");
        b.record(&again, true, t + Duration::from_secs(5));
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn opens_after_consecutive_failures_and_recovers_through_half_open() {
        let b = Breaker::new(cfg());
        let t = Instant::now();
        for _ in 0..3 {
            let a = b.admit(t);
            assert_eq!(a, Admit::Yes);
            b.record(&a, false, t);
        }
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.admit(t + Duration::from_secs(1)), Admit::No);
        let probe = b.admit(t + Duration::from_secs(5));
        assert_eq!(probe, Admit::Probe);
        assert_eq!(
            b.admit(t + Duration::from_secs(5)),
            Admit::No,
            "one probe at a time"
        );
        b.record(&probe, true, t + Duration::from_secs(5));
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.transitions(), 3);
    }

    #[test]
    fn failed_probe_reopens() {
        let b = Breaker::new(cfg());
        let t = Instant::now();
        for _ in 0..3 {
            let a = b.admit(t);
            b.record(&a, false, t);
        }
        let p = b.admit(t + Duration::from_secs(6));
        b.record(&p, false, t + Duration::from_secs(6));
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.admit(t + Duration::from_secs(7)), Admit::No);
    }

    #[test]
    fn opens_on_failure_ratio_with_enough_requests() {
        let b = Breaker::new(BreakerConfig {
            consecutive_failures: 0,
            failure_ratio: 0.5,
            min_requests: 4,
            ..cfg()
        });
        let t = Instant::now();
        for ok in [true, false, true, false] {
            let a = b.admit(t);
            b.record(&a, ok, t);
        }
        assert_eq!(b.state(), State::Open);
    }
}
