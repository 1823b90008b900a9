//! rustls configurations for mesh hops: TLS 1.3 only, our ALPN, SPIFFE
//! verification against the live trust bundle, the live certificate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bulwark_ca::SpiffeId;
use bulwark_ca::tls::{
    ALPN_MESH_TCP, ExpectedServer, SpiffeClientVerifier, SpiffeServerVerifier, provider,
};

use crate::identity::CertManager;

/// Peer identity and ALPN.
type ConfigKey = (SpiffeId, &'static [u8]);

/// Client configs per expected peer identity. Cached: they hold the live
/// certificate and bundle by reference, so rotation needs no rebuild.
pub struct ClientConfigs {
    identity: Arc<CertManager>,
    cache: Mutex<HashMap<ConfigKey, Arc<rustls::ClientConfig>>>,
}

impl ClientConfigs {
    pub fn new(identity: Arc<CertManager>) -> Self {
        Self {
            identity,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// For a given ALPN (`ALPN_MESH_TCP` or `ALPN_MESH_H2`).
    pub fn for_peer_alpn(&self, peer: &SpiffeId, alpn: &'static [u8]) -> Arc<rustls::ClientConfig> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let key = (peer.clone(), alpn);
        if let Some(c) = cache.get(&key) {
            return c.clone();
        }
        let verifier = SpiffeServerVerifier::new(
            self.identity.bundle(),
            ExpectedServer::AnyOf(vec![peer.clone()]),
        );
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3 is supported")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(self.identity.cert()));
        cfg.alpn_protocols = vec![alpn.to_vec()];
        let cfg = Arc::new(cfg);
        // Bounded: one entry per peer identity in the mesh.
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(key, cfg.clone());
        cfg
    }
}

/// The inbound server config: a client certificate chaining to the bundle
/// is mandatory; authorization of its SPIFFE ID happens after the handshake.
pub fn server_config(identity: &CertManager) -> Arc<rustls::ServerConfig> {
    let verifier = SpiffeClientVerifier::new(identity.bundle(), true);
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 is supported")
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(identity.cert()));
    cfg.alpn_protocols = vec![ALPN_MESH_H2.to_vec(), ALPN_MESH_TCP.to_vec()];
    Arc::new(cfg)
}

/// ALPN for pooled, multiplexed HTTP/2 between sidecars.
pub const ALPN_MESH_H2: &[u8] = b"bulwark/h2";

/// How much of a sidecar-to-sidecar TLS connection is read per system call:
/// two full TLS records. rustls asks for 4 KiB at a time; unbuffered, each
/// 16 KiB record of a bulk transfer would cost four reads.
pub const READ_BUFFER: usize = 32 * 1024;

/// A TCP connection under TLS, read through a [`READ_BUFFER`] buffer
/// (writes pass straight through).
pub type Buffered = tokio::io::BufReader<tokio::net::TcpStream>;

pub fn buffered(tcp: tokio::net::TcpStream) -> Buffered {
    tokio::io::BufReader::with_capacity(READ_BUFFER, tcp)
}
