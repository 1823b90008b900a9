//! The CA's Prometheus metrics and a minimal `/metrics` HTTP endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Histogram bucket bounds: `n` of them from `start`, each twice the last.
/// The same bounds as `exponential_buckets(start, 2.0, n)`, computed
/// exactly by doubling rather than with `powf`: the program calls no C
/// math function it could avoid (see `pow` in the `bulwark` program).
pub fn doubling_buckets(start: f64, n: usize) -> impl Iterator<Item = f64> {
    std::iter::successors(Some(start), |b| Some(b * 2.0)).take(n)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabel {
    pub auth: &'static str,
}

/// Metrics of the CA service. Names follow DESIGN §3.
pub struct CaMetrics {
    pub issued: Family<AuthLabel, Counter>,
    pub sign_errors: Family<ReasonLabel, Counter>,
    pub issuer_expiry: Gauge<i64, AtomicI64>,
    pub tls_handshake_failures: Counter,
    pub registry: Registry,
}

impl Default for CaMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let issued = Family::<AuthLabel, Counter>::default();
        let sign_errors = Family::<ReasonLabel, Counter>::default();
        let issuer_expiry = Gauge::<i64, AtomicI64>::default();
        let tls_handshake_failures = Counter::default();
        registry.register(
            "bulwark_ca_certificates_issued",
            "Certificates issued, by how the caller authenticated",
            issued.clone(),
        );
        registry.register(
            "bulwark_ca_sign_errors",
            "Signing requests refused, by reason",
            sign_errors.clone(),
        );
        registry.register(
            "bulwark_ca_issuer_expiry_timestamp_seconds",
            "notAfter of the signing intermediate, Unix seconds",
            issuer_expiry.clone(),
        );
        registry.register(
            "bulwark_ca_tls_handshake_failures",
            "TLS handshakes on the CA port that failed",
            tls_handshake_failures.clone(),
        );
        Self {
            issued,
            sign_errors,
            issuer_expiry,
            tls_handshake_failures,
            registry,
        }
    }
}

/// Serves `GET /metrics` (OpenMetrics text) on `addr` until the task is dropped.
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<CaMetrics>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "CA metrics listening");
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let m = metrics.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let m = m.clone();
                        async move {
                            let (status, body) = if req.uri().path() == "/metrics" {
                                let mut out = String::new();
                                match prometheus_client::encoding::text::encode(
                                    &mut out,
                                    &m.registry,
                                ) {
                                    Ok(()) => (200, out),
                                    Err(_) => (500, "encoding failed\n".to_string()),
                                }
                            } else {
                                (404, "not found\n".to_string())
                            };
                            hyper::Response::builder()
                                .status(status)
                                .header(
                                    "content-type",
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
                        }
                    },
                );
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    }))
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::histogram::exponential_buckets;

    #[test]
    fn doubling_buckets_are_exactly_the_exponential_ones() {
        for (start, n) in [(0.0001, 18), (0.0005, 16), (0.001, 17)] {
            let doubled: Vec<f64> = super::doubling_buckets(start, n).collect();
            let exponential: Vec<f64> = exponential_buckets(start, 2.0, n as u16).collect();
            assert_eq!(doubled, exponential);
        }
    }
}
