//! Least privilege: the sidecar runs as an unprivileged uid with no
//! capabilities, and key files are private (created 0600, refused when
//! others can read them).

mod common;
mod netns;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::{run, run_ok, wait_for};
use netns::mesh::{Mesh, spiffe};

const PROXY_UID: &str = "1337";
const VIP: &str = "198.18.100.1";

/// `Uid:`, `CapEff:`, `CapPrm:`, `CapBnd:` lines of a process's status.
fn identity_of(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            ["Uid:", "CapEff:", "CapPrm:", "CapBnd:", "CapInh:"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn sidecars_run_as_uid_1337_without_capabilities_and_traffic_flows_over_mtls() {
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    mesh.add_pod("web");
    let api = mesh.add_pod("api");
    mesh.write_config(&netns::mesh::http_api_config(&api, ""));
    // The unprivileged proxy reads its token, bundle and config from the
    // test's directory (private to root otherwise).
    std::fs::set_permissions(&mesh.net.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&mesh.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    for pod in ["web", "api"] {
        // The token is written just before the sidecar starts: hand it to
        // the proxy user, then drop every privilege.
        let token = mesh.net.dir.join(format!("{pod}.token"));
        let script = format!(
            "chown {PROXY_UID}:{PROXY_UID} {} && exec setpriv --reuid {PROXY_UID} --regid {PROXY_UID} --clear-groups --inh-caps=-all --bounding-set=-all \"$@\"",
            token.display()
        );
        mesh.set_sidecar_wrapper(pod, &["sh", "-c", &script, "sh"]);
        // iptables is set up by `bulwark init` as root; it excludes the
        // proxy's sockets by uid, since an unprivileged proxy cannot set marks.
        mesh.start_sidecar_with(pod, pod, &["--proxy-uid", PROXY_UID], &[]);
    }
    mesh.wait_ready("web");
    mesh.wait_ready("api");
    for pod in ["web", "api"] {
        let pid = mesh.net.proc_mut(mesh.pod(pod).sidecar.unwrap()).pid();
        let id = identity_of(pid);
        println!("{pod} sidecar: {id:?}");
        assert!(
            id.contains(&format!(
                "Uid: {PROXY_UID} {PROXY_UID} {PROXY_UID} {PROXY_UID}"
            )),
            "{id:?}"
        );
        for cap in ["CapEff:", "CapPrm:", "CapBnd:", "CapInh:"] {
            assert!(
                id.contains(&format!("{cap} 0000000000000000")),
                "{pod}: {cap} {id:?}"
            );
        }
    }
    // web → api through both unprivileged sidecars, over mTLS.
    let out = mesh.curl("web", &format!("http://{VIP}:8080/unprivileged"));
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && body.contains(&format!("caller={}", spiffe("web"))),
        "{body}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        mesh.sidecar_log("web")
    );
    for pod in ["web", "api"] {
        let m = mesh.metrics(pod);
        assert!(
            netns::mesh::metric_sum(&m, "bulwark_tls_handshakes_total", &["result=\"ok\""]) >= 1.0,
            "{pod}: {m}"
        );
    }
    // api calling its own service: the unmarked proxy's dial to its own
    // pod address stays on loopback and is sent inbound by uid.
    let out = mesh.curl("api", &format!("http://{VIP}:8080/self"));
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && body.contains(&format!("caller={}", spiffe("api"))),
        "{body}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        mesh.sidecar_log("api")
    );

    // Rules without the hand-off's exception (older than this proxy): the
    // hand-off to the app comes back to the inbound listener by uid. It is
    // refused there, once, instead of dialled again and again.
    let ns = api.ns.clone();
    let rule = [
        "-t",
        "nat",
        "-D",
        "BULWARK_OUTPUT",
        "-o",
        "lo",
        "-s",
        "127.0.0.6/32",
        "-p",
        "tcp",
        "-j",
        "RETURN",
    ];
    mesh.net
        .exec_ok(&ns, &[["iptables"].as_slice(), rule.as_slice()].concat());
    // A new app process: the sidecar's pooled connections to the old one
    // are gone, so the next request needs a new hand-off.
    let app = mesh.pod("api").app.unwrap();
    mesh.net.proc_mut(app).terminate(Duration::from_secs(5));
    mesh.net.spawn_bulwark(
        &ns,
        "api-app-2",
        &["demo-app", "--listen", "0.0.0.0:8080", "--name", "api"],
    );
    wait_for("the app to listen again", Duration::from_secs(10), || {
        mesh.net
            .exec(&ns, &["curl", "-fs", "http://127.0.0.1:8080/"])
            .status
            .success()
            .then_some(())
    });
    let out = mesh.curl("web", &format!("http://{VIP}:8080/loop"));
    assert!(
        !out.status.success() || !String::from_utf8_lossy(&out.stdout).contains("api GET"),
        "the app answered through a looping hand-off"
    );
    let loops = || {
        netns::mesh::metric_sum(
            &mesh.metrics("api"),
            "bulwark_tcp_refused_total",
            &["direction=\"inbound\"", "reason=\"loop\""],
        )
    };
    let refused = loops();
    assert!(refused >= 1.0, "{}", mesh.sidecar_log("api"));
    // Each request is refused a bounded number of times (the app pool's one
    // retry of a fresh connection at most), not until descriptors run out.
    assert!(refused <= 4.0, "refused {refused} times for one request");
    // `bulwark init` again restores the rule and the hand-off.
    mesh.net
        .exec_ok(&ns, &[common::BIN, "init", "--proxy-uid", PROXY_UID]);
    let out = mesh.curl("web", &format!("http://{VIP}:8080/again"));
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.starts_with("api GET /again"),
        "{body}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(loops(), refused, "refused again after init");
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Every key file the CLI writes is 0600 even under a permissive umask, and
/// the CA and control plane refuse to start on a key others could read.
#[test]
fn key_files_are_created_0600_and_readable_keys_stop_the_ca_and_control_plane() {
    let work = common::tempdir();
    let dir = work.path().join("ca");
    let d = dir.to_str().unwrap();
    // umask 000: only the code's own modes keep the keys private.
    let o = std::process::Command::new("sh")
        .args([
            "-c",
            "umask 000 && exec \"$@\"",
            "sh",
            common::BIN,
            "ca",
            "init",
            "--dir",
            d,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    run_ok(&["ca", "rotate-root", "--dir", d]);
    let keys: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "key"))
        .collect();
    assert!(
        keys.len() >= 4,
        "root, intermediate, token and the pending root: {keys:?}"
    );
    for k in &keys {
        assert_eq!(mode(k), 0o600, "{}", k.display());
    }

    // `cert request` writes the workload's key 0600.
    let ca = common::Ca::serve(work.path(), &dir, &[]);
    let token = work.path().join("token");
    std::fs::write(
        &token,
        ca.token("spiffe://cluster.local/ns/default/sa/batch"),
    )
    .unwrap();
    let out = work.path().join("svid");
    run_ok(&[
        "cert",
        "request",
        "--ca",
        &ca.addr.to_string(),
        "--ca-cert",
        dir.join("bundle.pem").to_str().unwrap(),
        "--identity",
        "spiffe://cluster.local/ns/default/sa/batch",
        "--token-file",
        token.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(mode(&out.join("key.pem")), 0o600);
    drop(ca);

    // Each key readable by group or others stops both servers, naming the
    // file and the fix.
    let config = work.path().join("config");
    std::fs::create_dir(&config).unwrap();
    std::fs::write(
        config.join("mesh.yaml"),
        "apiVersion: bulwark.dev/v1\nkind: MeshConfig\nmetadata:\n  name: mesh\nspec:\n  trustDomain: cluster.local\n",
    )
    .unwrap();
    for name in ["root.key", "intermediate.key", "token.key"] {
        let key = dir.join(name);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        for args in [
            vec!["ca", "serve", "--dir", d, "--listen", "127.0.0.1:0"],
            vec![
                "xds",
                "serve",
                "--config",
                config.to_str().unwrap(),
                "--ca-dir",
                d,
                "--listen",
                "127.0.0.1:0",
            ],
        ] {
            let o = run(&args);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success(), "{args:?} started with {name} 0640");
            assert!(
                err.contains(key.to_str().unwrap()) && err.contains("chmod 600"),
                "{args:?}: {err}"
            );
        }
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // Back to 0600: the CA starts.
    let mut ca = common::Ca::serve(work.path(), &dir, &[]);
    wait_for("the CA to serve", Duration::from_secs(10), || {
        ca.proc.child.try_wait().unwrap().is_none().then_some(())
    });
}
