//! The endpoint registry: workloads announced by connected sidecars.
//!
//! A sidecar announces a [`Node`] on its discovery stream; once the node's
//! claims check out against the stream's client certificate it becomes a
//! [`Workload`], and an endpoint of every Service that lists its identity or
//! whose selector its labels match. When its last stream closes the
//! workload stays for a grace period, so a sidecar that merely reconnects
//! (to this or another replica) does not flap out of every load balancer.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bulwark_ca::SpiffeId;
use bulwark_proto::config::v1 as pb;
use bulwark_proto::xds::v1::Node;
use tokio::sync::watch;

/// Default for how long a disconnected sidecar's endpoints stay.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);
/// Most ports a node may announce.
pub const MAX_PORTS: usize = 64;
/// Most labels a node may announce.
pub const MAX_LABELS: usize = 64;
/// Longest label key or value, and node id.
pub const MAX_LABEL_LEN: usize = 253;
/// Most bytes of label keys and values a node may announce in all.
pub const MAX_LABEL_BYTES: usize = 4096;
/// Default for how many node ids one identity may keep registered from one
/// source address. A pod runs one sidecar under one node id, so more is
/// one client minting registrations, each an endpoint of its services.
pub const DEFAULT_NODES_PER_SOURCE: usize = 16;

/// Why a node announcement was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("node claims identity {claimed} but its certificate is {actual}")]
    IdentityMismatch { claimed: String, actual: String },
    #[error("node claims namespace {claimed:?} but its certificate is for namespace {actual:?}")]
    NamespaceMismatch { claimed: String, actual: String },
    #[error("node address {0:?} is not an IP address")]
    Address(String),
    #[error("node id must be 1 to {MAX_LABEL_LEN} characters")]
    Id,
    #[error("node announces {0} ports; at most {MAX_PORTS} are accepted")]
    TooManyPorts(usize),
    #[error("node port {0} is not in 1..=65535")]
    Port(u32),
    #[error("node announces {0} labels; at most {MAX_LABELS} are accepted")]
    TooManyLabels(usize),
    #[error("node label {0:?} is empty or longer than {MAX_LABEL_LEN} characters")]
    Label(String),
    #[error("node labels total {0} bytes; at most {MAX_LABEL_BYTES} are accepted")]
    LabelBytes(usize),
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{identity} already registers {held} node ids from {address}; at most {limit} are accepted (a reconnect under a registered node id always is)"
)]
pub struct RegistryFull {
    pub identity: String,
    pub address: IpAddr,
    pub held: usize,
    pub limit: usize,
}

impl NodeError {
    /// Claims about who the node is fail authorization; the rest are malformed input.
    pub fn is_permission(&self) -> bool {
        matches!(
            self,
            NodeError::IdentityMismatch { .. } | NodeError::NamespaceMismatch { .. }
        )
    }
}

/// A sidecar's announcement, checked against its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub node_id: String,
    pub identity: SpiffeId,
    /// The identity's namespace: selectors only match workloads in the
    /// Service's own namespace.
    pub namespace: String,
    pub address: IpAddr,
    pub ports: Vec<u32>,
    pub labels: BTreeMap<String, String>,
    /// Reported by the workload's own sidecar (active health check).
    pub unhealthy: bool,
}

