//! Validated documents → `bulwark.config.v1` resources, the form sidecars
//! apply.
//!
//! The resources are explicit where the YAML lets users leave things out:
//! service references are always `namespace/name`, and settings with a
//! default (retry backoff and budget, breaker window, ...) carry the default
//! value, so a sidecar never has to guess what an unset field means and
//! `/config_dump` shows what is in effect. A bulkhead limit, a timeout or a
//! connect timeout left out stays 0: "no limit from config", the sidecar's
//! own bounds apply.

use std::collections::HashMap;
use std::time::Duration;

use bulwark_proto::config::Resources;
use bulwark_proto::config::v1 as pb;

use crate::duration;
use crate::model::{
    Backend, Document, HeaderMatch, LbAlgorithm, Located, MeshLocation, MtlsMode, OutboundPolicy,
    PortSpec, Protocol, RateLimitSpec, RetrySpec, Spec, StringMatch,
};
use crate::model::{GatewayListenerSpec, GatewayRouteSpec, JwtProviderSpec, RuleCore};
use crate::validate::{JWT_ALGORITHMS, resolve};

pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(250);
/// Failures where the request most likely did not reach the application,
/// or the gateway says it could not: safe to retry for any method.
pub const DEFAULT_RETRY_ON: [&str; 3] = ["gateway-error", "connect-failure", "reset"];
pub const DEFAULT_BUDGET_RATIO: f64 = 0.2;
pub const DEFAULT_BUDGET_MIN_PER_SECOND: u32 = 10;
pub const DEFAULT_BREAKER_MIN_REQUESTS: u32 = 20;
pub const DEFAULT_BREAKER_WINDOW: Duration = Duration::from_secs(10);
pub const DEFAULT_BREAKER_OPEN: Duration = Duration::from_secs(5);
pub const DEFAULT_BREAKER_HALF_OPEN_REQUESTS: u32 = 1;
pub const DEFAULT_OUTLIER_CONSECUTIVE_5XX: u32 = 5;
pub const DEFAULT_OUTLIER_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_OUTLIER_BASE_EJECTION: Duration = Duration::from_secs(30);
pub const DEFAULT_OUTLIER_MAX_EJECTION_PERCENT: u32 = 10;
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_HEALTH_UNHEALTHY_THRESHOLD: u32 = 3;
pub const DEFAULT_HEALTH_HEALTHY_THRESHOLD: u32 = 2;
pub const DEFAULT_ADAPTIVE_MIN_LIMIT: u32 = 1;
pub const DEFAULT_ADAPTIVE_MAX_LIMIT: u32 = 1000;
pub const DEFAULT_ADAPTIVE_INITIAL_LIMIT: u32 = 20;
pub const DEFAULT_ADAPTIVE_LATENCY_TOLERANCE: f64 = 2.0;
pub const DEFAULT_ADAPTIVE_SAMPLE_WINDOW: Duration = Duration::from_millis(100);
pub const DEFAULT_ENDPOINT_WEIGHT: u32 = 1;
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(300);
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Compiles documents that passed [`crate::validate::validate`]. Resources
/// keep the documents' order. On documents that did not pass, the output is
/// unspecified (but this does not panic).
pub fn compile(documents: &[Document]) -> Resources {
    let mut out = Resources::default();
    for doc in documents {
        let source = Some(source(doc));
        let name = doc.name().to_string();
        let namespace = doc.namespace().to_string();
        match &doc.spec {
            Spec::MeshConfig(m) => {
                // Validation allows one; should there be more, the first wins.
                out.mesh.get_or_insert(pb::MeshConfig {
                    trust_domain: m.trust_domain.value.clone(),
                    mtls_mode: match m.mtls.mode {
                        MtlsMode::Strict => pb::MtlsMode::Strict,
                        MtlsMode::Permissive => pb::MtlsMode::Permissive,
                    } as i32,
                    outbound_policy: match m.outbound_policy {
                        OutboundPolicy::AllowAny => pb::OutboundPolicy::AllowAny,
                        OutboundPolicy::RegistryOnly => pb::OutboundPolicy::RegistryOnly,
                    } as i32,
                    source,
                });
            }
            Spec::Service(s) => out.services.push(pb::Service {
                name,
                namespace,
                ports: ports(&s.ports),
                identities: strings(&s.identities),
                selector: labels(&s.selector),
                addresses: strings(&s.addresses),
                source,
            }),
            Spec::ServiceEntry(s) => {
                let endpoints: Vec<pb::Endpoint> = s
                    .endpoints
                    .iter()
                    .map(|e| pb::Endpoint {
                        address: e.address.value.clone(),
                        identity: e
                            .identity
                            .as_ref()
                            .map(|i| i.value.clone())
                            .unwrap_or_default(),
                        labels: labels(&e.labels),
                        ports: e.ports.iter().map(|p| p.value).collect(),
                        weight: e
                            .weight
                            .as_ref()
                            .map_or(DEFAULT_ENDPOINT_WEIGHT, |w| w.value),
                    })
                    .collect();
                if !endpoints.is_empty() {
                    out.endpoints.push(pb::ServiceEndpoints {
                        service: format!("{namespace}/{name}"),
                        endpoints: endpoints.clone(),
                        source: source.clone(),
                    });
                }
                out.service_entries.push(pb::ServiceEntry {
                    name,
                    namespace,
                    hosts: strings(&s.hosts),
                    addresses: strings(&s.addresses),
                    ports: ports(&s.ports),
                    location: match s.location {
                        MeshLocation::MeshExternal => pb::Location::MeshExternal,
                        MeshLocation::MeshInternal => pb::Location::MeshInternal,
                    } as i32,
                    endpoints,
                    source,
                });
            }
            Spec::Route(r) => out.routes.push(pb::Route {
                name,
                namespace,
                service: qualify(&r.service, doc.namespace()),
                rules: r
                    .rules
                    .iter()
                    .map(|rule| pb::HttpRoute {
                        rate_limit: rule.rate_limit.as_ref().map(|rl| rate_limit(rl)),
                        ..http_route(&rule.core(), doc.namespace())
                    })
                    .collect(),
                source,
            }),
            Spec::TrafficPolicy(t) => {
                let bulkhead = t.bulkhead.as_ref().map(|b| &b.value);
                let limit = |f: fn(&crate::model::Bulkhead) -> &Option<Located<u32>>| {
                    bulkhead.and_then(|b| f(b).as_ref()).map_or(0, |v| v.value)
                };
                out.traffic_policies.push(pb::TrafficPolicy {
                    name,
                    namespace,
                    service: qualify(&t.service, doc.namespace()),
                    max_connections: limit(|b| &b.max_connections),
                    max_requests: limit(|b| &b.max_requests),
                    max_pending: limit(|b| &b.max_pending),
                    queue_timeout_ms: bulkhead
                        .and_then(|b| b.queue_timeout.as_ref())
                        .map_or(0, |d| ms(d)),
                    circuit_breaker: t.circuit_breaker.as_ref().map(|cb| pb::CircuitBreaker {
                        consecutive_failures: or(&cb.consecutive_failures, 0),
                        failure_ratio: cb.failure_ratio.as_ref().map_or(0.0, |r| r.value),
                        min_requests: or(&cb.min_requests, DEFAULT_BREAKER_MIN_REQUESTS),
                        window_ms: ms_or(&cb.window, DEFAULT_BREAKER_WINDOW),
                        open_ms: ms_or(&cb.open_duration, DEFAULT_BREAKER_OPEN),
                        half_open_requests: or(
                            &cb.half_open_requests,
                            DEFAULT_BREAKER_HALF_OPEN_REQUESTS,
                        ),
                    }),
                    outlier_detection: t.outlier_detection.as_ref().map(|o| pb::OutlierDetection {
                        consecutive_5xx: or(&o.consecutive_5xx, DEFAULT_OUTLIER_CONSECUTIVE_5XX),
                        interval_ms: ms_or(&o.interval, DEFAULT_OUTLIER_INTERVAL),
                        base_ejection_ms: ms_or(
                            &o.base_ejection_time,
                            DEFAULT_OUTLIER_BASE_EJECTION,
                        ),
                        max_ejection_percent: or(
                            &o.max_ejection_percent,
                            DEFAULT_OUTLIER_MAX_EJECTION_PERCENT,
                        ),
                    }),
                    lb: match t.lb {
                        LbAlgorithm::P2cLeastRequest => pb::LbAlgorithm::P2cLeastRequest,
                        LbAlgorithm::RoundRobin => pb::LbAlgorithm::RoundRobin,
                        LbAlgorithm::PeakEwma => pb::LbAlgorithm::PeakEwma,
                    } as i32,
                    connect_timeout_ms: t.connect_timeout.as_ref().map_or(0, |d| ms(d)),
                    rate_limit: t.rate_limit.as_ref().map(|rl| rate_limit(rl)),
                    health_check: t.health_check.as_ref().map(|hc| pb::HealthCheck {
                        path: hc.path.value.clone(),
                        interval_ms: ms_or(&hc.interval, DEFAULT_HEALTH_INTERVAL),
                        timeout_ms: ms_or(&hc.timeout, DEFAULT_HEALTH_TIMEOUT),
                        unhealthy_threshold: or(
                            &hc.unhealthy_threshold,
                            DEFAULT_HEALTH_UNHEALTHY_THRESHOLD,
                        ),
                        healthy_threshold: or(
                            &hc.healthy_threshold,
                            DEFAULT_HEALTH_HEALTHY_THRESHOLD,
                        ),
                    }),
                    max_request_body_bytes: t
                        .max_request_body_bytes
                        .as_ref()
                        .map_or(0, |v| v.value),
                    adaptive_concurrency: t.adaptive_concurrency.as_ref().map(|a| {
                        let min_limit = or(&a.min_limit, DEFAULT_ADAPTIVE_MIN_LIMIT);
                        // Validation rejects max < min; never panic in `clamp` anyway.
                        let max_limit = or(&a.max_limit, DEFAULT_ADAPTIVE_MAX_LIMIT).max(min_limit);
                        pb::AdaptiveConcurrency {
                            min_limit,
                            max_limit,
                            initial_limit: or(&a.initial_limit, DEFAULT_ADAPTIVE_INITIAL_LIMIT)
                                .clamp(min_limit, max_limit),
                            latency_tolerance: a
                                .latency_tolerance
                                .as_ref()
                                .map_or(DEFAULT_ADAPTIVE_LATENCY_TOLERANCE, |r| r.value),
                            sample_window_ms: ms_or(
                                &a.sample_window,
                                DEFAULT_ADAPTIVE_SAMPLE_WINDOW,
                            ),
                        }
                    }),
                    source,
                });
            }
            Spec::AuthorizationPolicy(a) => {
                out.authorization_policies.push(pb::AuthorizationPolicy {
                    name,
                    namespace,
                    service: qualify(&a.service, doc.namespace()),
                    rules: a
                        .rules
                        .iter()
                        .map(|rule| pb::AuthorizationRule {
                            from: strings(&rule.from),
                            paths: rule.paths.iter().map(|p| string_match(p)).collect(),
                            methods: strings(&rule.methods),
                        })
                        .collect(),
                    source,
                })
            }
            Spec::Gateway(g) => out.gateways.push(pb::Gateway {
                name,
                namespace,
                listeners: g.listeners.iter().map(gateway_listener).collect(),
                routes: g
                    .routes
                    .iter()
                    .map(|r| gateway_route(r, doc.namespace()))
                    .collect(),
                source,
            }),
            Spec::RequestAuthentication(a) => {
                out.request_authentications.push(pb::RequestAuthentication {
                    name,
                    namespace,
                    gateway: a.gateway.value.clone(),
                    providers: a.providers.iter().map(|p| jwt_provider(p)).collect(),
                    source,
                })
            }
        }
    }
    out
}

