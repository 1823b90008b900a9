//! The edge gateway end to end in network namespaces: an outside client
//! (curl in a pod without a sidecar, trusting only the gateway's public CA)
//! calls through the gateway (`bulwark sidecar --mode gateway`) into a mesh
//! service over mTLS; JWT authentication with a JWKS file, claims
//! authorization, per-client rate limits, JSON Schema validation,
//! certificate and key rotation without restarts, and the audit trail.

mod common;
mod netns;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::wait_for;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use netns::mesh::{Mesh, TD, metric_sum, spiffe};

const HOST: &str = "api.example.com";
const ISSUER: &str = "https://issuer.example.com";
const AUDIENCE: &str = "orders-api";
const ORDERS_VIP: &str = "198.18.100.9";
const XDS: &str = "198.18.0.1:15010";

/// Two cores: one mesh at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A signing key and its public half, as a JWKS entry.
struct SigningKey {
    kid: String,
    pair: rcgen::KeyPair,
}

impl SigningKey {
    fn new(kid: &str) -> Self {
        Self {
            kid: kid.to_string(),
            pair: rcgen::KeyPair::generate().unwrap(), // ECDSA P-256
        }
    }

    fn encoding(&self) -> EncodingKey {
        EncodingKey::from_ec_pem(self.pair.serialize_pem().as_bytes()).unwrap()
    }

    fn jwk(&self) -> serde_json::Value {
        let mut jwk =
            jsonwebtoken::jwk::Jwk::from_encoding_key(&self.encoding(), Algorithm::ES256).unwrap();
        jwk.common.key_id = Some(self.kid.clone());
        serde_json::to_value(jwk).unwrap()
    }

    fn sign(&self, claims: &serde_json::Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&h, claims, &self.encoding()).unwrap()
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(sub: &str, scope: &str) -> serde_json::Value {
    serde_json::json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "scope": scope,
        "iat": now(), "exp": now() + 600,
    })
}

fn write_jwks(path: &Path, keys: &[&SigningKey]) {
    let set = serde_json::json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()});
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, set.to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A public CA and a server certificate for `HOST` signed by it.
fn write_public_cert(dir: &Path, ca_name: &str) -> PathBuf {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec![HOST.to_string()]).unwrap();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, HOST);
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    // Key first, then certificate: the gateway reloads when either changes
    // and keeps the old pair while they do not match.
    write_atomic(&dir.join("tls.key"), &key.serialize_pem());
    write_atomic(&dir.join("tls.crt"), &cert.pem());
    let ca_file = dir.join(format!("{ca_name}.pem"));
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    ca_file
}

/// A partner CA (`partner-ca.pem`) and a client certificate it signed
/// (`partner.crt`, `partner.key`), plus one from a stranger's CA.
fn write_partner_pki(dir: &Path) {
    let client = |ca_name: &str, prefix: &str| {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, ca_name);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::new(vec!["partner.example.net".into()]).unwrap();
        leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{prefix}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{prefix}.key")), key.serialize_pem()).unwrap();
        ca_cert.pem()
    };
    std::fs::write(dir.join("partner-ca.pem"), client("Partner CA", "partner")).unwrap();
    client("Stranger CA", "stranger");
}

