//! The sidecar's discovery client: one mTLS stream to a control-plane
//! replica, delta subscriptions for every type, ACK/NACK, failover between
//! replicas with capped exponential backoff, and the last good config kept
//! (in memory, and on disk when a state directory is given).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bulwark_ca::SpiffeId;
use bulwark_ca::client::{Backoff, jitter};
use bulwark_ca::tls::{ExpectedServer, SpiffeServerVerifier, provider};
use bulwark_proto::config::{Resources, type_url, v1};
use bulwark_proto::xds::v1::discovery_service_client::DiscoveryServiceClient;
use bulwark_proto::xds::v1::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, ErrorDetail, Node};
use prost::Message;
use rustls_pki_types::ServerName;
use tokio::sync::mpsc;

use crate::ConfigHandle;

/// Largest discovery message accepted.
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct XdsOptions {
    /// Control-plane replicas, `host:port`; tried in turn.
    pub addrs: Vec<String>,
    pub node: Node,
    /// Where the last applied config is kept across restarts.
    pub state_dir: Option<PathBuf>,
    /// The proxy's `SO_MARK`, which its connections to the control plane
    /// carry so that its pod's interception rules let them through.
    pub mark: u32,
}

/// The identity of the control plane's serving certificate.
pub fn control_plane_identity(trust_domain: &str) -> SpiffeId {
    SpiffeId::control_plane(trust_domain).expect("valid identity")
}

/// What the sidecar holds: per type URL, name → (version, encoding).
type Held = BTreeMap<String, BTreeMap<String, (String, Vec<u8>)>>;

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("connect to {0}: {1}")]
    Connect(String, String),
    #[error("stream: {0}")]
    Stream(String),
    #[error("control plane closed the stream")]
    Closed,
}

/// Decodes everything held into one resource set.
fn assemble(held: &Held) -> Result<Resources, String> {
    fn decode<M: Message + Default>(t: &str, name: &str, b: &[u8]) -> Result<M, String> {
        M::decode(b).map_err(|e| format!("{t} {name}: undecodable: {e}"))
    }
    let mut r = Resources::default();
    for (t, items) in held {
        for (name, (_, b)) in items {
            match t.as_str() {
                type_url::MESH_CONFIG => r.mesh = Some(decode(t, name, b)?),
                type_url::SERVICE => r.services.push(decode(t, name, b)?),
                type_url::SERVICE_ENDPOINTS => r.endpoints.push(decode(t, name, b)?),
                type_url::SERVICE_ENTRY => r.service_entries.push(decode(t, name, b)?),
                type_url::ROUTE => r.routes.push(decode(t, name, b)?),
                type_url::TRAFFIC_POLICY => r.traffic_policies.push(decode(t, name, b)?),
                type_url::AUTHORIZATION_POLICY => {
                    r.authorization_policies.push(decode(t, name, b)?)
                }
                type_url::GATEWAY => r.gateways.push(decode(t, name, b)?),
                type_url::REQUEST_AUTHENTICATION => {
                    r.request_authentications.push(decode(t, name, b)?)
                }
                type_url::TRUST_BUNDLE => {
                    r.trust_bundle = Some(decode::<v1::TrustBundle>(t, name, b)?)
                }
                other => return Err(format!("unknown type {other}")),
            }
        }
    }
    Ok(r)
}

/// The on-disk form of the held state: the responses that would recreate it.
fn persist(dir: &std::path::Path, version: &str, held: &Held) {
    let mut buf = Vec::new();
    let head = DeltaDiscoveryResponse {
        system_version_info: version.to_string(),
        ..Default::default()
    };
    head.encode_length_delimited(&mut buf).expect("vec grows");
    for (t, items) in held {
        let resp = DeltaDiscoveryResponse {
            type_url: t.clone(),
            resources: items
                .iter()
                .map(|(n, (v, b))| bulwark_proto::xds::v1::Resource {
                    name: n.clone(),
                    version: v.clone(),
                    resource: b.clone(),
                })
                .collect(),
            ..Default::default()
        };
        resp.encode_length_delimited(&mut buf).expect("vec grows");
    }
    let path = dir.join("last-good-config.pb");
    let tmp = dir.join(".last-good-config.pb.tmp");
    let r = std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(&tmp, &buf))
        .and_then(|_| std::fs::rename(&tmp, &path));
    if let Err(e) = r {
        tracing::warn!(error = %e, path = %path.display(), "cannot persist the last good config");
    }
}

