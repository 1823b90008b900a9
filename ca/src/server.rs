//! The `CertificateService` gRPC server: TLS on the CA port, token or mTLS
//! authentication, admission control, signing, the issuance record.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bulwark_proto::ca::v1::certificate_service_server::{
    CertificateService, CertificateServiceServer,
};
use bulwark_proto::ca::v1::{SignRequest, SignResponse};
use rustls::server::ResolvesServerCert;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tonic::{Code, Request, Response, Status};

use crate::admission::TokenBucket;
use crate::authority::{Authority, SignError, check_csr};
use crate::identity::SpiffeId;
use crate::metrics::{AuthLabel, CaMetrics, ReasonLabel};
use crate::record::{IssuanceLog, Record};
use crate::store::{self, StoreError};
use crate::tls::{DeferredClientVerifier, TrustBundle, Usage};

/// Largest gRPC message the CA decodes.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Metadata key carrying the admission-control hint on `RESOURCE_EXHAUSTED`.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";
/// A client that has not finished its TLS handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once, and from one address once half of
/// them are taken; beyond either, a connection is closed at once.
pub const MAX_HANDSHAKES: usize = 256;
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 16;

/// The identity in the CA's own serving certificate.
pub fn ca_identity(trust_domain: &str) -> SpiffeId {
    SpiffeId::ca(trust_domain).expect("valid CA identity")
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    /// Signatures per second admitted (token bucket rate) and burst.
    pub sign_rate: f64,
    pub sign_burst: u32,
    /// Extra DNS names for the CA's serving certificate.
    pub dns_names: Vec<String>,
    /// How often the directory is checked for a rotation or pruning.
    pub reload_interval: Duration,
    /// Control-plane admin address (`host:port`): when set, a due root
    /// rotation activates only once every connected sidecar has ACKed a
    /// trust bundle with the new root.
    pub rotation_gate: Option<String>,
    /// How long a due rotation waits for the gate: past it, the rotation
    /// activates anyway (a sidecar that never ACKs must not keep the
    /// mesh on an old root until its intermediate expires).
    pub rotation_gate_max_wait: Duration,
    /// Accept projected Kubernetes ServiceAccount tokens, checked with the
    /// TokenReview API (off when `None`).
    pub kube: Option<crate::kube::KubeOptions>,
}

/// Default for [`ServeOptions::rotation_gate_max_wait`].
pub const DEFAULT_ROTATION_GATE_MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

impl ServeOptions {
    pub fn new(dir: PathBuf, listen: SocketAddr) -> Self {
        Self {
            dir,
            listen,
            metrics_listen: None,
            sign_rate: 200.0,
            sign_burst: 400,
            dns_names: Vec::new(),
            reload_interval: Duration::from_secs(2),
            rotation_gate: None,
            rotation_gate_max_wait: DEFAULT_ROTATION_GATE_MAX_WAIT,
            kube: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("cannot open the issuance record: {0}")]
    Record(std::io::Error),
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("Kubernetes token review: {0}")]
    Kube(String),
}

/// What the server holds; swapped whole when the directory changes.
struct Loaded {
    authority: Authority,
    bundle: TrustBundle,
    serving: Arc<CertifiedKey>,
    serving_renew_at: SystemTime,
    stamp: Vec<Option<SystemTime>>,
    /// Client chains this bundle already verified (see [`VerifiedChains`]).
    verified: VerifiedChains,
}

/// Renewal chains verified against one bundle, by the SHA-256 of their
/// DER, with the identity and the end of the chain's validity: an agent
/// signing many CSRs over one connection presents the same chain each time,
/// and the answer cannot change before the chain (or the bundle, which
/// replaces the whole [`Loaded`]) expires. Bounded; cleared when full.
#[derive(Default)]
struct VerifiedChains(std::sync::Mutex<std::collections::HashMap<[u8; 32], (SpiffeId, u64)>>);

impl VerifiedChains {
    const MAX: usize = 4096;

