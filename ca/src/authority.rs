//! CSR validation and leaf SVID signing.

use std::time::Duration;

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, ExtendedKeyUsagePurpose,
    IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::identity::SpiffeId;
use crate::store::{Material, StoreError};
use crate::token::TokenKey;

/// Largest CSR accepted, in bytes of PEM.
pub const MAX_CSR_PEM: usize = 16 * 1024;
/// How far `notBefore` is backdated to tolerate clock skew between nodes.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// Why a CSR was refused. All map to `InvalidArgument`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is larger than {MAX_CSR_PEM} bytes")]
    TooLarge,
    #[error("CSR is not a PEM `CERTIFICATE REQUEST`")]
    NotPem,
    #[error("CSR is malformed (not a PKCS#10 request)")]
    Malformed,
    #[error("CSR signature does not verify")]
    BadSignature,
    #[error(
        "CSR asks for an unsupported extension (only subjectAltName, keyUsage, extendedKeyUsage, basicConstraints are accepted)"
    )]
    UnsupportedExtension,
    #[error("CSR key type is not allowed: {0} (use ECDSA P-256, ECDSA P-384 or Ed25519)")]
    KeyType(String),
    #[error("CSR asks for a CA certificate; workloads get leaf certificates only")]
    CaRequested,
    #[error("CSR must carry exactly one URI SAN (the SPIFFE ID) and no other names; {0}")]
    Names(String),
    #[error("CSR's URI SAN is not a valid SPIFFE ID: {0}")]
    Identity(String),
}

/// Why signing was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error("CSR is for {csr} but the caller is authenticated as {authenticated}")]
    IdentityMismatch { csr: String, authenticated: String },
    #[error("{0} is reserved for the mesh's own services and is never issued through Sign")]
    Reserved(String),
    #[error("identity {0} is outside this CA's trust domain {1}")]
    ForeignTrustDomain(String, String),
    #[error("requested TTL {0}s is below the 60s minimum")]
    TtlTooShort(u64),
    #[error("issuing intermediate has expired (not after {0}); rotate the CA")]
    IssuerExpired(String),
    #[error("issuing intermediate is not yet valid (not before {0}); check the CA's clock")]
    IssuerNotYetValid(String),
    #[error("signing failed: {0}")]
    Internal(String),
}

/// A freshly issued SVID.
#[derive(Debug, Clone)]
pub struct Issued {
    pub identity: SpiffeId,
    /// Leaf then intermediate chain, PEM.
    pub chain_pem: String,
    pub bundle_pem: String,
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// A validated CSR.
pub struct CheckedCsr {
    pub identity: SpiffeId,
    csr: CertificateSigningRequestParams,
}

/// Validates a CSR and returns the SPIFFE ID it asks for.
pub fn check_csr(pem: &str) -> Result<CheckedCsr, CsrError> {
    use rustls_pki_types::CertificateSigningRequestDer;
    use rustls_pki_types::pem::PemObject;
    if pem.len() > MAX_CSR_PEM {
        return Err(CsrError::TooLarge);
    }
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| CsrError::NotPem)?;
    check_key_type(&der)?;
    let csr = CertificateSigningRequestParams::from_der(&der).map_err(|e| match e {
        rcgen::Error::InvalidCertificationRequestSignature => CsrError::BadSignature,
        rcgen::Error::UnsupportedExtension => CsrError::UnsupportedExtension,
        rcgen::Error::UnsupportedSignatureAlgorithm => {
            CsrError::KeyType("signature algorithm".into())
        }
        _ => CsrError::Malformed,
    })?;
    if matches!(csr.params.is_ca, IsCa::Ca(_)) {
        return Err(CsrError::CaRequested);
    }
    let mut uris = Vec::new();
    for san in &csr.params.subject_alt_names {
        match san {
            SanType::URI(u) => uris.push(u.as_str().to_string()),
            SanType::DnsName(d) => {
                return Err(CsrError::Names(format!("found DNS name {:?}", d.as_str())));
            }
            SanType::IpAddress(ip) => return Err(CsrError::Names(format!("found IP {ip}"))),
            SanType::Rfc822Name(e) => {
                return Err(CsrError::Names(format!("found email {:?}", e.as_str())));
            }
            other => return Err(CsrError::Names(format!("found {other:?}"))),
        }
    }
    let identity = match uris.as_slice() {
        [one] => one
            .parse::<SpiffeId>()
            .map_err(|e| CsrError::Identity(e.to_string()))?,
        [] => return Err(CsrError::Names("found none".into())),
        more => return Err(CsrError::Names(format!("found {} URI SANs", more.len()))),
    };
    Ok(CheckedCsr { identity, csr })
}

fn check_key_type(der: &[u8]) -> Result<(), CsrError> {
    use x509_parser::prelude::FromDer;
    let (_, req) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
        .map_err(|_| CsrError::Malformed)?;
    let spki = &req.certification_request_info.subject_pki;
    let alg = spki.algorithm.algorithm.to_id_string();
    match alg.as_str() {
        // id-ecPublicKey: the curve is the parameter.
        "1.2.840.10045.2.1" => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            match curve.as_str() {
                "1.2.840.10045.3.1.7" | "1.3.132.0.34" => Ok(()),
                other => Err(CsrError::KeyType(format!("EC curve {other}"))),
            }
        }
        "1.3.101.112" => Ok(()),
        "1.2.840.113549.1.1.1" => Err(CsrError::KeyType("RSA".into())),
        other => Err(CsrError::KeyType(other.to_string())),
    }
}

/// The online signer: intermediate key and chain, trust bundle, settings.
pub struct Authority {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    chain_pem: String,
    bundle_pem: String,
    issuer_not_before: OffsetDateTime,
    issuer_not_after: OffsetDateTime,
    default_ttl: Duration,
    max_ttl: Duration,
    token_key: TokenKey,
}

