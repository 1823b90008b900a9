//! Per-service resilience objects that outlive config snapshots: a config
//! change for a service replaces its objects, an unchanged one keeps their
//! state (in-flight counts, breaker state).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bulwark_proto::config::v1;

use super::adaptive::{AdaptiveConfig, AdaptiveLimiter};
use super::breaker::{Breaker, BreakerConfig};
use super::bulkhead::Bulkhead;
use super::ratelimit::{KeyedLimiter, RateDecision};
use crate::http::route::{RouteTable, Rule};

/// Most callers a per-source-identity limit tracks at once (beyond it, the
/// least useful buckets are forgotten).
const MAX_TRACKED_IDENTITIES: usize = 10_000;

/// A local rate limit: one bucket shared by every caller, or one per
/// calling workload.
#[derive(Debug)]
pub struct LocalRateLimit {
    limiter: KeyedLimiter,
    per_source_identity: bool,
}

impl LocalRateLimit {
    /// `None` when the limit does not limit (no rate).
    pub fn from_proto(r: &v1::RateLimit) -> Option<Self> {
        (r.requests_per_second > 0).then(|| Self {
            limiter: KeyedLimiter::new(
                r.requests_per_second,
                r.burst.max(1),
                if r.per_source_identity {
                    MAX_TRACKED_IDENTITIES
                } else {
                    1
                },
            ),
            per_source_identity: r.per_source_identity,
        })
    }

    /// Takes a token for a request from `source` (a verified SPIFFE ID).
    pub fn check(&self, source: &str, now: Instant) -> RateDecision {
        let key = if self.per_source_identity { source } else { "" };
        self.limiter.check(key, now)
    }
}

#[derive(Debug)]
pub struct ServiceGuards {
    pub budget: super::budget::RetryBudget,
    /// Round-robin position (when the policy asks for round robin).
    pub rr: std::sync::atomic::AtomicUsize,
    /// Concurrent TCP connections to the service (`maxConnections`).
    pub connections: Option<Arc<tokio::sync::Semaphore>>,
    pub bulkhead: Option<Bulkhead>,
    pub breaker: Option<Breaker>,
    pub rate_limit: Option<LocalRateLimit>,
    /// Adaptive concurrency limit (`adaptiveConcurrency`).
    pub adaptive: Option<Arc<AdaptiveLimiter>>,
    /// What they were built from, to notice changes.
    source: Option<v1::TrafficPolicy>,
}

impl ServiceGuards {
    fn build(p: Option<&v1::TrafficPolicy>) -> Self {
        let Some(p) = p else {
            return Self {
                rr: Default::default(),
                connections: None,
                budget: Default::default(),
                bulkhead: None,
                breaker: None,
                rate_limit: None,
                adaptive: None,
                source: None,
            };
        };
        let bulkhead = (p.max_requests > 0).then(|| {
            let queue_timeout = match p.queue_timeout_ms {
                0 => super::bulkhead::QUEUE_TIMEOUT,
                ms => std::time::Duration::from_millis(ms),
            };
            Bulkhead::new(
                p.max_requests as usize,
                p.max_pending as usize,
                queue_timeout,
            )
        });
        let breaker = p
            .circuit_breaker
            .as_ref()
            .filter(|c| c.consecutive_failures > 0 || c.failure_ratio > 0.0)
            .map(|c| Breaker::new(BreakerConfig::from_proto(c)));
        let rate_limit = p.rate_limit.as_ref().and_then(LocalRateLimit::from_proto);
        let adaptive = p
            .adaptive_concurrency
            .as_ref()
            .map(|a| Arc::new(AdaptiveLimiter::new(AdaptiveConfig::from_proto(a))));
        let mut source = p.clone();
        source.source = None;
        let connections = (p.max_connections > 0)
            .then(|| Arc::new(tokio::sync::Semaphore::new(p.max_connections as usize)));
        Self {
            rr: Default::default(),
            connections,
            budget: Default::default(),
            bulkhead,
            breaker,
            rate_limit,
            adaptive,
            source: Some(source),
        }
    }
}

/// A Route rule's limiter and the limit it was built from.
#[derive(Debug)]
struct RuleLimit {
    rule: String,
    limit: v1::RateLimit,
    limiter: Arc<LocalRateLimit>,
}

/// A service's guards and the snapshot policy they were last matched to.
#[derive(Debug)]
struct Built {
    /// The very policy (by pointer) of the last request's snapshot: the
    /// same one again, the common case, needs no comparison by value.
    from: Option<Arc<v1::TrafficPolicy>>,
    guards: Arc<ServiceGuards>,
}

#[derive(Debug, Default)]
pub struct Guards {
    by_service: Mutex<HashMap<String, Built>>,
    /// Service → limiters of its Route rules, kept across snapshots while
    /// the rule's limit is unchanged (so a config push does not refill them).
    by_rule: Mutex<HashMap<String, Vec<RuleLimit>>>,
}

impl Guards {
    /// The guards of `service` if any request built them yet.
    pub fn peek(&self, service: &str) -> Option<Arc<ServiceGuards>> {
        self.by_service
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .map(|b| b.guards.clone())
    }

