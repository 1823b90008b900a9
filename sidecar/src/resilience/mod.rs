//! Resilience: circuit breakers and bulkheads (rate limits reuse the CA's
//! token bucket, `bulwark_ca::admission::TokenBucket`).

pub mod breaker;
pub mod budget;
pub mod bulkhead;
pub mod state;
