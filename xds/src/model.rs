//! The mesh configuration as users write it: Kubernetes-style YAML documents.
//!
//! Every document has the same envelope,
//!
//! ```yaml
//! apiVersion: bulwark.dev/v1
//! kind: Service            # MeshConfig | Service | ServiceEntry | Route | TrafficPolicy | AuthorizationPolicy
//!                          # | Gateway | RequestAuthentication
//! metadata:
//!   name: api              # DNS-1123 label
//!   namespace: shop        # default: "default"
//!   labels: {team: payments}
//!   annotations: {owner: "payments@example.com"}
//! spec: {...}              # per kind, below
//! ```
//!
//! and a `spec` whose shape depends on the kind. The types here only describe
//! the shape (serde rejects unknown fields and wrong types); the semantic
//! checks live in [`crate::validate`] and the translation into
//! `bulwark.config.v1` resources in [`crate::compile`].
//!
//! Durations are strings: an integer or decimal number followed by `ms`, `s`,
//! `m` or `h` (`250ms`, `2s`, `1.5s`, `1m`), optionally several (`1m30s`).
//! Service references are `name` (same namespace as the document) or
//! `namespace/name`.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ops::Deref;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::Deserialize;

/// The only `apiVersion` this release understands.
pub const API_VERSION: &str = "bulwark.dev/v1";

/// A value with the 1-based line it was written on; `line == 0` means the
/// value was not in the file (a default), and errors then point at the
/// document instead.
#[derive(Clone, Debug, PartialEq)]
pub struct Located<T> {
    pub value: T,
    pub line: u32,
}

impl<T> Located<T> {
    /// A value that did not come from a file (a default).
    pub fn unlocated(value: T) -> Self {
        Self { value, line: 0 }
    }
}

impl<T> Deref for Located<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: Default> Default for Located<T> {
    fn default() -> Self {
        Self::unlocated(T::default())
    }
}

thread_local! {
    /// Lines of the file before the document being parsed. The loader parses
    /// each document of a multi-document file on its own (so one bad document
    /// does not hide the others), and the parser counts lines from the start
    /// of that text; this turns them back into lines of the file without a
    /// pass over every model type. Set only by [`with_line_offset`].
    static LINE_OFFSET: Cell<u32> = const { Cell::new(0) };
}

/// Runs `f` (a parse of one document) with `offset` added to every
/// [`Located`] line it produces.
pub(crate) fn with_line_offset<R>(offset: u32, f: impl FnOnce() -> R) -> R {
    struct Restore(u32);
    impl Drop for Restore {
        fn drop(&mut self) {
            LINE_OFFSET.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(LINE_OFFSET.with(|c| c.replace(offset)));
    f()
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Located<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned = serde_saphyr::Spanned::<T>::deserialize(d)?;
        let line = u32::try_from(spanned.referenced.line()).unwrap_or(u32::MAX);
        let line = if line == 0 {
            0
        } else {
            line.saturating_add(LINE_OFFSET.with(Cell::get))
        };
        Ok(Self {
            value: spanned.value,
            line,
        })
    }
}

/// Label maps (metadata labels, selectors, subsets): sorted for stable output.
pub type Labels = BTreeMap<String, String>;

/// The kinds of document, in the order `bulwark xds validate` reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    MeshConfig,
    Service,
    ServiceEntry,
    Route,
    TrafficPolicy,
    AuthorizationPolicy,
    Gateway,
    RequestAuthentication,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::MeshConfig,
        Kind::Service,
        Kind::ServiceEntry,
        Kind::Route,
        Kind::TrafficPolicy,
        Kind::AuthorizationPolicy,
        Kind::Gateway,
        Kind::RequestAuthentication,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::MeshConfig => "MeshConfig",
            Kind::Service => "Service",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::Route => "Route",
            Kind::TrafficPolicy => "TrafficPolicy",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::Gateway => "Gateway",
            Kind::RequestAuthentication => "RequestAuthentication",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One parsed document and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    pub file: PathBuf,
    /// Line of the document's first content line.
    pub line: u32,
    pub api_version: Located<String>,
    pub metadata: Metadata,
    pub spec: Spec,
}

