//! The inbound listener: connections to the pod's ports, redirected here.
//! Mesh peers arrive over mTLS; their SPIFFE ID is authorized, then the
//! bytes go to the app on the original port over loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_ca::SpiffeId;
use bulwark_proto::config::v1::MtlsMode;
use tokio::net::TcpStream;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Proto;
use crate::http::park::Prefixed;
use crate::intercept::{connect_app, original_dst};
use crate::outbound::{CLIENT_FIRST_WINDOW, PARTIAL_METHOD_WAIT, Sniffed};
use crate::telemetry::{ConnLabels, DenialLabels, HandshakeLabels};
use crate::{Proxy, reset};

/// How long a client may take to send its first byte before we decide
/// it is not a TLS client (server-speaks-first protocols send nothing).
const FIRST_BYTE_WAIT: Duration = Duration::from_secs(5);
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Largest ClientHello looked at; a larger one is left to the mesh handshake.
const MAX_HELLO: usize = 16 * 1024;
/// The first look: a hello with a post-quantum key share (about 1.5 kB)
/// fits, so most connections never touch more than this.
const FIRST_LOOK: usize = 2 * 1024;

/// Whether the ClientHello waiting on `s` offers a mesh ALPN protocol. It
/// is read with `MSG_PEEK`, so nothing is consumed whatever the answer. A
/// hello that does not parse, or is not whole within [`FIRST_BYTE_WAIT`],
/// counts as the mesh's: the mesh handshake then refuses it as before.
async fn offers_mesh_alpn(s: &TcpStream) -> bool {
    let mut buf = vec![0u8; FIRST_LOOK];
    let deadline = tokio::time::Instant::now() + FIRST_BYTE_WAIT;
    // Backing off: a client that promises a long hello and stalls is
    // looked at a few dozen times in the wait, not thousands.
    let mut pause = Duration::from_millis(1);
    loop {
        let n = match tokio::time::timeout_at(deadline, s.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return true,
        };
        match client_hello_alpn(&buf[..n]) {
            Hello::Alpn(offers_mesh) => return offers_mesh,
            Hello::Invalid => return true,
            Hello::Partial if n == MAX_HELLO => return true,
            // More may be waiting than was looked at.
            Hello::Partial if n == buf.len() => buf.resize((n * 4).min(MAX_HELLO), 0),
            // The rest of a hello split over segments is on its way (post-
            // quantum key shares make it larger than one); peek has no way
            // to wait for more than is already there.
            Hello::Partial if tokio::time::Instant::now() >= deadline => return true,
            Hello::Partial => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
        }
    }
}

enum Hello {
    /// Complete: whether it offers a `bulwark/*` protocol.
    Alpn(bool),
    Partial,
    Invalid,
}

fn client_hello_alpn(bytes: &[u8]) -> Hello {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = bytes;
    while !rd.is_empty() {
        match acceptor.read_tls(&mut rd) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return Hello::Invalid,
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Hello::Alpn(
            accepted
                .client_hello()
                .alpn()
                .is_some_and(|mut protos| protos.any(|p| p.starts_with(b"bulwark/"))),
        ),
        Ok(None) => Hello::Partial,
        Err(_) => Hello::Invalid,
    }
}

