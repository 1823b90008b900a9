//! `load_and_compile` as `bulwark xds validate` and the server use it: what
//! is accepted, and which error, at which `file:line`, each mistake gives.

use std::path::{Path, PathBuf};

use bulwark_proto::config::v1 as pb;
use bulwark_xds::{ConfigErrors, load_and_compile};

/// A directory holding the given files.
fn config_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

/// `(file name, line, message)` of every error for these files.
fn errors(files: &[(&str, &str)]) -> Vec<(String, u32, String)> {
    let dir = config_dir(files);
    match load_and_compile(dir.path()) {
        Ok(_) => Vec::new(),
        Err(e) => flatten(&e),
    }
}

fn flatten(e: &ConfigErrors) -> Vec<(String, u32, String)> {
    e.iter()
        .map(|e| {
            let name = e.file.file_name().unwrap().to_string_lossy().into_owned();
            (name, e.line, e.message.clone())
        })
        .collect()
}

/// Asserts exactly one error, at `file:line`, whose message contains `needle`.
fn assert_one_error(files: &[(&str, &str)], file: &str, line: u32, needle: &str) {
    let errs = errors(files);
    assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
    let (f, l, m) = &errs[0];
    assert_eq!((f.as_str(), *l), (file, line), "wrong place for {m:?}");
    assert!(m.contains(needle), "{m:?} should mention {needle:?}");
}

const SERVICES: &str = r#"apiVersion: bulwark.dev/v1
kind: Service
metadata:
  name: api
