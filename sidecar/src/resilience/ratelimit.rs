//! Local rate limiting: token buckets keyed by caller (a SPIFFE ID, a JWT
//! subject, an API key, an IP address, or one shared key), in bounded
//! memory whatever the callers send.
//!
//! Each key gets a bucket of `burst` tokens refilled at `requests_per_second`;
//! a request takes one token or is refused with the time until one is back.
//! Keys are stored as keyed 64-bit hashes, so a long or hostile key costs
//! no more than a short one, and at most `max_keys` buckets exist at once:
//! when a shard is full, buckets that have refilled completely go first
//! (forgetting them changes nothing, a new bucket starts full), then the
//! fullest ones (forgetting them gives back the fewest tokens).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most shards (fewer lock collisions between callers).
const SHARDS: usize = 16;
/// Fewest keys per shard, so that eviction picks among enough buckets.
const MIN_SHARD_KEYS: usize = 64;

/// Token buckets per key. `Send + Sync`; share it in an `Arc`.
#[derive(Debug)]
pub struct KeyedLimiter {
    rate: f64,
    burst: u32,
    per_shard: usize,
    hasher: RandomState,
    shards: Box<[Mutex<HashMap<u64, Bucket>>]>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Tokens at `now` (never above `burst`; a clock read earlier than the
    /// last one counts as no time passed).
    fn level(&self, now: Instant, rate: f64, burst: f64) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + elapsed * rate).min(burst)
    }
}

/// The outcome of [`KeyedLimiter::check`], with what a client needs to back off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    pub allowed: bool,
    /// The bucket size: most requests a key may make at once.
    pub limit: u32,
    /// Whole tokens left after this request.
    pub remaining: u32,
    /// Until the bucket is full again.
    pub reset: Duration,
    /// Until the next request would be allowed; zero when this one was.
    pub retry_after: Duration,
}

