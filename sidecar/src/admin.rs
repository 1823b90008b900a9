//! HTTP endpoints: `/metrics` and health on the metrics port, and the admin
//! port (loopback) with `/config_dump` and `/certs`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use tokio::net::TcpListener;

use crate::Proxy;

type Body = Full<Bytes>;

fn reply(status: u16, content_type: &str, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// Connections served at once per port (probes, scrapes, an operator).
pub const MAX_CONNECTIONS: usize = 64;
/// Connections one source address may hold at once. The metrics port is
/// reachable from every pod, and the kubelet's probes must still find a
/// slot while another pod holds as many connections as it can.
pub const MAX_PER_SOURCE: usize = 8;

/// Longest wait for a request's headers.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Which set of endpoints a listener serves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// `/metrics`, `/healthz/ready`, `/healthz/live`.
    Metrics,
    /// `/config_dump`, `/certs`, and the metrics port's endpoints.
    Admin,
}

fn route(proxy: &Proxy, port: Port, req: &Request<Incoming>) -> Response<Body> {
    match req.uri().path() {
        "/metrics" => reply(
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            proxy.metrics.encode(),
        ),
        "/healthz/live" => reply(200, "text/plain", "live\n".into()),
        "/healthz/ready" => {
            let cert = proxy.identity.ready();
            let config = proxy.config.load().is_some();
            if cert && config {
                reply(200, "text/plain", "ready\n".into())
            } else {
                reply(
                    503,
                    "text/plain",
                    format!(
                        "not ready: svid={} config={}\n",
                        if cert { "ok" } else { "missing" },
                        if config { "ok" } else { "missing" }
                    ),
                )
            }
        }
        "/config_dump" if port == Port::Admin => reply(200, "application/json", config_dump(proxy)),
        "/certs" if port == Port::Admin => reply(200, "application/json", certs(proxy)),
        "/clusters" if port == Port::Admin => reply(200, "application/json", clusters(proxy)),
        "/logging" if port == Port::Admin => logging(proxy, req),
        _ => reply(404, "text/plain", "not found\n".into()),
    }
}

/// Every service with its endpoints and their live balancer state.
fn clusters(proxy: &Proxy) -> String {
    let Some(snap) = proxy.config.load() else {
        return serde_json::json!({"applied": false}).to_string();
    };
    let now = std::time::Instant::now();
    let mut out = serde_json::Map::new();
    for svc in &snap.resources.services {
        let key = crate::config::service_key(&svc.namespace, &svc.name);
        let Some(port) = svc.ports.first().map(|p| p.port as u16) else {
            continue;
        };
        let eps: Vec<serde_json::Value> = snap
            .endpoints_of(&key, port, &[])
            .iter()
            .map(|u| {
                let st = proxy.endpoints.get(u.addr);
                serde_json::json!({
                    "address": u.addr.to_string(),
                    "identity": u.identity.as_ref().map(|i| i.to_string()),
                    "labels": u.labels,
                    "outstanding": st.outstanding(),
                    "available": st.available(now),
                })
            })
            .collect();
        let breaker = proxy
            .guards
            .peek(&key)
            .and_then(|g| g.breaker.as_ref().map(|b| format!("{:?}", b.state())));
        out.insert(
            key,
            serde_json::json!({"breaker": breaker, "endpoints": eps}),
        );
    }
    serde_json::Value::Object(out).to_string()
}

/// `GET /logging` shows the log filter; `POST /logging?filter=debug` (any
/// tracing env-filter) changes it at run time.
fn logging(proxy: &Proxy, req: &Request<Incoming>) -> Response<Body> {
    let Some(ctl) = proxy.log_control.get() else {
        return reply(
            501,
            "text/plain",
            "log level control is not available in this process\n".into(),
        );
    };
    if req.method() == hyper::Method::POST {
        let filter = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .find_map(|kv| {
                kv.strip_prefix("filter=")
                    .or_else(|| kv.strip_prefix("level="))
            })
            .unwrap_or("");
        return match ctl(Some(filter)) {
            Ok(now) => reply(200, "text/plain", format!("log filter: {now}\n")),
            Err(e) => reply(400, "text/plain", format!("{e}\n")),
        };
    }
    match ctl(None) {
        Ok(now) => reply(200, "text/plain", format!("log filter: {now}\n")),
        Err(e) => reply(500, "text/plain", format!("{e}\n")),
    }
}

