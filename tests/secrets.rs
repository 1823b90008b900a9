//! Secrets never reach a log: a whole mesh at debug level, JSON logs,
//! requests and a certificate renewal, then every log is searched for key
//! and token material.
//!
//! One test in this binary: it sets the log level for every process it
//! starts through the environment.

mod common;
mod netns;

use std::time::Duration;

use base64::Engine;
use common::wait_for;
use netns::mesh::{Mesh, metric_sum};

const VIP: &str = "198.18.100.1";
/// Base64 of the DER prefix every PKCS#8 P-256 private key starts with.
const PKCS8_P256_PREFIX: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg";

fn renewals(mesh: &Mesh, pod: &str) -> f64 {
    metric_sum(
        &mesh.metrics(pod),
        "bulwark_cert_renewals_total",
        &["result=\"ok\""],
    )
}

#[test]
fn no_key_or_token_material_appears_in_any_debug_log() {
    // Before any process starts; this binary has no other test.
    unsafe {
        std::env::set_var("BULWARK_LOG", "debug");
        std::env::set_var("BULWARK_LOG_FORMAT", "json");
    }
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    mesh.add_pod("web");
    let api = mesh.add_pod("api");
    mesh.write_cp_file("mesh.yaml", &netns::mesh::http_api_config(&api, ""));
    mesh.start_control_plane("cp1", 15010);
    // Minimum SVID lifetime, renewed early: a renewal happens within seconds.
    let renew = ["--svid-ttl", "60s", "--renew-fraction", "0.1"];
    mesh.start_sidecar_xds("web", "web", "198.18.0.1:15010", "", &renew);
    mesh.start_sidecar_xds("api", "api", "198.18.0.1:15010", "", &renew);
    mesh.wait_ready("web");
    mesh.wait_ready("api");
    let before = [renewals(&mesh, "web"), renewals(&mesh, "api")];
    let url = format!("http://{VIP}:8080/secret-test");
    wait_for("requests to flow", Duration::from_secs(10), || {
        mesh.curl("web", &url).status.success().then_some(())
    });
    for _ in 0..5 {
        assert!(mesh.curl("web", &url).status.success());
    }
    wait_for("both sidecars to renew", Duration::from_secs(45), || {
        (renewals(&mesh, "web") > before[0] && renewals(&mesh, "api") > before[1]).then_some(())
    });
    assert!(mesh.curl("web", &url).status.success());

    // What must never be logged: the CA's keys (every base64 line of their
    // PEM bodies), the token-signing key in any encoding, the bootstrap
    // tokens and their signatures, and any P-256 private key at all.
    let mut secrets: Vec<(String, String)> = vec![
        ("PEM private key marker".into(), "PRIVATE KEY".into()),
        ("PKCS#8 P-256 key".into(), PKCS8_P256_PREFIX.into()),
    ];
    for name in ["root.key", "intermediate.key"] {
        let pem = std::fs::read_to_string(mesh.ca_dir.join(name)).unwrap();
        for line in pem
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        {
            secrets.push((name.into(), line.to_string()));
        }
    }
    let token_key = std::fs::read(mesh.ca_dir.join("token.key")).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&token_key);
    let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&token_key);
    let hex: String = token_key.iter().map(|b| format!("{b:02x}")).collect();
    for enc in [b64, b64url, hex] {
        secrets.push(("token.key".into(), enc[..enc.len().min(24)].to_string()));
    }
    for pod in ["web", "api"] {
        let token = std::fs::read_to_string(mesh.net.dir.join(format!("{pod}.token"))).unwrap();
        let token = token.trim().to_string();
        let signature = token.rsplit('.').next().unwrap().to_string();
        secrets.push((format!("{pod} token"), token));
        secrets.push((format!("{pod} token signature"), signature));
    }

    let mut logs = Vec::new();
    for e in std::fs::read_dir(&mesh.net.dir).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "log") {
            logs.push((e.path(), std::fs::read_to_string(e.path()).unwrap()));
        }
    }
    let mut debug_lines = 0;
    let mut total = 0;
    for (path, text) in &logs {
        total += text.lines().count();
        debug_lines += text
            .lines()
            .filter(|l| l.starts_with('{') && l.contains("\"level\":\"DEBUG\""))
            .count();
        for (what, secret) in &secrets {
            if let Some(line) = text.lines().find(|l| l.contains(secret.as_str())) {
                panic!("{what} found in {}: {line}", path.display());
            }
        }
    }
    println!(
        "searched {} logs ({total} lines, {debug_lines} at debug level) for {} secrets: none found",
        logs.len(),
        secrets.len()
    );
    for name in ["ca", "cp1", "web-sidecar", "api-sidecar"] {
        assert!(
            logs.iter()
                .any(|(p, t)| p.ends_with(format!("{name}.log")) && t.contains("DEBUG")),
            "{name} logged at debug level"
        );
    }
}