/// Writes `text` to `path` by rename, owner-only (the gateway refuses a
/// private key other users can read).
fn write_atomic(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

const SCHEMA: &str = r#"{type: object, required: [item, quantity], additionalProperties: false, properties: {item: {type: string, minLength: 1}, quantity: {type: integer, minimum: 1}}}"#;

/// More mesh services behind the gateway: (name, pod IP), each callable by
/// the gateway; `routes` are Gateway route entries for them.
struct Backends<'a> {
    services: Vec<(&'a str, String)>,
    routes: &'a str,
    /// More YAML documents (TrafficPolicies for them, say).
    docs: &'a str,
    /// More JWT providers, items of the gateway's one RequestAuthentication.
    providers: &'a str,
}

fn backend_docs(services: &[(&str, String)]) -> String {
    let gw = spiffe("edge-gateway");
    services
        .iter()
        .map(|(name, ip)| {
            let id = spiffe(name);
            format!(
                "---\napiVersion: bulwark.dev/v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  ports:\n    - port: 8080\n      protocol: http\n  identities: [{id}]\n---\napiVersion: bulwark.dev/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\nspec:\n  location: MESH_INTERNAL\n  ports:\n    - port: 8080\n      protocol: http\n  endpoints:\n    - address: {ip}\n      identity: {id}\n---\napiVersion: bulwark.dev/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}-from-the-edge\nspec:\n  service: {name}\n  rules:\n    - from: [{gw}]\n"
            )
        })
        .collect()
}

fn config(api_ip: &str, dir: &Path, more: &Backends<'_>) -> String {
    let api = spiffe("orders");
    let gw = spiffe("edge-gateway");
    let d = dir.display();
    let more_routes = more.routes;
    let more_docs = backend_docs(&more.services) + more.docs;
    let more_providers = more.providers;
    format!(
        r#"apiVersion: bulwark.dev/v1
kind: MeshConfig
metadata:
  name: mesh
spec:
  trustDomain: {TD}
---
apiVersion: bulwark.dev/v1
kind: Service
metadata:
  name: orders
spec:
  ports:
    - port: 8080
      protocol: http
  identities: [{api}]
  addresses: [{ORDERS_VIP}]
---
apiVersion: bulwark.dev/v1
kind: ServiceEntry
metadata:
  name: orders
spec:
  location: MESH_INTERNAL
  ports:
    - port: 8080
      protocol: http
  endpoints:
    - address: {api_ip}
      identity: {api}
---
apiVersion: bulwark.dev/v1
kind: AuthorizationPolicy
metadata:
  name: orders-from-the-edge
spec:
  service: orders
  rules:
    - from: [{gw}]
---
apiVersion: bulwark.dev/v1
kind: Gateway
metadata:
  name: edge
spec:
  listeners:
    - name: https
      port: 8443
      certificates:
        - hostnames: [{HOST}]
          certFile: {d}/tls.crt
          keyFile: {d}/tls.key
    - name: partners
      port: 9443
      certificates:
        - hostnames: [{HOST}]
          certFile: {d}/tls.crt
          keyFile: {d}/tls.key
      clientCaFile: {d}/partner-ca.pem
      requireClientCert: true
  routes:
{more_routes}    - name: split
      matches: [{{path: {{prefix: /split}}}}]
      backends:
        - {{service: orders, weight: 50}}
        - {{service: orders, subset: {{version: v9}}, weight: 50}}
      timeout: 5s
    - name: partner-only
      listeners: [partners]
      matches: [{{path: {{prefix: /partner-only}}}}]
      backends: [{{service: orders}}]
    - name: public
      matches: [{{path: {{prefix: /public}}}}]
      backends: [{{service: orders}}]
    - name: bench
      matches: [{{path: {{prefix: /bench}}}}]
      backends: [{{service: orders}}]
      authorization: {{requireAuthenticated: true}}
    - name: create
      matches: [{{path: {{exact: /orders/new}}, methods: [POST]}}]
      backends: [{{service: orders}}]
      authorization: {{requireAuthenticated: true, scopes: ["orders:write"]}}
      validation:
        maxBodyBytes: 256
        jsonSchema: {SCHEMA}
    - name: orders
      matches: [{{path: {{prefix: /orders}}}}]
      backends: [{{service: orders}}]
      authorization: {{requireAuthenticated: true, scopes: ["orders:read"]}}
      rateLimit: {{key: subject, requestsPerSecond: 1, burst: 3}}
---
apiVersion: bulwark.dev/v1
kind: RequestAuthentication
metadata:
  name: edge-jwt
spec:
  gateway: edge
  providers:
    - issuer: {ISSUER}
      audiences: [{AUDIENCE}]
      jwksFile: {d}/jwks.json
      algorithms: [ES256]
      clockSkew: 5s
      forwardClaims: {{sub: x-user-id}}
{more_providers}{more_docs}"#
    )
}

struct Edge {
    mesh: Mesh,
    dir: PathBuf,
    gw_ip: String,
    public_ca: PathBuf,
    key1: SigningKey,
}

/// CA, the `orders` service (app echoing what reached it), the gateway, and
/// an outside pod with no sidecar.
fn start() -> Option<Edge> {
    start_with(false)
}

/// [`start`], with the config served by a control plane (`xds`) or read
/// from a local file by each proxy.
fn start_with(xds: bool) -> Option<Edge> {
    start_full(xds, &[], "", "")
}

/// [`start_with`] plus a pod per `(service, app args)` in `more`, and
/// `routes` (Gateway route entries) to them.
fn start_full(xds: bool, more: &[(&str, &[&str])], routes: &str, docs: &str) -> Option<Edge> {
    start_gateway(xds, more, routes, docs, "", &[])
}

/// [`start_full`] with `providers` (more JWT providers) and `gw_extra`
/// (more flags for the gateway).
fn start_gateway(
    xds: bool,
    more: &[(&str, &[&str])],
    routes: &str,
    docs: &str,
    providers: &str,
    gw_extra: &[&str],
) -> Option<Edge> {
    let mut mesh = Mesh::start(&[])?;
    let dir = mesh.net.dir.join("edge");
    std::fs::create_dir_all(&dir).unwrap();
    let public_ca = write_public_cert(&dir, "public-ca");
    let key1 = SigningKey::new("k1");
    write_jwks(&dir.join("jwks.json"), &[&key1]);
    write_partner_pki(&dir);

    let api = mesh.add_pod("orders");
    let gw = mesh.add_pod("gw");
    mesh.add_pod("outside");
    let services: Vec<(&str, String)> = more
        .iter()
        .map(|(name, _)| (*name, mesh.add_pod(name).ip.to_string()))
        .collect();
    let yaml = config(
        &api.ip.to_string(),
        &dir,
        &Backends {
            services,
            routes,
            docs,
            providers,
        },
    );
    if xds {
        mesh.write_cp_file("mesh.yaml", &yaml);
        mesh.start_control_plane("cp", 15010);
    } else {
        mesh.write_config(&yaml);
    }
    for (name, args) in more {
        mesh.set_app_args(name, args);
        mesh.start_sidecar(name, name, &[]);
    }
    mesh.set_app_args(
        "orders",
        &[
            "--echo-header",
            "x-user-id",
            "--echo-header",
            "authorization",
            "--echo-header",
            "x-forwarded-proto",
            "--echo-header",
            "traceparent",
        ],
    );
    if xds {
        mesh.start_sidecar_xds_with("orders", "orders", XDS, &[], &[]);
    } else {
        mesh.start_sidecar("orders", "orders", &[]);
    }
    let audit_key = dir.join("audit.key");
    std::fs::write(&audit_key, "00112233445566778899aabbccddeeff").unwrap();
    std::fs::set_permissions(
        &audit_key,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let audit_dir = dir.join("audit");
    // The gateway pod captures only its app port: 8443 is the gateway's own.
    let init = ["--inbound-ports", "8080"];
    let gw_args = [
        &[
            "--mode",
            "gateway",
            "--gateway",
            "edge",
            "--audit-dir",
            audit_dir.to_str().unwrap(),
            "--audit-key-file",
            audit_key.to_str().unwrap(),
        ],
        gw_extra,
    ]
    .concat();
    if xds {
        mesh.start_sidecar_xds_with("gw", "edge-gateway", XDS, &init, &gw_args);
    } else {
        mesh.start_sidecar_with("gw", "edge-gateway", &init, &gw_args);
    }
    mesh.wait_ready("orders");
    mesh.wait_ready("gw");
    let edge = Edge {
        mesh,
        dir,
        gw_ip: gw.ip.to_string(),
        public_ca,
        key1,
    };
    wait_for(
        "the gateway's public listener",
        Duration::from_secs(20),
        || (edge.call("/public/ping", None, &[]).0 == 200).then_some(()),
    );
    Some(edge)
}

/// One curl from the outside pod; (status, headers and body).
impl Edge {
    fn curl(&self, ca: &Path, path: &str, token: Option<&str>, extra: &[&str]) -> (u16, String) {
        self.curl_port(8443, ca, path, token, extra)
    }

    fn curl_port(
        &self,
        port: u16,
        ca: &Path,
        path: &str,
        token: Option<&str>,
        extra: &[&str],
    ) -> (u16, String) {
        let resolve = format!("{HOST}:{port}:{}", self.gw_ip);
        let url = format!("https://{HOST}:{port}{path}");
        let auth = token.map(|t| format!("authorization: Bearer {t}"));
        let mut args = vec![
            "curl",
            "-sS",
            "-i",
            "--max-time",
            "10",
            "--cacert",
            ca.to_str().unwrap(),
            "--resolve",
            &resolve,
        ];
        if let Some(a) = &auth {
            args.extend_from_slice(&["-H", a]);
        }
        args.extend_from_slice(extra);
        args.push(&url);
        let ns = &self.mesh.pod("outside").pod.ns;
        let o = self.mesh.net.exec(ns, &args);
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if status == 0 {
            return (0, String::from_utf8_lossy(&o.stderr).to_string());
        }
        (status, text)
    }

    fn call(&self, path: &str, token: Option<&str>, extra: &[&str]) -> (u16, String) {
        self.curl(&self.public_ca, path, token, extra)
    }

    /// A call to the partners' listener (9443), with the client
    /// certificate `prefix`.crt if any.
    fn partner_call(&self, prefix: Option<&str>) -> (u16, String) {
        self.partner_call_to(prefix, "/public/partner")
    }

    /// [`Edge::partner_call`] to `path`.
    fn partner_call_to(&self, prefix: Option<&str>, path: &str) -> (u16, String) {
        let files = prefix.map(|p| {
            let f = |ext: &str| self.dir.join(format!("{p}.{ext}")).display().to_string();
            (f("crt"), f("key"))
        });
        let extra: Vec<&str> = match &files {
            Some((cert, key)) => vec!["--cert", cert, "--key", key],
            None => Vec::new(),
        };
        self.curl_port(9443, &self.public_ca, path, None, &extra)
    }
}

#[test]
fn gateway_authenticates_outside_callers_and_routes_them_into_the_mesh() {
    let _g = serial();
    let Some(edge) = start() else { return };
    let k1 = &edge.key1;

    // Public TLS from a client that trusts only the public CA; the service
    // sees the gateway's SPIFFE ID, and a client cannot forge claim headers.
    let (code, text) = edge.call("/public/hello", None, &["-H", "x-user-id: mallory"]);
    assert_eq!(code, 200, "{text}");
    assert!(
        text.contains(&format!("caller={}", spiffe("edge-gateway"))),
        "the service must see the gateway's identity: {text}"
    );
    assert!(
        text.contains("x-user-id=-"),
        "spoofed claim header must be stripped: {text}"
    );
    assert!(text.contains("x-forwarded-proto=https"), "{text}");

    // A valid token: claims forwarded, the token itself not.
    let alice = k1.sign(&claims("alice", "orders:read orders:write"));
    let (code, text) = edge.call("/orders/1", Some(&alice), &[]);
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("x-user-id=alice"), "{text}");
    assert!(
        text.contains("authorization=-"),
        "the bearer token stays at the edge: {text}"
    );

    // No token where one is required; a token without the scope.
    let (code, text) = edge.call("/orders/1", None, &[]);
    assert_eq!(code, 401, "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{text}"
    );
    // Other spellings of a protected path are refused, never matched
    // against another route (`--path-as-is`: curl would fold some itself).
    for path in [
        "//orders/1",
        "/public/../orders/1",
        "/%6Frders/1",
        "/public/%2e%2e/orders/1",
        "/orders%2F1",
    ] {
        let (code, text) = edge.call(path, None, &["--path-as-is"]);
        assert_eq!(code, 400, "{path}: {text}");
        assert!(text.contains("non-canonical-path"), "{path}: {text}");
    }
    // Headers a client lists in `Connection` cannot take away the ones
    // the gateway adds.
    let (code, text) = edge.call(
        "/orders/1",
        Some(&alice),
        &[
            "--http1.1",
            "-H",
            "Connection: x-user-id, x-forwarded-proto",
        ],
    );
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("x-user-id=alice"), "{text}");
    assert!(text.contains("x-forwarded-proto=https"), "{text}");
    let reader = k1.sign(&claims("bob", "orders:read"));
    let (code, text) = edge.call("/orders/new", Some(&reader), &["-X", "POST", "-d", "{}"]);
    assert_eq!(code, 403, "{text}");
    assert!(text.contains("insufficient_scope"), "{text}");

    // Every kind of bad token: 401 with a WWW-Authenticate header, never a 5xx.
    let mut expired = claims("alice", "orders:read");
    expired["exp"] = serde_json::json!(now() - 3600);
    let mut wrong_aud = claims("alice", "orders:read");
    wrong_aud["aud"] = serde_json::json!("someone-else");
    let mut wrong_iss = claims("alice", "orders:read");
    wrong_iss["iss"] = serde_json::json!("https://evil.example.com");
    let good = k1.sign(&claims("alice", "orders:read"));
    let (h, p, s) = {
        let mut it = good.split('.');
        (it.next().unwrap(), it.next().unwrap(), it.next().unwrap())
    };
    let mut admin = claims("alice", "orders:read");
    admin["sub"] = serde_json::json!("admin");
    let tampered = format!("{h}.{}.{s}", B64.encode(admin.to_string()));
    let none = format!(
        "{}.{}.",
        B64.encode(r#"{"alg":"none","typ":"JWT","kid":"k1"}"#),
        B64.encode(claims("alice", "orders:read").to_string())
    );
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("k1".into());
    let confused = jsonwebtoken::encode(
        &hs,
        &claims("alice", "orders:read"),
        &EncodingKey::from_secret(k1.pair.public_key_pem().as_bytes()),
    )
    .unwrap();
    let stranger = SigningKey::new("k9");
    let unknown_kid = stranger.sign(&claims("alice", "orders:read"));
    let _ = p;
    for (what, token) in [
        ("expired", k1.sign(&expired)),
        ("wrong audience", k1.sign(&wrong_aud)),
        ("wrong issuer", k1.sign(&wrong_iss)),
        ("bad signature", tampered),
        ("alg none", none),
        ("HS256 with the public key", confused),
        ("unknown kid", unknown_kid),
        ("garbage", "not.a.jwt".to_string()),
    ] {
        let (code, text) = edge.call("/orders/1", Some(&token), &[]);
        assert_eq!(code, 401, "{what}: {text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("www-authenticate: bearer")
                && text.contains("invalid_token"),
            "{what}: {text}"
        );
    }

    // Key rotation: a new key in the JWKS file is used without a restart.
    let k2 = SigningKey::new("k2");
    write_jwks(&edge.dir.join("jwks.json"), &[k1, &k2]);
    let carol = k2.sign(&claims("carol", "orders:read"));
    wait_for(
        "the rotated JWKS to be picked up",
        Duration::from_secs(10),
        || (edge.call("/orders/2", Some(&carol), &[]).0 == 200).then_some(()),
    );

    // Certificate rotation: a certificate from another CA replaces the
    // listener's without a restart.
    let new_ca = write_public_cert(&edge.dir, "public-ca-2");
    wait_for(
        "the renewed public certificate",
        Duration::from_secs(10),
        || (edge.curl(&new_ca, "/public/x", None, &[]).0 == 200).then_some(()),
    );
    let (code, _) = edge.curl(&edge.public_ca, "/public/x", None, &[]);
    assert_eq!(code, 0, "the old CA no longer verifies the listener");

    // The audit trail names the outside caller and their scopes.
    let audit = std::fs::read_dir(edge.dir.join("audit"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect::<String>();
    // Records are flushed on a short timer; wait for alice's.
    let audit = if audit.contains("alice") {
        audit
    } else {
        wait_for(
            "the audit record of alice's call",
            Duration::from_secs(10),
            || {
                let a = std::fs::read_dir(edge.dir.join("audit"))
                    .ok()?
                    .flatten()
                    .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                    .collect::<String>();
                a.contains("alice").then_some(a)
            },
        )
    };
    let line = audit
        .lines()
        .find(|l| l.contains(&format!("{ISSUER}#alice")) && l.contains("orders:write"))
        .unwrap_or_else(|| panic!("no audit record with alice's subject and scopes:\n{audit}"));
    assert!(
        line.contains("\"allow\"") || line.contains("Allow"),
        "{line}"
    );
    assert!(
        audit
            .lines()
            .any(|l| l.contains(&format!("{ISSUER}#bob")) && l.contains("missing")),
        "bob's refusal is audited:\n{audit}"
    );

    let m = edge.mesh.metrics("gw");
    assert!(
        metric_sum(
            &m,
            "bulwark_requests_total",
            &["direction=\"gateway\"", "code=\"401\""]
        ) >= 9.0,
        "{m}"
    );

    // Route semantics inside the mesh are the sidecar's: a 50/50 split
    // between the service and a subset nobody serves (a fast 503 that says
    // why) lands near half and half.
    let (mut served, mut unserved) = (0, 0);
    for _ in 0..60 {
        let (code, text) = edge.curl(&new_ca, "/split/x", None, &[]);
        match code {
            200 => served += 1,
            503 if text
                .to_ascii_lowercase()
                .contains("x-bulwark-reason: no-healthy-endpoint") =>
            {
                unserved += 1
            }
            _ => panic!("unexpected answer: {text}"),
        }
    }
    println!("gateway 50/50 split: {served} served, {unserved} to the empty subset");
    assert!((15..=45).contains(&served), "{served} of 60 served");
}

#[test]
fn a_client_traceparent_cannot_force_the_gateway_to_sample() {
    let _g = serial();
    // Tracing on, sampling none of the traces the gateway decides on. The
    // collector address is never reached: nothing is sampled.
    let tracing = [
        "--otlp-endpoint",
        "http://127.0.0.1:9",
        "--trace-sample-ratio",
        "0",
    ];
    let Some(edge) = start_gateway(false, &[], "", "", "", &tracing) else {
        return;
    };
    let id = "4bf92f3577b34da6a3ce929d0e0e4736";
    for flags in ["01", "00"] {
        let parent = format!("traceparent: 00-{id}-00f067aa0ba902b7-{flags}");
        let (code, text) = edge.call("/public/hello", None, &["-H", &parent]);
        assert_eq!(code, 200, "{text}");
        // The service's trace continues the client's trace id (logs still
        // correlate), under the gateway's span, and is not sampled.
        let seen = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("traceparent="))
            .unwrap_or_else(|| panic!("no traceparent reached the service: {text}"));
        assert!(seen.starts_with(&format!("00-{id}-")), "{seen}");
        assert!(
            !seen.contains("00f067aa0ba902b7"),
            "the gateway's span is the parent: {seen}"
        );
        assert!(
            seen.ends_with("-00"),
            "a client's sampled flag was followed: {seen}"
        );
    }
}

#[test]
fn gateway_limits_each_client_and_validates_bodies() {
    let _g = serial();
    let Some(edge) = start() else { return };
    let k1 = &edge.key1;
    let noisy = k1.sign(&claims("noisy", "orders:read orders:write"));
    let quiet = k1.sign(&claims("quiet", "orders:read orders:write"));

    // One noisy client: at most its burst (3) plus what refills during the
    // run gets through; then 429 with the back-off headers.
    let mut ok = 0;
    let mut limited = None;
    let t = Instant::now();
    for _ in 0..10 {
        let (code, text) = edge.call("/orders/list", Some(&noisy), &[]);
        match code {
            200 => ok += 1,
            429 => limited = Some(text),
            other => panic!("unexpected {other}: {text}"),
        }
    }
    let limited = limited.expect("the noisy client is limited");
    let lower = limited.to_ascii_lowercase();
    for h in [
        "retry-after:",
        "ratelimit-limit:",
        "ratelimit-remaining: 0",
        "ratelimit-reset:",
        "x-bulwark-reason: rate-limited",
    ] {
        assert!(lower.contains(h), "missing {h}: {limited}");
    }
    // The burst, plus one for each second the calls took (and one for the
    // second under way).
    let most = 3 + t.elapsed().as_secs() as usize + 1;
    assert!(
        (3..=most).contains(&ok),
        "burst 3 at 1/s, got {ok} through (at most {most})"
    );
    // Meanwhile another client keeps getting through.
    for _ in 0..3 {
        let (code, text) = edge.call("/orders/list", Some(&quiet), &[]);
        assert_eq!(code, 200, "the quiet client is not limited: {text}");
    }

    // Request validation: valid JSON passes, invalid gets 400 with a reason,
    // too large gets 413; none of those reach the service.
    let json = ["-X", "POST", "-H", "content-type: application/json"];
    let post = |body: &str| {
        let mut a = json.to_vec();
        a.extend_from_slice(&["--data-binary", body]);
        edge.call("/orders/new", Some(&quiet), &a)
    };
    let (code, text) = post(r#"{"item":"book","quantity":2}"#);
    assert_eq!(code, 200, "{text}");
    let (code, text) = post(r#"{"item":"book","quantity":0}"#);
    assert_eq!(code, 400, "{text}");
    assert!(
        text.contains("\"error\":\"invalid-body\"") && text.contains("quantity"),
        "{text}"
    );
    let (code, text) = post("not json");
    assert_eq!(code, 400, "{text}");
    let big = format!(r#"{{"item":"{}","quantity":1}}"#, "x".repeat(400));
    let (code, text) = post(&big);
    assert_eq!(code, 413, "{text}");

    let m = edge.mesh.metrics("gw");
    assert!(
        metric_sum(&m, "bulwark_ratelimit_rejections_total", &[]) >= 1.0,
        "{m}"
    );
    let served = metric_sum(
        &edge.mesh.metrics("orders"),
        "bulwark_requests_total",
        &["direction=\"inbound\""],
    );
    // One ping from start(), the noisy client's successes, 3 quiet GETs, 1 valid POST.
    assert!(
        served <= (ok + 5) as f64,
        "refused requests must not reach the service: {served}"
    );
}

#[test]
fn partners_need_a_client_certificate_and_garbage_does_not_hurt_the_gateway() {
    let _g = serial();
    let Some(edge) = start() else { return };
    let (code, text) = edge.partner_call(Some("partner"));
    assert_eq!(code, 200, "a partner certificate is accepted: {text}");
    let (code, text) = edge.partner_call(None);
    assert_eq!(code, 0, "no client certificate, no connection: {text}");
    let (code, text) = edge.partner_call(Some("stranger"));
    assert_eq!(code, 0, "a certificate from another CA is refused: {text}");
    // A route served on the partners' listener only: a verified partner
    // certificate reaches it, the public listener does not serve it.
    let (code, text) = edge.partner_call_to(Some("partner"), "/partner-only/x");
    assert_eq!(code, 200, "{text}");
    let (code, text) = edge.call("/partner-only/x", None, &[]);
    assert_eq!(
        code, 404,
        "the public listener serves a partners' route: {text}"
    );
    assert!(text.contains("x-bulwark-reason: no-route"), "{text}");

    // Plain-text garbage and a half-open connection on the public port:
    // closed, counted as failed handshakes, and the gateway keeps serving.
    let ns = edge.mesh.pod("outside").pod.ns.clone();
    let addr: std::net::SocketAddr = format!("{}:8443", edge.gw_ip).parse().unwrap();
    let closed = edge.mesh.net.in_ns(&ns, move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff garbage")
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut buf = [0u8; 512];
        // Whatever alert comes back, the gateway must end the connection.
        loop {
            match s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
    });
    assert!(closed, "the gateway closes a connection that speaks no TLS");
    let (code, text) = edge.call("/public/after", None, &[]);
    assert_eq!(code, 200, "{text}");
    // Counted once the accept has given the socket up, just after the
    // client sees it closed.
    wait_for(
        "failed handshakes to be counted",
        Duration::from_secs(5),
        || {
            let m = edge.mesh.metrics("gw");
            let failed = metric_sum(
                &m,
                "bulwark_tls_handshakes_total",
                &["direction=\"gateway\"", "result=\"error\""],
            );
            (failed >= 3.0).then_some(())
        },
    );
}

/// A TCP connection to the gateway's public port from the outside pod
/// (run in its namespace), and whether the gateway still holds it after
/// `wait`: reset when refused, waiting for a TLS ClientHello (up to its
/// 10 s handshake timeout) when taken.
fn held_open(addr: std::net::SocketAddr, wait: Duration) -> (std::net::TcpStream, bool) {
    let s = std::net::TcpStream::connect(addr).unwrap();
    let open = still_open(&s, wait);
    (s, open)
}

fn still_open(s: &std::net::TcpStream, wait: Duration) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(wait)).unwrap();
    matches!(
        (&*s).read(&mut [0u8; 1]),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
    )
}

#[test]
fn one_client_cannot_hold_every_connection_and_idle_or_stalled_connections_are_closed() {
    let _g = serial();
    let big: &[&str] = &["--body-bytes", "16777216"];
    let Some(edge) = start_gateway(
        false,
        &[("big", big)],
        "    - name: big\n      matches: [{path: {prefix: /big}}]\n      backends: [{service: big}]\n",
        "",
        "",
        &[
            "--gateway-max-connections-per-client",
            "3",
            "--gateway-idle-timeout",
            "2s",
        ],
    ) else {
        return;
    };
    let ns = edge.mesh.pod("outside").pod.ns.clone();
    let addr: std::net::SocketAddr = format!("{}:8443", edge.gw_ip).parse().unwrap();

    // Three connections that never say a word hold the client's budget
    // (the start-up calls' connections may take a moment to be let go);
    // the fourth is reset at once.
    let held = wait_for(
        "three held connections and a refused fourth",
        Duration::from_secs(8),
        || {
            edge.mesh.net.in_ns(&ns, move || {
                let short = Duration::from_millis(300);
                let held: Vec<_> = (0..3).map(|_| held_open(addr, short)).collect();
                if !held.iter().all(|(_, open)| *open) {
                    return None;
                }
                // Long enough for a loaded gateway to get to the reset.
                let (_, fourth_open) = held_open(addr, Duration::from_secs(3));
                // A slow reset of one of the three (a start-up connection
                // still held its slot) shows by now.
                let held: Vec<_> = held.into_iter().map(|(s, _)| s).collect();
                (!fourth_open && held.iter().all(|s| still_open(s, short))).then_some(held)
            })
        },
    );
    // The kernel probes them (TCP keepalive): a client gone without a FIN
    // does not keep its slots.
    let gw_ns = edge.mesh.pod("gw").pod.ns.clone();
    let sockets = edge.mesh.net.exec_ok(
        &gw_ns,
        &["ss", "-tnoH", "state", "established", "( sport = :8443 )"],
    );
    assert!(
        sockets.lines().count() >= 3 && sockets.lines().all(|l| l.contains("timer:(keepalive")),
        "{sockets}"
    );
    let (code, _) = edge.call("/public/ping", None, &[]);
    assert_eq!(code, 0, "a client at its cap gets no connection");
    let mut held = held;
    drop(held.pop());
    wait_for("a freed slot to be taken", Duration::from_secs(5), || {
        (edge.call("/public/ping", None, &[]).0 == 200).then_some(())
    });
    drop(held);
    let m = edge.mesh.metrics("gw");
    assert!(
        metric_sum(
            &m,
            "bulwark_tcp_refused_total",
            &["direction=\"gateway\"", "reason=\"client_limit\""]
        ) >= 2.0,
        "{m}"
    );

    // A WebSocket tunnel in use keeps its connection's slot: one busy
    // tunnel (an echo every 250 ms) and two silent connections put the
    // client at its cap.
    let ca = edge.public_ca.clone();
    let (tunnel, silent) = wait_for(
        "a tunnel and two held connections",
        Duration::from_secs(8),
        || {
            let ca = ca.clone();
            edge.mesh.net.in_ns(&ns, move || {
                let tunnel = Busy::start(websocket_tunnel(addr, &ca));
                let short = Duration::from_millis(300);
                let silent: Vec<_> = (0..2).map(|_| held_open(addr, short)).collect();
                let (_, third_open) = held_open(addr, Duration::from_secs(3));
                let silent: Vec<_> = silent.into_iter().map(|(s, _)| s).collect();
                (!third_open && silent.iter().all(|s| still_open(s, short)))
                    .then_some((tunnel, silent))
            })
        },
    );
    let (code, _) = edge.call("/public/ping", None, &[]);
    assert_eq!(code, 0, "the tunnel's connection gave its slot up");
    // Once nothing goes through it for the idle timeout, the tunnel is
    // closed and its slot freed.
    let (mut tunnel, echoes, last) = tunnel.stop();
    assert!(echoes >= 2, "the tunnel echoed {echoes} times");
    closed_within(&mut tunnel, Duration::from_secs(15));
    let quiet = last.elapsed();
    assert!(
        // Its last echo left the gateway a moment before it reached us.
        quiet >= Duration::from_millis(1500) && quiet < Duration::from_secs(8),
        "an idle tunnel closed after {quiet:?}, expected about 2 s"
    );
    drop(silent);
    wait_for(
        "the tunnel's slot to be free",
        Duration::from_secs(5),
        || (edge.call("/public/ping", None, &[]).0 == 200).then_some(()),
    );

    // A body the route reads whole (to validate it) that stops coming:
    // 408 once the idle timeout has passed, not a connection held for good.
    let token = edge.key1.sign(&claims("alice", "orders:write"));
    let ca = edge.public_ca.clone();
    let (head, waited) = edge.mesh.net.in_ns(&ns, {
        let token = token.clone();
        move || stalled_upload(addr, &ca, "/orders/new", &token)
    });
    assert!(
        head.starts_with("HTTP/1.1 408") && head.contains("x-bulwark-reason: body-timeout"),
        "{head}"
    );
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(8),
        "answered after {waited:?}, expected about 2 s"
    );

    // A body streamed to the upstream (no validation) that stops coming:
    // the connection is dropped once the upstream has waited on the client
    // for the idle timeout (checked every quarter of it).
    let stalls = || {
        metric_sum(
            &edge.mesh.metrics("gw"),
            "bulwark_tcp_refused_total",
            &["direction=\"gateway\"", "reason=\"client_stalled\""],
        )
    };
    let before = stalls();
    let ca = edge.public_ca.clone();
    let (head, waited) = edge.mesh.net.in_ns(&ns, move || {
        stalled_upload(addr, &ca, "/public/upload", &token)
    });
    assert_eq!(head, "", "no answer to a request the client never finished");
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(8),
        "dropped after {waited:?}, expected about 2 s"
    );
    wait_for("the stall counted", Duration::from_secs(5), || {
        (stalls() >= before + 1.0).then_some(())
    });

    // A client that stops reading a 16 MiB response: dropped once the
    // gateway has waited for room for the idle timeout, not held for good.
    let before = stalls();
    let ca = edge.public_ca.clone();
    let mut reader = edge.mesh.net.in_ns(&ns, move || {
        use std::io::{Read, Write};
        let mut tls = public_tls(addr, &ca, Duration::from_secs(15));
        write!(tls, "GET /big/file HTTP/1.1\r\nHost: {HOST}\r\n\r\n").unwrap();
        let mut first = [0u8; 12];
        tls.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        tls
    });
    wait_for("the slow reader dropped", Duration::from_secs(10), || {
        (stalls() >= before + 1.0).then_some(())
    });
    let mut got = 0usize;
    let ended = loop {
        use std::io::Read;
        let mut buf = [0u8; 65536];
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break got,
            Ok(n) => got += n,
        }
    };
    assert!(ended < 16 << 20, "read {ended} bytes: the whole response");

    // HTTP/2, whose client answers keep-alive pings: one request, then
    // nothing. The gateway ends the connection (GOAWAY, close) once it has
    // been idle for 2 s, well before hyper's or h2's own timeouts.
    let ca = edge.public_ca.clone();
    let (status, idle) = edge.mesh.net.in_ns(&ns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(h2_request_then_idle(addr, &ca))
    });
    assert_eq!(status, 200);
    assert!(
        idle >= Duration::from_secs(2) && idle < Duration::from_secs(8),
        "closed after {idle:?} idle, expected about 2 s"
    );
}

