//! Bootstrap in Kubernetes: a pod proves who it is with its projected
//! ServiceAccount token (a JWT with audience `bulwark-ca`), which the CA
//! checks with the TokenReview API (`POST
//! /apis/authentication.k8s.io/v1/tokenreviews`) using its own in-cluster
//! credentials. `system:serviceaccount:<ns>:<sa>` becomes
//! `spiffe://<td>/ns/<ns>/sa/<sa>`.
//!
//! One request per review, over a fresh connection (HTTPS with the
//! cluster's CA, or plain HTTP for tests), bounded in time and size: bootstrap
//! is rare (renewals go over mTLS) and rate limited by the CA's admission
//! control anyway.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use serde_json::{Value, json};

use crate::identity::SpiffeId;

/// The audience projected tokens must carry for the CA.
pub const DEFAULT_AUDIENCE: &str = "bulwark-ca";
/// A review that takes longer fails (the pod retries its bootstrap).
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest TokenReview response read.
const MAX_RESPONSE: usize = 64 * 1024;

/// Where and how to reach the API server.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// `https://kubernetes.default.svc` (or `http://...` for tests).
    pub api: String,
    /// The CA's own ServiceAccount token (re-read on every review: the
    /// kubelet rotates it).
    pub token_file: Option<PathBuf>,
    /// The cluster CA certificate(s), PEM, for an `https` API.
    pub ca_file: Option<PathBuf>,
    pub audience: String,
}

impl KubeOptions {
    pub fn new(api: impl Into<String>) -> Self {
        Self {
            api: api.into(),
            token_file: None,
            ca_file: None,
            audience: DEFAULT_AUDIENCE.into(),
        }
    }
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    #[error("the Kubernetes API rejected the ServiceAccount token: {0}")]
    Rejected(String),
    #[error(
        "the ServiceAccount token is not for audience {expected:?} (project it with audience: {expected})"
    )]
    WrongAudience { expected: String },
    #[error("the token's user {0:?} is not a ServiceAccount")]
    NotServiceAccount(String),
    #[error("cannot check the ServiceAccount token: Kubernetes API unreachable: {0}")]
    Unreachable(String),
    #[error("cannot check the ServiceAccount token: Kubernetes API answered {0}")]
    Api(String),
    #[error("ServiceAccount {0:?} does not make a valid SPIFFE ID: {1}")]
    Identity(String, String),
}

impl ReviewError {
    /// The label for `bulwark_ca_sign_errors_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            ReviewError::Unreachable(_) | ReviewError::Api(_) => "token_review_failed",
            _ => "bad_token",
        }
    }
}

