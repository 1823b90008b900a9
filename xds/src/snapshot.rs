//! What the control plane serves at one moment: per type URL, a map of
//! resource name → (version, encoding), built from the compiled config, the
//! endpoints of connected sidecars and the trust bundle.
//!
//! A snapshot is immutable; a new one is built when any input changes.
//! Versions are content hashes (see [`resource_version`]), so two replicas
//! given the same inputs build identical snapshots, and a sidecar holding a
//! resource from one replica is not sent it again by another.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use aws_lc_rs::digest;
use bulwark_proto::config::v1 as pb;
use bulwark_proto::config::{Resources, type_url};

use crate::canonical::{self, Schema};

/// Resources whose encoding is larger than this are not served as they are
/// (an error in the log): every response must fit in the discovery
/// stream's 4 MiB message limit, with room for the envelope. Such a
/// resource stays at its last good version, if it had one.
pub const MAX_RESOURCE_BYTES: usize = 3 * 1024 * 1024;

/// Name of the MeshConfig resource.
pub const MESH_NAME: &str = "mesh";
/// Name of the TrustBundle resource.
pub const BUNDLE_NAME: &str = "bundle";

/// One resource as served: its content version and protobuf encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionedResource {
    /// Shared with every stream that holds this version (see `stream`).
    pub version: Arc<str>,
    pub encoded: Vec<u8>,
}

/// Endpoints contributed by the registry, by service (`namespace/name`).
pub type RegistryEndpoints = BTreeMap<String, Vec<pb::Endpoint>>;

/// The resources of one type, by name. Names are shared with the streams
/// that hold them: a thousand sidecars each holding every name cost a
/// reference count each, not a copy.
pub type TypeResources = BTreeMap<Arc<str>, Arc<VersionedResource>>;

/// Everything served at one moment. See the module docs.
#[derive(Debug)]
pub struct Snapshot {
    system_version: String,
    created: Instant,
    created_at: SystemTime,
    /// Indexed like [`type_url::ALL`]. Shared: a stream holding exactly a
    /// type's resources refers to them rather than keeping its own map.
    types: [Arc<TypeResources>; type_url::ALL.len()],
    /// Names whose content was too large to serve, by type URL index: a
    /// stream never tells a sidecar to remove one of them (it keeps what it
    /// has), even from a control plane that never served it.
    withheld: [BTreeSet<Arc<str>>; type_url::ALL.len()],
}

impl Snapshot {
    /// How many resources of `type_url` had content too large to serve
    /// (each at its last good version, or left out if it had none).
    pub fn oversized(&self, type_url: &str) -> usize {
        self.withheld(type_url).len()
    }

    /// Names of `type_url` whose content was too large to serve.
    pub fn withheld(&self, type_url: &str) -> &BTreeSet<Arc<str>> {
        static NONE: BTreeSet<Arc<str>> = BTreeSet::new();
        type_index(type_url).map_or(&NONE, |i| &self.withheld[i])
    }
}

/// The content version of an encoded resource: the first 16 hex digits of
/// the SHA-256 of its (canonical) protobuf encoding.
pub fn resource_version(encoded: &[u8]) -> String {
    short_hex(digest::digest(&digest::SHA256, encoded).as_ref())
}

