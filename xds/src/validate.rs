//! Every check the control plane applies to config before serving it.
//!
//! Checks collect all errors rather than stopping at the first, so one run of
//! `bulwark xds validate` shows everything to fix. Each error points at the
//! line of the offending value when it was written in the file, else at the
//! start of its document.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bulwark_ca::SpiffeId;

use crate::duration;
use crate::load::{ConfigError, ConfigErrors, Unparsed};
use crate::model::AdaptiveConcurrencySpec;
use crate::model::{
    API_VERSION, AuthorizationPolicySpec, Backend, DEFAULT_TRUST_DOMAIN, Document, EndpointSpec,
    HeaderMatch, Kind, Labels, Located, MeshLocation, PortSpec, Protocol, RateLimitSpec, RetrySpec,
    RouteSpec, ServiceEntrySpec, ServiceSpec, Spec, StringMatch, TrafficPolicySpec,
};
use crate::model::{
    GatewayAuthorizationSpec, GatewayListenerSpec, GatewayRouteSpec, GatewaySpec, JwtProviderSpec,
    RequestAuthenticationSpec, RuleCore,
};

/// Most retry attempts a route may ask for: more only multiplies load on a
/// backend that is already failing.
pub const MAX_RETRY_ATTEMPTS: u32 = 10;
/// Longest regex pattern accepted, in bytes.
pub const MAX_REGEX_LEN: usize = 1024;
/// Bound on a compiled regex's memory, so a pattern like `(a{1000}){1000}`
/// is rejected here rather than costing memory in every sidecar.
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// `retryOn` conditions the sidecar implements. The gRPC ones (named as
/// Envoy names them) match a trailers-only response's `grpc-status`.
pub const RETRY_ON: [&str; 10] = [
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "retriable-status-codes",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// Checks documents that parsed; returns every problem found.
pub fn validate(documents: &[Document]) -> Result<(), ConfigErrors> {
    let errors = check(documents, &[]);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors::sorted(errors))
    }
}

/// Checks `documents`; `unparsed` are documents that failed to parse but
/// whose kind and name are known, so references to them are not reported
/// as dangling on top of their parse error.
pub(crate) fn check(documents: &[Document], unparsed: &[Unparsed]) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let registry = Registry::build(documents, unparsed, &mut errors);
    let mut routed: HashMap<ServiceKey, (PathBuf, u32)> = HashMap::new();
    let mut policed: HashMap<ServiceKey, (PathBuf, u32)> = HashMap::new();
    let mut authenticated: HashMap<ServiceKey, (PathBuf, u32)> = HashMap::new();
    for (i, doc) in documents.iter().enumerate() {
        // A duplicate is reported once, as such, not again as a second
        // Route or TrafficPolicy for its service.
        let duplicate = registry.duplicates.contains(&i);
        let mut cx = Cx {
            file: &doc.file,
            doc_line: doc.line,
            namespace: doc.namespace(),
            errors: &mut errors,
        };
        check_envelope(&mut cx, doc);
        match &doc.spec {
            Spec::MeshConfig(_) => {} // checked while building the registry
            Spec::Service(s) => check_service(&mut cx, &registry, s),
            Spec::ServiceEntry(s) => check_service_entry(&mut cx, &registry, s),
            Spec::Route(r) => {
                check_route(&mut cx, &registry, r);
                if !duplicate {
                    one_per_service(&mut cx, &registry, &mut routed, &r.service, "Route");
                }
            }
            Spec::TrafficPolicy(t) => {
                check_traffic_policy(&mut cx, &registry, t);
                if !duplicate {
                    one_per_service(
                        &mut cx,
                        &registry,
                        &mut policed,
                        &t.service,
                        "TrafficPolicy",
                    );
                }
            }
            Spec::AuthorizationPolicy(a) => check_authorization_policy(&mut cx, &registry, a),
            Spec::Gateway(g) => {
                let key = (doc.namespace().to_string(), doc.name().to_string());
                check_gateway(&mut cx, &registry, &key, g);
            }
            Spec::RequestAuthentication(a) => {
                check_request_authentication(&mut cx, &registry, a);
                if !duplicate {
                    one_per_gateway(&mut cx, &registry, &mut authenticated, &a.gateway);
                }
            }
        }
    }
    errors
}

/// `(namespace, name)` of a Service or ServiceEntry.
pub(crate) type ServiceKey = (String, String);

/// Resolves a service reference written in `namespace`: `name` or
/// `namespace/name`. `None` if it has more than one `/`.
pub(crate) fn resolve(reference: &str, namespace: &str) -> Option<ServiceKey> {
    match reference.split_once('/') {
        None => Some((namespace.to_string(), reference.to_string())),
        Some((ns, name)) if !name.contains('/') => Some((ns.to_string(), name.to_string())),
        Some(_) => None,
    }
}

/// What other documents need to know about a service.
#[derive(Default)]
struct ServiceInfo {
    /// Service ports, `None` when the service did not parse.
    ports: Option<BTreeSet<u32>>,
    /// Every port is `tcp`: HTTP routing cannot apply.
    tcp_only: bool,
}

/// Mesh-wide facts the per-document checks use.
struct Registry {
    /// `None` when the configured trust domain is itself invalid (already
    /// reported), so identities are not also reported against it.
    trust_domain: Option<String>,
    services: HashMap<ServiceKey, ServiceInfo>,
    /// Indices of documents that repeat an earlier kind/namespace/name.
    duplicates: HashSet<usize>,
    /// Gateways, parsed or not: what RequestAuthentications may name.
    gateways: HashSet<ServiceKey>,
    /// Gateways a RequestAuthentication applies to.
    authenticated: HashSet<ServiceKey>,
    /// Namespaces with a RequestAuthentication that did not parse (its
    /// gateway unknown), so no gateway there is said to lack one.
    unparsed_authentication_in: HashSet<String>,
}

