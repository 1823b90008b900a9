//! Faults between pods: clock skew and a network partition, with traffic.

mod common;
mod netns;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::wait_for;
use netns::Pod;
use netns::mesh::{Mesh, metric_sum, spiffe};

const VIP: &str = "198.18.100.1";

fn config(api: &Pod, extra: &str) -> String {
    netns::mesh::http_api_config(api, extra)
}

fn get(mesh: &Mesh, pod: &str) -> (u16, String, Duration) {
    let ns = format!("/run/netns/{}", mesh.pod(pod).pod.ns);
    std::thread::spawn(move || {
        netns::enter(&ns);
        let t = Instant::now();
        let target: SocketAddr = format!("{VIP}:8080").parse().unwrap();
        let r = netns::http_get(target, "/").unwrap_or_default();
        let code = r
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, r, t.elapsed())
    })
    .join()
    .unwrap()
}

/// libfaketime, preloaded directly: the `faketime` wrapper keeps a named
/// semaphore per process in /dev/shm that a killed process leaves behind,
/// and a later process with the same pid then fails to start.
fn libfaketime() -> Option<String> {
    let dirs = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("faketime"))
        .chain([std::path::PathBuf::from("/usr/lib/faketime")]);
    dirs.map(|d| d.join("libfaketimeMT.so.1"))
        .find(|p| p.exists())
        .map(|p| p.display().to_string())
}

/// Pods whose clocks are 2 minutes behind and 2 minutes ahead of the CA
/// still get certificates and complete mTLS handshakes both ways.
#[test]
fn clock_skew_of_two_minutes_between_pods_keeps_handshakes_working() {
    if !netns::available() {
        return;
    }
    assert!(
        libfaketime().is_some(),
        "libfaketime is needed (apt-get install faketime; .ci/run installs it)"
    );
    // Hour-long SVIDs: a 60-second certificate is already expired for a
    // node two minutes ahead, whatever the proxy does.
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    mesh.add_pod("web");
    let api = mesh.add_pod("api");
    mesh.write_config(&config(&api, ""));
    let preload = format!("LD_PRELOAD={}", libfaketime().unwrap());
    mesh.set_sidecar_wrapper(
        "web",
        &[
            "env",
            "FAKETIME_DONT_FAKE_MONOTONIC=1",
            "FAKETIME=-2m",
            &preload,
        ],
    );
    mesh.set_sidecar_wrapper(
        "api",
        &[
            "env",
            "FAKETIME_DONT_FAKE_MONOTONIC=1",
            "FAKETIME=+2m",
            &preload,
        ],
    );
    let args: [&str; 0] = [];
    mesh.start_sidecar("web", "web", &args);
    mesh.start_sidecar("api", "api", &args);
    mesh.wait_ready("web");
    mesh.wait_ready("api");
    let (code, body, _) = get(&mesh, "web");
    assert_eq!(code, 200, "{body}\n{}", mesh.sidecar_log("web"));
    assert!(
        body.contains(&format!("caller={}", spiffe("web"))),
        "{body}"
    );
    // The skew is real: each sidecar stamps the applied config with its own clock.
    let real = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for (p, skew) in [("web", -120.0), ("api", 120.0)] {
        let stamped = metric_sum(&mesh.metrics(p), "bulwark_config_applied_version", &[]);
        let off = stamped - real;
        assert!(
            (off - skew).abs() < 60.0,
            "{p}'s clock is {off:.0} s off the host's, expected about {skew} s"
        );
    }
    // Both sides can also prove themselves to the CA again (renewal over mTLS).
    for p in ["web", "api"] {
        assert!(
            metric_sum(
                &mesh.metrics(p),
                "bulwark_cert_renewals_total",
                &["result=\"ok\""]
            ) >= 1.0
        );
    }
    // A new connection per request: every one needs a fresh handshake... over the pool it
    // may reuse; count new handshakes on the inbound side instead.
    for _ in 0..20 {
        assert_eq!(get(&mesh, "web").0, 200);
    }
    for p in ["web", "api"] {
        let m = mesh.metrics(p);
        assert_eq!(
            metric_sum(&m, "bulwark_tls_handshakes_total", &["result=\"error\""]),
            0.0,
            "{p}: {m}"
        );
    }
}

