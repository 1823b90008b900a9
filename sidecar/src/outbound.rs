//! The outbound listener: connections the app made, redirected here by
//! iptables. Mesh destinations get mTLS; others pass through or are refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use crate::config::{Decision, Proto, Snapshot, Target};
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
    if let Some(target) = snap.target(dst)
        && is_mesh(&snap, &target)
    {
        let l7 = match target.proto {
            Proto::Http1 | Proto::Http2 => true,
            Proto::Tcp => false,
            Proto::Auto => {
                let t = std::time::Instant::now();
                let http = sniff_http(&down).await;
                let m = &proxy.metrics;
                m.detection_duration.observe(t.elapsed().as_secs_f64());
                let result = if http { "http" } else { "tcp" };
                m.detections
                    .get_or_create(&crate::telemetry::ResultLabel { result })
                    .inc();
                http
            }
        };
        if l7 {
            return crate::http::outbound::serve(proxy, down, peer, target).await;
        }
    }
    match snap.outbound(dst) {
        Decision::Mesh(up) => {
            let peer_id = up.identity.clone().expect("mesh upstream has an identity");
            // Bulkhead for opaque TCP: at most `maxConnections` to the service.
            let policy = snap.policy(&up.service).cloned();
            let guards = proxy.guards.for_service(&up.service, policy.as_deref());
            let _slot = match &guards.connections {
                Some(sem) => match sem.clone().try_acquire_owned() {
                    Ok(p) => Some(p),
                    Err(_) => {
                        m.refused("outbound", "bulkhead_full");
                        m.bulkhead_rejections
                            .get_or_create(&crate::telemetry::ServiceLabel {
                                service: up.service.clone(),
                            })
                            .inc();
                        return reset(down);
                    }
                },
                None => None,
            };
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
            let (bytes_sent, bytes_received) = crate::relay::relay(m, "outbound", down, tls).await;
            tracing::info!(target: "bulwark::access", bytes_sent, bytes_received, direction = "outbound", src = %peer, dst = %dst,
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
            let (bytes_sent, bytes_received) = crate::relay::relay(m, "outbound", down, up).await;
            tracing::info!(target: "bulwark::access", bytes_sent, bytes_received, direction = "outbound", src = %peer, dst = %dst,
                mtls = false, duration_ms = started.elapsed().as_millis() as u64, "passthrough connection closed");
        }
        Decision::Refuse => {
            tracing::info!(%dst, "outbound destination not in the registry (REGISTRY_ONLY): refused");
            m.refused("outbound", "registry_only");
            reset(down)
        }
    }
}

/// Whether a target is served by mesh workloads (so HTTP can ride the
/// pooled mTLS connections).
fn is_mesh(snap: &Snapshot, t: &Target) -> bool {
    match &t.pinned {
        Some(up) => up.identity.is_some(),
        None => snap
            .endpoints_of(&t.service, t.port, &[])
            .iter()
            .any(|u| u.identity.is_some()),
    }
}

/// How many of the client's first bytes [`sniff`] looks at.
pub const SNIFF_BYTES: usize = 16;

/// What the first bytes of a connection say about its protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// An HTTP/1 request line or the HTTP/2 preface.
    Http,
    /// Anything else.
    Opaque,
    /// A prefix of a request line (upper-case method so far): wait for more.
    NeedMore,
}

/// Classifies the client's first bytes (at most [`SNIFF_BYTES`] are looked
/// at; with that many and still undecided, the answer is opaque).
pub fn sniff(first: &[u8]) -> Sniffed {
    let b = &first[..first.len().min(SNIFF_BYTES)];
    if b.starts_with(b"PRI * HTTP/2") {
        return Sniffed::Http;
    }
    if let Some(sp) = b.iter().position(|c| *c == b' ') {
        return if sp > 0 && b[..sp].iter().all(|c| c.is_ascii_uppercase()) {
            Sniffed::Http
        } else {
            Sniffed::Opaque
        };
    }
    if b.is_empty() || b.len() == SNIFF_BYTES || !b.iter().all(|c| c.is_ascii_uppercase()) {
        return Sniffed::Opaque;
    }
    Sniffed::NeedMore
}

/// Protocol detection for `auto` ports: HTTP if the client's first bytes
/// are an HTTP/1 request line or the HTTP/2 preface. If the client sends
/// nothing for a moment (a server-speaks-first protocol such as MySQL or
/// SMTP), it is opaque TCP: never stall waiting for a client that will not
/// speak.
async fn sniff_http(s: &TcpStream) -> bool {
    let mut buf = [0u8; SNIFF_BYTES];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(300);
    loop {
        let n = match tokio::time::timeout_at(deadline, s.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return false,
        };
        match sniff(&buf[..n]) {
            Sniffed::Http => return true,
            Sniffed::Opaque => return false,
            // Part of a request line so far: wait briefly for the rest.
            Sniffed::NeedMore => tokio::time::sleep(std::time::Duration::from_millis(1)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniff_tells_http_from_opaque_and_waits_on_a_partial_method() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Sniffed::Http);
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n\r\nSM"), Sniffed::Http);
        assert_eq!(sniff(b"GE"), Sniffed::NeedMore);
        assert_eq!(sniff(b"\x16\x03\x01"), Sniffed::Opaque);
        assert_eq!(sniff(b" GET"), Sniffed::Opaque);
        assert_eq!(sniff(b"get / HTTP/1.1"), Sniffed::Opaque);
        assert_eq!(sniff(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"), Sniffed::Opaque);
        assert_eq!(sniff(b""), Sniffed::Opaque);
    }
}
