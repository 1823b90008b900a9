//! The gateway's listeners and request pipeline.
//!
//! A request through a public listener goes: route (host, path, method,
//! headers) → JWT authentication → authorization on claims → per-client
//! rate limit → body limit and JSON Schema → into the mesh through the same
//! path as an outbound sidecar request (balancing, retries, breakers,
//! bulkheads, mTLS to the destination's sidecar). Every refusal is a local
//! response with `x-bulwark-reason`, counted and access-logged like any
//! other request.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bulwark_proto::config::v1;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::certs::{self, CertSet};
use super::clients::{Activity, Answering, ClientSlots, Uploading, client_block};
use super::jwt::{self, AuthOutcome, Authenticator, Principal};
use super::schema::BodySchema;
use crate::Proxy;
use crate::config::Snapshot;
use crate::http::deadline::{FirstBytes, PREFACE_BYTES};
use crate::http::outbound::{EdgeCaller, Plan, exchange};
use crate::http::route::{RouteTable, Rule};
use crate::http::{
    Body, ConnectionHold, DrainOnDrop, PEER_IDENTITY_HEADER, TunnelIdle, full, reply,
};
use crate::resilience::ratelimit::{KeyedLimiter, RateDecision};
use crate::telemetry::{HandshakeLabels, RequestKey, ServiceLabel};

/// Body bound when a route validates bodies without saying how large.
const DEFAULT_MAX_BODY: u64 = 1024 * 1024;
/// Distinct clients tracked per rate-limited route.
const MAX_CLIENT_KEYS: usize = 100_000;
/// Largest request header block.
const MAX_HEADER_BYTES: usize = 64 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Public connections are probed after a minute of silence, and dropped
/// after three unanswered probes 10 s apart.
const CLIENT_KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(60))
    .with_interval(Duration::from_secs(10))
    .with_retries(3);
/// How often certificate files are checked for changes.
const CERT_POLL: Duration = Duration::from_secs(1);

/// Which gateway this proxy is, and where its listeners bind.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// `namespace/name` of the `Gateway` resource.
    pub name: String,
    pub bind: IpAddr,
    /// Connections one client (an IPv4 address, an IPv6 /64) may hold at
    /// once; beyond them its new ones are reset. 0: no per-client cap.
    pub max_connections_per_client: usize,
    /// A connection with no request in flight for this long is closed
    /// (gracefully: GOAWAY, or no more keep-alive). A request is in flight
    /// until its response's last byte. Zero: no idle timeout.
    pub idle_timeout: Duration,
}

impl GatewayOptions {
    /// The defaults for the gateway `name` (`namespace/name`).
    pub fn new(name: String) -> Self {
        Self {
            name,
            bind: IpAddr::from([0, 0, 0, 0]),
            max_connections_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Per-client connection cap: well above what one browser or service
/// opens (browsers keep about 6 per host), far below `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 256;
/// Idle timeout of a public connection (an HTTP/2 connection kept alive by
/// pings would otherwise hold its slot for good).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// How a rate-limited route tells clients apart.
#[derive(Debug, Clone, PartialEq)]
enum ClientKey {
    /// The token's subject; the source IP for anonymous callers.
    Subject,
    SourceIp,
    Header(http::HeaderName),
}

impl ClientKey {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "subject" => Ok(Self::Subject),
            "source-ip" => Ok(Self::SourceIp),
            _ => s
                .strip_prefix("header:")
                .and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok())
                .map(Self::Header)
                .ok_or_else(|| {
                    format!("rate limit key {s:?}: expected subject, source-ip or header:<name>")
                }),
        }
    }

    fn of(&self, p: Option<&Principal>, h: &http::HeaderMap, ip: IpAddr) -> String {
        let ip = client_block(ip);
        match self {
            Self::Subject => match p {
                Some(p) => format!("sub:{}#{}", p.issuer, p.subject),
                None => format!("ip:{ip}"),
            },
            Self::SourceIp => format!("ip:{ip}"),
            // No header: the caller is limited by address instead of escaping the limit.
            Self::Header(n) => match h.get(n) {
                Some(v) => format!("h:{}", String::from_utf8_lossy(v.as_bytes())),
                None => format!("ip:{ip}"),
            },
        }
    }
}

