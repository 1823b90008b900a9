//! Prometheus metrics of the sidecar (names per DESIGN §3), and tracing.

pub mod trace;

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::RwLock;
use std::sync::atomic::AtomicI64;

use bulwark_ca::metrics::doubling_buckets;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub direction: &'static str,
    pub src_identity: String,
    pub dst_identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub direction: &'static str,
    /// `sent` (towards the upstream) or `received`.
    pub flow: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub direction: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    pub direction: &'static str,
    pub src_identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: &'static str,
    pub service: String,
    pub route: String,
    pub src_identity: String,
    pub dst_identity: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service: String,
}

/// The labels of one request, borrowed from the config snapshot and the
/// connection: recording a request allocates nothing once its label set
/// has been seen.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct RequestKey<'a> {
    pub direction: &'static str,
    pub service: &'a str,
    pub route: &'a str,
    pub src_identity: &'a str,
    pub dst_identity: &'a str,
    pub code: u16,
}

impl RequestKey<'_> {
    fn labels(&self) -> RequestLabels {
        RequestLabels {
            direction: self.direction,
            service: self.service.to_string(),
            route: self.route.to_string(),
            src_identity: self.src_identity.to_string(),
            dst_identity: self.dst_identity.to_string(),
            code: self.code,
        }
    }

    fn is(&self, l: &RequestLabels) -> bool {
        self.code == l.code
            && self.direction == l.direction
            && self.service == l.service
            && self.route == l.route
            && self.src_identity == l.src_identity
            && self.dst_identity == l.dst_identity
    }
}

/// One label set's series, resolved once (`Counter` and `Histogram` are
/// shared handles: these are the series the families export).
struct RequestSeries {
    labels: RequestLabels,
    count: Counter,
    duration: Histogram,
}

/// Series by a hash of their borrowed [`RequestKey`]: one look-up per
/// request instead of two family look-ups of owned labels.
#[derive(Default)]
struct RequestSeriesCache {
    hasher: RandomState,
    by_hash: RwLock<HashMap<u64, Vec<RequestSeries>>>,
}

type HistogramFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs to ~13 s.
    Histogram::new(doubling_buckets(0.0001, 18))
}

pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: HistogramFamily,
    pub retries: Family<ServiceLabel, Counter>,
    pub bulkhead_rejections: Family<ServiceLabel, Counter>,
    pub adaptive_limit: Family<ServiceLabel, Gauge<i64, AtomicI64>>,
    pub adaptive_rejections: Family<ServiceLabel, Counter>,
    pub ratelimit_rejections: Family<ServiceLabel, Counter>,
    pub breaker_state: Family<ServiceLabel, Gauge<i64, AtomicI64>>,
    pub breaker_transitions: Family<ServiceLabel, Counter>,
    pub outlier_ejections: Family<ServiceLabel, Counter>,
    pub detections: Family<ResultLabel, Counter>,
    pub local_responses: Family<ReasonLabel, Counter>,
    pub trace_dropped: Counter,
    pub audit_dropped: Counter,
    pub detection_duration: Histogram,
    pub tcp_connections: Family<ConnLabels, Counter>,
    pub tcp_bytes: Family<BytesLabels, Counter>,
    pub tcp_refused: Family<RefusedLabels, Counter>,
    pub tls_handshakes: Family<HandshakeLabels, Counter>,
    pub authz_denials: Family<DenialLabels, Counter>,
    pub cert_expiry: Gauge<i64, AtomicI64>,
    pub cert_issued: Gauge<i64, AtomicI64>,
    pub renewals: Family<ResultLabel, Counter>,
    pub config_applied: Family<ResultLabel, Counter>,
    pub config_version: Family<VersionLabel, Gauge<i64, AtomicI64>>,
    pub config_stale: Gauge<i64, AtomicI64>,
    pub xds_connected: Gauge<i64, AtomicI64>,
    pub xds_nacks: Counter,
    pub http_parked: Gauge<i64, AtomicI64>,
    request_series: RequestSeriesCache,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    pub version: String,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            retries: Family::default(),
            bulkhead_rejections: Family::default(),
            adaptive_limit: Family::default(),
            adaptive_rejections: Family::default(),
            ratelimit_rejections: Family::default(),
            breaker_state: Family::default(),
            breaker_transitions: Family::default(),
            outlier_ejections: Family::default(),
            detections: Family::default(),
            local_responses: Family::default(),
            trace_dropped: Counter::default(),
            audit_dropped: Counter::default(),
            detection_duration: latency_histogram(),
            tcp_connections: Family::default(),
            tcp_bytes: Family::default(),
            tcp_refused: Family::default(),
            tls_handshakes: Family::default(),
            authz_denials: Family::default(),
            cert_expiry: Gauge::default(),
            cert_issued: Gauge::default(),
            renewals: Family::default(),
            config_applied: Family::default(),
            config_version: Family::default(),
            config_stale: Gauge::default(),
            xds_connected: Gauge::default(),
            xds_nacks: Counter::default(),
            http_parked: Gauge::default(),
            request_series: RequestSeriesCache::default(),
            registry: Registry::default(),
        };
        registry.register(
            "bulwark_requests",
            "HTTP requests proxied",
            m.requests.clone(),
        );
        registry.register(
            "bulwark_request_duration_seconds",
            "HTTP request duration as seen by the sidecar",
            m.request_duration.clone(),
        );
        registry.register(
            "bulwark_retries",
            "Retried upstream attempts",
            m.retries.clone(),
        );
        registry.register(
            "bulwark_bulkhead_rejections",
            "Requests rejected because the service's bulkhead was full",
            m.bulkhead_rejections.clone(),
        );
        registry.register(
            "bulwark_adaptive_concurrency_limit",
            "The current adaptive concurrency limit of calls to a service",
            m.adaptive_limit.clone(),
        );
        registry.register(
            "bulwark_adaptive_concurrency_rejections",
            "Requests refused because the service's adaptive concurrency limit was reached",
            m.adaptive_rejections.clone(),
        );
        registry.register(
            "bulwark_ratelimit_rejections",
            "Requests rejected by a local rate limit",
            m.ratelimit_rejections.clone(),
        );
        registry.register(
            "bulwark_breaker_state",
            "Circuit breaker state: 0 closed, 1 open, 2 half-open",
            m.breaker_state.clone(),
        );
        registry.register(
            "bulwark_breaker_transitions",
            "Circuit breaker state changes",
            m.breaker_transitions.clone(),
        );
        registry.register(
            "bulwark_outlier_ejections",
            "Endpoints ejected by outlier detection",
            m.outlier_ejections.clone(),
        );
        registry.register(
            "bulwark_audit_dropped",
            "Audit records dropped (queue full or write failure)",
            m.audit_dropped.clone(),
        );
        registry.register(
            "bulwark_trace_spans_dropped",
            "Spans dropped because the export queue was full",
            m.trace_dropped.clone(),
        );
        registry.register(
            "bulwark_local_responses",
            "Responses generated by the sidecar itself, by reason (x-bulwark-reason)",
            m.local_responses.clone(),
        );
        registry.register(
            "bulwark_protocol_detections",
            "Protocol detection on auto ports, by outcome (http, tcp, server_first)",
            m.detections.clone(),
        );
        registry.register(
            "bulwark_protocol_detection_duration_seconds",
            "Time spent detecting the protocol of an outbound connection",
            m.detection_duration.clone(),
        );
        registry.register(
            "bulwark_tcp_connections",
            "Proxied TCP connections",
            m.tcp_connections.clone(),
        );
        registry.register("bulwark_tcp_bytes", "Bytes proxied", m.tcp_bytes.clone());
        registry.register(
            "bulwark_tcp_refused",
            "Connections refused by the sidecar, by reason",
            m.tcp_refused.clone(),
        );
        registry.register(
            "bulwark_tls_handshakes",
            "TLS handshakes with mesh peers",
            m.tls_handshakes.clone(),
        );
        registry.register(
            "bulwark_authz_denials",
            "Connections or requests denied by authorization policy",
            m.authz_denials.clone(),
        );
        registry.register(
            "bulwark_cert_expiry_timestamp_seconds",
            "notAfter of the workload's current SVID, Unix seconds",
            m.cert_expiry.clone(),
        );
        registry.register(
            "bulwark_cert_issued_timestamp_seconds",
            "When the workload's current SVID was installed, Unix seconds",
            m.cert_issued.clone(),
        );
        registry.register(
            "bulwark_cert_renewals",
            "SVID issuance attempts, by result",
            m.renewals.clone(),
        );
        registry.register(
            "bulwark_config_updates",
            "Config updates, by result",
            m.config_applied.clone(),
        );
        registry.register(
            "bulwark_config_applied_version",
            "The applied config version (value: Unix time it was applied)",
            m.config_version.clone(),
        );
        registry.register(
            "bulwark_config_stale",
            "1 while serving a config restored from disk",
            m.config_stale.clone(),
        );
        registry.register(
            "bulwark_xds_connected",
            "1 while the discovery stream is up",
            m.xds_connected.clone(),
        );
        registry.register(
            "bulwark_http_parked_connections",
            "App HTTP/1.1 connections idle between requests, holding no HTTP state",
            m.http_parked.clone(),
        );
        registry.register(
            "bulwark_xds_nacks",
            "Config updates rejected (NACKed)",
            m.xds_nacks.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    pub fn refused(&self, direction: &'static str, reason: &'static str) {
        self.tcp_refused
            .get_or_create(&RefusedLabels { direction, reason })
            .inc();
    }

    /// Records one proxied request (count, duration, locally generated
    /// reason) and returns its `x-bulwark-reason`, if any.
    pub fn record_request<B>(
        &self,
        key: RequestKey<'_>,
        elapsed: std::time::Duration,
        resp: &http::Response<B>,
    ) -> String {
        let cache = &self.request_series;
        let hash = cache.hasher.hash_one(key);
        let seen = {
            let map = cache.by_hash.read().unwrap_or_else(|p| p.into_inner());
            map.get(&hash)
                .and_then(|v| v.iter().find(|s| key.is(&s.labels)))
                .map(|s| {
                    s.count.inc();
                    s.duration.observe(elapsed.as_secs_f64());
                })
                .is_some()
        };
        if !seen {
            // First request with these labels: create the family series and
            // keep their handles.
            let labels = key.labels();
            let count = self.requests.get_or_create(&labels).clone();
            let duration = self.request_duration.get_or_create(&labels).clone();
            count.inc();
            duration.observe(elapsed.as_secs_f64());
            let mut map = cache.by_hash.write().unwrap_or_else(|p| p.into_inner());
            let v = map.entry(hash).or_default();
            if !v.iter().any(|s| key.is(&s.labels)) {
                v.push(RequestSeries {
                    labels,
                    count,
                    duration,
                });
            }
        }
        self.count_local(resp);
        resp.headers()
            .get("x-bulwark-reason")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }

    /// Counts a response the sidecar generated itself (it carries `x-bulwark-reason`).
    pub fn count_local<B>(&self, resp: &http::Response<B>) {
        if let Some(r) = resp
            .headers()
            .get("x-bulwark-reason")
            .and_then(|v| v.to_str().ok())
        {
            self.local_responses
                .get_or_create(&ReasonLabel {
                    reason: self.reason_label(r),
                })
                .inc();
        }
    }

    /// `reason` as a label: one the sidecar answers with itself, else
    /// `other`. `x-bulwark-reason` also arrives on responses from upstream,
    /// where anything can set it: a remote party must not mint a series
    /// per response.
    fn reason_label(&self, reason: &str) -> String {
        if crate::http::is_own_reason(reason) {
            reason.to_string()
        } else {
            "other".into()
        }
    }

    /// Exactly one `bulwark_config_applied_version` sample: the current one.
    pub fn set_applied_version(&self, version: &str) {
        self.config_version.clear();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.config_version
            .get_or_create(&VersionLabel {
                version: version.to_string(),
            })
            .set(now);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(code: u16) -> RequestKey<'static> {
        RequestKey {
            direction: "outbound",
            service: "default/api",
            route: "canary",
            src_identity: "spiffe://cluster.local/ns/default/sa/web",
            dst_identity: "spiffe://cluster.local/ns/default/sa/api",
            code,
        }
    }

    fn count_line(m: &Metrics, code: u16) -> Option<String> {
        m.encode()
            .lines()
            .find(|l| {
                l.starts_with("bulwark_requests_total{") && l.contains(&format!("code=\"{code}\""))
            })
            .map(String::from)
    }

    #[test]
    fn requests_with_the_same_labels_count_in_one_exported_series() {
        let m = Metrics::default();
        let ok = http::Response::new(());
        for _ in 0..3 {
            m.record_request(key(200), std::time::Duration::from_millis(1), &ok);
        }
        m.record_request(key(503), std::time::Duration::from_millis(1), &ok);

        let line = count_line(&m, 200).expect("a 200 series");
        assert!(line.ends_with(" 3"), "{line}");
        assert!(line.contains("route=\"canary\""), "{line}");
        assert!(count_line(&m, 503).expect("a 503 series").ends_with(" 1"));
        let hist = m
            .encode()
            .lines()
            .find(|l| {
                l.starts_with("bulwark_request_duration_seconds_count{")
                    && l.contains("code=\"200\"")
            })
            .map(String::from)
            .expect("a duration series");
        assert!(hist.ends_with(" 3"), "{hist}");
    }

    #[test]
    fn reasons_from_upstream_cannot_mint_unbounded_series() {
        let m = Metrics::default();
        let with_reason = |r: &str| {
            http::Response::builder()
                .header("x-bulwark-reason", r)
                .body(())
                .unwrap()
        };
        for i in 0..200 {
            m.count_local(&with_reason(&format!("made-up-{i}")));
        }
        // One the sidecar answers with itself keeps its name.
        m.count_local(&crate::http::reply(503, "bulkhead-full"));
        let series: Vec<String> = m
            .encode()
            .lines()
            .filter(|l| l.starts_with("bulwark_local_responses_total{"))
            .map(String::from)
            .collect();
        assert_eq!(series.len(), 2, "{series:?}");
        assert!(
            series
                .iter()
                .any(|l| l.contains("reason=\"other\"") && l.ends_with(" 200"))
        );
        assert!(
            series
                .iter()
                .any(|l| l.contains("reason=\"bulkhead-full\"") && l.ends_with(" 1"))
        );
    }
}