/// A Route rule's or Gateway route's shared part. A Route rule's local
/// rate limit is its own (set by the caller); a gateway route limits per
/// client instead, in [`pb::GatewayRoute`].
fn http_route(rule: &RuleCore<'_>, namespace: &str) -> pb::HttpRoute {
    pb::HttpRoute {
        name: rule.name.map(|n| n.value.clone()).unwrap_or_default(),
        matches: rule
            .matches
            .iter()
            .map(|m| pb::RouteMatch {
                path: m.path.as_ref().map(|p| string_match(p)),
                methods: strings(&m.methods),
                headers: m.headers.iter().map(|h| header_match(h)).collect(),
            })
            .collect(),
        backends: rule
            .backends
            .iter()
            .map(|b| backend(b, namespace, 100))
            .collect(),
        timeout_ms: rule.timeout.map_or(0, |t| ms(t)),
        retry: rule.retry.map(|r| retry(r)),
        overrides: rule
            .overrides
            .iter()
            .map(|o| pb::HeaderOverride {
                header: Some(header_match(&o.header)),
                backend: Some(backend(&o.backend, namespace, 100)),
            })
            .collect(),
        rate_limit: None,
    }
}

fn gateway_listener(l: &GatewayListenerSpec) -> pb::GatewayListener {
    pb::GatewayListener {
        name: l.name.value.clone(),
        port: l.port.value,
        certificates: l
            .certificates
            .iter()
            .map(|c| pb::GatewayCertificate {
                hostnames: strings(&c.hostnames),
                cert_file: c.cert_file.value.clone(),
                key_file: c.key_file.value.clone(),
            })
            .collect(),
        client_ca_file: l
            .client_ca_file
            .as_ref()
            .map(|f| f.value.clone())
            .unwrap_or_default(),
        require_client_cert: flag(&l.require_client_cert),
    }
}

