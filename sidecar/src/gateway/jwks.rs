//! JSON Web Key Sets: the public keys a JWT provider signs with, from a
//! file or an https URL.
//!
//! A file is re-read at most once a second (and only re-parsed when its
//! bytes change), so a rotated key file takes effect without a restart. A
//! URL is fetched on first use, again every refresh interval, and at once
//! (at most once every few seconds) when a token names a `kid` the set does
//! not have: that is how a provider's key rotation is picked up. A failed
//! load keeps the last good keys. Loads are single-flight: one caller
//! loads while the others keep using the current keys (or, before the first
//! load, wait for it). Nothing runs in the background: loads happen on the
//! request path, so nothing outlives the owner of the source.
//!
//! Only signing keys are loaded: RSA, EC (P-256, P-384) and Ed25519.
//! Symmetric (`oct`) keys are never accepted from a key set, so an HMAC
//! token can never be checked against anything published as a key.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

/// How often a JWKS file is looked at.
pub const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Default refresh interval of a JWKS URL.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// Least time between two fetches of a JWKS URL caused by unknown `kid`s
/// (or after a failed fetch): a flood of made-up `kid`s must not become a
/// flood of requests to the identity provider.
pub const MIN_FETCH_INTERVAL: Duration = Duration::from_secs(5);
/// A whole fetch (connect, TLS, request, body) must finish within this.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document accepted (file or URL).
const MAX_JWKS_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum JwksError {
    #[error("JWKS is not a JSON object with a `keys` array: {0}")]
    NotJwks(String),
    #[error("JWKS has no usable signing key (RSA, EC P-256/P-384 or Ed25519)")]
    NoUsableKeys,
    #[error("cannot read JWKS file {path}: {error}")]
    Read { path: String, error: String },
    #[error("cannot fetch JWKS from {uri}: {error}")]
    Fetch { uri: String, error: String },
    #[error("bad JWKS uri {uri:?}: {error}")]
    Uri { uri: String, error: String },
    #[error("cannot load JWKS CA file {path}: {error}")]
    CaFile { path: String, error: String },
    #[error(
        "no system root certificates found to verify the JWKS server; set jwks_ca_file to its CA"
    )]
    NoSystemRoots,
    #[error("JWKS not available (last load failed: {0})")]
    Unavailable(String),
}

/// One verification key of a set.
pub struct Key {
    pub kid: Option<String>,
    family: AlgorithmFamily,
    /// The key's own `alg`, when it names one: then only that algorithm.
    alg: Option<KeyAlgorithm>,
    curve: Option<EllipticCurve>,
    decoding: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("family", &self.family)
            .finish_non_exhaustive()
    }
}

impl Key {
    /// Whether a token signed with `alg` may be checked with this key: the
    /// algorithm is of the key's type (and curve), and is the key's own
    /// `alg` if it has one. This is the algorithm-confusion guard.
    pub fn accepts(&self, alg: Algorithm) -> bool {
        if alg.family() != self.family || self.family == AlgorithmFamily::Hmac {
            return false;
        }
        if let Some(a) = self.alg
            && a != KeyAlgorithm::from(alg)
        {
            return false;
        }
        match (alg, &self.curve) {
            (Algorithm::ES256, Some(c)) => *c == EllipticCurve::P256,
            (Algorithm::ES384, Some(c)) => *c == EllipticCurve::P384,
            (Algorithm::EdDSA, Some(c)) => *c == EllipticCurve::Ed25519,
            (Algorithm::ES256 | Algorithm::ES384 | Algorithm::EdDSA, None) => false,
            _ => true,
        }
    }

    pub fn decoding_key(&self) -> &DecodingKey {
        &self.decoding
    }
}

/// A parsed key set.
#[derive(Debug, Default)]
pub struct KeySet {
    keys: Vec<Key>,
}

impl KeySet {
    /// Parses a JWKS document, keeping the usable signing keys. Keys of
    /// other kinds are skipped (a provider may publish encryption keys in
    /// the same set); a set with no usable key at all is an error, so that
    /// a broken document never replaces good keys.
    pub fn parse(json: &[u8]) -> Result<Self, JwksError> {
        let doc: serde_json::Value =
            serde_json::from_slice(json).map_err(|e| JwksError::NotJwks(e.to_string()))?;
        let entries = doc
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or_else(|| JwksError::NotJwks("no `keys` array".into()))?;
        let keys: Vec<Key> = entries.iter().filter_map(usable_key).collect();
        if keys.is_empty() {
            return Err(JwksError::NoUsableKeys);
        }
        Ok(Self { keys })
    }

