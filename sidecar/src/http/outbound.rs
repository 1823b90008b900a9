//! Outbound HTTP: the app's requests, routed per `Route`, balanced over
//! healthy endpoints, guarded by bulkhead, breaker, retries and timeouts,
//! and sent over the pooled HTTP/2 mTLS connection to the chosen endpoint.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_ca::SpiffeId;
use bulwark_proto::config::v1;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{Body, reply, strip_hop_headers};
use crate::Proxy;
use crate::balance::{p2c, rand_below, rand_unit};
use crate::config::{Snapshot, Target, Upstream};
use crate::resilience::breaker::{Admit, State as BreakerState};
use crate::telemetry::{RequestKey, ServiceLabel};

/// Request bodies up to this size are buffered so they can be retried.
const REPLAY_LIMIT: usize = 64 * 1024;
/// Largest request or response header block accepted.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Serves one intercepted app connection as HTTP (1.1 or 2).
pub async fn serve(proxy: Arc<Proxy>, down: TcpStream, client: SocketAddr, target: Target) {
    // A connection that never says anything is closed like a slow request.
    let mut first = [0u8; 3];
    let n = match tokio::time::timeout(super::HEADER_READ_TIMEOUT, down.peek(&mut first)).await {
        Ok(Ok(n @ 1..)) => n,
        _ => {
            proxy.metrics.refused("outbound", "no_request");
            return;
        }
    };
    let draining = proxy.draining.subscribe();
    // The HTTP/2 preface (`PRI * HTTP/2.0`) or not.
    let h2c = b"PRI".starts_with(&first[..n]);
    // HTTP/1.1 is parked between requests (unless --park-idle-http false)
    // so that an idle keep-alive connection holds no HTTP state.
    // Shared by the connection's requests, not copied into each.
    let target = Arc::new(target);
    if proxy.park_idle_http && !h2c {
        let handler = {
            let proxy = proxy.clone();
            move |req: Request<Incoming>| handle(proxy.clone(), target.clone(), req)
        };
        let b = super::http1_builder(MAX_HEADER_BYTES);
        let settings = super::park::Settings {
            builder: &b,
            draining,
            idle: super::HEADER_READ_TIMEOUT,
            park_after: super::park::PARK_AFTER,
            parked: proxy.metrics.http_parked.clone(),
        };
        let ended = super::park::serve(down, handler, settings).await;
        if let super::park::Ended::Error(e) = ended {
            tracing::debug!(%client, error = %e, "outbound HTTP connection ended with an error");
        }
        return;
    }
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let proxy = proxy.clone();
        let target = target.clone();
        async move { Ok::<_, Infallible>(handle(proxy, target, req).await) }
    });
    // h2c multiplexes: its writes are corked like the mesh connections'.
    let r = if h2c {
        serve_auto(super::cork::Corked::new(down), svc, draining).await
    } else {
        serve_auto(down, svc, draining).await
    };
    if let Err(e) = r {
        tracing::debug!(%client, error = %e, "outbound HTTP connection ended with an error");
    }
}

/// HTTP/1.1 or HTTP/2 on `io` until the client is done or the proxy drains
/// (in-flight requests finish, then GOAWAY / `Connection: close`).
async fn serve_auto<I, S>(
    io: I,
    svc: S,
    mut draining: tokio::sync::watch::Receiver<bool>,
) -> Result<(), super::BoxError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let b = super::server_builder(MAX_HEADER_BYTES, 1024);
    let conn = b.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        () = async { let _ = draining.wait_for(|d| *d).await; } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// Either side of an upgraded connection.
trait Tunnel: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Tunnel for T {}

/// The app's side of an upgrade, once the response is written.
type DownSide =
    std::pin::Pin<Box<dyn std::future::Future<Output = Option<Box<dyn Tunnel>>> + Send>>;

/// Whether the pooled connection failed only this request's stream: the
/// peer answered it with RST_STREAM, the connection itself is fine.
fn reset_by_peer(e: &hyper::Error) -> bool {
    h2_error(e).is_some_and(|h2| h2.is_reset() && h2.is_remote())
}

/// The HTTP/2 error behind a failed request, if any.
fn h2_error(e: &hyper::Error) -> Option<&h2::Error> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        source = s.source();
    }
    None
}

