//! `CaClient`: how a workload gets and renews its SVID. The private key is
//! generated here, in memory, and never leaves the process.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bulwark_proto::ca::v1::SignRequest;
use bulwark_proto::ca::v1::certificate_service_client::CertificateServiceClient;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tonic::Code;

use crate::identity::SpiffeId;
use crate::server::{RETRY_AFTER_MS, ca_identity};
use crate::tls::{ExpectedServer, SpiffeServerVerifier, TrustBundle};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the CA at {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("CA refused the request ({code:?}): {message}")]
    Refused { code: Code, message: String },
    #[error("CA is busy and the retry deadline passed: {0}")]
    Exhausted(String),
    #[error("CA returned an unusable response: {0}")]
    BadResponse(String),
    #[error("key or CSR generation failed: {0}")]
    Local(String),
}

impl ClientError {
    /// Whether trying again later can help.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::Exhausted(_) => true,
            ClientError::Refused { code, .. } => matches!(
                code,
                Code::Unavailable
                    | Code::ResourceExhausted
                    | Code::DeadlineExceeded
                    | Code::Internal
                    | Code::Unknown
                    | Code::FailedPrecondition
            ),
            _ => false,
        }
    }
}

/// A workload's X.509 SVID with its in-memory key.
#[derive(Clone)]
pub struct Svid {
    pub identity: SpiffeId,
    key: Arc<KeyPair>,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub chain_pem: String,
    pub bundle_pem: String,
    pub bundle: TrustBundle,
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Svid {
    /// Assembles an SVID from PEM parts (e.g. files written by
    /// `bulwark cert request`). The chain's leaf must carry `identity` and
    /// belong to the key; the chain is not verified here.
    pub fn from_pem_parts(
        key_pem: &str,
        chain_pem: &str,
        bundle_pem: &str,
    ) -> Result<Self, ClientError> {
        let bad = |m: String| ClientError::BadResponse(m);
        let key = KeyPair::from_pem(key_pem).map_err(|e| bad(format!("key: {e}")))?;
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("certificate chain: {e}")))?;
        let leaf = chain
            .first()
            .ok_or_else(|| bad("empty certificate chain".into()))?;
        let identity = crate::tls::spiffe_id_of(leaf).map_err(|e| bad(e.to_string()))?;
        let (nb, na) = crate::authority::validity(leaf).map_err(bad)?;
        let bundle = TrustBundle::from_pem(bundle_pem).map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            identity,
            key: Arc::new(key),
            chain,
            chain_pem: chain_pem.to_string(),
            bundle_pem: bundle_pem.to_string(),
            bundle,
            serial: String::new(),
            not_before: nb.unix_timestamp(),
            not_after: na.unix_timestamp(),
        })
    }

    /// The private key, PKCS#8 PEM (for `bulwark cert request`).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }

    /// rustls' form of the certificate and key, for client and server configs.
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>, rustls::Error> {
        let signer = crate::tls::provider()
            .key_provider
            .load_private_key(self.key_der())?;
        Ok(Arc::new(CertifiedKey::new(self.chain.clone(), signer)))
    }

    /// Seconds of validity left at `now` (Unix seconds).
    pub fn remaining(&self, now: i64) -> i64 {
        self.not_after - now
    }
}

/// How the client proves who it is.
pub enum Credential<'a> {
    /// A bootstrap token from `bulwark ca token`.
    Token(&'a str),
    /// The current SVID, presented as a TLS client certificate; optionally
    /// with the token as a fallback should the SVID have expired.
    Svid(&'a Svid, Option<&'a str>),
}

/// Makes a fresh key pair and a CSR carrying `identity` as its one URI SAN.
pub fn new_csr(identity: &SpiffeId) -> Result<(KeyPair, String), ClientError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| ClientError::Local(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names =
        vec![SanType::URI(identity.to_string().try_into().map_err(
            |e: rcgen::Error| ClientError::Local(e.to_string()),
        )?)];
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| ClientError::Local(e.to_string()))?;
    Ok((key, csr))
}

/// Client of the CA's `CertificateService`.
#[derive(Clone)]
pub struct CaClient {
    addr: String,
    bundle: Arc<ArcSwap<TrustBundle>>,
    /// Give up retrying busy/unreachable CAs after this long.
    pub retry_deadline: Duration,
    pub connect_timeout: Duration,
    /// The identity the CA's certificate must carry; by default the CA
    /// identity of the requested identity's trust domain.
    pub ca_identity: Option<SpiffeId>,
    /// `SO_MARK` for the connections to the CA (0: none). A sidecar sets its
    /// proxy mark, so its pod's interception rules let them through.
    pub socket_mark: u32,
}