struct GwRoute {
    rule: Rule,
    /// The listeners that serve it (all when empty).
    listeners: Vec<String>,
    hostnames: Vec<String>,
    authorization: Option<v1::GatewayAuthorization>,
    limit: Option<(ClientKey, Arc<KeyedLimiter>)>,
    schema: Option<Arc<BodySchema>>,
    max_body: Option<u64>,
}

/// A gateway's config compiled for the request path; replaced whole.
struct Compiled {
    name: String,
    routes: Vec<GwRoute>,
    auth: Option<Arc<Authenticator>>,
    /// Headers clients may not set themselves (the gateway sets them).
    strip: Vec<http::HeaderName>,
    /// Service (`namespace/name`) -> port used when a backend names none.
    ports: HashMap<String, u16>,
}

/// Things worth keeping across config changes when their config did not
/// change: JWKS caches and the clients' token buckets.
#[derive(Default)]
struct Reuse {
    auth: Option<(Vec<v1::JwtProvider>, Arc<Authenticator>)>,
    limiters: HashMap<(String, String, u32, u32), Arc<KeyedLimiter>>,
}

/// `mark`: the proxy's `SO_MARK`, for the connections the config makes
/// (fetching JWKS).
fn compile(
    gw: &v1::Gateway,
    auths: &[&v1::RequestAuthentication],
    snap: &Snapshot,
    reuse: &mut Reuse,
    mark: u32,
) -> Result<Compiled, String> {
    let providers: Vec<v1::JwtProvider> = auths
        .iter()
        .flat_map(|a| a.providers.iter().cloned())
        .collect();
    let auth = if providers.is_empty() {
        None
    } else {
        match &reuse.auth {
            Some((p, a)) if *p == providers => Some(a.clone()),
            _ => {
                let a = Arc::new(Authenticator::new(&providers, mark).map_err(|e| e.to_string())?);
                reuse.auth = Some((providers, a.clone()));
                Some(a)
            }
        }
    };
    let mut limiters = HashMap::new();
    let mut routes = Vec::new();
    let mut ports = HashMap::new();
    for (i, r) in gw.routes.iter().enumerate() {
        let http = r.http.clone().unwrap_or_default();
        let route_name = if http.name.is_empty() {
            format!("route-{i}")
        } else {
            http.name.clone()
        };
        let table = RouteTable::compile(&v1::Route {
            name: gw.name.clone(),
            namespace: gw.namespace.clone(),
            service: http
                .backends
                .first()
                .map(|b| b.service.clone())
                .unwrap_or_default(),
            rules: vec![v1::HttpRoute {
                name: route_name.clone(),
                ..http
            }],
            source: None,
        })?;
        let rule = table.rules.into_iter().next().expect("one rule compiled");
        if rule.backends.iter().any(|b| b.service.ends_with('/')) {
            return Err(format!("route {route_name}: no backend service"));
        }
        for b in rule
            .backends
            .iter()
            .chain(rule.overrides.iter().map(|(_, b)| b))
        {
            if let Some(p) = snap.default_port(&b.service) {
                ports.insert(b.service.clone(), p);
            }
        }
        let limit = match &r.rate_limit {
            Some(l) if l.requests_per_second > 0 => {
                let key = ClientKey::parse(&l.key)?;
                let burst = if l.burst == 0 {
                    l.requests_per_second
                } else {
                    l.burst
                };
                let id = (
                    route_name.clone(),
                    l.key.clone(),
                    l.requests_per_second,
                    burst,
                );
                let lim = reuse.limiters.get(&id).cloned().unwrap_or_else(|| {
                    Arc::new(KeyedLimiter::new(
                        l.requests_per_second,
                        burst,
                        MAX_CLIENT_KEYS,
                    ))
                });
                limiters.insert(id, lim.clone());
                Some((key, lim))
            }
            _ => None,
        };
        let (schema, max_body) = match &r.validation {
            Some(v) => {
                let schema = if v.json_schema.is_empty() {
                    None
                } else {
                    Some(Arc::new(BodySchema::compile(&v.json_schema).map_err(
                        |e| format!("route {route_name}: JSON Schema: {e}"),
                    )?))
                };
                let max = if v.max_body_bytes == 0 {
                    DEFAULT_MAX_BODY
                } else {
                    v.max_body_bytes
                };
                (schema, Some(max))
            }
            None => (None, None),
        };
        if let Some(l) = r
            .listeners
            .iter()
            .find(|l| !gw.listeners.iter().any(|have| have.name == **l))
        {
            return Err(format!("route {route_name}: no listener named {l}"));
        }
        routes.push(GwRoute {
            rule,
            listeners: r.listeners.clone(),
            hostnames: r.hostnames.iter().map(|h| h.to_ascii_lowercase()).collect(),
            authorization: r.authorization.clone(),
            limit,
            schema,
            max_body,
        });
    }
    // Limiters of routes that went away are dropped with the old config.
    reuse.limiters = limiters;
    let mut strip: Vec<http::HeaderName> = auth
        .as_ref()
        .map(|a| a.forwarded_header_names())
        .unwrap_or_default();
    strip.push(http::HeaderName::from_static(PEER_IDENTITY_HEADER));
    Ok(Compiled {
        name: format!("{}/{}", gw.namespace, gw.name),
        routes,
        auth,
        strip,
        ports,
    })
}

