//! Active health checking, done where it is cheapest: each sidecar probes
//! its own app, at the pod address mesh traffic uses, for the services it serves whose
//! `TrafficPolicy` names a `healthCheck`, and reports the verdict on its
//! discovery stream; the control plane then withdraws (or restores) the
//! workload's endpoints in every client's pool. Passive outlier detection
//! in the clients works alongside it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_proto::config::v1::HealthCheck;
use http_body_util::BodyExt;

use super::empty;
use crate::Proxy;
use crate::config::Proto;

#[derive(Debug, Default)]
struct Check {
    next_due: Option<Instant>,
    /// Positive: consecutive successes; negative: consecutive failures.
    streak: i32,
    unhealthy: bool,
}

/// Runs forever: probes each local health-checked service at its interval
/// and publishes whether the workload is unhealthy on `proxy.health`.
pub async fn run(proxy: Arc<Proxy>) {
    let mut checks: HashMap<(String, u16), Check> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let Some(snap) = proxy.config.load() else {
            continue;
        };
        let now = Instant::now();
        let mut wanted = Vec::new();
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
            for p in &svc.ports {
                let target = if p.target_port == 0 {
                    p.port
                } else {
                    p.target_port
                } as u16;
                if snap.local_service(target) == Some(key.as_str()) {
                    wanted.push(((key.clone(), target), hc.clone()));
                }
            }
        }
        checks.retain(|k, _| wanted.iter().any(|(w, _)| w == k));
        for (k, hc) in wanted {
            let c = checks.entry(k.clone()).or_default();
            if c.next_due.is_some_and(|d| d > now) {
                continue;
            }
            c.next_due = Some(now + Duration::from_millis(hc.interval_ms.max(100)));
            let ok = probe(&proxy, k.1, snap.local_proto(k.1), &hc).await;
            c.streak = match (ok, c.streak) {
                (true, s) if s > 0 => s + 1,
                (true, _) => 1,
                (false, s) if s < 0 => s - 1,
                (false, _) => -1,
            };
            if !c.unhealthy && c.streak <= -(hc.unhealthy_threshold.max(1) as i32) {
                c.unhealthy = true;
                tracing::warn!(service = %k.0, port = k.1, path = %hc.path, "local app failed its health check: reporting unhealthy");
            } else if c.unhealthy && c.streak >= hc.healthy_threshold.max(1) as i32 {
                c.unhealthy = false;
                tracing::info!(service = %k.0, port = k.1, "local app healthy again");
            }
        }
        let unhealthy = checks.values().any(|c| c.unhealthy);
        proxy.health.send_if_modified(|v| {
            let changed = *v != unhealthy;
            *v = unhealthy;
            changed
        });
    }
}

async fn probe(proxy: &Proxy, port: u16, proto: Proto, hc: &HealthCheck) -> bool {
    let timeout = Duration::from_millis(hc.timeout_ms.max(50));
    let app = std::net::SocketAddr::new(proxy.app_host, port);
    let req = http::Request::get(format!("http://{app}{}", hc.path))
        .body(empty())
        .expect("valid probe request");
    let attempt = async {
        let resp = proxy.local.send(app, proto, req).await.ok()?;
        let ok = resp.status().is_success();
        let _ = resp.into_body().collect().await;
        Some(ok)
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}