impl Registry {
    /// Indexes services and reports duplicates and extra MeshConfigs.
    fn build(documents: &[Document], unparsed: &[Unparsed], errors: &mut Vec<ConfigError>) -> Self {
        let mut trust_domain = Some(DEFAULT_TRUST_DOMAIN.to_string());
        let mut mesh_seen: Option<(&Path, u32)> = None;
        let mut seen: HashMap<(Kind, &str, &str), (&Path, u32)> = HashMap::new();
        let mut services: HashMap<ServiceKey, ServiceInfo> = HashMap::new();
        let mut duplicates = HashSet::new();
        let mut gateways = HashSet::new();
        let mut authenticated = HashSet::new();
        let mut unparsed_authentication_in = HashSet::new();
        for (i, doc) in documents.iter().enumerate() {
            let line = line_or(doc.metadata.name.line, doc.line);
            let key = (doc.kind(), doc.namespace(), doc.name());
            if let Some((file, first)) = seen.get(&key) {
                errors.push(ConfigError::new(
                    &doc.file,
                    line,
                    format!(
                        "duplicate {} {}/{} (first defined at {}:{})",
                        doc.kind(),
                        doc.namespace(),
                        doc.name(),
                        file.display(),
                        first
                    ),
                ));
                duplicates.insert(i);
                continue;
            }
            seen.insert(key, (&doc.file, line));
            match &doc.spec {
                Spec::MeshConfig(mesh) => {
                    if let Some((file, first)) = mesh_seen {
                        errors.push(ConfigError::new(
                            &doc.file,
                            doc.line,
                            format!(
                                "more than one MeshConfig (the first is at {}:{}); a mesh has one",
                                file.display(),
                                first
                            ),
                        ));
                        continue;
                    }
                    mesh_seen = Some((&doc.file, doc.line));
                    if let Err(e) = bulwark_ca::identity::validate_trust_domain(&mesh.trust_domain)
                    {
                        errors.push(ConfigError::new(
                            &doc.file,
                            line_or(mesh.trust_domain.line, doc.line),
                            format!("trustDomain: {e}"),
                        ));
                        trust_domain = None;
                    } else {
                        trust_domain = Some(mesh.trust_domain.value.clone());
                    }
                }
                Spec::Service(s) => add_ports(&mut services, doc, &s.ports),
                Spec::ServiceEntry(s) => add_ports(&mut services, doc, &s.ports),
                Spec::Gateway(_) => {
                    gateways.insert((doc.namespace().to_string(), doc.name().to_string()));
                }
                Spec::RequestAuthentication(a) => {
                    authenticated.insert((doc.namespace().to_string(), a.gateway.value.clone()));
                }
                _ => {}
            }
        }
        for u in unparsed {
            match u.kind {
                Kind::Service | Kind::ServiceEntry => {
                    services
                        .entry((u.namespace.clone(), u.name.clone()))
                        .or_default()
                        .ports = None;
                }
                Kind::Gateway => {
                    gateways.insert((u.namespace.clone(), u.name.clone()));
                }
                Kind::RequestAuthentication => {
                    unparsed_authentication_in.insert(u.namespace.clone());
                }
                _ => {}
            }
        }
        Registry {
            trust_domain,
            services,
            duplicates,
            gateways,
            authenticated,
            unparsed_authentication_in,
        }
    }
}

/// A Service and a ServiceEntry of the same name describe one service: its
/// ports are the union.
fn add_ports(services: &mut HashMap<ServiceKey, ServiceInfo>, doc: &Document, ports: &[PortSpec]) {
    let key = (doc.namespace().to_string(), doc.name().to_string());
    let info = services.entry(key).or_insert_with(|| ServiceInfo {
        ports: Some(BTreeSet::new()),
        tcp_only: true,
    });
    if let Some(set) = info.ports.as_mut() {
        set.extend(ports.iter().map(|p| p.port.value));
    }
    info.tcp_only &= !ports.is_empty() && ports.iter().all(|p| p.protocol == Protocol::Tcp);
}

/// Where errors for one document go.
struct Cx<'a> {
    file: &'a Path,
    doc_line: u32,
    namespace: &'a str,
    errors: &'a mut Vec<ConfigError>,
}

impl Cx<'_> {
    /// Reports at `line`, or at the document when the value had no line.
    fn err(&mut self, line: u32, message: impl Into<String>) {
        self.errors.push(ConfigError::new(
            self.file,
            line_or(line, self.doc_line),
            message,
        ));
    }
}

fn line_or(line: u32, fallback: u32) -> u32 {
    if line == 0 { fallback } else { line }
}

fn check_envelope(cx: &mut Cx<'_>, doc: &Document) {
    if doc.api_version.value != API_VERSION {
        cx.err(
            doc.api_version.line,
            format!(
                "unsupported apiVersion `{}`, expected {API_VERSION}",
                doc.api_version.value
            ),
        );
    }
    let m = &doc.metadata;
    if let Err(e) = dns_label(&m.name) {
        cx.err(m.name.line, format!("metadata.name: {e}"));
    }
    if let Err(e) = dns_label(&m.namespace) {
        cx.err(m.namespace.line, format!("metadata.namespace: {e}"));
    }
    check_labels(cx, "metadata.labels", &m.labels);
    for key in m.annotations.keys() {
        if let Err(e) = label_key(key) {
            cx.err(m.name.line, format!("metadata.annotations: {e}"));
        }
    }
}

fn check_service(cx: &mut Cx<'_>, reg: &Registry, s: &ServiceSpec) {
    check_ports(cx, &s.ports);
    let mut seen = BTreeSet::new();
    for id in &s.identities {
        check_identity(cx, reg, "identities", id);
        if !seen.insert(id.value.as_str()) {
            cx.err(id.line, format!("identity {} is listed twice", id.value));
        }
    }
    check_labels(cx, "selector", &s.selector);
    for a in &s.addresses {
        check_ip(cx, "addresses", a);
    }
}

fn check_service_entry(cx: &mut Cx<'_>, reg: &Registry, s: &ServiceEntrySpec) {
    check_ports(cx, &s.ports);
    for h in &s.hosts {
        if let Err(e) = hostname(h) {
            cx.err(h.line, format!("hosts: {e}"));
        }
    }
    for a in &s.addresses {
        check_ip(cx, "addresses", a);
    }
    match s.location {
        MeshLocation::MeshExternal if s.hosts.is_empty() && s.addresses.is_empty() => cx.err(
            s.ports.line,
            "a MESH_EXTERNAL ServiceEntry needs hosts or addresses for clients to dial",
        ),
        MeshLocation::MeshInternal if s.endpoints.is_empty() => cx.err(
            s.ports.line,
            "a MESH_INTERNAL ServiceEntry lists mesh workloads: add endpoints",
        ),
        _ => {}
    }
    for ep in &s.endpoints {
        check_endpoint(cx, reg, ep);
    }
}

fn check_endpoint(cx: &mut Cx<'_>, reg: &Registry, ep: &EndpointSpec) {
    check_ip(cx, "endpoints.address", &ep.address);
    if let Some(id) = &ep.identity {
        check_identity(cx, reg, "endpoints.identity", id);
    }
    check_labels(cx, "endpoints.labels", &ep.labels);
    for p in &ep.ports {
        check_port_number(cx, "endpoints.ports", p);
    }
}

fn check_ports(cx: &mut Cx<'_>, ports: &Located<Vec<PortSpec>>) {
    if ports.is_empty() {
        cx.err(ports.line, "ports: at least one port is required");
    }
    let mut numbers = BTreeSet::new();
    let mut names = BTreeSet::new();
    for p in ports.iter() {
        check_port_number(cx, "port", &p.port);
        if !numbers.insert(p.port.value) {
            cx.err(
                p.port.line,
                format!("port {} is listed twice", p.port.value),
            );
        }
        if let Some(t) = &p.target_port {
            check_port_number(cx, "targetPort", t);
        }
        if let Some(name) = &p.name {
            if let Err(e) = dns_label(name) {
                cx.err(name.line, format!("port name: {e}"));
            } else if !names.insert(name.value.as_str()) {
                cx.err(name.line, format!("port name {} is used twice", name.value));
            }
        }
    }
}

fn check_port_number(cx: &mut Cx<'_>, what: &str, p: &Located<u32>) {
    if !(1..=65535).contains(&p.value) {
        cx.err(
            p.line,
            format!("{what} {} is out of range 1..=65535", p.value),
        );
    }
}

