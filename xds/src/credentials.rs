//! The control plane's TLS material, from the CA directory, which it only
//! reads: the trust bundle client certificates must chain to (also served
//! to sidecars as the TrustBundle resource), and a serving certificate for
//! `spiffe://<td>/ns/bulwark-system/sa/bulwark-xds`, issued in memory from
//! the CA's intermediate and renewed at half its life. The directory is
//! polled so that a root rotation reaches the verifier and the sidecars.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bulwark_ca::SpiffeId;
use bulwark_ca::authority::Authority;
use bulwark_ca::store::{self, StoreError};
use bulwark_ca::tls::{SpiffeClientVerifier, TrustBundle, provider};
use rustls::server::ResolvesServerCert;
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

/// How often the CA directory is checked for changes.
pub const DEFAULT_CA_POLL: Duration = Duration::from_secs(2);

/// The identity in the control plane's serving certificate; sidecars
/// expect exactly this.
pub fn xds_identity(trust_domain: &str) -> SpiffeId {
    SpiffeId::control_plane(trust_domain).expect("valid xDS identity")
}

/// Why the CA directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {what}")]
    Bundle { path: PathBuf, what: String },
    #[error("cannot issue the control plane's serving certificate: {0}")]
    Serving(String),
}

/// Files whose change means the directory must be read again.
const WATCHED: [&str; 4] = [
    store::SETTINGS_FILE,
    store::INTERMEDIATE_CERT,
    store::INTERMEDIATE_KEY,
    store::BUNDLE,
];

type Stamp = Vec<Option<(SystemTime, u64, u64)>>;

fn stamp(dir: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    WATCHED
        .iter()
        .map(|f| {
            std::fs::metadata(dir.join(f))
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len(), m.ino())))
        })
        .collect()
}

struct Signer {
    authority: Authority,
    renew_at: SystemTime,
    stamp: Stamp,
}

/// See the module docs.
pub(crate) struct Credentials {
    dir: PathBuf,
    dns_names: Vec<String>,
    trust_domain: String,
    bundle: Arc<ArcSwap<TrustBundle>>,
    roots_pem: ArcSwap<Vec<String>>,
    serving: ArcSwap<CertifiedKey>,
    signer: Mutex<Signer>,
    /// Bumped when the roots change.
    revision: watch::Sender<u64>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

struct Material {
    authority: Authority,
    bundle: TrustBundle,
    roots_pem: Vec<String>,
}

fn read(dir: &Path) -> Result<Material, CredentialsError> {
    let m = store::load(dir)?;
    let bad = |what: String| CredentialsError::Bundle {
        path: dir.join(store::BUNDLE),
        what,
    };
    let bundle = TrustBundle::from_pem(&m.bundle_pem).map_err(|e| bad(e.to_string()))?;
    let roots_pem = split_pem(&m.bundle_pem);
    if roots_pem.len() != bundle.roots().len() {
        return Err(bad(
            "cannot split the bundle into one PEM block per root".into()
        ));
    }
    Ok(Material {
        authority: Authority::from_material(m)?,
        bundle,
        roots_pem,
    })
}

impl Credentials {
    /// Reads the CA directory and issues the serving certificate.
    pub fn load(dir: &Path, extra_dns_names: &[String]) -> Result<Arc<Self>, CredentialsError> {
        let st = stamp(dir);
        let m = read(dir)?;
        let mut dns_names = vec![
            "bulwark-xds".to_string(),
            "bulwark-xds.bulwark-system.svc".to_string(),
        ];
        dns_names.extend(extra_dns_names.iter().cloned());
        let trust_domain = m.authority.trust_domain().to_string();
        let (serving, renew_at) = m
            .authority
            .serving_certificate(&xds_identity(&trust_domain), &dns_names)
            .map_err(CredentialsError::Serving)?;
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            dns_names,
            trust_domain,
            bundle: Arc::new(ArcSwap::from_pointee(m.bundle)),
            roots_pem: ArcSwap::from_pointee(m.roots_pem),
            serving: ArcSwap::new(serving),
            signer: Mutex::new(Signer {
                authority: m.authority,
                renew_at,
                stamp: st,
            }),
            revision: watch::Sender::new(0),
        }))
    }

    /// One PEM certificate per trusted root.
    pub fn roots_pem(&self) -> Arc<Vec<String>> {
        self.roots_pem.load_full()
    }

    /// Changes whenever the roots change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    /// The rustls configuration of the discovery port: TLS 1.3, a client
    /// certificate chained to the live trust bundle required, HTTP/2.
    pub fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, rustls::Error> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(
                self.bundle.clone(),
                true,
            )))
            .with_cert_resolver(Arc::new(ServingCert(self.clone())));
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        // The stream's identity is read from the client certificate.
        bulwark_ca::tls::without_resumption_server(&mut cfg);
        Ok(cfg)
    }

    /// The trust domain of the CA directory.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The rustls configuration of the injection webhook: the same serving
    /// certificate, HTTP/1.1, no client certificate (the API server
    /// authenticates the webhook, not the other way round).
    pub fn webhook_server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, rustls::Error> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(ServingCert(self.clone())));
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(cfg)
    }

    /// Re-reads the directory if it changed, and renews the serving
    /// certificate when due. Blocking (file I/O, key generation). A broken
    /// directory is logged and the current material kept.
    pub fn refresh(&self) {
        let mut signer = lock(&self.signer);
        let now_stamp = stamp(&self.dir);
        if now_stamp != signer.stamp {
            match read(&self.dir) {
                Ok(m) => {
                    signer.stamp = now_stamp;
                    if m.authority.trust_domain() != self.trust_domain {
                        tracing::error!(
                            dir = %self.dir.display(),
                            now = m.authority.trust_domain(),
                            serving = %self.trust_domain,
                            "the CA's trust domain changed; restart the control plane to serve it"
                        );
                        return;
                    }
                    signer.authority = m.authority;
                    // Issue from the (possibly new) intermediate right away.
                    signer.renew_at = SystemTime::UNIX_EPOCH;
                    if *self.roots_pem.load_full() != m.roots_pem {
                        tracing::info!(roots = m.roots_pem.len(), "trust bundle changed");
                        self.bundle.store(Arc::new(m.bundle));
                        self.roots_pem.store(Arc::new(m.roots_pem));
                        self.revision.send_modify(|r| *r += 1);
                    }
                }
                Err(e) => {
                    // Likely caught mid-rotation; the next poll retries.
                    tracing::warn!(dir = %self.dir.display(), error = %e, "cannot reload the CA directory; keeping the current trust bundle");
                }
            }
        }
        if SystemTime::now() >= signer.renew_at {
            match signer
                .authority
                .serving_certificate(&xds_identity(&self.trust_domain), &self.dns_names)
            {
                Ok((ck, renew_at)) => {
                    self.serving.store(ck);
                    signer.renew_at = renew_at;
                    tracing::info!("serving certificate renewed");
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot renew the serving certificate; retrying")
                }
            }
        }
    }

    /// Polls the directory forever (until the task is dropped).
    pub async fn run(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.refresh()).await;
        }
    }
}