/// A TLS client of the gateway's public listener trusting `ca`, offering `alpn`.
fn public_client(ca: &Path, alpn: &[u8]) -> rustls::ClientConfig {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(bulwark_ca::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg
}

/// A client's TLS connection to the gateway's public listener.
type PublicTls = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// An HTTP/1.1 TLS connection to the gateway at `addr`, trusting `ca`;
/// reads give up after `read_timeout`.
fn public_tls(addr: std::net::SocketAddr, ca: &Path, read_timeout: Duration) -> PublicTls {
    let name = rustls::pki_types::ServerName::try_from(HOST).unwrap();
    let conn =
        rustls::ClientConnection::new(std::sync::Arc::new(public_client(ca, b"http/1.1")), name)
            .unwrap();
    let tls = rustls::StreamOwned::new(conn, std::net::TcpStream::connect(addr).unwrap());
    tls.sock.set_read_timeout(Some(read_timeout)).unwrap();
    tls
}

/// A WebSocket-style upgrade through the gateway at `addr` to the echoing
/// app, checked by one echo; the tunnel stays open.
fn websocket_tunnel(addr: std::net::SocketAddr, ca: &Path) -> PublicTls {
    use std::io::{Read, Write};
    let mut tls = public_tls(addr, ca, Duration::from_secs(10));
    write!(tls, "GET /public/chat HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tls.write_all(b"ping").unwrap();
    let mut echo = [0u8; 4];
    tls.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"ping");
    tls
}

/// A tunnel kept busy by a thread that sends "ping" and reads the echo
/// every 250 ms, until [`Busy::stop`].
struct Busy {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The tunnel's socket, to end it when a failed attempt drops it.
    sock: std::net::TcpStream,
    thread: Option<std::thread::JoinHandle<(PublicTls, usize, std::time::Instant)>>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = self.sock.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Busy {
    fn start(mut tls: PublicTls) -> Self {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sock = tls.sock.try_clone().unwrap();
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let (mut echoes, mut last) = (0, std::time::Instant::now());
                while !stop.load(Ordering::Relaxed) {
                    tls.write_all(b"ping").unwrap();
                    let mut echo = [0u8; 4];
                    tls.read_exact(&mut echo).unwrap();
                    assert_eq!(&echo, b"ping");
                    echoes += 1;
                    last = std::time::Instant::now();
                    std::thread::sleep(Duration::from_millis(250));
                }
                (tls, echoes, last)
            }
        });
        Self {
            stop,
            sock,
            thread: Some(thread),
        }
    }

    /// The tunnel, idle from now on, how many echoes it carried, and when
    /// the last one came back.
    fn stop(mut self) -> (PublicTls, usize, std::time::Instant) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let thread = self.thread.take().expect("not stopped yet");
        thread.join().expect("the tunnel stayed up while in use")
    }
}

