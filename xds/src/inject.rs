//! Sidecar injection: what the admission webhook (`bulwark xds serve
//! --webhook-listen`) and `bulwark inject -f FILE` add to a pod. Plain
//! functions over `serde_json::Value`, so the same code serves both.
//!
//! A pod (or the pod template of a workload) gets:
//!
//! - the init container `bulwark-init` (`bulwark init`): installs the
//!   interception rules; runs as root with only `NET_ADMIN` and `NET_RAW`;
//! - the proxy `bulwark-proxy` (`bulwark sidecar`) as a Kubernetes *native
//!   sidecar*: an init container with `restartPolicy: Always` and a startup
//!   probe on `:15020/healthz/ready`, so the app's containers start only once
//!   the proxy holds an SVID and its first config, and Jobs still complete.
//!   It runs as uid 1337 without capabilities (`bulwark init --proxy-uid`
//!   excludes its sockets);
//! - volumes: a projected ServiceAccount token with audience `bulwark-ca`
//!   (the CA checks it with the TokenReview API), the trust bundle from the
//!   ConfigMap `bulwark-ca-bundle`, and an `emptyDir` for the proxy's last
//!   good config;
//! - the annotation `bulwark.dev/status: injected`.
//!
//! The proxy's identity is `spiffe://<td>/ns/$(POD_NAMESPACE)/sa/$(POD_SERVICE_ACCOUNT)`,
//! both variables (and `POD_IP`) coming from the downward API, so the same
//! template works in any namespace. Its `--ports` are the TCP
//! `containerPort`s of the app's containers, its `--labels` the pod's labels.
//!
//! Annotations on the pod (template):
//!
//! | annotation | effect |
//! |---|---|
//! | `bulwark.dev/inject: "false"` | not injected |
//! | `bulwark.dev/exclude-inbound-ports: "9090,9091"` | never captured inbound, not announced |
//! | `bulwark.dev/exclude-outbound-ports: "5432"` | never captured outbound |
//! | `bulwark.dev/proxy-cpu-request`, `-cpu-limit`, `-memory-request`, `-memory-limit` | the proxy's resources |
//! | `bulwark.dev/log-level: debug` | the proxy's log filter (`BULWARK_LOG`) |
//!
//! The JSON Patch (RFC 6902) emitted has only `add` operations, in this
//! order, each path under `prefix` (empty for a Pod, `/spec/template` for a
//! workload):
//!
//! 1. `/metadata/annotations` (the whole map, when the pod has none) or
//!    `/metadata/annotations/bulwark.dev~1status`;
//! 2. `/spec/initContainers` (`[init, proxy]`, when there are none) or
//!    `/spec/initContainers/0` (init) then `/spec/initContainers/1` (proxy),
//!    so that the app's own init containers already have the mesh;
//! 3. `/spec/volumes` (the three volumes, when there are none) or
//!    `/spec/volumes/-` once per volume.
//!
//! An opted-out or already injected pod gets an empty patch.

use std::collections::BTreeSet;

use serde_json::{Value, json};

pub const INJECT_ANNOTATION: &str = "bulwark.dev/inject";
pub const STATUS_ANNOTATION: &str = "bulwark.dev/status";
pub const EXCLUDE_INBOUND_ANNOTATION: &str = "bulwark.dev/exclude-inbound-ports";
pub const EXCLUDE_OUTBOUND_ANNOTATION: &str = "bulwark.dev/exclude-outbound-ports";
pub const LOG_LEVEL_ANNOTATION: &str = "bulwark.dev/log-level";
pub const CPU_REQUEST_ANNOTATION: &str = "bulwark.dev/proxy-cpu-request";
pub const CPU_LIMIT_ANNOTATION: &str = "bulwark.dev/proxy-cpu-limit";
pub const MEMORY_REQUEST_ANNOTATION: &str = "bulwark.dev/proxy-memory-request";
pub const MEMORY_LIMIT_ANNOTATION: &str = "bulwark.dev/proxy-memory-limit";
/// The namespace label the webhook selects on.
pub const NAMESPACE_LABEL: &str = "bulwark.dev/inject";

