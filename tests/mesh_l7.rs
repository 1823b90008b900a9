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

/// Latency and split measurements: one test at a time on two cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

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
      backends:
        - service: api
          subset:
            version: v1
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
        - header:
            name: x-canary
            exact: v3
          backend:
            service: api
            subset:
              version: v3
"#,
        100 - v2_weight
    )
}

/// A mesh: web (client), db (another client) and api pods `api-v1`, `api-v2`.
fn start(route: &str, policy: &str, app_args: &[(&str, &[&str])]) -> Option<(Mesh, Vec<Pod>)> {
    start_with(|pods| l7_config(pods, route, policy), app_args, &[])
}

/// [`start`] without the `api-callers` AuthorizationPolicy: any caller, any path.
fn start_open(route: &str) -> Option<(Mesh, Vec<Pod>)> {
    start_with(
        |pods| {
            l7_config(pods, route, "")
                .split("---\n")
                .filter(|doc| !doc.contains("name: api-callers"))
                .collect::<Vec<_>>()
                .join("---\n")
        },
        &[],
        &[],
    )
}

/// `api_args`: more flags for the two api sidecars.
fn start_with(
    config: impl FnOnce(&[(&Pod, &str, &str)]) -> String,
    app_args: &[(&str, &[&str])],
    api_args: &[&str],
) -> Option<(Mesh, Vec<Pod>)> {
    let mut mesh = Mesh::start(&[])?;
    mesh.add_pod("web");
    mesh.add_pod("db");
    let v1 = mesh.add_pod("api-v1");
    let v2 = mesh.add_pod("api-v2");
    let config = config(&[(&v1, "api", "v1"), (&v2, "api", "v2")]);
    assert!(config.contains("kind: Service"), "{config}");
    mesh.write_config(&config);
    mesh.start_sidecar("web", "web", &[]);
    mesh.start_sidecar("db", "db", &[]);
    for (pod, args) in app_args {
        mesh.set_app_args(pod, args);
    }
    mesh.start_sidecar("api-v1", "api", api_args);
    mesh.start_sidecar("api-v2", "api", api_args);
    for p in ["web", "db", "api-v1", "api-v2"] {
        mesh.wait_ready(p);
    }
    Some((mesh, vec![v1, v2]))
}

/// GET `path` from inside `pod` with a new connection each time; returns (status, body).
fn get(mesh: &Mesh, pod: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: api.default\r\nConnection: close\r\n{}\r\n",
        headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect::<String>()
    );
    raw_http_from(mesh, pod, &format!("{VIP}:8080"), &req)
}