/// Waits until the gateway closes `tls` (end of stream or an error),
/// reading whatever comes meanwhile; panics if it is open after `limit`.
fn closed_within(tls: &mut PublicTls, limit: Duration) {
    use std::io::{ErrorKind, Read};
    tls.sock.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("still open after {limit:?}")
            }
            Err(_) => return,
        }
    }
}

/// A POST to `path` at `addr` that announces 100 bytes and sends 9; the
/// response head (empty if the connection closed first), and how long it
/// took after the 9.
fn stalled_upload(
    addr: std::net::SocketAddr,
    ca: &Path,
    path: &str,
    token: &str,
) -> (String, Duration) {
    use std::io::{Read, Write};
    let mut tls = public_tls(addr, ca, Duration::from_secs(15));
    write!(tls, "POST {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"item\":").unwrap();
    tls.flush().unwrap();
    let sent = std::time::Instant::now();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        if tls.read(&mut b).unwrap_or(0) == 0 {
            break;
        }
        head.push(b[0]);
    }
    (String::from_utf8_lossy(&head).into_owned(), sent.elapsed())
}

/// One HTTP/2 request to the gateway at `addr` (trusting `ca`), then how
/// long the connection stays open with nothing in flight.
async fn h2_request_then_idle(addr: std::net::SocketAddr, ca: &Path) -> (u16, Duration) {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls::pki_types::ServerName;

    let cfg = public_client(ca, b"h2");
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(ServerName::try_from(HOST).unwrap(), tcp)
        .await
        .unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get(format!("https://{HOST}/public/ping"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    // The gateway's idle time starts after the response's last byte, so
    // later than this.
    let sent = std::time::Instant::now();
    let resp = tx.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    resp.into_body().collect().await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), conn)
        .await
        .expect("the idle connection was not closed")
        .unwrap()
        .unwrap();
    (status, sent.elapsed())
}

