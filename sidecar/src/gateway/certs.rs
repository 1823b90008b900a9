//! Public server certificates of a gateway listener: chosen by SNI, and
//! re-read from their PEM files when these change, so a renewal (cert-manager
//! rewriting a mounted Secret, say) needs no restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use bulwark_proto::config::v1;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("certificate {cert} and key {key} do not belong together or cannot be used: {message}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error(
        "private key {path} is open to other users (mode {mode:04o}): `chmod 600` it \
         (group read, as a Kubernetes Secret with defaultMode 0440 gives, is allowed)"
    )]
    KeyMode { path: PathBuf, mode: u32 },
    #[error("listener has no certificate")]
    Empty,
    #[error("client CA {path}: {message}")]
    ClientCa { path: PathBuf, message: String },
}

/// What a file looked like when last read: a change of either triggers a reload.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(p: &Path) -> Stamp {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

struct Source {
    hostnames: Vec<String>,
    cert_file: PathBuf,
    key_file: PathBuf,
    stamps: Mutex<(Stamp, Stamp)>,
}

/// The certificates of one listener.
pub struct CertSet {
    sources: Vec<Source>,
    keys: ArcSwap<Vec<Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for CertSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertSet")
            .field("certificates", &self.sources.len())
            .finish()
    }
}

/// A private key anyone on the host can read, or any group member can
/// rewrite, is refused: whoever holds it can impersonate the edge. Group
/// read stays allowed for Secrets mounted with an `fsGroup`.
fn check_key_mode(key: &Path) -> Result<(), CertError> {
    use std::os::unix::fs::PermissionsExt;
    // Follows symlinks: a mounted Secret's files are links into `..data`.
    let mode = std::fs::metadata(key)
        .map_err(|e| CertError::File {
            path: key.to_path_buf(),
            message: e.to_string(),
        })?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o027 != 0 {
        return Err(CertError::KeyMode {
            path: key.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

fn load_pair(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, CertError> {
    let file_err = |path: &Path, e: &dyn std::fmt::Display| CertError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_err(cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(cert, &e))?;
    if chain.is_empty() {
        return Err(file_err(cert, &"no CERTIFICATE block"));
    }
    check_key_mode(key)?;
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, &e))?;
    let provider = bulwark_ca::tls::provider();
    CertifiedKey::from_der(chain, private, &provider)
        .map(Arc::new)
        .map_err(|e| CertError::Pair {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            message: e.to_string(),
        })
}

impl CertSet {
    /// Loads every certificate; all must load (a listener does not start
    /// with a broken certificate).
    pub fn load(certs: &[v1::GatewayCertificate]) -> Result<Arc<Self>, CertError> {
        if certs.is_empty() {
            return Err(CertError::Empty);
        }
        let mut sources = Vec::new();
        let mut keys = Vec::new();
        for c in certs {
            let (cert_file, key_file) = (PathBuf::from(&c.cert_file), PathBuf::from(&c.key_file));
            let stamps = (stamp(&cert_file), stamp(&key_file));
            keys.push(load_pair(&cert_file, &key_file)?);
            sources.push(Source {
                hostnames: c.hostnames.iter().map(|h| h.to_ascii_lowercase()).collect(),
                cert_file,
                key_file,
                stamps: Mutex::new(stamps),
            });
        }
        Ok(Arc::new(Self {
            sources,
            keys: ArcSwap::from_pointee(keys),
        }))
    }

    /// Re-reads the certificates whose files changed. A pair that fails to
    /// load keeps serving the previous one (and is retried on the next
    /// change). Returns how many were replaced.
    pub fn reload(&self) -> usize {
        let mut keys = (**self.keys.load()).clone();
        let mut replaced = 0;
        for (i, s) in self.sources.iter().enumerate() {
            let now = (stamp(&s.cert_file), stamp(&s.key_file));
            let mut seen = s.stamps.lock().expect("stamps lock");
            if *seen == now {
                continue;
            }
            *seen = now;
            match load_pair(&s.cert_file, &s.key_file) {
                Ok(k) => {
                    keys[i] = k;
                    replaced += 1;
                    tracing::info!(cert = %s.cert_file.display(), "gateway certificate reloaded");
                }
                // A writer may be half-way (key written, cert not yet): the
                // next change of either file triggers another attempt.
                Err(e) => {
                    tracing::warn!(error = %e, "gateway certificate not reloaded; serving the previous one")
                }
            }
        }
        if replaced > 0 {
            self.keys.store(Arc::new(keys));
        }
        replaced
    }

    fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let keys = self.keys.load();
        if let Some(name) = sni.map(str::to_ascii_lowercase) {
            let found = self
                .sources
                .iter()
                .position(|s| s.hostnames.iter().any(|h| host_matches(h, &name)));
            if let Some(i) = found {
                return keys.get(i).cloned();
            }
        }
        keys.first().cloned()
    }
}

/// `pattern` is a host name or `*.` plus a domain, where `*` stands for
/// exactly one label.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(domain) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(domain)),
        None => pattern.eq_ignore_ascii_case(host),
    }
}