/// `source_place`: the connection's place in its source address's share
/// of the slots, held until the peer is authenticated (a plaintext client
/// keeps it to the end).
pub async fn handle(
    proxy: Arc<Proxy>,
    down: TcpStream,
    peer: SocketAddr,
    source_place: Option<bulwark_ca::admission::SourcePlace>,
) {
    let started = Instant::now();
    let m = &proxy.metrics;
    let dst = match original_dst(&down, peer) {
        Ok(d) if d.port() != proxy.inbound_port => d,
        _ => {
            m.refused("inbound", "no_original_dst");
            return reset(down);
        }
    };
    // Our own hand-off to the app, sent back here: the rule that lets
    // APP_SOURCE through is missing (rules older than this proxy). Dialling
    // the app again would loop until the descriptors run out.
    if peer.ip().to_canonical() == std::net::IpAddr::from(crate::intercept::APP_SOURCE) {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::error!(%dst, "the sidecar's own connection to the app came back to it: restart the pod: its interception rules predate the 127.0.0.6 hand-off");
        });
        m.refused("inbound", "loop");
        return reset(down);
    }
    let Some(snap) = proxy.config.load() else {
        m.refused("inbound", "no_config");
        return reset(down);
    };
    let _ = down.set_nodelay(true);
    let mut first = [0u8; 1];
    let mut is_tls = match tokio::time::timeout(FIRST_BYTE_WAIT, down.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 => first[0] == TLS_HANDSHAKE_RECORD,
        Ok(_) => return, // closed before sending anything
        Err(_) => false,
    };
    // Outside STRICT, TLS that is not the mesh's (no `bulwark/*` ALPN) is
    // the app's own, from a client without a sidecar: it passes like
    // plaintext instead of failing a handshake that asks for a certificate.
    if is_tls && snap.mtls_mode != MtlsMode::Strict && !offers_mesh_alpn(&down).await {
        is_tls = false;
    }
    // The app is reached at the address the peer dialled (see `APP_SOURCE`).
    let app = dst;

    if !is_tls {
        if snap.mtls_mode == MtlsMode::Strict {
            tracing::info!(%peer, %dst, "plaintext connection refused (STRICT mTLS)");
            m.refused("inbound", "plaintext");
            return reset(down);
        }
        if let Err(service) = snap.authorize_l4(dst.port(), None) {
            deny(&proxy, peer, dst, None, service);
            return reset(down);
        }
        // HTTP from a plaintext client is served as HTTP too: the app is
        // told no caller identity, whatever the client wrote.
        let proto = snap.local_proto(dst.port());
        let Some((mut down, head, early)) = serve_if_http(&proxy, proto, down, None, dst).await
        else {
            return;
        };
        let Some(up) = app_with(&proxy, app, &mut down, head, early).await else {
            return reset(down);
        };
        count(&proxy, "", "inbound");
        let (bytes_sent, bytes_received) = crate::relay::relay(m, "inbound", down, up).await;
        tracing::info!(target: "bulwark::access", bytes_sent, bytes_received, direction = "inbound", src = %peer, dst = %dst,
            src_identity = "", mtls = false, duration_ms = started.elapsed().as_millis() as u64, "connection closed");
        return;
    }

    // Read before the handshake: a renewal during it is one this
    // connection's certificate predates.
    let generation = proxy.identity.generation();
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
    drop(source_place);
    // The peer is authenticated until its certificates expire, and not a
    // moment longer: the connection ends then.
    let Some(expires) = crate::tls::peer_expiry(tls.get_ref().1) else {
        m.refused("inbound", "no_identity");
        return;
    };
    if tls.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_MESH_H2) {
        // Pooled HTTP/2 from a peer sidecar: authorized per request.
        count(&proxy, &src_id.to_string(), "inbound");
        return crate::http::inbound::serve(proxy.clone(), tls, src_id, dst, expires, generation)
            .await;
    }
    match snap.authorize_l4(dst.port(), Some(&src_id)) {
        Ok(policy) => proxy.audit(
            &src_id.to_string(),
            snap.local_service(dst.port()).unwrap_or(""),
            "",
            "",
            true,
            policy,
            None,
        ),
        Err(service) => {
            proxy.audit(
                &src_id.to_string(),
                service,
                "",
                "",
                false,
                "default-deny",
                Some("no AuthorizationPolicy rule allows this caller"),
            );
            deny(&proxy, peer, dst, Some(&src_id), service);
            return;
        }
    }
    // An opaque tunnel to a port that speaks HTTP carries HTTP/1.1 (an
    // upgrade, or what sniffing took for opaque): served as such, so that
    // each request is authorized and told the caller's identity, which a
    // client could otherwise write into the bytes itself.
    let proto = snap.local_proto(dst.port());
    let caller = Some(src_id.clone());
    let src = src_id.to_string();
    let tunnel = async {
        let (mut tls, head, early) = serve_if_http(&proxy, proto, tls, caller, dst).await?;
        let up = app_with(&proxy, app, &mut tls, head, early).await?;
        count(&proxy, &src, "inbound");
        Some(crate::relay::relay(m, "inbound", tls, up).await)
    };
    let Ok(relayed) = tokio::time::timeout_at(expires, tunnel).await else {
        tracing::info!(%peer, %dst, src_identity = %src, "mTLS connection closed: the peer's certificate expired");
        return;
    };
    let Some((bytes_sent, bytes_received)) = relayed else {
        return;
    };
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

/// Serves `io`, a connection to local port `dst` from `caller` (`None`:
/// plaintext), as HTTP if it carries HTTP; otherwise hands it back with
/// what detection read and connected, for an opaque relay. `None` once it
/// was served, or ended. `tcp` ports are never looked at. An mTLS tunnel
/// to a declared HTTP port carries nothing else; plaintext is detected on
/// every other port, as it may also be the app's own TLS.
async fn serve_if_http<S>(
    proxy: &Arc<Proxy>,
    proto: Proto,
    mut io: S,
    caller: Option<SpiffeId>,
    dst: SocketAddr,
) -> Option<(S, Vec<u8>, Option<Early>)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use crate::http::inbound::serve_tunneled;
    match proto {
        Proto::Tcp => Some((io, Vec::new(), None)),
        Proto::Http1 | Proto::Http2 if caller.is_some() => {
            serve_tunneled(proxy.clone(), io, caller, dst).await;
            None
        }
        _ => match detect(proxy, &mut io, dst).await {
            Found::Http(head) => {
                let io = Prefixed::with_prefix(head, io);
                serve_tunneled(proxy.clone(), io, caller, dst).await;
                None
            }
            Found::Opaque(head, early) => Some((io, head, early)),
            Found::Gone => None,
        },
    }
}