    pub fn find(&self, kid: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.kid.as_deref() == Some(kid))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Key> {
        self.keys.iter()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

fn usable_key(entry: &serde_json::Value) -> Option<Key> {
    let jwk: Jwk = match serde_json::from_value(entry.clone()) {
        Ok(j) => j,
        Err(e) => {
            tracing::debug!(error = %e, "skipping a JWKS entry that is not a supported key");
            return None;
        }
    };
    if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
        return None;
    }
    let curve = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => None,
        AlgorithmParameters::EllipticCurve(p) => Some(p.curve.clone()),
        AlgorithmParameters::OctetKeyPair(p) => Some(p.curve.clone()),
        // Shared secrets have no place in a public key set.
        _ => return None,
    };
    let decoding = match DecodingKey::from_jwk(&jwk) {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(kid = ?jwk.common.key_id, error = %e, "skipping an unusable JWKS key");
            return None;
        }
    };
    Some(Key {
        kid: jwk.common.key_id.clone(),
        family: decoding.family(),
        alg: jwk.common.key_algorithm,
        curve,
        decoding,
    })
}

/// Rate limits of one source.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// Reload when the last successful load is this old.
    pub every: Duration,
    /// Least time between loads caused by an unknown `kid`, and between
    /// retries after a failed load.
    pub min_interval: Duration,
}

enum Origin {
    File(PathBuf),
    Https(HttpsTarget),
}

struct HttpsTarget {
    uri: String,
    host: String,
    port: u16,
    authority: String,
    path: String,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    /// The proxy's `SO_MARK`: the fetch is the proxy's own connection, not
    /// the app's, for its pod's interception rules.
    mark: u32,
}

#[derive(Default)]
struct State {
    keys: Option<Arc<KeySet>>,
    last_attempt: Option<Instant>,
    last_ok: bool,
    last_error: Option<String>,
    /// Counts load attempts: a caller that waited for another's load sees
    /// it changed and does not load again (single flight).
    generation: u64,
    /// The bytes of the last document loaded (good or not): an unchanged
    /// document is neither parsed again nor complained about again.
    last_doc: Option<Vec<u8>>,
    /// Whether `last_doc` parsed.
    last_doc_ok: bool,
}

/// Where a provider's keys come from, with the cached set.
pub struct JwksSource {
    origin: Origin,
    timing: Mutex<Timing>,
    state: Mutex<State>,
    /// Held while loading: single flight.
    flight: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwksSource(")?;
        f.write_str(&self.describe())?;
        f.write_str(")")
    }
}

