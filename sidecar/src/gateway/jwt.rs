//! End-user authentication at the gateway: OAuth2 bearer tokens (JWTs)
//! checked against the configured providers' keys, and authorization of a
//! route on the token's scopes and claims.
//!
//! A token is matched to its provider by its `iss` (read unverified only to
//! pick the provider), then fully verified by `jsonwebtoken` with that
//! provider's keys: the `alg` must be one the provider allows *and* fit the
//! key's type and curve, so neither `alg: none` nor an HMAC token keyed
//! with a public key (algorithm confusion) can pass. Time claims are
//! checked against the caller's clock with the provider's skew.
//!
//! Failures are [`AuthFailure`]s with a short fixed `reason` (a metrics
//! label) and a `detail` for logs; neither ever holds token or key bytes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bulwark_proto::config::v1;
use http::{HeaderMap, HeaderName, HeaderValue};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use super::jwks::{self, JwksError, JwksSource, KeySet};

/// Algorithms a provider accepts when its config names none: every
/// asymmetric one, as the control plane's default (a key still only
/// verifies the algorithms of its own type).
pub const DEFAULT_ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];
/// Longest bearer token looked at; longer ones are refused unparsed.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Headers a provider may not forward claims into: they carry HTTP framing,
/// credentials, or the mesh's own signals.
const RESERVED_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "content-type",
    "cookie",
];

#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("JWT provider #{index}: issuer is required")]
    MissingIssuer { index: usize },
    #[error("JWT provider {issuer}: issuer listed twice")]
    DuplicateIssuer { issuer: String },
    #[error("JWT provider {issuer}: set exactly one of jwks_file and jwks_uri")]
    KeySource { issuer: String },
    #[error("JWT provider {issuer}: unknown algorithm {alg:?}")]
    UnknownAlgorithm { issuer: String, alg: String },
    #[error(
        "JWT provider {issuer}: algorithm {alg} is not allowed (only asymmetric signatures; never none or HMAC)"
    )]
    AlgorithmNotAllowed { issuer: String, alg: String },
    #[error("JWT provider {issuer}: claim {claim:?} forwarded to bad header name {header:?}")]
    BadForwardHeader {
        issuer: String,
        claim: String,
        header: String,
    },
    #[error("JWT provider {issuer}: header {header} cannot carry a forwarded claim")]
    ReservedForwardHeader { issuer: String, header: String },
    #[error("JWT provider {issuer}: {error}")]
    Jwks { issuer: String, error: JwksError },
}

/// What a request's credentials amount to.
#[derive(Debug, Clone)]
pub enum AuthOutcome {
    /// No bearer token (no `Authorization` header, or another scheme).
    Anonymous,
    Authenticated(Principal),
    /// A token was presented and is not acceptable: 401.
    Rejected(AuthFailure),
}

/// The verified caller.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub issuer: String,
    pub subject: String,
    /// From `scope` (space separated) and `scp` (array or string).
    pub scopes: Vec<String>,
    pub claims: Map<String, Value>,
    /// Headers to set on the request into the mesh, from the provider's
    /// forward_claims (claim -> header); string claims as is, others as
    /// compact JSON. Claims the token lacks are not forwarded.
    pub forward: Vec<(HeaderName, HeaderValue)>,
    /// Keep the `Authorization` header on the request into the mesh.
    pub forward_token: bool,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFailure {
    /// One of "malformed", "expired", "not-yet-valid", "bad-signature",
    /// "unknown-issuer", "wrong-audience", "unknown-kid",
    /// "algorithm-not-allowed", "jwks-unavailable".
    pub reason: &'static str,
    /// For logs: what exactly (may name the issuer or kid, never holds
    /// token or key material).
    pub detail: String,
}

impl AuthFailure {
    fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }

    /// The RFC 6750 challenge for a 401.
    pub fn www_authenticate(&self) -> HeaderValue {
        let description = match self.reason {
            "expired" => "the token has expired",
            "not-yet-valid" => "the token is not valid yet",
            "bad-signature" => "the token signature does not verify",
            "unknown-issuer" => "the token issuer is not trusted",
            "wrong-audience" => "the token is not meant for this audience",
            "unknown-kid" => "the token signing key is unknown",
            "algorithm-not-allowed" => "the token signing algorithm is not allowed",
            "jwks-unavailable" => "the token cannot be verified now",
            _ => "the token is malformed",
        };
        HeaderValue::from_str(&format!(
            "Bearer realm=\"bulwark\", error=\"invalid_token\", error_description=\"{description}\""
        ))
        .expect("static ASCII")
    }
}

impl std::fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

/// A route's refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// A valid token is required and there is none: 401.
    Unauthenticated,
    /// The token lacks a required scope or claim: 403. `missing` is
    /// `scope <name>` or `claim <name>`.
    Forbidden { missing: String },
}

impl Denied {
    pub fn status(&self) -> u16 {
        match self {
            Denied::Unauthenticated => 401,
            Denied::Forbidden { .. } => 403,
        }
    }

    /// The RFC 6750 challenge: a bare one for 401, `insufficient_scope`
    /// (naming the scope when a scope is missing) for 403.
    pub fn www_authenticate(&self) -> HeaderValue {
        let v = match self {
            Denied::Unauthenticated => "Bearer realm=\"bulwark\"".to_string(),
            Denied::Forbidden { missing } => match missing.strip_prefix("scope ") {
                Some(scope) => format!(
                    "Bearer realm=\"bulwark\", error=\"insufficient_scope\", scope=\"{}\"",
                    quoted(scope)
                ),
                None => format!(
                    "Bearer realm=\"bulwark\", error=\"insufficient_scope\", error_description=\"missing {}\"",
                    quoted(missing)
                ),
            },
        };
        HeaderValue::from_str(&v).unwrap_or_else(|_| {
            HeaderValue::from_static("Bearer realm=\"bulwark\", error=\"insufficient_scope\"")
        })
    }
}

/// Makes config text safe inside a quoted-string (RFC 9110): printable
/// ASCII only, no quote or backslash.
fn quoted(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '"' | '\\' => '_',
            c if c.is_ascii_graphic() || c == ' ' => c,
            _ => '_',
        })
        .collect()
}

/// Authorization on claims for a route. `Ok(())` or the refusal.
pub fn authorize(
    principal: Option<&Principal>,
    rule: Option<&v1::GatewayAuthorization>,
) -> Result<(), Denied> {
    let Some(rule) = rule else { return Ok(()) };
    let needs_token =
        rule.require_authenticated || !rule.scopes.is_empty() || !rule.claims.is_empty();
    if !needs_token {
        return Ok(());
    }
    let Some(p) = principal else {
        return Err(Denied::Unauthenticated);
    };
    for scope in &rule.scopes {
        if !p.scopes.iter().any(|s| s == scope) {
            return Err(Denied::Forbidden {
                missing: format!("scope {scope}"),
            });
        }
    }
    for req in &rule.claims {
        if !claim_satisfies(claim_value(&p.claims, &req.claim), &req.values) {
            return Err(Denied::Forbidden {
                missing: format!("claim {}", req.claim),
            });
        }
    }
    Ok(())
}