/// What an opaque tunnel to an `auto` port carries.
enum Found {
    /// HTTP/1: the bytes read while deciding.
    Http(Vec<u8>),
    /// Anything else: the bytes read, and the app connection made if the
    /// client said nothing at first (with what the app said first).
    Opaque(Vec<u8>, Option<Early>),
    /// The client left, or the app could not be reached.
    Gone,
}

struct Early {
    app: TcpStream,
    greeting: Vec<u8>,
}

/// Protocol detection on an opaque tunnel, as the outbound side does it on
/// an app's connection: the client's first bytes decide, and if it says
/// nothing within the window, the app is connected at once, so that a
/// server-speaks-first protocol is not stalled; whichever side speaks
/// first then decides (an HTTP app never does). Bytes that could still be
/// a request line after the wait count as HTTP here, not opaque: the app
/// would read them as a request.
async fn detect<S>(proxy: &Proxy, io: &mut S, app: SocketAddr) -> Found
where
    S: tokio::io::AsyncRead + Unpin,
{
    let mut head = Vec::new();
    let client_first = tokio::time::timeout(CLIENT_FIRST_WINDOW, client_head(io, &mut head));
    if let Ok(found) = client_first.await {
        return found;
    }
    let Some(mut up) = dial_app(proxy, app).await else {
        return Found::Gone;
    };
    let mut greeting = vec![0u8; 4096];
    tokio::select! {
        found = client_head(io, &mut head) => match found {
            Found::Opaque(head, None) => Found::Opaque(head, Some(Early { app: up, greeting: Vec::new() })),
            other => other,
        },
        n = up.read(&mut greeting) => {
            greeting.truncate(n.unwrap_or(0));
            Found::Opaque(head, Some(Early { app: up, greeting }))
        }
    }
}

/// Longest first line [`request_line`] reads before deciding: longer, it
/// is taken as a request (the app's parser will judge it).
pub const MAX_FIRST_LINE: usize = 8 * 1024;

/// Whether `b`, a client's first bytes, is an HTTP/1 request line (any
/// token as the method, as servers accept: `get`, `M-SEARCH`) or the
/// HTTP/2 preface. Broader than the client side's [`crate::outbound::sniff`]
/// on purpose: whatever an app would read as a request is served as one
/// here. A line that ends in anything but `HTTP/1.x` (RTSP, SIP, the PROXY
/// protocol, IRC) is not one.
pub fn request_line(b: &[u8]) -> Sniffed {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";
    let b = &b[b.iter().take_while(|c| matches!(c, b'\r' | b'\n')).count()..];
    if b.is_empty() {
        return Sniffed::NeedMore;
    }
    let n = b.len().min(PREFACE.len());
    if b[..n] == PREFACE[..n] {
        return if n == PREFACE.len() {
            Sniffed::Http
        } else {
            Sniffed::NeedMore
        };
    }
    let tchar = |c: &u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(c);
    let method = b.iter().take_while(|c| tchar(c)).count();
    match b.get(method) {
        None => return Sniffed::NeedMore,
        Some(b' ') if method > 0 => {}
        Some(_) => return Sniffed::Opaque,
    }
    let Some(end) = b.iter().position(|c| *c == b'\n') else {
        return Sniffed::NeedMore;
    };
    let line = b[..end].strip_suffix(b"\r").unwrap_or(&b[..end]);
    if line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0") {
        Sniffed::Http
    } else {
        Sniffed::Opaque
    }
}

/// Reads the client's first bytes into `head` until [`request_line`]
/// decides. Only whole reads are added to `head`, so it may be abandoned
/// between them and resumed.
async fn client_head<S>(io: &mut S, head: &mut Vec<u8>) -> Found
where
    S: tokio::io::AsyncRead + Unpin,
{
    let mut buf = vec![0u8; 2048];
    loop {
        if head.len() >= MAX_FIRST_LINE {
            return Found::Http(std::mem::take(head));
        }
        if !head.is_empty() {
            match request_line(head) {
                Sniffed::Http => return Found::Http(std::mem::take(head)),
                Sniffed::Opaque => return Found::Opaque(std::mem::take(head), None),
                Sniffed::NeedMore => {}
            }
        }
        let room = (MAX_FIRST_LINE - head.len()).min(buf.len());
        let read = if head.is_empty() {
            io.read(&mut buf[..room]).await
        } else {
            match tokio::time::timeout(PARTIAL_METHOD_WAIT, io.read(&mut buf[..room])).await {
                Ok(r) => r,
                // A request line left unfinished: still a request to the app.
                Err(_) => return Found::Http(std::mem::take(head)),
            }
        };
        match read {
            Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ if head.is_empty() => return Found::Gone,
            _ => return Found::Opaque(std::mem::take(head), None),
        }
    }
}