struct Listener {
    spec: v1::GatewayListener,
    certs: Arc<CertSet>,
    task: JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs the gateway named in `opts` until the task is dropped: follows the
/// applied config, opening, re-keying and closing listeners as it changes.
/// Every connection holds one of `slots` (`--max-connections`, shared by
/// the gateway's listeners): beyond them new ones are reset, and a drain
/// waits for them.
pub async fn run(proxy: Arc<Proxy>, opts: GatewayOptions, slots: Arc<Semaphore>) {
    let mut changes = proxy.config.subscribe();
    let state: Arc<ArcSwap<Option<Arc<Compiled>>>> = Arc::new(ArcSwap::from_pointee(None));
    let mut listeners: HashMap<u16, Listener> = HashMap::new();
    let mut reuse = Reuse::default();
    let mut poll = tokio::time::interval(CERT_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut applied = None;
    let clients = ClientSlots::new(opts.max_connections_per_client);
    loop {
        tokio::select! {
            _ = poll.tick() => {
                for l in listeners.values() {
                    l.certs.reload();
                }
            }
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
            }
        }
        let Some(snap) = proxy.config.load() else {
            continue;
        };
        if applied.as_ref().is_some_and(|a| Arc::ptr_eq(a, &snap)) {
            continue;
        }
        applied = Some(snap.clone());
        let (ns, name) = opts.name.split_once('/').unwrap_or(("default", &opts.name));
        let Some(gw) = snap
            .resources
            .gateways
            .iter()
            .find(|g| g.name == name && g.namespace == ns)
        else {
            if !listeners.is_empty() || state.load().is_some() {
                tracing::warn!(gateway = %opts.name, "gateway no longer in the config; closing its listeners");
            }
            listeners.clear();
            state.store(Arc::new(None));
            continue;
        };
        let auths: Vec<&v1::RequestAuthentication> = snap
            .resources
            .request_authentications
            .iter()
            .filter(|a| a.namespace == ns && a.gateway == name)
            .collect();
        match compile(gw, &auths, &snap, &mut reuse, proxy.mark) {
            Ok(c) => state.store(Arc::new(Some(Arc::new(c)))),
            Err(e) => {
                tracing::error!(gateway = %opts.name, error = %e, "gateway config not usable; keeping the previous one");
                continue;
            }
        }
        let budget = Budget {
            slots: slots.clone(),
            clients: clients.clone(),
            idle_timeout: opts.idle_timeout,
        };
        reconcile(&proxy, &opts, gw, &state, &budget, &mut listeners).await;
    }
}

async fn reconcile(
    proxy: &Arc<Proxy>,
    opts: &GatewayOptions,
    gw: &v1::Gateway,
    state: &Arc<ArcSwap<Option<Arc<Compiled>>>>,
    budget: &Budget,
    listeners: &mut HashMap<u16, Listener>,
) {
    let wanted: HashMap<u16, &v1::GatewayListener> =
        gw.listeners.iter().map(|l| (l.port as u16, l)).collect();
    listeners.retain(|port, _| wanted.contains_key(port));
    for (port, spec) in wanted {
        if listeners.get(&port).is_some_and(|l| l.spec == *spec) {
            continue;
        }
        let tls = CertSet::load(&spec.certificates)
            .and_then(|c| certs::server_config(c.clone(), spec).map(|cfg| (c, cfg)));
        let (certs, tls) = match tls {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(gateway = %opts.name, port, error = %e, "gateway listener not (re)configured");
                continue;
            }
        };
        // Same port, new settings: swap the TLS config under the open socket.
        if let Some(l) = listeners.remove(&port) {
            drop(l);
        }
        let addr = SocketAddr::new(opts.bind, port);
        let socket = match TcpListener::bind(addr).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(gateway = %opts.name, %addr, error = %e, "cannot listen");
                continue;
            }
        };
        tracing::info!(gateway = %opts.name, %addr, listener = %spec.name, "gateway listening");
        let task = tokio::spawn(accept_loop(
            proxy.clone(),
            socket,
            tls,
            ListenerName(spec.name.as_str().into()),
            state.clone(),
            budget.clone(),
        ));
        listeners.insert(
            port,
            Listener {
                spec: spec.clone(),
                certs,
                task,
            },
        );
    }
}