impl Workload {
    /// Checks `node` against `peer`, the SPIFFE ID of the stream's client
    /// certificate. The node's namespace may be left empty (the identity's
    /// is used) but may not differ from it: otherwise a workload could join
    /// another namespace's services by copying their selector labels.
    pub fn from_node(node: &Node, peer: &SpiffeId) -> Result<Self, NodeError> {
        if node.identity != peer.to_string() {
            return Err(NodeError::IdentityMismatch {
                claimed: node.identity.clone(),
                actual: peer.to_string(),
            });
        }
        if !node.namespace.is_empty() && node.namespace != peer.namespace() {
            return Err(NodeError::NamespaceMismatch {
                claimed: node.namespace.clone(),
                actual: peer.namespace().to_string(),
            });
        }
        let address: IpAddr = node
            .address
            .parse()
            .map_err(|_| NodeError::Address(node.address.clone()))?;
        if node.id.is_empty() || node.id.len() > MAX_LABEL_LEN {
            return Err(NodeError::Id);
        }
        if node.ports.len() > MAX_PORTS {
            return Err(NodeError::TooManyPorts(node.ports.len()));
        }
        if let Some(&p) = node.ports.iter().find(|&&p| p == 0 || p > 65535) {
            return Err(NodeError::Port(p));
        }
        if node.labels.len() > MAX_LABELS {
            return Err(NodeError::TooManyLabels(node.labels.len()));
        }
        let bad = |s: &String| s.len() > MAX_LABEL_LEN;
        if let Some((k, _)) = node
            .labels
            .iter()
            .find(|(k, v)| k.is_empty() || bad(k) || bad(v))
        {
            return Err(NodeError::Label(k.clone()));
        }
        let bytes: usize = node.labels.iter().map(|(k, v)| k.len() + v.len()).sum();
        if bytes > MAX_LABEL_BYTES {
            return Err(NodeError::LabelBytes(bytes));
        }
        let mut ports = node.ports.clone();
        ports.sort_unstable();
        ports.dedup();
        Ok(Self {
            node_id: node.id.clone(),
            identity: peer.clone(),
            namespace: peer.namespace().to_string(),
            address,
            ports,
            labels: node
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            unhealthy: node.unhealthy,
        })
    }

    /// Whether this workload serves `service`. Labels are the sidecar's
    /// own claim, checked against nothing, so they only narrow: a Service
    /// that lists `identities` is served by those identities alone (and,
    /// with a selector too, only by those of them whose labels match). A
    /// workload cannot join such a service by copying its labels.
    pub fn serves(&self, service: &pb::Service) -> bool {
        let selected = || {
            service.namespace == self.namespace
                && service
                    .selector
                    .iter()
                    .all(|(k, v)| self.labels.get(k) == Some(v))
        };
        if service.identities.is_empty() {
            !service.selector.is_empty() && selected()
        } else {
            let id = self.identity.to_string();
            service.identities.contains(&id) && (service.selector.is_empty() || selected())
        }
    }

    fn endpoint(&self) -> pb::Endpoint {
        pb::Endpoint {
            address: self.address.to_string(),
            identity: self.identity.to_string(),
            labels: self
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ports: self.ports.clone(),
            weight: crate::compile::DEFAULT_ENDPOINT_WEIGHT,
        }
    }
}

/// One workload in the registry, as listed by [`Registry::workloads`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub workload: Workload,
    /// Open streams for it (0: disconnected, within the grace period).
    pub streams: usize,
}

/// Registrations are per (identity, node id): a sidecar cannot displace
/// another identity's registration by reusing its node id.
type Key = (String, String);

struct Entry {
    workload: Workload,
    /// Where its latest stream came from (not part of the workload: it
    /// changes nothing a sidecar is told).
    source: IpAddr,
    streams: usize,
    /// Bumped on every connect and disconnect, so a withdrawal timer armed
    /// by an earlier disconnect does nothing after a reconnect.
    epoch: u64,
}

/// See the module docs.
pub struct Registry {
    grace: Duration,
    /// Node ids one identity may register from one source address (0: any).
    per_source: usize,
    entries: Mutex<BTreeMap<Key, Entry>>,
    revision: watch::Sender<u64>,
    this: Weak<Registry>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// A registry that withdraws a disconnected workload after `grace`.
    pub fn new(grace: Duration) -> Arc<Self> {
        Self::with_limit(grace, DEFAULT_NODES_PER_SOURCE)
    }

    /// [`Registry::new`] with `per_source` node ids per identity and
    /// source address (0: no limit, for a control plane behind SNAT).
    pub fn with_limit(grace: Duration, per_source: usize) -> Arc<Self> {
        Arc::new_cyclic(|this| Self {
            grace,
            per_source,
            entries: Mutex::new(BTreeMap::new()),
            revision: watch::Sender::new(0),
            this: this.clone(),
        })
    }