impl ResolvesServerCert for CertSet {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}

/// The TLS settings of a public listener: TLS 1.2 and 1.3 (outside callers
/// are not all modern), HTTP/2 and HTTP/1.1 by ALPN, and client
/// certificates verified against `client_ca_file` when set.
pub fn server_config(
    certs: Arc<CertSet>,
    listener: &v1::GatewayListener,
) -> Result<Arc<rustls::ServerConfig>, CertError> {
    let provider = bulwark_ca::tls::provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the provider supports TLS 1.2 and 1.3");
    let verifies_clients = !listener.client_ca_file.is_empty();
    let builder = if !verifies_clients {
        builder.with_no_client_auth()
    } else {
        let path = PathBuf::from(&listener.client_ca_file);
        let ca_err = |message: String| CertError::ClientCa {
            path: path.clone(),
            message,
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&path).map_err(|e| ca_err(e.to_string()))? {
            roots
                .add(c.map_err(|e| ca_err(e.to_string()))?)
                .map_err(|e| ca_err(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(ca_err("no CERTIFICATE block".into()));
        }
        let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        let v = if listener.require_client_cert {
            v
        } else {
            v.allow_unauthenticated()
        };
        builder.with_client_cert_verifier(v.build().map_err(|e| ca_err(e.to_string()))?)
    };
    let mut cfg = builder.with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if verifies_clients {
        // Admission rests on the client certificate's verification.
        bulwark_ca::tls::without_resumption_server(&mut cfg);
    }
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str, host: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![host.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        set_mode(&k, 0o600);
        (c, k)
    }

    fn set_mode(p: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn spec(hosts: &[&str], c: &Path, k: &Path) -> v1::GatewayCertificate {
        v1::GatewayCertificate {
            hostnames: hosts.iter().map(|h| h.to_string()).collect(),
            cert_file: c.display().to_string(),
            key_file: k.display().to_string(),
        }
    }

    /// Whether `k` serves the certificate in file `cert`.
    fn serves(k: &CertifiedKey, cert: &Path) -> bool {
        k.cert[0] == CertificateDer::from_pem_file(cert).unwrap()
    }

    #[test]
    fn wildcards_match_exactly_one_label() {
        assert!(host_matches("*.example.com", "api.example.com"));
        assert!(host_matches("*.example.com", "API.Example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("*.example.com", "a.b.example.com"));
        assert!(host_matches("api.example.com", "api.example.com"));
        assert!(!host_matches("api.example.com", "web.example.com"));
    }

    #[test]
    fn sni_picks_the_certificate_and_unknown_names_get_the_first() {
        bulwark_ca::tls::provider();
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1) = write_pair(dir.path(), "a", "api.example.com");
        let (c2, k2) = write_pair(dir.path(), "b", "shop.example.org");
        let set = CertSet::load(&[
            spec(&["api.example.com"], &c1, &k1),
            spec(&["*.example.org"], &c2, &k2),
        ])
        .unwrap();
        assert!(serves(&set.pick(Some("shop.example.org")).unwrap(), &c2));
        assert!(serves(&set.pick(Some("api.example.com")).unwrap(), &c1));
        assert!(serves(&set.pick(Some("other.test")).unwrap(), &c1));
        assert!(serves(&set.pick(None).unwrap(), &c1));
    }

    #[test]
    fn changed_files_are_reloaded_and_a_broken_pair_keeps_the_old_one() {
        bulwark_ca::tls::provider();
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = write_pair(dir.path(), "a", "old.example.com");
        let old = CertificateDer::from_pem_file(&c).unwrap();
        let set = CertSet::load(&[spec(&[], &c, &k)]).unwrap();
        assert_eq!(set.reload(), 0, "nothing changed");

        // A cert that does not match the key: refused, old one kept.
        let other = rcgen::KeyPair::generate().unwrap();
        let mismatched = rcgen::CertificateParams::new(vec!["bad.example.com".into()])
            .unwrap()
            .self_signed(&other)
            .unwrap();
        std::fs::write(&c, format!("{}\n", mismatched.pem())).unwrap();
        assert_eq!(set.reload(), 0);
        assert_eq!(set.pick(None).unwrap().cert[0], old);

        // A proper renewal is picked up.
        let (c2, k2) = write_pair(dir.path(), "new", "new.example.com");
        std::fs::rename(&c2, &c).unwrap();
        std::fs::rename(&k2, &k).unwrap();
        assert_eq!(set.reload(), 1);
        assert!(serves(&set.pick(None).unwrap(), &c));
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.crt");
        let err = CertSet::load(&[spec(&[], &missing, &missing)]).unwrap_err();
        assert!(err.to_string().contains("nope.crt"), "{err}");
        assert!(matches!(CertSet::load(&[]), Err(CertError::Empty)));
    }

    #[test]
    fn a_key_open_to_other_users_is_refused_and_group_read_is_allowed() {
        bulwark_ca::tls::provider();
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = write_pair(dir.path(), "a", "api.example.com");
        for bad in [0o644, 0o604, 0o660] {
            set_mode(&k, bad);
            let err = CertSet::load(&[spec(&[], &c, &k)]).unwrap_err();
            assert!(
                matches!(err, CertError::KeyMode { mode, .. } if mode == bad),
                "{bad:o}: {err}"
            );
            assert!(err.to_string().contains("a.key"), "{err}");
        }
        for good in [0o600, 0o400, 0o440, 0o640] {
            set_mode(&k, good);
            CertSet::load(&[spec(&[], &c, &k)]).unwrap();
        }
        // A renewal that lands world-readable is refused; the old pair stays.
        set_mode(&k, 0o600);
        let set = CertSet::load(&[spec(&[], &c, &k)]).unwrap();
        let old = set.pick(None).unwrap().cert[0].clone();
        let (c2, k2) = write_pair(dir.path(), "new", "new.example.com");
        set_mode(&k2, 0o644);
        std::fs::rename(&c2, &c).unwrap();
        std::fs::rename(&k2, &k).unwrap();
        assert_eq!(set.reload(), 0);
        assert_eq!(set.pick(None).unwrap().cert[0], old);
    }

    #[test]
    fn a_listener_that_verifies_client_certificates_never_resumes() {
        bulwark_ca::tls::provider();
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let issue = |name: &str, usage| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
            params.extended_key_usages = vec![usage];
            (params.signed_by(&key, &ca).unwrap(), key)
        };
        let (server_cert, server_key) = issue(
            "api.example.com",
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (c, k) = (dir.path().join("api.crt"), dir.path().join("api.key"));
        std::fs::write(&c, server_cert.pem()).unwrap();
        std::fs::write(&k, server_key.serialize_pem()).unwrap();
        set_mode(&k, 0o600);
        let listener = v1::GatewayListener {
            client_ca_file: ca_file.display().to_string(),
            require_client_cert: true,
            ..Default::default()
        };
        let server =
            server_config(CertSet::load(&[spec(&[], &c, &k)]).unwrap(), &listener).unwrap();

        // A client that keeps its sessions, as outside callers do.
        let (client_cert, client_key) = issue(
            "client.example.com",
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        );
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(bulwark_ca::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![client_cert.der().clone()],
                PrivateKeyDer::try_from(client_key.serialize_der()).unwrap(),
            )
            .unwrap();
        let client = Arc::new(client);
        let name = || rustls_pki_types::ServerName::try_from("api.example.com").unwrap();
        for _ in 0..2 {
            // A resumed session would admit the client on the certificate
            // it showed the first time, unverified.
            assert_eq!(
                bulwark_ca::testing::handshake(&client, &server, name()),
                Some(rustls::HandshakeKind::Full)
            );
        }
    }
}