#[test]
fn gateway_config_comes_from_the_control_plane_and_changes_live() {
    let _g = serial();
    let Some(edge) = start_with(true) else { return };
    let alice = edge.key1.sign(&claims("alice", "orders:read"));
    let (code, text) = edge.call("/orders/1", Some(&alice), &[]);
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("x-user-id=alice"), "{text}");

    // Rename the public route's prefix in the control plane's directory:
    // the gateway follows without a restart.
    let dir = edge.mesh.config_dir().join("mesh.yaml");
    let yaml = std::fs::read_to_string(&dir).unwrap();
    let moved = yaml.replace("{prefix: /public}", "{prefix: /open}");
    assert_ne!(moved, yaml);
    edge.mesh.write_cp_file("mesh.yaml", &moved);
    wait_for("the pushed gateway route", Duration::from_secs(15), || {
        (edge.call("/open/x", None, &[]).0 == 200).then_some(())
    });
    let (code, text) = edge.call("/public/x", None, &[]);
    assert_eq!(code, 404, "the old prefix is gone: {text}");
    assert!(text.contains("no-route"), "{text}");

    // A Gateway the control plane refuses (bad rate-limit key) is not
    // pushed: the gateway keeps serving the last good config.
    let broken = moved.replace("key: subject", "key: cookie");
    edge.mesh.write_cp_file("mesh.yaml", &broken);
    let status = wait_for(
        "the control plane to report the error",
        Duration::from_secs(15),
        || {
            let s = edge.mesh.xds_status("198.18.0.1:15011");
            s.contains("cookie").then_some(s)
        },
    );
    assert!(
        status.contains("serving the last good config") && status.contains("rateLimit.key"),
        "{status}"
    );
    let (code, text) = edge.call("/open/y", None, &[]);
    assert_eq!(code, 200, "last good config keeps serving: {text}");
}

