//! Hostile input and shutdown: garbage, half-open and slowloris connections
//! on every port, oversized headers, connection floods, and SIGTERM drain.

mod common;
mod netns;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{rss_kb, wait_for};
use netns::Pod;
use netns::mesh::{Mesh, metric_sum};

const VIP: &str = "198.18.100.1";

fn config(api: &Pod) -> String {
    netns::mesh::http_api_config(api, "")
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Throws garbage, a half-open connection and a slowloris at `addr` from
/// inside namespace `ns`.
fn abuse(ns: &str, addr: SocketAddr) {
    let ns = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        netns::enter(&ns);
        for payload in [
            &b"\x00\xff garbage \x16\x03"[..],
            &[0x16, 0x03, 0x01, 0x40, 0x00, 1, 2, 3][..],
            &[b'A'; 70_000][..],
        ] {
            if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                let _ = s.write_all(payload);
                let _ = s.shutdown(std::net::Shutdown::Write);
                s.set_read_timeout(Some(Duration::from_secs(10))).ok();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf);
            }
        }
        // Half-open: connect and say nothing; slowloris: a header a byte at a time.
        let idle = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok();
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            for b in b"GET / HTTP/1.1\r\nX-Slow: " {
                if s.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20)); // the attack's own pacing
            }
        }
        drop(idle);
    })
    .join()
    .unwrap();
}

#[test]
fn garbage_half_open_and_slowloris_on_every_port_leave_the_mesh_serving() {
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    mesh.add_pod("web");
    let api = mesh.add_pod("api");
    let _x = mesh.add_pod("attacker");
    mesh.write_config(&config(&api));
    std::fs::create_dir_all(mesh.config_dir()).unwrap();
    mesh.write_cp_file("mesh.yaml", &config(&api));
    mesh.start_control_plane("cp1", 15010);
    mesh.start_sidecar("web", "web", &[]);
    mesh.start_sidecar("api", "api", &[]);
    mesh.wait_ready("web");
    mesh.wait_ready("api");
    let api_sidecar = mesh.net.proc_mut(mesh.pod("api").sidecar.unwrap()).pid();
    let (fd0, rss0) = (fds(api_sidecar), rss_kb(api_sidecar));
    let attacker = mesh.pod("attacker").pod.ns.clone();
    let targets = [
        (attacker.as_str(), format!("{}:8080", api.ip)), // -> inbound capture 15006
        (attacker.as_str(), format!("{}:15006", api.ip)), // direct: no original destination
        (attacker.as_str(), format!("{}:15020", api.ip)), // metrics/health
        (attacker.as_str(), "198.18.0.1:15010".to_string()), // control plane
        (attacker.as_str(), "198.18.0.1:15012".to_string()), // CA
    ];
    for (ns, addr) in &targets {
        abuse(ns, addr.parse().unwrap());
    }
    // From inside the pod, straight at the outbound listener (no redirect: a loop).
    abuse(&api.ns, "127.0.0.1:15001".parse().unwrap());
    // Everything still works.
    let out = mesh.curl("web", &format!("http://{VIP}:8080/after-abuse"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in [
        mesh.pod("api").sidecar.unwrap(),
        mesh.pod("web").sidecar.unwrap(),
        mesh.ca_proc,
    ] {
        assert!(
            mesh.net.proc_mut(i).child.try_wait().unwrap().is_none(),
            "a process died"
        );
    }
    let m = mesh.metrics("api");
    assert!(
        metric_sum(&m, "bulwark_tcp_refused_total", &["direction=\"inbound\""]) >= 3.0,
        "{m}"
    );
    let (fd1, rss1) = wait_for(
        "descriptors to be released",
        Duration::from_secs(20),
        || {
            let f = fds(api_sidecar);
            (f <= fd0 + 4).then_some((f, rss_kb(api_sidecar)))
        },
    );
    println!("api sidecar: fds {fd0} -> {fd1}, rss {rss0} kB -> {rss1} kB");
    assert!(
        rss1 < rss0 + 20_000,
        "memory grew by {} kB",
        rss1.saturating_sub(rss0)
    );
}

/// Holds a connection to `addr` from inside `ns`, silent (half-open) or
/// sending `slow` and then a byte every 500 ms (slowloris), until the server
/// closes it or `limit` passes; how long the server took, if it closed it.
fn held_until_closed(
    ns: &str,
    addr: SocketAddr,
    slow: Option<&'static [u8]>,
    limit: Duration,
) -> Option<Duration> {
    let ns = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        netns::enter(&ns);
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let t = Instant::now();
        if let Some(start) = slow {
            let _ = s.write_all(start);
        }
        let mut buf = [0u8; 512];
        while t.elapsed() < limit {
            match s.read(&mut buf) {
                Ok(0) => return Some(t.elapsed()),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return Some(t.elapsed()),
            }
            if slow.is_some() && s.write_all(b"a").is_err() {
                return Some(t.elapsed());
            }
        }
        None
    })
    .join()
    .unwrap()
}

