//! The injection webhook's HTTPS endpoint (`--webhook-listen`, `:15017`):
//! `POST /inject` takes an AdmissionReview and answers with
//! [`crate::inject::review`]; `GET /healthz` answers `ok` (for probes).
//! TLS uses the control plane's own serving certificate (DNS names
//! `bulwark-xds.bulwark-system.svc`...), issued from the CA directory; the
//! API server verifies it with the mesh's trust bundle as the webhook's
//! `caBundle`. No client certificate is asked for.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::inject::{InjectConfig, review};

/// Largest AdmissionReview accepted (the API server sends at most ~3 MiB).
pub const MAX_BODY: usize = 4 * 1024 * 1024;
/// Connections served at once; more are closed straight away.
pub const MAX_CONNECTIONS: usize = 256;
/// Reviews read and answered at once; more wait (within the connection's
/// deadline). A review takes milliseconds, and each holds its body and its
/// parsed JSON, several times the body's size: without this bound, any pod
/// that can reach the port could make the control plane hold
/// `MAX_CONNECTIONS` such bodies and exhaust its memory.
pub const REVIEWS_AT_ONCE: usize = 4;
/// Longest a review's body may take to arrive once it has a place: the
/// API server sends it at once, and a client trickling a large body must
/// not hold one of the few places for long.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(2);
static REVIEWS: Semaphore = Semaphore::const_new(REVIEWS_AT_ONCE);
/// A connection is closed after this long, whatever it is doing.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that has not finished its TLS handshake by then is dropped
/// (half-open connections do not hold a place for long).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a request's headers (slowloris).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `listener` until the task is dropped.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    cfg: Arc<InjectConfig>,
    metrics: Arc<crate::metrics::XdsMetrics>,
) {
    let count = move |result: &'static str| {
        metrics
            .webhook_connections
            .get_or_create(&crate::metrics::ResultLabel { result })
            .inc();
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "webhook accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "webhook connection limit reached; closing");
            count("over_limit");
            continue;
        };
        let (acceptor, cfg, count) = (acceptor.clone(), cfg.clone(), count.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let work = async {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                        return "tls_error";
                    }
                    Err(_) => return "tls_timeout",
                };
                let svc = hyper::service::service_fn(move |req| {
                    let cfg = cfg.clone();
                    async move { Ok::<_, std::convert::Infallible>(respond(req, &cfg).await) }
                });
                match hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await
                {
                    Ok(()) => "served",
                    Err(e) if e.is_timeout() => "timeout",
                    Err(_) => "http_error",
                }
            };
            count(
                tokio::time::timeout(CONNECTION_TIMEOUT, work)
                    .await
                    .unwrap_or("timeout"),
            );
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

async fn respond(req: Request<Incoming>, cfg: &InjectConfig) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => reply(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
        (&Method::POST, "/inject") => {
            let _review = REVIEWS.acquire().await.expect("never closed");
            let read = Limited::new(req.into_body(), MAX_BODY).collect();
            let body = match tokio::time::timeout(BODY_TIMEOUT, read).await {
                Ok(Ok(b)) => b.to_bytes(),
                Err(_) => {
                    tracing::warn!("webhook request body not received in time");
                    return reply(
                        StatusCode::REQUEST_TIMEOUT,
                        "text/plain",
                        b"bulwark injector: the request body did not arrive in time\n".to_vec(),
                    );
                }
                Ok(Err(e)) => {
                    let (_, v) = review(b"", cfg);
                    tracing::warn!(error = %e, "webhook request body refused");
                    let mut v = v;
                    v["response"]["status"]["message"] =
                        format!("bulwark injector: cannot read the request body: {e}").into();
                    return reply(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "application/json",
                        v.to_string().into_bytes(),
                    );
                }
            };
            let (code, v) = review(&body, cfg);
            let r = &v["response"];
            tracing::info!(
                uid = r["uid"].as_str().unwrap_or(""),
                allowed = r["allowed"].as_bool().unwrap_or(false),
                patched = r.get("patch").is_some(),
                code,
                "admission review"
            );
            reply(
                StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST),
                "application/json",
                v.to_string().into_bytes(),
            )
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            b"not found; POST /inject or GET /healthz\n".to_vec(),
        ),
    }
}