/// A link cut between two pods: requests time out (504), the breaker opens
/// (fast 503), and traffic recovers once the link is back.
#[test]
fn network_partition_times_out_opens_the_breaker_and_recovers() {
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    mesh.add_pod("web");
    let api = mesh.add_pod("api");
    let extra = "---\napiVersion: bulwark.dev/v1\nkind: Route\nmetadata:\n  name: api\n  namespace: default\nspec:\n  service: api\n  rules:\n    - timeout: 500ms\n---\napiVersion: bulwark.dev/v1\nkind: TrafficPolicy\nmetadata:\n  name: api\n  namespace: default\nspec:\n  service: api\n  circuitBreaker:\n    consecutiveFailures: 3\n    openDuration: 5s\n    halfOpenRequests: 1\n";
    mesh.write_config(&config(&api, extra));
    mesh.start_sidecar("web", "web", &[]);
    mesh.start_sidecar("api", "api", &[]);
    mesh.wait_ready("web");
    mesh.wait_ready("api");
    assert_eq!(get(&mesh, "web").0, 200);

    // Partition: api's interface goes down.
    mesh.net
        .exec_ok(&api.ns, &["ip", "link", "set", "eth0", "down"]);
    // The breaker stays open for 5 s: the five requests after the three
    // timeouts all meet it open, however slowly this machine runs them.
    let mut codes = Vec::new();
    let mut open_reason = true;
    for i in 0..8 {
        let (code, text, took) = get(&mesh, "web");
        if i >= 3 {
            open_reason &= text.contains("x-bulwark-reason: breaker-open");
        }
        codes.push((code, took));
    }
    println!("during the partition: {codes:?}");
    assert!(
        codes
            .iter()
            .take(3)
            .all(|(c, t)| *c == 504 && *t < Duration::from_millis(1500)),
        "timeouts first: {codes:?}"
    );
    assert!(
        codes
            .iter()
            .skip(3)
            .all(|(c, t)| *c == 503 && *t < Duration::from_millis(300)),
        "then the breaker fails fast, well within the 500 ms timeout: {codes:?}"
    );
    assert!(open_reason, "the fast 503s say breaker-open");
    assert_eq!(
        metric_sum(
            &mesh.metrics("web"),
            "bulwark_breaker_state",
            &["service=\"default/api\""]
        ),
        1.0
    );

    // Heal: traffic returns after the open interval and a successful probe.
    mesh.net
        .exec_ok(&api.ns, &["ip", "link", "set", "eth0", "up"]);
    mesh.net.exec_ok(
        &api.ns,
        &["ip", "route", "replace", "default", "via", "198.18.0.1"],
    );
    let healed = Instant::now();
    wait_for("traffic to recover", Duration::from_secs(30), || {
        (get(&mesh, "web").0 == 200).then_some(())
    });
    println!("recovered {:?} after the link came back", healed.elapsed());
    for _ in 0..10 {
        assert_eq!(get(&mesh, "web").0, 200);
    }
}