impl Document {
    pub fn kind(&self) -> Kind {
        match self.spec {
            Spec::MeshConfig(_) => Kind::MeshConfig,
            Spec::Service(_) => Kind::Service,
            Spec::ServiceEntry(_) => Kind::ServiceEntry,
            Spec::Route(_) => Kind::Route,
            Spec::TrafficPolicy(_) => Kind::TrafficPolicy,
            Spec::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Spec::Gateway(_) => Kind::Gateway,
            Spec::RequestAuthentication(_) => Kind::RequestAuthentication,
        }
    }

    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    pub fn namespace(&self) -> &str {
        &self.metadata.namespace
    }
}

/// The kind-specific part of a document.
#[derive(Clone, Debug, PartialEq)]
pub enum Spec {
    MeshConfig(MeshConfigSpec),
    Service(ServiceSpec),
    ServiceEntry(ServiceEntrySpec),
    Route(RouteSpec),
    // Boxed: by far the largest spec.
    TrafficPolicy(Box<TrafficPolicySpec>),
    AuthorizationPolicy(AuthorizationPolicySpec),
    Gateway(GatewaySpec),
    RequestAuthentication(RequestAuthenticationSpec),
}

/// The envelope as written, for one kind's spec type. The loader reads `kind`
/// first and then parses the whole document with the matching `S`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Envelope<S> {
    pub api_version: Located<String>,
    #[allow(dead_code)] // read earlier, from the header; here so it is a known field
    pub kind: Located<String>,
    pub metadata: Metadata,
    pub spec: S,
}

/// `metadata`: identity of the document.
#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    pub name: Located<String>,
    #[serde(default = "default_namespace")]
    pub namespace: Located<String>,
    #[serde(default)]
    pub labels: Located<Labels>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

fn default_namespace() -> Located<String> {
    Located::unlocated("default".to_string())
}

/// `kind: MeshConfig`: mesh-wide settings; at most one per mesh. Every field
/// is optional.
///
/// ```yaml
/// apiVersion: bulwark.dev/v1
/// kind: MeshConfig
/// metadata:
///   name: mesh
/// spec:
///   trustDomain: cluster.local    # default cluster.local
///   mtls:
///     mode: STRICT                # STRICT (default) | PERMISSIVE
///   outboundPolicy: ALLOW_ANY     # ALLOW_ANY (default) | REGISTRY_ONLY
/// ```
#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshConfigSpec {
    #[serde(default = "default_trust_domain")]
    pub trust_domain: Located<String>,
    #[serde(default)]
    pub mtls: Mtls,
    #[serde(default)]
    pub outbound_policy: OutboundPolicy,
}

impl Default for MeshConfigSpec {
    fn default() -> Self {
        Self {
            trust_domain: default_trust_domain(),
            mtls: Mtls::default(),
            outbound_policy: OutboundPolicy::default(),
        }
    }
}

/// The trust domain used when no MeshConfig says otherwise.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

fn default_trust_domain() -> Located<String> {
    Located::unlocated(DEFAULT_TRUST_DOMAIN.to_string())
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Mtls {
    #[serde(default)]
    pub mode: MtlsMode,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Sidecars accept only mTLS from mesh identities.
    #[default]
    Strict,
    /// Sidecars also accept plaintext (for migrating workloads into the mesh).
    Permissive,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundPolicy {
    /// Traffic to destinations the mesh does not know passes through.
    #[default]
    AllowAny,
    /// Only Services and ServiceEntries are reachable.
    RegistryOnly,
}

/// `kind: Service`: a service, its ports, and which workloads serve it (by
/// SPIFFE identity and/or label selector). Labels are each sidecar's own
/// claim: with `identities` listed, only workloads with one of them serve
/// the Service, and a selector only narrows those (in the Service's
/// namespace). With a selector alone, any workload of the namespace that
/// carries the labels serves it.
///
/// ```yaml
/// apiVersion: bulwark.dev/v1
/// kind: Service
/// metadata:
///   name: api
///   namespace: shop
/// spec:
///   ports:
///     - port: 8080
///       name: http            # optional, DNS-1123 label, unique in the service
///       protocol: http        # http | http2 | grpc | tcp | auto (default)
///       targetPort: 8081      # optional, default = port
///   identities:
///     - spiffe://cluster.local/ns/shop/sa/api
///   selector:
///     app: api
///   addresses: [10.96.0.20]   # virtual IPs clients may dial
/// ```
#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    pub ports: Located<Vec<PortSpec>>,
    #[serde(default)]
    pub identities: Vec<Located<String>>,
    #[serde(default)]
    pub selector: Located<Labels>,
    #[serde(default)]
    pub addresses: Vec<Located<String>>,
}

/// One port of a Service or ServiceEntry.
#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortSpec {
    pub port: Located<u32>,
    #[serde(default)]
    pub name: Option<Located<String>>,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub target_port: Option<Located<u32>>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Tcp,
    /// Sniffed by the sidecar.
    #[default]
    Auto,
}