    fn key(certs: &[CertificateDer<'_>]) -> [u8; 32] {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for c in certs {
            ctx.update(&(c.len() as u64).to_be_bytes());
            ctx.update(c);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(ctx.finish().as_ref());
        key
    }

    fn get(&self, key: &[u8; 32], now: u64) -> Option<SpiffeId> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key)
            .filter(|(_, not_after)| now < *not_after)
            .map(|(id, _)| id.clone())
    }

    fn put(&self, key: [u8; 32], id: SpiffeId, certs: &[CertificateDer<'_>]) {
        // The chain is valid until its first certificate expires.
        let not_after = crate::tls::chain_not_after(certs).and_then(|t| u64::try_from(t).ok());
        let Some(not_after) = not_after else { return };
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= Self::MAX {
            map.clear();
        }
        map.insert(key, (id, not_after));
    }
}

struct State {
    dir: PathBuf,
    dns_names: Vec<String>,
    loaded: ArcSwap<Loaded>,
    log: IssuanceLog,
    /// Signatures, charged once the caller is authenticated.
    bucket: TokenBucket,
    /// Kubernetes token checks (a TokenReview round trip each), charged
    /// before the check and given back when it passes.
    token_checks: TokenBucket,
    metrics: Arc<CaMetrics>,
    reviewer: Option<crate::kube::TokenReviewer>,
}

fn dir_stamp(dir: &Path) -> Vec<Option<SystemTime>> {
    [
        store::SETTINGS_FILE,
        store::INTERMEDIATE_CERT,
        store::BUNDLE,
    ]
    .iter()
    .map(|f| {
        std::fs::metadata(dir.join(f))
            .and_then(|m| m.modified())
            .ok()
    })
    .collect()
}

fn load(dir: &Path, dns_names: &[String]) -> Result<Loaded, ServeError> {
    let stamp = dir_stamp(dir);
    let material = store::load(dir)?;
    let bundle = TrustBundle::from_pem(&material.bundle_pem).map_err(|e| StoreError::Invalid {
        path: dir.join(store::BUNDLE),
        what: e.to_string(),
    })?;
    // Renewal chains end in this CA's own intermediate: trusting it as an
    // anchor here saves one signature check per renewal. An intermediate
    // that a root did not sign directly (imported below further
    // intermediates) cannot be one; the full chain verifies without it.
    let bundle = match bundle.clone().with_own_issuer(&material.chain[0]) {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!(error = %e, "renewal chains verify up to the roots");
            bundle
        }
    };
    let authority = Authority::from_material(material)?;
    let (serving, renew_at) = serving_cert(&authority, dns_names)?;
    Ok(Loaded {
        authority,
        bundle,
        serving,
        serving_renew_at: renew_at,
        stamp,
        verified: VerifiedChains::default(),
    })
}

/// Issues the CA's own TLS certificate, in memory, from its intermediate.
fn serving_cert(
    authority: &Authority,
    dns_names: &[String],
) -> Result<(Arc<CertifiedKey>, SystemTime), ServeError> {
    let id = ca_identity(authority.trust_domain());
    let mut names = vec![
        "bulwark-ca".to_string(),
        "bulwark-ca.bulwark-system.svc".to_string(),
    ];
    names.extend(dns_names.iter().cloned());
    authority
        .serving_certificate(&id, &names)
        .map_err(ServeError::Tls)
}

#[derive(Debug)]
struct ServingCert(Arc<State>);

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.loaded.load().serving.clone())
    }
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").field("dir", &self.dir).finish()
    }
}

/// A refused request, with what goes to the caller, the record and metrics.
#[derive(Debug)]
struct Refusal {
    code: Code,
    message: String,
    reason: &'static str,
    identity: Option<String>,
    retry_after: Option<Duration>,
}

impl Refusal {
    fn new(code: Code, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            reason,
            identity: None,
            retry_after: None,
        }
    }
}

fn code_name(c: Code) -> &'static str {
    match c {
        Code::Unauthenticated => "UNAUTHENTICATED",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        _ => "INTERNAL",
    }
}