/// A claim by name; a dotted name (`realm_access.roles`) that is not a
/// top-level claim walks into nested objects.
fn claim_value<'a>(claims: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(name) {
        return Some(v);
    }
    let mut parts = name.split('.');
    let mut v = claims.get(parts.next()?)?;
    for part in parts {
        v = v.as_object()?.get(part)?;
    }
    Some(v)
}

/// Empty `values`: the claim must be present. Otherwise a string claim
/// equal to one of them or space-separated containing one; an array
/// containing one; a number or boolean whose text is one.
fn claim_satisfies(value: Option<&Value>, values: &[String]) -> bool {
    let Some(value) = value else { return false };
    if values.is_empty() {
        return !value.is_null();
    }
    let scalar_matches = |v: &Value| match v {
        Value::String(s) => values.iter().any(|want| want == s),
        Value::Number(n) => values.iter().any(|want| *want == n.to_string()),
        Value::Bool(b) => values.iter().any(|want| *want == b.to_string()),
        _ => false,
    };
    match value {
        Value::String(s) => {
            scalar_matches(value) || s.split_whitespace().any(|w| values.iter().any(|v| v == w))
        }
        Value::Array(items) => items.iter().any(scalar_matches),
        other => scalar_matches(other),
    }
}

struct Provider {
    issuer: String,
    audiences: Vec<String>,
    algorithms: Vec<Algorithm>,
    skew: Duration,
    forward_claims: Vec<(String, HeaderName)>,
    forward_token: bool,
    keys: JwksSource,
}

/// The gateway's token verifier: built once per config change, shared
/// (`Arc`) by every request.
pub struct Authenticator {
    providers: HashMap<String, Arc<Provider>>,
    verified: VerifiedCache,
}

/// Tokens verified recently: a client sends the same token on every
/// request until it expires, and a signature check costs far more than the
/// proxying. An entry holds until the token's `exp`, at most
/// [`VERIFIED_TTL`], and only while its issuer's key set is the one it was
/// verified with (a rotation that withdraws a key takes effect at once).
#[derive(Default)]
struct VerifiedCache {
    hasher: std::hash::RandomState,
    map: std::sync::Mutex<HashMap<u64, Verified>>,
    hits: std::sync::atomic::AtomicU64,
}

struct Verified {
    token: Arc<str>,
    principal: Arc<Principal>,
    until: SystemTime,
    keys: Arc<KeySet>,
}

/// How long a verified token is trusted without checking it again.
pub const VERIFIED_TTL: Duration = Duration::from_secs(30);
/// Tokens remembered at most (about 1 KiB each).
const VERIFIED_MAX: usize = 8192;

impl VerifiedCache {
    fn get(&self, token: &str, now: SystemTime) -> Option<(Arc<Principal>, Arc<KeySet>)> {
        use std::hash::BuildHasher;
        let h = self.hasher.hash_one(token);
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&h) {
            Some(v) if &*v.token == token && now < v.until => {
                Some((v.principal.clone(), v.keys.clone()))
            }
            _ => None,
        }
    }

    fn put(&self, token: &str, p: &Principal, keys: Arc<KeySet>, now: SystemTime) {
        use std::hash::BuildHasher;
        let exp = p
            .claims
            .get("exp")
            .and_then(Value::as_u64)
            .map(|e| UNIX_EPOCH + Duration::from_secs(e));
        let until = match exp {
            Some(e) => e.min(now + VERIFIED_TTL),
            None => return,
        };
        let h = self.hasher.hash_one(token);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= VERIFIED_MAX {
            map.retain(|_, v| now < v.until);
            if map.len() >= VERIFIED_MAX {
                map.clear();
            }
        }
        map.insert(
            h,
            Verified {
                token: token.into(),
                principal: Arc::new(p.clone()),
                until,
                keys,
            },
        );
    }
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("issuers", &self.providers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Authenticator {
    /// Checks the provider config (issuer set; exactly one of jwks_file /
    /// jwks_uri; the uri is https; algorithms all known asymmetric ones,
    /// RS256 + ES256 when none are given) and prepares the key sources.
    /// Keys themselves are loaded on first use.
    /// `mark`: the proxy's `SO_MARK`, which key fetches carry.
    pub fn new(providers: &[v1::JwtProvider], mark: u32) -> Result<Self, AuthConfigError> {
        let mut out = HashMap::new();
        for (index, p) in providers.iter().enumerate() {
            let issuer = p.issuer.trim().to_string();
            if issuer.is_empty() {
                return Err(AuthConfigError::MissingIssuer { index });
            }
            let provider = Provider::new(&issuer, p, mark)?;
            if out.insert(issuer.clone(), Arc::new(provider)).is_some() {
                return Err(AuthConfigError::DuplicateIssuer { issuer });
            }
        }
        Ok(Self {
            providers: out,
            verified: VerifiedCache::default(),
        })
    }

    /// Reads a bearer token from `Authorization: Bearer <t>` (scheme
    /// case-insensitive) and verifies it. No header, or another scheme:
    /// `Anonymous`. Two `Authorization` headers: rejected as malformed.
    pub async fn authenticate(&self, headers: &HeaderMap, now: SystemTime) -> AuthOutcome {
        let token = match bearer_token(headers) {
            Ok(None) => return AuthOutcome::Anonymous,
            Ok(Some(t)) => t,
            Err(f) => return AuthOutcome::Rejected(f),
        };
        if let Some((p, keys)) = self.verified.get(token, now)
            && let Some(provider) = self.providers.get(&p.issuer)
            && provider
                .keys
                .keys()
                .await
                .is_ok_and(|current| Arc::ptr_eq(&current, &keys))
        {
            self.verified
                .hits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return AuthOutcome::Authenticated((*p).clone());
        }
        match self.verify(token, now).await {
            Ok(p) => {
                if let Some(provider) = self.providers.get(&p.issuer)
                    && let Ok(keys) = provider.keys.keys().await
                {
                    self.verified.put(token, &p, keys, now);
                }
                AuthOutcome::Authenticated(p)
            }
            Err(f) => {
                tracing::debug!(reason = f.reason, detail = %f.detail, "bearer token refused");
                AuthOutcome::Rejected(f)
            }
        }
    }

    /// The names of every header any provider forwards claims into: the
    /// gateway strips them from incoming requests so that clients cannot
    /// spoof them.
    pub fn forwarded_header_names(&self) -> Vec<HeaderName> {
        let mut names: Vec<HeaderName> = self
            .providers
            .values()
            .flat_map(|p| p.forward_claims.iter().map(|(_, h)| h.clone()))
            .collect();
        names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        names.dedup();
        names
    }

    #[cfg(test)]
    pub(crate) fn set_jwks_timing(&self, timing: jwks::Timing) {
        for p in self.providers.values() {
            p.keys.set_timing(timing);
        }
    }

    async fn verify(&self, token: &str, now: SystemTime) -> Result<Principal, AuthFailure> {
        // Unverified, only to choose whose keys to verify with.
        let peek: Map<String, Value> = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|_| AuthFailure::new("malformed", "not a JWT with a JSON claims object"))?;
        let iss = match peek.get("iss") {
            Some(Value::String(s)) => s.as_str(),
            _ => return Err(AuthFailure::new("unknown-issuer", "token has no iss claim")),
        };
        let provider = self.providers.get(iss).ok_or_else(|| {
            AuthFailure::new(
                "unknown-issuer",
                format!("issuer {:?} is not configured", truncated(iss)),
            )
        })?;
        provider.verify(token, now).await
    }
}