impl RateDecision {
    /// Sets `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`
    /// (seconds, rounded up), and `Retry-After` (seconds, rounded up, at
    /// least 1) when the request was refused.
    pub fn apply_headers(&self, h: &mut http::HeaderMap) {
        h.insert("ratelimit-limit", self.limit.into());
        h.insert("ratelimit-remaining", self.remaining.into());
        h.insert("ratelimit-reset", ceil_secs(self.reset).into());
        if !self.allowed {
            h.insert(
                http::header::RETRY_AFTER,
                ceil_secs(self.retry_after).max(1).into(),
            );
        }
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl KeyedLimiter {
    /// Buckets of `burst` tokens refilled at `requests_per_second`, for at
    /// most `max_keys` keys. Zero values are taken as 1.
    pub fn new(requests_per_second: u32, burst: u32, max_keys: usize) -> Self {
        let max_keys = max_keys.max(1);
        let shards = (max_keys / MIN_SHARD_KEYS).clamp(1, SHARDS);
        Self {
            rate: f64::from(requests_per_second.max(1)),
            burst: burst.max(1),
            per_shard: max_keys / shards,
            hasher: RandomState::new(),
            shards: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Takes one token from `key`'s bucket if it has one.
    pub fn check(&self, key: &str, now: Instant) -> RateDecision {
        let hash = self.hasher.hash_one(key);
        let burst = f64::from(self.burst);
        let shard = &self.shards[(hash % self.shards.len() as u64) as usize];
        let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(&hash) && map.len() >= self.per_shard {
            self.evict(&mut map, now);
        }
        let b = map.entry(hash).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let level = b.level(now, self.rate, burst);
        let allowed = level >= 1.0;
        let tokens = if allowed { level - 1.0 } else { level };
        // Never move a bucket's clock backwards.
        *b = Bucket {
            tokens,
            at: now.max(b.at),
        };
        let secs = |t: f64| Duration::from_secs_f64((t / self.rate).max(0.0));
        RateDecision {
            allowed,
            limit: self.burst,
            remaining: tokens as u32,
            reset: secs(burst - tokens),
            retry_after: if allowed {
                Duration::ZERO
            } else {
                secs(1.0 - tokens)
            },
        }
    }

    /// Buckets currently held (at most `max_keys`).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes room in a full shard: drops every full bucket, and if that
    /// frees less than an eighth of the shard, also the fullest buckets up to
    /// that eighth, so a flood of new keys pays for a sweep only once per
    /// eighth of a shard.
    fn evict(&self, map: &mut HashMap<u64, Bucket>, now: Instant) {
        let burst = f64::from(self.burst);
        let before = map.len();
        map.retain(|_, b| b.level(now, self.rate, burst) < burst);
        let want = (self.per_shard / 8).max(1);
        let freed = before - map.len();
        if freed >= want {
            return;
        }
        let mut levels: Vec<(f64, u64)> = map
            .iter()
            .map(|(k, b)| (b.level(now, self.rate, burst), *k))
            .collect();
        let n = (want - freed).min(levels.len());
        if n == 0 {
            return;
        }
        levels.select_nth_unstable_by(n - 1, |a, b| b.0.total_cmp(&a.0));
        for (_, k) in &levels[..n] {
            map.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn burst_then_refusal_with_retry_after_then_refill() {
        let l = KeyedLimiter::new(2, 3, 100);
        let t0 = Instant::now();
        let d: Vec<_> = (0..3).map(|_| l.check("a", t0)).collect();
        assert!(d.iter().all(|d| d.allowed));
        assert_eq!(d.iter().map(|d| d.remaining).collect::<Vec<_>>(), [2, 1, 0]);
        let refused = l.check("a", t0);
        assert!(!refused.allowed);
        assert_eq!(refused.limit, 3);
        assert_eq!(refused.remaining, 0);
        assert_eq!(refused.retry_after, Duration::from_millis(500));
        assert_eq!(refused.reset, Duration::from_millis(1500));
        // Half a second refills one token at 2/s.
        assert!(l.check("a", at(t0, 500)).allowed);
        assert!(!l.check("a", at(t0, 500)).allowed);
    }

    #[test]
    fn keys_have_their_own_buckets() {
        let l = KeyedLimiter::new(1, 1, 100);
        let t0 = Instant::now();
        assert!(l.check("noisy", t0).allowed);
        assert!(!l.check("noisy", t0).allowed);
        assert!(l.check("quiet", t0).allowed);
    }

    #[test]
    fn a_bucket_never_holds_more_than_the_burst() {
        let l = KeyedLimiter::new(10, 2, 100);
        let t0 = Instant::now();
        l.check("a", t0);
        let d = l.check("a", at(t0, 60_000));
        assert_eq!((d.allowed, d.remaining), (true, 1));
        assert!(l.check("a", at(t0, 60_000)).allowed);
        assert!(!l.check("a", at(t0, 60_000)).allowed, "two tokens at most");
    }

    #[test]
    fn an_earlier_clock_reading_grants_nothing_extra() {
        let l = KeyedLimiter::new(1, 1, 10);
        let t0 = Instant::now();
        assert!(l.check("a", at(t0, 1000)).allowed);
        assert!(!l.check("a", t0).allowed, "a late caller's older `now`");
        assert!(!l.check("a", at(t0, 1500)).allowed);
        assert!(l.check("a", at(t0, 2000)).allowed);
    }

    #[test]
    fn a_flood_of_distinct_keys_stays_within_max_keys() {
        let t0 = Instant::now();
        for max in [1, 64, 1000] {
            let l = KeyedLimiter::new(1, 5, max);
            for i in 0..5_000 {
                l.check(&format!("key-{i}"), at(t0, i / 100));
                assert!(l.len() <= max, "{} buckets after {i} keys", l.len());
            }
            assert!(l.len() >= max * 3 / 4, "room is used: {} of {max}", l.len());
        }
    }

    #[test]
    fn eviction_keeps_drained_buckets_and_drops_full_ones_first() {
        // One shard of 16 keys.
        let l = KeyedLimiter::new(1, 10, 16);
        let t0 = Instant::now();
        for _ in 0..10 {
            l.check("drained", t0);
        }
        // A flood of new keys, each taking one token: "drained" (0 left) is
        // always the emptiest bucket, so it is never the one forgotten.
        for i in 0..1000 {
            l.check(&format!("flood-{i}"), t0);
        }
        assert!(
            !l.check("drained", t0).allowed,
            "the drained bucket was not forgotten"
        );
        // A second later every flood bucket has refilled: they go first.
        for i in 0..1000 {
            l.check(&format!("late-{i}"), at(t0, 1000 + i));
        }
        let d = l.check("drained", at(t0, 1000));
        assert_eq!(
            (d.allowed, d.remaining),
            (true, 0),
            "one token refilled, not a fresh bucket"
        );
    }

    #[test]
    fn headers_follow_the_ratelimit_fields_and_retry_after_only_on_refusal() {
        let l = KeyedLimiter::new(3, 2, 10);
        let t0 = Instant::now();
        let mut h = http::HeaderMap::new();
        l.check("a", t0).apply_headers(&mut h);
        assert_eq!(h["ratelimit-limit"], "2");
        assert_eq!(h["ratelimit-remaining"], "1");
        assert_eq!(h["ratelimit-reset"], "1", "1/3 s rounds up to 1");
        assert!(!h.contains_key(http::header::RETRY_AFTER));
        l.check("a", t0);
        let mut h = http::HeaderMap::new();
        l.check("a", t0).apply_headers(&mut h);
        assert_eq!(h["ratelimit-remaining"], "0");
        assert_eq!(h["retry-after"], "1");
    }

    #[test]
    fn zero_settings_are_taken_as_one() {
        let l = KeyedLimiter::new(0, 0, 0);
        let t0 = Instant::now();
        assert!(l.check("a", t0).allowed);
        assert!(!l.check("a", t0).allowed);
        assert!(l.check("b", t0).allowed);
        assert_eq!(l.len(), 1);
    }
}