/// What every connection of the gateway's listeners draws on.
#[derive(Clone)]
struct Budget {
    /// `--max-connections`, shared by the listeners.
    slots: Arc<Semaphore>,
    clients: Arc<ClientSlots>,
    idle_timeout: Duration,
}

/// The listener a request came in on: routes may be served on some only.
#[derive(Clone)]
struct ListenerName(Arc<str>);

async fn accept_loop(
    proxy: Arc<Proxy>,
    socket: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    listener: ListenerName,
    state: Arc<ArcSwap<Option<Arc<Compiled>>>>,
    budget: Budget,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (stream, peer) = match socket.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "gateway accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        // The client's own budget first: a client at its cap takes no
        // slot from the others.
        let Some(client) = budget.clients.try_acquire(peer.ip()) else {
            proxy.metrics.refused("gateway", "client_limit");
            tracing::debug!(%peer, "client at its connection cap; reset");
            crate::reset(stream);
            continue;
        };
        let Ok(permit) = budget.slots.clone().try_acquire_owned() else {
            proxy.metrics.refused("gateway", "overload");
            crate::reset(stream);
            continue;
        };
        let (proxy, acceptor, state) = (proxy.clone(), acceptor.clone(), state.clone());
        let listener = listener.clone();
        let idle_timeout = budget.idle_timeout;
        tokio::spawn(async move {
            // Held by the connection, and by a tunnel that takes it over.
            let held = ConnectionHold(Arc::new((permit, client)));
            let _ = stream.set_nodelay(true);
            // A client gone without a FIN is found by the kernel, whatever
            // the connection carries (an upgraded tunnel has no pings).
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&CLIENT_KEEPALIVE);
            let hs = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
            let result = if matches!(hs, Ok(Ok(_))) {
                "ok"
            } else {
                "error"
            };
            proxy
                .metrics
                .tls_handshakes
                .get_or_create(&HandshakeLabels {
                    direction: "gateway",
                    result,
                })
                .inc();
            let tls = match hs {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "gateway TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "gateway TLS handshake timed out");
                    return;
                }
            };
            serve(proxy, tls, peer, listener, state, idle_timeout, held).await;
        });
    }
}

/// HTTP/2 receive window of a public connection, four times a stream's
/// (hyper's 1 MiB).
const GATEWAY_CONNECTION_WINDOW: u32 = 4 << 20;

