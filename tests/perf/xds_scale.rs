//! Benchmark, not a timed test: one control-plane process with 1,000
//! simulated sidecar streams (each with its own SVID, over mTLS); time from
//! a config write until every stream has received and ACKed it, the
//! control plane's RSS and CPU seconds per push.
//! `cargo test --release --test xds_scale -- --ignored --nocapture`

#[path = "../common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bulwark_ca::SpiffeId;
use bulwark_ca::client::Svid;
use bulwark_ca::tls::TrustBundle;
use bulwark_proto::config::type_url;
use bulwark_proto::xds::v1::{DeltaDiscoveryRequest, Node};
use common::*;

const STREAMS: usize = 1000;

/// CPU seconds and resident kB of process `pid`.
fn proc_stat(pid: u32) -> (f64, u64) {
    (cpu_seconds(pid), rss_kb(pid))
}

#[test]
#[ignore]
fn one_control_plane_with_a_thousand_sidecar_streams() {
    let work = tempdir();
    let ca_dir = work.path().join("ca");
    run_ok(&["ca", "init", "--dir", ca_dir.to_str().unwrap()]);
    let cfg_dir = work.path().join("config");
    std::fs::create_dir(&cfg_dir).unwrap();
    let services: String = (0..50)
        .map(|i| format!("apiVersion: bulwark.dev/v1\nkind: Service\nmetadata:\n  name: svc{i}\n  namespace: default\nspec:\n  ports:\n    - port: 8080\n      protocol: tcp\n  selector:\n    app: svc{i}\n---\n"))
        .collect();
    std::fs::write(cfg_dir.join("services.yaml"), &services).unwrap();
    let route = |w: u32| {
        format!(
            "apiVersion: bulwark.dev/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: default\nspec:\n  service: svc0\n  rules:\n    - from:\n        - spiffe://cluster.local/ns/default/sa/caller{w}\n"
        )
    };
    std::fs::write(cfg_dir.join("policy.yaml"), route(0)).unwrap();

    let port = free_port();
    let admin = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut cp = spawn(
        work.path(),
        "xds",
        &[
            "xds",
            "serve",
            "--config",
            cfg_dir.to_str().unwrap(),
            "--ca-dir",
            ca_dir.to_str().unwrap(),
            "--listen",
            &addr.to_string(),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
        ],
    );
    wait_listening(addr, &mut cp);
    let pid = cp.pid();
    let rss_idle = proc_stat(pid).1;

    // Certificates for 1,000 workloads, signed locally by the CA's intermediate.
    let bundle_pem = std::fs::read_to_string(ca_dir.join("bundle.pem")).unwrap();
    let svids: Vec<Svid> = (0..STREAMS)
        .map(|i| {
            let id: SpiffeId = format!("spiffe://cluster.local/ns/default/sa/w{i}")
                .parse()
                .unwrap();
            local_svid(&ca_dir, &id)
        })
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let bundle = TrustBundle::from_pem(&bundle_pem).unwrap();
    // Each stream reports (stream, time) when it sees the new policy and ACKs.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let (synced_tx, mut synced_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let connected_at = Instant::now();
    // A fleet does not start in one instant: at most 64 handshakes at a time.
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    for (i, svid) in svids.into_iter().enumerate() {
        let (bundle, seen_tx, synced_tx, gate) = (
            bundle.clone(),
            seen_tx.clone(),
            synced_tx.clone(),
            gate.clone(),
        );
        rt.spawn(async move {
            let permit = gate.acquire_owned().await.unwrap();
            let mut client = xds_client(addr, &svid, bundle).await;
            drop(permit);
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            for (n, t) in type_url::ALL.iter().enumerate() {
                tx.send(DeltaDiscoveryRequest {
                    node: (n == 0).then(|| Node {
                        id: format!("w{i}"),
                        identity: svid.identity.to_string(),
                        address: format!("10.200.{}.{}", i / 250, i % 250 + 1),
                        ports: vec![8080],
                        labels: [("app".to_string(), format!("svc{}", i % 50))].into(),
                        namespace: "default".into(),
                        unhealthy: false,
                    }),
                    type_url: t.to_string(),
                    resource_names_subscribe: vec!["*".into()],
                    ..Default::default()
                })
                .await
                .unwrap();
            }
            let mut stream = client
                .delta_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let mut first_round = type_url::ALL.len();
            while let Ok(Some(resp)) = stream.message().await {
                let policy_changed =
                    resp.type_url == type_url::AUTHORIZATION_POLICY && !resp.resources.is_empty();
                let _ = tx
                    .send(DeltaDiscoveryRequest {
                        type_url: resp.type_url.clone(),
                        response_nonce: resp.nonce,
                        ..Default::default()
                    })
                    .await;
                if first_round > 0 {
                    first_round -= 1;
                    if first_round == 0 {
                        let _ = synced_tx.send(i);
                    }
                } else if policy_changed {
                    let _ = seen_tx.send((i, Instant::now()));
                }
            }
        });
    }
    let mut synced = 0;
    rt.block_on(async {
        while synced < STREAMS {
            tokio::time::timeout(Duration::from_secs(120), synced_rx.recv())
                .await
                .expect("streams to sync")
                .unwrap();
            synced += 1;
        }
    });
    println!(
        "{STREAMS} streams connected and synced in {:.2}s",
        connected_at.elapsed().as_secs_f64()
    );
    // Let endpoint registrations settle before measuring a push.
    std::thread::sleep(Duration::from_secs(3)); // settling, then measured below
    while rt.block_on(async {
        tokio::time::timeout(Duration::from_millis(10), seen_rx.recv())
            .await
            .is_ok()
    }) {}

    let mut all = Vec::new();
    let mut cpu_per_push = Vec::new();
    for w in 1..=3u32 {
        let (cpu0, _) = proc_stat(pid);
        let t0 = Instant::now();
        std::fs::write(cfg_dir.join("policy.yaml"), route(w)).unwrap();
        let mut lat = Vec::with_capacity(STREAMS);
        rt.block_on(async {
            while lat.len() < STREAMS {
                let (_, at) = tokio::time::timeout(Duration::from_secs(60), seen_rx.recv())
                    .await
                    .expect("every stream to get the push")
                    .unwrap();
                lat.push(at - t0);
            }
        });
        let (cpu1, rss) = proc_stat(pid);
        lat.sort();
        let p = |q: f64| {
            lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)].as_secs_f64() * 1000.0
        };
        println!(
            "push {w}: write->received by all {STREAMS}: p50={:.0}ms p99={:.0}ms max={:.0}ms; CP cpu={:.2}s rss={}MiB",
            p(0.5),
            p(0.99),
            p(1.0),
            cpu1 - cpu0,
            rss / 1024
        );
        cpu_per_push.push(cpu1 - cpu0);
        all.push((p(0.5), p(0.99), p(1.0)));
    }
    let (_, rss) = proc_stat(pid);
    let anon = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    println!(
        "control plane RSS with {STREAMS} streams: {} MiB (before any stream: {} MiB; anonymous now: {anon}); per stream: {:.1} kB above idle",
        rss / 1024,
        rss_idle / 1024,
        rss.saturating_sub(rss_idle) as f64 / STREAMS as f64
    );
    drop(rt);
}