fn check_ip(cx: &mut Cx<'_>, what: &str, a: &Located<String>) {
    if a.parse::<IpAddr>().is_err() {
        cx.err(
            a.line,
            format!("{what}: {:?} is not an IPv4 or IPv6 address", a.value),
        );
    }
}

/// A workload identity: a SPIFFE ID in the mesh's trust domain.
fn check_identity(cx: &mut Cx<'_>, reg: &Registry, what: &str, id: &Located<String>) {
    match id.parse::<SpiffeId>() {
        Err(e) => cx.err(id.line, format!("{what}: {e}")),
        Ok(parsed) => check_trust_domain(cx, reg, what, id, parsed.trust_domain()),
    }
}

fn check_trust_domain(cx: &mut Cx<'_>, reg: &Registry, what: &str, id: &Located<String>, td: &str) {
    if let Some(mesh_td) = &reg.trust_domain
        && td != mesh_td
    {
        cx.err(
            id.line,
            format!(
                "{what}: {} is not in the mesh trust domain {mesh_td}",
                id.value
            ),
        );
    }
}

/// A source pattern in an AuthorizationPolicy: a SPIFFE ID where `*` may
/// stand for any run of characters. The fixed parts must form a SPIFFE ID
/// when each `*` is filled in with a plain name, which catches typos such
/// as a missing `/sa/` while allowing `spiffe://cluster.local/ns/shop/sa/*`.
fn check_source_pattern(cx: &mut Cx<'_>, reg: &Registry, p: &Located<String>) {
    if p.value == "*" {
        cx.err(
            p.line,
            "from: `*` is not a SPIFFE ID pattern; leave `from` out to allow any identity",
        );
        return;
    }
    if !p.contains('*') {
        check_identity(cx, reg, "from", p);
        return;
    }
    let filled = p.replace('*', "x");
    match filled.parse::<SpiffeId>() {
        Err(e) => cx.err(
            p.line,
            format!(
                "from: {:?} is not a SPIFFE ID pattern ({e}); `*` may stand for part of the \
                 trust domain, namespace or service account, e.g. spiffe://cluster.local/ns/shop/sa/*",
                p.value
            ),
        ),
        Ok(parsed) => {
            let td_has_star = p
                .strip_prefix("spiffe://")
                .and_then(|rest| rest.split('/').next())
                .is_some_and(|td| td.contains('*'));
            if !td_has_star {
                check_trust_domain(cx, reg, "from", p, parsed.trust_domain());
            }
        }
    }
}

fn check_labels(cx: &mut Cx<'_>, what: &str, labels: &Located<Labels>) {
    let line = labels.line;
    for (k, v) in labels.iter() {
        if let Err(e) = label_key(k) {
            cx.err(line, format!("{what}: {e}"));
        }
        if let Err(e) = label_value(v) {
            cx.err(line, format!("{what}: {k}: {e}"));
        }
    }
}

/// Names a referenced service, or reports why it cannot.
fn check_service_ref(
    cx: &mut Cx<'_>,
    reg: &Registry,
    what: &str,
    r: &Located<String>,
) -> Option<ServiceKey> {
    let Some(key) = resolve(&r.value, cx.namespace) else {
        cx.err(
            r.line,
            format!(
                "{what}: `{}` is not a service reference: use name or namespace/name",
                r.value
            ),
        );
        return None;
    };
    if let Err(e) = dns_label(&key.0).and_then(|_| dns_label(&key.1)) {
        cx.err(r.line, format!("{what}: `{}`: {e}", r.value));
        return None;
    }
    if reg.services.contains_key(&key) {
        return Some(key);
    }
    let elsewhere: Vec<String> = reg
        .services
        .keys()
        .filter(|(_, name)| *name == key.1)
        .map(|(ns, name)| format!("{ns}/{name}"))
        .collect();
    let hint = match elsewhere.iter().min() {
        Some(other) => format!(" (did you mean {other}?)"),
        None => String::new(),
    };
    cx.err(
        r.line,
        format!(
            "{what}: unknown service {}/{}: no Service or ServiceEntry has that name{hint}",
            key.0, key.1
        ),
    );
    None
}

/// One Route (or TrafficPolicy) per service: two would leave which one
/// applies to chance.
fn one_per_service(
    cx: &mut Cx<'_>,
    reg: &Registry,
    claimed: &mut HashMap<ServiceKey, (PathBuf, u32)>,
    service: &Located<String>,
    kind: &str,
) {
    let Some(key) = resolve(&service.value, cx.namespace) else {
        return;
    };
    if !reg.services.contains_key(&key) {
        return;
    }
    let line = line_or(service.line, cx.doc_line);
    claim_once(cx, claimed, key, line, "service", kind);
}

/// Records that `owner` `key` has its `kind` at `line`, or reports the one
/// it already has.
fn claim_once(
    cx: &mut Cx<'_>,
    claimed: &mut HashMap<ServiceKey, (PathBuf, u32)>,
    key: ServiceKey,
    line: u32,
    owner: &str,
    kind: &str,
) {
    if let Some((file, first)) = claimed.get(&key) {
        cx.err(
            line,
            format!(
                "{owner} {}/{} already has a {kind} (at {}:{}); merge them into one",
                key.0,
                key.1,
                file.display(),
                first
            ),
        );
    } else {
        claimed.insert(key, (cx.file.to_path_buf(), line));
    }
}

/// One RequestAuthentication per gateway: two would leave which providers
/// apply to the order they are read in.
fn one_per_gateway(
    cx: &mut Cx<'_>,
    reg: &Registry,
    claimed: &mut HashMap<ServiceKey, (PathBuf, u32)>,
    gateway: &Located<String>,
) {
    let key = (cx.namespace.to_string(), gateway.value.clone());
    if !reg.gateways.contains(&key) {
        return;
    }
    let line = line_or(gateway.line, cx.doc_line);
    claim_once(cx, claimed, key, line, "gateway", "RequestAuthentication");
}

fn check_route(cx: &mut Cx<'_>, reg: &Registry, r: &RouteSpec) {
    if let Some(key) = check_service_ref(cx, reg, "service", &r.service)
        && reg.services.get(&key).is_some_and(|s| s.tcp_only)
    {
        cx.err(
            r.service.line,
            format!(
                "service {}/{} has only tcp ports: a Route applies to HTTP traffic",
                key.0, key.1
            ),
        );
    }
    if r.rules.is_empty() {
        cx.err(r.rules.line, "rules: a Route needs at least one rule");
    }
    let own = resolve(&r.service.value, cx.namespace);
    let mut names = BTreeSet::new();
    for rule in r.rules.iter() {
        check_rule(cx, reg, &mut names, "rule", &rule.core());
        if let Some(rl) = &rule.rate_limit {
            check_rate_limit(cx, rl);
            // The limit is enforced where the caller's identity is verified:
            // the inbound sidecars of the route's own service.
            let other = rule
                .backends
                .iter()
                .chain(rule.overrides.iter().map(|o| &o.backend.value))
                .map(|b| &b.service)
                .find(|s| own.is_some() && resolve(&s.value, cx.namespace) != own);
            if let (Some(other), Some(own)) = (other, &own) {
                cx.err(
                    rl.line,
                    format!(
                        "rateLimit is enforced by the inbound sidecars of {}/{}, but this rule also sends to `{}`, where it would not apply; give that service its own Route or TrafficPolicy limit",
                        own.0, own.1, other.value
                    ),
                );
            }
        }
    }
}

