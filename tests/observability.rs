//! Observability end to end: the Prometheus material in `deploy/prometheus`
//! checked by promtool, a real sidecar's `/metrics` after traffic checked by
//! promtool and scraped by a real Prometheus server (network namespaces),
//! and `bulwark audit verify` on a log written by the sidecar's audit module.

mod common;
mod netns;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use bulwark_sidecar::audit::{AuditLog, AuditOptions, AuditRecord, Decision};
use common::wait_for;
use netns::mesh::{Mesh, TD, spiffe};

const VIP: &str = "198.18.100.1";

/// Meshes in network namespaces: one at a time on two cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/prometheus")
        .join(file)
}

/// Runs a Prometheus tool (`promtool`, `prometheus`), feeding `stdin`.
fn tool(program: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {program}: {e}; install it with `apt-get install prometheus` (`bash .ci/run` does)")
        });
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn promtool_ok(args: &[&str], stdin: Option<&[u8]>) -> String {
    let o = tool("promtool", args, stdin);
    assert!(
        o.status.success(),
        "promtool {args:?} failed:\n{}",
        text(&o)
    );
    text(&o)
}

/// The body of an HTTP response as returned by `http_get`.
fn body(response: &str) -> &str {
    response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("")
}

#[test]
fn alert_rules_and_scrape_config_pass_promtool_checks_and_rule_unit_tests() {
    let rules = deploy("alerts.yaml");
    let out = promtool_ok(&["check", "rules", rules.to_str().unwrap()], None);
    assert!(out.contains("SUCCESS"), "{out}");
    // The rules fire (and stay quiet) on series shaped like ours.
    let tests = deploy("alerts_test.yaml");
    promtool_ok(&["test", "rules", tests.to_str().unwrap()], None);
    // The example config, and the rule file it loads.
    let config = deploy("prometheus.yml");
    promtool_ok(&["check", "config", config.to_str().unwrap()], None);
}

/// Metric names registered in the crates' sources: every string literal that
/// looks like one (`registry.register("bulwark_...", ...)`).
fn registered_names() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let src = std::fs::read_to_string(&p).unwrap();
                for lit in src.split('"').skip(1).step_by(2) {
                    if lit.starts_with("bulwark_")
                        && lit
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                    {
                        out.insert(lit.to_string());
                    }
                }
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = BTreeSet::new();
    for krate in ["sidecar/src", "xds/src", "ca/src"] {
        walk(&root.join(krate), &mut out);
    }
    out
}

#[test]
fn alert_rules_refer_only_to_metrics_that_bulwark_exports() {
    let names = registered_names();
    assert!(names.contains("bulwark_requests"), "{names:?}");
    let rules = std::fs::read_to_string(deploy("alerts.yaml")).unwrap();
    let unknown: Vec<String> = metric_like_words(&rules)
        .into_iter()
        .filter(|w| w.starts_with("bulwark_"))
        .filter(|w| {
            // Sample names: counters add `_total`, histograms `_bucket` etc.
            let base = ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| w.strip_suffix(s))
                .unwrap_or(w);
            !names.contains(w.as_str()) && !names.contains(base)
        })
        .collect();
    assert!(
        unknown.is_empty(),
        "alerts.yaml uses metrics nobody registers: {unknown:?}\nregistered: {names:?}"
    );
}

/// Identifier-like words of `s` (enough to pick metric names out of PromQL),
/// skipping comments and the annotations' prose.
fn metric_like_words(s: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in s.lines() {
        let line = line.trim_start();
        if line.starts_with('#') || line.starts_with("summary:") || line.starts_with("description:")
        {
            continue;
        }
        for w in line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if !w.is_empty() {
                out.insert(w.to_string());
            }
        }
    }
    out
}

/// `api` (HTTP on VIP:8080) served by the `api` pod, callable by `web`.
fn http_config(api: &netns::Pod) -> String {
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
    - {api_id}
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
    - address: {ip}
      identity: {api_id}
---
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
"#,
        api_id = spiffe("api"),
        ip = api.ip,
        web = spiffe("web"),
    )
}

/// web and api pods with sidecars, ready.
fn start_mesh() -> Option<Mesh> {
    let mut mesh = Mesh::start(&[])?;
    mesh.add_pod("web");
    let api = mesh.add_pod("api");
    mesh.write_config(&http_config(&api));
    mesh.start_sidecar("web", "web", &[]);
    mesh.start_sidecar("api", "api", &[]);
    mesh.wait_ready("web");
    mesh.wait_ready("api");
    Some(mesh)
}

/// GET `path` on api's VIP from inside the web pod (through both sidecars);
/// the status code (0 if the connection failed).
fn get_from_web(mesh: &Mesh, path: &str) -> u16 {
    let ns = format!("/run/netns/{}", mesh.pod("web").pod.ns);
    let target: SocketAddr = format!("{VIP}:8080").parse().unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: api.default\r\nConnection: close\r\n\r\n");
    std::thread::spawn(move || {
        use std::io::Read;
        netns::enter(&ns);
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(3))
        else {
            return 0;
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        if s.write_all(req.as_bytes()).is_err() {
            return 0;
        }
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out)
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    })
    .join()
    .unwrap()
}