fn short_hex(d: &[u8]) -> String {
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Position of `type_url` in [`type_url::ALL`].
pub fn type_index(type_url: &str) -> Option<usize> {
    type_url::ALL.iter().position(|t| *t == type_url)
}

/// `Service` from `type.googleapis.com/bulwark.config.v1.Service`: short,
/// for metric labels and the CLI.
pub fn kind_of(type_url: &str) -> &str {
    type_url.rsplit('.').next().unwrap_or(type_url)
}

impl Snapshot {
    /// Builds a snapshot. `endpoints` are the registry's endpoints by
    /// service; they are merged with the config's own (ServiceEntry)
    /// endpoints of the same service. `roots_pem` holds one PEM certificate
    /// per trusted root; empty means no TrustBundle resource.
    pub fn build(config: &Resources, endpoints: &RegistryEndpoints, roots_pem: &[String]) -> Self {
        Self::build_after(None, config, endpoints, roots_pem)
    }

    /// [`Snapshot::build`], after `previous` (the snapshot being served):
    /// a resource whose new content is too large to serve keeps its version
    /// there, so sidecars keep it rather than being told to remove it.
    pub fn build_after(
        previous: Option<&Snapshot>,
        config: &Resources,
        endpoints: &RegistryEndpoints,
        roots_pem: &[String],
    ) -> Self {
        let mut b = Builder {
            previous,
            types: Default::default(),
            withheld: Default::default(),
        };
        if !roots_pem.is_empty() {
            let bundle = pb::TrustBundle {
                roots_pem: roots_pem.to_vec(),
                source: None,
            };
            b.add(
                type_url::TRUST_BUNDLE,
                BUNDLE_NAME,
                &bundle,
                canonical::NO_MAPS,
            );
        }
        if let Some(mesh) = &config.mesh {
            b.add(type_url::MESH_CONFIG, MESH_NAME, mesh, canonical::NO_MAPS);
        }
        for s in &config.services {
            b.add(
                type_url::SERVICE,
                &qualified(&s.namespace, &s.name),
                s,
                canonical::SERVICE,
            );
        }
        for s in &config.service_entries {
            b.add(
                type_url::SERVICE_ENTRY,
                &qualified(&s.namespace, &s.name),
                s,
                canonical::SERVICE_ENTRY,
            );
        }
        for (name, eps) in merge_endpoints(config, endpoints) {
            b.add(
                type_url::SERVICE_ENDPOINTS,
                &name,
                &eps,
                canonical::SERVICE_ENDPOINTS,
            );
        }
        for p in &config.authorization_policies {
            b.add(
                type_url::AUTHORIZATION_POLICY,
                &qualified(&p.namespace, &p.name),
                p,
                canonical::NO_MAPS,
            );
        }
        for p in &config.traffic_policies {
            b.add(
                type_url::TRAFFIC_POLICY,
                &qualified(&p.namespace, &p.name),
                p,
                canonical::NO_MAPS,
            );
        }
        for r in &config.routes {
            b.add(
                type_url::ROUTE,
                &qualified(&r.namespace, &r.name),
                r,
                canonical::ROUTE,
            );
        }
        for g in &config.gateways {
            b.add(
                type_url::GATEWAY,
                &qualified(&g.namespace, &g.name),
                g,
                canonical::GATEWAY,
            );
        }
        for a in &config.request_authentications {
            b.add(
                type_url::REQUEST_AUTHENTICATION,
                &qualified(&a.namespace, &a.name),
                a,
                canonical::REQUEST_AUTHENTICATION,
            );
        }
        b.finish()
    }

    /// Hash over every (type URL, name, version), sorted: equal for equal
    /// content on any replica.
    pub fn system_version(&self) -> &str {
        &self.system_version
    }

    /// When this snapshot was built (for apply latency).
    pub fn created(&self) -> Instant {
        self.created
    }

    /// When this snapshot was built, wall clock (for status).
    pub fn created_at(&self) -> SystemTime {
        self.created_at
    }

    /// The resources of a type; `None` for a type URL this server does not serve.
    pub fn resources(&self, type_url: &str) -> Option<&TypeResources> {
        type_index(type_url).map(|i| &*self.types[i])
    }

    /// The same, shared.
    pub(crate) fn shared_resources(&self, type_url: &str) -> Option<&Arc<TypeResources>> {
        type_index(type_url).map(|i| &self.types[i])
    }

    /// Every resource's version, by type URL then name.
    pub fn versions(&self) -> BTreeMap<&'static str, BTreeMap<String, String>> {
        type_url::ALL
            .iter()
            .zip(&self.types)
            .map(|(t, rs)| {
                let v = rs
                    .iter()
                    .map(|(n, r)| (n.to_string(), r.version.to_string()))
                    .collect();
                (*t, v)
            })
            .collect()
    }
}

fn qualified(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// One ServiceEndpoints per Service (possibly empty: "no endpoints" is
/// information too) and per ServiceEntry with endpoints. A name present in
/// both gets the config's endpoints first, then the registry's.
fn merge_endpoints(
    config: &Resources,
    registry: &RegistryEndpoints,
) -> BTreeMap<String, pb::ServiceEndpoints> {
    let mut merged: BTreeMap<String, pb::ServiceEndpoints> = BTreeMap::new();
    for e in &config.endpoints {
        merged
            .entry(e.service.clone())
            .or_insert_with(|| pb::ServiceEndpoints {
                service: e.service.clone(),
                endpoints: Vec::new(),
                source: e.source.clone(),
            })
            .endpoints
            .extend(e.endpoints.iter().cloned());
    }
    for s in &config.services {
        let name = qualified(&s.namespace, &s.name);
        let entry = merged
            .entry(name.clone())
            .or_insert_with(|| pb::ServiceEndpoints {
                service: name.clone(),
                endpoints: Vec::new(),
                source: s.source.clone(),
            });
        if let Some(eps) = registry.get(&name) {
            entry.endpoints.extend(eps.iter().cloned());
        }
    }
    merged
}

struct Builder<'a> {
    previous: Option<&'a Snapshot>,
    types: [TypeResources; type_url::ALL.len()],
    withheld: [BTreeSet<Arc<str>>; type_url::ALL.len()],
}