fn check_rate_limit(cx: &mut Cx<'_>, rl: &RateLimitSpec) {
    at_least_one(cx, "rateLimit.requestsPerSecond", &rl.requests_per_second);
    if let Some(b) = &rl.burst {
        at_least_one(cx, "rateLimit.burst", b);
    }
}

/// The checks a Route rule and a Gateway route share. `names` collects the
/// rule names seen so far in the document (`what` names them in messages).
fn check_rule<'a>(
    cx: &mut Cx<'_>,
    reg: &Registry,
    names: &mut BTreeSet<&'a str>,
    what: &str,
    rule: &RuleCore<'a>,
) {
    if let Some(name) = rule.name {
        if let Err(e) = dns_label(name) {
            cx.err(name.line, format!("{what} name: {e}"));
        } else if !names.insert(name.value.as_str()) {
            cx.err(
                name.line,
                format!("{what} name {} is used twice", name.value),
            );
        }
    }
    for m in rule.matches {
        if let Some(path) = &m.path {
            check_path_match(cx, "matches.path", path);
        }
        for method in &m.methods {
            check_method(cx, method);
        }
        for h in &m.headers {
            check_header_match(cx, h);
        }
    }
    check_backends(cx, reg, rule.backends);
    for o in rule.overrides {
        check_header_match(cx, &o.header);
        check_backend(cx, reg, &o.backend);
        if let Some(w) = &o.backend.weight {
            cx.err(
                w.line,
                "overrides.backend.weight has no effect: an override sends all matching requests",
            );
        }
    }
    let timeout = rule.timeout.and_then(|t| check_duration(cx, "timeout", t));
    if let Some(retry) = rule.retry {
        check_retry(cx, retry, timeout);
    }
}

fn check_backends(cx: &mut Cx<'_>, reg: &Registry, backends: &[Backend]) {
    let mut sum: u64 = 0;
    let mut all_weighted = true;
    for b in backends {
        check_backend(cx, reg, b);
        match &b.weight {
            Some(w) if w.value > 100 => {
                cx.err(
                    w.line,
                    format!("backend weight {} is out of range 0..=100", w.value),
                );
                all_weighted = false; // the sum would only repeat this error
            }
            Some(w) => sum += u64::from(w.value),
            None if backends.len() > 1 => {
                cx.err(
                    b.service.line,
                    "backend weight is required when a rule has more than one backend",
                );
                all_weighted = false;
            }
            None => sum += 100,
        }
    }
    if !backends.is_empty() && all_weighted && sum != 100 {
        let line = backends[0]
            .weight
            .as_ref()
            .map_or(backends[0].service.line, |w| w.line);
        cx.err(
            line,
            format!("backend weights sum to {sum}, they must sum to 100"),
        );
    }
}

fn check_backend(cx: &mut Cx<'_>, reg: &Registry, b: &Backend) {
    let key = check_service_ref(cx, reg, "backend service", &b.service);
    check_labels(cx, "backend subset", &b.subset);
    if let Some(port) = &b.port {
        check_port_number(cx, "backend port", port);
        if let Some(key) = key
            && let Some(ports) = reg.services.get(&key).and_then(|s| s.ports.as_ref())
            && (1..=65535).contains(&port.value)
            && !ports.contains(&port.value)
        {
            let list: Vec<String> = ports.iter().map(u32::to_string).collect();
            cx.err(
                port.line,
                format!(
                    "backend port {} is not a port of service {}/{} (ports: {})",
                    port.value,
                    key.0,
                    key.1,
                    list.join(", ")
                ),
            );
        }
    }
}

fn check_retry(cx: &mut Cx<'_>, r: &Located<RetrySpec>, timeout: Option<Duration>) {
    if !(1..=MAX_RETRY_ATTEMPTS).contains(&r.attempts.value) {
        cx.err(
            r.attempts.line,
            format!(
                "retry attempts {} is out of range 1..={MAX_RETRY_ATTEMPTS} (leave retry out for no retries)",
                r.attempts.value
            ),
        );
    }
    let per_try = r
        .per_try_timeout
        .as_ref()
        .and_then(|d| check_duration(cx, "retry.perTryTimeout", d));
    if let (Some(per_try), Some(timeout), Some(d)) = (per_try, timeout, &r.per_try_timeout)
        && per_try > timeout
    {
        cx.err(
            d.line,
            format!(
                "retry.perTryTimeout {} is longer than the rule's timeout",
                d.value
            ),
        );
    }
    let base = r
        .backoff_base
        .as_ref()
        .and_then(|d| check_duration(cx, "retry.backoffBase", d));
    let max = r
        .backoff_max
        .as_ref()
        .and_then(|d| check_duration(cx, "retry.backoffMax", d));
    let base = base.unwrap_or(crate::compile::DEFAULT_BACKOFF_BASE);
    let max = max.unwrap_or(crate::compile::DEFAULT_BACKOFF_MAX.max(base));
    if base > max {
        let line = r.backoff_base.as_ref().map_or(r.line, |d| d.line);
        cx.err(line, "retry.backoffBase is longer than retry.backoffMax");
    }
    let mut status_codes_enabled = false;
    for cond in &r.retry_on {
        if !RETRY_ON.contains(&cond.value.as_str()) {
            cx.err(
                cond.line,
                format!(
                    "retry.retryOn: unknown condition `{}`, expected one of {}",
                    cond.value,
                    RETRY_ON.join(", ")
                ),
            );
        }
        status_codes_enabled |= cond.value == "retriable-status-codes";
    }
    for code in &r.retriable_status_codes {
        if !(100..=599).contains(&code.value) {
            cx.err(
                code.line,
                format!(
                    "retry.retriableStatusCodes: {} is not an HTTP status code",
                    code.value
                ),
            );
        }
    }
    if !r.retriable_status_codes.is_empty() && !status_codes_enabled {
        cx.err(
            r.retriable_status_codes[0].line,
            "retry.retriableStatusCodes has no effect unless retryOn includes retriable-status-codes",
        );
    }
    if let Some(ratio) = &r.budget_ratio {
        check_ratio(cx, "retry.budgetRatio", ratio);
    }
}

