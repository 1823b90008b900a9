//! Resilience: circuit breakers, bulkheads, adaptive concurrency, retry
//! budgets and rate limits.

pub mod adaptive;
pub mod breaker;
pub mod budget;
pub mod bulkhead;
pub mod ratelimit;
pub mod state;