impl Authority {
    pub fn from_material(m: Material) -> Result<Self, StoreError> {
        let inter = &m.chain[0];
        let (nb, na) = validity(inter).map_err(|what| StoreError::Invalid {
            path: crate::store::INTERMEDIATE_CERT.into(),
            what,
        })?;
        let issuer = Issuer::from_ca_cert_der(inter, m.intermediate_key).map_err(|e| {
            StoreError::Invalid {
                path: crate::store::INTERMEDIATE_CERT.into(),
                what: e.to_string(),
            }
        })?;
        Ok(Self {
            trust_domain: m.settings.trust_domain.clone(),
            issuer,
            chain_pem: m.chain_pem,
            bundle_pem: m.bundle_pem,
            issuer_not_before: nb,
            issuer_not_after: na,
            default_ttl: Duration::from_secs(m.settings.default_ttl_secs),
            max_ttl: Duration::from_secs(m.settings.max_ttl_secs),
            token_key: TokenKey::from_bytes(&m.token_secret),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }
    pub fn token_key(&self) -> &TokenKey {
        &self.token_key
    }
    pub fn issuer_not_after(&self) -> OffsetDateTime {
        self.issuer_not_after
    }
    pub fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }
    pub fn chain_pem(&self) -> &str {
        &self.chain_pem
    }

    /// Issues a server certificate for one of the mesh's own services (the
    /// CA, the control plane), in memory, with a fresh key: the URI SAN `id`
    /// plus `localhost`, 127.0.0.1 and `dns_names`. Returns it with the time
    /// it should be replaced (half its life).
    pub fn serving_certificate(
        &self,
        id: &SpiffeId,
        dns_names: &[String],
    ) -> Result<
        (
            std::sync::Arc<rustls::sign::CertifiedKey>,
            std::time::SystemTime,
        ),
        String,
    > {
        use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(
            id.to_string()
                .try_into()
                .map_err(|e: rcgen::Error| e.to_string())?,
        )];
        for n in std::iter::once("localhost").chain(dns_names.iter().map(String::as_str)) {
            p.subject_alt_names.push(SanType::DnsName(
                n.to_string()
                    .try_into()
                    .map_err(|e: rcgen::Error| e.to_string())?,
            ));
        }
        p.subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.serial_number = Some(crate::random_serial());
        p.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        p.not_before = (now - BACKDATE).max(self.issuer_not_before);
        p.not_after = (now + Duration::from_secs(24 * 3600)).min(self.issuer_not_after);
        let lifetime = (p.not_after - now).whole_seconds().max(0) as u64;
        let cert = p.signed_by(&key, &self.issuer).map_err(|e| e.to_string())?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(
            rustls_pki_types::pem::PemObject::pem_slice_iter(self.chain_pem.as_bytes())
                .filter_map(Result::ok)
                .map(|c: CertificateDer<'static>| c),
        );
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer = crate::tls::provider()
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| e.to_string())?;
        Ok((
            std::sync::Arc::new(rustls::sign::CertifiedKey::new(chain, signer)),
            std::time::SystemTime::now() + Duration::from_secs(lifetime / 2),
        ))
    }

    /// Signs `csr` for a caller authenticated as `authenticated`.
    pub fn sign(
        &self,
        csr: CheckedCsr,
        authenticated: &SpiffeId,
        requested_ttl: Option<Duration>,
        now: OffsetDateTime,
    ) -> Result<Issued, SignError> {
        if csr.identity != *authenticated {
            return Err(SignError::IdentityMismatch {
                csr: csr.identity.to_string(),
                authenticated: authenticated.to_string(),
            });
        }
        if csr.identity.is_reserved() {
            return Err(SignError::Reserved(csr.identity.to_string()));
        }
        if csr.identity.trust_domain() != self.trust_domain {
            return Err(SignError::ForeignTrustDomain(
                csr.identity.to_string(),
                self.trust_domain.clone(),
            ));
        }
        if now >= self.issuer_not_after {
            return Err(SignError::IssuerExpired(self.issuer_not_after.to_string()));
        }
        if now < self.issuer_not_before {
            return Err(SignError::IssuerNotYetValid(
                self.issuer_not_before.to_string(),
            ));
        }
        let ttl = match requested_ttl {
            Some(t) if t < Duration::from_secs(60) => {
                return Err(SignError::TtlTooShort(t.as_secs()));
            }
            Some(t) => t.min(self.max_ttl),
            None => self.default_ttl,
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = csr.csr.params.subject_alt_names.clone();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let serial = crate::random_serial();
        let serial_hex = crate::token::hex(serial.as_ref());
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        // Never outlive the issuer, never start before it.
        params.not_before = (now - BACKDATE).max(self.issuer_not_before);
        params.not_after = (now + ttl).min(self.issuer_not_after);
        let (not_before, not_after) = (params.not_before, params.not_after);
        let req = CertificateSigningRequestParams {
            params,
            public_key: csr.csr.public_key,
        };
        let leaf = req
            .signed_by(&self.issuer)
            .map_err(|e| SignError::Internal(e.to_string()))?;
        let mut chain_pem = leaf.pem();
        chain_pem.push_str(&self.chain_pem);
        Ok(Issued {
            identity: csr.identity,
            chain_pem,
            bundle_pem: self.bundle_pem.clone(),
            serial: serial_hex,
            not_before,
            not_after,
        })
    }
}

/// notBefore/notAfter of a certificate.
pub fn validity(der: &CertificateDer<'_>) -> Result<(OffsetDateTime, OffsetDateTime), String> {
    let (_, c) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    Ok((
        c.validity().not_before.to_datetime(),
        c.validity().not_after.to_datetime(),
    ))
}
