//! The CA directory: root and intermediate certificates and keys, the trust
//! bundle, the token key and the CA's settings.
//!
//! ```text
//! ca.json            settings, and roots kept in the bundle after a rotation
//! root.pem root.key  the current root (root.key absent for an imported intermediate)
//! intermediate.pem   the signing intermediate (plus its chain up to, not including, the root)
//! intermediate.key
//! bundle.pem         every root the mesh trusts now
//! token.key          secret for bootstrap tokens
//! issued.jsonl       the issuance record
//! ```

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::identity::validate_trust_domain;

pub const SETTINGS_FILE: &str = "ca.json";
pub const ROOT_CERT: &str = "root.pem";
pub const ROOT_KEY: &str = "root.key";
pub const INTERMEDIATE_CERT: &str = "intermediate.pem";
pub const INTERMEDIATE_KEY: &str = "intermediate.key";
pub const BUNDLE: &str = "bundle.pem";
pub const TOKEN_KEY: &str = "token.key";
pub const ISSUED_LOG: &str = "issued.jsonl";
/// Prefix of the files of a rotation that is not active yet.
pub const PENDING_PREFIX: &str = "pending-";

/// Extra time an old root stays in the bundle after the last leaf it could
/// have signed expires: covers clock skew between nodes and replicas that
/// reload the directory a little late.
pub const ROOT_RETIRE_SLACK: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} already holds a CA (found {1}); refusing to overwrite it")]
    AlreadyInitialized(PathBuf, &'static str),
    #[error("{0} is readable or writable by group/others (mode {1:o}); run: chmod 600 {0}")]
    KeyPermissions(PathBuf, u32),
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("{0}")]
    Settings(String),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A root kept in the bundle after rotation until `drop_after`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RetiringRoot {
    pub cert_pem: String,
    /// Unix seconds after which nothing this root signed can still be valid.
    pub drop_after: i64,
}

/// `ca.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub trust_domain: String,
    /// Leaf lifetime when the client asks for none.
    pub default_ttl_secs: u64,
    /// Upper bound on any leaf lifetime.
    pub max_ttl_secs: u64,
    /// Lifetime of intermediates created by `init` and `rotate-root`.
    pub intermediate_ttl_secs: u64,
    #[serde(default)]
    pub retiring_roots: Vec<RetiringRoot>,
    /// A rotation whose new root is already in the bundle but which does not
    /// sign yet (Unix seconds when it starts signing).
    #[serde(default)]
    pub pending_activate_at: Option<i64>,
}

impl Settings {
    pub fn new(trust_domain: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_string(),
            default_ttl_secs: 24 * 3600,
            max_ttl_secs: 7 * 24 * 3600,
            intermediate_ttl_secs: 365 * 24 * 3600,
            retiring_roots: Vec::new(),
            pending_activate_at: None,
        }
    }

    fn check(&self) -> Result<(), StoreError> {
        validate_trust_domain(&self.trust_domain)
            .map_err(|e| StoreError::Settings(e.to_string()))?;
        if self.default_ttl_secs == 0 || self.max_ttl_secs == 0 {
            return Err(StoreError::Settings("TTLs must be positive".into()));
        }
        if self.default_ttl_secs > self.max_ttl_secs {
            return Err(StoreError::Settings(format!(
                "default TTL ({}s) exceeds the maximum TTL ({}s)",
                self.default_ttl_secs, self.max_ttl_secs
            )));
        }
        if self.intermediate_ttl_secs < 3600 && self.intermediate_ttl_secs < self.max_ttl_secs {
            // Short intermediates are allowed (tests, short-lived CAs) but
            // leaves are then clamped to them; say so rather than surprise.
            tracing::warn!(
                intermediate_ttl_secs = self.intermediate_ttl_secs,
                "intermediate lifetime is shorter than the maximum leaf TTL; leaves will be clamped"
            );
        }
        Ok(())
    }
}

