use std::path::PathBuf;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum XdsCommand {
    /// Validate a directory (or file) of mesh config offline, with the checks the server applies.
    Validate { path: PathBuf },
}

pub fn run(cmd: XdsCommand) -> anyhow::Result<()> {
    match cmd {
        XdsCommand::Validate { path } => {
            anyhow::bail!("validate {} is not wired yet", path.display())
        }
    }
}
