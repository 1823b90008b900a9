//! The Bulwark sidecar proxy: transparent interception, mutual TLS between
//! sidecars with SPIFFE identities, certificate rotation, L4 authorization,
//! metrics and health.
//!
//! The sidecar knows configuration only as `bulwark.config.v1` resources,
//! handed to it through [`ConfigHandle::apply`] (by the xDS client or, in
//! local-file mode, by the CLI).

pub mod admin;
pub mod audit;
pub mod balance;
pub mod config;
pub mod dial;
pub mod gateway;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod intercept;
pub mod outbound;
pub mod relay;
pub mod resilience;
pub mod telemetry;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bulwark_proto::config::Resources;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::config::{ConfigError, LiveConfig};
use crate::identity::{CertManager, IdentityOptions};
use crate::telemetry::Metrics;

/// Reads (None) or replaces (Some) the log filter; returns the filter in force.
pub type LogControl = Box<dyn Fn(Option<&str>) -> Result<String, String> + Send + Sync>;

/// Socket mark on the proxy's own upstream sockets (0x539 = 1337).
pub const DEFAULT_PROXY_MARK: u32 = 0x539;

#[derive(Debug, Clone)]
pub struct SidecarOptions {
    pub identity: IdentityOptions,
    pub outbound_listen: SocketAddr,
    pub inbound_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub proxy_mark: u32,
    /// Concurrent proxied connections per listener; beyond it new
    /// connections are reset at once.
    pub max_connections: usize,
    pub connect_timeout: Duration,
    /// On shutdown, how long in-flight connections may finish.
    pub drain_grace: Duration,
    /// OpenTelemetry export (off when None).
    pub trace: Option<telemetry::trace::TraceOptions>,
    /// Park idle HTTP/1.1 app connections ([`http::park`]); on by default.
    pub park_idle_http: bool,
    /// Also run as this edge gateway (public listeners from its `Gateway`).
    pub gateway: Option<gateway::GatewayOptions>,
    /// This pod's address: health probes reach the app there, as mesh
    /// traffic does (127.0.0.1 when unknown).
    pub pod_ip: Option<std::net::IpAddr>,
}