/// One GET through web's sidecar per call, on a fresh connection: (ok, took).
fn load_until(
    ns: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<(Instant, bool, Duration)> {
    netns::enter(&ns);
    let target: SocketAddr = format!("{VIP}:8080").parse().unwrap();
    let mut out = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let t = Instant::now();
        let ok = netns::http_get(target, "/")
            .is_some_and(|r| r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200"));
        out.push((t, ok, t.elapsed()));
    }
    out
}

/// Three endpoints, idempotent GETs with retries; one pod is killed
/// (app and sidecar, SIGKILL) mid-traffic: retries and outlier ejection
/// keep success at 99.9% or better.
#[test]
fn upstream_pod_killed_mid_traffic_loses_no_more_than_one_request_in_a_thousand() {
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    mesh.add_pod("web");
    let pods: Vec<Pod> = ["api-1", "api-2", "api-3"]
        .iter()
        .map(|p| mesh.add_pod(p))
        .collect();
    // The first endpoint comes from the shared config; two more follow it.
    let more: String = pods[1..]
        .iter()
        .map(|p| {
            format!(
                "    - address: {}\n      identity: {}\n",
                p.ip,
                spiffe("api")
            )
        })
        .collect();
    let extra = format!(
        "{more}---\napiVersion: bulwark.dev/v1\nkind: Route\nmetadata:\n  name: api\n  namespace: default\nspec:\n  service: api\n  rules:\n    - timeout: 2s\n      retry:\n        attempts: 3\n        perTryTimeout: 500ms\n        retryOn: [gateway-error, connect-failure, reset]\n---\napiVersion: bulwark.dev/v1\nkind: TrafficPolicy\nmetadata:\n  name: api\n  namespace: default\nspec:\n  service: api\n  outlierDetection:\n    consecutive5xx: 2\n    interval: 1s\n    baseEjectionTime: 30s\n    maxEjectionPercent: 50\n"
    );
    mesh.write_config(&config(&pods[0], &extra));
    mesh.start_sidecar("web", "web", &[]);
    for p in &pods {
        mesh.start_sidecar(&p.name, "api", &[]);
    }
    for p in ["web", "api-1", "api-2", "api-3"] {
        mesh.wait_ready(p);
    }
    // Every endpoint serves before the fault.
    let mut seen = std::collections::HashSet::new();
    wait_for(
        "all three endpoints to serve",
        Duration::from_secs(10),
        || {
            let (code, body, _) = get(&mesh, "web");
            if code == 200
                && let Some(name) = body
                    .lines()
                    .find_map(|l| l.split(' ').find(|w| w.starts_with("api-")))
            {
                seen.insert(name.to_string());
            }
            (seen.len() == 3).then_some(())
        },
    );
    let retries0 = metric_sum(&mesh.metrics("web"), "bulwark_retries_total", &[]);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ns = format!("/run/netns/{}", mesh.pod("web").pod.ns);
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (ns, stop) = (ns.clone(), stop.clone());
            std::thread::spawn(move || load_until(ns, stop))
        })
        .collect();
    // Traffic flows, then api-2 dies: app and sidecar, SIGKILL.
    wait_for("traffic before the fault", Duration::from_secs(10), || {
        (metric_sum(&mesh.metrics("web"), "bulwark_requests_total", &[]) >= 200.0).then_some(())
    });
    let killed = Instant::now();
    for i in [
        mesh.pod("api-2").sidecar.unwrap(),
        mesh.pod("api-2").app.unwrap(),
    ] {
        mesh.net.proc_mut(i).kill();
    }
    // Keep going until well after the fault: 600 more requests, at least 3 s.
    let before = metric_sum(&mesh.metrics("web"), "bulwark_requests_total", &[]);
    wait_for("traffic after the fault", Duration::from_secs(30), || {
        let n = metric_sum(&mesh.metrics("web"), "bulwark_requests_total", &[]);
        (n >= before + 600.0 && killed.elapsed() >= Duration::from_secs(3)).then_some(())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results: Vec<_> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();

    let sent = results.len();
    let failed = results.iter().filter(|r| !r.1).count();
    let retries = metric_sum(&mesh.metrics("web"), "bulwark_retries_total", &[]) - retries0;
    // Recovered: the last request after the kill that failed or took more
    // than 250 ms (a retry or a timeout), measured from the kill.
    let recovered = results
        .iter()
        .filter(|(t, ok, took)| *t + *took > killed && (!ok || *took > Duration::from_millis(250)))
        .map(|(t, _, took)| (*t + *took).duration_since(killed))
        .max()
        .unwrap_or_default();
    let after = results.iter().filter(|(t, _, _)| *t >= killed).count();
    let slowest = results
        .iter()
        .filter(|(t, _, _)| *t >= killed)
        .map(|r| r.2)
        .max()
        .unwrap_or_default();
    println!("slowest request after the kill: {slowest:?}");
    println!(
        "| upstream pod killed (SIGKILL app+sidecar), 3 endpoints, retries | success >= 99.9% | sent {sent} ({after} after the kill), failed {failed}, retries {retries}, recovered {recovered:?} |"
    );
    assert!(after >= 600, "enough traffic after the kill: {after}");
    assert!(
        (failed as f64) <= sent as f64 * 0.001,
        "{failed} of {sent} failed\n{}",
        mesh.sidecar_log("web")
    );
    assert!(retries >= 1.0, "the kill was noticed and retried");
}