impl Provider {
    fn new(issuer: &str, p: &v1::JwtProvider, mark: u32) -> Result<Self, AuthConfigError> {
        let keys = match (p.jwks_file.is_empty(), p.jwks_uri.is_empty()) {
            (false, true) => JwksSource::file(&p.jwks_file),
            (true, false) => {
                let ca = Some(p.jwks_ca_file.as_str()).filter(|c| !c.is_empty());
                let refresh = match p.jwks_refresh_ms {
                    0 => jwks::DEFAULT_REFRESH,
                    ms => Duration::from_millis(ms),
                };
                JwksSource::https(&p.jwks_uri, ca, refresh, mark).map_err(|error| {
                    AuthConfigError::Jwks {
                        issuer: issuer.to_string(),
                        error,
                    }
                })?
            }
            _ => {
                return Err(AuthConfigError::KeySource {
                    issuer: issuer.to_string(),
                });
            }
        };
        let algorithms = if p.algorithms.is_empty() {
            DEFAULT_ALGORITHMS.to_vec()
        } else {
            let mut algs = Vec::new();
            for name in &p.algorithms {
                let alg: Algorithm =
                    name.trim()
                        .parse()
                        .map_err(|_| AuthConfigError::UnknownAlgorithm {
                            issuer: issuer.to_string(),
                            alg: name.clone(),
                        })?;
                if matches!(alg.family(), jsonwebtoken::AlgorithmFamily::Hmac) {
                    return Err(AuthConfigError::AlgorithmNotAllowed {
                        issuer: issuer.to_string(),
                        alg: name.clone(),
                    });
                }
                if !algs.contains(&alg) {
                    algs.push(alg);
                }
            }
            algs
        };
        let mut forward_claims = Vec::new();
        for (claim, header) in &p.forward_claims {
            let name = HeaderName::from_bytes(header.trim().as_bytes()).map_err(|_| {
                AuthConfigError::BadForwardHeader {
                    issuer: issuer.to_string(),
                    claim: claim.clone(),
                    header: header.clone(),
                }
            })?;
            if RESERVED_HEADERS.contains(&name.as_str()) || name.as_str().starts_with("x-bulwark-")
            {
                return Err(AuthConfigError::ReservedForwardHeader {
                    issuer: issuer.to_string(),
                    header: name.to_string(),
                });
            }
            forward_claims.push((claim.clone(), name));
        }
        // Map order is arbitrary; the request's header order should not be.
        forward_claims.sort_by(|a, b| a.1.as_str().cmp(b.1.as_str()).then(a.0.cmp(&b.0)));
        Ok(Self {
            issuer: issuer.to_string(),
            audiences: p.audiences.clone(),
            algorithms,
            // The control plane sends the effective skew (its default
            // when none is configured): zero means none.
            skew: Duration::from_millis(p.clock_skew_ms),
            forward_claims,
            forward_token: p.forward_token,
            keys,
        })
    }

    async fn verify(&self, token: &str, now: SystemTime) -> Result<Principal, AuthFailure> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| header_failure(token))?;
        let alg = header.alg;
        if !self.algorithms.contains(&alg) {
            return Err(AuthFailure::new(
                "algorithm-not-allowed",
                format!("{alg:?} is not allowed for this issuer"),
            ));
        }
        let unavailable = |e: JwksError| AuthFailure::new("jwks-unavailable", e.to_string());
        let mut set = self.keys.keys().await.map_err(unavailable)?;
        let kid = header.kid.as_deref();
        if let Some(kid) = kid
            && set.find(kid).is_none()
        {
            // Perhaps the provider rotated its keys: look again (rate limited).
            set = self
                .keys
                .keys_after_unknown_kid()
                .await
                .map_err(unavailable)?;
        }
        let claims = self.verify_with(&set, kid, alg, token)?;
        check_times(&claims, now, self.skew)?;
        Ok(self.principal(claims))
    }

    /// Signature and issuer/audience checks with the keys that fit the
    /// token: the one its `kid` names, or every key of its algorithm.
    fn verify_with(
        &self,
        set: &KeySet,
        kid: Option<&str>,
        alg: Algorithm,
        token: &str,
    ) -> Result<Map<String, Value>, AuthFailure> {
        let candidates: Vec<&jwks::Key> = match kid {
            Some(kid) => {
                let key = set.find(kid).ok_or_else(|| {
                    AuthFailure::new("unknown-kid", format!("no key {:?}", truncated(kid)))
                })?;
                if !key.accepts(alg) {
                    return Err(AuthFailure::new(
                        "algorithm-not-allowed",
                        format!("key {:?} is not a {alg:?} key", truncated(kid)),
                    ));
                }
                vec![key]
            }
            None => set.iter().filter(|k| k.accepts(alg)).collect(),
        };
        if candidates.is_empty() {
            return Err(AuthFailure::new(
                "unknown-kid",
                format!("no {alg:?} key and the token names none"),
            ));
        }
        let mut validation = Validation::new(alg);
        // Times are checked against the caller's clock (check_times).
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["exp", "iss"]);
        validation.set_issuer(&[&self.issuer]);
        if self.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.audiences);
            validation.required_spec_claims.insert("aud".into());
        }
        let mut last = None;
        for key in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, key.decoding_key(), &validation)
            {
                Ok(data) => return Ok(data.claims),
                // Another key of the set may have signed it.
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => {
                    last = Some(decode_failure(e.kind()))
                }
                Err(e) => return Err(decode_failure(e.kind())),
            }
        }
        Err(last.expect("at least one candidate was tried"))
    }

    fn principal(&self, claims: Map<String, Value>) -> Principal {
        let forward = self
            .forward_claims
            .iter()
            .filter_map(|(claim, header)| {
                let v = claim_value(&claims, claim)?;
                Some((header.clone(), header_value(v)?))
            })
            .collect();
        Principal {
            issuer: self.issuer.clone(),
            subject: claims
                .get("sub")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            scopes: scopes(&claims),
            forward,
            forward_token: self.forward_token,
            claims,
        }
    }
}