fn check_traffic_policy(cx: &mut Cx<'_>, reg: &Registry, t: &TrafficPolicySpec) {
    check_service_ref(cx, reg, "service", &t.service);
    if let Some(b) = &t.bulkhead {
        for (what, v) in [
            ("bulkhead.maxConnections", &b.max_connections),
            ("bulkhead.maxRequests", &b.max_requests),
            ("bulkhead.maxPending", &b.max_pending),
        ] {
            if let Some(v) = v {
                at_least_one(cx, what, v);
            }
        }
        if let Some(d) = &b.queue_timeout {
            check_duration(cx, "bulkhead.queueTimeout", d);
        }
    }
    if let Some(cb) = &t.circuit_breaker {
        if cb.consecutive_failures.is_none() && cb.failure_ratio.is_none() {
            cx.err(
                cb.line,
                "circuitBreaker needs consecutiveFailures or failureRatio to know when to open",
            );
        }
        if let Some(v) = &cb.consecutive_failures {
            at_least_one(cx, "circuitBreaker.consecutiveFailures", v);
        }
        if let Some(r) = &cb.failure_ratio
            && check_ratio(cx, "circuitBreaker.failureRatio", r)
            && r.value == 0.0
        {
            cx.err(r.line, "circuitBreaker.failureRatio must be above 0");
        }
        if let Some(v) = &cb.min_requests {
            at_least_one(cx, "circuitBreaker.minRequests", v);
        }
        if let Some(v) = &cb.half_open_requests {
            at_least_one(cx, "circuitBreaker.halfOpenRequests", v);
        }
        if let Some(d) = &cb.window {
            check_duration(cx, "circuitBreaker.window", d);
        }
        if let Some(d) = &cb.open_duration {
            check_duration(cx, "circuitBreaker.openDuration", d);
        }
    }
    if let Some(o) = &t.outlier_detection {
        if let Some(v) = &o.consecutive_5xx {
            at_least_one(cx, "outlierDetection.consecutive5xx", v);
        }
        if let Some(d) = &o.interval {
            check_duration(cx, "outlierDetection.interval", d);
        }
        if let Some(d) = &o.base_ejection_time {
            check_duration(cx, "outlierDetection.baseEjectionTime", d);
        }
        if let Some(p) = &o.max_ejection_percent
            && p.value > 100
        {
            cx.err(
                p.line,
                format!(
                    "outlierDetection.maxEjectionPercent {} is out of range 0..=100",
                    p.value
                ),
            );
        }
    }
    if let Some(d) = &t.connect_timeout {
        check_duration(cx, "connectTimeout", d);
    }
    if let Some(v) = &t.max_request_body_bytes {
        at_least_one(cx, "maxRequestBodyBytes", v);
    }
    if let Some(rl) = &t.rate_limit {
        check_rate_limit(cx, rl);
    }
    if let Some(hc) = &t.health_check {
        if !hc.path.starts_with('/') || hc.path.parse::<http::uri::PathAndQuery>().is_err() {
            cx.err(
                hc.path.line,
                format!(
                    "healthCheck.path {:?} is not an absolute URL path",
                    hc.path.value
                ),
            );
        }
        let interval = hc
            .interval
            .as_ref()
            .and_then(|d| check_duration(cx, "healthCheck.interval", d))
            .unwrap_or(crate::compile::DEFAULT_HEALTH_INTERVAL);
        let timeout = hc
            .timeout
            .as_ref()
            .and_then(|d| check_duration(cx, "healthCheck.timeout", d))
            .unwrap_or(crate::compile::DEFAULT_HEALTH_TIMEOUT);
        if timeout > interval {
            let line = hc.timeout.as_ref().map_or(hc.line, |d| d.line);
            cx.err(
                line,
                "healthCheck.timeout is longer than healthCheck.interval",
            );
        }
        if let Some(v) = &hc.unhealthy_threshold {
            at_least_one(cx, "healthCheck.unhealthyThreshold", v);
        }
        if let Some(v) = &hc.healthy_threshold {
            at_least_one(cx, "healthCheck.healthyThreshold", v);
        }
    }
    if let Some(a) = &t.adaptive_concurrency {
        check_adaptive_concurrency(cx, a);
    }
}

fn check_adaptive_concurrency(cx: &mut Cx<'_>, a: &Located<AdaptiveConcurrencySpec>) {
    use crate::compile::{DEFAULT_ADAPTIVE_MAX_LIMIT, DEFAULT_ADAPTIVE_MIN_LIMIT};
    for (what, v) in [
        ("adaptiveConcurrency.minLimit", &a.min_limit),
        ("adaptiveConcurrency.maxLimit", &a.max_limit),
        ("adaptiveConcurrency.initialLimit", &a.initial_limit),
    ] {
        if let Some(v) = v {
            at_least_one(cx, what, v);
        }
    }
    let min = a
        .min_limit
        .as_ref()
        .map_or(DEFAULT_ADAPTIVE_MIN_LIMIT, |v| v.value);
    let max = a
        .max_limit
        .as_ref()
        .map_or(DEFAULT_ADAPTIVE_MAX_LIMIT, |v| v.value);
    if min > max {
        let (line, which) = match &a.max_limit {
            Some(v) => (v.line, ""),
            None => (
                a.min_limit.as_ref().map_or(a.line, |v| v.line),
                " (the default)",
            ),
        };
        cx.err(
            line,
            format!("adaptiveConcurrency.minLimit {min} is above maxLimit {max}{which}"),
        );
    }
    if let Some(v) = &a.initial_limit
        && v.value != 0
        && !(min..=max).contains(&v.value)
    {
        cx.err(
            v.line,
            format!(
                "adaptiveConcurrency.initialLimit {} is outside minLimit..=maxLimit ({min}..={max})",
                v.value
            ),
        );
    }
    // A tolerance of 1 or less would call the minimum itself too slow and
    // pin the limit at minLimit.
    if let Some(r) = &a.latency_tolerance
        && !(r.value.is_finite() && r.value > 1.0)
    {
        cx.err(
            r.line,
            format!(
                "adaptiveConcurrency.latencyTolerance {} must be a ratio above 1 (e.g. 2.0: twice the minimum latency)",
                r.value
            ),
        );
    }
    if let Some(d) = &a.sample_window {
        check_duration(cx, "adaptiveConcurrency.sampleWindow", d);
    }
}

fn check_authorization_policy(cx: &mut Cx<'_>, reg: &Registry, a: &AuthorizationPolicySpec) {
    check_service_ref(cx, reg, "service", &a.service);
    for rule in &a.rules {
        for p in &rule.from {
            check_source_pattern(cx, reg, p);
        }
        for p in &rule.paths {
            check_path_match(cx, "paths", p);
        }
        for m in &rule.methods {
            check_method(cx, m);
        }
    }
}

/// Ports a gateway listener may not use: the proxy's own (admin, metrics
/// and health, capture).
pub const RESERVED_PROXY_PORTS: std::ops::RangeInclusive<u32> = 15000..=15021;
/// JWT signature algorithms a provider may allow: the asymmetric ones. HMAC
/// is left out on purpose (see [`check_algorithm`]).
pub const JWT_ALGORITHMS: [&str; 9] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];
/// Rate-limit client keys besides `header:<name>`.
pub const CLIENT_KEYS: [&str; 2] = ["subject", "source-ip"];

