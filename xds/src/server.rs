//! The control plane process: the mTLS accept loop, the `DeltaStream`
//! handler, and the task that rebuilds the snapshot whenever the config,
//! the registry or the trust bundle change.
//!
//! ```no_run
//! # async fn run() -> Result<(), bulwark_xds::server::ServeError> {
//! use bulwark_xds::server::{ControlPlane, ServeOptions};
//! let opts = ServeOptions::new("/etc/bulwark/config".into(), "/etc/bulwark/ca".into());
//! let cp = ControlPlane::bind(opts).await?; // first config load: errors end here
//! println!("discovery on {}", cp.local_addr());
//! cp.run(async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bulwark_ca::SpiffeId;
use bulwark_proto::config::type_url;
use bulwark_proto::xds::v1::discovery_service_server::{DiscoveryService, DiscoveryServiceServer};
use bulwark_proto::xds::v1::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::credentials::{Credentials, CredentialsError};
use crate::load::ConfigErrors;
use crate::metrics::{ReasonLabel, TypeLabel, XdsMetrics};
use crate::registry::{Registry, Workload};
use crate::snapshot::Snapshot;
use crate::status::{Board, Connected as OnBoard, StatusReport, lock};
use crate::stream::Event;
use crate::watch::ConfigWatcher;

/// Largest discovery message, either way.
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;
/// A TLS handshake that takes longer is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once; connections beyond are closed.
pub const MAX_HANDSHAKES: usize = 256;
/// Of those, from one address once half of them are taken: a client
/// opening silent connections cannot take every place and lock the
/// fleet's sidecars out.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 16;
/// Concurrent requests (streams) per connection; a sidecar needs one.
pub const CONCURRENCY_PER_CONNECTION: usize = 8;
/// How long a new stream may take to send its first request (the node).
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Responses handed to a stream's HTTP/2 body ahead of sending. Few: the
/// rest of a sync split into many responses waits in the stream task's
/// outbox, not in HTTP/2's frame queue, which keeps its largest size for
/// the connection's life.
pub const SEND_QUEUE: usize = 4;
/// A burst of changes is folded into one snapshot at most this long after
/// its first change.
pub const MAX_DEBOUNCE: Duration = Duration::from_secs(1);
/// On shutdown, how long streams get to deliver their closing status.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How to run the control plane.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The YAML config: a directory (or one file).
    pub config: PathBuf,
    /// The CA directory (read only).
    pub ca_dir: PathBuf,
    pub listen: SocketAddr,
    /// Where `/status` and `/metrics` are served; `None` for nowhere.
    pub admin_listen: Option<SocketAddr>,
    /// How long a disconnected sidecar's endpoints stay.
    pub endpoint_grace: Duration,
    /// Node ids one identity may register from one source address (0: any).
    pub max_nodes_per_source: usize,
    /// Extra DNS names for the serving certificate.
    pub dns_names: Vec<String>,
    /// Open discovery connections at most; more are closed on accept.
    pub max_connections: usize,
    pub config_poll: Duration,
    pub config_settle: Duration,
    pub ca_poll: Duration,
    /// Quiet time after a change before a snapshot is built.
    pub debounce: Duration,
    /// Where the sidecar injection webhook (HTTPS) listens; `None` for off.
    pub webhook_listen: Option<SocketAddr>,
    /// What injected pods point at (its trust domain is replaced by the
    /// CA directory's).
    pub inject: crate::inject::InjectConfig,
}