fn bearer_token(headers: &HeaderMap) -> Result<Option<&str>, AuthFailure> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(AuthFailure::new(
            "malformed",
            "more than one Authorization header",
        ));
    }
    let Ok(value) = value.to_str() else {
        return Err(AuthFailure::new(
            "malformed",
            "Authorization header is not ASCII",
        ));
    };
    let value = value.trim();
    // A tab after the scheme is read like a space: read as another scheme,
    // the token would pass unverified.
    let (scheme, rest) = value.split_once([' ', '\t']).unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Ok(None);
    }
    let token = rest.trim();
    if token.is_empty() || token.contains(char::is_whitespace) {
        return Err(AuthFailure::new("malformed", "bad bearer token syntax"));
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthFailure::new(
            "malformed",
            format!("token longer than {MAX_TOKEN_BYTES} bytes"),
        ));
    }
    Ok(Some(token))
}

/// Why a token's header does not parse: an algorithm the library does not
/// know (`none` among them) is refused as such, anything else is malformed.
fn header_failure(token: &str) -> AuthFailure {
    let alg = token
        .split('.')
        .next()
        .and_then(|h| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .ok()
        })
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|h| h.get("alg").and_then(Value::as_str).map(str::to_string));
    match alg {
        Some(a) => AuthFailure::new(
            "algorithm-not-allowed",
            format!("algorithm {:?} is not allowed", truncated(&a)),
        ),
        None => AuthFailure::new("malformed", "token header does not parse"),
    }
}

fn decode_failure(kind: &ErrorKind) -> AuthFailure {
    match kind {
        ErrorKind::InvalidSignature => {
            AuthFailure::new("bad-signature", "signature does not verify")
        }
        ErrorKind::InvalidAudience => {
            AuthFailure::new("wrong-audience", "aud names none of the accepted audiences")
        }
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => {
            AuthFailure::new("wrong-audience", "token has no aud claim")
        }
        ErrorKind::MissingRequiredClaim(c) => {
            AuthFailure::new("malformed", format!("token has no {c} claim"))
        }
        ErrorKind::InvalidIssuer => AuthFailure::new("unknown-issuer", "iss does not match"),
        ErrorKind::InvalidAlgorithm | ErrorKind::UnsupportedAlgorithm => {
            AuthFailure::new("algorithm-not-allowed", "algorithm does not fit the key")
        }
        ErrorKind::ExpiredSignature => AuthFailure::new("expired", "token has expired"),
        ErrorKind::ImmatureSignature => AuthFailure::new("not-yet-valid", "token is not valid yet"),
        ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => {
            AuthFailure::new("bad-signature", "key cannot check this token")
        }
        ErrorKind::InvalidClaimFormat(c) => {
            AuthFailure::new("malformed", format!("claim {c} has the wrong type"))
        }
        _ => AuthFailure::new("malformed", "token does not decode"),
    }
}

/// `exp` (required), `nbf` and `iat` against `now`, allowing `skew`.
fn check_times(
    claims: &Map<String, Value>,
    now: SystemTime,
    skew: Duration,
) -> Result<(), AuthFailure> {
    let now = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let skew = skew.as_secs_f64();
    let time = |name: &str| -> Result<Option<f64>, AuthFailure> {
        match claims.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|t| t.is_finite())
                .map(Some)
                .ok_or_else(|| AuthFailure::new("malformed", format!("{name} is not a number"))),
        }
    };
    let exp =
        time("exp")?.ok_or_else(|| AuthFailure::new("malformed", "token has no exp claim"))?;
    if now >= exp + skew {
        return Err(AuthFailure::new("expired", "token has expired"));
    }
    if let Some(nbf) = time("nbf")?
        && now < nbf - skew
    {
        return Err(AuthFailure::new("not-yet-valid", "nbf is in the future"));
    }
    if let Some(iat) = time("iat")?
        && now < iat - skew
    {
        return Err(AuthFailure::new("not-yet-valid", "iat is in the future"));
    }
    Ok(())
}

/// `scope` (space separated) and `scp` (array, or space-separated string).
fn scopes(claims: &Map<String, Value>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |s: &str| {
        if !s.is_empty() && !out.iter().any(|o| o == s) {
            out.push(s.to_string());
        }
    };
    for name in ["scope", "scp"] {
        match claims.get(name) {
            Some(Value::String(s)) => s.split_whitespace().for_each(&mut add),
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).for_each(&mut add),
            _ => {}
        }
    }
    out
}

/// A claim as a header value: strings as they are, other values (and
/// strings with control characters) as compact JSON.
fn header_value(v: &Value) -> Option<HeaderValue> {
    if let Value::String(s) = v
        && let Ok(h) = HeaderValue::from_bytes(s.as_bytes())
    {
        return Some(h);
    }
    HeaderValue::from_str(&serde_json::to_string(v).ok()?).ok()
}

