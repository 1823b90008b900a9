use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use bulwark_ca::SpiffeId;
use bulwark_ca::tls::TrustBundle;
use bulwark_sidecar::config::xds_client::{self, XdsOptions};
use bulwark_sidecar::identity::IdentityOptions;
use bulwark_sidecar::{ConfigHandle, Sidecar, SidecarOptions};
use clap::Args;

use super::parse_duration;

#[derive(Args)]
pub struct SidecarArgs {
    /// This workload's SPIFFE ID.
    #[arg(long)]
    identity: String,
    /// CA address, host:port.
    #[arg(long)]
    ca: String,
    /// Trust bundle (PEM) the CA's certificate chains to.
    #[arg(long)]
    ca_cert: PathBuf,
    /// Bootstrap token file (from `bulwark ca token`, or a projected
    /// ServiceAccount token), read again on every use so that a rotated
    /// token is picked up.
    #[arg(long)]
    token_file: PathBuf,
    /// Local config file or directory (same YAML kinds as the control plane), reloaded on change.
    #[arg(long, required_unless_present = "xds", conflicts_with = "xds")]
    config: Option<PathBuf>,
    /// Control-plane replicas (host:port, comma-separated), tried in turn.
    #[arg(long, value_delimiter = ',')]
    xds: Vec<String>,
    /// This pod's IP: announced to the control plane, and where health
    /// probes reach the app (default: the address used to reach the first
    /// control-plane replica; with --config, 127.0.0.1 for probes).
    #[arg(long)]
    pod_ip: Option<std::net::IpAddr>,
    /// Ports the workload serves, announced to the control plane (comma-separated).
    #[arg(long, value_delimiter = ',')]
    ports: Vec<u16>,
    /// Workload labels, announced to the control plane (k=v,k2=v2).
    #[arg(long, value_delimiter = ',', value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Keep the last applied config here, to serve it after a restart while
    /// the control plane is unreachable.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// SVID lifetime to request (the CA caps it); default: the CA's.
    #[arg(long, value_parser = parse_duration)]
    svid_ttl: Option<Duration>,
    /// Renew after this fraction of the remaining SVID lifetime (plus up to 20% of it, at random).
    #[arg(long, default_value_t = 0.5)]
    renew_fraction: f64,
    /// Threads that run the proxy: 1 runs everything on one thread (no
    /// hand-off between threads within a request: the least CPU and latency
    /// per request, see tests/perf/RESULTS.md); N > 1 spreads connections
    /// over N worker threads. Default: 1 as a sidecar (it shares the pod's
    /// cores with its app), one per core as a gateway.
    #[arg(long, env = "BULWARK_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    worker_threads: Option<u16>,
    /// Park the app's idle HTTP/1.1 keep-alive connections: after 10 ms
    /// without a request, the connection's HTTP state (two 8 KiB buffers)
    /// is freed until the app writes again (about 8 kB per idle
    /// connection instead of 30 kB; tests/perf/RESULTS.md). `false` keeps
    /// every connection's HTTP state for its whole life.
    #[arg(long, env = "BULWARK_PARK_IDLE_HTTP", value_name = "BOOL", default_value_t = true,
          action = clap::ArgAction::Set)]
    park_idle_http: bool,
    #[arg(long, default_value = "0.0.0.0:15001")]
    outbound_listen: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15006")]
    inbound_listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_listen: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_listen: SocketAddr,
    /// SO_MARK on the proxy's own sockets (must match `bulwark init --proxy-mark`).
    #[arg(long, default_value_t = bulwark_sidecar::DEFAULT_PROXY_MARK, value_parser = parse_u32)]
    proxy_mark: u32,
    /// Concurrent connections per listener before new ones are reset (the
    /// gateway's listeners share one such budget).
    #[arg(long, default_value_t = 16384)]
    max_connections: usize,
    /// Directory of the tamper-evident audit log of authorization decisions (off when absent).
    #[arg(long, requires = "audit_key_file")]
    audit_dir: Option<PathBuf>,
    /// HMAC key for the audit log's chain (raw bytes or hex, at least 16 bytes).
    #[arg(long)]
    audit_key_file: Option<PathBuf>,
    /// OTLP/gRPC collector for traces, e.g. http://otel-collector:4317 (off when absent).
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Fraction of new traces sampled (a sampled incoming parent is always followed).
    #[arg(long, default_value_t = 0.01)]
    trace_sample_ratio: f64,
    /// On SIGTERM, how long in-flight connections may finish.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    drain_grace: Duration,
    /// `sidecar` (next to a workload) or `gateway` (at the mesh edge: also
    /// serves the public listeners of the `Gateway` named by --gateway).
    #[arg(long, value_enum, default_value_t = Mode::Sidecar)]
    mode: Mode,
    /// The `Gateway` resource this proxy serves, `namespace/name` (or
    /// `name` in the identity's namespace). Needs --mode gateway.
    #[arg(long, required_if_eq("mode", "gateway"))]
    gateway: Option<String>,
    /// Address the gateway's public listeners bind to.
    #[arg(long, default_value = "0.0.0.0")]
    gateway_bind: std::net::IpAddr,
    /// Connections one client (an IPv4 address, an IPv6 /64) may hold open
    /// to the gateway's listeners; beyond them its new ones are reset (0: no cap).
    #[arg(long, default_value_t = bulwark_sidecar::gateway::server::DEFAULT_MAX_CONNECTIONS_PER_CLIENT)]
    gateway_max_connections_per_client: usize,
    /// A gateway connection with no request in flight (a request counts until
    /// its response is sent) for this long is closed; one whose client
    /// stalls a request (sends none of the body the upstream waits for, or
    /// reads none of the response) for this long is dropped; a tunnel with
    /// no bytes either way for this long is closed (0: never).
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    gateway_idle_timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Sidecar,
    Gateway,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label {s:?} must be key=value"))
}