fn check_gateway(cx: &mut Cx<'_>, reg: &Registry, gateway: &ServiceKey, g: &GatewaySpec) {
    if g.listeners.is_empty() {
        cx.err(
            g.listeners.line,
            "listeners: a Gateway needs at least one listener",
        );
    }
    let mut names = BTreeSet::new();
    let mut ports = BTreeSet::new();
    for l in g.listeners.iter() {
        check_listener(cx, l);
        if dns_label(&l.name).is_ok() && !names.insert(l.name.value.as_str()) {
            cx.err(
                l.name.line,
                format!("listener name {} is used twice", l.name.value),
            );
        }
        if !ports.insert(l.port.value) {
            cx.err(
                l.port.line,
                format!("listener port {} is used twice", l.port.value),
            );
        }
    }
    if g.routes.is_empty() {
        cx.err(g.routes.line, "routes: a Gateway needs at least one route");
    }
    let listeners: BTreeSet<&str> = g.listeners.iter().map(|l| l.name.value.as_str()).collect();
    let mut names = BTreeSet::new();
    for route in g.routes.iter() {
        check_gateway_route(cx, reg, gateway, &mut names, route);
        for l in &route.listeners {
            if !listeners.contains(l.value.as_str()) {
                cx.err(
                    l.line,
                    format!("listeners: this Gateway has no listener named {}", l.value),
                );
            }
        }
    }
}

fn check_listener(cx: &mut Cx<'_>, l: &GatewayListenerSpec) {
    if let Err(e) = dns_label(&l.name) {
        cx.err(l.name.line, format!("listener name: {e}"));
    }
    check_port_number(cx, "listener port", &l.port);
    if RESERVED_PROXY_PORTS.contains(&l.port.value) {
        cx.err(
            l.port.line,
            format!(
                "listener port {} is reserved: {}-{} are the proxy's own ports",
                l.port.value,
                RESERVED_PROXY_PORTS.start(),
                RESERVED_PROXY_PORTS.end()
            ),
        );
    }
    if l.certificates.is_empty() {
        cx.err(
            line_or(l.certificates.line, l.name.line),
            format!(
                "listener {}: at least one certificate is required",
                l.name.value
            ),
        );
    }
    let mut hostnames = BTreeSet::new();
    for c in l.certificates.iter() {
        for (what, file) in [("certFile", &c.cert_file), ("keyFile", &c.key_file)] {
            non_empty(cx, &format!("certificates.{what}"), file);
        }
        for h in &c.hostnames {
            if let Err(e) = hostname(h) {
                cx.err(h.line, format!("certificates.hostnames: {e}"));
            } else if !hostnames.insert(h.value.as_str()) {
                cx.err(
                    h.line,
                    format!(
                        "certificates.hostnames: {} has two certificates in listener {}",
                        h.value, l.name.value
                    ),
                );
            }
        }
    }
    if let Some(f) = &l.client_ca_file {
        non_empty(cx, "clientCaFile", f);
    }
    if let Some(r) = &l.require_client_cert
        && r.value
        && l.client_ca_file.as_ref().is_none_or(|f| f.is_empty())
    {
        cx.err(
            r.line,
            "requireClientCert needs clientCaFile: the roots client certificates are verified against",
        );
    }
}

fn check_gateway_route<'a>(
    cx: &mut Cx<'_>,
    reg: &Registry,
    gateway: &ServiceKey,
    names: &mut BTreeSet<&'a str>,
    route: &'a Located<GatewayRouteSpec>,
) {
    check_rule(cx, reg, names, "route", &route.core());
    if route.backends.is_empty() {
        cx.err(
            route.line,
            "a gateway route needs at least one backend: at the edge there is no service of its own to default to",
        );
    }
    // The gateway speaks HTTP to its backends.
    let backends = route
        .backends
        .iter()
        .chain(route.overrides.iter().map(|o| &o.backend.value));
    for b in backends {
        if let Some(key) = resolve(&b.service, cx.namespace)
            && reg.services.get(&key).is_some_and(|s| s.tcp_only)
        {
            cx.err(
                b.service.line,
                format!(
                    "backend service {}/{} has only tcp ports: a gateway routes HTTP",
                    key.0, key.1
                ),
            );
        }
    }
    for h in &route.hostnames {
        if let Err(e) = hostname(h) {
            cx.err(h.line, format!("hostnames: {e}"));
        }
    }
    if let Some(a) = &route.authorization {
        check_gateway_authorization(cx, reg, gateway, a);
    }
    if let Some(rl) = &route.rate_limit {
        check_client_key(cx, &rl.key);
        at_least_one(cx, "rateLimit.requestsPerSecond", &rl.requests_per_second);
        if let Some(b) = &rl.burst {
            at_least_one(cx, "rateLimit.burst", b);
        }
    }
    if let Some(v) = &route.validation {
        if let Some(schema) = &v.json_schema {
            check_json_schema(cx, schema);
        }
        if let Some(max) = &v.max_body_bytes {
            at_least_one(cx, "validation.maxBodyBytes", max);
        }
    }
}

fn check_gateway_authorization(
    cx: &mut Cx<'_>,
    reg: &Registry,
    gateway: &ServiceKey,
    a: &Located<GatewayAuthorizationSpec>,
) {
    for s in &a.scopes {
        if s.is_empty() || s.contains(char::is_whitespace) {
            cx.err(
                s.line,
                format!(
                    "authorization.scopes: {:?} is not a scope (a non-empty string without spaces: \
                     tokens list scopes separated by spaces)",
                    s.value
                ),
            );
        }
    }
    for c in &a.claims {
        non_empty(cx, "authorization.claims.claim", &c.claim);
        if c.values.is_empty() {
            cx.err(
                line_or(c.values.line, c.line),
                format!(
                    "authorization.claims: claim {} needs at least one value",
                    c.claim.value
                ),
            );
        }
        for v in c.values.iter() {
            non_empty(cx, "authorization.claims.values", v);
        }
    }
    let needs_token = a.require_authenticated.as_ref().is_some_and(|r| r.value)
        || !a.scopes.is_empty()
        || !a.claims.is_empty();
    if needs_token
        && !reg.authenticated.contains(gateway)
        && !reg.unparsed_authentication_in.contains(&gateway.0)
    {
        cx.err(
            a.line,
            format!(
                "authorization needs a token, but no RequestAuthentication applies to gateway {}/{}: \
                 every request would be refused",
                gateway.0, gateway.1
            ),
        );
    }
}

/// `subject`, `source-ip` or `header:<name>`.
fn check_client_key(cx: &mut Cx<'_>, key: &Located<String>) {
    if CLIENT_KEYS.contains(&key.value.as_str()) {
        return;
    }
    match key.strip_prefix("header:") {
        Some(name) => {
            if let Err(e) = http::HeaderName::from_bytes(name.as_bytes()) {
                cx.err(
                    key.line,
                    format!("rateLimit.key: header name {name:?}: {e}"),
                );
            }
        }
        None => cx.err(
            key.line,
            format!(
                "rateLimit.key: unknown key {:?}, expected subject, source-ip or header:<name>",
                key.value
            ),
        ),
    }
}

