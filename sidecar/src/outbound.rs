//! The outbound listener: connections the app made, redirected here by
//! iptables. Mesh destinations get mTLS; others pass through or are refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use crate::config::Decision;
use crate::intercept::{connect_marked, original_dst};
use crate::telemetry::{ConnLabels, HandshakeLabels};
use crate::{Proxy, reset};

pub async fn handle(proxy: Arc<Proxy>, down: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let m = &proxy.metrics;
    let dst = match original_dst(&down) {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "outbound connection without an original destination");
            m.refused("outbound", "no_original_dst");
            return reset(down);
        }
    };
    if dst.port() == proxy.outbound_port && down.local_addr().is_ok_and(|l| l.ip() == dst.ip()) {
        m.refused("outbound", "loop");
        return reset(down);
    }
    let Some(snap) = proxy.config.load() else {
        m.refused("outbound", "no_config");
        return reset(down);
    };
    let _ = down.set_nodelay(true);
    match snap.outbound(dst) {
        Decision::Mesh(up) => {
            let peer_id = up.identity.clone().expect("mesh upstream has an identity");
            let tcp = match tokio::time::timeout(
                proxy.connect_timeout,
                connect_marked(up.addr, proxy.mark),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(dst = %up.addr, error = %e, "upstream connect failed");
                    m.refused("outbound", "connect_failed");
                    return reset(down);
                }
                Err(_) => {
                    m.refused("outbound", "connect_timeout");
                    return reset(down);
                }
            };
            let connector =
                tokio_rustls::TlsConnector::from(proxy.client_configs.for_peer(&peer_id));
            let tls = match tokio::time::timeout(
                proxy.connect_timeout,
                connector.connect(ServerName::IpAddress(up.addr.ip().into()), tcp),
            )
            .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    m.tls_handshakes
                        .get_or_create(&HandshakeLabels {
                            direction: "outbound",
                            result: "error",
                        })
                        .inc();
                    tracing::warn!(dst = %up.addr, expected = %peer_id, error = %e, "mTLS handshake with upstream failed");
                    return reset(down);
                }
                Err(_) => {
                    m.tls_handshakes
                        .get_or_create(&HandshakeLabels {
                            direction: "outbound",
                            result: "timeout",
                        })
                        .inc();
                    return reset(down);
                }
            };
            m.tls_handshakes
                .get_or_create(&HandshakeLabels {
                    direction: "outbound",
                    result: "ok",
                })
                .inc();
            let me = proxy.identity.identity().to_string();
            m.tcp_connections
                .get_or_create(&ConnLabels {
                    direction: "outbound",
                    src_identity: me.clone(),
                    dst_identity: peer_id.to_string(),
                })
                .inc();
            crate::relay::relay(m, "outbound", down, tls).await;
            tracing::info!(target: "bulwark::access", direction = "outbound", src = %peer, dst = %dst,
                upstream = %up.addr, service = %up.service, src_identity = %me, dst_identity = %peer_id,
                mtls = true, duration_ms = started.elapsed().as_millis() as u64, "connection closed");
        }
        Decision::Passthrough => {
            let up =
                match tokio::time::timeout(proxy.connect_timeout, connect_marked(dst, proxy.mark))
                    .await
                {
                    Ok(Ok(s)) => s,
                    _ => {
                        m.refused("outbound", "connect_failed");
                        return reset(down);
                    }
                };
            m.tcp_connections
                .get_or_create(&ConnLabels {
                    direction: "outbound",
                    src_identity: proxy.identity.identity().to_string(),
                    dst_identity: String::new(),
                })
                .inc();
            crate::relay::relay(m, "outbound", down, up).await;
            tracing::info!(target: "bulwark::access", direction = "outbound", src = %peer, dst = %dst,
                mtls = false, duration_ms = started.elapsed().as_millis() as u64, "passthrough connection closed");
        }
        Decision::Refuse => {
            tracing::info!(%dst, "outbound destination not in the registry (REGISTRY_ONLY): refused");
            m.refused("outbound", "registry_only");
            reset(down)
        }
    }
}
