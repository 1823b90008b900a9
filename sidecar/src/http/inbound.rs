//! Inbound HTTP: requests from peer sidecars over the pooled HTTP/2 mTLS
//! connection, authorized per request (identity, path, method), rate
//! limited, and forwarded to the app in the protocol it speaks.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bulwark_ca::SpiffeId;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::app::{AppConnector, AppError, AppPool};

use super::outbound::MAX_HEADER_BYTES;
use super::{Body, body_limit, reply, strip_hop_headers};
use crate::Proxy;
use crate::config::{Proto, Snapshot};
use crate::resilience::state::ServiceGuards;
use crate::telemetry::{DenialLabels, RequestKey, ServiceLabel};

/// Clients towards the local app, one per protocol, pooled.
pub struct LocalClients {
    pub h1: Arc<AppPool>,
    pub h2: Client<AppConnector, Body>,
}

impl Default for LocalClients {
    fn default() -> Self {
        Self {
            h1: Arc::default(),
            h2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(AppConnector),
        }
    }
}

impl LocalClients {
    /// Sends `req` to the app at `app`, in HTTP/2 or HTTP/1.1. `req`'s URI
    /// is `http://<app>/...`; `Host` is kept or else set from it.
    pub async fn send(
        &self,
        app: SocketAddr,
        proto: Proto,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, AppError> {
        if proto == Proto::Http2 {
            *req.version_mut() = http::Version::HTTP_2;
            return match self.h2.request(req).await {
                Ok(r) => Ok(r.map(|b| b.map_err(|e| -> super::BoxError { Box::new(e) }).boxed())),
                Err(e) if e.is_connect() => Err(AppError::Connect(app, e.into())),
                Err(e) => Err(AppError::Exchange(app, e.into())),
            };
        }
        *req.version_mut() = http::Version::HTTP_11;
        if !req.headers().contains_key(http::header::HOST)
            && let Some(v) = req
                .uri()
                .authority()
                .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(http::header::HOST, v);
        }
        *req.uri_mut() = origin_form(req.uri());
        self.h1.send(app, req).await
    }
}

/// Applies the local rate limits to a request from `src`: its Route rule's
/// (matched against `service`'s routes), then the service's own. Returns
/// the 429 to send when one refuses.
fn rate_limit(
    proxy: &Proxy,
    snap: &Snapshot,
    service: &str,
    guards: &ServiceGuards,
    src: &str,
    req: &Request<Incoming>,
) -> Option<Response<Body>> {
    let now = Instant::now();
    let rule = snap.route(service).and_then(|table| {
        let rule = table.find(req.method(), req.uri().path(), req.headers())?;
        Some((
            rule.name.as_str(),
            proxy.guards.for_rule(service, table, rule)?,
        ))
    });
    // The rule's limit first: a request it refuses takes no token from the service's.
    let mut refused = rule
        .map(|(name, limit)| (limit.check(src, now), name))
        .filter(|(d, _)| !d.allowed);
    if refused.is_none()
        && let Some(limit) = &guards.rate_limit
    {
        refused = Some((limit.check(src, now), "")).filter(|(d, _)| !d.allowed);
    }
    let (decision, rule) = refused?;
    proxy
        .metrics
        .ratelimit_rejections
        .get_or_create(&ServiceLabel {
            service: service.to_string(),
        })
        .inc();
    tracing::debug!(%service, rule, src_identity = %src, retry_after_ms = decision.retry_after.as_millis() as u64, "request refused by a local rate limit");
    let mut r = reply(429, "rate-limited");
    decision.apply_headers(r.headers_mut());
    Some(r)
}

/// Concurrent streams one peer sidecar may open on its pooled connection.
pub const MESH_MAX_STREAMS: u32 = 1024;

/// The HTTP/2 server for peer sidecars.
///
/// A peer's one pooled connection carries every request of all its app
/// clients, so when those clients go away together (a load generator
/// stopping, a pod rolled) it cancels hundreds of streams at once, some of
/// them before this side has accepted them. h2's default allows 20 such
/// resets before it answers GOAWAY ENHANCE_YOUR_CALM, which tore the pooled
/// connection down and cost every client a new mTLS handshake. The bound
/// stays (rapid-reset protection), sized to the stream limit: a reset
/// stream waiting to be accepted holds no more than a live one.
pub fn mesh_h2_server() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(MESH_MAX_STREAMS)
        .max_pending_accept_reset_streams(MESH_MAX_STREAMS as usize);
    b
}

