//! The `bulwark` command: parses arguments and calls into the crates.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