fn source_json(s: &Option<bulwark_proto::config::v1::Source>) -> serde_json::Value {
    match s {
        Some(s) => {
            serde_json::json!({"file": s.file, "line": s.line, "kind": s.kind, "name": s.name, "namespace": s.namespace})
        }
        None => serde_json::Value::Null,
    }
}

fn config_dump(proxy: &Proxy) -> String {
    let Some(snap) = proxy.config.load() else {
        return serde_json::json!({"applied": false}).to_string();
    };
    let r = &snap.resources;
    let mut items = Vec::new();
    let mut push = |kind: &str,
                    ns: &str,
                    name: &str,
                    src: &Option<bulwark_proto::config::v1::Source>| {
        items.push(serde_json::json!({"kind": kind, "namespace": ns, "name": name, "source": source_json(src)}));
    };
    if let Some(m) = &r.mesh {
        push("MeshConfig", "", "mesh", &m.source);
    }
    for s in &r.services {
        push("Service", &s.namespace, &s.name, &s.source);
    }
    for s in &r.service_entries {
        push("ServiceEntry", &s.namespace, &s.name, &s.source);
    }
    for s in &r.routes {
        push("Route", &s.namespace, &s.name, &s.source);
    }
    for s in &r.traffic_policies {
        push("TrafficPolicy", &s.namespace, &s.name, &s.source);
    }
    for s in &r.authorization_policies {
        push("AuthorizationPolicy", &s.namespace, &s.name, &s.source);
    }
    for s in &r.gateways {
        push("Gateway", &s.namespace, &s.name, &s.source);
    }
    for s in &r.request_authentications {
        push("RequestAuthentication", &s.namespace, &s.name, &s.source);
    }
    if let Some(b) = &r.trust_bundle {
        push("TrustBundle", "", "bundle", &b.source);
    }
    for s in &r.endpoints {
        push("ServiceEndpoints", "", &s.service, &s.source);
    }
    serde_json::json!({
        "applied": true,
        "version": snap.version,
        "stale": snap.stale,
        "mtls_mode": format!("{:?}", snap.mtls_mode),
        "outbound_policy": format!("{:?}", snap.outbound_policy),
        "endpoints": snap.endpoint_count(),
        "resources": items,
    })
    .to_string()
}

fn certs(proxy: &Proxy) -> String {
    match proxy.identity.svid() {
        Some(s) => serde_json::json!({
            "identity": s.identity.to_string(),
            "serial": s.serial,
            "not_before": s.not_before,
            "not_after": s.not_after,
            "trust_bundle_roots": s.bundle.roots().len(),
            "chain_pem": s.chain_pem,
        })
        .to_string(),
        None => {
            serde_json::json!({"identity": proxy.identity.identity().to_string(), "svid": null})
                .to_string()
        }
    }
}

/// Serves `port`'s endpoints on `addr` until the task is aborted.
pub async fn serve(
    addr: SocketAddr,
    proxy: Arc<Proxy>,
    port: Port,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let sources = bulwark_ca::admission::PerSource::new(MAX_PER_SOURCE);
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let Some(source) = sources.take(peer.ip()) else {
                proxy.metrics.refused("admin", "source_over_limit");
                continue;
            };
            // Probes and scrapes need a handful; beyond that, close at once.
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                proxy.metrics.refused("admin", "over_limit");
                continue;
            };
            let proxy = proxy.clone();
            tokio::spawn(async move {
                let _held = (permit, source);
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let resp = route(&proxy, port, &req);
                    async move { Ok::<_, Infallible>(resp) }
                });
                // A client that does not send its headers in time (half-open,
                // slowloris) is dropped.
                let _ = hyper::server::conn::http1::Builder::new()
                    .max_buf_size(64 * 1024)
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    }))
}
