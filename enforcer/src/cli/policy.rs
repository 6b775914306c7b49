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

/// `enforcer policy reload`: the daemon validates and applies atomically, or refuses.
pub fn reload() -> anyhow::Result<ExitCode> {
    match super::grant::call("POST", "/v1/policy/reload", None) {
        Ok(v) => {
            println!("policy reloaded from {}", v["reloaded"].as_str().unwrap_or("?"));
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("enforcer: {e:#}");
            Ok(ExitCode::from(1))
        }
    }
}