/// `kind: ServiceEntry`: a service the registry does not know: external
/// hosts (`MESH_EXTERNAL`), or mesh workloads listed by hand
/// (`MESH_INTERNAL`, endpoints with identities; this is how a sidecar run
/// from a local file learns its peers). A ServiceEntry may share its name
/// with a Service in the same namespace: its endpoints then serve that
/// Service.
///
/// ```yaml
/// apiVersion: bulwark.dev/v1
/// kind: ServiceEntry
/// metadata:
///   name: payments-gateway
/// spec:
///   hosts: [api.payments.example.com]
///   addresses: [203.0.113.10]
///   ports:
///     - port: 443
///       protocol: tcp
///   location: MESH_EXTERNAL     # MESH_EXTERNAL (default) | MESH_INTERNAL
///   endpoints:
///     - address: 203.0.113.10
///       identity: spiffe://cluster.local/ns/default/sa/gw  # optional: reach it over mTLS
///       labels: {version: v1}
///       ports: [443]            # optional: default the service's target ports
///       weight: 1               # optional, default 1
/// ```
#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    #[serde(default)]
    pub hosts: Vec<Located<String>>,
    #[serde(default)]
    pub addresses: Vec<Located<String>>,
    pub ports: Located<Vec<PortSpec>>,
    #[serde(default)]
    pub location: MeshLocation,
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, JsonSchema)]
pub enum MeshLocation {
    #[default]
    #[serde(rename = "MESH_EXTERNAL")]
    MeshExternal,
    #[serde(rename = "MESH_INTERNAL")]
    MeshInternal,
}

/// One workload instance of a ServiceEntry.
#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointSpec {
    pub address: Located<String>,
    #[serde(default)]
    pub identity: Option<Located<String>>,
    #[serde(default)]
    pub labels: Located<Labels>,
    #[serde(default)]
    pub ports: Vec<Located<u32>>,
    #[serde(default)]
    pub weight: Option<Located<u32>>,
}

/// `kind: Route`: HTTP routing for requests to one service. Rules are tried
/// in order; the first whose `matches` match (any of them; a rule without
/// matches matches everything) decides. A rule without `backends` sends to
/// the route's own service.
///
/// ```yaml
/// apiVersion: bulwark.dev/v1
/// kind: Route
/// metadata:
///   name: api
/// spec:
///   service: api                      # or namespace/name
///   rules:
///     - name: canary                  # optional
///       matches:
///         - path: {prefix: /v1/}      # exactly one of exact | prefix | regex
///           methods: [GET, POST]
///           headers:
///             - name: x-tenant
///               exact: acme           # or prefix | regex | absent: true; none = present
///       backends:                     # weights 0..=100, summing to 100
///         - service: api
///           subset: {version: v1}
///           weight: 90
///         - service: api
///           subset: {version: v2}
///           weight: 10
///           port: 8080                # optional, one of the service's ports
///       overrides:                    # win over weights when the header matches
///         - header: {name: x-canary, exact: always}
///           backend: {service: api, subset: {version: v2}}
///       timeout: 2s
///       retry:
///         attempts: 3                 # at most 10
///         perTryTimeout: 500ms
///         backoffBase: 25ms           # default 25ms
///         backoffMax: 250ms           # default 250ms
///         retryOn: [gateway-error, connect-failure, reset]   # the default
///         retriableStatusCodes: [409] # needs retryOn: retriable-status-codes
///         budgetRatio: 0.2            # default 0.2
///         budgetMinPerSecond: 10      # default 10
///         retryNonIdempotent: false   # default: POST/PATCH are retried only if nothing reached the upstream
///       rateLimit:                    # 429 beyond it, at the service's inbound sidecars
///         requestsPerSecond: 50
///         burst: 100                  # default = requestsPerSecond
///         perSourceIdentity: true     # a bucket per calling workload; default false (one shared)
/// ```
#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteSpec {
    pub service: Located<String>,
    pub rules: Located<Vec<RouteRule>>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteRule {
    #[serde(default)]
    pub name: Option<Located<String>>,
    #[serde(default)]
    pub matches: Vec<RouteMatch>,
    #[serde(default)]
    pub backends: Vec<Backend>,
    #[serde(default)]
    pub overrides: Vec<Override>,
    #[serde(default)]
    pub timeout: Option<Located<String>>,
    #[serde(default)]
    pub retry: Option<Located<RetrySpec>>,
    /// Token buckets for requests matching this rule, enforced by the
    /// inbound sidecars of the route's service.
    #[serde(default)]
    pub rate_limit: Option<Located<RateLimitSpec>>,
}

