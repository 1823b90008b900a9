use std::path::PathBuf;

use bulwark_xds::rollout::{self, Action, Request};
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct RolloutArgs {
    #[command(subcommand)]
    command: RolloutCommand,
}

#[derive(Args)]
struct Target {
    /// The config directory (or file) holding the Route.
    #[arg(long)]
    config: PathBuf,
    /// The Route's name.
    #[arg(long)]
    route: String,
    /// The Route's namespace.
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// The rule to edit (default: the first rule with backends).
    #[arg(long)]
    rule: Option<String>,
    /// The subset label that names versions.
    #[arg(long, default_value = "version")]
    label: String,
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Start sending `--step` percent of the rule's traffic to `--to` (100 = blue/green switch).
    Start {
        #[command(flatten)]
        target: Target,
        /// The new version (subset label value).
        #[arg(long)]
        to: String,
        #[arg(long, default_value_t = 10)]
        step: u32,
    },
    /// Move one more step of traffic to the new version.
    Step {
        #[command(flatten)]
        target: Target,
    },
    /// Send all traffic to the new version and end the rollout.
    Promote {
        #[command(flatten)]
        target: Target,
    },
    /// Roll back: all traffic to the stable version, the canary backend removed.
    Abort {
        #[command(flatten)]
        target: Target,
    },
}

pub fn run(a: RolloutArgs) -> anyhow::Result<()> {
    let (t, action) = match a.command {
        RolloutCommand::Start { target, to, step } => (target, Action::Start { to, step }),
        RolloutCommand::Step { target } => (target, Action::Step),
        RolloutCommand::Promote { target } => (target, Action::Promote),
        RolloutCommand::Abort { target } => (target, Action::Abort),
    };
    let what = match &action {
        Action::Start { .. } => "started",
        Action::Step => "stepped",
        Action::Promote => "promoted",
        Action::Abort => "aborted",
    };
    let req = Request {
        config: t.config,
        route: t.route,
        namespace: t.namespace,
        rule: t.rule,
        label: t.label,
        action,
    };
    let done = rollout::run(&req)?;
    println!(
        "rollout {what}: route {}/{}: {done}",
        req.namespace, req.route
    );
    Ok(())
}