impl CaClient {
    /// `addr` is `host:port`; `bundle` holds the roots the CA's certificate
    /// must chain to (kept up to date with each response).
    pub fn new(addr: impl Into<String>, bundle: TrustBundle) -> Self {
        Self {
            addr: addr.into(),
            bundle: Arc::new(ArcSwap::from_pointee(bundle)),
            retry_deadline: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            ca_identity: None,
            socket_mark: 0,
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Trusts `bundle` for the CA's certificate from now on.
    pub fn set_bundle(&self, bundle: TrustBundle) {
        self.bundle.store(Arc::new(bundle));
    }

    async fn connect(
        &self,
        identity: &SpiffeId,
        client_cert: Option<Arc<CertifiedKey>>,
    ) -> Result<CertificateServiceClient<tonic::transport::Channel>, ClientError> {
        let verifier = SpiffeServerVerifier::new(
            self.bundle.clone(),
            ExpectedServer::AnyOf(vec![
                self.ca_identity
                    .clone()
                    .unwrap_or_else(|| ca_identity(identity.trust_domain())),
            ]),
        );
        let builder = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Local(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let mut cfg = match client_cert {
            Some(ck) => {
                builder.with_client_cert_resolver(Arc::new(crate::tls::CurrentCert::new(ck)))
            }
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let cfg = Arc::new(cfg);
        let addr = self.addr.clone();
        let host = addr
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
            .unwrap_or_else(|| addr.clone());
        let server_name = ServerName::try_from(host)
            .unwrap_or_else(|_| ServerName::try_from("bulwark-ca").expect("static name"));
        let mark = self.socket_mark;
        let connector = tower::service_fn(move |_uri: http::Uri| {
            let cfg = cfg.clone();
            let addr = addr.clone();
            let server_name = server_name.clone();
            async move {
                let tcp = dial(addr.as_str(), mark).await?;
                let tls = tokio_rustls::TlsConnector::from(cfg)
                    .connect(server_name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        let channel = tonic::transport::Endpoint::from_static("http://bulwark-ca")
            .connect_timeout(self.connect_timeout)
            .timeout(Duration::from_secs(15))
            .connect_with_connector(connector)
            .await
            .map_err(|e| ClientError::Connect {
                addr: self.addr.clone(),
                message: error_chain(&e),
            })?;
        Ok(CertificateServiceClient::new(channel)
            .max_decoding_message_size(crate::server::MAX_MESSAGE))
    }

    /// One Sign call on a new connection, no retries.
    pub async fn sign_once(
        &self,
        identity: &SpiffeId,
        csr_pem: &str,
        cred: &Credential<'_>,
        ttl: Option<Duration>,
    ) -> Result<bulwark_proto::ca::v1::SignResponse, (ClientError, Option<Duration>)> {
        let mut session = self.session(identity, cred).await.map_err(|e| (e, None))?;
        session.sign(csr_pem, ttl).await
    }

    /// A connection authenticated with `cred`, for one or more Sign calls
    /// (a sidecar renews on a new connection each time: renewals are hours
    /// apart; an agent signing for many workloads can keep one).
    pub async fn session(
        &self,
        identity: &SpiffeId,
        cred: &Credential<'_>,
    ) -> Result<Session, ClientError> {
        let (cert, token) = match cred {
            Credential::Token(t) => (None, Some(*t)),
            Credential::Svid(s, t) => (
                Some(
                    s.certified_key()
                        .map_err(|e| ClientError::Local(e.to_string()))?,
                ),
                *t,
            ),
        };
        let authorization = token
            .map(|t| {
                format!("Bearer {}", t.trim())
                    .parse()
                    .map_err(|_| ClientError::Local("token is not valid ASCII".into()))
            })
            .transpose()?;
        Ok(Session {
            client: self.connect(identity, cert).await?,
            authorization,
            addr: self.addr.clone(),
        })
    }

    /// Gets an SVID for `identity`: new key, CSR, Sign. Retries a busy or
    /// unreachable CA (honouring its retry-after hint, with jitter) until
    /// `retry_deadline`; permanent refusals return at once.
    pub async fn issue(
        &self,
        identity: &SpiffeId,
        cred: Credential<'_>,
        ttl: Option<Duration>,
    ) -> Result<Svid, ClientError> {
        let (key, csr) = new_csr(identity)?;
        let deadline = tokio::time::Instant::now() + self.retry_deadline;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let resp = loop {
            match self.sign_once(identity, &csr, &cred, ttl).await {
                Ok(r) => break r,
                Err((e, hint)) if e.is_transient() => {
                    let wait = match hint {
                        Some(h) => jitter(h, 0.5),
                        None => backoff.next_delay(),
                    };
                    if tokio::time::Instant::now() + wait > deadline {
                        return Err(match e {
                            ClientError::Refused { message, .. } => ClientError::Exhausted(message),
                            other => other,
                        });
                    }
                    tracing::debug!(error = %e, wait_ms = wait.as_millis() as u64, "CA busy or unreachable; retrying");
                    tokio::time::sleep(wait).await;
                }
                Err((e, _)) => return Err(e),
            }
        };
        let svid = svid_from_response(identity, key, resp)?;
        self.set_bundle(svid.bundle.clone());
        Ok(svid)
    }
}

fn svid_from_response(
    identity: &SpiffeId,
    key: KeyPair,
    resp: bulwark_proto::ca::v1::SignResponse,
) -> Result<Svid, ClientError> {
    let bad = |m: String| ClientError::BadResponse(m);
    let chain = CertificateDer::pem_slice_iter(resp.cert_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("certificate chain: {e}")))?;
    let leaf = chain
        .first()
        .ok_or_else(|| bad("empty certificate chain".into()))?;
    let got = crate::tls::spiffe_id_of(leaf).map_err(|e| bad(e.to_string()))?;
    if &got != identity {
        return Err(bad(format!("CA issued {got}, asked for {identity}")));
    }
    let bundle = TrustBundle::from_pem(&resp.trust_bundle_pem).map_err(|e| bad(e.to_string()))?;
    // The issued chain must verify against the bundle that came with it,
    // or the workload would be unable to prove itself to anyone.
    bundle
        .verify(
            leaf,
            &chain[1..],
            rustls_pki_types::UnixTime::now(),
            crate::tls::Usage::Client,
        )
        .map_err(|e| bad(format!("issued certificate does not verify: {e}")))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|e| bad(e.to_string()))?;
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(bad("issued certificate is not for our key".into()));
    }
    Ok(Svid {
        identity: identity.clone(),
        key: Arc::new(key),
        chain,
        chain_pem: resp.cert_chain_pem,
        bundle_pem: resp.trust_bundle_pem,
        bundle,
        serial: resp.serial,
        not_before: resp.not_before,
        not_after: resp.not_after,
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `d` stretched by a random factor in `[1, 1 + spread]`.
pub fn jitter(d: Duration, spread: f64) -> Duration {
    let r: [u8; 4] = crate::random_bytes();
    let f = f64::from(u32::from_le_bytes(r)) / f64::from(u32::MAX);
    d.mul_f64(1.0 + spread * f)
}

/// Capped exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
    pub fn next_delay(&mut self) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // Between half and all of the capped delay: spreads a fleet out
        // without ever retrying immediately.
        let half = exp / 2;
        half + jitter(half, 1.0).saturating_sub(half)
    }
}

/// Connects to `addr` (`"host:port"`, `(host, port)`, ...), trying each
/// address it resolves to in turn, from sockets carrying `mark` (see
/// [`connect_marked`]).
pub async fn dial(
    addr: impl tokio::net::ToSocketAddrs,
    mark: u32,
) -> std::io::Result<tokio::net::TcpStream> {
    let mut last = None;
    for sa in tokio::net::lookup_host(addr).await? {
        match connect_marked(sa, mark).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "resolves to no address")
    }))
}

/// Opens a TCP connection (`TCP_NODELAY`) to `addr` from a socket carrying
/// `mark` (`SO_MARK`; 0 sets none), so that a pod's interception rules let
/// the proxy's own connections through. Setting a mark needs CAP_NET_ADMIN:
/// without it the socket goes unmarked (warned once), and the uid exclusion
/// (`bulwark init --proxy-uid`) is what keeps it out of the proxy.
pub async fn connect_marked(
    addr: std::net::SocketAddr,
    mark: u32,
) -> std::io::Result<tokio::net::TcpStream> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if mark != 0
        && let Err(e) = sock.set_mark(mark)
    {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| tracing::warn!(error = %e, "cannot set SO_MARK on proxy sockets; relying on the uid exclusion"));
    }
    sock.set_nonblocking(true)?;
    sock.set_tcp_nodelay(true)?;
    let std_stream: std::net::TcpStream = sock.into();
    tokio::net::TcpSocket::from_std_stream(std_stream)
        .connect(addr)
        .await
}

/// An open connection to the CA (see [`CaClient::session`]).
pub struct Session {
    client: CertificateServiceClient<tonic::transport::Channel>,
    authorization: Option<tonic::metadata::AsciiMetadataValue>,
    addr: String,
}

impl Session {
    /// One Sign call, no retries. On refusal, the CA's retry-after hint.
    pub async fn sign(
        &mut self,
        csr_pem: &str,
        ttl: Option<Duration>,
    ) -> Result<bulwark_proto::ca::v1::SignResponse, (ClientError, Option<Duration>)> {
        let mut req = tonic::Request::new(SignRequest {
            csr_pem: csr_pem.to_string(),
            requested_ttl_seconds: ttl.map(|t| t.as_secs()).unwrap_or(0),
        });
        if let Some(v) = &self.authorization {
            req.metadata_mut().insert("authorization", v.clone());
        }
        self.client
            .sign(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| {
                let hint = s
                    .metadata()
                    .get(RETRY_AFTER_MS)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(Duration::from_millis);
                let err = if s.code() == Code::Unavailable {
                    ClientError::Connect {
                        addr: self.addr.clone(),
                        message: s.message().to_string(),
                    }
                } else {
                    ClientError::Refused {
                        code: s.code(),
                        message: s.message().to_string(),
                    }
                };
                (err, hint)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let d0 = b.next_delay();
        assert!(d0 >= Duration::from_millis(50) && d0 <= Duration::from_millis(100));
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(2));
        }
        let d = b.next_delay();
        assert!(d >= Duration::from_secs(1));
    }
}