/// The budget for token checks: a quarter of the signing budget, so that a
/// flood of bad tokens costs the API server and this CA a bounded amount.
fn token_check_bucket(sign_rate: f64, sign_burst: u32) -> TokenBucket {
    TokenBucket::new(sign_rate / 4.0, (sign_burst / 4).max(1))
}

fn rate_limited(wait: Duration, what: &str) -> Refusal {
    let ms = wait.as_millis().max(1) as u64;
    let mut r = Refusal::new(
        Code::ResourceExhausted,
        "rate_limited",
        format!("CA is at its {what} rate limit; retry after {ms}ms"),
    );
    r.retry_after = Some(wait);
    r
}

struct Service(Arc<State>);

#[tonic::async_trait]
impl CertificateService for Service {
    async fn sign(&self, req: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let state = self.0.clone();
        let peer = req.remote_addr();
        let peer_certs = req.peer_certs();
        let bearer = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).to_string());
        let body = req.into_inner();
        // A Kubernetes token review waits on the API server: on a blocking
        // thread. Everything else is ~0.2 ms of CPU (two signature checks and
        // one signature), cheaper on this worker than a hand-off to the pool.
        if bearer.as_deref().is_some_and(crate::kube::is_jwt) {
            tokio::task::spawn_blocking(move || state.handle(peer, peer_certs, bearer, body))
                .await
                .map_err(|_| Status::internal("signing task failed"))?
        } else {
            state.handle(peer, peer_certs, bearer, body)
        }
    }
}

enum Auth {
    Token { id: SpiffeId, jti: String },
    Mtls(SpiffeId),
    Kube(SpiffeId),
}

impl State {
    fn handle(
        &self,
        peer: Option<SocketAddr>,
        peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
        bearer: Option<String>,
        body: SignRequest,
    ) -> Result<Response<SignResponse>, Status> {
        let mut rec = Record {
            auth: "none",
            peer: peer.map(|p| p.to_string()),
            ..Default::default()
        };
        let result = self.decide(&peer_certs, bearer.as_deref(), body, &mut rec);
        match result {
            Ok(resp) => {
                self.metrics
                    .issued
                    .get_or_create(&AuthLabel { auth: rec.auth })
                    .inc();
                rec.outcome = "issued";
                tracing::info!(identity = ?rec.identity, serial = ?rec.serial, auth = rec.auth, "issued SVID");
                self.log.append(rec);
                Ok(Response::new(resp))
            }
            Err(r) => {
                self.metrics
                    .sign_errors
                    .get_or_create(&ReasonLabel { reason: r.reason })
                    .inc();
                rec.outcome = "refused";
                rec.code = Some(code_name(r.code));
                rec.reason = Some(r.message.clone());
                if rec.identity.is_none() {
                    rec.identity = r.identity;
                }
                let mut status = Status::new(r.code, r.message);
                if let Some(wait) = r.retry_after {
                    let ms = wait.as_millis().max(1).to_string();
                    status
                        .metadata_mut()
                        .insert(RETRY_AFTER_MS, ms.parse().expect("ascii digits"));
                }
                // Logged as recorded: at a bounded rate (see `record`).
                if self.log.append(rec) {
                    tracing::warn!(peer = ?peer, reason = r.reason, message = %status.message(), "signing refused");
                }
                Err(status)
            }
        }
    }