/// Serves one mTLS connection from a peer sidecar as HTTP/2, until
/// `expires` (when the peer's certificates do), or until this sidecar's
/// SVID is renewed past `generation` (the one its handshake used).
pub async fn serve<S>(
    proxy: Arc<Proxy>,
    tls: S,
    peer: SpiffeId,
    dst: SocketAddr,
    expires: tokio::time::Instant,
    generation: u64,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer_id = peer.to_string();
    let peer = Arc::new(Peer::new(peer, dst));
    let mut draining = proxy.draining.subscribe();
    let mut renewed = proxy.identity.renewals();
    if proxy.identity.generation() != generation {
        // Renewed during the handshake.
        renewed.mark_changed();
    }
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (proxy, peer) = (proxy.clone(), peer.clone());
        async move { Ok::<_, Infallible>(handle(proxy, &peer, req).await) }
    });
    let io = TokioIo::new(super::cork::Corked::new(tls));
    let conn = mesh_h2_server().serve_connection(io, svc);
    tokio::pin!(conn);
    // On drain, on renewal, and shortly before the peer's certificates
    // expire, GOAWAY:
    // in-flight streams finish, new ones go elsewhere (the peer's pool
    // reconnects with its current certificate). At the expiry itself the
    // connection is closed, whatever is still in flight.
    let goaway = tokio::time::sleep_until(crate::tls::before(expires, crate::tls::GOAWAY_MARGIN));
    let r = tokio::select! {
        r = conn.as_mut() => Some(r),
        // Our SVID was renewed: the peer reconnects, and each side then
        // presents its current certificate, hours before this connection's
        // would expire.
        Ok(()) = renewed.changed() => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout_at(expires, conn).await.ok()
        }
        () = async { let _ = draining.wait_for(|d| *d).await; } => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout_at(expires, conn).await.ok()
        }
        () = goaway => {
            tracing::debug!(%peer_id, "GOAWAY: the peer's certificate is about to expire");
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout_at(expires, conn).await.ok()
        }
    };
    match r {
        Some(Err(e)) => {
            tracing::debug!(error = ?e, "inbound HTTP/2 connection ended with an error")
        }
        None => {
            tracing::info!(%peer_id, "inbound HTTP/2 connection closed: the peer's certificate expired")
        }
        Some(Ok(())) => {}
    }
}

/// Serves HTTP that arrived in a peer's opaque mTLS tunnel: an
/// upgrade its sidecar forwards (WebSocket and friends), or HTTP its app
/// sent on an `auto` port in a form the sniffing took for opaque. Each
/// request is authorized, limited and told the caller's identity like
/// those of the pooled HTTP/2 connection, so that the tunnel is no way to
/// hand the app a caller identity of one's own choosing; an upgrade the
/// app accepts is then spliced.
///
/// `peer` is `None` for a plaintext client (PERMISSIVE): its requests are
/// authorized as unauthenticated and the app is told no identity at all.
pub async fn serve_tunneled<S>(proxy: Arc<Proxy>, io: S, peer: Option<SpiffeId>, dst: SocketAddr)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut peer = match peer {
        Some(id) => Peer::new(id, dst),
        None => Peer::unauthenticated(dst),
    };
    peer.tunneled = true;
    let peer = Arc::new(peer);
    let svc = hyper::service::service_fn({
        let peer = peer.clone();
        move |req: Request<Incoming>| {
            let (proxy, peer) = (proxy.clone(), peer.clone());
            async move { Ok::<_, Infallible>(handle(proxy, &peer, req).await) }
        }
    });
    // HTTP/1.1, or h2c with prior knowledge from a plaintext client. A
    // client that shuts its side after its request still gets the answer.
    let mut builder = super::server_builder(MAX_HEADER_BYTES, MESH_MAX_STREAMS);
    builder.http1().half_close(true);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    if let Err(e) = conn.await {
        tracing::debug!(error = ?e, "inbound HTTP connection in a tunnel ended with an error");
    }
    let mut upgrades = AbortOnDrop(std::mem::take(
        &mut *peer.upgrades.lock().unwrap_or_else(|p| p.into_inner()),
    ));
    for t in &mut upgrades.0 {
        let _ = t.await;
    }
}

