//! Per-service resilience objects that outlive config snapshots: a config
//! change for a service replaces its objects, an unchanged one keeps their
//! state (in-flight counts, breaker state).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bulwark_ca::admission::TokenBucket;
use bulwark_proto::config::v1;

use super::breaker::{Breaker, BreakerConfig};
use super::bulkhead::Bulkhead;

#[derive(Debug)]
pub struct ServiceGuards {
    pub budget: super::budget::RetryBudget,
    /// Round-robin position (when the policy asks for round robin).
    pub rr: std::sync::atomic::AtomicUsize,
    /// Concurrent TCP connections to the service (`maxConnections`).
    pub connections: Option<Arc<tokio::sync::Semaphore>>,
    pub bulkhead: Option<Bulkhead>,
    pub breaker: Option<Breaker>,
    pub rate_limit: Option<TokenBucket>,
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
                source: None,
            };
        };
        let bulkhead = (p.max_requests > 0)
            .then(|| Bulkhead::new(p.max_requests as usize, p.max_pending as usize));
        let breaker = p
            .circuit_breaker
            .as_ref()
            .filter(|c| c.consecutive_failures > 0 || c.failure_ratio > 0.0)
            .map(|c| Breaker::new(BreakerConfig::from_proto(c)));
        let rate_limit = p
            .rate_limit
            .as_ref()
            .filter(|r| r.requests_per_second > 0)
            .map(|r| TokenBucket::new(f64::from(r.requests_per_second), r.burst.max(1)));
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
            source: Some(source),
        }
    }
}

#[derive(Debug, Default)]
pub struct Guards {
    by_service: Mutex<HashMap<String, Arc<ServiceGuards>>>,
}

impl Guards {
    /// The guards of `service` if any request built them yet.
    pub fn peek(&self, service: &str) -> Option<Arc<ServiceGuards>> {
        self.by_service
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .cloned()
    }

    pub fn for_service(
        &self,
        service: &str,
        policy: Option<&v1::TrafficPolicy>,
    ) -> Arc<ServiceGuards> {
        let mut m = self.by_service.lock().unwrap_or_else(|p| p.into_inner());
        let wanted = policy.map(|p| {
            let mut p = p.clone();
            p.source = None;
            p
        });
        if let Some(g) = m.get(service)
            && g.source == wanted
        {
            return g.clone();
        }
        let g = Arc::new(ServiceGuards::build(policy));
        m.insert(service.to_string(), g.clone());
        g
    }
}
