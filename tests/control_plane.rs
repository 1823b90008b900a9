//! The control plane end to end: real `bulwark xds serve` replicas, real
//! sidecars in network namespaces taking their config over the discovery
//! stream, endpoints from the live registry.

mod common;
mod netns;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{rss_kb, wait_for};
use netns::mesh::{Mesh, TD, metric_sum, spiffe};

const CP1: &str = "198.18.0.1:15010";
const CP1_ADMIN: &str = "198.18.0.1:15011";
const CP2: &str = "198.18.0.1:15110";
const CP2_ADMIN: &str = "198.18.0.1:15111";

fn mesh_yaml(trust_domain: &str) -> String {
    format!(
        "apiVersion: bulwark.dev/v1\nkind: MeshConfig\nmetadata:\n  name: mesh\nspec:\n  trustDomain: {trust_domain}\n  mtls:\n    mode: STRICT\n  outboundPolicy: REGISTRY_ONLY\n"
    )
}

/// `api` is served by workloads labelled app=api; endpoints come from the
/// sidecars that announce themselves.
const SERVICES: &str = "apiVersion: bulwark.dev/v1
kind: Service
metadata:
  name: api
  namespace: default
spec:
  ports:
    - port: 8080
      protocol: tcp
  selector:
    app: api
";

fn authz(callers: &[&str]) -> String {
    let from: String = callers
        .iter()
        .map(|c| format!("        - {}\n", spiffe(c)))
        .collect();
    format!(
        "apiVersion: bulwark.dev/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: api-callers\n  namespace: default\nspec:\n  service: api\n  rules:\n    - from:\n{from}"
    )
}

/// These tests measure propagation latency: run them one at a time so
/// they do not compete for the two cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A mesh, no pods yet, whose control plane replicas serve the mesh
/// config, the `api` Service and an authorization allowing `web`.
fn control_planes(replicas: &[(&str, u16)]) -> Option<Mesh> {
    let mut mesh = Mesh::start(&[])?;
    mesh.write_cp_file("mesh.yaml", &mesh_yaml(TD));
    mesh.write_cp_file("services.yaml", SERVICES);
    mesh.write_cp_file("authz.yaml", &authz(&["web"]));
    for (name, port) in replicas {
        mesh.start_control_plane(name, *port);
    }
    Some(mesh)
}

/// A mesh with web, api and db pods whose sidecars use the control plane(s).
fn start(xds: &str, replicas: &[(&str, u16)], sidecar_extra: &[&str]) -> Option<Mesh> {
    let mut mesh = control_planes(replicas)?;
    for (pod, sa) in [("web", "web"), ("api", "api"), ("db", "db")] {
        mesh.add_pod(pod);
        let labels = format!("app={pod}");
        mesh.start_sidecar_xds(pod, sa, xds, &labels, sidecar_extra);
    }
    for pod in ["web", "api", "db"] {
        mesh.wait_ready(pod);
    }
    Some(mesh)
}

fn api_url(mesh: &Mesh) -> String {
    format!("http://{}:8080/", mesh.pod("api").pod.ip)
}

/// Waits until every sidecar reports the same applied version, other than `not`.
fn converged_version(mesh: &Mesh, not: Option<&str>, timeout: Duration) -> String {
    wait_for(
        "all sidecars to apply the same new version",
        timeout,
        || {
            let vs: Vec<Option<String>> = ["web", "api", "db"]
                .iter()
                .map(|p| mesh.applied_version(p))
                .collect();
            let first = vs[0].clone()?;
            (vs.iter().all(|v| v.as_deref() == Some(first.as_str())) && Some(first.as_str()) != not)
                .then_some(first)
        },
    )
}

#[test]
fn config_edit_reaches_every_sidecar_within_a_second_and_status_shows_convergence() {
    let _serial = serial();
    let Some(mesh) = start(CP1, &[("cp1", 15010)], &[]) else {
        return;
    };
    let url = api_url(&mesh);
    // Endpoints came from the registry: web reaches api by its pod IP over mTLS.
    wait_for("web to reach api", Duration::from_secs(10), || {
        mesh.curl("web", &url).status.success().then_some(())
    });
    assert!(
        !mesh.curl("db", &url).status.success(),
        "db is not allowed yet"
    );
    let v0 = settled_version(&mesh);

    let t0 = Instant::now();
    mesh.write_cp_file("authz.yaml", &authz(&["web", "db"]));
    let v1 = converged_version(&mesh, Some(&v0), Duration::from_secs(5));
    let took = t0.elapsed();
    println!(
        "config write -> applied by all 3 sidecars: {} ms",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(
        mesh.curl("db", &url).status.success(),
        "db allowed after the edit"
    );

    let status = wait_for("status to show convergence", Duration::from_secs(5), || {
        let s = mesh.xds_status(CP1_ADMIN);
        s.contains("converged: yes").then_some(s)
    });
    assert!(status.contains(&v1), "{status}");
    for sa in ["web", "api", "db"] {
        assert!(status.contains(&spiffe(sa)), "{status}");
    }
    // /config_dump names the source document of each item.
    let dump = mesh.config_dump("web");
    let items = dump["resources"].as_array().unwrap();
    let policy = items
        .iter()
        .find(|i| i["kind"] == "AuthorizationPolicy")
        .unwrap();
    assert!(
        policy["source"]["file"]
            .as_str()
            .unwrap()
            .ends_with("authz.yaml"),
        "{policy}"
    );
    assert!(policy["source"]["line"].as_u64().unwrap() >= 1);
    assert_eq!(dump["version"], v1);

    // A change too large for one response (500 Services, several times the
    // per-response budget) arrives in parts; the sidecars apply them
    // together and ACK every part.
    let many: String = (0..500)
        .map(|i| format!("---\napiVersion: bulwark.dev/v1\nkind: Service\nmetadata:\n  name: bulk-{i:03}\n  namespace: default\nspec:\n  ports:\n    - port: 8080\n      protocol: http\n  identities:\n    - {}\n", spiffe("api")))
        .collect();
    mesh.write_cp_file("many.yaml", &many);
    let v2 = converged_version(&mesh, Some(&v1), Duration::from_secs(10));
    // Every part carries v2, and a sidecar applies each part as it comes:
    // the control plane says converged once the last one is ACKed.
    wait_for("status to show convergence", Duration::from_secs(5), || {
        mesh.xds_status(CP1_ADMIN)
            .contains("converged: yes")
            .then_some(())
    });
    let dump = mesh.config_dump("web");
    let services = dump["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| {
            i["kind"] == "Service" && i["name"].as_str().is_some_and(|n| n.contains("bulk-"))
        })
        .count();
    assert_eq!(services, 500, "{dump}");
    assert_eq!(dump["version"], v2);
    for pod in ["web", "api", "db"] {
        assert_eq!(
            metric_sum(&mesh.metrics(pod), "bulwark_xds_nacks_total", &[]),
            0.0
        );
    }
}

