use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use bulwark_ca::SpiffeId;
use bulwark_ca::client::{Backoff, CaClient, Credential, Svid, jitter};
use bulwark_ca::tls::{CurrentCert, TrustBundle};

use crate::telemetry::Metrics;

#[derive(Debug, Clone)]
pub struct IdentityOptions {
    pub identity: SpiffeId,
    /// CA address, `host:port`.
    pub ca_addr: String,
    /// Roots the CA's certificate chains to, before the first SVID arrives.
    pub ca_bundle: TrustBundle,
    /// Bootstrap token for the first SVID (and a fallback if the SVID expired).
    pub token: String,
    /// Lifetime to ask for; None = the CA's default.
    pub ttl: Option<Duration>,
    /// Renew when this fraction of the remaining lifetime has passed
    /// (stretched by up to 20% of itself at random), e.g. 0.5.
    pub renew_fraction: f64,
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
    metrics: Arc<Metrics>,
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl CertManager {
    pub fn new(opts: IdentityOptions, metrics: Arc<Metrics>) -> Arc<Self> {
        let client = CaClient::new(opts.ca_addr.clone(), opts.ca_bundle.clone());
        Arc::new(Self {
            bundle: Arc::new(ArcSwap::from_pointee(opts.ca_bundle.clone())),
            client,
            cert: CurrentCert::default(),
            svid: ArcSwapOption::empty(),
            metrics,
            opts,
        })
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
        self.svid.store(Some(Arc::new(svid)));
        Ok(())
    }

    async fn fetch(&self) -> Result<Svid, bulwark_ca::client::ClientError> {
        let current = self.svid();
        let cred = match current.as_deref() {
            Some(s) if s.not_after > now_unix() => {
                Credential::Svid(s, Some(self.opts.token.as_str()))
            }
            _ => Credential::Token(self.opts.token.as_str()),
        };
        self.client
            .issue(&self.opts.identity, cred, self.opts.ttl)
            .await
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
                        self.metrics
                            .renewals
                            .get_or_create(&crate::telemetry::ResultLabel { result: "ok" })
                            .inc();
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
            // Retry quickly enough to beat expiry: never wait more than a
            // tenth of what is left.
            let remaining = self
                .svid()
                .map(|s| (s.not_after - now_unix()).max(1))
                .unwrap_or(10) as f64;
            let wait = backoff
                .next_delay()
                .min(Duration::from_secs_f64((remaining / 10.0).max(0.2)));
            tokio::time::sleep(wait).await;
        }
    }
}