    fn decide(
        &self,
        peer_certs: &Option<Arc<Vec<CertificateDer<'static>>>>,
        bearer: Option<&str>,
        body: SignRequest,
        rec: &mut Record,
    ) -> Result<SignResponse, Refusal> {
        let loaded = self.loaded.load();
        let auth = self.authenticate(&loaded, peer_certs, bearer, rec)?;
        // Charged only now, so that requests without valid credentials
        // cannot use up the signing budget of the workloads that have them.
        self.bucket
            .try_acquire()
            .map_err(|wait| rate_limited(wait, "signing"))?;
        let authenticated = match &auth {
            Auth::Token { id, jti } => {
                rec.auth = "token";
                rec.token_id = Some(jti.clone());
                id.clone()
            }
            Auth::Mtls(id) => {
                rec.auth = "mtls";
                id.clone()
            }
            Auth::Kube(id) => {
                rec.auth = "kubernetes";
                id.clone()
            }
        };
        rec.identity = Some(authenticated.to_string());
        if authenticated.trust_domain() != loaded.authority.trust_domain() {
            return Err(Refusal::new(
                Code::PermissionDenied,
                "foreign_trust_domain",
                format!(
                    "credential is for trust domain {:?}; this CA serves {:?}",
                    authenticated.trust_domain(),
                    loaded.authority.trust_domain()
                ),
            ));
        }
        let csr = check_csr(&body.csr_pem)
            .map_err(|e| Refusal::new(Code::InvalidArgument, "invalid_csr", e.to_string()))?;
        let ttl = (body.requested_ttl_seconds > 0)
            .then(|| Duration::from_secs(body.requested_ttl_seconds));
        let issued = loaded
            .authority
            .sign(csr, &authenticated, ttl, OffsetDateTime::now_utc())
            .map_err(|e| {
                let (code, reason) = match &e {
                    SignError::Csr(_) | SignError::TtlTooShort(_) => {
                        (Code::InvalidArgument, "invalid_csr")
                    }
                    SignError::IdentityMismatch { .. } => {
                        (Code::PermissionDenied, "identity_mismatch")
                    }
                    SignError::Reserved(_) => (Code::PermissionDenied, "reserved_identity"),
                    SignError::ForeignTrustDomain(..) => {
                        (Code::PermissionDenied, "foreign_trust_domain")
                    }
                    SignError::IssuerExpired(_) | SignError::IssuerNotYetValid(_) => {
                        (Code::FailedPrecondition, "issuer_invalid")
                    }
                    SignError::Internal(_) => (Code::Internal, "internal"),
                };
                Refusal::new(code, reason, e.to_string())
            })?;
        rec.serial = Some(issued.serial.clone());
        rec.not_after = issued
            .not_after
            .format(&time::format_description::well_known::Rfc3339)
            .ok();
        Ok(SignResponse {
            cert_chain_pem: issued.chain_pem,
            trust_bundle_pem: issued.bundle_pem,
            not_before: issued.not_before.unix_timestamp(),
            not_after: issued.not_after.unix_timestamp(),
            serial: issued.serial,
        })
    }

