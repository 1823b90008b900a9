//! Kubernetes integration: the kustomize base renders and validates against
//! the Kubernetes 1.30 schemas, the CRDs are what the model generates, the
//! examples fit the CRDs, the injection webhook (offline logic and over TLS
//! from a real `bulwark xds serve`), `bulwark inject`, bootstrap with a
//! ServiceAccount token checked by a TokenReview API, and `bulwark rollout`.
//!
//! Needs `kubectl` (Debian `kubernetes-client`), `kubernetes-validate` and
//! Python `jsonschema` (PyPI), and `curl`; `.ci/run` installs them.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use base64::Engine;
use bulwark_xds::inject::{self, InjectConfig};
use common::*;
use serde_json::{Value, json};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a tool, failing the test with a clear line when it is missing.
fn tool(cmd: &str, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut child = Command::new(cmd)
        .args(args)
        .current_dir(root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd} ({e}): `bash .ci/run` installs it"));
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn ok(out: &std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap()
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

// ---------------------------------------------------------------------------
// Manifests

fn validate_rendered(dir: &str) {
    let rendered = ok(
        &tool("kubectl", &["kustomize", dir], None),
        "kubectl kustomize",
    );
    let kinds: Vec<String> = yaml_docs(&rendered)
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or("").to_string())
        .collect();
    for k in [
        "Namespace",
        "CustomResourceDefinition",
        "Deployment",
        "PodDisruptionBudget",
        "ServiceAccount",
        "ClusterRole",
        "Service",
        "MutatingWebhookConfiguration",
        "Secret",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{dir}: no {k} in {kinds:?}");
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &rendered).unwrap();
    let out = tool(
        "kubernetes-validate",
        &[
            "-k",
            "1.30.0",
            "--strict",
            "--quiet",
            file.path().to_str().unwrap(),
        ],
        None,
    );
    ok(&out, &format!("kubernetes-validate of {dir}"));
}

#[test]
fn kustomize_base_renders_and_validates_against_kubernetes_1_30() {
    validate_rendered("deploy/kubernetes");
}

#[test]
fn production_overlay_renders_and_validates_against_kubernetes_1_30() {
    validate_rendered("deploy/kubernetes/overlays/production");
}

#[test]
fn gateway_deployment_renders_validates_and_runs_unprivileged() {
    let rendered = ok(
        &tool("kubectl", &["kustomize", "deploy/kubernetes/gateway"], None),
        "kubectl kustomize",
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &rendered).unwrap();
    ok(
        &tool(
            "kubernetes-validate",
            &[
                "-k",
                "1.30.0",
                "--strict",
                "--quiet",
                file.path().to_str().unwrap(),
            ],
            None,
        ),
        "kubernetes-validate of deploy/kubernetes/gateway",
    );
    let docs = yaml_docs(&rendered);
    let dep = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("a gateway Deployment");
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    let args = args_of(c);
    assert!(args.iter().any(|a| a == "--mode=gateway"), "{args:?}");
    // The flags the manifest passes are the CLI's: a bad one would crash-loop.
    // The kubelet expands $(POD_IP); here any address does.
    let args: Vec<String> = args
        .iter()
        .map(|a| a.replace("$(POD_IP)", "10.0.0.7"))
        .collect();
    let mut argv: Vec<&str> = args.iter().map(String::as_str).collect();
    argv.push("--help");
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args(&argv)
        .output()
        .unwrap();
    assert!(
        help.status.success(),
        "{}",
        String::from_utf8_lossy(&help.stderr)
    );
    assert!(
        docs.iter()
            .any(|d| d["kind"] == "Service" && d["spec"]["type"] == "LoadBalancer"),
        "a public Service"
    );
}

#[test]
fn control_plane_deployments_are_highly_available_and_least_privileged() {
    let rendered = ok(
        &tool("kubectl", &["kustomize", "deploy/kubernetes"], None),
        "kubectl kustomize",
    );
    let docs = yaml_docs(&rendered);
    for name in ["bulwark-ca", "bulwark-xds"] {
        let d = docs
            .iter()
            .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == name)
            .unwrap();
        assert_eq!(d["spec"]["replicas"], 2, "{name}");
        let pod = &d["spec"]["template"]["spec"];
        assert!(pod["affinity"]["podAntiAffinity"].is_object(), "{name}");
        let c = &pod["containers"][0];
        assert!(c["resources"]["requests"].is_object() && c["resources"]["limits"].is_object());
        assert!(c["readinessProbe"].is_object() && c["livenessProbe"].is_object());
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert!(
            docs.iter()
                .any(|p| p["kind"] == "PodDisruptionBudget" && p["metadata"]["name"] == name)
        );
    }
    // The only API permission in the base: the CA creating TokenReviews.
    let rules: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
        .flat_map(|r| r["rules"].as_array().unwrap())
        .collect();
    assert_eq!(
        rules,
        [
            &json!({"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]})
        ]
    );
    let hook = docs
        .iter()
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .unwrap();
    let w = &hook["webhooks"][0];
    assert_eq!(
        w["namespaceSelector"]["matchLabels"]["bulwark.dev/inject"],
        "enabled"
    );
    assert_eq!(w["clientConfig"]["service"]["namespace"], "bulwark-system");
    assert_eq!(w["failurePolicy"], "Fail");
}

#[test]
fn committed_crds_match_the_ones_generated_from_the_model() {
    let generated = run_ok(&["xds", "crds"]);
    let committed =
        std::fs::read_to_string(root().join("deploy/kubernetes/base/crds.yaml")).unwrap();
    assert!(
        generated == committed,
        "deploy/kubernetes/base/crds.yaml is stale: regenerate it with\n  cargo run -q -- xds crds > deploy/kubernetes/base/crds.yaml"
    );
}

/// Validates `(schema, document)` pairs with Python's jsonschema; returns
/// one line per pair: `ok` or the first error.
fn jsonschema_check(pairs: &[(Value, Value)]) -> Vec<String> {
    let script = r#"
import json, sys, jsonschema
out = []
for schema, doc in json.load(sys.stdin):
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=str)
    out.append("ok" if not errors else "/".join(map(str, errors[0].absolute_path)) + ": " + errors[0].message)
print(json.dumps(out))
"#;
    let input = serde_json::to_string(pairs).unwrap();
    let out = ok(
        &tool("python3", &["-c", script], Some(&input)),
        "python3 jsonschema",
    );
    serde_json::from_str(&out).unwrap()
}

fn crd_schemas() -> Vec<(String, Value)> {
    yaml_docs(&run_ok(&["xds", "crds"]))
        .into_iter()
        .map(|c| {
            (
                c["spec"]["names"]["kind"].as_str().unwrap().to_string(),
                c["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone(),
            )
        })
        .collect()
}

#[test]
fn examples_validate_against_the_generated_crd_schemas() {
    let schemas = crd_schemas();
    let schema_of = |kind: &str| {
        schemas
            .iter()
            .find(|(k, _)| k == kind)
            .unwrap_or_else(|| panic!("no CRD for {kind}"))
            .1
            .clone()
    };
    let mut pairs = Vec::new();
    let mut names = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.push(root().join("deploy/kubernetes/base/mesh-config/mesh.yaml"));
    for f in files {
        for doc in yaml_docs(&std::fs::read_to_string(&f).unwrap()) {
            let kind = doc["kind"].as_str().unwrap().to_string();
            names.push(format!(
                "{} {kind} {}",
                f.display(),
                doc["metadata"]["name"]
            ));
            pairs.push((schema_of(&kind), doc));
        }
    }
    assert!(pairs.len() >= 6, "too few example documents");
    // The schemas do constrain: a wrong type and a bad enum are caught.
    let mut bad_weight = pairs
        .iter()
        .find(|(_, d)| d["kind"] == "Route")
        .unwrap()
        .1
        .clone();
    bad_weight["spec"]["rules"][0]["backends"][0]["weight"] = json!("ninety");
    let bad_mode = json!({"apiVersion": "bulwark.dev/v1", "kind": "MeshConfig", "metadata": {"name": "m"},
        "spec": {"mtls": {"mode": "SOMETIMES"}}});
    let n = pairs.len();
    pairs.push((schema_of("Route"), bad_weight));
    pairs.push((schema_of("MeshConfig"), bad_mode));
    let results = jsonschema_check(&pairs);
    for (name, r) in names.iter().zip(&results[..n]) {
        assert_eq!(r, "ok", "{name}");
    }
    assert!(results[n].contains("weight"), "{}", results[n]);
    assert!(results[n + 1].contains("SOMETIMES"), "{}", results[n + 1]);
}

// ---------------------------------------------------------------------------
// Injection webhook

fn fixture(name: &str) -> Value {
    let p = root().join("tests/kubernetes").join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// Applies an AdmissionReview response's patch to the request's pod.
fn patched(review_in: &Value, response: &Value) -> Value {
    let mut pod = review_in["request"]["object"].clone();
    if let Some(p) = response["patch"].as_str() {
        assert_eq!(response["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD.decode(p).unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        json_patch::patch(&mut pod, &patch).unwrap();
    }
    pod
}

fn admit(review_in: &Value) -> (u16, Value) {
    let body = serde_json::to_vec(review_in).unwrap();
    inject::review(&body, &InjectConfig::default())
}

fn args_of(c: &Value) -> Vec<String> {
    c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .map(|i| args[i + 1].clone())
}

#[test]
fn webhook_injects_a_deployment_pod_with_a_native_sidecar() {
    let input = fixture("deployment-pod.json");
    let (code, out) = admit(&input);
    assert_eq!(code, 200);
    let r = &out["response"];
    assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(r["uid"], input["request"]["uid"]);
    assert_eq!(r["allowed"], true);
    let pod = patched(&input, r);
    let spec = &pod["spec"];
    // The app container is untouched.
    assert_eq!(
        spec["containers"],
        input["request"]["object"]["spec"]["containers"]
    );
    let inits = spec["initContainers"].as_array().unwrap();
    assert_eq!(inits.len(), 2);
    let (init, proxy) = (&inits[0], &inits[1]);
    assert_eq!(init["name"], "bulwark-init");
    assert_eq!(args_of(init)[0], "init");
    // The proxy passes by uid: no outbound port goes around it by default.
    assert_eq!(flag(&args_of(init), "--proxy-uid").as_deref(), Some("1337"));
    assert_eq!(flag(&args_of(init), "--exclude-outbound-ports"), None);
    assert_eq!(
        init["securityContext"]["capabilities"],
        json!({"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]})
    );
    assert_eq!(proxy["name"], "bulwark-proxy");
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(
        proxy["startupProbe"]["httpGet"],
        json!({"path": "/healthz/ready", "port": 15020})
    );
    let a = args_of(proxy);
    assert_eq!(a[0], "sidecar");
    assert_eq!(
        flag(&a, "--identity").unwrap(),
        "spiffe://cluster.local/ns/$(POD_NAMESPACE)/sa/$(POD_SERVICE_ACCOUNT)"
    );
    assert_eq!(
        flag(&a, "--xds").unwrap(),
        "bulwark-xds.bulwark-system.svc:15010"
    );
    assert_eq!(
        flag(&a, "--ca").unwrap(),
        "bulwark-ca.bulwark-system.svc:15012"
    );
    assert_eq!(
        flag(&a, "--ca-cert").unwrap(),
        "/var/run/secrets/bulwark/ca/bundle.pem"
    );
    assert_eq!(flag(&a, "--pod-ip").unwrap(), "$(POD_IP)");
    assert_eq!(flag(&a, "--ports").unwrap(), "8080,9090");
    assert_eq!(
        flag(&a, "--labels").unwrap(),
        "app=web,pod-template-hash=7d4b9c8f6d,version=v1"
    );
    let env = proxy["env"].as_array().unwrap();
    let field = |n: &str| {
        env.iter().find(|e| e["name"] == n).unwrap()["valueFrom"]["fieldRef"]["fieldPath"].clone()
    };
    assert_eq!(field("POD_NAMESPACE"), "metadata.namespace");
    assert_eq!(field("POD_SERVICE_ACCOUNT"), "spec.serviceAccountName");
    assert_eq!(field("POD_IP"), "status.podIP");
    assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
    // Volumes: the pod's own kept, ours added.
    let vols = spec["volumes"].as_array().unwrap();
    assert_eq!(vols[0]["name"], "kube-api-access-x2v9q");
    let token = vols.iter().find(|v| v["name"] == "bulwark-token").unwrap();
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "bulwark-ca"
    );
    let bundle = vols
        .iter()
        .find(|v| v["name"] == "bulwark-ca-bundle")
        .unwrap();
    assert_eq!(bundle["configMap"]["name"], "bulwark-ca-bundle");
    let token_file = flag(&a, "--token-file").unwrap();
    let mounts = proxy["volumeMounts"].as_array().unwrap();
    assert!(mounts.iter().any(|m| m["name"] == "bulwark-token"
        && token_file.starts_with(m["mountPath"].as_str().unwrap())));
    assert_eq!(
        pod["metadata"]["annotations"]["bulwark.dev/status"],
        "injected"
    );
    assert_eq!(
        pod["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"],
        "2024-05-01T10:00:00Z"
    );
}

#[test]
fn webhook_leaves_an_opted_out_pod_unchanged() {
    let input = fixture("opt-out-pod.json");
    let (code, out) = admit(&input);
    assert_eq!(code, 200);
    assert_eq!(out["response"]["allowed"], true);
    assert!(out["response"].get("patch").is_none());
    assert_eq!(
        patched(&input, &out["response"]),
        input["request"]["object"]
    );
}

#[test]
fn webhook_leaves_an_already_injected_pod_unchanged() {
    let input = fixture("injected-pod.json");
    let (code, out) = admit(&input);
    assert_eq!(code, 200);
    assert_eq!(out["response"]["allowed"], true);
    assert!(out["response"].get("patch").is_none());
    let pod = patched(&input, &out["response"]);
    assert_eq!(pod["spec"]["initContainers"].as_array().unwrap().len(), 2);
}

#[test]
fn webhook_honours_excluded_ports_resources_and_log_level() {
    let input = fixture("excluded-ports-pod.json");
    let (_, out) = admit(&input);
    let pod = patched(&input, &out["response"]);
    let inits = pod["spec"]["initContainers"].as_array().unwrap();
    let init = args_of(&inits[0]);
    assert_eq!(
        flag(&init, "--exclude-inbound-ports").unwrap(),
        "15000,15020,15021,9090"
    );
    assert_eq!(
        flag(&init, "--exclude-outbound-ports").unwrap(),
        "5432,6379"
    );
    let proxy = &inits[1];
    // An excluded port is not the mesh's: not announced.
    assert_eq!(flag(&args_of(proxy), "--ports").unwrap(), "8080");
    assert_eq!(proxy["resources"]["limits"]["memory"], "512Mi");
    assert!(
        proxy["env"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "BULWARK_LOG", "value": "debug"}))
    );
}

#[test]
fn webhook_answers_malformed_requests_with_an_admission_review() {
    // Not JSON, not a review, no uid: HTTP 400 and a review saying why.
    for body in [
        &b"{not json"[..],
        br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"x"}}"#,
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"kind":{"kind":"Pod"}}}"#,
    ] {
        let (code, out) = inject::review(body, &InjectConfig::default());
        assert_eq!(code, 400, "{}", String::from_utf8_lossy(body));
        assert_eq!(out["kind"], "AdmissionReview");
        assert_eq!(out["response"]["allowed"], false);
        assert!(
            out["response"]["status"]["message"]
                .as_str()
                .unwrap()
                .contains("bulwark injector")
        );
    }
    // A review for something else: allowed, unchanged, with a warning.
    let mut svc = fixture("deployment-pod.json");
    svc["request"]["kind"]["kind"] = json!("Service");
    let (code, out) = admit(&svc);
    assert_eq!((code, &out["response"]["allowed"]), (200, &json!(true)));
    assert!(
        out["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("Service")
    );
    // A pod without a spec: allowed with a warning (the API server rejects it anyway).
    let mut broken = fixture("deployment-pod.json");
    broken["request"]["object"]["spec"] = json!("nope");
    let (code, out) = admit(&broken);
    assert_eq!((code, &out["response"]["allowed"]), (200, &json!(true)));
    assert!(out["response"].get("patch").is_none());
    assert!(
        out["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("not injected")
    );
    // An unusable annotation: refused, naming it.
    let mut bad = fixture("deployment-pod.json");
    bad["request"]["object"]["metadata"]["annotations"]["bulwark.dev/exclude-inbound-ports"] =
        json!("http");
    let (code, out) = admit(&bad);
    assert_eq!(code, 200);
    assert_eq!(out["response"]["allowed"], false);
    assert_eq!(out["response"]["status"]["code"], 400);
    assert!(
        out["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("bulwark.dev/exclude-inbound-ports")
    );
}

/// A control plane with the webhook on, on loopback.
struct ControlPlane {
    _work: tempfile::TempDir,
    ca_dir: PathBuf,
    webhook: SocketAddr,
    admin: SocketAddr,
    proc: Proc,
}

fn control_plane() -> ControlPlane {
    let work = tempdir();
    let ca_dir = work.path().join("ca");
    run_ok(&["ca", "init", "--dir", ca_dir.to_str().unwrap()]);
    let config = work.path().join("config");
    std::fs::create_dir(&config).unwrap();
    std::fs::copy(
        root().join("deploy/kubernetes/base/mesh-config/mesh.yaml"),
        config.join("mesh.yaml"),
    )
    .unwrap();
    let (listen, admin, webhook) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let mut proc = spawn(
        work.path(),
        "xds",
        &[
            "xds",
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--ca-dir",
            ca_dir.to_str().unwrap(),
            "--listen",
            &listen,
            "--admin-listen",
            &admin,
            "--webhook-listen",
            &webhook,
            "--proxy-image",
            "registry.example.com/bulwark:test",
        ],
    );
    let webhook: SocketAddr = webhook.parse().unwrap();
    wait_listening(webhook, &mut proc);
    ControlPlane {
        _work: work,
        ca_dir,
        webhook,
        admin: admin.parse().unwrap(),
        proc,
    }
}

/// POSTs `body` to the webhook with curl, verifying its certificate
/// against the mesh's trust bundle under the Service's DNS name, as the
/// API server does. Returns (HTTP status, body).
fn curl_webhook(cp: &ControlPlane, path: &str, body: &[u8]) -> (u16, String) {
    let host = "bulwark-xds.bulwark-system.svc";
    let resolve = format!("{host}:{}:127.0.0.1", cp.webhook.port());
    let url = format!("https://{host}:{}{path}", cp.webhook.port());
    let bundle = cp.ca_dir.join("bundle.pem");
    let out = tool(
        "curl",
        &[
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            bundle.to_str().unwrap(),
            "--resolve",
            &resolve,
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            "@-",
            "-w",
            "\n%{http_code}",
            &url,
        ],
        Some(std::str::from_utf8(body).unwrap()),
    );
    let text = ok(&out, "curl");
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

/// A TLS client trusting the mesh's bundle, as the API server does.
fn webhook_tls_client(cp: &ControlPlane) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let bundle = std::fs::read(cp.ca_dir.join("bundle.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&bundle) {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Peak resident memory of `pid`, kB.
fn peak_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// Many clients sending the largest review at once: the control plane
/// reads and parses a few at a time, so its memory stays bounded, and
/// every client is answered.
#[test]
fn webhook_memory_stays_bounded_under_many_large_reviews_at_once() {
    use std::net::TcpStream;
    use std::time::Duration;
    let cp = control_plane();
    let client = webhook_tls_client(&cp);
    // A review whose pod carries a 3.5 MB annotation: valid JSON, so it is
    // parsed whole.
    let mut review = fixture("deployment-pod.json");
    review["request"]["object"]["metadata"]["annotations"]["big"] = json!("x".repeat(3_500_000));
    let body = Arc::new(serde_json::to_vec(&review).unwrap());
    let before = peak_rss_kb(cp.proc.pid());
    let clients: Vec<_> = (0..96)
        .map(|_| {
            let (client, body, addr) = (client.clone(), body.clone(), cp.webhook);
            std::thread::spawn(move || {
                let name =
                    rustls_pki_types::ServerName::try_from("bulwark-xds.bulwark-system.svc")
                        .unwrap();
                let tcp = TcpStream::connect(addr).unwrap();
                tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let conn = rustls::ClientConnection::new(client, name).unwrap();
                let mut s = rustls::StreamOwned::new(conn, tcp);
                let head = format!(
                    "POST /inject HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                s.write_all(head.as_bytes()).unwrap();
                s.write_all(&body).unwrap();
                let mut out = Vec::new();
                let _ = s.read_to_end(&mut out);
                String::from_utf8_lossy(&out[..out.len().min(12)]).to_string()
            })
        })
        .collect();
    let answers: Vec<String> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let grew = peak_rss_kb(cp.proc.pid()).saturating_sub(before);
    println!(
        "96 reviews of {} bytes at once: peak RSS grew {grew} kB",
        body.len()
    );
    assert!(
        answers.iter().all(|a| a.starts_with("HTTP/1.1 200")),
        "{answers:?}"
    );
    // Four at a time, each holding about three times its 3.5 MB body, is
    // at most about 40 MB; all at once, several times that.
    assert!(grew < 80_000, "peak RSS grew {grew} kB");
}

/// Clients trickling large bodies hold the webhook's few review places for
/// 2 s at most: a review from the API server meanwhile is answered.
#[test]
fn webhook_reviews_are_answered_while_clients_trickle_bodies() {
    use std::net::TcpStream;
    use std::time::{Duration, Instant};
    let cp = control_plane();
    let client = webhook_tls_client(&cp);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (started, begun) = std::sync::mpsc::channel();
    let trickles: Vec<_> = (0..8)
        .map(|_| {
            let (client, addr, stop) = (client.clone(), cp.webhook, stop.clone());
            let started = started.clone();
            std::thread::spawn(move || {
                let name = rustls_pki_types::ServerName::try_from("bulwark-xds.bulwark-system.svc")
                    .unwrap();
                let tcp = TcpStream::connect(addr).unwrap();
                let conn = rustls::ClientConnection::new(client, name).unwrap();
                let mut s = rustls::StreamOwned::new(conn, tcp);
                let _ = s.write_all(
                    b"POST /inject HTTP/1.1\r\nHost: x\r\nContent-Length: 4000000\r\n\r\n{",
                );
                let _ = started.send(());
                // A byte at a time, until the server gives up on it.
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && s.write_all(b" ").is_ok()
                {
                    std::thread::sleep(Duration::from_millis(200)); // trickling
                }
            })
        })
        .collect();
    // Every trickling request is on its way (its headers sent) before the
    // review starts; curl's own start and handshake come after that.
    for _ in 0..8 {
        begun.recv().unwrap();
    }
    let t = Instant::now();
    let input = fixture("deployment-pod.json");
    let (code, body) = curl_webhook(&cp, "/inject", &serde_json::to_vec(&input).unwrap());
    let took = t.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    println!("review answered in {took:?} while 8 clients trickled bodies");
    assert_eq!(code, 200, "{body}");
    assert!(took < Duration::from_secs(8), "{took:?}");
    for t in trickles {
        t.join().unwrap();
    }
}

#[test]
fn webhook_serves_admission_reviews_over_tls_from_xds_serve() {
    let cp = control_plane();
    let input = fixture("deployment-pod.json");
    let (code, body) = curl_webhook(&cp, "/inject", &serde_json::to_vec(&input).unwrap());
    assert_eq!(code, 200, "{body}");
    let out: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(out["response"]["uid"], input["request"]["uid"]);
    let pod = patched(&input, &out["response"]);
    let proxy = &pod["spec"]["initContainers"][1];
    assert_eq!(proxy["image"], "registry.example.com/bulwark:test");
    assert_eq!(proxy["restartPolicy"], "Always");
    // Malformed: still an AdmissionReview, over the same connection type.
    let (code, body) = curl_webhook(&cp, "/inject", b"garbage");
    assert_eq!(code, 400);
    let out: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(out["response"]["allowed"], false);
    // And the server is still up.
    let (code, _) = curl_webhook(&cp, "/inject", &serde_json::to_vec(&input).unwrap());
    assert_eq!(code, 200);
}

#[test]
fn webhook_port_refuses_garbage_foreign_tls_half_open_and_slowloris_and_keeps_serving() {
    use std::net::TcpStream;
    use std::time::{Duration, Instant};
    let cp = control_plane();
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", cp.proc.pid()))
            .unwrap()
            .count()
    };
    let fds_before = fds();
    let closed_within = |s: &mut dyn Read, limit: Duration| {
        let t = Instant::now();
        let mut buf = [0u8; 256];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return t.elapsed() < limit,
                Ok(_) => {}
            }
        }
    };
    // Half-open: a TCP connection that never starts its handshake.
    let mut idle = TcpStream::connect(cp.webhook).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    // Slowloris: a TLS connection sending one header line a second.
    let client = webhook_tls_client(&cp);
    let name = rustls_pki_types::ServerName::try_from("bulwark-xds.bulwark-system.svc").unwrap();
    let tcp = TcpStream::connect(cp.webhook).unwrap();
    tcp.set_read_timeout(Some(Duration::from_millis(900)))
        .unwrap();
    let conn = rustls::ClientConnection::new(client, name).unwrap();
    let mut slow = rustls::StreamOwned::new(conn, tcp);
    let loris = std::thread::spawn(move || {
        let t = Instant::now();
        let mut buf = [0u8; 64];
        let _ = slow.write_all(b"POST /inject HTTP/1.1\r\nHost: x\r\n");
        // Until the server hangs up (or 15 s): a header line a second.
        while t.elapsed() < Duration::from_secs(15) {
            if slow.write_all(b"X-Slow: 1\r\n").is_err() {
                break;
            }
            match slow.read(&mut buf) {
                Ok(0) => break,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Ok(_) | Err(_) => break,
            }
        }
        t.elapsed()
    });
    // Garbage instead of a ClientHello.
    let mut g = TcpStream::connect(cp.webhook).unwrap();
    g.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    g.write_all(b"\x00\xff GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(
        closed_within(&mut g, Duration::from_secs(2)),
        "garbage connection left open"
    );
    // A TLS client that does not trust the server (another CA) aborts its
    // handshake.
    let foreign = tempdir();
    let ca = foreign.path().join("ca.pem");
    ok(
        &tool(
            "openssl",
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                foreign.path().join("ca.key").to_str().unwrap(),
                "-out",
                ca.to_str().unwrap(),
                "-subj",
                "/CN=foreign",
                "-days",
                "1",
            ],
            None,
        ),
        "openssl req",
    );
    let out = tool(
        "openssl",
        &[
            "s_client",
            "-connect",
            &cp.webhook.to_string(),
            "-servername",
            "bulwark-xds.bulwark-system.svc",
            "-CAfile",
            ca.to_str().unwrap(),
            "-verify_return_error",
        ],
        Some(""),
    );
    assert!(
        !out.status.success(),
        "the foreign-CA client must fail to verify the webhook"
    );
    assert!(
        closed_within(&mut idle, Duration::from_secs(8)),
        "half-open connection kept past the handshake timeout"
    );
    let loris_held = loris.join().unwrap();
    assert!(
        loris_held < Duration::from_secs(8),
        "slowloris held the connection {loris_held:?}"
    );
    // Still serving, and each abuse was counted.
    let input = fixture("deployment-pod.json");
    let (code, _) = curl_webhook(&cp, "/inject", &serde_json::to_vec(&input).unwrap());
    assert_eq!(code, 200);
    // Counted when each connection ends (the last as curl hangs up).
    let count = |metrics: &str, result: &str| -> f64 {
        metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "bulwark_xds_webhook_connections_total{{result=\"{result}\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    wait_for("every abuse counted", Duration::from_secs(5), || {
        let m = http_get(cp.admin, "/metrics");
        (count(&m, "tls_error") >= 2.0
            && count(&m, "tls_timeout") >= 1.0
            && count(&m, "timeout") >= 1.0
            && count(&m, "served") >= 1.0)
            .then_some(())
    });
    wait_for(
        "descriptors back to where they were",
        Duration::from_secs(5),
        || (fds() <= fds_before + 1).then_some(()),
    );
}

// ---------------------------------------------------------------------------
// bulwark inject

const MANIFESTS: &str = r#"# The app's namespace: labelled for injection.
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {bulwark.dev/inject: enabled}   # flow style, kept as written
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: web-config
data:
  app.toml: |
    # not YAML: a block scalar
    port = 8080
    ---
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web, version: v1}
    spec:
      serviceAccountName: web
      containers:
        - name: web
          image: web:1
          ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: migrate, namespace: shop}
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: migrate, image: web:1, args: [migrate]}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: shop}
spec:
  serviceName: db
  selector: {matchLabels: {app: db}}
  template:
    metadata:
      labels: {app: db}
      annotations: {bulwark.dev/inject: "false"}
    spec:
      containers: [{name: db, image: db:1}]
