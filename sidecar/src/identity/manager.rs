use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use bulwark_ca::SpiffeId;
use bulwark_ca::client::{Backoff, CaClient, ClientError, Credential, Svid, jitter};
use bulwark_ca::tls::{CurrentCert, TrustBundle};

use crate::telemetry::Metrics;

#[derive(Debug, Clone)]
pub struct IdentityOptions {
    pub identity: SpiffeId,
    /// CA address, `host:port`.
    pub ca_addr: String,
    /// Roots the CA's certificate chains to, before the first SVID arrives.
    pub ca_bundle: TrustBundle,
    /// File holding the bootstrap token for the first SVID (and a fallback
    /// if the SVID expired). Read on every use: Kubernetes replaces
    /// projected ServiceAccount tokens on disk before they expire.
    pub token_file: PathBuf,
    /// Lifetime to ask for; None = the CA's default.
    pub ttl: Option<Duration>,
    /// Renew when this fraction of the remaining lifetime has passed
    /// (stretched by up to 20% of itself at random), e.g. 0.5.
    pub renew_fraction: f64,
}

/// Why no SVID was fetched.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("cannot read the token file {}: {source}", path.display())]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Ca(#[from] ClientError),
}

/// Owns the SVID: gets the first one, renews it before expiry, and swaps
/// certificate and trust bundle atomically. New handshakes use the new
/// certificate; established connections are untouched.
pub struct CertManager {
    opts: IdentityOptions,
    client: CaClient,
    cert: CurrentCert,
    bundle: Arc<ArcSwap<TrustBundle>>,
    svid: ArcSwapOption<Svid>,
    /// SVIDs installed so far: mesh connections made with an earlier one
    /// are retired (see `renewals`). Read per pooled request, so an atomic
    /// rather than the watch's lock.
    generation: std::sync::atomic::AtomicU64,
    installed: tokio::sync::watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl CertManager {
    /// `mark`: the proxy's `SO_MARK`, which its connections to the CA carry.
    pub fn new(opts: IdentityOptions, mark: u32, metrics: Arc<Metrics>) -> Arc<Self> {
        let mut client = CaClient::new(opts.ca_addr.clone(), opts.ca_bundle.clone());
        client.socket_mark = mark;
        Arc::new(Self {
            bundle: Arc::new(ArcSwap::from_pointee(opts.ca_bundle.clone())),
            client,
            cert: CurrentCert::default(),
            svid: ArcSwapOption::empty(),
            generation: std::sync::atomic::AtomicU64::new(0),
            installed: tokio::sync::watch::Sender::new(0),
            metrics,
            opts,
        })
    }

    /// How many SVIDs have been installed: a connection made under an
    /// earlier count was authenticated with a certificate since replaced.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Changes with every SVID installed: an inbound mesh connection then
    /// asks its peer to reconnect (GOAWAY), so that long before either
    /// certificate of its handshake expires, in-flight requests finish on
    /// it and new ones use the current certificates.
    pub fn renewals(&self) -> tokio::sync::watch::Receiver<u64> {
        self.installed.subscribe()
    }

    pub fn identity(&self) -> &SpiffeId {
        &self.opts.identity
    }
    /// The certificate resolver for TLS configs (client and server).
    pub fn cert(&self) -> CurrentCert {
        self.cert.clone()
    }
    /// The live trust bundle for verifiers.
    pub fn bundle(&self) -> Arc<ArcSwap<TrustBundle>> {
        self.bundle.clone()
    }
    pub fn svid(&self) -> Option<Arc<Svid>> {
        self.svid.load_full()
    }
    /// A valid SVID is loaded.
    pub fn ready(&self) -> bool {
        self.svid().is_some_and(|s| s.not_after > now_unix())
    }

    /// Replaces the trust bundle (pushed by the control plane): peers with
    /// certificates from a new root verify before our own renewal.
    pub fn set_bundle(&self, bundle: TrustBundle) {
        let current = self.bundle.load();
        if current.roots() != bundle.roots() {
            tracing::info!(roots = bundle.roots().len(), "trust bundle updated");
            self.client.set_bundle(bundle.clone());
            self.bundle.store(Arc::new(bundle));
        }
    }

    pub(crate) fn install(&self, svid: Svid) -> Result<(), rustls::Error> {
        let ck = svid.certified_key()?;
        // Bundle first: a peer with a new-root certificate must verify as
        // soon as we can present ours.
        self.bundle.store(Arc::new(svid.bundle.clone()));
        self.cert.set(ck);
        self.metrics.cert_expiry.set(svid.not_after);
        self.metrics.cert_issued.set(now_unix());
        tracing::info!(identity = %svid.identity, serial = %svid.serial, not_after = svid.not_after, roots = svid.bundle.roots().len(), "SVID installed");
        // Counted before it is published (readiness follows the SVID), so
        // whoever sees the new SVID finds it counted.
        self.metrics
            .renewals
            .get_or_create(&crate::telemetry::ResultLabel { result: "ok" })
            .inc();
        self.svid.store(Some(Arc::new(svid)));
        let n = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
            + 1;
        self.installed.send_replace(n);
        Ok(())
    }

    async fn fetch(&self) -> Result<Svid, FetchError> {
        let current = self.svid();
        let token = tokio::fs::read_to_string(&self.opts.token_file)
            .await
            .map(|t| t.trim().to_string())
            .map_err(|source| FetchError::TokenFile {
                path: self.opts.token_file.clone(),
                source,
            });
        let cred = match (current.as_deref(), &token) {
            // A renewal needs the token only as a fallback.
            (Some(s), _) if s.not_after > now_unix() => Credential::Svid(s, token.as_deref().ok()),
            (_, Ok(t)) => Credential::Token(t),
            (_, Err(_)) => return Err(token.unwrap_err()),
        };
        Ok(self
            .client
            .issue(&self.opts.identity, cred, self.opts.ttl)
            .await?)
    }

    /// Gets the first SVID, then renews forever. Run as a task.
    pub async fn run(self: Arc<Self>) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            match self.fetch().await {
                Ok(svid) => {
                    let remaining = (svid.not_after - now_unix()).max(0) as f64;
                    if let Err(e) = self.install(svid) {
                        tracing::error!(error = %e, "issued SVID is unusable");
                    } else {
                        backoff.reset();
                        // Renew after a jittered fraction of the remaining
                        // life (computed from now: notBefore is backdated).
                        let f = self.opts.renew_fraction.clamp(0.1, 0.9);
                        let wait = jitter(Duration::from_secs_f64(remaining * f), 0.2)
                            .min(Duration::from_secs_f64(remaining * 0.9));
                        tracing::debug!(
                            renew_in_ms = wait.as_millis() as u64,
                            "next renewal scheduled"
                        );
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                }
                Err(e) => {
                    self.metrics
                        .renewals
                        .get_or_create(&crate::telemetry::ResultLabel { result: "error" })
                        .inc();
                    let remaining = self.svid().map(|s| s.not_after - now_unix()).unwrap_or(0);
                    tracing::warn!(error = %e, remaining_secs = remaining, "cannot get an SVID from the CA; will retry");
                }
            }
            let remaining = self.svid().map(|s| s.not_after - now_unix());
            tokio::time::sleep(retry_delay(backoff.next_delay(), remaining)).await;
        }
    }
}