impl JwksSource {
    /// Keys from a local file (nothing is read until first use).
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self::with_origin(
            Origin::File(path.into()),
            Timing {
                every: FILE_CHECK_INTERVAL,
                min_interval: FILE_CHECK_INTERVAL,
            },
        )
    }

    /// Keys from an https URL, its server verified against the roots in
    /// `ca_file` (PEM) or, when `None`, the system's roots.
    pub fn https(
        uri: &str,
        ca_file: Option<&str>,
        refresh: Duration,
        mark: u32,
    ) -> Result<Self, JwksError> {
        let target = HttpsTarget::new(uri, ca_file, mark)?;
        Ok(Self::with_origin(
            Origin::Https(target),
            Timing {
                every: refresh,
                min_interval: MIN_FETCH_INTERVAL,
            },
        ))
    }

    fn with_origin(origin: Origin, timing: Timing) -> Self {
        Self {
            origin,
            timing: Mutex::new(timing),
            state: Mutex::new(State::default()),
            flight: tokio::sync::Mutex::new(()),
        }
    }

    #[cfg(test)]
    pub(crate) fn set_timing(&self, timing: Timing) {
        *self.timing.lock().expect("timing lock") = timing;
    }

    fn timing(&self) -> Timing {
        *self.timing.lock().expect("timing lock")
    }

    fn describe(&self) -> String {
        match &self.origin {
            Origin::File(p) => p.display().to_string(),
            Origin::Https(t) => t.uri.clone(),
        }
    }

    /// The current keys, loading them first if they are due. Only a caller
    /// with no keys at all waits for a load in progress.
    pub async fn keys(&self) -> Result<Arc<KeySet>, JwksError> {
        let timing = self.timing();
        let (current, due) = {
            let st = self.state.lock().expect("jwks state lock");
            (st.keys.clone(), due(&st, timing))
        };
        match current {
            Some(keys) if !due => Ok(keys),
            Some(keys) => {
                // Someone else is already refreshing: serve what we have.
                if let Ok(_flight) = self.flight.try_lock()
                    && self.is_due(timing)
                {
                    self.load().await;
                }
                Ok(self.current().unwrap_or(keys))
            }
            None => {
                let seen = self.generation();
                let _flight = self.flight.lock().await;
                if self.generation() == seen && self.is_due(timing) {
                    self.load().await;
                }
                self.current().ok_or_else(|| self.unavailable())
            }
        }
    }

    /// Called when a token names a `kid` the current set lacks: reloads at
    /// once unless a load happened within the minimum interval, and returns
    /// the (possibly new) keys. Concurrent callers share one load.
    pub async fn keys_after_unknown_kid(&self) -> Result<Arc<KeySet>, JwksError> {
        let timing = self.timing();
        if !self.may_force(timing) {
            return self.current().ok_or_else(|| self.unavailable());
        }
        let seen = self.generation();
        let _flight = self.flight.lock().await;
        // A caller ahead of us in the queue may just have loaded.
        if self.generation() == seen && self.may_force(timing) {
            self.load().await;
        }
        self.current().ok_or_else(|| self.unavailable())
    }

    fn generation(&self) -> u64 {
        self.state.lock().expect("jwks state lock").generation
    }

    fn current(&self) -> Option<Arc<KeySet>> {
        self.state.lock().expect("jwks state lock").keys.clone()
    }

    fn unavailable(&self) -> JwksError {
        let st = self.state.lock().expect("jwks state lock");
        JwksError::Unavailable(
            st.last_error
                .clone()
                .unwrap_or_else(|| "not loaded yet".into()),
        )
    }

    fn is_due(&self, timing: Timing) -> bool {
        due(&self.state.lock().expect("jwks state lock"), timing)
    }

    fn may_force(&self, timing: Timing) -> bool {
        let st = self.state.lock().expect("jwks state lock");
        st.last_attempt
            .is_none_or(|t| t.elapsed() >= timing.min_interval)
    }

    /// One load; the caller holds `flight`. Failures keep the last good keys.
    async fn load(&self) {
        let doc = match &self.origin {
            Origin::File(path) => read_file(path).await,
            Origin::Https(t) => t.fetch().await,
        };
        let mut st = self.state.lock().expect("jwks state lock");
        st.last_attempt = Some(Instant::now());
        st.generation += 1;
        let doc = match doc {
            Ok(d) => d,
            Err(e) => {
                if st.last_ok || st.last_error.as_deref() != Some(&e.to_string()) {
                    tracing::warn!(source = %self.describe(), error = %e, kept_keys = st.keys.is_some(),
                        "cannot load JWKS; keeping the last good keys");
                }
                st.last_ok = false;
                st.last_error = Some(e.to_string());
                return;
            }
        };
        if st.last_doc.as_deref() == Some(&doc[..]) {
            // Unchanged: whatever it gave last time still stands.
            st.last_ok = st.last_doc_ok;
            if st.last_doc_ok {
                st.last_error = None;
            }
            return;
        }
        match KeySet::parse(&doc) {
            Ok(set) => {
                tracing::info!(source = %self.describe(), keys = set.len(), "JWKS loaded");
                st.keys = Some(Arc::new(set));
                st.last_ok = true;
                st.last_error = None;
            }
            Err(e) => {
                tracing::warn!(source = %self.describe(), error = %e, kept_keys = st.keys.is_some(),
                    "JWKS document refused; keeping the last good keys");
                st.last_ok = false;
                st.last_error = Some(e.to_string());
            }
        }
        st.last_doc_ok = st.last_ok;
        st.last_doc = Some(doc);
    }
}