fn gateway_route(r: &GatewayRouteSpec, namespace: &str) -> pb::GatewayRoute {
    pb::GatewayRoute {
        http: Some(http_route(&r.core(), namespace)),
        hostnames: strings(&r.hostnames),
        listeners: strings(&r.listeners),
        authorization: r.authorization.as_ref().map(|a| pb::GatewayAuthorization {
            require_authenticated: flag(&a.require_authenticated),
            scopes: strings(&a.scopes),
            claims: a
                .claims
                .iter()
                .map(|c| pb::ClaimRequirement {
                    claim: c.claim.value.clone(),
                    values: strings(&c.values),
                })
                .collect(),
        }),
        rate_limit: r.rate_limit.as_ref().map(|rl| pb::ClientRateLimit {
            // Header names are case-insensitive; the proxy's maps use lower case.
            key: match rl.key.strip_prefix("header:") {
                Some(h) => format!("header:{}", h.to_ascii_lowercase()),
                None => rl.key.value.clone(),
            },
            requests_per_second: rl.requests_per_second.value,
            burst: or(&rl.burst, rl.requests_per_second.value),
        }),
        validation: r.validation.as_ref().map(|v| pb::RequestValidation {
            json_schema: v
                .json_schema
                .as_ref()
                .map(|s| s.value.to_string())
                .unwrap_or_default(),
            max_body_bytes: v.max_body_bytes.as_ref().map_or(0, |m| m.value),
        }),
    }
}