/// [`raw_http`] from inside `pod`.
fn raw_http_from(mesh: &Mesh, pod: &str, target: &str, req: &str) -> (u16, String) {
    let ns = format!("/run/netns/{}", mesh.pod(pod).pod.ns);
    let (target, req): (SocketAddr, String) = (target.parse().unwrap(), req.to_string());
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
    let _serial = serial();
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
    let _serial = serial();
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
    // A subset no workload serves: a fast 503 that says why.
    let (code, text) = get(&mesh, "web", "/", &[("x-canary", "v3")]);
    assert_eq!(code, 503, "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("x-bulwark-reason: no-healthy-endpoint"),
        "{text}"
    );
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
    let _serial = serial();
    let policy = "---
apiVersion: bulwark.dev/v1
kind: TrafficPolicy
metadata:
  name: api
  namespace: default
spec:
  service: api
  rateLimit:
    requestsPerSecond: 1
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
    assert!(body.contains("authz-denied"), "{body}");
    assert!(
        metric_sum(
            &mesh.metrics("api-v1"),
            "bulwark_authz_denials_total",
            &[&format!("src_identity=\"{}\"", spiffe("db"))]
        ) >= 1.0
    );
    // Rate limit at api: 1/s with a burst of 5 (the slow requests count
    // too). Twelve requests within 4 s, which even a loaded machine
    // manages, leave at least three refused.
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

/// A Route for `api` whose rules `search` and `public` carry rate limits
/// (sent to api-v1 only, so one sidecar enforces them) and whose last rule
/// has none.
fn limited_route() -> String {
    r#"---
apiVersion: bulwark.dev/v1
kind: Route
metadata:
  name: api
  namespace: default
spec:
  service: api
  rules:
    - name: search
      matches:
        - path:
            prefix: /search
      backends:
        - service: api
          subset:
            version: v1
      rateLimit:
        requestsPerSecond: 1
        burst: 2
    - name: public
      matches:
        - path:
            prefix: /public
      backends:
        - service: api
          subset:
            version: v1
      rateLimit:
        requestsPerSecond: 1
        burst: 3
        perSourceIdentity: true
    - name: rest
      backends:
        - service: api
          subset:
            version: v1
"#
    .to_string()
}

/// The value of header `name` in a raw HTTP/1.1 response.
fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let head = response.split("\r\n\r\n").next()?;
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn route_rate_limit_refuses_one_route_with_ratelimit_headers_and_spares_the_others() {
    let _serial = serial();
    // No AuthorizationPolicy looks at paths here: the limited routes alone
    // make the path matter.
    let Some((mesh, _)) = start_open(&limited_route()) else {
        return;
    };
    // 1/s with a burst of 2 on /search: of 12 quick requests most are refused.
    let started = Instant::now();
    let search: Vec<(u16, String)> = (0..12)
        .map(|_| get(&mesh, "web", "/search?q=x", &[]))
        .collect();
    let refill = started.elapsed().as_secs() + 1;
    let refused: Vec<&String> = search.iter().filter(|r| r.0 == 429).map(|r| &r.1).collect();
    let ok = search.iter().filter(|r| r.0 == 200).count();
    assert_eq!(ok + refused.len(), 12, "only 200 or 429: {search:?}");
    assert!(
        ok as u64 <= 2 + refill && refused.len() >= 4,
        "{ok} allowed, {} refused",
        refused.len()
    );
    let r = refused[0];
    assert_eq!(header(r, "x-bulwark-reason"), Some("rate-limited"), "{r}");
    assert_eq!(header(r, "ratelimit-limit"), Some("2"), "{r}");
    assert_eq!(header(r, "ratelimit-remaining"), Some("0"), "{r}");
    let reset: u64 = header(r, "ratelimit-reset").unwrap().parse().unwrap();
    assert!((1..=2).contains(&reset), "{r}");
    assert_eq!(header(r, "retry-after"), Some("1"), "{r}");
    // Another route of the same service, same caller, same moment: no limit.
    for _ in 0..12 {
        let (code, body) = get(&mesh, "web", "/other", &[]);
        assert_eq!(code, 200, "{body}");
    }
    // Other spellings of /search, which the app reads as /search, are no
    // way past its limit: they are refused as non-canonical.
    for path in ["//search", "/./search", "/x/../search", "/%73earch"] {
        let (code, body) = get(&mesh, "web", path, &[]);
        assert_eq!(code, 400, "{path}: {body}");
        assert_eq!(
            header(&body, "x-bulwark-reason"),
            Some("non-canonical-path"),
            "{body}"
        );
    }
    assert_eq!(
        metric_sum(
            &mesh.metrics("api-v1"),
            "bulwark_ratelimit_rejections_total",
            &["service=\"default/api\""]
        ),
        refused.len() as f64
    );
    // The bucket refills: after the advertised wait, /search answers again.
    wait_for(
        "the /search bucket to refill",
        Duration::from_secs(5),
        || (get(&mesh, "web", "/search", &[]).0 == 200).then_some(()),
    );
}

#[test]
fn per_source_identity_rate_limit_refuses_the_noisy_caller_only() {
    let _serial = serial();
    let Some((mesh, _)) = start(&limited_route(), "", &[]) else {
        return;
    };
    // web floods /public (1/s, burst 3 per caller); db calls it now and then.
    let (mut web_refused, mut db_codes) = (0, Vec::new());
    let t = Instant::now();
    for i in 0..15 {
        if get(&mesh, "web", "/public/x", &[]).0 == 429 {
            web_refused += 1;
        }
        if i % 5 == 4 {
            db_codes.push(get(&mesh, "db", "/public/x", &[]).0);
        }
    }
    // Of 15, at most the burst plus one per second elapsed (and one for
    // the second under way) get through.
    let least = 15usize.saturating_sub(3 + t.elapsed().as_secs() as usize + 1);
    assert!(
        web_refused >= least.max(1),
        "web was refused {web_refused} of 15 times (at least {least})"
    );
    assert_eq!(db_codes, [200, 200, 200], "db has its own bucket");
}

/// A service `name` at `vip` (HTTP :8080) served by `pods` (identity = name).
fn service_doc(name: &str, vip: &str, pods: &[&Pod], extra: &str) -> String {
    let eps: String = pods
        .iter()
        .map(|p| {
            format!(
                "    - address: {}\n      identity: {}\n",
                p.ip,
                spiffe(name)
            )
        })
        .collect();
    format!(
        "---\napiVersion: bulwark.dev/v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  ports:\n    - port: 8080\n      protocol: http\n  identities:\n    - {id}\n  addresses:\n    - {vip}\n---\napiVersion: bulwark.dev/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  location: MESH_INTERNAL\n  ports:\n    - port: 8080\n      protocol: http\n  endpoints:\n{eps}{extra}",
        id = spiffe(name)
    )
}

const MESH: &str = "apiVersion: bulwark.dev/v1\nkind: MeshConfig\nmetadata:\n  name: mesh\nspec:\n  trustDomain: cluster.local\n  mtls:\n    mode: STRICT\n  outboundPolicy: REGISTRY_ONLY\n";

/// Requests to `vip` from inside `pod`, `n` times on one thread; returns
/// (status, latency) of each.
fn hammer(
    mesh: &Mesh,
    pod: &str,
    vip: &str,
    path: &str,
    n: usize,
    pace: Duration,
) -> Vec<(u16, Duration)> {
    let ns = format!("/run/netns/{}", mesh.pod(pod).pod.ns);
    let target: SocketAddr = format!("{vip}:8080").parse().unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    std::thread::spawn(move || {
        netns::enter(&ns);
        (0..n)
            .map(|_| {
                let t = Instant::now();
                let (code, _) = raw_http(target, &req);
                let d = t.elapsed();
                std::thread::sleep(pace); // pacing the load, not synchronization
                (code, d)
            })
            .collect()
    })
    .join()
    .unwrap()
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

/// Local refusals (bulkhead, concurrency limit) are answered at once: the
/// 90th percentile under 200 ms and none over 1 s.
fn assert_fast(mut v: Vec<Duration>, what: &str) {
    assert!(!v.is_empty(), "no {what}");
    v.sort();
    let (p90, max) = (v[v.len() * 9 / 10], v[v.len() - 1]);
    assert!(
        p90 < Duration::from_millis(200) && max < Duration::from_secs(1),
        "{what} are not fast: p90 {p90:?}, max {max:?} of {}",
        v.len()
    );
}

#[test]
fn bulkhead_rejects_fast_and_isolates_a_slow_service_from_a_fast_one() {
    let _serial = serial();
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    mesh.add_pod("web");
    let slow = mesh.add_pod("slow");
    let fast = mesh.add_pod("fast");
    let policy = "---\napiVersion: bulwark.dev/v1\nkind: TrafficPolicy\nmetadata:\n  name: slow\n  namespace: default\nspec:\n  service: slow\n  bulkhead:\n    maxRequests: 4\n    maxPending: 2\n";
    let authz = "---\napiVersion: bulwark.dev/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: any\n  namespace: default\nspec:\n  service: slow\n  rules:\n    - from:\n        - spiffe://cluster.local/ns/default/sa/*\n";
    let cfg = format!(
        "{MESH}{}{}{policy}{authz}",
        service_doc("slow", "198.18.100.2", &[&slow], ""),
        service_doc("fast", "198.18.100.3", &[&fast], "")
    );
    mesh.write_config(&cfg);
    mesh.start_sidecar("web", "web", &[]);
    mesh.set_app_args("slow", &["--latency", "2s"]);
    mesh.start_sidecar("slow", "slow", &[]);
    mesh.start_sidecar("fast", "fast", &[]);
    for p in ["web", "slow", "fast"] {
        mesh.wait_ready(p);
    }
    let warm = hammer(
        &mesh,
        "web",
        "198.18.100.3",
        "/",
        50,
        Duration::from_millis(5),
    );
    assert!(warm.iter().all(|(c, _)| *c == 200));
    // p99 of the fast service, as the median of three runs: one stray
    // scheduling hiccup on a 2-core machine must not decide the verdict.
    let fast_p99 = |mesh: &Mesh| {
        let mut runs: Vec<Duration> = (0..3)
            .map(|_| {
                let r = hammer(
                    mesh,
                    "web",
                    "198.18.100.3",
                    "/",
                    150,
                    Duration::from_millis(5),
                );
                assert!(
                    r.iter().all(|(c, _)| *c == 200),
                    "every request to the fast service is served: {:?}",
                    r.iter().filter(|(c, _)| *c != 200).collect::<Vec<_>>()
                );
                p99(r.into_iter().map(|r| r.1).collect())
            })
            .collect();
        runs.sort();
        runs[1]
    };
    let unloaded = fast_p99(&mesh);

    // Saturate `slow` from the same pod: 8 clients for 4 slots + 2 queued.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let ns = format!("/run/netns/{}", mesh.pod("web").pod.ns);
        let stop = stop.clone();
        clients.push(std::thread::spawn(move || {
            netns::enter(&ns);
            let target: SocketAddr = "198.18.100.2:8080".parse().unwrap();
            let mut out = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let (code, body) = raw_http(
                    target,
                    "GET / HTTP/1.1\r\nHost: slow\r\nConnection: close\r\n\r\n",
                );
                out.push((code, t.elapsed(), body.contains("bulkhead-full")));
                std::thread::sleep(Duration::from_millis(100)); // pacing
            }
            out
        }));
    }
    wait_for("the bulkhead to reject", Duration::from_secs(10), || {
        (metric_sum(
            &mesh.metrics("web"),
            "bulwark_bulkhead_rejections_total",
            &[],
        ) >= 4.0)
            .then_some(())
    });
    let loaded = fast_p99(&mesh);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results: Vec<(u16, Duration, bool)> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    let rejected: Vec<_> = results.iter().filter(|r| r.2).collect();
    let served = results.iter().filter(|r| r.0 == 200).count();
    println!(
        "fast p99 unloaded={unloaded:?} while slow is saturated={loaded:?}; slow: {served} served, {} rejected",
        rejected.len()
    );
    assert!(!rejected.is_empty());
    assert!(rejected.iter().all(|r| r.0 == 503), "rejections are 503s");
    // A rejection that waited for a slot would take the slow service's 2 s.
    // The bar is on the 90th percentile and the worst is allowed 1 s: one
    // scheduling stall of this loaded machine must not decide the verdict.
    assert_fast(
        rejected.iter().map(|r| r.1).collect(),
        "bulkhead rejections",
    );
    assert!(served >= 4, "the bulkhead still admits up to its limit");
    // A shared bulkhead would show as 503s above or as waits on the slow
    // service's 2 s slots. The eight saturating clients also compete for
    // this machine's two CPUs, which adds milliseconds to every request;
    // that is scheduling, not a lack of isolation, hence the 25 ms floor.
    let bar = (unloaded * 2).max(unloaded + Duration::from_millis(25));
    assert!(
        loaded <= bar,
        "fast service p99 {loaded:?} vs unloaded {unloaded:?} (bar {bar:?})"
    );
}