#[test]
fn gateway_routes_apply_timeouts_and_retries_like_mesh_routes() {
    let _g = serial();
    let routes = "    - name: slow
      matches: [{path: {prefix: /slow}}]
      backends: [{service: slow}]
      timeout: 300ms
    - name: flaky-retried
      matches: [{path: {prefix: /flaky/retried}}]
      backends: [{service: flaky}]
      retry: {attempts: 2, retryOn: [5xx], budgetRatio: 1.0}
    - name: flaky
      matches: [{path: {prefix: /flaky}}]
      backends: [{service: flaky}]
";
    let Some(mut edge) = start_full(
        false,
        &[
            ("slow", &["--latency", "2s"]),
            ("flaky", &["--error-rate", "0.5"]),
        ],
        routes,
        "",
    ) else {
        return;
    };
    for p in ["slow", "flaky"] {
        edge.mesh.wait_ready(p);
    }
    // The route's timeout: a 504 that says why, long before the app answers.
    let t = std::time::Instant::now();
    let (code, text) = edge.call("/slow/x", None, &[]);
    assert_eq!(code, 504, "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("x-bulwark-reason: timeout"),
        "{text}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    // Every second answer of `flaky` is a 503: retried, every call succeeds;
    // not retried, about half fail.
    let ok = |path: &str| {
        (0..20)
            .filter(|_| edge.call(path, None, &[]).0 == 200)
            .count()
    };
    assert_eq!(ok("/flaky/retried/x"), 20);
    let plain = ok("/flaky/x");
    assert!((8..=12).contains(&plain), "{plain} of 20 without retries");
    let m = edge.mesh.metrics("flaky");
    assert!(
        metric_sum(&m, "bulwark_requests_total", &["direction=\"inbound\""]) >= 50.0,
        "{m}"
    );
}

/// A backend's TrafficPolicy guards requests from the gateway as it does
/// requests from a sidecar: its bulkhead rejects the excess at once, and its
/// breaker opens after the configured failures and keeps the rest off the
/// failing service.
#[test]
fn gateway_requests_go_through_the_backends_bulkhead_and_breaker() {
    let _g = serial();
    let routes = "    - name: slow
      matches: [{path: {prefix: /slow}}]
      backends: [{service: slow}]
    - name: bad
      matches: [{path: {prefix: /bad}}]
      backends: [{service: bad}]
";
    let policies = "---
apiVersion: bulwark.dev/v1
kind: TrafficPolicy
metadata:
  name: slow
spec:
  service: slow
  bulkhead: {maxRequests: 2, maxPending: 1}
---
apiVersion: bulwark.dev/v1
kind: TrafficPolicy
metadata:
  name: bad
spec:
  service: bad
  circuitBreaker: {consecutiveFailures: 5, openDuration: 30s, halfOpenRequests: 1}
";
    let Some(mut edge) = start_full(
        false,
        &[
            ("slow", &["--latency", "2s"]),
            ("bad", &["--error-rate", "1.0"]),
        ],
        routes,
        policies,
    ) else {
        return;
    };
    for p in ["slow", "bad"] {
        edge.mesh.wait_ready(p);
    }
    // Eight requests at once, multiplexed on one HTTP/2 connection: two are
    // served, one waits for a slot, five are turned away without waiting.
    let more: Vec<String> = (1..8)
        .map(|i| format!("https://{HOST}:8443/slow/{i}"))
        .collect();
    let mut extra = vec!["--parallel", "--parallel-immediate", "--parallel-max", "8"];
    extra.extend(more.iter().map(String::as_str));
    let t = std::time::Instant::now();
    let (_, text) = edge.call("/slow/0", None, &extra);
    let lower = text.to_ascii_lowercase();
    let served = lower.matches("x-served-by: slow").count();
    let rejected = lower.matches("x-bulwark-reason: bulkhead-full").count();
    println!(
        "8 concurrent calls: {rejected} rejected by the bulkhead, in {:?}",
        t.elapsed()
    );
    assert_eq!(rejected, 5, "{text}");
    let m = edge.mesh.metrics("gw");
    assert!(
        metric_sum(&m, "bulwark_bulkhead_rejections_total", &[]) >= 5.0,
        "{m}"
    );
    assert_eq!(served, 3, "two at once, then the queued one: {text}");

    // The breaker: after five failures the rest are refused at the gateway.
    let codes: Vec<(u16, bool)> = (0..15)
        .map(|i| {
            let (code, text) = edge.call(&format!("/bad/{i}"), None, &[]);
            let open = text
                .to_ascii_lowercase()
                .contains("x-bulwark-reason: breaker-open");
            (code, open)
        })
        .collect();
    assert!(codes.iter().all(|(c, _)| *c == 503), "{codes:?}");
    assert!(codes[10..].iter().all(|(_, open)| *open), "{codes:?}");
    let attempts = metric_sum(
        &edge.mesh.metrics("bad"),
        "bulwark_requests_total",
        &["direction=\"inbound\""],
    );
    assert!(
        (5.0..=6.0).contains(&attempts),
        "the configured 5 failures (+1 probe) reach the service, got {attempts}"
    );
    let m = edge.mesh.metrics("gw");
    assert_eq!(
        metric_sum(&m, "bulwark_breaker_state", &["bad"]),
        1.0,
        "open\n{m}"
    );
}

/// Requests/s through the gateway, with and without JWT validation, in one
/// run: `cargo test --release --test gateway -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark"]
fn gateway_throughput_with_and_without_jwt() {
    let _g = serial();
    let Some(edge) = start() else { return };
    let token = edge.key1.sign(&claims("bench", "orders:read"));
    let ns = edge.mesh.pod("outside").pod.ns.clone();
    let run = |path: &str, auth: bool| -> f64 {
        let url = format!("https://{}:8443{path}", edge.gw_ip);
        let hdr = format!("authorization: Bearer {token}");
        let mut args = vec![
            "h2load",
            "-n",
            "20000",
            "-c",
            "16",
            "-m",
            "8",
            "-H",
            "host: api.example.com",
        ];
        if auth {
            args.extend_from_slice(&["-H", &hdr]);
        }
        args.push(&url);
        let o = edge.mesh.net.exec(&ns, &args);
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            out.contains("20000 succeeded") || out.contains("succeeded, 0 failed"),
            "{out}"
        );
        out.lines()
            .find(|l| l.starts_with("finished in"))
            .and_then(|l| l.split(',').nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("no rate in {out}"))
    };
    let mut off = Vec::new();
    let mut on = Vec::new();
    for _ in 0..3 {
        off.push(run("/public/bench", false));
        on.push(run("/bench/x", true));
    }
    off.sort_by(f64::total_cmp);
    on.sort_by(f64::total_cmp);
    println!(
        "gateway req/s (median of 3, h2load -c16 -m8): JWT off {:.0}, JWT on {:.0}, ratio {:.2}",
        off[1],
        on[1],
        on[1] / off[1]
    );
}