fn due(st: &State, timing: Timing) -> bool {
    match st.last_attempt {
        None => true,
        Some(t) if st.last_ok => t.elapsed() >= timing.every,
        Some(t) => t.elapsed() >= timing.min_interval,
    }
}

async fn read_file(path: &std::path::Path) -> Result<Vec<u8>, JwksError> {
    let err = |e: String| JwksError::Read {
        path: path.display().to_string(),
        error: e,
    };
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(|e| err(e.to_string()))?;
    if meta.len() > MAX_JWKS_BYTES as u64 {
        return Err(err(format!("larger than {MAX_JWKS_BYTES} bytes")));
    }
    tokio::fs::read(path).await.map_err(|e| err(e.to_string()))
}

impl HttpsTarget {
    fn new(uri: &str, ca_file: Option<&str>, mark: u32) -> Result<Self, JwksError> {
        let bad = |e: &str| JwksError::Uri {
            uri: uri.to_string(),
            error: e.to_string(),
        };
        let parsed: http::Uri = uri
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        if parsed.scheme_str() != Some("https") {
            return Err(bad("must be an https URL"));
        }
        let authority = parsed.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("user info is not allowed"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let server_name =
            ServerName::try_from(host.to_string()).map_err(|e| bad(&e.to_string()))?;
        let path = parsed
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/".into());
        Ok(Self {
            uri: uri.to_string(),
            host: host.to_string(),
            port: authority.port_u16().unwrap_or(443),
            authority: authority.as_str().to_string(),
            path,
            server_name,
            tls: client_config(ca_file)?,
            mark,
        })
    }

    async fn fetch(&self) -> Result<Vec<u8>, JwksError> {
        match tokio::time::timeout(FETCH_TIMEOUT, self.fetch_once()).await {
            Ok(r) => r.map_err(|e| JwksError::Fetch {
                uri: self.uri.clone(),
                error: e,
            }),
            Err(_) => Err(JwksError::Fetch {
                uri: self.uri.clone(),
                error: format!("timed out after {FETCH_TIMEOUT:?}"),
            }),
        }
    }

    async fn fetch_once(&self) -> Result<Vec<u8>, String> {
        let tcp = bulwark_ca::client::dial((self.host.as_str(), self.port), self.mark)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let req = http::Request::get(self.path.as_str())
            .header(http::header::HOST, self.authority.as_str())
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::USER_AGENT, "bulwark-gateway")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let exchange = async move {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("HTTP: {e}"))?;
            if resp.status() != http::StatusCode::OK {
                return Err(format!("HTTP status {}", resp.status()));
            }
            let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?;
            Ok(body.to_bytes().to_vec())
        };
        // The connection is driven here rather than in a spawned task, so
        // nothing of a fetch outlives it.
        let mut exchange = std::pin::pin!(exchange);
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            r = &mut exchange => return r,
            c = &mut conn => c.map_err(|e| format!("HTTP: {e}"))?,
        }
        exchange.await
    }
}