/// An endpoint that drops connection attempts (a dead node) holds up only
/// the requests to it: the sidecar's other services are served while its
/// connect hangs.
#[test]
fn a_connect_hanging_on_one_endpoint_does_not_hold_up_other_services() {
    let _serial = serial();
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    mesh.add_pod("web");
    let dead = mesh.add_pod("dead");
    let fast = mesh.add_pod("fast");
    mesh.write_config(&format!(
        "{MESH}{}{}",
        service_doc("dead", "198.18.100.2", &[&dead], ""),
        service_doc("fast", "198.18.100.3", &[&fast], "")
    ));
    for (p, sa) in [("web", "web"), ("dead", "dead"), ("fast", "fast")] {
        mesh.start_sidecar(p, sa, &[]);
    }
    for p in ["web", "dead", "fast"] {
        mesh.wait_ready(p);
    }
    // `dead` drops every SYN from now on; web never reached it before, so
    // its sidecar must connect and hangs there (up to its 5 s timeout).
    mesh.net.exec_ok(
        &dead.ns,
        &[
            "iptables", "-w", "-I", "INPUT", "-i", "eth0", "-p", "tcp", "-j", "DROP",
        ],
    );
    let ns = format!("/run/netns/{}", mesh.pod("web").pod.ns);
    let hung = std::thread::spawn(move || {
        netns::enter(&ns);
        raw_http(
            "198.18.100.2:8080".parse().unwrap(),
            "GET / HTTP/1.1\r\nHost: dead\r\nConnection: close\r\n\r\n",
        )
    });
    let web_ns = mesh.pod("web").pod.ns.clone();
    let dead_ip = dead.ip.to_string();
    wait_for(
        "web's sidecar to be connecting to dead",
        Duration::from_secs(10),
        || {
            let out = mesh.net.exec(&web_ns, &["ss", "-Htn", "state", "syn-sent"]);
            String::from_utf8_lossy(&out.stdout)
                .contains(&dead_ip)
                .then_some(())
        },
    );
    let t = Instant::now();
    let (code, text) = raw_http_from(
        &mesh,
        "web",
        "198.18.100.3:8080",
        "GET / HTTP/1.1\r\nHost: fast\r\nConnection: close\r\n\r\n",
    );
    let took = t.elapsed();
    let (dead_code, _) = hung.join().unwrap();
    println!("fast answered {code} in {took:?} while dead's connect hung; dead: {dead_code}");
    assert_eq!(code, 200, "{text}");
    assert_eq!(dead_code, 503, "the hung connect ends in a clear 503");
    // Held up, it would wait out the 5 s connect timeout.
    assert!(took < Duration::from_secs(2), "fast took {took:?}");
}

#[test]
fn breaker_caps_attempts_on_a_failing_upstream_and_closes_after_recovery() {
    let _serial = serial();
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    mesh.add_pod("web");
    let bad = mesh.add_pod("bad");
    let policy = "---\napiVersion: bulwark.dev/v1\nkind: TrafficPolicy\nmetadata:\n  name: bad\n  namespace: default\nspec:\n  service: bad\n  circuitBreaker:\n    consecutiveFailures: 5\n    openDuration: 5s\n    halfOpenRequests: 1\n";
    // Open for 5 s: the 40 requests and the checks after them meet the
    // breaker open (at most one half-open probe) however slowly this
    // machine runs them.
    mesh.write_config(&format!(
        "{MESH}{}{policy}",
        service_doc("bad", "198.18.100.4", &[&bad], "")
    ));
    mesh.start_sidecar("web", "web", &[]);
    mesh.set_app_args("bad", &["--error-rate", "1.0"]);
    mesh.start_sidecar("bad", "bad", &[]);
    mesh.wait_ready("web");
    mesh.wait_ready("bad");
    let r = hammer(
        &mesh,
        "web",
        "198.18.100.4",
        "/",
        40,
        Duration::from_millis(2),
    );
    assert!(r.iter().all(|(c, _)| *c == 503));
    let attempts = metric_sum(
        &mesh.metrics("bad"),
        "bulwark_requests_total",
        &["direction=\"inbound\""],
    );
    println!("upstream attempts for 40 requests: {attempts}");
    assert!(
        attempts <= 6.0,
        "at most the configured 5 failures (+1 probe) reach the upstream, got {attempts}"
    );
    let m = mesh.metrics("web");
    assert_eq!(
        metric_sum(&m, "bulwark_breaker_state", &["service=\"default/bad\""]),
        1.0,
        "open\n{m}"
    );
    let (code, text) = raw_http_from(
        &mesh,
        "web",
        "198.18.100.4:8080",
        "GET / HTTP/1.1\r\nHost: bad\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(code, 503);
    assert!(
        text.to_ascii_lowercase()
            .contains("x-bulwark-reason: breaker-open"),
        "{text}"
    );
    // The upstream recovers: traffic returns within the open interval (+ a probe).
    let i = mesh.pod("bad").app.unwrap();
    mesh.net.proc_mut(i).kill();
    let ns = mesh.pod("bad").pod.ns.clone();
    mesh.net.spawn_bulwark(
        &ns,
        "bad-app-2",
        &["demo-app", "--listen", "0.0.0.0:8080", "--name", "bad"],
    );
    let recovered = Instant::now();
    wait_for("traffic to return", Duration::from_secs(20), || {
        (hammer(&mesh, "web", "198.18.100.4", "/", 1, Duration::ZERO)[0].0 == 200).then_some(())
    });
    assert!(
        recovered.elapsed() < Duration::from_secs(8),
        "closed within open interval + probe: {:?}",
        recovered.elapsed()
    );
    assert_eq!(
        metric_sum(
            &mesh.metrics("web"),
            "bulwark_breaker_state",
            &["service=\"default/bad\""]
        ),
        0.0
    );
}

#[test]
fn retries_respect_the_budget_and_outlier_ejection_keeps_success_high() {
    let _serial = serial();
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    mesh.add_pod("web");
    let a = mesh.add_pod("a");
    let b = mesh.add_pod("b");
    let c = mesh.add_pod("c");
    let dead = mesh.add_pod("dead");
    let route = |svc: &str, attempts: u32, ratio: &str| {
        format!(
            "---\napiVersion: bulwark.dev/v1\nkind: Route\nmetadata:\n  name: {svc}\n  namespace: default\nspec:\n  service: {svc}\n  rules:\n    - retry:\n        attempts: {attempts}\n        retryOn:\n          - 5xx\n        backoffBase: 1ms\n        backoffMax: 5ms\n        budgetRatio: {ratio}\n        budgetMinPerSecond: 1\n"
        )
    };
    let outlier = "---\napiVersion: bulwark.dev/v1\nkind: TrafficPolicy\nmetadata:\n  name: trio\n  namespace: default\nspec:\n  service: trio\n  outlierDetection:\n    consecutive5xx: 3\n    interval: 1s\n    baseEjectionTime: 30s\n    maxEjectionPercent: 50\n";
    let cfg = format!(
        "{MESH}{}{}{}{}{outlier}",
        service_doc("trio", "198.18.100.5", &[&a, &b, &c], ""),
        route("trio", 2, "0.5"),
        service_doc("dead", "198.18.100.6", &[&dead], ""),
        route("dead", 3, "0.2"),
    );
    mesh.write_config(&cfg);
    mesh.start_sidecar("web", "web", &[]);
    mesh.set_app_args("c", &["--error-rate", "1.0"]);
    mesh.set_app_args("dead", &["--error-rate", "1.0"]);
    for (p, sa) in [
        ("a", "trio"),
        ("b", "trio"),
        ("c", "trio"),
        ("dead", "dead"),
    ] {
        mesh.start_sidecar(p, sa, &[]);
    }
    for p in ["web", "a", "b", "c", "dead"] {
        mesh.wait_ready(p);
    }
    // Outlier: one bad endpoint of three.
    let r = hammer(&mesh, "web", "198.18.100.5", "/", 1000, Duration::ZERO);
    let ok = r.iter().filter(|(c, _)| *c == 200).count();
    println!("one bad endpoint of three: {ok}/1000 succeeded");
    assert!(ok as f64 / 1000.0 >= 0.999, "{ok}/1000");
    assert!(metric_sum(&mesh.metrics("web"), "bulwark_outlier_ejections_total", &[]) >= 1.0);
    // Retry budget: an upstream failing 100% gets at most (1 + ratio) x requests + floor.
    let n = 200.0;
    let t = Instant::now();
    let r = hammer(&mesh, "web", "198.18.100.6", "/", 200, Duration::ZERO);
    // The floor is granted afresh in each 10 s window the requests span.
    let windows = (t.elapsed().as_secs() / 10 + 1) as f64;
    assert!(r.iter().all(|(c, _)| *c == 503));
    let attempts = metric_sum(
        &mesh.metrics("dead"),
        "bulwark_requests_total",
        &["direction=\"inbound\""],
    );
    let bound = (1.0 + 0.2) * n + 10.0 * windows;
    println!("retry budget: {attempts} upstream attempts for {n} requests (bound {bound})");
    assert!(attempts <= bound, "{attempts} > {bound}");
    assert!(attempts > n, "some retries happened");
}

/// By default, an app's idle keep-alive connection is parked by
/// its sidecar (counted in `bulwark_http_parked_connections`), served
/// again each time the app writes, can still be upgraded, and leaves the
/// gauge when it closes.
#[test]
fn an_idle_keep_alive_connection_is_parked_and_served_again() {
    use std::io::{BufRead, BufReader, Read, Write};
    let _serial = serial();
    let Some((mesh, _)) = start(&canary_route(0), "", &[]) else {
        return;
    };
    let ns = format!("/run/netns/{}", mesh.pod("web").pod.ns);
    let target: SocketAddr = format!("{VIP}:8080").parse().unwrap();
    // A socket made inside the pod stays in its namespace.
    let mut s = std::thread::spawn(move || {
        netns::enter(&ns);
        std::net::TcpStream::connect_timeout(&target, Duration::from_secs(3)).unwrap()
    })
    .join()
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let parked = || metric_sum(&mesh.metrics("web"), "bulwark_http_parked_connections", &[]);
    for i in 0..3 {
        write!(s, "GET /{i} HTTP/1.1\r\nHost: api.default\r\n\r\n").unwrap();
        let (status, _) = common::read_response(&mut r);
        assert!(status.contains(" 200 "), "request {i}: {status}");
        wait_for(
            "the idle connection to be parked",
            Duration::from_secs(5),
            || (parked() == 1.0).then_some(()),
        );
    }
    // An upgrade on the parked connection: the socket is handed to the
    // tunnel, and bytes flow both ways through the mesh.
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .unwrap();
    let mut head = String::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        head.push_str(&line);
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(b"ping through the mesh").unwrap();
    let mut buf = [0u8; 21];
    r.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping through the mesh");
    drop((s, r));
    wait_for(
        "the closed connection to leave the gauge",
        Duration::from_secs(5),
        || (parked() == 0.0).then_some(()),
    );
}

#[test]
fn websocket_style_upgrade_passes_through_the_mesh() {
    use std::io::{Read, Write};
    let _serial = serial();
    let Some((mesh, _)) = start(&canary_route(0), "", &[]) else {
        return;
    };
    let mut s = upgraded(&mesh, "web");
    s.write_all(b"ping through the mesh").unwrap();
    let mut buf = [0u8; 21];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping through the mesh");
    // The spliced bytes are counted by the server sidecar once it closes.
    drop(s);
    wait_for(
        "the spliced bytes to be counted",
        Duration::from_secs(5),
        || {
            let m = mesh.metrics("api-v1");
            let flow = |f: &str| {
                metric_sum(
                    &m,
                    "bulwark_tcp_bytes_total",
                    &["direction=\"inbound\"", &format!("flow=\"{f}\"")],
                )
            };
            (flow("sent") >= 21.0 && flow("received") >= 21.0).then_some(())
        },
    );
}

/// Opens a WebSocket-style upgrade from `pod` to the api VIP; the stream
/// once the app's 101 has arrived.
fn upgraded(mesh: &Mesh, pod: &str) -> std::net::TcpStream {
    let ns = format!("/run/netns/{}", mesh.pod(pod).pod.ns);
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        netns::enter(&ns);
        let mut s = std::net::TcpStream::connect(format!("{VIP}:8080")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /chat HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).unwrap() == 0 {
                break;
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        s
    })
    .join()
    .unwrap()
}

