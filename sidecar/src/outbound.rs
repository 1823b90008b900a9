//! The outbound listener: connections the app made, redirected here by
//! iptables. Mesh destinations get mTLS; others pass through or are refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{Decision, Proto, Snapshot, Target};
use crate::dial::{DialError, MeshStream, dial_peer};
use crate::intercept::{connect_marked, original_dst};
use crate::telemetry::ConnLabels;
use crate::{Proxy, reset};

pub async fn handle(proxy: Arc<Proxy>, down: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let m = &proxy.metrics;
    let dst = match original_dst(&down, peer) {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "outbound connection without an original destination");
            m.refused("outbound", "no_original_dst");
            return reset(down);
        }
    };
    if dst.port() == proxy.outbound_port
        && down
            .local_addr()
            .is_ok_and(|l| l.ip().to_canonical() == dst.ip())
    {
        m.refused("outbound", "loop");
        return reset(down);
    }
    let Some(snap) = proxy.config.load() else {
        m.refused("outbound", "no_config");
        return reset(down);
    };
    let _ = down.set_nodelay(true);
    let mut early = None;
    if let Some(target) = snap.target(dst)
        && is_mesh(&snap, &target)
    {
        let l7 = match target.proto {
            Proto::Http1 | Proto::Http2 => true,
            Proto::Tcp => false,
            Proto::Auto => {
                let t = Instant::now();
                let detected = Box::pin(detect(&proxy, &snap, &down, dst)).await;
                let result = match &detected {
                    Detected::Http => "http",
                    // The server's greeting decided, not a late client.
                    Detected::Opaque(Some(e)) if !e.greeting.is_empty() => "server_first",
                    Detected::Opaque(_) | Detected::Failed => "tcp",
                };
                m.detection_duration.observe(t.elapsed().as_secs_f64());
                m.detections
                    .get_or_create(&crate::telemetry::ResultLabel { result })
                    .inc();
                match detected {
                    Detected::Http => true,
                    Detected::Opaque(e) => {
                        early = e;
                        false
                    }
                    Detected::Failed => return reset(down),
                }
            }
        };
        if l7 {
            return crate::http::outbound::serve(proxy, down, peer, target).await;
        }
    }
    // Boxed: opaque TCP carries its own TLS connect and relay state, which
    // the HTTP connections (the common case) should not be sized for.
    Box::pin(tcp(&proxy, &snap, down, peer, dst, early, started)).await;
}