/// Whether a request the pooled HTTP/2 connection failed was certainly not
/// processed by the peer (RFC 9113 §8.7): refused with REFUSED_STREAM, or
/// cut by a graceful GOAWAY whose last stream id is below it (a draining
/// peer sidecar), or never sent at all.
fn unprocessed(e: &hyper::Error) -> bool {
    match h2_error(e) {
        Some(h2) => {
            h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR))
        }
        None => e.is_canceled(),
    }
}

/// Where a request goes after routing: borrowed from the config snapshot
/// (and the connection's target) it was planned on.
pub(crate) struct Plan<'a> {
    pub route: &'a str,
    pub service: &'a str,
    pub upstreams: Cow<'a, [Arc<Upstream>]>,
    pub timeout: Option<Duration>,
    pub retry: Option<&'a v1::RetryPolicy>,
}

/// Without a policy: one retry when nothing reached the upstream.
static DEFAULT_RETRY: std::sync::LazyLock<v1::RetryPolicy> =
    std::sync::LazyLock::new(|| v1::RetryPolicy {
        attempts: 1,
        retry_on: vec!["connect-failure".into()],
        budget_ratio: 0.2,
        budget_min_per_second: 10,
        ..Default::default()
    });

/// Who sent a request that entered the mesh at the edge, for the access log.
#[derive(Debug, Clone, Default)]
pub(crate) struct EdgeCaller {
    pub addr: String,
    pub subject: String,
}

fn plan<'a>(
    snap: &'a Snapshot,
    target: &'a Target,
    req: &Request<Incoming>,
) -> Result<Plan<'a>, Box<Response<Body>>> {
    if let Some(up) = &target.pinned
        && snap.route(&target.service).is_none()
    {
        return Ok(Plan {
            route: "default",
            service: &target.service,
            upstreams: Cow::Owned(vec![Arc::new(up.clone())]),
            timeout: None,
            retry: None,
        });
    }
    match snap.route(&target.service) {
        None => Ok(Plan {
            route: "default",
            service: &target.service,
            upstreams: snap.endpoints_of(&target.service, target.port, &[]),
            timeout: None,
            retry: None,
        }),
        Some(table) => {
            let rule = table
                .find(req.method(), req.uri().path(), req.headers())
                .ok_or_else(|| Box::new(reply(404, "no-route")))?;
            let b = rule.pick(req.headers(), rand_unit());
            let port = if b.port == 0 { target.port } else { b.port };
            Ok(Plan {
                route: &rule.name,
                service: &b.service,
                upstreams: snap.endpoints_of(&b.service, port, &b.subset),
                timeout: rule.timeout,
                retry: rule.retry.as_ref(),
            })
        }
    }
}

async fn handle(proxy: Arc<Proxy>, target: Arc<Target>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let Some(snap) = proxy.config.load() else {
        return reply(503, "no-config");
    };
    let plan = match plan(&snap, &target, &req) {
        Ok(p) => p,
        Err(resp) => return *resp,
    };
    let req = req.map(super::boxed_body);
    exchange(&proxy, &snap, plan, req, "outbound", None, started).await
}

