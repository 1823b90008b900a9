//! Bulwark's identity system: SPIFFE IDs, the certificate authority that
//! issues short-lived X.509 SVIDs from CSRs, bootstrap tokens, root rotation,
//! the gRPC `CertificateService` and the client workloads use.

pub mod admission;
pub mod authority;
pub mod client;
pub mod identity;
pub mod kube;
pub mod metrics;
pub mod record;
pub mod server;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;
pub mod token;

pub use identity::SpiffeId;

/// Fills `buf` from the operating system's CSPRNG (via aws-lc).
pub fn fill_random(buf: &mut [u8]) {
    aws_lc_rs::rand::fill(buf).expect("system random number generator failed");
}

/// `N` random bytes.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    fill_random(&mut b);
    b
}

/// A random, positive, 128-bit certificate serial number.
pub fn random_serial() -> rcgen::SerialNumber {
    let mut b: [u8; 16] = random_bytes();
    b[0] &= 0x7f;
    b[0] |= 0x01; // never a leading zero byte, never zero
    rcgen::SerialNumber::from_slice(&b)
}