"#;

#[test]
fn inject_cli_injects_workloads_and_leaves_other_documents_untouched() {
    let work = tempdir();
    let f = work.path().join("app.yaml");
    std::fs::write(&f, MANIFESTS).unwrap();
    let out = run(&["inject", "-f", f.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    // Byte for byte: the Namespace (with its comments), the Service and the
    // opted-out StatefulSet; the ConfigMap (an indented `---` inside a block
    // scalar is no document marker) compares equal below.
    for kept in [
        "# The app's namespace: labelled for injection.\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {bulwark.dev/inject: enabled}   # flow style, kept as written\n",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  ports: [{port: 80, targetPort: 8080}]\n",
        "      annotations: {bulwark.dev/inject: \"false\"}\n    spec:\n      containers: [{name: db, image: db:1}]\n",
    ] {
        assert!(
            text.contains(kept),
            "not kept verbatim:\n{kept}\n--- in ---\n{text}"
        );
    }
    let docs = yaml_docs(&text);
    let by = |kind: &str| docs.iter().find(|d| d["kind"] == kind).unwrap();
    let before = yaml_docs(MANIFESTS);
    let before_by = |kind: &str| before.iter().find(|d| d["kind"] == kind).unwrap();
    for kind in ["Namespace", "ConfigMap", "Service", "StatefulSet"] {
        assert_eq!(by(kind), before_by(kind), "{kind} changed");
    }
    for kind in ["Deployment", "Job"] {
        let t = &by(kind)["spec"]["template"];
        assert_eq!(
            t["metadata"]["annotations"]["bulwark.dev/status"],
            "injected"
        );
        assert_eq!(
            t["spec"]["initContainers"][1]["name"], "bulwark-proxy",
            "{kind}"
        );
        assert_eq!(t["spec"]["initContainers"][1]["restartPolicy"], "Always");
        assert_eq!(
            t["spec"]["containers"],
            before_by(kind)["spec"]["template"]["spec"]["containers"]
        );
    }
    // Injecting the output again changes nothing.
    let f2 = work.path().join("again.yaml");
    std::fs::write(&f2, &text).unwrap();
    assert_eq!(run_ok(&["inject", "-f", f2.to_str().unwrap()]), text);
}

#[test]
fn inject_cli_rejects_bad_yaml_with_the_document_and_line() {
    let work = tempdir();
    let f = work.path().join("bad.yaml");
    std::fs::write(&f, "kind: ConfigMap\n---\nkind: Pod\nspec: [unclosed\n").unwrap();
    let out = run(&["inject", "-f", f.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("document 2 (line 2)"), "{err}");
}

// ---------------------------------------------------------------------------
// Bootstrap with a ServiceAccount token and the TokenReview API

/// A fake API server speaking the TokenReview contract. Tokens:
/// `eyJ.good` → shop/api, audience bulwark-ca; `eyJ.rejected` → not
/// authenticated; `eyJ.otheraud` → authenticated for another audience.
/// It checks the CA's own bearer token and the requested audience.
struct FakeApi {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Value>>>,
}

const CA_OWN_TOKEN: &str = "ca-service-account-token";
const JWT_GOOD: &str = "eyJhbGciOiJSUzI1NiJ9.eyJnb29kIjoxfQ.c2lnbmF0dXJl";
const JWT_REJECTED: &str = "eyJhbGciOiJSUzI1NiJ9.eyJyZWplY3RlZCI6MX0.c2lnbmF0dXJl";
const JWT_OTHER_AUDIENCE: &str = "eyJhbGciOiJSUzI1NiJ9.eyJvdGhlcmF1ZCI6MX0.c2lnbmF0dXJl";

fn fake_api() -> FakeApi {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let (mut len, mut auth) = (0usize, String::new());
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).unwrap();
                if h.trim().is_empty() {
                    break;
                }
                let (k, v) = h.split_once(':').unwrap();
                match k.to_ascii_lowercase().as_str() {
                    "content-length" => len = v.trim().parse().unwrap(),
                    "authorization" => auth = v.trim().to_string(),
                    _ => {}
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let review: Value = serde_json::from_slice(&body).unwrap();
            record
                .lock()
                .unwrap()
                .push(json!({"line": request_line.trim(), "auth": auth, "review": review}));
            let (code, resp) = if auth != format!("Bearer {CA_OWN_TOKEN}") {
                (401, json!({"kind": "Status", "message": "Unauthorized"}))
            } else {
                let status = match review["spec"]["token"].as_str().unwrap_or("") {
                    JWT_GOOD => json!({"authenticated": true, "audiences": ["bulwark-ca"],
                        "user": {"username": "system:serviceaccount:shop:api", "groups": ["system:serviceaccounts"]}}),
                    JWT_OTHER_AUDIENCE => json!({"authenticated": true, "audiences": [],
                        "user": {"username": "system:serviceaccount:shop:api"}}),
                    _ => {
                        json!({"authenticated": false, "error": "[invalid bearer token, token has been invalidated]"})
                    }
                };
                let mut r = review.clone();
                r["status"] = status;
                (201, r)
            };
            let body = resp.to_string();
            let _ = write!(
                conn,
                "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    FakeApi { addr, seen }
}

fn ca_with_kube_api(work: &Path, api: &str) -> Ca {
    let token = work.join("ca-token");
    std::fs::write(&token, format!("{CA_OWN_TOKEN}\n")).unwrap();
    Ca::start(
        work,
        &[],
        &[
            "--kube-api",
            api,
            "--kube-token-file",
            token.to_str().unwrap(),
        ],
    )
}

fn request_cert(ca: &Ca, work: &Path, identity: &str, token: &str) -> std::process::Output {
    let tf = work.join("sa-token");
    std::fs::write(&tf, token).unwrap();
    let out = work.join("svid");
    let _ = std::fs::remove_dir_all(&out);
    run(&[
        "cert",
        "request",
        "--ca",
        &ca.addr.to_string(),
        "--ca-cert",
        ca.dir.join("bundle.pem").to_str().unwrap(),
        "--identity",
        identity,
        "--token-file",
        tf.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}

const SHOP_API: &str = "spiffe://cluster.local/ns/shop/sa/api";

#[test]
fn ca_issues_an_svid_for_a_service_account_token_the_api_accepts() {
    let api = fake_api();
    let work = tempdir();
    let ca = ca_with_kube_api(work.path(), &format!("http://{}", api.addr));
    let out = request_cert(&ca, work.path(), SHOP_API, JWT_GOOD);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(work.path().join("svid/cert.pem").exists());
    let seen = api.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0]["line"],
        "POST /apis/authentication.k8s.io/v1/tokenreviews HTTP/1.1"
    );
    assert_eq!(seen[0]["review"]["kind"], "TokenReview");
    assert_eq!(
        seen[0]["review"]["spec"]["audiences"],
        json!(["bulwark-ca"])
    );
    let rec = ca.records().pop().unwrap();
    assert_eq!(rec["outcome"], "issued");
    assert_eq!(rec["auth"], "kubernetes");
    assert_eq!(rec["identity"], SHOP_API);
    // The token proves shop/api, and nothing else.
    let out = request_cert(
        &ca,
        work.path(),
        "spiffe://cluster.local/ns/shop/sa/web",
        JWT_GOOD,
    );
    assert!(!out.status.success());
    let rec = ca.records().pop().unwrap();
    assert_eq!(rec["code"], "PERMISSION_DENIED");
}

fn assert_refused(ca: &Ca, out: &std::process::Output, needle: &str) {
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(needle), "{err}");
    let rec = ca.records().pop().unwrap();
    assert_eq!(rec["outcome"], "refused");
    assert_eq!(rec["code"], "UNAUTHENTICATED");
    assert!(rec["reason"].as_str().unwrap().contains(needle), "{rec}");
}

#[test]
fn ca_refuses_a_token_the_api_rejects() {
    let api = fake_api();
    let work = tempdir();
    let ca = ca_with_kube_api(work.path(), &format!("http://{}", api.addr));
    let out = request_cert(&ca, work.path(), SHOP_API, JWT_REJECTED);
    assert_refused(&ca, &out, "token has been invalidated");
}

#[test]
fn ca_refuses_a_token_for_another_audience() {
    let api = fake_api();
    let work = tempdir();
    let ca = ca_with_kube_api(work.path(), &format!("http://{}", api.addr));
    let out = request_cert(&ca, work.path(), SHOP_API, JWT_OTHER_AUDIENCE);
    assert_refused(&ca, &out, "not for audience \"bulwark-ca\"");
}

#[test]
fn ca_refuses_clearly_when_the_api_is_unreachable() {
    let work = tempdir();
    let closed = format!("http://127.0.0.1:{}", free_port());
    let ca = ca_with_kube_api(work.path(), &closed);
    let out = request_cert(&ca, work.path(), SHOP_API, JWT_GOOD);
    assert_refused(&ca, &out, "Kubernetes API unreachable");
}

#[test]
fn ca_without_kube_api_says_service_account_tokens_need_it() {
    let work = tempdir();
    let ca = Ca::start(work.path(), &[], &[]);
    let out = request_cert(&ca, work.path(), SHOP_API, JWT_GOOD);
    assert_refused(&ca, &out, "--kube-api");
    // The bootstrap-token path is unchanged.
    let out = request_cert(&ca, work.path(), SHOP_API, &ca.token(SHOP_API));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// bulwark rollout

fn weights(dir: &Path) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(dir.join("api-traffic.yaml")).unwrap();
    let route = yaml_docs(&text)
        .into_iter()
        .find(|d| d["kind"] == "Route")
        .unwrap();
    route["spec"]["rules"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["subset"]["version"].as_str().unwrap().to_string(),
                b["weight"].as_u64().unwrap_or(100),
            )
        })
        .collect()
}

fn rollout(dir: &Path, args: &[&str]) -> std::process::Output {
    let mut a = vec![
        "rollout",
        args[0],
        "--config",
        dir.to_str().unwrap(),
        "--route",
        "api",
    ];
    a.extend_from_slice(&args[1..]);
    run(&a)
}

/// The examples with api's canary promoted to v1 only: a clean start.
fn single_version_config() -> tempfile::TempDir {
    let work = tempdir();
    for e in std::fs::read_dir(root().join("deploy/examples")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, work.path().join(p.file_name().unwrap())).unwrap();
    }
    let out = rollout(work.path(), &["abort"]);
    assert!(!out.status.success(), "no rollout in progress yet");
    // Start from v1 only: drop v2 by hand the way a user would have it.
    let f = work.path().join("api-traffic.yaml");
    let text = std::fs::read_to_string(&f).unwrap().replace(
        "          weight: 90\n        - service: api\n          subset:\n            version: v2\n          weight: 10\n",
        "          weight: 100\n",
    );
    std::fs::write(&f, text).unwrap();
    assert_eq!(weights(work.path()), [("v1".to_string(), 100)]);
    work
}

