use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bulwark_ca::SpiffeId;
use bulwark_proto::config::Resources;
use bulwark_proto::config::v1::{self, Location, MtlsMode, OutboundPolicy};

/// A resource the sidecar cannot apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{resource}: {message}")]
pub struct ConfigError {
    /// `Kind namespace/name`.
    pub resource: String,
    pub message: String,
}

fn err(kind: &str, ns: &str, name: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        resource: format!("{kind} {ns}/{name}"),
        message: message.into(),
    }
}

/// Where an outbound connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub addr: SocketAddr,
    /// `namespace/name` of the service.
    pub service: String,
    /// Present: a mesh workload, reached over mTLS and verified to be this.
    pub identity: Option<SpiffeId>,
    /// Workload labels (for route subsets).
    pub labels: std::collections::BTreeMap<String, String>,
}

/// How traffic to a service port is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// Sniff: HTTP if the client speaks it first, opaque TCP otherwise.
    Auto,
    Http1,
    Http2,
    Tcp,
}

impl Proto {
    fn from_proto(p: i32) -> Self {
        match v1::Protocol::try_from(p).unwrap_or(v1::Protocol::Auto) {
            v1::Protocol::Auto => Proto::Auto,
            v1::Protocol::Http => Proto::Http1,
            v1::Protocol::Http2 | v1::Protocol::Grpc => Proto::Http2,
            v1::Protocol::Tcp => Proto::Tcp,
        }
    }
}

/// An outbound destination resolved to a service port.
#[derive(Debug, Clone)]
pub struct Target {
    /// `namespace/name`.
    pub service: String,
    /// The service port the client dialled.
    pub port: u16,
    pub proto: Proto,
    /// Set when the client dialled one workload directly (no routing).
    pub pinned: Option<Upstream>,
}

/// What to do with an outbound connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Mesh(Upstream),
    /// Known external destination, or unknown under ALLOW_ANY.
    Passthrough,
    /// Unknown under REGISTRY_ONLY.
    Refuse,
}

/// A source-identity pattern from an authorization rule: literal parts
/// separated by `*` wildcards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityPattern(Vec<String>);

impl IdentityPattern {
    pub fn parse(p: &str) -> Result<Self, String> {
        if p.is_empty() {
            return Err("empty identity pattern".into());
        }
        if !p.contains('*') {
            p.parse::<SpiffeId>().map_err(|e| e.to_string())?;
        } else if !p.starts_with("spiffe://") && p != "*" {
            return Err(format!("pattern {p:?} must start with spiffe:// or be *"));
        }
        Ok(Self(p.split('*').map(String::from).collect()))
    }

    pub fn matches(&self, id: &str) -> bool {
        let parts = &self.0;
        if parts.len() == 1 {
            return parts[0] == id;
        }
        let (first, last) = (&parts[0], &parts[parts.len() - 1]);
        if !id.starts_with(first.as_str())
            || !id.ends_with(last.as_str())
            || id.len() < first.len() + last.len()
        {
            return false;
        }
        let mut rest = &id[first.len()..id.len() - last.len()];
        for mid in &parts[1..parts.len() - 1] {
            match rest.find(mid.as_str()) {
                Some(i) => rest = &rest[i + mid.len()..],
                None => return false,
            }
        }
        true
    }
}

#[derive(Debug, Clone)]
struct L4Rule {
    from: Vec<IdentityPattern>,
    /// Rules with HTTP conditions cannot match a raw TCP connection.
    http_only: bool,
    paths: Vec<crate::http::route::StrMatch>,
    methods: Vec<String>,
    /// `AuthorizationPolicy namespace/name`, for the audit log.
    policy: String,
}

