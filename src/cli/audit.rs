//! `bulwark audit`: check the sidecar's tamper-evident audit log offline.

use std::path::PathBuf;

use bulwark_sidecar::audit;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Verify audit log files: complete JSON lines, seq continuity, the hash
    /// chain (across files and retention deletions) and, with a key, every
    /// line's HMAC. Prints `ok: ...` or the first problem as `file:line: what`.
    Verify {
        /// The sidecar's audit key (raw bytes, or hex). Without it only the
        /// chain is checked, which a forger who rewrites every line passes.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Audit files (`audit-NNNNNN.jsonl`), in any order.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

pub fn run(cmd: AuditCommand) -> anyhow::Result<()> {
    match cmd {
        AuditCommand::Verify { key_file, files } => verify(key_file, &files),
    }
}

fn verify(key_file: Option<PathBuf>, files: &[PathBuf]) -> anyhow::Result<()> {
    let key = key_file.as_deref().map(audit::read_key_file).transpose()?;
    // The error already reads `file:line: what`; main prints it.
    let r = audit::verify(files, key.as_deref())?;
    println!(
        "ok: {} {} in {} {} (seq {}..{})",
        r.records,
        if r.records == 1 { "record" } else { "records" },
        r.files,
        if r.files == 1 { "file" } else { "files" },
        r.first_seq,
        r.last_seq
    );
    if r.starts_after_retention {
        println!(
            "note: the log starts at seq {} after files deleted by retention",
            r.first_seq
        );
    }
    match r.head_seq {
        Some(seq) => println!("keyed head: seq {seq} ({})", audit::HEAD_FILE),
        None => println!(
            "note: no {} beside the newest file: records removed from the end would not be detected",
            audit::HEAD_FILE
        ),
    }
    if !r.mac_checked {
        eprintln!("warning: no --key-file: macs not checked, only the hash chain");
    }
    Ok(())
}
