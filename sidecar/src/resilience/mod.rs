//! Resilience: circuit breakers, bulkheads, retry budgets and rate limits.

pub mod breaker;
pub mod budget;
pub mod bulkhead;
pub mod ratelimit;
pub mod state;