/// What a Route rule and a Gateway route share: matching, where traffic
/// goes, timeout and retries. Both are checked and compiled through it, so
/// the two cannot drift apart.
#[derive(Clone, Copy, Debug)]
pub struct RuleCore<'a> {
    pub name: Option<&'a Located<String>>,
    pub matches: &'a [RouteMatch],
    pub backends: &'a [Backend],
    pub overrides: &'a [Override],
    pub timeout: Option<&'a Located<String>>,
    pub retry: Option<&'a Located<RetrySpec>>,
}

impl RouteRule {
    pub fn core(&self) -> RuleCore<'_> {
        RuleCore {
            name: self.name.as_ref(),
            matches: &self.matches,
            backends: &self.backends,
            overrides: &self.overrides,
            timeout: self.timeout.as_ref(),
            retry: self.retry.as_ref(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteMatch {
    #[serde(default)]
    pub path: Option<Located<StringMatch>>,
    #[serde(default)]
    pub methods: Vec<Located<String>>,
    #[serde(default)]
    pub headers: Vec<Located<HeaderMatch>>,
}

/// A string test: exactly one of the three.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StringMatch {
    #[serde(default)]
    pub exact: Option<Located<String>>,
    #[serde(default)]
    pub prefix: Option<Located<String>>,
    #[serde(default)]
    pub regex: Option<Located<String>>,
}

/// A header test: one of `exact`, `prefix`, `regex`, `absent: true`, or none
/// of them (the header is present).
#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderMatch {
    pub name: Located<String>,
    #[serde(default)]
    pub exact: Option<Located<String>>,
    #[serde(default)]
    pub prefix: Option<Located<String>>,
    #[serde(default)]
    pub regex: Option<Located<String>>,
    #[serde(default)]
    pub absent: Option<Located<bool>>,
}

/// Where a rule sends traffic.
#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Backend {
    pub service: Located<String>,
    #[serde(default)]
    pub subset: Located<Labels>,
    /// Percent of the rule's traffic; may be left out when the rule has a
    /// single backend (it then gets 100).
    #[serde(default)]
    pub weight: Option<Located<u32>>,
    #[serde(default)]
    pub port: Option<Located<u32>>,
}

/// A request whose header matches goes to `backend`, whatever the weights.
#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Override {
    pub header: Located<HeaderMatch>,
    pub backend: Located<Backend>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetrySpec {
    pub attempts: Located<u32>,
    #[serde(default)]
    pub per_try_timeout: Option<Located<String>>,
    #[serde(default)]
    pub backoff_base: Option<Located<String>>,
    #[serde(default)]
    pub backoff_max: Option<Located<String>>,
    #[serde(default)]
    pub retry_on: Vec<Located<String>>,
    #[serde(default)]
    pub retriable_status_codes: Vec<Located<u32>>,
    #[serde(default)]
    pub budget_ratio: Option<Located<f64>>,
    #[serde(default)]
    pub budget_min_per_second: Option<Located<u32>>,
    /// Also retry non-idempotent methods (POST, PATCH) once they may have
    /// reached the upstream; default false.
    #[serde(default)]
    pub retry_non_idempotent: Option<Located<bool>>,
}