impl ServeOptions {
    /// The defaults: `0.0.0.0:15010`, admin on `127.0.0.1:15011`, 10 s
    /// endpoint grace.
    pub fn new(config: PathBuf, ca_dir: PathBuf) -> Self {
        Self {
            config,
            ca_dir,
            listen: SocketAddr::from(([0, 0, 0, 0], 15010)),
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 15011))),
            endpoint_grace: crate::registry::DEFAULT_GRACE,
            max_nodes_per_source: crate::registry::DEFAULT_NODES_PER_SOURCE,
            dns_names: Vec::new(),
            max_connections: 10_000,
            config_poll: crate::watch::DEFAULT_POLL,
            config_settle: crate::watch::DEFAULT_SETTLE,
            ca_poll: crate::credentials::DEFAULT_CA_POLL,
            debounce: Duration::from_millis(100),
            webhook_listen: None,
            inject: crate::inject::InjectConfig::default(),
        }
    }
}

/// Why the control plane could not start (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid config in {}:\n{errors}", path.display())]
    Config { path: PathBuf, errors: ConfigErrors },
    // The store's errors already name the file.
    #[error("CA directory: {error}")]
    Credentials {
        dir: PathBuf,
        error: CredentialsError,
    },
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, io::Error),
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("startup task failed: {0}")]
    Startup(String),
}

struct Shared {
    metrics: Arc<XdsMetrics>,
    config: Arc<ConfigWatcher>,
    credentials: Arc<Credentials>,
    registry: Arc<Registry>,
    board: Arc<Board>,
    snapshots: watch::Sender<Arc<Snapshot>>,
    stop: watch::Sender<bool>,
    endpoint_grace: Duration,
}

impl Shared {
    /// Builds a snapshot from the current inputs; publishes it if it differs.
    fn publish(&self) {
        let config = self.config.current();
        let endpoints = self.registry.endpoints(&config.services);
        let previous = self.snapshots.borrow().clone();
        let snap = Snapshot::build_after(
            Some(&previous),
            &config,
            &endpoints,
            &self.credentials.roots_pem(),
        );
        for t in type_url::ALL {
            self.metrics
                .resources_oversized
                .get_or_create(&TypeLabel::of(t))
                .set(snap.oversized(t) as i64);
        }
        if snap.system_version() == self.snapshots.borrow().system_version() {
            tracing::debug!(
                version = snap.system_version(),
                "inputs changed, content did not"
            );
            return;
        }
        tracing::info!(version = snap.system_version(), "snapshot published");
        self.metrics.snapshots.inc();
        self.snapshots.send_replace(Arc::new(snap));
    }
}

/// A view of a running (or bound) control plane, for status and tests.
#[derive(Clone)]
pub struct Handle(Arc<Shared>);

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").finish_non_exhaustive()
    }
}

impl Handle {
    /// The status document served at `/status`.
    pub fn status(&self) -> StatusReport {
        let snap = self.snapshot();
        self.0.board.report(&snap, self.0.config.rejection())
    }

    /// The snapshot being served.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.0.snapshots.borrow().clone()
    }

    pub fn metrics(&self) -> &XdsMetrics {
        &self.0.metrics
    }

    /// The metrics served at `/metrics`.
    pub fn metrics_text(&self) -> String {
        self.0.metrics.encode()
    }

    pub fn registry(&self) -> &Registry {
        &self.0.registry
    }
}

/// A control plane with its config loaded and its ports bound, not yet
/// serving. See the module docs.
pub struct ControlPlane {
    shared: Arc<Shared>,
    listener: TcpListener,
    admin: Option<TcpListener>,
    tls: Arc<rustls::ServerConfig>,
    webhook: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
    opts: ServeOptions,
}