#[derive(Debug)]
struct ServingCert(Arc<Credentials>);

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.serving.load_full())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Splits PEM text into its certificate blocks, each normalised to end
/// with one newline. Text outside the blocks (comments) is dropped.
pub fn split_pem(pem: &str) -> Vec<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else {
            break;
        };
        let end = start + len + END.len();
        out.push(format!("{}\n", rest[start..end].trim()));
        rest = &rest[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_pem_gives_one_block_per_certificate() {
        let pem = "# roots\n-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n\n-----BEGIN CERTIFICATE-----\r\nBBBB\r\n-----END CERTIFICATE-----";
        assert_eq!(
            split_pem(pem),
            [
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                "-----BEGIN CERTIFICATE-----\r\nBBBB\r\n-----END CERTIFICATE-----\n",
            ]
        );
    }

    #[test]
    fn serving_certificate_carries_the_xds_identity() {
        let dir = tempfile::tempdir().unwrap();
        store::init(
            dir.path(),
            &store::Settings::new("cluster.local"),
            store::RootSource::Generate,
        )
        .unwrap();
        let c = Credentials::load(dir.path(), &[]).unwrap();
        let leaf = &c.serving.load().cert[0];
        assert_eq!(
            bulwark_ca::tls::spiffe_id_of(leaf).unwrap(),
            xds_identity("cluster.local")
        );
        assert_eq!(c.roots_pem().len(), 1);
    }

    #[test]
    fn discovery_handshakes_are_never_resumed() {
        use bulwark_ca::client::{Svid, new_csr};
        use bulwark_ca::tls::{CurrentCert, ExpectedServer, SpiffeServerVerifier};

        let dir = tempfile::tempdir().unwrap();
        store::init(
            dir.path(),
            &store::Settings::new("cluster.local"),
            store::RootSource::Generate,
        )
        .unwrap();
        let creds = Credentials::load(dir.path(), &[]).unwrap();
        let server = Arc::new(creds.server_config().unwrap());

        // A sidecar's SVID, and a client that keeps its sessions.
        let ca = Authority::from_material(store::load(dir.path()).unwrap()).unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        let (key, csr) = new_csr(&id).unwrap();
        let issued = ca
            .sign(
                bulwark_ca::authority::check_csr(&csr).unwrap(),
                &id,
                Some(Duration::from_secs(600)),
                time::OffsetDateTime::now_utc(),
            )
            .unwrap();
        let svid =
            Svid::from_pem_parts(&key.serialize_pem(), &issued.chain_pem, &issued.bundle_pem)
                .unwrap();
        let verifier = SpiffeServerVerifier::new(
            Arc::new(ArcSwap::from_pointee(svid.bundle.clone())),
            ExpectedServer::AnyOf(vec![xds_identity("cluster.local")]),
        );
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(CurrentCert::new(svid.certified_key().unwrap())));
        let client = Arc::new(client);

        for _ in 0..2 {
            let name = rustls_pki_types::ServerName::try_from("bulwark-xds").unwrap();
            // A resumed session would give the stream the identity of the
            // certificate shown the first time, unverified.
            assert_eq!(
                bulwark_ca::testing::handshake(&client, &server, name),
                Some(rustls::HandshakeKind::Full)
            );
        }
    }
}