    /// Changes whenever the set of endpoints may have changed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    /// Registers a connected workload until the returned guard is dropped
    /// (the stream closed). A later announcement for the same node replaces
    /// the earlier one. A new node id is refused once its identity holds
    /// the limit of them from `source` (disconnected ones within their
    /// grace period count).
    pub fn connect(
        &self,
        workload: Workload,
        source: IpAddr,
    ) -> Result<Registration, RegistryFull> {
        let key = (workload.identity.to_string(), workload.node_id.clone());
        let mut entries = lock(&self.entries);
        // A new node id, or a registered one moving to another address,
        // counts against the identity's share at that address: a reconnect
        // from where it was always gets back in.
        if self.per_source > 0 && entries.get(&key).map(|e| e.source) != Some(source) {
            // The identity's entries are adjacent in the ordered map.
            let held = entries
                .range((key.0.clone(), String::new())..)
                .take_while(|((id, _), _)| *id == key.0)
                .filter(|(k, e)| e.source == source && **k != key)
                .count();
            if held >= self.per_source {
                return Err(RegistryFull {
                    identity: key.0,
                    address: source,
                    held,
                    limit: self.per_source,
                });
            }
        }
        let changed = match entries.get_mut(&key) {
            Some(e) => {
                e.streams += 1;
                e.epoch += 1;
                e.source = source;
                let changed = e.workload != workload;
                e.workload = workload;
                changed
            }
            None => {
                entries.insert(
                    key.clone(),
                    Entry {
                        workload,
                        source,
                        streams: 1,
                        epoch: 0,
                    },
                );
                true
            }
        };
        drop(entries);
        if changed {
            self.bump();
        }
        Ok(Registration {
            registry: self.this.clone(),
            key,
        })
    }

    /// Applies a health report from an established stream. Only the health
    /// flag may change; the node must be the one the stream announced.
    pub fn report_health(&self, key: &(String, String), node: &Node) {
        if node.identity != key.0 || node.id != key.1 {
            tracing::warn!(node = %node.id, "health report for another node ignored");
            return;
        }
        let mut entries = lock(&self.entries);
        let Some(e) = entries.get_mut(key) else {
            return;
        };
        if e.workload.unhealthy == node.unhealthy {
            return;
        }
        e.workload.unhealthy = node.unhealthy;
        drop(entries);
        tracing::info!(identity = %key.0, node = %key.1, unhealthy = node.unhealthy, "workload health changed");
        self.bump();
    }

    /// Every registered workload, connected or within its grace period.
    pub fn workloads(&self) -> Vec<Listed> {
        lock(&self.entries)
            .values()
            .map(|e| Listed {
                workload: e.workload.clone(),
                streams: e.streams,
            })
            .collect()
    }

    /// The endpoints of each of `services` (by `namespace/name`) that have
    /// any, ordered by address, identity and node id.
    pub fn endpoints(&self, services: &[pb::Service]) -> BTreeMap<String, Vec<pb::Endpoint>> {
        let entries = lock(&self.entries);
        let mut out = BTreeMap::new();
        for s in services {
            let mut serving: Vec<&Workload> = entries
                .values()
                .map(|e| &e.workload)
                .filter(|w| w.serves(s) && !w.unhealthy)
                .collect();
            if serving.is_empty() {
                continue;
            }
            serving.sort_by(|a, b| {
                (a.address, a.identity.to_string(), &a.node_id).cmp(&(
                    b.address,
                    b.identity.to_string(),
                    &b.node_id,
                ))
            });
            out.insert(
                format!("{}/{}", s.namespace, s.name),
                serving.into_iter().map(Workload::endpoint).collect(),
            );
        }
        out
    }

    fn disconnect(&self, key: &Key) {
        let mut entries = lock(&self.entries);
        let Some(e) = entries.get_mut(key) else {
            return;
        };
        e.streams = e.streams.saturating_sub(1);
        e.epoch += 1;
        if e.streams > 0 {
            return;
        }
        let epoch = e.epoch;
        drop(entries);
        tracing::debug!(identity = %key.0, node = %key.1, grace_ms = self.grace.as_millis() as u64,
            "sidecar disconnected; endpoints stay for the grace period");
        // Outside a runtime (process teardown) nobody is left to serve.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let registry = self.this.clone();
        let key = key.clone();
        let grace = self.grace;
        rt.spawn(async move {
            tokio::time::sleep(grace).await;
            if let Some(r) = registry.upgrade() {
                r.expire(&key, epoch);
            }
        });
    }

    fn expire(&self, key: &Key, epoch: u64) {
        let mut entries = lock(&self.entries);
        if entries
            .get(key)
            .is_some_and(|e| e.streams == 0 && e.epoch == epoch)
        {
            entries.remove(key);
            drop(entries);
            tracing::info!(identity = %key.0, node = %key.1, "sidecar gone for the grace period; endpoints withdrawn");
            self.bump();
        }
    }

