//! The control plane end to end on loopback: real mTLS, real files, a
//! discovery client acting as a sidecar.

mod support;

use std::time::{Duration, Instant};

use bulwark_proto::config::{type_url, v1 as pb};
use bulwark_xds::status::TypeState;
use bulwark_xds::{ServeError, fetch_status};
use prost::Message;
use support::*;
use tonic::Code;

/// Identity of a client that serves no Service: connecting it changes no
/// endpoints, so it sees exactly the config.
const CLIENT: (&str, &str) = ("shop", "client");

fn client_node() -> pb_node::Node {
    node(CLIENT.0, CLIENT.1, "10.0.0.100", &[])
}

mod pb_node {
    pub use bulwark_proto::xds::v1::Node;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_gets_every_resource_in_type_order_and_converges_after_acking() {
    let mesh = Mesh::new();
    let server = mesh.start().await;
    let mut c = Client::subscribe_all(&server, &mesh, client_node(), Held::new())
        .await
        .unwrap();

    let responses = c.sync_all().await;

    let types: Vec<&str> = responses.iter().map(|r| r.type_url.as_str()).collect();
    assert_eq!(types, type_url::ALL);
    let got: Vec<(&str, Vec<&str>)> = responses
        .iter()
        .map(|r| (bulwark_xds::snapshot::kind_of(&r.type_url), names(r)))
        .collect();
    assert_eq!(
        got,
        [
            ("TrustBundle", vec!["bundle"]),
            ("MeshConfig", vec!["mesh"]),
            ("Service", vec!["shop/api", "shop/web"]),
            ("ServiceEntry", vec!["shop/payments"]),
            (
                "ServiceEndpoints",
                vec!["shop/api", "shop/payments", "shop/web"]
            ),
            ("AuthorizationPolicy", vec!["shop/api-callers"]),
            ("TrafficPolicy", vec!["shop/api"]),
            ("Route", vec!["shop/api"]),
            ("RequestAuthentication", vec![]),
            ("Gateway", vec![]),
        ]
    );
    let snap = server.handle.snapshot();
    for r in &responses {
        assert_eq!(r.system_version_info, snap.system_version());
        for res in &r.resources {
            assert_eq!(
                res.version,
                *snap.resources(&r.type_url).unwrap()[res.name.as_str()].version
            );
        }
    }
    let route = pb::Route::decode(responses[7].resources[0].resource.as_slice()).unwrap();
    assert_eq!(route.rules[0].timeout_ms, 2000);
    assert_eq!(route.source.unwrap().file, "route.yaml");
    let bundle = pb::TrustBundle::decode(responses[0].resources[0].resource.as_slice()).unwrap();
    assert_eq!(bundle.roots_pem.len(), 1);

    let status = eventually("the mesh to converge", || async {
        let s = fetch_status(&server.admin.to_string()).await.unwrap();
        s.converged.then_some(s)
    })
    .await;
    assert_eq!((status.sidecars_total, status.sidecars_on_version), (1, 1));
    let sidecar = &status.sidecars[0];
    assert_eq!(sidecar.identity, "spiffe://cluster.local/ns/shop/sa/client");
    assert_eq!(sidecar.address, "10.0.0.100");
    assert!(sidecar.types.iter().all(|t| t.state == TypeState::Applied
        && t.acked_system_version.as_deref() == Some(snap.system_version())));
    assert_eq!(sidecar.types_summary(), "10/10 applied");
    assert_eq!(
        status.convergence_line(),
        format!("converged: yes (version {})", snap.system_version())
    );
    let metrics = bulwark_xds::status::fetch_metrics(&server.admin.to_string())
        .await
        .unwrap();
    assert!(
        metrics.contains("bulwark_xds_connected_sidecars 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("bulwark_xds_config_apply_seconds_count 10"),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_a_file_pushes_only_the_changed_resource_within_a_second() {
    let mesh = Mesh::new();
    let server = mesh.start().await;
    let mut c = Client::subscribe_all(&server, &mesh, client_node(), Held::new())
        .await
        .unwrap();
    c.sync_all().await;
    let before = server.sent_total();

    let edited = Instant::now();
    mesh.write("route.yaml", &route("3s"));
    let push = c.recv().await;
    let took = edited.elapsed();

    assert!(took < Duration::from_secs(1), "push took {took:?}");
    assert_eq!(push.type_url, type_url::ROUTE);
    assert_eq!(names(&push), ["shop/api"]);
    assert!(push.removed_resources.is_empty());
    let route = pb::Route::decode(push.resources[0].resource.as_slice()).unwrap();
    assert_eq!(route.rules[0].timeout_ms, 3000);
    assert_eq!(server.sent_total(), before + 1);
    c.ack(&push).await;
    let status = eventually("the mesh to converge on the edit", || async {
        let s = server.handle.status();
        (s.converged && s.system_version == push.system_version_info).then_some(s)
    })
    .await;
    assert_eq!(status.sidecars_on_version, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_edit_keeps_the_last_good_snapshot_and_logs_every_error() {
    capture_logs();
    let mesh = Mesh::new();
    let server = mesh.start().await;
    let mut c = Client::subscribe_all(&server, &mesh, client_node(), Held::new())
        .await
        .unwrap();
    c.sync_all().await;
    let good = server.handle.snapshot();
    let routes_sent = server.sent(type_url::ROUTE);

    // Line 8: a timeout that is not a duration.
    mesh.write("route.yaml", &route("soon"));

    eventually("the edit to be rejected", || async {
        (server.handle.metrics().config_rejections.get() == 1).then_some(())
    })
    .await;
    let rejected = server.handle.status().config_rejected.unwrap();
    let at = format!("{}:8:", config_path(&mesh, "route.yaml"));
    assert!(
        rejected.errors.iter().any(|e| e.starts_with(&at)),
        "{rejected:?}"
    );
    let logged = eventually("the error to be logged", || async {
        logs().lines().find(|l| l.contains(&at)).map(str::to_string)
    })
    .await;
    assert!(logged.contains("WARN"), "{logged}");
    assert_eq!(
        server.handle.snapshot().system_version(),
        good.system_version()
    );

    // The next thing the sidecar hears of is the fixed file, not the broken one.
    mesh.write("route.yaml", &route("4s"));
    let push = c.recv().await;
    let route = pb::Route::decode(push.resources[0].resource.as_slice()).unwrap();
    assert_eq!(route.rules[0].timeout_ms, 4000);
    assert_eq!(server.sent(type_url::ROUTE), routes_sent + 1);
    assert!(server.handle.status().config_rejected.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_is_recorded_in_status_and_the_same_versions_are_not_resent() {
    let mesh = Mesh::new();
    let server = mesh.start().await;
    let mut c = Client::subscribe_all(&server, &mesh, client_node(), Held::new())
        .await
        .unwrap();
    c.sync_all().await;

    mesh.write("route.yaml", &route("3s"));
    let refused = c.recv().await;
    assert_eq!(refused.type_url, type_url::ROUTE);
    c.nack(&refused, "route shop/api: backend has no endpoints")
        .await;

    let status = eventually("the NACK to show in status", || async {
        let s = fetch_status(&server.admin.to_string()).await.unwrap();
        s.sidecars
            .first()
            .is_some_and(|sc| sc.last_nack.is_some())
            .then_some(s)
    })
    .await;
    let sidecar = &status.sidecars[0];
    let nack = sidecar.last_nack.as_ref().unwrap();
    assert_eq!(nack.type_url, type_url::ROUTE);
    assert_eq!(nack.system_version, refused.system_version_info);
    assert_eq!(nack.message, "route shop/api: backend has no endpoints");
    let route_state = sidecar
        .types
        .iter()
        .find(|t| t.type_url == type_url::ROUTE)
        .unwrap();
    assert_eq!(route_state.state, TypeState::Nacked);
    assert_eq!(sidecar.types_summary(), "9/10 applied, NACKed: Route");
    assert_eq!(
        status.convergence_line(),
        format!(
            "converged: no (0 of 1 sidecars on version {})",
            refused.system_version_info
        )
    );
    assert_eq!(
        server
            .handle
            .metrics()
            .nacks
            .get_or_create(&bulwark_xds::metrics::TypeLabel::of(type_url::ROUTE))
            .get(),
        1
    );

    // Another change: pushed, and the refused route is not sent again.
    let routes_sent = server.sent(type_url::ROUTE);
    mesh.write("web.yaml", &WEB.replace("port: 8080", "port: 8081"));
    let push = c.recv().await;
    assert_eq!(push.type_url, type_url::SERVICE);
    assert_eq!(names(&push), ["shop/web"]);
    c.ack(&push).await;
    // A fix of the route is sent.
    mesh.write("route.yaml", &route("5s"));
    let fix = c.recv().await;
    assert_eq!(fix.type_url, type_url::ROUTE);
    assert_eq!(server.sent(type_url::ROUTE), routes_sent + 1);
    c.ack(&fix).await;
    eventually("the mesh to converge on the fix", || async {
        let s = server.handle.status();
        s.converged.then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_claiming_another_identity_is_refused_with_permission_denied() {
    let mesh = Mesh::new();
    let server = mesh.start().await;
    let cert = mesh.svid("shop", "client");
    let claim = node("shop", "api", "10.0.0.5", &[("app", "api")]);

    let refused = Client::open(
        &server,
        &mesh,
        Some(cert),
        subscriptions(claim, &type_url::ALL, &Held::new()),
    )
    .await
    .err()
    .expect("stream refused");

    assert_eq!(refused.code(), Code::PermissionDenied);
    assert_eq!(
        refused.message(),
        "node claims identity spiffe://cluster.local/ns/shop/sa/api but its certificate is spiffe://cluster.local/ns/shop/sa/client"
    );
    assert!(server.handle.registry().workloads().is_empty());
    assert!(server.handle.status().sidecars.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_whose_address_is_not_an_ip_is_refused() {
    let mesh = Mesh::new();
    let server = mesh.start().await;
    let bad = node(CLIENT.0, CLIENT.1, "client.shop.svc", &[]);
    let refused = Client::subscribe_all(&server, &mesh, bad, Held::new())
        .await
        .err()
        .expect("stream refused");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("not an IP address"), "{refused}");
    assert!(server.handle.registry().workloads().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_a_certificate_gets_no_stream() {
    let mesh = Mesh::new();
    let server = mesh.start().await;
    let first = subscriptions(client_node(), &type_url::ALL, &Held::new());
    assert!(Client::open(&server, &mesh, None, first).await.is_err());
    eventually("the handshake failure to be counted", || async {
        (server.handle.metrics().tls_handshake_failures.get() >= 1).then_some(())
    })
    .await;
    assert!(server.handle.status().sidecars.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_with_a_certificate_from_another_ca_gets_no_stream() {
    let mesh = Mesh::new();
    let server = mesh.start().await;
    // Same trust domain and identity, but signed by another CA's root.
    let foreign = Mesh::new().svid(CLIENT.0, CLIENT.1);
    let first = subscriptions(client_node(), &type_url::ALL, &Held::new());
    assert!(
        Client::open(&server, &mesh, Some(foreign), first)
            .await
            .is_err()
    );
    eventually("the handshake failure to be counted", || async {
        (server.handle.metrics().tls_handshake_failures.get() >= 1).then_some(())
    })
    .await;
    assert!(server.handle.status().sidecars.is_empty());
    // The genuine SVID still gets its stream.
    let mut ok = Client::subscribe_all(&server, &mesh, client_node(), Held::new())
        .await
        .unwrap();
    ok.sync_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_with_initial_versions_resends_nothing() {
    let mesh = Mesh::new();
    let server = mesh.start().await;
    let mut first = Client::subscribe_all(&server, &mesh, client_node(), Held::new())
        .await
        .unwrap();
    first.sync_all().await;
    let held = first.held.clone();
    drop(first);
    eventually("the first stream to close", || async {
        server.handle.status().sidecars.is_empty().then_some(())
    })
    .await;
    let sent = server.sent_total();

    let mut again = Client::subscribe_all(&server, &mesh, client_node(), held)
        .await
        .unwrap();
    let responses = again.sync_all().await;

    for r in &responses {
        assert!(
            r.resources.is_empty() && r.removed_resources.is_empty(),
            "resent {}: {:?} {:?}",
            r.type_url,
            names(r),
            r.removed_resources
        );
    }
    assert_eq!(server.sent_total(), sent);
    eventually("the reconnected sidecar to count as converged", || async {
        server.handle.status().converged.then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connected_sidecar_becomes_an_endpoint_of_its_service_until_the_grace_period_after_it_leaves()
 {
    let grace = Duration::from_millis(600);
    let mesh = Mesh::new();
    let server = mesh.start_with(|o| o.endpoint_grace = grace).await;
    // An observer that watches endpoints only.
    let mut observer = Client::open(
        &server,
        &mesh,
        Some(mesh.svid(CLIENT.0, CLIENT.1)),
        subscriptions(client_node(), &[type_url::SERVICE_ENDPOINTS], &Held::new()),
    )
    .await
    .unwrap();
    let initial = observer.recv().await;
    observer.ack(&initial).await;
    let api_endpoints = |r: &bulwark_proto::xds::v1::DeltaDiscoveryResponse| {
        let res = r.resources.iter().find(|x| x.name == "shop/api")?;
        Some(
            pb::ServiceEndpoints::decode(res.resource.as_slice())
                .unwrap()
                .endpoints,
        )
    };
    assert_eq!(api_endpoints(&initial), Some(vec![]));

    let api = node(
        "shop",
        "api",
        "10.1.2.3",
        &[("app", "api"), ("version", "v1")],
    );
    let mut sidecar = Client::subscribe_all(&server, &mesh, api, Held::new())
        .await
        .unwrap();
    sidecar.sync_all().await;

    let added = observer.recv().await;
    observer.ack(&added).await;
    assert_eq!(names(&added), ["shop/api"]);
    let eps = api_endpoints(&added).unwrap();
    assert_eq!(eps.len(), 1);
    assert_eq!(
        (
            eps[0].address.as_str(),
            eps[0].identity.as_str(),
            &eps[0].ports
        ),
        (
            "10.1.2.3",
            "spiffe://cluster.local/ns/shop/sa/api",
            &vec![8080]
        )
    );
    assert_eq!(eps[0].labels.get("version").map(String::as_str), Some("v1"));

    let left = Instant::now();
    drop(sidecar);
    let withdrawn = observer.recv().await;
    let after = left.elapsed();
    assert_eq!(api_endpoints(&withdrawn), Some(vec![]));
    assert!(
        after >= grace,
        "withdrawn after {after:?}, before the grace period"
    );
    assert!(
        server
            .handle
            .registry()
            .workloads()
            .iter()
            .all(|w| w.workload.node_id != "api")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_the_same_directories_serve_identical_versions() {
    let mesh = Mesh::new();
    let a = mesh.start().await;
    let b = mesh.start().await;

    let (sa, sb) = (a.handle.snapshot(), b.handle.snapshot());
    assert_eq!(sa.versions(), sb.versions());
    assert_eq!(sa.system_version(), sb.system_version());

    // A sidecar moving from one replica to the other is sent nothing.
    let mut on_a = Client::subscribe_all(&a, &mesh, client_node(), Held::new())
        .await
        .unwrap();
    on_a.sync_all().await;
    let held = on_a.held.clone();
    drop(on_a);
    let mut on_b = Client::subscribe_all(&b, &mesh, client_node(), held)
        .await
        .unwrap();
    for r in on_b.sync_all().await {
        assert!(
            r.resources.is_empty(),
            "{} resent by the other replica",
            r.type_url
        );
    }
    assert_eq!(b.sent_total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_streams_with_unavailable() {
    let mesh = Mesh::new();
    let server = mesh.start().await;
    let mut c = Client::subscribe_all(&server, &mesh, client_node(), Held::new())
        .await
        .unwrap();
    c.sync_all().await;
    let stopping = tokio::spawn(server.stop());
    let status = c.closed().await.expect("a status");
    assert_eq!(status.code(), Code::Unavailable);
    stopping.await.unwrap();
}

#[tokio::test]
async fn first_load_of_an_invalid_directory_fails_with_every_error() {
    let mesh = Mesh::new();
    mesh.write("route.yaml", &route("soon"));
    mesh.write("web.yaml", "kind: [\n");
    let err = bulwark_xds::ControlPlane::bind(mesh.options())
        .await
        .err()
        .expect("bind fails");
    let ServeError::Config { errors, .. } = &err else {
        panic!("{err}")
    };
    let files: Vec<String> = errors
        .iter()
        .map(|e| e.file.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(files.contains(&"route.yaml".to_string()), "{err}");
    assert!(files.contains(&"web.yaml".to_string()), "{err}");
    assert!(err.to_string().contains("route.yaml:8:"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_failing_over_keep_their_endpoints_until_the_new_replica_has_them_and_get_nothing_resent()
 {
    let mesh = Mesh::new();
    let a = mesh.start().await;
    let b = mesh.start().await;
    let api_node = node("shop", "api", "10.1.2.3", &[("app", "api")]);
    let mut api = Client::subscribe_all(&a, &mesh, api_node.clone(), Held::new())
        .await
        .unwrap();
    api.sync_all().await;
    // api's endpoint is in a's snapshot; the observer starts from there.
    let with_api = eventually("a to register api", || async {
        let s = a.handle.snapshot();
        let eps = &s.resources(type_url::SERVICE_ENDPOINTS).unwrap()["shop/api"];
        let decoded = pb::ServiceEndpoints::decode(eps.encoded.as_slice()).unwrap();
        (!decoded.endpoints.is_empty()).then_some(s)
    })
    .await;
    // api itself may have been sent its endpoint after its first response.
    let want = with_api.resources(type_url::SERVICE_ENDPOINTS).unwrap()["shop/api"]
        .version
        .to_string();
    while api.held[type_url::SERVICE_ENDPOINTS]["shop/api"] != want {
        let r = api.recv().await;
        api.ack(&r).await;
    }
    let mut observer = Client::subscribe_all(&a, &mesh, client_node(), Held::new())
        .await
        .unwrap();
    observer.sync_all().await;
    let (observer_held, api_held) = (observer.held.clone(), api.held.clone());
    drop((observer, api));

    // The observer reaches b first: b knows no api endpoint yet, so its
    // endpoints are held back while everything else is confirmed.
    let mut observer = Client::subscribe_all(&b, &mesh, client_node(), observer_held)
        .await
        .unwrap();
    for _ in 0..type_url::ALL.len() - 1 {
        let r = observer.recv().await;
        assert_ne!(r.type_url, type_url::SERVICE_ENDPOINTS);
        assert!(r.resources.is_empty() && r.removed_resources.is_empty());
        observer.ack(&r).await;
    }
    // Then api arrives.
    let mut api = Client::subscribe_all(&b, &mesh, api_node, api_held)
        .await
        .unwrap();
    let held_back = observer.recv().await;
    assert_eq!(held_back.type_url, type_url::SERVICE_ENDPOINTS);
    assert!(held_back.resources.is_empty() && held_back.removed_resources.is_empty());
    assert_eq!(held_back.system_version_info, with_api.system_version());
    observer.ack(&held_back).await;
    for r in api.sync_all().await {
        assert!(r.resources.is_empty(), "{} resent to api", r.type_url);
    }
    assert_eq!(b.sent_total(), 0);
    let status = eventually("b to converge", || async {
        let s = b.handle.status();
        (s.converged && s.sidecars_total == 2).then_some(s)
    })
    .await;
    assert_eq!(status.system_version, with_api.system_version());
}

/// The first request of a stream, padded (in a node label) to exactly
/// `size` encoded bytes.
fn request_of_size(size: usize) -> bulwark_proto::xds::v1::DeltaDiscoveryRequest {
    let mut req = subscriptions(client_node(), &[type_url::MESH_CONFIG], &Held::new()).remove(0);
    let mut pad = size.saturating_sub(req.encoded_len() + 16);
    loop {
        let node = req.node.as_mut().unwrap();
        node.labels.insert("pad".into(), "x".repeat(pad));
        match req.encoded_len().cmp(&size) {
            std::cmp::Ordering::Equal => return req,
            std::cmp::Ordering::Less => pad += 1,
            std::cmp::Ordering::Greater => pad -= 1,
        }
    }
}

/// Messages are decoded up to `MAX_MESSAGE` bytes (4 MiB): one of exactly
/// that size is read and judged on its content; one byte more ends that
/// stream with tonic's OUT_OF_RANGE before it is read, and the server goes
/// on serving everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_messages_at_the_size_limit_are_read_and_one_byte_over_is_refused() {
    use bulwark_xds::server::MAX_MESSAGE;
    let mesh = Mesh::new();
    let server = mesh.start().await;
    let cert = || Some(mesh.svid(CLIENT.0, CLIENT.1));

    let at = request_of_size(MAX_MESSAGE);
    assert_eq!(at.encoded_len(), MAX_MESSAGE);
    // Read whole, then judged on its content: a label this long is invalid.
    let judged = match Client::open(&server, &mesh, cert(), vec![at]).await {
        Err(s) => s,
        Ok(mut c) => c.closed().await.expect("the stream ends with a status"),
    };
    assert_eq!(judged.code(), Code::InvalidArgument, "{judged}");
    assert!(judged.message().contains("node label"), "{judged}");
    let mut c = Client::subscribe_all(&server, &mesh, client_node(), Held::new())
        .await
        .unwrap();
    let first = c.recv().await;

    let over = request_of_size(MAX_MESSAGE + 1);
    let refused = match Client::open(&server, &mesh, cert(), vec![over]).await {
        Err(s) => s,
        Ok(mut c) => c.closed().await.expect("the stream ends with a status"),
    };
    assert_eq!(refused.code(), Code::OutOfRange, "{refused}");
    assert!(
        refused.message().contains("message length too large"),
        "{refused}"
    );

    // The earlier stream and new ones are still served.
    c.ack(&first).await;
    let mut other = Client::subscribe_all(&server, &mesh, client_node(), Held::new())
        .await
        .unwrap();
    assert_eq!(other.sync_all().await.len(), type_url::ALL.len());
    server.stop().await;
}
