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
            let target = crate::config::target_port(p);
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};

    use bulwark_ca::SpiffeId;
    use bulwark_ca::tls::TrustBundle;
    use bulwark_proto::config::Resources;
    use bulwark_proto::config::v1;

    use super::*;
    use crate::identity::IdentityOptions;
    use crate::{Sidecar, SidecarOptions};

    const ME: &str = "spiffe://cluster.local/ns/default/sa/api";

    /// A local app whose `/healthz` answers with the status in `status`,
    /// counting the probes.
    struct App {
        port: u16,
        status: Arc<AtomicU16>,
        probes: Arc<AtomicUsize>,
    }

    async fn app() -> App {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let status = Arc::new(AtomicU16::new(200));
        let probes = Arc::new(AtomicUsize::new(0));
        let (s, p) = (status.clone(), probes.clone());
        tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                let (s, p) = (s.clone(), p.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        p.fetch_add(1, Ordering::SeqCst);
                        let code = s.load(Ordering::SeqCst);
                        async move {
                            let mut resp = http::Response::new(empty());
                            *resp.status_mut() = http::StatusCode::from_u16(code).unwrap();
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(c), svc)
                        .await;
                });
            }
        });
        App {
            port,
            status,
            probes,
        }
    }

    /// A sidecar (never started: its config and health only) for `ME`.
    fn proxy(dir: &std::path::Path) -> Arc<Proxy> {
        bulwark_ca::store::init(
            dir,
            &bulwark_ca::store::Settings::new("cluster.local"),
            bulwark_ca::store::RootSource::Generate,
        )
        .unwrap();
        let bundle = std::fs::read_to_string(dir.join("bundle.pem")).unwrap();
        let opts = SidecarOptions::new(IdentityOptions {
            identity: ME.parse().unwrap(),
            ca_addr: "127.0.0.1:1".into(),
            ca_bundle: TrustBundle::from_pem(&bundle).unwrap(),
            token_file: dir.join("no-token"),
            ttl: None,
            renew_fraction: 0.5,
        });
        Sidecar::new(opts).proxy
    }

    /// The config: service `api` served by `ME` on `port`, with a health
    /// check every `interval_ms` (none for 0).
    fn config(port: u16, interval_ms: u64) -> Resources {
        Resources {
            mesh: Some(v1::MeshConfig {
                trust_domain: "cluster.local".into(),
                ..Default::default()
            }),
            services: vec![v1::Service {
                name: "api".into(),
                namespace: "default".into(),
                ports: vec![v1::ServicePort {
                    port: u32::from(port),
                    protocol: v1::Protocol::Http as i32,
                    ..Default::default()
                }],
                identities: vec![ME.into()],
                ..Default::default()
            }],
            traffic_policies: (interval_ms > 0)
                .then(|| v1::TrafficPolicy {
                    name: "api".into(),
                    namespace: "default".into(),
                    service: "api".into(),
                    health_check: Some(HealthCheck {
                        path: "/healthz".into(),
                        interval_ms,
                        timeout_ms: 1000,
                        unhealthy_threshold: 2,
                        healthy_threshold: 1,
                    }),
                    ..Default::default()
                })
                .into_iter()
                .collect(),
            ..Default::default()
        }
    }

    fn apply(proxy: &Proxy, version: &str, res: Resources) {
        let me: SpiffeId = ME.parse().unwrap();
        proxy.config.apply(&me, version, res, false).unwrap();
    }

    /// Waits (up to 10 s) until `f` holds.
    async fn until(what: &str, f: impl FnMut() -> bool) {
        super::super::until(what, Duration::from_secs(10), f).await
    }

    #[tokio::test]
    async fn verdicts_follow_the_app_and_the_config_wakes_the_task() {
        let dir = tempfile::tempdir().unwrap();
        let proxy = proxy(dir.path());
        let app = app().await;
        // No health check configured: the task waits on the config alone.
        apply(&proxy, "1", config(app.port, 0));
        tokio::spawn(run(proxy.clone()));
        let health = proxy.health.subscribe();
        // A check every minute: the first probe is due at once.
        apply(&proxy, "2", config(app.port, 60_000));
        until("a first probe", || app.probes.load(Ordering::SeqCst) == 1).await;
        // Every 50 ms now: applies at once, not after the minute.
        apply(&proxy, "3", config(app.port, 50));
        until("probes at the new interval", || {
            app.probes.load(Ordering::SeqCst) >= 3
        })
        .await;
        app.status.store(503, Ordering::SeqCst);
        until("reported unhealthy", || *health.borrow()).await;
        app.status.store(200, Ordering::SeqCst);
        until("reported healthy again", || !*health.borrow()).await;
        // Unhealthy, then the check is removed: healthy at once, no probe.
        app.status.store(503, Ordering::SeqCst);
        until("reported unhealthy", || *health.borrow()).await;
        apply(&proxy, "4", config(app.port, 0));
        until("healthy without a check", || !*health.borrow()).await;
        let probes = app.probes.load(Ordering::SeqCst);
        // Ten former intervals: a check left scheduled would have probed.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(app.probes.load(Ordering::SeqCst), probes);
    }
}
