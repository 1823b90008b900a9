//! Adaptive concurrency: a limit on requests in flight to a service that
//! follows their latency (AIMD), on top of the fixed bulkhead.
//!
//! Latency is sampled from admission to response headers. Once per sample
//! window the median of the window's samples is compared with the lowest
//! median seen (the latency without queueing): within `tolerance` times it,
//! and with the limit actually in use, the limit grows by one; above it, the
//! limit shrinks by [`DECREASE`]. Requests beyond the limit are refused at
//! once rather than queued, which is the point: a queue in front of a
//! saturated service only adds latency.
//!
//! The minimum is learned from traffic, so it is only as good as the
//! lightest load seen; a window run at no more than `min_limit` requests in
//! flight measures the service without queueing by definition, so its
//! median replaces the minimum (a service that became slower for good gets
//! a new baseline once the limit has come down to `min_limit`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulwark_proto::config::v1;

/// Factor the limit is multiplied by after a window over the tolerance.
pub const DECREASE: f64 = 0.8;
/// Fewest samples that close a window (fewer say little about latency).
const MIN_SAMPLES: usize = 5;
/// Most samples kept per window (memory stays bounded at any rate).
const MAX_SAMPLES: usize = 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveConfig {
    pub min_limit: usize,
    pub max_limit: usize,
    pub initial_limit: usize,
    /// Ratio over the minimum latency still considered unloaded.
    pub tolerance: f64,
    pub window: Duration,
}

impl AdaptiveConfig {
    /// From the compiled policy, made safe to use whatever it holds.
    pub fn from_proto(a: &v1::AdaptiveConcurrency) -> Self {
        let min_limit = a.min_limit.max(1) as usize;
        let max_limit = (a.max_limit as usize).max(min_limit);
        Self {
            min_limit,
            max_limit,
            initial_limit: (a.initial_limit as usize).clamp(min_limit, max_limit),
            tolerance: if a.latency_tolerance.is_finite() && a.latency_tolerance > 1.0 {
                a.latency_tolerance
            } else {
                2.0
            },
            window: Duration::from_millis(a.sample_window_ms.max(1)),
        }
    }
}

#[derive(Debug)]
struct Inner {
    limit: f64,
    in_flight: usize,
    /// Most requests in flight during the current window.
    peak_in_flight: usize,
    min_latency: Option<Duration>,
    window_start: Option<Instant>,
    samples: Vec<Duration>,
}

#[derive(Debug)]
pub struct AdaptiveLimiter {
    cfg: AdaptiveConfig,
    inner: Mutex<Inner>,
    announced: AtomicBool,
}

/// A request over the current limit.
#[derive(Debug, PartialEq, Eq)]
pub struct Limited;

/// One admitted request. Report its latency with [`Permit::finish`];
/// dropping it unreported (a local failure, a cancelled request) only
/// frees its place.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<AdaptiveLimiter>,
    started: Instant,
    done: bool,
}

impl AdaptiveLimiter {
    pub fn new(cfg: AdaptiveConfig) -> Self {
        Self {
            inner: Mutex::new(Inner {
                limit: cfg.initial_limit as f64,
                in_flight: 0,
                peak_in_flight: 0,
                min_latency: None,
                window_start: None,
                samples: Vec::new(),
            }),
            cfg,
            announced: AtomicBool::new(false),
        }
    }

    pub fn config(&self) -> &AdaptiveConfig {
        &self.cfg
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.lock().limit as usize
    }

    /// True the first time it is called: the limit has yet to be published.
    pub fn announce(&self) -> bool {
        !self.announced.load(Ordering::Relaxed) && !self.announced.swap(true, Ordering::Relaxed)
    }

    /// Admits a request unless the limit is reached.
    pub fn try_acquire(self: &Arc<Self>, now: Instant) -> Result<Permit, Limited> {
        let mut g = self.lock();
        if g.in_flight >= g.limit as usize {
            return Err(Limited);
        }
        g.in_flight += 1;
        g.peak_in_flight = g.peak_in_flight.max(g.in_flight);
        Ok(Permit {
            limiter: self.clone(),
            started: now,
            done: false,
        })
    }

    /// Adds one latency sample; returns the new limit when it closed a window.
    fn sample(&self, g: &mut Inner, latency: Duration, now: Instant) -> Option<usize> {
        if g.samples.len() < MAX_SAMPLES {
            g.samples.push(latency);
        }
        let start = *g.window_start.get_or_insert(now);
        if now.saturating_duration_since(start) < self.cfg.window || g.samples.len() < MIN_SAMPLES {
            return None;
        }
        let mid = g.samples.len() / 2;
        let median = *g.samples.select_nth_unstable(mid).1;
        let unqueued = g.peak_in_flight <= self.cfg.min_limit;
        let min = match g.min_latency {
            Some(m) if !unqueued => m.min(median),
            _ => median,
        };
        g.min_latency = Some(min);
        let (lo, hi) = (self.cfg.min_limit as f64, self.cfg.max_limit as f64);
        if median.as_secs_f64() > min.as_secs_f64() * self.cfg.tolerance {
            g.limit = (g.limit * DECREASE).floor().clamp(lo, hi);
        } else if g.peak_in_flight * 2 >= g.limit as usize {
            // Grow only a limit in use: an idle one proves nothing.
            g.limit = (g.limit + 1.0).clamp(lo, hi);
        }
        g.samples.clear();
        g.window_start = Some(now);
        g.peak_in_flight = g.in_flight;
        Some(g.limit as usize)
    }
}