/// The local address the kernel would use towards `target`.
fn local_ip_towards(target: &str) -> anyhow::Result<std::net::IpAddr> {
    use std::net::ToSocketAddrs;
    let addr = target
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {target}"))?
        .next()
        .with_context(|| format!("cannot resolve {target}"))?;
    let bind = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let sock = std::net::UdpSocket::bind(bind)?;
    sock.connect(addr)?;
    Ok(sock.local_addr()?.ip())
}

pub fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a number (decimal or 0x hex)"))
}

pub fn run(a: SidecarArgs) -> anyhow::Result<()> {
    let identity: SpiffeId = a
        .identity
        .parse()
        .with_context(|| format!("--identity {:?}", a.identity))?;
    let bundle_pem = std::fs::read_to_string(&a.ca_cert)
        .with_context(|| format!("cannot read --ca-cert {}", a.ca_cert.display()))?;
    let ca_bundle = TrustBundle::from_pem(&bundle_pem)
        .with_context(|| format!("--ca-cert {}", a.ca_cert.display()))?;
    // Read again on every use; read here so that a wrong path fails at start.
    std::fs::read_to_string(&a.token_file)
        .with_context(|| format!("cannot read --token-file {}", a.token_file.display()))?;
    if !(0.1..=0.9).contains(&a.renew_fraction) {
        anyhow::bail!("--renew-fraction must be between 0.1 and 0.9");
    }
    let mut opts = SidecarOptions::new(IdentityOptions {
        identity,
        ca_addr: a.ca,
        ca_bundle,
        token_file: a.token_file,
        ttl: a.svid_ttl,
        renew_fraction: a.renew_fraction,
    });
    opts.outbound_listen = a.outbound_listen;
    opts.inbound_listen = a.inbound_listen;
    opts.admin_listen = a.admin_listen;
    opts.metrics_listen = a.metrics_listen;
    opts.proxy_mark = a.proxy_mark;
    opts.max_connections = a.max_connections;
    opts.drain_grace = a.drain_grace;
    opts.park_idle_http = a.park_idle_http;
    // This pod's address: announced to the control plane, and where health
    // probes reach the app, as mesh traffic does.
    let pod_ip = match (a.pod_ip, a.xds.first()) {
        (Some(ip), _) => Some(ip),
        (None, Some(cp)) => Some(local_ip_towards(cp)?),
        (None, None) => None,
    };
    opts.pod_ip = pod_ip;
    opts.trace = a
        .otlp_endpoint
        .map(|endpoint| bulwark_sidecar::telemetry::trace::TraceOptions {
            endpoint,
            sample_ratio: a.trace_sample_ratio,
            service_name: a.identity.clone(),
            mark: a.proxy_mark,
        });
    let namespace = opts.identity.identity.namespace().to_string();
    let id = opts.identity.identity.to_string();
    match (a.mode, &a.gateway) {
        (Mode::Gateway, Some(g)) => {
            let name = if g.contains('/') {
                g.clone()
            } else {
                format!("{namespace}/{g}")
            };
            opts.gateway = Some(bulwark_sidecar::gateway::GatewayOptions {
                bind: a.gateway_bind,
                max_connections_per_client: a.gateway_max_connections_per_client,
                idle_timeout: a.gateway_idle_timeout,
                ..bulwark_sidecar::gateway::GatewayOptions::new(name)
            });
        }
        (Mode::Sidecar, Some(_)) => anyhow::bail!("--gateway needs --mode gateway"),
        _ => {}
    }
    let sidecar = Sidecar::new(opts);
    sidecar.set_log_control(Box::new(super::log_filter));
    if let (Some(dir), Some(key_file)) = (&a.audit_dir, &a.audit_key_file) {
        let key = bulwark_sidecar::audit::read_key_file(key_file)
            .with_context(|| format!("--audit-key-file {}", key_file.display()))?;
        sidecar
            .enable_audit(dir, &key)
            .with_context(|| format!("--audit-dir {}", dir.display()))?;
    }
    let handle = sidecar.config_handle();
    let threads = match (a.worker_threads, a.mode) {
        (Some(n), _) => Some(n),
        (None, Mode::Sidecar) => Some(1),
        (None, Mode::Gateway) => None,
    };
    let rt = match threads {
        None => super::runtime()?,
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(n))
            .enable_all()
            .build()?,
    };
    let source = match a.config {
        Some(path) => {
            // The first config must be valid: a sidecar that starts on a
            // broken file would serve nothing.
            let resources = compile(&path)?;
            handle
                .apply(&version_of(&path), resources)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            ConfigSource::File(path)
        }
        None => {
            let address = pod_ip.context("no --pod-ip and no control plane to find it by")?;
            let suffix: [u8; 4] = bulwark_ca::random_bytes();
            let node = bulwark_proto::xds::v1::Node {
                id: format!(
                    "{}-{}",
                    address,
                    suffix
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>()
                ),
                identity: id,
                address: address.to_string(),
                ports: a.ports.iter().map(|p| u32::from(*p)).collect(),
                labels: a.labels.into_iter().collect(),
                namespace,
                unhealthy: false,
            };
            ConfigSource::Xds(Box::new(XdsOptions {
                addrs: a.xds,
                node,
                state_dir: a.state_dir,
                mark: a.proxy_mark,
            }))
        }
    };
    rt.block_on(async move {
        let feeder = match source {
            ConfigSource::File(path) => tokio::spawn(watch_file(path, handle)),
            ConfigSource::Xds(o) => tokio::spawn(xds_client::run(*o, handle)),
        };
        let r = sidecar.run(super::shutdown_signal()).await;
        feeder.abort();
        r
    })?;
    Ok(())
}