/// The app connection for an opaque relay, with the bytes read while
/// detecting passed on: the client's to the app, the app's to the client.
async fn app_with<S>(
    proxy: &Proxy,
    app: SocketAddr,
    client: &mut S,
    head: Vec<u8>,
    early: Option<Early>,
) -> Option<TcpStream>
where
    S: tokio::io::AsyncWrite + Unpin,
{
    let mut up = match early {
        Some(e) => {
            client.write_all(&e.greeting).await.ok()?;
            e.app
        }
        None => dial_app(proxy, app).await?,
    };
    up.write_all(&head).await.ok()?;
    Some(up)
}

pub(crate) async fn dial_app(proxy: &Proxy, app: SocketAddr) -> Option<TcpStream> {
    match tokio::time::timeout(proxy.connect_timeout, connect_app(app)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidInput => {
            // A loopback source cannot reach an address off this pod.
            tracing::info!(%app, error = %e, "the original destination is not this pod's address");
            proxy.metrics.refused("inbound", "not_local");
            None
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_line_is_any_token_method_and_an_http_1_version() {
        for http in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"get /admin HTTP/1.1\r\n",
            b"M-SEARCH * HTTP/1.1\r\n",
            b"\r\n\r\nPOST /x HTTP/1.0\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            assert_eq!(
                request_line(http),
                Sniffed::Http,
                "{:?}",
                String::from_utf8_lossy(http)
            );
        }
        for opaque in [
            &b"\x16\x03\x01\x02\x00"[..],
            b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n",
            b"OPTIONS rtsp://cam/1 RTSP/1.0\r\n",
            b"NICK web\r\n",
            b" GET / HTTP/1.1\r\n",
            b"\x00\x01binary hello\n",
        ] {
            assert_eq!(
                request_line(opaque),
                Sniffed::Opaque,
                "{:?}",
                String::from_utf8_lossy(opaque)
            );
        }
        for partial in [&b"\r\n"[..], b"GE", b"GET /x HTTP/1", b"PRI * HT"] {
            assert_eq!(request_line(partial), Sniffed::NeedMore);
        }
    }

    /// The first flight of a rustls client offering `alpn`.
    fn hello(alpn: &[&[u8]]) -> Vec<u8> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(bulwark_ca::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(cfg), "api.example".try_into().unwrap())
                .unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    #[test]
    fn a_client_hello_is_the_mesh_s_only_when_it_offers_a_bulwark_protocol() {
        let mesh = hello(&[crate::tls::ALPN_MESH_H2]);
        assert!(matches!(client_hello_alpn(&mesh), Hello::Alpn(true)));
        let tcp = hello(&[b"h2", bulwark_ca::tls::ALPN_MESH_TCP]);
        assert!(matches!(client_hello_alpn(&tcp), Hello::Alpn(true)));
        for other in [hello(&[b"h2", b"http/1.1"]), hello(&[])] {
            assert!(matches!(client_hello_alpn(&other), Hello::Alpn(false)));
        }
        // Cut short: more is on its way; not TLS at all: left to the mesh.
        assert!(matches!(
            client_hello_alpn(&mesh[..mesh.len() / 2]),
            Hello::Partial
        ));
        assert!(matches!(
            client_hello_alpn(b"\x16\x03\x01\x00\x05hello"),
            Hello::Invalid
        ));
    }

    /// Hellos larger than the first look are read whole, up to `MAX_HELLO`.
    #[tokio::test]
    async fn a_hello_larger_than_the_first_look_is_read_whole() {
        let filler: Vec<Vec<u8>> = (0..40)
            .map(|i| format!("x-{i:0>60}").into_bytes())
            .collect();
        let mut offers: Vec<&[u8]> = filler.iter().map(Vec::as_slice).collect();
        let without = hello(&offers);
        offers.push(crate::tls::ALPN_MESH_H2);
        let with = hello(&offers);
        assert!(with.len() > FIRST_LOOK, "{} bytes", with.len());
        for (bytes, mesh) in [(with, true), (without, false)] {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut c, &bytes)
                .await
                .unwrap();
            let (s, _) = l.accept().await.unwrap();
            assert_eq!(offers_mesh_alpn(&s).await, mesh);
        }
    }
}
