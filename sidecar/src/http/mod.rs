//! HTTP-level concerns: routing (and, as the L7 data plane lands, proxying,
//! retries and timeouts).

pub mod route;