fn jwt_provider(p: &JwtProviderSpec) -> pb::JwtProvider {
    let opt = |v: &Option<Located<String>>| v.as_ref().map(|v| v.value.clone()).unwrap_or_default();
    pb::JwtProvider {
        issuer: p.issuer.value.clone(),
        audiences: strings(&p.audiences),
        jwks_file: opt(&p.jwks_file),
        jwks_uri: opt(&p.jwks_uri),
        jwks_ca_file: opt(&p.jwks_ca_file),
        jwks_refresh_ms: ms_or(&p.jwks_refresh, DEFAULT_JWKS_REFRESH),
        algorithms: if p.algorithms.is_empty() {
            JWT_ALGORITHMS.iter().map(|a| a.to_string()).collect()
        } else {
            strings(&p.algorithms)
        },
        // Zero is a valid skew, so not `ms_or` (which reads 0 as unset).
        clock_skew_ms: p
            .clock_skew
            .as_ref()
            .map_or(DEFAULT_CLOCK_SKEW, |d| {
                duration::parse(d).unwrap_or_default()
            })
            .as_millis()
            .try_into()
            .unwrap_or(u64::MAX),
        forward_claims: p
            .forward_claims
            .iter()
            .map(|(claim, header)| (claim.clone(), header.to_ascii_lowercase()))
            .collect(),
        forward_token: flag(&p.forward_token),
    }
}

