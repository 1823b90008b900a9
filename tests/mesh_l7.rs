//! The L7 data plane end to end in network namespaces: HTTP through two
//! sidecars on pooled HTTP/2 mTLS connections, canary routing, resilience.

mod common;
mod netns;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::wait_for;
use netns::Pod;
use netns::mesh::{Mesh, TD, metric_sum, spiffe};

const VIP: &str = "198.18.100.1";

/// `api` (HTTP, VIP 198.18.100.1:8080) served by `pods` with version labels;
/// an optional Route and TrafficPolicy; web (and db) may call it.
fn l7_config(pods: &[(&Pod, &str, &str)], route: &str, policy: &str) -> String {
    let eps: String = pods
        .iter()
        .map(|(p, sa, version)| format!("    - address: {}\n      identity: {}\n      labels:\n        version: {version}\n", p.ip, spiffe(sa)))
        .collect();
    format!(
        r#"apiVersion: bulwark.dev/v1
kind: MeshConfig
metadata:
  name: mesh
spec:
  trustDomain: {TD}
  mtls:
    mode: STRICT
  outboundPolicy: REGISTRY_ONLY
---
apiVersion: bulwark.dev/v1
kind: Service
metadata:
  name: api
  namespace: default
spec:
  ports:
    - port: 8080
      protocol: http
  identities:
    - {api}
  addresses:
    - {VIP}
---
apiVersion: bulwark.dev/v1
kind: ServiceEntry
metadata:
  name: api
  namespace: default
spec:
  location: MESH_INTERNAL
  ports:
    - port: 8080
      protocol: http
  endpoints:
{eps}---
apiVersion: bulwark.dev/v1
kind: AuthorizationPolicy
metadata:
  name: api-callers
  namespace: default
spec:
  service: api
  rules:
    - from:
        - {web}
    - from:
        - {db}
      paths:
        - prefix: /public
      methods:
        - GET
{route}{policy}"#,
        api = spiffe("api"),
        web = spiffe("web"),
        db = spiffe("db"),
    )
}

fn canary_route(v2_weight: u32) -> String {
    format!(
        r#"---
apiVersion: bulwark.dev/v1
kind: Route
metadata:
  name: api
  namespace: default
spec:
  service: api
  rules:
    - name: slow
      matches:
        - path:
            prefix: /slow
      timeout: 300ms
    - name: canary
      backends:
        - service: api
          subset:
            version: v1
          weight: {}
        - service: api
          subset:
            version: v2
          weight: {v2_weight}
      overrides:
        - header:
            name: x-canary
            exact: always
          backend:
            service: api
            subset:
              version: v2
"#,
        100 - v2_weight
    )
}

/// A mesh: web (client), db (another client) and api pods `api-v1`, `api-v2`.
fn start(route: &str, policy: &str, app_args: &[(&str, &[&str])]) -> Option<(Mesh, Vec<Pod>)> {
    let mut mesh = Mesh::start(&[])?;
    mesh.add_pod("web");
    mesh.add_pod("db");
    let v1 = mesh.add_pod("api-v1");
    let v2 = mesh.add_pod("api-v2");
    mesh.write_config(&l7_config(
        &[(&v1, "api", "v1"), (&v2, "api", "v2")],
        route,
        policy,
    ));
    mesh.start_sidecar("web", "web", &[]);
    mesh.start_sidecar("db", "db", &[]);
    for (pod, args) in app_args {
        mesh.set_app_args(pod, args);
    }
    mesh.start_sidecar("api-v1", "api", &[]);
    mesh.start_sidecar("api-v2", "api", &[]);
    for p in ["web", "db", "api-v1", "api-v2"] {
        mesh.wait_ready(p);
    }
    Some((mesh, vec![v1, v2]))
}

/// GET `path` from inside `pod` with a new connection each time; returns (status, body).
fn get(mesh: &Mesh, pod: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let ns = format!("/run/netns/{}", mesh.pod(pod).pod.ns);
    let target: SocketAddr = format!("{VIP}:8080").parse().unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: api.default\r\nConnection: close\r\n{}\r\n",
        headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect::<String>()
    );
    std::thread::spawn(move || {
        netns::enter(&ns);
        raw_http(target, &req)
    })
    .join()
    .unwrap()
}