impl SidecarOptions {
    pub fn new(identity: IdentityOptions) -> Self {
        Self {
            identity,
            outbound_listen: "0.0.0.0:15001".parse().expect("static"),
            inbound_listen: "0.0.0.0:15006".parse().expect("static"),
            admin_listen: "127.0.0.1:15000".parse().expect("static"),
            metrics_listen: "0.0.0.0:15020".parse().expect("static"),
            proxy_mark: DEFAULT_PROXY_MARK,
            max_connections: 16 * 1024,
            connect_timeout: Duration::from_secs(5),
            drain_grace: Duration::from_secs(20),
            trace: None,
            park_idle_http: true,
            gateway: None,
            pod_ip: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
}

/// Everything a connection handler needs.
pub struct Proxy {
    pub identity: Arc<CertManager>,
    pub config: Arc<LiveConfig>,
    pub metrics: Arc<Metrics>,
    pub client_configs: tls::ClientConfigs,
    pub server_config: Arc<rustls::ServerConfig>,
    pub mark: u32,
    pub connect_timeout: Duration,
    pub park_idle_http: bool,
    /// Where health probes reach the app (`SidecarOptions::pod_ip`).
    pub app_host: std::net::IpAddr,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub pool: http::pool::MeshPool,
    pub guards: resilience::state::Guards,
    pub endpoints: balance::Endpoints,
    pub local: http::inbound::LocalClients,
    /// Whether the local app fails its active health check (reported to
    /// the control plane).
    pub health: tokio::sync::watch::Sender<bool>,
    /// Reads (None) or sets (Some(filter)) the process's log filter; set by
    /// the embedding binary, used by the admin `/logging` endpoint.
    pub log_control: std::sync::OnceLock<LogControl>,
    /// Turns true when the sidecar starts draining (SIGTERM).
    pub draining: tokio::sync::watch::Sender<bool>,
    /// The tamper-evident audit log of authorization decisions, if enabled.
    pub audit: std::sync::OnceLock<audit::AuditLog>,
    /// Set once the runtime is up when tracing is configured.
    pub tracing: std::sync::OnceLock<telemetry::trace::Tracing>,
}

impl Proxy {
    /// Records an inbound authorization decision in the audit log (a no-op
    /// when auditing is off; never blocks).
    #[allow(clippy::too_many_arguments)]
    pub fn audit(
        &self,
        source: &str,
        service: &str,
        method: &str,
        path: &str,
        allowed: bool,
        policy: &str,
        reason: Option<&str>,
    ) {
        if let Some(log) = self.audit.get() {
            log.record(audit::AuditRecord {
                time: String::new(),
                source_identity: source.to_string(),
                destination_identity: self.identity.identity().to_string(),
                service: service.to_string(),
                method: method.to_string(),
                path: path.to_string(),
                decision: if allowed {
                    audit::Decision::Allow
                } else {
                    audit::Decision::Deny
                },
                policy: policy.to_string(),
                reason: reason.map(String::from),
                subject: None,
                scopes: Vec::new(),
            });
        }
    }

    /// The tracer (a no-op one when tracing is off).
    pub fn tracer(&self) -> &telemetry::trace::Tracing {
        static OFF: std::sync::OnceLock<telemetry::trace::Tracing> = std::sync::OnceLock::new();
        self.tracing
            .get()
            .unwrap_or_else(|| OFF.get_or_init(Default::default))
    }
}

/// Closes a connection with a TCP RST: a fast, unambiguous refusal.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Applies configuration to a running sidecar.
#[derive(Clone)]
pub struct ConfigHandle {
    health: tokio::sync::watch::Sender<bool>,
    config: Arc<LiveConfig>,
    identity: Arc<CertManager>,
    metrics: Arc<Metrics>,
}

impl ConfigHandle {
    /// Validates and applies a whole resource set; on error the previous
    /// config keeps serving.
    pub fn apply(&self, version: &str, resources: Resources) -> Result<(), ConfigError> {
        self.apply_with(version, resources, false)
    }

    /// Like [`ConfigHandle::apply`]; `stale` marks a config restored from
    /// disk while the control plane is unreachable.
    pub fn apply_with(
        &self,
        version: &str,
        resources: Resources,
        stale: bool,
    ) -> Result<(), ConfigError> {
        let bundle = resources.trust_bundle.clone();
        let result = self
            .config
            .apply(self.identity.identity(), version, resources, stale);
        let label = telemetry::ResultLabel {
            result: if result.is_ok() {
                "applied"
            } else {
                "rejected"
            },
        };
        self.metrics.config_applied.get_or_create(&label).inc();
        match &result {
            Ok(_) => {
                self.metrics.config_stale.set(i64::from(stale));
                self.metrics.set_applied_version(version);
                // Validated by the snapshot build.
                if let Some(b) = bundle
                    && let Ok(tb) = bulwark_ca::tls::TrustBundle::from_pem(&b.roots_pem.concat())
                {
                    self.identity.set_bundle(tb);
                }
            }
            Err(e) => {
                tracing::warn!(version, error = %e, "config rejected; keeping the last good config")
            }
        }
        result.map(|_| ())
    }

    pub fn identity(&self) -> &Arc<CertManager> {
        &self.identity
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Changes when the local app's active health verdict changes (true = unhealthy).
    pub fn health(&self) -> tokio::sync::watch::Receiver<bool> {
        self.health.subscribe()
    }

    /// The currently applied config, if any.
    pub fn current(&self) -> Option<Arc<config::Snapshot>> {
        self.config.load()
    }
}

pub struct Sidecar {
    opts: SidecarOptions,
    proxy: Arc<Proxy>,
}

impl Sidecar {
    pub fn new(opts: SidecarOptions) -> Self {
        bulwark_ca::tls::provider();
        let metrics = Arc::new(Metrics::default());
        let identity = CertManager::new(opts.identity.clone(), opts.proxy_mark, metrics.clone());
        let proxy = Arc::new(Proxy {
            client_configs: tls::ClientConfigs::new(identity.clone()),
            server_config: tls::server_config(&identity),
            identity,
            config: Arc::new(LiveConfig::default()),
            metrics,
            mark: opts.proxy_mark,
            connect_timeout: opts.connect_timeout,
            park_idle_http: opts.park_idle_http,
            app_host: opts.pod_ip.unwrap_or(std::net::Ipv4Addr::LOCALHOST.into()),
            outbound_port: opts.outbound_listen.port(),
            inbound_port: opts.inbound_listen.port(),
            pool: Default::default(),
            guards: Default::default(),
            endpoints: Default::default(),
            local: Default::default(),
            health: tokio::sync::watch::Sender::new(false),
            tracing: std::sync::OnceLock::new(),
            log_control: std::sync::OnceLock::new(),
            audit: std::sync::OnceLock::new(),
            draining: tokio::sync::watch::Sender::new(false),
        });
        Self { opts, proxy }
    }

    /// Opens the audit log in `dir` (HMAC key `key`): every inbound
    /// authorization decision is recorded there.
    pub fn enable_audit(&self, dir: &std::path::Path, key: &[u8]) -> Result<(), audit::AuditError> {
        let log = audit::AuditLog::open(
            dir,
            key,
            audit::AuditOptions {
                dropped: self.proxy.metrics.audit_dropped.clone(),
                ..Default::default()
            },
        )?;
        let _ = self.proxy.audit.set(log);
        Ok(())
    }

    /// Lets the admin `/logging` endpoint read and change the log filter.
    pub fn set_log_control(&self, ctl: LogControl) {
        let _ = self.proxy.log_control.set(ctl);
    }

    pub fn config_handle(&self) -> ConfigHandle {
        ConfigHandle {
            health: self.proxy.health.clone(),
            config: self.proxy.config.clone(),
            identity: self.proxy.identity.clone(),
            metrics: self.proxy.metrics.clone(),
        }
    }

    /// Runs until `shutdown` resolves, then drains: stops accepting and
    /// lets in-flight connections finish within the grace period.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), SidecarError> {
        let bind = |a: SocketAddr| async move {
            TcpListener::bind(a)
                .await
                .map_err(|e| SidecarError::Listen(a, e))
        };
        let outbound = bind(self.opts.outbound_listen).await?;
        let inbound = bind(self.opts.inbound_listen).await?;
        let admin = admin::serve(
            self.opts.admin_listen,
            self.proxy.clone(),
            admin::Port::Admin,
        )
        .await
        .map_err(|e| SidecarError::Listen(self.opts.admin_listen, e))?;
        let metrics = admin::serve(
            self.opts.metrics_listen,
            self.proxy.clone(),
            admin::Port::Metrics,
        )
        .await
        .map_err(|e| SidecarError::Listen(self.opts.metrics_listen, e))?;
        if let Some(t) = &self.opts.trace {
            match telemetry::trace::Tracing::start(t, self.proxy.metrics.trace_dropped.clone()) {
                Ok(tr) => {
                    let _ = self.proxy.tracing.set(tr);
                    tracing::info!(endpoint = %t.endpoint, ratio = t.sample_ratio, "exporting traces over OTLP");
                }
                Err(e) => {
                    tracing::error!(error = %e, "tracing disabled: cannot set up the OTLP exporter")
                }
            }
        }
        let cert_task = tokio::spawn(self.proxy.identity.clone().run());
        let health_task = tokio::spawn(http::health::run(self.proxy.clone()));
        let limit = self.opts.max_connections;
        let gw_slots = Arc::new(Semaphore::new(limit));
        let gateway_task = self
            .opts
            .gateway
            .clone()
            .map(|g| tokio::spawn(gateway::run(self.proxy.clone(), g, gw_slots.clone())));
        tracing::info!(identity = %self.proxy.identity.identity(), outbound = %self.opts.outbound_listen,
            inbound = %self.opts.inbound_listen, "sidecar listening");

        let out_sem = Arc::new(Semaphore::new(limit));
        let in_sem = Arc::new(Semaphore::new(limit));
        let out_task = tokio::spawn(accept_loop(
            outbound,
            self.proxy.clone(),
            Slots::new(out_sem.clone(), limit, None),
            "outbound",
        ));
        // Any pod can connect to the inbound port: once half the slots are
        // taken, one address gets a sixteenth of them for connections whose
        // peer is not authenticated (yet), so that one pod's silent or
        // plaintext connections cannot take every slot from the mesh.
        let sources = bulwark_ca::admission::PerSource::new((limit / INBOUND_SOURCE_SHARE).max(1));
        let in_task = tokio::spawn(accept_loop(
            inbound,
            self.proxy.clone(),
            Slots::new(in_sem.clone(), limit, Some(sources)),
            "inbound",
        ));
        shutdown.await;

        if let Some(t) = &gateway_task {
            // Dropping the listeners stops accepting; open connections drain below.
            t.abort();
        }
        out_task.abort();
        in_task.abort();
        // HTTP connections finish what they carry and close; idle pooled
        // connections go at once instead of holding the drain open.
        self.proxy.draining.send_replace(true);
        let limit = limit as u32;
        let drained = tokio::time::timeout(self.opts.drain_grace, async {
            let _a = out_sem.acquire_many(limit).await;
            let _b = in_sem.acquire_many(limit).await;
            let _c = gw_slots.acquire_many(limit).await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                grace_ms = self.opts.drain_grace.as_millis() as u64,
                "drain grace period over; closing remaining connections"
            );
        }
        cert_task.abort();
        health_task.abort();
        if let Some(a) = self.proxy.audit.get()
            && let Err(e) = a.flush()
        {
            tracing::error!(error = %e, "cannot flush the audit log");
        }
        self.proxy.tracer().shutdown();
        admin.abort();
        metrics.abort();
        Ok(())
    }
}

/// The share of inbound connection slots one source address may hold once
/// half of them are taken: one in sixteen.
pub const INBOUND_SOURCE_SHARE: usize = 16;

/// A listener's connection slots, and optionally each source's share.
struct Slots {
    all: Arc<Semaphore>,
    limit: usize,
    sources: Option<Arc<bulwark_ca::admission::PerSource>>,
}

/// A connection's slot, and its source's place; given back when dropped.
struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    place: Option<bulwark_ca::admission::SourcePlace>,
}

impl Slots {
    fn new(
        all: Arc<Semaphore>,
        limit: usize,
        sources: Option<Arc<bulwark_ca::admission::PerSource>>,
    ) -> Self {
        Self {
            all,
            limit,
            sources,
        }
    }