async fn serve(
    proxy: Arc<Proxy>,
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    peer: SocketAddr,
    listener: ListenerName,
    state: Arc<ArcSwap<Option<Arc<Compiled>>>>,
    idle_timeout: Duration,
    held: ConnectionHold,
) {
    let mut draining = proxy.draining.subscribe();
    let activity = Activity::new();
    let stalled = {
        let proxy = proxy.clone();
        move || proxy.metrics.refused("gateway", "client_stalled")
    };
    let svc = hyper::service::service_fn({
        let activity = activity.clone();
        move |mut req: Request<Incoming>| {
            let (proxy, state) = (proxy.clone(), state.clone());
            // In flight from its head until its response's last byte.
            let busy = activity.begin();
            req.extensions_mut().insert(held.clone());
            req.extensions_mut().insert(TunnelIdle(idle_timeout));
            req.extensions_mut().insert(listener.clone());
            let activity = activity.clone();
            async move {
                let compiled = state.load_full();
                let resp = match compiled.as_ref() {
                    Some(c) => handle(&proxy, c, peer, req, &activity, idle_timeout).await,
                    None => reply(503, "no-config"),
                };
                Ok::<_, Infallible>(resp.map(|b| Answering::new(b, busy)))
            }
        }
    });
    let mut b = crate::http::server_builder(MAX_HEADER_BYTES, 256);
    // Clients that went away without a FIN are found and their slots freed.
    b.http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        // Room for several streams' windows: a stream whose upstream reads
        // slowly must not starve the others' bodies (which would then look
        // like stalls of the client).
        .initial_connection_window_size(GATEWAY_CONNECTION_WINDOW);
    // A client that completes the handshake and then says nothing is
    // dropped like one that never finishes its headers.
    let io = FirstBytes::new(tls, PREFACE_BYTES, crate::http::HEADER_READ_TIMEOUT);
    let conn = b.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let idle_timeout_ms = idle_timeout.as_millis() as u64;
    let r = tokio::select! {
        r = conn.as_mut() => r,
        () = async { let _ = draining.wait_for(|d| *d).await; } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        () = activity.idle_for(idle_timeout) => {
            tracing::debug!(%peer, idle_timeout_ms, "gateway connection idle; closing it");
            conn.as_mut().graceful_shutdown();
            // The goodbye (or a response's last bytes) must be read too:
            // a client that does not gets the same time again, no more.
            match tokio::time::timeout(idle_timeout, conn).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::debug!(%peer, "gateway connection's goodbye not taken; dropped");
                    Ok(())
                }
            }
        }
        () = activity.stalled_for(idle_timeout) => {
            // The client holds up a request it started: no goodbye would
            // get through, the connection is dropped.
            tracing::info!(%peer, idle_timeout_ms, "gateway client stalled (a request body not sent, or a response not read); connection dropped");
            stalled();
            Ok(())
        }
    };
    if let Err(e) = r {
        tracing::debug!(%peer, error = %e, "gateway connection ended with an error");
    }
}

fn host_of(req: &Request<()>) -> String {
    let raw = req
        .uri()
        .host()
        .map(String::from)
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(String::from)
        })
        .unwrap_or_default();
    // Strip a port (not the colons of a bracketed IPv6 literal).
    match raw.rsplit_once(':') {
        Some((h, p))
            if !h.ends_with(']') && p.bytes().all(|b| b.is_ascii_digit()) && !h.contains(':') =>
        {
            h.to_ascii_lowercase()
        }
        _ => raw.to_ascii_lowercase(),
    }
}

/// A response the gateway makes itself: counted and access-logged.
struct Local<'a> {
    proxy: &'a Proxy,
    gateway: &'a str,
    route: &'a str,
    client: SocketAddr,
    subject: &'a str,
    method: &'a http::Method,
    path: &'a str,
    started: Instant,
}

impl Local<'_> {
    fn respond(&self, mut resp: Response<Body>) -> Response<Body> {
        let code = resp.status().as_u16();
        let key = RequestKey {
            direction: "gateway",
            service: self.gateway,
            route: self.route,
            src_identity: "",
            dst_identity: "",
            code,
        };
        let reason = self
            .proxy
            .metrics
            .record_request(key, self.started.elapsed(), &resp);
        tracing::info!(target: "bulwark::access", direction = "gateway", method = %self.method,
            path = %self.path, service = %self.gateway, route = %self.route, status = code,
            client_addr = %self.client, client_subject = %self.subject, reason = %reason,
            duration_us = self.started.elapsed().as_micros() as u64, "request");
        resp.headers_mut().remove(http::header::CONNECTION);
        resp
    }

    fn reply(&self, status: u16, reason: &str) -> Response<Body> {
        self.respond(reply(status, reason))
    }
}