fn client_config(ca_file: Option<&str>) -> Result<Arc<rustls::ClientConfig>, JwksError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let err = |e: String| JwksError::CaFile {
                path: path.to_string(),
                error: e,
            };
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| err(e.to_string()))? {
                let cert = cert.map_err(|e| err(e.to_string()))?;
                roots.add(cert).map_err(|e| err(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(err("no certificates in it".into()));
            }
        }
        None => {
            roots = system_roots()?;
        }
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(bulwark_ca::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| JwksError::CaFile {
            path: String::new(),
            error: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The system's roots, read once per process.
fn system_roots() -> Result<rustls::RootCertStore, JwksError> {
    static ROOTS: std::sync::OnceLock<Vec<CertificateDer<'static>>> = std::sync::OnceLock::new();
    let certs = ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs);
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs.iter().cloned());
    if added == 0 {
        return Err(JwksError::NoSystemRoots);
    }
    Ok(roots)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A JWKS entry for a public key, built by the library from the
    /// private key the tests sign with.
    pub(crate) fn jwk_json(
        key: &jsonwebtoken::EncodingKey,
        alg: Algorithm,
        kid: &str,
    ) -> serde_json::Value {
        let mut jwk = Jwk::from_encoding_key(key, alg).expect("jwk from key");
        jwk.common.key_id = Some(kid.to_string());
        serde_json::to_value(jwk).expect("jwk json")
    }

    pub(crate) fn jwks_doc(keys: &[serde_json::Value]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "keys": keys })).unwrap()
    }

    fn ec_key() -> jsonwebtoken::EncodingKey {
        let pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .serialize_pem();
        jsonwebtoken::EncodingKey::from_ec_pem(pem.as_bytes()).unwrap()
    }

    #[test]
    fn symmetric_and_encryption_keys_are_skipped() {
        let doc = br#"{"keys":[
            {"kty":"oct","kid":"h","k":"c2VjcmV0"},
            {"kty":"EC","kid":"enc","use":"enc","crv":"P-256",
             "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty":"EC","kid":"sig","crv":"P-256",
             "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}
        ]}"#;
        let set = KeySet::parse(doc).unwrap();
        assert_eq!(set.len(), 1);
        let k = set.find("sig").unwrap();
        assert!(k.accepts(Algorithm::ES256));
        assert!(!k.accepts(Algorithm::ES384), "curve must match");
        assert!(!k.accepts(Algorithm::HS256));
        assert!(!k.accepts(Algorithm::RS256));
        assert!(set.find("h").is_none());
    }

    #[test]
    fn a_set_without_usable_keys_is_refused() {
        assert!(matches!(
            KeySet::parse(br#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#),
            Err(JwksError::NoUsableKeys)
        ));
        assert!(matches!(
            KeySet::parse(br#"{"nokeys":[]}"#),
            Err(JwksError::NotJwks(_))
        ));
        assert!(matches!(
            KeySet::parse(b"<html>"),
            Err(JwksError::NotJwks(_))
        ));
    }

    #[test]
    fn https_uris_are_checked() {
        let ca = None;
        for bad in [
            "http://idp.example.com/jwks",
            "https://user@idp.example.com/jwks",
            "idp.example.com/jwks",
            "https:///jwks",
        ] {
            assert!(
                matches!(
                    JwksSource::https(bad, ca, DEFAULT_REFRESH, 0),
                    Err(JwksError::Uri { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_missing_ca_file_is_an_error() {
        let r = JwksSource::https(
            "https://idp.example.com/jwks",
            Some("/nonexistent/ca.pem"),
            DEFAULT_REFRESH,
            0,
        );
        assert!(matches!(r, Err(JwksError::CaFile { .. })));
    }

    #[tokio::test]
    async fn a_broken_file_keeps_the_last_good_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        let key = ec_key();
        std::fs::write(&path, jwks_doc(&[jwk_json(&key, Algorithm::ES256, "a")])).unwrap();
        let src = JwksSource::file(&path);
        src.set_timing(Timing {
            every: Duration::ZERO,
            min_interval: Duration::ZERO,
        });
        assert!(src.keys().await.unwrap().find("a").is_some());

        std::fs::write(&path, b"{ truncated").unwrap();
        assert!(src.keys().await.unwrap().find("a").is_some());
        std::fs::remove_file(&path).unwrap();
        assert!(src.keys().await.unwrap().find("a").is_some());
    }

    #[tokio::test]
    async fn a_missing_file_is_unavailable() {
        let src = JwksSource::file("/nonexistent/jwks.json");
        assert!(matches!(src.keys().await, Err(JwksError::Unavailable(_))));
    }

    #[tokio::test]
    async fn the_file_is_not_reread_within_the_check_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        let key = ec_key();
        std::fs::write(&path, jwks_doc(&[jwk_json(&key, Algorithm::ES256, "a")])).unwrap();
        let src = JwksSource::file(&path);
        assert!(src.keys().await.unwrap().find("a").is_some());
        std::fs::write(&path, jwks_doc(&[jwk_json(&key, Algorithm::ES256, "b")])).unwrap();
        // Default timing: the second look is within a second of the first.
        assert!(src.keys().await.unwrap().find("a").is_some());
        assert!(
            src.keys_after_unknown_kid()
                .await
                .unwrap()
                .find("b")
                .is_none()
        );
    }
}