    /// A slot for a connection from `ip`, or why there is none.
    fn take(&self, ip: std::net::IpAddr) -> Result<Slot, &'static str> {
        // The source's share first: a source at its share takes no slot.
        let place = match &self.sources {
            Some(s) => {
                let short = self.all.available_permits() < self.limit / 2;
                Some(
                    s.take_when(ip.to_canonical(), short)
                        .ok_or("source_over_limit")?,
                )
            }
            None => None,
        };
        let permit = self
            .all
            .clone()
            .try_acquire_owned()
            .map_err(|_| "overload")?;
        Ok(Slot {
            _permit: permit,
            place,
        })
    }
}

async fn accept_loop(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    slots: Slots,
    direction: &'static str,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE/ENFILE: back off rather than spin.
                tracing::warn!(error = %e, direction, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let mut permit = match slots.take(peer.ip()) {
            Ok(slot) => slot,
            Err(reason) => {
                proxy.metrics.refused(direction, reason);
                reset(stream);
                continue;
            }
        };
        let proxy = proxy.clone();
        // One task type per direction: an outbound connection's task is not
        // sized (and copied on spawn) for the inbound TLS handshake.
        match direction {
            "outbound" => tokio::spawn(async move {
                outbound::handle(proxy, stream, peer).await;
                drop(permit);
            }),
            _ => tokio::spawn(async move {
                // The source's place goes back once the peer is authenticated.
                inbound::handle(proxy, stream, peer, permit.place.take()).await;
                drop(permit);
            }),
        };
    }
}