/// Keys fetched over HTTPS (`jwksUri`) come through a socket of the
/// gateway's own, carrying the proxy's mark: the gateway pod's interception
/// rules let it pass, so the gateway's outbound listener never sees it.
#[test]
fn jwks_over_https_is_fetched_by_the_proxy_itself_not_through_its_interception() {
    let _g = serial();
    const ISSUER2: &str = "https://idp2.example.com";
    const SITE: &str = "198.18.0.1:9443";
    // The identity provider's site: its CA, a certificate for its address,
    // and the key set, served from the switch namespace.
    let site = common::tempdir();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["198.18.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(site.path().join("site-ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(site.path().join("site.crt"), cert.pem()).unwrap();
    std::fs::write(site.path().join("site.key"), key.serialize_pem()).unwrap();
    let key2 = SigningKey::new("k2");
    write_jwks(&site.path().join("jwks2.json"), &[&key2]);
    let provider = format!(
        "    - issuer: {ISSUER2}\n      audiences: [{AUDIENCE}]\n      jwksUri: https://{SITE}/jwks2.json\n      jwksCaFile: {}\n      algorithms: [ES256]\n      forwardClaims: {{sub: x-user-id}}\n",
        site.path().join("site-ca.pem").display()
    );
    let Some(mut edge) = start_gateway(false, &[], "", "", &provider, &[]) else {
        return;
    };
    // Keys are fetched on first use: the site can start after the gateway.
    let switch = edge.mesh.net.switch.clone();
    let serve = format!(
        "cd {} && exec openssl s_server -quiet -WWW -accept {SITE} -cert site.crt -key site.key",
        site.path().display()
    );
    let idp = edge
        .mesh
        .net
        .spawn(&switch, "idp2", "sh", &["-c", serve.as_str()]);
    let outbound = |edge: &Edge| {
        let m = edge.mesh.metrics("gw");
        // A failed scrape would read as no connection at all (a family with
        // no samples is not listed, so the scrape's end is what is checked).
        assert!(
            m.contains("bulwark_cert_renewals_total") && m.contains("# EOF"),
            "{m}"
        );
        metric_sum(
            &m,
            "bulwark_tcp_connections_total",
            &["direction=\"outbound\""],
        )
    };
    let before = outbound(&edge);
    let mut token_claims = claims("carol", "orders:read");
    token_claims["iss"] = ISSUER2.into();
    let carol = key2.sign(&token_claims);
    let text = wait_for(
        "a token of the second issuer to be accepted",
        Duration::from_secs(20),
        || {
            let site = edge.mesh.net.proc_mut(idp);
            if let Ok(Some(st)) = site.child.try_wait() {
                panic!("the key site exited ({st}): {}", site.log_text());
            }
            let (code, text) = edge.call("/orders/1", Some(&carol), &[]);
            (code == 200).then_some(text)
        },
    );
    assert!(text.contains("x-user-id=carol"), "{text}");
    assert_eq!(
        outbound(&edge),
        before,
        "the key fetch went through the gateway's own interception"
    );
}