/// The schema must compile, and on its own: the gateway fetches nothing,
/// so a reference outside the document could never resolve.
fn check_json_schema(cx: &mut Cx<'_>, schema: &Located<serde_json::Value>) {
    // As the gateway compiles it (formats asserted), so what passes here
    // compiles there.
    let Err(e) = jsonschema::options()
        .offline()
        .should_validate_formats(true)
        .build(&schema.value)
    else {
        return;
    };
    let message = match e.kind() {
        jsonschema::error::ValidationErrorKind::Referencing(
            jsonschema::ReferencingError::Unretrievable { uri, .. },
        ) => format!(
            "validation.jsonSchema: remote reference {uri}: schemas must be self-contained \
             (the gateway fetches nothing); put the definition under $defs and refer to #/$defs/..."
        ),
        _ => {
            let at = e.instance_path().as_str();
            let at = if at.is_empty() {
                String::new()
            } else {
                format!(" at {at}")
            };
            format!("validation.jsonSchema: invalid JSON Schema{at}: {e}")
        }
    };
    cx.err(schema.line, message);
}

fn check_request_authentication(cx: &mut Cx<'_>, reg: &Registry, a: &RequestAuthenticationSpec) {
    if a.gateway.contains('/') {
        cx.err(
            a.gateway.line,
            format!(
                "gateway: {:?}: name a Gateway in this document's namespace ({}), without a namespace/",
                a.gateway.value, cx.namespace
            ),
        );
    } else if let Err(e) = dns_label(&a.gateway) {
        cx.err(a.gateway.line, format!("gateway: {e}"));
    } else if !reg
        .gateways
        .contains(&(cx.namespace.to_string(), a.gateway.value.clone()))
    {
        cx.err(
            a.gateway.line,
            format!(
                "gateway: unknown gateway {}/{}: no Gateway has that name in this namespace",
                cx.namespace, a.gateway.value
            ),
        );
    }
    if a.providers.is_empty() {
        cx.err(
            a.providers.line,
            "providers: a RequestAuthentication needs at least one provider",
        );
    }
    let mut issuers = BTreeSet::new();
    for p in a.providers.iter() {
        check_jwt_provider(cx, p);
        if !p.issuer.is_empty() && !issuers.insert(p.issuer.value.as_str()) {
            cx.err(
                p.issuer.line,
                format!("issuer {} is listed twice", p.issuer.value),
            );
        }
    }
}

fn check_jwt_provider(cx: &mut Cx<'_>, p: &Located<JwtProviderSpec>) {
    non_empty(cx, "issuer", &p.issuer);
    for a in &p.audiences {
        non_empty(cx, "audiences", a);
    }
    match (&p.jwks_file, &p.jwks_uri) {
        (Some(_), Some(uri)) => cx.err(
            uri.line,
            "give exactly one of jwksFile, jwksUri: where the keys come from must be unambiguous",
        ),
        (None, None) => cx.err(
            line_or(p.issuer.line, p.line),
            format!("provider {}: give one of jwksFile, jwksUri", p.issuer.value),
        ),
        (Some(f), None) => non_empty(cx, "jwksFile", f),
        (None, Some(uri)) => check_jwks_uri(cx, uri),
    }
    if let Some(ca) = &p.jwks_ca_file {
        non_empty(cx, "jwksCaFile", ca);
        if p.jwks_uri.is_none() {
            cx.err(ca.line, "jwksCaFile applies only with jwksUri");
        }
    }
    if let Some(d) = &p.jwks_refresh {
        check_duration(cx, "jwksRefresh", d);
    }
    if let Some(d) = &p.clock_skew
        && let Err(e) = duration::parse(d)
    {
        // Zero is allowed: no leeway.
        cx.err(d.line, format!("clockSkew: {e}"));
    }
    let mut seen = BTreeSet::new();
    for alg in &p.algorithms {
        check_algorithm(cx, alg);
        if !seen.insert(alg.value.as_str()) {
            cx.err(alg.line, format!("algorithm {} is listed twice", alg.value));
        }
    }
    let mut headers: HashMap<String, &str> = HashMap::new();
    for (claim, header) in p.forward_claims.iter() {
        let line = line_or(header.line, p.forward_claims.line);
        if claim.is_empty() {
            cx.err(line, "forwardClaims: a claim name must not be empty");
        }
        if let Some(why) = check_forward_header(&header.value) {
            cx.err(
                line,
                format!("forwardClaims: {claim}: header {:?} {why}", header.value),
            );
        } else if let Some(other) = headers.insert(header.to_ascii_lowercase(), claim) {
            cx.err(
                line,
                format!(
                    "forwardClaims: claims {other} and {claim} both go to header {}",
                    header.value
                ),
            );
        }
    }
}

fn check_jwks_uri(cx: &mut Cx<'_>, uri: &Located<String>) {
    match uri.parse::<http::Uri>() {
        Ok(u) if u.scheme_str() == Some("https") && u.host().is_some_and(|h| !h.is_empty()) => {}
        Ok(u) if u.scheme().is_some() && u.scheme_str() != Some("https") => cx.err(
            uri.line,
            format!(
                "jwksUri {:?} must be https: keys fetched in the clear could be swapped in transit",
                uri.value
            ),
        ),
        _ => cx.err(
            uri.line,
            format!("jwksUri {:?} is not an absolute https URL", uri.value),
        ),
    }
}

/// Only asymmetric algorithms: with `none` a token proves nothing, and an
/// HMAC algorithm lets anyone holding the (public) verification key sign,
/// the classic algorithm-confusion attack.
fn check_algorithm(cx: &mut Cx<'_>, alg: &Located<String>) {
    if JWT_ALGORITHMS.contains(&alg.value.as_str()) {
        return;
    }
    let message = if alg.eq_ignore_ascii_case("none") {
        format!(
            "algorithm {:?} is not allowed: an unsigned token proves nothing",
            alg.value
        )
    } else if alg.to_ascii_uppercase().starts_with("HS") {
        format!(
            "algorithm {} is not allowed: HMAC uses a shared secret, and accepting it next to \
             public keys lets anyone who has a public key sign tokens (algorithm confusion)",
            alg.value
        )
    } else {
        format!(
            "unknown algorithm {:?}, expected one of {}",
            alg.value,
            JWT_ALGORITHMS.join(", ")
        )
    };
    cx.err(alg.line, message);
}

/// Why a request header cannot carry a forwarded claim, if it cannot.
fn check_forward_header(name: &str) -> Option<String> {
    if name.starts_with(':') {
        return Some("is a pseudo-header, set by the protocol".to_string());
    }
    let h = match http::HeaderName::from_bytes(name.as_bytes()) {
        Ok(h) => h,
        Err(e) => return Some(format!("is not a valid header name: {e}")),
    };
    const HOP_BY_HOP: [&str; 9] = [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ];
    let h = h.as_str();
    if HOP_BY_HOP.contains(&h) {
        Some("is hop-by-hop: it does not reach the service".to_string())
    } else if ["host", "content-length", "content-type", "authorization"].contains(&h) {
        Some("carries the request itself and cannot be replaced by a claim".to_string())
    } else if h.starts_with("x-bulwark-") {
        Some("is reserved for the mesh's own headers".to_string())
    } else {
        None
    }
}

fn non_empty(cx: &mut Cx<'_>, what: &str, v: &Located<String>) {
    if v.trim().is_empty() {
        cx.err(v.line, format!("{what} must not be empty"));
    }
}

fn at_least_one<T: Copy + Into<u64>>(cx: &mut Cx<'_>, what: &str, v: &Located<T>) {
    if v.value.into() == 0 {
        cx.err(v.line, format!("{what} must be at least 1"));
    }
}