fn restore(dir: &std::path::Path) -> Option<(String, Held)> {
    let raw = std::fs::read(dir.join("last-good-config.pb")).ok()?;
    let mut buf = raw.as_slice();
    let head = DeltaDiscoveryResponse::decode_length_delimited(&mut buf).ok()?;
    let mut held = Held::new();
    while !buf.is_empty() {
        let resp = DeltaDiscoveryResponse::decode_length_delimited(&mut buf).ok()?;
        let items = held.entry(resp.type_url).or_default();
        for r in resp.resources {
            items.insert(r.name, (r.version, r.resource));
        }
    }
    Some((head.system_version_info, held))
}

/// Runs the client forever: restores the last good config if there is
/// one, waits for an SVID, then keeps a stream up to some replica.
pub async fn run(opts: XdsOptions, handle: ConfigHandle) {
    let mut held = Held::new();
    let mut version = String::new();
    if let Some(dir) = &opts.state_dir
        && let Some((v, h)) = restore(dir)
    {
        match assemble(&h)
            .map_err(|e| e.to_string())
            .and_then(|r| handle.apply_with(&v, r, true).map_err(|e| e.to_string()))
        {
            Ok(()) => {
                tracing::info!(version = %v, "serving the last good config from disk until the control plane answers");
                held = h;
                version = v;
            }
            Err(e) => tracing::warn!(error = %e, "the persisted config is unusable; ignoring it"),
        }
    }
    let identity = handle.identity().clone();
    while !identity.ready() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Capped at 5 s (6 s with jitter): well inside the control plane's
    // default endpoint grace (10 s), so a sidecar is back on a restarted
    // control plane before its endpoints could be withdrawn.
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut i = 0usize;
    loop {
        let addr = opts.addrs[i % opts.addrs.len()].clone();
        i += 1;
        let started = tokio::time::Instant::now();
        let r = stream_once(&addr, &opts, &handle, &mut held, &mut version).await;
        handle.metrics().xds_connected.set(0);
        if started.elapsed() > Duration::from_secs(10) {
            backoff.reset();
        }
        let wait = backoff.next_delay();
        match r {
            // The control plane ends a stream when the certificate it was
            // opened with expires: expected, once per certificate.
            Err(StreamError::Stream(s)) if s.contains("client certificate expired") => {
                tracing::info!(
                    addr,
                    retry_ms = wait.as_millis() as u64,
                    "discovery stream ended with its client certificate; reconnecting with the current one"
                )
            }
            Err(e) => {
                tracing::warn!(addr, error = %e, retry_ms = wait.as_millis() as u64, "control plane stream ended; keeping the last good config")
            }
            Ok(()) => {}
        }
        tokio::time::sleep(jitter(wait, 0.2)).await;
    }
}