/// Whether `token` looks like a JWT (three base64url parts), i.e. a
/// Kubernetes token rather than a `bwt1.` bootstrap token.
pub fn is_jwt(token: &str) -> bool {
    let parts: Vec<&str> = token.trim().split('.').collect();
    parts.len() == 3
        && parts[0].starts_with("eyJ")
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Checks tokens with the TokenReview API.
pub struct TokenReviewer {
    opts: KubeOptions,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("api", &self.opts.api)
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    /// Reads the cluster CA (for `https`); fails with a message naming the
    /// flag at fault.
    pub fn new(opts: KubeOptions) -> Result<Self, String> {
        let uri: http::Uri = opts
            .api
            .parse()
            .map_err(|e| format!("--kube-api {:?}: {e}", opts.api))?;
        let tls = match uri.scheme_str() {
            Some("https") => {
                let mut roots = rustls::RootCertStore::empty();
                if let Some(path) = &opts.ca_file {
                    use rustls_pki_types::CertificateDer;
                    use rustls_pki_types::pem::PemObject;
                    let pem = std::fs::read(path)
                        .map_err(|e| format!("--kube-ca-file {}: {e}", path.display()))?;
                    for c in CertificateDer::pem_slice_iter(&pem) {
                        let c = c.map_err(|e| format!("--kube-ca-file {}: {e}", path.display()))?;
                        roots
                            .add(c)
                            .map_err(|e| format!("--kube-ca-file {}: {e}", path.display()))?;
                    }
                }
                if roots.is_empty() {
                    return Err("--kube-api is https: --kube-ca-file must hold the cluster's CA certificate".into());
                }
                let cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Some(Arc::new(cfg))
            }
            Some("http") => None,
            _ => return Err(format!("--kube-api {:?}: use an http(s):// URL", opts.api)),
        };
        if uri.host().is_none() {
            return Err(format!("--kube-api {:?} has no host", opts.api));
        }
        Ok(Self { opts, tls })
    }

    pub fn audience(&self) -> &str {
        &self.opts.audience
    }

    /// Reviews `token`; on success, the ServiceAccount's SPIFFE ID in
    /// `trust_domain`.
    pub async fn review(&self, token: &str, trust_domain: &str) -> Result<SpiffeId, ReviewError> {
        let status = tokio::time::timeout(REVIEW_TIMEOUT, self.call(token))
            .await
            .map_err(|_| {
                ReviewError::Unreachable(format!("no answer within {REVIEW_TIMEOUT:?}"))
            })??;
        if status.get("authenticated").and_then(Value::as_bool) != Some(true) {
            let why = status
                .get("error")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .unwrap_or("not authenticated");
            return Err(ReviewError::Rejected(why.to_string()));
        }
        // The API returns the audiences the token was accepted for: the
        // intersection with ours. Missing means it did not check them.
        let audiences = status
            .get("audiences")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if !audiences.iter().any(|a| a == self.opts.audience.as_str()) {
            return Err(ReviewError::WrongAudience {
                expected: self.opts.audience.clone(),
            });
        }
        let user = status
            .pointer("/user/username")
            .and_then(Value::as_str)
            .unwrap_or("");
        let Some((ns, sa)) = user
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
        else {
            return Err(ReviewError::NotServiceAccount(user.to_string()));
        };
        SpiffeId::new(trust_domain, ns, sa)
            .map_err(|e| ReviewError::Identity(user.to_string(), e.to_string()))
    }

    /// Sends the TokenReview; returns its `status`.
    async fn call(&self, token: &str) -> Result<Value, ReviewError> {
        let unreachable = |e: &dyn std::fmt::Display| ReviewError::Unreachable(e.to_string());
        let base = self.opts.api.trim_end_matches('/');
        let uri: http::Uri = format!("{base}/apis/authentication.k8s.io/v1/tokenreviews")
            .parse()
            .map_err(|e: http::uri::InvalidUri| ReviewError::Api(e.to_string()))?;
        let host = uri.host().unwrap_or("localhost").to_string();
        let https = self.tls.is_some();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token.trim(), "audiences": [self.opts.audience]},
        })
        .to_string();
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        let mut req = http::Request::post(path)
            .header(
                http::header::HOST,
                uri.authority().map_or(host.as_str(), |a| a.as_str()),
            )
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json");
        if let Some(f) = &self.opts.token_file {
            let own = std::fs::read_to_string(f).map_err(|e| {
                ReviewError::Unreachable(format!(
                    "cannot read --kube-token-file {}: {e}",
                    f.display()
                ))
            })?;
            req = req.header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", own.trim()),
            );
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ReviewError::Api(e.to_string()))?;
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| unreachable(&format!("{host}:{port}: {e}")))?;
        let resp = match &self.tls {
            Some(cfg) => {
                let name = rustls_pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| ReviewError::Api(e.to_string()))?;
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| unreachable(&format!("TLS with {host}: {e}")))?;
                send(hyper_util::rt::TokioIo::new(tls), req).await?
            }
            None => send(hyper_util::rt::TokioIo::new(tcp), req).await?,
        };
        let (parts, body) = resp.into_parts();
        let bytes = Limited::new(body, MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| unreachable(&e))?
            .to_bytes();
        if !parts.status.is_success() {
            let text = String::from_utf8_lossy(&bytes);
            let msg = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v.get("message").and_then(Value::as_str).map(String::from))
                .unwrap_or_else(|| text.chars().take(200).collect());
            return Err(ReviewError::Api(format!("{}: {msg}", parts.status)));
        }
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ReviewError::Api(format!("a TokenReview that is not JSON: {e}")))?;
        v.get("status")
            .cloned()
            .ok_or_else(|| ReviewError::Api("a TokenReview without status".into()))
    }
}

async fn send<I>(
    io: I,
    req: http::Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, ReviewError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| ReviewError::Unreachable(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
        .send_request(req)
        .await
        .map_err(|e| ReviewError::Unreachable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwts_are_told_from_bootstrap_tokens() {
        assert!(is_jwt("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"));
        assert!(!is_jwt("bwt1.eyJzdWIiOiJ4In0.c2ln"));
        assert!(!is_jwt("eyJ.a"));
    }

    #[test]
    fn https_without_a_ca_file_is_refused() {
        let e = TokenReviewer::new(KubeOptions::new("https://kubernetes.default.svc")).unwrap_err();
        assert!(e.contains("--kube-ca-file"), "{e}");
        assert!(TokenReviewer::new(KubeOptions::new("ftp://x")).is_err());
    }
}