pub const PROXY_CONTAINER: &str = "bulwark-proxy";
pub const INIT_CONTAINER: &str = "bulwark-init";
pub const TOKEN_VOLUME: &str = "bulwark-token";
pub const BUNDLE_VOLUME: &str = "bulwark-ca-bundle";
pub const STATE_VOLUME: &str = "bulwark-state";
/// The uid the proxy runs as; `bulwark init --proxy-uid` excludes it.
pub const PROXY_UID: u32 = 1337;
/// The audience of the projected token; the CA asks TokenReview for it.
pub const TOKEN_AUDIENCE: &str = "bulwark-ca";

const TOKEN_DIR: &str = "/var/run/secrets/bulwark/token";
const BUNDLE_DIR: &str = "/var/run/secrets/bulwark/ca";
const STATE_DIR: &str = "/var/lib/bulwark";
/// Inbound ports `bulwark init` never captures (admin, metrics/health).
const BASE_EXCLUDE_INBOUND: [u16; 3] = [15000, 15020, 15021];

/// What the injected containers point at.
#[derive(Debug, Clone, PartialEq)]
pub struct InjectConfig {
    /// The `bulwark` image (its entrypoint is the `bulwark` binary).
    pub image: String,
    pub image_pull_policy: String,
    /// The CA, `host:port`.
    pub ca_addr: String,
    /// Control-plane replicas, `host:port` (comma-separated for several).
    pub xds_addr: String,
    pub trust_domain: String,
    /// The ConfigMap (in the pod's namespace) holding `bundle.pem`.
    pub bundle_configmap: String,
    /// Lifetime of the projected token (the kubelet refreshes it).
    pub token_expiration_seconds: i64,
    /// The proxy's default resources, overridden by annotations.
    pub cpu_request: String,
    pub memory_request: String,
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            image: format!("ghcr.io/bulwark-mesh/bulwark:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: "IfNotPresent".into(),
            ca_addr: "bulwark-ca.bulwark-system.svc:15012".into(),
            xds_addr: "bulwark-xds.bulwark-system.svc:15010".into(),
            trust_domain: crate::model::DEFAULT_TRUST_DOMAIN.into(),
            bundle_configmap: "bulwark-ca-bundle".into(),
            token_expiration_seconds: 3600,
            cpu_request: "100m".into(),
            memory_request: "64Mi".into(),
            cpu_limit: None,
            memory_limit: Some("256Mi".into()),
        }
    }
}

/// Why a pod cannot be injected as asked.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InjectError {
    /// An annotation's value is unusable: the pod should be fixed, not run
    /// outside the mesh.
    #[error("annotation {name}: {value:?} {why}")]
    Annotation {
        name: &'static str,
        value: String,
        why: &'static str,
    },
    /// The object is not a pod (template) this code understands.
    #[error("{0}")]
    Malformed(String),
    /// An app container would run as the proxy's uid, which interception
    /// lets through untouched: its traffic would bypass the mesh.
    #[error(
        "container {0} runs as uid {PROXY_UID}, the proxy's, whose traffic is not intercepted: give it another runAsUser or opt the pod out (bulwark.dev/inject: \"false\")"
    )]
    ProxyUid(String),
}

/// The result for one pod (template).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// JSON Patch operations (see the module docs); empty when skipped.
    pub patch: Vec<Value>,
    /// Why nothing was injected, if so.
    pub skipped: Option<String>,
    /// Things the user should know (shown by `kubectl` as warnings).
    pub warnings: Vec<String>,
}

fn annotation<'a>(pod: &'a Value, name: &str) -> Option<&'a str> {
    pod.pointer("/metadata/annotations")
        .and_then(|a| a.get(name))
        .and_then(Value::as_str)
}

fn ports_annotation(pod: &Value, name: &'static str) -> Result<Vec<u16>, InjectError> {
    let Some(v) = annotation(pod, name) else {
        return Ok(Vec::new());
    };
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|p| match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(InjectError::Annotation {
                name,
                value: v.to_string(),
                why: "must be a comma-separated list of ports (1-65535)",
            }),
        })
        .collect()
}