async fn connect(
    addr: &str,
    mark: u32,
    handle: &ConfigHandle,
) -> Result<DiscoveryServiceClient<tonic::transport::Channel>, StreamError> {
    let identity = handle.identity();
    let expected = control_plane_identity(identity.identity().trust_domain());
    let verifier =
        SpiffeServerVerifier::new(identity.bundle(), ExpectedServer::AnyOf(vec![expected]));
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 is supported")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(identity.cert()));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let cfg = Arc::new(cfg);
    let target = addr.to_string();
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let cfg = cfg.clone();
        let target = target.clone();
        async move {
            let tcp = bulwark_ca::client::dial(target.as_str(), mark).await?;
            let peer = tcp.peer_addr()?;
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(ServerName::IpAddress(peer.ip().into()), tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    let channel = tonic::transport::Endpoint::from_static("http://bulwark-xds")
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect_with_connector(connector)
        .await
        .map_err(|e| StreamError::Connect(addr.to_string(), error_chain(&e)))?;
    Ok(DiscoveryServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

async fn stream_once(
    addr: &str,
    opts: &XdsOptions,
    handle: &ConfigHandle,
    held: &mut Held,
    version: &mut String,
) -> Result<(), StreamError> {
    let mut client = connect(addr, opts.mark, handle).await?;
    let mut health = handle.health();
    let mut node = opts.node.clone();
    node.unhealthy = *health.borrow_and_update();
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(64);
    // Subscribe to every type, telling the server what we already hold.
    for (n, t) in type_url::ALL.iter().enumerate() {
        let initial: HashMap<String, String> = held
            .get(*t)
            .map(|m| m.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let req = DeltaDiscoveryRequest {
            node: (n == 0).then(|| node.clone()),
            type_url: t.to_string(),
            resource_names_subscribe: vec!["*".into()],
            initial_resource_versions: initial,
            ..Default::default()
        };
        tx.send(req).await.expect("receiver alive");
    }
    let mut responses = client
        .delta_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| StreamError::Stream(format!("{}: {}", s.code(), s.message())))?
        .into_inner();
    handle.metrics().xds_connected.set(1);
    tracing::info!(addr, "connected to the control plane");
    loop {
        let resp = tokio::select! {
            msg = responses.message() => match msg {
                Ok(Some(r)) => r,
                Ok(None) => return Err(StreamError::Closed),
                Err(s) => return Err(StreamError::Stream(format!("{}: {}", s.code(), s.message()))),
            },
            changed = health.changed() => {
                if changed.is_err() {
                    return Err(StreamError::Closed);
                }
                // Report the local app's health verdict on the stream.
                node.unhealthy = *health.borrow_and_update();
                let report = DeltaDiscoveryRequest { node: Some(node.clone()), ..Default::default() };
                if tx.send(report).await.is_err() {
                    return Err(StreamError::Closed);
                }
                continue;
            }
        };
        // A large change comes in several responses: apply what has already
        // arrived in one go (one rebuild of the config, not one per part).
        let mut batch = vec![resp];
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout(Duration::ZERO, responses.message()).await {
                Ok(Ok(Some(r))) => batch.push(r),
                _ => break,
            }
        }
        for ack in on_responses(batch, handle, held, version, opts) {
            if tx.send(ack).await.is_err() {
                return Err(StreamError::Closed);
            }
        }
    }
}

/// Most responses applied together.
const MAX_BATCH: usize = 256;

/// Applies responses in order (the whole resulting set, atomically) and
/// returns the ACK, or NACK, of each.
fn on_responses(
    batch: Vec<DeltaDiscoveryResponse>,
    handle: &ConfigHandle,
    held: &mut Held,
    version: &mut String,
    opts: &XdsOptions,
) -> Vec<DeltaDiscoveryRequest> {
    let mut candidate = held.clone();
    let mut unchanged = true;
    for resp in &batch {
        let items = candidate.entry(resp.type_url.clone()).or_default();
        for name in &resp.removed_resources {
            items.remove(name);
        }
        for r in &resp.resources {
            items.insert(r.name.clone(), (r.version.clone(), r.resource.clone()));
        }
        unchanged &= resp.resources.is_empty() && resp.removed_resources.is_empty();
    }
    let last_version = batch
        .last()
        .map(|r| r.system_version_info.clone())
        .unwrap_or_default();
    let applied = if unchanged && handle.current().is_some_and(|c| !c.stale) {
        Ok(())
    } else {
        assemble(&candidate).and_then(|r| handle.apply(&last_version, r).map_err(|e| e.to_string()))
    };
    let error = match applied {
        Ok(()) => {
            *held = candidate;
            *version = last_version;
            if let Some(dir) = &opts.state_dir
                && !unchanged
            {
                persist(dir, version, held);
            }
            None
        }
        Err(message) => {
            handle.metrics().xds_nacks.inc();
            tracing::warn!(version = %last_version, responses = batch.len(), error = %message,
                "config update rejected (NACK); keeping the last good config");
            Some(ErrorDetail {
                code: tonic::Code::InvalidArgument as i32,
                message,
            })
        }
    };
    batch
        .into_iter()
        .map(|resp| {
            tracing::debug!(type_url = %resp.type_url, version = %resp.system_version_info,
                changed = resp.resources.len(), removed = resp.removed_resources.len(),
                ack = error.is_none(), "response handled");
            DeltaDiscoveryRequest {
                type_url: resp.type_url,
                response_nonce: resp.nonce,
                error_detail: error.clone(),
                ..Default::default()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persisted_state_round_trips() {
        let dir = std::env::temp_dir().join(format!("bulwark-xds-client-{}", std::process::id()));
        let mut held = Held::new();
        let svc = v1::Service {
            name: "api".into(),
            namespace: "default".into(),
            ..Default::default()
        };
        held.entry(type_url::SERVICE.to_string())
            .or_default()
            .insert("default/api".into(), ("v1".into(), svc.encode_to_vec()));
        persist(&dir, "sys-1", &held);
        let (v, back) = restore(&dir).unwrap();
        assert_eq!(v, "sys-1");
        assert_eq!(back, held);
        assert_eq!(assemble(&back).unwrap().services, vec![svc]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