#[test]
fn rollout_moves_weights_step_by_step_and_promotes() {
    let work = single_version_config();
    let dir = work.path();
    let other_files: Vec<(PathBuf, String)> = ["services.yaml", "mesh.yaml", "authorization.yaml"]
        .iter()
        .map(|f| (dir.join(f), std::fs::read_to_string(dir.join(f)).unwrap()))
        .collect();
    let out = rollout(dir, &["start", "--to", "v2", "--step", "20"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("v1 80%, v2 20%"));
    assert_eq!(weights(dir), [("v1".into(), 80), ("v2".into(), 20)]);
    let text = std::fs::read_to_string(dir.join("api-traffic.yaml")).unwrap();
    // The comment before the Route, and the other documents, are kept.
    assert!(
        text.starts_with("# Canary: 10% of api traffic goes to v2;"),
        "{text}"
    );
    assert!(text.contains("# Protect api from overload"));
    assert!(text.contains("bulwark.dev/rollout"));
    run_ok(&["xds", "validate", dir.to_str().unwrap()]);
    for _ in 0..3 {
        assert!(rollout(dir, &["step"]).status.success());
    }
    assert_eq!(weights(dir), [("v1".into(), 20), ("v2".into(), 80)]);
    assert!(rollout(dir, &["step"]).status.success());
    assert!(rollout(dir, &["step"]).status.success());
    assert_eq!(weights(dir), [("v1".into(), 0), ("v2".into(), 100)]);
    assert!(rollout(dir, &["promote"]).status.success());
    assert_eq!(weights(dir), [("v2".into(), 100)]);
    let text = std::fs::read_to_string(dir.join("api-traffic.yaml")).unwrap();
    assert!(!text.contains("bulwark.dev/rollout"));
    run_ok(&["xds", "validate", dir.to_str().unwrap()]);
    for (f, before) in other_files {
        assert_eq!(
            std::fs::read_to_string(&f).unwrap(),
            before,
            "{}",
            f.display()
        );
    }
    // No temporary files left behind.
    let names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
}

#[test]
fn rollout_abort_is_one_command_back_to_stable() {
    let work = single_version_config();
    let dir = work.path();
    let before = std::fs::read_to_string(dir.join("api-traffic.yaml")).unwrap();
    assert!(rollout(dir, &["start", "--to", "v2"]).status.success());
    assert_eq!(weights(dir), [("v1".into(), 90), ("v2".into(), 10)]);
    assert!(rollout(dir, &["step"]).status.success());
    let out = rollout(dir, &["start", "--to", "v3"]);
    assert!(!out.status.success(), "a second start is refused");
    assert!(rollout(dir, &["abort"]).status.success());
    assert_eq!(weights(dir), [("v1".into(), 100)]);
    run_ok(&["xds", "validate", dir.to_str().unwrap()]);
    // Same content as before the rollout (the Route re-serialized).
    let after = std::fs::read_to_string(dir.join("api-traffic.yaml")).unwrap();
    assert_eq!(yaml_docs(&after), yaml_docs(&before));
}

#[test]
fn rollout_blue_green_switches_in_one_step() {
    let work = single_version_config();
    let dir = work.path();
    assert!(
        rollout(dir, &["start", "--to", "v2", "--step", "100"])
            .status
            .success()
    );
    assert_eq!(weights(dir), [("v1".into(), 0), ("v2".into(), 100)]);
    assert!(rollout(dir, &["promote"]).status.success());
    assert_eq!(weights(dir), [("v2".into(), 100)]);
}

#[test]
fn rollout_refuses_an_edit_that_would_make_the_config_invalid() {
    let work = single_version_config();
    let dir = work.path();
    // Another route's service is unknown: the whole directory is checked.
    let f = dir.join("api-traffic.yaml");
    let before = std::fs::read_to_string(&f).unwrap();
    let broken = before.replace("  service: api\n  rules:", "  service: nosuch\n  rules:");
    std::fs::write(&f, &broken).unwrap();
    let out = rollout(dir, &["start", "--to", "v2"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing written"), "{err}");
    assert!(err.contains("api-traffic.yaml"), "{err}");
    assert_eq!(std::fs::read_to_string(&f).unwrap(), broken);
}

// ---------------------------------------------------------------------------
// Image

#[test]
fn dockerfile_is_multi_stage_non_root_labelled_and_has_no_healthcheck() {
    let text = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    let starts = |p: &str| lines.iter().filter(|l| l.starts_with(p)).count();
    assert!(starts("FROM ") >= 2, "multi-stage");
    assert!(text.contains("COPY --from=build"));
    assert!(text.contains("cargo build --release --locked --bin bulwark"));
    assert_eq!(
        starts("HEALTHCHECK"),
        0,
        "Kubernetes probes do health checks"
    );
    assert!(starts("LABEL ") >= 1);
    assert!(text.contains("org.opencontainers.image.version"));
    let user = lines
        .iter()
        .rev()
        .find(|l| l.starts_with("USER "))
        .expect("a USER");
    let uid = user[5..].split(':').next().unwrap();
    assert_ne!(uid, "0");
    assert_ne!(uid, "root");
    assert!(
        lines.last().unwrap().starts_with("CMD") || lines.last().unwrap().starts_with("ENTRYPOINT")
    );
    assert!(text.contains(r#"ENTRYPOINT ["/usr/local/bin/bulwark"]"#));
}
