//! The control plane's Prometheus metrics. Labels are bounded: `type` is one
//! of the eight resource kinds, `reason` one of a fixed set.

use bulwark_ca::metrics::doubling_buckets;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A resource kind (`Service`, `Route`, ...), not the full type URL.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: String,
}

impl TypeLabel {
    pub fn of(type_url: &str) -> Self {
        Self {
            r#type: crate::snapshot::kind_of(type_url).to_string(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// Every metric of the control plane, and the registry that renders them.
pub struct XdsMetrics {
    /// `bulwark_xds_connected_sidecars`: streams past the node check.
    pub connected_sidecars: Gauge,
    /// `bulwark_xds_push_duration_seconds`: per stream and snapshot, from
    /// noticing the snapshot to having handed the stream every response for
    /// it (a slow sidecar's full send queue counts).
    pub push_duration: Histogram,
    /// `bulwark_xds_config_apply_seconds`: from a snapshot's creation to a
    /// sidecar's ACK of a response built from it.
    pub apply_latency: Histogram,
    /// `bulwark_xds_resources_sent_total{type}`.
    pub resources_sent: Family<TypeLabel, Counter>,
    /// `bulwark_xds_nacks_total{type}`.
    pub nacks: Family<TypeLabel, Counter>,
    /// `bulwark_xds_config_rejections_total`: reloads of the config
    /// directory refused as invalid (the last good config stays).
    pub config_rejections: Counter,
    /// `bulwark_xds_snapshots_total`: snapshots published.
    pub snapshots: Counter,
    /// `bulwark_xds_resources_oversized{type}`: resources of the current
    /// snapshot whose content is too large to serve (each stays at its last
    /// good version).
    pub resources_oversized: Family<TypeLabel, Gauge>,
    /// `bulwark_xds_streams_refused_total{reason}`.
    pub streams_refused: Family<ReasonLabel, Counter>,
    /// `bulwark_xds_tls_handshake_failures_total`.
    pub tls_handshake_failures: Counter,
    /// `bulwark_xds_webhook_connections_total{result}`: connections to the
    /// injection webhook by how they ended (`served`, `tls_error`,
    /// `tls_timeout`, `timeout`, `http_error`, `over_limit`).
    pub webhook_connections: Family<ResultLabel, Counter>,
    registry: Registry,
}

impl Default for XdsMetrics {
    fn default() -> Self {
        let connected_sidecars = Gauge::default();
        // 0.5 ms .. ~16 s
        let push_duration = Histogram::new(doubling_buckets(0.0005, 16));
        // 1 ms .. ~65 s
        let apply_latency = Histogram::new(doubling_buckets(0.001, 17));
        let resources_sent = Family::<TypeLabel, Counter>::default();
        let nacks = Family::<TypeLabel, Counter>::default();
        let config_rejections = Counter::default();
        let snapshots = Counter::default();
        let streams_refused = Family::<ReasonLabel, Counter>::default();
        let resources_oversized = Family::<TypeLabel, Gauge>::default();
        let tls_handshake_failures = Counter::default();
        let webhook_connections = Family::<ResultLabel, Counter>::default();
        let mut registry = Registry::default();
        registry.register(
            "bulwark_xds_connected_sidecars",
            "Sidecars with an open discovery stream",
            connected_sidecars.clone(),
        );
        registry.register(
            "bulwark_xds_push_duration_seconds",
            "Time to hand a snapshot's changes to one stream",
            push_duration.clone(),
        );
        registry.register(
            "bulwark_xds_config_apply_seconds",
            "Time from a snapshot's creation to a sidecar's ACK of it",
            apply_latency.clone(),
        );
        registry.register(
            "bulwark_xds_resources_sent",
            "Resources sent to sidecars, by kind",
            resources_sent.clone(),
        );
        registry.register(
            "bulwark_xds_nacks",
            "Responses sidecars rejected, by kind",
            nacks.clone(),
        );
        registry.register(
            "bulwark_xds_config_rejections",
            "Config directory reloads rejected as invalid",
            config_rejections.clone(),
        );
        registry.register(
            "bulwark_xds_snapshots",
            "Snapshots published",
            snapshots.clone(),
        );
        registry.register(
            "bulwark_xds_resources_oversized",
            "Resources too large to serve, kept at their last good version, by kind",
            resources_oversized.clone(),
        );
        registry.register(
            "bulwark_xds_streams_refused",
            "Discovery streams refused, by reason",
            streams_refused.clone(),
        );
        registry.register(
            "bulwark_xds_tls_handshake_failures",
            "TLS handshakes on the discovery port that failed",
            tls_handshake_failures.clone(),
        );
        registry.register(
            "bulwark_xds_webhook_connections",
            "Connections to the injection webhook, by how they ended",
            webhook_connections.clone(),
        );
        Self {
            connected_sidecars,
            push_duration,
            apply_latency,
            resources_sent,
            nacks,
            config_rejections,
            snapshots,
            streams_refused,
            resources_oversized,
            tls_handshake_failures,
            webhook_connections,
            registry,
        }
    }
}

impl XdsMetrics {
    /// The metrics in the Prometheus/OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
