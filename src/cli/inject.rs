use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use bulwark_xds::inject::{InjectConfig, inject_stream};
use clap::Args;

/// What injected pods point at; shared by `bulwark inject` and the webhook
/// of `bulwark xds serve`.
#[derive(Args, Clone)]
pub struct InjectFlags {
    /// The `bulwark` image of the injected containers.
    #[arg(long, default_value_t = InjectConfig::default().image)]
    proxy_image: String,
    /// The CA the injected sidecars use (host:port).
    #[arg(long = "inject-ca", default_value_t = InjectConfig::default().ca_addr)]
    inject_ca: String,
    /// The control plane the injected sidecars use (host:port, comma-separated).
    #[arg(long = "inject-xds", default_value_t = InjectConfig::default().xds_addr)]
    inject_xds: String,
    /// ConfigMap (in each injected namespace) holding the trust bundle as `bundle.pem`.
    #[arg(long, default_value_t = InjectConfig::default().bundle_configmap)]
    bundle_configmap: String,
}

impl InjectFlags {
    pub fn config(&self) -> InjectConfig {
        InjectConfig {
            image: self.proxy_image.clone(),
            ca_addr: self.inject_ca.clone(),
            xds_addr: self.inject_xds.clone(),
            bundle_configmap: self.bundle_configmap.clone(),
            ..InjectConfig::default()
        }
    }
}

#[derive(Args)]
pub struct InjectArgs {
    /// Kubernetes manifests (multi-document YAML); `-` for stdin.
    #[arg(short = 'f', long = "filename")]
    file: PathBuf,
    /// Trust domain of the injected identities.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    #[command(flatten)]
    flags: InjectFlags,
}

pub fn run(a: InjectArgs) -> anyhow::Result<()> {
    let text = if a.file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read stdin")?;
        s
    } else {
        std::fs::read_to_string(&a.file)
            .with_context(|| format!("cannot read {}", a.file.display()))?
    };
    let mut cfg = a.flags.config();
    cfg.trust_domain = a.trust_domain;
    let (out, report) =
        inject_stream(&text, &cfg).with_context(|| format!("{}", a.file.display()))?;
    print!("{out}");
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    for s in &report.skipped {
        eprintln!("skipped: {s}");
    }
    Ok(())
}