/// Caps token-supplied text quoted in a log detail.
fn truncated(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;
    use crate::gateway::jwks::Timing;
    use crate::gateway::jwks::tests::{jwk_json, jwks_doc};

    const ISS: &str = "https://idp.example.com";
    const AUD: &str = "orders-api";

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn secs() -> u64 {
        now().duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    struct TestKeys {
        rsa: EncodingKey,
        rsa_public_pem: String,
        rsa2: EncodingKey,
        ec: EncodingKey,
    }

    /// Real keys, generated once for the whole test binary (RSA is slow).
    fn keys() -> &'static TestKeys {
        static KEYS: OnceLock<TestKeys> = OnceLock::new();
        KEYS.get_or_init(|| {
            let rsa = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
            let rsa2 = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
            let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            TestKeys {
                rsa: EncodingKey::from_rsa_pem(rsa.serialize_pem().as_bytes()).unwrap(),
                rsa_public_pem: rsa.public_key_pem(),
                rsa2: EncodingKey::from_rsa_pem(rsa2.serialize_pem().as_bytes()).unwrap(),
                ec: EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap(),
            }
        })
    }

    /// The published set: RSA key "r1" and EC key "e1".
    fn published() -> Vec<u8> {
        let k = keys();
        jwks_doc(&[
            jwk_json(&k.rsa, Algorithm::RS256, "r1"),
            jwk_json(&k.ec, Algorithm::ES256, "e1"),
        ])
    }

    fn claims() -> Value {
        json!({
            "iss": ISS,
            "sub": "alice",
            "aud": [AUD, "other"],
            "iat": secs() - 10,
            "exp": secs() + 3600,
            "scope": "orders:read orders:write",
            "tenant": "acme",
            "roles": ["buyer", "admin"],
        })
    }

    fn sign(key: &EncodingKey, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&h, claims, key).unwrap()
    }

    fn rs256(claims: &Value) -> String {
        sign(&keys().rsa, Algorithm::RS256, Some("r1"), claims)
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        h
    }

    fn provider(jwks_file: &std::path::Path) -> v1::JwtProvider {
        v1::JwtProvider {
            issuer: ISS.into(),
            audiences: vec![AUD.into()],
            jwks_file: jwks_file.display().to_string(),
            forward_claims: [
                ("sub", "x-user"),
                ("tenant", "x-tenant"),
                ("roles", "x-roles"),
                ("missing", "x-missing"),
            ]
            .into_iter()
            .map(|(c, h)| (c.to_string(), h.to_string()))
            .collect(),
            // What the control plane sends when no skew is configured.
            clock_skew_ms: 60_000,
            ..Default::default()
        }
    }

    struct Fixture {
        dir: tempfile::TempDir,
        auth: Authenticator,
    }

    impl Fixture {
        fn path(&self) -> std::path::PathBuf {
            self.dir.path().join("jwks.json")
        }
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, published()).unwrap();
        let auth = Authenticator::new(&[provider(&path)], 0).unwrap();
        Fixture { dir, auth }
    }

    async fn rejected(auth: &Authenticator, token: &str) -> AuthFailure {
        match auth.authenticate(&bearer(token), now()).await {
            AuthOutcome::Rejected(f) => f,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    async fn accepted(auth: &Authenticator, token: &str) -> Principal {
        match auth.authenticate(&bearer(token), now()).await {
            AuthOutcome::Authenticated(p) => p,
            other => panic!("expected success, got {other:?}"),
        }
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    #[tokio::test]
    async fn valid_token_gives_principal_with_claims_scopes_and_forward_headers() {
        let f = fixture();
        let p = accepted(&f.auth, &rs256(&claims())).await;
        assert_eq!(p.issuer, ISS);
        assert_eq!(p.subject, "alice");
        assert_eq!(p.scopes, ["orders:read", "orders:write"]);
        assert_eq!(p.claims["tenant"], "acme");
        assert!(!p.forward_token);
        let fwd: Vec<(&str, &str)> = p
            .forward
            .iter()
            .map(|(h, v)| (h.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            fwd,
            [
                ("x-roles", r#"["buyer","admin"]"#),
                ("x-tenant", "acme"),
                ("x-user", "alice"),
            ]
        );
        assert_eq!(
            f.auth.forwarded_header_names(),
            ["x-missing", "x-roles", "x-tenant", "x-user"]
        );
    }

    #[tokio::test]
    async fn a_verified_token_is_remembered_while_its_keys_and_time_last() {
        use std::sync::atomic::Ordering::Relaxed;
        let f = fixture();
        f.auth.set_jwks_timing(Timing {
            every: Duration::ZERO,
            min_interval: Duration::ZERO,
        });
        let hits = || f.auth.verified.hits.load(Relaxed);
        let token = rs256(&claims());
        let t0 = now();
        let p = accepted(&f.auth, &token).await;
        for i in 1..=3 {
            let out = f
                .auth
                .authenticate(&bearer(&token), t0 + Duration::from_secs(i))
                .await;
            assert!(
                matches!(out, AuthOutcome::Authenticated(ref q) if *q == p),
                "{out:?}"
            );
        }
        assert_eq!(hits(), 3, "verified once, remembered after");
        // Not beyond VERIFIED_TTL: then the signature is checked again.
        let later = t0 + VERIFIED_TTL + Duration::from_secs(1);
        accepted_at(&f.auth, &token, later).await;
        assert_eq!(hits(), 3);
        // A tampered token is never taken for the remembered one.
        let mut bad = token.clone();
        bad.push('x');
        assert!(matches!(
            f.auth.authenticate(&bearer(&bad), later).await,
            AuthOutcome::Rejected(_)
        ));
        // The key is withdrawn: refused at once, remembered or not.
        std::fs::write(
            f.path(),
            jwks_doc(&[jwk_json(&keys().rsa2, Algorithm::RS256, "r2")]),
        )
        .unwrap();
        let out = f.auth.authenticate(&bearer(&token), later).await;
        assert!(matches!(out, AuthOutcome::Rejected(_)), "{out:?}");
    }

    async fn accepted_at(auth: &Authenticator, token: &str, at: SystemTime) -> Principal {
        match auth.authenticate(&bearer(token), at).await {
            AuthOutcome::Authenticated(p) => p,
            other => panic!("expected success, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn token_without_kid_is_tried_against_keys_of_its_algorithm() {
        let f = fixture();
        let mut c = claims();
        c["scope"] = Value::Null;
        c["scp"] = json!(["a", "b"]);
        let p = accepted(&f.auth, &sign(&keys().ec, Algorithm::ES256, None, &c)).await;
        assert_eq!(p.scopes, ["a", "b"]);
        accepted(
            &f.auth,
            &sign(&keys().rsa, Algorithm::RS256, None, &claims()),
        )
        .await;
    }

    #[tokio::test]
    async fn no_authorization_header_or_another_scheme_is_anonymous() {
        let f = fixture();
        let out = f.auth.authenticate(&HeaderMap::new(), now()).await;
        assert!(matches!(out, AuthOutcome::Anonymous));
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Basic YWxpY2U6c2VjcmV0"),
        );
        assert!(matches!(
            f.auth.authenticate(&h, now()).await,
            AuthOutcome::Anonymous
        ));
    }

    #[tokio::test]
    async fn bearer_scheme_is_case_insensitive() {
        let f = fixture();
        let mut h = HeaderMap::new();
        let v = format!("bEaReR {}", rs256(&claims()));
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&v).unwrap(),
        );
        assert!(matches!(
            f.auth.authenticate(&h, now()).await,
            AuthOutcome::Authenticated(_)
        ));
    }

    #[tokio::test]
    async fn garbage_and_duplicate_headers_are_malformed() {
        let f = fixture();
        assert_eq!(rejected(&f.auth, "not-a-jwt").await.reason, "malformed");
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer"),
        );
        assert!(matches!(
            f.auth.authenticate(&h, now()).await,
            AuthOutcome::Rejected(AuthFailure {
                reason: "malformed",
                ..
            })
        ));
        let t = rs256(&claims());
        let mut h = bearer(&t);
        h.append(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
        );
        assert!(matches!(
            f.auth.authenticate(&h, now()).await,
            AuthOutcome::Rejected(AuthFailure {
                reason: "malformed",
                ..
            })
        ));
    }

    #[tokio::test]
    async fn expired_token_is_rejected_beyond_the_clock_skew() {
        let f = fixture();
        let mut c = claims();
        c["exp"] = json!(secs() - 120);
        let failure = rejected(&f.auth, &rs256(&c)).await;
        assert_eq!(failure.reason, "expired");
        assert_eq!(
            failure.www_authenticate(),
            "Bearer realm=\"bulwark\", error=\"invalid_token\", error_description=\"the token has expired\""
        );
        // Within the control plane's default 60 s skew: still accepted.
        c["exp"] = json!(secs() - 30);
        accepted(&f.auth, &rs256(&c)).await;
    }

    #[tokio::test]
    async fn clock_skew_comes_from_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, published()).unwrap();
        let mut p = provider(&path);
        p.clock_skew_ms = 1;
        let auth = Authenticator::new(&[p], 0).unwrap();
        let mut c = claims();
        c["exp"] = json!(secs() - 30);
        assert_eq!(rejected(&auth, &rs256(&c)).await.reason, "expired");
    }

    #[tokio::test]
    async fn a_zero_clock_skew_allows_no_leeway() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, published()).unwrap();
        let mut p = provider(&path);
        p.clock_skew_ms = 0;
        let auth = Authenticator::new(&[p], 0).unwrap();
        let mut c = claims();
        c["exp"] = json!(secs() - 1);
        assert_eq!(rejected(&auth, &rs256(&c)).await.reason, "expired");
        c["exp"] = json!(secs() + 60);
        accepted(&auth, &rs256(&c)).await;
    }

    #[tokio::test]
    async fn a_tab_after_bearer_is_still_a_bearer_token() {
        let f = fixture();
        for token in [rs256(&claims()), "forged.token.here".to_string()] {
            let mut h = HeaderMap::new();
            h.insert(
                http::header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer\t{token}")).unwrap(),
            );
            let outcome = f.auth.authenticate(&h, now()).await;
            assert!(
                !matches!(outcome, AuthOutcome::Anonymous),
                "Bearer<TAB> read as no token"
            );
        }
    }

    #[tokio::test]
    async fn token_without_exp_is_rejected() {
        let f = fixture();
        let mut c = claims();
        c.as_object_mut().unwrap().remove("exp");
        assert_eq!(rejected(&f.auth, &rs256(&c)).await.reason, "malformed");
    }

    #[tokio::test]
    async fn not_yet_valid_token_is_rejected() {
        let f = fixture();
        let mut c = claims();
        c["nbf"] = json!(secs() + 300);
        assert_eq!(rejected(&f.auth, &rs256(&c)).await.reason, "not-yet-valid");
        let mut c = claims();
        c["iat"] = json!(secs() + 300);
        assert_eq!(rejected(&f.auth, &rs256(&c)).await.reason, "not-yet-valid");
    }

    #[tokio::test]
    async fn wrong_or_missing_audience_is_rejected() {
        let f = fixture();
        let mut c = claims();
        c["aud"] = json!("billing-api");
        assert_eq!(rejected(&f.auth, &rs256(&c)).await.reason, "wrong-audience");
        c.as_object_mut().unwrap().remove("aud");
        assert_eq!(rejected(&f.auth, &rs256(&c)).await.reason, "wrong-audience");
        c["aud"] = json!(AUD);
        accepted(&f.auth, &rs256(&c)).await;
    }

    #[tokio::test]
    async fn unknown_issuer_is_rejected() {
        let f = fixture();
        let mut c = claims();
        c["iss"] = json!("https://evil.example.com");
        assert_eq!(rejected(&f.auth, &rs256(&c)).await.reason, "unknown-issuer");
        c.as_object_mut().unwrap().remove("iss");
        assert_eq!(rejected(&f.auth, &rs256(&c)).await.reason, "unknown-issuer");
    }

    #[tokio::test]
    async fn tampered_payload_fails_the_signature() {
        let f = fixture();
        let token = rs256(&claims());
        let parts: Vec<&str> = token.split('.').collect();
        let mut c = claims();
        c["sub"] = json!("mallory");
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64(c.to_string().as_bytes()),
            parts[2]
        );
        assert_eq!(rejected(&f.auth, &forged).await.reason, "bad-signature");
        // Signed by a key that is not published, under a published kid.
        let other = sign(&keys().rsa2, Algorithm::RS256, Some("r1"), &claims());
        assert_eq!(rejected(&f.auth, &other).await.reason, "bad-signature");
        let other = sign(&keys().rsa2, Algorithm::RS256, None, &claims());
        assert_eq!(rejected(&f.auth, &other).await.reason, "bad-signature");
    }

    #[tokio::test]
    async fn alg_none_is_rejected() {
        let f = fixture();
        for alg in ["none", "None", "NONE"] {
            let header = json!({"alg": alg, "typ": "JWT", "kid": "r1"});
            let token = format!(
                "{}.{}.",
                b64(header.to_string().as_bytes()),
                b64(claims().to_string().as_bytes())
            );
            assert_eq!(
                rejected(&f.auth, &token).await.reason,
                "algorithm-not-allowed",
                "{alg}"
            );
        }
    }

    #[tokio::test]
    async fn hs256_signed_with_the_public_key_is_rejected() {
        // The classic confusion: the verifier's public key bytes used as
        // an HMAC secret. Refused whatever the provider's algorithm list.
        let secret = EncodingKey::from_secret(keys().rsa_public_pem.as_bytes());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, published()).unwrap();
        for algorithms in [vec![], vec!["RS256".to_string()]] {
            let auth = Authenticator::new(
                &[v1::JwtProvider {
                    algorithms,
                    ..provider(&path)
                }],
                0,
            )
            .unwrap();
            for kid in [Some("r1"), None] {
                let t = sign(&secret, Algorithm::HS256, kid, &claims());
                assert_eq!(rejected(&auth, &t).await.reason, "algorithm-not-allowed");
            }
        }
        // And a provider cannot be configured to accept HMAC at all.
        for alg in ["HS256", "HS384", "HS512", "none"] {
            let r = Authenticator::new(
                &[v1::JwtProvider {
                    algorithms: vec![alg.into()],
                    ..provider(&path)
                }],
                0,
            );
            assert!(r.is_err(), "{alg} must be refused");
        }
    }

    #[tokio::test]
    async fn algorithm_must_fit_the_named_key() {
        let f = fixture();
        // An ES256 token claiming to be signed by the RSA key.
        let t = sign(&keys().ec, Algorithm::ES256, Some("r1"), &claims());
        assert_eq!(rejected(&f.auth, &t).await.reason, "algorithm-not-allowed");
        // RS384 is not in the default list.
        let t = sign(&keys().rsa, Algorithm::RS384, Some("r1"), &claims());
        assert_eq!(rejected(&f.auth, &t).await.reason, "algorithm-not-allowed");
    }

    #[tokio::test]
    async fn unknown_kid_is_rejected() {
        let f = fixture();
        let t = sign(&keys().rsa, Algorithm::RS256, Some("nope"), &claims());
        let failure = rejected(&f.auth, &t).await;
        assert_eq!(failure.reason, "unknown-kid");
    }

    #[tokio::test]
    async fn jwks_file_rotation_is_picked_up_without_a_new_authenticator() {
        let f = fixture();
        f.auth.set_jwks_timing(Timing {
            every: Duration::ZERO,
            min_interval: Duration::ZERO,
        });
        accepted(&f.auth, &rs256(&claims())).await;
        let rotated = sign(&keys().rsa2, Algorithm::RS256, Some("r2"), &claims());
        assert_eq!(rejected(&f.auth, &rotated).await.reason, "unknown-kid");

        std::fs::write(
            f.path(),
            jwks_doc(&[jwk_json(&keys().rsa2, Algorithm::RS256, "r2")]),
        )
        .unwrap();
        accepted(&f.auth, &rotated).await;
        // The retired key is gone with its file entry.
        assert_eq!(
            rejected(&f.auth, &rs256(&claims())).await.reason,
            "unknown-kid"
        );
    }

    #[tokio::test]
    async fn missing_jwks_file_means_jwks_unavailable() {
        let auth = Authenticator::new(
            &[provider(std::path::Path::new("/nonexistent/jwks.json"))],
            0,
        )
        .unwrap();
        let failure = rejected(&auth, &rs256(&claims())).await;
        assert_eq!(failure.reason, "jwks-unavailable");
        assert!(
            !failure
                .www_authenticate()
                .to_str()
                .unwrap()
                .contains("nonexistent")
        );
    }

    #[test]
    fn provider_config_is_checked() {
        let ok = v1::JwtProvider {
            issuer: ISS.into(),
            jwks_file: "/etc/jwks.json".into(),
            ..Default::default()
        };
        assert!(Authenticator::new(std::slice::from_ref(&ok), 0).is_ok());
        let cases = [
            v1::JwtProvider {
                issuer: String::new(),
                ..ok.clone()
            },
            v1::JwtProvider {
                jwks_file: String::new(),
                ..ok.clone()
            },
            v1::JwtProvider {
                jwks_uri: "https://idp.example.com/jwks".into(),
                ..ok.clone()
            },
            v1::JwtProvider {
                jwks_file: String::new(),
                jwks_uri: "http://idp.example.com/jwks".into(),
                ..ok.clone()
            },
            v1::JwtProvider {
                algorithms: vec!["RS257".into()],
                ..ok.clone()
            },
            v1::JwtProvider {
                forward_claims: [("sub".to_string(), "bad header".to_string())].into(),
                ..ok.clone()
            },
            v1::JwtProvider {
                forward_claims: [("sub".to_string(), "Authorization".to_string())].into(),
                ..ok.clone()
            },
            v1::JwtProvider {
                forward_claims: [("sub".to_string(), "x-bulwark-peer-identity".to_string())].into(),
                ..ok.clone()
            },
        ];
        for (i, c) in cases.into_iter().enumerate() {
            assert!(Authenticator::new(&[c], 0).is_err(), "case {i}");
        }
        assert!(matches!(
            Authenticator::new(&[ok.clone(), ok], 0),
            Err(AuthConfigError::DuplicateIssuer { .. })
        ));
    }

    fn principal(claims: Value) -> Principal {
        let claims = claims.as_object().unwrap().clone();
        Principal {
            issuer: ISS.into(),
            subject: "alice".into(),
            scopes: scopes(&claims),
            claims,
            forward: vec![],
            forward_token: false,
        }
    }

    fn rule(
        require: bool,
        scopes: &[&str],
        claims: &[(&str, &[&str])],
    ) -> v1::GatewayAuthorization {
        v1::GatewayAuthorization {
            require_authenticated: require,
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            claims: claims
                .iter()
                .map(|(c, v)| v1::ClaimRequirement {
                    claim: c.to_string(),
                    values: v.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn authorize_without_rule_lets_anyone_in() {
        assert_eq!(authorize(None, None), Ok(()));
        assert_eq!(authorize(None, Some(&rule(false, &[], &[]))), Ok(()));
    }

    #[test]
    fn authorize_requires_a_principal_when_asked() {
        let d = authorize(None, Some(&rule(true, &[], &[]))).unwrap_err();
        assert_eq!(d, Denied::Unauthenticated);
        assert_eq!(d.status(), 401);
        assert_eq!(d.www_authenticate(), "Bearer realm=\"bulwark\"");
        // Required scopes imply a token.
        assert_eq!(
            authorize(None, Some(&rule(false, &["orders:write"], &[]))),
            Err(Denied::Unauthenticated)
        );
        let p = principal(json!({"sub": "alice"}));
        assert_eq!(authorize(Some(&p), Some(&rule(true, &[], &[]))), Ok(()));
    }

    #[test]
    fn authorize_checks_every_scope() {
        let p = principal(json!({"scope": "orders:read orders:write"}));
        assert_eq!(
            authorize(Some(&p), Some(&rule(true, &["orders:write"], &[]))),
            Ok(())
        );
        let d = authorize(Some(&p), Some(&rule(true, &["orders:read", "admin"], &[]))).unwrap_err();
        assert_eq!(
            d,
            Denied::Forbidden {
                missing: "scope admin".into()
            }
        );
        assert_eq!(d.status(), 403);
        assert_eq!(
            d.www_authenticate(),
            "Bearer realm=\"bulwark\", error=\"insufficient_scope\", scope=\"admin\""
        );
        let p = principal(json!({"scp": ["orders:write"]}));
        assert_eq!(
            authorize(Some(&p), Some(&rule(false, &["orders:write"], &[]))),
            Ok(())
        );
    }

    #[test]
    fn authorize_checks_claims() {
        let p = principal(json!({
            "tenant": "acme",
            "roles": ["buyer", "admin"],
            "groups": "eng ops",
            "email_verified": true,
            "realm_access": {"roles": ["gold"]},
        }));
        let ok = |c: &[(&str, &[&str])]| authorize(Some(&p), Some(&rule(true, &[], c)));
        assert_eq!(ok(&[("tenant", &["acme", "globex"])]), Ok(()));
        assert_eq!(ok(&[("roles", &["admin"])]), Ok(()));
        assert_eq!(ok(&[("groups", &["ops"])]), Ok(()));
        assert_eq!(ok(&[("email_verified", &["true"])]), Ok(()));
        assert_eq!(ok(&[("realm_access.roles", &["gold"])]), Ok(()));
        assert_eq!(ok(&[("tenant", &[])]), Ok(()));
        let d = ok(&[("tenant", &["acme"]), ("roles", &["root"])]).unwrap_err();
        assert_eq!(
            d,
            Denied::Forbidden {
                missing: "claim roles".into()
            }
        );
        assert_eq!(
            d.www_authenticate(),
            "Bearer realm=\"bulwark\", error=\"insufficient_scope\", error_description=\"missing claim roles\""
        );
        assert!(ok(&[("tenant", &["acm"])]).is_err());
        assert!(ok(&[("absent", &[])]).is_err());
    }

    // --- JWKS over https, from a local TLS server --------------------------

    struct JwksServer {
        uri: String,
        ca_file: String,
        doc: Arc<std::sync::Mutex<Vec<u8>>>,
        hits: Arc<AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
        _dir: tempfile::TempDir,
    }

    impl Drop for JwksServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// A TLS server for `localhost` (under a test CA) that serves the
    /// current `doc` at /jwks and counts requests.
    async fn jwks_server(doc: Vec<u8>) -> JwksServer {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();

        let server = rustls::ServerConfig::builder_with_provider(bulwark_ca::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls_pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let doc = Arc::new(std::sync::Mutex::new(doc));
        let hits = Arc::new(AtomicUsize::new(0));
        let (d, h) = (doc.clone(), hits.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, d, h) = (acceptor.clone(), d.clone(), h.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |_req| {
                        h.fetch_add(1, Ordering::SeqCst);
                        let body = d.lock().unwrap().clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(hyper::body::Bytes::from(body)),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        JwksServer {
            uri: format!("https://localhost:{port}/jwks"),
            ca_file: ca_file.display().to_string(),
            doc,
            hits,
            task,
            _dir: dir,
        }
    }

    fn https_provider(server: &JwksServer) -> v1::JwtProvider {
        v1::JwtProvider {
            issuer: ISS.into(),
            jwks_uri: server.uri.clone(),
            jwks_ca_file: server.ca_file.clone(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn https_jwks_is_fetched_once_and_cached() {
        let server = jwks_server(published()).await;
        let auth = Authenticator::new(&[https_provider(&server)], 0).unwrap();
        accepted(&auth, &rs256(&claims())).await;
        accepted(
            &auth,
            &sign(&keys().ec, Algorithm::ES256, Some("e1"), &claims()),
        )
        .await;
        assert_eq!(server.hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn https_jwks_is_refetched_on_unknown_kid_and_rate_limited() {
        let server = jwks_server(published()).await;
        let auth = Authenticator::new(&[https_provider(&server)], 0).unwrap();
        accepted(&auth, &rs256(&claims())).await;

        // The provider rotates in a new key.
        *server.doc.lock().unwrap() = jwks_doc(&[
            jwk_json(&keys().rsa, Algorithm::RS256, "r1"),
            jwk_json(&keys().rsa2, Algorithm::RS256, "r2"),
        ]);
        let rotated = sign(&keys().rsa2, Algorithm::RS256, Some("r2"), &claims());
        // Right after a fetch, an unknown kid does not fetch again.
        assert_eq!(rejected(&auth, &rotated).await.reason, "unknown-kid");
        assert_eq!(server.hits.load(Ordering::SeqCst), 1);

        // Once the minimum interval has passed, it does.
        auth.set_jwks_timing(Timing {
            every: jwks::DEFAULT_REFRESH,
            min_interval: Duration::ZERO,
        });
        accepted(&auth, &rotated).await;
        assert_eq!(server.hits.load(Ordering::SeqCst), 2);
        accepted(&auth, &rotated).await;
        assert_eq!(server.hits.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn concurrent_unknown_kids_share_one_fetch() {
        let server = jwks_server(published()).await;
        let auth = Arc::new(Authenticator::new(&[https_provider(&server)], 0).unwrap());
        auth.set_jwks_timing(Timing {
            every: jwks::DEFAULT_REFRESH,
            min_interval: Duration::ZERO,
        });
        // First load: many callers, one fetch.
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let auth = auth.clone();
            set.spawn(async move { auth.authenticate(&bearer(&rs256(&claims())), now()).await });
        }
        while let Some(r) = set.join_next().await {
            assert!(matches!(r.unwrap(), AuthOutcome::Authenticated(_)));
        }
        assert_eq!(server.hits.load(Ordering::SeqCst), 1);

        // Then many tokens with a new kid at once: one more fetch.
        *server.doc.lock().unwrap() = jwks_doc(&[jwk_json(&keys().rsa2, Algorithm::RS256, "r2")]);
        let rotated = sign(&keys().rsa2, Algorithm::RS256, Some("r2"), &claims());
        for _ in 0..8 {
            let (auth, t) = (auth.clone(), rotated.clone());
            set.spawn(async move { auth.authenticate(&bearer(&t), now()).await });
        }
        while let Some(r) = set.join_next().await {
            assert!(matches!(r.unwrap(), AuthOutcome::Authenticated(_)));
        }
        assert_eq!(server.hits.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn https_jwks_failures_keep_the_last_good_keys() {
        let server = jwks_server(published()).await;
        let auth = Authenticator::new(&[https_provider(&server)], 0).unwrap();
        accepted(&auth, &rs256(&claims())).await;
        auth.set_jwks_timing(Timing {
            every: Duration::ZERO,
            min_interval: Duration::ZERO,
        });
        // A broken document, then no server at all.
        *server.doc.lock().unwrap() = b"<html>oops</html>".to_vec();
        accepted(&auth, &rs256(&claims())).await;
        let hits = server.hits.load(Ordering::SeqCst);
        assert!(hits >= 2, "{hits}");
        drop(server);
        accepted(&auth, &rs256(&claims())).await;
    }

    #[tokio::test]
    async fn https_jwks_server_not_trusted_is_unavailable() {
        let server = jwks_server(published()).await;
        let other = jwks_server(published()).await;
        // Verified against another CA: the TLS handshake fails.
        let auth = Authenticator::new(
            &[v1::JwtProvider {
                jwks_ca_file: other.ca_file.clone(),
                ..https_provider(&server)
            }],
            0,
        )
        .unwrap();
        assert_eq!(
            rejected(&auth, &rs256(&claims())).await.reason,
            "jwks-unavailable"
        );
        assert_eq!(server.hits.load(Ordering::SeqCst), 0);
    }
}