/// Sends a routed request into the mesh and accounts for it (span, metrics,
/// access log): the common path of the outbound sidecar and the gateway.
pub(crate) async fn exchange(
    proxy: &Arc<Proxy>,
    snap: &Snapshot,
    plan: Plan<'_>,
    mut req: Request<Body>,
    direction: &'static str,
    edge: Option<&EdgeCaller>,
    started: Instant,
) -> Response<Body> {
    let me = proxy.identity.identity().as_str();
    let method = req.method().clone();
    // Kept for the span and the access log: a reference count, not a copy.
    let uri = req.uri().clone();
    let host = req.headers().get(http::header::HOST).cloned();
    let path = uri.path();
    let span = proxy.tracer().start_span(
        opentelemetry::trace::SpanKind::Client,
        req.headers_mut(),
        || {
            (
                format!("{direction} {}", plan.service),
                vec![
                    opentelemetry::KeyValue::new("bulwark.direction", direction),
                    opentelemetry::KeyValue::new("bulwark.service", plan.service.to_string()),
                    opentelemetry::KeyValue::new("bulwark.route", plan.route.to_string()),
                    opentelemetry::KeyValue::new("http.request.method", method.to_string()),
                    opentelemetry::KeyValue::new("url.path", path.to_string()),
                    opentelemetry::KeyValue::new("bulwark.src_identity", me.to_string()),
                ],
            )
        },
    );
    let authority = uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| host.as_ref().and_then(|h| h.to_str().ok()))
        .unwrap_or_default();
    let policy = snap.policy(plan.service);
    let guards = proxy.guards.for_service(plan.service, policy);
    let policy = policy.map(|p| &**p);
    let upgrade = req.headers().contains_key(http::header::UPGRADE)
        && req.version() == http::Version::HTTP_11;
    let (resp, upstream, dst_identity, attempts) = if plan.upstreams.is_empty() {
        (reply(503, "no-healthy-endpoint"), None, None, 0)
    } else if upgrade {
        // Boxed, like every rare and large path: see `pool::MeshPool::get`.
        Box::pin(upgrade_tunnel(proxy, &plan, req)).await
    } else {
        let work = send_with_retries(proxy, &plan, &guards, policy, req);
        // The attempts observe the route timeout themselves; this is a backstop.
        match plan.timeout {
            Some(t) => match tokio::time::timeout(t + Duration::from_millis(250), work).await {
                Ok(r) => r,
                Err(_) => (reply(504, "timeout"), None, None, 0),
            },
            None => work.await,
        }
    };
    let code = resp.status().as_u16();
    let dst_identity = dst_identity.as_ref().map_or("", SpiffeId::as_str);
    let key = RequestKey {
        direction,
        service: plan.service,
        route: plan.route,
        src_identity: me,
        dst_identity,
        code,
    };
    let reason = proxy.metrics.record_request(key, started.elapsed(), &resp);
    let trace_id = span.trace_id();
    let upstream = OrEmpty(upstream);
    let retries = attempts.saturating_sub(1);
    span.finish(code, || {
        vec![
            opentelemetry::KeyValue::new("bulwark.dst_identity", dst_identity.to_string()),
            opentelemetry::KeyValue::new("bulwark.upstream", upstream.to_string()),
            opentelemetry::KeyValue::new("bulwark.retries", i64::from(retries)),
            opentelemetry::KeyValue::new("bulwark.reason", reason.clone()),
        ]
    });
    let bytes = hyper::body::Body::size_hint(resp.body())
        .exact()
        .unwrap_or(0);
    let (client_addr, client_subject) = edge.map_or(("", ""), |e| (&*e.addr, &*e.subject));
    tracing::info!(target: "bulwark::access", trace_id = %trace_id, bytes, direction, method = %method,
        authority = %authority, path = %path, service = %plan.service, route = %plan.route, status = code,
        src_identity = %me, dst_identity = %dst_identity, upstream = %upstream, retries, reason = %reason,
        client_addr, client_subject, duration_us = started.elapsed().as_micros() as u64, "request");
    resp
}

/// The URI of a request sent to a peer sidecar over HTTP/2: scheme `http`,
/// the request's own authority, else its `Host`, else the service's
/// DNS-style name (`name.namespace`: HTTP/1.0 and h2c clients may send
/// neither); path and query unchanged (`/` if there was none).
fn mesh_uri(uri: http::Uri, host: Option<http::HeaderValue>, service: &str) -> http::Uri {
    let mut parts = uri.into_parts();
    if parts.authority.is_none() {
        parts.authority = host
            .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
            .or_else(|| {
                let (ns, name) = service.split_once('/').unwrap_or(("default", service));
                http::uri::Authority::try_from(format!("{name}.{ns}")).ok()
            });
    }
    super::http_uri(parts).unwrap_or_else(|_| http::Uri::from_static("http://invalid/"))
}

/// Whether an outcome may be retried under `retry_on`.
fn retriable(
    retry_on: &[String],
    codes: &[u32],
    status: Option<u16>,
    connect_failure: bool,
) -> bool {
    let has = |c: &str| retry_on.iter().any(|r| r == c);
    match status {
        None if connect_failure => {
            has("connect-failure") || has("reset") || has("5xx") || has("gateway-error")
        }
        None => has("reset") || has("5xx"),
        Some(s) => {
            (has("5xx") && s >= 500)
                || (has("gateway-error") && matches!(s, 502..=504))
                || (has("retriable-status-codes") && codes.contains(&u32::from(s)))
        }
    }
}

/// The response, the upstream tried last and its identity, and the attempts made.
type Outcome = (Response<Body>, Option<SocketAddr>, Option<SpiffeId>, u32);

/// An optional value in the access log: empty when absent.
struct OrEmpty<T>(Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for OrEmpty<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => Ok(()),
        }
    }
}

