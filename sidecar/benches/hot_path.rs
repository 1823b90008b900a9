//! Micro-benchmarks of what every proxied request goes through: route
//! matching and backend pick, load-balancer pick, breaker and bulkhead
//! admission, hop-by-hop header stripping, and the keyed rate limiter.
//!
//! `cargo bench -p bulwark-sidecar --bench hot_path` (a regression here is
//! paid on every request of every service).

use std::collections::HashMap;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bulwark_proto::config::v1;
use bulwark_proto::config::v1::string_match::Kind;
use bulwark_sidecar::balance::{self, EndpointState, Endpoints};
use bulwark_sidecar::http::route::RouteTable;
use bulwark_sidecar::http::strip_hop_headers;
use bulwark_sidecar::resilience::breaker::{Breaker, BreakerConfig};
use bulwark_sidecar::resilience::bulkhead::Bulkhead;
use bulwark_sidecar::resilience::ratelimit::KeyedLimiter;
use bulwark_sidecar::telemetry::{Metrics, RequestKey};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

fn string_match(kind: Kind) -> Option<v1::StringMatch> {
    Some(v1::StringMatch { kind: Some(kind) })
}

fn backend(service: &str, weight: u32, version: Option<&str>) -> v1::WeightedBackend {
    v1::WeightedBackend {
        service: service.into(),
        weight,
        subset: version
            .map(|v| HashMap::from([("version".to_string(), v.to_string())]))
            .unwrap_or_default(),
        ..Default::default()
    }
}

/// A realistic table: an admin regex rule, a header-matched rule, a few
/// prefix rules and a 90/10 canary catch-all with a header override.
fn table() -> RouteTable {
    let mut rules = vec![
        v1::HttpRoute {
            name: "admin".into(),
            matches: vec![v1::RouteMatch {
                path: string_match(Kind::Regex("/admin/[0-9]+".into())),
                methods: vec!["POST".into(), "PUT".into()],
                ..Default::default()
            }],
            backends: vec![backend("admin", 100, None)],
            ..Default::default()
        },
        v1::HttpRoute {
            name: "beta-users".into(),
            matches: vec![v1::RouteMatch {
                headers: vec![v1::HeaderMatch {
                    name: "x-user-group".into(),
                    value: string_match(Kind::Exact("beta".into())),
                    absent: false,
                }],
                ..Default::default()
            }],
            backends: vec![backend("api", 100, Some("v2"))],
            ..Default::default()
        },
    ];
    for p in ["/static/", "/images/", "/v1/orders/", "/v1/users/"] {
        rules.push(v1::HttpRoute {
            name: p.trim_matches('/').replace('/', "-"),
            matches: vec![v1::RouteMatch {
                path: string_match(Kind::Prefix(p.into())),
                methods: vec!["GET".into()],
                ..Default::default()
            }],
            backends: vec![backend("api", 100, None)],
            ..Default::default()
        });
    }
    rules.push(v1::HttpRoute {
        name: "canary".into(),
        backends: vec![
            backend("api", 90, Some("v1")),
            backend("api", 10, Some("v2")),
        ],
        overrides: vec![v1::HeaderOverride {
            header: Some(v1::HeaderMatch {
                name: "x-canary".into(),
                value: string_match(Kind::Exact("always".into())),
                absent: false,
            }),
            backend: Some(backend("api", 100, Some("v2"))),
        }],
        ..Default::default()
    });
    RouteTable::compile(&v1::Route {
        name: "api".into(),
        namespace: "default".into(),
        service: "api".into(),
        rules,
        ..Default::default()
    })
    .expect("valid route")
}

fn request_headers() -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert("host", "api.default:8080".parse().unwrap());
    h.insert("user-agent", "bench/1.0".parse().unwrap());
    h.insert("accept", "*/*".parse().unwrap());
    h.insert(
        "x-request-id",
        "6f1e9c1a-56a1-4b5e-9d4c-0f3b2a1c9e77".parse().unwrap(),
    );
    h
}

fn routing(c: &mut Criterion) {
    let t = table();
    let h = request_headers();
    let mut g = c.benchmark_group("route");
    // First rule by prefix, the regex rule, and the last (catch-all) rule
    // after every other rule failed to match.
    for (name, method, path) in [
        ("prefix", http::Method::GET, "/static/app.js"),
        ("regex", http::Method::POST, "/admin/42"),
        ("fallthrough", http::Method::GET, "/checkout/cart"),
    ] {
        g.bench_with_input(
            BenchmarkId::new("find", name),
            &(method, path),
            |b, (m, p)| b.iter(|| black_box(t.find(black_box(m), black_box(p), black_box(&h)))),
        );
    }
    let canary = t.rules.last().expect("catch-all rule");
    g.bench_function("pick/weighted", |b| {
        b.iter(|| black_box(canary.pick(black_box(&h), balance::rand_unit())))
    });
    let mut overridden = h.clone();
    overridden.insert("x-canary", "always".parse().unwrap());
    g.bench_function("pick/override", |b| {
        b.iter(|| black_box(canary.pick(black_box(&overridden), balance::rand_unit())))
    });
    g.finish();
}

fn endpoints(n: usize) -> Vec<Arc<EndpointState>> {
    let reg = Endpoints::default();
    (0..n)
        .map(|i| {
            let addr: SocketAddr = format!("10.0.{}.{}:8080", i / 250, i % 250 + 1)
                .parse()
                .unwrap();
            reg.get(addr)
        })
        .collect()
}