/// Reports unless `r` is a number in 0..=1; returns whether it is.
fn check_ratio(cx: &mut Cx<'_>, what: &str, r: &Located<f64>) -> bool {
    if r.value.is_finite() && (0.0..=1.0).contains(&r.value) {
        true
    } else {
        cx.err(r.line, format!("{what} {} is out of range 0..=1", r.value));
        false
    }
}

/// Parses a duration that must be above zero; reports and returns `None`
/// if it is not.
fn check_duration(cx: &mut Cx<'_>, what: &str, d: &Located<String>) -> Option<Duration> {
    match duration::parse(d) {
        Ok(v) if v.is_zero() => {
            cx.err(d.line, format!("{what} must be longer than 0"));
            None
        }
        Ok(v) => Some(v),
        Err(e) => {
            cx.err(d.line, format!("{what}: {e}"));
            None
        }
    }
}

/// HTTP methods are case-sensitive and upper case by convention; a
/// lower-case `get` would silently never match.
fn check_method(cx: &mut Cx<'_>, m: &Located<String>) {
    let ok = !m.is_empty()
        && m.len() <= 32
        && m.bytes()
            .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_');
    if !ok {
        let hint = if m.bytes().any(|b| b.is_ascii_lowercase()) {
            format!(" (did you mean {}?)", m.to_ascii_uppercase())
        } else {
            String::new()
        };
        cx.err(
            m.line,
            format!(
                "method {:?} is not an upper-case HTTP method{hint}",
                m.value
            ),
        );
    }
}

/// A path test: exactly one of exact, prefix, regex; literal paths start
/// with `/`.
fn check_path_match(cx: &mut Cx<'_>, what: &str, m: &Located<StringMatch>) {
    let set = [&m.exact, &m.prefix, &m.regex]
        .into_iter()
        .filter(|v| v.is_some())
        .count();
    if set != 1 {
        cx.err(
            m.line,
            format!("{what}: give exactly one of exact, prefix, regex"),
        );
        return;
    }
    for lit in [&m.exact, &m.prefix].into_iter().flatten() {
        if !lit.starts_with('/') {
            cx.err(
                lit.line,
                format!("{what}: {:?} must start with /", lit.value),
            );
        }
    }
    if let Some(re) = &m.regex {
        check_regex(cx, what, re);
    }
}

fn check_header_match(cx: &mut Cx<'_>, h: &Located<HeaderMatch>) {
    if let Err(e) = http::HeaderName::from_bytes(h.name.as_bytes()) {
        cx.err(h.name.line, format!("header name {:?}: {e}", h.name.value));
    }
    let absent = h.absent.as_ref().is_some_and(|a| a.value);
    let set = [&h.exact, &h.prefix, &h.regex]
        .into_iter()
        .filter(|v| v.is_some())
        .count()
        + usize::from(absent);
    if set > 1 {
        cx.err(
            h.line,
            format!(
                "header {}: give at most one of exact, prefix, regex, absent",
                h.name.value
            ),
        );
    }
    for lit in [&h.exact, &h.prefix].into_iter().flatten() {
        if http::HeaderValue::from_str(lit).is_err() {
            cx.err(
                lit.line,
                format!(
                    "header {}: {:?} is not a valid header value",
                    h.name.value, lit.value
                ),
            );
        }
    }
    if let Some(re) = &h.regex {
        check_regex(cx, "header regex", re);
    }
}

fn check_regex(cx: &mut Cx<'_>, what: &str, re: &Located<String>) {
    if re.len() > MAX_REGEX_LEN {
        cx.err(
            re.line,
            format!("{what}: regex is longer than {MAX_REGEX_LEN} bytes"),
        );
        return;
    }
    if let Err(e) = regex::RegexBuilder::new(re)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
    {
        // The regex crate's messages span several lines; keep one.
        let msg = match e {
            regex::Error::CompiledTooBig(_) => "pattern compiles too big".to_string(),
            other => other
                .to_string()
                .lines()
                .filter(|l| l.starts_with("error:"))
                .map(|l| l.trim_start_matches("error:").trim().to_string())
                .next()
                .unwrap_or_else(|| "invalid pattern".to_string()),
        };
        cx.err(
            re.line,
            format!("{what}: invalid regex {:?}: {msg}", re.value),
        );
    }
}

/// A DNS-1123 label: what Kubernetes allows for names and namespaces.
pub(crate) fn dns_label(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a DNS-1123 label (1-63 lower-case letters, digits or '-', \
             starting and ending with a letter or digit)"
        ))
    }
}

/// A host name, optionally with a leading `*.` wildcard.
fn hostname(s: &str) -> Result<(), String> {
    let name = s.strip_prefix("*.").unwrap_or(s);
    if !name.is_empty() && name.len() <= 253 && name.split('.').all(|l| dns_label(l).is_ok()) {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a host name (lower-case DNS labels separated by '.', optionally starting with *.)"
        ))
    }
}

/// A Kubernetes label or annotation key: `[prefix/]name`.
fn label_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let prefix_ok =
        prefix.is_none_or(|p| p.len() <= 253 && p.split('.').all(|l| dns_label(l).is_ok()));
    if prefix_ok && !name.is_empty() && label_chars(name) {
        Ok(())
    } else {
        Err(format!(
            "{k:?} is not a valid key ([prefix/]name: name 1-63 letters, digits, '-', '_' or '.')"
        ))
    }
}

fn label_value(v: &str) -> Result<(), String> {
    if v.is_empty() || label_chars(v) {
        Ok(())
    } else {
        Err(format!(
            "{v:?} is not a valid label value (at most 63 letters, digits, '-', '_' or '.', \
             starting and ending with a letter or digit)"
        ))
    }
}

fn label_chars(s: &str) -> bool {
    let alnum_end = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && alnum_end(s.chars().next())
        && alnum_end(s.chars().last())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_references_resolve_in_the_document_namespace() {
        assert_eq!(resolve("api", "shop"), Some(("shop".into(), "api".into())));
        assert_eq!(resolve("db/pg", "shop"), Some(("db".into(), "pg".into())));
        assert_eq!(resolve("a/b/c", "shop"), None);
    }

    #[test]
    fn dns_labels_follow_kubernetes_rules() {
        for good in ["a", "api", "api-v2", "0abc", &"a".repeat(63)] {
            assert!(dns_label(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "a-", "Api", "a_b", "a.b", &"a".repeat(64)] {
            assert!(dns_label(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn label_keys_and_values_follow_kubernetes_rules() {
        assert!(label_key("app").is_ok());
        assert!(label_key("app.kubernetes.io/name").is_ok());
        assert!(label_key("bad key").is_err());
        assert!(label_key("/x").is_err());
        assert!(label_value("").is_ok());
        assert!(label_value("v1.2_x").is_ok());
        assert!(label_value("-v1").is_err());
    }

    #[test]
    fn host_names_may_have_a_leading_wildcard() {
        assert!(hostname("api.example.com").is_ok());
        assert!(hostname("*.example.com").is_ok());
        assert!(hostname("a.*.com").is_err());
        assert!(hostname("").is_err());
    }
}
