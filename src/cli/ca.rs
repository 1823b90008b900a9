use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use bulwark_ca::store::{self, RootSource, Settings};
use bulwark_ca::{SpiffeId, server};
use clap::Subcommand;

use super::parse_duration;

#[derive(Subcommand)]
pub enum CaCommand {
    /// Create a root CA and an online intermediate in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Plug-in CA: an organisation's root certificate and key (PEM).
        #[arg(long, num_args = 2, value_names = ["CERT", "KEY"], conflicts_with = "import_intermediate")]
        import_root: Option<Vec<PathBuf>>,
        /// Plug-in CA: an intermediate (chain) and key signed by an organisation's root; needs --root.
        #[arg(long, num_args = 2, value_names = ["CHAIN", "KEY"], requires = "root")]
        import_intermediate: Option<Vec<PathBuf>>,
        /// The organisation's root certificate, with --import-intermediate.
        #[arg(long)]
        root: Option<PathBuf>,
        /// Default leaf lifetime.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        default_ttl: Duration,
        /// Longest leaf lifetime the CA grants.
        #[arg(long, default_value = "7d", value_parser = parse_duration)]
        max_ttl: Duration,
        /// Lifetime of the intermediate.
        #[arg(long, default_value = "365d", value_parser = parse_duration)]
        intermediate_ttl: Duration,
    },
    /// Run the CA service.
    Serve {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "0.0.0.0:15012")]
        listen: SocketAddr,
        /// Where to serve Prometheus metrics (off when absent).
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
        /// Signatures per second admitted before RESOURCE_EXHAUSTED.
        #[arg(long, default_value_t = 200.0)]
        sign_rate: f64,
        /// Burst of signatures admitted at once.
        #[arg(long, default_value_t = 400)]
        sign_burst: u32,
        /// Extra DNS names for the CA's own serving certificate.
        #[arg(long = "dns-name")]
        dns_names: Vec<String>,
        /// Control-plane admin address (host:port): a due root rotation waits
        /// until every connected sidecar has ACKed the bundle with the new root.
        #[arg(long)]
        rotation_gate: Option<String>,
        /// How long a due rotation waits for the gate before it activates
        /// anyway (with an error logged).
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        rotation_gate_max_wait: Duration,
        /// Kubernetes API URL (e.g. https://kubernetes.default.svc): accept
        /// projected ServiceAccount tokens, checked with TokenReview (off when absent).
        #[arg(long)]
        kube_api: Option<String>,
        /// The CA's own ServiceAccount token, for the TokenReview calls.
        #[arg(long, requires = "kube_api")]
        kube_token_file: Option<PathBuf>,
        /// The cluster's CA certificate (PEM), to verify an https --kube-api.
        #[arg(long, requires = "kube_api")]
        kube_ca_file: Option<PathBuf>,
        /// The audience projected tokens must carry.
        #[arg(long, default_value = bulwark_ca::kube::DEFAULT_AUDIENCE, requires = "kube_api")]
        kube_audience: String,
    },
    /// Print a bootstrap token for one workload identity.
    Token {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        identity: String,
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
    },
    /// Start a root rotation (new root + intermediate; old root kept in the bundle until its leaves expire).
    RotateRoot {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, num_args = 2, value_names = ["CERT", "KEY"], conflicts_with = "import_intermediate")]
        import_root: Option<Vec<PathBuf>>,
        #[arg(long, num_args = 2, value_names = ["CHAIN", "KEY"], requires = "root")]
        import_intermediate: Option<Vec<PathBuf>>,
        #[arg(long)]
        root: Option<PathBuf>,
        /// How long the new root is distributed before it starts signing
        /// (default: the maximum leaf TTL, so every workload, even one
        /// holding a leaf of the longest lifetime, has renewed and trusts it
        /// by then). The running CA switches at its next check
        /// after that (every 2 s), and with `ca serve --rotation-gate` only
        /// once every sidecar has ACKed the new bundle.
        #[arg(long, value_parser = parse_duration)]
        activate_after: Option<Duration>,
    },
    /// Remove retired roots whose certificates can no longer be valid from the bundle.
    PruneBundle {
        #[arg(long)]
        dir: PathBuf,
    },
}

fn read(p: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
}

fn source(
    import_root: Option<Vec<PathBuf>>,
    import_intermediate: Option<Vec<PathBuf>>,
    root: Option<PathBuf>,
) -> anyhow::Result<RootSource> {
    Ok(match (import_root, import_intermediate) {
        (Some(r), None) => RootSource::ImportRoot {
            cert_pem: read(&r[0])?,
            key_pem: read(&r[1])?,
        },
        (None, Some(i)) => RootSource::ImportIntermediate {
            chain_pem: read(&i[0])?,
            key_pem: read(&i[1])?,
            root_pem: read(
                root.as_ref()
                    .context("--import-intermediate needs --root")?,
            )?,
        },
        (None, None) => RootSource::Generate,
        (Some(_), Some(_)) => bail!("use either --import-root or --import-intermediate"),
    })
}