fn load_balancing(c: &mut Criterion) {
    let mut g = c.benchmark_group("lb");
    let now = Instant::now();
    for n in [3usize, 32] {
        let eps = endpoints(n);
        // Some load so p2c compares real counts.
        let _busy: Vec<_> = eps.iter().step_by(2).map(|e| e.start()).collect();
        g.bench_with_input(BenchmarkId::new("p2c", n), &eps, |b, eps| {
            b.iter(|| black_box(balance::p2c(black_box(eps), now, balance::rand_below)))
        });
        let next = AtomicUsize::new(0);
        g.bench_with_input(BenchmarkId::new("round_robin", n), &eps, |b, eps| {
            b.iter(|| black_box(balance::round_robin(black_box(eps), now, &next)))
        });
        // Pick plus the in-flight guard a request holds until it ends.
        g.bench_with_input(BenchmarkId::new("p2c+inflight", n), &eps, |b, eps| {
            b.iter(|| {
                let e = balance::p2c(black_box(eps), now, balance::rand_below).unwrap();
                black_box(e.start())
            })
        });
    }
    g.finish();
}

fn admission(c: &mut Criterion) {
    let mut g = c.benchmark_group("admission");
    let breaker = Breaker::new(BreakerConfig {
        consecutive_failures: 5,
        failure_ratio: 0.5,
        min_requests: 20,
        window: Duration::from_secs(10),
        open: Duration::from_secs(5),
        half_open_requests: 1,
    });
    let now = Instant::now();
    g.bench_function("breaker/admit+record", |b| {
        b.iter(|| {
            let a = breaker.admit(black_box(now));
            breaker.record(&a, true, now);
            black_box(a)
        })
    });
    // The uncontended path: a free slot, taken and given back. The future
    // completes on its first poll, so no runtime is needed.
    let bulkhead = Bulkhead::new(
        1024,
        128,
        bulwark_sidecar::resilience::bulkhead::QUEUE_TIMEOUT,
    );
    let mut cx = Context::from_waker(Waker::noop());
    g.bench_function("bulkhead/acquire+release", |b| {
        b.iter(|| {
            let mut f = std::pin::pin!(bulkhead.acquire());
            match f.as_mut().poll(&mut cx) {
                Poll::Ready(p) => black_box(p.is_ok()),
                Poll::Pending => unreachable!("a free slot is taken at once"),
            }
        })
    });
    g.finish();
}

fn headers(c: &mut Criterion) {
    let mut g = c.benchmark_group("headers");
    let plain = request_headers();
    g.bench_function("strip_hop/none_present", |b| {
        b.iter_batched_ref(
            || plain.clone(),
            |h| strip_hop_headers(black_box(h)),
            criterion::BatchSize::SmallInput,
        )
    });
    let mut hop = request_headers();
    hop.insert("connection", "keep-alive, x-trace-hop".parse().unwrap());
    hop.insert("keep-alive", "timeout=5".parse().unwrap());
    hop.insert("x-trace-hop", "1".parse().unwrap());
    hop.insert("te", "gzip".parse().unwrap());
    g.bench_function("strip_hop/connection_listed", |b| {
        b.iter_batched_ref(
            || hop.clone(),
            |h| strip_hop_headers(black_box(h)),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn rate_limit(c: &mut Criterion) {
    let mut g = c.benchmark_group("ratelimit");
    let now = Instant::now();
    // High rate so the benchmark measures the allowed path, not refusals.
    let shared = KeyedLimiter::new(1_000_000_000, 1_000_000_000, 10_000);
    g.bench_function("check/one_key", |b| {
        b.iter(|| {
            black_box(shared.check(black_box("spiffe://cluster.local/ns/default/sa/web"), now))
        })
    });
    let keys: Vec<String> = (0..1000)
        .map(|i| format!("spiffe://cluster.local/ns/default/sa/client-{i}"))
        .collect();
    let many = KeyedLimiter::new(1_000_000, 1_000_000, 10_000);
    let mut i = 0usize;
    g.bench_function("check/1000_keys", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(many.check(black_box(&keys[i]), now))
        })
    });
    // At the key bound every new key evicts: what a flood of distinct
    // callers costs.
    let full = KeyedLimiter::new(10, 10, 1024);
    let mut n = 0u64;
    g.bench_function("check/new_key_at_bound", |b| {
        b.iter(|| {
            n += 1;
            black_box(full.check(black_box(&n.to_string()), now))
        })
    });
    let mut resp = http::HeaderMap::new();
    let d = shared.check("spiffe://cluster.local/ns/default/sa/web", now);
    g.bench_function("apply_headers", |b| {
        b.iter(|| d.apply_headers(black_box(&mut resp)))
    });
    g.finish();
}

fn metrics(c: &mut Criterion) {
    let mut g = c.benchmark_group("metrics");
    let m = Metrics::default();
    let resp = http::Response::new(());
    // What a request handler does at its end: count the request and
    // observe its duration under its labels.
    g.bench_function("record_request", |b| {
        b.iter(|| {
            let key = RequestKey {
                direction: "outbound",
                service: black_box("default/api"),
                route: "canary",
                src_identity: "spiffe://cluster.local/ns/default/sa/web",
                dst_identity: "spiffe://cluster.local/ns/default/sa/api",
                code: 200,
            };
            black_box(m.record_request(key, Duration::from_micros(250), &resp))
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    routing,
    load_balancing,
    admission,
    headers,
    rate_limit,
    metrics
);
criterion_main!(benches);
