//! Active health checking, done where it is cheapest: each sidecar probes
//! its own app, at the pod address mesh traffic uses, for the services it serves whose
//! `TrafficPolicy` names a `healthCheck`, and reports the verdict on its
//! discovery stream; the control plane then withdraws (or restores) the
//! workload's endpoints in every client's pool. Passive outlier detection
//! in the clients works alongside it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bulwark_proto::config::v1::HealthCheck;
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::empty;
use crate::Proxy;
use crate::config::Proto;

#[derive(Debug, Default)]
struct Check {
    /// The check as last configured: a changed one is probed at once.
    config: Option<HealthCheck>,
    next_due: Option<Instant>,
    /// Positive: consecutive successes; negative: consecutive failures.
    streak: i32,
    unhealthy: bool,
}

/// A local service's port to probe, and how.
type Wanted = ((String, u16), HealthCheck);

/// Runs forever: probes each local health-checked service at its interval
/// and publishes whether the workload is unhealthy on `proxy.health`. It
/// wakes only when a probe is due or the config changes: with no health
/// check configured, never.
pub async fn run(proxy: Arc<Proxy>) {
    let mut applied = proxy.config.subscribe();
    let mut checks: HashMap<(String, u16), Check> = HashMap::new();
    loop {
        applied.borrow_and_update();
        let snap = proxy.config.load();
        let wanted = snap.as_deref().map(wanted).unwrap_or_default();
        checks.retain(|k, _| wanted.iter().any(|(w, _)| w == k));
        loop {
            if let Some(snap) = &snap {
                probe_due(&proxy, snap, &wanted, &mut checks).await;
            }
            let unhealthy = checks.values().any(|c| c.unhealthy);
            proxy.health.send_if_modified(|v| {
                let changed = *v != unhealthy;
                *v = unhealthy;
                changed
            });
            let next = checks.values().filter_map(|c| c.next_due).min();
            let due = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = applied.changed() => {
                    if r.is_err() {
                        // The config is gone with the proxy.
                        return;
                    }
                    break;
                }
                () = due => {}
            }
        }
    }
}

/// The health checks of the services this workload serves.
fn wanted(snap: &crate::config::Snapshot) -> Vec<Wanted> {
    let mut wanted = Vec::new();
    for svc in &snap.resources.services {
        let key = crate::config::service_key(&svc.namespace, &svc.name);
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
    wanted
}

/// Probes the checks that are due, and schedules their next probe.
async fn probe_due(
    proxy: &Proxy,
    snap: &crate::config::Snapshot,
    wanted: &[Wanted],
    checks: &mut HashMap<(String, u16), Check>,
) {
    let now = Instant::now();
    for (k, hc) in wanted {
        let c = checks.entry(k.clone()).or_default();
        if c.config.as_ref() != Some(hc) {
            // A new interval (or path) applies now, not after the old one.
            c.config = Some(hc.clone());
            c.next_due = None;
        }
        if c.next_due.is_some_and(|d| d > now) {
            continue;
        }
        c.next_due = Some(now + Duration::from_millis(hc.interval_ms.max(100)));
        let ok = probe(proxy, k.1, snap.local_proto(k.1), hc).await;
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