/// `kind: TrafficPolicy`: resilience settings for calls to one service; at
/// most one per service. Every section is optional.
///
/// ```yaml
/// apiVersion: bulwark.dev/v1
/// kind: TrafficPolicy
/// metadata:
///   name: api
/// spec:
///   service: api
///   bulkhead:                     # also accepted as connectionPool
///     maxConnections: 100
///     maxRequests: 200
///     maxPending: 50              # queue bound
///     queueTimeout: 1s            # longest wait in the queue; default 5s
///   circuitBreaker:               # consecutiveFailures and/or failureRatio
///     consecutiveFailures: 5
///     failureRatio: 0.5
///     minRequests: 20             # default 20
///     window: 10s                 # default 10s
///     openDuration: 5s            # default 5s
///     halfOpenRequests: 1         # default 1
///   outlierDetection:
///     consecutive5xx: 5           # default 5
///     interval: 10s               # default 10s
///     baseEjectionTime: 30s       # default 30s
///     maxEjectionPercent: 10      # default 10
///   lb: P2C_LEAST_REQUEST         # P2C_LEAST_REQUEST (default) | ROUND_ROBIN | PEAK_EWMA
///   connectTimeout: 1s
///   rateLimit:                    # at the service's inbound sidecars
///     requestsPerSecond: 100
///     burst: 200                  # default = requestsPerSecond
///     perSourceIdentity: false    # default false: one bucket for all callers
///   healthCheck:
///     path: /healthz
///     interval: 10s               # default 10s
///     timeout: 1s                 # default 1s
///     unhealthyThreshold: 3       # default 3
///     healthyThreshold: 2         # default 2
///   maxRequestBodyBytes: 1048576  # 413 beyond it, at the inbound sidecar
///   adaptiveConcurrency:          # a limit that follows latency, on top of the bulkhead
///     minLimit: 1                 # default 1
///     maxLimit: 1000              # default 1000
///     initialLimit: 20            # default 20 (clamped into min..=max)
///     latencyTolerance: 2.0       # default 2.0: latency up to 2x the measured minimum
///     sampleWindow: 100ms         # default 100ms
/// ```
#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    pub service: Located<String>,
    #[serde(default, alias = "connectionPool")]
    pub bulkhead: Option<Located<Bulkhead>>,
    #[serde(default)]
    pub circuit_breaker: Option<Located<CircuitBreakerSpec>>,
    #[serde(default)]
    pub outlier_detection: Option<Located<OutlierDetectionSpec>>,
    #[serde(default)]
    pub lb: LbAlgorithm,
    #[serde(default)]
    pub connect_timeout: Option<Located<String>>,
    #[serde(default)]
    pub rate_limit: Option<Located<RateLimitSpec>>,
    #[serde(default)]
    pub health_check: Option<Located<HealthCheckSpec>>,
    /// Largest request body the service's workloads receive; larger ones
    /// get 413 from their inbound sidecar.
    #[serde(default)]
    pub max_request_body_bytes: Option<Located<u64>>,
    /// A concurrency limit for calls to the service that adapts to their
    /// latency: requests beyond it get a fast 503 `concurrency-limited`.
    #[serde(default)]
    pub adaptive_concurrency: Option<Located<AdaptiveConcurrencySpec>>,
}

/// Adaptive concurrency (AIMD on latency): once per sample window, the
/// limit grows by one while the window's median latency stays within
/// `latencyTolerance` times the lowest latency measured, and shrinks
/// multiplicatively when it rises above that.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdaptiveConcurrencySpec {
    #[serde(default)]
    pub min_limit: Option<Located<u32>>,
    #[serde(default)]
    pub max_limit: Option<Located<u32>>,
    #[serde(default)]
    pub initial_limit: Option<Located<u32>>,
    /// Ratio over the minimum latency (above 1).
    #[serde(default)]
    pub latency_tolerance: Option<Located<f64>>,
    #[serde(default)]
    pub sample_window: Option<Located<String>>,
}

