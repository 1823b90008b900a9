//! Connections to peer sidecars: a marked TCP connection and an mTLS
//! handshake expecting the peer's SPIFFE ID, each bounded by the connect
//! timeout, handshakes counted by outcome. Shared by opaque TCP, the
//! pooled HTTP/2 connections and upgrade tunnels.

use std::net::SocketAddr;

use rustls_pki_types::ServerName;

use crate::Proxy;
use crate::intercept::connect_marked;
use crate::telemetry::HandshakeLabels;

/// An mTLS connection to a peer sidecar.
pub type MeshStream = tokio_rustls::client::TlsStream<crate::tls::Buffered>;

/// Why a connection to a peer sidecar could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connect to {0} failed: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("connect to {0} timed out")]
    ConnectTimeout(SocketAddr),
    #[error("mTLS handshake with {0} failed: {1}")]
    Tls(SocketAddr, std::io::Error),
    #[error("mTLS handshake with {0} timed out")]
    TlsTimeout(SocketAddr),
}

/// A connection to the peer sidecar at `addr`, verified to be `peer_id`,
/// speaking `alpn`.
pub async fn dial_peer(
    proxy: &Proxy,
    addr: SocketAddr,
    peer_id: &bulwark_ca::SpiffeId,
    alpn: &'static [u8],
) -> Result<MeshStream, DialError> {
    let tcp = tokio::time::timeout(proxy.connect_timeout, connect_marked(addr, proxy.mark))
        .await
        .map_err(|_| DialError::ConnectTimeout(addr))?
        .map_err(|e| DialError::Connect(addr, e))?;
    let connector =
        tokio_rustls::TlsConnector::from(proxy.client_configs.for_peer_alpn(peer_id, alpn));
    let handshake = connector.connect(
        ServerName::IpAddress(addr.ip().into()),
        crate::tls::buffered(tcp),
    );
    let result = match tokio::time::timeout(proxy.connect_timeout, handshake).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(DialError::Tls(addr, e)),
        Err(_) => Err(DialError::TlsTimeout(addr)),
    };
    let outcome = match &result {
        Ok(_) => "ok",
        Err(DialError::TlsTimeout(_)) => "timeout",
        Err(_) => "error",
    };
    proxy
        .metrics
        .tls_handshakes
        .get_or_create(&HandshakeLabels {
            direction: "outbound",
            result: outcome,
        })
        .inc();
    if let Err(e) = &result {
        tracing::warn!(dst = %addr, expected = %peer_id, error = %e, "mTLS handshake with upstream failed");
    }
    result
}