/// A Kubernetes quantity, loosely: digits (maybe a decimal point) and an
/// optional known suffix.
fn quantity_annotation(pod: &Value, name: &'static str) -> Result<Option<String>, InjectError> {
    let Some(v) = annotation(pod, name) else {
        return Ok(None);
    };
    let v = v.trim();
    let digits = v.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &v[digits.len()..];
    let ok = !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
        && digits.chars().filter(|c| *c == '.').count() <= 1
        && [
            "", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei",
        ]
        .contains(&suffix);
    if ok {
        Ok(Some(v.to_string()))
    } else {
        Err(InjectError::Annotation {
            name,
            value: v.to_string(),
            why: "is not a Kubernetes quantity (e.g. 100m, 128Mi)",
        })
    }
}

fn log_level_annotation(pod: &Value) -> Result<Option<String>, InjectError> {
    let Some(v) = annotation(pod, LOG_LEVEL_ANNOTATION) else {
        return Ok(None);
    };
    let ok = !v.is_empty()
        && v.len() <= 256
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_=,:.-".contains(c));
    if ok {
        Ok(Some(v.to_string()))
    } else {
        Err(InjectError::Annotation {
            name: LOG_LEVEL_ANNOTATION,
            value: v.to_string(),
            why: "is not a log filter (e.g. debug, or info,bulwark_sidecar=debug)",
        })
    }
}