impl Builder<'_> {
    fn add<M: prost::Message>(&mut self, type_url: &str, name: &str, msg: &M, schema: Schema) {
        let i = type_index(type_url).expect("a type of type_url::ALL");
        if self.types[i].contains_key(name) {
            // Validation rejects duplicate names; should one slip through,
            // the first document wins, as in compilation.
            tracing::warn!(type_url, name, "duplicate resource name; keeping the first");
            return;
        }
        let encoded = canonical::encode(msg, schema);
        if encoded.len() > MAX_RESOURCE_BYTES {
            self.withheld[i].insert(name.into());
            let kept = self
                .previous
                .and_then(|p| p.types[i].get_key_value(name))
                .map(|(n, r)| (n.clone(), r.clone()));
            tracing::error!(
                type_url,
                name,
                bytes = encoded.len(),
                limit = MAX_RESOURCE_BYTES,
                kept_version = kept.as_ref().map(|(_, r)| &*r.version),
                "resource is too large to serve; its last good version stays"
            );
            if let Some((name, r)) = kept {
                self.types[i].insert(name, r);
            }
            return;
        }
        let version = resource_version(&encoded).into();
        self.types[i].insert(
            name.into(),
            Arc::new(VersionedResource { version, encoded }),
        );
    }

    fn finish(self) -> Snapshot {
        let mut ctx = digest::Context::new(&digest::SHA256);
        let mut sorted: Vec<(&str, &TypeResources)> =
            type_url::ALL.iter().copied().zip(&self.types).collect();
        sorted.sort_by_key(|(t, _)| *t);
        for (t, resources) in sorted {
            for (name, r) in resources {
                // NUL and newline cannot occur in type URLs, names or hex.
                for part in [t, "\0", name, "\0", &r.version, "\n"] {
                    ctx.update(part.as_bytes());
                }
            }
        }
        Snapshot {
            system_version: short_hex(ctx.finish().as_ref()),
            created: Instant::now(),
            created_at: SystemTime::now(),
            types: self.types.map(Arc::new),
            withheld: self.withheld,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const CONFIG: &str = r#"apiVersion: bulwark.dev/v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  ports: [{port: 8080}]
  selector: {app: api, tier: backend}
---
apiVersion: bulwark.dev/v1
kind: ServiceEntry
metadata: {name: payments, namespace: shop}
spec:
  hosts: [payments.example.com]
  ports: [{port: 443, protocol: tcp}]
  endpoints:
    - address: 192.0.2.10
---
apiVersion: bulwark.dev/v1
kind: MeshConfig
metadata: {name: mesh}
spec:
  trustDomain: cluster.local
"#;

    fn config() -> Resources {
        crate::compile_str(Path::new("mesh.yaml"), CONFIG).unwrap_or_else(|e| panic!("{e}"))
    }

    fn endpoint(addr: &str) -> pb::Endpoint {
        pb::Endpoint {
            address: addr.into(),
            identity: "spiffe://cluster.local/ns/shop/sa/api".into(),
            weight: 1,
            ..Default::default()
        }
    }

    #[test]
    fn resources_are_named_by_namespace_and_name() {
        let snap = Snapshot::build(&config(), &RegistryEndpoints::new(), &["PEM".into()]);
        let names = |t| {
            snap.resources(t)
                .unwrap()
                .keys()
                .map(|k| k.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(type_url::SERVICE), ["shop/api"]);
        assert_eq!(names(type_url::SERVICE_ENTRY), ["shop/payments"]);
        assert_eq!(names(type_url::MESH_CONFIG), [MESH_NAME]);
        assert_eq!(names(type_url::TRUST_BUNDLE), [BUNDLE_NAME]);
        assert_eq!(
            names(type_url::SERVICE_ENDPOINTS),
            ["shop/api", "shop/payments"]
        );
    }

    #[test]
    fn equal_inputs_give_equal_versions() {
        let eps = RegistryEndpoints::from([("shop/api".into(), vec![endpoint("10.0.0.1")])]);
        let a = Snapshot::build(&config(), &eps, &[]);
        let b = Snapshot::build(&config(), &eps, &[]);
        assert_eq!(a.versions(), b.versions());
        assert_eq!(a.system_version(), b.system_version());
        assert_eq!(a.system_version().len(), 16);
    }

    #[test]
    fn registry_endpoints_change_only_their_service() {
        let none = Snapshot::build(&config(), &RegistryEndpoints::new(), &[]);
        let eps = RegistryEndpoints::from([("shop/api".into(), vec![endpoint("10.0.0.1")])]);
        let some = Snapshot::build(&config(), &eps, &[]);
        let (a, b) = (none.versions(), some.versions());
        let mut changed = Vec::new();
        for t in type_url::ALL {
            for (n, v) in &a[t] {
                if b[t].get(n) != Some(v) {
                    changed.push((t, n.as_str()));
                }
            }
        }
        assert_eq!(changed, [(type_url::SERVICE_ENDPOINTS, "shop/api")]);
        assert_ne!(none.system_version(), some.system_version());
    }

    #[test]
    fn service_entry_and_registry_endpoints_merge_by_service() {
        let mut cfg = config();
        // A Service of the same name as the ServiceEntry.
        let mut svc = cfg.services[0].clone();
        svc.name = "payments".into();
        cfg.services.push(svc);
        let eps = RegistryEndpoints::from([("shop/payments".into(), vec![endpoint("10.0.0.9")])]);
        let snap = Snapshot::build(&cfg, &eps, &[]);
        let r = &snap.resources(type_url::SERVICE_ENDPOINTS).unwrap()["shop/payments"];
        let decoded =
            <pb::ServiceEndpoints as prost::Message>::decode(r.encoded.as_slice()).unwrap();
        let addrs: Vec<&str> = decoded
            .endpoints
            .iter()
            .map(|e| e.address.as_str())
            .collect();
        assert_eq!(addrs, ["192.0.2.10", "10.0.0.9"]);
    }

    #[test]
    fn a_resource_grown_too_large_stays_at_its_last_good_version() {
        let eps = |n: usize| {
            RegistryEndpoints::from([(
                "shop/api".into(),
                (0..n)
                    .map(|i| {
                        let mut e =
                            endpoint(&format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255));
                        e.labels.insert("pad".into(), "x".repeat(250));
                        e
                    })
                    .collect(),
            )])
        };
        let good = Snapshot::build(&config(), &eps(10), &[]);
        let kept = &good.resources(type_url::SERVICE_ENDPOINTS).unwrap()["shop/api"];
        assert_eq!(good.oversized(type_url::SERVICE_ENDPOINTS), 0);
        // About 4 MiB of endpoints: too large to serve.
        let big = eps(14_000);
        let after = Snapshot::build_after(Some(&good), &config(), &big, &[]);
        let r = &after.resources(type_url::SERVICE_ENDPOINTS).unwrap()["shop/api"];
        assert!(Arc::ptr_eq(r, kept), "the last good version is served");
        assert_eq!(after.oversized(type_url::SERVICE_ENDPOINTS), 1);
        assert_eq!(after.system_version(), good.system_version());
        // With no earlier version there is nothing to keep.
        let fresh = Snapshot::build(&config(), &big, &[]);
        assert!(
            !fresh
                .resources(type_url::SERVICE_ENDPOINTS)
                .unwrap()
                .contains_key("shop/api")
        );
        assert_eq!(fresh.oversized(type_url::SERVICE_ENDPOINTS), 1);
        // Back under the limit, the new content is served.
        let smaller = Snapshot::build_after(Some(&after), &config(), &eps(11), &[]);
        let r = &smaller.resources(type_url::SERVICE_ENDPOINTS).unwrap()["shop/api"];
        assert_ne!(r.version, kept.version);
        assert_eq!(smaller.oversized(type_url::SERVICE_ENDPOINTS), 0);
    }

    #[test]
    fn version_is_a_prefix_of_the_sha256_of_the_encoding() {
        assert_eq!(resource_version(b""), "e3b0c44298fc1c14");
    }
}