impl Permit {
    /// The request got its answer at `now`: count its latency. Returns the
    /// new limit when this sample closed a window.
    pub fn finish(mut self, now: Instant) -> Option<usize> {
        self.done = true;
        let limiter = self.limiter.clone();
        let mut g = limiter.lock();
        g.in_flight -= 1;
        limiter.sample(&mut g, now.saturating_duration_since(self.started), now)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done {
            self.limiter.lock().in_flight -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(min: u32, max: u32, initial: u32) -> Arc<AdaptiveLimiter> {
        Arc::new(AdaptiveLimiter::new(AdaptiveConfig::from_proto(
            &v1::AdaptiveConcurrency {
                min_limit: min,
                max_limit: max,
                initial_limit: initial,
                latency_tolerance: 2.0,
                sample_window_ms: 100,
            },
        )))
    }

    /// Runs one sample window on a simulated clock: `concurrency` requests
    /// at once, each taking `latency`, repeated until the window closes.
    /// Returns the limit after it.
    fn window(
        l: &Arc<AdaptiveLimiter>,
        clock: &mut Instant,
        concurrency: usize,
        latency: Duration,
    ) -> usize {
        loop {
            let start = *clock;
            let permits: Vec<_> = (0..concurrency)
                .map_while(|_| l.try_acquire(start).ok())
                .collect();
            assert!(!permits.is_empty(), "the limit never goes below 1");
            *clock += latency;
            let mut closed = None;
            for p in permits {
                closed = closed.or(p.finish(*clock));
            }
            if let Some(limit) = closed {
                return limit;
            }
        }
    }

    const BASE: Duration = Duration::from_millis(20);

    #[test]
    fn refuses_beyond_the_limit_and_frees_places_on_drop() {
        let l = limiter(1, 10, 2);
        let now = Instant::now();
        let a = l.try_acquire(now).unwrap();
        let _b = l.try_acquire(now).unwrap();
        assert_eq!(l.try_acquire(now).err(), Some(Limited));
        drop(a);
        assert!(
            l.try_acquire(now).is_ok(),
            "an unreported permit frees its place"
        );
    }

    #[test]
    fn limit_grows_while_latency_stays_near_the_minimum() {
        let l = limiter(1, 100, 10);
        let mut clock = Instant::now();
        window(&l, &mut clock, 1, BASE); // learn the minimum unloaded
        let mut last = l.limit();
        for _ in 0..20 {
            // Using the whole limit, latency within the tolerance.
            let limit = window(&l, &mut clock, last, BASE + BASE / 2);
            assert_eq!(limit, last + 1, "additive increase");
            last = limit;
        }
    }

    #[test]
    fn limit_does_not_grow_while_mostly_unused() {
        let l = limiter(1, 100, 10);
        let mut clock = Instant::now();
        for _ in 0..10 {
            assert_eq!(window(&l, &mut clock, 2, BASE), 10);
        }
    }

    #[test]
    fn limit_shrinks_multiplicatively_when_latency_rises_over_the_tolerance() {
        let l = limiter(1, 100, 50);
        let mut clock = Instant::now();
        window(&l, &mut clock, 1, BASE);
        let before = l.limit();
        let after = window(&l, &mut clock, before, BASE * 3);
        assert_eq!(after, (before as f64 * DECREASE) as usize);
        let again = window(&l, &mut clock, after, BASE * 3);
        assert_eq!(again, (after as f64 * DECREASE) as usize);
    }

    #[test]
    fn limit_stays_within_min_and_max() {
        let l = limiter(4, 12, 8);
        let mut clock = Instant::now();
        window(&l, &mut clock, 1, BASE);
        let mut lowest = usize::MAX;
        for _ in 0..10 {
            // Far over the tolerance, whatever the concurrency.
            let limit = window(&l, &mut clock, 100, BASE * 5);
            assert!(limit >= 4, "{limit}");
            lowest = lowest.min(limit);
        }
        assert_eq!(lowest, 4);
        // Back to the unloaded latency: up to the maximum and no further.
        for _ in 0..30 {
            let limit = window(&l, &mut clock, 100, BASE);
            assert!(limit <= 12, "{limit}");
        }
        assert_eq!(l.limit(), 12);
    }

    #[test]
    fn converges_under_a_service_whose_latency_grows_with_load() {
        // A service that runs 4 requests at once; more wait their turn.
        let latency = |n: usize| BASE * (n.div_ceil(4) as u32);
        let l = limiter(1, 200, 40);
        let mut clock = Instant::now();
        window(&l, &mut clock, 1, latency(1));
        for _ in 0..50 {
            let n = l.limit();
            window(&l, &mut clock, 64, latency(n));
        }
        // Within the tolerance (2x) means at most 8 in flight; the limit
        // probes one above that and backs off again.
        assert!((4..=9).contains(&l.limit()), "{}", l.limit());
    }

    #[test]
    fn an_unqueued_window_resets_the_minimum_to_a_slower_service() {
        let l = limiter(1, 100, 1);
        let mut clock = Instant::now();
        window(&l, &mut clock, 1, BASE);
        // Now ten times slower even alone: the new normal, not overload.
        window(&l, &mut clock, 1, BASE * 10);
        for _ in 0..5 {
            window(&l, &mut clock, 100, BASE * 10);
        }
        assert!(l.limit() > 1, "grows again on the new baseline");
    }

    #[test]
    fn config_from_proto_is_made_consistent() {
        let c = AdaptiveConfig::from_proto(&v1::AdaptiveConcurrency {
            min_limit: 0,
            max_limit: 0,
            initial_limit: 50,
            latency_tolerance: f64::NAN,
            sample_window_ms: 0,
        });
        assert_eq!((c.min_limit, c.max_limit, c.initial_limit), (1, 1, 1));
        assert_eq!(c.tolerance, 2.0);
        assert!(!c.window.is_zero());
    }
}