/// [`send_guarded`] within the service's adaptive concurrency limit, if it
/// has one: refused at once beyond the limit, and the latency of answered
/// requests fed back into it.
async fn send_with_retries(
    proxy: &Proxy,
    plan: &Plan<'_>,
    guards: &crate::resilience::state::ServiceGuards,
    policy: Option<&v1::TrafficPolicy>,
    req: Request<Body>,
) -> Outcome {
    let Some(limiter) = &guards.adaptive else {
        return send_guarded(proxy, plan, guards, policy, req).await;
    };
    let label = ServiceLabel {
        service: plan.service.to_string(),
    };
    if limiter.announce() {
        let gauge = proxy.metrics.adaptive_limit.get_or_create(&label);
        gauge.set(limiter.limit() as i64);
    }
    let permit = match limiter.try_acquire(Instant::now()) {
        Ok(p) => p,
        Err(_) => {
            let m = &proxy.metrics;
            m.adaptive_rejections.get_or_create(&label).inc();
            return (reply(503, "concurrency-limited"), None, None, 0);
        }
    };
    let out = send_guarded(proxy, plan, guards, policy, req).await;
    // Latency says something about the upstream only when it answered (or
    // ran out of time); local refusals and connect failures are dropped.
    let reason = out.0.headers().get(super::REASON_HEADER);
    if (reason.is_none() || reason.is_some_and(|r| r == "timeout"))
        && let Some(limit) = permit.finish(Instant::now())
    {
        let gauge = proxy.metrics.adaptive_limit.get_or_create(&label);
        gauge.set(limit as i64);
    }
    out
}