fn with_header(
    mut r: Response<Body>,
    name: http::header::HeaderName,
    v: http::HeaderValue,
) -> Response<Body> {
    r.headers_mut().insert(name, v);
    r
}

/// `body_timeout`: how long a body the gateway reads whole may take to
/// arrive (zero: no limit).
async fn handle(
    proxy: &Arc<Proxy>,
    gw: &Compiled,
    client: SocketAddr,
    req: Request<Incoming>,
    activity: &Arc<Activity>,
    body_timeout: Duration,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    // A body the gateway refuses before reading it all is read to its end
    // in the background when dropped (see DrainOnDrop).
    let mut body = Some(DrainOnDrop::new(body));
    let req = Request::from_parts(parts, ());
    decide(proxy, gw, client, req, &mut body, activity, body_timeout).await
}

/// The pipeline. `body_slot` is taken when the request goes on; left in place
/// when the gateway answers itself (dropping it then drains it).
async fn decide(
    proxy: &Arc<Proxy>,
    gw: &Compiled,
    client: SocketAddr,
    req: Request<()>,
    body_slot: &mut Option<DrainOnDrop>,
    activity: &Arc<Activity>,
    body_timeout: Duration,
) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let host = host_of(&req);
    let mut local = Local {
        proxy,
        gateway: &gw.name,
        route: "none",
        client,
        subject: "",
        method: &method,
        path: &path,
        started,
    };
    let Some(snap) = proxy.config.load() else {
        return local.reply(503, "no-config");
    };
    // Routes and their authorization match the path as written; a path
    // the upstream would read as another one (`//orders`, `/x/../orders`,
    // `/%6Frders`) would slip past the rule meant for it.
    if let Err(why) = crate::http::route::canonical_path(&path) {
        tracing::info!(gateway = %gw.name, reason = why, "non-canonical request path refused");
        return local.reply(400, "non-canonical-path");
    }
    let listener = req.extensions().get::<ListenerName>().map(|l| &*l.0);
    let Some(route) = gw.routes.iter().find(|r| {
        (r.listeners.is_empty() || listener.is_some_and(|l| r.listeners.iter().any(|n| n == l)))
            && (r.hostnames.is_empty() || r.hostnames.iter().any(|h| certs::host_matches(h, &host)))
            && (r.rule.matches.is_empty()
                || r.rule
                    .matches
                    .iter()
                    .any(|m| m.matches(&method, &path, req.headers())))
    }) else {
        return local.reply(404, "no-route");
    };
    local.route = &route.rule.name;

    // Authentication: a token that is present must be valid.
    let principal = match &gw.auth {
        None => None,
        Some(a) => match a.authenticate(req.headers(), SystemTime::now()).await {
            AuthOutcome::Anonymous => None,
            AuthOutcome::Authenticated(p) => Some(p),
            AuthOutcome::Rejected(f) if f.reason == "jwks-unavailable" => {
                // Not the token's fault: a 401 would make OAuth clients
                // throw good tokens away and ask the issuer for new ones.
                tracing::warn!(gateway = %gw.name, detail = %f.detail, "token not verifiable: signing keys unavailable");
                let r = local.reply(503, "jwks-unavailable");
                return with_header(
                    r,
                    http::header::RETRY_AFTER,
                    http::HeaderValue::from_static("5"),
                );
            }
            AuthOutcome::Rejected(f) => {
                tracing::info!(gateway = %gw.name, reason = f.reason, detail = %f.detail, "token rejected");
                let r = local.reply(401, "authn-failed");
                return with_header(r, http::header::WWW_AUTHENTICATE, f.www_authenticate());
            }
        },
    };
    let subject = principal
        .as_ref()
        .map(|p| format!("{}#{}", p.issuer, p.subject))
        .unwrap_or_default();
    local.subject = &subject;
    let scopes = principal
        .as_ref()
        .map(|p| p.scopes.clone())
        .unwrap_or_default();
    let backend_service = route
        .rule
        .backends
        .first()
        .map(|b| b.service.clone())
        .unwrap_or_default();

    if let Err(d) = jwt::authorize(principal.as_ref(), route.authorization.as_ref()) {
        let reason = match &d {
            jwt::Denied::Unauthenticated => "token required".to_string(),
            jwt::Denied::Forbidden { missing } => format!("missing {missing}"),
        };
        audit(
            proxy,
            gw,
            &backend_service,
            &method,
            &path,
            &subject,
            &scopes,
            false,
            Some(&reason),
        );
        proxy
            .metrics
            .authz_denials
            .get_or_create(&crate::telemetry::DenialLabels {
                direction: "gateway",
                src_identity: String::new(),
            })
            .inc();
        let r = local.reply(d.status(), "authz-denied");
        return with_header(r, http::header::WWW_AUTHENTICATE, d.www_authenticate());
    }

    let mut rate: Option<RateDecision> = None;
    if let Some((key, limiter)) = &route.limit {
        let d = limiter.check(
            &key.of(principal.as_ref(), req.headers(), client.ip()),
            Instant::now(),
        );
        if !d.allowed {
            proxy
                .metrics
                .ratelimit_rejections
                .get_or_create(&ServiceLabel {
                    service: gw.name.clone(),
                })
                .inc();
            let mut r = reply(429, "rate-limited");
            d.apply_headers(r.headers_mut());
            return local.respond(r);
        }
        rate = Some(d);
    }

    let (mut parts, ()) = req.into_parts();
    let body: Body = match route.max_body {
        // Streamed: a client that stops sending it is a stall.
        None => Uploading::new(body_slot.take().expect("body not taken yet"), activity)
            .map_err(|e| -> crate::http::BoxError { Box::new(e) })
            .boxed(),
        Some(max) => {
            let declared = parts
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > max) {
                return local.reply(413, "body-too-large");
            }
            let collect =
                crate::http::collect_limited(body_slot.as_mut().expect("body"), max as usize);
            let collected = if body_timeout.is_zero() {
                Some(collect.await)
            } else {
                tokio::time::timeout(body_timeout, collect).await.ok()
            };
            // A client that stops sending the body it announced would
            // otherwise hold its connection for good.
            let Some(collected) = collected else {
                return local.reply(408, "body-timeout");
            };
            let Some(bytes) = collected else {
                return local.reply(413, "body-too-large");
            };
            *body_slot = None;
            if let Some(schema) = &route.schema
                && let Err(invalid) = schema.validate(&bytes)
            {
                let mut r = local.reply(400, "invalid-body");
                *r.body_mut() = full(
                    serde_json::json!({"error": "invalid-body", "reason": invalid.reason})
                        .to_string(),
                );
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                return r;
            }
            parts.headers.remove(http::header::CONTENT_LENGTH);
            parts.headers.insert(
                http::header::CONTENT_LENGTH,
                http::HeaderValue::from(bytes.len()),
            );
            full(bytes)
        }
    };

    // Headers the client names in `Connection` go now: the hop-by-hop
    // clean-up on the way out would otherwise also remove the gateway's
    // own headers of those names (`Connection: x-tenant` dropping the
    // claim header the gateway vouches for). An upgrade is kept.
    crate::http::drop_connection_listed(&mut parts.headers);
    // What the service is told about the caller: only what the gateway
    // itself vouches for.
    for h in &gw.strip {
        parts.headers.remove(h);
    }
    if let Some(p) = &principal {
        for (name, value) in &p.forward {
            parts.headers.insert(name.clone(), value.clone());
        }
        if !p.forward_token {
            parts.headers.remove(http::header::AUTHORIZATION);
        }
    }
    let xff = match parts
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) => format!("{prev}, {}", client.ip()),
        None => client.ip().to_string(),
    };
    if let Ok(v) = http::HeaderValue::from_str(&xff) {
        parts.headers.insert("x-forwarded-for", v);
    }
    parts
        .headers
        .insert("x-forwarded-proto", http::HeaderValue::from_static("https"));
    // The client is outside the mesh: this gateway, not its traceparent,
    // decides whether the request is traced.
    proxy.tracer().resample_untrusted(&mut parts.headers);

    let b = route.rule.pick(&parts.headers, crate::balance::rand_unit());
    let port = if b.port != 0 {
        b.port
    } else {
        gw.ports.get(&b.service).copied().unwrap_or(0)
    };
    let plan = Plan {
        route: &route.rule.name,
        service: &b.service,
        upstreams: snap.endpoints_of(&b.service, port, &b.subset),
        timeout: route.rule.timeout,
        retry: route.rule.retry.as_ref(),
    };
    audit(
        proxy,
        gw,
        plan.service,
        &method,
        &path,
        &subject,
        &scopes,
        true,
        None,
    );
    let edge = EdgeCaller {
        addr: client.to_string(),
        subject: subject.clone(),
    };
    let req = Request::from_parts(parts, body);
    let mut resp = exchange(proxy, &snap, plan, req, "gateway", Some(&edge), started).await;
    if let Some(d) = rate {
        d.apply_headers(resp.headers_mut());
    }
    resp
}

