//! rustls configurations for mesh hops: TLS 1.3 only, our ALPN, SPIFFE
//! verification against the live trust bundle, the live certificate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bulwark_ca::SpiffeId;
use bulwark_ca::tls::{
    ALPN_MESH_TCP, ExpectedServer, SpiffeClientVerifier, SpiffeServerVerifier, provider,
    without_resumption_client, without_resumption_server,
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
        without_resumption_client(&mut cfg);
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
    // Inbound authorization reads the peer's leaf: it must be verified on
    // every connection.
    without_resumption_server(&mut cfg);
    Arc::new(cfg)
}

/// ALPN for pooled, multiplexed HTTP/2 between sidecars.
pub const ALPN_MESH_H2: &[u8] = b"bulwark/h2";

/// A mesh connection lives no longer than the certificates of its
/// handshake: TLS 1.3 without resumption checks them once, so an expired
/// SVID would otherwise go on being honoured for as long as the connection
/// lasts. The client stops giving a connection new requests this long
/// before the first of them expires...
pub const REUSE_MARGIN: std::time::Duration = std::time::Duration::from_secs(10);
/// ... the server sends GOAWAY this long before (so requests in flight
/// finish), and at the expiry itself the connection is closed.
pub const GOAWAY_MARGIN: std::time::Duration = std::time::Duration::from_secs(5);

/// When the certificates a finished handshake's peer presented expire, on
/// the runtime's clock; `None` if none can be read.
pub fn peer_expiry(conn: &rustls::CommonState) -> Option<tokio::time::Instant> {
    let not_after = bulwark_ca::tls::chain_not_after(conn.peer_certificates()?)?;
    Some(deadline_at(not_after))
}

/// Unix time `not_after` as a deadline on the runtime's clock (now, if past).
pub fn deadline_at(not_after: i64) -> tokio::time::Instant {
    let at = std::time::UNIX_EPOCH
        + std::time::Duration::from_secs(u64::try_from(not_after).unwrap_or(0));
    let left = at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::Instant::now() + left
}

/// `deadline` less `margin` (a past instant is simply due).
pub fn before(deadline: tokio::time::Instant, margin: std::time::Duration) -> tokio::time::Instant {
    deadline.checked_sub(margin).unwrap_or(deadline)
}

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

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::path::{Path, PathBuf};
    use std::time::{Duration, SystemTime};

    use bulwark_ca::authority::{Authority, check_csr};
    use bulwark_ca::client::{Svid, new_csr};
    use bulwark_ca::store;
    use bulwark_ca::testing::handshake;
    use rustls::HandshakeKind;
    use rustls_pki_types::ServerName;

    use super::*;
    use crate::identity::IdentityOptions;
    use crate::telemetry::Metrics;

    fn authority(dir: &Path) -> Authority {
        store::init(
            dir,
            &store::Settings::new("cluster.local"),
            store::RootSource::Generate,
        )
        .unwrap();
        Authority::from_material(store::load(dir).unwrap()).unwrap()
    }

    /// A manager holding an SVID for `id` from `ca`.
    fn manager(ca: &Authority, id: &str) -> Arc<CertManager> {
        let id: SpiffeId = id.parse().unwrap();
        let (key, csr) = new_csr(&id).unwrap();
        let issued = ca
            .sign(
                check_csr(&csr).unwrap(),
                &id,
                Some(Duration::from_secs(600)),
                SystemTime::now().into(),
            )
            .unwrap();
        let svid =
            Svid::from_pem_parts(&key.serialize_pem(), &issued.chain_pem, &issued.bundle_pem)
                .unwrap();
        let m = CertManager::new(
            IdentityOptions {
                identity: id,
                ca_addr: "127.0.0.1:1".into(),
                ca_bundle: svid.bundle.clone(),
                token_file: PathBuf::from("/nonexistent"),
                ttl: None,
                renew_fraction: 0.5,
            },
            0,
            Arc::new(Metrics::default()),
        );
        m.install(svid).unwrap();
        m
    }

    #[test]
    fn mesh_handshakes_are_never_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let ca = authority(dir.path());
        let web = manager(&ca, "spiffe://cluster.local/ns/default/sa/web");
        let api = manager(&ca, "spiffe://cluster.local/ns/default/sa/api");
        let client = ClientConfigs::new(web).for_peer_alpn(api.identity(), ALPN_MESH_TCP);
        let server = server_config(&api);
        let peer = || ServerName::IpAddress(IpAddr::from(Ipv4Addr::LOCALHOST).into());
        // The same configs with rustls' default resumption, as a check that
        // this harness does resume when both sides allow it.
        let mut resuming_client = (*client).clone();
        resuming_client.resumption = rustls::client::Resumption::default();
        let resuming_client = Arc::new(resuming_client);
        let mut resuming_server = (*server).clone();
        resuming_server.session_storage = rustls::server::ServerSessionMemoryCache::new(16);
        resuming_server.send_tls13_tickets = 2;
        let resuming_server = Arc::new(resuming_server);
        // Two handshakes each: a resumed one would take the peer's
        // certificates from the first without verifying them again.
        let kinds = |c: &Arc<rustls::ClientConfig>, s: &Arc<rustls::ServerConfig>| {
            [handshake(c, s, peer()), handshake(c, s, peer())]
        };
        assert_eq!(
            kinds(&resuming_client, &resuming_server),
            [Some(HandshakeKind::Full), Some(HandshakeKind::Resumed)]
        );
        let full = [Some(HandshakeKind::Full); 2];
        assert_eq!(kinds(&client, &server), full);
        assert_eq!(kinds(&client, &resuming_server), full, "client side");
        assert_eq!(kinds(&resuming_client, &server), full, "server side");
    }
}