#[test]
fn sidecar_metrics_after_traffic_pass_promtool_check_metrics() {
    let _serial = serial();
    let Some(mesh) = start_mesh() else {
        return;
    };
    for _ in 0..5 {
        assert_eq!(
            get_from_web(&mesh, "/hello"),
            200,
            "{}",
            mesh.sidecar_log("web")
        );
    }
    let response = mesh.metrics("api");
    let metrics = body(&response);
    assert!(
        metrics.contains("bulwark_requests_total{") && metrics.contains("# EOF"),
        "{response}"
    );
    let o = tool("promtool", &["check", "metrics"], Some(metrics.as_bytes()));
    let problems = promtool_metric_problems(&text(&o), metrics);
    assert!(
        problems.is_empty(),
        "promtool check metrics: {problems:#?}\n{metrics}"
    );
}

/// promtool's complaints about an OpenMetrics exposition, less the one that
/// comes from the format rather than from us. promtool parses the Prometheus
/// text format (0.0.4), where a counter's samples carry the family's name;
/// OpenMetrics declares the family `x` (`# TYPE x counter`, `# HELP x ...`)
/// and names its samples `x_total`, which promtool then takes for a family
/// of its own and reports as `x_total no help text`. It accepts `# EOF` (a
/// comment to it). Everything else it says counts, parse errors included.
fn promtool_metric_problems(out: &str, exposition: &str) -> Vec<String> {
    let helped: BTreeSet<&str> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP ")?.split_whitespace().next())
        .collect();
    let counters: BTreeSet<&str> = exposition
        .lines()
        .filter_map(|l| {
            let mut p = l.strip_prefix("# TYPE ")?.split_whitespace();
            let name = p.next()?;
            (p.next()? == "counter").then_some(name)
        })
        .filter(|n| helped.contains(n))
        .collect();
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            let family = l
                .strip_suffix(" no help text")
                .and_then(|n| n.strip_suffix("_total"));
            !family.is_some_and(|f| counters.contains(f))
        })
        .map(String::from)
        .collect()
}

/// Percent-encodes a query-string value.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_scrapes_request_counts_from_a_real_sidecar() {
    let _serial = serial();
    let Some(mut mesh) = start_mesh() else {
        return;
    };
    let api_ip = mesh.pod("api").pod.ip;
    let dir = mesh.net.dir.join("prometheus");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: bulwark-sidecars\n    static_configs:\n      - targets: [\"{api_ip}:15020\"]\n"
        ),
    )
    .unwrap();
    // In the switch namespace, which reaches every pod over the bridge.
    let listen: SocketAddr = "198.18.0.1:19090".parse().unwrap();
    let switch = mesh.net.switch.clone();
    let config_arg = format!("--config.file={}", config.display());
    let data_arg = format!("--storage.tsdb.path={}", dir.join("data").display());
    let listen_arg = format!("--web.listen-address={listen}");
    let prom = mesh.net.spawn(
        &switch,
        "prometheus",
        "prometheus",
        &[&config_arg, &data_arg, &listen_arg],
    );
    {
        let net = &mut mesh.net;
        wait_for("Prometheus to be ready", Duration::from_secs(30), || {
            if let Ok(Some(st)) = net.proc_mut(prom).child.try_wait() {
                panic!("prometheus exited ({st}): {}", net.log_of(prom));
            }
            net.http_get(&switch, listen, "/-/ready")
                .filter(|r| r.contains(" 200 "))
                .map(|_| ())
        });
    }

    let query = format!(
        "bulwark_requests_total{{job=\"bulwark-sidecars\",direction=\"inbound\",code=\"200\",src_identity=\"{}\"}}",
        spiffe("web")
    );
    let path = format!("/api/v1/query?query={}", urlencode(&query));
    // The value Prometheus has for the series (None while it has none).
    let scraped = |mesh: &Mesh| -> Option<f64> {
        let r = mesh.net.http_get(&switch, listen, &path)?;
        let v: serde_json::Value = serde_json::from_str(body(&r)).ok()?;
        assert_eq!(v["status"], "success", "{r}");
        let result = v["data"]["result"].as_array()?;
        assert!(result.len() <= 1, "one series expected: {r}");
        let sample = result.first()?;
        assert_eq!(sample["metric"]["dst_identity"], spiffe("api"), "{r}");
        // Services are named namespace/name.
        assert_eq!(sample["metric"]["service"], "default/api", "{r}");
        sample["value"][1].as_str()?.parse().ok()
    };

    // What Prometheus says about its target, for failure messages.
    let targets = |mesh: &Mesh| {
        let r = mesh
            .net
            .http_get(&switch, listen, "/api/v1/targets")
            .unwrap_or_default();
        format!(
            "targets: {}\nprometheus log:\n{}",
            body(&r),
            mesh.net.log_of(prom)
        )
    };
    // Polls until Prometheus reports `want` for the series, or panics saying why not.
    let wait_value = |mesh: &Mesh, want: f64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let got = scraped(mesh);
            if got == Some(want) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "Prometheus still has {got:?} for {query}, not {want}\n{}",
                targets(mesh)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    assert_eq!(
        get_from_web(&mesh, "/first"),
        200,
        "{}",
        mesh.sidecar_log("api")
    );
    wait_value(&mesh, 1.0);
    // Later requests show up in later scrapes.
    for _ in 0..3 {
        assert_eq!(get_from_web(&mesh, "/more"), 200);
    }
    wait_value(&mesh, 4.0);
    // The scrape itself is healthy.
    let up = mesh
        .net
        .http_get(
            &switch,
            listen,
            &format!("/api/v1/query?query={}", urlencode("up")),
        )
        .unwrap_or_default();
    assert!(
        up.contains(&format!("{api_ip}:15020")) && up.contains("\"1\"]"),
        "{up}\n{}",
        targets(&mesh)
    );

    mesh.net.proc_mut(prom).terminate(Duration::from_secs(10));
}

