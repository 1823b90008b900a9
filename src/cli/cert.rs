use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bulwark_ca::SpiffeId;
use bulwark_ca::client::{CaClient, Credential};
use bulwark_ca::tls::TrustBundle;
use clap::Subcommand;

use super::parse_duration;

#[derive(Subcommand)]
pub enum CertCommand {
    /// Get an SVID for a workload outside the mesh; writes key.pem (0600), cert.pem, bundle.pem.
    Request {
        /// CA address, host:port.
        #[arg(long)]
        ca: String,
        /// Trust bundle (PEM) the CA's certificate must chain to.
        #[arg(long)]
        ca_cert: PathBuf,
        #[arg(long)]
        identity: String,
        #[arg(long)]
        token_file: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Requested lifetime (the CA caps it).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
}

pub fn run(cmd: CertCommand) -> anyhow::Result<()> {
    let CertCommand::Request {
        ca,
        ca_cert,
        identity,
        token_file,
        out,
        ttl,
    } = cmd;
    let id: SpiffeId = identity
        .parse()
        .with_context(|| format!("--identity {identity:?}"))?;
    let bundle_pem = std::fs::read_to_string(&ca_cert)
        .with_context(|| format!("cannot read --ca-cert {}", ca_cert.display()))?;
    let bundle = TrustBundle::from_pem(&bundle_pem)
        .with_context(|| format!("--ca-cert {}", ca_cert.display()))?;
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("cannot read --token-file {}", token_file.display()))?;
    let client = CaClient::new(ca, bundle);
    let svid =
        super::runtime()?.block_on(client.issue(&id, Credential::Token(token.trim()), ttl))?;
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    write(&out.join("key.pem"), svid.key_pem().as_bytes(), 0o600)?;
    write(&out.join("cert.pem"), svid.chain_pem.as_bytes(), 0o644)?;
    write(&out.join("bundle.pem"), svid.bundle_pem.as_bytes(), 0o644)?;
    println!(
        "issued {} (serial {}), valid until {} (Unix time); wrote {}/{{key,cert,bundle}}.pem",
        svid.identity,
        svid.serial,
        svid.not_after,
        out.display()
    );
    Ok(())
}

fn write(path: &std::path::Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("cannot write {}", path.display()))
}
