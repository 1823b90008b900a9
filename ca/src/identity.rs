//! SPIFFE identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

/// Why a string is not a SPIFFE ID Bulwark accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("SPIFFE ID must start with spiffe://, got {0:?}")]
    Scheme(String),
    #[error("invalid trust domain {0:?}: use lowercase letters, digits, '.', '-' and '_'")]
    TrustDomain(String),
    #[error("SPIFFE ID path must be /ns/<namespace>/sa/<service-account>, got {0:?}")]
    Path(String),
    #[error("SPIFFE ID is longer than 2048 bytes")]
    TooLong,
}

/// A workload identity in the form Bulwark issues. Immutable once parsed.
///
/// Kept as its URI, shared: every request a sidecar proxies names one or
/// two identities (metrics labels, the pool key, the peer header), so a
/// clone is a reference count and printing it is a copy, not a format.
#[derive(Clone)]
pub struct SpiffeId {
    uri: std::sync::Arc<str>,
    /// Byte ranges of the three parts within `uri`.
    trust_domain: std::ops::Range<usize>,
    namespace: std::ops::Range<usize>,
    service_account: std::ops::Range<usize>,
}

const SCHEME: &str = "spiffe://";

impl PartialEq for SpiffeId {
    fn eq(&self, other: &Self) -> bool {
        self.uri == other.uri
    }
}
impl Eq for SpiffeId {}

impl std::hash::Hash for SpiffeId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.uri.hash(state);
    }
}

/// Ordered by trust domain, then namespace, then service account.
impl Ord for SpiffeId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        fn key(id: &SpiffeId) -> (&str, &str, &str) {
            (id.trust_domain(), id.namespace(), id.service_account())
        }
        key(self).cmp(&key(other))
    }
}
impl PartialOrd for SpiffeId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SpiffeId").field(&&*self.uri).finish()
    }
}

fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
}

/// Path segments follow Kubernetes naming (DNS-1123 label-ish), which is also
/// within the SPIFFE path character set.
fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
}

/// The namespace of the mesh's own services.
pub const SYSTEM_NAMESPACE: &str = "bulwark-system";
/// Service accounts of the mesh's own services. Sidecars recognise the CA
/// and the control plane by these identities alone, so they are never
/// issued through `Sign`: both services issue their serving certificates
/// from the CA directory themselves.
pub const RESERVED_SERVICE_ACCOUNTS: [&str; 2] = ["bulwark-ca", "bulwark-xds"];

impl SpiffeId {
    /// The CA's own identity in `trust_domain`.
    pub fn ca(trust_domain: &str) -> Result<Self, IdentityError> {
        Self::new(trust_domain, SYSTEM_NAMESPACE, RESERVED_SERVICE_ACCOUNTS[0])
    }

    /// The control plane's own identity in `trust_domain`.
    pub fn control_plane(trust_domain: &str) -> Result<Self, IdentityError> {
        Self::new(trust_domain, SYSTEM_NAMESPACE, RESERVED_SERVICE_ACCOUNTS[1])
    }

    /// Whether this is the identity of one of the mesh's own services.
    pub fn is_reserved(&self) -> bool {
        self.namespace() == SYSTEM_NAMESPACE
            && RESERVED_SERVICE_ACCOUNTS.contains(&self.service_account())
    }

    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        if !valid_trust_domain(trust_domain) {
            return Err(IdentityError::TrustDomain(trust_domain.to_string()));
        }
        if !valid_segment(namespace) || !valid_segment(service_account) {
            return Err(IdentityError::Path(format!(
                "/ns/{namespace}/sa/{service_account}"
            )));
        }
        let uri = format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        let td = SCHEME.len()..SCHEME.len() + trust_domain.len();
        let ns = td.end + "/ns/".len()..td.end + "/ns/".len() + namespace.len();
        let sa = ns.end + "/sa/".len()..uri.len();
        Ok(Self {
            uri: uri.into(),
            trust_domain: td,
            namespace: ns,
            service_account: sa,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.uri[self.trust_domain.clone()]
    }
    pub fn namespace(&self) -> &str {
        &self.uri[self.namespace.clone()]
    }
    pub fn service_account(&self) -> &str {
        &self.uri[self.service_account.clone()]
    }
    /// The URI, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > 2048 {
            return Err(IdentityError::TooLong);
        }
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::Scheme(s.to_string()))?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| IdentityError::Path(String::new()))?;
        if !valid_trust_domain(td) {
            return Err(IdentityError::TrustDomain(td.to_string()));
        }
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] => SpiffeId::new(td, ns, sa),
            _ => Err(IdentityError::Path(format!("/{path}"))),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Checks a bare trust domain name (as given to `ca init --trust-domain`).
pub fn validate_trust_domain(td: &str) -> Result<(), IdentityError> {
    if valid_trust_domain(td) {
        Ok(())
    } else {
        Err(IdentityError::TrustDomain(td.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(
            id,
            SpiffeId::new("cluster.local", "default", "web").unwrap()
        );
    }

    #[test]
    fn orders_by_trust_domain_then_namespace_then_account() {
        let id = |s: &str| s.parse::<SpiffeId>().unwrap();
        // By the URI string, "a-b" < "a/"; by parts, "a" < "a-b".
        assert!(id("spiffe://td/ns/a/sa/z") < id("spiffe://td/ns/a-b/sa/a"));
        assert!(id("spiffe://a/ns/z/sa/z") < id("spiffe://b/ns/a/sa/a"));
        assert!(id("spiffe://td/ns/a/sa/a") < id("spiffe://td/ns/a/sa/b"));
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/a/xx/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local/ns/a%2f/sa/b",
            "spiffe://user@cluster.local/ns/a/sa/b",
            "spiffe://cluster.local:8080/ns/a/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} should be rejected");
        }
    }
}