fn containers(spec: &Value, field: &str) -> Vec<Value> {
    spec.get(field)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// Whether the pod (template) already has the proxy.
pub fn is_injected(pod: &Value) -> bool {
    if annotation(pod, STATUS_ANNOTATION) == Some("injected") {
        return true;
    }
    let spec = pod.get("spec").unwrap_or(&Value::Null);
    ["containers", "initContainers"].iter().any(|f| {
        containers(spec, f)
            .iter()
            .any(|c| c.get("name").and_then(Value::as_str) == Some(PROXY_CONTAINER))
    })
}

fn opted_out(pod: &Value) -> bool {
    matches!(
        annotation(pod, INJECT_ANNOTATION).map(|s| s.trim().to_ascii_lowercase()),
        Some(v) if ["false", "disabled", "no", "off"].contains(&v.as_str())
    )
}

fn join(ports: impl IntoIterator<Item = u16>) -> String {
    ports
        .into_iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The JSON Patch that injects the pod (template) `pod`; paths are prefixed
/// with `prefix` (`""` for a Pod, `/spec/template` for a Deployment...).
pub fn pod_patch(pod: &Value, prefix: &str, cfg: &InjectConfig) -> Result<Outcome, InjectError> {
    let spec = match pod.get("spec") {
        Some(s) if s.is_object() => s,
        _ => return Err(InjectError::Malformed("the pod has no spec".into())),
    };
    if !spec.get("containers").is_some_and(Value::is_array) {
        return Err(InjectError::Malformed(
            "the pod spec has no containers".into(),
        ));
    }
    let skip = |why: &str| {
        Ok(Outcome {
            skipped: Some(why.to_string()),
            ..Default::default()
        })
    };
    if opted_out(pod) {
        return skip("opted out (bulwark.dev/inject: false)");
    }
    if is_injected(pod) {
        return skip("already injected");
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Outcome {
            skipped: Some("hostNetwork pod: interception would capture the node's traffic".into()),
            warnings: vec![
                "bulwark: not injected: the pod uses hostNetwork, and interception rules would apply to the node".into(),
            ],
            ..Default::default()
        });
    }
    let pod_uid = spec
        .pointer("/securityContext/runAsUser")
        .and_then(Value::as_u64);
    for kind in ["initContainers", "containers"] {
        for c in containers(spec, kind) {
            let uid = c
                .pointer("/securityContext/runAsUser")
                .and_then(Value::as_u64)
                .or(pod_uid);
            if uid == Some(u64::from(PROXY_UID)) {
                let name = c.get("name").and_then(Value::as_str).unwrap_or("?");
                return Err(InjectError::ProxyUid(name.to_string()));
            }
        }
    }
    let exclude_in = ports_annotation(pod, EXCLUDE_INBOUND_ANNOTATION)?;
    let exclude_out = ports_annotation(pod, EXCLUDE_OUTBOUND_ANNOTATION)?;
    let log_level = log_level_annotation(pod)?;
    let cpu_request =
        quantity_annotation(pod, CPU_REQUEST_ANNOTATION)?.unwrap_or(cfg.cpu_request.clone());
    let memory_request =
        quantity_annotation(pod, MEMORY_REQUEST_ANNOTATION)?.unwrap_or(cfg.memory_request.clone());
    let cpu_limit = quantity_annotation(pod, CPU_LIMIT_ANNOTATION)?.or(cfg.cpu_limit.clone());
    let memory_limit =
        quantity_annotation(pod, MEMORY_LIMIT_ANNOTATION)?.or(cfg.memory_limit.clone());

    let mut warnings = Vec::new();
    // The app's TCP ports (minus excluded ones), announced to the control plane.
    let mut ports = BTreeSet::new();
    for c in containers(spec, "containers") {
        for p in c
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let tcp = p
                .get("protocol")
                .and_then(Value::as_str)
                .is_none_or(|s| s == "TCP");
            if let Some(n) = p.get("containerPort").and_then(Value::as_u64)
                && tcp
                && let Ok(n) = u16::try_from(n)
                && !exclude_in.contains(&n)
            {
                ports.insert(n);
            }
        }
        // The kubelet's probes arrive in plaintext; STRICT mTLS refuses
        // them, and so do the pod's policies (on every port) in PERMISSIVE.
        let name = c.get("name").and_then(Value::as_str).unwrap_or("?");
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            let port = c
                .pointer(&format!("/{probe}/httpGet/port"))
                .or_else(|| c.pointer(&format!("/{probe}/tcpSocket/port")));
            if let Some(port) = port {
                let n = port.as_u64().and_then(|n| u16::try_from(n).ok());
                if n.is_none_or(|n| !exclude_in.contains(&n)) {
                    warnings.push(format!(
                        "bulwark: container {name}: the {probe} on port {port} is plaintext from the kubelet, which STRICT mTLS refuses, as does in PERMISSIVE any AuthorizationPolicy of the pod's services that names its callers; list the port in {EXCLUDE_INBOUND_ANNOTATION} or serve the probe on another port"
                    ));
                }
            }
        }
    }
    let labels: Vec<String> = pod
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| format!("{k}={v}")))
                .collect()
        })
        .unwrap_or_default();

    let mut exclude_inbound: Vec<u16> = BASE_EXCLUDE_INBOUND.to_vec();
    exclude_inbound.extend(
        exclude_in
            .iter()
            .filter(|p| !BASE_EXCLUDE_INBOUND.contains(p)),
    );
    // None but the pod's own choice: the proxy's connections to the CA and
    // control plane pass by uid, and any port let through here is open to
    // every host around the mesh.
    let mut init_args = vec![
        "init".to_string(),
        "--proxy-uid".to_string(),
        PROXY_UID.to_string(),
        "--exclude-inbound-ports".to_string(),
        join(exclude_inbound),
    ];
    if !exclude_out.is_empty() {
        init_args.push("--exclude-outbound-ports".to_string());
        init_args.push(join(exclude_out.iter().copied()));
    }

    let init = json!({
        "name": INIT_CONTAINER,
        "image": cfg.image,
        "imagePullPolicy": cfg.image_pull_policy,
        "args": init_args,
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"memory": "64Mi"},
        },
        // iptables needs uid 0 (capabilities do not survive exec for another
        // uid); it gets nothing but the two network capabilities.
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
        },
    });

    let mut args = vec![
        "sidecar".to_string(),
        "--identity".into(),
        format!(
            "spiffe://{}/ns/$(POD_NAMESPACE)/sa/$(POD_SERVICE_ACCOUNT)",
            cfg.trust_domain
        ),
        "--ca".into(),
        cfg.ca_addr.clone(),
        "--ca-cert".into(),
        format!("{BUNDLE_DIR}/bundle.pem"),
        "--token-file".into(),
        format!("{TOKEN_DIR}/token"),
        "--xds".into(),
        cfg.xds_addr.clone(),
        "--pod-ip".into(),
        "$(POD_IP)".into(),
        "--state-dir".into(),
        STATE_DIR.into(),
    ];
    if !ports.is_empty() {
        args.push("--ports".into());
        args.push(join(ports));
    }
    if !labels.is_empty() {
        args.push("--labels".into());
        args.push(labels.join(","));
    }
    let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    let mut env = vec![
        field("POD_NAME", "metadata.name"),
        field("POD_NAMESPACE", "metadata.namespace"),
        field("POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field("POD_IP", "status.podIP"),
    ];
    if let Some(l) = log_level {
        env.push(json!({"name": "BULWARK_LOG", "value": l}));
    }
    let mut limits = serde_json::Map::new();
    if let Some(c) = cpu_limit {
        limits.insert("cpu".into(), c.into());
    }
    if let Some(m) = memory_limit {
        limits.insert("memory".into(), m.into());
    }
    let mut resources = json!({"requests": {"cpu": cpu_request, "memory": memory_request}});
    if !limits.is_empty() {
        resources["limits"] = Value::Object(limits);
    }
    let health = |path: &str| json!({"path": path, "port": 15020});
    let proxy = json!({
        "name": PROXY_CONTAINER,
        "image": cfg.image,
        "imagePullPolicy": cfg.image_pull_policy,
        // A native sidecar: started before the app, kept running, stopped
        // after it; a Job completes when its app containers do.
        "restartPolicy": "Always",
        "args": args,
        "env": env,
        "ports": [{"name": "bw-health", "containerPort": 15020, "protocol": "TCP"}],
        "startupProbe": {"httpGet": health("/healthz/ready"), "periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 300},
        "readinessProbe": {"httpGet": health("/healthz/ready"), "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": health("/healthz/live"), "periodSeconds": 10, "failureThreshold": 3},
        "resources": resources,
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true},
            {"name": BUNDLE_VOLUME, "mountPath": BUNDLE_DIR, "readOnly": true},
            {"name": STATE_VOLUME, "mountPath": STATE_DIR},
        ],
    });
    let volumes = [
        json!({"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
            "audience": TOKEN_AUDIENCE,
            "expirationSeconds": cfg.token_expiration_seconds,
            "path": "token",
        }}]}}),
        json!({"name": BUNDLE_VOLUME, "configMap": {"name": cfg.bundle_configmap, "items": [{"key": "bundle.pem", "path": "bundle.pem"}]}}),
        json!({"name": STATE_VOLUME, "emptyDir": {"sizeLimit": "16Mi"}}),
    ];

    let mut patch = Vec::new();
    let add = |path: String, value: Value| json!({"op": "add", "path": path, "value": value});
    if pod
        .pointer("/metadata/annotations")
        .is_some_and(Value::is_object)
    {
        patch.push(add(
            format!(
                "{prefix}/metadata/annotations/{}",
                escape(STATUS_ANNOTATION)
            ),
            "injected".into(),
        ));
    } else if pod.get("metadata").is_some_and(Value::is_object) {
        patch.push(add(
            format!("{prefix}/metadata/annotations"),
            json!({STATUS_ANNOTATION: "injected"}),
        ));
    } else {
        patch.push(add(
            format!("{prefix}/metadata"),
            json!({"annotations": {STATUS_ANNOTATION: "injected"}}),
        ));
    }
    if spec.get("initContainers").is_some_and(Value::is_array) {
        patch.push(add(format!("{prefix}/spec/initContainers/0"), init));
        patch.push(add(format!("{prefix}/spec/initContainers/1"), proxy));
    } else {
        patch.push(add(
            format!("{prefix}/spec/initContainers"),
            json!([init, proxy]),
        ));
    }
    if spec.get("volumes").is_some_and(Value::is_array) {
        for v in volumes {
            patch.push(add(format!("{prefix}/spec/volumes/-"), v));
        }
    } else {
        patch.push(add(
            format!("{prefix}/spec/volumes"),
            Value::Array(volumes.to_vec()),
        ));
    }
    Ok(Outcome {
        patch,
        skipped: None,
        warnings,
    })
}