enum ConfigSource {
    File(PathBuf),
    Xds(Box<XdsOptions>),
}

fn compile(path: &Path) -> anyhow::Result<bulwark_proto::config::Resources> {
    bulwark_xds::load_and_compile(path).map_err(|e| anyhow::anyhow!("invalid config:\n{e}"))
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let mut newest = None::<(SystemTime, u64)>;
    let mut visit = |p: &Path| {
        if let Ok(m) = std::fs::metadata(p) {
            let s = (m.modified().ok()?, m.len());
            newest = Some(match newest {
                Some(n) if n.0 >= s.0 => (n.0, n.1 + s.1),
                Some(n) => (s.0, n.1 + s.1),
                None => s,
            });
        }
        Some(())
    };
    if path.is_dir() {
        for e in std::fs::read_dir(path).ok()?.flatten() {
            visit(&e.path());
        }
    } else {
        visit(path);
    }
    newest
}

fn version_of(path: &Path) -> String {
    match stamp(path) {
        Some((t, len)) => format!(
            "file-{}-{len}",
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0)
        ),
        None => "file-0".into(),
    }
}

/// Re-applies the local config when it changes; a bad edit is logged and
/// the last good config keeps serving.
async fn watch_file(path: PathBuf, handle: ConfigHandle) {
    let mut last = stamp(&path);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        match compile(&path) {
            Ok(r) => {
                let _ = handle.apply(&version_of(&path), r);
            }
            Err(e) => {
                tracing::warn!(error = %e, "config file change rejected; keeping the last good config")
            }
        }
    }
}