impl ControlPlane {
    /// Loads the config (every error is returned: there is no last good
    /// config yet) and the CA material, builds the first snapshot and binds
    /// the ports.
    pub async fn bind(opts: ServeOptions) -> Result<Self, ServeError> {
        let metrics = Arc::new(XdsMetrics::default());
        let (path, m) = (opts.config.clone(), metrics.clone());
        let config = tokio::task::spawn_blocking(move || ConfigWatcher::load(&path, m))
            .await
            .map_err(|e| ServeError::Startup(e.to_string()))?
            .map_err(|errors| ServeError::Config {
                path: opts.config.clone(),
                errors,
            })?;
        let (dir, names) = (opts.ca_dir.clone(), opts.dns_names.clone());
        let credentials = tokio::task::spawn_blocking(move || Credentials::load(&dir, &names))
            .await
            .map_err(|e| ServeError::Startup(e.to_string()))?
            .map_err(|error| ServeError::Credentials {
                dir: opts.ca_dir.clone(),
                error,
            })?;
        let tls = Arc::new(credentials.server_config()?);
        let webhook_tls = Arc::new(credentials.webhook_server_config()?);
        let mut opts = opts;
        opts.inject.trust_domain = credentials.trust_domain().to_string();
        let config = Arc::new(config);
        let registry = Registry::with_limit(opts.endpoint_grace, opts.max_nodes_per_source);
        let first = Snapshot::build(
            &config.current(),
            &registry.endpoints(&config.current().services),
            &credentials.roots_pem(),
        );
        tracing::info!(version = first.system_version(), "first snapshot built");
        let shared = Arc::new(Shared {
            metrics,
            config,
            credentials,
            registry,
            board: Arc::new(Board::default()),
            snapshots: watch::Sender::new(Arc::new(first)),
            stop: watch::Sender::new(false),
            endpoint_grace: opts.endpoint_grace,
        });
        shared.metrics.snapshots.inc();
        let listener = TcpListener::bind(opts.listen)
            .await
            .map_err(|e| ServeError::Listen(opts.listen, e))?;
        let admin = match opts.admin_listen {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .map_err(|e| ServeError::Listen(a, e))?,
            ),
            None => None,
        };
        let webhook = match opts.webhook_listen {
            Some(a) => Some((
                TcpListener::bind(a)
                    .await
                    .map_err(|e| ServeError::Listen(a, e))?,
                webhook_tls,
            )),
            None => None,
        };
        Ok(Self {
            shared,
            listener,
            admin,
            tls,
            webhook,
            opts,
        })
    }

    /// The bound discovery address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.opts.listen)
    }

    /// The bound admin address, if any.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bound webhook address, if any.
    pub fn webhook_addr(&self) -> Option<SocketAddr> {
        self.webhook.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    pub fn handle(&self) -> Handle {
        Handle(self.shared.clone())
    }

    /// Serves until `shutdown` resolves; then ends every stream with
    /// `UNAVAILABLE` (sidecars move to another replica) and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
        let Self {
            shared,
            listener,
            admin,
            tls,
            webhook,
            opts,
        } = self;
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(
            shared
                .config
                .clone()
                .run(opts.config_poll, opts.config_settle),
        );
        tasks.spawn(shared.credentials.clone().run(opts.ca_poll));
        tasks.spawn(rebuild(shared.clone(), opts.debounce));
        tasks.spawn(crate::heap::trim_when_quiet(shared.snapshots.subscribe()));
        if let Some(l) = admin {
            if let Ok(addr) = l.local_addr() {
                tracing::info!(%addr, "admin endpoint listening (/status, /metrics)");
            }
            tasks.spawn(crate::admin::serve(l, Handle(shared.clone())));
        }
        if let Some((l, wtls)) = webhook {
            if let Ok(addr) = l.local_addr() {
                tracing::info!(%addr, "injection webhook listening (POST /inject)");
            }
            tasks.spawn(crate::webhook::serve(
                l,
                wtls,
                Arc::new(opts.inject.clone()),
                shared.metrics.clone(),
            ));
        }
        tracing::info!(
            addr = %listener.local_addr().unwrap_or(opts.listen),
            config = %opts.config.display(),
            ca_dir = %opts.ca_dir.display(),
            "control plane listening"
        );
        let (tx, rx) = mpsc::channel(128);
        tasks.spawn(accept(
            listener,
            tokio_rustls::TlsAcceptor::from(tls),
            tx,
            shared.metrics.clone(),
            opts.max_connections,
        ));

        let svc = DiscoveryServiceServer::new(Discovery(shared.clone()))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let stopping = shared.clone();
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: closing discovery streams");
            stopping.stop.send_replace(true);
        };
        let server = tonic::transport::Server::builder()
            .concurrency_limit_per_connection(CONCURRENCY_PER_CONNECTION)
            .max_concurrent_streams(Some(CONCURRENCY_PER_CONNECTION as u32))
            // Finds sidecars that vanished without a FIN.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(svc)
            .serve_with_incoming_shutdown(ReceiverStream::new(rx), signal);
        let mut stop = shared.stop.subscribe();
        let result = tokio::select! {
            r = server => r.map_err(ServeError::from),
            _ = async {
                let _ = stop.wait_for(|s| *s).await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => {
                tracing::warn!("discovery streams did not close in time; exiting anyway");
                Ok(())
            }
        };
        tasks.abort_all();
        tracing::info!("control plane stopped");
        result
    }
}