spec:
  ports:
    - port: 8080
      protocol: http
  identities: [spiffe://cluster.local/ns/default/sa/api]
---
apiVersion: bulwark.dev/v1
kind: Service
metadata:
  name: web
spec:
  ports:
    - port: 80
  identities: [spiffe://cluster.local/ns/default/sa/web]
"#;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

#[test]
fn the_example_mesh_validates_and_compiles() {
    let r = &load_and_compile(&examples_dir()).unwrap_or_else(|e| panic!("{e}"));
    let mesh = r.mesh.as_ref().expect("MeshConfig");
    assert_eq!(mesh.mtls_mode, pb::MtlsMode::Strict as i32);
    let names: Vec<&str> = r.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["web", "api", "db"]);
    assert_eq!(r.routes.len(), 1);
    let rule = &r.routes[0].rules[0];
    assert_eq!(r.routes[0].service, "default/api");
    let weights: Vec<(String, u32)> = rule
        .backends
        .iter()
        .map(|b| (b.subset["version"].clone(), b.weight))
        .collect();
    assert_eq!(weights, [("v1".to_string(), 90), ("v2".to_string(), 10)]);
    let o = &rule.overrides[0];
    assert_eq!(o.header.as_ref().unwrap().name, "x-canary");
    assert_eq!(o.backend.as_ref().unwrap().subset["version"], "v2");
    assert_eq!(rule.timeout_ms, 2000);
    assert_eq!(rule.retry.as_ref().unwrap().attempts, 3);
    assert_eq!(r.traffic_policies[0].max_requests, 200);
    assert_eq!(
        r.traffic_policies[0]
            .circuit_breaker
            .as_ref()
            .unwrap()
            .consecutive_failures,
        5
    );
    let authz: Vec<(&str, &str)> = r
        .authorization_policies
        .iter()
        .map(|a| (a.service.as_str(), a.rules[0].from[0].as_str()))
        .collect();
    assert_eq!(
        authz,
        [
            ("default/api", "spiffe://cluster.local/ns/default/sa/web"),
            ("default/db", "spiffe://cluster.local/ns/default/sa/api"),
        ]
    );
    let counts = bulwark_xds::document_counts(r);
    assert_eq!(counts.iter().map(|(_, n)| n).sum::<usize>(), 10);
}

#[test]
fn every_resource_carries_its_source() {
    let r = load_and_compile(&examples_dir()).unwrap();
    let api = &r.services[1];
    let src = api.source.as_ref().unwrap();
    assert!(src.file.ends_with("services.yaml"), "{}", src.file);
    assert_eq!(src.kind, "Service");
    assert_eq!(src.name, "api");
    assert_eq!(src.namespace, "default");
    // The document starts after the `---` and two comment lines.
    let text = std::fs::read_to_string(examples_dir().join("services.yaml")).unwrap();
    let expected = text
        .lines()
        .position(|l| l.starts_with("# Two versions of api"))
        .unwrap()
        + 3;
    assert_eq!(src.line as usize, expected);
}

#[test]
fn unknown_field_is_reported_with_its_line() {
    let route = r#"apiVersion: bulwark.dev/v1
kind: Route
metadata:
  name: api
spec:
  service: api
  rules:
    - backends:
        - service: api
          weigth: 100
"#;
    assert_one_error(
        &[("a.yaml", SERVICES), ("route.yaml", route)],
        "route.yaml",
        10,
        "unknown field `weigth`",
    );
}

#[test]
fn unknown_field_in_a_later_document_has_its_line_in_the_file() {
    let text = format!(
        "{SERVICES}---\napiVersion: bulwark.dev/v1\nkind: Service\nmetadata:\n  name: db\n  nmespace: x\nspec:\n  ports: [{{port: 5432}}]\n"
    );
    assert_one_error(
        &[("s.yaml", &text)],
        "s.yaml",
        24,
        "unknown field `nmespace`",
    );
}

#[test]
fn backend_weights_must_sum_to_100() {
    let route = r#"apiVersion: bulwark.dev/v1
kind: Route
metadata:
  name: api
spec:
  service: api
  rules:
    - backends:
        - service: api
          subset: {version: v1}
          weight: 80
        - service: api
          subset: {version: v2}
          weight: 10
"#;
    assert_one_error(
        &[("a.yaml", SERVICES), ("route.yaml", route)],
        "route.yaml",
        11,
        "sum to 90, they must sum to 100",
    );
}

#[test]
fn backend_weight_over_100_is_reported() {
    let route = r#"apiVersion: bulwark.dev/v1
kind: Route
metadata:
  name: api
spec:
  service: api
  rules:
    - backends:
        - service: api
          weight: 150
"#;
    assert_one_error(
        &[("a.yaml", SERVICES), ("route.yaml", route)],
        "route.yaml",
        10,
        "out of range 0..=100",
    );
}

#[test]
fn a_single_backend_may_leave_its_weight_out() {
    let route = r#"apiVersion: bulwark.dev/v1
kind: Route
metadata:
  name: api
spec:
  service: api
  rules:
    - backends:
        - service: web
"#;
    let dir = config_dir(&[("a.yaml", SERVICES), ("route.yaml", route)]);
    let r = load_and_compile(dir.path()).unwrap();
    assert_eq!(r.routes[0].rules[0].backends[0].weight, 100);
}

#[test]
fn bad_regex_is_reported_with_its_line() {
    let route = r#"apiVersion: bulwark.dev/v1
kind: Route
metadata:
  name: api
spec:
  service: api
  rules:
    - matches:
        - path:
            regex: "/users/(\\d+"
"#;
    assert_one_error(
        &[("a.yaml", SERVICES), ("route.yaml", route)],
        "route.yaml",
        10,
        "invalid regex",
    );
}

#[test]
fn oversized_regex_is_refused() {
    let route = r#"apiVersion: bulwark.dev/v1
kind: Route
metadata:
  name: api
spec:
  service: api
  rules:
    - matches:
        - headers:
            - name: x-id
              regex: "(\\w{100}){100}"
"#;
    assert_one_error(
        &[("a.yaml", SERVICES), ("route.yaml", route)],
        "route.yaml",
        11,
        "compiles too big",
    );
}

#[test]
fn dangling_reference_is_reported() {
    let policy = r#"apiVersion: bulwark.dev/v1
kind: TrafficPolicy
metadata:
  name: apx
  namespace: shop
spec:
  service: apx
"#;
    assert_one_error(
        &[("a.yaml", SERVICES), ("p.yaml", policy)],
        "p.yaml",
        7,
        "unknown service shop/apx",
    );
}

#[test]
fn reference_to_another_namespace_resolves_and_hints() {
    let policy = r#"apiVersion: bulwark.dev/v1
kind: AuthorizationPolicy
metadata:
  name: ok
  namespace: shop
spec:
  service: default/api
---
apiVersion: bulwark.dev/v1
kind: AuthorizationPolicy
metadata:
  name: wrong-namespace
  namespace: shop
spec:
  service: api
"#;
    assert_one_error(
        &[("a.yaml", SERVICES), ("p.yaml", policy)],
        "p.yaml",
        15,
        "did you mean default/api?",
    );
}

#[test]
fn duplicate_name_is_reported_with_the_first_definition() {
    let dup = r#"apiVersion: bulwark.dev/v1
kind: Service
metadata:
  name: api
spec:
  ports: [{port: 9090}]
"#;
    let errs = errors(&[("a.yaml", SERVICES), ("b.yaml", dup)]);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_eq!((errs[0].0.as_str(), errs[0].1), ("b.yaml", 4));
    assert!(
        errs[0].2.contains("duplicate Service default/api"),
        "{}",
        errs[0].2
    );
    assert!(errs[0].2.contains("a.yaml:4"), "{}", errs[0].2);
}

#[test]
fn same_name_in_another_namespace_or_kind_is_not_a_duplicate() {
    let other = r#"apiVersion: bulwark.dev/v1
kind: Service
metadata:
  name: api
  namespace: shop
spec:
  ports: [{port: 9090}]
---
apiVersion: bulwark.dev/v1
kind: TrafficPolicy
metadata:
  name: api
spec:
  service: api
"#;
    assert_eq!(errors(&[("a.yaml", SERVICES), ("b.yaml", other)]), []);
}

#[test]
fn second_mesh_config_is_reported() {
    let mesh = "apiVersion: bulwark.dev/v1\nkind: MeshConfig\nmetadata:\n  name: one\nspec: {}\n---\napiVersion: bulwark.dev/v1\nkind: MeshConfig\nmetadata:\n  name: two\nspec: {}\n";
    assert_one_error(&[("m.yaml", mesh)], "m.yaml", 7, "more than one MeshConfig");
}

#[test]
fn bad_spiffe_id_is_reported() {
    let svc = r#"apiVersion: bulwark.dev/v1
kind: Service
metadata:
  name: api
spec:
  ports: [{port: 80}]
  identities:
    - spiffe://cluster.local/ns/default/api
"#;
    assert_one_error(
        &[("s.yaml", svc)],
        "s.yaml",
        8,
        "/ns/<namespace>/sa/<service-account>",
    );
}

#[test]
fn identity_outside_the_mesh_trust_domain_is_reported() {
    let mesh = "apiVersion: bulwark.dev/v1\nkind: MeshConfig\nmetadata:\n  name: mesh\nspec:\n  trustDomain: prod.example\n";
    let svc = r#"apiVersion: bulwark.dev/v1
kind: Service
metadata:
  name: api
spec:
  ports: [{port: 80}]
  identities:
    - spiffe://prod.example/ns/default/sa/api
    - spiffe://cluster.local/ns/default/sa/api
"#;
    assert_one_error(
        &[("m.yaml", mesh), ("s.yaml", svc)],
        "s.yaml",
        9,
        "not in the mesh trust domain prod.example",
    );
}

#[test]
fn source_patterns_may_use_stars_but_must_be_spiffe_shaped() {
    let policy = r#"apiVersion: bulwark.dev/v1
kind: AuthorizationPolicy
metadata:
  name: api
spec:
  service: api
  rules:
    - from:
        - spiffe://cluster.local/ns/ops/sa/*
        - spiffe://cluster.local/ns/team-*/sa/*
        - spiffe://cluster.local/*
"#;
    assert_one_error(
        &[("a.yaml", SERVICES), ("p.yaml", policy)],
        "p.yaml",
        11,
        "not a SPIFFE ID pattern",
    );
}

#[test]
fn bad_port_is_reported() {
    let svc = r#"apiVersion: bulwark.dev/v1
kind: Service
metadata:
  name: api
spec:
  ports:
    - port: 8080
    - port: 70000
"#;
    assert_one_error(
        &[("s.yaml", svc)],
        "s.yaml",
        8,
        "port 70000 is out of range 1..=65535",
    );
}

#[test]
fn backend_port_must_be_a_port_of_the_service() {
    let route = r#"apiVersion: bulwark.dev/v1
kind: Route
metadata:
  name: api
spec:
  service: api
  rules:
    - backends:
        - service: api
          port: 9999
"#;
    assert_one_error(
        &[("a.yaml", SERVICES), ("r.yaml", route)],
        "r.yaml",
        10,
        "not a port of service default/api (ports: 8080)",
    );
}

#[test]
fn malformed_yaml_is_reported_with_its_line() {
    let bad = "apiVersion: bulwark.dev/v1\nkind: Service\nmetadata:\n  name: api\nspec:\n  ports: [{port: 80}\n  identities: []\n";
    let errs = errors(&[("bad.yaml", bad)]);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_eq!(errs[0].0, "bad.yaml");
    assert!((6..=7).contains(&errs[0].1), "line {}", errs[0].1);
}

#[test]
fn wrong_type_is_reported_with_its_line() {
    let bad = "apiVersion: bulwark.dev/v1\nkind: Service\nmetadata:\n  name: api\nspec:\n  ports:\n    - port: http\n";
    assert_one_error(&[("s.yaml", bad)], "s.yaml", 7, "expected a whole number");
}

#[test]
fn a_document_that_is_not_a_mapping_is_reported() {
    let text = format!("{SERVICES}---\n- just\n- a list\n");
    assert_one_error(&[("s.yaml", &text)], "s.yaml", 20, "must be a mapping");
}

#[test]
fn duplicate_route_is_reported_once() {
    let route = "apiVersion: bulwark.dev/v1\nkind: Route\nmetadata:\n  name: api\nspec:\n  service: api\n  rules: [{}]\n";
    assert_one_error(
        &[("a.yaml", SERVICES), ("r1.yaml", route), ("r2.yaml", route)],
        "r2.yaml",
        4,
        "duplicate Route default/api",
    );
}

#[test]
fn unknown_kind_and_api_version_are_reported() {
    let text = "apiVersion: bulwark.dev/v1\nkind: VirtualService\nmetadata:\n  name: x\nspec: {}\n---\napiVersion: v1\nkind: MeshConfig\nmetadata:\n  name: mesh\nspec: {}\n";
    let errs = errors(&[("k.yaml", text)]);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert_eq!(errs[0].1, 2);
    assert!(
        errs[0].2.contains("unknown kind `VirtualService`"),
        "{}",
        errs[0].2
    );
    assert_eq!(errs[1].1, 7);
    assert!(
        errs[1].2.contains("unsupported apiVersion `v1`"),
        "{}",
        errs[1].2
    );
}

#[test]
fn bad_names_are_reported() {
    let text = "apiVersion: bulwark.dev/v1\nkind: Service\nmetadata:\n  name: My_Service\nspec:\n  ports: [{port: 80}]\n";
    assert_one_error(&[("s.yaml", text)], "s.yaml", 4, "not a DNS-1123 label");
}

#[test]
fn too_deep_input_is_refused_without_overflowing_the_stack() {
    let deep_flow = format!("kind: Service\nx: {}\n", "[".repeat(100_000));
    let mut deep_block = String::from("kind: Service\nspec:\n");
    for i in 0..1_000 {
        deep_block.push_str(&" ".repeat(i + 2));
        deep_block.push_str("a:\n");
    }
    let errs = errors(&[("flow.yaml", &deep_flow), ("block.yaml", &deep_block)]);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    for (file, line, msg) in &errs {
        assert!(msg.contains("nested deeper than"), "{file}:{line}: {msg}");
    }
}

#[test]
fn too_large_file_is_refused() {
    let big = format!("# {}\n", "x".repeat(1024 * 1024));
    assert_one_error(
        &[("big.yaml", &big)],
        "big.yaml",
        1,
        "larger than the 1024 KiB limit",
    );
}

#[test]
fn alias_bomb_is_refused() {
    let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let p = i - 1;
        bomb.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    bomb.push_str("kind: Service\n");
    let errs = errors(&[("bomb.yaml", &bomb)]);
    assert_eq!(errs.len(), 1, "{errs:#?}");
}

#[test]
fn multiple_errors_across_files_are_all_reported_in_order() {
    let svc = r#"apiVersion: bulwark.dev/v1
kind: Service
metadata:
  name: api
spec:
  ports:
    - port: 0
  identities: [spiffe://cluster.local/ns/default/api]
"#;
    let route = r#"apiVersion: bulwark.dev/v1
kind: Route
metadata:
  name: api
spec:
  service: api
  rules:
    - matches:
        - methods: [get]
      timeout: 2 seconds
      retry:
        attempts: 20
      backends:
        - service: nope
"#;
    let broken =
        "apiVersion: bulwark.dev/v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  portz: []\n";
    let errs = errors(&[("a.yaml", svc), ("b.yaml", route), ("c.yaml", broken)]);
    let places: Vec<(&str, u32)> = errs.iter().map(|(f, l, _)| (f.as_str(), *l)).collect();
    assert_eq!(
        places,
        [
            ("a.yaml", 7),  // port 0
            ("a.yaml", 8),  // bad SPIFFE ID
            ("b.yaml", 9),  // lower-case method
            ("b.yaml", 10), // bad duration
            ("b.yaml", 12), // too many attempts
            ("b.yaml", 14), // unknown backend service
            ("c.yaml", 6),  // unknown field
        ],
        "{errs:#?}"
    );
}

#[test]
fn a_service_that_fails_to_parse_does_not_also_break_references_to_it() {
    let svc = "apiVersion: bulwark.dev/v1\nkind: Service\nmetadata:\n  name: api\nspec:\n  ports: [{port: 80, protocl: http}]\n";
    let policy = "apiVersion: bulwark.dev/v1\nkind: TrafficPolicy\nmetadata:\n  name: api\nspec:\n  service: api\n";
    assert_one_error(
        &[("a.yaml", svc), ("b.yaml", policy)],
        "a.yaml",
        6,
        "unknown field `protocl`",
    );
}

#[test]
fn two_routes_for_one_service_are_reported() {
    let routes = "apiVersion: bulwark.dev/v1\nkind: Route\nmetadata:\n  name: one\nspec:\n  service: api\n  rules: [{}]\n---\napiVersion: bulwark.dev/v1\nkind: Route\nmetadata:\n  name: two\nspec:\n  service: api\n  rules: [{}]\n";
    assert_one_error(
        &[("a.yaml", SERVICES), ("r.yaml", routes)],
        "r.yaml",
        14,
        "already has a Route",
    );
}

#[test]
fn route_for_a_tcp_only_service_is_reported() {
    let text = "apiVersion: bulwark.dev/v1\nkind: Service\nmetadata:\n  name: db\nspec:\n  ports: [{port: 5432, protocol: tcp}]\n---\napiVersion: bulwark.dev/v1\nkind: Route\nmetadata:\n  name: db\nspec:\n  service: db\n  rules: [{}]\n";
    assert_one_error(&[("db.yaml", text)], "db.yaml", 13, "only tcp ports");
}

#[test]
fn traffic_policy_values_are_range_checked() {
    let policy = r#"apiVersion: bulwark.dev/v1
kind: TrafficPolicy
metadata:
  name: api
spec:
  service: api
  bulkhead:
    maxRequests: 0
  circuitBreaker:
    failureRatio: 1.5
    openDuration: 0s
  outlierDetection:
    maxEjectionPercent: 101
  healthCheck:
    path: healthz
"#;
    let errs = errors(&[("a.yaml", SERVICES), ("p.yaml", policy)]);
    let lines: Vec<u32> = errs.iter().map(|e| e.1).collect();
    assert_eq!(lines, [8, 10, 11, 13, 15], "{errs:#?}");
}

#[test]
fn header_names_and_match_kinds_are_checked() {
    let route = r#"apiVersion: bulwark.dev/v1
kind: Route
metadata:
  name: api
spec:
  service: api
  rules:
    - matches:
        - headers:
            - name: "bad header"
              exact: x
            - name: x-ok
              exact: a
              prefix: b
"#;
    let errs = errors(&[("a.yaml", SERVICES), ("r.yaml", route)]);
    let lines: Vec<u32> = errs.iter().map(|e| e.1).collect();
    assert_eq!(lines, [10, 12], "{errs:#?}");
}

#[test]
fn service_entry_endpoints_become_service_endpoints() {
    let entry = r#"apiVersion: bulwark.dev/v1
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
    - address: 10.0.0.7
      identity: spiffe://cluster.local/ns/default/sa/api
      labels: {version: v2}
    - address: "fd00::7"
      identity: spiffe://cluster.local/ns/default/sa/api
      weight: 3
"#;
    let dir = config_dir(&[("a.yaml", SERVICES), ("e.yaml", entry)]);
    let r = &load_and_compile(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.service_entries.len(), 1);
    assert_eq!(
        r.service_entries[0].location,
        pb::Location::MeshInternal as i32
    );
    assert_eq!(r.endpoints.len(), 1);
    let eps = &r.endpoints[0];
    assert_eq!(eps.service, "default/api");
    assert_eq!(eps.endpoints[0].labels["version"], "v2");
    assert_eq!(eps.endpoints[0].weight, 1);
    assert_eq!(eps.endpoints[1].weight, 3);
    assert_eq!(eps.source.as_ref().unwrap().kind, "ServiceEntry");
}

#[test]
fn external_service_entry_needs_something_to_dial() {
    let entry = "apiVersion: bulwark.dev/v1\nkind: ServiceEntry\nmetadata:\n  name: ext\nspec:\n  ports: [{port: 443}]\n";
    assert_one_error(
        &[("e.yaml", entry)],
        "e.yaml",
        6,
        "needs hosts or addresses",
    );
}

// ---------------------------------------------------------------------------
// Gateway and RequestAuthentication

/// A gateway in `ingress` routing to `default/api` (from [`SERVICES`]), and
/// its JWT providers. Tests below edit one line of it at a time.
const GATEWAY: &str = r#"apiVersion: bulwark.dev/v1
kind: Gateway
metadata: {name: edge, namespace: ingress}
spec:
  listeners:
    - name: https
      port: 8443
      certificates:
        - hostnames: [api.example.com, "*.example.com"]
          certFile: /etc/gw/tls.crt
          keyFile: /etc/gw/tls.key
      clientCaFile: /etc/gw/partners.pem
      requireClientCert: false
  routes:
    - name: orders
      hostnames: [api.example.com]
      matches: [{path: {prefix: /orders}, methods: [GET, POST]}]
      backends: [{service: default/api, weight: 90}, {service: default/api, subset: {version: v2}, weight: 10}]
      overrides: [{header: {name: X-Canary, exact: always}, backend: {service: default/api, subset: {version: v2}}}]
      timeout: 2s
      retry: {attempts: 2}
      authorization: {requireAuthenticated: true, scopes: ["orders:write"], claims: [{claim: tier, values: [gold]}]}
      rateLimit: {key: "header:X-Api-Key", requestsPerSecond: 10, burst: 20}
      validation:
        jsonSchema:
          type: object
          required: [item]
          properties: {item: {type: string}}
        maxBodyBytes: 65536
---
apiVersion: bulwark.dev/v1
kind: RequestAuthentication
metadata: {name: edge-jwt, namespace: ingress}
spec:
  gateway: edge
  providers:
    - issuer: https://issuer.example.com
      audiences: [orders-api]
      jwksFile: /etc/gw/jwks.json
      algorithms: [RS256, ES256]
      clockSkew: 30s
      forwardClaims: {sub: X-User-Id, scope: x-user-scopes}
      forwardToken: true
"#;

/// Errors for [`GATEWAY`] with `from` replaced by `to` (which must occur).
fn gateway_errors(from: &str, to: &str) -> Vec<(String, u32, String)> {
    assert!(GATEWAY.contains(from), "{from:?} is not in GATEWAY");
    errors(&[
        ("a.yaml", SERVICES),
        ("gw.yaml", &GATEWAY.replacen(from, to, 1)),
    ])
}

/// Asserts that the edit gives exactly one error, at `gw.yaml:line`,
/// mentioning `needle`.
fn assert_gateway_error(from: &str, to: &str, line: u32, needle: &str) {
    let errs = gateway_errors(from, to);
    assert_eq!(
        errs.len(),
        1,
        "{from:?} -> {to:?}: expected one error, got {errs:#?}"
    );
    let (f, l, m) = &errs[0];
    assert_eq!(
        (f.as_str(), *l),
        ("gw.yaml", line),
        "{from:?} -> {to:?}: wrong place for {m:?}"
    );
    assert!(m.contains(needle), "{m:?} should mention {needle:?}");
}

#[test]
fn a_gateway_compiles_with_route_semantics_and_edge_policies() {
    let dir = config_dir(&[("a.yaml", SERVICES), ("gw.yaml", GATEWAY)]);
    let r = load_and_compile(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let mut g = r.gateways[0].clone();
    let source = g.source.take().unwrap();
    assert_eq!((source.kind.as_str(), source.line), ("Gateway", 1));
    let backend = |version: Option<&str>, weight| pb::WeightedBackend {
        service: "default/api".into(),
        subset: version
            .map(|v| [("version".to_string(), v.to_string())].into())
            .unwrap_or_default(),
        weight,
        port: 0,
    };
    let string_match = |k| Some(pb::StringMatch { kind: Some(k) });
    use pb::string_match::Kind::{Exact, Prefix};
    let expected = pb::Gateway {
        name: "edge".into(),
        namespace: "ingress".into(),
        listeners: vec![pb::GatewayListener {
            name: "https".into(),
            port: 8443,
            certificates: vec![pb::GatewayCertificate {
                hostnames: vec!["api.example.com".into(), "*.example.com".into()],
                cert_file: "/etc/gw/tls.crt".into(),
                key_file: "/etc/gw/tls.key".into(),
            }],
            client_ca_file: "/etc/gw/partners.pem".into(),
            require_client_cert: false,
        }],
        routes: vec![pb::GatewayRoute {
            http: Some(pb::HttpRoute {
                name: "orders".into(),
                matches: vec![pb::RouteMatch {
                    path: string_match(Prefix("/orders".into())),
                    methods: vec!["GET".into(), "POST".into()],
                    headers: vec![],
                }],
                backends: vec![backend(None, 90), backend(Some("v2"), 10)],
                timeout_ms: 2000,
                // The Route defaults, filled in the same way.
                retry: Some(pb::RetryPolicy {
                    attempts: 2,
                    per_try_timeout_ms: 0,
                    backoff_base_ms: 25,
                    backoff_max_ms: 250,
                    retry_on: vec![
                        "gateway-error".into(),
                        "connect-failure".into(),
                        "reset".into(),
                    ],
                    retriable_status_codes: vec![],
                    budget_ratio: 0.2,
                    budget_min_per_second: 10,
                    retry_non_idempotent: false,
                }),
                overrides: vec![pb::HeaderOverride {
                    header: Some(pb::HeaderMatch {
                        name: "x-canary".into(),
                        value: string_match(Exact("always".into())),
                        absent: false,
                    }),
                    backend: Some(backend(Some("v2"), 100)),
                }],
                rate_limit: None,
            }),
            hostnames: vec!["api.example.com".into()],
            authorization: Some(pb::GatewayAuthorization {
                require_authenticated: true,
                scopes: vec!["orders:write".into()],
                claims: vec![pb::ClaimRequirement {
                    claim: "tier".into(),
                    values: vec!["gold".into()],
                }],
            }),
            rate_limit: Some(pb::ClientRateLimit {
                key: "header:x-api-key".into(),
                requests_per_second: 10,
                burst: 20,
            }),
            validation: Some(pb::RequestValidation {
                json_schema: r#"{"properties":{"item":{"type":"string"}},"required":["item"],"type":"object"}"#.into(),
                max_body_bytes: 65536,
            }),
            listeners: vec![],
        }],
        source: None,
    };
    assert_eq!(g, expected);
    // A route served on named listeners only.
    let scoped = GATEWAY.replace(
        "      hostnames: [api.example.com]\n      matches",
        "      hostnames: [api.example.com]\n      listeners: [https]\n      matches",
    );
    let dir = config_dir(&[("a.yaml", SERVICES), ("gw.yaml", &scoped)]);
    let r = load_and_compile(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.gateways[0].routes[0].listeners, ["https"]);
    assert_eq!(
        bulwark_xds::document_counts(&r)
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>(),
        ["2 Service", "1 Gateway", "1 RequestAuthentication"]
    );
}

#[test]
fn request_authentication_compiles_with_explicit_defaults() {
    let dir = config_dir(&[("a.yaml", SERVICES), ("gw.yaml", GATEWAY)]);
    let r = load_and_compile(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let mut a = r.request_authentications[0].clone();
    assert_eq!(a.source.take().unwrap().line, 31);
    let expected = pb::RequestAuthentication {
        name: "edge-jwt".into(),
        namespace: "ingress".into(),
        gateway: "edge".into(),
        providers: vec![pb::JwtProvider {
            issuer: "https://issuer.example.com".into(),
            audiences: vec!["orders-api".into()],
            jwks_file: "/etc/gw/jwks.json".into(),
            jwks_uri: String::new(),
            jwks_ca_file: String::new(),
            jwks_refresh_ms: 300_000,
            algorithms: vec!["RS256".into(), "ES256".into()],
            clock_skew_ms: 30_000,
            forward_claims: [
                ("sub".to_string(), "x-user-id".to_string()),
                ("scope".to_string(), "x-user-scopes".to_string()),
            ]
            .into(),
            forward_token: true,
        }],
        source: None,
    };
    assert_eq!(a, expected);

    // Left out: every asymmetric algorithm, a minute of skew; a URL source.
    let minimal = GATEWAY
        .replace("      algorithms: [RS256, ES256]\n      clockSkew: 30s\n", "")
        .replace(
            "jwksFile: /etc/gw/jwks.json",
            "jwksUri: https://issuer.example.com/jwks\n      jwksCaFile: /etc/gw/ca.pem\n      jwksRefresh: 90s",
        );
    let dir = config_dir(&[("a.yaml", SERVICES), ("gw.yaml", &minimal)]);
    let r = load_and_compile(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let p = &r.request_authentications[0].providers[0];
    assert_eq!(
        p.algorithms,
        [
            "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"
        ]
    );
    assert_eq!((p.clock_skew_ms, p.jwks_refresh_ms), (60_000, 90_000));
    assert_eq!(
        (
            p.jwks_uri.as_str(),
            p.jwks_ca_file.as_str(),
            p.jwks_file.as_str()
        ),
        ("https://issuer.example.com/jwks", "/etc/gw/ca.pem", "")
    );
}

#[test]
fn gateway_listener_mistakes_are_reported_with_their_lines() {
    assert_gateway_error(
        "port: 8443",
        "port: 15006",
        7,
        "15000-15021 are the proxy's own",
    );
    assert_gateway_error("port: 8443", "port: 70000", 7, "out of range 1..=65535");
    assert_gateway_error(
        "\"*.example.com\"",
        "\"api.*.com\"",
        9,
        "is not a host name",
    );
    assert_gateway_error(
        "certFile: /etc/gw/tls.crt",
        "certFile: \"\"",
        10,
        "certFile must not be empty",
    );
    assert_gateway_error(
        "      certificates:\n        - hostnames: [api.example.com, \"*.example.com\"]\n          certFile: /etc/gw/tls.crt\n          keyFile: /etc/gw/tls.key\n",
        "      certificates: []\n",
        8,
        "at least one certificate",
    );
    assert_gateway_error(
        "      clientCaFile: /etc/gw/partners.pem\n      requireClientCert: false\n",
        "      requireClientCert: true\n",
        12,
        "requireClientCert needs clientCaFile",
    );
    assert_gateway_error(
        "  routes:\n",
        "    - name: http\n      port: 8443\n      certificates: [{certFile: /a, keyFile: /b}]\n  routes:\n",
        15,
        "listener port 8443 is used twice",
    );
    assert_gateway_error(
        "kind: Gateway\n",
        "kind: Gateway\nextra: 1\n",
        3,
        "unknown field `extra`",
    );
}

#[test]
fn gateway_route_mistakes_are_reported_with_their_lines() {
    assert_gateway_error(
        "      hostnames: [api.example.com]\n      matches",
        "      hostnames: [api.example.com]\n      listeners: [https, partners]\n      matches",
        17,
        "this Gateway has no listener named partners",
    );
    // Route semantics, checked by the same code as Route rules.
    assert_gateway_error(
        "default/api, weight: 90",
        "default/nope, weight: 90",
        18,
        "unknown service default/nope",
    );
    assert_gateway_error("weight: 90", "weight: 80", 18, "sum to 90");
    assert_gateway_error(
        "methods: [GET, POST]",
        "methods: [get]",
        17,
        "did you mean GET?",
    );
    assert_gateway_error("timeout: 2s", "timeout: 2 parsecs", 20, "timeout");
    assert_gateway_error(
        "retry: {attempts: 2}",
        "retry: {attempts: 20}",
        21,
        "retry attempts 20",
    );
    assert_gateway_error(
        "      backends: [{service: default/api, weight: 90}, {service: default/api, subset: {version: v2}, weight: 10}]\n",
        "",
        15,
        "needs at least one backend",
    );
    // The edge's own.
    assert_gateway_error(
        "hostnames: [api.example.com]\n      matches",
        "hostnames: [API]\n      matches",
        16,
        "is not a host name",
    );
    assert_gateway_error(
        "scopes: [\"orders:write\"]",
        "scopes: [\"\"]",
        22,
        "authorization.scopes",
    );
    assert_gateway_error(
        "values: [gold]",
        "values: []",
        22,
        "claim tier needs at least one value",
    );
    assert_gateway_error(
        "key: \"header:X-Api-Key\"",
        "key: cookie",
        23,
        "expected subject, source-ip or header:<name>",
    );
    assert_gateway_error(
        "key: \"header:X-Api-Key\"",
        "key: \"header:bad header\"",
        23,
        "rateLimit.key: header name",
    );
    assert_gateway_error(
        "requestsPerSecond: 10",
        "requestsPerSecond: 0",
        23,
        "rateLimit.requestsPerSecond must be at least 1",
    );
    assert_gateway_error(
        "maxBodyBytes: 65536",
        "maxBodyBytes: 0",
        29,
        "validation.maxBodyBytes must be at least 1",
    );
}

#[test]
fn json_schemas_must_compile_and_be_self_contained() {
    let errs = gateway_errors("type: object\n", "type: objekt\n");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_eq!((errs[0].0.as_str(), errs[0].1), ("gw.yaml", 26));
    assert!(
        errs[0]
            .2
            .contains("validation.jsonSchema: invalid JSON Schema"),
        "{}",
        errs[0].2
    );
    assert_gateway_error(
        "          type: object\n",
        "          $ref: https://schemas.example.com/order.json\n",
        26,
        "remote reference https://schemas.example.com/order.json",
    );
    // Local references resolve without fetching anything.
    let local = GATEWAY.replace(
        "          type: object\n",
        "          $ref: \"#/$defs/order\"\n          $defs: {order: {type: object}}\n",
    );
    assert_eq!(errors(&[("a.yaml", SERVICES), ("gw.yaml", &local)]), []);
}

#[test]
fn request_authentication_mistakes_are_reported_with_their_lines() {
    assert_gateway_error(
        "issuer: https://issuer.example.com",
        "issuer: \"\"",
        37,
        "issuer must not be empty",
    );
    assert_gateway_error(
        "jwksFile: /etc/gw/jwks.json\n",
        "jwksFile: /etc/gw/jwks.json\n      jwksUri: https://issuer.example.com/jwks\n",
        40,
        "exactly one of jwksFile, jwksUri",
    );
    assert_gateway_error(
        "      jwksFile: /etc/gw/jwks.json\n",
        "",
        37,
        "give one of jwksFile, jwksUri",
    );
    assert_gateway_error(
        "jwksFile: /etc/gw/jwks.json",
        "jwksUri: http://issuer.example.com/jwks",
        39,
        "must be https",
    );
    assert_gateway_error(
        "jwksFile: /etc/gw/jwks.json",
        "jwksUri: /jwks",
        39,
        "not an absolute https URL",
    );
    assert_gateway_error(
        "audiences: [orders-api]",
        "jwksCaFile: /ca.pem",
        38,
        "jwksCaFile applies only with jwksUri",
    );
    assert_gateway_error(
        "[RS256, ES256]",
        "[RS256, none]",
        40,
        "an unsigned token proves nothing",
    );
    assert_gateway_error(
        "[RS256, ES256]",
        "[RS256, HS256]",
        40,
        "algorithm confusion",
    );
    assert_gateway_error("[RS256, ES256]", "[RS256, XS1]", 40, "unknown algorithm");
    assert_gateway_error("clockSkew: 30s", "clockSkew: soon", 41, "clockSkew");
    assert_gateway_error(
        "clockSkew: 30s",
        "jwksRefresh: 0s",
        41,
        "jwksRefresh must be longer than 0",
    );
    assert_gateway_error("sub: X-User-Id", "sub: Connection", 42, "hop-by-hop");
    assert_gateway_error("sub: X-User-Id", "sub: \":path\"", 42, "pseudo-header");
    assert_gateway_error(
        "sub: X-User-Id",
        "sub: x-bulwark-peer-identity",
        42,
        "reserved",
    );
    assert_gateway_error(
        "sub: X-User-Id",
        "sub: X-User-Scopes",
        42,
        "both go to header",
    );
    // A gateway elsewhere: the reference, and the routes that now have no
    // token to check.
    let errs = gateway_errors("gateway: edge", "gateway: edgy");
    let shown: Vec<(u32, bool)> = errs
        .iter()
        .map(|(_, l, m)| {
            (
                *l,
                m.contains("unknown gateway ingress/edgy")
                    || m.contains("no RequestAuthentication applies to gateway ingress/edge"),
            )
        })
        .collect();
    assert_eq!(shown, [(22, true), (35, true)], "{errs:#?}");
    let second = format!(
        "{GATEWAY}---\n{}",
        &GATEWAY[GATEWAY
            .find("apiVersion: bulwark.dev/v1\nkind: RequestAuthentication")
            .unwrap()..]
            .replace("name: edge-jwt", "name: more-jwt")
    );
    assert_one_error(
        &[("a.yaml", SERVICES), ("gw.yaml", &second)],
        "gw.yaml",
        49,
        "already has a RequestAuthentication",
    );
}

#[test]
fn defaults_are_filled_in_when_compiling() {
    let text = r#"apiVersion: bulwark.dev/v1
kind: Route
metadata:
  name: api
spec:
  service: api
  rules:
    - retry:
        attempts: 2
---
apiVersion: bulwark.dev/v1
kind: TrafficPolicy
metadata:
  name: api
spec:
  service: api
  circuitBreaker:
    consecutiveFailures: 3
"#;
    let dir = config_dir(&[("a.yaml", SERVICES), ("r.yaml", text)]);
    let r = &load_and_compile(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert!(r.mesh.is_none());
    let retry = r.routes[0].rules[0].retry.as_ref().unwrap();
    assert_eq!((retry.backoff_base_ms, retry.backoff_max_ms), (25, 250));
    assert_eq!(
        retry.retry_on,
        ["gateway-error", "connect-failure", "reset"]
    );
    assert_eq!(retry.budget_ratio, 0.2);
    let cb = r.traffic_policies[0].circuit_breaker.as_ref().unwrap();
    assert_eq!(
        (cb.window_ms, cb.open_ms, cb.half_open_requests),
        (10_000, 5_000, 1)
    );
    assert_eq!(
        r.traffic_policies[0].lb,
        pb::LbAlgorithm::P2cLeastRequest as i32
    );
}

#[test]
fn hidden_and_non_yaml_files_are_ignored() {
    let dir = config_dir(&[
        ("a.yaml", SERVICES),
        (".a.yaml.swp", "garbage: ["),
        ("README.md", "# not config"),
    ]);
    std::fs::create_dir(dir.path().join("..data")).unwrap();
    std::fs::write(dir.path().join("..data/a.yaml"), SERVICES).unwrap();
    let r = load_and_compile(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.services.len(), 2);
}

#[test]
fn missing_path_is_reported_without_a_line() {
    let err = load_and_compile(Path::new("/nonexistent/bulwark-config")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "/nonexistent/bulwark-config: no such file or directory"
    );
}

#[test]
fn errors_display_one_per_line_as_file_line_message() {
    let dir = config_dir(&[(
        "s.yaml",
        "apiVersion: bulwark.dev/v1\nkind: Service\nmetadata:\n  name: A\nspec:\n  ports: [{port: 0}]\n",
    )]);
    let err = load_and_compile(dir.path()).unwrap_err();
    let shown = err.to_string();
    let file = dir.path().join("s.yaml");
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), 2, "{shown}");
    assert!(
        lines[0].starts_with(&format!("{}:4: ", file.display())),
        "{shown}"
    );
    assert!(
        lines[1].starts_with(&format!("{}:6: ", file.display())),
        "{shown}"
    );
}

#[test]
fn route_rate_limits_compile_per_rule_and_bad_values_are_reported() {
    let route = r#"apiVersion: bulwark.dev/v1
kind: Route
metadata:
  name: api
spec:
  service: api
  rules:
    - name: search
      matches:
        - path: {prefix: /search}
      rateLimit:
        requestsPerSecond: 5
        perSourceIdentity: true
    - name: rest
      retry:
        attempts: 2
        retryOn: [unavailable, resource-exhausted, 5xx]
"#;
    let dir = config_dir(&[("a.yaml", SERVICES), ("route.yaml", route)]);
    let r = load_and_compile(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let rules = &r.routes[0].rules;
    assert_eq!(
        rules[0].rate_limit,
        Some(pb::RateLimit {
            requests_per_second: 5,
            burst: 5,
            per_source_identity: true,
        }),
        "burst defaults to the rate"
    );
    assert_eq!(rules[1].rate_limit, None);
    assert_eq!(
        rules[1].retry.as_ref().unwrap().retry_on,
        ["unavailable", "resource-exhausted", "5xx"]
    );

    // (what to change, into what) → the one error, at route.yaml:line.
    let mistakes = [
        (
            "requestsPerSecond: 5",
            "requestsPerSecond: 0",
            12,
            "rateLimit.requestsPerSecond must be at least 1",
        ),
        (
            "perSourceIdentity: true",
            "burst: 0",
            13,
            "rateLimit.burst must be at least 1",
        ),
        (
            "perSourceIdentity",
            "perSourceIdentiy",
            13,
            "unknown field `perSourceIdentiy`",
        ),
        (
            "unavailable,",
            "unavailble,",
            17,
            "unknown condition `unavailble`",
        ),
    ];
    for (from, to, line, needle) in mistakes {
        let bad = route.replace(from, to);
        assert_one_error(
            &[("a.yaml", SERVICES), ("route.yaml", &bad)],
            "route.yaml",
            line,
            needle,
        );
    }
    // The limit lives at the route's own service: a rule sending elsewhere
    // could not enforce it.
    let elsewhere = route.replace(
        "      rateLimit:\n",
        "      backends:\n        - service: web\n      rateLimit:\n",
    );
    assert_one_error(
        &[("a.yaml", SERVICES), ("route.yaml", &elsewhere)],
        "route.yaml",
        14,
        "also sends to `web`",
    );
}

#[test]
fn traffic_policy_rate_limit_may_be_per_source_identity() {
    let policy = r#"apiVersion: bulwark.dev/v1
kind: TrafficPolicy
metadata:
  name: api
spec:
  service: api
  rateLimit:
    requestsPerSecond: 100
    burst: 20
    perSourceIdentity: true
"#;
    let dir = config_dir(&[("a.yaml", SERVICES), ("p.yaml", policy)]);
    let r = load_and_compile(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let rl = r.traffic_policies[0].rate_limit.unwrap();
    assert_eq!((rl.requests_per_second, rl.burst), (100, 20));
    assert!(rl.per_source_identity);
}

fn adaptive_policy(body: &str) -> String {
    format!(
        "apiVersion: bulwark.dev/v1\nkind: TrafficPolicy\nmetadata:\n  name: api\nspec:\n  service: api\n  adaptiveConcurrency:\n{body}"
    )
}

/// The compiled `adaptiveConcurrency` of a policy with this body.
fn compiled_adaptive(body: &str) -> pb::AdaptiveConcurrency {
    let dir = config_dir(&[("a.yaml", SERVICES), ("p.yaml", &adaptive_policy(body))]);
    let r = load_and_compile(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    r.traffic_policies[0].adaptive_concurrency.unwrap()
}

#[test]
fn adaptive_concurrency_compiles_with_explicit_defaults() {
    let cases = [
        ("    maxLimit: 64\n", (1, 64, 20, 100), 2.0),
        // The default initial limit is brought within a narrower range.
        (
            "    minLimit: 2\n    maxLimit: 8\n    latencyTolerance: 1.5\n    sampleWindow: 250ms\n",
            (2, 8, 8, 250),
            1.5,
        ),
    ];
    for (body, limits, tolerance) in cases {
        let a = compiled_adaptive(body);
        assert_eq!(
            (
                a.min_limit,
                a.max_limit,
                a.initial_limit,
                a.sample_window_ms
            ),
            limits,
            "{body}"
        );
        assert_eq!(a.latency_tolerance, tolerance, "{body}");
    }
}

#[test]
fn adaptive_concurrency_mistakes_are_reported_with_their_lines() {
    let cases: [(&str, u32, &str); 7] = [
        (
            "    minLimit: 0\n",
            8,
            "adaptiveConcurrency.minLimit must be at least 1",
        ),
        (
            "    minLimit: 10\n    maxLimit: 5\n",
            9,
            "minLimit 10 is above maxLimit 5",
        ),
        (
            "    minLimit: 2000\n",
            8,
            "above maxLimit 1000 (the default)",
        ),
        (
            "    minLimit: 4\n    initialLimit: 2\n",
            9,
            "initialLimit 2 is outside minLimit..=maxLimit (4..=1000)",
        ),
        (
            "    latencyTolerance: 1.0\n",
            8,
            "latencyTolerance 1 must be a ratio above 1",
        ),
        (
            "    sampleWindow: 0s\n",
            8,
            "adaptiveConcurrency.sampleWindow must be longer than 0",
        ),
        ("    samplewindow: 1s\n", 8, "samplewindow"),
    ];
    for (body, line, needle) in cases {
        assert_one_error(
            &[("a.yaml", SERVICES), ("p.yaml", &adaptive_policy(body))],
            "p.yaml",
            line,
            needle,
        );
    }
}