#[test]
fn invalid_config_keeps_the_old_snapshot_and_sidecar_side_rejections_are_nacked() {
    let _serial = serial();
    let Some(mesh) = start(CP1, &[("cp1", 15010)], &[]) else {
        return;
    };
    let url = api_url(&mesh);
    let v0 = settled_version(&mesh);

    // Broken YAML: `validate` names the file and line; the server keeps serving v0.
    mesh.write_cp_file("bad.yaml", "apiVersion: bulwark.dev/v1\nkind: Service\nmetadata:\n  name: broken\nspec:\n  ports:\n    - port: 99999\n");
    let out = common::run(&["xds", "validate", mesh.config_dir().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml:7"), "{err}");
    wait_for(
        "the control plane to reject the edit",
        Duration::from_secs(5),
        || {
            let s = mesh.xds_status(CP1_ADMIN);
            (s.contains("converged: yes") && mesh_log_contains(&mesh, "cp1", "bad.yaml"))
                .then_some(())
        },
    );
    // The rejected change never reached a sidecar.
    let dump = mesh.config_dump("web");
    assert!(
        !dump["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "broken"),
        "{dump}"
    );
    assert!(
        mesh.xds_status(CP1_ADMIN).contains("bad.yaml"),
        "status shows the rejection"
    );
    let _ = &v0;
    std::fs::remove_file(mesh.config_dir().join("bad.yaml")).unwrap();

    // Valid for the control plane, invalid for the sidecars (another trust
    // domain; the policy naming cluster.local identities goes first so the
    // control plane accepts it): NACKed, the sidecars keep serving.
    std::fs::remove_file(mesh.config_dir().join("authz.yaml")).unwrap();
    wait_for(
        "the open config everywhere",
        Duration::from_secs(10),
        || {
            let dump = mesh.config_dump("web");
            let open = !dump["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["kind"] == "AuthorizationPolicy");
            (open && mesh.xds_status(CP1_ADMIN).contains("converged: yes")).then_some(())
        },
    );
    mesh.write_cp_file("mesh.yaml", &mesh_yaml("other.example"));
    let status = wait_for(
        "the NACKs to show in status",
        Duration::from_secs(10),
        || {
            let s = mesh.xds_status(CP1_ADMIN);
            (s.contains("converged: no") && s.matches("other.example").count() >= 1).then_some(s)
        },
    );
    for sa in ["web", "api", "db"] {
        assert!(status.contains(&spiffe(sa)), "{status}");
    }
    // The status may show another sidecar's NACK before web's.
    wait_for("web to NACK", Duration::from_secs(10), || {
        (metric_sum(&mesh.metrics("web"), "bulwark_xds_nacks_total", &[]) >= 1.0).then_some(())
    });
    // Still on the last good config: the MeshConfig applied is the old one.
    let dump = mesh.config_dump("web");
    let mesh_cfg = dump["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "MeshConfig")
        .cloned();
    assert!(mesh_cfg.is_some(), "{dump}");
    let current = mesh.xds_status(CP1_ADMIN);
    let bad_version = current
        .lines()
        .find(|l| l.starts_with("converged:"))
        .and_then(|l| l.split("version ").nth(1))
        .unwrap_or("")
        .trim_end_matches(')')
        .to_string();
    assert_ne!(
        mesh.applied_version("web").unwrap_or_default(),
        bad_version,
        "the NACKed version is not applied"
    );
    assert!(
        mesh.curl("web", &url).status.success(),
        "last good config still serves"
    );
    // Fixing it converges again.
    mesh.write_cp_file("mesh.yaml", &mesh_yaml(TD));
    wait_for("convergence after the fix", Duration::from_secs(10), || {
        mesh.xds_status(CP1_ADMIN)
            .contains("converged: yes")
            .then_some(())
    });
}

/// The version the control plane says everyone converged on, once every
/// sidecar reports it too (registry updates after start-up settle first).
fn settled_version(mesh: &Mesh) -> String {
    wait_for("the mesh to settle", Duration::from_secs(20), || {
        let s = mesh.xds_status(CP1_ADMIN);
        let line = s.lines().find(|l| l.starts_with("converged: yes"))?;
        let v = line
            .split("version ")
            .nth(1)?
            .trim_end_matches(')')
            .to_string();
        ["web", "api", "db"]
            .iter()
            .all(|p| mesh.applied_version(p).as_deref() == Some(v.as_str()))
            .then_some(v)
    })
}

fn mesh_log_contains(mesh: &Mesh, name: &str, needle: &str) -> bool {
    std::fs::read_to_string(mesh.net.dir.join(format!("{name}.log")))
        .unwrap_or_default()
        .contains(needle)
}

#[test]
fn losing_control_planes_drops_no_request_and_sidecars_fail_over_without_resends() {
    let xds = format!("{CP1},{CP2}");
    let _serial = serial();
    let Some(mut mesh) = start(&xds, &[("cp1", 15010), ("cp2", 15110)], &[]) else {
        return;
    };
    let url = api_url(&mesh);
    let reached = (0..400).any(|_| {
        let ok = mesh.curl("web", &url).status.success();
        if !ok {
            std::thread::sleep(Duration::from_millis(25)); // polling interval
        }
        ok
    });
    assert!(
        reached,
        "web never reached api\ncp1:\n{}\ncp2:\n{}\nweb:\n{}",
        mesh.xds_status(CP1_ADMIN),
        mesh.xds_status(CP2_ADMIN),
        mesh.sidecar_log("web")
            .lines()
            .filter(|l| !l.contains("bulwark::access"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let v0 = settled_version(&mesh);

    let target: SocketAddr = format!("{}:8080", mesh.pod("api").pod.ip).parse().unwrap();
    let web_ns = format!("/run/netns/{}", mesh.pod("web").pod.ns);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let traffic = std::thread::spawn(move || {
        netns::enter(&web_ns);
        let (mut ok, mut failed) = (0u32, 0u32);
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            match netns::http_get(target, "/") {
                Some(r) if r.contains(" 200 OK") => ok += 1,
                _ => failed += 1,
            }
            std::thread::sleep(Duration::from_millis(20)); // pacing
        }
        (ok, failed)
    });

    let sent = |mesh: &Mesh, admin: &str| -> f64 {
        let sw = mesh.net.switch.clone();
        let addr: SocketAddr = admin.parse().unwrap();
        let m = mesh.net.http_get(&sw, addr, "/metrics").unwrap_or_default();
        metric_sum(&m, "bulwark_xds_resources_sent_total", &[])
    };
    let on_cp2_before = sent(&mesh, CP2_ADMIN);
    // Kill the replica the sidecars are on (the first in their list).
    mesh.net.proc_mut(mesh_proc(&mesh, "cp1")).kill();
    wait_for(
        "all sidecars to move to cp2",
        Duration::from_secs(20),
        || {
            let s = mesh.xds_status(CP2_ADMIN);
            ["web", "api", "db"]
                .iter()
                .all(|sa| s.contains(&spiffe(sa)))
                .then_some(())
        },
    );
    wait_for("cp2 to see convergence", Duration::from_secs(10), || {
        mesh.xds_status(CP2_ADMIN)
            .contains("converged: yes")
            .then_some(())
    });
    // Same content hashes on both replicas: nothing had to be resent.
    assert_eq!(
        sent(&mesh, CP2_ADMIN),
        on_cp2_before,
        "reconnect with initial_resource_versions resent resources"
    );
    assert_eq!(mesh.applied_version("web").as_deref(), Some(v0.as_str()));

    // Both replicas down: sidecars keep serving the last good config.
    mesh.net.proc_mut(mesh_proc(&mesh, "cp2")).kill();
    wait_for("sidecars to notice", Duration::from_secs(20), || {
        (metric_sum(&mesh.metrics("web"), "bulwark_xds_connected", &[]) == 0.0).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2)); // traffic runs while the control plane is gone
    // A replica returns: sidecars reconnect and converge.
    mesh.start_control_plane("cp1b", 15010);
    wait_for("reconvergence", Duration::from_secs(30), || {
        let s = mesh.xds_status(CP1_ADMIN);
        (s.contains("converged: yes")
            && ["web", "api", "db"]
                .iter()
                .all(|sa| s.contains(&spiffe(sa))))
        .then_some(())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = traffic.join().unwrap();
    println!("requests ok={ok} failed={failed}");
    if failed > 0 {
        for p in ["web", "api"] {
            eprintln!(
                "==== {p} sidecar log\n{}",
                mesh.sidecar_log(p)
                    .lines()
                    .filter(|l| !l.contains("bulwark::access"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        for n in ["cp1", "cp2", "cp1b"] {
            eprintln!(
                "==== {n}\n{}",
                std::fs::read_to_string(mesh.net.dir.join(format!("{n}.log"))).unwrap_or_default()
            );
        }
    }
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    assert!(ok > 100);
}

fn mesh_proc(mesh: &Mesh, name: &str) -> usize {
    mesh.net
        .proc_index(name)
        .unwrap_or_else(|| panic!("no process {name}"))
}

#[test]
fn a_sidecar_restarted_while_the_control_plane_is_down_serves_its_last_known_good_config() {
    let _serial = serial();
    let Some(mut mesh) = control_planes(&[("cp1", 15010)]) else {
        return;
    };
    for pod in ["web", "api"] {
        mesh.add_pod(pod);
        let state = mesh.net.dir.join(format!("{pod}-state"));
        mesh.start_sidecar_xds(
            pod,
            pod,
            CP1,
            &format!("app={pod}"),
            &["--state-dir", state.to_str().unwrap()],
        );
        mesh.wait_ready(pod);
    }
    let url = api_url(&mesh);
    wait_for("web to reach api", Duration::from_secs(10), || {
        mesh.curl("web", &url).status.success().then_some(())
    });
    // A config is live before it is on disk; it is ACKed after.
    wait_for("the sidecars to ACK", Duration::from_secs(10), || {
        mesh.xds_status(CP1_ADMIN)
            .contains("converged: yes")
            .then_some(())
    });

    mesh.net.proc_mut(mesh_proc(&mesh, "cp1")).kill();
    mesh.restart_sidecar("web");
    mesh.wait_ready("web");
    assert!(
        mesh.curl("web", &url).status.success(),
        "restarted sidecar serves the persisted config"
    );
    let dump = mesh.config_dump("web");
    assert_eq!(dump["stale"], true, "{dump}");
    assert_eq!(
        metric_sum(&mesh.metrics("web"), "bulwark_config_stale", &[]),
        1.0
    );
    // The control plane returns: fresh config, no longer stale.
    mesh.start_control_plane("cp1b", 15010);
    wait_for("fresh config", Duration::from_secs(30), || {
        (mesh.config_dump("web")["stale"] == false).then_some(())
    });
}

/// The CA's new root starts signing only after every connected sidecar has
/// ACKed a trust bundle containing it; no sidecar restarts, no failed request.
#[test]
fn root_rotation_waits_until_every_sidecar_acked_the_new_bundle() {
    let _serial = serial();
    let Some(mut mesh) = start(CP1, &[("cp1", 15010)], &[]) else {
        return;
    };
    let url = api_url(&mesh);
    wait_for("web to reach api", Duration::from_secs(10), || {
        mesh.curl("web", &url).status.success().then_some(())
    });
    // The CA, gated on the control plane.
    let dir = mesh.ca_dir.to_str().unwrap().to_string();
    let restart_gated_ca = |mesh: &mut Mesh, name: &str, extra: &[&str]| {
        let ca = mesh.ca_proc;
        mesh.net.proc_mut(ca).kill();
        let sw = mesh.net.switch.clone();
        let args = [
            &[
                "ca",
                "serve",
                "--dir",
                &dir,
                "--listen",
                "198.18.0.1:15012",
                "--rotation-gate",
                CP1_ADMIN,
            ][..],
            extra,
        ]
        .concat();
        mesh.ca_proc = mesh.net.spawn_bulwark(&sw, name, &args);
        mesh.wait_ca();
    };
    restart_gated_ca(&mut mesh, "ca-gated", &[]);

    // One sidecar cannot ACK anything (stopped, still connected).
    let api_pid = mesh.net.proc_mut(mesh.pod("api").sidecar.unwrap()).pid() as i32;
    unsafe { libc::kill(api_pid, libc::SIGSTOP) };
    common::run_ok(&["ca", "rotate-root", "--dir", &dir, "--activate-after", "0s"]);
    let pending = std::fs::read_to_string(mesh.ca_dir.join("pending-root.pem")).unwrap();
    let fp = {
        use rustls_pki_types::pem::PemObject;
        bulwark_ca::tls::fingerprint(
            &rustls_pki_types::CertificateDer::from_pem_slice(pending.as_bytes()).unwrap(),
        )
    };
    let gate = |mesh: &Mesh| -> serde_json::Value {
        let addr: SocketAddr = CP1_ADMIN.parse().unwrap();
        let r = mesh
            .net
            .http_get(&mesh.net.switch, addr, &format!("/bundle-acked?root={fp}"))
            .unwrap_or_default();
        serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap_or("null"))
            .unwrap_or(serde_json::Value::Null)
    };
    wait_for(
        "the running sidecars to ACK the new bundle",
        Duration::from_secs(20),
        || {
            let g = gate(&mesh);
            (g["root_in_bundle"] == true && g["acked"] == 2 && g["sidecars"] == 3).then_some(())
        },
    );
    let ca_log = |mesh: &Mesh| mesh.net.log_of(mesh.ca_proc);
    wait_for(
        "the CA to hold the rotation twice",
        Duration::from_secs(20),
        || (ca_log(&mesh).matches("waits for every sidecar").count() >= 2).then_some(()),
    );
    assert!(
        !ca_log(&mesh).contains("root rotation activated"),
        "activated before every sidecar had the new root"
    );
    assert!(mesh.ca_dir.join("pending-root.pem").exists());

    unsafe { libc::kill(api_pid, libc::SIGCONT) };
    wait_for("the rotation to activate", Duration::from_secs(30), || {
        ca_log(&mesh)
            .contains("root rotation activated")
            .then_some(())
    });
    assert_eq!(gate(&mesh)["all_acked"], true);
    // Every sidecar trusts both roots; traffic flows.
    assert!(mesh.curl("web", &url).status.success());

    // A sidecar that never ACKs does not hold a rotation forever: past
    // --rotation-gate-max-wait it activates, with an error logged.
    restart_gated_ca(&mut mesh, "ca-gated-2", &["--rotation-gate-max-wait", "3s"]);
    unsafe { libc::kill(api_pid, libc::SIGSTOP) };
    common::run_ok(&["ca", "rotate-root", "--dir", &dir, "--activate-after", "0s"]);
    wait_for(
        "the overdue rotation to activate",
        Duration::from_secs(30),
        || {
            ca_log(&mesh)
                .contains("root rotation activated")
                .then_some(())
        },
    );
    assert!(ca_log(&mesh).contains("waited --rotation-gate-max-wait"));
    unsafe { libc::kill(api_pid, libc::SIGCONT) };
    wait_for(
        "web to reach api after both rotations",
        Duration::from_secs(20),
        || mesh.curl("web", &url).status.success().then_some(()),
    );
    // Nothing restarted.
    for pod in ["web", "api", "db"] {
        assert_eq!(
            mesh.sidecar_log(pod).matches("sidecar listening").count(),
            1,
            "{pod} restarted"
        );
    }
}

/// Which api pod served each of `n` requests from web to the api VIP.
fn served_by(mesh: &Mesh, client: &str, n: usize) -> Vec<String> {
    served_by_at(mesh, client, "198.18.100.1", n)
}

/// Which app answered each of `n` requests from pod `client` to `vip:8080`.
fn served_by_at(mesh: &Mesh, client: &str, vip: &str, n: usize) -> Vec<String> {
    let ns = format!("/run/netns/{}", mesh.pod(client).pod.ns);
    let target: SocketAddr = format!("{vip}:8080").parse().unwrap();
    std::thread::spawn(move || {
        netns::enter(&ns);
        (0..n)
            .map(|_| match netns::http_get(target, "/") {
                Some(r) if r.contains(" 200 ") => r
                    .split("\r\n\r\n")
                    .nth(1)
                    .unwrap_or("")
                    .split(' ')
                    .next()
                    .unwrap_or("")
                    .to_string(),
                other => format!("!{other:?}"),
            })
            .collect()
    })
    .join()
    .unwrap()
}

/// A port the workload announces besides its Service's (here an admin
/// listener on 9090) is reached over the mesh, and is no way around the
/// Service's policy: web (allowed) gets through, db (not allowed) does not.
#[test]
fn a_port_no_service_maps_is_governed_by_the_workloads_policies() {
    let _serial = serial();
    let Some(mut mesh) = start(CP1, &[("cp1", 15010)], &["--ports", "9090"]) else {
        return;
    };
    let ns = mesh.pod("api").pod.ns.clone();
    mesh.net.spawn_bulwark(
        &ns,
        "api-admin",
        &[
            "demo-app",
            "--listen",
            "0.0.0.0:9090",
            "--name",
            "api-admin",
        ],
    );
    let admin = format!("http://{}:9090/", mesh.pod("api").pod.ip);
    wait_for(
        "web to reach api's admin port",
        Duration::from_secs(10),
        || mesh.curl("web", &admin).status.success().then_some(()),
    );
    let denials = || {
        metric_sum(
            &mesh.metrics("api"),
            "bulwark_authz_denials_total",
            &[&format!("src_identity=\"{}\"", spiffe("db"))],
        )
    };
    let before = denials();
    // Detected as HTTP (the port's protocol is `auto`): a 403 from api's
    // sidecar, never the app's answer.
    let out = mesh.curl("db", &admin);
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        !body.contains("api-admin") && (body.contains("authz-denied") || !out.status.success()),
        "db reached a port of api that api's policy does not allow it: {body}"
    );
    assert!(denials() > before, "refused by api's policy");
}

/// The apps that answer `n` requests from pod `client` to `vip:8080`.
fn answered_by(mesh: &Mesh, client: &str, vip: &str, n: usize) -> BTreeSet<String> {
    served_by_at(mesh, client, vip, n).into_iter().collect()
}

/// Labels are a sidecar's own claim: a workload of another identity that
/// copies a Service's selector labels joins a Service that names no
/// identities (the control), but never one that lists its identities.
#[test]
fn copied_labels_do_not_join_a_service_pinned_to_identities() {
    let _serial = serial();
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    mesh.write_cp_file("mesh.yaml", &mesh_yaml(TD));
    let service = |name: &str, vip: &str, identities: &str| {
        format!(
            "---\napiVersion: bulwark.dev/v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  ports:\n    - port: 8080\n      protocol: http\n{identities}  selector:\n    app: api\n  addresses:\n    - {vip}\n"
        )
    };
    let pinned = format!("  identities:\n    - {}\n", spiffe("api"));
    mesh.write_cp_file(
        "services.yaml",
        &format!(
            "{}{}",
            service("api", "198.18.100.1", &pinned),
            service("by-label", "198.18.100.2", "")
        ),
    );
    mesh.start_control_plane("cp1", 15010);
    // The impostor runs as `web` and claims `app=api`.
    for (pod, sa, labels) in [
        ("web", "web", "app=web"),
        ("api-1", "api", "app=api"),
        ("impostor", "web", "app=api"),
    ] {
        mesh.add_pod(pod);
        mesh.start_sidecar_xds(pod, sa, CP1, labels, &[]);
    }
    for pod in ["web", "api-1", "impostor"] {
        mesh.wait_ready(pod);
    }
    // The control: the impostor's announcement reached the registry and
    // the clients.
    wait_for(
        "the label-selected service to reach both workloads",
        Duration::from_secs(10),
        || {
            let seen = answered_by(&mesh, "web", "198.18.100.2", 40);
            (seen == BTreeSet::from(["api-1".to_string(), "impostor".to_string()])).then_some(())
        },
    );
    let seen = answered_by(&mesh, "web", "198.18.100.1", 40);
    assert_eq!(
        seen,
        BTreeSet::from(["api-1".to_string()]),
        "the pinned service is served by its identity alone"
    );
}

/// Each sidecar probes its own app; an unhealthy verdict travels up its
/// discovery stream and the control plane withdraws the endpoint from every
/// client, then restores it.
#[test]
fn an_app_failing_its_health_check_leaves_every_clients_pool_and_returns() {
    let _serial = serial();
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    mesh.write_cp_file("mesh.yaml", &mesh_yaml(TD));
    mesh.write_cp_file(
        "api.yaml",
        "apiVersion: bulwark.dev/v1\nkind: Service\nmetadata:\n  name: api\n  namespace: default\nspec:\n  ports:\n    - port: 8080\n      protocol: http\n  selector:\n    app: api\n  addresses:\n    - 198.18.100.1\n---\napiVersion: bulwark.dev/v1\nkind: TrafficPolicy\nmetadata:\n  name: api\n  namespace: default\nspec:\n  service: api\n  healthCheck:\n    path: /healthz\n    interval: 500ms\n    timeout: 200ms\n    unhealthyThreshold: 2\n    healthyThreshold: 2\n",
    );
    mesh.start_control_plane("cp1", 15010);
    // Two clients: the verdict of api-2's own sidecar must reach both.
    for (pod, sa, labels) in [
        ("web", "web", "app=web"),
        ("web-2", "web", "app=web"),
        ("api-1", "api", "app=api"),
        ("api-2", "api", "app=api"),
    ] {
        mesh.add_pod(pod);
        mesh.start_sidecar_xds(pod, sa, CP1, labels, &[]);
    }
    for pod in ["web", "web-2", "api-1", "api-2"] {
        mesh.wait_ready(pod);
    }
    wait_for("both api pods to serve", Duration::from_secs(10), || {
        let seen = served_by(&mesh, "web", 40);
        (seen.iter().any(|s| s == "api-1") && seen.iter().any(|s| s == "api-2")).then_some(())
    });
    // api-2's app turns unhealthy (everything, /healthz included, answers 503).
    let app = mesh.pod("api-2").app.unwrap();
    mesh.net.proc_mut(app).kill();
    let ns = mesh.pod("api-2").pod.ns.clone();
    let bad = mesh.net.spawn_bulwark(
        &ns,
        "api-2-bad",
        &[
            "demo-app",
            "--listen",
            "0.0.0.0:8080",
            "--name",
            "api-2",
            "--error-rate",
            "1.0",
        ],
    );
    let t0 = Instant::now();
    wait_for(
        "both clients' pools to drop api-2",
        Duration::from_secs(10),
        || {
            ["web", "web-2"]
                .iter()
                .all(|c| mesh.config_dump(c)["endpoints"].as_u64() == Some(1))
                .then_some(())
        },
    );
    let took = t0.elapsed();
    println!(
        "unhealthy app withdrawn from both clients' pools after {took:?} (2 x 500 ms probes + push)"
    );
    // Two 500 ms probes and a push, with room for this machine's load; the
    // defects this catches (waiting out the 10 s endpoint grace, or a
    // periodic resync) take far longer.
    assert!(took < Duration::from_secs(4), "{took:?}");
    for client in ["web", "web-2"] {
        let seen = served_by(&mesh, client, 50);
        assert!(
            seen.len() == 50 && seen.iter().all(|s| s == "api-1"),
            "every request from {client} succeeds and none reaches api-2: {seen:?}"
        );
    }
    let status = mesh.xds_status(CP1_ADMIN);
    assert!(status.contains("converged: yes"), "{status}");
    // Healthy again: restored everywhere.
    mesh.net.proc_mut(bad).kill();
    mesh.net.spawn_bulwark(
        &ns,
        "api-2-good",
        &["demo-app", "--listen", "0.0.0.0:8080", "--name", "api-2"],
    );
    let restored = |c: &str| mesh.config_dump(c)["endpoints"].as_u64() == Some(2);
    wait_for(
        "api-2 to return to both clients",
        Duration::from_secs(10),
        || (restored("web") && restored("web-2")).then_some(()),
    );
    wait_for("api-2 to serve again", Duration::from_secs(10), || {
        served_by(&mesh, "web-2", 30)
            .iter()
            .any(|s| s == "api-2")
            .then_some(())
    });
}

/// Peak resident memory of this process's finished children, in kB.
fn children_peak_rss_kb() -> i64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    u.ru_maxrss
}

/// `bulwark xds serve` on loopback ports: (process, discovery, admin).
fn loopback_control_plane(
    work: &std::path::Path,
    config: &std::path::Path,
    ca: &std::path::Path,
) -> (common::Proc, SocketAddr, SocketAddr) {
    let free = || -> SocketAddr {
        format!("127.0.0.1:{}", common::free_port())
            .parse()
            .unwrap()
    };
    let (addr, admin) = (free(), free());
    let mut cp = common::spawn(
        work,
        "cp",
        &[
            "xds",
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--ca-dir",
            ca.to_str().unwrap(),
            "--listen",
            &addr.to_string(),
            "--admin-listen",
            &admin.to_string(),
        ],
    );
    common::wait_listening(addr, &mut cp);
    common::wait_listening(admin, &mut cp);
    (cp, addr, admin)
}

/// A control plane on loopback over a fresh CA and a MeshConfig alone.
struct Discovery {
    _work: tempfile::TempDir,
    _cp: common::Proc,
    ca: std::path::PathBuf,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Discovery {
    fn start() -> Self {
        let work = common::tempdir();
        let (config, ca) = (work.path().join("config"), work.path().join("ca"));
        std::fs::create_dir(&config).unwrap();
        common::run_ok(&["ca", "init", "--dir", ca.to_str().unwrap()]);
        std::fs::write(config.join("mesh.yaml"), mesh_yaml(TD)).unwrap();
        let (cp, addr, admin) = loopback_control_plane(work.path(), &config, &ca);
        Self {
            _work: work,
            _cp: cp,
            ca,
            addr,
            admin,
        }
    }

    fn bundle(&self) -> bulwark_ca::tls::TrustBundle {
        let pem = std::fs::read_to_string(self.ca.join("bundle.pem")).unwrap();
        bulwark_ca::tls::TrustBundle::from_pem(&pem).unwrap()
    }
}

/// A stream's first request: node `id` of `identity` with `labels`,
/// subscribing to the MeshConfig.
fn node_request(
    id: &str,
    identity: &str,
    labels: Vec<(String, String)>,
) -> bulwark_proto::xds::v1::DeltaDiscoveryRequest {
    bulwark_proto::xds::v1::DeltaDiscoveryRequest {
        node: Some(bulwark_proto::xds::v1::Node {
            id: id.into(),
            identity: identity.into(),
            address: "10.1.0.1".into(),
            ports: vec![8080],
            labels: labels.into_iter().collect(),
            namespace: "default".into(),
            unhealthy: false,
        }),
        type_url: bulwark_proto::config::type_url::MESH_CONFIG.into(),
        resource_names_subscribe: vec!["*".into()],
        ..Default::default()
    }
}

/// One pod's certificate cannot mint registrations: each would be an
/// endpoint of its services, and enough of them would push a service's
/// endpoint list past what the control plane can serve.
#[test]
fn one_pod_registers_a_bounded_number_of_node_ids_and_labels_are_bounded() {
    let cp = Discovery::start();
    let (addr, admin) = (cp.addr, cp.admin);
    let api = bulwark_ca::SpiffeId::new(TD, "default", "api").unwrap();
    let svid = common::local_svid(&cp.ca, &api);
    let bundle = cp.bundle();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Opens a stream as node `id`, on a connection of its own as a
        // sidecar would, and returns it once its first response arrives, or
        // the status that ended it.
        let open = |id: String, labels: Vec<(String, String)>| {
            let (svid, bundle) = (&svid, bundle.clone());
            let api = api.to_string();
            async move {
                let mut client = common::xds_client(addr, svid, bundle).await;
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                tx.send(node_request(&id, &api, labels)).await.unwrap();
                let answer = async {
                    let mut stream = client
                        .delta_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await?
                        .into_inner();
                    let first = stream.message().await?;
                    Ok::<_, tonic::Status>((stream, first))
                };
                let (stream, first) = tokio::time::timeout(Duration::from_secs(10), answer)
                    .await
                    .expect("an answer within 10 s")?;
                assert!(first.is_some(), "the stream ended without a response");
                Ok::<_, tonic::Status>((stream, tx))
            }
        };
        let mut held = Vec::new();
        for i in 0..16 {
            let s = open(format!("api-{i}"), vec![]).await;
            held.push(s.unwrap_or_else(|e| panic!("node api-{i}: {e:?}")));
        }
        let Err(refused) = open("api-16".into(), vec![]).await else {
            panic!("a 17th node id is refused");
        };
        assert_eq!(
            refused.code(),
            tonic::Code::ResourceExhausted,
            "{refused:?}"
        );
        assert!(refused.message().contains("at most 16"), "{refused:?}");
        // A reconnect under a registered node id always gets back in.
        held.push(
            open("api-0".into(), vec![])
                .await
                .expect("reconnect of api-0"),
        );
        // Labels are bounded in total, not only each.
        let labels = (0..20)
            .map(|i| (format!("k{i}"), "v".repeat(250)))
            .collect();
        let Err(refused) = open("api-0".into(), labels).await else {
            panic!("5 kB of labels are refused");
        };
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains("at most 4096"), "{refused:?}");
    });
    let metrics = netns::http_get(admin, "/metrics").unwrap_or_default();
    assert_eq!(
        metric_sum(
            &metrics,
            "bulwark_xds_streams_refused_total",
            &["reason=\"registration_limit\""]
        ),
        1.0,
        "{metrics}"
    );
}

/// A discovery stream lives no longer than the client certificate it was
/// opened with: the sidecar reconnects with its renewed one.
#[test]
fn a_discovery_stream_ends_when_its_client_certificate_expires() {
    let cp = Discovery::start();
    let api = bulwark_ca::SpiffeId::new(TD, "default", "api").unwrap();
    let left = Duration::from_secs(3);
    let svid = common::local_svid_expiring(&cp.ca, &api, Some(left));
    let issued = Instant::now();
    let bundle = cp.bundle();
    let addr = cp.addr;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (first, end) = rt.block_on(async {
        let mut client = common::xds_client(addr, &svid, bundle).await;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let first = node_request("api-0", api.as_str(), vec![]);
        tx.send(first).await.unwrap();
        let mut stream = client
            .delta_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await;
        let end = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    other => break other,
                }
            }
        })
        .await;
        (first, end)
    });
    assert!(matches!(first, Ok(Some(_))), "{first:?}");
    let end = end.expect("the stream outlived its client certificate by 12 s");
    let status = end.expect_err("the stream ends with a status");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("certificate expired"),
        "{status:?}"
    );
    // notAfter is in whole seconds: up to one early.
    let after = issued.elapsed();
    assert!(
        after >= left - Duration::from_millis(1500) && after <= left + Duration::from_secs(2),
        "ended {after:?} after issue, the certificate had {left:?}"
    );
}

/// A 100 MB file (sparse: nothing is written) and a document nested
/// 100,000 `[` deep. Both are refused with a clear error by `xds validate`
/// and by a running control plane, which keeps its last good snapshot; no
/// stack overflow, no memory beyond the 1 MiB file bound.
#[test]
fn oversized_and_deeply_nested_yaml_are_refused_and_the_last_good_config_kept() {
    let work = common::tempdir();
    let (config, ca) = (work.path().join("config"), work.path().join("ca"));
    std::fs::create_dir(&config).unwrap();
    common::run_ok(&["ca", "init", "--dir", ca.to_str().unwrap()]);
    std::fs::write(config.join("mesh.yaml"), mesh_yaml(TD)).unwrap();
    let huge = std::fs::File::create(work.path().join("huge.yaml")).unwrap();
    huge.set_len(100 * 1024 * 1024).unwrap();
    let deep = format!(
        "apiVersion: bulwark.dev/v1\nkind: Service\nmetadata:\n  name: deep\nspec: {}\n",
        "[".repeat(100_000)
    );
    std::fs::write(work.path().join("deep.yaml"), &deep).unwrap();

    // Offline: each file on its own, then both in a directory.
    for (file, line, message) in [
        ("huge.yaml", 1, "larger than the 1024 KiB limit"),
        ("deep.yaml", 5, "nested deeper than 32 levels"),
    ] {
        let path = work.path().join(file);
        let out = common::run(&["xds", "validate", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file}: {err}");
        assert!(
            err.contains(&format!("{file}:{line}: ")) && err.contains(message),
            "{file}: {err}"
        );
        assert!(err.lines().count() <= 3, "one clear line: {err}");
    }
    let peak = children_peak_rss_kb();
    println!("xds validate peak RSS: {peak} kB");
    assert!(peak < 100_000, "validate used {peak} kB");

    // Running: a good first load, then the two files arrive.
    let (mut cp, _, admin) = loopback_control_plane(work.path(), &config, &ca);
    let status = || -> serde_json::Value {
        let r = netns::http_get(admin, "/status").unwrap_or_default();
        serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap_or("null")).unwrap_or_default()
    };
    let good = status()["system_version"].as_str().unwrap().to_string();
    let rss0 = rss_kb(cp.pid());
    for f in ["huge.yaml", "deep.yaml"] {
        std::fs::rename(work.path().join(f), config.join(f)).unwrap();
    }
    let errors = wait_for("both files to be rejected", Duration::from_secs(10), || {
        let s = status();
        let errors: Vec<String> = s["config_rejected"]["errors"]
            .as_array()?
            .iter()
            .map(|e| e.as_str().unwrap_or_default().to_string())
            .collect();
        (errors
            .iter()
            .any(|e| e.contains("huge.yaml:1: file is larger"))
            && errors
                .iter()
                .any(|e| e.contains("deep.yaml:5: document is nested deeper")))
        .then_some(errors)
    });
    println!("control plane reports: {errors:?}");
    assert_eq!(
        status()["system_version"],
        good.as_str(),
        "last good snapshot kept"
    );
    assert!(cp.child.try_wait().unwrap().is_none(), "still running");
    // Logged just after the status is set.
    wait_for("the rejection to be logged", Duration::from_secs(5), || {
        cp.log_text().contains("huge.yaml").then_some(())
    });
    let rss1 = rss_kb(cp.pid());
    println!("control plane RSS {rss0} kB -> {rss1} kB");
    assert!(rss1 < rss0 + 30_000, "memory grew by {} kB", rss1 - rss0);

    // Removing them lets the next edit through.
    for f in ["huge.yaml", "deep.yaml"] {
        std::fs::remove_file(config.join(f)).unwrap();
    }
    std::fs::write(config.join("api.yaml"), SERVICES).unwrap();
    wait_for("the next good edit", Duration::from_secs(10), || {
        let s = status();
        (s["config_rejected"].is_null() && s["system_version"] != good.as_str()).then_some(())
    });
}

/// The proxy's own connections to the CA and the control plane pass its
/// pod's interception rules by its socket mark, whichever mark it is given.
/// No outbound port goes around the proxy, so the app's own connection to
/// the CA's port is the mesh's to decide: REGISTRY_ONLY refuses it.
#[test]
fn a_sidecar_with_its_own_mark_reaches_ca_and_control_plane_and_no_port_goes_around_it() {
    let _serial = serial();
    let Some(mut mesh) = control_planes(&[("cp1", 15010)]) else {
        return;
    };
    mesh.add_pod("web");
    let mark = ["--proxy-mark", "0x2a"];
    mesh.start_sidecar_xds_with("web", "web", CP1, &mark, &mark);
    // Ready means an SVID from the CA (:15012) and a config from the
    // control plane (:15010), both reached from sockets marked 0x2a.
    mesh.wait_ready("web");
    let ns = mesh.pod("web").pod.ns.clone();
    let rules = mesh
        .net
        .exec_ok(&ns, &["iptables", "-t", "nat", "-S", "BULWARK_OUTPUT"]);
    assert!(rules.contains("--mark 0x2a"), "{rules}");
    assert!(
        !rules.contains("--dport"),
        "a port goes around the proxy:\n{rules}"
    );

    let refused = |m: &str| {
        metric_sum(
            m,
            "bulwark_tcp_refused_total",
            &["direction=\"outbound\"", "reason=\"registry_only\""],
        )
    };
    let before = refused(&mesh.metrics("web"));
    for port in [15012, 15010] {
        let out = mesh.curl("web", &format!("http://198.18.0.1:{port}/"));
        assert!(
            !out.status.success(),
            "the app reached :{port} around the mesh"
        );
    }
    wait_for(
        "the sidecar to refuse the app's connections to the CA and control plane ports",
        Duration::from_secs(10),
        || (refused(&mesh.metrics("web")) >= before + 2.0).then_some(()),
    );
}