/// Runs the control plane until `shutdown` resolves.
pub async fn serve(
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    ControlPlane::bind(opts).await?.run(shutdown).await
}

/// Rebuilds the snapshot after changes, folding bursts (say, a hundred
/// sidecars connecting at once) into one.
async fn rebuild(shared: Arc<Shared>, debounce: Duration) {
    let mut config = shared.config.subscribe();
    let mut registry = shared.registry.subscribe();
    let mut roots = shared.credentials.subscribe();
    loop {
        tokio::select! {
            _ = config.changed() => {}
            _ = registry.changed() => {}
            _ = roots.changed() => {}
        }
        let deadline = Instant::now() + MAX_DEBOUNCE;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(debounce) => break,
                _ = tokio::time::sleep_until(deadline) => break,
                _ = config.changed() => {}
                _ = registry.changed() => {}
                _ = roots.changed() => {}
            }
        }
        let s = shared.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || s.publish()).await {
            tracing::error!(error = %e, "snapshot build failed");
        }
    }
}

/// A verified TLS connection, holding its slot in the connection limit.
struct Conn {
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    _slot: OwnedSemaphorePermit,
}

impl Connected for Conn {
    type ConnectInfo = <tokio_rustls::server::TlsStream<TcpStream> as Connected>::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.tls.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// Accepts TCP connections and completes their TLS handshakes (client
/// certificate verified against the trust bundle), each bounded in time and
/// in number, and hands them to the gRPC server.
async fn accept(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    tx: mpsc::Sender<Result<Conn, io::Error>>,
    metrics: Arc<XdsMetrics>,
    max_connections: usize,
) {
    let connections = Arc::new(Semaphore::new(max_connections));
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let per_source = bulwark_ca::admission::PerSource::new(MAX_HANDSHAKES_PER_SOURCE);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Shares are enforced once half the places are taken.
        let short = handshakes.available_permits() < MAX_HANDSHAKES / 2;
        let Some(source) = per_source.take_when(peer.ip(), short) else {
            metrics
                .streams_refused
                .get_or_create(&crate::metrics::ReasonLabel {
                    reason: "source_handshakes",
                })
                .inc();
            tracing::debug!(%peer, "too many handshakes in progress from this address; closing");
            continue;
        };
        let (Ok(slot), Ok(handshake)) = (
            connections.clone().try_acquire_owned(),
            handshakes.clone().try_acquire_owned(),
        ) else {
            tracing::warn!(%peer, "connection or handshake limit reached; closing the connection");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
            drop((handshake, source));
            match result {
                Ok(Ok(tls)) => {
                    let _ = tx.send(Ok(Conn { tls, _slot: slot })).await;
                }
                Ok(Err(e)) => {
                    metrics.tls_handshake_failures.inc();
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    metrics.tls_handshake_failures.inc();
                    tracing::debug!(%peer, "TLS handshake timed out");
                }
            }
        });
    }
}