fn record(i: usize) -> AuditRecord {
    AuditRecord {
        time: String::new(),
        source_identity: spiffe("web"),
        destination_identity: spiffe("api"),
        service: "api".into(),
        method: "GET".into(),
        path: format!("/items/{i}"),
        decision: Decision::Allow,
        policy: "AuthorizationPolicy default/api-callers".into(),
        reason: None,
        subject: None,
        scopes: Vec::new(),
    }
}

#[test]
fn audit_verify_prints_ok_or_the_first_problem_by_file_and_line() {
    let work = common::tempdir();
    let dir = work.path().join("audit");
    let key_file = work.path().join("audit.key");
    // Hex, as `openssl rand -hex 32` writes it.
    std::fs::write(
        &key_file,
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = bulwark_sidecar::audit::read_key_file(&key_file).unwrap_err();
    assert!(refused.to_string().contains("chmod 600"), "{refused}");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let key = bulwark_sidecar::audit::read_key_file(&key_file).unwrap();
    assert_eq!(key.len(), 32);
    {
        let log = AuditLog::open(
            &dir,
            &key,
            AuditOptions {
                max_file_bytes: 4000,
                ..Default::default()
            },
        )
        .unwrap();
        for i in 0..30 {
            log.record(record(i));
        }
        log.flush().unwrap();
    }
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path().to_string_lossy().into_owned())
        .collect();
    files.sort();
    files.reverse(); // any order will do
    assert!(files.len() >= 2, "{files:?}");
    let key_arg = key_file.to_str().unwrap();
    let verify = |extra: &[&str]| {
        let mut args = vec!["audit", "verify"];
        args.extend_from_slice(extra);
        args.extend(files.iter().map(String::as_str));
        common::run(&args)
    };

    let o = verify(&["--key-file", key_arg]);
    assert!(o.status.success(), "{}", text(&o));
    // `DIR/*` names the keyed head too; it is read as the head.
    let logs = files.iter().filter(|f| !f.ends_with("audit.head")).count();
    assert_eq!(logs, files.len() - 1, "{files:?}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("ok: 30 records in {logs} files (seq 1..30)\nkeyed head: seq 30 (audit.head)")
    );

    // Edit the third record of the first file.
    let first = dir.join("audit-000001.jsonl");
    let content = std::fs::read_to_string(&first).unwrap();
    let edited: Vec<String> = content
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == 2 {
                l.replace("\"allow\"", "\"deny\"")
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(&first, edited.join("\n") + "\n").unwrap();
    let o = verify(&["--key-file", key_arg]);
    assert!(!o.status.success());
    let expected = format!("{}:3: mac does not match", first.display());
    assert!(text(&o).contains(&expected), "{}", text(&o));
    // Without the key the chain still points at it, one line later.
    let o = verify(&[]);
    assert!(!o.status.success());
    let expected = format!("{}:4: prev does not match", first.display());
    assert!(text(&o).contains(&expected), "{}", text(&o));

    // No file at all: a clear error, not a panic.
    let o = common::run(&["audit", "verify", "/nonexistent/audit-000001.jsonl"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("/nonexistent/audit-000001.jsonl"),
        "{}",
        text(&o)
    );
}

#[test]
fn promtool_metric_check_forgives_only_openmetrics_counter_naming() {
    let exposition = "# HELP foo_requests Requests.\n# TYPE foo_requests counter\nfoo_requests_total 1\n\
                      # TYPE bar_seconds gauge\nbar_seconds 2\n# EOF\n";
    let o = tool(
        "promtool",
        &["check", "metrics"],
        Some(exposition.as_bytes()),
    );
    let problems = promtool_metric_problems(&text(&o), exposition);
    // The counter's `_total` complaint is forgiven; the gauge without help is not.
    assert_eq!(problems, vec!["bar_seconds no help text"], "{}", text(&o));
    // A parse error is a problem too.
    let broken = "# HELP x X.\n# TYPE x gauge\nx{a=\"1\" 1\n# EOF\n";
    let o = tool("promtool", &["check", "metrics"], Some(broken.as_bytes()));
    assert!(
        !promtool_metric_problems(&text(&o), broken).is_empty(),
        "{}",
        text(&o)
    );
}
