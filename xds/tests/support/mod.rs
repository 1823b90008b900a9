//! Test support: a CA and a config directory on disk, a control plane on
//! loopback, SVIDs issued straight from the CA's intermediate, and a small
//! discovery client speaking mTLS.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use bulwark_ca::SpiffeId;
use bulwark_ca::authority::{Authority, check_csr};
use bulwark_ca::client::{Svid, new_csr};
use bulwark_ca::store::{self, RootSource, Settings};
use bulwark_ca::tls::{CurrentCert, ExpectedServer, SpiffeServerVerifier, TrustBundle, provider};
use bulwark_proto::config::type_url;
use bulwark_proto::xds::v1::discovery_service_client::DiscoveryServiceClient;
use bulwark_proto::xds::v1::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, ErrorDetail, Node};
use bulwark_xds::credentials::xds_identity;
use bulwark_xds::server::{ControlPlane, Handle, ServeError, ServeOptions};
use rustls::sign::CertifiedKey;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::Status;

/// How long any single expected event may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub const MESH: &str = r#"apiVersion: bulwark.dev/v1
kind: MeshConfig
metadata: {name: mesh}
spec:
  trustDomain: cluster.local
"#;

pub const API: &str = r#"apiVersion: bulwark.dev/v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
  selector: {app: api}
"#;

