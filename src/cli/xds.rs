use std::path::PathBuf;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum XdsCommand {
    /// Validate a directory (or file) of mesh config offline, with the checks the server applies.
    Validate { path: PathBuf },
}

pub fn run(cmd: XdsCommand) -> anyhow::Result<()> {
    match cmd {
        XdsCommand::Validate { path } => validate(&path),
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