fn flag(v: &Option<Located<bool>>) -> bool {
    v.as_ref().is_some_and(|v| v.value)
}

/// Where a document came from, as carried in every resource.
pub fn source(doc: &Document) -> pb::Source {
    pb::Source {
        file: doc.file.display().to_string(),
        line: doc.line,
        kind: doc.kind().to_string(),
        name: doc.name().to_string(),
        namespace: doc.namespace().to_string(),
    }
}

/// `name` or `namespace/name` → `namespace/name`.
fn qualify(reference: &str, namespace: &str) -> String {
    match resolve(reference, namespace) {
        Some((ns, name)) => format!("{ns}/{name}"),
        None => reference.to_string(),
    }
}

fn ports(ports: &[PortSpec]) -> Vec<pb::ServicePort> {
    ports
        .iter()
        .map(|p| pb::ServicePort {
            port: p.port.value,
            name: p.name.as_ref().map(|n| n.value.clone()).unwrap_or_default(),
            protocol: match p.protocol {
                Protocol::Auto => pb::Protocol::Auto,
                Protocol::Http => pb::Protocol::Http,
                Protocol::Http2 => pb::Protocol::Http2,
                Protocol::Grpc => pb::Protocol::Grpc,
                Protocol::Tcp => pb::Protocol::Tcp,
            } as i32,
            target_port: p.target_port.as_ref().map_or(0, |t| t.value),
        })
        .collect()
}

fn strings(v: &[Located<String>]) -> Vec<String> {
    v.iter().map(|s| s.value.clone()).collect()
}