/// Where the CA's signing material comes from.
pub enum RootSource {
    /// Generate a self-signed root and an intermediate under it.
    Generate,
    /// Plug-in CA: use an organisation's root (certificate and key) and
    /// create the intermediate under it.
    ImportRoot { cert_pem: String, key_pem: String },
    /// Plug-in CA: use an intermediate the organisation signed offline.
    /// `chain_pem` is the intermediate followed by any further intermediates;
    /// `root_pem` is the organisation's root (its key stays offline).
    ImportIntermediate {
        chain_pem: String,
        key_pem: String,
        root_pem: String,
    },
}

/// Atomically writes `contents` to `dir/name` with `mode`.
fn write_file(dir: &Path, name: &str, contents: &[u8], mode: u32) -> Result<(), StoreError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(contents).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    Ok(())
}

fn read(dir: &Path, name: &str) -> Result<String, StoreError> {
    let p = dir.join(name);
    fs::read_to_string(&p).map_err(io_err(&p))
}

/// Reads a private key file, refusing one that others can read.
fn read_key(dir: &Path, name: &str) -> Result<KeyPair, StoreError> {
    let p = dir.join(name);
    let meta = fs::metadata(&p).map_err(io_err(&p))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(StoreError::KeyPermissions(p, mode));
    }
    let pem = fs::read_to_string(&p).map_err(io_err(&p))?;
    KeyPair::from_pem(&pem).map_err(|e| StoreError::Invalid {
        path: p,
        what: format!("not a PEM private key: {e}"),
    })
}

fn ca_dn(trust_domain: &str, cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, cn);
    dn
}

fn ca_params(
    trust_domain: &str,
    cn: &str,
    constraint: BasicConstraints,
    not_before: OffsetDateTime,
    lifetime: Duration,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = ca_dn(trust_domain, cn);
    p.is_ca = IsCa::Ca(constraint);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.serial_number = Some(crate::random_serial());
    p.not_before = not_before;
    p.not_after = not_before + lifetime;
    p.use_authority_key_identifier_extension = true;
    p
}

struct Generated {
    root_cert_pem: String,
    root_key_pem: Option<String>,
    chain_pem: String,
    intermediate_key_pem: String,
}

fn generate_material(settings: &Settings, source: RootSource) -> Result<Generated, StoreError> {
    let td = &settings.trust_domain;
    let now = OffsetDateTime::now_utc();
    // Backdated a little so freshly made roots verify on nodes whose clocks lag.
    let nb = now - Duration::from_secs(3600);
    // Unique names: two CAs must never look alike to a path builder.
    let stamp = format!(
        "{}-{}",
        now.unix_timestamp(),
        crate::token::hex(&crate::random_bytes::<4>())
    );
    let inter_life = Duration::from_secs(settings.intermediate_ttl_secs);
    let make_intermediate = |root: &Issuer<'_, KeyPair>| -> Result<(String, String), StoreError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(
            td,
            &format!("Bulwark Intermediate CA {stamp}"),
            BasicConstraints::Constrained(0),
            nb,
            inter_life + Duration::from_secs(3600),
        );
        let cert = params.signed_by(&key, root)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    match source {
        RootSource::Generate => {
            let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
            let params = ca_params(
                td,
                &format!("Bulwark Root CA {stamp}"),
                BasicConstraints::Unconstrained,
                nb,
                Duration::from_secs(10 * 365 * 24 * 3600),
            );
            let root_cert = params.self_signed(&root_key)?;
            let root_pem = root_cert.pem();
            let issuer = Issuer::new(params, root_key);
            let (chain_pem, ik) = make_intermediate(&issuer)?;
            Ok(Generated {
                root_cert_pem: root_pem,
                root_key_pem: Some(issuer.key().serialize_pem()),
                chain_pem,
                intermediate_key_pem: ik,
            })
        }
        RootSource::ImportRoot { cert_pem, key_pem } => {
            let key = KeyPair::from_pem(&key_pem).map_err(|e| StoreError::Invalid {
                path: "--import-root key".into(),
                what: format!("not a PEM private key: {e}"),
            })?;
            let issuer =
                Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| StoreError::Invalid {
                    path: "--import-root certificate".into(),
                    what: format!("not a usable CA certificate: {e}"),
                })?;
            let root_der = first_cert(&cert_pem, "--import-root certificate")?;
            check_is_ca(&root_der, "--import-root certificate")?;
            let (chain_pem, ik) = make_intermediate(&issuer)?;
            Ok(Generated {
                root_cert_pem: cert_pem,
                root_key_pem: Some(key_pem),
                chain_pem,
                intermediate_key_pem: ik,
            })
        }
        RootSource::ImportIntermediate {
            chain_pem,
            key_pem,
            root_pem,
        } => {
            let inter = first_cert(&chain_pem, "--import-intermediate certificate")?;
            check_is_ca(&inter, "--import-intermediate certificate")?;
            let key = KeyPair::from_pem(&key_pem).map_err(|e| StoreError::Invalid {
                path: "--import-intermediate key".into(),
                what: format!("not a PEM private key: {e}"),
            })?;
            if !cert_matches_key(&inter, &key) {
                return Err(StoreError::Invalid {
                    path: "--import-intermediate".into(),
                    what: "the key does not belong to the certificate".into(),
                });
            }
            let root = first_cert(&root_pem, "--root certificate")?;
            check_is_ca(&root, "--root certificate")?;
            Ok(Generated {
                root_cert_pem: root_pem,
                root_key_pem: None,
                chain_pem,
                intermediate_key_pem: key_pem,
            })
        }
    }
}