/// What every request on one peer connection shares, made once.
struct Peer {
    /// The peer sidecar's verified identity, and as the header the app
    /// sees (none for a plaintext client).
    id: Option<SpiffeId>,
    header: Option<http::HeaderValue>,
    /// The app's address, the pod address and port the peer dialled: to
    /// connect to, and as the requests' authority.
    addr: SocketAddr,
    app: http::uri::Authority,
    /// Served from an opaque tunnel or plaintext, not the pooled HTTP/2
    /// connection: an HTTP/2 request then is the client's own h2c.
    tunneled: bool,
    /// Upgrades the app accepted, spliced: they belong to the connection
    /// (its slot, its end when the peer's certificate expires), which
    /// waits for them and ends them if it is ended first.
    upgrades: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Drop for Peer {
    // The connection ended before it waited for its upgrades (closed at
    // the peer's certificate expiry, say): they end with it.
    fn drop(&mut self) {
        for t in self
            .upgrades
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            t.abort();
        }
    }
}

/// Tasks aborted when dropped, unless they finished first.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

impl Peer {
    fn new(id: SpiffeId, dst: SocketAddr) -> Self {
        let mut p = Self::unauthenticated(dst);
        p.header = Some(
            http::HeaderValue::from_str(id.as_str()).expect("SPIFFE IDs are valid header values"),
        );
        p.id = Some(id);
        p
    }

    fn unauthenticated(dst: SocketAddr) -> Self {
        Self {
            id: None,
            header: None,
            app: http::uri::Authority::try_from(dst.to_string())
                .expect("an address is an authority"),
            addr: dst,
            tunneled: false,
            upgrades: Default::default(),
        }
    }
}