    pub fn for_service(
        &self,
        service: &str,
        policy: Option<&Arc<v1::TrafficPolicy>>,
    ) -> Arc<ServiceGuards> {
        let mut m = self.by_service.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = m.get(service)
            && match (&b.from, policy) {
                (None, None) => true,
                (Some(a), Some(p)) => Arc::ptr_eq(a, p),
                _ => false,
            }
        {
            return b.guards.clone();
        }
        // Another snapshot: the guards stay if the policy is the same by value.
        let wanted = policy.map(|p| {
            let mut p = v1::TrafficPolicy::clone(p);
            p.source = None;
            p
        });
        if let Some(b) = m.get_mut(service)
            && b.guards.source == wanted
        {
            b.from = policy.cloned();
            return b.guards.clone();
        }
        let mut g = ServiceGuards::build(policy.map(|p| &**p));
        // A push that changes other parts of the policy keeps the learned
        // limit: starting over would let a burst through.
        if let (Some(old), Some(new)) = (
            m.get(service).and_then(|o| o.guards.adaptive.as_ref()),
            &g.adaptive,
        ) && old.config() == new.config()
        {
            g.adaptive = Some(old.clone());
        }
        let g = Arc::new(g);
        m.insert(
            service.to_string(),
            Built {
                from: policy.cloned(),
                guards: g.clone(),
            },
        );
        g
    }

    /// The limiter of `rule` (a rule of `table`, the routes of `service`),
    /// if the rule has a rate limit.
    pub fn for_rule(
        &self,
        service: &str,
        table: &RouteTable,
        rule: &Rule,
    ) -> Option<Arc<LocalRateLimit>> {
        let limit = rule.rate_limit.as_ref()?;
        let mut m = self.by_rule.lock().unwrap_or_else(|p| p.into_inner());
        let limits = m.entry(service.to_string()).or_default();
        if let Some(l) = limits
            .iter()
            .find(|l| l.rule == rule.name && l.limit == *limit)
        {
            return Some(l.limiter.clone());
        }
        let limiter = Arc::new(LocalRateLimit::from_proto(limit)?);
        // Forget limiters of rules the table no longer has (or has changed).
        limits.retain(|l| {
            table
                .rules
                .iter()
                .any(|r| r.name == l.rule && r.rate_limit.as_ref() == Some(&l.limit))
        });
        limits.push(RuleLimit {
            rule: rule.name.clone(),
            limit: *limit,
            limiter: limiter.clone(),
        });
        Some(limiter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(requests_per_second: u32) -> RouteTable {
        RouteTable::compile(&v1::Route {
            name: "api".into(),
            namespace: "default".into(),
            service: "default/api".into(),
            rules: vec![v1::HttpRoute {
                name: "search".into(),
                rate_limit: Some(v1::RateLimit {
                    requests_per_second,
                    burst: 1,
                    per_source_identity: true,
                }),
                ..Default::default()
            }],
            source: None,
        })
        .unwrap()
    }

    fn adaptive_policy(max_requests: u32, initial_limit: u32) -> v1::TrafficPolicy {
        v1::TrafficPolicy {
            service: "default/api".into(),
            max_requests,
            adaptive_concurrency: Some(v1::AdaptiveConcurrency {
                min_limit: 1,
                max_limit: 100,
                initial_limit,
                latency_tolerance: 2.0,
                sample_window_ms: 100,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn adaptive_limit_outlives_pushes_that_keep_its_config() {
        let g = Guards::default();
        let first = g
            .for_service("default/api", Some(&Arc::new(adaptive_policy(10, 20))))
            .adaptive
            .clone()
            .unwrap();
        let _held = first.try_acquire(Instant::now()).unwrap();
        // The same policy again, then one with another bulkhead: same limiter.
        for p in [adaptive_policy(10, 20), adaptive_policy(50, 20)] {
            let a = g
                .for_service("default/api", Some(&Arc::new(p)))
                .adaptive
                .clone();
            assert!(Arc::ptr_eq(&first, a.as_ref().unwrap()));
        }
        // A changed adaptive config starts afresh; none removes it.
        let changed = g.for_service("default/api", Some(&Arc::new(adaptive_policy(50, 30))));
        assert!(!Arc::ptr_eq(&first, changed.adaptive.as_ref().unwrap()));
        let mut without = adaptive_policy(50, 30);
        without.adaptive_concurrency = None;
        assert!(
            g.for_service("default/api", Some(&Arc::new(without)))
                .adaptive
                .is_none()
        );
    }

    #[test]
    fn rule_limiters_outlive_snapshots_and_start_afresh_when_the_limit_changes() {
        let g = Guards::default();
        let t0 = Instant::now();
        let t = table(1);
        let l = g.for_rule("default/api", &t, &t.rules[0]).unwrap();
        assert!(l.check("spiffe://td/ns/a/sa/a", t0).allowed);
        assert!(!l.check("spiffe://td/ns/a/sa/a", t0).allowed);
        assert!(l.check("spiffe://td/ns/b/sa/b", t0).allowed, "per identity");
        // A new snapshot with the same limit: the same buckets.
        let t = table(1);
        let l = g.for_rule("default/api", &t, &t.rules[0]).unwrap();
        assert!(!l.check("spiffe://td/ns/a/sa/a", t0).allowed);
        // A changed limit: new buckets, and the old limiter is let go.
        let t = table(5);
        let l = g.for_rule("default/api", &t, &t.rules[0]).unwrap();
        assert!(l.check("spiffe://td/ns/a/sa/a", t0).allowed);
        assert_eq!(g.by_rule.lock().unwrap()["default/api"].len(), 1);
    }
}