/// How long to wait before asking the CA again, given the backoff's delay
/// and the seconds the current SVID has left. While it is valid, retry
/// quickly enough to beat its expiry: never wait more than a tenth of what
/// is left. Without a valid SVID there is nothing to beat: `CaClient::issue`
/// has already retried a busy or unreachable CA for a minute, and what is
/// left (a refused token, a long outage) asking every second would not fix.
/// The backoff then spares the CA, a fleet's worth of sidecars at once.
fn retry_delay(backoff: Duration, remaining_secs: Option<i64>) -> Duration {
    match remaining_secs {
        Some(r) if r > 0 => backoff.min(Duration::from_secs_f64((r as f64 / 10.0).max(0.2))),
        _ => backoff,
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use bulwark_ca::authority::Authority;
    use bulwark_ca::server::{ServeOptions, serve};
    use bulwark_ca::store;

    use super::*;

    #[tokio::test]
    async fn a_token_file_replaced_on_disk_is_used_by_the_next_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        store::init(
            &ca_dir,
            &store::Settings::new("cluster.local"),
            store::RootSource::Generate,
        )
        .unwrap();
        let material = store::load(&ca_dir).unwrap();
        let ca_bundle = TrustBundle::from_pem(&material.bundle_pem).unwrap();
        let authority = Authority::from_material(material).unwrap();
        // A free port for the CA; the client retries until it listens.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        tokio::spawn(serve(
            ServeOptions::new(ca_dir, addr),
            std::future::pending(),
        ));
        let identity: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "expired-token").unwrap();
        let manager = CertManager::new(
            IdentityOptions {
                identity: identity.clone(),
                ca_addr: addr.to_string(),
                ca_bundle,
                token_file: token_file.clone(),
                ttl: None,
                renew_fraction: 0.5,
            },
            0,
            Arc::new(Metrics::default()),
        );
        let refused = manager.fetch().await.unwrap_err();
        assert!(
            matches!(&refused, FetchError::Ca(ClientError::Refused { code, .. }) if *code == tonic::Code::Unauthenticated),
            "{refused}"
        );

        // The kubelet writes the new token beside the old one and swaps.
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let fresh = dir.path().join("token.new");
        std::fs::write(&fresh, authority.token_key().mint(&identity, now, 600)).unwrap();
        std::fs::rename(&fresh, &token_file).unwrap();
        let svid = manager.fetch().await.expect("the new token is used");
        assert_eq!(svid.identity, identity);
    }

    #[test]
    fn without_a_valid_svid_retries_back_off_instead_of_racing_the_expiry() {
        let base = Duration::from_millis(200);
        let max = Duration::from_secs(10);
        // Expired, and never had one.
        for remaining in [Some(-30), None] {
            let mut backoff = Backoff::new(base, max);
            let delays: Vec<Duration> = (0..10)
                .map(|_| retry_delay(backoff.next_delay(), remaining))
                .collect();
            assert!(
                delays[0] >= base / 2 && delays[0] <= base,
                "{remaining:?}: {delays:?}"
            );
            assert!(
                delays[9] >= max / 2,
                "{remaining:?}: reaches the backoff's maximum: {delays:?}"
            );
        }

        // While valid: never more than a tenth of what is left.
        let mut backoff = Backoff::new(base, max);
        for _ in 0..10 {
            assert!(retry_delay(backoff.next_delay(), Some(20)) <= Duration::from_secs(2));
        }
        assert_eq!(
            retry_delay(Duration::from_secs(5), Some(1)),
            Duration::from_millis(200)
        );
    }
}
