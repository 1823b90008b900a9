//! Prometheus metrics of the sidecar (names per DESIGN §3).

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
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

pub struct Metrics {
    pub registry: Registry,
    pub tcp_connections: Family<ConnLabels, Counter>,
    pub tcp_bytes: Family<BytesLabels, Counter>,
    pub tcp_refused: Family<RefusedLabels, Counter>,
    pub tls_handshakes: Family<HandshakeLabels, Counter>,
    pub authz_denials: Family<DenialLabels, Counter>,
    pub cert_expiry: Gauge<i64, AtomicI64>,
    pub renewals: Family<ResultLabel, Counter>,
    pub config_applied: Family<ResultLabel, Counter>,
    pub config_version: Family<VersionLabel, Gauge<i64, AtomicI64>>,
    pub config_stale: Gauge<i64, AtomicI64>,
    pub xds_connected: Gauge<i64, AtomicI64>,
    pub xds_nacks: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    pub version: String,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            tcp_connections: Family::default(),
            tcp_bytes: Family::default(),
            tcp_refused: Family::default(),
            tls_handshakes: Family::default(),
            authz_denials: Family::default(),
            cert_expiry: Gauge::default(),
            renewals: Family::default(),
            config_applied: Family::default(),
            config_version: Family::default(),
            config_stale: Gauge::default(),
            xds_connected: Gauge::default(),
            xds_nacks: Counter::default(),
            registry: Registry::default(),
        };
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
        registry.register("bulwark_config_stale", "1 while serving a config restored from disk", m.config_stale.clone());
        registry.register("bulwark_xds_connected", "1 while the discovery stream is up", m.xds_connected.clone());
        registry.register("bulwark_xds_nacks", "Config updates rejected (NACKed)", m.xds_nacks.clone());
        Self { registry, ..m }
    }
}

impl Metrics {
    pub fn refused(&self, direction: &'static str, reason: &'static str) {
        self.tcp_refused
            .get_or_create(&RefusedLabels { direction, reason })
            .inc();
    }

    /// Exactly one `bulwark_config_applied_version` sample: the current one.
    pub fn set_applied_version(&self, version: &str) {
        self.config_version.clear();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.config_version
            .get_or_create(&VersionLabel { version: version.to_string() })
            .set(now);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