pub fn run(cmd: CaCommand) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Init {
            dir,
            trust_domain,
            import_root,
            import_intermediate,
            root,
            default_ttl,
            max_ttl,
            intermediate_ttl,
        } => {
            let mut settings = Settings::new(&trust_domain);
            settings.default_ttl_secs = default_ttl.as_secs();
            settings.max_ttl_secs = max_ttl.as_secs();
            settings.intermediate_ttl_secs = intermediate_ttl.as_secs();
            store::init(
                &dir,
                &settings,
                source(import_root, import_intermediate, root)?,
            )?;
            println!(
                "created CA for trust domain {trust_domain} in {}; trust bundle: {}",
                dir.display(),
                dir.join(store::BUNDLE).display()
            );
            Ok(())
        }
        CaCommand::Serve {
            dir,
            listen,
            metrics_listen,
            sign_rate,
            sign_burst,
            dns_names,
            rotation_gate,
            rotation_gate_max_wait,
            kube_api,
            kube_token_file,
            kube_ca_file,
            kube_audience,
        } => {
            if sign_rate.is_nan() || sign_rate <= 0.0 {
                bail!("--sign-rate must be positive");
            }
            let mut opts = server::ServeOptions::new(dir, listen);
            opts.metrics_listen = metrics_listen;
            opts.sign_rate = sign_rate;
            opts.sign_burst = sign_burst;
            opts.dns_names = dns_names;
            opts.rotation_gate = rotation_gate;
            opts.rotation_gate_max_wait = rotation_gate_max_wait;
            opts.kube = kube_api.map(|api| bulwark_ca::kube::KubeOptions {
                api,
                token_file: kube_token_file,
                ca_file: kube_ca_file,
                audience: kube_audience,
            });
            super::runtime()?.block_on(server::serve(opts, super::shutdown_signal()))?;
            Ok(())
        }
        CaCommand::Token { dir, identity, ttl } => {
            let id: SpiffeId = identity
                .parse()
                .with_context(|| format!("--identity {identity:?}"))?;
            let material = store::load(&dir)?;
            if id.trust_domain() != material.settings.trust_domain {
                bail!(
                    "--identity is in trust domain {:?}, but this CA serves {:?}",
                    id.trust_domain(),
                    material.settings.trust_domain
                );
            }
            if id.is_reserved() {
                bail!(
                    "--identity {id} is reserved for the mesh's own services: they issue their certificates from the CA directory"
                );
            }
            let max = bulwark_ca::token::MAX_TOKEN_TTL_SECS;
            let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
            if !(60..=max).contains(&ttl_secs) {
                bail!(
                    "--ttl must be between 1m and {}h, got {ttl_secs}s: a token can be presented again until it expires",
                    max / 3600
                );
            }
            let key = bulwark_ca::token::TokenKey::from_bytes(&material.token_secret);
            let now = time_now();
            println!("{}", key.mint(&id, now, ttl_secs));
            Ok(())
        }
        CaCommand::RotateRoot {
            dir,
            import_root,
            import_intermediate,
            root,
            activate_after,
        } => {
            let settings = store::load_settings(&dir)?;
            let after = activation_delay(activate_after, &settings).as_secs() as i64;
            let r = store::rotate_root(
                &dir,
                source(import_root, import_intermediate, root)?,
                time_now() + after,
            )?;
            println!(
                "rotation started: bundle holds {} roots; the new root signs from {} (Unix time); the old root leaves the bundle once its leaves have expired",
                r.roots_in_bundle, r.activate_at
            );
            Ok(())
        }
        CaCommand::PruneBundle { dir } => {
            let n = store::prune_bundle(&dir, time_now())?;
            println!("removed {n} retired root(s) from the bundle");
            Ok(())
        }
    }
}

/// How long a rotated root is only distributed: by default until every
/// leaf issued before the rotation, whatever its lifetime, has been renewed.
fn activation_delay(activate_after: Option<Duration>, settings: &Settings) -> Duration {
    activate_after.unwrap_or(Duration::from_secs(settings.max_ttl_secs))
}

fn time_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotated_root_signs_after_the_maximum_leaf_ttl_by_default() {
        let mut settings = Settings::new("cluster.local");
        settings.default_ttl_secs = 3600;
        settings.max_ttl_secs = 7 * 24 * 3600;
        assert_eq!(
            activation_delay(None, &settings),
            Duration::from_secs(7 * 24 * 3600)
        );
        let asked = Duration::from_secs(600);
        assert_eq!(activation_delay(Some(asked), &settings), asked);
    }
}