pub const WEB: &str = r#"apiVersion: bulwark.dev/v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
  identities: [spiffe://cluster.local/ns/shop/sa/web]
"#;

pub const PAYMENTS: &str = r#"apiVersion: bulwark.dev/v1
kind: ServiceEntry
metadata: {name: payments, namespace: shop}
spec:
  hosts: [payments.example.com]
  ports: [{port: 443, protocol: tcp}]
  endpoints:
    - address: 192.0.2.10
"#;

/// The route's timeout is on a line of its own so edits keep line numbers.
pub fn route(timeout: &str) -> String {
    format!(
        r#"apiVersion: bulwark.dev/v1
kind: Route
metadata: {{name: api, namespace: shop}}
spec:
  service: api
  rules:
    - backends: [{{service: api}}]
      timeout: {timeout}
"#
    )
}

pub const POLICY: &str = r#"apiVersion: bulwark.dev/v1
kind: AuthorizationPolicy
metadata: {name: api-callers, namespace: shop}
spec:
  service: api
  rules:
    - from: [spiffe://cluster.local/ns/shop/sa/web]
---
apiVersion: bulwark.dev/v1
kind: TrafficPolicy
metadata: {name: api, namespace: shop}
spec:
  service: api
  connectTimeout: 1s
"#;

/// A CA directory and a config directory with one file per concern.
pub struct Mesh {
    _work: tempfile::TempDir,
    pub config: PathBuf,
    pub ca: PathBuf,
}

impl Mesh {
    pub fn new() -> Self {
        let work = tempfile::tempdir().unwrap();
        let config = work.path().join("config");
        let ca = work.path().join("ca");
        std::fs::create_dir(&config).unwrap();
        store::init(&ca, &Settings::new("cluster.local"), RootSource::Generate).unwrap();
        let mesh = Self {
            _work: work,
            config,
            ca,
        };
        mesh.write("mesh.yaml", MESH);
        mesh.write("api.yaml", API);
        mesh.write("web.yaml", WEB);
        mesh.write("payments.yaml", PAYMENTS);
        mesh.write("route.yaml", &route("2s"));
        mesh.write("policy.yaml", POLICY);
        mesh
    }

    /// Replaces a config file atomically (write a hidden file, rename), as
    /// editors and ConfigMap updates do.
    pub fn write(&self, name: &str, text: &str) {
        let tmp = self.config.join(format!(".{name}.tmp"));
        let mut f = std::fs::File::create(&tmp).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f.sync_all().unwrap();
        std::fs::rename(&tmp, self.config.join(name)).unwrap();
    }

    pub fn options(&self) -> ServeOptions {
        let mut o = ServeOptions::new(self.config.clone(), self.ca.clone());
        o.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        o.admin_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        o
    }

    pub async fn start(&self) -> Server {
        self.start_with(|_| {}).await
    }

    pub async fn start_with(&self, tweak: impl FnOnce(&mut ServeOptions)) -> Server {
        let mut opts = self.options();
        tweak(&mut opts);
        Server::start(opts).await
    }

    /// An SVID for `spiffe://cluster.local/ns/<ns>/sa/<sa>`, signed by the
    /// CA's intermediate.
    pub fn svid(&self, ns: &str, sa: &str) -> Arc<CertifiedKey> {
        let id = SpiffeId::new("cluster.local", ns, sa).unwrap();
        let authority = Authority::from_material(store::load(&self.ca).unwrap()).unwrap();
        let (key, csr) = new_csr(&id).unwrap();
        let issued = authority
            .sign(
                check_csr(&csr).unwrap(),
                &id,
                None,
                time::OffsetDateTime::now_utc(),
            )
            .unwrap();
        Svid::from_pem_parts(&key.serialize_pem(), &issued.chain_pem, &issued.bundle_pem)
            .unwrap()
            .certified_key()
            .unwrap()
    }

    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::from_pem(&std::fs::read_to_string(self.ca.join(store::BUNDLE)).unwrap())
            .unwrap()
    }
}

/// A control plane running in this process.
pub struct Server {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Server {
    pub async fn start(opts: ServeOptions) -> Self {
        let cp = ControlPlane::bind(opts).await.unwrap();
        let (addr, admin, handle) = (cp.local_addr(), cp.admin_addr().unwrap(), cp.handle());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(cp.run(async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            admin,
            handle,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn sent(&self, t: &str) -> u64 {
        self.handle
            .metrics()
            .resources_sent
            .get_or_create(&bulwark_xds::metrics::TypeLabel::of(t))
            .get()
    }

    pub fn sent_total(&self) -> u64 {
        type_url::ALL.iter().map(|t| self.sent(t)).sum()
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Waits until `cond` gives a value, polling; fails the test at the deadline.
pub async fn eventually<T, F, Fut>(what: &str, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn node(ns: &str, sa: &str, address: &str, labels: &[(&str, &str)]) -> Node {
    Node {
        id: format!("{sa}-{}", std::process::id()),
        identity: SpiffeId::new("cluster.local", ns, sa).unwrap().to_string(),
        address: address.into(),
        ports: vec![8080],
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        namespace: ns.into(),
        unhealthy: false,
    }
}

/// Versions a client holds, by type URL then name.
pub type Held = HashMap<String, HashMap<String, String>>;

/// Subscribes to `types` with `*`, the node on the first request.
pub fn subscriptions(node: Node, types: &[&str], held: &Held) -> Vec<DeltaDiscoveryRequest> {
    types
        .iter()
        .enumerate()
        .map(|(i, t)| DeltaDiscoveryRequest {
            node: (i == 0).then(|| node.clone()),
            type_url: t.to_string(),
            resource_names_subscribe: vec!["*".into()],
            initial_resource_versions: held.get(*t).cloned().unwrap_or_default(),
            ..Default::default()
        })
        .collect()
}

/// A sidecar's end of a discovery stream.
pub struct Client {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: tonic::Streaming<DeltaDiscoveryResponse>,
    /// What this client holds, updated on ACK.
    pub held: Held,
}

impl Client {
    /// Opens a stream with the client certificate `cert`, sending `first`
    /// before waiting for the server's answer. Refusals come back as the
    /// stream's status.
    pub async fn open(
        server: &Server,
        mesh: &Mesh,
        cert: Option<Arc<CertifiedKey>>,
        first: Vec<DeltaDiscoveryRequest>,
    ) -> Result<Self, Status> {
        let verifier = SpiffeServerVerifier::new(
            Arc::new(ArcSwap::from_pointee(mesh.bundle())),
            ExpectedServer::AnyOf(vec![xds_identity("cluster.local")]),
        );
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let mut cfg = match cert {
            Some(ck) => builder.with_client_cert_resolver(Arc::new(CurrentCert::new(ck))),
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let cfg = Arc::new(cfg);
        let addr = server.addr;
        let connector = tower::service_fn(move |_: http::Uri| {
            let cfg = cfg.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let tls = tokio_rustls::TlsConnector::from(cfg)
                    .connect(
                        rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                        tcp,
                    )
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        let channel = tonic::transport::Endpoint::from_static("http://bulwark-xds")
            .connect_with_connector(connector)
            .await
            .map_err(|e| Status::unavailable(format!("connect: {e}")))?;
        let mut client = DiscoveryServiceClient::new(channel)
            .max_decoding_message_size(bulwark_xds::server::MAX_MESSAGE);
        let (tx, rx) = mpsc::channel(64);
        for r in first {
            tx.send(r).await.unwrap();
        }
        let rx = client
            .delta_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Self {
            tx,
            rx,
            held: Held::new(),
        })
    }

    /// Connects as `ns/sa` and subscribes to every type.
    pub async fn subscribe_all(
        server: &Server,
        mesh: &Mesh,
        node: Node,
        held: Held,
    ) -> Result<Self, Status> {
        let (ns, sa) = identity_parts(&node.identity);
        let cert = mesh.svid(&ns, &sa);
        let mut c = Self::open(
            server,
            mesh,
            Some(cert),
            subscriptions(node, &type_url::ALL, &held),
        )
        .await?;
        c.held = held;
        Ok(c)
    }

    /// The next response; fails the test after [`DEADLINE`].
    pub async fn recv(&mut self) -> DeltaDiscoveryResponse {
        match tokio::time::timeout(DEADLINE, self.rx.message()).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => panic!("stream closed"),
            Ok(Err(s)) => panic!("stream failed: {s}"),
            Err(_) => panic!("no response within {DEADLINE:?}"),
        }
    }

    /// The stream's final status, once the server ends it.
    pub async fn closed(&mut self) -> Option<Status> {
        loop {
            match tokio::time::timeout(DEADLINE, self.rx.message()).await {
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => return None,
                Ok(Err(s)) => return Some(s),
                Err(_) => panic!("stream still open after {DEADLINE:?}"),
            }
        }
    }

    /// Applies `r` to what the client holds and ACKs it.
    pub async fn ack(&mut self, r: &DeltaDiscoveryResponse) {
        let held = self.held.entry(r.type_url.clone()).or_default();
        for n in &r.removed_resources {
            held.remove(n);
        }
        for res in &r.resources {
            held.insert(res.name.clone(), res.version.clone());
        }
        self.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    /// Refuses `r`, keeping what the client held.
    pub async fn nack(&mut self, r: &DeltaDiscoveryResponse, message: &str) {
        self.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            error_detail: Some(ErrorDetail {
                code: tonic::Code::InvalidArgument as i32,
                message: message.into(),
            }),
            ..Default::default()
        })
        .await;
    }

    pub async fn send(&self, r: DeltaDiscoveryRequest) {
        self.tx.send(r).await.unwrap();
    }

    /// Receives the first response of every type and ACKs each.
    pub async fn sync_all(&mut self) -> Vec<DeltaDiscoveryResponse> {
        let mut out = Vec::new();
        for _ in type_url::ALL {
            let r = self.recv().await;
            self.ack(&r).await;
            out.push(r);
        }
        out
    }
}

fn identity_parts(identity: &str) -> (String, String) {
    let id: SpiffeId = identity.parse().unwrap();
    (id.namespace().to_string(), id.service_account().to_string())
}

/// Names of a response's resources.
pub fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.get_or_init(Default::default)
            .lock()
            .unwrap()
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends this test binary's logs to a buffer [`logs`] reads.
pub fn capture_logs() {
    let _ = tracing_subscriber::fmt()
        .with_writer(|| Capture)
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .try_init();
}

pub fn logs() -> String {
    String::from_utf8_lossy(&LOGS.get_or_init(Default::default).lock().unwrap()).into_owned()
}

pub fn config_path(mesh: &Mesh, name: &str) -> String {
    Path::new(&mesh.config).join(name).display().to_string()
}