    fn bump(&self) {
        self.revision.send_modify(|r| *r += 1);
    }
}

/// Keeps a workload registered as connected; dropping it starts the grace
/// period.
#[must_use = "the workload counts as disconnected once this is dropped"]
pub struct Registration {
    registry: Weak<Registry>,
    key: Key,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(r) = self.registry.upgrade() {
            r.disconnect(&self.key);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "shop", sa).unwrap()
    }

    fn node(sa: &str, addr: &str, labels: &[(&str, &str)]) -> Node {
        Node {
            id: format!("{sa}-1"),
            identity: id(sa).to_string(),
            address: addr.into(),
            ports: vec![8080],
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            namespace: "shop".into(),
            unhealthy: false,
        }
    }

    fn service(selector: &[(&str, &str)], identities: &[&str]) -> pb::Service {
        pb::Service {
            name: "api".into(),
            namespace: "shop".into(),
            selector: selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
            identities: identities.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn workload(sa: &str, addr: &str, labels: &[(&str, &str)]) -> Workload {
        Workload::from_node(&node(sa, addr, labels), &id(sa)).unwrap()
    }

    /// Registers `w` from its own address.
    fn join(r: &Registry, w: Workload) -> Registration {
        let from = w.address;
        r.connect(w, from).unwrap()
    }

    fn addresses(r: &Registry, s: &pb::Service) -> Vec<String> {
        r.endpoints(std::slice::from_ref(s))
            .remove("shop/api")
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.address)
            .collect()
    }

    #[test]
    fn node_claiming_another_identity_is_refused() {
        let err = Workload::from_node(&node("api", "10.0.0.1", &[]), &id("web")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "node claims identity spiffe://cluster.local/ns/shop/sa/api but its certificate is spiffe://cluster.local/ns/shop/sa/web"
        );
        assert!(err.is_permission());
    }

    #[test]
    fn node_address_must_be_an_ip() {
        let err = Workload::from_node(&node("api", "api.shop", &[]), &id("api")).unwrap_err();
        assert_eq!(err, NodeError::Address("api.shop".into()));
    }

    #[test]
    fn node_cannot_claim_another_namespace() {
        let mut n = node("api", "10.0.0.1", &[]);
        n.namespace = "billing".into();
        assert!(matches!(
            Workload::from_node(&n, &id("api")),
            Err(NodeError::NamespaceMismatch { .. })
        ));
    }

    #[test]
    fn listed_identities_decide_and_labels_only_narrow_them() {
        let r = Registry::new(DEFAULT_GRACE);
        let api = "spiffe://cluster.local/ns/shop/sa/api";
        let _v1 = join(
            &r,
            workload("api", "10.0.0.1", &[("app", "api"), ("v", "1")]),
        );
        // Another identity copying the selector's labels.
        let _web = join(
            &r,
            workload("web", "10.0.0.3", &[("app", "api"), ("v", "1")]),
        );
        let both = service(&[("app", "api")], &[api]);
        assert_eq!(addresses(&r, &both), ["10.0.0.1"]);
        // A listed identity whose labels do not match is not selected.
        let v2 = service(&[("app", "api"), ("v", "2")], &[api]);
        assert!(addresses(&r, &v2).is_empty());
        let mut elsewhere = service(&[("app", "api")], &[api]);
        elsewhere.namespace = "billing".into();
        assert!(r.endpoints(&[elsewhere]).is_empty());
        // Neither identities nor selector: no workload.
        assert!(addresses(&r, &service(&[], &[])).is_empty());
    }

    #[test]
    fn workloads_match_by_identity_or_by_every_selector_label() {
        let r = Registry::new(DEFAULT_GRACE);
        let _a = join(
            &r,
            workload("api", "10.0.0.1", &[("app", "api"), ("v", "1")]),
        );
        let _b = join(&r, workload("other", "10.0.0.2", &[("app", "api")]));
        let _c = join(&r, workload("web", "10.0.0.3", &[("app", "web")]));
        let by_selector = service(&[("app", "api"), ("v", "1")], &[]);
        assert_eq!(addresses(&r, &by_selector), ["10.0.0.1"]);
        let by_identity = service(&[], &["spiffe://cluster.local/ns/shop/sa/web"]);
        assert_eq!(addresses(&r, &by_identity), ["10.0.0.3"]);
        let mut elsewhere = service(&[("app", "api")], &[]);
        elsewhere.namespace = "billing".into();
        assert!(r.endpoints(&[elsewhere]).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn disconnected_workload_is_withdrawn_after_the_grace_period() {
        let r = Registry::new(Duration::from_secs(10));
        let s = service(&[("app", "api")], &[]);
        let mut changes = r.subscribe();
        let reg = join(&r, workload("api", "10.0.0.1", &[("app", "api")]));
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        drop(reg);
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert_eq!(addresses(&r, &s), ["10.0.0.1"]);
        assert!(!changes.has_changed().unwrap());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(addresses(&r, &s).is_empty());
        assert!(changes.has_changed().unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn reconnect_within_the_grace_period_keeps_the_endpoints() {
        let r = Registry::new(Duration::from_secs(10));
        let s = service(&[("app", "api")], &[]);
        let w = workload("api", "10.0.0.1", &[("app", "api")]);
        drop(join(&r, w.clone()));
        tokio::time::sleep(Duration::from_secs(5)).await;
        let changes = r.subscribe();
        let _again = join(&r, w);
        // The same announcement: nothing to push.
        assert!(!changes.has_changed().unwrap());
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(addresses(&r, &s), ["10.0.0.1"]);
        assert_eq!(r.workloads()[0].streams, 1);
    }

    #[test]
    fn one_identity_registers_a_bounded_number_of_node_ids_from_one_address() {
        let r = Registry::with_limit(DEFAULT_GRACE, 3);
        let from: IpAddr = "10.0.0.9".parse().unwrap();
        let mut held = Vec::new();
        for i in 0..3 {
            let mut n = node("api", "10.0.0.1", &[]);
            n.id = format!("api-{i}");
            held.push(
                r.connect(Workload::from_node(&n, &id("api")).unwrap(), from)
                    .unwrap(),
            );
        }
        let mut n = node("api", "10.0.0.1", &[]);
        n.id = "api-3".into();
        let w = Workload::from_node(&n, &id("api")).unwrap();
        let err = r
            .connect(w.clone(), from)
            .err()
            .expect("a fourth node id is refused");
        assert_eq!((err.held, err.limit), (3, 3));
        // From another address, or as another identity, or a reconnect of a
        // registered node id: accepted.
        let _elsewhere = r.connect(w, "10.0.0.10".parse().unwrap()).unwrap();
        let mut n = node("web", "10.0.0.1", &[]);
        n.id = "web-0".into();
        let _web = r
            .connect(Workload::from_node(&n, &id("web")).unwrap(), from)
            .unwrap();
        let mut n = node("api", "10.0.0.1", &[]);
        n.id = "api-0".into();
        let _again = r
            .connect(Workload::from_node(&n, &id("api")).unwrap(), from)
            .unwrap();
        // Moving registered node ids to another address counts there, so
        // one identity holds at most the share at each address it uses.
        let other: IpAddr = "10.0.0.11".parse().unwrap();
        for i in 0..3 {
            let mut n = node("api", "10.0.0.1", &[]);
            n.id = format!("api-{i}");
            held.push(
                r.connect(Workload::from_node(&n, &id("api")).unwrap(), other)
                    .unwrap(),
            );
        }
        let mut n = node("api", "10.0.0.1", &[]);
        n.id = "api-3".into();
        let moved = r.connect(Workload::from_node(&n, &id("api")).unwrap(), other);
        assert!(moved.is_err(), "a fourth node id at the other address");
        // 0 turns the limit off.
        let open = Registry::with_limit(DEFAULT_GRACE, 0);
        let _many: Vec<_> = (0..50)
            .map(|i| {
                let mut n = node("api", "10.0.0.1", &[]);
                n.id = format!("api-{i}");
                open.connect(Workload::from_node(&n, &id("api")).unwrap(), from)
                    .unwrap()
            })
            .collect();
    }

    #[test]
    fn labels_are_limited_in_total_bytes() {
        let labels: Vec<(String, String)> = (0..20)
            .map(|i| (format!("k{i:02}"), "v".repeat(250)))
            .collect();
        let refs: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let err = Workload::from_node(&node("api", "10.0.0.1", &refs), &id("api")).unwrap_err();
        assert_eq!(err, NodeError::LabelBytes(20 * 253));
        assert!(!err.is_permission());
        assert!(Workload::from_node(&node("api", "10.0.0.1", &refs[..16]), &id("api")).is_ok());
    }
}
