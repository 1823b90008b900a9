//! SPIFFE-aware certificate verification for rustls.
//!
//! SVIDs carry their identity in one URI SAN and no DNS names, so the usual
//! hostname check does not apply. These verifiers check the chain to the
//! trust bundle with webpki (signatures, validity, EKU) and then compare the
//! SPIFFE ID against what the caller expects. Handshake signatures are checked
//! with the aws-lc-rs provider's algorithms.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};

use crate::identity::SpiffeId;

/// ALPN protocol spoken between Bulwark sidecars for opaque TCP tunnels.
pub const ALPN_MESH_TCP: &[u8] = b"bulwark/tcp1";

/// The process-wide crypto provider (aws-lc-rs). Installing it is idempotent.
pub fn provider() -> Arc<CryptoProvider> {
    if let Some(p) = CryptoProvider::get_default() {
        return p.clone();
    }
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    CryptoProvider::get_default()
        .expect("crypto provider installed")
        .clone()
}

/// Turns off session resumption on a server that authenticates clients by
/// certificate. A resumed session restores the client's chain as it was when
/// the session began, without verifying it again: an expired or no longer
/// trusted certificate would pass for the ticket's lifetime.
pub fn without_resumption_server(cfg: &mut rustls::ServerConfig) {
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
}

/// Turns off session resumption on a client that authenticates servers by
/// certificate, for the same reason as [`without_resumption_server`].
pub fn without_resumption_client(cfg: &mut rustls::ClientConfig) {
    cfg.resumption = rustls::client::Resumption::disabled();
}

/// Why a peer certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("certificate chain does not verify against the trust bundle: {0}")]
    Chain(String),
    #[error("certificate has expired")]
    Expired,
    #[error("certificate is not yet valid")]
    NotYetValid,
    #[error("certificate is not signed by a trusted root (unknown issuer)")]
    UnknownIssuer,
    #[error("certificate carries no valid SPIFFE ID: {0}")]
    NoSpiffeId(String),
    #[error("peer identity {actual} is not the expected {expected}")]
    WrongIdentity { expected: String, actual: String },
}

impl From<VerifyError> for rustls::Error {
    fn from(e: VerifyError) -> Self {
        let ce = match e {
            VerifyError::Expired => CertificateError::Expired,
            VerifyError::NotYetValid => CertificateError::NotValidYet,
            VerifyError::UnknownIssuer => CertificateError::UnknownIssuer,
            // Keep our message: "peer identity X is not the expected Y".
            other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
        };
        rustls::Error::InvalidCertificate(ce)
    }
}

/// The trust bundle: every root the mesh trusts now. Swapped whole on rotation.
#[derive(Clone, Default)]
pub struct TrustBundle {
    anchors: Vec<TrustAnchor<'static>>,
    ders: Vec<CertificateDer<'static>>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustBundle({} roots)", self.ders.len())
    }
}

impl TrustBundle {
    pub fn from_pem(pem: &str) -> Result<Self, VerifyError> {
        use rustls_pki_types::pem::PemObject;
        let ders = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| VerifyError::Chain(format!("bad PEM in trust bundle: {e}")))?;
        Self::from_ders(ders)
    }

    pub fn from_ders(ders: Vec<CertificateDer<'static>>) -> Result<Self, VerifyError> {
        if ders.is_empty() {
            return Err(VerifyError::Chain("trust bundle is empty".into()));
        }
        let anchors = ders
            .iter()
            .map(|d| {
                webpki::anchor_from_trusted_cert(d)
                    .map(|a| a.to_owned())
                    .map_err(|e| VerifyError::Chain(format!("bad root in trust bundle: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { anchors, ders })
    }

    /// The bundle, plus `issuer` (an intermediate CA certificate whose key
    /// the caller holds) as a trust anchor: chains it signed then verify with
    /// one signature check instead of two. Only for the CA itself, and only
    /// for an issuer whose own issuer is one of the bundle's roots.
    pub fn with_own_issuer(mut self, issuer: &CertificateDer<'_>) -> Result<Self, VerifyError> {
        let anchor = webpki::anchor_from_trusted_cert(issuer)
            .map_err(|e| VerifyError::Chain(format!("bad issuer certificate: {e}")))?
            .to_owned();
        fn parse(der: &[u8]) -> Result<x509_parser::certificate::X509Certificate<'_>, VerifyError> {
            x509_parser::parse_x509_certificate(der)
                .map(|(_, c)| c)
                .map_err(|e| VerifyError::Chain(format!("bad certificate: {e}")))
        }
        let issued = parse(issuer)?;
        let mut chains = false;
        for root in &self.ders {
            chains |= parse(root)?.subject().as_raw() == issued.issuer().as_raw();
        }
        if !chains {
            return Err(VerifyError::Chain(
                "the issuer certificate does not chain to a root of the trust bundle".into(),
            ));
        }
        self.anchors.push(anchor);
        Ok(self)
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.ders
    }

    /// Verifies `chain` (leaf first) for the given usage at `now` and returns
    /// the leaf's SPIFFE ID.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: Usage,
    ) -> Result<SpiffeId, VerifyError> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| VerifyError::Chain(e.to_string()))?;
        let algs = provider().signature_verification_algorithms.all;
        let eku = match usage {
            Usage::Server => webpki::KeyUsage::server_auth(),
            Usage::Client => webpki::KeyUsage::client_auth(),
        };
        cert.verify_for_usage(algs, &self.anchors, intermediates, now, eku, None, None)
            .map_err(|e| match e {
                webpki::Error::CertExpired { .. } => VerifyError::Expired,
                webpki::Error::CertNotValidYet { .. } => VerifyError::NotYetValid,
                webpki::Error::UnknownIssuer => VerifyError::UnknownIssuer,
                other => VerifyError::Chain(other.to_string()),
            })?;
        spiffe_id_of(end_entity)
    }
}