fn first_cert(pem: &str, what: &str) -> Result<CertificateDer<'static>, StoreError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| StoreError::Invalid {
        path: what.into(),
        what: format!("no PEM certificate: {e}"),
    })
}

fn check_is_ca(der: &CertificateDer<'_>, what: &str) -> Result<(), StoreError> {
    let (_, c) = x509_parser::parse_x509_certificate(der).map_err(|e| StoreError::Invalid {
        path: what.into(),
        what: format!("unparseable certificate: {e}"),
    })?;
    if !c.is_ca() {
        return Err(StoreError::Invalid {
            path: what.into(),
            what: "not a CA certificate (basicConstraints CA:TRUE missing)".into(),
        });
    }
    Ok(())
}

fn cert_matches_key(der: &CertificateDer<'_>, key: &KeyPair) -> bool {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
        .unwrap_or(false)
}

/// Creates a new CA in `dir` (created if missing, must not hold a CA yet).
pub fn init(dir: &Path, settings: &Settings, source: RootSource) -> Result<(), StoreError> {
    settings.check()?;
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    for f in [SETTINGS_FILE, INTERMEDIATE_KEY, ROOT_KEY] {
        if dir.join(f).exists() {
            return Err(StoreError::AlreadyInitialized(dir.to_path_buf(), f));
        }
    }
    let g = generate_material(settings, source)?;
    let mut token_secret = [0u8; 32];
    crate::fill_random(&mut token_secret);
    write_file(dir, TOKEN_KEY, &token_secret, 0o600)?;
    write_material(dir, &g, "")?;
    write_file(dir, BUNDLE, g.root_cert_pem.as_bytes(), 0o644)?;
    save_settings(dir, settings)?;
    Ok(())
}

fn write_material(dir: &Path, g: &Generated, prefix: &str) -> Result<(), StoreError> {
    let name = |n: &str| format!("{prefix}{n}");
    match &g.root_key_pem {
        Some(k) => write_file(dir, &name(ROOT_KEY), k.as_bytes(), 0o600)?,
        None => {
            let _ = fs::remove_file(dir.join(name(ROOT_KEY)));
        }
    }
    write_file(
        dir,
        &name(INTERMEDIATE_KEY),
        g.intermediate_key_pem.as_bytes(),
        0o600,
    )?;
    write_file(dir, &name(ROOT_CERT), g.root_cert_pem.as_bytes(), 0o644)?;
    write_file(dir, &name(INTERMEDIATE_CERT), g.chain_pem.as_bytes(), 0o644)?;
    Ok(())
}