/// The sidecar's view of the mesh, immutable once built.
#[derive(Debug)]
pub struct Snapshot {
    pub version: String,
    /// Restored from disk at start-up while the control plane is away.
    pub stale: bool,
    pub mtls_mode: MtlsMode,
    pub outbound_policy: OutboundPolicy,
    /// Mesh workloads and known external endpoints by address.
    endpoints: HashMap<SocketAddr, Upstream>,
    /// Virtual service addresses → the service's endpoints.
    vips: HashMap<SocketAddr, Vec<Upstream>>,
    /// Virtual service addresses → service, even with no endpoints yet.
    vip_names: HashMap<SocketAddr, String>,
    /// External addresses (ServiceEntry MESH_EXTERNAL) allowed under REGISTRY_ONLY.
    external_ips: Vec<IpAddr>,
    /// Inbound port → services of this workload on that port.
    local_ports: HashMap<u16, Vec<String>>,
    /// Every service of this workload: a port none of them maps (one the
    /// workload listens on besides its services' ports) is governed by all
    /// of their policies, so that it is no way around them.
    local_services: Vec<String>,
    /// Service → authorization rules (present = default deny).
    authz: HashMap<String, Vec<L4Rule>>,
    /// Inbound ports with a service whose authorization rules match paths,
    /// or whose rate-limited routes are picked by path.
    path_rule_ports: HashSet<u16>,
    /// Whether any service of this workload has such rules (for the ports
    /// no service maps).
    path_rules_any: bool,
    /// Service → its endpoints by target port, lent to the requests routed
    /// to them (no list is built per request).
    by_target: HashMap<String, Vec<PortEndpoints>>,
    /// Service → port → protocol and target port (looked up by `&str`).
    ports: HashMap<String, HashMap<u16, (Proto, u16)>>,
    /// Inbound port → protocol the local app speaks.
    local_protos: HashMap<u16, Proto>,
    /// Service → compiled routes.
    routes: HashMap<String, Arc<crate::http::route::RouteTable>>,
    /// Service → traffic policy.
    policies: HashMap<String, Arc<v1::TrafficPolicy>>,
    rr: AtomicUsize,
    pub resources: Resources,
}

/// A target port and the service's endpoints on it.
type PortEndpoints = (u16, Vec<Arc<Upstream>>);

/// A service's key in the config: `namespace/name`, the namespace `default`
/// when unset.
pub fn service_key(ns: &str, name: &str) -> String {
    format!("{}/{}", if ns.is_empty() { "default" } else { ns }, name)
}

fn parse_ip(kind: &str, ns: &str, name: &str, a: &str) -> Result<IpAddr, ConfigError> {
    a.parse().map_err(|_| {
        err(
            kind,
            ns,
            name,
            format!("address {a:?} is not an IP address"),
        )
    })
}

fn port16(kind: &str, ns: &str, name: &str, p: u32) -> Result<u16, ConfigError> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| err(kind, ns, name, format!("port {p} is out of range")))
}

/// The port a service port sends to on its workloads: `target_port`, or
/// the port itself when unset. Unchecked: [`Snapshot::build`] refuses ports
/// over 65535 first.
pub fn target_port(p: &v1::ServicePort) -> u16 {
    if p.target_port == 0 {
        p.port as u16
    } else {
        p.target_port as u16
    }
}

fn target_ports(
    kind: &str,
    ns: &str,
    name: &str,
    ports: &[v1::ServicePort],
) -> Result<Vec<(u16, u16)>, ConfigError> {
    ports
        .iter()
        .map(|p| {
            let port = port16(kind, ns, name, p.port)?;
            let target = if p.target_port == 0 {
                port
            } else {
                port16(kind, ns, name, p.target_port)?
            };
            Ok((port, target))
        })
        .collect()
}