async fn send_guarded(
    proxy: &Proxy,
    plan: &Plan<'_>,
    guards: &crate::resilience::state::ServiceGuards,
    policy: Option<&v1::TrafficPolicy>,
    req: Request<Body>,
) -> Outcome {
    let _permit = match &guards.bulkhead {
        Some(b) => match b.acquire().await {
            Ok(p) => Some(p),
            Err(_) => {
                proxy
                    .metrics
                    .bulkhead_rejections
                    .get_or_create(&ServiceLabel {
                        service: plan.service.to_string(),
                    })
                    .inc();
                return (reply(503, "bulkhead-full"), None, None, 0);
            }
        },
        None => None,
    };
    let (mut parts, body) = req.into_parts();
    strip_hop_headers(&mut parts.headers);
    parts.headers.remove(super::PEER_IDENTITY_HEADER);
    // HTTP/2 carries the authority in the URI (`:authority`), not `Host`.
    let host = parts.headers.remove(http::header::HOST);
    parts.uri = mesh_uri(std::mem::take(&mut parts.uri), host, plan.service);
    parts.version = http::Version::HTTP_2;

    // Keep the body for retries within the bound, never holding back a
    // stream (see `replay`).
    let mut buffered = match super::replay::read(body, &parts.headers, REPLAY_LIMIT).await {
        Ok(b) => b,
        Err(e @ super::replay::ReadError::TooLarge(_)) => {
            tracing::debug!(error = %e, "request refused");
            return (reply(413, "request-body-too-large"), None, None, 0);
        }
        Err(e) => {
            tracing::debug!(error = %e, "request refused");
            return (reply(400, "request-body-error"), None, None, 0);
        }
    };

    let retry = plan.retry.unwrap_or(&DEFAULT_RETRY);
    let outlier = policy.and_then(|p| p.outlier_detection);
    let now = Instant::now();
    guards.budget.record_request(now);
    let deadline = plan.timeout.map(|t| now + t);
    let states: Vec<_> = plan
        .upstreams
        .iter()
        .map(|u| proxy.endpoints.get(u.addr))
        .collect();
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let admit = match &guards.breaker {
            Some(b) => {
                let a = b.admit(Instant::now());
                publish_breaker(proxy, plan.service, b);
                if a == Admit::No {
                    return (reply(503, "breaker-open"), None, None, attempt - 1);
                }
                a
            }
            None => Admit::Yes,
        };
        // Prefer endpoints not tried yet for this request.
        let fresh: Vec<_> = if tried.is_empty() {
            Vec::new()
        } else {
            states
                .iter()
                .filter(|s| !tried.contains(&s.addr))
                .cloned()
                .collect()
        };
        let pool = if fresh.is_empty() { &states } else { &fresh };
        let round_robin = policy.is_some_and(|p| p.lb == v1::LbAlgorithm::RoundRobin as i32);
        let ep = if round_robin {
            crate::balance::round_robin(pool, Instant::now(), &guards.rr)
        } else {
            p2c(pool, Instant::now(), rand_below)
        }
        .expect("non-empty")
        .clone();
        let up = plan
            .upstreams
            .iter()
            .find(|u| u.addr == ep.addr)
            .expect("state of a planned upstream");
        let identity = up
            .identity
            .clone()
            .expect("L7 upstreams are mesh workloads");
        let inflight = ep.start();
        // Each attempt gets the per-try timeout, and never more than what is
        // left of the route's timeout: a timed-out attempt is a failure the
        // breaker and outlier detection see.
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let per_try = match (
            (retry.per_try_timeout_ms > 0).then(|| Duration::from_millis(retry.per_try_timeout_ms)),
            left,
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // A request the peer never processed (its connection was going
        // away: a renewal's GOAWAY, a drain) says nothing about the
        // endpoint's health.
        let mut unprocessed_here = false;
        let result = async {
            let mut sender = proxy
                .pool
                .get(proxy, up.addr, &identity)
                .await
                .map_err(|e| (true, e.to_string()))?;
            // Taken only now: a failed connect leaves the body for the next try.
            let body = buffered
                .take()
                .expect("retried only while the body can be sent");
            match sender
                .send_request(Request::from_parts(parts.clone(), body))
                .await
            {
                Ok(r) => Ok(r),
                Err(e) => {
                    // A stream the peer reset (REFUSED_STREAM, say) leaves
                    // the connection serving every other request: replacing
                    // it would cost a handshake for nothing.
                    if !reset_by_peer(&e) || sender.is_closed() {
                        proxy.pool.evict(up.addr, &identity).await;
                    }
                    // Never processed upstream: as safe to retry as a
                    // failed connect, whatever the method.
                    unprocessed_here = unprocessed(&e);
                    Err((unprocessed_here, e.to_string()))
                }
            }
        };
        let result = match per_try {
            Some(t) => tokio::time::timeout(t, result)
                .await
                .unwrap_or(Err((false, "per-try timeout".into()))),
            None => result.await,
        };
        drop(inflight);
        let status = result.as_ref().ok().map(|r| r.status().as_u16());
        // A trailers-only UNAVAILABLE is gRPC's 503: a failure for the
        // breaker and outlier detection although the HTTP status is 200.
        let grpc_unavailable =
            result.as_ref().ok().and_then(grpc_trailers_only_status) == Some(GRPC_UNAVAILABLE);
        let success = status.is_some_and(|s| s < 500) && !grpc_unavailable;
        if let Some(b) = &guards.breaker {
            if unprocessed_here {
                b.release(&admit);
            } else {
                b.record(&admit, success, Instant::now());
            }
            publish_breaker(proxy, plan.service, b);
        }
        if let Some(o) = outlier.as_ref().filter(|_| !unprocessed_here) {
            let failed_5xx = !success;
            let base = Duration::from_millis(o.base_ejection_ms.max(1));
            // Never eject more than the configured share of the pool.
            let now = Instant::now();
            let ejected = states.iter().filter(|s| !s.available(now)).count();
            let cap = (states.len() as u64 * u64::from(o.max_ejection_percent.clamp(1, 100)) / 100)
                .max(1) as usize;
            let threshold = if ejected >= cap { 0 } else { o.consecutive_5xx };
            if ep.record(!failed_5xx, threshold, base, now) {
                proxy
                    .metrics
                    .outlier_ejections
                    .get_or_create(&ServiceLabel {
                        service: plan.service.to_string(),
                    })
                    .inc();
                tracing::info!(endpoint = %ep.addr, service = %plan.service, "endpoint ejected (outlier detection)");
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) && !success {
            return (
                reply(504, "timeout"),
                Some(up.addr),
                Some(identity),
                attempt,
            );
        }
        let connect_failure = matches!(&result, Err((true, _)));
        // A request that may have reached the upstream is retried only if
        // repeating it is safe.
        let idempotent = matches!(
            parts.method,
            http::Method::GET
                | http::Method::HEAD
                | http::Method::OPTIONS
                | http::Method::PUT
                | http::Method::DELETE
                | http::Method::TRACE
        );
        // A gRPC call answered trailers-only with a status named in retryOn
        // is retried like a 5xx, whatever the method (gRPC calls are all POST).
        let grpc_retry = result
            .as_ref()
            .ok()
            .and_then(grpc_trailers_only_status)
            .is_some_and(|code| grpc_retriable(&retry.retry_on, code));
        let can_retry = (grpc_retry
            || (!success
                && (idempotent || connect_failure || retry.retry_non_idempotent)
                && retriable(
                    &retry.retry_on,
                    &retry.retriable_status_codes,
                    status,
                    connect_failure,
                )))
            && attempt <= retry.attempts
            && buffered.replayable()
            && guards.budget.try_retry(
                retry.budget_ratio,
                retry.budget_min_per_second,
                Instant::now(),
            );
        if !can_retry {
            return match result {
                Ok(r) => {
                    let (mut p, b) = r.into_parts();
                    strip_hop_headers(&mut p.headers);
                    let b = b.map_err(|e| -> super::BoxError { Box::new(e) }).boxed();
                    (
                        Response::from_parts(p, b),
                        Some(up.addr),
                        Some(identity.clone()),
                        attempt,
                    )
                }
                Err((true, e)) => {
                    tracing::info!(upstream = %up.addr, error = %e, "upstream connect failed");
                    (
                        reply(503, "upstream-connect-failure"),
                        Some(up.addr),
                        Some(identity.clone()),
                        attempt,
                    )
                }
                Err((false, e)) => {
                    tracing::info!(upstream = %up.addr, error = %e, "upstream request failed");
                    (
                        reply(502, "upstream-reset"),
                        Some(up.addr),
                        Some(identity.clone()),
                        attempt,
                    )
                }
            };
        }
        // Recorded only now: a request that is not retried allocates nothing for it.
        tried.push(ep.addr);
        proxy
            .metrics
            .retries
            .get_or_create(&ServiceLabel {
                service: plan.service.to_string(),
            })
            .inc();
        let base = Duration::from_millis(retry.backoff_base_ms.max(1));
        let max = Duration::from_millis(retry.backoff_max_ms.max(retry.backoff_base_ms).max(1));
        let backoff = (base * 2u32.saturating_pow(attempt - 1)).min(max);
        // Full jitter.
        tokio::time::sleep(backoff.mul_f64(rand_unit())).await;
    }
}

/// The `grpc-status` of a trailers-only gRPC response (HTTP 200 with the
/// status in the headers: the call failed before any message).
/// gRPC status code 14.
const GRPC_UNAVAILABLE: u32 = 14;

fn grpc_trailers_only_status<B>(r: &Response<B>) -> Option<u32> {
    if r.status() != http::StatusCode::OK {
        return None;
    }
    r.headers().get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// Whether `retry_on` names gRPC status `code` (by Envoy's names).
fn grpc_retriable(retry_on: &[String], code: u32) -> bool {
    let name = match code {
        1 => "cancelled",
        4 => "deadline-exceeded",
        8 => "resource-exhausted",
        13 => "internal",
        14 => "unavailable",
        _ => return false,
    };
    retry_on.iter().any(|r| r == name)
}

fn publish_breaker(proxy: &Proxy, service: &str, b: &crate::resilience::breaker::Breaker) {
    let label = ServiceLabel {
        service: service.to_string(),
    };
    let state = b.state();
    proxy
        .metrics
        .breaker_state
        .get_or_create(&label)
        .set(state as i64);
    let t = b.transitions();
    let c = proxy.metrics.breaker_transitions.get_or_create(&label);
    let seen = c.get();
    if t > seen {
        c.inc_by(t - seen);
    }
    if state == BreakerState::Open && t > seen {
        tracing::warn!(service, "circuit breaker opened");
    }
}

/// HTTP/1.1 upgrades (WebSocket and friends): the request goes over a
/// dedicated mTLS tunnel to the chosen endpoint (HTTP/2 between sidecars
/// cannot carry an HTTP/1 upgrade), and once the upstream agrees (101) the
/// two upgraded connections are spliced together.
async fn upgrade_tunnel(proxy: &Arc<Proxy>, plan: &Plan<'_>, mut req: Request<Body>) -> Outcome {
    let states: Vec<_> = plan
        .upstreams
        .iter()
        .map(|u| proxy.endpoints.get(u.addr))
        .collect();
    let ep = p2c(&states, Instant::now(), rand_below)
        .expect("non-empty")
        .clone();
    let up = plan
        .upstreams
        .iter()
        .find(|u| u.addr == ep.addr)
        .expect("planned upstream");
    let identity = up.identity.clone().expect("mesh upstream");
    use crate::dial::DialError;
    let tls =
        match crate::dial::dial_peer(proxy, up.addr, &identity, bulwark_ca::tls::ALPN_MESH_TCP)
            .await
        {
            Ok(t) => t,
            Err(e) => {
                let reason = match e {
                    DialError::Connect(..) | DialError::ConnectTimeout(_) => {
                        "upstream-connect-failure"
                    }
                    DialError::Tls(..) | DialError::TlsTimeout(_) => "upstream-tls-failure",
                };
                return (reply(503, reason), Some(up.addr), Some(identity.clone()), 1);
            }
        };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(tls)).await {
        Ok(x) => x,
        Err(_) => {
            return (
                reply(502, "upstream-reset"),
                Some(up.addr),
                Some(identity.clone()),
                1,
            );
        }
    };
    tokio::spawn(conn.with_upgrades());
    // A parked app connection hands its socket over itself; others (the
    // gateway's, HTTP/2) through hyper's upgrade.
    let manual = req.extensions_mut().remove::<super::park::ManualUpgrade>();
    let hold = req.extensions_mut().remove::<super::ConnectionHold>();
    let idle = req
        .extensions_mut()
        .remove::<super::TunnelIdle>()
        .map(|t| t.0);
    let down_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    parts.headers.remove(super::PEER_IDENTITY_HEADER);
    let up_req = Request::from_parts(parts, body);
    let mut resp = match sender.send_request(up_req).await {
        Ok(r) => r,
        Err(_) => {
            return (
                reply(502, "upstream-reset"),
                Some(up.addr),
                Some(identity.clone()),
                1,
            );
        }
    };
    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        let up_upgrade = hyper::upgrade::on(&mut resp);
        let down: DownSide = match manual {
            Some(m) => {
                let rx = m.accept();
                Box::pin(async move { rx.await.ok().map(|io| Box::new(io) as Box<dyn Tunnel>) })
            }
            None => Box::pin(async move {
                down_upgrade
                    .await
                    .ok()
                    .map(|u| Box::new(TokioIo::new(u)) as Box<dyn Tunnel>)
            }),
        };
        tokio::spawn(async move {
            // The client connection's slots, for as long as the tunnel lives.
            let _hold = hold;
            match (down.await, up_upgrade.await) {
                (Some(mut d), Ok(u)) => {
                    if super::tunnel::relay(&mut d, &mut TokioIo::new(u), idle).await {
                        tracing::debug!("upgraded connection idle; closed");
                    }
                }
                (d, u) => {
                    tracing::debug!(
                        down = d.is_some(),
                        up = u.is_ok(),
                        "upgrade did not complete"
                    )
                }
            }
        });
    }
    let (p, b) = resp.into_parts();
    (
        Response::from_parts(p, b.map_err(|e| -> super::BoxError { Box::new(e) }).boxed()),
        Some(up.addr),
        Some(identity.clone()),
        1,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(u: &str, host: Option<&str>) -> String {
        let host = host.map(|h| http::HeaderValue::from_str(h).unwrap());
        mesh_uri(u.parse().unwrap(), host, "shop/cart").to_string()
    }

    #[test]
    fn mesh_uri_keeps_path_and_query_and_takes_the_best_authority() {
        // Origin form: the Host header names the authority.
        assert_eq!(
            uri("/items/5?x=1", Some("cart:8080")),
            "http://cart:8080/items/5?x=1"
        );
        assert_eq!(uri("/a", Some("[::1]:80")), "http://[::1]:80/a");
        // Absolute form (and HTTP/2's `:authority`) wins over Host.
        assert_eq!(
            uri("http://cart.shop/b?y", Some("other")),
            "http://cart.shop/b?y"
        );
        // Neither, or a Host that is no authority: the service's name, and
        // the path and query survive.
        assert_eq!(uri("/items/5?x=1", None), "http://cart.shop/items/5?x=1");
        assert_eq!(
            uri("/items/5", Some("bad host")),
            "http://cart.shop/items/5"
        );
        // Authority form (CONNECT): a path of its own.
        assert_eq!(uri("cart:443", None), "http://cart:443/");
    }
}