/// Concurrency limits; a field left out means no limit from this policy.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Bulkhead {
    #[serde(default)]
    pub max_connections: Option<Located<u32>>,
    #[serde(default)]
    pub max_requests: Option<Located<u32>>,
    #[serde(default)]
    pub max_pending: Option<Located<u32>>,
    /// Longest a queued request waits for a slot (default 5s).
    #[serde(default)]
    pub queue_timeout: Option<Located<String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CircuitBreakerSpec {
    #[serde(default)]
    pub consecutive_failures: Option<Located<u32>>,
    #[serde(default)]
    pub failure_ratio: Option<Located<f64>>,
    #[serde(default)]
    pub min_requests: Option<Located<u32>>,
    #[serde(default)]
    pub window: Option<Located<String>>,
    #[serde(default)]
    pub open_duration: Option<Located<String>>,
    #[serde(default)]
    pub half_open_requests: Option<Located<u32>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetectionSpec {
    #[serde(default, rename = "consecutive5xx")]
    pub consecutive_5xx: Option<Located<u32>>,
    #[serde(default)]
    pub interval: Option<Located<String>>,
    #[serde(default)]
    pub base_ejection_time: Option<Located<String>>,
    #[serde(default)]
    pub max_ejection_percent: Option<Located<u32>>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LbAlgorithm {
    /// Power of two choices, fewest outstanding requests.
    #[default]
    #[serde(rename = "P2C_LEAST_REQUEST")]
    P2cLeastRequest,
    RoundRobin,
    PeakEwma,
}

#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitSpec {
    pub requests_per_second: Located<u32>,
    #[serde(default)]
    pub burst: Option<Located<u32>>,
    /// One bucket per calling workload (its verified SPIFFE ID) instead of
    /// one shared by every caller.
    #[serde(default)]
    pub per_source_identity: Option<Located<bool>>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthCheckSpec {
    pub path: Located<String>,
    #[serde(default)]
    pub interval: Option<Located<String>>,
    #[serde(default)]
    pub timeout: Option<Located<String>>,
    #[serde(default)]
    pub unhealthy_threshold: Option<Located<u32>>,
    #[serde(default)]
    pub healthy_threshold: Option<Located<u32>>,
}

/// `kind: AuthorizationPolicy`: who may call a service. Once any policy
/// targets a service, a request is denied unless some rule of some policy
/// allows it; a policy with no rules therefore denies everything.
///
/// ```yaml
/// apiVersion: bulwark.dev/v1
/// kind: AuthorizationPolicy
/// metadata:
///   name: api-callers
/// spec:
///   service: api
///   rules:
///     - from:                     # SPIFFE IDs; `*` matches within a part; empty = any identity
///         - spiffe://cluster.local/ns/default/sa/web
///         - spiffe://cluster.local/ns/ops/sa/*
///       paths:                    # optional: any of these (exact | prefix | regex)
///         - prefix: /api/
///       methods: [GET, POST]      # optional: any of these
/// ```
#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    pub service: Located<String>,
    #[serde(default)]
    pub rules: Vec<Located<AuthorizationRule>>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationRule {
    #[serde(default)]
    pub from: Vec<Located<String>>,
    #[serde(default)]
    pub paths: Vec<Located<StringMatch>>,
    #[serde(default)]
    pub methods: Vec<Located<String>>,
}

/// `kind: Gateway`: an edge gateway, the proxy that takes requests from
/// outside the mesh. Listeners terminate public TLS (certificates chosen by
/// SNI, re-read from their files when they change); routes send requests
/// into mesh services over mTLS. A route matches, splits by weight, applies
/// overrides, timeout and retries exactly as a Route rule does, and adds who
/// may call it (`authorization`, with tokens checked by the gateway's
/// RequestAuthentication), a per-client rate limit and request validation.
/// Routes are tried in order; the first that matches the request's host and
/// `matches` decides.
///
/// ```yaml
/// apiVersion: bulwark.dev/v1
/// kind: Gateway
/// metadata:
///   name: edge
///   namespace: ingress
/// spec:
///   listeners:
///     - name: https                   # DNS-1123 label, unique in the gateway
///       port: 8443                    # unique; not 15000-15021 (the proxy's own)
///       certificates:                 # at least one; the first also answers without SNI
///         - hostnames: [api.example.com, "*.example.com"]
///           certFile: /etc/bulwark/gw/tls.crt
///           keyFile: /etc/bulwark/gw/tls.key
///       clientCaFile: /etc/bulwark/gw/partners.pem   # optional: verify partners' certificates
///       requireClientCert: false      # true needs clientCaFile
///   routes:
///     - name: orders                  # optional, unique in the gateway
///       listeners: [https]            # optional: every listener when left out
///       hostnames: [api.example.com]  # optional: any host when left out
///       matches:                      # as in a Route rule
///         - path: {prefix: /orders}
///           methods: [GET, POST]
///       backends:                     # as in a Route rule; at least one
///         - service: shop/orders
///           weight: 90
///         - service: shop/orders
///           subset: {version: v2}
///           weight: 10
///       overrides:                    # as in a Route rule
///         - header: {name: x-canary, exact: always}
///           backend: {service: shop/orders, subset: {version: v2}}
///       timeout: 2s                   # as in a Route rule
///       retry: {attempts: 2}          # as in a Route rule
///       authorization:                # optional: anyone when left out
///         requireAuthenticated: true  # no valid token: 401
///         scopes: ["orders:write"]    # all of them (`scope`/`scp` claim), else 403
///         claims:                     # all of them, else 403
///           - claim: tier
///             values: [gold, silver]  # the claim equals (or contains) one of these
///       rateLimit:                    # token bucket per client; 429 beyond it
///         key: subject                # subject | source-ip | header:<name>
///         requestsPerSecond: 10
///         burst: 20                   # default = requestsPerSecond
///       validation:
///         jsonSchema:                 # JSON bodies must validate, else 400
///           type: object
///           required: [item]
///           properties:
///             item: {type: string}
///         maxBodyBytes: 65536         # default 1 MiB
/// ```
#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewaySpec {
    pub listeners: Located<Vec<GatewayListenerSpec>>,
    pub routes: Located<Vec<Located<GatewayRouteSpec>>>,
}

/// One public TLS listener of a gateway.
#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayListenerSpec {
    pub name: Located<String>,
    pub port: Located<u32>,
    #[serde(default)]
    pub certificates: Located<Vec<Located<GatewayCertificateSpec>>>,
    #[serde(default)]
    pub client_ca_file: Option<Located<String>>,
    #[serde(default)]
    pub require_client_cert: Option<Located<bool>>,
}