fn save_settings(dir: &Path, s: &Settings) -> Result<(), StoreError> {
    let json = serde_json::to_vec_pretty(s).expect("settings serialize");
    write_file(dir, SETTINGS_FILE, &json, 0o644)
}

pub fn load_settings(dir: &Path) -> Result<Settings, StoreError> {
    let p = dir.join(SETTINGS_FILE);
    let raw = fs::read_to_string(&p).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => StoreError::Invalid {
            path: dir.to_path_buf(),
            what: "no CA here; create one with `bulwark ca init --dir`".into(),
        },
        _ => StoreError::Io {
            path: p.clone(),
            source: e,
        },
    })?;
    let s: Settings = serde_json::from_str(&raw).map_err(|e| StoreError::Invalid {
        path: p,
        what: e.to_string(),
    })?;
    s.check()?;
    Ok(s)
}

/// Summary of a root rotation.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// Unix seconds when the new root starts signing.
    pub activate_at: i64,
    pub roots_in_bundle: usize,
}

/// Starts a root rotation in two phases, so that trust is distributed
/// before it is needed: now, the new root joins the bundle (workloads pick
/// it up with their next renewal or config push) while the old intermediate
/// keeps signing; at `activate_at`, the new intermediate starts signing and
/// the old root stays in the bundle until everything it signed has expired.
pub fn rotate_root(
    dir: &Path,
    source: RootSource,
    activate_at: i64,
) -> Result<Rotation, StoreError> {
    let mut settings = load_settings(dir)?;
    if let Some(at) = settings.pending_activate_at {
        return Err(StoreError::Settings(format!(
            "a rotation is already pending (activates at {at}, Unix time); wait for it"
        )));
    }
    let g = generate_material(&settings, source)?;
    write_material(dir, &g, PENDING_PREFIX)?;
    settings.pending_activate_at = Some(activate_at);
    save_settings(dir, &settings)?;
    let n = write_bundle(dir, &settings)?;
    // Activation is the running CA's job: it may be gated on every sidecar
    // having received the new bundle (`ca serve --rotation-gate`).
    Ok(Rotation {
        activate_at,
        roots_in_bundle: n,
    })
}

/// The fingerprint of a pending rotation's root, and when it became due,
/// if one is due at `now`.
pub fn due_pending_root(dir: &Path, now: i64) -> Result<Option<(String, i64)>, StoreError> {
    let settings = load_settings(dir)?;
    match settings.pending_activate_at {
        Some(at) if at <= now => {
            let pem = read(dir, &format!("{PENDING_PREFIX}{ROOT_CERT}"))?;
            let der = first_cert(&pem, "pending root")?;
            Ok(Some((crate::tls::fingerprint(&der), at)))
        }
        _ => Ok(None),
    }
}

/// Makes a pending rotation's root and intermediate the signers once its
/// time has come. Returns whether it did.
pub fn activate_pending(dir: &Path, now: i64) -> Result<bool, StoreError> {
    let mut settings = load_settings(dir)?;
    match settings.pending_activate_at {
        Some(at) if at <= now => {}
        _ => return Ok(false),
    }
    let old_root = read(dir, ROOT_CERT)?;
    let old_chain = read(dir, INTERMEDIATE_CERT)?;
    let old_inter_expiry = first_cert(&old_chain, INTERMEDIATE_CERT)
        .ok()
        .and_then(|d| {
            x509_parser::parse_x509_certificate(&d)
                .ok()
                .map(|(_, c)| c.validity().not_after.timestamp())
        })
        .unwrap_or(i64::MAX);
    // The old intermediate signs nothing after this instant, and no leaf it
    // signed outlives max_ttl (nor the intermediate itself).
    let drop_after = (now + settings.max_ttl_secs as i64).min(old_inter_expiry)
        + ROOT_RETIRE_SLACK.as_secs() as i64;
    // Key first: a reader never sees a new certificate with an old key
    // for longer than the two renames (and `load` checks they match).
    for f in [INTERMEDIATE_KEY, INTERMEDIATE_CERT, ROOT_CERT] {
        let from = dir.join(format!("{PENDING_PREFIX}{f}"));
        fs::rename(&from, dir.join(f)).map_err(io_err(&from))?;
    }
    let pending_root_key = dir.join(format!("{PENDING_PREFIX}{ROOT_KEY}"));
    if pending_root_key.exists() {
        fs::rename(&pending_root_key, dir.join(ROOT_KEY)).map_err(io_err(&pending_root_key))?;
    } else {
        let _ = fs::remove_file(dir.join(ROOT_KEY));
    }
    settings.retiring_roots.push(RetiringRoot {
        cert_pem: old_root,
        drop_after,
    });
    settings.pending_activate_at = None;
    save_settings(dir, &settings)?;
    write_bundle(dir, &settings)?;
    tracing::info!(old_root_drop_after = drop_after, "root rotation activated");
    Ok(true)
}