#[test]
fn half_open_and_slowloris_connections_are_closed_by_every_port_within_its_deadline() {
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    mesh.add_pod("web");
    let api = mesh.add_pod("api");
    mesh.add_pod("attacker");
    std::fs::create_dir_all(mesh.config_dir()).unwrap();
    mesh.write_cp_file("mesh.yaml", &config(&api));
    mesh.start_control_plane("cp1", 15010);
    mesh.write_config(&config(&api));
    mesh.start_sidecar("web", "web", &[]);
    mesh.start_sidecar("api", "api", &[]);
    mesh.wait_ready("web");
    mesh.wait_ready("api");
    let attacker = mesh.pod("attacker").pod.ns.clone();
    let web = mesh.pod("web").pod.ns.clone();
    let s = Duration::from_secs;
    // A request line and an unfinished header; a TLS record header
    // announcing a 512-byte ClientHello that then trickles in.
    const HTTP: Option<&[u8]> = Some(b"GET / HTTP/1.1\r\nX-Slow: ");
    const TLS: Option<&[u8]> = Some(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]);
    // (who, where, slowloris start or half-open, the server's deadline)
    let cases: Vec<(String, String, Option<&'static [u8]>, Duration)> = vec![
        (attacker.clone(), format!("{}:8080", api.ip), None, s(5)), // inbound 15006: first byte
        (attacker.clone(), format!("{}:8080", api.ip), TLS, s(5)),  // ... then its TLS handshake
        (attacker.clone(), format!("{}:15020", api.ip), None, s(10)), // metrics: headers
        (attacker.clone(), format!("{}:15020", api.ip), HTTP, s(10)),
        (attacker.clone(), "198.18.0.1:15010".into(), None, s(10)), // control plane: TLS handshake
        (attacker.clone(), "198.18.0.1:15010".into(), TLS, s(10)),
        (attacker.clone(), "198.18.0.1:15012".into(), None, s(10)), // CA: TLS handshake
        (attacker.clone(), "198.18.0.1:15012".into(), TLS, s(10)),
        (web.clone(), format!("{VIP}:8080"), None, s(30)), // outbound 15001, HTTP: headers
        (web.clone(), format!("{VIP}:8080"), HTTP, s(30)),
    ];
    let held: Vec<_> = cases
        .iter()
        .map(|(ns, addr, slow, deadline)| {
            let (ns, addr, slow, limit) =
                (ns.clone(), addr.parse().unwrap(), *slow, *deadline + s(4));
            std::thread::spawn(move || held_until_closed(&ns, addr, slow, limit))
        })
        .collect();
    let mut report = Vec::new();
    for ((_, addr, slow, deadline), h) in cases.iter().zip(held) {
        let took = h.join().unwrap();
        let kind = if slow.is_some() {
            "slowloris"
        } else {
            "half-open"
        };
        println!("{kind} to {addr}: closed after {took:?} (deadline {deadline:?})");
        report.push((addr.clone(), kind, took, *deadline));
    }
    for (addr, kind, took, deadline) in &report {
        let took = took
            .unwrap_or_else(|| panic!("{kind} connection to {addr} was never closed: {report:?}"));
        assert!(
            took <= *deadline + s(3),
            "{kind} to {addr} held {took:?}: {report:?}"
        );
    }
    // And the mesh still serves.
    let out = mesh.curl("web", &format!("http://{VIP}:8080/after"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn oversized_headers_get_431_and_a_connection_flood_is_refused_fast() {
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    mesh.add_pod("web");
    let api = mesh.add_pod("api");
    mesh.write_config(&config(&api));
    mesh.start_sidecar("web", "web", &["--max-connections", "40"]);
    mesh.start_sidecar("api", "api", &[]);
    mesh.wait_ready("web");
    mesh.wait_ready("api");
    let ns = format!("/run/netns/{}", mesh.pod("web").pod.ns);
    let (status, flood) = std::thread::spawn(move || {
        netns::enter(&ns);
        let target: SocketAddr = format!("{VIP}:8080").parse().unwrap();
        let mut s = TcpStream::connect(target).unwrap();
        let big = "x".repeat(100 * 1024);
        let _ = write!(s, "GET / HTTP/1.1\r\nHost: api\r\nX-Big: {big}\r\n\r\n");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        let status = String::from_utf8_lossy(&buf[..n]).to_string();
        // 200 idle connections against a limit of 40.
        let t = Instant::now();
        let mut conns = Vec::with_capacity(200);
        let mut refused = 0;
        for _ in 0..200 {
            match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
                Ok(c) => conns.push(c),
                Err(_) => refused += 1,
            }
        }
        // Kept open until the sidecar's counters are read: closing them
        // would free slots for connections still in its accept queue.
        (status, (refused, conns, t.elapsed()))
    })
    .join()
    .unwrap();
    assert!(status.starts_with("HTTP/1.1 431"), "{status}");
    println!(
        "flood: 200 connections opened in {:?} ({} refused at connect)",
        flood.2, flood.0
    );
    let held = flood.1;
    let overload = wait_for("the flood to be refused", Duration::from_secs(10), || {
        let m = mesh.metrics("web");
        let n = metric_sum(&m, "bulwark_tcp_refused_total", &["reason=\"overload\""]);
        (n >= 150.0).then_some(n)
    });
    println!("{overload} connections refused as overload (limit 40, 200 opened)");
    drop(held);
    // And it still serves once the flood is gone.
    wait_for("service after the flood", Duration::from_secs(10), || {
        mesh.curl("web", &format!("http://{VIP}:8080/"))
            .status
            .success()
            .then_some(())
    });
}

/// A pod holding hundreds of silent connections to the CA and the control
/// plane (each would hold a handshake place for 10 s) takes only its own
/// share: a sidecar starting meanwhile gets its SVID and config at once.
#[test]
fn silent_connections_from_one_pod_do_not_lock_sidecars_out_of_ca_and_control_plane() {
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    let api = mesh.add_pod("api");
    mesh.add_pod("attacker");
    mesh.write_cp_file("mesh.yaml", &config(&api));
    mesh.start_control_plane("cp1", 15010);
    let ns = format!("/run/netns/{}", mesh.pod("attacker").pod.ns);
    let hoard = std::thread::spawn(move || {
        netns::enter(&ns);
        ["198.18.0.1:15010", "198.18.0.1:15012"]
            .iter()
            .flat_map(|a| {
                let addr: SocketAddr = a.parse().unwrap();
                (0..300).filter_map(move |_| {
                    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()
                })
            })
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    let t = Instant::now();
    mesh.start_sidecar_xds("api", "api", "198.18.0.1:15010", "app=api", &[]);
    mesh.wait_ready("api");
    let took = t.elapsed();
    println!(
        "{} silent connections held; a new sidecar was ready in {took:?}",
        hoard.len()
    );
    // Locked out, it would wait for the hoard's 10 s handshake deadline.
    assert!(took < Duration::from_secs(7), "ready after {took:?}");
    drop(hoard);
}

/// Another pod holding every connection it can to a sidecar's metrics and
/// health port leaves a slot for the kubelet's probe (from the node).
#[test]
fn a_pod_hoarding_health_port_connections_does_not_starve_the_probes() {
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    let api = mesh.add_pod("api");
    mesh.add_pod("attacker");
    mesh.write_config(&config(&api));
    mesh.start_sidecar("api", "api", &[]);
    mesh.wait_ready("api");
    let target: SocketAddr = format!("{}:15020", api.ip).parse().unwrap();
    let ns = format!("/run/netns/{}", mesh.pod("attacker").pod.ns);
    // As many as the whole port allows, silent (each holds its slot for
    // the 10 s header timeout); kept open until the probe has run.
    let hoard = std::thread::spawn(move || {
        netns::enter(&ns);
        (0..64)
            .filter_map(|_| TcpStream::connect_timeout(&target, Duration::from_secs(2)).ok())
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    // Every connection either held by the sidecar or refused by it.
    let api_ns = api.ns.clone();
    let refused = || {
        metric_sum(
            &mesh.metrics("api"),
            "bulwark_tcp_refused_total",
            &["direction=\"admin\""],
        )
    };
    wait_for(
        "the sidecar to have taken every hoarded connection",
        Duration::from_secs(10),
        || {
            let out = mesh.net.exec(
                &api_ns,
                &["ss", "-Htn", "state", "established", "( sport = :15020 )"],
            );
            let held = String::from_utf8_lossy(&out.stdout).lines().count();
            (held as f64 + refused() >= hoard.len() as f64).then_some(())
        },
    );
    let probe = mesh.net.exec(
        &mesh.net.switch,
        &[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            &format!("http://{target}/healthz/ready"),
        ],
    );
    let code = String::from_utf8_lossy(&probe.stdout).to_string();
    let refused = refused();
    println!(
        "{} connections opened by the hoarder, {refused} refused; probe: {code}",
        hoard.len()
    );
    assert_eq!(code, "200", "{}", String::from_utf8_lossy(&probe.stderr));
    assert!(refused >= 50.0, "the hoarder keeps its share only");
    drop(hoard);
}

/// Any pod can connect to a sidecar's inbound port. One that holds every
/// connection slot with silent connections (each held for the 5 s
/// first-byte deadline) gets its share, and the mesh's callers the rest.
#[test]
fn a_pod_hoarding_inbound_connections_does_not_lock_callers_out() {
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    mesh.add_pod("web");
    let api = mesh.add_pod("api");
    mesh.add_pod("attacker");
    mesh.write_config(&config(&api));
    mesh.start_sidecar("web", "web", &[]);
    mesh.start_sidecar("api", "api", &["--max-connections", "40"]);
    mesh.wait_ready("web");
    mesh.wait_ready("api");
    let target: SocketAddr = format!("{}:8080", api.ip).parse().unwrap();
    let ns = format!("/run/netns/{}", mesh.pod("attacker").pod.ns);
    let hoard = std::thread::spawn(move || {
        netns::enter(&ns);
        (0..40)
            .filter_map(|_| TcpStream::connect_timeout(&target, Duration::from_secs(2)).ok())
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    let refused = |reason: &str| {
        metric_sum(
            &mesh.metrics("api"),
            "bulwark_tcp_refused_total",
            &["direction=\"inbound\"", &format!("reason=\"{reason}\"")],
        )
    };
    // Every hoarded connection either held by the sidecar or refused.
    let api_ns = api.ns.clone();
    wait_for(
        "the sidecar to have taken every hoarded connection",
        Duration::from_secs(4),
        || {
            let out = mesh.net.exec(
                &api_ns,
                &["ss", "-Htn", "state", "established", "( sport = :15006 )"],
            );
            let held = String::from_utf8_lossy(&out.stdout).lines().count() as f64;
            let gone = refused("source_over_limit") + refused("overload");
            (held + gone >= hoard.len() as f64).then_some(())
        },
    );
    // web's first connection to api (nothing pooled yet) gets a slot.
    let (code, out) = curl_status(&mesh, "web", &[&format!("http://{VIP}:8080/")]);
    assert_eq!(code, 200, "web was locked out: {out}");
    // Half the slots, and its share of the rest; the others refused.
    assert!(refused("source_over_limit") >= 15.0);
    assert_eq!(refused("overload"), 0.0);
    drop(hoard);
}

#[test]
fn sigterm_drains_in_flight_requests_before_exiting() {
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    mesh.add_pod("web");
    let api = mesh.add_pod("api");
    mesh.write_config(&config(&api));
    mesh.set_app_args("api", &["--latency", "1500ms"]);
    mesh.start_sidecar("web", "web", &["--drain-grace", "10s"]);
    mesh.start_sidecar("api", "api", &["--drain-grace", "10s"]);
    mesh.wait_ready("web");
    mesh.wait_ready("api");
    // Ten slow requests in flight through api's sidecar...
    let ns = format!("/run/netns/{}", mesh.pod("web").pod.ns);
    let clients: Vec<_> = (0..10)
        .map(|_| {
            let ns = ns.clone();
            std::thread::spawn(move || {
                netns::enter(&ns);
                netns::http_get(format!("{VIP}:8080").parse().unwrap(), "/slow").unwrap_or_default()
            })
        })
        .collect();
    // All ten have reached the app: it holds a connection from its sidecar
    // for each (HTTP/1.1, one request at a time on each).
    let api_ns = mesh.pod("api").pod.ns.clone();
    wait_for(
        "all ten requests to reach the app",
        Duration::from_secs(10),
        || {
            let out = mesh.net.exec(
                &api_ns,
                &["ss", "-Htn", "state", "established", "( sport = :8080 )"],
            );
            (String::from_utf8_lossy(&out.stdout).lines().count() >= 10).then_some(())
        },
    );
    // ...when it gets SIGTERM.
    let i = mesh.pod("api").sidecar.unwrap();
    let t = Instant::now();
    let pid = mesh.net.proc_mut(i).pid() as i32;
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let results: Vec<String> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.contains(" 200 OK")).count();
    assert_eq!(ok, 10, "in-flight requests completed: {results:?}");
    wait_for("the sidecar to exit", Duration::from_secs(15), || {
        mesh.net.proc_mut(i).child.try_wait().unwrap().map(|_| ())
    });
    println!("drained and exited {:?} after SIGTERM", t.elapsed());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "exited within the grace period"
    );
}

#[test]
fn sigterm_on_one_of_two_upstream_sidecars_under_load_fails_no_request() {
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    mesh.add_pod("web");
    let api1 = mesh.add_pod("api-1");
    let api2 = mesh.add_pod("api-2");
    let second = format!(
        "    - address: {}\n      identity: {}\n",
        api2.ip,
        netns::mesh::spiffe("api")
    );
    mesh.write_config(&netns::mesh::http_api_config(&api1, &second));
    // Requests take 500 ms, so the drain, which lasts as long as api-1's
    // in-flight requests, is long enough to be seen refusing while alive.
    for p in ["api-1", "api-2"] {
        mesh.set_app_args(p, &["--latency", "500ms"]);
    }
    mesh.start_sidecar("web", "web", &[]);
    mesh.start_sidecar("api-1", "api", &["--drain-grace", "10s"]);
    mesh.start_sidecar("api-2", "api", &[]);
    for p in ["web", "api-1", "api-2"] {
        mesh.wait_ready(p);
    }
    // Four clients in web, each request on a new connection; a refused
    // connection is retried (up to 3 times), any other failure counts.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ns = format!("/run/netns/{}", mesh.pod("web").pod.ns);
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (ns, stop) = (ns.clone(), stop.clone());
            std::thread::spawn(move || {
                netns::enter(&ns);
                let (mut ok, mut failed) = (0u32, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let addr: SocketAddr = format!("{VIP}:8080").parse().unwrap();
                    let answer = (0..3)
                        .find_map(|_| {
                            match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                                Ok(mut s) => {
                                    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
                                    let _ = s.write_all(
                                        b"GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
                                    );
                                    let mut out = String::new();
                                    let _ = s.read_to_string(&mut out);
                                    Some(out)
                                }
                                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => None,
                                Err(e) => Some(e.to_string()),
                            }
                        })
                        .unwrap_or_else(|| "refused 3 times".into());
                    if answer.starts_with("HTTP/1.1 200") {
                        ok += 1;
                    } else {
                        failed.push(answer.lines().next().unwrap_or("").to_string());
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    // Load on both endpoints, then SIGTERM to api-1's sidecar.
    wait_for("load on api-1", Duration::from_secs(10), || {
        (metric_sum(
            &mesh.metrics("api-1"),
            "bulwark_requests_total",
            &["direction=\"inbound\""],
        ) >= 8.0)
            .then_some(())
    });
    let i = mesh.pod("api-1").sidecar.unwrap();
    let pid = mesh.net.proc_mut(i).pid() as i32;
    let t = Instant::now();
    unsafe { libc::kill(pid, libc::SIGTERM) };
    // Draining: new connections to api-1 are refused at once while the
    // process is still finishing what it has.
    let sw = mesh.net.switch.clone();
    let target: SocketAddr = format!("{}:8080", api1.ip).parse().unwrap();
    // Whether the sidecar was alive when the refusal came is read at that
    // moment (a zombie is not alive): the drain may end a moment later.
    // Attempts are short, so a SYN lost as the listener closes does not
    // hold the check for a retransmission's second.
    let alive = move || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            !matches!(state, Some("Z" | "X") | None)
        })
    };
    let (refused, alive_while_refusing) = mesh.net.in_ns(&sw, move || {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match TcpStream::connect_timeout(&target, Duration::from_millis(100)) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    return (true, alive());
                }
                _ if Instant::now() > deadline => return (false, alive()),
                _ => std::thread::sleep(Duration::from_millis(20)), // polling
            }
        }
    });
    wait_for("api-1's sidecar to exit", Duration::from_secs(15), || {
        mesh.net.proc_mut(i).child.try_wait().unwrap().map(|_| ())
    });
    let exited = t.elapsed();
    // Keep the load on a little longer: everything now goes to api-2.
    let after = metric_sum(
        &mesh.metrics("api-2"),
        "bulwark_requests_total",
        &["direction=\"inbound\""],
    );
    wait_for(
        "requests served by api-2 after the drain",
        Duration::from_secs(10),
        || {
            (metric_sum(
                &mesh.metrics("api-2"),
                "bulwark_requests_total",
                &["direction=\"inbound\""],
            ) >= after + 8.0)
                .then_some(())
        },
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for c in clients {
        let (o, f) = c.join().unwrap();
        ok += o;
        failed.extend(f);
    }
    println!(
        "drain under load: {ok} ok, {} failed; api-1's sidecar exited {exited:?} after SIGTERM",
        failed.len()
    );
    assert!(
        refused,
        "api-1 still accepted new connections while draining"
    );
    assert!(
        alive_while_refusing,
        "the refusal came only after the process had exited"
    );
    assert!(
        exited < Duration::from_secs(10),
        "exited within the grace period: {exited:?}"
    );
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert!(ok >= 16, "only {ok} requests");
}

/// Body size limit of `api` in [`request_bodies_over_the_limit_get_413_and_never_reach_the_app`].
const BODY_LIMIT: usize = 100_000;

/// `curl` in pod `from` with `args`; (status, response headers).
fn curl_status(mesh: &Mesh, from: &str, args: &[&str]) -> (u16, String) {
    let ns = &mesh.pod(from).pod.ns;
    let mut argv = vec![
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-D",
        "-",
    ];
    argv.extend_from_slice(args);
    let out = mesh.net.exec(ns, &argv);
    let headers = String::from_utf8_lossy(&out.stdout).into_owned();
    // The last status line: curl may print a `100 Continue` first.
    let code = headers
        .lines()
        .rfind(|l| l.starts_with("HTTP/"))
        .and_then(|l| l.split(' ').nth(1)?.parse().ok())
        .unwrap_or(0);
    (
        code,
        format!("{headers}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

fn check_body_case(mesh: &Mesh, what: &str, code: u16, out: &str, want: u16) {
    assert_eq!(
        code,
        want,
        "{what}: {out}\n{}\n{}",
        mesh.sidecar_log("web"),
        mesh.sidecar_log("api")
    );
    if want == 413 {
        assert!(
            out.contains("x-bulwark-reason: body-too-large"),
            "{what}: {out}"
        );
    } else {
        assert!(
            out.contains(&format!("x-request-body-bytes: {BODY_LIMIT}")),
            "{what}: {out}"
        );
    }
}

/// POSTs `len` bytes in 16 KiB chunks over HTTP/2 from pod web to the
/// `api` VIP, with a content-length when `declared`; (status, headers).
fn h2_post(mesh: &Mesh, len: usize, declared: bool) -> (u16, String) {
    use http_body_util::BodyExt;
    let ns = format!("/run/netns/{}", mesh.pod("web").pod.ns);
    std::thread::spawn(move || {
        netns::enter(&ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let tcp = tokio::net::TcpStream::connect(format!("{VIP}:8080"))
                .await
                .unwrap();
            let (mut send, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(tcp),
            )
            .await
            .unwrap();
            tokio::spawn(conn);
            let (tx, rx) = tokio::sync::mpsc::channel::<
                Result<hyper::body::Frame<hyper::body::Bytes>, std::io::Error>,
            >(4);
            tokio::spawn(async move {
                let mut left = len;
                while left > 0 {
                    let n = left.min(16 * 1024);
                    left -= n;
                    let chunk = hyper::body::Bytes::from(vec![b's'; n]);
                    if tx.send(Ok(hyper::body::Frame::data(chunk))).await.is_err() {
                        break; // the request was answered and dropped
                    }
                }
            });
            let body =
                http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            let mut req = hyper::Request::post(format!("http://{VIP}:8080/upload"));
            if declared {
                req = req.header("content-length", len);
            }
            let resp = tokio::time::timeout(
                Duration::from_secs(10),
                send.send_request(req.body(body).unwrap()),
            )
            .await
            .expect("an answer within 10 s")
            .unwrap();
            let mut out = String::new();
            for (k, v) in resp.headers() {
                out.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("")));
            }
            let code = resp.status().as_u16();
            let _ = resp.into_body().collect().await;
            (code, out)
        })
    })
    .join()
    .unwrap()
}

#[test]
fn request_bodies_over_the_limit_get_413_and_never_reach_the_app() {
    let Some(mut mesh) = Mesh::start(&[]) else {
        return;
    };
    mesh.add_pod("web");
    let api = mesh.add_pod("api");
    let policy = format!(
        "---\napiVersion: bulwark.dev/v1\nkind: TrafficPolicy\nmetadata:\n  name: api\n  namespace: default\nspec:\n  service: api\n  maxRequestBodyBytes: {BODY_LIMIT}\n"
    );
    mesh.write_config(&netns::mesh::http_api_config(&api, &policy));
    mesh.start_sidecar("web", "web", &[]);
    mesh.start_sidecar("api", "api", &[]);
    mesh.wait_ready("web");
    mesh.wait_ready("api");
    let under = mesh.net.dir.join("under.bin");
    let over = mesh.net.dir.join("over.bin");
    std::fs::write(&under, vec![b'u'; BODY_LIMIT]).unwrap();
    std::fs::write(&over, vec![b'o'; 3 * BODY_LIMIT]).unwrap();
    let (under, over) = (
        format!("@{}", under.display()),
        format!("@{}", over.display()),
    );
    let url = format!("http://{VIP}:8080/upload");
    let chunked = "transfer-encoding: chunked";
    let cases: [(&str, Vec<&str>, u16); 3] = [
        ("HTTP/1.1, at the limit", vec!["--data-binary", &under], 200),
        ("HTTP/1.1, declared over", vec!["--data-binary", &over], 413),
        (
            "HTTP/1.1, chunked over",
            vec!["-H", chunked, "--data-binary", &over],
            413,
        ),
    ];
    for (what, mut args, want) in cases {
        args.push(&url);
        let (code, out) = curl_status(&mesh, "web", &args);
        println!("{what}: {code}");
        check_body_case(&mesh, what, code, &out, want);
    }
    // curl over HTTP/2 (prior knowledge) stops reading the answer if its
    // stream is reset while it is still uploading: the sidecar must let it
    // finish sending and show it the 413.
    for round in 0..5 {
        for (what, extra) in [
            ("curl HTTP/2, declared over", None),
            ("curl HTTP/2, streamed over", Some(chunked)),
        ] {
            let mut args = vec!["--http2-prior-knowledge", "--data-binary", &over];
            if let Some(h) = extra {
                args.extend_from_slice(&["-H", h]);
            }
            args.push(&url);
            let (code, out) = curl_status(&mesh, "web", &args);
            assert_eq!(code, 413, "{what} (round {round}): {out}");
        }
    }
    // HTTP/2 (prior knowledge) to web's sidecar, from a client that reads
    // an early answer even while it is still sending.
    let h2_cases = [
        ("HTTP/2, at the limit", BODY_LIMIT, true, 200),
        ("HTTP/2, declared over", 3 * BODY_LIMIT, true, 413),
        ("HTTP/2, streamed over", 3 * BODY_LIMIT, false, 413),
    ];
    for (what, len, declared, want) in h2_cases {
        let (code, out) = h2_post(&mesh, len, declared);
        println!("{what}: {code}");
        check_body_case(&mesh, what, code, &out, want);
    }

    // A declared length over the limit is answered before any body is sent.
    let ns = format!("/run/netns/{}", mesh.pod("web").pod.ns);
    let (head, took) = std::thread::spawn(move || {
        netns::enter(&ns);
        let mut s = TcpStream::connect(format!("{VIP}:8080")).unwrap();
        let t = Instant::now();
        write!(
            s,
            "POST /big HTTP/1.1\r\nHost: api\r\nContent-Length: 1000000000\r\n\r\n"
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap_or(0);
        (String::from_utf8_lossy(&buf[..n]).into_owned(), t.elapsed())
    })
    .join()
    .unwrap();
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    println!("413 for a declared 1 GB body, none of it sent, in {took:?}");

    // Whatever was cut off mid-way, the app never received more than the limit.
    let app_log = mesh.net.log_of(mesh.pod("api").app.unwrap());
    for line in app_log
        .lines()
        .filter(|l| l.contains("request body ended early"))
    {
        let bytes: usize = line
            .split("bytes=")
            .nth(1)
            .and_then(|b| b.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
            .unwrap_or_else(|| panic!("no byte count in {line}"));
        assert!(bytes <= BODY_LIMIT, "the app got {bytes} bytes: {line}");
    }
    let m = mesh.metrics("api");
    let counted = metric_sum(
        &m,
        "bulwark_local_responses_total",
        &["reason=\"body-too-large\""],
    );
    assert!(counted >= 5.0, "{m}");
}