async fn handle(proxy: Arc<Proxy>, peer: &Peer, mut req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let port = peer.addr.port();
    let me = proxy.identity.identity().as_str();
    let src = peer.id.as_ref().map_or("", SpiffeId::as_str);
    let Some(snap) = proxy.config.load() else {
        return reply(503, "no-config");
    };
    let service = snap.local_service(port).unwrap_or("");
    let version = req.version();
    // HTTP/1.1 upgrades reach us only in a tunnel (HTTP/2 cannot carry
    // them). An h2c upgrade is not passed on (the request is served as
    // it is): the connection it would switch is ours, not the client's.
    let upgrade_to = req
        .headers()
        .get(http::header::UPGRADE)
        .filter(|v| version == http::Version::HTTP_11 && !v.as_bytes().eq_ignore_ascii_case(b"h2c"))
        .cloned();
    let upgrade = upgrade_to.is_some().then(|| hyper::upgrade::on(&mut req));
    let method = req.method().clone();
    // A reference count, not a copy: for the span, the audit and access logs.
    let uri = req.uri().clone();
    let path = uri.path();
    // The app sees this span as the parent of whatever it does next.
    let span = std::sync::Mutex::new(Some(proxy.tracer().start_span(
        opentelemetry::trace::SpanKind::Server,
        req.headers_mut(),
        || {
            (
                format!("inbound {service}"),
                vec![
                    opentelemetry::KeyValue::new("bulwark.direction", "inbound"),
                    opentelemetry::KeyValue::new("bulwark.service", service.to_string()),
                    opentelemetry::KeyValue::new("bulwark.src_identity", src.to_string()),
                    opentelemetry::KeyValue::new("bulwark.dst_identity", me.to_string()),
                    opentelemetry::KeyValue::new("http.request.method", method.to_string()),
                    opentelemetry::KeyValue::new("url.path", path.to_string()),
                ],
            )
        },
    )));
    let finish = |resp: Response<Body>| {
        let key = RequestKey {
            direction: "inbound",
            service,
            route: "",
            src_identity: src,
            dst_identity: me,
            code: resp.status().as_u16(),
        };
        let reason = proxy.metrics.record_request(key, started.elapsed(), &resp);
        let mut trace_id = String::new();
        if let Some(sp) = span.lock().ok().and_then(|mut s| s.take()) {
            trace_id = sp.trace_id();
            sp.finish(resp.status().as_u16(), || {
                vec![opentelemetry::KeyValue::new(
                    "bulwark.reason",
                    reason.clone(),
                )]
            });
        }
        let bytes = hyper::body::Body::size_hint(resp.body())
            .exact()
            .unwrap_or(0);
        tracing::info!(target: "bulwark::access", trace_id = %trace_id, bytes, direction = "inbound", method = %method, path = %path,
            service = %service, status = resp.status().as_u16(), src_identity = %src, dst_identity = %me, reason = %reason,
            duration_us = started.elapsed().as_micros() as u64, "request");
        resp
    };
    // Path rules and rate-limited routes match the path as written: where a
    // policy or such a route looks at it, a path the app would read as
    // another one (`/public/../admin`, `//login`, `/%61dmin`) is refused.
    // Elsewhere any path passes, as the app wrote it.
    if snap.path_rules_on(port)
        && let Err(why) = super::route::canonical_path(path)
    {
        tracing::info!(port, %service, src_identity = %src, reason = why, "non-canonical request path refused");
        return finish(reply(400, "non-canonical-path"));
    }
    let verdict = snap.authorize_http(port, peer.id.as_ref(), method.as_str(), path);
    match &verdict {
        Ok(policy) => proxy.audit(src, service, method.as_str(), path, true, policy, None),
        Err(svc) => proxy.audit(
            src,
            svc,
            method.as_str(),
            path,
            false,
            "default-deny",
            Some("no AuthorizationPolicy rule allows this caller, path and method"),
        ),
    }
    if let Err(svc) = verdict {
        proxy
            .metrics
            .authz_denials
            .get_or_create(&DenialLabels {
                direction: "inbound",
                src_identity: src.to_string(),
            })
            .inc();
        tracing::info!(src_identity = %src, service = %svc, %method, %path, "request denied by authorization policy");
        return finish(reply(403, "authz-denied"));
    }
    let mut body_limit = None;
    if !service.is_empty() {
        let policy = snap.policy(service);
        body_limit = policy.map(|p| p.max_request_body_bytes).filter(|&n| n > 0);
        let guards = proxy.guards.for_service(service, policy);
        if let Some(refusal) = rate_limit(&proxy, &snap, service, &guards, src, &req) {
            return finish(refusal);
        }
    }
    // A declared length over the limit is refused before any of the body is read.
    if let Some(limit) = body_limit
        && body_limit::declared_over(req.headers(), limit)
    {
        return finish(reply(413, "body-too-large"));
    }
    let (mut parts, body) = req.into_parts();
    strip_hop_headers(&mut parts.headers);
    // An upgrade asks for it again, in exactly these two headers.
    if let Some(to) = upgrade_to {
        parts.headers.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
        parts.headers.insert(http::header::UPGRADE, to);
    }
    // Only the sidecar may say who the caller is.
    super::set_peer_identity(&mut parts.headers, peer.header.clone());
    let mut local = std::mem::take(&mut parts.uri).into_parts();
    let authority = local.authority.replace(peer.app.clone());
    parts.uri = super::http_uri(local).expect("scheme, authority and path make a URI");
    let mut proto = snap.local_proto(port);
    if peer.tunneled && version == http::Version::HTTP_2 && proto == Proto::Auto {
        // The client's own h2c (prior knowledge) to an `auto` port.
        proto = Proto::Http2;
    }
    if proto != Proto::Http2
        && let Some(a) = authority
        && let Ok(v) = http::HeaderValue::from_str(a.as_str())
    {
        parts.headers.insert(http::header::HOST, v);
    }
    // A streamed body is cut off at the limit: the app never sees more.
    let (body, cut_off) = match body_limit {
        Some(limit) => {
            let (b, exceeded) = body_limit::Capped::new(body, limit);
            (b.boxed(), Some(exceeded))
        }
        None => (
            body.map_err(|e| -> super::BoxError { Box::new(e) }).boxed(),
            None,
        ),
    };
    if let Some(down) = upgrade {
        return finish(upgrade_app(&proxy, peer, Request::from_parts(parts, body), down).await);
    }
    match proxy
        .local
        .send(peer.addr, proto, Request::from_parts(parts, body))
        .await
    {
        Ok(r) => {
            let (mut p, b) = r.into_parts();
            strip_hop_headers(&mut p.headers);
            p.version = version;
            finish(Response::from_parts(p, b))
        }
        Err(_) if cut_off.is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed)) => {
            tracing::info!(port, %service, src_identity = %src, "request body over the service's limit; request aborted");
            finish(reply(413, "body-too-large"))
        }
        Err(e) if e.is_not_local() => {
            tracing::info!(app = %peer.addr, error = %e, "the original destination is not this pod's address");
            // Counted with the other local answers, by reason.
            finish(reply(421, "not-local"))
        }
        Err(e) => {
            tracing::info!(port, error = %e, "local app request failed");
            let status = if e.is_connect() { 503 } else { 502 };
            finish(reply(
                status,
                if e.is_connect() {
                    "app-unreachable"
                } else {
                    "app-reset"
                },
            ))
        }
    }
}