/// A spliced upgrade is one of the server sidecar's connections for as
/// long as it lasts: it holds its slot (and would end with the peer's
/// certificate), instead of living on outside `--max-connections`.
#[test]
fn an_upgraded_connection_holds_its_inbound_slot_until_it_closes() {
    let _serial = serial();
    let Some((mesh, _)) = start_with(
        |pods| l7_config(pods, &canary_route(0), ""),
        &[],
        &["--max-connections", "2"],
    ) else {
        return;
    };
    let tunnels = [upgraded(&mesh, "web"), upgraded(&mesh, "web")];
    let refused = || {
        metric_sum(
            &mesh.metrics("api-v1"),
            "bulwark_tcp_refused_total",
            &["direction=\"inbound\""],
        )
    };
    // Both of api-v1's slots are held: web's next connection is refused.
    let (code, body) = get(&mesh, "web", "/", &[]);
    assert_ne!(
        code, 200,
        "a third connection got past a limit of 2: {body}"
    );
    assert!(refused() >= 1.0);
    // The tunnels close: their slots come back.
    drop(tunnels);
    wait_for("a slot to come back", Duration::from_secs(5), || {
        (get(&mesh, "web", "/", &[]).0 == 200).then_some(())
    });
}

mod grpc_app {
    use std::pin::Pin;

    use bulwark_proto::ca::v1::certificate_service_server::CertificateService;
    use bulwark_proto::ca::v1::{SignRequest, SignResponse};
    use bulwark_proto::xds::v1::discovery_service_server::DiscoveryService;
    use bulwark_proto::xds::v1::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
    use tonic::{Request, Response, Status, Streaming};

    /// A gRPC app for the test: answers each streamed message, then ends
    /// the stream with RESOURCE_EXHAUSTED and a message (trailers).
    pub struct Echo;

    #[tonic::async_trait]
    impl DiscoveryService for Echo {
        type DeltaStreamStream = Pin<
            Box<dyn tokio_stream::Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>,
        >;

        async fn delta_stream(
            &self,
            req: Request<Streaming<DeltaDiscoveryRequest>>,
        ) -> Result<Response<Self::DeltaStreamStream>, Status> {
            let caller = req
                .metadata()
                .get("x-bulwark-peer-identity")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string();
            let mut inbound = req.into_inner();
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            tokio::spawn(async move {
                for _ in 0..3 {
                    let Ok(Some(m)) = inbound.message().await else {
                        return;
                    };
                    let resp = DeltaDiscoveryResponse {
                        nonce: m.type_url,
                        system_version_info: caller.clone(),
                        ..Default::default()
                    };
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
                let _ = tx
                    .send(Err(Status::resource_exhausted("enough for today")))
                    .await;
            });
            Ok(Response::new(Box::pin(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            )))
        }
    }

    /// A unary gRPC app for the test: answers UNAVAILABLE (trailers-only,
    /// as servers do when they cannot take a call) until `failures` calls
    /// have failed, then answers with the number of calls it saw.
    pub struct Flaky {
        pub failures: u32,
        pub calls: std::sync::Arc<std::sync::atomic::AtomicU32>,
    }