/// A server certificate and key (PEM files) for some SNI names.
#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayCertificateSpec {
    #[serde(default)]
    pub hostnames: Vec<Located<String>>,
    pub cert_file: Located<String>,
    pub key_file: Located<String>,
}

/// A route from the edge into the mesh: a Route rule's fields plus the
/// edge's own (`hostnames`, `authorization`, `rateLimit`, `validation`).
/// The shared fields are repeated rather than `#[serde(flatten)]`ed:
/// flattening loses unknown-field errors and value lines. [`RuleCore`]
/// keeps their checks and compilation in one place.
#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayRouteSpec {
    #[serde(default)]
    pub name: Option<Located<String>>,
    /// Names of the listeners that serve it; every listener when left out.
    #[serde(default)]
    pub listeners: Vec<Located<String>>,
    #[serde(default)]
    pub hostnames: Vec<Located<String>>,
    #[serde(default)]
    pub matches: Vec<RouteMatch>,
    #[serde(default)]
    pub backends: Vec<Backend>,
    #[serde(default)]
    pub overrides: Vec<Override>,
    #[serde(default)]
    pub timeout: Option<Located<String>>,
    #[serde(default)]
    pub retry: Option<Located<RetrySpec>>,
    #[serde(default)]
    pub authorization: Option<Located<GatewayAuthorizationSpec>>,
    #[serde(default)]
    pub rate_limit: Option<Located<ClientRateLimitSpec>>,
    #[serde(default)]
    pub validation: Option<Located<RequestValidationSpec>>,
}

impl GatewayRouteSpec {
    pub fn core(&self) -> RuleCore<'_> {
        RuleCore {
            name: self.name.as_ref(),
            matches: &self.matches,
            backends: &self.backends,
            overrides: &self.overrides,
            timeout: self.timeout.as_ref(),
            retry: self.retry.as_ref(),
        }
    }
}

/// Who may use a gateway route; left out, anyone may.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayAuthorizationSpec {
    #[serde(default)]
    pub require_authenticated: Option<Located<bool>>,
    #[serde(default)]
    pub scopes: Vec<Located<String>>,
    #[serde(default)]
    pub claims: Vec<Located<ClaimRequirementSpec>>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClaimRequirementSpec {
    pub claim: Located<String>,
    pub values: Located<Vec<Located<String>>>,
}

/// A token bucket per client of the route.
#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientRateLimitSpec {
    /// `subject`, `source-ip` or `header:<name>`.
    pub key: Located<String>,
    pub requests_per_second: Located<u32>,
    #[serde(default)]
    pub burst: Option<Located<u32>>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestValidationSpec {
    /// A JSON Schema, written inline as YAML (or JSON).
    #[serde(default)]
    #[schemars(schema_with = "any_json_object")]
    pub json_schema: Option<Located<serde_json::Value>>,
    #[serde(default)]
    pub max_body_bytes: Option<Located<u64>>,
}

