//! enforcer: one binary, daemon and CLI. main only parses arguments and dispatches.
mod alert;
mod api;
mod cli;
mod daemon;
mod decide;
mod event;
mod file;
mod kernel;
mod mint;
mod policy;
mod proc;
mod report;
mod store;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::dispatch(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("enforcer: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