struct Discovery(Arc<Shared>);

impl Discovery {
    fn refuse(&self, reason: &'static str, status: Status) -> Status {
        self.0
            .metrics
            .streams_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
        tracing::warn!(
            reason,
            message = status.message(),
            "discovery stream refused"
        );
        status
    }
}

#[tonic::async_trait]
impl DiscoveryService for Discovery {
    type DeltaStreamStream =
        Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send + 'static>>;

    async fn delta_stream(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaStreamStream>, Status> {
        let (peer, not_after) =
            peer_identity(&request).map_err(|s| self.refuse("no_identity", s))?;
        // TLS checked the certificate once, at the handshake: a stream
        // opened later on the same connection, or one that outlives it, is
        // checked here.
        let expires = instant_at(not_after);
        if expires <= tokio::time::Instant::now() {
            return Err(self.refuse(
                "cert_expired",
                Status::unauthenticated("client certificate has expired"),
            ));
        }
        // Registrations are counted per source address: without one, every
        // sidecar of an identity would share one count.
        let source = request
            .remote_addr()
            .map(|a| a.ip().to_canonical())
            .ok_or_else(|| {
                self.refuse(
                    "no_source_address",
                    Status::internal("the connection's source address is unknown"),
                )
            })?;
        let mut inbound = request.into_inner();
        let first = match tokio::time::timeout(FIRST_REQUEST_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => {
                return Err(Status::cancelled("stream closed before its first request"));
            }
            Ok(Err(status)) => return Err(status),
            Err(_) => {
                return Err(self.refuse(
                    "no_node",
                    Status::deadline_exceeded(format!(
                        "no first request within {FIRST_REQUEST_TIMEOUT:?}"
                    )),
                ));
            }
        };
        let Some(node) = first.node.as_ref() else {
            return Err(self.refuse(
                "no_node",
                Status::invalid_argument("the first request of a stream must carry the node"),
            ));
        };
        let workload = Workload::from_node(node, &peer).map_err(|e| {
            if e.is_permission() {
                self.refuse(
                    "identity_mismatch",
                    Status::permission_denied(e.to_string()),
                )
            } else {
                self.refuse("invalid_node", Status::invalid_argument(e.to_string()))
            }
        })?;
        let span = tracing::info_span!(
            "xds_stream",
            node = %workload.node_id,
            identity = %workload.identity,
            address = %workload.address,
        );
        // Only now that the node checks out does it count as a workload.
        let registration = self
            .0
            .registry
            .connect(workload.clone(), source)
            .map_err(|e| {
                self.refuse(
                    "registration_limit",
                    Status::resource_exhausted(e.to_string()),
                )
            })?;
        let health_key = (workload.identity.to_string(), workload.node_id.clone());
        // A reconnecting sidecar's endpoints are trusted as long as a
        // departed sidecar's are kept: the endpoint grace period.
        let (on_board, slot) = self.0.board.add(workload, self.0.endpoint_grace);
        let (tx, rx) = mpsc::channel(SEND_QUEUE);
        let shared = self.0.clone();
        tokio::spawn(
            async move {
                let _registration = registration;
                let _slot = slot;
                run_stream(shared, on_board, first, inbound, tx, health_key, expires).await;
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(
            ReceiverStream::new(rx).map(|q| q.map(|r| *r).map_err(|s| *s)),
        )))
    }
}

/// The SPIFFE ID of the client certificate (verified during the handshake),
/// and when its chain expires (Unix seconds).
fn peer_identity<T>(request: &Request<T>) -> Result<(SpiffeId, i64), Status> {
    let certs = request
        .peer_certs()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let id = bulwark_ca::tls::spiffe_id_of(&certs[0])
        .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
    let not_after = bulwark_ca::tls::chain_not_after(&certs)
        .ok_or_else(|| Status::unauthenticated("client certificate: no readable expiry"))?;
    Ok((id, not_after))
}

/// Unix time `t` on the runtime's clock (now, if past).
fn instant_at(t: i64) -> tokio::time::Instant {
    let at = std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    tokio::time::Instant::now()
        + at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
}

/// Keeps `bulwark_xds_connected_sidecars` counting this stream.
struct CountedIn(Gauge);

impl CountedIn {
    fn new(g: &Gauge) -> Self {
        g.inc();
        Self(g.clone())
    }
}

impl Drop for CountedIn {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A response to send, or the status that ends the stream. Boxed because
/// the queue allocates its slots 32 at a time and keeps two such blocks:
/// unboxed, each slot is as large as a `Status`, about 7 kB a stream.
type QueuedItem = Result<Box<DeltaDiscoveryResponse>, Box<Status>>;
type Tx = mpsc::Sender<QueuedItem>;

/// Responses built but not yet handed to the stream.
///
/// The stream task keeps reading the sidecar's requests while responses
/// wait here: were it to block on a full send queue instead, the sidecar's
/// ACKs would pile up in HTTP/2's receive queue, which keeps its largest
/// size for the connection's life (14 kB a stream after a split sync).
/// It holds at most one push per type: a type is pushed again only once
/// every response of its last push is ACKed, and an ACK counts only for a
/// response already handed over (see [`Outbox::is_ahead`]).
#[derive(Default)]
struct Outbox {
    queue: VecDeque<Queued>,
    /// The nonce of the last response handed to the stream.
    handed: u64,
}

/// A response waiting in the outbox, with the start of the push it
/// completes (on the last response of a snapshot's push).
struct Queued {
    response: DeltaDiscoveryResponse,
    push_started: Option<Instant>,
}

impl Outbox {
    fn queue(&mut self, responses: Vec<DeltaDiscoveryResponse>, push_started: Option<Instant>) {
        let last = responses.len().saturating_sub(1);
        for (i, response) in responses.into_iter().enumerate() {
            self.queue.push_back(Queued {
                response,
                push_started: push_started.filter(|_| i == last),
            });
        }
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether `req` acknowledges (or refuses) a response not handed to the
    /// stream yet, so not received: a client guessing nonces (they count up
    /// per stream) to have more pushed while it reads nothing.
    fn is_ahead(&self, req: &DeltaDiscoveryRequest) -> bool {
        // An empty or foreign nonce does not parse: not an ACK, or stale.
        req.response_nonce
            .parse::<u64>()
            .is_ok_and(|n| n > self.handed)
    }

    /// Hands the next response to the stream, counting what it sends.
    fn send_next(&mut self, metrics: &XdsMetrics, permit: mpsc::Permit<'_, QueuedItem>) {
        let Some(q) = self.queue.pop_front() else {
            return;
        };
        if let Ok(n) = q.response.nonce.parse::<u64>() {
            self.handed = self.handed.max(n);
        }
        if self.queue.is_empty() {
            // A sync's burst grew it; an idle stream keeps nothing.
            self.queue = VecDeque::new();
        }
        metrics
            .resources_sent
            .get_or_create(&TypeLabel::of(&q.response.type_url))
            .inc_by(q.response.resources.len() as u64);
        permit.send(Ok(Box::new(q.response)));
        if let Some(started) = q.push_started {
            metrics
                .push_duration
                .observe(started.elapsed().as_secs_f64());
        }
    }
}

/// One sidecar's stream, from its first request until it (or the server)
/// goes away.
async fn run_stream(
    shared: Arc<Shared>,
    on_board: Arc<OnBoard>,
    first: DeltaDiscoveryRequest,
    mut inbound: Streaming<DeltaDiscoveryRequest>,
    tx: Tx,
    health_key: (String, String),
    expires: tokio::time::Instant,
) {
    let _counted = CountedIn::new(&shared.metrics.connected_sidecars);
    tracing::info!("sidecar connected");
    let mut snapshots = shared.snapshots.subscribe();
    let mut stop = shared.stop.subscribe();
    let mut outbox = Outbox::default();
    let expiry = tokio::time::sleep_until(expires);
    tokio::pin!(expiry);
    let ended: Result<(), Status> = async {
        outbox.queue(on_request(&shared, &on_board, &first, &snapshots)?, None);
        loop {
            if *stop.borrow_and_update() {
                return Err(Status::unavailable("control plane shutting down"));
            }
            let hold = lock(&on_board.state).next_deadline();
            tokio::select! {
                _ = stop.changed() => {}
                () = &mut expiry => {
                    // The sidecar reconnects at once with its renewed
                    // certificate, keeping its config meanwhile.
                    return Err(Status::unavailable(
                        "client certificate expired; reconnect with the renewed certificate",
                    ));
                }
                permit = tx.reserve(), if !outbox.is_empty() => {
                    let permit = permit.map_err(|_| Status::cancelled("sidecar went away"))?;
                    outbox.send_next(&shared.metrics, permit);
                }
                _ = until(hold) => on_snapshot(&on_board, &mut snapshots, &mut outbox),
                msg = inbound.message() => match msg {
                    Ok(Some(mut req)) => {
                        if outbox.is_ahead(&req) {
                            tracing::debug!(nonce = %req.response_nonce, "ignoring an ACK or NACK of a response not sent yet");
                            req.response_nonce.clear();
                            req.error_detail = None;
                        }
                        // A later node is a health report (see `Node.unhealthy`).
                        if let Some(node) = &req.node {
                            shared.registry.report_health(&health_key, node);
                        }
                        if !(req.node.is_some() && req.type_url.is_empty()) {
                            outbox.queue(on_request(&shared, &on_board, &req, &snapshots)?, None);
                        }
                    }
                    Ok(None) => return Ok(()),
                    Err(status) => {
                        tracing::debug!(error = %status, "stream broke");
                        return Ok(());
                    }
                },
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        return Err(Status::unavailable("control plane shutting down"));
                    }
                    on_snapshot(&on_board, &mut snapshots, &mut outbox);
                }
            }
        }
    }
    .await;
    match ended {
        Ok(()) => tracing::info!("sidecar disconnected"),
        Err(status) => {
            tracing::info!(code = ?status.code(), message = status.message(), "stream ended by the server");
            let _ = tx.send(Err(Box::new(status))).await;
        }
    }
}

/// Sleeps until `deadline`; forever without one.
async fn until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

fn on_request(
    shared: &Shared,
    on_board: &OnBoard,
    req: &DeltaDiscoveryRequest,
    snapshots: &watch::Receiver<Arc<Snapshot>>,
) -> Result<Vec<DeltaDiscoveryResponse>, Status> {
    // The latest snapshot, without marking it seen: if it is new, the push
    // for every type still happens in `on_snapshot`.
    let snap = snapshots.borrow().clone();
    // Held until the events are counted: whoever reads the status an ACK
    // or NACK changed finds it counted too.
    let mut state = lock(&on_board.state);
    let out = state.on_request(req, &snap).map_err(|e| {
        tracing::warn!(error = %e, "protocol error; ending the stream");
        Status::invalid_argument(e.to_string())
    })?;
    for event in out.events {
        match event {
            Event::Ack { type_url, latency } => {
                shared.metrics.apply_latency.observe(latency.as_secs_f64());
                tracing::debug!(type_url, latency_ms = latency.as_millis() as u64, "ACK");
            }
            Event::Nack(n) => {
                shared
                    .metrics
                    .nacks
                    .get_or_create(&TypeLabel::of(&n.type_url))
                    .inc();
                tracing::warn!(
                    type_url = %n.type_url,
                    version = %n.system_version,
                    message = %n.message,
                    "sidecar rejected config (NACK); it keeps its previous config"
                );
            }
            Event::StaleNonce { type_url, nonce } => {
                tracing::debug!(type_url, nonce, "ignoring a stale nonce");
            }
        }
    }
    drop(state);
    Ok(out.responses)
}

/// Queues what the latest snapshot changes for this stream, timed as one
/// push (`push_duration`) until its last response is handed over.
fn on_snapshot(
    on_board: &OnBoard,
    snapshots: &mut watch::Receiver<Arc<Snapshot>>,
    outbox: &mut Outbox,
) {
    let started = Instant::now();
    let snap = snapshots.borrow_and_update().clone();
    let responses = lock(&on_board.state).on_snapshot(&snap, std::time::Instant::now());
    if !responses.is_empty() {
        tracing::debug!(
            version = snap.system_version(),
            responses = responses.len(),
            "pushed"
        );
    }
    outbox.queue(responses, Some(started));
}

#[cfg(test)]
mod tests {
    use bulwark_proto::xds::v1::Resource;

