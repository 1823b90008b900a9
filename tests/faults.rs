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

fn faketime_available() -> bool {
    std::process::Command::new("faketime")
        .args(["-f", "+1m", "true"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Pods whose clocks are 2 minutes behind and 2 minutes ahead of the CA
/// still get certificates and complete mTLS handshakes both ways.
#[test]
fn clock_skew_of_two_minutes_between_pods_keeps_handshakes_working() {
    if !netns::available() {
        return;
    }
    assert!(
        faketime_available(),
        "faketime is needed (apt-get install faketime; .ci/run installs it)"
    );
    // Hour-long SVIDs: a 60-second certificate is already expired for a
    // node two minutes ahead, whatever the proxy does.
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    mesh.add_pod("web");
    let api = mesh.add_pod("api");
    mesh.write_config(&config(&api, ""));
    mesh.set_sidecar_wrapper(
        "web",
        &[
            "env",
            "FAKETIME_DONT_FAKE_MONOTONIC=1",
            "faketime",
            "-f",
            "-2m",
        ],
    );
    mesh.set_sidecar_wrapper(
        "api",
        &[
            "env",
            "FAKETIME_DONT_FAKE_MONOTONIC=1",
            "faketime",
            "-f",
            "+2m",
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
    let extra = "---\napiVersion: bulwark.dev/v1\nkind: Route\nmetadata:\n  name: api\n  namespace: default\nspec:\n  service: api\n  rules:\n    - timeout: 500ms\n---\napiVersion: bulwark.dev/v1\nkind: TrafficPolicy\nmetadata:\n  name: api\n  namespace: default\nspec:\n  service: api\n  circuitBreaker:\n    consecutiveFailures: 3\n    openDuration: 2s\n    halfOpenRequests: 1\n";
    mesh.write_config(&config(&api, extra));
    mesh.start_sidecar("web", "web", &[]);
    mesh.start_sidecar("api", "api", &[]);
    mesh.wait_ready("web");
    mesh.wait_ready("api");
    assert_eq!(get(&mesh, "web").0, 200);

    // Partition: api's interface goes down.
    mesh.net
        .exec_ok(&api.ns, &["ip", "link", "set", "eth0", "down"]);
    let mut codes = Vec::new();
    for _ in 0..8 {
        let (code, _, took) = get(&mesh, "web");
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
            .all(|(c, t)| *c == 503 && *t < Duration::from_millis(100)),
        "then the breaker fails fast: {codes:?}"
    );
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
