//! `enforcer policy check PATH...`: validate config and policy files together.
use std::path::PathBuf;
use std::process::ExitCode;

use crate::policy;

/// Prints a one-line summary on success; on failure one `file:line:col: message` line per error
/// on stderr and exit status 1, so editors and CI can jump to each one.
pub fn check(paths: &[PathBuf]) -> anyhow::Result<ExitCode> {
    match policy::check_files(paths) {
        Ok(cfg) => {
            println!(
                "ok: {} secrets, {} intents, {} agents, mode {}",
                cfg.secrets.len(),
                cfg.intents.len(),
                cfg.agents.len(),
                cfg.mode
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(diags) => {
            for d in &diags.0 {
                eprintln!("{d}");
            }
            Ok(ExitCode::from(1))
        }
    }
}