    use super::*;

    fn response(type_url: &str, resources: usize, bytes: usize) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: type_url.into(),
            resources: (0..resources)
                .map(|i| Resource {
                    name: format!("r{i}"),
                    version: "v".into(),
                    resource: vec![0; bytes],
                })
                .collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn the_outbox_sends_in_order_counts_what_it_sends_and_times_whole_pushes() {
        let metrics = XdsMetrics::default();
        let (tx, mut rx) = mpsc::channel::<QueuedItem>(SEND_QUEUE);
        let mut outbox = Outbox::default();
        let t = bulwark_proto::config::type_url::SERVICE;
        outbox.queue(
            vec![response(t, 2, 10), response(t, 3, 10)],
            Some(Instant::now()),
        );

        outbox.send_next(&metrics, tx.reserve().await.unwrap());
        assert_eq!(rx.recv().await.unwrap().unwrap().resources.len(), 2);
        let text = metrics.encode();
        // Counted as sent, and the push is not over yet.
        assert!(
            text.contains("bulwark_xds_resources_sent_total{type=\"Service\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("bulwark_xds_push_duration_seconds_count 0"),
            "{text}"
        );

        outbox.send_next(&metrics, tx.reserve().await.unwrap());
        assert_eq!(rx.recv().await.unwrap().unwrap().resources.len(), 3);
        let text = metrics.encode();
        assert!(
            text.contains("bulwark_xds_resources_sent_total{type=\"Service\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("bulwark_xds_push_duration_seconds_count 1"),
            "{text}"
        );
        assert!(outbox.is_empty());
        assert_eq!(outbox.queue.capacity(), 0, "a drained outbox keeps nothing");
    }

    #[tokio::test]
    async fn acks_count_only_for_responses_handed_over() {
        let metrics = XdsMetrics::default();
        let (tx, _rx) = mpsc::channel::<QueuedItem>(SEND_QUEUE);
        let mut outbox = Outbox::default();
        let t = bulwark_proto::config::type_url::SERVICE;
        let mut first = response(t, 1, 1);
        first.nonce = "1".into();
        let mut second = response(t, 1, 1);
        second.nonce = "2".into();
        outbox.queue(vec![first, second], None);
        let ack = |nonce: &str| DeltaDiscoveryRequest {
            type_url: t.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        };
        assert!(outbox.is_ahead(&ack("1")), "nothing handed over yet");
        outbox.send_next(&metrics, tx.reserve().await.unwrap());
        assert!(!outbox.is_ahead(&ack("1")));
        assert!(outbox.is_ahead(&ack("2")));
        assert!(!outbox.is_ahead(&ack("")), "no nonce: not an ACK");
        assert!(
            !outbox.is_ahead(&ack("x")),
            "not ours: the stream calls it stale"
        );
        outbox.send_next(&metrics, tx.reserve().await.unwrap());
        assert!(!outbox.is_ahead(&ack("2")));
    }
}
