use bulwark_sidecar::intercept::rules::{self, RuleOptions};
use clap::Args;

#[derive(Args)]
pub struct InitArgs {
    /// Socket mark of the proxy's own sockets (excluded from interception).
    #[arg(long, default_value_t = bulwark_sidecar::DEFAULT_PROXY_MARK, value_parser = super::sidecar::parse_u32)]
    proxy_mark: u32,
    /// Also exclude sockets owned by this uid (for an unprivileged proxy).
    #[arg(long)]
    proxy_uid: Option<u32>,
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// Inbound ports to capture (comma-separated); default: all but the excluded.
    #[arg(long, value_delimiter = ',')]
    inbound_ports: Vec<u16>,
    /// Inbound ports never captured.
    #[arg(long, value_delimiter = ',', default_value = "15000,15020,15021")]
    exclude_inbound_ports: Vec<u16>,
    /// Outbound ports never captured: the app reaches any host on them
    /// around the mesh. None by default: the proxy's own connections (the
    /// CA and control plane among them) pass by mark or uid.
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_ports: Vec<u16>,
    /// Print the rules instead of installing them.
    #[arg(long, conflicts_with = "remove")]
    dry_run: bool,
    /// Remove the rules `init` installed.
    #[arg(long)]
    remove: bool,
}

pub fn run(a: InitArgs) -> anyhow::Result<()> {
    let o = RuleOptions {
        outbound_port: a.outbound_port,
        inbound_port: a.inbound_port,
        proxy_mark: a.proxy_mark,
        proxy_uid: a.proxy_uid,
        inbound_ports: a.inbound_ports,
        exclude_inbound_ports: a.exclude_inbound_ports,
        exclude_outbound_ports: a.exclude_outbound_ports,
    };
    if a.dry_run {
        for line in rules::plan(&o) {
            println!("{line}");
        }
        return Ok(());
    }
    if a.remove {
        rules::remove()?;
        println!("interception rules removed");
    } else {
        rules::install(&o)?;
        println!(
            "interception rules installed: outbound -> :{}, inbound -> :{}",
            o.outbound_port, o.inbound_port
        );
    }
    Ok(())
}
