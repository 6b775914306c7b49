//! enforcer: one binary, daemon and CLI. main only parses arguments and dispatches to the
//! library (`enforcer::cli`).
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = enforcer::cli::Cli::parse();
    match enforcer::cli::dispatch(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("enforcer: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