/// Which extended key usage a chain must allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

/// SHA-256 of a certificate's DER, lowercase hex: how roots are named when
/// the CA asks the control plane whether a bundle has reached everyone.
pub fn fingerprint(der: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// When a connection authenticated by `chain` stops being so: the earliest
/// notAfter of its certificates, in Unix seconds (`None` if none parses).
pub fn chain_not_after(chain: &[CertificateDer<'_>]) -> Option<i64> {
    chain
        .iter()
        .filter_map(|c| x509_parser::parse_x509_certificate(c).ok())
        .map(|(_, c)| c.validity().not_after.timestamp())
        .min()
}

/// Extracts the one SPIFFE ID from a certificate's URI SANs.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, VerifyError> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| VerifyError::NoSpiffeId(format!("unparseable certificate: {e}")))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| VerifyError::NoSpiffeId(e.to_string()))?
        .ok_or_else(|| VerifyError::NoSpiffeId("no subjectAltName".into()))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => one
            .parse()
            .map_err(|e: crate::identity::IdentityError| VerifyError::NoSpiffeId(e.to_string())),
        [] => Err(VerifyError::NoSpiffeId("no URI SAN".into())),
        _ => Err(VerifyError::NoSpiffeId("more than one URI SAN".into())),
    }
}

fn tls_schemes() -> Vec<SignatureScheme> {
    provider()
        .signature_verification_algorithms
        .supported_schemes()
}

/// The handshake-signature half of a verifier: the same for all of ours
/// (the provider's algorithms), so written once.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &provider().signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &provider().signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            tls_schemes()
        }
    };
}

/// Which server identities a client accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedServer {
    /// Exactly these SPIFFE IDs (the endpoint's identity from config).
    AnyOf(Vec<SpiffeId>),
    /// Any identity in the trust domain (used towards the CA before the
    /// workload knows the control plane's identity).
    TrustDomain(String),
}

/// Client-side verifier: chain to the live trust bundle, then the SPIFFE ID.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: Arc<ArcSwap<TrustBundle>>,
    expected: ExpectedServer,
}

impl SpiffeServerVerifier {
    pub fn new(bundle: Arc<ArcSwap<TrustBundle>>, expected: ExpectedServer) -> Self {
        Self { bundle, expected }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self
            .bundle
            .load()
            .verify(end_entity, intermediates, now, Usage::Server)?;
        let ok = match &self.expected {
            ExpectedServer::AnyOf(ids) => ids.contains(&id),
            ExpectedServer::TrustDomain(td) => id.trust_domain() == td,
        };
        if !ok {
            let expected = match &self.expected {
                ExpectedServer::AnyOf(ids) => ids
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(" or "),
                ExpectedServer::TrustDomain(td) => format!("an identity in {td}"),
            };
            tracing::warn!(actual = %id, %expected, "peer presented an unexpected SPIFFE ID");
            return Err(VerifyError::WrongIdentity {
                expected,
                actual: id.to_string(),
            }
            .into());
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

/// Server-side verifier for mesh peers: the client must present a chain to
/// the live trust bundle with a SPIFFE ID. Authorization of that ID happens
/// after the handshake, where the policy is known.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: Arc<ArcSwap<TrustBundle>>,
    mandatory: bool,
}

impl SpiffeClientVerifier {
    /// `mandatory = false` lets clients without a certificate finish the
    /// handshake (the caller then decides, e.g. bootstrap-token auth).
    pub fn new(bundle: Arc<ArcSwap<TrustBundle>>, mandatory: bool) -> Self {
        Self { bundle, mandatory }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.bundle
            .load()
            .verify(end_entity, intermediates, now, Usage::Client)
            .inspect_err(|e| tracing::debug!(error = %e, "client certificate refused"))?;
        Ok(ClientCertVerified::assertion())
    }
    handshake_signatures!();
}

/// Accepts any client certificate whose handshake signature is valid, and
/// defers chain verification to the application. The CA uses this so that an
/// expired or foreign renewal certificate gets a precise gRPC error and an
/// entry in the issuance record instead of an opaque TLS alert.
#[derive(Debug, Default)]
pub struct DeferredClientVerifier;

impl ClientCertVerifier for DeferredClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }
    handshake_signatures!();
}

/// The workload's current certificate, swapped whole on rotation. New
/// handshakes pick up the new one; established connections keep theirs.
#[derive(Debug, Clone, Default)]
pub struct CurrentCert(Arc<ArcSwap<Option<Arc<rustls::sign::CertifiedKey>>>>);

impl CurrentCert {
    pub fn new(ck: Arc<rustls::sign::CertifiedKey>) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(Some(ck))))
    }
    pub fn set(&self, ck: Arc<rustls::sign::CertifiedKey>) {
        self.0.store(Arc::new(Some(ck)));
    }
    pub fn get(&self) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.load().as_ref().clone()
    }
}

impl rustls::client::ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.get()
    }
    fn has_certs(&self) -> bool {
        self.0.load().is_some()
    }
}

impl rustls::server::ResolvesServerCert for CurrentCert {
    fn resolve(
        &self,
        _client_hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.get()
    }
}
