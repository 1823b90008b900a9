//! Command-line interface. Each subcommand is a thin adapter over a library.

mod audit;
mod ca;
mod cert;
mod demo;
mod init;
mod inject;
mod rollout;
mod sidecar;
mod up;
mod xds;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bulwark", version, about = "Bulwark service mesh")]
struct Cli {
    /// Log filter (tracing env-filter syntax), e.g. `info` or `bulwark_ca=debug`.
    #[arg(long, global = true, env = "BULWARK_LOG", default_value = "info")]
    log: String,
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "BULWARK_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    /// Access log: one JSON line per request/connection on stdout, or off.
    #[arg(long, global = true, value_enum, default_value = "stdout")]
    access_log: AccessLog,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AccessLog {
    Stdout,
    Off,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Certificate authority: create, serve, mint bootstrap tokens, rotate roots.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Certificates for workloads outside the mesh.
    #[command(subcommand)]
    Cert(cert::CertCommand),
    /// Control plane: validate and serve mesh configuration.
    #[command(subcommand)]
    Xds(xds::XdsCommand),
    /// Run the sidecar proxy.
    Sidecar(Box<sidecar::SidecarArgs>),
    /// Install (or remove) the interception rules in this network namespace.
    Init(init::InitArgs),
    /// Print Kubernetes manifests with the sidecar injected (the webhook's logic, offline).
    Inject(inject::InjectArgs),
    /// Progressive delivery: move Route weights in the config directory (canary, blue/green).
    Rollout(rollout::RolloutArgs),
    /// Bring up a local demo mesh (network-namespace pods) and show live traffic.
    Up(up::UpArgs),
    /// Audit log: verify its hash chain and macs.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// A small HTTP server for demos and tests.
    #[command(hide = true)]
    DemoApp(demo::DemoArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_format, cli.access_log);
    let result = match cli.command {
        Command::Ca(c) => ca::run(c),
        Command::Cert(c) => cert::run(c),
        Command::Xds(c) => xds::run(c),
        Command::Sidecar(a) => sidecar::run(*a),
        Command::Init(a) => init::run(a),
        Command::DemoApp(a) => demo::run(a),
        Command::Up(a) => up::run(a),
        Command::Inject(a) => inject::run(a),
        Command::Rollout(a) => rollout::run(a),
        Command::Audit(c) => audit::run(c),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

type FilterHandle =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// The live log filter, changeable at run time (the sidecar's `/logging`).
static LOG_FILTER: std::sync::OnceLock<FilterHandle> = std::sync::OnceLock::new();

/// Reads (None) or replaces (Some) the process's log filter.
pub fn log_filter(new: Option<&str>) -> Result<String, String> {
    let h = LOG_FILTER.get().ok_or("logging is not initialised")?;
    if let Some(f) = new {
        let parsed = tracing_subscriber::EnvFilter::try_new(f)
            .map_err(|e| format!("invalid filter {f:?}: {e}"))?;
        h.reload(parsed).map_err(|e| e.to_string())?;
        tracing::info!(filter = f, "log filter changed");
    }
    h.with_current(|f| f.to_string()).map_err(|e| e.to_string())
}

/// Diagnostics go to stderr (text or JSON); access-log events (target
/// `bulwark::access`) go to stdout as JSON lines, or nowhere.
fn init_logging(filter: &str, format: LogFormat, access: AccessLog) {
    use tracing_subscriber::filter::filter_fn;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, fmt};
    const ACCESS: &str = "bulwark::access";
    let env = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let (env, reload) = tracing_subscriber::reload::Layer::new(env);
    let _ = LOG_FILTER.set(reload);
    let not_access = filter_fn(|m| m.target() != ACCESS);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (text, json) = match format {
        LogFormat::Text => (
            Some(
                fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr)
                    .with_filter(not_access),
            ),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr)
                    .with_filter(not_access),
            ),
        ),
    };
    let access_layer = (access == AccessLog::Stdout).then(|| {
        fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stdout)
            .with_filter(filter_fn(|m| m.target() == ACCESS))
    });
    tracing_subscriber::registry()
        .with(env)
        .with(text)
        .with(json)
        .with(access_layer)
        .init();
}

/// A multi-threaded runtime for long-running commands.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

/// Parses durations like `90s`, `15m`, `24h`, `7d` or plain seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: use e.g. 90s, 15m, 24h, 7d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("invalid duration unit in {s:?}: use s, m, h or d")),
    };
    n.checked_mul(mult)
        .map(std::time::Duration::from_secs)
        .ok_or_else(|| format!("duration {s:?} is too large"))
}

/// Like [`parse_duration`], also accepting milliseconds (`250ms`).
pub fn parse_duration_ms(s: &str) -> Result<std::time::Duration, String> {
    match s.trim().strip_suffix("ms") {
        Some(n) => n
            .parse::<u64>()
            .map(std::time::Duration::from_millis)
            .map_err(|_| format!("invalid duration {s:?}")),
        None => parse_duration(s),
    }
}