fn raw_http(target: SocketAddr, req: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(3)) else {
        return (0, "connect failed".into());
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if s.write_all(req.as_bytes()).is_err() {
        return (0, "write failed".into());
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

/// Many requests from one pod on a thread inside it; counts bodies by the
/// serving app's name.
fn split(
    mesh: &Mesh,
    pod: &str,
    n: usize,
    headers: &'static [(&'static str, &'static str)],
) -> (usize, usize, usize) {
    let ns = format!("/run/netns/{}", mesh.pod(pod).pod.ns);
    let target: SocketAddr = format!("{VIP}:8080").parse().unwrap();
    std::thread::spawn(move || {
        netns::enter(&ns);
        let (mut v1, mut v2, mut bad) = (0, 0, 0);
        let req = format!(
            "GET / HTTP/1.1\r\nHost: api.default\r\nConnection: close\r\n{}\r\n",
            headers
                .iter()
                .map(|(k, v)| format!("{k}: {v}\r\n"))
                .collect::<String>()
        );
        for _ in 0..n {
            let (code, body) = raw_http(target, &req);
            match (
                code,
                body.contains("api-v1 GET"),
                body.contains("api-v2 GET"),
            ) {
                (200, true, _) => v1 += 1,
                (200, _, true) => v2 += 1,
                _ => bad += 1,
            }
        }
        (v1, v2, bad)
    })
    .join()
    .unwrap()
}

#[test]
fn http_rides_pooled_h2_mtls_with_the_callers_identity_and_no_handshake_per_connection() {
    let Some((mesh, _)) = start(&canary_route(0), "", &[]) else {
        return;
    };
    let (code, body) = get(&mesh, "web", "/hello", &[]);
    assert_eq!(code, 200, "{body}\n{}", mesh.sidecar_log("web"));
    assert!(body.contains("api-v1 GET /hello"), "{body}");
    // The app sees the caller's verified identity, set by its sidecar.
    assert!(
        body.contains(&format!("caller={}", spiffe("web"))),
        "{body}"
    );
    // A spoofed identity header from the client is replaced.
    let (_, body) = get(
        &mesh,
        "web",
        "/hello",
        &[(
            "x-bulwark-peer-identity",
            "spiffe://cluster.local/ns/kube-system/sa/admin",
        )],
    );
    assert!(
        body.contains(&format!("caller={}", spiffe("web"))),
        "{body}"
    );
    for _ in 0..30 {
        assert_eq!(get(&mesh, "web", "/", &[]).0, 200);
    }
    let m = mesh.metrics("web");
    let handshakes = metric_sum(
        &m,
        "bulwark_tls_handshakes_total",
        &["direction=\"outbound\"", "result=\"ok\""],
    );
    assert!(
        handshakes <= 2.0,
        "32 new app connections must reuse pooled mTLS connections: {handshakes} handshakes\n{m}"
    );
    assert!(
        metric_sum(
            &m,
            "bulwark_requests_total",
            &["direction=\"outbound\"", "code=\"200\"", "route=\"canary\""]
        ) >= 32.0,
        "{m}"
    );
    let m = mesh.metrics("api-v1");
    assert!(
        metric_sum(
            &m,
            "bulwark_requests_total",
            &[
                "direction=\"inbound\"",
                &format!("src_identity=\"{}\"", spiffe("web"))
            ]
        ) >= 32.0,
        "{m}"
    );
    // promtool-style sanity: histogram buckets present.
    assert!(m.contains("bulwark_request_duration_seconds_bucket"), "{m}");
}

#[test]
fn canary_split_follows_weights_live_and_the_header_override_wins() {
    let Some((mesh, pods)) = start(&canary_route(10), "", &[]) else {
        return;
    };
    let (v1, v2, bad) = split(&mesh, "web", 2000, &[]);
    assert_eq!(bad, 0);
    let share = v2 as f64 / 2000.0;
    println!("canary 90/10: v1={v1} v2={v2} share={share:.3}");
    assert!((0.07..=0.13).contains(&share), "v2 share {share}");
    let (_, v2o, bad) = split(&mesh, "web", 50, &[("x-canary", "always")]);
    assert_eq!((v2o, bad), (50, 0), "override sends everything to v2");
    // Change the weight in the config: the running sidecars follow.
    mesh.write_config(&l7_config(
        &[(&pods[0], "api", "v1"), (&pods[1], "api", "v2")],
        &canary_route(50),
        "",
    ));
    wait_for("the new split", Duration::from_secs(15), || {
        let (_, v2, _) = split(&mesh, "web", 200, &[]);
        (60..=140).contains(&v2).then_some(())
    });
}

#[test]
fn per_route_timeout_authz_and_rate_limit_answer_with_clear_statuses() {
    let policy = "---
apiVersion: bulwark.dev/v1
kind: TrafficPolicy
metadata:
  name: api
  namespace: default
spec:
  service: api
  rateLimit:
    requestsPerSecond: 5
    burst: 5
";
    let Some((mesh, _)) = start(
        &canary_route(0),
        policy,
        &[("api-v1", &["--latency", "2s"][..])],
    ) else {
        return;
    };
    // /slow has a 300 ms route timeout; api-v1 takes 2 s.
    let t0 = Instant::now();
    let (code, body) = get(&mesh, "web", "/slow", &[]);
    assert_eq!(code, 504, "{body}");
    assert!(body.contains("x-bulwark-reason: timeout"), "{body}");
    assert!(t0.elapsed() < Duration::from_millis(1500));
    // db may only GET /public/*.
    let (code, body) = get(&mesh, "db", "/private", &[]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("rbac-denied"), "{body}");
    assert!(
        metric_sum(
            &mesh.metrics("api-v1"),
            "bulwark_authz_denials_total",
            &[&format!("src_identity=\"{}\"", spiffe("db"))]
        ) >= 1.0
    );
    // Rate limit at api: 5/s with a burst of 5 (the slow requests count too).
    let mut limited = 0;
    let mut retry_after = false;
    for _ in 0..12 {
        let (code, body) = get(&mesh, "web", "/x", &[("x-canary", "always")]);
        if code == 429 {
            limited += 1;
            retry_after |= body.to_ascii_lowercase().contains("retry-after:");
        }
    }
    assert!(limited >= 3, "{limited} of 12 limited");
    assert!(retry_after, "429 carries Retry-After");
}
