use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::Subcommand;

use super::parse_duration_ms;

#[derive(Subcommand)]
pub enum XdsCommand {
    /// Validate a directory (or file) of mesh config offline, with the checks the server applies.
    Validate { path: PathBuf },
    /// Run the control plane: serve a directory of mesh config (watched for changes) to sidecars over mTLS.
    Serve {
        /// Directory (or file) of YAML config. Read only; replicas may share it.
        #[arg(long)]
        config: PathBuf,
        /// The CA directory (read only): its trust bundle, and its intermediate,
        /// which issues the control plane's serving certificate.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Discovery (gRPC, mTLS) address.
        #[arg(long, default_value = "0.0.0.0:15010")]
        listen: SocketAddr,
        /// Where to serve /status and /metrics (plain HTTP: keep it on loopback).
        #[arg(long, default_value = "127.0.0.1:15011")]
        admin_listen: SocketAddr,
        /// How long a disconnected sidecar's endpoints stay registered.
        #[arg(long, default_value = "10s", value_parser = parse_duration_ms)]
        endpoint_grace: Duration,
        /// Node ids one identity may register from one source address
        /// (0: no limit, for a control plane that sees sidecars behind SNAT).
        #[arg(long, default_value_t = bulwark_xds::registry::DEFAULT_NODES_PER_SOURCE)]
        max_nodes_per_source: usize,
        /// Extra DNS names for the control plane's serving certificate.
        #[arg(long = "dns-name")]
        dns_names: Vec<String>,
        /// Where the sidecar injection webhook (HTTPS, POST /inject) listens,
        /// e.g. 0.0.0.0:15017 (off when absent).
        #[arg(long)]
        webhook_listen: Option<SocketAddr>,
        #[command(flatten)]
        inject: Box<super::inject::InjectFlags>,
    },
    /// Print the CustomResourceDefinitions of the config kinds (generated from the model).
    Crds,
    /// List connected sidecars, what they applied, and whether the mesh has converged.
    Status {
        /// The control plane's admin address (its --admin-listen).
        #[arg(long, default_value = "127.0.0.1:15011")]
        xds: String,
    },
}

pub fn run(cmd: XdsCommand) -> anyhow::Result<()> {
    match cmd {
        XdsCommand::Validate { path } => validate(&path),
        XdsCommand::Serve {
            config,
            ca_dir,
            listen,
            admin_listen,
            endpoint_grace,
            max_nodes_per_source,
            dns_names,
            webhook_listen,
            inject,
        } => {
            let mut opts = bulwark_xds::ServeOptions::new(config, ca_dir);
            opts.webhook_listen = webhook_listen;
            opts.inject = inject.config();
            opts.listen = listen;
            opts.admin_listen = Some(admin_listen);
            opts.endpoint_grace = endpoint_grace;
            opts.max_nodes_per_source = max_nodes_per_source;
            opts.dns_names = dns_names;
            serve(opts)
        }
        XdsCommand::Status { xds } => status(&xds),
        XdsCommand::Crds => {
            print!("{}", bulwark_xds::crds::crds_yaml());
            Ok(())
        }
    }
}

fn serve(opts: bulwark_xds::ServeOptions) -> anyhow::Result<()> {
    let result = super::runtime()?.block_on(bulwark_xds::serve(opts, super::shutdown_signal()));
    match result {
        Ok(()) => Ok(()),
        Err(bulwark_xds::ServeError::Config { path, errors }) => {
            for e in &errors {
                eprintln!("{e}");
            }
            let n = errors.len();
            anyhow::bail!(
                "{n} {} in {}; not serving",
                plural(n, "error"),
                path.display()
            )
        }
        Err(e) => Err(e.into()),
    }
}

/// One line per sidecar, the config directory's state if it is rejected,
/// then the convergence line.
fn status(addr: &str) -> anyhow::Result<()> {
    let report = super::runtime()?.block_on(bulwark_xds::fetch_status(addr))?;
    let now = SystemTime::now();
    for s in &report.sidecars {
        let mut line = format!(
            "{}  {}  node {}  connected {}  {}",
            s.identity,
            s.address,
            s.node_id,
            ago(now, s.connected_since_unix_ms),
            s.types_summary()
        );
        if let Some(n) = &s.last_nack {
            line.push_str(&format!(
                "  last NACK: {} (version {}, {}): {}",
                bulwark_xds::snapshot::kind_of(&n.type_url),
                n.system_version,
                ago(now, n.at_unix_ms),
                n.message
            ));
        }
        println!("{line}");
    }
    if let Some(r) = &report.config_rejected {
        println!(
            "config rejected {} (serving the last good config):",
            ago(now, r.at_unix_ms)
        );
        for e in &r.errors {
            println!("  {e}");
        }
    }
    println!("{}", report.convergence_line());
    Ok(())
}

/// `5s ago`, `3m ago`, `2h ago`.
fn ago(now: SystemTime, unix_ms: u64) -> String {
    let then = SystemTime::UNIX_EPOCH + Duration::from_millis(unix_ms);
    let secs = now.duration_since(then).map_or(0, |d| d.as_secs());
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// Prints `ok: N documents (...)`, or every error as `file:line: message` on
/// stderr and fails with a count.
fn validate(path: &std::path::Path) -> anyhow::Result<()> {
    match bulwark_xds::load_and_compile(path) {
        Ok(resources) => {
            let counts = bulwark_xds::document_counts(&resources);
            let n: usize = counts.iter().map(|(_, n)| n).sum();
            let kinds: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
            if kinds.is_empty() {
                println!("ok: {n} {}", plural(n, "document"));
            } else {
                println!("ok: {n} {} ({})", plural(n, "document"), kinds.join(", "));
            }
            Ok(())
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            let n = errors.len();
            anyhow::bail!("{n} {} in {}", plural(n, "error"), path.display())
        }
    }
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        word.to_string()
    } else {
        format!("{word}s")
    }
}
