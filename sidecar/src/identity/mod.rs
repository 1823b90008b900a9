//! The workload's identity: its SVID, the trust bundle, and their rotation.

mod manager;

pub use manager::{CertManager, IdentityOptions};