/// Any JSON object, kept as written: a structural schema cannot describe a
/// JSON Schema, so Kubernetes is told to keep its fields unchecked.
fn any_json_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// `kind: RequestAuthentication`: the JWT (OAuth2 bearer token) issuers a
/// gateway trusts. A request's token, when it has one, must be valid for one
/// of the providers, else 401; whether a token is required at all is the
/// route's `authorization`. At most one per gateway.
///
/// ```yaml
/// apiVersion: bulwark.dev/v1
/// kind: RequestAuthentication
/// metadata:
///   name: edge-jwt
///   namespace: ingress
/// spec:
///   gateway: edge                     # a Gateway in the same namespace
///   providers:
///     - issuer: https://issuer.example.com   # the token's `iss`; unique
///       audiences: [orders-api]       # `aud` must contain one; empty = not checked
///       jwksFile: /etc/bulwark/gw/jwks.json  # re-read when it changes; or:
///       # jwksUri: https://issuer.example.com/.well-known/jwks.json   # https only
///       # jwksCaFile: /etc/bulwark/gw/issuer-ca.pem  # roots for jwksUri; default system roots
///       jwksRefresh: 5m               # default 5m; also refetched for an unknown kid
///       algorithms: [RS256, ES256]    # default all of RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 EdDSA
///       clockSkew: 60s                # default 60s, for exp/nbf/iat
///       forwardClaims:                # claim: request header the service receives it in
///         sub: x-user-id
///         scope: x-user-scopes
///       forwardToken: false           # keep the Authorization header (default false)
/// ```
#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    pub gateway: Located<String>,
    pub providers: Located<Vec<Located<JwtProviderSpec>>>,
}

/// One trusted JWT issuer and where its keys come from.
#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtProviderSpec {
    pub issuer: Located<String>,
    #[serde(default)]
    pub audiences: Vec<Located<String>>,
    #[serde(default)]
    pub jwks_file: Option<Located<String>>,
    #[serde(default)]
    pub jwks_uri: Option<Located<String>>,
    #[serde(default)]
    pub jwks_ca_file: Option<Located<String>>,
    #[serde(default)]
    pub jwks_refresh: Option<Located<String>>,
    #[serde(default)]
    pub algorithms: Vec<Located<String>>,
    #[serde(default)]
    pub clock_skew: Option<Located<String>>,
    #[serde(default)]
    pub forward_claims: Located<BTreeMap<String, Located<String>>>,
    #[serde(default)]
    pub forward_token: Option<Located<bool>>,
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn located_lines_count_from_the_start_of_the_file() {
        let yaml = "apiVersion: bulwark.dev/v1\nkind: MeshConfig\nmetadata: {name: a}\nspec: {}\n---\n\napiVersion: bulwark.dev/v1\nkind: Service\nmetadata:\n  name: b\nspec:\n  ports:\n    - port: 80\n";
        let loaded = crate::load::load_str(Path::new("m.yaml"), yaml).unwrap();
        let svc = &loaded.documents[1];
        assert_eq!(svc.line, 7);
        assert_eq!(svc.metadata.name.line, 10);
        let Spec::Service(s) = &svc.spec else {
            panic!("not a Service")
        };
        assert_eq!(s.ports[0].port.line, 13);
    }

    #[test]
    fn defaults_are_unlocated() {
        let yaml = "apiVersion: bulwark.dev/v1\nkind: MeshConfig\nmetadata: {name: a}\nspec: {}\n";
        let loaded = crate::load::load_str(Path::new("m.yaml"), yaml).unwrap();
        let doc = &loaded.documents[0];
        assert_eq!(doc.metadata.namespace.value, "default");
        assert_eq!(doc.metadata.namespace.line, 0);
        let Spec::MeshConfig(m) = &doc.spec else {
            panic!("not a MeshConfig")
        };
        assert_eq!(m.trust_domain.value, DEFAULT_TRUST_DOMAIN);
        assert_eq!(m.mtls.mode, MtlsMode::Strict);
        assert_eq!(m.outbound_policy, OutboundPolicy::AllowAny);
    }
}
