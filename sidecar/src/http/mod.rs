//! The L7 data plane: HTTP/1.1, HTTP/2 and gRPC proxying with routing,
//! load balancing, retries, timeouts, breakers, bulkheads and rate limits.
//! Between sidecars, requests ride pooled, multiplexed HTTP/2 over mTLS.

pub mod app;
pub mod body_limit;
pub mod cork;
pub mod deadline;
pub mod health;
pub mod inbound;
pub mod outbound;
pub mod park;
pub mod pool;
pub mod replay;
pub mod route;
pub mod tunnel;

use http_body_util::BodyExt;
use hyper::body::Bytes;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Header naming the verified SPIFFE ID of the calling workload, set by
/// the inbound sidecar (any such header from the client is replaced).
pub use tunnel::TunnelIdle;

pub const PEER_IDENTITY_HEADER: &str = "x-bulwark-peer-identity";
/// Header saying why the sidecar itself answered (bulkhead-full, ...).
pub const REASON_HEADER: &str = "x-bulwark-reason";

/// What a client connection holds (the gateway's connection slots) that a
/// tunnel taking the connection over with an HTTP/1.1 upgrade must go on
/// holding: carried in the request's extensions, kept by the tunnel's task
/// until the tunnel closes.
#[derive(Clone)]
pub struct ConnectionHold(pub std::sync::Arc<dyn std::any::Any + Send + Sync>);

pub fn full(b: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(b.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An incoming body as a [`Body`], read to its end (bounded) if it is
/// dropped unfinished; see [`DrainOnDrop`].
pub fn boxed_body(b: hyper::body::Incoming) -> Body {
    DrainOnDrop::new(b).boxed()
}

/// Most of a dropped request body read and discarded, and for how long.
const DRAIN_MAX: usize = 1024 * 1024;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// A client's request body that, when dropped before its end (an upstream
/// or the proxy answered early: 413, 403, a reset), is read to the end in
/// the background, up to [`DRAIN_MAX`] bytes and [`DRAIN_TIME`]. Dropping
/// it would reset the client's stream, and HTTP/2 clients that are still
/// uploading (curl among them) then report the reset instead of the answer
/// they were already sent.
pub struct DrainOnDrop(Option<hyper::body::Incoming>);

impl DrainOnDrop {
    pub fn new(b: hyper::body::Incoming) -> Self {
        Self(Some(b))
    }

    /// As a [`Body`] (still drained if dropped unfinished).
    pub fn boxed(self) -> Body {
        fn boxed(e: hyper::Error) -> BoxError {
            Box::new(e)
        }
        BodyExt::map_err(self, boxed).boxed()
    }
}

impl hyper::body::Body for DrainOnDrop {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        match self.0.as_mut() {
            Some(b) => std::pin::Pin::new(b).poll_frame(cx),
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(hyper::body::Body::is_end_stream)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.0
            .as_ref()
            .map(hyper::body::Body::size_hint)
            .unwrap_or_else(|| hyper::body::SizeHint::with_exact(0))
    }
}

impl Drop for DrainOnDrop {
    fn drop(&mut self) {
        let Some(mut body) = self.0.take() else {
            return;
        };
        if hyper::body::Body::is_end_stream(&body) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let drain = async {
                let mut seen = 0usize;
                while let Some(Ok(frame)) = body.frame().await {
                    if let Some(d) = frame.data_ref() {
                        seen += d.len();
                        if seen > DRAIN_MAX {
                            break;
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
        });
    }
}

/// An absolute `http` URI from `parts` (their authority, path and query
/// kept; `/` when there is no path): what a proxied request is sent with.
pub(crate) fn http_uri(
    mut parts: http::uri::Parts,
) -> Result<http::Uri, http::uri::InvalidUriParts> {
    parts.scheme = Some(http::uri::Scheme::HTTP);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    http::Uri::from_parts(parts)
}

/// Longest wait for a request's headers, and for a new connection's first
/// byte (before it, the protocol is not known and hyper sets no deadline).
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The HTTP/1.1 server settings of [`server_builder`], alone.
pub fn http1_builder(max_header_bytes: usize) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.max_buf_size(max_header_bytes)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    b
}

/// The HTTP/1.1 + HTTP/2 server settings of the proxy's listeners: bounded
/// header blocks, a header read timeout against slowloris, and a stream cap.
pub fn server_builder(
    max_header_bytes: usize,
    max_streams: u32,
) -> hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor> {
    let mut b = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    b.http1()
        .max_buf_size(max_header_bytes)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    b.http2()
        .max_header_list_size(max_header_bytes as u32)
        .max_concurrent_streams(max_streams);
    b
}

/// Reads a whole body of at most `limit` bytes (`None` beyond it, or on a
/// read error, leaving the body part-read). Trailers are not kept.
pub async fn collect_limited<B>(body: &mut B, limit: usize) -> Option<Bytes>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.ok()?.into_data() {
            if buf.len() + data.len() > limit {
                return None;
            }
            buf.extend_from_slice(&data);
        }
    }
    Some(Bytes::from(buf))
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// The reasons this process has answered with itself (at most
/// [`MAX_OWN_REASONS`]): the only values `bulwark_local_responses_total`
/// takes as its `reason`, as a response's `x-bulwark-reason` may also come
/// from anything upstream.
static OWN_REASONS: std::sync::Mutex<std::collections::BTreeSet<String>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());
const MAX_OWN_REASONS: usize = 256;

/// Reasons a peer's sidecar answers with (so this one counts them by name
/// before it ever answers with them itself).
const PEER_REASONS: &[&str] = &[
    "app-reset",
    "app-unreachable",
    "authz-denied",
    "body-too-large",
    "breaker-open",
    "bulkhead-full",
    "concurrency-limited",
    "no-config",
    "no-healthy-endpoint",
    "no-route",
    "non-canonical-path",
    "not-local",
    "rate-limited",
    "timeout",
    "upstream-connect-failure",
    "upstream-reset",
];

/// Reasons a gateway answers outside callers with.
const GATEWAY_REASONS: &[&str] = &[
    "authn-failed",
    "body-timeout",
    "invalid-body",
    "jwks-unavailable",
    "request-body-error",
    "request-body-too-large",
];

/// Whether `reason` is one of the listed ones (no lock needed).
fn listed_reason(reason: &str) -> bool {
    PEER_REASONS.contains(&reason) || GATEWAY_REASONS.contains(&reason)
}

/// Whether a sidecar (this one, or a peer with the same code) answers with
/// `reason` itself.
pub fn is_own_reason(reason: &str) -> bool {
    listed_reason(reason)
        || OWN_REASONS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(reason)
}

/// A response generated by the sidecar, with a reason header and body.
/// (Counted by the request handlers as `bulwark_local_responses_total{reason}`.)
pub fn reply(status: u16, reason: &str) -> hyper::Response<Body> {
    // The listed reasons need no registering: a flood of 429s, 503s or
    // 401s then takes no lock shared by every thread.
    if !listed_reason(reason) {
        let mut own = OWN_REASONS.lock().unwrap_or_else(|p| p.into_inner());
        if own.len() < MAX_OWN_REASONS && !own.contains(reason) {
            own.insert(reason.to_string());
        }
    }
    hyper::Response::builder()
        .status(status)
        .header(REASON_HEADER, reason)
        .header("content-type", "text/plain")
        .body(full(format!("{reason}\n")))
        .expect("static response parts are valid")
}

/// Removes the headers a `Connection` header lists, keeping only its
/// `upgrade` token (and the `Upgrade` header it refers to).
pub fn drop_connection_listed(h: &mut http::HeaderMap) {
    // Owned, so the names it lists need no copy while they are removed.
    let Some(c) = h.remove(http::header::CONNECTION) else {
        return;
    };
    let mut upgrade = false;
    for name in c.to_str().unwrap_or_default().split(',').map(str::trim) {
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        } else if !name.is_empty() {
            h.remove(name);
        }
    }
    if upgrade {
        h.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
    }
}