/// HTTP/1.1 to an origin server: the request line carries the path only.
fn origin_form(uri: &http::Uri) -> http::Uri {
    http::Uri::from(
        uri.path_and_query()
            .map_or_else(|| http::uri::PathAndQuery::from_static("/"), Clone::clone),
    )
}

/// Sends an upgrade request to the app on a connection of its own and,
/// if the app switches protocols, splices the two upgraded connections.
async fn upgrade_app(
    proxy: &Proxy,
    peer: &Peer,
    mut req: Request<Body>,
    down: hyper::upgrade::OnUpgrade,
) -> Response<Body> {
    let app = peer.addr;
    let Some(tcp) = crate::inbound::dial_app(proxy, app).await else {
        return reply(503, "app-unreachable");
    };
    *req.uri_mut() = origin_form(req.uri());
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await
    else {
        return reply(502, "app-reset");
    };
    tokio::spawn(conn.with_upgrades());
    let mut resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(%app, error = %e, "upgrade request to the app failed");
            return reply(502, "app-reset");
        }
    };
    if resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        strip_hop_headers(resp.headers_mut());
    } else {
        let up = hyper::upgrade::on(&mut resp);
        let metrics = proxy.metrics.clone();
        let splice = tokio::spawn(async move {
            if let (Ok(d), Ok(u)) = (down.await, up.await) {
                // Counted in bulwark_tcp_bytes_total like any relayed connection.
                crate::relay::relay(&metrics, "inbound", TokioIo::new(d), TokioIo::new(u)).await;
            }
        });
        peer.upgrades
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(splice);
    }
    resp.map(|b| b.map_err(|e| -> super::BoxError { Box::new(e) }).boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `n` requests and resets each before the connection task runs,
    /// so the server reads every HEADERS with its RST_STREAM in one batch,
    /// before it has accepted the stream; then one ordinary request.
    async fn mass_cancel_then_request(
        server: hyper::server::conn::http2::Builder<TokioExecutor>,
        n: usize,
    ) -> Result<u16, String> {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
            Ok::<_, Infallible>(Response::new(super::super::empty()))
        });
        let served = tokio::spawn(server.serve_connection(TokioIo::new(server_io), svc));
        let (h2, conn) = h2::client::handshake(client_io).await.unwrap();
        let mut h2 = h2.ready().await.unwrap();
        let mut streams = Vec::new();
        for _ in 0..n {
            let req = Request::get("http://peer/").body(()).unwrap();
            let (_resp, mut stream) = h2.send_request(req, true).unwrap();
            stream.send_reset(h2::Reason::CANCEL);
            streams.push(stream);
        }
        let conn = tokio::spawn(conn);
        let status = async {
            let req = Request::get("http://peer/").body(()).unwrap();
            let mut h2 = h2.ready().await?;
            let (resp, _) = h2.send_request(req, true)?;
            Ok::<_, h2::Error>(resp.await?.status().as_u16())
        }
        .await;
        drop(streams);
        let _ = conn.await;
        // The server's own account of how the connection ended.
        let served = served.await.expect("server task");
        status.map_err(|e| format!("client: {e}; server: {served:?}"))
    }

    #[tokio::test]
    async fn a_peer_cancelling_hundreds_of_streams_at_once_keeps_its_connection() {
        let n = 500;
        // The premise: h2's default answers this burst with GOAWAY.
        let mut default = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        default.max_concurrent_streams(MESH_MAX_STREAMS);
        let err = mass_cancel_then_request(default, n).await.unwrap_err();
        assert!(
            err.contains("ENHANCE_YOUR_CALM") || err.contains("too_many_resets"),
            "{err}"
        );
        assert_eq!(mass_cancel_then_request(mesh_h2_server(), n).await, Ok(200));
    }
}