    fn authenticate(
        &self,
        loaded: &Loaded,
        peer_certs: &Option<Arc<Vec<CertificateDer<'static>>>>,
        bearer: Option<&str>,
        rec: &mut Record,
    ) -> Result<Auth, Refusal> {
        let mut cert_error = None;
        if let Some(certs) = peer_certs.as_ref().filter(|c| !c.is_empty()) {
            let now = UnixTime::now();
            let key = VerifiedChains::key(certs);
            if let Some(id) = loaded.verified.get(&key, now.as_secs()) {
                return Ok(Auth::Mtls(id));
            }
            match loaded
                .bundle
                .verify(&certs[0], &certs[1..], now, Usage::Client)
            {
                Ok(id) => {
                    loaded.verified.put(key, id.clone(), certs);
                    return Ok(Auth::Mtls(id));
                }
                Err(e) => {
                    rec.identity = crate::tls::spiffe_id_of(&certs[0])
                        .ok()
                        .map(|i| i.to_string());
                    cert_error = Some(e);
                }
            }
        }
        // A Kubernetes token costs a TokenReview round trip to the API
        // server: charged, so that a flood of them costs a bounded amount.
        // Bootstrap tokens and client certificates are checked here, about
        // as cheaply as a signature, and are not: junk must hold up neither
        // renewals nor first issuance.
        let reviewed = self.reviewer.is_some() && bearer.is_some_and(crate::kube::is_jwt);
        if reviewed {
            self.token_checks
                .try_acquire()
                .map_err(|wait| rate_limited(wait, "token check"))?;
        }
        let auth = match (bearer, cert_error) {
            // A workload whose SVID expired (say, the CA was down too long)
            // falls back to its bootstrap token.
            (Some(token), _) if crate::kube::is_jwt(token) => {
                let Some(reviewer) = &self.reviewer else {
                    return Err(Refusal::new(
                        Code::Unauthenticated,
                        "bad_token",
                        "this is a Kubernetes ServiceAccount token, but the CA was started without --kube-api; use a bootstrap token",
                    ));
                };
                // On a blocking thread (see `sign`): wait for the review here.
                let td = loaded.authority.trust_domain().to_string();
                tokio::runtime::Handle::current()
                    .block_on(reviewer.review(token, &td))
                    .map(Auth::Kube)
                    .map_err(|e| Refusal::new(Code::Unauthenticated, e.reason(), e.to_string()))
            }
            (Some(token), _) => {
                let now = OffsetDateTime::now_utc().unix_timestamp();
                let claims = loaded
                    .authority
                    .token_key()
                    .verify(token, now, 30)
                    .map_err(|e| Refusal::new(Code::Unauthenticated, "bad_token", e.to_string()))?;
                let id = claims
                    .identity()
                    .map_err(|e| Refusal::new(Code::Unauthenticated, "bad_token", e.to_string()))?;
                Ok(Auth::Token {
                    id,
                    jti: claims.jti,
                })
            }
            (None, Some(e)) => Err(Refusal::new(
                Code::Unauthenticated,
                "bad_client_cert",
                format!("client certificate refused: {e}"),
            )),
            (None, None) => Err(Refusal::new(
                Code::Unauthenticated,
                "no_credentials",
                "no credentials: send a bootstrap token (authorization: Bearer) or renew over mTLS with a valid SVID",
            )),
        };
        // Only refused tokens count against the check budget.
        if reviewed && auth.is_ok() {
            self.token_checks.refund();
        }
        auth
    }

    /// Picks up a rotation or pruning done by `bulwark ca` on the directory,
    /// and renews the serving certificate at half its life.
    fn refresh(&self, may_activate: bool) {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        if may_activate && let Err(e) = store::activate_pending(&self.dir, now) {
            tracing::error!(error = %e, "cannot activate the pending root rotation");
        }
        if let Err(e) = store::prune_bundle(&self.dir, now) {
            tracing::warn!(error = %e, "cannot prune the trust bundle");
        }
        let current = self.loaded.load();
        let changed = dir_stamp(&self.dir) != current.stamp;
        if !changed && SystemTime::now() < current.serving_renew_at {
            return;
        }
        match load(&self.dir, &self.dns_names) {
            Ok(l) => {
                self.metrics
                    .issuer_expiry
                    .set(l.authority.issuer_not_after().unix_timestamp());
                if changed {
                    tracing::info!(roots = l.bundle.roots().len(), "CA material reloaded");
                }
                self.loaded.store(Arc::new(l));
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot reload the CA directory; keeping the current material")
            }
        }
    }
}

/// Whether a due rotation may activate: the control plane at `gate`
/// (its admin address) must confirm that every connected sidecar has ACKed
/// a trust bundle containing the new root. Unreachable means no, until the
/// rotation has been due for `max_wait`: then yes, with an error logged.
/// A sidecar without the new root gets it with its next renewal (the CA
/// sends the bundle with every certificate).
async fn rotation_gate_open(dir: &Path, gate: &str, max_wait: Duration) -> bool {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let (fp, due_at) = match store::due_pending_root(dir, now) {
        Ok(Some(due)) => due,
        Ok(None) => return true,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the pending rotation");
            return false;
        }
    };
    let url = format!("http://{gate}/bundle-acked?root={fp}");
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<hyper::body::Bytes>>();
    let Ok(uri) = url.parse::<http::Uri>() else {
        tracing::error!(%url, "invalid --rotation-gate address");
        return false;
    };
    let fetch = async {
        let resp = client.get(uri).await.ok()?;
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .ok()?
            .to_bytes();
        serde_json::from_slice::<serde_json::Value>(&body).ok()
    };
    let waited = u64::try_from(now.saturating_sub(due_at)).unwrap_or(0);
    let answer = tokio::time::timeout(Duration::from_secs(5), fetch).await;
    match answer {
        Ok(Some(v)) if v["all_acked"] == true => {
            tracing::info!(acked = %v["acked"], "every sidecar holds the new root: rotation may activate");
            true
        }
        answer if waited >= max_wait.as_secs() => {
            let v = answer.ok().flatten().unwrap_or_default();
            tracing::error!(waited_s = waited, acked = %v["acked"], sidecars = %v["sidecars"],
                "root rotation waited --rotation-gate-max-wait for every sidecar's ACK; activating: a sidecar without the new root gets it with its next renewal");
            true
        }
        Ok(Some(v)) => {
            tracing::info!(acked = %v["acked"], sidecars = %v["sidecars"], in_bundle = %v["root_in_bundle"],
                "root rotation waits for every sidecar to ACK the new trust bundle");
            false
        }
        _ => {
            tracing::warn!(%gate, "rotation gate unreachable; the rotation waits");
            false
        }
    }
}