    #[tonic::async_trait]
    impl CertificateService for Flaky {
        async fn sign(&self, req: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
            let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            if n <= self.failures {
                return Err(Status::unavailable("warming up"));
            }
            Ok(Response::new(SignResponse {
                serial: n.to_string(),
                cert_chain_pem: req.into_inner().csr_pem,
                ..Default::default()
            }))
        }
    }
}

/// A mesh with `web` and a gRPC service `grpc` (198.18.100.7:9000) served
/// by pod `api`, whose app `app` runs inside it; `extra` is more config.
fn grpc_mesh(extra: &str, app: tonic::transport::server::Router) -> Option<Mesh> {
    let mut mesh = Mesh::start(&[])?;
    mesh.add_pod("web");
    let api = mesh.add_pod("api");
    let cfg = format!(
        "{MESH}---\napiVersion: bulwark.dev/v1\nkind: Service\nmetadata:\n  name: grpc\n  namespace: default\nspec:\n  ports:\n    - port: 9000\n      protocol: grpc\n  identities:\n    - {id}\n  addresses:\n    - 198.18.100.7\n---\napiVersion: bulwark.dev/v1\nkind: ServiceEntry\nmetadata:\n  name: grpc\n  namespace: default\nspec:\n  location: MESH_INTERNAL\n  ports:\n    - port: 9000\n      protocol: grpc\n  endpoints:\n    - address: {ip}\n      identity: {id}\n{extra}",
        id = spiffe("api"),
        ip = api.ip
    );
    mesh.write_config(&cfg);
    mesh.start_sidecar("web", "web", &[]);
    mesh.start_sidecar("api", "api", &[]);
    mesh.wait_ready("web");
    mesh.wait_ready("api");
    let api_ns = format!("/run/netns/{}", api.ns);
    // Listening before the first call: the client's connection is taken by
    // its sidecar whether the app is up or not, so a call made too early
    // would get the sidecar's 503 instead of the app.
    let (listening, up) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        netns::enter(&api_ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let incoming =
                tonic::transport::server::TcpIncoming::bind("0.0.0.0:9000".parse().unwrap())
                    .unwrap();
            listening.send(()).unwrap();
            app.serve_with_incoming(incoming).await.unwrap();
        });
    });
    up.recv_timeout(Duration::from_secs(10))
        .expect("the gRPC app never listened");
    Some(mesh)
}

/// Runs `call` inside `pod` with a channel to the `grpc` service.
fn grpc_call<T, F>(
    mesh: &Mesh,
    pod: &str,
    call: impl FnOnce(tonic::transport::Channel) -> F + Send + 'static,
) -> T
where
    T: Send + 'static,
    F: std::future::Future<Output = T>,
{
    let ns = format!("/run/netns/{}", mesh.pod(pod).pod.ns);
    std::thread::spawn(move || {
        netns::enter(&ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(10);
            let ch = loop {
                match tonic::transport::Endpoint::from_static("http://198.18.100.7:9000")
                    .connect()
                    .await
                {
                    Ok(c) => break c,
                    // The app is starting.
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                    Err(e) => panic!("gRPC channel: {e}"),
                }
            };
            call(ch).await
        })
    })
    .join()
    .unwrap()
}

#[test]
fn grpc_bidirectional_streaming_keeps_messages_trailers_and_status() {
    let _serial = serial();
    let app = tonic::transport::Server::builder().add_service(
        bulwark_proto::xds::v1::discovery_service_server::DiscoveryServiceServer::new(
            grpc_app::Echo,
        ),
    );
    let Some(mesh) = grpc_mesh("", app) else {
        return;
    };
    type Client = bulwark_proto::xds::v1::discovery_service_client::DiscoveryServiceClient<
        tonic::transport::Channel,
    >;
    let request = |t: &str| bulwark_proto::xds::v1::DeltaDiscoveryRequest {
        type_url: t.to_string(),
        ..Default::default()
    };
    // All messages sent at once, then the replies read.
    let reqs: Vec<_> = ["one", "two", "three"].iter().map(|t| request(t)).collect();
    let (replies, status) = grpc_call(&mesh, "web", move |ch| async move {
        let mut stream = Client::new(ch)
            .delta_stream(tokio_stream::iter(reqs))
            .await
            .unwrap()
            .into_inner();
        let mut replies = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(m)) => replies.push((m.nonce, m.system_version_info)),
                Ok(None) => return (replies, None),
                Err(s) => return (replies, Some((s.code(), s.message().to_string()))),
            }
        }
    });
    let names: Vec<&str> = replies.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(names, ["one", "two", "three"]);
    assert!(
        replies.iter().all(|r| r.1 == spiffe("web")),
        "the app saw the caller's identity: {replies:?}"
    );
    assert_eq!(
        status,
        Some((
            tonic::Code::ResourceExhausted,
            "enough for today".to_string()
        ))
    );
    // Ping-pong: each message waits for the previous reply, so the request
    // body stays open between messages (a proxy that waited for its end
    // before forwarding would hang here).
    let pongs = grpc_call(&mesh, "web", move |ch| async move {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut stream = Client::new(ch)
            .delta_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut pongs = Vec::new();
        for t in ["ping-1", "ping-2", "ping-3"] {
            tx.send(request(t)).await.unwrap();
            let reply = tokio::time::timeout(Duration::from_secs(5), stream.message())
                .await
                .unwrap_or_else(|_| panic!("no reply to {t} within 5 s"));
            pongs.push(reply.unwrap().unwrap().nonce);
        }
        let end = stream.message().await;
        (pongs, end.err().map(|s| s.code()))
    });
    assert_eq!(
        pongs,
        (
            vec!["ping-1".to_string(), "ping-2".into(), "ping-3".into()],
            Some(tonic::Code::ResourceExhausted)
        )
    );
}

#[test]
fn grpc_unary_call_answered_unavailable_succeeds_through_retries() {
    let _serial = serial();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let app = tonic::transport::Server::builder().add_service(
        bulwark_proto::ca::v1::certificate_service_server::CertificateServiceServer::new(
            grpc_app::Flaky {
                failures: 2,
                calls: calls.clone(),
            },
        ),
    );
    let route = "---\napiVersion: bulwark.dev/v1\nkind: Route\nmetadata:\n  name: grpc\n  namespace: default\nspec:\n  service: grpc\n  rules:\n    - retry:\n        attempts: 3\n        retryOn: [unavailable]\n        backoffBase: 5ms\n        backoffMax: 20ms\n";
    let Some(mesh) = grpc_mesh(route, app) else {
        return;
    };
    let csr = "a request body the retries must replay".repeat(50);
    let sent = csr.clone();
    let answer = grpc_call(&mesh, "web", move |ch| async move {
        bulwark_proto::ca::v1::certificate_service_client::CertificateServiceClient::new(ch)
            .sign(bulwark_proto::ca::v1::SignRequest {
                csr_pem: sent,
                requested_ttl_seconds: 0,
            })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| (s.code(), s.message().to_string()))
    });
    let answer = answer.expect("the third attempt succeeds");
    assert_eq!(answer.serial, "3", "two UNAVAILABLE answers, then success");
    assert_eq!(answer.cert_chain_pem, csr, "the body was replayed intact");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(
        metric_sum(
            &mesh.metrics("web"),
            "bulwark_retries_total",
            &["service=\"default/grpc\""]
        ),
        2.0
    );
}

