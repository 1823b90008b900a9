//! The operator endpoint: `GET /status` (JSON, a
//! [`StatusReport`](crate::status::StatusReport)) and `GET /metrics`
//! (Prometheus text), plain HTTP/1.1. It shows the mesh's topology, so it
//! belongs on loopback (the default) or a network only operators reach.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::server::Handle;

/// Connections served at once; more are closed straight away.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection is closed after this long, whatever it is doing.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `listener` until the task is dropped.
pub(crate) async fn serve(listener: TcpListener, handle: Handle) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "admin connection limit reached; closing");
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let handle = handle.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&handle, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(permit);
        });
    }
}

/// Whether the current trust bundle contains the root with SHA-256
/// fingerprint `root`, and whether every connected sidecar has ACKed that
/// bundle: the gate a CA waits on before a new root starts signing.
fn bundle_acked(handle: &Handle, root: &str) -> serde_json::Value {
    use bulwark_proto::config::{type_url, v1};
    use prost::Message;
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let snap = handle.snapshot();
    let current = snap
        .resources(type_url::TRUST_BUNDLE)
        .and_then(|r| r.get("bundle"))
        .cloned();
    let (version, in_bundle) = match &current {
        Some(r) => {
            let roots = v1::TrustBundle::decode(r.encoded.as_slice())
                .map(|b| b.roots_pem)
                .unwrap_or_default();
            let found = roots.iter().any(|pem| {
                CertificateDer::from_pem_slice(pem.as_bytes())
                    .is_ok_and(|d| bulwark_ca::tls::fingerprint(&d) == root)
            });
            (r.version.to_string(), found)
        }
        None => (String::new(), false),
    };
    let status = handle.status();
    let acked = status
        .sidecars
        .iter()
        .filter(|s| {
            s.types.iter().any(|t| {
                t.type_url == type_url::TRUST_BUNDLE && t.resources.get("bundle") == Some(&version)
            })
        })
        .count();
    serde_json::json!({
        "root_in_bundle": in_bundle,
        "bundle_version": version,
        "sidecars": status.sidecars.len(),
        "acked": acked,
        "all_acked": in_bundle && acked == status.sidecars.len(),
    })
}

fn respond(handle: &Handle, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: Vec<u8>| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = content_type.parse() {
            r.headers_mut().insert(http::header::CONTENT_TYPE, v);
        }
        r
    };
    if req.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            b"only GET\n".to_vec(),
        );
    }
    match req.uri().path() {
        "/status" => match serde_json::to_vec_pretty(&handle.status()) {
            Ok(mut body) => {
                body.push(b'\n');
                reply(StatusCode::OK, "application/json", body)
            }
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("cannot encode status: {e}\n").into_bytes(),
            ),
        },
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            handle.metrics_text().into_bytes(),
        ),
        "/bundle-acked" => {
            let root = req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .find_map(|kv| kv.strip_prefix("root="))
                .unwrap_or("")
                .to_ascii_lowercase();
            let mut body = bundle_acked(handle, &root).to_string().into_bytes();
            body.push(b'\n');
            reply(StatusCode::OK, "application/json", body)
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            b"not found; try /status or /metrics\n".to_vec(),
        ),
    }
}
