//! The inbound listener: connections to the pod's ports, redirected here.
//! Mesh peers arrive over mTLS; their SPIFFE ID is authorized, then the
//! bytes go to the app on the original port over loopback.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_ca::SpiffeId;
use bulwark_proto::config::v1::MtlsMode;
use tokio::net::TcpStream;

use crate::intercept::{connect_marked, original_dst};
use crate::telemetry::{ConnLabels, DenialLabels, HandshakeLabels};
use crate::{Proxy, reset};

/// How long a client may take to send its first byte before we decide
/// it is not a TLS client (server-speaks-first protocols send nothing).
const FIRST_BYTE_WAIT: Duration = Duration::from_secs(5);
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

pub async fn handle(proxy: Arc<Proxy>, down: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let m = &proxy.metrics;
    let dst = match original_dst(&down, peer) {
        Ok(d) if d.port() != proxy.inbound_port => d,
        _ => {
            m.refused("inbound", "no_original_dst");
            return reset(down);
        }
    };
    let Some(snap) = proxy.config.load() else {
        m.refused("inbound", "no_config");
        return reset(down);
    };
    let _ = down.set_nodelay(true);
    let mut first = [0u8; 1];
    let is_tls = match tokio::time::timeout(FIRST_BYTE_WAIT, down.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 => first[0] == TLS_HANDSHAKE_RECORD,
        Ok(_) => return, // closed before sending anything
        Err(_) => false,
    };
    let app = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), dst.port());

    if !is_tls {
        if snap.mtls_mode == MtlsMode::Strict {
            tracing::info!(%peer, %dst, "plaintext connection refused (STRICT mTLS)");
            m.refused("inbound", "plaintext");
            return reset(down);
        }
        if let Err(service) = snap.authorize_l4(dst.port(), None) {
            deny(&proxy, peer, dst, None, &service);
            return reset(down);
        }
        let Some(up) = connect_app(&proxy, app).await else {
            return reset(down);
        };
        count(&proxy, "", "inbound");
        let (bytes_sent, bytes_received) = crate::relay::relay(m, "inbound", down, up).await;
        tracing::info!(target: "bulwark::access", bytes_sent, bytes_received, direction = "inbound", src = %peer, dst = %dst,
            src_identity = "", mtls = false, duration_ms = started.elapsed().as_millis() as u64, "connection closed");
        return;
    }

    let acceptor = tokio_rustls::TlsAcceptor::from(proxy.server_config.clone());
    let tls = match tokio::time::timeout(
        proxy.connect_timeout,
        acceptor.accept(crate::tls::buffered(down)),
    )
    .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            m.tls_handshakes
                .get_or_create(&HandshakeLabels {
                    direction: "inbound",
                    result: "error",
                })
                .inc();
            m.refused("inbound", "tls_handshake");
            tracing::info!(%peer, error = %e, "inbound mTLS handshake failed");
            return;
        }
        Err(_) => {
            m.tls_handshakes
                .get_or_create(&HandshakeLabels {
                    direction: "inbound",
                    result: "timeout",
                })
                .inc();
            m.refused("inbound", "tls_handshake");
            return;
        }
    };
    m.tls_handshakes
        .get_or_create(&HandshakeLabels {
            direction: "inbound",
            result: "ok",
        })
        .inc();
    let src_id = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        Some(leaf) => match bulwark_ca::tls::spiffe_id_of(leaf) {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "verified peer without a SPIFFE ID");
                m.refused("inbound", "no_identity");
                return;
            }
        },
        None => {
            m.refused("inbound", "no_identity");
            return;
        }
    };
    if tls.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_MESH_H2) {
        // Pooled HTTP/2 from a peer sidecar: authorized per request.
        count(&proxy, &src_id.to_string(), "inbound");
        return crate::http::inbound::serve(proxy.clone(), tls, src_id, dst.port()).await;
    }
    match snap.authorize_l4(dst.port(), Some(&src_id)) {
        Ok(policy) => proxy.audit(
            &src_id.to_string(),
            snap.local_service(dst.port()).unwrap_or(""),
            "",
            "",
            true,
            &policy,
            None,
        ),
        Err(service) => {
            proxy.audit(
                &src_id.to_string(),
                &service,
                "",
                "",
                false,
                "default-deny",
                Some("no AuthorizationPolicy rule allows this caller"),
            );
            deny(&proxy, peer, dst, Some(&src_id), &service);
            return;
        }
    }
    let Some(up) = connect_app(&proxy, app).await else {
        return;
    };
    let src = src_id.to_string();
    count(&proxy, &src, "inbound");
    let (bytes_sent, bytes_received) = crate::relay::relay(m, "inbound", tls, up).await;
    tracing::info!(target: "bulwark::access", bytes_sent, bytes_received, direction = "inbound", src = %peer, dst = %dst,
        src_identity = %src, dst_identity = %proxy.identity.identity(), mtls = true,
        duration_ms = started.elapsed().as_millis() as u64, "connection closed");
}

fn count(proxy: &Proxy, src: &str, direction: &'static str) {
    proxy
        .metrics
        .tcp_connections
        .get_or_create(&ConnLabels {
            direction,
            src_identity: src.to_string(),
            dst_identity: proxy.identity.identity().to_string(),
        })
        .inc();
}

fn deny(proxy: &Proxy, peer: SocketAddr, dst: SocketAddr, src: Option<&SpiffeId>, service: &str) {
    let src_identity = src.map(|s| s.to_string()).unwrap_or_default();
    proxy
        .metrics
        .authz_denials
        .get_or_create(&DenialLabels {
            direction: "inbound",
            src_identity: src_identity.clone(),
        })
        .inc();
    tracing::info!(target: "bulwark::access", direction = "inbound", src = %peer, dst = %dst,
        src_identity = %src_identity, service, decision = "deny", "connection denied by authorization policy");
}

async fn connect_app(proxy: &Proxy, app: SocketAddr) -> Option<TcpStream> {
    match tokio::time::timeout(proxy.connect_timeout, connect_marked(app, proxy.mark)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::info!(%app, error = %e, "cannot reach the app");
            proxy.metrics.refused("inbound", "app_unreachable");
            None
        }
        Err(_) => {
            proxy.metrics.refused("inbound", "app_unreachable");
            None
        }
    }
}
