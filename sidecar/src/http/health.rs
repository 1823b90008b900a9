//! Active health checking: each client sidecar probes the endpoints of
//! services whose `TrafficPolicy` has a `healthCheck`, over the same pooled
//! mTLS connections, and takes failing endpoints out of its balancer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;

use super::empty;
use crate::Proxy;

/// Header marking a probe, so the callee's sidecar answers it even when
/// authorization would not let this caller reach the health path.
pub const PROBE_HEADER: &str = "x-bulwark-health-probe";

/// Runs forever: every tick, probes endpoints whose interval has passed.
pub async fn run(proxy: Arc<Proxy>) {
    let mut next_due: HashMap<(String, SocketAddr), Instant> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let Some(snap) = proxy.config.load() else {
            continue;
        };
        let now = Instant::now();
        for svc in &snap.resources.services {
            let key = format!(
                "{}/{}",
                if svc.namespace.is_empty() {
                    "default"
                } else {
                    &svc.namespace
                },
                svc.name
            );
            let Some(hc) = snap
                .policy(&key)
                .and_then(|p| p.health_check.clone())
                .filter(|h| !h.path.is_empty())
            else {
                continue;
            };
            let Some(port) = svc.ports.first().map(|p| p.port as u16) else {
                continue;
            };
            let interval = Duration::from_millis(hc.interval_ms.max(100));
            for up in snap.endpoints_of(&key, port, &[]) {
                let Some(identity) = up.identity.clone() else {
                    continue;
                };
                let due = next_due.entry((key.clone(), up.addr)).or_insert(now);
                if *due > now {
                    continue;
                }
                *due = now + interval;
                let (proxy, hc, key) = (proxy.clone(), hc.clone(), key.clone());
                tokio::spawn(async move {
                    let ok = probe(&proxy, up.addr, &identity, &hc).await;
                    let state = proxy.endpoints.get(up.addr);
                    if let Some(healthy) =
                        state.record_probe(ok, hc.unhealthy_threshold, hc.healthy_threshold)
                    {
                        tracing::info!(endpoint = %up.addr, service = %key, healthy, "endpoint health changed (active check)");
                    }
                });
            }
        }
        // Forget endpoints that left the config.
        next_due.retain(|_, due| now.duration_since(*due) < Duration::from_secs(600));
    }
}

async fn probe(
    proxy: &Proxy,
    addr: SocketAddr,
    identity: &bulwark_ca::SpiffeId,
    hc: &bulwark_proto::config::v1::HealthCheck,
) -> bool {
    let timeout = Duration::from_millis(hc.timeout_ms.max(50));
    let req = http::Request::get(format!("http://{addr}{}", hc.path))
        .version(http::Version::HTTP_2)
        .header(PROBE_HEADER, "1")
        .body(empty())
        .expect("valid probe request");
    let attempt = async {
        let mut sender = proxy.pool.get(proxy, addr, identity).await.ok()?;
        let resp = sender.send_request(req).await.ok()?;
        let ok = resp.status().is_success();
        let _ = resp.into_body().collect().await;
        Some(ok)
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}