impl Snapshot {
    /// Builds and validates a snapshot for the workload `me`.
    pub fn build(me: &SpiffeId, version: &str, resources: Resources) -> Result<Self, ConfigError> {
        let (mtls_mode, outbound_policy) = match &resources.mesh {
            Some(m) => {
                let mode = MtlsMode::try_from(m.mtls_mode).map_err(|_| {
                    err(
                        "MeshConfig",
                        "",
                        "mesh",
                        format!("unknown mTLS mode {}", m.mtls_mode),
                    )
                })?;
                let policy = OutboundPolicy::try_from(m.outbound_policy).map_err(|_| {
                    err(
                        "MeshConfig",
                        "",
                        "mesh",
                        format!("unknown outbound policy {}", m.outbound_policy),
                    )
                })?;
                if !m.trust_domain.is_empty() && m.trust_domain != me.trust_domain() {
                    return Err(err(
                        "MeshConfig",
                        "",
                        "mesh",
                        format!(
                            "trust domain {:?} is not this workload's ({})",
                            m.trust_domain,
                            me.trust_domain()
                        ),
                    ));
                }
                (mode, policy)
            }
            None => (MtlsMode::Strict, OutboundPolicy::AllowAny),
        };

        let mut endpoints = HashMap::new();
        let mut vips: HashMap<SocketAddr, Vec<Upstream>> = HashMap::new();
        let mut vip_names: HashMap<SocketAddr, String> = HashMap::new();
        let mut external_ips = Vec::new();
        let mut local_ports: HashMap<u16, Vec<String>> = HashMap::new();
        let me_str = me.to_string();

        // Ports per service, to expand endpoints without explicit ports.
        let mut service_ports: HashMap<String, Vec<(u16, u16)>> = HashMap::new();
        for s in &resources.services {
            let ports = target_ports("Service", &s.namespace, &s.name, &s.ports)?;
            for id in &s.identities {
                id.parse::<SpiffeId>().map_err(|e| {
                    err(
                        "Service",
                        &s.namespace,
                        &s.name,
                        format!("identity {id:?}: {e}"),
                    )
                })?;
            }
            if s.identities.iter().any(|i| i == &me_str) {
                for (_, target) in &ports {
                    local_ports
                        .entry(*target)
                        .or_default()
                        .push(service_key(&s.namespace, &s.name));
                }
            }
            service_ports.insert(service_key(&s.namespace, &s.name), ports);
        }

        let mut add_endpoint = |kind: &str,
                                ns: &str,
                                name: &str,
                                service: &str,
                                ep: &v1::Endpoint,
                                default_ports: &[(u16, u16)],
                                internal: bool|
         -> Result<Vec<Upstream>, ConfigError> {
            let ip = parse_ip(kind, ns, name, &ep.address)?;
            let identity = if ep.identity.is_empty() {
                None
            } else {
                Some(ep.identity.parse::<SpiffeId>().map_err(|e| {
                    err(
                        kind,
                        ns,
                        name,
                        format!("endpoint {} identity {:?}: {e}", ep.address, ep.identity),
                    )
                })?)
            };
            if internal && identity.is_none() && mtls_mode == MtlsMode::Strict {
                tracing::debug!(address = %ip, service, "mesh endpoint without identity; traffic to it is plain TCP");
            }
            let ports: Vec<u16> = if ep.ports.is_empty() {
                default_ports.iter().map(|(_, t)| *t).collect()
            } else {
                ep.ports
                    .iter()
                    .map(|p| port16(kind, ns, name, *p))
                    .collect::<Result<_, _>>()?
            };
            let mut ups = Vec::new();
            for p in ports {
                let up = Upstream {
                    addr: SocketAddr::new(ip, p),
                    service: service.to_string(),
                    identity: identity.clone(),
                    labels: ep
                        .labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                };
                endpoints.insert(up.addr, up.clone());
                ups.push(up);
            }
            Ok(ups)
        };

        let mut by_service: HashMap<String, Vec<Upstream>> = HashMap::new();
        for se in &resources.endpoints {
            let ports = service_ports.get(&se.service).cloned().unwrap_or_default();
            let (ns, name) = se
                .service
                .split_once('/')
                .unwrap_or(("default", &se.service));
            for ep in &se.endpoints {
                let ups =
                    add_endpoint("ServiceEndpoints", ns, name, &se.service, ep, &ports, true)?;
                by_service
                    .entry(se.service.clone())
                    .or_default()
                    .extend(ups);
            }
        }
        for e in &resources.service_entries {
            let k = service_key(&e.namespace, &e.name);
            let ports = target_ports("ServiceEntry", &e.namespace, &e.name, &e.ports)?;
            let internal = e.location == Location::MeshInternal as i32;
            for ep in &e.endpoints {
                let ups = add_endpoint(
                    "ServiceEntry",
                    &e.namespace,
                    &e.name,
                    &k,
                    ep,
                    &ports,
                    internal,
                )?;
                if !internal {
                    external_ips.push(ups.first().map(|u| u.addr.ip()).unwrap_or(parse_ip(
                        "ServiceEntry",
                        &e.namespace,
                        &e.name,
                        &ep.address,
                    )?));
                }
                let list = by_service.entry(k.clone()).or_default();
                for u in ups {
                    // A ServiceEntry named after a Service also reaches us
                    // as that Service's endpoints: keep one of each.
                    if !list.iter().any(|x| x.addr == u.addr) {
                        list.push(u);
                    }
                }
            }
            for a in &e.addresses {
                let ip = parse_ip("ServiceEntry", &e.namespace, &e.name, a)?;
                if !internal {
                    external_ips.push(ip);
                }
            }
            service_ports.entry(k).or_insert(ports);
        }
        for s in &resources.services {
            let k = service_key(&s.namespace, &s.name);
            for a in &s.addresses {
                let ip = parse_ip("Service", &s.namespace, &s.name, a)?;
                for (port, target) in service_ports.get(&k).into_iter().flatten() {
                    let ups: Vec<Upstream> = by_service
                        .get(&k)
                        .into_iter()
                        .flatten()
                        .filter(|u| u.addr.port() == *target)
                        .cloned()
                        .collect();
                    vips.insert(SocketAddr::new(ip, *port), ups);
                    vip_names.insert(SocketAddr::new(ip, *port), k.clone());
                }
            }
        }

        // Services we serve because the registry lists us among their
        // endpoints (selector-based services).
        for (svc, ups) in &by_service {
            if ups.iter().any(|u| u.identity.as_ref() == Some(me)) {
                for (_, target) in service_ports.get(svc).into_iter().flatten() {
                    let list = local_ports.entry(*target).or_default();
                    if !list.contains(svc) {
                        list.push(svc.clone());
                    }
                }
            }
        }

        let mut authz: HashMap<String, Vec<L4Rule>> = HashMap::new();
        for p in &resources.authorization_policies {
            let service = if p.service.contains('/') {
                p.service.clone()
            } else {
                service_key(&p.namespace, &p.service)
            };
            let rules = authz.entry(service).or_default();
            for r in &p.rules {
                let from = r
                    .from
                    .iter()
                    .map(|f| IdentityPattern::parse(f))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| err("AuthorizationPolicy", &p.namespace, &p.name, e))?;
                let paths = r
                    .paths
                    .iter()
                    .filter_map(|p| crate::http::route::StrMatch::compile(p).transpose())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| err("AuthorizationPolicy", &p.namespace, &p.name, e))?;
                rules.push(L4Rule {
                    from,
                    http_only: !r.paths.is_empty() || !r.methods.is_empty(),
                    paths,
                    methods: r.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
                    policy: format!("AuthorizationPolicy {}/{}", p.namespace, p.name),
                });
            }
        }

        if let Some(b) = &resources.trust_bundle {
            if b.roots_pem.is_empty() {
                return Err(err("TrustBundle", "", "bundle", "no roots"));
            }
            for pem in &b.roots_pem {
                bulwark_ca::tls::TrustBundle::from_pem(pem)
                    .map_err(|e| err("TrustBundle", "", "bundle", e.to_string()))?;
            }
        }
        let mut routes = HashMap::new();
        for r in &resources.routes {
            let table = crate::http::route::RouteTable::compile(r)
                .map_err(|e| err("Route", &r.namespace, &r.name, e))?;
            routes.insert(table.service.clone(), Arc::new(table));
        }
        let policies = resources
            .traffic_policies
            .iter()
            .map(|p| {
                let svc = if p.service.contains('/') {
                    p.service.clone()
                } else {
                    service_key(&p.namespace, &p.service)
                };
                (svc, Arc::new(p.clone()))
            })
            .collect();
        let mut ports: HashMap<String, HashMap<u16, (Proto, u16)>> = HashMap::new();
        let mut local_protos = HashMap::new();
        for s in resources.services.iter().filter(|s| !s.ports.is_empty()) {
            let k = service_key(&s.namespace, &s.name);
            let mine = s.identities.iter().any(|i| i == &me_str);
            let of = ports.entry(k.clone()).or_default();
            for p in &s.ports {
                let proto = Proto::from_proto(p.protocol);
                let (port, target) = (p.port as u16, target_port(p));
                of.insert(port, (proto, target));
                of.insert(target, (proto, target));
                if mine || local_ports.get(&target).is_some_and(|v| v.contains(&k)) {
                    local_protos.insert(target, proto);
                }
            }
        }
        for e in resources
            .service_entries
            .iter()
            .filter(|e| !e.ports.is_empty())
        {
            let of = ports.entry(service_key(&e.namespace, &e.name)).or_default();
            for p in &e.ports {
                of.entry(p.port as u16)
                    .or_insert((Proto::from_proto(p.protocol), target_port(p)));
            }
        }
        let by_target = by_service
            .into_iter()
            .map(|(k, v)| {
                let mut by_port: Vec<PortEndpoints> = Vec::new();
                for u in v {
                    let port = u.addr.port();
                    match by_port.iter_mut().find(|(p, _)| *p == port) {
                        Some((_, list)) => list.push(Arc::new(u)),
                        None => by_port.push((port, vec![Arc::new(u)])),
                    }
                }
                (k, by_port)
            })
            .collect();
        let mut local_services: Vec<String> = local_ports.values().flatten().cloned().collect();
        local_services.sort_unstable();
        local_services.dedup();
        // A service's requests are told apart by their path where an
        // authorization rule matches paths, or where a route that carries a
        // rate limit is picked by path: a second spelling of a path must not
        // reach past either.
        let paths_matter = |svc: &String| {
            authz
                .get(svc)
                .is_some_and(|rules| rules.iter().any(|r| !r.paths.is_empty()))
                || routes
                    .get(svc)
                    .is_some_and(|t: &Arc<crate::http::route::RouteTable>| {
                        t.rules.iter().any(|r| r.rate_limit.is_some())
                            && t.rules
                                .iter()
                                .any(|r| r.matches.iter().any(|m| m.path.is_some()))
                    })
        };
        let path_rules_any = local_services.iter().any(paths_matter);
        let path_rule_ports = local_ports
            .iter()
            .filter(|(_, services)| services.iter().any(paths_matter))
            .map(|(port, _)| *port)
            .collect();
        Ok(Self {
            version: version.to_string(),
            stale: false,
            by_target,
            ports,
            local_protos,
            routes,
            policies,
            mtls_mode,
            outbound_policy,
            endpoints,
            vips,
            vip_names,
            external_ips,
            local_ports,
            local_services,
            path_rule_ports,
            path_rules_any,
            authz,
            rr: AtomicUsize::new(0),
            resources,
        })
    }

    /// Decides where an intercepted outbound connection to `dst` goes.
    pub fn outbound(&self, dst: SocketAddr) -> Decision {
        if let Some(up) = self.endpoints.get(&dst) {
            return match up.identity {
                Some(_) => Decision::Mesh(up.clone()),
                None => Decision::Passthrough,
            };
        }
        if let Some(ups) = self.vips.get(&dst).filter(|u| !u.is_empty()) {
            let i = self.rr.fetch_add(1, Ordering::Relaxed) % ups.len();
            let up = ups[i].clone();
            return match up.identity {
                Some(_) => Decision::Mesh(up),
                None => Decision::Passthrough,
            };
        }
        if self.external_ips.contains(&dst.ip()) || self.outbound_policy == OutboundPolicy::AllowAny
        {
            Decision::Passthrough
        } else {
            Decision::Refuse
        }
    }

    /// Whether a connection to local `port` from `source` (None when
    /// unauthenticated) is allowed at L4: the deciding policy (or `none`)
    /// on allow, the service whose policies deny it on deny.
    pub fn authorize_l4(&self, port: u16, source: Option<&SpiffeId>) -> Result<&str, &str> {
        self.authorize(port, source, |r| !r.http_only)
    }

    /// The first rule of each service on `port` that `source` matches and
    /// `allows` accepts decides; a service with rules and none of them
    /// matching denies.
    fn authorize(
        &self,
        port: u16,
        source: Option<&SpiffeId>,
        allows: impl Fn(&L4Rule) -> bool,
    ) -> Result<&str, &str> {
        let services = self.local_ports.get(&port).unwrap_or(&self.local_services);
        let src = source.map(SpiffeId::as_str);
        let mut decided = "none";
        for svc in services {
            let Some(rules) = self.authz.get(svc) else {
                continue;
            };
            let allowed = rules.iter().find(|r| {
                (r.from.is_empty() || src.is_some_and(|s| r.from.iter().any(|p| p.matches(s))))
                    && allows(r)
            });
            match allowed {
                Some(r) => decided = &r.policy,
                None => return Err(svc),
            }
        }
        Ok(decided)
    }

    /// Resolves an outbound destination to a service port, when known.
    pub fn target(&self, dst: SocketAddr) -> Option<Target> {
        if let Some(up) = self.endpoints.get(&dst) {
            let (proto, _) = self
                .port(&up.service, dst.port())
                .unwrap_or((Proto::Auto, dst.port()));
            return Some(Target {
                service: up.service.clone(),
                port: dst.port(),
                proto,
                pinned: Some(up.clone()),
            });
        }
        let (service, _) = self.vip_service(dst)?;
        let (proto, _) = self
            .port(&service, dst.port())
            .unwrap_or((Proto::Auto, dst.port()));
        Some(Target {
            service,
            port: dst.port(),
            proto,
            pinned: None,
        })
    }

    fn vip_service(&self, dst: SocketAddr) -> Option<(String, ())> {
        let ups = self.vips.get(&dst)?;
        if let Some(u) = ups.first() {
            return Some((u.service.clone(), ()));
        }
        self.vip_names.get(&dst).map(|s| (s.clone(), ()))
    }

    /// Protocol and target port of `service`'s `port`, when declared.
    fn port(&self, service: &str, port: u16) -> Option<(Proto, u16)> {
        self.ports.get(service)?.get(&port).copied()
    }

    /// Endpoints of `service` on its target port for `port`, filtered by
    /// `subset` labels: the snapshot's own list when no subset is asked for.
    pub fn endpoints_of(
        &self,
        service: &str,
        port: u16,
        subset: &[(String, String)],
    ) -> Cow<'_, [Arc<Upstream>]> {
        let target = self.port(service, port).map_or(port, |(_, t)| t);
        let all = self
            .by_target
            .get(service)
            .and_then(|by_port| by_port.iter().find(|(p, _)| *p == target))
            .map_or(&[][..], |(_, list)| list.as_slice());
        if subset.is_empty() {
            return Cow::Borrowed(all);
        }
        all.iter()
            .filter(|u| subset.iter().all(|(k, v)| u.labels.get(k) == Some(v)))
            .cloned()
            .collect()
    }

    /// The lowest port of `service` (`namespace/name`), for callers that
    /// name a service without a port (the gateway).
    pub fn default_port(&self, service: &str) -> Option<u16> {
        self.ports.get(service)?.keys().min().copied()
    }

    pub fn route(&self, service: &str) -> Option<&Arc<crate::http::route::RouteTable>> {
        self.routes.get(service)
    }

    pub fn policy(&self, service: &str) -> Option<&Arc<v1::TrafficPolicy>> {
        self.policies.get(service)
    }

    /// The protocol the local app speaks on `port` (declared by our services).
    pub fn local_proto(&self, port: u16) -> Proto {
        self.local_protos.get(&port).copied().unwrap_or(Proto::Auto)
    }

    /// The local service owning inbound `port`, if any.
    pub fn local_service(&self, port: u16) -> Option<&str> {
        self.local_ports
            .get(&port)
            .and_then(|v| v.first())
            .map(String::as_str)
    }

    /// Per-request authorization: like [`Snapshot::authorize_l4`], with
    /// path and method conditions evaluated.
    pub fn authorize_http(
        &self,
        port: u16,
        source: Option<&SpiffeId>,
        method: &str,
        path: &str,
    ) -> Result<&str, &str> {
        self.authorize(port, source, |r| {
            (r.methods.is_empty() || r.methods.iter().any(|m| m == method))
                && (r.paths.is_empty() || r.paths.iter().any(|p| p.matches(path)))
        })
    }

    /// Whether an authorization rule or a rate-limited route of a service on
    /// `port` looks at the request path (then a path the app would read as
    /// another one must not be matched as written).
    pub fn path_rules_on(&self, port: u16) -> bool {
        self.path_rule_ports.contains(&port)
            || (self.path_rules_any && !self.local_ports.contains_key(&port))
    }

    /// Number of mesh endpoints known (for /config_dump and tests).
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> SpiffeId {
        "spiffe://cluster.local/ns/default/sa/api".parse().unwrap()
    }

    fn res() -> Resources {
        Resources {
            mesh: Some(v1::MeshConfig {
                trust_domain: "cluster.local".into(),
                mtls_mode: MtlsMode::Strict as i32,
                outbound_policy: OutboundPolicy::RegistryOnly as i32,
                source: None,
            }),
            services: vec![v1::Service {
                name: "api".into(),
                namespace: "default".into(),
                ports: vec![v1::ServicePort {
                    port: 80,
                    target_port: 8080,
                    ..Default::default()
                }],
                identities: vec![me().to_string()],
                addresses: vec!["198.18.100.1".into()],
                ..Default::default()
            }],
            service_entries: vec![
                v1::ServiceEntry {
                    name: "api-pods".into(),
                    namespace: "default".into(),
                    location: Location::MeshInternal as i32,
                    ports: vec![v1::ServicePort {
                        port: 8080,
                        ..Default::default()
                    }],
                    endpoints: vec![v1::Endpoint {
                        address: "198.18.0.3".into(),
                        identity: me().to_string(),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                v1::ServiceEntry {
                    name: "ext".into(),
                    namespace: "default".into(),
                    addresses: vec!["198.51.100.7".into()],
                    ..Default::default()
                },
            ],
            authorization_policies: vec![v1::AuthorizationPolicy {
                name: "allow-web".into(),
                namespace: "default".into(),
                service: "api".into(),
                rules: vec![v1::AuthorizationRule {
                    from: vec![
                        "spiffe://cluster.local/ns/default/sa/web".into(),
                        "spiffe://cluster.local/ns/ops/sa/*".into(),
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn mesh_endpoint_is_reached_over_mtls_with_its_identity() {
        let s = Snapshot::build(&me(), "1", res()).unwrap();
        match s.outbound("198.18.0.3:8080".parse().unwrap()) {
            Decision::Mesh(u) => assert_eq!(u.identity, Some(me())),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn registry_only_refuses_unknown_and_passes_known_external() {
        let s = Snapshot::build(&me(), "1", res()).unwrap();
        assert_eq!(
            s.outbound("203.0.113.9:443".parse().unwrap()),
            Decision::Refuse
        );
        assert_eq!(
            s.outbound("198.51.100.7:443".parse().unwrap()),
            Decision::Passthrough
        );
    }

    #[test]
    fn inbound_allow_list_matches_exact_ids_and_patterns_and_denies_others() {
        let s = Snapshot::build(&me(), "1", res()).unwrap();
        let id = |s: &str| s.parse::<SpiffeId>().unwrap();
        assert!(
            s.authorize_l4(8080, Some(&id("spiffe://cluster.local/ns/default/sa/web")))
                .is_ok()
        );
        assert!(
            s.authorize_l4(8080, Some(&id("spiffe://cluster.local/ns/ops/sa/debug")))
                .is_ok()
        );
        assert_eq!(
            s.authorize_l4(8080, Some(&id("spiffe://cluster.local/ns/default/sa/db"))),
            Err("default/api")
        );
        assert!(s.authorize_l4(8080, None).is_err());
        // A port no service of ours declares is no way around the policies:
        // every one of our services' policies must allow the caller.
        assert_eq!(
            s.authorize_l4(9999, Some(&id("spiffe://cluster.local/ns/default/sa/db"))),
            Err("default/api")
        );
        assert!(s.authorize_l4(9999, None).is_err());
        assert!(
            s.authorize_l4(9999, Some(&id("spiffe://cluster.local/ns/default/sa/web")))
                .is_ok()
        );
        // A workload that serves no service with a policy is open on every port.
        let other: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        let s = Snapshot::build(&other, "1", res()).unwrap();
        assert!(s.authorize_l4(9999, None).is_ok());
    }

    #[test]
    fn endpoints_are_lent_by_target_port_and_copied_only_for_a_subset() {
        let mut r = res();
        let ep = |addr: &str, version: &str, ports: Vec<u32>| v1::Endpoint {
            address: addr.into(),
            identity: me().to_string(),
            labels: [("version".to_string(), version.to_string())].into(),
            ports,
            ..Default::default()
        };
        r.endpoints = vec![v1::ServiceEndpoints {
            service: "default/api".into(),
            endpoints: vec![
                ep("10.0.0.1", "v1", vec![]),
                ep("10.0.0.2", "v2", vec![]),
                ep("10.0.0.3", "v1", vec![9000]),
            ],
            ..Default::default()
        }];
        let s = Snapshot::build(&me(), "1", r).unwrap();
        // In the order declared: a round-robin index walks this list.
        let addrs = |ups: &[Arc<Upstream>]| -> Vec<String> {
            ups.iter().map(|u| u.addr.to_string()).collect()
        };
        // Port 80 targets 8080: the endpoints without ports of their own.
        let all = s.endpoints_of("default/api", 80, &[]);
        assert!(matches!(all, Cow::Borrowed(_)));
        assert_eq!(addrs(&all), ["10.0.0.1:8080", "10.0.0.2:8080"]);
        assert_eq!(
            addrs(&s.endpoints_of("default/api", 8080, &[])),
            addrs(&all)
        );
        // An undeclared port is its own target.
        assert_eq!(
            addrs(&s.endpoints_of("default/api", 9000, &[])),
            ["10.0.0.3:9000"]
        );
        let v2 = s.endpoints_of("default/api", 80, &[("version".into(), "v2".into())]);
        assert!(matches!(v2, Cow::Owned(_)));
        assert_eq!(addrs(&v2), ["10.0.0.2:8080"]);
        assert!(
            s.endpoints_of("default/api", 80, &[("version".into(), "v3".into())])
                .is_empty()
        );
        assert!(s.endpoints_of("default/web", 80, &[]).is_empty());
        assert_eq!(s.default_port("default/api"), Some(80));
        assert_eq!(s.default_port("default/web"), None);
    }

    #[test]
    fn only_ports_whose_policies_match_paths_have_path_rules() {
        let s = Snapshot::build(&me(), "1", res()).unwrap();
        assert!(!s.path_rules_on(8080));
        let mut r = res();
        r.authorization_policies[0].rules[0].paths = vec![v1::StringMatch {
            kind: Some(v1::string_match::Kind::Prefix("/admin/".into())),
        }];
        let s = Snapshot::build(&me(), "1", r).unwrap();
        assert!(s.path_rules_on(8080));
        // Ports no service maps are governed by every policy of ours.
        assert!(s.path_rules_on(9999));
    }

    #[test]
    fn ports_whose_rate_limited_routes_match_paths_have_path_rules() {
        use v1::string_match::Kind;
        let route = |rate_limit: Option<v1::RateLimit>| v1::Route {
            name: "api".into(),
            namespace: "default".into(),
            service: "default/api".into(),
            rules: vec![v1::HttpRoute {
                name: "login".into(),
                matches: vec![v1::RouteMatch {
                    path: Some(v1::StringMatch {
                        kind: Some(Kind::Exact("/login".into())),
                    }),
                    ..Default::default()
                }],
                rate_limit,
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut r = res();
        r.routes = vec![route(None)];
        let s = Snapshot::build(&me(), "1", r).unwrap();
        assert!(
            !s.path_rules_on(8080),
            "a route without a limit only routes"
        );
        let mut r = res();
        r.routes = vec![route(Some(v1::RateLimit {
            requests_per_second: 1,
            burst: 1,
            per_source_identity: false,
        }))];
        let s = Snapshot::build(&me(), "1", r).unwrap();
        // `//login` must not be a way past the `/login` limit.
        assert!(s.path_rules_on(8080));
        assert!(s.path_rules_on(9999));
    }

    #[test]
    fn invalid_resources_are_rejected_with_their_name() {
        let mut r = res();
        r.service_entries[0].endpoints[0].address = "not-an-ip".into();
        let e = Snapshot::build(&me(), "2", r).unwrap_err();
        assert_eq!(e.resource, "ServiceEntry default/api-pods");
        let mut r = res();
        r.authorization_policies[0].rules[0].from = vec!["web".into()];
        assert!(Snapshot::build(&me(), "2", r).is_err());
        let mut r = res();
        r.mesh.as_mut().unwrap().trust_domain = "other.org".into();
        assert!(Snapshot::build(&me(), "2", r).is_err());
    }

    #[test]
    fn identity_patterns() {
        let p = IdentityPattern::parse("spiffe://td/ns/*/sa/web").unwrap();
        assert!(p.matches("spiffe://td/ns/a/sa/web"));
        assert!(!p.matches("spiffe://td/ns/a/sa/api"));
        assert!(
            IdentityPattern::parse("*")
                .unwrap()
                .matches("spiffe://x/ns/a/sa/b")
        );
    }
}