/// Writes `bundle.pem`: the current root, a pending one, and retiring ones.
fn write_bundle(dir: &Path, settings: &Settings) -> Result<usize, StoreError> {
    let mut roots = vec![read(dir, ROOT_CERT)?];
    if settings.pending_activate_at.is_some() {
        roots.push(read(dir, &format!("{PENDING_PREFIX}{ROOT_CERT}"))?);
    }
    roots.extend(settings.retiring_roots.iter().map(|r| r.cert_pem.clone()));
    let mut pem = String::new();
    for r in &roots {
        pem.push_str(r.trim_end());
        pem.push('\n');
    }
    write_file(dir, BUNDLE, pem.as_bytes(), 0o644)?;
    Ok(roots.len())
}

/// Drops retired roots whose `drop_after` is before `now` from the bundle.
/// Returns how many were dropped.
pub fn prune_bundle(dir: &Path, now: i64) -> Result<usize, StoreError> {
    let mut settings = load_settings(dir)?;
    let before = settings.retiring_roots.len();
    settings.retiring_roots.retain(|r| r.drop_after >= now);
    let dropped = before - settings.retiring_roots.len();
    if dropped > 0 {
        save_settings(dir, &settings)?;
        write_bundle(dir, &settings)?;
        tracing::info!(dropped, "retired roots removed from the trust bundle");
    }
    Ok(dropped)
}

/// Everything the signer needs, read from the directory.
pub struct Material {
    pub settings: Settings,
    pub intermediate_key: KeyPair,
    /// The intermediate first, then any further intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub chain_pem: String,
    pub bundle_pem: String,
    pub token_secret: Vec<u8>,
}

pub fn load(dir: &Path) -> Result<Material, StoreError> {
    let settings = load_settings(dir)?;
    let intermediate_key = read_key(dir, INTERMEDIATE_KEY)?;
    if dir.join(ROOT_KEY).exists() {
        // Not used by the online CA, but must not be left readable.
        read_key(dir, ROOT_KEY)?;
    }
    let chain_pem = read(dir, INTERMEDIATE_CERT)?;
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::Invalid {
            path: dir.join(INTERMEDIATE_CERT),
            what: e.to_string(),
        })?;
    if chain.is_empty() || !cert_matches_key(&chain[0], &intermediate_key) {
        return Err(StoreError::Invalid {
            path: dir.join(INTERMEDIATE_KEY),
            what: "intermediate key does not match intermediate.pem".into(),
        });
    }
    let bundle_pem = read(dir, BUNDLE)?;
    let tk = dir.join(TOKEN_KEY);
    let mode = fs::metadata(&tk).map_err(io_err(&tk))?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(StoreError::KeyPermissions(tk, mode));
    }
    let token_secret = fs::read(&tk).map_err(io_err(&tk))?;
    Ok(Material {
        settings,
        intermediate_key,
        chain,
        chain_pem,
        bundle_pem,
        token_secret,
    })
}
