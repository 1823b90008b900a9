//! The edge gateway: the same proxy at the mesh edge. Public TLS listeners
//! (certificates by SNI, reloaded on change), JWT authentication, claims
//! authorization, per-client rate limits and request validation, then into
//! the mesh over mTLS like any sidecar request.

pub mod certs;
pub mod clients;
pub mod jwks;
pub mod jwt;
pub mod schema;
pub mod server;

pub use server::{GatewayOptions, run};