#[test]
fn curl_http2_prior_knowledge_and_http1_both_work_through_the_mesh() {
    let _serial = serial();
    let Some((mesh, _)) = start(&canary_route(0), "", &[]) else {
        return;
    };
    let ns = mesh.pod("web").pod.ns.clone();
    for flag in ["--http1.1", "--http2-prior-knowledge"] {
        let out = mesh.net.exec(
            &ns,
            &[
                "curl",
                "-sS",
                "--max-time",
                "10",
                flag,
                "-o",
                "-",
                "-w",
                "\n%{http_version}",
                &format!("http://{VIP}:8080/h"),
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{flag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("api-v1 GET /h"), "{flag}: {text}");
        let version = text.lines().last().unwrap();
        assert_eq!(version, if flag == "--http1.1" { "1.1" } else { "2" });
    }
    let m = mesh.metrics("web");
    assert!(
        metric_sum(
            &m,
            "bulwark_requests_total",
            &["direction=\"outbound\"", "code=\"200\""]
        ) >= 2.0,
        "{m}"
    );
}

#[test]
fn h2load_multiplexed_load_through_the_mesh_succeeds() {
    let _serial = serial();
    let Some((mesh, _)) = start(&canary_route(10), "", &[]) else {
        return;
    };
    let ns = mesh.pod("web").pod.ns.clone();
    let out = mesh.net.exec(
        &ns,
        &[
            "h2load",
            "-n",
            "2000",
            "-c",
            "4",
            "-m",
            "16",
            &format!("http://{VIP}:8080/"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("2000 succeeded, 0 failed, 0 errored"),
        "{text}"
    );
    assert!(text.contains("status codes: 2000 2xx"), "{text}");
}

#[test]
fn admin_shows_clusters_and_changes_the_log_filter_at_run_time() {
    let _serial = serial();
    let Some((mesh, pods)) = start(&canary_route(10), "", &[]) else {
        return;
    };
    let ns = mesh.pod("web").pod.ns.clone();
    assert_eq!(get(&mesh, "web", "/", &[]).0, 200);
    let clusters: serde_json::Value = serde_json::from_str(
        &mesh
            .net
            .exec_ok(&ns, &["curl", "-s", "http://127.0.0.1:15000/clusters"]),
    )
    .unwrap();
    let api = clusters["default/api"]["endpoints"].as_array().unwrap();
    assert_eq!(api.len(), 2, "{clusters}");
    for p in &pods {
        assert!(
            api.iter()
                .any(|e| e["address"] == format!("{}:8080", p.ip) && e["available"] == true),
            "{clusters}"
        );
    }
    let show = mesh
        .net
        .exec_ok(&ns, &["curl", "-s", "http://127.0.0.1:15000/logging"]);
    assert!(show.contains("log filter: info"), "{show}");
    let set = mesh.net.exec_ok(
        &ns,
        &[
            "curl",
            "-s",
            "-X",
            "POST",
            "http://127.0.0.1:15000/logging?filter=debug",
        ],
    );
    assert!(set.contains("log filter: debug"), "{set}");
    let bad = mesh.net.exec(
        &ns,
        &[
            "curl",
            "-s",
            "-f",
            "-X",
            "POST",
            "http://127.0.0.1:15000/logging?filter=%5B",
        ],
    );
    assert!(!bad.status.success(), "an invalid filter is refused");
    // The admin port is loopback-only: not reachable from another pod.
    let other = mesh.net.exec(
        &mesh.pod("db").pod.ns,
        &[
            "curl",
            "-s",
            "--max-time",
            "3",
            &format!("http://{}:15000/config_dump", mesh.pod("web").pod.ip),
        ],
    );
    assert!(!other.status.success());
}

#[test]
fn inbound_decisions_land_in_a_verifiable_audit_log() {
    let _serial = serial();
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    mesh.add_pod("web");
    mesh.add_pod("db");
    let v1 = mesh.add_pod("api-v1");
    let v2 = mesh.add_pod("api-v2");
    mesh.write_config(&l7_config(
        &[(&v1, "api", "v1"), (&v2, "api", "v2")],
        &canary_route(0),
        "",
    ));
    let key = mesh.net.dir.join("audit.key");
    std::fs::write(
        &key,
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
    )
    .unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let audit_dir = mesh.net.dir.join("audit");
    let (k, d) = (
        key.to_str().unwrap().to_string(),
        audit_dir.to_str().unwrap().to_string(),
    );
    mesh.start_sidecar("web", "web", &[]);
    mesh.start_sidecar("db", "db", &[]);
    mesh.start_sidecar(
        "api-v1",
        "api",
        &["--audit-dir", &d, "--audit-key-file", &k],
    );
    mesh.start_sidecar("api-v2", "api", &[]);
    for p in ["web", "db", "api-v1", "api-v2"] {
        mesh.wait_ready(p);
    }
    assert_eq!(get(&mesh, "web", "/orders", &[]).0, 200);
    assert_eq!(get(&mesh, "db", "/private", &[]).0, 403);
    // SIGTERM flushes the log.
    let i = mesh.pod("api-v1").sidecar.unwrap();
    mesh.net.proc_mut(i).terminate(Duration::from_secs(10));
    let files: Vec<String> = std::fs::read_dir(&audit_dir)
        .unwrap()
        .map(|e| e.unwrap().path().to_str().unwrap().to_string())
        .collect();
    let text: String = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let allow = lines
        .iter()
        .find(|l| l["decision"] == "allow" && l["path"] == "/orders")
        .expect("allowed request audited");
    assert_eq!(allow["source_identity"], spiffe("web"));
    assert_eq!(allow["policy"], "AuthorizationPolicy default/api-callers");
    let deny = lines
        .iter()
        .find(|l| l["decision"] == "deny")
        .expect("denied request audited");
    assert_eq!(deny["source_identity"], spiffe("db"));
    assert_eq!(deny["path"], "/private");
    let mut args = vec!["audit", "verify", "--key-file", &k];
    args.extend(files.iter().map(String::as_str));
    let out = common::run_ok(&args);
    assert!(out.starts_with("ok: "), "{out}");
}

#[test]
fn round_robin_alternates_and_max_connections_caps_tcp_to_a_service() {
    let _serial = serial();
    let policy = "---\napiVersion: bulwark.dev/v1\nkind: TrafficPolicy\nmetadata:\n  name: api\n  namespace: default\nspec:\n  service: api\n  lb: ROUND_ROBIN\n";
    let Some((mut mesh, _)) = start("", policy, &[]) else {
        return;
    };
    let (v1, v2, bad) = split(&mesh, "web", 20, &[]);
    assert_eq!((v1, v2, bad), (10, 10, 0), "round robin over two endpoints");

    // An opaque TCP service limited to 2 concurrent connections.
    let echo = mesh.add_pod("echo");
    let cfg = format!(
        "{MESH}---\napiVersion: bulwark.dev/v1\nkind: Service\nmetadata:\n  name: echo\n  namespace: default\nspec:\n  ports:\n    - port: 8080\n      protocol: tcp\n  identities:\n    - {id}\n  addresses:\n    - 198.18.100.9\n---\napiVersion: bulwark.dev/v1\nkind: ServiceEntry\nmetadata:\n  name: echo\n  namespace: default\nspec:\n  location: MESH_INTERNAL\n  ports:\n    - port: 8080\n      protocol: tcp\n  endpoints:\n    - address: {ip}\n      identity: {id}\n---\napiVersion: bulwark.dev/v1\nkind: TrafficPolicy\nmetadata:\n  name: echo\n  namespace: default\nspec:\n  service: echo\n  bulkhead:\n    maxConnections: 2\n    maxRequests: 10\n    maxPending: 1\n",
        id = spiffe("echo"),
        ip = echo.ip
    );
    mesh.write_config(&cfg);
    mesh.set_app_args("echo", &["--tcp-echo"]);
    mesh.start_sidecar("echo", "echo", &[]);
    mesh.wait_ready("echo");
    wait_for(
        "web to learn the echo service",
        Duration::from_secs(10),
        || {
            (metric_sum(
                &mesh.metrics("web"),
                "bulwark_config_updates_total",
                &["result=\"applied\""],
            ) >= 2.0)
                .then_some(())
        },
    );
    let ns = format!("/run/netns/{}", mesh.pod("web").pod.ns);
    let answers = std::thread::spawn(move || {
        use std::io::{BufRead, BufReader, Write};
        netns::enter(&ns);
        let conns: Vec<std::net::TcpStream> = (0..3)
            .map(|_| std::net::TcpStream::connect("198.18.100.9:8080").unwrap())
            .collect();
        conns
            .into_iter()
            .map(|mut c| {
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = c.write_all(b"ping\n");
                let mut line = String::new();
                let _ = BufReader::new(&c).read_line(&mut line);
                !line.is_empty()
            })
            .collect::<Vec<bool>>()
    })
    .join()
    .unwrap();
    assert_eq!(
        answers.iter().filter(|a| **a).count(),
        2,
        "two served, the third concurrent one refused: {answers:?}"
    );
    assert!(
        metric_sum(
            &mesh.metrics("web"),
            "bulwark_tcp_refused_total",
            &["reason=\"bulkhead_full\""]
        ) >= 1.0
    );
}

#[test]
fn adaptive_concurrency_sheds_load_when_upstream_latency_rises_and_keeps_admitted_latency_bounded()
{
    let _serial = serial();
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    mesh.add_pod("web");
    let busy = mesh.add_pod("busy");
    // Two requests at a time, 40 ms each: beyond two in flight, requests
    // queue in the app and latency grows with the load.
    const INITIAL: f64 = 12.0;
    let policy = "---\napiVersion: bulwark.dev/v1\nkind: TrafficPolicy\nmetadata:\n  name: busy\n  namespace: default\nspec:\n  service: busy\n  adaptiveConcurrency:\n    minLimit: 1\n    maxLimit: 40\n    initialLimit: 12\n    latencyTolerance: 2.0\n    sampleWindow: 200ms\n";
    let authz = "---\napiVersion: bulwark.dev/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: any\n  namespace: default\nspec:\n  service: busy\n  rules:\n    - from:\n        - spiffe://cluster.local/ns/default/sa/*\n";
    let cfg = format!(
        "{MESH}{}{policy}{authz}",
        service_doc("busy", "198.18.100.4", &[&busy], "")
    );
    mesh.write_config(&cfg);
    mesh.start_sidecar("web", "web", &[]);
    mesh.set_app_args("busy", &["--latency", "40ms", "--capacity", "2"]);
    mesh.start_sidecar("busy", "busy", &[]);
    for p in ["web", "busy"] {
        mesh.wait_ready(p);
    }
    let limit = |mesh: &Mesh| {
        metric_sum(
            &mesh.metrics("web"),
            "bulwark_adaptive_concurrency_limit",
            &["service=\"default/busy\""],
        )
    };

    // Light load first: one request at a time shows the unqueued latency.
    let light = hammer(&mesh, "web", "198.18.100.4", "/", 30, Duration::ZERO);
    assert!(light.iter().all(|(c, _)| *c == 200), "{light:?}");
    let mut light: Vec<Duration> = light.into_iter().map(|r| r.1).collect();
    light.sort();
    let unloaded = light[light.len() / 2];
    assert_eq!(limit(&mesh), INITIAL, "the gauge starts at initialLimit");

    // Then 24 clients at once: unlimited, each request would wait for 11
    // others in the app (~480 ms).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let adapted = std::sync::Arc::new(std::sync::Mutex::new(None::<Instant>));
    let mut clients = Vec::new();
    for _ in 0..24 {
        let ns = format!("/run/netns/{}", mesh.pod("web").pod.ns);
        let (stop, adapted) = (stop.clone(), adapted.clone());
        clients.push(std::thread::spawn(move || {
            netns::enter(&ns);
            let target: SocketAddr = "198.18.100.4:8080".parse().unwrap();
            let mut out = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let (code, text) = raw_http(
                    target,
                    "GET / HTTP/1.1\r\nHost: busy\r\nConnection: close\r\n\r\n",
                );
                let after_adapting = adapted.lock().unwrap().is_some_and(|a| t >= a);
                let limited = header(&text, "x-bulwark-reason") == Some("concurrency-limited");
                out.push((code, t.elapsed(), limited, after_adapting));
                std::thread::sleep(Duration::from_millis(20)); // pacing
            }
            out
        }));
    }
    let lowest = wait_for(
        "concurrency-limited refusals and the limit below its initial value",
        Duration::from_secs(20),
        || {
            let m = mesh.metrics("web");
            let refused = metric_sum(&m, "bulwark_adaptive_concurrency_rejections_total", &[]);
            let now = metric_sum(&m, "bulwark_adaptive_concurrency_limit", &[]);
            (refused > 0.0 && now < INITIAL).then_some(now)
        },
    );
    *adapted.lock().unwrap() = Some(Instant::now());
    // Keep the load on until enough requests were admitted under the
    // adapted limit to judge their latency.
    let admitted_after = || {
        metric_sum(
            &mesh.metrics("web"),
            "bulwark_requests_total",
            &["service=\"default/busy\"", "code=\"200\""],
        )
    };
    let before = admitted_after();
    wait_for(
        "requests admitted under the adapted limit",
        Duration::from_secs(30),
        || (admitted_after() >= before + 150.0).then_some(()),
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results: Vec<(u16, Duration, bool, bool)> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    let refused: Vec<_> = results.iter().filter(|r| r.2).collect();
    let mut admitted: Vec<Duration> = results
        .iter()
        .filter(|r| r.3 && r.0 == 200)
        .map(|r| r.1)
        .collect();
    admitted.sort();
    let median = admitted[admitted.len() / 2];
    let p90 = admitted[admitted.len() * 9 / 10];
    println!(
        "unloaded median {unloaded:?}; limit fell to {lowest}; {} refused; admitted under load: {} median {median:?} p90 {p90:?}",
        refused.len(),
        admitted.len()
    );
    assert!(refused.iter().all(|r| r.0 == 503), "refusals are 503s");
    // A refusal that queued would wait behind the admitted requests.
    assert_fast(
        refused.iter().map(|r| r.1).collect(),
        "concurrency refusals",
    );
    assert!(
        results.iter().all(|r| r.0 == 200 || r.2),
        "every request is served or refused as concurrency-limited"
    );
    // Unlimited, the median would be ~12x the unloaded latency; the limit
    // keeps it near the tolerance (2x) plus the limit's probing.
    assert!(
        median <= unloaded * 4,
        "admitted median {median:?} vs unloaded {unloaded:?}"
    );
    assert!(
        p90 <= unloaded * 8,
        "admitted p90 {p90:?} vs unloaded {unloaded:?}"
    );
}

/// HTTP that reaches the server side in an opaque tunnel (here: a request
/// line after a blank line, and one whose method stalls past the
/// sniffing's wait, both of which the client side passes as opaque), or
/// in plaintext from a client without a sidecar (PERMISSIVE), is still
/// served as HTTP there: the app is told the caller's verified identity,
/// or none, never one the client wrote into its request.
#[test]
fn no_path_hands_the_app_a_forged_caller_identity() {
    let _serial = serial();
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    mesh.add_pod("web");
    mesh.add_pod("outsider");
    let api = mesh.add_pod("api");
    let cfg = format!(
        "{}{}",
        MESH.replace("mode: STRICT", "mode: PERMISSIVE"),
        service_doc("api", "198.18.100.21", &[&api], "")
            .replace("protocol: http", "protocol: auto"),
    );
    mesh.write_config(&cfg);
    mesh.start_sidecar("web", "web", &[]);
    mesh.start_sidecar("api", "api", &[]);
    for p in ["web", "api"] {
        mesh.wait_ready(p);
    }
    let forged = "spiffe://cluster.local/ns/default/sa/admin";
    let send = |pod: &str, target: String, attempts: Vec<(&'static str, Duration)>| {
        let ns = format!("/run/netns/{}", mesh.pod(pod).pod.ns);
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            netns::enter(&ns);
            let target: SocketAddr = target.parse().unwrap();
            let rest = format!(
                " /x HTTP/1.1\r\nHost: api\r\nx-bulwark-peer-identity: {forged}\r\nx_bulwark_peer_identity: {forged}\r\nConnection: close\r\n\r\n"
            );
            let mut out = Vec::new();
            for (first, pause) in attempts {
                let mut c = std::net::TcpStream::connect(target).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                c.write_all(first.as_bytes()).unwrap();
                // The shape of the request under test, not synchronisation:
                // the method stalls past the client side's 1 s wait.
                std::thread::sleep(pause);
                c.write_all(rest.as_bytes()).unwrap();
                let mut answer = String::new();
                let _ = c.read_to_string(&mut answer);
                out.push(answer);
            }
            out
        })
        .join()
        .unwrap()
    };
    let meshed = send(
        "web",
        "198.18.100.21:8080".into(),
        vec![
            ("\r\nGET", Duration::ZERO),
            ("GET", Duration::from_millis(1300)),
            // A method the client side does not take for HTTP; the app does.
            ("get", Duration::ZERO),
        ],
    );
    let plaintext = send(
        "outsider",
        format!("{}:8080", api.ip),
        vec![("GET", Duration::ZERO), ("\r\nGET", Duration::ZERO)],
    );
    let check = |answer: &String, caller: &str| {
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.contains(&format!("caller={caller}\n")) && !answer.contains(forged),
            "the app must see {caller} as the caller: {answer}"
        );
    };
    for answer in &meshed {
        check(answer, &spiffe("web"));
    }
    for answer in &plaintext {
        check(answer, "-");
    }
}

#[test]
fn auto_ports_detect_http_and_never_stall_a_server_that_speaks_first() {
    let _serial = serial();
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    mesh.add_pod("web");
    let api = mesh.add_pod("api");
    let smtp = mesh.add_pod("smtp");
    let authz = |svc: &str| {
        format!(
            "---\napiVersion: bulwark.dev/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {svc}\n  namespace: default\nspec:\n  service: {svc}\n  rules:\n    - from:\n        - {}\n",
            spiffe("web")
        )
    };
    let cfg = format!(
        "{MESH}{}{}{}{}",
        service_doc("api", "198.18.100.21", &[&api], "")
            .replace("protocol: http", "protocol: auto"),
        service_doc("smtp", "198.18.100.22", &[&smtp], "")
            .replace("protocol: http", "protocol: auto"),
        authz("api"),
        authz("smtp"),
    );
    mesh.write_config(&cfg);
    mesh.set_app_args("smtp", &["--tcp-echo", "--banner", "220 smtp ready"]);
    mesh.start_sidecar("web", "web", &[]);
    mesh.start_sidecar("api", "api", &[]);
    mesh.start_sidecar("smtp", "smtp", &[]);
    for p in ["web", "api", "smtp"] {
        mesh.wait_ready(p);
    }

    // HTTP on an auto port is detected and proxied at L7 (counted as a request).
    let (code, body) = raw_http_from(
        &mesh,
        "web",
        "198.18.100.21:8080",
        "GET /hello HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(code, 200, "{body}");
    let web = mesh.metrics("web");
    assert_eq!(
        metric_sum(
            &web,
            "bulwark_protocol_detections_total",
            &["result=\"http\""]
        ),
        1.0,
        "{web}"
    );
    assert!(metric_sum(&web, "bulwark_requests_total", &["direction=\"outbound\""]) >= 1.0);

    // A server that speaks first: the client says nothing and must still
    // get the greeting (then the line protocol works both ways); a client
    // that speaks first with something else is opaque TCP too.
    let ns = format!("/run/netns/{}", mesh.pod("web").pod.ns);
    let (greeting, waited, echo, client_first) = std::thread::spawn(move || {
        use std::io::{BufRead, BufReader, Write};
        netns::enter(&ns);
        let target: SocketAddr = "198.18.100.22:8080".parse().unwrap();
        let t = Instant::now();
        let mut c = std::net::TcpStream::connect(target).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut r = BufReader::new(c.try_clone().unwrap());
        let mut greeting = String::new();
        r.read_line(&mut greeting).unwrap();
        let waited = t.elapsed();
        c.write_all(b"EHLO web\n").unwrap();
        let mut echo = String::new();
        r.read_line(&mut echo).unwrap();

        let mut c = std::net::TcpStream::connect(target).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"\x00\x01binary hello\n").unwrap();
        let mut r = BufReader::new(c);
        let mut first = String::new();
        r.read_line(&mut first).unwrap();
        let mut second = String::new();
        r.read_line(&mut second).unwrap();
        (greeting, waited, echo, first + &second)
    })
    .join()
    .unwrap();
    println!("server-first greeting after {waited:?}");
    assert_eq!(greeting, "220 smtp ready\n");
    assert_eq!(echo, "smtp EHLO web\n");
    assert!(
        client_first.starts_with("220 smtp ready\n") && client_first.contains("binary hello"),
        "{client_first:?}"
    );
    // The upstream connection starts after a 10 ms window (~15 ms in all
    // here), not after giving up on the client (300 ms before).
    assert!(
        waited < Duration::from_millis(250),
        "greeting took {waited:?}"
    );
    let web = mesh.metrics("web");
    for (result, n) in [("server_first", 1.0), ("tcp", 1.0), ("http", 1.0)] {
        assert_eq!(
            metric_sum(
                &web,
                "bulwark_protocol_detections_total",
                &[&format!("result=\"{result}\"")]
            ),
            n,
            "{result}: {web}"
        );
    }
}

#[test]
fn non_idempotent_requests_are_retried_only_when_the_route_says_so() {
    let _serial = serial();
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    mesh.add_pod("web");
    let flaky = mesh.add_pod("flaky");
    // Every second request is answered 503.
    mesh.set_app_args("flaky", &["--error-rate", "0.5"]);
    let route = |non_idempotent: bool| {
        format!(
            "---\napiVersion: bulwark.dev/v1\nkind: Route\nmetadata:\n  name: flaky\n  namespace: default\nspec:\n  service: flaky\n  rules:\n    - name: all\n      backends:\n        - service: flaky\n      retry:\n        attempts: 2\n        retryOn: [5xx]\n        budgetRatio: 1.0\n        retryNonIdempotent: {non_idempotent}\n"
        )
    };
    let config = |non_idempotent: bool| {
        format!(
            "{MESH}{}{}",
            service_doc("flaky", "198.18.100.5", &[&flaky], ""),
            route(non_idempotent)
        )
    };
    mesh.write_config(&config(false));
    mesh.start_sidecar("web", "web", &[]);
    mesh.start_sidecar("flaky", "flaky", &[]);
    mesh.wait_ready("web");
    mesh.wait_ready("flaky");
    let ns = format!("/run/netns/{}", mesh.pod("web").pod.ns);
    let run = move |method: &'static str| {
        let ns = ns.clone();
        std::thread::spawn(move || {
            netns::enter(&ns);
            let req = format!(
                "{method} /order HTTP/1.1\r\nHost: flaky\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
            );
            (0..20)
                .filter(|_| raw_http("198.18.100.5:8080".parse().unwrap(), &req).0 == 200)
                .count()
        })
        .join()
        .unwrap()
    };
    // GET is retried: every request succeeds. POST is not: half fail.
    assert_eq!(run("GET"), 20);
    let posts = run("POST");
    assert!(
        (8..=12).contains(&posts),
        "POST without retryNonIdempotent: {posts} of 20 ok"
    );
    mesh.write_config(&config(true));
    wait_for(
        "the route to allow POST retries",
        Duration::from_secs(15),
        || (run("POST") == 20).then_some(()),
    );
}