#[allow(clippy::too_many_arguments)]
fn audit(
    proxy: &Proxy,
    gw: &Compiled,
    service: &str,
    method: &http::Method,
    path: &str,
    subject: &str,
    scopes: &[String],
    allowed: bool,
    reason: Option<&str>,
) {
    if let Some(log) = proxy.audit.get() {
        log.record(crate::audit::AuditRecord {
            time: String::new(),
            source_identity: String::new(),
            destination_identity: proxy.identity.identity().to_string(),
            service: service.to_string(),
            method: method.to_string(),
            path: path.to_string(),
            decision: if allowed {
                crate::audit::Decision::Allow
            } else {
                crate::audit::Decision::Deny
            },
            policy: format!("Gateway {}", gw.name),
            reason: reason.map(String::from),
            subject: (!subject.is_empty()).then(|| subject.to_string()),
            scopes: scopes.to_vec(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_keys_parse_and_fall_back_to_the_address() {
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        let mut h = http::HeaderMap::new();
        assert_eq!(
            ClientKey::parse("subject").unwrap().of(None, &h, ip),
            "ip:203.0.113.7"
        );
        let k = ClientKey::parse("header:x-api-key").unwrap();
        assert_eq!(k.of(None, &h, ip), "ip:203.0.113.7");
        h.insert("x-api-key", "k1".parse().unwrap());
        assert_eq!(k.of(None, &h, ip), "h:k1");
        assert_eq!(
            ClientKey::parse("source-ip").unwrap().of(None, &h, ip),
            "ip:203.0.113.7"
        );
        assert!(ClientKey::parse("cookie").is_err());
        assert!(ClientKey::parse("header:bad header").is_err());
    }

    #[test]
    fn an_ipv6_client_is_limited_by_its_64() {
        let k = ClientKey::parse("source-ip").unwrap();
        let h = http::HeaderMap::new();
        let a = k.of(None, &h, "2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = k.of(None, &h, "2001:db8:1:2:ffff:1:2:3".parse().unwrap());
        let other = k.of(None, &h, "2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, "ip:2001:db8:1:2::");
        assert_eq!(a, b);
        assert_ne!(a, other);
        let mapped = k.of(None, &h, "::ffff:203.0.113.7".parse().unwrap());
        assert_eq!(mapped, "ip:203.0.113.7");
    }

    #[test]
    fn connection_listed_headers_go_but_an_upgrade_stays() {
        let mut h = http::HeaderMap::new();
        h.insert(
            "connection",
            "x-tenant, Upgrade, x-forwarded-for".parse().unwrap(),
        );
        h.insert("x-tenant", "t".parse().unwrap());
        h.insert("x-forwarded-for", "1.2.3.4".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("x-other", "o".parse().unwrap());
        crate::http::drop_connection_listed(&mut h);
        assert!(h.get("x-tenant").is_none() && h.get("x-forwarded-for").is_none());
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["x-other"], "o");
        let mut h = http::HeaderMap::new();
        h.insert("connection", "keep-alive, x-a".parse().unwrap());
        h.insert("x-a", "a".parse().unwrap());
        crate::http::drop_connection_listed(&mut h);
        assert!(h.is_empty(), "{h:?}");
    }
}
