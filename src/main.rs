//! The `bulwark` command: parses arguments and calls into the crates.

mod cli;
mod math;

fn main() -> std::process::ExitCode {
    cli::main()
}