/// Sets the verified caller identity (`None`: no identity, for a plaintext
/// caller), removing any spelling of the header the client sent:
/// CGI-style servers (Rack, WSGI, PHP) read `x_bulwark_peer_identity` as
/// the same variable as the real one.
pub fn set_peer_identity(h: &mut http::HeaderMap, value: Option<http::HeaderValue>) {
    let lookalikes: Vec<http::HeaderName> = h
        .keys()
        .filter(|n| {
            let n = n.as_str();
            n.contains('_')
                && n.len() == PEER_IDENTITY_HEADER.len()
                && n.bytes()
                    .map(|b| if b == b'_' { b'-' } else { b })
                    .eq(PEER_IDENTITY_HEADER.bytes())
        })
        .cloned()
        .collect();
    for n in lookalikes {
        h.remove(n);
    }
    match value {
        Some(v) => h.insert(PEER_IDENTITY_HEADER, v),
        None => h.remove(PEER_IDENTITY_HEADER),
    };
}

/// Headers that belong to one hop and must not be forwarded.
pub fn strip_hop_headers(h: &mut http::HeaderMap) {
    use http::HeaderName;
    use http::header::{
        CONNECTION, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRANSFER_ENCODING, UPGRADE,
    };
    // Typed names: removing by `&str` would parse each name on every request.
    const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    drop_connection_listed(h);
    for name in [
        &CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &TRANSFER_ENCODING,
        &UPGRADE,
        &PROXY_AUTHENTICATE,
        &PROXY_AUTHORIZATION,
    ] {
        h.remove(name);
    }
    // `te: trailers` is the one TE value allowed (and needed by gRPC) in HTTP/2.
    if h.get(TE).is_some_and(|v| v != "trailers") {
        h.remove(TE);
    }
}

/// Waits until `f` holds, failing the test with `what` if it does not
/// within `within`.
#[cfg(test)]
pub(crate) async fn until(what: &str, within: std::time::Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callers_identity_replaces_every_spelling_the_client_sent() {
        let mut h = http::HeaderMap::new();
        for name in [
            "x-bulwark-peer-identity",
            "x_bulwark_peer_identity",
            "x-bulwark_peer-identity",
        ] {
            h.append(
                http::HeaderName::from_static(name),
                http::HeaderValue::from_static("spiffe://cluster.local/ns/default/sa/admin"),
            );
        }
        h.insert("x_request_id", http::HeaderValue::from_static("kept"));
        set_peer_identity(
            &mut h,
            Some(http::HeaderValue::from_static(
                "spiffe://cluster.local/ns/default/sa/web",
            )),
        );
        let names: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(
            h.get_all(PEER_IDENTITY_HEADER).iter().collect::<Vec<_>>(),
            ["spiffe://cluster.local/ns/default/sa/web"]
        );
        assert_eq!(h["x_request_id"], "kept");
        // A plaintext caller: no identity, whatever it wrote.
        set_peer_identity(&mut h, None);
        assert_eq!(
            h.keys().map(|n| n.as_str()).collect::<Vec<_>>(),
            ["x_request_id"]
        );
    }
}