/// Where the pod template of a workload kind is, if it is one.
pub fn template_path(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// The patch for a whole object (a Pod or a workload), `None` when the
/// kind has no pod template.
pub fn object_patch(obj: &Value, cfg: &InjectConfig) -> Option<Result<Outcome, InjectError>> {
    let kind = obj.get("kind").and_then(Value::as_str)?;
    let path = template_path(kind)?;
    Some(match obj.pointer(path) {
        Some(t) if t.is_object() => pod_patch(t, path, cfg),
        _ => Err(InjectError::Malformed(format!(
            "{kind} has no pod template at {}",
            if path.is_empty() { "/" } else { path }
        ))),
    })
}

/// Applies `add` operations (all [`pod_patch`] emits) to `doc`.
pub fn apply_adds(doc: &mut Value, patch: &[Value]) -> Result<(), String> {
    for op in patch {
        if op.get("op").and_then(Value::as_str) != Some("add") {
            return Err(format!("unsupported operation {op}"));
        }
        let path = op.get("path").and_then(Value::as_str).unwrap_or("");
        let value = op.get("value").cloned().unwrap_or(Value::Null);
        let (parent, last) = path
            .rsplit_once('/')
            .ok_or_else(|| format!("bad path {path:?}"))?;
        let last = last.replace("~1", "/").replace("~0", "~");
        let target = doc
            .pointer_mut(parent)
            .ok_or_else(|| format!("no {parent:?} to add to"))?;
        match target {
            Value::Object(m) => {
                m.insert(last, value);
            }
            Value::Array(a) if last == "-" => a.push(value),
            Value::Array(a) => {
                let i: usize = last
                    .parse()
                    .ok()
                    .filter(|i| *i <= a.len())
                    .ok_or_else(|| format!("bad index in {path:?}"))?;
                a.insert(i, value);
            }
            _ => return Err(format!("{parent:?} is not a container")),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The admission webhook's contract (admission.k8s.io/v1).

/// The answer to one AdmissionReview request body: the HTTP status and the
/// AdmissionReview to send back. Never panics on any input.
///
/// - not JSON, not an `admission.k8s.io/v1` AdmissionReview, or no
///   `request.uid`: HTTP 400 with a response `allowed: false` and the reason;
/// - not a Pod, or not a CREATE: allowed, unchanged (with a warning for a
///   non-Pod: the webhook is misconfigured);
/// - a Pod the injector cannot read: allowed, unchanged, with a warning (the
///   API server's own validation has the final word);
/// - an unusable `bulwark.dev/*` annotation: refused (code 400) saying which;
/// - otherwise: allowed, with the JSON Patch (none when opted out or already
///   injected).
pub fn review(body: &[u8], cfg: &InjectConfig) -> (u16, Value) {
    let bad = |msg: String| {
        (
            400,
            json!({
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "response": {"uid": "", "allowed": false, "status": {"code": 400, "reason": "BadRequest", "message": msg}},
            }),
        )
    };
    let review: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return bad(format!("bulwark injector: the body is not JSON: {e}")),
    };
    if review.get("apiVersion").and_then(Value::as_str) != Some("admission.k8s.io/v1")
        || review.get("kind").and_then(Value::as_str) != Some("AdmissionReview")
    {
        return bad("bulwark injector: expected an admission.k8s.io/v1 AdmissionReview".into());
    }
    let Some(request) = review.get("request").filter(|r| r.is_object()) else {
        return bad("bulwark injector: the AdmissionReview has no request".into());
    };
    let Some(uid) = request.get("uid").and_then(Value::as_str) else {
        return bad("bulwark injector: the request has no uid".into());
    };
    let respond = |response: Value| {
        let mut r = json!({"uid": uid, "allowed": true});
        if let (Value::Object(into), Value::Object(from)) = (&mut r, response) {
            into.extend(from);
        }
        (
            200,
            json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": r}),
        )
    };
    let kind = request.pointer("/kind/kind").and_then(Value::as_str);
    if kind != Some("Pod") || request.get("subResource").is_some_and(|s| !s.is_null()) {
        return respond(json!({"warnings": [format!(
            "bulwark injector: ignoring {} (only Pod creations are injected)",
            kind.unwrap_or("an object without kind")
        )]}));
    }
    if request.get("operation").and_then(Value::as_str) != Some("CREATE") {
        return respond(json!({}));
    }
    let Some(pod) = request.get("object").filter(|o| o.is_object()) else {
        return respond(
            json!({"warnings": ["bulwark injector: the request carries no pod; not injected"]}),
        );
    };
    match pod_patch(pod, "", cfg) {
        Ok(out) => {
            let mut r = json!({});
            if !out.warnings.is_empty() {
                r["warnings"] = json!(out.warnings);
            }
            if !out.patch.is_empty() {
                use base64::Engine;
                let bytes = serde_json::to_vec(&out.patch).unwrap_or_default();
                r["patchType"] = "JSONPatch".into();
                r["patch"] = base64::engine::general_purpose::STANDARD
                    .encode(bytes)
                    .into();
            }
            respond(r)
        }
        Err(e @ (InjectError::Annotation { .. } | InjectError::ProxyUid(_))) => respond(json!({
            "allowed": false,
            "status": {"code": 400, "reason": "BadRequest", "message": format!("bulwark injector: {e}")},
        })),
        Err(e @ InjectError::Malformed(_)) => {
            respond(json!({"warnings": [format!("bulwark injector: not injected: {e}")]}))
        }
    }
}

// ---------------------------------------------------------------------------
// `bulwark inject -f FILE`: a multi-document YAML stream.

/// Why a YAML stream could not be injected.
#[derive(Debug, thiserror::Error)]
#[error("document {index} (line {line}): {message}")]
pub struct StreamError {
    /// 1-based document number.
    pub index: usize,
    /// 1-based line of the document's start.
    pub line: usize,
    pub message: String,
}

/// Splits a YAML stream on `---` lines; every piece keeps its text exactly,
/// so concatenating them gives the input back.
pub(crate) fn split_stream(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let (mut start, mut start_line, mut pos) = (0usize, 1usize, 0usize);
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let marker = bare
            .strip_prefix("---")
            .is_some_and(|r| r.is_empty() || r.starts_with([' ', '\t']));
        if marker && pos > start {
            out.push((start_line, &text[start..pos]));
            start = pos;
            start_line = i + 1;
        }
        pos += line.len();
    }
    if pos > start {
        out.push((start_line, &text[start..]));
    }
    out
}

fn has_content(doc: &str) -> bool {
    doc.lines().any(|l| {
        let t = l.trim();
        !(t.is_empty()
            || t.starts_with('#')
            || t.starts_with("---")
            || t == "..."
            || t.starts_with('%'))
    })
}

/// What [`inject_stream`] did.
#[derive(Debug, Default)]
pub struct StreamReport {
    pub injected: usize,
    pub skipped: Vec<String>,
    pub warnings: Vec<String>,
}

/// Injects every workload of a multi-document YAML stream (Pods,
/// Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs, CronJobs).
/// Other documents, and workloads left unchanged, are copied byte for byte;
/// an injected document is re-serialized (its comments are lost).
pub fn inject_stream(
    text: &str,
    cfg: &InjectConfig,
) -> Result<(String, StreamReport), StreamError> {
    let mut out = String::with_capacity(text.len() * 2);
    let mut report = StreamReport::default();
    for (index, (line, doc)) in split_stream(text).into_iter().enumerate() {
        let err = |message: String| StreamError {
            index: index + 1,
            line,
            message,
        };
        if !has_content(doc) {
            out.push_str(doc);
            continue;
        }
        let value: Value =
            serde_saphyr::from_str(doc).map_err(|e| err(format!("not valid YAML: {e}")))?;
        let name = value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        let kind = value
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let outcome = match object_patch(&value, cfg) {
            None => {
                out.push_str(doc);
                continue;
            }
            Some(r) => r.map_err(|e| err(format!("{kind} {name}: {e}")))?,
        };
        report.warnings.extend(
            outcome
                .warnings
                .iter()
                .map(|w| format!("{kind} {name}: {w}")),
        );
        if let Some(why) = outcome.skipped {
            report.skipped.push(format!("{kind} {name}: {why}"));
            out.push_str(doc);
            continue;
        }
        let mut value = value;
        apply_adds(&mut value, &outcome.patch).map_err(|e| err(format!("{kind} {name}: {e}")))?;
        let yaml =
            serde_saphyr::to_string(&value).map_err(|e| err(format!("cannot write YAML: {e}")))?;
        if doc.starts_with("---") {
            out.push_str("---\n");
        }
        out.push_str(&yaml);
        if !yaml.ends_with('\n') {
            out.push('\n');
        }
        report.injected += 1;
    }
    Ok((out, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "labels": {"app": "web", "version": "v1"}},
            "spec": {
                "serviceAccountName": "web",
                "containers": [{"name": "app", "image": "web:1", "ports": [
                    {"containerPort": 8080}, {"containerPort": 9090, "name": "admin"},
                    {"containerPort": 5353, "protocol": "UDP"}
                ]}]
            }
        })
    }

    fn arg_after<'a>(c: &'a Value, flag: &str) -> Option<&'a str> {
        let args = c["args"].as_array().unwrap();
        let i = args.iter().position(|a| a == flag)?;
        args[i + 1].as_str()
    }

    #[test]
    fn injects_init_container_native_sidecar_and_volumes() {
        let mut p = pod();
        let out = pod_patch(&p, "", &InjectConfig::default()).unwrap();
        apply_adds(&mut p, &out.patch).unwrap();
        let inits = p["spec"]["initContainers"].as_array().unwrap();
        assert_eq!(inits[0]["name"], INIT_CONTAINER);
        assert_eq!(inits[1]["name"], PROXY_CONTAINER);
        assert_eq!(inits[1]["restartPolicy"], "Always");
        assert_eq!(
            inits[1]["startupProbe"]["httpGet"]["path"],
            "/healthz/ready"
        );
        assert_eq!(arg_after(&inits[1], "--ports"), Some("8080,9090"));
        assert_eq!(arg_after(&inits[1], "--labels"), Some("app=web,version=v1"));
        assert_eq!(arg_after(&inits[0], "--exclude-outbound-ports"), None);
        assert_eq!(p["metadata"]["annotations"][STATUS_ANNOTATION], "injected");
        assert_eq!(p["spec"]["volumes"].as_array().unwrap().len(), 3);
        assert!(is_injected(&p));
        assert!(
            pod_patch(&p, "", &InjectConfig::default())
                .unwrap()
                .patch
                .is_empty()
        );
    }

    #[test]
    fn an_app_running_as_the_proxy_uid_is_refused() {
        let cfg = InjectConfig::default();
        let mut p = pod();
        p["spec"]["securityContext"] = json!({"runAsUser": PROXY_UID});
        let e = pod_patch(&p, "", &cfg).unwrap_err();
        assert!(matches!(&e, InjectError::ProxyUid(c) if c == "app"), "{e}");
        // The container's own uid wins over the pod's.
        p["spec"]["containers"][0]["securityContext"] = json!({"runAsUser": 1000});
        assert!(pod_patch(&p, "", &cfg).is_ok());
        let mut p = pod();
        p["spec"]["initContainers"] = json!([{"name": "migrate", "image": "m:1", "securityContext": {"runAsUser": PROXY_UID}}]);
        assert!(matches!(
            pod_patch(&p, "", &cfg),
            Err(InjectError::ProxyUid(c)) if c == "migrate"
        ));
    }

    #[test]
    fn bad_port_annotation_is_an_error() {
        let mut p = pod();
        p["metadata"]["annotations"] = json!({EXCLUDE_INBOUND_ANNOTATION: "80,http"});
        assert!(matches!(
            pod_patch(&p, "", &InjectConfig::default()),
            Err(InjectError::Annotation { .. })
        ));
    }

    #[test]
    fn review_never_panics_on_garbage() {
        for body in [&b""[..], b"null", b"[]", b"{\"apiVersion\":1}", b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\",\"request\":{\"uid\":\"u\",\"kind\":{\"kind\":\"Pod\"},\"operation\":\"CREATE\",\"object\":{\"spec\":7}}}"] {
            let (code, v) = review(body, &InjectConfig::default());
            assert!(code == 200 || code == 400);
            assert_eq!(v["kind"], "AdmissionReview");
        }
    }

    #[test]
    fn stream_split_round_trips() {
        let text = "# c\na: 1\n---\nb: 2\n--- # x\nc: 3\n";
        let parts = split_stream(text);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts.iter().map(|p| p.1).collect::<String>(), text);
        assert_eq!(parts[2].0, 5);
    }
}