fn labels(l: &crate::model::Labels) -> HashMap<String, String> {
    l.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn or(v: &Option<Located<u32>>, default: u32) -> u32 {
    v.as_ref().map_or(default, |v| v.value)
}

fn ms(d: &str) -> u64 {
    duration::parse(d).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ms_or(d: &Option<Located<String>>, default: Duration) -> u64 {
    match d {
        Some(d) => ms(d),
        None => u64::try_from(default.as_millis()).unwrap_or(u64::MAX),
    }
}

fn string_match(m: &StringMatch) -> pb::StringMatch {
    use pb::string_match::Kind;
    let kind = if let Some(v) = &m.exact {
        Some(Kind::Exact(v.value.clone()))
    } else if let Some(v) = &m.prefix {
        Some(Kind::Prefix(v.value.clone()))
    } else {
        m.regex.as_ref().map(|v| Kind::Regex(v.value.clone()))
    };
    pb::StringMatch { kind }
}

fn header_match(h: &HeaderMatch) -> pb::HeaderMatch {
    let absent = h.absent.as_ref().is_some_and(|a| a.value);
    let value = StringMatch {
        exact: h.exact.clone(),
        prefix: h.prefix.clone(),
        regex: h.regex.clone(),
    };
    pb::HeaderMatch {
        // HTTP/2 and the sidecar's header maps use lower case.
        name: h.name.to_ascii_lowercase(),
        value: (!absent && (h.exact.is_some() || h.prefix.is_some() || h.regex.is_some()))
            .then(|| string_match(&value)),
        absent,
    }
}

/// A backend; `default_weight` applies when the weight was left out (only
/// allowed for a rule's single backend, and for overrides).
fn backend(b: &Backend, namespace: &str, default_weight: u32) -> pb::WeightedBackend {
    pb::WeightedBackend {
        service: qualify(&b.service, namespace),
        subset: labels(&b.subset),
        weight: or(&b.weight, default_weight),
        port: or(&b.port, 0),
    }
}

fn rate_limit(rl: &RateLimitSpec) -> pb::RateLimit {
    pb::RateLimit {
        requests_per_second: rl.requests_per_second.value,
        burst: or(&rl.burst, rl.requests_per_second.value),
        per_source_identity: rl.per_source_identity.as_ref().is_some_and(|v| v.value),
    }
}

fn retry(r: &RetrySpec) -> pb::RetryPolicy {
    let base = r
        .backoff_base
        .as_ref()
        .and_then(|d| duration::parse(d).ok())
        .unwrap_or(DEFAULT_BACKOFF_BASE);
    let max = r
        .backoff_max
        .as_ref()
        .and_then(|d| duration::parse(d).ok())
        .unwrap_or(DEFAULT_BACKOFF_MAX.max(base));
    let retry_on = if r.retry_on.is_empty() {
        DEFAULT_RETRY_ON.iter().map(|s| s.to_string()).collect()
    } else {
        strings(&r.retry_on)
    };
    pb::RetryPolicy {
        attempts: r.attempts.value,
        per_try_timeout_ms: r.per_try_timeout.as_ref().map_or(0, |d| ms(d)),
        backoff_base_ms: u64::try_from(base.as_millis()).unwrap_or(u64::MAX),
        backoff_max_ms: u64::try_from(max.as_millis()).unwrap_or(u64::MAX),
        retry_on,
        retriable_status_codes: r.retriable_status_codes.iter().map(|c| c.value).collect(),
        budget_ratio: r
            .budget_ratio
            .as_ref()
            .map_or(DEFAULT_BUDGET_RATIO, |v| v.value),
        budget_min_per_second: or(&r.budget_min_per_second, DEFAULT_BUDGET_MIN_PER_SECOND),
        retry_non_idempotent: r.retry_non_idempotent.as_ref().is_some_and(|v| v.value),
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
  ports: [{port: 8080, protocol: http, targetPort: 8081}]
---
apiVersion: bulwark.dev/v1
kind: Route
metadata: {name: api, namespace: shop}
spec:
  service: api
  rules:
    - matches:
        - headers:
            - name: X-Debug
            - name: X-Skip
              absent: true
            - name: X-Tenant
              prefix: acme
"#;

    fn compiled() -> Resources {
        crate::compile_str(Path::new("c.yaml"), CONFIG).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn references_are_qualified_with_the_document_namespace() {
        assert_eq!(compiled().routes[0].service, "shop/api");
    }

    #[test]
    fn header_matches_are_lower_cased_and_presence_carries_no_value() {
        let r = compiled();
        let headers = &r.routes[0].rules[0].matches[0].headers;
        let shown: Vec<(&str, bool, bool)> = headers
            .iter()
            .map(|h| (h.name.as_str(), h.value.is_some(), h.absent))
            .collect();
        assert_eq!(
            shown,
            [
                ("x-debug", false, false),
                ("x-skip", false, true),
                ("x-tenant", true, false)
            ]
        );
        assert_eq!(
            headers[2].value.as_ref().unwrap().kind,
            Some(pb::string_match::Kind::Prefix("acme".into()))
        );
    }

    #[test]
    fn ports_keep_protocol_and_target_port() {
        let r = compiled();
        let p = &r.services[0].ports[0];
        assert_eq!(
            (p.port, p.protocol, p.target_port),
            (8080, pb::Protocol::Http as i32, 8081)
        );
    }

    #[test]
    fn sources_point_at_each_document() {
        let r = compiled();
        let s = r.routes[0].source.as_ref().unwrap();
        assert_eq!(
            (
                s.file.as_str(),
                s.line,
                s.kind.as_str(),
                s.namespace.as_str()
            ),
            ("c.yaml", 7, "Route", "shop")
        );
    }
}