/// An intercepted connection relayed as opaque TCP: over mTLS to a mesh
/// workload, straight through to a passthrough destination, or refused.
async fn tcp(
    proxy: &Arc<Proxy>,
    snap: &Snapshot,
    down: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    early: Option<Box<Early>>,
    started: Instant,
) {
    let m = &proxy.metrics;
    match snap.outbound(dst) {
        Decision::Mesh(up) => {
            let peer_id = up.identity.clone().expect("mesh upstream has an identity");
            // Bulkhead for opaque TCP: at most `maxConnections` to the service.
            let guards = proxy
                .guards
                .for_service(&up.service, snap.policy(&up.service));
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
            // An `auto` port whose server spoke first has its connection
            // already, with the server's first bytes read from it.
            let (tls, greeting) = match early {
                Some(e) => {
                    let Early { tls, greeting } = *e;
                    (tls, greeting)
                }
                None => match connect_mesh(proxy, up.addr, &peer_id).await {
                    Some(t) => (t, Vec::new()),
                    None => return reset(down),
                },
            };
            let me = proxy.identity.identity().to_string();
            m.tcp_connections
                .get_or_create(&ConnLabels {
                    direction: "outbound",
                    src_identity: me.clone(),
                    dst_identity: peer_id.to_string(),
                })
                .inc();
            let mut down = down;
            if !greeting.is_empty() && down.write_all(&greeting).await.is_err() {
                return;
            }
            let (bytes_sent, bytes_received) = crate::relay::relay(m, "outbound", down, tls).await;
            let bytes_received = bytes_received + greeting.len() as u64;
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
/// at; with that many and still undecided, the answer is opaque). Empty
/// lines before a request line are skipped, as HTTP servers do (RFC 9112
/// section 2.2): `\r\nGET / HTTP/1.1` is HTTP to the app, so it is to us.
pub fn sniff(first: &[u8]) -> Sniffed {
    let b = &first[..first.len().min(SNIFF_BYTES)];
    let blank = b.iter().take_while(|c| matches!(c, b'\r' | b'\n')).count();
    if blank > 0 {
        let rest = &b[blank..];
        let full = b.len() == SNIFF_BYTES;
        // Undecided for want of room, the blank lines having taken it:
        // whatever comes next is read by the app as a request, so it is
        // one (never opaque, which would carry it past the proxy's HTTP).
        return match sniff(rest) {
            Sniffed::Opaque if rest.is_empty() => {
                if full {
                    Sniffed::Http
                } else {
                    Sniffed::NeedMore
                }
            }
            Sniffed::NeedMore if full => Sniffed::Http,
            other => other,
        };
    }
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

/// An opaque-TCP mTLS connection to a peer sidecar; a failure is counted
/// as the refused connection's reason.
async fn connect_mesh(
    proxy: &Proxy,
    addr: SocketAddr,
    peer_id: &bulwark_ca::SpiffeId,
) -> Option<MeshStream> {
    match dial_peer(proxy, addr, peer_id, bulwark_ca::tls::ALPN_MESH_TCP).await {
        Ok(t) => Some(t),
        Err(DialError::Connect(_, e)) => {
            tracing::info!(dst = %addr, error = %e, "upstream connect failed");
            proxy.metrics.refused("outbound", "connect_failed");
            None
        }
        Err(DialError::ConnectTimeout(_)) => {
            proxy.metrics.refused("outbound", "connect_timeout");
            None
        }
        Err(DialError::Tls(..) | DialError::TlsTimeout(_)) => None,
    }
}

/// How long an `auto` port waits for the client's first bytes before it
/// also connects upstream. Clients of client-first protocols (HTTP, TLS)
/// send at once; waiting this long first spares them a connection made for
/// nothing, and a server-speaks-first protocol is delayed by no more.
pub(crate) const CLIENT_FIRST_WINDOW: std::time::Duration = std::time::Duration::from_millis(10);
/// How long a client may sit on the first bytes of what could be an HTTP
/// method before the connection is taken as opaque: HTTP clients send the
/// request line in one write, and a binary protocol whose first bytes
/// happen to be capital letters must not be held forever.
pub(crate) const PARTIAL_METHOD_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Largest server greeting read while detecting (the rest is relayed).
const GREETING_BYTES: usize = 4096;

/// What protocol detection on an `auto` port found.
enum Detected {
    /// The client sent an HTTP/1 request line or the HTTP/2 preface.
    Http,
    /// Opaque TCP: the client sent something else or closed (`None`), or
    /// the server spoke first (its connection and first bytes).
    Opaque(Option<Box<Early>>),
    /// The server could not be reached while the client stayed silent.
    Failed,
}

/// A connection made upstream during detection, on which the server spoke first.
struct Early {
    tls: MeshStream,
    greeting: Vec<u8>,
}

/// Protocol detection for `auto` ports, without stalling server-speaks-first
/// protocols (MySQL, SMTP): if the client says nothing within
/// [`CLIENT_FIRST_WINDOW`], the sidecar connects upstream at once, and
/// whichever side speaks first decides: the client's bytes are sniffed
/// (HTTP or opaque), the server's make it opaque and are passed on.
async fn detect(proxy: &Proxy, snap: &Snapshot, down: &TcpStream, dst: SocketAddr) -> Detected {
    if let Ok(http) = tokio::time::timeout(CLIENT_FIRST_WINDOW, client_speaks_http(down)).await {
        return if http {
            Detected::Http
        } else {
            Detected::Opaque(None)
        };
    }
    let Decision::Mesh(up) = snap.outbound(dst) else {
        return Detected::Opaque(None);
    };
    let peer_id = up.identity.clone().expect("mesh upstream has an identity");
    let connect = connect_mesh(proxy, up.addr, &peer_id);
    tokio::pin!(connect);
    let mut tls: Option<MeshStream> = None;
    let mut buf = vec![0u8; GREETING_BYTES];
    loop {
        tokio::select! {
            http = client_speaks_http(down) => {
                if http {
                    // The connection made for nothing (or still being made) is dropped.
                    return Detected::Http;
                }
                let tls = match tls {
                    Some(t) => t,
                    None => match connect.await {
                        Some(t) => t,
                        None => return Detected::Failed,
                    },
                };
                return Detected::Opaque(Some(Box::new(Early { tls, greeting: Vec::new() })));
            }
            c = &mut connect, if tls.is_none() => match c {
                Some(t) => tls = Some(t),
                None => return Detected::Failed,
            },
            n = read_some(tls.as_mut(), &mut buf) => {
                let Some(tls) = tls.take() else { unreachable!("read_some waits without a stream") };
                buf.truncate(n);
                return Detected::Opaque(Some(Box::new(Early { tls, greeting: buf })));
            }
        }
    }
}

/// Reads the server's first bytes (0 at its end or on error); without a
/// stream yet, waits forever.
async fn read_some(tls: Option<&mut MeshStream>, buf: &mut [u8]) -> usize {
    match tls {
        Some(t) => t.read(buf).await.unwrap_or(0),
        None => std::future::pending().await,
    }
}

/// Waits for the client's first bytes: true if they are an HTTP/1 request
/// line or the HTTP/2 preface, false for anything else, the client's end,
/// or a partial method left unfinished for [`PARTIAL_METHOD_WAIT`]. Only
/// peeks, so it can be abandoned at any point.
async fn client_speaks_http(s: &TcpStream) -> bool {
    let mut buf = [0u8; SNIFF_BYTES];
    let mut partial_since = None;
    loop {
        let n = match s.peek(&mut buf).await {
            Ok(n) if n > 0 => n,
            _ => return false,
        };
        match sniff(&buf[..n]) {
            Sniffed::Http => return true,
            Sniffed::Opaque => return false,
            // Part of a request line so far: wait briefly for the rest.
            Sniffed::NeedMore => {
                let since = *partial_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= PARTIAL_METHOD_WAIT {
                    return false;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await
            }
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
        // Blank lines before the request line are skipped, as apps do.
        assert_eq!(sniff(b"\r\nGET / HTTP/1.1"), Sniffed::Http);
        assert_eq!(sniff(b"\r\n"), Sniffed::NeedMore);
        assert_eq!(sniff(b"\r\nGE"), Sniffed::NeedMore);
        assert_eq!(sniff(b"\r\n\x16\x03"), Sniffed::Opaque);
        assert_eq!(sniff(b"\r\n\r\n\r\n\r\n\r\n\r\n\r\nGE"), Sniffed::Http);
        assert_eq!(sniff(&b"\r\n".repeat(8)), Sniffed::Http);
        assert_eq!(sniff(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"), Sniffed::Opaque);
        assert_eq!(sniff(b""), Sniffed::Opaque);
    }

    /// A client that sends "GE" and then nothing is opaque after the wait,
    /// not held for ever; one that finishes its request line in time is HTTP.
    #[tokio::test(start_paused = true)]
    async fn a_partial_method_left_unfinished_is_opaque_after_the_wait() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        c.write_all(b"GE").await.unwrap();
        let started = tokio::time::Instant::now();
        assert!(!client_speaks_http(&s).await);
        let waited = started.elapsed();
        assert!(
            waited >= PARTIAL_METHOD_WAIT && waited < PARTIAL_METHOD_WAIT * 2,
            "{waited:?}"
        );

        let mut c2 = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s2, _) = l.accept().await.unwrap();
        c2.write_all(b"GE").await.unwrap();
        let finish = async {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            c2.write_all(b"T / HTTP/1.1\r\n").await.unwrap();
        };
        let (http, ()) = tokio::join!(client_speaks_http(&s2), finish);
        assert!(http);
        drop(c);
    }
}