/// Runs the CA until `shutdown` resolves.
pub async fn serve(
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let provider = crate::tls::provider();
    let loaded = load(&opts.dir, &opts.dns_names)?;
    let metrics = Arc::new(CaMetrics::default());
    metrics
        .issuer_expiry
        .set(loaded.authority.issuer_not_after().unix_timestamp());
    let log = IssuanceLog::open(&opts.dir.join(store::ISSUED_LOG)).map_err(ServeError::Record)?;
    let reviewer = match &opts.kube {
        Some(k) => Some(crate::kube::TokenReviewer::new(k.clone()).map_err(ServeError::Kube)?),
        None => None,
    };
    let state = Arc::new(State {
        dir: opts.dir.clone(),
        dns_names: opts.dns_names.clone(),
        loaded: ArcSwap::from_pointee(loaded),
        log,
        bucket: TokenBucket::new(opts.sign_rate, opts.sign_burst),
        token_checks: token_check_bucket(opts.sign_rate, opts.sign_burst),
        metrics: metrics.clone(),
        reviewer,
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_client_cert_verifier(Arc::new(DeferredClientVerifier))
        .with_cert_resolver(Arc::new(ServingCert(state.clone())));
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|e| ServeError::Listen(opts.listen, e))?;
    let local = listener
        .local_addr()
        .map_err(|e| ServeError::Listen(opts.listen, e))?;
    let _metrics_task = match opts.metrics_listen {
        Some(a) => Some(
            crate::metrics::serve_metrics(a, metrics.clone())
                .await
                .map_err(|e| ServeError::Listen(a, e))?,
        ),
        None => None,
    };
    tracing::info!(addr = %local, dir = %opts.dir.display(), "CA listening");

    let refresher = {
        let state = state.clone();
        let every = opts.reload_interval;
        let gate = opts.rotation_gate.clone();
        let max_wait = opts.rotation_gate_max_wait;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let may_activate = match &gate {
                    None => true,
                    Some(g) => rotation_gate_open(&state.dir, g, max_wait).await,
                };
                let s = state.clone();
                let _ = tokio::task::spawn_blocking(move || s.refresh(may_activate)).await;
            }
        })
    };

    let (tx, rx) = tokio::sync::mpsc::channel(128);
    let accept_metrics = metrics.clone();
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let per_source = crate::admission::PerSource::new(MAX_HANDSHAKES_PER_SOURCE);
    let acceptor_task = tokio::spawn(async move {
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
            // Places for handshakes in progress, in all and per address:
            // silent connections cannot hold up the fleet's first SVIDs.
            // Shares are enforced once half the places are taken.
            let short = handshakes.available_permits() < MAX_HANDSHAKES / 2;
            let (Some(source), Ok(handshake)) = (
                per_source.take_when(peer.ip(), short),
                handshakes.clone().try_acquire_owned(),
            ) else {
                accept_metrics.tls_handshake_failures.inc();
                tracing::debug!(%peer, "too many TLS handshakes in progress; closing");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let m = accept_metrics.clone();
            tokio::spawn(async move {
                let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop((handshake, source));
                match accepted {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok::<_, std::io::Error>(tls)).await;
                    }
                    Ok(Err(e)) => {
                        m.tls_handshake_failures.inc();
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        m.tls_handshake_failures.inc();
                        tracing::debug!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });

    let svc = CertificateServiceServer::new(Service(state))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let result = tonic::transport::Server::builder()
        .timeout(Duration::from_secs(30))
        .concurrency_limit_per_connection(32)
        .add_service(svc)
        .serve_with_incoming_shutdown(tokio_stream::wrappers::ReceiverStream::new(rx), shutdown)
        .await;
    acceptor_task.abort();
    refresher.abort();
    result.map_err(ServeError::from)
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::pem::PemObject;

    use super::*;
    use crate::client::{Svid, new_csr};

    fn chain() -> (Vec<CertificateDer<'static>>, u64) {
        let dir = tempfile::tempdir().unwrap();
        store::init(
            dir.path(),
            &store::Settings::new("cache.local"),
            store::RootSource::Generate,
        )
        .unwrap();
        let authority = Authority::from_material(store::load(dir.path()).unwrap()).unwrap();
        let id: SpiffeId = "spiffe://cache.local/ns/default/sa/web".parse().unwrap();
        let (key, csr) = new_csr(&id).unwrap();
        let issued = authority
            .sign(
                check_csr(&csr).unwrap(),
                &id,
                Some(Duration::from_secs(600)),
                OffsetDateTime::now_utc(),
            )
            .unwrap();
        let svid =
            Svid::from_pem_parts(&key.serialize_pem(), &issued.chain_pem, &issued.bundle_pem)
                .unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&svid.chain[0]).unwrap();
        (
            svid.chain.clone(),
            leaf.validity().not_after.timestamp() as u64,
        )
    }

    fn state(dir: &Path, sign_rate: f64, sign_burst: u32) -> State {
        store::init(
            dir,
            &store::Settings::new("cluster.local"),
            store::RootSource::Generate,
        )
        .unwrap();
        State {
            dir: dir.to_path_buf(),
            dns_names: Vec::new(),
            loaded: ArcSwap::from_pointee(load(dir, &[]).unwrap()),
            log: IssuanceLog::open(&dir.join(store::ISSUED_LOG)).unwrap(),
            bucket: TokenBucket::new(sign_rate, sign_burst),
            token_checks: token_check_bucket(sign_rate, sign_burst),
            metrics: Arc::new(CaMetrics::default()),
            reviewer: None,
        }
    }

    fn sign_request(id: &SpiffeId) -> SignRequest {
        SignRequest {
            csr_pem: new_csr(id).unwrap().1,
            ..Default::default()
        }
    }

    #[test]
    fn refused_credentials_do_not_use_up_the_signing_budget() {
        let dir = tempfile::tempdir().unwrap();
        // Burst 8; practically no refill during the test.
        let state = state(dir.path(), 0.001, 8);
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        let svid = state
            .decide(
                &None,
                Some(&mint(&state, &id)),
                sign_request(&id),
                &mut Record::default(),
            )
            .unwrap();
        let chain = Some(Arc::new(
            CertificateDer::pem_slice_iter(svid.cert_chain_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap(),
        ));

        let codes: Vec<Code> = (0..20)
            .map(|_| {
                let r = state.decide(
                    &None,
                    Some("junk"),
                    sign_request(&id),
                    &mut Record::default(),
                );
                r.err().unwrap().code
            })
            .collect();
        // Bootstrap tokens are checked locally: refused, never rate limited,
        // and they cost the workloads' budget nothing.
        assert_eq!(codes, [Code::Unauthenticated; 20]);
        for _ in 0..7 {
            state
                .decide(&chain, None, sign_request(&id), &mut Record::default())
                .expect("a renewal over mTLS is within the signing budget");
        }
        let r = state.decide(&chain, None, sign_request(&id), &mut Record::default());
        assert_eq!(
            r.err().unwrap().code,
            Code::ResourceExhausted,
            "signing limited"
        );
    }

    #[test]
    fn accepted_tokens_do_not_use_up_the_token_check_budget() {
        let dir = tempfile::tempdir().unwrap();
        // Burst 4: one token check at a time.
        let state = state(dir.path(), 0.001, 4);
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        for _ in 0..4 {
            state
                .decide(
                    &None,
                    Some(&mint(&state, &id)),
                    sign_request(&id),
                    &mut Record::default(),
                )
                .expect("a good token is checked and signed");
        }
    }

    #[test]
    fn the_mesh_services_identities_are_never_signed_for_a_caller() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path(), 100.0, 100);
        for id in [
            SpiffeId::ca("cluster.local").unwrap(),
            SpiffeId::control_plane("cluster.local").unwrap(),
        ] {
            // A token an operator minted for it by hand, with the library.
            let refusal = state
                .decide(
                    &None,
                    Some(&mint(&state, &id)),
                    sign_request(&id),
                    &mut Record::default(),
                )
                .expect_err("a reserved identity is refused");
            assert_eq!(refusal.reason, "reserved_identity", "{}", refusal.message);
            assert_eq!(refusal.code, Code::PermissionDenied);
        }
        // Other service accounts of the namespace are workloads like any.
        let gateway = SpiffeId::new("cluster.local", "bulwark-system", "bulwark-gateway").unwrap();
        assert!(!gateway.is_reserved());
        state
            .decide(
                &None,
                Some(&mint(&state, &gateway)),
                sign_request(&gateway),
                &mut Record::default(),
            )
            .expect("signed");
    }

    fn mint(state: &State, id: &SpiffeId) -> String {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        state.loaded.load().authority.token_key().mint(id, now, 600)
    }

    #[test]
    fn an_intermediate_below_further_intermediates_serves_and_verifies_renewals() {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let ca_params = |cn: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, cn);
            p
        };
        let root =
            CertifiedIssuer::self_signed(ca_params("Org Root"), KeyPair::generate().unwrap())
                .unwrap();
        let org = CertifiedIssuer::signed_by(
            ca_params("Org Intermediate"),
            KeyPair::generate().unwrap(),
            &root,
        )
        .unwrap();
        let key = KeyPair::generate().unwrap();
        let ours = ca_params("Bulwark Intermediate")
            .signed_by(&key, &org)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        store::init(
            dir.path(),
            &store::Settings::new("cluster.local"),
            store::RootSource::ImportIntermediate {
                chain_pem: format!("{}{}", ours.pem(), org.pem()),
                key_pem: key.serialize_pem(),
                root_pem: root.pem(),
            },
        )
        .unwrap();

        let loaded = load(dir.path(), &[]).expect("the CA starts");
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        let issued = loaded
            .authority
            .sign(
                check_csr(&new_csr(&id).unwrap().1).unwrap(),
                &id,
                Some(Duration::from_secs(600)),
                OffsetDateTime::now_utc(),
            )
            .unwrap();
        let chain = CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        assert_eq!(chain.len(), 3, "leaf and both intermediates");
        let verified = loaded
            .bundle
            .verify(&chain[0], &chain[1..], UnixTime::now(), Usage::Client)
            .expect("a renewal chain verifies");
        assert_eq!(verified, id);
    }

    #[test]
    fn a_verified_chain_is_remembered_until_it_expires_and_only_for_itself() {
        let (certs, not_after) = chain();
        let cache = VerifiedChains::default();
        let key = VerifiedChains::key(&certs);
        let id: SpiffeId = "spiffe://cache.local/ns/default/sa/web".parse().unwrap();
        cache.put(key, id.clone(), &certs);
        assert_eq!(cache.get(&key, not_after - 1), Some(id));
        assert_eq!(cache.get(&key, not_after), None, "expired");
        // The leaf alone (another chain) is another key.
        assert_ne!(VerifiedChains::key(&certs[..1]), key);
        assert_eq!(
            cache.get(&VerifiedChains::key(&certs[..1]), not_after - 1),
            None
        );
    }
}
